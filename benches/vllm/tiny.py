"""The tiny hybrid model every vLLM bench and check here runs: a Gemma 3 text config with no
weights (``tiny-gemma3/config.json``: 6 layers, sliding window 32, blocks of 32), loaded with
dummy weights, greedy, in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: starts in seconds

MODEL = Path(__file__).resolve().parent / "tiny-gemma3"


def llm_kwargs(**overrides: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for the tiny model, with ``overrides`` applied."""
    return {
        "model": str(MODEL),
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "float32",
        "seed": 0,
        "enforce_eager": True,
        "block_size": 32,
        "max_model_len": 1024,
        "gpu_memory_utilization": 0.05,
        **overrides,
    }
