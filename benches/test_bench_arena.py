"""Batched alloc/free through Python: kvalloc's SlabArena vs a pure-Python free-list allocator
with the same semantics (all-or-nothing batches, generation-checked handles).

    scripts/bench.sh        (or: .venv/bin/python -m pytest benches/test_bench_arena.py --benchmark-only)

Target (issue #2): at most 1 us + 10 ns per block through Python.
"""

import numpy as np
import pytest

from kvalloc import SlabArena

CAPACITY = 1 << 30
BLOCK = 64 * 1024


class PyFreeListArena:
    """Reference allocator in pure Python: one class, a free list, generation-checked handles."""

    def __init__(self, capacity: int, block: int):
        self.n = capacity // block
        self.free_list = list(range(self.n - 1, -1, -1))
        self.gen = [0] * self.n
        self.live = [False] * self.n

    def alloc(self, n: int) -> np.ndarray:
        if n > len(self.free_list):
            raise MemoryError("out of blocks")
        out = np.empty(n, dtype=np.uint64)
        fl, gen, live = self.free_list, self.gen, self.live
        for i in range(n):
            slot = fl.pop()
            gen[slot] += 1
            live[slot] = True
            out[i] = (gen[slot] << 32) | slot
        return out

    def free(self, handles: np.ndarray) -> None:
        hs = handles.tolist()
        gen, live = self.gen, self.live
        seen = set()
        for h in hs:  # validate everything first: all or nothing
            slot, g = h & 0xFFFFFFFF, h >> 32
            if slot >= self.n or not live[slot] or gen[slot] != g or slot in seen:
                raise ValueError(f"stale handle {h}")
            seen.add(slot)
        for h in hs:
            slot = h & 0xFFFFFFFF
            live[slot] = False
            self.free_list.append(slot)


@pytest.mark.parametrize("n", [1, 64, 1024, 8192])
@pytest.mark.benchmark(group="alloc+free batch")
def test_kvalloc_alloc_free(benchmark, n):
    arena = SlabArena(CAPACITY, BLOCK)

    def step():
        arena.free(arena.alloc(0, n))

    benchmark(step)
    arena.validate()


@pytest.mark.parametrize("n", [1, 64, 1024, 8192])
@pytest.mark.benchmark(group="alloc+free batch")
def test_pure_python_alloc_free(benchmark, n):
    arena = PyFreeListArena(CAPACITY, BLOCK)

    def step():
        arena.free(arena.alloc(n))

    benchmark(step)
