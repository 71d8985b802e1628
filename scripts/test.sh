#!/usr/bin/env bash
# Set everything up and run every test: Rust (core crate: unit, integration and doc tests) and
# Python (tests/, plus one untimed pass over the pytest benches so they cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test

echo "== cargo test (core crate)"
cargo test --quiet

echo "== pytest"
.venv/bin/python -m pytest tests benches --benchmark-disable "$@"
