#!/usr/bin/env bash
# Builds the Python extension of git revision REV (any commit-ish) into OUT/_core.abi3.so, for
# side-by-side runs of two builds (benches/step_ab.py). A temporary worktree is built with its
# own cargo target directory (target/rev, kept, so later builds are incremental).
#
#     scripts/build_rev.sh f62c482 /tmp/kv-f62c482
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
    echo "usage: scripts/build_rev.sh REV OUT_DIR" >&2
    exit 2
fi
rev=$(git rev-parse --verify "$1^{commit}")
out=$2
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}
wt=$(mktemp -d)
git worktree add -q --detach "$wt" "$rev"
trap 'git -C "$root" worktree remove --force "$wt"' EXIT
(cd "$wt" && CARGO_TARGET_DIR="$root/target/rev" PYO3_PYTHON="$python" cargo build --release -q -p kvalloc-py)
mkdir -p "$out"
cp "$root/target/rev/release/lib_core.so" "$out/_core.abi3.so"
echo "$out/_core.abi3.so: kvalloc at ${rev:0:12}"
