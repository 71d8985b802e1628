"""``python -m kvalloc.reference``: serve a few multi-turn conversations through kvalloc with the
reference model, then check every turn's logits, bit for bit, against the model recomputing
everything without a cache."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import kvalloc
from kvalloc.reference import Conversation, Engine, TinyHybridModel, conversation_mismatches, serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvalloc.reference", description=__doc__)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=6, help="tokens generated per turn")
    p.add_argument("--capacity-kib", type=int, default=300, help="device KV budget (small: forces evictions)")
    p.add_argument("--host-kib", type=int, default=1024, help="host-memory tier (L2); 0: none")
    p.add_argument("--disk-dir", help="disk tier (L3) directory")
    p.add_argument("--disk-kib", type=int, default=16 << 10, help="disk tier budget")
    p.add_argument("--remote-url", help="remote tier (L4): a Valkey/Redis server, redis://host:port/db")
    p.add_argument("--remote-kib", type=int, default=16 << 10, help="remote tier budget")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model = TinyHybridModel(seed=args.seed)
    tiers: dict[str, object] = {"host_bytes": args.host_kib << 10}
    if args.disk_dir:
        tiers.update(disk_dir=args.disk_dir, disk_bytes=args.disk_kib << 10)
    if args.remote_url:
        tiers.update(remote_url=args.remote_url, remote_bytes=args.remote_kib << 10)
    m = kvalloc.KVCacheManager(model.spec, args.capacity_kib << 10, block_tokens=16, **tiers)  # type: ignore[arg-type]
    engine = Engine(model, m, max_running=4, validate=True)
    rng = np.random.default_rng(args.seed)
    system = rng.integers(0, model.vocab, 40)  # a shared system prompt
    conversations = [
        Conversation(
            [np.concatenate([system, rng.integers(0, model.vocab, 14)])]
            + [rng.integers(0, model.vocab, 14) for _ in range(args.turns - 1)],
            max_new_tokens=args.new_tokens,
            start_step=2 * i,
        )
        for i in range(args.conversations)
    ]
    t0 = time.perf_counter()
    serve(engine, conversations)
    served = time.perf_counter() - t0

    g = ", ".join(f"{x.kind} x{len(x.layers)} ({x.kv_heads} KV heads, K {x.k_dim}/V {x.v_dim})" for x in m.spec.groups)
    print(f"model: {model.spec.num_layers} layers: {g}; window {m.spec.max_window}")
    print(f"budget {args.capacity_kib} KiB: served in {engine.stats.steps} steps ({served:.2f} s)")
    bad = []
    for i, c in enumerate(conversations):
        bad += conversation_mismatches(model, c)
        for k, r in enumerate(c.turns):
            print(
                f"  conversation {i} turn {k}: prompt {r.prompt_len:4d} tokens, cached hit(s) {r.hits}, "
                f"output {r.outputs}"
            )
    st = m.stats()
    e = engine.stats
    print(
        f"engine: {e.admissions} admissions, {e.preemptions} preemptions, {e.computed_tokens} tokens "
        f"computed, {e.hit_tokens} served from cache"
    )
    print(f"manager: evictions {st['evictions']}, checkpoints {st['checkpoints']}")
    for name, t in st["tiers"].items():
        print(
            f"tier {name}: {t['records']} records, {t['bytes_written']:,} B written, {t['bytes_read']:,} B read, "
            f"{t['promoted_tokens']} tokens promoted to the device"
        )
    print(f"layer-wise loads: {e.tier_loads} admissions waited on {e.layer_waits} layers")
    if bad:
        print("MISMATCH:\n  " + "\n  ".join(bad))
        return 1
    print("every turn's logits equal the cache-free model's, bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
