"""One scheduler step through the batched Python call (issue #3 target: <= 50 us per step).

Steady state with mimo-v2.5-pro and 16-token blocks: 256 running requests each extended by one
decode token, 16 finishing and 16 admitted, each new prompt 1,024 tokens that share a 768-token
system prompt (so every admission does real prefix matching and hits).

    .venv/bin/python -m pytest benches/test_bench_manager.py --benchmark-only
"""

import itertools

import numpy as np
import pytest

from kvalloc import KVCacheManager, ModelSpec

RUNNING = 256
ADMITS = 16
PROMPT = 1024
SHARED = 768


def make_prompt(rid: int) -> np.ndarray:
    own = np.arange(1_000_000 + rid * PROMPT, 1_000_000 + rid * PROMPT + PROMPT - SHARED, dtype=np.int64)
    return np.concatenate([np.arange(SHARED, dtype=np.int64), own])


@pytest.fixture
def warm_manager():
    spec = ModelSpec.preset("mimo-v2.5-pro")
    m = KVCacheManager(spec, 512 << 30)
    ids = itertools.count()
    running: list[int] = []
    for _ in range(RUNNING):
        rid = next(ids)
        assert m.admit(rid, make_prompt(rid)) is not None
        running.append(rid)
    return m, ids, running


@pytest.mark.benchmark(group="scheduler step")
def test_step_256_decode_16_admit(benchmark, warm_manager):
    m, ids, running = warm_manager
    rng = np.random.default_rng(0)
    # Prepare every step's inputs up front, so the timed call is the step alone.
    steps = []
    for _ in range(2000):
        finish = running[:ADMITS]
        del running[:ADMITS]
        new = [next(ids) for _ in range(ADMITS)]
        running.extend(new)
        steps.append((
            np.array(finish, dtype=np.int64),
            np.array(running[: RUNNING - ADMITS], dtype=np.int64),
            rng.integers(0, 150_000, RUNNING - ADMITS, dtype=np.int64),
            [(rid, make_prompt(rid)) for rid in new],
        ))
    it = iter(steps)

    def step():
        finish, ext_ids, ext_tokens, admit = next(it)
        admitted, extended = m.step(finish=finish, extend_ids=ext_ids, extend_tokens=ext_tokens, admit=admit)
        assert extended.all() and (admitted == SHARED).all()

    benchmark.pedantic(step, rounds=1500, iterations=1, warmup_rounds=50)
    m.validate()
