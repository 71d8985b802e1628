"""KVCacheManager through Python: lifecycle, the worked example, batched steps, bad input,
a hypothesis state machine against a reference, and threads."""

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvalloc
from kvalloc import (
    NULL_PAGE,
    BlockHashes,
    InvalidArgumentError,
    KVCacheManager,
    ModelSpec,
    RequestError,
)
from threads import run_threads

B = 16
W = 128


def small_spec() -> ModelSpec:
    return ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "sliding_window": W, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )


def seq(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)


def run(m: KVCacheManager, rid: int, prompt: np.ndarray, gen: np.ndarray) -> int:
    hit = m.admit(rid, prompt)
    assert hit is not None
    for t in gen[:-1]:
        assert m.extend(rid, np.array([t], dtype=np.int64))
    m.finish(rid)
    m.validate()
    return hit


def test_worked_example():
    m = KVCacheManager(small_spec(), 256 << 20)
    a = seq(0, 1024)
    out = seq(50_000, 100)
    assert run(m, 1, a, out) == 0
    assert m.match_prefix(np.concatenate([a, out, seq(9, 30)])) == 1120
    assert m.match_prefix(np.concatenate([a, seq(70_000, 40)])) == 1024
    assert m.match_prefix(np.concatenate([a[:1020], seq(80_000, 40)])) == 1008
    assert m.match_prefix(a) == 1008
    assert m.match_prefix(np.concatenate([a[:700], seq(60_000, 300)])) == 0
    assert m.match_prefix(a.astype(np.int32)) == 1008  # int32 token ids work the same


def test_block_tables_and_null_page():
    m = KVCacheManager(small_spec(), 256 << 20)
    assert m.admit(7, seq(0, 300)) == 0
    full = m.block_table(7, 0)
    swa = m.block_table(7, 1)
    assert full.dtype == np.int32 and len(full) == len(swa) == 19
    assert (full != NULL_PAGE).all()
    assert NULL_PAGE == -1
    assert swa[0] == NULL_PAGE and (swa[-9:] != NULL_PAGE).all()
    assert (full < m.num_pages(0)).all() and (swa[swa >= 0] < m.num_pages(1)).all()
    assert 7 in m and 8 not in m
    assert m.num_tokens(7) == 300
    m.finish(7)
    m.validate()


def test_step_batches_a_scheduler_step():
    m = KVCacheManager(small_spec(), 256 << 20)
    admitted, extended = m.step(admit=[(i, seq(1000 * i, 100)) for i in range(4)])
    assert admitted.tolist() == [0, 0, 0, 0] and extended.shape == (0,)
    ids = np.arange(4)
    admitted, extended = m.step(extend_ids=ids, extend_tokens=np.arange(4, dtype=np.int64))
    assert extended.tolist() == [True] * 4
    admitted, extended = m.step(
        finish=[0, 1], extend_ids=[2, 3], extend_tokens=np.arange(6, dtype=np.int32), extend_lens=[2, 4],
        admit=[(10, np.concatenate([seq(0, 100), seq(5, 20)])), (11, seq(77, 30), "tenant")],
    )
    assert admitted.tolist() == [96, 0]
    assert extended.tolist() == [True, True]
    assert m.num_tokens(3) == 105
    m.validate()
    # Any bad id: the whole step is refused and nothing changes.
    before = m.stats()
    with pytest.raises(RequestError):
        m.step(finish=[2], extend_ids=[99], extend_tokens=np.array([1], dtype=np.int64))
    assert m.stats() == before and 2 in m
    # One token each unless extend_lens says otherwise: a count mismatch is refused whole.
    with pytest.raises(InvalidArgumentError, match="extend_tokens"):
        m.step(finish=[2], extend_ids=[2, 3], extend_tokens=np.arange(3, dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="extend_lens"):
        m.step(extend_ids=[2, 3], extend_tokens=np.arange(3, dtype=np.int64), extend_lens=[1])
    # uint64 lengths whose sum wraps around to the token count are refused, not sliced.
    wrap = np.array([2**64 - 1, 1], dtype=np.uint64)
    with pytest.raises(InvalidArgumentError, match="extend_tokens.*more than 2\\^64"):
        m.step(extend_ids=[2, 3], extend_tokens=np.zeros(0, dtype=np.int64), extend_lens=wrap)
    with pytest.raises(InvalidArgumentError, match="admit_tokens"):
        m.step(admit_ids=[8, 9], admit_tokens=np.zeros(0, dtype=np.int64), admit_lens=wrap)
    assert m.stats() == before and 2 in m


def test_step_admissions_take_max_tokens_like_admit():
    a = KVCacheManager(small_spec(), 256 << 20)
    b = KVCacheManager(small_spec(), 256 << 20)
    prompts = [seq(0, 100), np.concatenate([seq(0, 100), seq(500, 60)])]
    hits = []
    for i, p in enumerate(prompts):
        hits.append(int(b.step(admit=[(i, p, None, 40)])[0][0]))
        assert a.admit(i, p, None, 40) == hits[-1]
        assert a.num_tokens(i) == b.num_tokens(i) == hits[-1] + 40
        assert a.block_table(i, 1).tolist() == b.block_table(i, 1).tolist()
    assert hits == [0, 32]  # the second shares the first's scheduled whole blocks
    assert b.step(admit=[(2, seq(900, 50), "tenant", None)])[0].tolist() == [0] and b.num_tokens(2) == 50
    for bad in (0, -1, "8", 1.5):
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            b.step(admit=[(3, seq(0, 10), None, bad)])
    with pytest.raises(InvalidArgumentError, match="admit"):
        b.step(admit=[(3, seq(0, 10), None, 4, 5)])
    assert 3 not in b
    b.validate()


def test_step_flat_admissions_equal_listed_ones():
    a = KVCacheManager(small_spec(), 256 << 20)
    b = KVCacheManager(small_spec(), 256 << 20)
    prompts = [np.concatenate([seq(0, 100), seq(1000 * i, 20 + i)]) for i in range(5)]
    listed, _ = a.step(admit=[(i, p) for i, p in enumerate(prompts)])
    flat, _ = b.step(
        admit_ids=np.arange(5), admit_tokens=np.concatenate(prompts),
        admit_lens=[len(p) for p in prompts],
    )
    assert listed.tolist() == flat.tolist() == [0, 96, 96, 96, 96]
    for i in range(5):
        assert (a.block_table(i, 0) >= 0).all() and len(a.block_table(i, 0)) == len(b.block_table(i, 0))
    with pytest.raises(InvalidArgumentError, match="admit_lens"):
        b.step(admit_ids=[9], admit_tokens=seq(0, 10), admit_lens=[4, 6])
    with pytest.raises(InvalidArgumentError, match="admit_tokens"):
        b.step(admit_ids=[9], admit_tokens=seq(0, 10), admit_lens=[4])
    b.validate()


def test_step_fcfs_stops_at_the_first_refusal():
    m = KVCacheManager(small_spec(), 8 << 20)
    fits = seq(0, 100)
    huge = seq(10_000, 200_000)
    plain, _ = m.step(admit=[(1, fits), (2, huge), (3, seq(500, 50))])
    assert plain[0] == 0 and plain[1] == -1 and plain[2] >= 0  # the third still tried
    m.step(finish=[1, 3])
    fcfs, _ = m.step(admit=[(4, seq(900, 30)), (5, huge), (6, seq(700, 40))], fcfs=True)
    assert fcfs.tolist() == [0, -1, -2]
    assert 4 in m and 5 not in m and 6 not in m
    # The same prompt again is refused again (answered from the remembered refusal) ...
    for _ in range(3):
        assert m.step(admit_ids=[5], admit_tokens=huge, admit_lens=[len(huge)], fcfs=True)[0].tolist() == [-1]
    assert m.stats()["admissions_refused"] == 5
    # ... and a different prompt under that id is evaluated afresh.
    assert m.step(admit=[(5, seq(3000, 20))], fcfs=np.True_)[0].tolist() == [0]
    for bad in ("yes", 1, [True]):
        with pytest.raises(InvalidArgumentError, match="fcfs"):
            m.step(admit=[(7, seq(4000, 20))], fcfs=bad)
    assert 7 not in m
    with pytest.raises(InvalidArgumentError, match="write_through"):
        KVCacheManager(small_spec(), 8 << 20, write_through="no")
    m.validate()


def test_watermark_keeps_room_for_decoding():
    def fill(m):
        rid = 0
        while m.admit(rid, seq(10_000 * rid, 300)) is not None:
            rid += 1
        return rid

    plain = KVCacheManager(small_spec(), 8 << 20)
    marked = KVCacheManager(small_spec(), 8 << 20, watermark=0.25)
    n_plain, n_marked = fill(plain), fill(marked)
    assert 0 < n_marked < n_plain
    # The reserve is there for the running requests' growth: more of them can take a block.
    def grow(m, n):
        return sum(bool(m.extend(rid, seq(900_000 + 16 * rid, 16))) for rid in range(n))

    assert grow(marked, n_marked) > grow(plain, n_plain)
    marked.validate()
    plain.validate()
    for bad in (-0.1, 1.0, float("nan"), "x"):
        with pytest.raises(InvalidArgumentError, match="watermark"):
            KVCacheManager(small_spec(), 8 << 20, watermark=bad)


def test_prefault_budget_is_invisible():
    """Bookkeeping committed up front (the default), none, or a budget the cache outgrows:
    the same answers and accounting."""
    ms = [KVCacheManager(small_spec(), 8 << 20, prefault_bytes=p) for p in (None, 0, 4096)]
    for rid in range(40):
        prompt = np.concatenate([seq(1_000 * (rid % 3), 64), seq(100_000 + 1_000 * rid, 40)])
        outcomes = {m.admit(rid, prompt) for m in ms}
        assert len(outcomes) == 1
        if rid % 2:
            for m in ms:
                m.finish(rid)
        assert all(m.stats() == ms[0].stats() for m in ms)
    for m in ms:
        m.validate()
    # Negative, not an integer, more than the machine has: an error, never an abort.
    for bad in (-1, 1.5, "x", 1 << 62):
        with pytest.raises(InvalidArgumentError, match="prefault_bytes"):
            KVCacheManager(small_spec(), 8 << 20, prefault_bytes=bad)


def test_block_tables_batch_equals_single_calls():
    m = KVCacheManager(small_spec(), 256 << 20)
    for i, n in enumerate([40, 300, 17]):
        m.admit(i, seq(1000 * i, n))
    ids = [2, 0, 1]
    for g in range(len(m.spec.groups)):
        rows = m.block_tables(ids, g)
        assert rows.dtype == np.int32 and rows.shape == (3, max(len(m.block_table(i, g)) for i in ids))
        for k, i in enumerate(ids):
            t = m.block_table(i, g)
            assert rows[k, : len(t)].tolist() == t.tolist()
            assert (rows[k, len(t):] == kvalloc.NULL_PAGE).all()
        # In place, into a wider engine-owned array: entries past each table are untouched.
        out = np.full((4, 64), 12345, dtype=np.int32)
        assert m.block_tables(np.array(ids), g, out=out) is out
        for k, i in enumerate(ids):
            t = m.block_table(i, g)
            assert out[k, : len(t)].tolist() == t.tolist() and (out[k, len(t):] == 12345).all()
        assert (out[3] == 12345).all()
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, 0, out=np.zeros((2, 64), dtype=np.int32))  # too few rows
    short = np.full((3, 2), 7, dtype=np.int32)
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, 0, out=short)  # a row too short: nothing is written
    assert (short == 7).all()
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, 0, out=np.zeros((3, 64), dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, 0, out=np.zeros((3, 128), dtype=np.int32)[:, ::2])
    with pytest.raises(RequestError):
        m.block_tables([0, 99], 0)
    with pytest.raises(InvalidArgumentError, match="group"):
        m.block_tables(ids, 7)
    assert m.block_tables([], 0).shape == (0, 0)
    # Every group at once: a tuple, one array per group, equal to the per-group calls.
    every = m.block_tables(ids)
    assert isinstance(every, tuple) and len(every) == len(m.spec.groups)
    for g, rows in enumerate(every):
        assert rows.tolist() == m.block_tables(ids, g).tolist()
    outs = [np.full((3, 64), 5, dtype=np.int32) for _ in m.spec.groups]
    assert all(a is b for a, b in zip(m.block_tables(ids, out=outs), outs))
    for g, o in enumerate(outs):
        t = m.block_table(ids[1], g)
        assert o[1, : len(t)].tolist() == t.tolist() and (o[1, len(t):] == 5).all()
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, out=outs[:1])
    ok_then_bad = [np.full((3, 64), 9, dtype=np.int32), np.zeros((3, 64), dtype=np.int64)]
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables(ids, out=ok_then_bad)
    assert (ok_then_bad[0] == 9).all()  # checked before anything is written
    m.validate()


def test_block_tables_from_a_start_block():
    m = KVCacheManager(small_spec(), 256 << 20)
    for i, n in enumerate([40, 300, 17]):
        m.admit(i, seq(1000 * i, n))
    ids = [2, 0, 1]
    lens = [m.block_tables([i], 0).shape[1] for i in ids]  # 2, 3, 19 blocks
    starts = [0, 2, 11]
    for g in range(len(m.spec.groups)):
        rows = m.block_tables(ids, g, start=starts)
        assert rows.shape == (3, max(n - s for n, s in zip(lens, starts)))
        for k, i in enumerate(ids):
            tail = m.block_table(i, g)[starts[k]:]
            assert rows[k, : len(tail)].tolist() == tail.tolist()
            assert (rows[k, len(tail):] == NULL_PAGE).all()
        # One start for every row; a start at the table's end reads nothing.
        same = m.block_tables(ids, g, start=1)
        for k, i in enumerate(ids):
            tail = m.block_table(i, g)[1:]
            assert same[k, : len(tail)].tolist() == tail.tolist()
        assert m.block_tables([1], g, start=np.array([19])).shape == (1, 0)
    # A decode step that opens a block: the new block alone, in every group.
    for t in range(300, 304):
        assert m.extend(1, np.array([t], dtype=np.int64))
    assert m.num_tokens(1) == 304
    assert m.block_tables([1], 0, start=19).shape == (1, 0)
    m.extend(1, np.array([7], dtype=np.int64))  # token 304 opens block 19
    new = m.block_tables([1], start=[19])
    assert [a.shape for a in new] == [(1, 1)] * len(m.spec.groups)
    assert [int(a[0, 0]) for a in new] == [int(m.block_table(1, g)[19]) for g in range(len(m.spec.groups))]
    # Into the engine's own table: the entries from the start land at their own columns and
    # nothing else is written; the row must be as wide as the table.
    out = np.full((2, 24), 77, dtype=np.int32)
    m.block_tables([1, 0], 0, out=out, start=[18, 1])
    assert out[0, 18:20].tolist() == m.block_table(1, 0)[18:].tolist()
    assert (out[0, :18] == 77).all() and (out[0, 20:] == 77).all()
    assert out[1, 1:3].tolist() == m.block_table(0, 0)[1:].tolist()
    assert out[1, 0] == 77 and (out[1, 3:] == 77).all()
    with pytest.raises(InvalidArgumentError, match="out"):
        m.block_tables([1], 0, out=np.zeros((1, 19), dtype=np.int32), start=18)
    # Bad starts change nothing and say what was wrong.
    with pytest.raises(InvalidArgumentError, match="start.*past"):
        m.block_tables(ids, 0, start=[0, 0, 99])
    with pytest.raises(InvalidArgumentError, match="start.*2 starts for 3"):
        m.block_tables(ids, 0, start=[0, 0])
    with pytest.raises(InvalidArgumentError, match="start.*>= 0"):
        m.block_tables(ids, 0, start=[0, -1, 0])
    with pytest.raises(InvalidArgumentError, match="start"):
        m.block_tables(ids, 0, start=-1)
    with pytest.raises(InvalidArgumentError, match="start"):
        m.block_tables(ids, 0, start="x")
    m.validate()


def test_step_result_counts_and_unpacks():
    m = KVCacheManager(small_spec(), 4 << 20)
    res = m.step(admit=[(1, seq(0, 100)), (2, seq(5000, 10**6)), (3, seq(7000, 50))], fcfs=True)
    assert isinstance(res, kvalloc.StepResult)
    assert res.admitted == 1 and res.refused_extensions == 0
    assert res.hits.tolist() == [0, -1, -2] and res.hits is res.hits  # made once
    assert res.extended.dtype == np.bool_ and res.extended.shape == (0,)
    hits, extended = res
    assert hits is res.hits and extended is res.extended and len(res) == 2
    assert res[0] is res.hits and res[-1] is res.extended and res[-2] is res.hits
    with pytest.raises(IndexError):
        res[2]
    assert "admitted=1 of 3" in repr(res)
    # Grow request 1 until the budget runs out: the count says so without reading the array.
    t = 0
    while True:
        res = m.step(extend_ids=[1], extend_tokens=np.array([t], dtype=np.int64))
        assert res.refused_extensions == int((~res.extended).sum())
        if res.refused_extensions:
            break
        t += 1
    assert res.extended.tolist() == [False] and res.admitted == 0 and res.hits.shape == (0,)
    m.validate()


def test_a_refused_step_leaves_nothing_for_the_next():
    """`step` converts its arguments into vectors the manager keeps between calls: a step
    refused halfway through its arguments must not leave ids behind for the next one."""
    m = KVCacheManager(small_spec(), 64 << 20)
    for rid in (1, 2, 3):
        assert m.admit(rid, seq(rid * 1000, 40)) is not None
    # finish and extend_ids convert, then the int8 tokens are refused.
    with pytest.raises(InvalidArgumentError, match="extend_tokens"):
        m.step(finish=[1, 2], extend_ids=[3], extend_tokens=np.array([5], dtype=np.int8))
    with pytest.raises(InvalidArgumentError, match="admit_lens"):
        m.step(finish=[1], admit_ids=[7, 8], admit_tokens=seq(0, 30), admit_lens=[10, 10])
    assert all(r in m for r in (1, 2, 3))
    res = m.step(finish=[3], extend_ids=[1], extend_tokens=np.array([9], dtype=np.int32))
    assert res.extended.tolist() == [True] and res.hits.shape == (0,)
    assert 1 in m and 2 in m and 3 not in m and 7 not in m and m.num_tokens(1) == 41
    # Shapes change from step to step: the kept vectors start empty each time.
    res = m.step(admit_ids=[7], admit_tokens=seq(0, 30), admit_lens=[30])
    assert res.hits.tolist() == [0] and res.extended.shape == (0,)
    res = m.step(extend_ids=[1, 2, 7], extend_counts=None, extend_tokens=seq(50, 6),
                 extend_lens=[1, 2, 3])
    assert res.extended.tolist() == [True] * 3
    assert [m.num_tokens(r) for r in (1, 2, 7)] == [42, 42, 33]
    m.validate()


@pytest.mark.parametrize("ids", [[1, -3], np.array([1, -3]), np.array([1, -3], dtype=np.int32), (1, -3)])
def test_a_negative_id_is_named_in_every_form(ids):
    """Lists, int64 and int32 arrays and other sequences of ids: the first negative one is
    reported with the argument's name, and nothing changes."""
    m = KVCacheManager(small_spec(), 64 << 20)
    assert m.admit(1, seq(0, 40)) is not None
    with pytest.raises(InvalidArgumentError, match=r"finish.*must be >= 0, got -3"):
        m.step(finish=ids)
    assert 1 in m
    m.validate()


class SubArray(np.ndarray):
    """An ndarray subclass: not numpy's array type exactly, so read through rust-numpy."""


def array_forms(a: np.ndarray) -> dict[str, np.ndarray]:
    """`a` (int64) as the forms a step's id and token arrays arrive in (token ids: all but
    uint64)."""
    padded = np.concatenate([[7, 7], a, [7]])
    readonly = a.copy()
    readonly.flags.writeable = False
    return {
        "int64": a,
        "view into a larger array": padded[2:-1],
        "read-only": readonly,
        "subclass": a.view(SubArray),
        "int32": a.astype(np.int32),
        "uint64": a.astype(np.uint64),
        "list": a.tolist(),
    }


@pytest.mark.parametrize("form", [f for f in array_forms(np.arange(1)) if f != "int64"])
def test_step_reads_every_array_form_alike(form):
    """The step's arrays in every other accepted form (numpy's own int64 arrays take a fast
    path, the rest rust-numpy's typed views): the same outcome and state as int64 arrays."""
    results = []
    for pick in ("int64", form):
        def ids(a, pick=pick):
            return array_forms(np.array(a))[pick]

        def tokens(a, pick=pick):  # token ids come as int32 or int64 only
            return array_forms(np.array(a))[pick if pick != "uint64" else "int64"]

        m = KVCacheManager(small_spec(), 64 << 20)
        assert m.admit(1, seq(0, 40)) is not None and m.admit(2, seq(0, 30)) is not None
        res = m.step(
            extend_ids=ids([1, 2]),
            extend_tokens=tokens([5, 6]),
            admit_ids=ids([3, 4]),
            admit_tokens=tokens(np.concatenate([seq(0, 20), seq(900, 50)])),
            admit_lens=ids([20, 50]),
        )
        m.validate()
        tables = [m.block_table(r, 1).tolist() for r in (1, 2, 3, 4)]
        results.append((res.admitted, res.hits.tolist(), res.extended.tolist(), tables,
                         [m.num_tokens(r) for r in (1, 2, 3, 4)]))
    assert results[0] == results[1]


@pytest.mark.parametrize("bad", ["big-endian", "strided", "2-D"])
def test_step_names_an_array_it_cannot_read(bad):
    """int64 arrays the fast path leaves to rust-numpy and rust-numpy refuses: a clear error,
    nothing changes."""
    a = {"big-endian": np.array([1], dtype=">i8"), "strided": np.array([1, 9, 1, 9], dtype=np.int64)[::2],
         "2-D": np.array([[1]], dtype=np.int64)}[bad]
    m = KVCacheManager(small_spec(), 64 << 20)
    assert m.admit(1, seq(0, 40)) is not None
    with pytest.raises(InvalidArgumentError, match="extend_ids"):
        m.step(extend_ids=a, extend_tokens=np.full(a.size, 5, dtype=np.int64))
    assert m.num_tokens(1) == 40
    m.validate()


def test_threads_step_one_manager_at_once():
    """Four threads call `step` on one manager at once, each with its own requests and a mix
    of argument forms: every result has its own step's shape, and the accounting adds up."""
    m = KVCacheManager(small_spec(), 256 << 20)

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        running: list[int] = []
        for i in range(60):
            new = [t * 10_000 + i * 10 + k for k in range(int(rng.integers(0, 4)))]
            lens = rng.integers(1, 80, len(new))
            tokens = np.concatenate([seq(0, 16)] + [seq(10**6 * (t + 1) + r * 100, int(n)) for r, n in
                                                     zip(new, lens)])
            lens[0:1] += 16 if new else 0
            done = running[: int(rng.integers(0, len(running) + 1))] if i % 3 == 0 else []
            running = [r for r in running if r not in done]
            ext = np.array(running, dtype=np.int64)
            if rng.random() < 0.5:
                kwargs = dict(extend_ids=ext, extend_tokens=rng.integers(0, 1000, len(ext)))
            else:
                kwargs = dict(extend_ids=list(running), extend_tokens=rng.integers(0, 1000, 2 * len(ext)),
                              extend_lens=np.full(len(ext), 2))
            if rng.random() < 0.5:
                kwargs.update(admit_ids=np.array(new, dtype=np.int64),
                              admit_tokens=tokens if new else seq(0, 0), admit_lens=lens)
            else:
                starts = np.concatenate([[0], np.cumsum(lens)])
                kwargs["admit"] = [(r, tokens[a:b]) for r, a, b in zip(new, starts, starts[1:])]
            res = m.step(finish=done, **kwargs)
            assert res.hits.shape == (len(new),) and res.extended.shape == (len(running),)
            assert res.extended.all() and (res.hits >= 0).all()
            running += new
        m.step(finish=running)

    run_threads(worker, 4)
    m.validate()
    s = m.stats()
    assert s["running_requests"] == 0 and s["hit_tokens"] > 0


def test_admit_if_extended_admits_nothing_in_a_step_that_must_preempt():
    m = KVCacheManager(small_spec(), 4 << 20)
    assert m.admit(2, seq(10**6, 16)) == 0
    t = 0
    while m.extend(2, np.array([t], dtype=np.int64)):  # grow request 2 until memory runs out
        t += 1
    n = m.num_tokens(2)
    small = seq(5 * 10**6, 20)
    step = dict(extend_ids=[2], extend_tokens=np.array([7], dtype=np.int64),
                admit_ids=[3], admit_tokens=small, admit_lens=[20])
    # Request 2's next token does not fit: with the flag no admission is tried (-2) and nothing
    # changed but the refused extension's count; without it the admission is tried (-1).
    before = m.stats()
    res = m.step(**step, admit_if_extended=True)
    assert res.refused_extensions == 1 and res.admitted == 0 and res.hits.tolist() == [-2]
    assert 3 not in m and m.num_tokens(2) == n
    after = m.stats()
    assert after["extensions_refused"] == before["extensions_refused"] + 1
    assert after["admissions_refused"] == before["admissions_refused"]
    assert {k: v for k, v in after.items() if k != "extensions_refused"} == {
        k: v for k, v in before.items() if k != "extensions_refused"}
    res = m.step(**step)
    assert res.refused_extensions == 1 and res.hits.tolist() == [-1]
    assert m.stats()["admissions_refused"] == before["admissions_refused"] + 1
    # When every extension fits, the flag changes nothing.
    m.finish(2)
    assert m.admit(4, seq(9 * 10**6, 30)) is not None
    res = m.step(extend_ids=[4], extend_tokens=np.array([1], dtype=np.int64),
                 admit_ids=[5], admit_tokens=seq(8 * 10**6, 20), admit_lens=[20], admit_if_extended=True)
    assert res.refused_extensions == 0 and res.admitted == 1 and 5 in m
    with pytest.raises(InvalidArgumentError, match="admit_if_extended"):
        m.step(admit_if_extended="yes")
    m.validate()


def test_block_hashes_prompts():
    m = KVCacheManager(small_spec(), 256 << 20)
    ids = np.arange(100, 164, dtype=np.uint64)
    assert m.admit(1, BlockHashes(ids, 1024)) == 0
    assert m.extend(1, 40)
    m.finish(1)
    longer = BlockHashes(np.concatenate([ids, np.array([1, 2], dtype=np.uint64)]), 66 * 16)
    assert m.match_prefix(longer) == 1024
    with pytest.raises(InvalidArgumentError, match="block_hashes"):
        m.match_prefix(BlockHashes(ids[:3], 1024))


def test_salt_isolates_tenants():
    m = KVCacheManager(small_spec(), 256 << 20)
    p = seq(0, 600)
    m.admit(1, p, salt="a")
    m.finish(1)
    assert m.match_prefix(p, salt="a") > 0
    assert m.match_prefix(p, salt=b"b") == 0
    assert m.match_prefix(p) == 0


def test_refused_admission_returns_none():
    m = KVCacheManager(small_spec(), 8 << 20)
    assert m.admit(1, seq(0, 200_000)) is None
    assert 1 not in m
    assert m.stats()["admissions_refused"] == 1
    m.validate()


@pytest.mark.parametrize(
    "tokens",
    [
        np.array([], dtype=np.int64),
        np.zeros((2, 3), dtype=np.int64),
        np.arange(20, dtype=np.int64)[::2],
        np.arange(5, dtype=np.float32),
        "abc",
    ],
)
def test_bad_tokens(tokens):
    m = KVCacheManager(small_spec(), 64 << 20)
    with pytest.raises(InvalidArgumentError, match="tokens"):
        m.admit(1, tokens)
    assert 1 not in m
    m.validate()


def test_bad_arguments():
    spec = small_spec()
    with pytest.raises(InvalidArgumentError, match="policy"):
        KVCacheManager(spec, 1 << 30, policy="sometimes")
    with pytest.raises(InvalidArgumentError, match="eviction"):
        KVCacheManager(spec, 1 << 30, eviction="random")
    with pytest.raises(InvalidArgumentError, match="capacity_bytes"):
        KVCacheManager(spec, 0)
    with pytest.raises(InvalidArgumentError, match="block_tokens"):
        KVCacheManager(spec, 1 << 30, block_tokens=-16)
    with pytest.raises(InvalidArgumentError, match="spec"):
        KVCacheManager("mimo", 1 << 30)
    m = KVCacheManager(spec, 64 << 20)
    with pytest.raises(RequestError):
        m.finish(3)
    with pytest.raises(RequestError):
        m.extend(3, np.array([1], dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="req_id"):
        m.admit(-1, seq(0, 10))
    m.admit(3, seq(0, 10))
    with pytest.raises(RequestError):
        m.admit(3, seq(0, 10))
    with pytest.raises(InvalidArgumentError, match="group"):
        m.block_table(3, 5)
    with pytest.raises(InvalidArgumentError, match="salt"):
        m.match_prefix(seq(0, 10), salt=5)
    with pytest.raises(InvalidArgumentError, match="count"):
        m.extend(3, 5)  # a token-id request's output must be ids
    with pytest.raises(InvalidArgumentError, match="tokens"):
        m.extend(3, 10**30)  # not even a u64
    with pytest.raises(InvalidArgumentError, match="2\\*\\*64"):
        m.admit(10**20, seq(0, 10))
    assert isinstance(RequestError("x"), LookupError)
    m.validate()


def test_dense_policy_same_api():
    m = KVCacheManager(small_spec(), 256 << 20, policy="dense", eviction="lru")
    assert (m.policy, m.eviction) == ("dense", "lru")
    run(m, 1, seq(0, 1024), seq(5, 3))
    assert m.match_prefix(np.concatenate([seq(0, 700), seq(60_000, 10)])) == 688
    s = m.stats()
    assert s["groups"][1]["cached"] == s["groups"][0]["cached"]


class ManagerMachine(RuleBasedStateMachine):
    """Random admit/extend/finish/abort against a reference: validate() after every step; hits
    never exceed the longest cached whole-block prefix; under an unbounded dense cache they equal
    it; running sliding-window blocks stay bounded."""

    SEGMENTS = [np.arange(s * 1000, s * 1000 + n, dtype=np.int64) for s, n in
                [(1, 40), (2, 96), (3, 7), (4, 150), (5, 16), (6, 61), (7, 300)]]

    def __init__(self):
        super().__init__()
        self.policy = "swa-aware"
        self.capacity = 256 << 20
        self.m = None
        self.running: dict[int, list[int]] = {}
        self.prompts: dict[int, list[int]] = {}
        self.finished: set[tuple[int, ...]] = set()  # whole-block prefixes of finished requests
        self.next_id = 0
        self.aborted = False

    @rule(policy=st.sampled_from(["swa-aware", "dense"]), small=st.booleans())
    @precondition(lambda self: self.m is None)
    def create(self, policy, small):
        self.policy = policy
        self.capacity = (3 << 20) if small else (256 << 20)
        self.m = KVCacheManager(small_spec(), self.capacity, policy=policy)

    def upper(self, tokens: np.ndarray) -> int:
        """Longest prefix (whole blocks, short of the last token) that finished requests or
        running prompts have cached: no hit can exceed it."""
        cached = set(self.finished)
        for p in self.prompts.values():
            cached.update(self.prefixes(p))
        best = 0
        for k in range(1, (len(tokens) - 1) // B + 1):
            if tuple(tokens[: k * B].tolist()) not in cached:
                break
            best = k * B
        return best

    @staticmethod
    def prefixes(tokens: list[int]) -> list[tuple[int, ...]]:
        return [tuple(tokens[: k * B]) for k in range(1, len(tokens) // B + 1)]

    @precondition(lambda self: self.m is not None)
    @rule(parts=st.lists(st.integers(0, 6), min_size=1, max_size=4), cut=st.integers(0, 20))
    def admit(self, parts, cut):
        tokens = np.concatenate([self.SEGMENTS[p] for p in parts])
        if cut and cut < len(tokens):
            tokens = tokens[:-cut]
        rid = self.next_id
        self.next_id += 1
        expected = self.m.match_prefix(tokens)
        assert expected % B == 0 and expected < len(tokens)
        assert expected <= self.upper(tokens)
        # Exact for an unbounded dense cache. (After an abort, blocks the aborted request linked
        # stop matching even while another running request still reads them.)
        if self.policy == "dense" and self.capacity > (100 << 20) and not self.aborted:
            assert expected == self.upper(tokens)
        hit = self.m.admit(rid, tokens)
        if hit is not None:
            assert hit == expected
            self.running[rid] = tokens.tolist()
            self.prompts[rid] = tokens.tolist()

    @precondition(lambda self: self.m is not None)
    @rule(
        prompts=st.lists(
            st.tuples(st.lists(st.integers(0, 6), min_size=1, max_size=4), st.integers(0, 20)),
            min_size=1,
            max_size=3,
        ),
        fcfs=st.booleans(),
    )
    def admit_step(self, prompts, fcfs):
        """Several admissions in one batched step (flat form; their prompts are hashed ahead of
        the step's work). A hit is whole blocks and no longer than what finished requests,
        running prompts and the step's earlier admissions have cached; with `fcfs` nothing
        after a refusal is attempted."""
        batch = []
        for parts, cut in prompts:
            tokens = np.concatenate([self.SEGMENTS[p] for p in parts])
            if cut and cut < len(tokens):
                tokens = tokens[:-cut]
            batch.append((self.next_id, tokens))
            self.next_id += 1
        bounds, earlier = [], dict(self.prompts)
        for rid, tokens in batch:
            saved, self.prompts = self.prompts, earlier
            bounds.append(self.upper(tokens))
            self.prompts = saved
            earlier = {**earlier, rid: tokens.tolist()}
        res = self.m.step(
            admit_ids=np.array([rid for rid, _ in batch], dtype=np.int64),
            admit_tokens=np.concatenate([t for _, t in batch]),
            admit_lens=np.array([len(t) for _, t in batch], dtype=np.int64),
            fcfs=fcfs,
        )
        refused = False
        for (rid, tokens), hit, bound in zip(batch, res.hits.tolist(), bounds):
            if hit == -2:
                assert fcfs and refused
                continue
            if hit == -1:
                refused = True
                continue
            assert hit % B == 0 and hit <= bound, (hit, bound)
            self.running[rid] = tokens.tolist()
            self.prompts[rid] = tokens.tolist()

    @precondition(lambda self: self.running)
    @rule(data=st.data(), n=st.integers(1, 40))
    def extend(self, data, n):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        new = list(range(900_000 + rid * 1000, 900_000 + rid * 1000 + n))
        if self.m.extend(rid, np.array(new, dtype=np.int64)):
            self.running[rid] += new

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def decode_step(self, data):
        """One batched step: a decode token each for some running requests (the step's decode
        columns); each either fits whole or changes nothing."""
        ids = data.draw(st.lists(st.sampled_from(sorted(self.running)), min_size=1, unique=True))
        tokens = [900_000 + rid * 1000 + len(self.running[rid]) % 1000 for rid in ids]
        res = self.m.step(extend_ids=np.array(ids, dtype=np.int64), extend_tokens=np.array(tokens, dtype=np.int64))
        assert len(res.extended) == len(ids) and res.refused_extensions == (~res.extended).sum()
        for rid, token, ok in zip(ids, tokens, res.extended):
            if ok:
                self.running[rid].append(token)
            assert self.m.num_tokens(rid) == len(self.running[rid])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.m.finish(rid)
        self.finished.update(self.prefixes(self.running.pop(rid)))
        del self.prompts[rid]

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.m.abort(rid)
        del self.running[rid]
        del self.prompts[rid]
        self.aborted = True

    @invariant()
    def consistent(self):
        if self.m is None:
            return
        self.m.validate()
        s = self.m.stats()
        assert s["bytes_in_use"] <= s["capacity_bytes"]
        assert s["running_requests"] == len(self.running)
        if self.policy == "swa-aware":
            assert s["groups"][1]["running"] <= len(self.running) * (W // B + 1)


TestManagerMachine = ManagerMachine.TestCase
TestManagerMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_threads_share_one_manager():
    """Eight threads drive their own requests on one manager at once (the GIL is released)."""
    m = KVCacheManager(small_spec(), 64 << 20)

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        for i in range(40):
            rid = t * 1000 + i
            shared = seq(0, int(rng.integers(16, 400)))
            own = seq(100_000 * (t + 1) + i * 500, int(rng.integers(1, 200)))
            if m.admit(rid, np.concatenate([shared, own])) is None:
                continue
            for _ in range(int(rng.integers(0, 20))):
                if not m.extend(rid, np.array([int(rng.integers(1 << 30))], dtype=np.int64)):
                    break
            if rng.random() < 0.2:
                m.abort(rid)
            else:
                m.finish(rid)

    run_threads(worker, 8)
    m.validate()
    s = m.stats()
    assert s["running_requests"] == 0
    assert all(g["running"] == 0 for g in s["groups"])
    assert s["hit_tokens"] > 0


def test_speculative_checkpoints_serve_the_second_request_and_are_reported():
    """With memory to spare, request 2 hits the system prompt it shares with request 1; the
    stats say which checkpoint kinds were placed and resumed at. Off: only from request 3."""
    spec = kvalloc.ModelSpec.preset("mimo-v2.5-pro")
    system = np.arange(300, dtype=np.int64)

    def prompt(i):
        return np.concatenate([system, np.arange(10_000 * i, 10_000 * i + 200, dtype=np.int64)])

    def hits(**kw):
        m = kvalloc.KVCacheManager(spec, 8 << 30, block_tokens=16, **kw)
        out = []
        for r in (1, 2, 3):
            out.append(m.admit(r, prompt(r)))
            m.finish(r)
            m.validate()
        return out, m.stats()["checkpoint_kinds"]

    on, kinds = hits(speculative_checkpoints=True)
    assert on == [0, 288, 288]
    assert kinds["speculative"]["placed"] > 0 and kinds["speculative"]["resumed"] >= 1
    assert set(kinds) == {"branch", "prompt_end", "output_end", "interval", "pin",
                          "speculative", "restored"}
    off, kinds = hits()
    assert off == [0, 0, 288]
    assert kinds["speculative"]["placed"] == 0 and kinds["branch"]["resumed"] == 1
