"""``kvalloc simulate`` and ``kvalloc sweep``: argument parsing and presentation.

The replays, the upper bound and the budget search all run in the Rust core
(``kvalloc._core.Simulator``); this module turns arguments into calls and results into tables,
JSON and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from kvalloc._core import ModelSpec, Simulator, Trace

GIB = 1 << 30
DEFAULT_DEVICE = "256GiB"
# The trace resolves sharing to 512 tokens, so finer blocks barely change its hit rates
# (measured: 66.9% of the bound at both 64 and 128 tokens, 512 GiB) while the replay's cost
# grows with the number of blocks; 128 tokens is also MiMo's sliding window, so a checkpoint
# is one block. See the README.
DEFAULT_BLOCK_TOKENS = 128
DEFAULT_EVICTION = "value"
DEFAULT_POLICIES = ("swa-aware", "dense")
DEFAULT_SWEEP = ("64GiB", "128GiB", "256GiB", "512GiB", "1TiB", "2TiB", "4TiB")
TIERS = ("host", "disk", "remote")
TOKENS_PER_ID = ("exact", "spread")
ROUTERS = ("round-robin", "least-loaded", "prefix", "prefix-naive")
PREFIX_ROUTERS = ("prefix", "prefix-naive")
MAX_INSTANCES = 4096
# A fleet's default per-instance device budget in `sweep --instances` (one 8-GPU node's share
# of KV memory; see the README's fleet table).
DEFAULT_FLEET_DEVICE = "64GiB"

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
    "p": 1 << 50, "pib": 1 << 50, "pb": 10**15,
}


MAX_BYTES = (1 << 64) - 1


def parse_size(text: str) -> int:
    """Bytes in a size such as ``80GiB``, ``1.5TiB``, ``1PiB`` (binary) or ``100GB`` (decimal);
    0 is allowed (a tier budget of 0 is no tier), a negative size or one of 2^64 bytes or more
    is not."""
    if text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: a size cannot be negative")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a number with a unit such as 80GiB, 1.5TiB, 100GB"
        )
    n = int(float(m.group(1)) * _UNITS[unit])
    if n > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: 2^64 bytes or more")
    return n


def positive_size(text: str) -> int:
    """A :func:`parse_size` size of at least one byte (a device budget)."""
    n = parse_size(text)
    if n == 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return n


def instance_list(text: str) -> list[int]:
    """Comma-separated instance counts (``1,2,4,8``), each 1 to 4096."""
    parts = text.split(",")
    if any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"invalid instance list {text!r}: an entry is empty")
    return [int_in(1, MAX_INSTANCES)(p.strip()) for p in parts]


def size_list(text: str) -> list[int]:
    """Comma-separated positive sizes (``4GiB,16GiB``); an empty entry is an error."""
    parts = text.split(",")
    if any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"invalid size list {text!r}: an entry is empty")
    return [positive_size(p) for p in parts]


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is out of range: expected {lo} to {hi}")
        return n
    parse.__name__ = "integer"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (math.isfinite(x) and x > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0")
    return x


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number, 0 or above."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number, 0 or above")
    return x


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    x = positive_float(text)
    if x > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return x


U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def default_trace_path() -> Path:
    """The Mooncake conversation trace shipped inside the package (Apache-2.0, see data/)."""
    return Path(str(resources.files("kvalloc") / "data" / "mooncake_conversation.jsonl"))


class ProgressBar:
    """A one-line progress bar on stderr, drawn only on a terminal and once a run is slow."""

    def __init__(self, enabled: bool, after_seconds: float = 1.0) -> None:
        self.enabled = enabled
        self.after = after_seconds
        self.start = time.monotonic()
        self.drawn = False

    def __call__(self, label: str, fraction: float) -> None:
        if not self.enabled or time.monotonic() - self.start < self.after:
            return
        width = 30
        filled = int(width * min(max(fraction, 0.0), 1.0))
        sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {fraction:6.1%}  {label:<32}")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()
            self.drawn = False


def add_source_args(p: argparse.ArgumentParser, default_model: str) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=default_model, help=f"preset name (default {default_model})")
    src.add_argument("--config", help="path to a Hugging Face config.json")
    p.add_argument("--dtype", help="KV dtype for --config (bf16, fp16, fp32, fp8)")
    tr = p.add_mutually_exclusive_group()
    tr.add_argument("--trace", help="Mooncake or generic JSONL trace (default: the Mooncake "
                    "conversation trace shipped with kvalloc)")
    tr.add_argument("--generator", choices=Trace.generators(),
                    help="replay seeded synthetic traffic instead of a trace file")
    p.add_argument("--seed", type=int_in(0, U64), default=0, help="generator seed (default 0)")
    p.add_argument("--size", type=int_in(1, U32), help="generator sessions (requests for shared-prompt)")
    p.add_argument("--trace-block-tokens", type=int_in(1, U32),
                   help="tokens per block of an exact block-hash trace (default 512, Mooncake's)")
    p.add_argument("--trace-tokens-per-id", choices=TOKENS_PER_ID, default="exact",
                   help="what one hash id of a trace file stands for: exact (default): "
                        "--trace-block-tokens tokens, the last id of a prompt possibly fewer; "
                        "spread: a varying number (input_length / ids varies within the file); "
                        "each prompt's tokens are spread over its ids, an id's count fixed "
                        "where it first appears (see docs/concepts.md)")
    p.add_argument("--block-tokens", type=int_in(1, U32), default=DEFAULT_BLOCK_TOKENS,
                   help=f"tokens per KV block in the replay (default {DEFAULT_BLOCK_TOKENS})")
    p.add_argument("--policy", action="append", choices=DEFAULT_POLICIES,
                   help="caching policy; repeat to compare (default: swa-aware and dense)")
    p.add_argument("--eviction", choices=("lru", "value"), default=DEFAULT_EVICTION,
                   help=f"eviction order (default {DEFAULT_EVICTION})")
    for tier in TIERS:
        p.add_argument(f"--{tier}", type=parse_size, default=0, metavar="SIZE",
                       help=f"{tier} tier budget below the device (e.g. 1TiB; virtual: counted, no bytes)")
    p.add_argument("--prefill-tps", type=positive_float, default=60_000.0,
                   help="service model: prefill tokens per second, whole deployment (default 60000)")
    p.add_argument("--decode-tps", type=positive_float, default=30.0,
                   help="service model: decode tokens per second per request (default 30)")
    for tier, gbps in zip(TIERS, (50, 6, 12), strict=True):
        p.add_argument(f"--{tier}-gbps", type=positive_float, metavar="GB/S",
                       help=f"{tier} tier to device bandwidth, GB/s (default {gbps})")
    for tier in TIERS[1:]:
        p.add_argument(f"--{tier}-latency-ms", type=non_negative_float, metavar="MS",
                       help=f"{tier} tier latency per load, milliseconds (default 0)")
    p.add_argument("--load-policy", choices=("always", "decide"), default="decide",
                   help="decide (default): load a hit from a lower tier (or, dense, its prefix) only "
                        "where that beats recomputing it; always: load every such hit")
    p.add_argument("--oracle", action="store_true",
                   help="also replay each policy with the clairvoyant eviction order (offline "
                        "reference: evicts what the trace uses again farthest away; one more "
                        "replay per run) and report each policy's share of its hit rate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot hit rate against budget (needs matplotlib; .png, .svg, .pdf, ...)")
    p.add_argument("--no-progress", action="store_true", help="never draw a progress bar")


def _plot_problem(path: str) -> str | None:
    """Why ``--plot PATH`` cannot be written, or None: checked before any replay, so that a
    long run never ends in an error about its output."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:  # optional dependency
        return f"--plot needs matplotlib: pip install 'kvalloc[plot]' ({e})"
    p = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = p.suffix.lower().lstrip(".")
    if suffix not in formats:
        return (f"--plot {path!r}: give a file name ending in an image type "
                f"({', '.join('.' + f for f in sorted(formats))})")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"--plot {path!r}: {e.strerror}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"--plot {path!r}: is a directory"
    if st is not None and not stat.S_ISREG(st.st_mode):
        return f"--plot {path!r}: exists and is not a regular file"
    parent = p.parent
    if not parent.is_dir():
        return f"--plot {path!r}: directory {str(parent)!r} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--plot {path!r}: directory {str(parent)!r} is not writable"
    return None


def _path_problem(option: str, path: str) -> str | None:
    """Why an input file cannot be read, or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{option} {path!r}: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return f"{option} {path!r}: is a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"{option} {path!r}: not a regular file"
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with a ``simulate`` or ``sweep`` command line that parsing cannot see (its
    files), or None: checked before the trace is loaded and any replay starts."""
    if getattr(args, "trace", None) is not None:
        if problem := _path_problem("--trace", args.trace):
            return problem
    if args.trace_tokens_per_id == "spread":
        if args.trace_block_tokens is not None:
            return ("--trace-block-tokens applies to exact traces: spread ids have no fixed "
                    "token count")
        if args.generator is not None:
            return "--trace-tokens-per-id applies to trace files, not --generator"
    if problem := _fleet_problem(args):
        return problem
    if args.plot is not None:
        return _plot_problem(args.plot)
    return None


def _fleet_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the fleet options of a command line, or None."""
    if args.instances is None:
        if args.router is not None:
            return "--router applies to --instances (a fleet)"
        if args.write_through is not None or args.overlap_weight is not None:
            return "--no-write-through and --overlap-weight apply to --instances (a fleet)"
        return None
    if args.oracle:
        return "--oracle replays one instance; it does not apply to --instances"
    if args.command == "simulate" and args.plot is not None:
        return "--plot with --instances: use `kvalloc sweep --instances 1,2,4,... --plot FILE`"
    return None


def _load_trace(args: argparse.Namespace) -> Trace:
    if args.generator is not None:
        return Trace.generate(args.generator, seed=args.seed, size=args.size)
    path = args.trace if args.trace is not None else default_trace_path()
    return Trace.load(path, trace_block_tokens=args.trace_block_tokens,
                      tokens_per_id=args.trace_tokens_per_id)


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "prefill_tokens_per_s": args.prefill_tps,
        "decode_tokens_per_s": args.decode_tps,
        "load_policy": args.load_policy,
    }
    for tier in TIERS:
        if getattr(args, f"{tier}_gbps") is not None:
            kw[f"{tier}_gbps"] = getattr(args, f"{tier}_gbps")
    for tier in TIERS[1:]:
        if getattr(args, f"{tier}_latency_ms") is not None:
            kw[f"{tier}_latency_ms"] = getattr(args, f"{tier}_latency_ms")
    for tier in TIERS:
        if getattr(args, tier):
            kw[f"{tier}_bytes"] = getattr(args, tier)
    return kw


def _fleet_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = _run_kwargs(args)
    if args.write_through is not None:
        kw["write_through"] = args.write_through
    if args.overlap_weight is not None:
        kw["overlap_weight"] = args.overlap_weight
    return kw


def _header(spec: ModelSpec, trace: Trace, sim: Simulator, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": spec.name,
        "trace": trace.name,
        "requests": trace.num_requests,
        "prompt_tokens": trace.prompt_tokens,
        "trace_seconds": trace.duration_seconds,
        "block_tokens": sim.block_tokens,
        "eviction": args.eviction,
        "budgets": {"device": args.device if hasattr(args, "device") else None,
                    **{t: getattr(args, t) for t in TIERS}},
        "service": {"prefill_tokens_per_s": args.prefill_tps, "decode_tokens_per_s": args.decode_tps},
        "upper_bound_hit_rate": sim.upper_bound_hit_rate,
        "trace_tokens_per_id": None if args.generator is not None else args.trace_tokens_per_id,
        "spread": trace.spread,
    }


def _print_header(h: dict[str, Any], budget_text: str) -> None:
    print(
        f"model {h['model']} on {h['trace']}: {h['requests']:,} requests, "
        f"{h['prompt_tokens'] / 1e6:,.1f}M prompt tokens over {h['trace_seconds'] / 60:,.0f} min"
    )
    print(
        f"{budget_text}, {h['block_tokens']}-token blocks, {h['eviction']} eviction; service model: "
        f"prefill {h['service']['prefill_tokens_per_s']:,.0f} tok/s, "
        f"decode {h['service']['decode_tokens_per_s']:,.0f} tok/s per request"
    )
    if (sp := h["spread"]) is not None:
        print(
            f"hash ids spread over {sp['min_tokens_per_id']:,.1f} to {sp['max_tokens_per_id']:,.1f} "
            f"tokens per id; {sp['requests_disagreeing']:,} requests reuse an id at another count, "
            f"{sp['requests_cut']:,} cut, {sp['requests_padded']:,} padded"
        )
    print(f"unbounded-cache upper bound: {h['upper_bound_hit_rate']:.2%} of prompt tokens")
    print()


def _print_runs(runs: Sequence[dict[str, Any]]) -> None:
    header = (f"{'policy':<10} {'hit rate':>8} {'of bound':>8} {'prefill saved':>13} "
              f"{'cached tok/GiB':>14} {'TTFT mean':>9} {'vs no cache':>11} {'queue wait':>10} {'wall':>6}")
    print(header)
    print("-" * len(header))
    for r in runs:
        bound = r["upper_bound_hit_rate"]
        print(
            f"{r['policy']:<10} {r['hit_rate']:>8.2%} {r['hit_rate'] / bound if bound else 0:>8.1%} "
            f"{r['prefill_tokens_saved'] / 1e6:>12,.1f}M {r['cached_tokens_per_gib']:>14,.0f} "
            f"{r['ttft_mean_seconds']:>7.2f} s {r['ttft_change']:>+11.0%} "
            f"{r['queue_wait_mean_seconds']:>8.2f} s {r['wall_seconds']:>5.1f}s"
        )
    for r in runs:
        if r["rejected"] or r["preemptions"]:
            print(f"  {r['policy']}: {r['rejected']:,} requests never fit, {r['preemptions']:,} preemptions")
        for tier, written in r["tier_bytes_written"].items():
            print(f"  {r['policy']}: {tier} written {human_bytes(written)}, "
                  f"read {human_bytes(r['tier_bytes_read'].get(tier, 0))}, "
                  f"hit tokens loaded {r['tier_hit_tokens'].get(tier, 0):,}")
        if r["tier_bytes_written"]:
            print(f"  {r['policy']}: loads ({r['load_policy']}): {r['declined_tokens']:,} hit tokens "
                  f"declined as slower than recompute, {r['exposed_load_seconds']:,.1f} s exposed, "
                  f"{r['load_queue_seconds']:,.1f} s queued")


def _attach_oracle(runs: Sequence[dict[str, Any]], oracle: Sequence[dict[str, Any]]) -> None:
    """Gives each run (same policy and budget, in the same order) its oracle's hit rate and the
    share of it the run reaches (None when the oracle hits nothing)."""
    for r, o in zip(runs, oracle, strict=True):
        assert (r["policy"], r["device_bytes"]) == (o["policy"], o["device_bytes"])
        r["oracle_hit_rate"] = o["hit_rate"]
        r["oracle_share"] = r["hit_rate"] / o["hit_rate"] if o["hit_rate"] else None


def _share_text(r: dict[str, Any]) -> str:
    return "-" if r["oracle_share"] is None else f"{r['oracle_share']:.1%}"


def _print_oracle(runs: Sequence[dict[str, Any]], eviction: str) -> None:
    """One "oracle" row per policy: the clairvoyant hit rate and the share of it `eviction` reaches."""
    print()
    print("oracle (offline clairvoyant eviction; a reference, not an optimum for variable-size blocks):")
    for r in runs:
        print(f"  {'oracle':<8} {r['policy']:<10} {r['oracle_hit_rate']:>8.2%}   "
              f"{eviction} reaches {_share_text(r)} of it")


Series = dict[str, list[tuple[int, float]]]


def _plot(path: str, series: Series, bound: float, title: str, oracle: Series | None = None) -> None:
    """Hit rate against budget, one solid line per policy and, with `oracle`, the same policy's
    oracle as a dashed line of the same colour."""
    import matplotlib  # present: check_args made sure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy, pts in series.items():
        pts = sorted(pts)
        (line,) = ax.plot([b / GIB for b, _ in pts], [100 * h for _, h in pts], marker="o", label=policy)
        if oracle and policy in oracle:
            opts = sorted(oracle[policy])
            ax.plot([b / GIB for b, _ in opts], [100 * h for _, h in opts], marker="x", linestyle="--",
                    color=line.get_color(), label=f"{policy}, oracle eviction")
    ax.axhline(100 * bound, color="gray", linestyle=":", label="unbounded cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("device budget (GiB)")
    ax.set_ylabel("hit rate (% of prompt tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _series(runs: Sequence[dict[str, Any]]) -> Series:
    """(budget, hit rate) points per policy."""
    out: Series = {}
    for r in runs:
        out.setdefault(r["policy"], []).append((r["device_bytes"], r["hit_rate"]))
    return out


def _sweep_runs(sim: Simulator, policies: Sequence[str], budgets: Sequence[int],
                args: argparse.Namespace, bar: Callable[[str, float], None],
                eviction: str | None = None) -> list[dict[str, Any]]:
    """One replay per policy and budget, policy-major, with `eviction` (default: the
    command's)."""
    eviction = eviction or args.eviction
    runs = []
    for policy in policies:
        for b in budgets:
            def prog(label: str, f: float, b: int = b) -> None:
                bar(f"{label} @ {human_bytes(b)}", f)
            runs.append(sim.run(b, policy, eviction, progress=prog, **_run_kwargs(args)))
    return runs


def _prepare(args: argparse.Namespace, load_spec: Callable[[argparse.Namespace], ModelSpec]):
    spec = load_spec(args)
    trace = _load_trace(args)
    sim = Simulator(spec, trace, block_tokens=args.block_tokens)
    bar = ProgressBar(enabled=not args.no_progress and sys.stderr.isatty())
    return spec, trace, sim, bar


def cmd_simulate(args: argparse.Namespace, load_spec: Callable[[argparse.Namespace], ModelSpec]) -> int:
    if args.instances is not None:
        return cmd_fleet(args, load_spec)
    spec, trace, sim, bar = _prepare(args, load_spec)
    policies = list(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    out = _header(spec, trace, sim, args)
    try:
        runs = [sim.run(args.device, p, args.eviction, progress=bar, **_run_kwargs(args)) for p in policies]
        out["runs"] = runs
        if args.oracle:
            out["oracle"] = _sweep_runs(sim, policies, [args.device], args, bar, "oracle")
            _attach_oracle(runs, out["oracle"])
        by = {r["policy"]: r for r in runs}
        search = None
        if "swa-aware" in by and "dense" in by and not args.no_capacity_search:
            swa, dense = by["swa-aware"], by["dense"]
            # Start where the bytes per cached token say dense should land.
            ratio = swa["cached_tokens_per_gib"] / max(dense["cached_tokens_per_gib"], 1e-9)
            start = max(int(args.device * max(ratio, 1.0)), 1 << 20)
            search = sim.budget_to_match(swa["hit_rate"], start, "dense", args.eviction,
                                         rel_tol=args.tolerance, progress=bar,
                                         prefill_tokens_per_s=args.prefill_tps,
                                         decode_tokens_per_s=args.decode_tps)
            need = search["budget_bytes"]
            out["dense_budget_to_match_bytes"] = need
            out["capacity_multiplier"] = None if need is None else need / args.device
            out["capacity_search"] = {"replays": search["replays"], "rel_tol": args.tolerance,
                                      "target_hit_rate": swa["hit_rate"]}
        series: Series = {r["policy"]: [(args.device, r["hit_rate"])] for r in runs}
        if args.plot:
            budgets = [max(args.device * k // 4, 1 << 20) for k in (1, 2, 8, 16)]
            for r in _sweep_runs(sim, policies, budgets, args, bar):
                series[r["policy"]].append((r["device_bytes"], r["hit_rate"]))
            if search is not None and search["budget_bytes"] is not None:
                series["dense"].append((search["budget_bytes"], search["report"]["hit_rate"]))
    finally:
        bar.close()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_header(out, f"device budget {human_bytes(args.device)}")
        _print_runs(runs)
        if "oracle" in out:
            _print_oracle(runs, args.eviction)
        if "capacity_multiplier" in out:
            print()
            swa_hit = by["swa-aware"]["hit_rate"]
            if out["capacity_multiplier"] is None:
                print(f"capacity: dense does not reach swa-aware's {swa_hit:.2%} hit rate at any budget tried")
            else:
                print(
                    f"capacity: dense needs {human_bytes(out['dense_budget_to_match_bytes'])} to match "
                    f"swa-aware's {swa_hit:.2%} hit rate: {out['capacity_multiplier']:.2f}x the "
                    f"{human_bytes(args.device)} budget ({out['capacity_search']['replays']} replays, "
                    f"{args.tolerance:.0%} tolerance)"
                )
    if args.plot:
        _plot(args.plot, series, sim.upper_bound_hit_rate, f"{spec.name} on {trace.name}, {args.eviction} eviction",
              _series(out.get("oracle", [])))
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def _print_sweep_table(runs: Sequence[dict[str, Any]], policies: Sequence[str], budgets: Sequence[int],
                       eviction: str, oracle: bool) -> None:
    print("hit rate by device budget" + (f" (oracle: clairvoyant eviction; share: what {eviction} "
                                          "reaches of it):" if oracle else ":"))
    header = f"{'budget':>10}" + "".join(
        f" {p:>10}" + (f" {'oracle':>8} {'share':>6}" if oracle else "") for p in policies)
    print(header)
    print("-" * len(header))
    for b in budgets:
        row = [r for r in runs if r["device_bytes"] == b]
        print(f"{human_bytes(b):>10}" + "".join(
            f" {r['hit_rate']:>10.2%}"
            + (f" {r['oracle_hit_rate']:>8.2%} {_share_text(r):>6}" if oracle else "")
            for r in row))


def cmd_sweep(args: argparse.Namespace, load_spec: Callable[[argparse.Namespace], ModelSpec]) -> int:
    if args.instances is not None:
        return cmd_fleet_sweep(args, load_spec)
    spec, trace, sim, bar = _prepare(args, load_spec)
    policies = list(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    budgets = args.budgets or [parse_size(b) for b in DEFAULT_SWEEP]
    out = _header(spec, trace, sim, args)
    try:
        runs = _sweep_runs(sim, policies, budgets, args, bar)
        if args.oracle:
            out["oracle"] = _sweep_runs(sim, policies, budgets, args, bar, "oracle")
            _attach_oracle(runs, out["oracle"])
    finally:
        bar.close()
    out["budgets"]["device"] = budgets
    out["runs"] = runs
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_header(out, f"device budgets {', '.join(human_bytes(b) for b in budgets)}")
        _print_sweep_table(runs, policies, budgets, args.eviction, args.oracle)
    if args.plot:
        _plot(args.plot, _series(runs), sim.upper_bound_hit_rate,
              f"{spec.name} on {trace.name}, {args.eviction} eviction", _series(out.get("oracle", [])))
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


# ---- fleets: `simulate --instances N` and `sweep --instances 1,2,4,...` ----

def _fleet_runs(sim: Simulator, policies: Sequence[str], routers: Sequence[str], budgets: Sequence[int],
                counts: Sequence[int], args: argparse.Namespace,
                bar: Callable[[str, float], None]) -> list[dict[str, Any]]:
    """One fleet replay per policy, budget, instance count and router."""
    runs = []
    for policy in policies:
        for b in budgets:
            for n in counts:
                for router in routers:
                    def prog(label: str, f: float, b: int = b) -> None:
                        bar(f"{label} @ {human_bytes(b)}", f)
                    runs.append(sim.run_fleet(b, policy, args.eviction, instances=n, router=router,
                                              progress=prog, **_fleet_kwargs(args)))
    return runs


def _fleet_header(spec: ModelSpec, trace: Trace, sim: Simulator, args: argparse.Namespace,
                  budgets: Sequence[int]) -> dict[str, Any]:
    out = _header(spec, trace, sim, args)
    out["budgets"]["device"] = list(budgets)
    out["fleet"] = {
        "per_instance": ["device", "host", "disk"],
        "shared": ["remote"],
        "prefill_tokens_per_s": "whole fleet, split evenly",
        "write_through": True if args.write_through is None else args.write_through,
        "overlap_weight": 1.0 if args.overlap_weight is None else args.overlap_weight,
    }
    return out


def _est_text(r: dict[str, Any]) -> str:
    e = r["estimate"]
    if e is None:
        return f"{'-':>7} {'-':>9} {'-':>9}"
    return (f"{e['over_share']:>7.1%} {e['mean_over_tokens']:>9,.0f} "
            f"{e['mean_error_tokens']:>+9,.0f}")


def _print_fleet_runs(runs: Sequence[dict[str, Any]]) -> None:
    header = (f"{'policy':<10} {'N':>4} {'router':<13} {'hit rate':>8} {'of bound':>8} {'req max/mean':>12} "
              f"{'tok max/mean':>12} {'TTFT mean':>9} {'p50':>7} {'p99':>7} {'remote read':>11} "
              f"{'written':>9} {'over-est':>7} {'mean over':>9} {'mean err':>9} {'wall':>6}")
    print(header)
    print("-" * len(header))
    for r in runs:
        bound = r["upper_bound_hit_rate"]
        print(
            f"{r['policy']:<10} {r['instances']:>4} {r['router']:<13} {r['hit_rate']:>8.2%} "
            f"{r['hit_rate'] / bound if bound else 0:>8.1%} {r['request_imbalance']:>12.2f} "
            f"{r['token_imbalance']:>12.2f} {r['ttft_mean_seconds']:>7.2f} s {r['ttft_p50_seconds']:>5.2f} s "
            f"{r['ttft_p99_seconds']:>5.2f} s {human_bytes(r['tier_bytes_read'].get('remote', 0)):>11} "
            f"{human_bytes(r['tier_bytes_written'].get('remote', 0)):>9} {_est_text(r)} "
            f"{r['wall_seconds']:>5.1f}s"
        )
    print()
    print("over-est: share of requests whose hit the router over-estimated; mean over: by how many "
          "tokens, among them; mean err: estimated minus real hit tokens, all requests")
    for r in runs:
        if r["rejected"] or r["preemptions"]:
            print(f"  {r['policy']} {r['router']} x{r['instances']}: {r['rejected']:,} requests never fit, "
                  f"{r['preemptions']:,} preemptions")


def cmd_fleet(args: argparse.Namespace, load_spec: Callable[[argparse.Namespace], ModelSpec]) -> int:
    """`simulate --instances N`: every router (or those named) at one budget and count."""
    spec, trace, sim, bar = _prepare(args, load_spec)
    policies = list(dict.fromkeys(args.policy or ["swa-aware"]))
    routers = list(dict.fromkeys(args.router or ROUTERS))
    out = _fleet_header(spec, trace, sim, args, [args.device])
    try:
        out["runs"] = _fleet_runs(sim, policies, routers, [args.device], [args.instances], args, bar)
    finally:
        bar.close()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_header(out, f"{args.instances} instances, each with device {human_bytes(args.device)}"
                      + "".join(f", {t} {human_bytes(getattr(args, t))}" for t in ("host", "disk") if getattr(args, t))
                      + (f", one shared remote {human_bytes(args.remote)}" if args.remote else ""))
        _print_fleet_runs(out["runs"])
    return 0


def _plot_fleet(path: str, runs: Sequence[dict[str, Any]], bound: float, title: str) -> None:
    """Hit rate against instance count, one line per router (and policy, budget where several),
    beside the prefix-aware routers' share of over-estimated requests."""
    import matplotlib  # present: check_args made sure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = list(dict.fromkeys((r["policy"], r["device_bytes"], r["router"]) for r in runs))
    several = len({k[:2] for k in keys}) > 1
    for key in keys:
        pts = sorted((r["instances"], r) for r in runs if (r["policy"], r["device_bytes"], r["router"]) == key)
        label = key[2] + (f", {key[0]} @ {human_bytes(key[1])}" if several else "")
        xs = [n for n, _ in pts]
        (line,) = ax.plot(xs, [100 * r["hit_rate"] for _, r in pts], marker="o", label=label)
        if key[2] in PREFIX_ROUTERS:
            ax2.plot(xs, [100 * r["estimate"]["over_share"] for _, r in pts], marker="o",
                     color=line.get_color(), label=label)
    ax.axhline(100 * bound, color="gray", linestyle=":", label="unbounded cache")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("instances")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("fleet hit rate (% of prompt tokens)")
    ax2.set_ylabel("requests whose hit was over-estimated (%)")
    ax.set_title(title, fontsize=9)
    ax2.set_title("prefix-aware routers' estimates", fontsize=9)
    ax.legend(fontsize=8)
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print_fleet_sweep(runs: Sequence[dict[str, Any]], routers: Sequence[str]) -> None:
    print("fleet hit rate by instance count (over-est: share of requests over-estimated, "
          "prefix-aware routers):")
    keys = list(dict.fromkeys((r["policy"], r["device_bytes"]) for r in runs))
    for policy, budget in keys:
        rows = [r for r in runs if (r["policy"], r["device_bytes"]) == (policy, budget)]
        print(f"{policy}, device {human_bytes(budget)} per instance:")
        header = f"{'N':>5}" + "".join(
            f" {x:>13}" + (f" {'over-est':>8}" if x in PREFIX_ROUTERS else "") for x in routers)
        print(header)
        print("-" * len(header))
        for n in dict.fromkeys(r["instances"] for r in rows):
            line = f"{n:>5}"
            for x in routers:
                r = next(r for r in rows if r["instances"] == n and r["router"] == x)
                line += f" {r['hit_rate']:>13.2%}"
                if x in PREFIX_ROUTERS:
                    line += f" {r['estimate']['over_share']:>8.1%}"
            print(line)


def cmd_fleet_sweep(args: argparse.Namespace, load_spec: Callable[[argparse.Namespace], ModelSpec]) -> int:
    """`sweep --instances 1,2,4,...`: every router (or those named) at each count and budget."""
    spec, trace, sim, bar = _prepare(args, load_spec)
    policies = list(dict.fromkeys(args.policy or ["swa-aware"]))
    routers = list(dict.fromkeys(args.router or ROUTERS))
    budgets = args.budgets or [parse_size(DEFAULT_FLEET_DEVICE)]
    counts = list(dict.fromkeys(args.instances))
    out = _fleet_header(spec, trace, sim, args, budgets)
    out["instances"] = counts
    try:
        out["runs"] = _fleet_runs(sim, policies, routers, budgets, counts, args, bar)
    finally:
        bar.close()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        _print_header(out, f"instances {', '.join(map(str, counts))}; device "
                      f"{', '.join(human_bytes(b) for b in budgets)} per instance"
                      + "".join(f", {t} {human_bytes(getattr(args, t))}" for t in ("host", "disk") if getattr(args, t))
                      + (f", one shared remote {human_bytes(args.remote)}" if args.remote else ""))
        _print_fleet_sweep(out["runs"], routers)
    if args.plot:
        _plot_fleet(args.plot, out["runs"], sim.upper_bound_hit_rate,
                    f"{spec.name} on {trace.name}, {args.eviction} eviction")
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", action="append", choices=ROUTERS,
                   help="fleet router; repeat to compare (default: all four): round-robin, "
                        "least-loaded, prefix (window-safe: kvalloc's Resumable events), "
                        "prefix-naive (block-stored events at face value)")
    p.add_argument("--no-write-through", dest="write_through", action="store_const", const=False,
                   default=None,
                   help="fleet: finished requests do not write through to the shared remote tier")
    p.add_argument("--overlap-weight", type=non_negative_float, metavar="W",
                   help="fleet: the prefix-aware routers' weight on blocks to prefill against "
                        "load (Dynamo's overlap_score_weight; default 1)")


def add_parsers(sub: Any, default_model: str,
                load_spec: Callable[[argparse.Namespace], ModelSpec]) -> None:
    sim = sub.add_parser("simulate", help="replay a trace through the manager: hit rate, capacity, TTFT")
    add_source_args(sim, default_model)
    sim.add_argument("--device", type=positive_size, default=parse_size(DEFAULT_DEVICE), metavar="SIZE",
                     help=f"device (L1) budget (default {DEFAULT_DEVICE})")
    sim.add_argument("--no-capacity-search", action="store_true",
                     help="skip the search for the budget dense needs to match swa-aware")
    sim.add_argument("--tolerance", type=fraction, default=0.02,
                     help="relative precision of that budget search (default 0.02)")
    sim.add_argument("--instances", type=int_in(1, MAX_INSTANCES), metavar="N",
                     help="replay over a fleet of N instances behind --router (device, host and disk "
                          "budgets per instance; --remote one tier shared by all; --prefill-tps the "
                          "whole fleet's)")
    add_fleet_args(sim)
    sim.set_defaults(func=lambda a: cmd_simulate(a, load_spec))

    sw = sub.add_parser("sweep", help="replay a trace at several budgets and policies; table and plot")
    add_source_args(sw, default_model)
    sw.add_argument("--budgets", type=size_list,
                    help=f"comma-separated device budgets (default {','.join(DEFAULT_SWEEP)}; "
                         f"with --instances, {DEFAULT_FLEET_DEVICE} per instance)")
    sw.add_argument("--instances", type=instance_list, metavar="N,N,...",
                    help="sweep fleets of these sizes (e.g. 1,2,4,8,16,32,64) instead of budgets: "
                         "each --router at each size and budget")
    add_fleet_args(sw)
    sw.set_defaults(func=lambda a: cmd_sweep(a, load_spec))
