#!/usr/bin/env bash
# Side-by-side benchmark of kvalloc, vLLM v1 and SGLang KV-cache managers (issue 7).
# Makes .venv-peers on first use (torch, vllm==0.33.0, sglang==0.5.23, kvalloc from this tree),
# then runs compare.py with the given flags, e.g.
#   benches/peers/run.sh --workload chat
#   benches/peers/run.sh --workload mooncake --requests 300
# Not part of scripts/test.sh: nothing here matches pytest's test_*.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
benches/peers/setup_venv.sh
# Fixed hash seed: vLLM's block hashes and the peers' dict orders do not vary between runs.
# One BLAS thread: numpy's idle BLAS workers otherwise spin on the second of two cores.
OPENBLAS_NUM_THREADS=1 PYTHONHASHSEED=0 exec .venv-peers/bin/python -W ignore benches/peers/compare.py "$@"
