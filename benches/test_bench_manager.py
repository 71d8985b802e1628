"""Scheduler steps through the batched Python call (issue #3 target: <= 50 us per step).

mimo-v2.5-pro, 16-token blocks. Two shapes, each timed as one `KVCacheManager.step` call whose
inputs are prepared beforehand:

- `decode256_admit16`: the issue's step: 256 running requests each extended by one decode token
  plus 16 admissions with prefix matching (128- or 512-token prompts sharing their first 3/4,
  so each admission matches and hits). Between steps, untimed, the 16 oldest requests finish,
  so the running set stays at 256. Memory is ample (no eviction).
- `steady_state_full_cache`: 256 running requests; per step 16 finish, 240 decode one token and
  16 are admitted with 1,024-token prompts (768 shared), in a cache that is full, so every step
  also evicts about 16 requests' blocks.

    .venv/bin/python -m pytest benches/test_bench_manager.py --benchmark-only
"""

import numpy as np
import pytest

from step_workload import ADMITS, RUNNING, make_prompt, start, step_args


@pytest.mark.parametrize("length,shared", [(128, 96), (512, 384)])
@pytest.mark.benchmark(group="scheduler step")
def test_step_decode256_admit16(benchmark, length, shared):
    """The issue's step. Between timed steps (untimed) the 16 oldest requests finish, so 256
    stay running and memory stays level, as in a serving engine's steady state."""
    rounds = 1000
    m, ids, running = start(1 << 40, length, shared)
    rng = np.random.default_rng(0)

    last = []

    def setup():
        # The previous step's outcome is checked here, outside the timed call.
        if last:
            admitted, extended = last.pop()
            assert extended.all() and (admitted == shared).all()
        if len(running) > RUNNING:
            m.step(finish=np.array(running[:ADMITS], dtype=np.int64))
            del running[:ADMITS]
        args = step_args(running, ids, rng, length, shared)
        return (), args

    def step(**kwargs):
        last.append(m.step(**kwargs))

    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=20)
    admitted, extended = last.pop()
    assert extended.all() and (admitted == shared).all()
    m.validate()


@pytest.mark.benchmark(group="scheduler step")
def test_step_steady_state_full_cache(benchmark):
    length, shared, rounds = 1024, 768, 1000
    m, ids, running = start(32 << 30, length, shared)
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(rounds + 50):
        finish = running[:ADMITS]
        del running[:ADMITS]
        new = [next(ids) for _ in range(ADMITS)]
        steps.append((
            np.array(finish, dtype=np.int64),
            np.array(running, dtype=np.int64),
            rng.integers(0, 150_000, len(running), dtype=np.int64),
            [(rid, make_prompt(rid, length, shared)) for rid in new],
        ))
        running.extend(new)
    it = iter(steps)

    outcomes = []

    def step():
        finish, ext_ids, ext_tokens, admit = next(it)
        outcomes.append(m.step(finish=finish, extend_ids=ext_ids, extend_tokens=ext_tokens, admit=admit))

    for _ in range(50):  # fill the cache: from here on every step evicts
        step()
    ev = m.stats()["evictions"]
    assert ev["leaf"] + ev["checkpoint"] > 0
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    # Checked after the timed calls.
    for admitted, extended in outcomes:
        assert extended.all() and (admitted == shared).all()
    m.validate()
