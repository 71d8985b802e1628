"""Side by side: kvalloc, vLLM v1 and SGLang KV-cache managers on one workload and one memory
budget. Run through benches/peers/run.sh, which makes the environment with the peers.

    benches/peers/run.sh --workload chat
    benches/peers/run.sh --workload mooncake --requests 200
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim  # noqa: E402
import workload  # noqa: E402
from geometry import Geometry  # noqa: E402

TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "traces" / "mooncake_conversation.jsonl"

DRIVERS = {
    "kvalloc": ("drive_kvalloc", "KvallocDriver"),
    "vllm": ("drive_vllm", "VllmDriver"),
    "sglang": ("drive_sglang", "SglangDriver"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["chat", "mooncake"], default="chat")
    p.add_argument("--requests", type=int, default=None,
                   help="chat: conversations (default 64); mooncake: trace rows (default 300)")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--system-prompts", type=int, default=4, help="chat: distinct shared system prompts")
    p.add_argument("--system-len", type=int, default=1024, help="chat: system prompt tokens")
    p.add_argument("--prompt-len", type=int, default=256, help="chat: new user tokens per turn")
    p.add_argument("--output-len", type=int, default=128,
                   help="chat: output tokens per turn; mooncake: cap on the trace's output lengths")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (SGLang: page size)")
    p.add_argument("--window", type=int, default=128, help="sliding window in tokens")
    p.add_argument("--memory-gib", type=float, default=1.0, help="KV budget in GiB, the same for all")
    p.add_argument("--max-running", type=int, default=64, help="running requests at most")
    p.add_argument("--max-prefill-tokens", type=int, default=16384, help="prompt tokens admitted per step")
    p.add_argument("--repeat", type=int, default=5,
                   help="runs per manager, each on a fresh manager, taken round robin across the "
                        "managers; the fastest is reported (the machines are shared and noisy; every "
                        "run gives the same hits)")
    p.add_argument("--kvalloc-watermark", type=float, default=0.0,
                   help="kvalloc's admission watermark (a fraction of the memory every admission "
                        "leaves free or evictable); 0: admit whatever fits, as the peers do")
    p.add_argument("--gc", action="store_true",
                   help="keep Python's cyclic garbage collector on in the timed runs (off by "
                        "default, as timeit does)")
    p.add_argument("--managers", default="kvalloc,vllm,sglang", help="comma-separated subset of kvalloc,vllm,sglang")
    p.add_argument("--trace", type=Path, default=TRACE)
    return p.parse_args(argv)


def make_workload(a: argparse.Namespace) -> list[workload.Request]:
    if a.workload == "chat":
        return workload.chat(
            conversations=a.requests or 64,
            turns=a.turns,
            system_prompts=a.system_prompts,
            system_len=a.system_len,
            user_len=a.prompt_len,
            output_len=a.output_len,
        )
    return workload.mooncake(a.trace, requests=a.requests or 300, max_output=a.output_len)


def table(results: list[sim.Result]) -> str:
    base = next((r for r in results if r.name == "kvalloc"), None)
    head = (
        "| manager | allocator s | us / request | hit tokens | hit rate | preemptions "
        "| blocks back | time vs kvalloc | hits vs kvalloc |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        us = r.seconds / r.requests * 1e6
        rate = r.hit_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
        t_ratio = f"{r.seconds / base.seconds:.1f}x" if base and base.seconds else "-"
        h_ratio = f"{r.hit_tokens / base.hit_tokens:.3f}" if base and base.hit_tokens else "-"
        lines.append(
            f"| {r.name} | {r.seconds:.3f} | {us:,.1f} | {r.hit_tokens:,} | {rate:.1%} | {r.preemptions:,} "
            f"| {'yes' if r.blocks_back else 'NO'} | {t_ratio} | {h_ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    geo = Geometry(window=a.window, block_tokens=a.block_size)
    capacity = int(a.memory_gib * (1 << 30))
    reqs = make_workload(a)
    n_prompt = sum(len(r.prompt) for r in reqs)
    print(
        f"workload {a.workload}: {len(reqs)} requests, {n_prompt:,} prompt tokens, "
        f"{sum(len(r.output) for r in reqs):,} output tokens; memory {a.memory_gib} GiB; "
        f"block {a.block_size}, window {a.window}; gpt-oss-120b attention geometry "
        f"({geo.layers_per_kind} full + {geo.layers_per_kind} sliding layers, "
        f"{geo.kind_bytes_per_token:,} bytes/token per kind)",
        flush=True,
    )
    names = [m.strip() for m in a.managers.split(",") if m.strip()]
    for name in names:
        if name not in DRIVERS:
            sys.exit(f"--managers: unknown manager {name!r}; choose from {', '.join(DRIVERS)}")
    # Repeats go round robin, so that every manager's runs sample the same stretches of a
    # noisy machine; the fastest of each manager's runs is reported.
    runs: dict[str, list[sim.Result]] = {name: [] for name in names}
    setups: dict[str, float] = {}
    for _ in range(max(1, a.repeat)):
        for name in names:
            module, cls = DRIVERS[name]
            t0 = time.perf_counter()
            extra = {"watermark": a.kvalloc_watermark} if name == "kvalloc" else {}
            driver = getattr(importlib.import_module(module), cls)(geo, capacity, **extra)
            setups[name] = time.perf_counter() - t0
            # As timeit does: no cyclic-GC pauses inside the timed calls, for every manager.
            gc.collect()
            if not a.gc:
                gc.disable()
            try:
                runs[name].append(sim.run(driver, reqs, a.max_running, a.max_prefill_tokens))
            finally:
                gc.enable()
            del driver
    results = []
    for name in names:
        res = min(runs[name], key=lambda r: r.seconds)
        print(
            f"  {res.name}: {res.seconds:.3f} s in the manager (fastest of {len(runs[name])}: "
            f"{', '.join(f'{r.seconds:.3f}' for r in runs[name])}; {res.wall_seconds:.1f} s wall, "
            f"{setups[name]:.1f} s import+setup), {res.steps:,} steps, {res.admissions:,} admissions",
            flush=True,
        )
        results.append(res)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
