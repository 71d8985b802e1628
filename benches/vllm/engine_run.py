"""Runs one workload through ``vllm.LLM`` with the tiny hybrid model and prints a JSON result:
every output's token ids and logprobs, cached tokens, and the engine's counters.

    .venv-vllm/bin/python benches/vllm/engine_run.py --scheduler kvalloc --workload chat

Run in its own process per configuration (each builds an engine). ``--scheduler stock`` is
vLLM's own manager; ``kvalloc`` is ``kvalloc.vllm.KvallocScheduler``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import llm_kwargs  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def counters(llm) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:")
        if name in ("num_preemptions", "prefix_cache_hits", "prefix_cache_queries", "prompt_tokens", "generation_tokens"):
            out[name] = float(getattr(m, "value", 0) or 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scheduler", choices=["stock", "kvalloc"], required=True)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="chat")
    ap.add_argument("--workload-args", default="{}", help="JSON keyword arguments of the workload")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--blocks", type=int, default=256, help="num_gpu_blocks_override")
    ap.add_argument("--max-batched-tokens", type=int, default=None, help="chunked prefill chunk")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--kvalloc", default="{}", help="JSON kvalloc options (additional_config)")
    ap.add_argument("--out", required=True, help="where to write the JSON result (vLLM logs to stdout)")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    kwargs = llm_kwargs(
        enable_prefix_caching=not args.no_prefix_caching,
        dtype=args.dtype,
        num_gpu_blocks_override=args.blocks,
        max_model_len=args.max_model_len,
        disable_log_stats=False,
    )
    if args.max_batched_tokens:
        kwargs.update(max_num_batched_tokens=args.max_batched_tokens, enable_chunked_prefill=True)
    if args.max_num_seqs:
        kwargs.update(max_num_seqs=args.max_num_seqs)
    if args.scheduler == "kvalloc":
        kwargs.update(scheduler_cls="kvalloc.vllm.KvallocScheduler", additional_config={"kvalloc": json.loads(args.kvalloc)})
    llm = LLM(**kwargs)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=1, detokenize=False, ignore_eos=True)

    rounds, build = WORKLOADS[args.workload](**json.loads(args.workload_args))
    history: list = []
    results = []
    start = time.perf_counter()
    for r in range(rounds):
        prompts = build(r, history)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        pairs = []
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            # The chosen token's logprob at each step.
            lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], c.token_ids)]
            results.append(
                {"round": r, "prompt_len": len(p), "tokens": list(c.token_ids), "logprobs": lps, "cached": o.num_cached_tokens or 0}
            )
            pairs.append((p, list(c.token_ids)))
        history.append(pairs)
    seconds = time.perf_counter() - start
    result = {"config": vars(args), "seconds": seconds, "counters": counters(llm), "outputs": results}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
