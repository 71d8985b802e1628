#!/usr/bin/env bash
# Every benchmark, side by side, in one run: criterion (Rust), pytest-benchmark (Python) and the
# scheduler step's bookkeeping committed against none, and what a page fault costs here
# (benches/step.py prefault, page-faults). Extra arguments go to criterion.
# Criterion builds in the `bench` profile (the release profile's settings); the Python benches
# measure the installed extension: the plain release build, or the profile-guided one after
# scripts/pgo_build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
cargo bench --bench slab --bench manager --bench tiers -- --noplot "$@"
.venv/bin/python -m pytest benches --benchmark-only --benchmark-columns=min,median,mean,ops --benchmark-sort=name
.venv/bin/python benches/step.py prefault
.venv/bin/python benches/step.py page-faults
