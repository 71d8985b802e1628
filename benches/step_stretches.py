"""Whether a slow stretch of this VM slows the whole CPU or only memory: blocks of the scheduler
step of `step_loop.py` (256 decode tokens plus 16 admissions of 128-token prompts sharing 96),
each followed by two probes timed on their own (a fresh manager every ten blocks): a pure-Python loop (its code and data stay in
the first-level caches, so it slows only when the core itself is slower) and random reads over
a 16 MiB array (memory). Prints one line per block and how the step's median follows each.

    .venv/bin/python benches/step_stretches.py [SECONDS [STEPS_PER_BLOCK]]   # default 60 200
"""

import sys
import time

import numpy as np

from step_workload import start, take_turns


def cpu_probe() -> float:
    """Seconds for a fixed pure-Python loop (best of five)."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x = 0
        for i in range(20_000):
            x += i * i
        best = min(best, time.perf_counter() - t)
    return best


def memory_probe(junk: np.ndarray, idx: np.ndarray) -> float:
    """Seconds for 200,000 random reads over `junk` (best of three)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        junk[idx].sum()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    block = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    junk = np.zeros(1 << 21)
    idx = np.random.default_rng(0).integers(0, len(junk), 200_000)
    rows: list[tuple[float, float, float]] = []
    end = time.time() + seconds
    while time.time() < end or len(rows) < 2:
        # A fresh manager every ten blocks, so the cache's growth does not slow later blocks.
        if len(rows) % 10 == 0:
            m, ids, running = start(1 << 40, 128, 96)
        times, _ = take_turns([m], ids, running, block, 128, 96)
        row = (np.median(times[0]) * 1e6, cpu_probe() * 1e3, memory_probe(junk, idx) * 1e3)
        print(f"step median {row[0]:.1f} us   cpu probe {row[1]:.2f} ms   memory probe {row[2]:.2f} ms")
        rows.append(row)
    r = np.array(rows)
    cpu = np.corrcoef(r[:, 0], r[:, 1])[0, 1]
    mem = np.corrcoef(r[:, 0], r[:, 2])[0, 1]
    print(f"{len(rows)} blocks of {block} steps; correlation of the step's median with the cpu "
          f"probe {cpu:.2f}, with the memory probe {mem:.2f}")


if __name__ == "__main__":
    main()
