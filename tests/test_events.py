"""KV cache events through Python: one batch of numpy columns per drain, replayed against the
blocks the manager caches (``cached_blocks``, ``stats``, ``residency``), the whole-cache reset,
and events off by default, changing nothing."""

import numpy as np
import pytest

from kvalloc import InvalidArgumentError, KVCacheManager, ModelSpec

B = 16
COLUMNS = {
    "kind": np.uint8,
    "group": np.int32,
    "hash": np.uint64,
    "parent": np.uint64,
    "has_parent": np.bool_,
    "block": np.int64,
    "req": np.int64,
}
STORED, REMOVED, CLEARED = 0, 1, 2


def small_spec() -> ModelSpec:
    # One full layer and three sliding layers of window 32 (two blocks).
    return ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )


def seq(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def check_batch(ev: dict) -> int:
    """The batch's columns: their dtypes, one length, and what each kind fills in."""
    assert set(ev) == set(COLUMNS)
    n = len(ev["kind"])
    for name, dtype in COLUMNS.items():
        assert ev[name].dtype == dtype, name
        assert ev[name].shape == (n,), name
    stored = ev["kind"] == STORED
    assert np.all(ev["has_parent"][stored] == (ev["block"][stored] > 0))
    assert not ev["has_parent"][~stored].any()
    assert np.all(ev["block"][~stored] == -1) and np.all(ev["req"][~stored] == -1)
    assert np.all((ev["group"] == -1) == (ev["kind"] == CLEARED))
    return n


class Replay:
    """The (group, hash) blocks the events say are cached."""

    def __init__(self) -> None:
        self.blocks: set[tuple[int, int]] = set()
        self.counts = [0, 0, 0]

    def apply(self, ev: dict, req: int | None = None) -> None:
        check_batch(ev)
        if req is not None:  # the request whose call this was stored every block
            assert np.all(ev["req"][ev["kind"] == STORED] == req)
        for kind, group, h in zip(ev["kind"].tolist(), ev["group"].tolist(), ev["hash"].tolist()):
            self.counts[kind] += 1
            if kind == STORED:
                assert (group, h) not in self.blocks, "stored twice"
                self.blocks.add((group, h))
            elif kind == REMOVED:
                self.blocks.remove((group, h))
            else:
                self.blocks.clear()

    def sync(self, m: KVCacheManager, req: int | None = None) -> None:
        self.apply(m.take_events(), req)
        cached = m.cached_blocks()
        assert cached["group"].dtype == np.int32 and cached["hash"].dtype == np.uint64
        assert set(zip(cached["group"].tolist(), cached["hash"].tolist())) == self.blocks
        if m.stats()["running_requests"] == 0:
            # Nothing running: no node an abort left behind, so the counts agree too.
            per_group = [sum(1 for g, _ in self.blocks if g == i) for i in range(2)]
            assert per_group == [g["cached"] for g in m.stats()["groups"]]


def test_events_are_off_by_default_and_empty():
    for m in (KVCacheManager(small_spec(), 1 << 20),
              KVCacheManager(small_spec(), 1 << 20, events=False),
              KVCacheManager(small_spec(), 1 << 20, events=None)):
        m.admit(1, seq(0, 100))
        m.finish(1)
        ev = m.take_events()
        assert check_batch(ev) == 0
        assert len(m.cached_blocks()["hash"]) > 0


def test_events_argument_must_be_a_bool():
    with pytest.raises(InvalidArgumentError, match="events"):
        KVCacheManager(small_spec(), 1 << 20, events="yes")


def test_a_prompt_stores_what_residency_shows():
    m = KVCacheManager(small_spec(), 1 << 20, events=True)
    prompt = seq(0, 100)
    assert m.admit(9, prompt) == 0
    ev = m.take_events()
    assert check_batch(ev) > 0
    assert np.all(ev["kind"] == STORED) and np.all(ev["req"] == 9)
    stored = set(zip(ev["group"].tolist(), ev["block"].tolist()))
    assert {b for g, b in stored if g == 0} == set(range(6))
    assert {b for g, b in stored if g == 1} == {3, 4, 5}  # the window before 96, plus a block
    for i, (device, _, _) in enumerate(m.residency(prompt)):
        for g in range(2):
            assert bool(device >> g & 1) == ((g, i) in stored), (i, g)
    # Each block's parent is the previous block's hash.
    full = ev["group"] == 0
    order = np.argsort(ev["block"][full])
    hashes, parents = ev["hash"][full][order], ev["parent"][full][order]
    assert np.array_equal(parents[1:], hashes[:-1])
    assert len(m.take_events()["kind"]) == 0


def test_admit_finish_evict_and_abort_replay_to_the_cache():
    m = KVCacheManager(small_spec(), 96 << 10, events=True)
    replay = Replay()
    base = seq(0, 320)
    for rid in range(1, 16):
        prompt = np.concatenate([base if rid % 2 else seq(0, 0), seq(rid * 10_000, 100)])
        assert m.admit(rid, prompt, max_tokens=200) is not None
        replay.sync(m, rid)
        rest = len(prompt) - m.num_tokens(rid)
        if rest:
            assert m.extend(rid, rest)
        for t in range(20):
            assert m.extend(rid, np.array([5_000_000 + t], dtype=np.int64))
        replay.sync(m, rid)
        if rid % 5 == 0:
            m.abort(rid)
        else:
            m.finish(rid)
        replay.sync(m, rid)
        m.validate()
    # Batched steps publish too.
    m.step(admit=[(100, base), (101, seq(900_000, 90))])
    replay.sync(m)
    m.step(finish=[100], abort=[101])
    replay.sync(m, 100)
    stats = m.stats()
    assert stats["evictions"]["leaf"] > 0 and stats["evictions"]["checkpoint"] > 0
    assert min(replay.counts[:2]) > 0
    assert m.reset_prefix_cache()
    replay.sync(m)
    assert replay.blocks == set() and replay.counts[2] == 1


def test_reset_prefix_cache():
    m = KVCacheManager(small_spec(), 1 << 20, events=True)
    prompt = seq(0, 200)
    m.admit(1, prompt)
    m.finish(1)
    m.admit(2, seq(70_000, 50))
    m.take_events()
    assert m.reset_prefix_cache() is False  # request 2 runs
    assert len(m.take_events()["kind"]) == 0
    assert m.match_prefix(prompt) > 0
    m.finish(2)
    m.take_events()
    assert m.reset_prefix_cache() is True
    ev = m.take_events()
    assert ev["kind"].tolist() == [CLEARED] and ev["group"].tolist() == [-1]
    assert m.match_prefix(prompt) == 0
    assert m.stats()["cached_blocks"] == 0 and len(m.cached_blocks()["hash"]) == 0
    m.validate()
    # Without events, a reset works the same and records nothing.
    quiet = KVCacheManager(small_spec(), 1 << 20)
    quiet.admit(1, prompt)
    quiet.finish(1)
    assert quiet.reset_prefix_cache() and quiet.match_prefix(prompt) == 0
    assert len(quiet.take_events()["kind"]) == 0


def test_events_change_nothing_else():
    on = KVCacheManager(small_spec(), 96 << 10, events=True)
    off = KVCacheManager(small_spec(), 96 << 10)
    base = seq(0, 150)
    for rid in range(1, 12):
        prompt = np.concatenate([base if rid % 3 else seq(0, 0), seq(rid * 1_000, 60 + 7 * rid)])
        for m in (on, off):
            assert m.admit(rid, prompt, max_tokens=64) is not None
            assert m.extend(rid, len(prompt) - m.num_tokens(rid))
        for g in range(2):
            assert np.array_equal(on.block_table(rid, g), off.block_table(rid, g))
        if rid % 4:
            on.finish(rid)
            off.finish(rid)
        assert on.stats() == off.stats()
    assert len(on.take_events()["kind"]) > 0
    assert len(off.take_events()["kind"]) == 0
