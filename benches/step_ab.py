"""The scheduler step of `step_loop.py` on two builds of kvalloc side by side: both extension
modules load into one process and their managers take turns on the same steps (which goes
first alternates), so both see the same stretches of a noisy machine. For measuring a change:
absolute times on a shared VM move by 1.5-2x within minutes, paired differences do not.

    scripts/build_rev.sh f62c482 /tmp/kv-old            # a build of another revision
    .venv/bin/python benches/step_ab.py /tmp/kv-old/_core.abi3.so python/kvalloc/_core.abi3.so \
        [STEPS [CACHED_REQUESTS [THRASH_MIB]]]

With `CACHED_REQUESTS`, both managers first cache that many other requests (two tree nodes each,
`step_workload.fill_cache`; 16 TiB of virtual capacity, so nothing is evicted): the step in a
large cache. With `THRASH_MIB`, an array that large is written before every step (untimed), as
an engine's other work between scheduler steps would: the step with cold caches. Prints each
build's p10 / median / p90 / mean, the paired differences (second minus first) and the ratio of
the medians.
"""

import sys

import numpy as np

from step_workload import cache_thrasher, fill_cache, load_core, start, summary, take_turns


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    paths = sys.argv[1:3]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    cached = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    evict = cache_thrasher(int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    capacity = 1 << 44 if cached else 1 << 40
    length, shared = 128, 96
    # Both admit the same requests; from here they share one id stream and every step.
    m0, ids, running = start(capacity, length, shared, core=load_core(paths[0], "kvalloc_ab0"))
    managers = [m0, start(capacity, length, shared, core=load_core(paths[1], "kvalloc_ab1"))[0]]
    for m in managers:
        fill_cache(m, cached)
    times, _ = take_turns(managers, ids, running, steps, length, shared, before_step=evict)
    us = times * 1e6
    for k, path in enumerate(paths):
        print(summary(path, us[k]))
    d = us[1] - us[0]
    ratio = np.median(us[1]) / np.median(us[0])
    print(
        f"paired (second - first) over {steps} steps: median {np.median(d):+.1f} us, "
        f"mean {d.mean():+.1f} us; median ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
