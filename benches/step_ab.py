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
an engine's other work between scheduler steps would: the step with cold caches. Prints each build's p10 / median / p90 / mean, the paired differences (second minus first) and
the ratio of the medians.
"""

import importlib.util
import sys
from types import ModuleType

import numpy as np

from step_workload import fill_cache, start, take_turns


def load(path: str, k: int) -> ModuleType:
    """The extension module at `path`, under a name of its own (two builds side by side)."""
    spec = importlib.util.spec_from_file_location(f"kvalloc_ab{k}._core", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    paths = sys.argv[1:3]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    cached = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    thrash = np.zeros(int(sys.argv[5]) << 17) if len(sys.argv) > 5 else None
    capacity = 1 << 44 if cached else 1 << 40
    length, shared = 128, 96
    # Both admit the same requests; from here they share one id stream and every step.
    m0, ids, running = start(capacity, length, shared, core=load(paths[0], 0))
    managers = [m0, start(capacity, length, shared, core=load(paths[1], 1))[0]]
    for m in managers:
        fill_cache(m, cached)
    def evict() -> None:
        if thrash is not None:
            np.add(thrash, 1, out=thrash)

    times, _ = take_turns(managers, ids, running, steps, length, shared, before_step=evict)
    us = times * 1e6
    for k, path in enumerate(paths):
        p10, p50, p90 = np.percentile(us[k], [10, 50, 90])
        print(f"{path}: p10 {p10:.1f} us, median {p50:.1f} us, p90 {p90:.1f} us, mean {us[k].mean():.1f} us")
    d = us[1] - us[0]
    ratio = np.median(us[1]) / np.median(us[0])
    print(
        f"paired (second - first) over {steps} steps: median {np.median(d):+.1f} us, "
        f"mean {d.mean():+.1f} us; median ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
