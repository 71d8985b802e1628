"""The ``kvalloc`` command line.

Python only parses arguments and presents results; the numbers come from the Rust core.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

from kvalloc import KvAllocError, ModelSpec, _simulate, presets

DEFAULT_MODEL = "mimo-v2.5-pro"
INSPECT_CONTEXTS = (8 * 1024, 32 * 1024, 128 * 1024)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _layers_text(layers: Sequence[int]) -> str:
    """Compact layer list: '0,7,14,...,63' for arithmetic runs, else the first few."""
    if len(layers) > 4:
        step = layers[1] - layers[0]
        if all(b - a == step for a, b in zip(layers, layers[1:])):
            return f"{layers[0]},{layers[1]},...,{layers[-1]} (every {step})"
        return ",".join(map(str, layers[:4])) + f",... ({len(layers)} layers)"
    return ",".join(map(str, layers))


def _load_spec(args: argparse.Namespace) -> ModelSpec:
    if args.config is not None:
        return ModelSpec.from_hf_config(args.config, dtype=args.dtype)
    return ModelSpec.preset(args.model)


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with a parsed command line beyond what argparse checks (option
    combinations, files), or None. Runs before anything is loaded or replayed."""
    if getattr(args, "dtype", None) is not None and getattr(args, "config", None) is None:
        return "--dtype applies to --config; presets carry their own dtype"
    if getattr(args, "config", None) is not None:
        if problem := _simulate._path_problem("--config", args.config):
            return problem
    if args.command in ("simulate", "sweep"):
        return _simulate.check_args(args)
    return None


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--device -5GiB`` as ``--device=-5GiB``: argparse takes a value that starts with '-'
    and is not a plain number for an option and says "expected one argument"; joined, the
    option's own check says what is wrong with the value."""
    takes_value = {
        s
        for p in [parser, *_subparsers(parser)]
        for a in p._actions
        if a.option_strings and a.nargs is None and a.const is None
        for s in a.option_strings
    }
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        p
        for a in parser._actions
        if isinstance(a, argparse._SubParsersAction)
        for p in a.choices.values()
    ]


def inspect_report(spec: ModelSpec, block_tokens: int) -> dict:
    """Everything ``kvalloc inspect`` shows, as one JSON-ready dict."""
    groups = [
        {
            "index": i,
            "kind": g.kind,
            "window": g.window,
            "layers": list(g.layers),
            "kv_heads": g.kv_heads,
            "k_dim": g.k_dim,
            "v_dim": g.v_dim,
            "bytes_per_token": g.bytes_per_token,
            "block_bytes": g.block_bytes(block_tokens),
        }
        for i, g in enumerate(spec.groups)
    ]
    sequences = []
    for ctx in INSPECT_CONTEXTS:
        swa = spec.kv_bytes(ctx, block_tokens)
        dense = spec.kv_bytes_dense(ctx)
        sequences.append(
            {
                "context_tokens": ctx,
                "swa_aware_bytes": swa,
                "dense_bytes": dense,
                "ratio": dense / swa if swa else None,
            }
        )
    return {
        "model": spec.name,
        "num_layers": spec.num_layers,
        "dtype": spec.dtype,
        "block_tokens": block_tokens,
        "bytes_per_token_dense": spec.bytes_per_token_dense,
        "fingerprint": f"{spec.fingerprint:016x}",
        "groups": groups,
        "per_sequence": sequences,
    }


def _print_inspect(rep: dict) -> None:
    print(
        f"model {rep['model']}: {rep['num_layers']} layers, {rep['dtype']}, "
        f"{rep['bytes_per_token_dense']:,} bytes/token when every layer keeps every token"
    )
    print()
    header = f"{'group':>5}  {'kind':<8} {'window':>6}  {'layers':<28} {'kv_heads':>8} {'k/v dim':>8} {'bytes/token':>12} {'block bytes':>12}"
    print(header)
    print("-" * len(header))
    for g in rep["groups"]:
        window = "-" if g["window"] is None else str(g["window"])
        print(
            f"{g['index']:>5}  {g['kind']:<8} {window:>6}  {_layers_text(g['layers']):<28} "
            f"{g['kv_heads']:>8} {str(g['k_dim']) + '/' + str(g['v_dim']):>8} "
            f"{g['bytes_per_token']:>12,} {g['block_bytes']:>12,}"
        )
    print()
    print(f"KV per sequence (blocks of {rep['block_tokens']} tokens):")
    header = f"{'context':>8}  {'swa-aware (window only)':>24}  {'dense (every layer)':>20}  {'dense / swa':>11}"
    print(header)
    print("-" * len(header))
    for s in rep["per_sequence"]:
        ratio = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        print(
            f"{s['context_tokens'] // 1024:>7}K  {_human_bytes(s['swa_aware_bytes']):>24}  "
            f"{_human_bytes(s['dense_bytes']):>20}  {ratio:>11}"
        )


def _cmd_inspect(args: argparse.Namespace) -> int:
    spec = _load_spec(args)
    rep = inspect_report(spec, args.block_tokens)
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        _print_inspect(rep)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in presets():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvalloc",
        description="SWA-aware KV-cache memory manager for hybrid-attention LLMs.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="show a model's KV groups and per-sequence KV bytes")
    src = ins.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default {DEFAULT_MODEL}); see `kvalloc presets`")
    src.add_argument("--config", help="path to a Hugging Face config.json")
    ins.add_argument("--dtype", help="KV dtype for --config (bf16, fp16, fp32, fp8); default: the config's")
    ins.add_argument("--block-tokens", type=_simulate.int_in(1, _simulate.U32), default=16,
                     help="tokens per block (default 16)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_inspect)

    pre = sub.add_parser("presets", help="list the built-in model presets")
    pre.set_defaults(func=_cmd_presets)

    _simulate.add_parsers(sub, DEFAULT_MODEL, _load_spec)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; every problem with it is one line on stderr and exit code 2
    (argparse's convention), found before any replay where it can be."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_join_negative_values(parser, argv))
    if problem := _check_args(args):
        parser.error(problem)
    try:
        return args.func(args)
    except (KvAllocError, OSError) as e:
        print(f"kvalloc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
