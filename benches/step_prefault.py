"""The scheduler step of `step_loop.py` with and without bookkeeping committed up front
(`prefault_bytes`), side by side: two managers in one process take turns on the same steps
(which goes first alternates), so both see the same stretches of a noisy machine.

    .venv/bin/python benches/step_prefault.py [STEPS]      # default 3000

Prints what building each manager costs, then page faults per step, each manager's min /
median / mean, and the paired differences.
"""

import sys
import time

import numpy as np

from kvalloc import KVCacheManager, ModelSpec
from step_workload import take_turns, start


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    length, shared = 128, 96
    names = ["prefault_bytes=0", "default"]
    spec = ModelSpec.preset("mimo-v2.5-pro")
    for capacity in (1 << 40, 80 << 30):
        built = []
        for prefault in (0, None):
            t = time.perf_counter()
            KVCacheManager(spec, capacity, prefault_bytes=prefault)
            built.append(time.perf_counter() - t)
        print(
            f"building a {capacity >> 30} GiB manager: {built[0] * 1e3:.1f} ms with prefault_bytes=0, "
            f"{built[1] * 1e3:.1f} ms by default"
        )
    # Both managers admit the same requests; from here they share one id stream and the
    # arguments of every step.
    m0, ids, running = start(1 << 40, length, shared, prefault_bytes=0)
    ms = [m0, start(1 << 40, length, shared)[0]]
    times, faults = take_turns(ms, ids, running, steps, length, shared)
    us = times * 1e6
    for k, name in enumerate(names):
        print(
            f"{name:>17}: {faults[k].sum() / steps:.2f} page faults per step; min {us[k].min():.1f} us, "
            f"median {np.median(us[k]):.1f} us, mean {us[k].mean():.1f} us"
        )
    d = us[1] - us[0]
    print(f"paired (default - none): median {np.median(d):+.1f} us, mean {d.mean():+.1f} us over {steps} steps")


if __name__ == "__main__":
    main()
