"""The scheduler step of `step_loop.py` in a fresh manager and in one whose prefix cache already
holds many other requests' blocks, side by side (the two take turns on the same steps): what a
large tree costs the step. Both have 16 TiB of (virtual) capacity, so neither evicts.

    .venv/bin/python benches/step_scale.py [CACHED_REQUESTS STEPS]    # default 200000 3000

`CACHED_REQUESTS` distinct 33-token requests are cached first (two tree nodes each:
`step_workload.fill_cache`). Prints each manager's p10 / median / p90 and the ratio of the
medians (large / fresh).
"""

import sys

import numpy as np

from step_workload import fill_cache, start, take_turns

CAPACITY = 1 << 44


def main() -> None:
    cached, steps = (int(a) for a in (sys.argv[1:3] or ["200000", "3000"]))
    length, shared = 128, 96
    fresh, ids, running = start(CAPACITY, length, shared)
    large = start(CAPACITY, length, shared)[0]
    fill_cache(large, cached)
    times, _ = take_turns([fresh, large], ids, running, steps, length, shared)
    us = times * 1e6
    for name, t in (("fresh", us[0]), (f"{cached} cached", us[1])):
        p10, p50, p90 = np.percentile(t, [10, 50, 90])
        print(f"{name}: p10 {p10:.1f} us, median {p50:.1f} us, p90 {p90:.1f} us")
    print(f"median ratio (cached / fresh) over {steps} steps: {np.median(us[1]) / np.median(us[0]):.3f}")


if __name__ == "__main__":
    main()
