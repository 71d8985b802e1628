"""kvalloc's capacity inside vLLM: the same multi-turn workload, model and block count
(``num_gpu_blocks_override``) with vLLM's own KV-cache manager and with kvalloc's.

    benches/vllm/capacity.sh --blocks 128 256 384     # the README's table
    benches/vllm/capacity.sh --blocks 256 --rounds 3 --caching-off

For each block count it reports hit (cached) tokens, prefill tokens computed, preemptions and
generation throughput, the two managers side by side; throughput as the median of ``--rounds``
interleaved runs (stock, kvalloc, stock, ...), each engine in its own process with one torch
thread. Then, for each budget, the smallest block count at which kvalloc reaches stock vLLM's
hit tokens (bisection over kvalloc runs): the capacity multiplier inside a real engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKLOAD = {"conversations": 16, "turns": 4, "system": 400, "user": 60, "systems": 2}


def run(scheduler: str, blocks: int, workload: dict, max_tokens: int, extra: tuple[str, ...] = ()) -> dict | None:
    """One engine's result, or None when vLLM refuses to start with so few blocks (its own
    check that one request of ``max_model_len`` fits)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run(
            [
                sys.executable, str(HERE / "engine_run.py"), "--scheduler", scheduler, "--workload", "chat",
                "--workload-args", json.dumps(workload), "--blocks", str(blocks), "--max-model-len", "1024",
                "--max-tokens", str(max_tokens), "--out", str(out), *extra,
            ],
            capture_output=True, text=True, env=env, cwd=ROOT,
        )
        if proc.returncode != 0 and "To serve at least one request" in proc.stdout + proc.stderr:
            return None
        if proc.returncode != 0:
            raise SystemExit(f"{scheduler} at {blocks} blocks failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def summary(results: list[dict]) -> dict:
    c = results[0]["counters"]
    return {
        "hits": int(c["prefix_cache_hits"]),
        "prefill": int(c["prompt_tokens"] - c["prefix_cache_hits"]),
        "preemptions": int(c["num_preemptions"]),
        "tok_s": statistics.median(r["counters"]["generation_tokens"] / r["seconds"] for r in results),
        "runs": len(results),
    }


def blocks_to_match(target_hits: int, lo: int, hi: int, workload: dict, max_tokens: int, cache: dict) -> int:
    """Smallest block count in (lo, hi] at which kvalloc's hits reach ``target_hits`` (hits grow
    with the budget, so bisection), to 8 blocks."""
    def hits(b: int) -> int:
        if b not in cache:
            result = run("kvalloc", b, workload, max_tokens)
            cache[b] = result["counters"]["prefix_cache_hits"] if result else -1
        return cache[b]

    while hi - lo > 8:
        mid = (lo + hi) // 2
        if hits(mid) >= target_hits:
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per manager and budget")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workload", default=json.dumps(WORKLOAD), help="JSON arguments of the chat workload")
    ap.add_argument("--no-match", action="store_true", help="skip the smallest-budget search")
    ap.add_argument(
        "--caching-off",
        action="store_true",
        help="prefix caching off for both: equal work, so throughput compares the managers' own cost",
    )
    args = ap.parse_args()
    workload = json.loads(args.workload)

    rows = []
    kvalloc_hits: dict[int, int] = {}
    for blocks in args.blocks:
        runs: dict[str, list[dict]] = {"stock": [], "kvalloc": []}
        for _ in range(args.rounds):
            for name in runs:
                extra = ("--no-prefix-caching",) if args.caching_off else ()
                result = run(name, blocks, workload, args.max_tokens, extra)
                if result is None:
                    raise SystemExit(f"vLLM refuses to start with {blocks} blocks: give more")
                runs[name].append(result)
        s, k = summary(runs["stock"]), summary(runs["kvalloc"])
        kvalloc_hits[blocks] = k["hits"]
        rows.append((blocks, s, k))
        print(f"{blocks} blocks: stock {s}, kvalloc {k}", file=sys.stderr, flush=True)

    print(f"workload: chat {json.dumps(workload)}, {args.max_tokens} output tokens, tiny Gemma3 (window 32, blocks of 32)")
    print("| blocks | manager | hit tokens | prefill tokens computed | preemptions | generation tok/s (median) | kvalloc blocks for stock's hits |")
    print("|---|---|---|---|---|---|---|")
    for blocks, s, k in rows:
        match = "-"
        if not args.no_match and not args.caching_off:
            if k["hits"] >= s["hits"]:
                b = blocks_to_match(s["hits"], 32, blocks, workload, args.max_tokens, kvalloc_hits)
                match = f"{b} ({blocks / b:.2f}x less memory)"
            else:
                match = "not reached at this budget"
        print(f"| {blocks} | vLLM | {s['hits']:,} | {s['prefill']:,} | {s['preemptions']} | {s['tok_s']:.1f} | {match} |")
        ratio = k["hits"] / s["hits"] if s["hits"] else float("inf")
        speed = k["tok_s"] / s["tok_s"]
        print(
            f"| {blocks} | kvalloc | {k['hits']:,} ({ratio:.2f}x) | {k['prefill']:,} | {k['preemptions']} | "
            f"{k['tok_s']:.1f} ({speed:.2f}x) | |"
        )


if __name__ == "__main__":
    main()
