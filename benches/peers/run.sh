#!/usr/bin/env bash
# Side-by-side benchmark of kvalloc, vLLM v1 and SGLang KV-cache managers (issue 7).
# Makes .venv-peers on first use (torch, vllm==0.33.0, sglang==0.5.23, kvalloc from this tree),
# then runs compare.py with the given flags, e.g.
#   benches/peers/run.sh --workload chat
#   benches/peers/run.sh --workload mooncake --requests 200 --memory-gib 2
# Not part of scripts/test.sh: nothing here matches pytest's test_*.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
benches/peers/setup_venv.sh
# Fixed hash seed: vLLM's block hashes and the peers' dict orders do not vary between runs.
# One thread for every contender (compare.py also pins torch's pools): a second intra-op
# thread slows SGLang's small tensor ops 5-8x on a loaded machine, and idle BLAS workers spin
# on the other core.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONHASHSEED=0
exec .venv-peers/bin/python -W ignore benches/peers/compare.py "$@"
