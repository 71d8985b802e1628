#!/usr/bin/env bash
# Builds the Python extension with profile-guided optimization and installs it into .venv
# (editable), as scripts/setup.sh does: an instrumented build runs scripts/pgo_train.py (the
# scheduler step, single calls, tiers, the arena, trace replay), then the release build uses
# that profile (scripts/pgo_profile.sh makes it): about 10% faster on the scheduler step than a
# plain release build (README, "Profile-guided build").
#
#     scripts/pgo_build.sh              # needs .venv with maturin and numpy (scripts/setup.sh)
#     KVALLOC_PGO=0 scripts/pgo_build.sh  # a plain release build
#
# The profile is kept per state of the sources (target/pgo/KEY.profdata): a second run with
# nothing changed reuses it and finds the build up to date. Without llvm-profdata (rustup's
# llvm-tools component, added here when rustup can fetch it) the build is a plain one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

develop() {
  VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" RUSTFLAGS="${RUSTFLAGS:-} $*" \
    .venv/bin/maturin develop --release -q
}

if [ "${KVALLOC_PGO:-1}" = 0 ]; then
  develop
  exit
fi

# What the profile depends on: the Rust and Python sources, the lockfile, the training run,
# the compiler.
key=$(
  find rust python/kvalloc -type f ! -name '*.so' ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum
  sha256sum Cargo.toml Cargo.lock scripts/pgo_train.py scripts/pgo_profile.sh benches/step_workload.py \
    benches/as_kvalloc.py
  rustc -vV
)
key=$(printf '%s' "$key" | sha256sum | cut -c1-16)
dir=target/pgo
profile="$dir/$key.profdata"

if [ ! -f "$profile" ]; then
  echo "pgo_build: instrumented build and training run (profile $key)" >&2
  mkdir -p "$dir"
  if PYTHON="$root/.venv/bin/python" scripts/pgo_profile.sh "$profile" "$dir/train.log"; then
    find "$dir" -name '*.profdata' ! -name "$key.profdata" -delete
  else
    # No llvm-profdata, or a broken training run (a bug: tests/test_bench_scripts.py runs it
    # too): the extension itself still builds, so install a plain build rather than nothing.
    echo "pgo_build: WARNING: the profile could not be made; plain release build" >&2
    develop
    exit
  fi
fi
develop "-Cprofile-use=$root/$profile"
