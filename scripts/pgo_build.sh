#!/usr/bin/env bash
# Builds the Python extension with profile-guided optimization and installs it into .venv
# (editable), as scripts/setup.sh does: an instrumented build runs scripts/pgo_train.py (the
# scheduler step, single calls, tiers, the arena, trace replay), then the release build uses
# that profile: about 10% faster on the scheduler step than a plain release build (README,
# "Profile-guided build").
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

profdata="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null; then
  timeout 300 rustup component add llvm-tools >/dev/null 2>&1 || true
fi
if [ ! -x "$profdata" ]; then
  echo "pgo_build: llvm-profdata not found (rustup component add llvm-tools); plain release build" >&2
  develop
  exit
fi

# What the profile depends on: the Rust and Python sources, the lockfile, the training run,
# the compiler.
key=$(
  find rust python/kvalloc -type f ! -name '*.so' ! -path '*/__pycache__/*' -print0 \
    | sort -z | xargs -0 sha256sum
  sha256sum Cargo.toml Cargo.lock scripts/pgo_train.py benches/step_workload.py benches/as_kvalloc.py
  rustc -vV
)
key=$(printf '%s' "$key" | sha256sum | cut -c1-16)
dir=target/pgo
profile="$dir/$key.profdata"

# Instrumented build, training run, merged profile; returns non-zero on any failure (each step
# checked: `set -e` does not apply inside a function called from a condition).
make_profile() {
  mkdir -p "$dir" || return 1
  CARGO_TARGET_DIR=target/pgo-gen PYO3_PYTHON="$root/.venv/bin/python" \
    RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$root/$dir/raw" \
    cargo build --release -q -p kvalloc-py || return 1
  # Only the training run's counts (build scripts and proc macros ran instrumented too).
  rm -rf "$dir/raw" || return 1
  .venv/bin/python scripts/pgo_train.py target/pgo-gen/release/lib_core.so >"$dir/train.log" 2>&1 \
    || { tail -20 "$dir/train.log" >&2; return 1; }
  "$profdata" merge -o "$profile.tmp" "$dir/raw" || return 1
  mv "$profile.tmp" "$profile" || return 1
  find "$dir" -name '*.profdata' ! -name "$key.profdata" -delete
}

if [ ! -f "$profile" ]; then
  echo "pgo_build: instrumented build and training run (profile $key)" >&2
  if ! make_profile; then
    # A broken training run is a bug (tests/test_bench_scripts.py runs it too), but the
    # extension itself still builds: install a plain build rather than nothing.
    echo "pgo_build: WARNING: the profile could not be made; plain release build" >&2
    develop
    exit
  fi
fi
develop "-Cprofile-use=$root/$profile"
