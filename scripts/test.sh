#!/usr/bin/env bash
# Set everything up and run every test: Rust (core crate: unit, integration and doc tests) and
# Python (tests/, plus one untimed pass over the pytest benches so they cannot rot). Each
# phase's time goes to stderr. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
took() { echo "== $1 took $((SECONDS - start)) s" >&2; start=$SECONDS; }
start=$SECONDS
scripts/setup.sh test
took "set-up"

echo "== cargo test (core crate)"
cargo test --quiet
took "cargo test"

echo "== pytest"
.venv/bin/python -m pytest tests benches --benchmark-disable "$@"
took "pytest"
