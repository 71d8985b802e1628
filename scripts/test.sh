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
# vLLM for CPU and torch in their own venv (about 4 minutes and 6 GB the first time), for the
# plug-in's engine tests and vLLM's own scheduler tests; KVALLOC_SKIP_VLLM=1 leaves them out
# (they skip, saying why).
if [ "${KVALLOC_SKIP_VLLM:-0}" != 1 ]; then
  benches/vllm/setup_venv.sh
  took "vLLM set-up"
fi

echo "== cargo test (core crate)"
cargo test --quiet
took "cargo test"

echo "== pytest"
.venv/bin/python -m pytest tests benches --benchmark-disable "$@"
took "pytest"
