#!/usr/bin/env bash
# kvalloc's capacity inside vLLM, side by side with vLLM's own KV-cache manager: makes
# .venv-vllm if needed (benches/vllm/setup_venv.sh), then runs benches/vllm/capacity.py with the
# given flags, e.g.
#   benches/vllm/capacity.sh --blocks 128 256 384
#   benches/vllm/capacity.sh --blocks 256 --rounds 3 --caching-off
# Not part of scripts/test.sh (minutes per budget): tests/test_vllm_engine.py holds the plug-in
# to vLLM's outputs there.
set -euo pipefail
cd "$(dirname "$0")/../.."
benches/vllm/setup_venv.sh
# One thread for every contender (torch's intra-op pool, BLAS, OpenMP).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
exec .venv-vllm/bin/python benches/vllm/capacity.py "$@"
