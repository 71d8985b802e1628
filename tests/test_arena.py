"""SlabArena through Python: semantics, bad input, a hypothesis state machine, threads."""

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvalloc
from kvalloc import InvalidArgumentError, KvAllocError, OutOfMemoryError, SlabArena, StaleHandleError
from threads import run_threads


def test_basic_alloc_free_and_views():
    spec = kvalloc.ModelSpec.preset("mimo-v2.5-pro")
    arena = SlabArena(1 << 30, spec.block_bytes(16))
    assert arena.slab_bytes % spec.block_bytes(16)[1] == 0
    full = arena.alloc(0, 10)
    swa = arena.alloc(1, 3)
    assert full.dtype == np.uint64 and full.shape == (10,)
    offs, pages = arena.offsets(full), arena.pages(full)
    assert np.array_equal(pages * np.uint64(arena.block_bytes[0]), offs)
    assert len(set(offs.tolist()) | set(arena.offsets(swa).tolist())) == 13
    st_ = arena.stats()
    assert st_["classes"][0]["blocks_in_use"] == 10 and st_["classes"][1]["blocks_in_use"] == 3
    assert st_["padding_waste_bytes"] == 0
    assert st_["bytes_in_use"] == 10 * arena.block_bytes[0] + 3 * arena.block_bytes[1]
    arena.free(full)
    arena.free(swa)
    arena.validate()
    assert arena.stats()["slabs_free"] == arena.stats()["num_slabs"]


def test_out_of_memory_is_all_or_nothing_and_a_memory_error():
    arena = SlabArena(4096, 64, slab_bytes=1024)
    held = arena.alloc(0, 60)
    with pytest.raises(OutOfMemoryError) as e:
        arena.alloc(0, 5)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, KvAllocError)
    assert arena.stats()["classes"][0]["blocks_in_use"] == 60
    arena.free(held)


def test_stale_double_and_foreign_handles():
    a, b = SlabArena(4096, 64, slab_bytes=1024), SlabArena(4096, 64, slab_bytes=1024)
    h = a.alloc(0, 4)
    a.free(h[:1])
    before = a.stats()
    with pytest.raises(StaleHandleError):
        a.free(h[:1])  # double free
    with pytest.raises(StaleHandleError):
        a.free(np.array([h[1], h[1]], dtype=np.uint64))  # repeated in one batch
    with pytest.raises(StaleHandleError):
        a.free(np.array([12345678901234], dtype=np.uint64))  # never issued
    with pytest.raises(StaleHandleError):
        a.offsets(h[:1])
    assert a.stats() == before
    # A handle from another arena is refused unless it happens to name a live block there;
    # with b empty, it cannot.
    with pytest.raises(StaleHandleError):
        b.free(h[1:2])
    a.validate()


@pytest.mark.parametrize(
    "bad",
    [
        np.array([1, 2], dtype=np.int64),
        np.array([1.0], dtype=np.float64),
        np.zeros((2, 2), dtype=np.uint64),
        np.arange(10, dtype=np.uint64)[::2],
        [1, 2, 3],
        "handles",
    ],
)
def test_bad_handle_arrays(bad):
    arena = SlabArena(4096, 64, slab_bytes=1024)
    with pytest.raises(InvalidArgumentError, match="handles"):
        arena.free(bad)


def test_empty_free_is_a_no_op():
    arena = SlabArena(4096, 64, slab_bytes=1024)
    arena.free(np.array([], dtype=np.uint64))
    assert arena.alloc(0, 0).shape == (0,)
    arena.validate()


@pytest.mark.parametrize(
    "args,what",
    [
        ((0, 64), "capacity_bytes"),
        ((-4096, 64), "capacity_bytes"),
        ((4096, 0), "block_bytes"),
        ((4096, [64, -1]), "block_bytes"),
        ((4096, "big"), "block_bytes"),
        ((4096, 64, 1000), "slab_bytes"),
        ((4096, [64, 96], 0), "slab_bytes"),
        ((100, [64, 96]), "capacity_bytes"),
    ],
)
def test_bad_constructor_arguments(args, what):
    with pytest.raises(InvalidArgumentError, match=what):
        SlabArena(*args)


def test_bad_alloc_arguments():
    arena = SlabArena(4096, [64, 128], slab_bytes=1024)
    with pytest.raises(InvalidArgumentError, match="class_index"):
        arena.alloc(2, 1)
    with pytest.raises(InvalidArgumentError, match="class_index"):
        arena.alloc(-1, 1)
    with pytest.raises(InvalidArgumentError, match="n"):
        arena.alloc(0, -3)
    arena.validate()


class ArenaMachine(RuleBasedStateMachine):
    """Random alloc/free over mixed classes against a dict of live handles."""

    BLOCKS = [64, 192, 320]
    SLAB = 960 * 2

    def __init__(self):
        super().__init__()
        self.arena = SlabArena(self.SLAB * 6, self.BLOCKS, slab_bytes=self.SLAB)
        self.live: dict[int, tuple[int, int]] = {}
        self.dead: list[int] = []

    @rule(cls=st.integers(0, 2), n=st.integers(0, 25))
    def alloc(self, cls, n):
        avail = self.arena.available(cls)
        if n > avail:
            before = self.arena.stats()
            with pytest.raises(OutOfMemoryError):
                self.arena.alloc(cls, n)
            assert self.arena.stats() == before
            return
        hs = self.arena.alloc(cls, n)
        for h, off in zip(hs.tolist(), self.arena.offsets(hs).tolist()):
            assert h not in self.live
            self.live[h] = (cls, off)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free_some(self, data):
        keys = sorted(self.live)
        picked = data.draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
        self.arena.free(np.array(picked, dtype=np.uint64))
        for h in picked:
            del self.live[h]
            self.dead.append(h)

    @precondition(lambda self: self.dead)
    @rule(data=st.data())
    def free_stale(self, data):
        h = data.draw(st.sampled_from(self.dead))
        before = self.arena.stats()
        with pytest.raises(StaleHandleError):
            self.arena.free(np.array([h], dtype=np.uint64))
        assert self.arena.stats() == before

    @invariant()
    def consistent(self):
        self.arena.validate()
        s = self.arena.stats()
        used = sum(self.BLOCKS[c] for c, _ in self.live.values())
        assert s["bytes_in_use"] == used
        assert s["bytes_in_use"] + s["bytes_free"] + s["padding_waste_bytes"] + s["tail_bytes"] == s["capacity_bytes"]
        spans = sorted((off, off + self.BLOCKS[c]) for c, off in self.live.values())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_threads_stress():
    """Eight threads alloc and free concurrently (the GIL is released inside the calls)."""
    arena = SlabArena(64 << 20, [4096, 12288])
    owned: list[list[int]] = [[] for _ in range(8)]

    def worker(i: int) -> None:
        rng = np.random.default_rng(i)
        mine: list[np.ndarray] = []
        for _ in range(400):
            if mine and rng.random() < 0.45:
                arena.free(mine.pop(int(rng.integers(len(mine)))))
            else:
                try:
                    mine.append(arena.alloc(int(rng.integers(2)), int(rng.integers(1, 64))))
                except OutOfMemoryError:
                    pass
        owned[i] = [h for arr in mine for h in arr.tolist()]

    run_threads(worker, 8)
    everything = [h for o in owned for h in o]
    assert len(everything) == len(set(everything)), "two threads got the same handle"
    offs = arena.offsets(np.array(everything, dtype=np.uint64)) if everything else []
    assert len(set(np.asarray(offs).tolist())) == len(everything)
    arena.validate()
    arena.free(np.array(everything, dtype=np.uint64))
    assert arena.stats()["bytes_in_use"] == 0
