"""The scheduler step of benches/test_bench_manager.py in a plain loop, without pytest: 256
running requests each extended by one decode token plus 16 admissions with prefix matching, in
one `KVCacheManager.step` call. Between steps the 16 oldest requests finish (untimed, through
`finish`, so that a profiler collecting only inside `step` sees only the timed steps).

    .venv/bin/python benches/step_loop.py [PROMPT_TOKENS SHARED_TOKENS STEPS [THRASH_MIB]]
        # default 128 96 3000; THRASH_MIB: touch an array that large between steps (cold caches)
    valgrind --tool=callgrind --toggle-collect='*PyKVCacheManager*step*' \\
        .venv/bin/python benches/step_loop.py 128 96 300      # instructions in step, / 300 per step
"""

import itertools
import sys
import time

import numpy as np

from kvalloc import KVCacheManager, ModelSpec

RUNNING, ADMITS = 256, 16


def main() -> None:
    length, shared, steps = (int(a) for a in (sys.argv[1:4] or ["128", "96", "3000"]))
    thrash = np.zeros(int(sys.argv[4]) << 17, dtype=np.int64) if len(sys.argv) > 4 else None

    def prompt(rid: int) -> np.ndarray:
        own = np.arange(1_000_000 + rid * length, 1_000_000 + (rid + 1) * length - shared, dtype=np.int64)
        return np.concatenate([np.arange(shared, dtype=np.int64), own])

    m = KVCacheManager(ModelSpec.preset("mimo-v2.5-pro"), 1 << 40)
    ids = itertools.count()
    running = []
    for _ in range(RUNNING):
        rid = next(ids)
        m.admit(rid, prompt(rid))
        running.append(rid)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        for rid in running[:ADMITS]:
            m.finish(rid)
        del running[:ADMITS]
        new = [next(ids) for _ in range(ADMITS)]
        args = dict(
            extend_ids=np.array(running, dtype=np.int64),
            extend_tokens=rng.integers(0, 150_000, len(running), dtype=np.int64),
            admit_ids=np.array(new, dtype=np.int64),
            admit_tokens=np.concatenate([prompt(rid) for rid in new]),
            admit_lens=np.full(ADMITS, length, dtype=np.int64),
        )
        running.extend(new)
        if thrash is not None:
            thrash += 1  # evicts the manager's working set from the caches, as other work would
        t = time.perf_counter()
        admitted, extended = m.step(**args)
        times.append(time.perf_counter() - t)
        assert extended.all() and (admitted == shared).all()
    times.sort()
    print(f"{length}-token prompts: min {times[0] * 1e6:.1f} us, median {times[len(times) // 2] * 1e6:.1f} us over {steps} steps")


if __name__ == "__main__":
    main()
