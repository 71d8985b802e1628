"""Random operation sequences against the byte-checking engine: no wrong byte, ever.

One *case* is a seed: it picks a configuration (policy, eviction, checkpoint interval, lower
tiers) and runs random operations through :class:`ByteCheckEngine`, which checks every KV byte
attention reads. Operations: admissions of prompts that share prefixes (token ids or block
hashes, salted or not, whole or in chunks with ``max_tokens``), prefill chunks, decodes,
finishes, preemption (finish, then the same prompt admitted again), aborts, batched steps, and,
with a disk or remote tier, a restart (a new manager over the same store). Capacity is small, so
eviction and demotion run all the time. ``validate()`` runs after every operation.

    python -m kvalloc.reference.byte_fuzz --seconds 600          # the long mode
    python -m kvalloc.reference.byte_fuzz --seed 17 --ops 400    # one case

A failing case prints its seed and the operations up to the failure; keep the seed in
``tests/test_byte_fuzz.py``'s ``REGRESSION_SEEDS``.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import kvalloc
from kvalloc.reference.byte_check import ByteCheckEngine

B = 16

# Four layers, one full-attention and three sliding (window 32 = two blocks), bf16: small pages,
# so a few hundred KiB hold many blocks and eviction runs constantly.
CONFIG = {
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "sliding_window": 32,
    "hybrid_layer_pattern": [0, 1, 1, 1],
}


# Generations of the case generator: a seed replays the same case only under the generation it
# was drawn with, so a regression seed keeps its generation. 2 adds write-through to the remote
# store and deployment secrets (changed at some restarts: records under another secret must
# read as misses). 3 adds paged-attention engines (half the cases: `prefill_reads_cache`, every
# key each new token attends to read through the tables, its own chunk's included). 4 adds
# speculative checkpoints (half the cases: every computed prompt block keeps its sliding KV
# while memory is plentiful, and later prompts resume inside earlier ones).
GENERATION = 4


@dataclass
class Case:
    """One seed's configuration."""

    seed: int
    policy: str
    eviction: str
    checkpoint_interval: int | None
    capacity: int
    host: bool
    disk: bool
    remote: bool
    window: int
    generation: int = GENERATION
    write_through: bool = False
    secret: str | None = None
    paged: bool = False
    speculative: bool = False

    @staticmethod
    def draw(seed: int, remote_url: str | None, generation: int = GENERATION) -> Case:
        rng = random.Random(seed)
        case = Case(
            seed=seed,
            policy=rng.choice(["swa-aware", "swa-aware", "dense"]),
            eviction=rng.choice(["lru", "value"]),
            checkpoint_interval=rng.choice([None, None, 32, 48]),
            capacity=rng.choice([96, 128, 192, 320]) << 10,
            host=rng.random() < 0.4,
            disk=rng.random() < 0.4,
            remote=remote_url is not None and rng.random() < 0.4,
            window=rng.choice([32, 32, 24, 40]),
            generation=generation,
        )
        if generation >= 2:
            case.write_through = case.remote and rng.random() < 0.5
            case.secret = rng.choice([None, "deployment-secret-1"])
        if generation >= 3:
            case.paged = rng.random() < 0.5
        if generation >= 4:
            case.speculative = rng.random() < 0.5
        return case


@dataclass
class Fuzzer:
    case: Case
    workdir: Path
    remote_url: str | None
    log: list[str] = field(default_factory=list)
    ops_done: int = 0
    checked_slots: int = 0
    # Tokens promoted from each lower tier, over every manager of the case.
    promoted: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0, "remote": 0})

    def __post_init__(self) -> None:
        self.rng = random.Random(self.case.seed * 7919 + 1)
        self.spec = kvalloc.ModelSpec.from_hf_config({**CONFIG, "sliding_window": self.case.window})
        # Shared prefixes: lengths on and off block boundaries.
        self.prefixes = [
            [self.rng.randrange(50_000) for _ in range(n)] for n in self.rng.sample([16, 24, 32, 40, 48, 64, 80], 4)
        ]
        self.salts: list[str | bytes | None] = [None, None, "tenant-a", b"secret-b"]
        self.next_id = 1
        # Prompts admitted before (for preemption: the same prompt again).
        self.history: list[tuple[dict, int | None]] = []
        self.prefix_ns = f"fuzz{self.case.seed}"
        self.engine = self._open()

    def _open(self) -> ByteCheckEngine:
        c = self.case
        kw: dict = {}
        if c.host:
            kw["host_bytes"] = c.capacity
        if c.disk:
            kw["disk_dir"] = str(self.workdir / "disk")
            kw["disk_bytes"] = 4 * c.capacity
        if c.remote and self.remote_url:
            kw["remote_url"] = self.remote_url
            kw["remote_bytes"] = 4 * c.capacity
            kw["remote_prefix"] = self.prefix_ns
            kw["write_through"] = c.write_through
        if c.generation >= 2 and (c.disk or c.remote):
            kw["secret"] = c.secret
        m = kvalloc.KVCacheManager(
            self.spec,
            c.capacity,
            block_tokens=B,
            policy=c.policy,
            eviction=c.eviction,
            checkpoint_interval=c.checkpoint_interval,
            prefill_reads_cache=c.paged,
            speculative_checkpoints=c.speculative,
            **kw,
        )
        return ByteCheckEngine(m, paged=c.paged)

    # -- operations ------------------------------------------------------------------------------

    def _prompt(self) -> tuple[dict, int | None]:
        if self.history and self.rng.random() < 0.2:
            return self.rng.choice(self.history)  # the same prompt again (preemption, retry)
        rng = self.rng
        base = rng.choice(self.prefixes) if rng.random() < 0.8 else []
        cut = rng.randrange(len(base) + 1) if rng.random() < 0.3 else len(base)
        tokens = base[:cut] + [rng.randrange(50_000) for _ in range(rng.randrange(1, 60))]
        salt = rng.choice(self.salts)
        if rng.random() < 0.25 and len(tokens) >= B:
            # As block hashes: one id per whole block of the prompt (a trailing partial block
            # has no id; its tokens are the request's own).
            n = len(tokens)
            ids = [_block_id(salt, tokens[: (i + 1) * B]) for i in range(n // B)]
            prompt = {"block_ids": ids, "num_tokens": n // B * B, "salt": salt}
        else:
            prompt = {"tokens": tokens, "salt": salt}
        max_tokens = rng.choice([None, None, 1, 7, 16, 17, 33])
        return prompt, max_tokens

    def _running(self, prefill: bool | None = None) -> list[int]:
        e = self.engine
        out = []
        for req, r in e.requests.items():
            in_prefill = r.len < r.prompt_len
            if prefill is None or prefill == in_prefill:
                out.append(req)
        return out

    def op_admit(self) -> None:
        prompt, max_tokens = self._prompt()
        req = self.next_id
        self.next_id += 1
        self.log.append(f"admit {req} {_describe(prompt)} max_tokens={max_tokens}")
        hit = self.engine.admit(req, max_tokens=max_tokens, **prompt)
        if hit is not None:
            self.history.append((prompt, max_tokens))
            self.history = self.history[-20:]

    def op_chunk(self) -> None:
        reqs = self._running(prefill=True)
        if not reqs:
            return self.op_admit()
        req = self.rng.choice(reqs)
        n = self.rng.choice([1, 5, 16, 17, 40])
        r = self.engine.requests[req]
        n = min(n, r.prompt_len - r.len)
        self.log.append(f"extend {req} by {n}")
        self.engine.extend(req, n)

    def op_decode(self) -> None:
        reqs = self._running(prefill=False)
        if not reqs:
            return self.op_chunk()
        req = self.rng.choice(reqs)
        r = self.engine.requests[req]
        n = self.rng.choice([1, 1, 1, 3, 16])
        self.log.append(f"decode {req} {n}")
        if not r.hash_mode:
            self.engine.extend(req, n, [self.rng.randrange(50_000) for _ in range(n)])
        else:
            self.engine.extend(req, n)

    def op_finish(self) -> None:
        reqs = self._running()
        if not reqs:
            return self.op_admit()
        req = self.rng.choice(reqs)
        self.log.append(f"finish {req}")
        self.engine.finish(req)

    def op_abort(self) -> None:
        reqs = self._running()
        if not reqs:
            return self.op_admit()
        req = self.rng.choice(reqs)
        self.log.append(f"abort {req}")
        self.engine.abort(req)

    def op_step(self) -> None:
        """A batched step: finishes, decodes or chunks, then admissions, in one call."""
        e, rng = self.engine, self.rng
        running = self._running()
        rng.shuffle(running)
        finish = running[: rng.randrange(0, 3)]
        rest = running[len(finish) :]
        by_tokens = rng.random() < 0.5
        decodes, counts = [], []
        for req in rest[: rng.randrange(0, 4)]:
            r = e.requests[req]
            if by_tokens and r.len >= r.prompt_len and not r.hash_mode:
                decodes.append((req, rng.randrange(50_000)))
            elif not by_tokens and (r.len < r.prompt_len or r.hash_mode):
                n = rng.choice([1, 16, 20])
                counts.append((req, n if r.len >= r.prompt_len else min(n, r.prompt_len - r.len)))
        admits = []
        for _ in range(rng.randrange(0, 3)):
            prompt, max_tokens = self._prompt()
            admits.append((self.next_id, prompt, max_tokens))
            self.next_id += 1
        self.log.append(
            f"step finish={finish} decodes={decodes} counts={counts} "
            f"admit={[(i, _describe(p), mt) for i, p, mt in admits]}"
        )
        e.step(finish, decodes, counts, admits)

    def op_restart(self) -> None:
        """A new manager over the same stores (the old one flushed or not, then dropped)."""
        if not (self.case.disk or (self.case.remote and self.remote_url)):
            return self.op_admit()
        flush = self.rng.random() < 0.5
        if self.case.generation >= 2 and self.rng.random() < 0.2:
            # Another deployment's secret: what the stores hold must read as misses.
            self.case.secret = None if self.case.secret else "deployment-secret-2"
        self.log.append(f"restart flush={flush} secret={self.case.secret!r}")
        if flush:
            self.engine.m.flush()
        self.engine.m.wait_loads()
        self._tally()
        self.engine = None  # type: ignore[assignment]
        gc.collect()
        self.engine = self._open()

    OPS = [
        ("op_admit", 5),
        ("op_chunk", 4),
        ("op_decode", 5),
        ("op_finish", 3),
        ("op_abort", 1),
        ("op_step", 3),
        ("op_restart", 0.3),
    ]

    def run(self, ops: int) -> None:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for _ in range(ops):
            getattr(self, self.rng.choices(names, weights)[0])()
            self.engine.m.validate()
            self.ops_done += 1
        self._tally()

    def _tally(self) -> None:
        """Adds the current manager's figures to the case's."""
        self.checked_slots += self.engine.checked_slots
        for tier, st in (self.engine.m.stats().get("tiers") or {}).items():
            if st:
                self.promoted[tier] += st["promoted_tokens"]


def _block_id(salt: str | bytes | None, tokens: list[int]) -> int:
    """An engine's block hash of a prompt prefix (deterministic across processes)."""
    h = hashlib.blake2b(repr((salt, tokens)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def _describe(prompt: dict) -> str:
    salt = prompt.get("salt")
    if "block_ids" in prompt:
        return f"<{len(prompt['block_ids'])} block ids, {prompt['num_tokens']} tokens, salt={salt!r}>"
    t = prompt["tokens"]
    return f"<{len(t)} tokens {t[:3]}..., salt={salt!r}>"


def run_case(seed: int, ops: int, remote_url: str | None = None, generation: int = GENERATION) -> Fuzzer:
    """Runs one case; raises (with the seed and the last operations in the message) on the
    first wrong byte or broken invariant."""
    case = Case.draw(seed, remote_url, generation)
    workdir = Path(tempfile.mkdtemp(prefix=f"kvalloc-fuzz-{seed}-"))
    f = None
    try:
        f = Fuzzer(case, workdir, remote_url)
        f.run(ops)
        return f
    except Exception as exc:
        tail = "\n  ".join(f.log[-25:]) if f else ""
        raise type(exc)(f"seed {seed} ({case}) after {f.ops_done if f else 0} ops: {exc}\n  {tail}") from exc
    finally:
        if f is not None:
            f.engine = None  # type: ignore[assignment]
        gc.collect()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvalloc.reference.byte_fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="run new seeds for this long (default 60)")
    ap.add_argument("--seed", type=int, help="run only this seed")
    ap.add_argument("--first-seed", type=int, default=1_000, help="first seed of a timed run")
    ap.add_argument("--ops", type=int, default=400, help="operations per seed (default 400)")
    ap.add_argument("--generation", type=int, default=GENERATION, help="case generator (a regression seed's own)")
    ap.add_argument("--remote-url", help="a Valkey/Redis server for the remote tier (e.g. redis://127.0.0.1:6390/0)")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else None
    deadline = time.monotonic() + args.seconds
    seed = args.first_seed if seeds is None else seeds[0]
    cases = slots = 0
    failures = []
    while True:
        try:
            f = run_case(seed, args.ops, args.remote_url, args.generation)
            slots += f.checked_slots
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its seed
            failures.append(seed)
            print(f"FAIL {exc}", file=sys.stderr)
        cases += 1
        if seeds is not None or time.monotonic() >= deadline:
            break
        seed += 1
    print(f"{slots} token slots checked over {cases} seeds", file=sys.stderr)
    print(f"{cases - len(failures)} passed, {len(failures)} failed")
    if failures:
        print("failing seeds: " + " ".join(map(str, failures)), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
