#!/usr/bin/env bash
# Opt-in: the Python extension built with profile-guided optimization, about 10% faster on the
# scheduler step than the plain release build `scripts/setup.sh` installs (README, "Profile-
# guided build"). Three phases: an instrumented build, a training run (scripts/pgo_train.py:
# the scheduler step, single calls, tiers, the arena, trace replay), then the optimized build
# with that profile, both in the release profile (fat LTO: Cargo.toml), each in a target
# directory of its own. About twice the plain build's time, plus the training run.
#
#     scripts/setup.sh && scripts/pgo_build.sh    # install it into .venv (editable)
#     scripts/pgo_build.sh --out FILE             # or copy the library to FILE instead
#     scripts/pgo_build.sh --tree DIR --out FILE  # the sources in DIR (another revision's
#                                                 # worktree) with their own training run
#                                                 # (benches/step.py build REV OUT --pgo)
#
# scripts/setup.sh, and so scripts/run.sh and scripts/test.sh, keep the installed profile-guided
# build while the sources it was built from are unchanged (.venv/kvalloc-build records them),
# and install a plain build otherwise.
# PYTHON: the interpreter of the training run (default .venv's). Build outputs go under
# $CARGO_TARGET_DIR (default target/): pgo-gen (instrumented), pgo-use (optimized), and
# pgo/KEY.profdata, the profile per state of the sources, so a second run with nothing changed
# reuses it and finds the build up to date. Needs llvm-profdata from rustup's llvm-tools
# component (added here when rustup can fetch it); without it, or when the training run fails,
# exits non-zero and says why.
set -euo pipefail
usage() {
  echo "usage: scripts/pgo_build.sh [--tree DIR] [--out FILE]" >&2
  exit 2
}
script=$(realpath "$0")
root=$(cd "$(dirname "$script")/.." && pwd)
tree=$root
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --tree) [ $# -ge 2 ] || usage; tree=$(realpath "$2"); shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$(realpath -m "$2"); shift 2 ;;
    *) usage ;;
  esac
done
if [ "$tree" != "$root" ] && [ -z "$out" ]; then usage; fi
target=${CARGO_TARGET_DIR:-$root/target}
python=${PYTHON:-$root/.venv/bin/python}

# The sources' key (scripts/source_key.sh, what scripts/setup.sh records too) and this script.
key=$("$root/scripts/source_key.sh" "$tree")
profile_key=$(printf '%s %s' "$key" "$(sha256sum < "$script")" | sha256sum | cut -c1-16)
so="$root/python/kvalloc/_core.abi3.so"

profdata="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null; then
  echo "pgo_build: adding rustup's llvm-tools component (llvm-profdata)" >&2
  timeout 300 rustup component add llvm-tools >/dev/null 2>&1 || true
fi
if [ ! -x "$profdata" ]; then
  echo "pgo_build: llvm-profdata not found (rustup component add llvm-tools)" >&2
  exit 1
fi

profile="$target/pgo/$profile_key.profdata"
if [ ! -f "$profile" ]; then
  echo "pgo_build: instrumented build and training run (profile $profile_key)" >&2
  mkdir -p "$target/pgo"
  raw=$(mktemp -d)
  trap 'rm -rf "$raw"' EXIT
  (cd "$tree" && CARGO_TARGET_DIR="$target/pgo-gen" PYO3_PYTHON="$python" \
    RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" cargo build --release -q -p kvalloc-py)
  # Only the training run's counts (build scripts and proc macros ran instrumented too).
  rm -rf "${raw:?}"/*
  log="$target/pgo/train.log"
  if ! (cd "$tree" && "$python" scripts/pgo_train.py "$target/pgo-gen/release/lib_core.so") \
      >"$log" 2>&1; then
    tail -20 "$log" >&2
    echo "pgo_build: the training run failed (a bug: tests/test_bench_scripts.py runs it too)" >&2
    exit 1
  fi
  "$profdata" merge -o "$profile.tmp" "$raw"
  mv "$profile.tmp" "$profile"
  # Older profiles of this target directory are of other sources.
  find "$target/pgo" -name '*.profdata' ! -name "$profile_key.profdata" -delete
fi

echo "pgo_build: optimized build with profile $profile_key" >&2
flags="${RUSTFLAGS:-} -Cprofile-use=$profile"
if [ -n "$out" ]; then
  (cd "$tree" && CARGO_TARGET_DIR="$target/pgo-use" PYO3_PYTHON="$python" RUSTFLAGS="$flags" \
    cargo build --release -q -p kvalloc-py)
  mkdir -p "$(dirname "$out")"
  cp "$target/pgo-use/release/lib_core.so" "$out"
  exit
fi
# Installed in place (editable), as scripts/setup.sh installs the plain build; its own target
# directory, so that switching between the two rebuilds neither.
cd "$root"
VIRTUAL_ENV="$root/.venv" PATH="$root/.venv/bin:$PATH" CARGO_TARGET_DIR="$target/pgo-use" \
  RUSTFLAGS="$flags" .venv/bin/maturin develop --release -q >&2
# What scripts/setup.sh reads to keep this build while the sources are unchanged.
echo "pgo $key $(sha256sum < "$so" | cut -d' ' -f1)" > "$root/.venv/kvalloc-build"
echo "pgo_build: the profile-guided build is installed in .venv" >&2
