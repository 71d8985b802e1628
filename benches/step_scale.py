"""The scheduler step of `step_loop.py` in a fresh manager and in one whose prefix cache already
holds many other requests' blocks, side by side (the two take turns on the same steps): what a
large tree costs the step. Both have 16 TiB of (virtual) capacity, so neither evicts.

    .venv/bin/python benches/step_scale.py [CACHED_REQUESTS STEPS [EXTENSION]]
        # default 200000 3000, the installed build; EXTENSION: another build's _core.abi3.so
        # (scripts/build_rev.sh), to measure a revision from before this script

`CACHED_REQUESTS` distinct 33-token requests are cached first (two tree nodes each:
`step_workload.fill_cache`). Prints each manager's p10 / median / p90 / mean and the ratio of
the medians (large / fresh).
"""

import sys
from typing import Any

import numpy as np

import kvalloc
from step_workload import fill_cache, load_core, start, summary, take_turns

CAPACITY = 1 << 44


def main() -> None:
    cached, steps = (int(a) for a in (sys.argv[1:3] or ["200000", "3000"]))
    core: Any = load_core(sys.argv[3], "kvalloc_scale") if len(sys.argv) > 3 else kvalloc
    length, shared = 128, 96
    fresh, ids, running = start(CAPACITY, length, shared, core=core)
    large = start(CAPACITY, length, shared, core=core)[0]
    fill_cache(large, cached)
    times, _ = take_turns([fresh, large], ids, running, steps, length, shared)
    us = times * 1e6
    print(summary("fresh", us[0]))
    print(summary(f"{cached} cached", us[1]))
    print(f"median ratio (cached / fresh) over {steps} steps: {np.median(us[1]) / np.median(us[0]):.3f}")


if __name__ == "__main__":
    main()
