#!/usr/bin/env bash
# Builds the Python extension of git revision REV (any commit-ish) into OUT/_core.abi3.so, for
# side-by-side runs of two builds (benches/step_ab.py). A temporary worktree is built with its
# own cargo target directory (target/rev, kept, so later builds are incremental).
#
#     scripts/build_rev.sh f62c482 /tmp/kv-f62c482
#     scripts/build_rev.sh f62c482 /tmp/kv-f62c482-pgo --pgo
#
# --pgo: profile-guided, as scripts/pgo_build.sh builds the installed extension
# (scripts/pgo_profile.sh: an instrumented build and that revision's own training run; then the
# optimized build; target/rev-gen and target/rev-pgo), so that two revisions' profile-guided
# builds can be compared.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ] || [ $# -gt 3 ] || { [ $# -eq 3 ] && [ "$3" != --pgo ]; }; then
    echo "usage: scripts/build_rev.sh REV OUT_DIR [--pgo]" >&2
    exit 2
fi
pgo=${3:-}
rev=$(git rev-parse --verify "$1^{commit}")
out=$2
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}
wt=$(mktemp -d)
git worktree add -q --detach "$wt" "$rev"
trap 'git -C "$root" worktree remove --force "$wt"' EXIT
mkdir -p "$out"
if [ -z "$pgo" ]; then
    (cd "$wt" && CARGO_TARGET_DIR="$root/target/rev" PYO3_PYTHON="$python" cargo build --release -q -p kvalloc-py)
    cp "$root/target/rev/release/lib_core.so" "$out/_core.abi3.so"
    echo "$out/_core.abi3.so: kvalloc at ${rev:0:12}"
    exit
fi
raw=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$wt"; rm -rf "$raw"' EXIT
# This checkout's profile script on that revision's tree (its own training run).
(cd "$wt" && CARGO_TARGET_DIR="$root/target/rev-gen" PYTHON="$python" \
    "$root/scripts/pgo_profile.sh" "$raw/merged.profdata")
(cd "$wt" && CARGO_TARGET_DIR="$root/target/rev-pgo" PYO3_PYTHON="$python" \
    RUSTFLAGS="-Cprofile-use=$raw/merged.profdata" cargo build --release -q -p kvalloc-py)
cp "$root/target/rev-pgo/release/lib_core.so" "$out/_core.abi3.so"
echo "$out/_core.abi3.so: kvalloc at ${rev:0:12}, profile-guided"
