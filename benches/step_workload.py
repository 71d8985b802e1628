"""The scheduler step of issue 3, shared by `test_bench_manager.py` (pytest-benchmark),
`step.py` (its subcommands: a plain loop, two builds or two managers side by side, cold caches)
and `scripts/pgo_train.py` (the profile-guided build's training run):
256 running requests each extended by one decode token plus 16 admissions of prompts that share
their first `shared` tokens, on mimo-v2.5-pro with 16-token blocks. Not a test module (pytest
collects only test_*.py)."""

from __future__ import annotations

import importlib.util
import itertools
import resource
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

import kvalloc
from kvalloc import KVCacheManager

RUNNING = 256
ADMITS = 16


def make_prompt(rid: int, length: int, shared: int) -> np.ndarray:
    own = np.arange(1_000_000 + rid * length, 1_000_000 + rid * length + length - shared, dtype=np.int64)
    return np.concatenate([np.arange(shared, dtype=np.int64), own])


def start(
    capacity: int, length: int, shared: int, core: Any = kvalloc, **options: Any
) -> tuple[KVCacheManager, Iterator[int], list[int]]:
    """A manager (`options`: constructor keywords; `core`: the module whose `KVCacheManager`
    to use, another build's for side-by-side runs) with RUNNING requests admitted: (manager,
    next ids, running ids)."""
    m = core.KVCacheManager(core.ModelSpec.preset("mimo-v2.5-pro"), capacity, **options)
    ids = itertools.count()
    running = []
    for _ in range(RUNNING):
        rid = next(ids)
        assert m.admit(rid, make_prompt(rid, length, shared)) is not None
        running.append(rid)
    return m, ids, running


def load_core(path: str, name: str) -> ModuleType:
    """The extension module at `path` (a build of any revision: `benches/step.py build`), under
    a name of its own, so that two builds can load into one process."""
    spec = importlib.util.spec_from_file_location(f"{name}._core", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_thrasher(mib: int) -> Callable[[], None]:
    """A function that writes `mib` MiB (nothing for 0), evicting a manager's working set from
    the caches as an engine's other work between scheduler steps would."""
    junk = np.zeros(mib << 17)

    def thrash() -> None:
        if mib:
            np.add(junk, 1, out=junk)

    return thrash


def summary(name: str, us: np.ndarray) -> str:
    """One line: p10 / median / p90 / mean of step times in microseconds."""
    p10, p50, p90 = np.percentile(us, [10, 50, 90])
    return f"{name}: p10 {p10:.1f} us, median {p50:.1f} us, p90 {p90:.1f} us, mean {us.mean():.1f} us"


def fill_cache(m: KVCacheManager, requests: int, batch: int = 1000, length: int = 33) -> None:
    """Caches `requests` distinct `length`-token requests (by default two whole blocks each, so
    the tree gains two nodes per request), admitted and finished `batch` at a time through
    `step`: a large
    prefix cache, as a serving engine holds after hours, that the workload's prompts share
    nothing with (their ids start at 10^9, their tokens far above every prompt's)."""
    for first in range(0, requests, batch):
        n = min(batch, requests - first)
        ids = np.arange(10**9 + first, 10**9 + first + n, dtype=np.int64)
        tokens = np.arange(n * length, dtype=np.int64) + (4 * 10**9 + first * length)
        res = m.step(admit_ids=ids, admit_tokens=tokens, admit_lens=np.full(n, length, dtype=np.int64))
        assert res.admitted == n, "fill_cache: the cache is full"
        m.step(finish=ids)


def step_args(
    running: list[int], ids: Iterator[int], rng: np.random.Generator, length: int, shared: int
) -> dict[str, Any]:
    """`step` arguments for one decode token per running request and ADMITS new requests (in
    the flat admission form: three arrays instead of 16 tuples); the new ids join `running`."""
    new = [next(ids) for _ in range(ADMITS)]
    args = dict(
        extend_ids=np.array(running, dtype=np.int64),
        extend_tokens=rng.integers(0, 150_000, len(running), dtype=np.int64),
        admit_ids=np.array(new, dtype=np.int64),
        admit_tokens=np.concatenate([make_prompt(rid, length, shared) for rid in new]),
        admit_lens=np.full(ADMITS, length, dtype=np.int64),
    )
    running.extend(new)
    return args


def timed_step(m: KVCacheManager, args: dict[str, Any], shared: int) -> tuple[float, int]:
    """One `step` call: (seconds, page faults) it took. Checks afterwards that every extension
    fit and every admission hit its shared prefix."""
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    res = m.step(**args)
    seconds = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f
    assert res.refused_extensions == 0 and (res.hits == shared).all()
    return seconds, faults


def take_turns(
    managers: list[Any],
    ids: Iterator[int],
    running: list[int],
    steps: int,
    length: int,
    shared: int,
    before_step: Callable[[], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Managers that admitted the same requests (`start`) take turns on the same steps, the
    order reversing every step, so all see the same stretches of a noisy machine. Before each
    step the 16 oldest requests finish (untimed) and `before_step` runs (untimed). Returns the
    seconds and the page faults of every step (two managers x steps arrays)."""
    rng = np.random.default_rng(0)
    n = len(managers)
    times = np.zeros((n, steps))
    faults = np.zeros((n, steps), dtype=np.int64)
    for i in range(steps):
        finished = running[:ADMITS]
        del running[:ADMITS]
        args = step_args(running, ids, rng, length, shared)
        for k in range(n) if i % 2 == 0 else reversed(range(n)):
            for rid in finished:
                managers[k].finish(rid)
            if before_step is not None:
                before_step()
            times[k, i], faults[k, i] = timed_step(managers[k], args, shared)
    return times, faults
