"""Checks that kvalloc inside vLLM keeps tenants apart: the same prompt under two ``cache_salt``s
shares no cached token, under one salt it does, and without a salt it does not reach a salted
request's blocks. Prints a JSON summary of each request's ``num_cached_tokens``; exits non-zero
when isolation or reuse fails.

    .venv-vllm/bin/python benches/vllm/salt_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import llm_kwargs  # noqa: E402


def main() -> int:
    from vllm import LLM, SamplingParams

    llm = LLM(
        **llm_kwargs(
            num_gpu_blocks_override=128,
            scheduler_cls="kvalloc.vllm.KvallocScheduler",
            additional_config={"kvalloc": {"verify": True}},
        )
    )
    sp = SamplingParams(max_tokens=2, temperature=0.0, detokenize=False, ignore_eos=True)
    prompt = list(range(10, 300))

    def cached(salt: str | None) -> int:
        p = {"prompt_token_ids": prompt + [7]}
        if salt is not None:
            p["cache_salt"] = salt
        return llm.generate([p], sp, use_tqdm=False)[0].num_cached_tokens or 0

    got = {
        "a first": cached("tenant-a"),
        "a again": cached("tenant-a"),
        "b": cached("tenant-b"),
        "none": cached(None),
        "none again": cached(None),
    }
    print(json.dumps(got))
    ok = got["a first"] == 0 and got["a again"] > 0 and got["b"] == 0 and got["none"] == 0 and got["none again"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
