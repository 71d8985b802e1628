#!/usr/bin/env bash
# The byte-checking random test in its long mode: new seeds for SECONDS (default 600), every
# tier on, a real remote server started here (scripts/remote-store.sh) and stopped after.
#   scripts/fuzz_bytes.sh [SECONDS] [FIRST_SEED]
# Prints each failing seed with the operations that led to it; keep such a seed in
# tests/test_byte_fuzz.py's REGRESSION_SEEDS once fixed. Needs scripts/setup.sh test first.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
first="${2:-$(date +%s)}"
case "$seconds$first" in *[!0-9.]*) echo "usage: scripts/fuzz_bytes.sh [SECONDS] [FIRST_SEED]" >&2; exit 2;; esac
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scripts/remote-store.sh start "$port" >/dev/null
trap 'scripts/remote-store.sh stop "$port" >/dev/null' EXIT
.venv/bin/python -m kvalloc.reference.byte_fuzz --seconds "$seconds" --first-seed "$first" \
  --remote-url "redis://127.0.0.1:$port/0"
