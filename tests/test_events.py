"""KV cache events through Python: one batch of numpy columns per drain (or per ``step``),
replayed against the blocks the manager caches (``cached_blocks``, ``stats``, ``residency``),
its resume points (``resume_points``, and a router's estimate against ``match_prefix``) and its
lower tiers (``lower_blocks``); the whole-cache reset, and events off by default, changing
nothing."""

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
    "tier": np.int8,
    "req": np.int64,
}
STORED, REMOVED, CLEARED, RESUMABLE, NOT_RESUMABLE, TIER_STORED, TIER_REMOVED = range(7)


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
    kind = ev["kind"]
    assert np.all(kind <= TIER_REMOVED)
    stored = kind == STORED
    assert np.all(ev["has_parent"][stored] == (ev["block"][stored] > 0))
    assert not ev["has_parent"][~stored].any()
    with_block = stored | (kind == RESUMABLE)
    assert np.all(ev["block"][with_block] >= 0)
    assert np.all(ev["block"][~with_block & (kind != TIER_STORED)] == -1)
    assert np.all(ev["req"][~stored] == -1)
    assert np.all((ev["group"] == -1) == np.isin(kind, [CLEARED, RESUMABLE, NOT_RESUMABLE]))
    assert np.all((ev["tier"] == -1) == (kind < TIER_STORED))
    return n


class Replay:
    """What the events say: the (group, hash) blocks cached, the resume points (hash ->
    block), the (tier, group, hash) blocks in the lower tiers."""

    def __init__(self) -> None:
        self.blocks: set[tuple[int, int]] = set()
        self.resume: dict[int, int] = {}
        self.tiers: set[tuple[int, int, int]] = set()
        self.counts = [0] * 7

    def apply(self, ev: dict, req: int | None = None) -> None:
        check_batch(ev)
        if req is not None:  # the request whose call this was stored every block
            assert np.all(ev["req"][ev["kind"] == STORED] == req)
        for kind, group, h, block, tier in zip(ev["kind"].tolist(), ev["group"].tolist(),
                                               ev["hash"].tolist(), ev["block"].tolist(),
                                               ev["tier"].tolist()):
            self.counts[kind] += 1
            if kind == STORED:
                assert (group, h) not in self.blocks, "stored twice"
                self.blocks.add((group, h))
            elif kind == REMOVED:
                self.blocks.remove((group, h))
            elif kind == CLEARED:
                self.blocks.clear()
                self.resume.clear()
            elif kind == RESUMABLE:
                assert h not in self.resume and (0, h) in self.blocks
                self.resume[h] = block
            elif kind == NOT_RESUMABLE:
                del self.resume[h]
            elif kind == TIER_STORED:
                assert (tier, group, h) not in self.tiers
                self.tiers.add((tier, group, h))
            else:
                self.tiers.remove((tier, group, h))

    def sync(self, m: KVCacheManager, req: int | None = None) -> None:
        self.apply(m.take_events(), req)
        self.check(m)

    def check(self, m: KVCacheManager) -> None:
        cached = m.cached_blocks()
        assert cached["group"].dtype == np.int32 and cached["hash"].dtype == np.uint64
        assert set(zip(cached["group"].tolist(), cached["hash"].tolist())) == self.blocks
        points = m.resume_points()
        assert points["hash"].dtype == np.uint64 and points["block"].dtype == np.int64
        assert dict(zip(points["hash"].tolist(), points["block"].tolist())) == self.resume
        lower = m.lower_blocks()
        assert lower["tier"].dtype == np.int8 and lower["group"].dtype == np.int32
        assert set(zip(lower["tier"].tolist(), lower["group"].tolist(), lower["hash"].tolist())) == self.tiers
        if m.stats()["running_requests"] == 0:
            # Nothing running: no node an abort left behind, so the counts agree too.
            groups = [g["cached"] for g in m.stats()["groups"]]
            per_group = [sum(1 for g, _ in self.blocks if g == i) for i in range(len(groups))]
            assert per_group == groups


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
    # The blocks, then the checkpoint's two resume points: 96 tokens, and 80 (the block it
    # keeps beyond the window).
    assert ev["kind"].tolist() == [STORED] * 9 + [RESUMABLE] * 2
    assert ev["block"][-2:].tolist() == [5, 4]
    assert ev["hash"][-2:].tolist() == m.block_hashes(prompt)[[5, 4]].tolist()
    ev = {k: v[:-2] for k, v in ev.items()}
    assert np.all(ev["req"] == 9)
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
    # Batched steps publish too, into their result (the step drains the log).
    replay.apply(m.step(admit=[(100, base), (101, seq(900_000, 90))]).events)
    replay.sync(m)
    replay.apply(m.step(finish=[100], abort=[101]).events, 100)
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


def full_only_spec() -> ModelSpec:
    # No sliding layers: every cached block is a resume point.
    return ModelSpec.from_hf_config(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    )


def router_hit(resume: dict[int, int], hashes: np.ndarray, n: int) -> int:
    """A router's estimate from the replayed resume points: the deepest one on the prompt's
    chain, at least one token short of its end (written here apart from kvalloc.kv_events)."""
    best = 0
    for k in range(1, min((n - 1) // B, len(hashes)) + 1):
        if resume.get(int(hashes[k - 1])) == k - 1:
            best = k * B
    return best


def test_step_returns_the_events_it_drained():
    m = KVCacheManager(small_spec(), 1 << 20, events=True)
    replay = Replay()
    first = seq(0, 100)
    m.admit(1, first)  # recorded before the step: the step's batch carries it
    second = np.concatenate([first, seq(5_000, 60)])
    r = m.step(finish=[1], admit=[(2, second)])
    ev = r.events
    assert ev is not None and ev is r.events  # made once
    replay.apply(ev)
    assert len(m.take_events()["kind"]) == 0  # the step drained the log
    replay.check(m)
    hashes = m.block_hashes(second)
    assert hashes.dtype == np.uint64 and len(hashes) == len(second) // B
    stored = ev["kind"] == STORED
    for h, b, req in zip(ev["hash"][stored].tolist(), ev["block"][stored].tolist(), ev["req"][stored].tolist()):
        assert req in (1, 2) and h == int(hashes[b])
        assert req == 2 or b < len(first) // B
    res = ev["kind"] == RESUMABLE
    assert res.any()
    for h, b in zip(ev["hash"][res].tolist(), ev["block"][res].tolist()):
        assert h == int(hashes[b])
    # Request 1's prompt-end checkpoint (96 tokens: blocks 4 and 5) and request 2's.
    assert {5, 4} <= set(ev["block"][res].tolist())
    assert KVCacheManager(small_spec(), 1 << 20).step(admit=[(1, first)]).events is None


@pytest.mark.parametrize("kind", ["swa-aware", "dense", "full-only"])
def test_a_router_trusting_resume_points_never_overestimates(kind):
    spec = full_only_spec() if kind == "full-only" else small_spec()
    policy = "dense" if kind == "dense" else None
    m = KVCacheManager(spec, 160 << 10, policy=policy, events=True)
    replay = Replay()
    rng = np.random.default_rng(7)
    bases = [seq(100_000 * i, int(n)) for i, n in enumerate(rng.integers(40, 300, 6))]
    history: list[np.ndarray] = []
    exact = short = 0
    for rid in range(1, 60):
        base = bases[rng.integers(len(bases))]
        cut = int(rng.integers(0, len(base) + 1))
        prompt = np.concatenate([base[:cut], seq(10_000_000 + rid * 1_000, int(rng.integers(1, 90)))])
        history.append(prompt)
        if m.admit(rid, prompt) is not None:
            rest = len(prompt) - m.num_tokens(rid)
            if rest:
                m.extend(rid, rest)
            m.extend(rid, np.arange(5, 5 + int(rng.integers(0, 40)), dtype=np.int64))
            if rng.random() < 0.15:
                m.abort(rid)
            else:
                m.finish(rid)
        replay.sync(m)
        for _ in range(4):
            old = history[rng.integers(len(history))]
            probe = np.concatenate([old[: int(rng.integers(1, len(old) + 1))], seq(-1_000_000, int(rng.integers(0, 30)))])
            hit = m.match_prefix(probe)
            hashes = m.block_hashes(probe)
            est = router_hit(replay.resume, hashes, len(probe))
            assert est <= hit
            at_point = hit == 0 or int(hashes[hit // B - 1]) in replay.resume
            assert (est == hit) == at_point
            if kind != "swa-aware":
                assert est == hit  # every cached block is a resume point
            exact += est == hit and hit > 0
            short += est < hit
    assert exact > 10, (exact, short)
    assert replay.counts[NOT_RESUMABLE] > 0


def test_lower_tier_events_replay_to_lower_blocks():
    m = KVCacheManager(small_spec(), 64 << 10, host_bytes=64 << 10, events=True)
    replay = Replay()
    chains: dict[int, int] = {}
    for rid in range(1, 30):
        prompt = np.concatenate([seq(0, 48), seq(rid % 7 * 10_000, 150)])
        chains.update({int(h): i for i, h in enumerate(m.block_hashes(prompt))})
        if m.admit(rid, prompt) is not None:
            m.finish(rid)
        m.wait_loads()
        ev = m.take_events()
        replay.apply(ev)
        replay.check(m)
        tier_stored = ev["kind"] == TIER_STORED
        for h, b, t in zip(ev["hash"][tier_stored].tolist(), ev["block"][tier_stored].tolist(),
                           ev["tier"][tier_stored].tolist()):
            assert t == 0 and b == chains[h]  # host memory; the block's own index
    assert replay.counts[TIER_STORED] > 0 and replay.counts[TIER_REMOVED] > 0
    assert m.stats()["groups"][0]["cached"] > 0
