"""Retention controls from Python: ``admit``'s ``priority``, ``pin_tokens``/``pin_seconds`` and
``cache`` keywords, ``step``'s ``admit_*`` columns, ``max_pinned_bytes``, and the clock that
times pins (driven here: no sleeping, no timed assertion)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kvalloc
from kvalloc import InvalidArgumentError, KVCacheManager, ModelSpec

SPEC = ModelSpec.from_hf_config(
    {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
     "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1]}
)


def seq(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def manager(capacity: int = 1 << 20, **kw) -> KVCacheManager:
    m = KVCacheManager(SPEC, capacity, **kw)
    m.set_clock(0.0)
    return m


def run(m: KVCacheManager, rid: int, prompt: np.ndarray, **retention) -> int:
    hit = m.admit(rid, prompt, **retention)
    assert hit is not None
    m.finish(rid)
    m.validate()
    return hit


def fill(m: KVCacheManager, first: int) -> int:
    """Running requests of 64 tokens until one is refused; how many got in."""
    rid = first
    while m.admit(rid, seq(2_000_000 + rid * 1000, 64)) is not None:
        rid += 1
    m.validate()
    return rid - first


def test_a_pin_keeps_a_system_prompt_until_it_expires():
    system = seq(0, 512)
    m = manager(256 << 10)
    run(m, 1, np.concatenate([system, seq(9000, 100)]), pin_tokens=512, pin_seconds=60)
    run(m, 2, seq(300_000, 300))
    st = m.stats()
    assert (st["pins"], st["pins_clipped"]) == (1, 0)
    assert 0 < st["pinned_bytes"] <= st["capacity_bytes"] // 2
    assert m.room_bytes() <= st["capacity_bytes"] - st["pinned_bytes"]
    n = fill(m, 100)
    other = np.concatenate([system, seq(7000, 50)])
    assert m.match_prefix(other) == 512
    assert m.match_prefix(seq(300_000, 300)) == 0
    for rid in range(100, 100 + n):
        m.abort(rid)
    m.advance_clock(59.5)
    assert m.stats()["pins"] == 1
    m.advance_clock(0.5)
    assert m.clock() == 60.0
    assert (m.stats()["pins"], m.stats()["pinned_bytes"]) == (0, 0)
    fill(m, 1000)
    assert m.match_prefix(other) == 0


def test_pins_merge_and_a_reset_drops_them():
    m = manager()
    system = seq(0, 256)
    for rid, secs in [(1, 30.0), (2, math.inf)]:
        run(m, rid, np.concatenate([system, seq(10_000 * rid, 40)]), pin_tokens=256, pin_seconds=secs)
    assert m.stats()["pins"] == 1
    m.advance_clock(1e9)  # inf: until reset
    assert m.stats()["pins"] == 1
    assert m.reset_prefix_cache()
    assert (m.stats()["pins"], m.stats()["pinned_bytes"]) == (0, 0)
    m.validate()


def test_max_pinned_bytes_clips_and_zero_pins_nothing():
    m = manager(max_pinned_bytes=0)
    run(m, 1, seq(0, 512), pin_tokens=512, pin_seconds=10)
    assert (m.stats()["pins"], m.stats()["pinned_bytes"], m.stats()["pins_clipped"]) == (0, 0, 1)
    whole = manager()
    run(whole, 1, seq(0, 1024), pin_tokens=1024, pin_seconds=10)
    cap = whole.stats()["pinned_bytes"] // 2
    m = manager(max_pinned_bytes=cap, checkpoint_interval=128)
    run(m, 1, seq(0, 1024), pin_tokens=1024, pin_seconds=10)
    st = m.stats()
    assert 0 < st["pinned_bytes"] <= cap and st["pins"] == 1 and st["pins_clipped"] == 1


def test_an_opted_out_request_reads_the_cache_and_adds_nothing():
    m = manager()
    run(m, 1, seq(0, 512))
    before = m.stats()
    prompt = np.concatenate([seq(0, 512), seq(50_000, 300)])
    assert m.admit(2, prompt, cache=False) == 512
    assert m.match_prefix(prompt) == 512  # nothing of it is shared while it runs
    m.finish(2)
    after = m.stats()
    assert (after["cached_blocks"], after["bytes_in_use"]) == (before["cached_blocks"], before["bytes_in_use"])
    m.validate()


def first_victim_is_a(eviction: str, a: dict, b: dict, via_step: bool) -> bool:
    """Two equal prefixes, A cached before B; a running request grows until the first eviction.
    Whether A lost blocks first."""
    pa, pb = seq(0, 200), seq(100_000, 200)
    for filler in range(16, 4096, 16):
        m = manager(96 << 10, eviction=eviction)
        if via_step:
            m.step(admit=[(1, pa)], admit_priority=[a.get("priority", 0)])
            m.step(finish=[1], admit=[(2, pb)], admit_priority=b.get("priority", 0))
            m.step(finish=[2])
        else:
            run(m, 1, pa, **a)
            run(m, 2, pb, **b)
        if m.admit(3, seq(500_000, filler)) is None or m.stats()["evictions"]["leaf"] == 0:
            continue
        m.validate()
        lost_a, lost_b = m.match_prefix(pa) < 192, m.match_prefix(pb) < 192
        assert lost_a != lost_b
        return lost_a
    raise AssertionError("no filler size evicted anything")


@pytest.mark.parametrize("via_step", [False, True])
def test_priority_keeps_a_prefix_longer_under_the_value_policy(via_step):
    # Without priorities one of the two goes first (the value order's learned priors move
    # between the two keyings, so not necessarily the older); a priority on that one, or a
    # lower one on the other, turns that around.
    up, down = {"priority": 1}, {"priority": -1}
    if first_victim_is_a("value", {}, {}, via_step):
        assert not first_victim_is_a("value", up, {}, via_step)
        assert not first_victim_is_a("value", {}, down, via_step)
    else:
        assert first_victim_is_a("value", {}, up, via_step)
        assert first_victim_is_a("value", down, {}, via_step)
    assert first_victim_is_a("lru", {"priority": kvalloc.MAX_PRIORITY}, {}, via_step)


def test_step_columns_one_value_or_one_per_admission():
    m = manager()
    a, b, c = seq(0, 300), seq(100_000, 300), seq(200_000, 300)
    r = m.step(
        admit=[(1, a), (2, b)],
        admit_ids=[3], admit_tokens=c, admit_lens=[300],
        admit_pin_tokens=np.array([256, 0, 256], dtype=np.int64),
        admit_pin_seconds=5.0,
        admit_cache=[True, True, False],
        admit_priority=np.int64(2),
    )
    assert list(r.hits) == [0, 0, 0]
    m.step(finish=[1, 2, 3])
    st = m.stats()
    # Request 1 pinned its 256 tokens; request 3 cached nothing, so its pin held nothing.
    assert st["pins"] == 1
    assert m.match_prefix(np.concatenate([c, [5]])) == 0
    assert m.match_prefix(np.concatenate([b, [5]])) == 288
    m.set_clock(5)
    assert m.stats()["pins"] == 0
    m.validate()


@pytest.mark.parametrize(
    "kw",
    [
        {"priority": 17}, {"priority": -17}, {"priority": 1.5}, {"priority": True}, {"priority": "1"},
        {"priority": 2**70}, {"pin_tokens": -1}, {"pin_tokens": 2**64}, {"pin_tokens": 16},
        {"pin_tokens": 16, "pin_seconds": 0}, {"pin_tokens": 16, "pin_seconds": -1.0},
        {"pin_tokens": 16, "pin_seconds": math.nan}, {"pin_seconds": "5"}, {"cache": "no"},
        {"cache": 0.5},
    ],
)
def test_bad_retention_is_invalid_and_changes_nothing(kw):
    m = manager()
    with pytest.raises(InvalidArgumentError):
        m.admit(1, seq(0, 100), **kw)
    assert 1 not in m
    column = {f"admit_{k}": v for k, v in kw.items()}
    with pytest.raises(InvalidArgumentError):
        m.step(admit=[(1, seq(0, 100))], **column)
    assert 1 not in m
    m.validate()


@pytest.mark.parametrize(
    "column",
    [
        {"admit_priority": [0, 0]}, {"admit_pin_tokens": []}, {"admit_cache": "yes"},
        {"admit_pin_seconds": b"5"}, {"admit_priority": [[1]]}, {"admit_cache": [True, None]},
    ],
)
def test_a_column_of_the_wrong_length_or_kind_is_invalid(column):
    m = manager()
    with pytest.raises(InvalidArgumentError):
        m.step(admit=[(1, seq(0, 100))], **column)
    assert 1 not in m
    m.validate()


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "1", None, 2**70, [1.0]])
def test_the_clock_takes_finite_seconds_and_never_goes_back(bad):
    m = manager()
    with pytest.raises(InvalidArgumentError):
        m.set_clock(bad)
    with pytest.raises(InvalidArgumentError):
        m.advance_clock(bad)
    m.set_clock(10)
    with pytest.raises(InvalidArgumentError):
        m.set_clock(9.5)
    assert m.clock() == 10.0
    m.validate()


def test_max_pinned_bytes_must_be_a_size():
    for bad in (-1, 1.5, "1", 2**64):
        with pytest.raises(InvalidArgumentError):
            KVCacheManager(SPEC, 1 << 20, max_pinned_bytes=bad)
