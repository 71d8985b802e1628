#!/usr/bin/env bash
# Makes the profile of kvalloc's profile-guided build for the source tree in the current
# directory: an instrumented build of the extension (in $CARGO_TARGET_DIR, default
# target/pgo-gen), that tree's own training run (scripts/pgo_train.py), and the merged counts
# in OUT. Shared by scripts/pgo_build.sh (the installed build) and scripts/build_rev.sh --pgo
# (another revision's, run in its worktree).
#
#     scripts/pgo_profile.sh OUT.profdata [TRAINING_LOG]    # PYTHON: the interpreter (.venv's)
#
# Needs llvm-profdata from rustup's llvm-tools component (added here when rustup can fetch it);
# without it, or when a step fails, exits non-zero and says why.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/pgo_profile.sh OUT.profdata [TRAINING_LOG]" >&2
    exit 2
fi
out=$1
log=${2:-/dev/null}
python=${PYTHON:-python3}
target=${CARGO_TARGET_DIR:-target/pgo-gen}
profdata="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/llvm-profdata"
if [ ! -x "$profdata" ] && command -v rustup >/dev/null; then
    timeout 300 rustup component add llvm-tools >/dev/null 2>&1 || true
fi
if [ ! -x "$profdata" ]; then
    echo "pgo_profile: llvm-profdata not found (rustup component add llvm-tools)" >&2
    exit 1
fi
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
CARGO_TARGET_DIR="$target" PYO3_PYTHON="$python" RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" \
    cargo build --release -q -p kvalloc-py
# Only the training run's counts (build scripts and proc macros ran instrumented too).
rm -rf "${raw:?}"/*
if ! "$python" scripts/pgo_train.py "$target/release/lib_core.so" >"$log" 2>&1; then
    [ "$log" = /dev/null ] || tail -20 "$log" >&2
    echo "pgo_profile: the training run failed" >&2
    exit 1
fi
"$profdata" merge -o "$out.tmp" "$raw"
mv "$out.tmp" "$out"
