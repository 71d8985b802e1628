"""Side by side: kvalloc, vLLM v1 and SGLang KV-cache managers on one workload and one memory
budget. Run through benches/peers/run.sh, which makes the environment with the peers.

    benches/peers/run.sh --workload chat
    benches/peers/run.sh --workload mooncake --requests 200 --memory-gib 2

Each manager runs `--rounds` times on a fresh instance, interleaved (kvalloc, vLLM, SGLang, then
again), so that every manager samples the same stretches of a shared, noisy machine; the table
reports each manager's median and the ratio of the medians. Every contender runs on one thread
(torch's intra-op and inter-op pools, OpenMP, MKL, OpenBLAS), and every timer starts at the top
of a scheduler step, before the contender builds its inputs (see sim.py).
"""

from __future__ import annotations

import os

# Before numpy or torch load: their thread pools read these once. One thread for every
# contender: torch's second intra-op thread slows SGLang's small tensor ops 5-8x on a loaded
# 2-core machine, and idle BLAS workers spin on the other core.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sim  # noqa: E402
import workload  # noqa: E402
from geometry import Geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# The trace the package ships (the default of `kvalloc simulate`, and of tests/sim_replay.rs).
TRACE = REPO / "python" / "kvalloc" / "data" / "mooncake_conversation.jsonl"

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
    p.add_argument("--rounds", "--repeat", type=int, default=5, dest="rounds",
                   help="runs per manager, each on a fresh manager, interleaved across the managers "
                        "(A, B, C, A, B, C, ...); the median is reported (every run gives the same hits)")
    p.add_argument("--kvalloc-watermark", type=float, default=0.0,
                   help="kvalloc's admission watermark (a fraction of the memory every admission "
                        "leaves free or evictable); 0: admit whatever fits, as the peers do")
    p.add_argument("--gc", action="store_true",
                   help="keep Python's cyclic garbage collector on in the timed runs (off by "
                        "default, as timeit does)")
    p.add_argument("--managers", default="kvalloc,vllm,sglang", help="comma-separated subset of kvalloc,vllm,sglang")
    p.add_argument("--trace", type=Path, default=TRACE,
                   help="mooncake: a Mooncake trace (JSON lines); default: the one in python/kvalloc/data")
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
    if not a.trace.is_file():
        sys.exit(f"--trace: no trace at {a.trace} (the repository's is {TRACE.relative_to(REPO)})")
    return workload.mooncake(a.trace, requests=a.requests or 300, max_output=a.output_len)


def median_seconds(runs: list[sim.Result]) -> float:
    return statistics.median(r.seconds for r in runs)


def table(runs: dict[str, list[sim.Result]]) -> str:
    """One row per manager: the median of its runs' times, their range, and the ratio of its
    median to kvalloc's median; the outcome columns are its first run's (every run's, see
    `outcome`)."""
    base = median_seconds(runs["kvalloc"]) if "kvalloc" in runs else None
    base_hits = runs["kvalloc"][0].hit_tokens if "kvalloc" in runs else None
    head = (
        "| manager | median s | range s | us / request | hit tokens | hit rate | preemptions | refused "
        "| blocks back | median vs kvalloc | hits vs kvalloc |"
    )
    lines = [head, "|" + "---|" * 11]
    for rs in runs.values():
        r, med = rs[0], median_seconds(rs)
        us = med / r.requests * 1e6
        rate = r.hit_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
        t_ratio = f"{med / base:.1f}x" if base else "-"
        h_ratio = f"{r.hit_tokens / base_hits:.3f}" if base_hits else "-"
        spread = f"{min(x.seconds for x in rs):.3f}-{max(x.seconds for x in rs):.3f}"
        lines.append(
            f"| {r.name} | {med:.3f} | {spread} | {us:,.1f} | {r.hit_tokens:,} | {rate:.1%} "
            f"| {r.preemptions:,} | {len(r.refused):,} | {'yes' if r.blocks_back else 'NO'} | {t_ratio} | {h_ratio} |"
        )
    return "\n".join(lines)


def outcome(r: sim.Result) -> tuple:
    """What a run did, apart from its time: equal in every run of one manager."""
    return (r.admissions, r.prompt_tokens, r.hit_tokens, r.preemptions, tuple(r.refused), r.steps, r.blocks_back)


def pin_threads() -> int:
    """One torch thread for every contender (the peers' tensors are tiny: a second thread only
    adds hand-offs). Returns the intra-op thread count."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 1
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran
        pass
    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    geo = Geometry(window=a.window, block_tokens=a.block_size)
    capacity = int(a.memory_gib * (1 << 30))
    names = [m.strip() for m in a.managers.split(",") if m.strip()]
    for name in names:
        if name not in DRIVERS:
            sys.exit(f"--managers: unknown manager {name!r}; choose from {', '.join(DRIVERS)}")
    reqs = make_workload(a)
    # Every import before any run (torch's thread pools are pinned once, for all contenders).
    classes = {name: getattr(importlib.import_module(DRIVERS[name][0]), DRIVERS[name][1]) for name in names}
    threads = pin_threads()
    n_prompt = sum(len(r.prompt) for r in reqs)
    print(
        f"workload {a.workload}: {len(reqs)} requests, {n_prompt:,} prompt tokens, "
        f"{sum(len(r.output) for r in reqs):,} output tokens; memory {a.memory_gib} GiB; "
        f"block {a.block_size}, window {a.window}; gpt-oss-120b attention geometry "
        f"({geo.layers_per_kind} full + {geo.layers_per_kind} sliding layers, "
        f"{geo.kind_bytes_per_token:,} bytes/token per kind); {a.rounds} interleaved rounds; "
        f"torch threads {threads}, OMP/MKL/OpenBLAS threads 1",
        flush=True,
    )
    # Rounds interleave the managers (A, B, C, A, B, C, ...), so that every manager's runs
    # sample the same stretches of a noisy machine; each manager's median is reported.
    runs: dict[str, list[sim.Result]] = {name: [] for name in names}
    setups: dict[str, float] = {}
    for _ in range(max(1, a.rounds)):
        for name in names:
            t0 = time.perf_counter()
            extra = {"watermark": a.kvalloc_watermark} if name == "kvalloc" else {}
            driver = classes[name](geo, capacity, **extra)
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
    for name in names:
        rs = runs[name]
        r = rs[0]
        if any(outcome(x) != outcome(r) for x in rs):
            print(f"  WARNING {r.name}: runs differ in outcome: {[outcome(x) for x in rs]}", flush=True)
        print(
            f"  {r.name}: median {median_seconds(rs):.3f} s in the manager (runs in order: "
            f"{', '.join(f'{x.seconds:.3f}' for x in rs)}; {r.wall_seconds:.1f} s wall, "
            f"{setups[name]:.1f} s setup), {r.steps:,} steps, {r.admissions:,} admissions",
            flush=True,
        )
        if r.refused:
            shown = ", ".join(f"{rid} ({len(reqs[rid].prompt):,})" for rid in r.refused[:8])
            more = f" and {len(r.refused) - 8} more" if len(r.refused) > 8 else ""
            print(
                f"    refused {len(r.refused)} requests that do not fit with nothing running "
                f"(request (prompt tokens)): {shown}{more}",
                flush=True,
            )
    print()
    print(table(runs))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
