"""The scheduler step of benches/test_bench_manager.py in a plain loop, without pytest: 256
running requests each extended by one decode token plus 16 admissions with prefix matching, in
one `KVCacheManager.step` call. Between steps the 16 oldest requests finish (untimed, through
`finish`, so that a profiler collecting only inside `step` sees only the timed steps). Also
prints page faults per step, and the steps that took any (with their faults and time): the
memory kvalloc's bookkeeping first touches.

    .venv/bin/python benches/step_loop.py [PROMPT_TOKENS SHARED_TOKENS STEPS [THRASH_MIB]]
        # default 128 96 3000; THRASH_MIB: touch an array that large between steps (cold caches)
    valgrind --tool=callgrind --toggle-collect='*PyKVCacheManager*step*' \\
        .venv/bin/python benches/step_loop.py 128 96 300      # instructions in step, / 300 per step
"""

import sys

import numpy as np

from step_workload import cache_thrasher, start, take_turns


def main() -> None:
    length, shared, steps = (int(a) for a in (sys.argv[1:4] or ["128", "96", "3000"]))
    evict = cache_thrasher(int(sys.argv[4]) if len(sys.argv) > 4 else 0)

    m, ids, running = start(1 << 40, length, shared)
    times, faults = take_turns([m], ids, running, steps, length, shared, before_step=evict)
    us, f = times[0] * 1e6, faults[0]
    print(
        f"{length}-token prompts: min {us.min():.1f} us, median {np.median(us):.1f} us, "
        f"mean {us.mean():.1f} us, max {us.max():.1f} us over {steps} steps; "
        f"{f.sum() / steps:.2f} page faults per step"
    )
    faulted = np.flatnonzero(f)
    listed = ", ".join(f"step {i}: {f[i]} ({us[i]:.0f} us)" for i in faulted[:20])
    print(f"{len(faulted)} steps took page faults{': ' + listed if listed else ''}")


if __name__ == "__main__":
    main()
