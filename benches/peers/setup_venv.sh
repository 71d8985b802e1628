#!/usr/bin/env bash
# Makes .venv-peers: torch, vLLM and SGLang (no dependencies of their own beyond what the
# imported KV-cache modules need, all pinned) and kvalloc built from this tree. Idempotent: a
# second run only rebuilds kvalloc.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=.venv-peers
py="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { "$VENV/bin/python" -m pip install -q "$@"; }

start=$(date +%s)
if [ ! -f "$VENV/.peers-installed" ]; then
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  # No CPU build of torch is reachable here (only PyPI): PyPI's Linux torch links the CUDA
  # runtime libraries, so `import torch` needs them present even on a machine without a GPU.
  # Install torch without its dependency list, then exactly the shared libraries its .so files
  # name (no CUDA bindings, no cuSOLVER), all at the versions torch pins.
  pip_install --no-deps "torch==2.14.1"
  pip_install --no-deps \
    "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*" "nvidia-cuda-nvrtc==13.0.88.*" \
    "nvidia-cublas==13.1.1.3.*" "nvidia-cufft==12.0.0.61.*" "nvidia-cufile==1.15.1.6.*" \
    "nvidia-curand==10.4.0.35.*" "nvidia-cusparse==12.6.3.3.*" "nvidia-nvjitlink==13.0.88" \
    "nvidia-cudnn-cu13==9.24.0.43" "nvidia-cusparselt-cu13==0.8.1" "nvidia-nccl-cu13==2.30.7" \
    "nvidia-nvshmem-cu13==3.4.5"
  pip_install --no-deps "numpy==2.4.6" -r benches/peers/requirements.txt
  # The peers themselves, at the versions the issue names, without their dependency lists
  # (those pull CUDA kernels, servers and tokenizers the KV-cache modules never import).
  pip_install --no-deps "vllm==0.33.0" "sglang==0.5.23"
  # Their own version pins disagree (transformers, compressed-tensors, triton); pip warns, and
  # the pinned set in requirements.txt is the one checked to import.
  touch "$VENV/.peers-installed"
fi
pip_install "maturin>=1.7,<2"
VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release -q
echo "peers venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)" >&2
