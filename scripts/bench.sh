#!/usr/bin/env bash
# Every benchmark, side by side, in one run: criterion (Rust), pytest-benchmark (Python) and the
# scheduler-step scripts (committed bookkeeping against none, and what a page fault costs here).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
cargo bench --bench slab --bench manager --bench tiers -- --noplot "$@"
.venv/bin/python -m pytest benches --benchmark-only --benchmark-columns=min,median,mean,ops --benchmark-sort=name
(cd benches && ../.venv/bin/python step_prefault.py && ../.venv/bin/python page_fault_cost.py)
