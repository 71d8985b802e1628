"""The training run of kvalloc's profile-guided build (`scripts/pgo_build.sh`): drives an
instrumented build of the extension through what engines and simulations do with it, so that
the compiler lays out and inlines the optimized build for those paths.

    .venv/bin/python scripts/pgo_train.py PATH/TO/instrumented/lib_core.so

Every public path is exercised, not only the benches' step: code the run never reaches is
optimized for size, so the run covers the scheduler step (decode, admissions with prefix
matching, chunked prefill, a full cache that evicts), single calls, both policies and both
eviction orders, salts and block-hash prompts, host and disk tiers with real bytes, the slab
arena, and trace replay through the simulator.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_instrumented(path: str) -> None:
    """Makes `import kvalloc` use the extension at `path` (the package's Python files come from
    the tree) and the benches' helpers importable."""
    sys.path.insert(0, str(ROOT / "benches"))
    from as_kvalloc import install

    install(path)


def scheduler_steps() -> None:
    """The batched step as an engine drives it: decode plus admissions sharing prefixes, two
    prompt lengths; then a full cache where every step evicts."""
    from step_workload import ADMITS, make_prompt, start, take_turns

    for length, shared, steps in ((128, 96, 1500), (512, 384, 200)):
        m, ids, running = start(1 << 40, length, shared)
        take_turns([m], ids, running, steps, length, shared)
        m.validate()
    m, ids, running = start(32 << 30, 1024, 768)
    rng = np.random.default_rng(0)
    for _ in range(200):
        finish = running[:ADMITS]
        del running[:ADMITS]
        new = [next(ids) for _ in range(ADMITS)]
        m.step(
            finish=np.array(finish, dtype=np.int64),
            extend_ids=np.array(running, dtype=np.int64),
            extend_tokens=rng.integers(0, 150_000, len(running), dtype=np.int64),
            admit=[(rid, make_prompt(rid, 1024, 768)) for rid in new],
        )
        running.extend(new)
    m.validate()


def single_calls() -> None:
    """One call per operation: admit (salted, chunked, block hashes), extend by tokens and by
    counts, match, tables, finish and abort, under each policy and eviction order, in a cache
    small enough to evict."""
    import kvalloc

    spec = kvalloc.ModelSpec.preset("mimo-v2.5-pro")
    rng = np.random.default_rng(1)
    system = np.arange(300, dtype=np.int64)
    for policy in ("swa-aware", "dense"):
        for eviction in ("value", "lru"):
            m = kvalloc.KVCacheManager(spec, 6 << 30, policy=policy, eviction=eviction)
            for rid in range(400):
                own = rng.integers(0, 1 << 30, int(rng.integers(1, 600)), dtype=np.int64)
                prompt = np.concatenate([system[: int(rng.integers(0, 300))], own])
                salt = "tenant-b" if rid % 7 == 0 else None
                m.match_prefix(prompt, salt=salt)
                if rid % 5 == 0:
                    if m.admit(rid, prompt, max_tokens=64) is None:
                        continue
                    while m.num_tokens(rid) < len(prompt):
                        if not m.extend(rid, min(64, len(prompt) - m.num_tokens(rid))):
                            break
                elif m.admit(rid, prompt, salt=salt) is None:
                    continue
                for _ in range(int(rng.integers(0, 40))):
                    if not m.extend(rid, np.array([int(rng.integers(1 << 30))], dtype=np.int64)):
                        break
                for g in range(len(spec.groups)):
                    m.block_table(rid, g)
                (m.abort if rid % 9 == 0 else m.finish)(rid)
            hashes = kvalloc.BlockHashes(np.arange(1, 40, dtype=np.uint64), 16 * 39)
            m.match_prefix(hashes)
            if m.admit(10_000, hashes) is not None:
                m.extend(10_000, 16)
                m.finish(10_000)
            m.stats()
            m.validate()


def tiers() -> None:
    """Blocks evicted from a small device pool to host memory and a disk tier (real bytes from
    a registered buffer), and promoted back when their prefixes return."""
    import kvalloc

    spec = kvalloc.ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )
    with tempfile.TemporaryDirectory() as disk:
        m = kvalloc.KVCacheManager(spec, 96 << 10, block_tokens=16, host_bytes=64 << 10,
                                   disk_dir=disk, disk_bytes=16 << 20)
        m.register_device(np.zeros(96 << 10, dtype=np.uint8))
        rid = 0
        for rounds in range(3):
            for family in range(12):
                prompt = np.concatenate([np.arange(48), 1000 * (family + 1) + np.arange(80 + 40 * rounds)])
                rid += 1
                if m.admit(rid, prompt.astype(np.int64)) is None:
                    continue
                m.load_handle(rid).wait_all(timeout=10)
                m.finish(rid)
        m.flush()
        m.validate()


def arena() -> None:
    """Slab allocation and frees across two size classes."""
    import kvalloc

    a = kvalloc.SlabArena(256 << 20, [4096, 12288])
    rng = np.random.default_rng(2)
    held: list[np.ndarray] = []
    for _ in range(3000):
        if held and rng.random() < 0.45:
            a.free(held.pop(int(rng.integers(len(held)))))
        else:
            try:
                held.append(a.alloc(int(rng.integers(2)), int(rng.integers(1, 64))))
            except kvalloc.OutOfMemoryError:
                pass
    a.validate()


def simulations() -> None:
    """Trace replay: the shipped Mooncake trace under both policies (the CLI's default run,
    without its capacity search), and seeded synthetic traffic with host and disk tiers."""
    from kvalloc.cli import main

    quiet = ["--no-progress", "--no-capacity-search", "--json"]
    runs = [
        ["simulate", *quiet],
        ["simulate", *quiet, "--eviction", "value", "--device", "64GiB"],
        ["simulate", *quiet, "--generator", "agent", "--host", "64GiB"],
        ["simulate", *quiet, "--generator", "shared-prompt", "--policy", "dense"],
    ]
    for argv in runs:
        if main(argv) != 0:
            raise SystemExit(f"training run failed: kvalloc {' '.join(argv)}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    load_instrumented(sys.argv[1])
    for part in (scheduler_steps, single_calls, tiers, arena, simulations):
        part()


if __name__ == "__main__":
    main()
