#!/usr/bin/env bash
# Every benchmark, side by side, in one run: criterion (Rust) and pytest-benchmark (Python).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
cargo bench --bench slab --bench manager --bench tiers -- --noplot "$@"
.venv/bin/python -m pytest benches --benchmark-only --benchmark-columns=min,median,mean,ops --benchmark-sort=name
