"""What a decode step costs with cold caches, by size: after an array of THRASH_MIB is written
(as an engine's model run and Python would between scheduler steps), a step extends 1, 16, 64
or 256 of the running requests by one token; the others are extended untimed, so every request
keeps decoding. Prints each size's median: the fixed cost of a call and the cost per request.

    .venv/bin/python benches/step_cold.py [ROUNDS THRASH_MIB]    # default 2000 16
"""

import sys
import time

import numpy as np

from step_workload import ADMITS, cache_thrasher, start, step_args

SIZES = (1, 16, 64, 256)


def main() -> None:
    rounds, mib = (int(a) for a in (sys.argv[1:3] or ["2000", "16"]))
    m, ids, running = start(1 << 40, 128, 96)
    rng = np.random.default_rng(0)
    thrash = cache_thrasher(mib)
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    for i in range(rounds):
        for rid in running[:ADMITS]:
            m.finish(rid)
        del running[:ADMITS]
        args = step_args(running, ids, rng, 128, 96)
        m.step(**{k: v for k, v in args.items() if k.startswith("admit")})
        n = SIZES[i % len(SIZES)]
        timed = np.array(running[:n], dtype=np.int64)
        rest = np.array(running[n:], dtype=np.int64)
        thrash()
        t = time.perf_counter()
        m.step(extend_ids=timed, extend_tokens=np.ones(len(timed), dtype=np.int64))
        times[n].append(time.perf_counter() - t)
        if len(rest):
            m.step(extend_ids=rest, extend_tokens=np.ones(len(rest), dtype=np.int64))
    for n in SIZES:
        print(f"decode of {n} after writing {mib} MiB: median {np.median(times[n]) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
