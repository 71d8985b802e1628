#!/usr/bin/env bash
# Sets up everything kvalloc needs on a fresh machine: a virtual environment in .venv with the
# Python dependencies, and the extension built in release mode and installed editable.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     plus what the tests and benches need
# Everything it prints goes to stderr, so that a command run after it owns stdout
# (scripts/run.sh --json | python -m json.tool). A second run with nothing changed installs
# nothing and finds the build up to date (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
exec >&2

extras="${1:-}"
py="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# Quiet, and no version-check round trip to PyPI on every run.
export PIP_DISABLE_PIP_VERSION_CHECK=1
deps=("maturin>=1.7,<2" "numpy>=1.24")
if [ "$extras" = "test" ]; then
  deps+=("pytest>=8" "hypothesis>=6.100" "pytest-benchmark>=4" "mypy>=1.10" "matplotlib>=3.7"
         "pyzmq>=25" "msgpack>=1.0")
fi
# One resolver run for all of them; a no-op when they are installed.
.venv/bin/python -m pip install -q "${deps[@]}"
if [ "$extras" = "test" ]; then
  # A real Valkey/Redis server binary for the remote-tier tests and benches (one server, or a
  # cluster: scripts/remote-store.sh cluster needs only the server binary and bash).
  scripts/remote-store.sh install
fi

# The release build (Cargo.toml's [profile.release]), installed in place (editable):
# python/kvalloc is imported from the tree and the compiled _core lands next to it.
# .venv/kvalloc-build records which build is installed ("release" or, after scripts/pgo_build.sh,
# "pgo"), of which sources (scripts/source_key.sh) and its checksum: while they match, nothing
# is built or installed again (nor is the loaded library rewritten under a running process).
record=.venv/kvalloc-build
so=python/kvalloc/_core.abi3.so
key=$(scripts/source_key.sh)
kind=
if [ -f "$record" ] && [ -f "$so" ] && read -r kind recorded sha < "$record" \
    && [ "$recorded" = "$key" ] && [ "$sha" = "$(sha256sum < "$so" | cut -d' ' -f1)" ] \
    && .venv/bin/python -c "import kvalloc._core" 2>/dev/null; then
  echo "setup: the installed $kind build is up to date"
else
  echo "setup: building the extension (release profile)"
  rm -f "$record"
  VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" .venv/bin/maturin develop --release -q
  echo "release $key $(sha256sum < "$so" | cut -d' ' -f1)" > "$record"
fi
.venv/bin/python -c "import kvalloc; print('kvalloc', kvalloc.__version__, 'ready in .venv')"
