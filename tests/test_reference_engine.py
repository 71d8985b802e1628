"""The reference engine: a tiny hybrid model served through kvalloc's block tables produces,
for every turn, the logits of the same model recomputing everything without a cache, bit for
bit: hits served from L1, from host memory (L2, loaded layer by layer in the background), from
disk after a restart (L3) and from a remote store (L4, including another instance's prefixes)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import kvalloc
from kvalloc.reference import (
    Conversation,
    Engine,
    EngineError,
    MissingKVError,
    PagedKVBuffer,
    TinyHybridModel,
    conversation_mismatches,
    reference_logits,
    serve,
)
from kvalloc.reference.__main__ import main as reference_main
from kvalloc.reference.engine import Request

B = 16  # block tokens
W = 16  # the model's window


@pytest.fixture(scope="module")
def model() -> TinyHybridModel:
    return TinyHybridModel()


def conversations(n: int, turns: int, *, seed: int = 1, stagger: int = 2, new_tokens: int = 4) -> list[Conversation]:
    """n conversations sharing a 40-token system prompt, 14-token messages."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 128, 40)
    return [
        Conversation(
            [np.concatenate([system, rng.integers(0, 128, 14)])] + [rng.integers(0, 128, 14) for _ in range(turns - 1)],
            max_new_tokens=new_tokens,
            start_step=stagger * i,
        )
        for i in range(n)
    ]


def serve_and_check(
    model: TinyHybridModel, m: kvalloc.KVCacheManager, convs: list[Conversation], engine: Engine | None = None, **kw: int
) -> Engine:
    """Serves with m.validate() after every step, then checks every turn bit for bit and that
    nothing leaked: no request holds a block, and every byte in use is a cached block."""
    if engine is None:
        engine = Engine(model, m, validate=True, **kw)
    serve(engine, convs)
    m.wait_loads()
    bad = [msg for c in convs for msg in conversation_mismatches(model, c)]
    assert not bad, "\n".join(bad)
    assert all(len(c.turns) == len(c.messages) for c in convs)
    assert_nothing_leaked(m)
    return engine


def assert_nothing_leaked(m: kvalloc.KVCacheManager) -> None:
    m.validate()
    st = m.stats()
    assert st["running_requests"] == 0 and st["loads_in_flight"] == 0
    assert [g["running"] for g in st["groups"]] == [0] * len(st["groups"])
    block_bytes = m.spec.block_bytes(m.block_tokens)
    assert st["bytes_in_use"] == sum(g["cached"] * b for g, b in zip(st["groups"], block_bytes))


# -- the model and the buffer ------------------------------------------------------------------


def test_spec_comes_from_the_config(model: TinyHybridModel) -> None:
    full, sliding = model.spec.groups
    assert (full.kind, full.layers, full.kv_heads, full.k_dim, full.v_dim) == ("full", (0, 4), 1, 24, 16)
    assert (sliding.kind, sliding.window, sliding.layers) == ("sliding", W, (1, 2, 3, 5, 6, 7))
    assert (sliding.kv_heads, sliding.k_dim, sliding.v_dim, sliding.dtype) == (2, 16, 12, "float32")


def test_reference_logits_do_not_depend_on_the_sequence_length(model: TinyHybridModel) -> None:
    # Causal and batch-invariant: the first k positions of a longer pass equal a pass over k.
    tokens = np.random.default_rng(5).integers(0, 128, 40)
    full = reference_logits(model, tokens)
    for k in (1, 17, 33):
        assert np.array_equal(reference_logits(model, tokens[:k]).view(np.uint32), full[:k].view(np.uint32))


def test_block_layout_is_layer_by_layer_k_then_v(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    kv = PagedKVBuffer(m)
    g = model.spec.groups[1]  # sliding: layers 1,2,3,5,6,7; 2 KV heads, K 16, V 12
    layer, j = 5, g.layers.index(5)
    table = np.array([kvalloc.NULL_PAGE, 3], dtype=np.int32)
    keys = np.arange(2 * g.kv_heads * g.k_dim, dtype=np.float32).reshape(2, g.kv_heads, g.k_dim)
    values = -np.arange(2 * g.kv_heads * g.v_dim, dtype=np.float32).reshape(2, g.kv_heads, g.v_dim)
    kv.write(layer, table, 17, keys, values)  # positions 17, 18: block 1, slots 1 and 2
    per_layer = B * g.kv_heads * (g.k_dim + g.v_dim) * 4
    block = kv.buffer[3 * g.block_bytes(B) : 4 * g.block_bytes(B)]
    k_at = j * per_layer + 1 * g.kv_heads * g.k_dim * 4
    v_at = j * per_layer + B * g.kv_heads * g.k_dim * 4 + 1 * g.kv_heads * g.v_dim * 4
    assert block[k_at : k_at + keys.nbytes].view(np.float32).tolist() == keys.reshape(-1).tolist()
    assert block[v_at : v_at + values.nbytes].view(np.float32).tolist() == values.reshape(-1).tolist()
    k, v = kv.read(layer, table, 17, 19)
    assert np.array_equal(k, keys) and np.array_equal(v, values)
    with pytest.raises(MissingKVError, match="position 15"):
        kv.read(layer, table, 15, 19)  # block 0 has no page


# -- equality through the cache ----------------------------------------------------------------


@pytest.mark.parametrize(("eviction", "n", "turns"), [("value", 4, 5), ("lru", 3, 4)])
def test_l1_hits_with_released_windows_dropped_checkpoints_and_tombstones(
    model: TinyHybridModel, eviction: str, n: int, turns: int
) -> None:
    # One request at a time in a budget that holds the running request but not every
    # conversation: the cache drops interior checkpoints (and leaves). Chunks of 20 tokens
    # release each chunk's private out-of-window blocks at the next chunk.
    m = kvalloc.KVCacheManager(model.spec, 400 << 10, block_tokens=B, eviction=eviction)
    convs = conversations(n, turns)
    engine = serve_and_check(model, m, convs, max_running=1, prefill_chunk=20)
    st = m.stats()
    hits = [h for c in convs for r in c.turns for h in r.hits]
    assert sum(h > W for h in hits) >= 5, hits  # sliding layers resumed from checkpoints
    assert st["evictions"]["window_released_blocks"] > 0
    assert st["evictions"]["checkpoint"] > 0  # checkpoints dropped ...
    assert st["groups"][1]["tombstones"] > 0  # ... leaving tombstones under cached full KV
    assert engine.stats.preemptions == 0


def test_tiny_budget_preempts_and_readmits_mid_conversation(model: TinyHybridModel) -> None:
    # Two slabs of memory; 32-token chunks let three requests start, then run out mid-prompt.
    m = kvalloc.KVCacheManager(model.spec, 300 << 10, block_tokens=B)
    convs = conversations(3, 3)
    engine = serve_and_check(model, m, convs, max_running=3, prefill_chunk=32)
    st = m.stats()
    readmitted = [r for c in convs for r in c.turns if len(r.hits) > 1]
    assert engine.stats.preemptions > 0 and readmitted
    assert any(h > 0 for r in readmitted for h in r.hits[1:])  # resumed from its own cached blocks
    assert st["extensions_refused"] > 0 and st["admissions_refused"] > 0
    assert st["evictions"]["leaf"] > 0


def test_prompt_diverging_inside_the_last_block_hits_the_checkpoints_extra_block(model: TinyHybridModel) -> None:
    # A's 60-token prompt keeps SWA KV for blocks 1-2 (its last whole block ends at 48, plus
    # one block); B shares 40 tokens, so its window-safe hit is 32 and block 1 (tokens
    # 16-31) is the window it reads.
    rng = np.random.default_rng(3)
    a = rng.integers(0, 128, 60)
    b = np.concatenate([a[:40], rng.integers(0, 128, 20)])
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    convs = [Conversation([a], 3), Conversation([b], 3, start_step=30)]
    serve_and_check(model, m, convs)
    assert convs[1].turns[0].hits == [32]


def test_dense_policy_gives_the_same_tokens(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B, policy="dense")
    convs = conversations(2, 2)
    serve_and_check(model, m, convs)
    assert convs[1].turns[1].hits[0] > W


@pytest.mark.parametrize("chunk", [1, 64])
def test_chunk_size_does_not_change_the_logits(model: TinyHybridModel, chunk: int) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    convs = conversations(1, 2, seed=9)
    serve_and_check(model, m, convs, prefill_chunk=chunk)


# -- hits from the lower tiers ----------------------------------------------------------------
#
# A device budget of two slabs keeps one conversation's turn; the lower tiers keep the rest. The
# engine's buffer is registered, so every hit below L1 is served from bytes kvalloc wrote out on
# eviction (or flush, or write-through) and copied back in.

DEVICE = 300 << 10  # two slabs of this model's blocks


def more_turns(convs: list[Conversation], n: int, seed: int = 7) -> None:
    """Continues each conversation by n more user messages (served by a later engine)."""
    rng = np.random.default_rng(seed)
    for c in convs:
        c.messages += [rng.integers(0, 128, 14) for _ in range(n)]


def next_prompts(convs: list[Conversation]) -> list[npt.NDArray[np.int64]]:
    """What each conversation's next turn starts with (its history, then a new token)."""
    return [np.array(c.history + [1], dtype=np.int64) for c in convs]


def tier(m: kvalloc.KVCacheManager, name: str) -> dict[str, Any]:
    t: dict[str, Any] = m.stats()["tiers"][name]
    return t


def test_host_hits_with_released_windows_dropped_checkpoints_and_tombstones(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, DEVICE, block_tokens=B, host_bytes=1 << 20)
    convs = conversations(3, 5)
    engine = serve_and_check(model, m, convs, max_running=1, prefill_chunk=20)
    st = m.stats()
    host = st["tiers"]["host"]
    assert host["real"] and host["records_in"] > 0 and host["bytes_read"] > 0
    assert host["promoted_tokens"] > 0
    assert engine.stats.tier_loads > 0  # admissions that waited on background loads
    assert st["evictions"]["leaf"] > 0 and st["evictions"]["checkpoint"] > 0
    assert st["evictions"]["window_released_blocks"] > 0
    assert st["groups"][1]["tombstones"] > 0
    assert all(h > W for c in convs for r in c.turns[1:] for h in r.hits)  # each turn resumed


class WatchedLoads:
    """A load handle that logs each wait_layer into the engine's event log."""

    def __init__(self, handle: kvalloc.LoadHandle, req_id: int, events: list[tuple[Any, ...]]) -> None:
        self.handle, self.req_id, self.events = handle, req_id, events
        self.pending_at_admission = not handle.done
        self.bytes = handle.bytes
        self.done = handle.done

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        ok = self.handle.wait_layer(layer, timeout)
        self.events.append(("wait", self.req_id, layer, ok))
        return ok


class WatchedEngine(Engine):
    """Logs, per computed chunk, its load waits and the reads of cached KV, in order."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.events: list[tuple[Any, ...]] = []
        self.handles: list[WatchedLoads] = []
        read = self.kv.read

        def logged_read(layer: int, table: Any, lo: int, hi: int) -> Any:
            self.events.append(("read", layer))
            return read(layer, table, lo, hi)

        self.kv.read = logged_read  # type: ignore[method-assign]

    def _load_handle(self, req_id: int) -> Any:
        h = WatchedLoads(super()._load_handle(req_id), req_id, self.events)
        self.handles.append(h)
        return h

    def _forward(self, r: Request, start: int, end: int, loads: Any) -> None:
        self.events.append(("forward", r.req_id, loads is not None))
        super()._forward(r, start, end, loads)


def test_layer_wise_loads_are_awaited_before_each_layer_reads(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, DEVICE, block_tokens=B, host_bytes=1 << 20)
    convs = conversations(3, 3)
    engine = WatchedEngine(model, m, validate=True, max_running=1, prefill_chunk=20)
    serve_and_check(model, m, convs, engine)
    assert tier(m, "host")["promoted_tokens"] > 0
    layers = model.spec.num_layers
    # Split the log into chunks: a chunk that loads must wait for layer i (successfully)
    # right before it reads layer i, for every layer in order; others never wait.
    chunks: list[list[tuple[Any, ...]]] = []
    for ev in engine.events:
        if ev[0] == "forward":
            chunks.append([ev])
        else:
            chunks[-1].append(ev)
    loading = [c for c in chunks if c[0][2]]
    assert len(loading) == engine.stats.tier_loads > 0
    for c in chunks:
        req, waits = c[0][1], c[0][2]
        want: list[tuple[Any, ...]] = []
        for i in range(layers):
            want += [("wait", req, i, True)] if waits else []
            want.append(("read", i))
        assert c[1:] == want, c
    assert engine.stats.layer_waits == layers * len(loading)
    assert all(h.bytes > 0 for h in engine.handles if h.pending_at_admission)


def test_disk_hits_after_a_restart(model: TinyHybridModel, tmp_path: Path) -> None:
    def manager() -> kvalloc.KVCacheManager:
        return kvalloc.KVCacheManager(
            model.spec, DEVICE, block_tokens=B, host_bytes=256 << 10, disk_dir=str(tmp_path), disk_bytes=16 << 20
        )

    first = manager()
    convs = conversations(3, 2)
    serve_and_check(model, first, convs, max_running=1, prefill_chunk=20)
    first.flush()  # a planned shutdown: host records and L1 blocks go to disk
    first.validate()
    assert list(tmp_path.rglob("*.kvb"))
    del first
    gc.collect()

    # The process restarts: a new manager and a new (NaN-filled) device buffer on the same dir.
    m = manager()
    engine = Engine(model, m, validate=True, max_running=1, prefill_chunk=20)
    for c, p in zip(convs, next_prompts(convs)):
        hits = m.match_prefix_tiers(p)
        assert hits["device"] == hits["host"] == 0 and hits["disk"] == (len(c.history) // B) * B, hits
    more_turns(convs, 2)
    serve_and_check(model, m, convs, engine)
    disk = tier(m, "disk")
    assert disk["promoted_tokens"] > 0 and disk["bytes_read"] > 0
    assert all(c.turns[2].hits[0] == (c.turns[2].prompt_len - 14) // B * B for c in convs)  # resumed from disk
    assert m.stats()["groups"][1]["tombstones"] > 0


def test_remote_hits_on_eviction(model: TinyHybridModel, remote_server: Any) -> None:
    m = kvalloc.KVCacheManager(model.spec, DEVICE, block_tokens=B, remote_url=remote_server.url, remote_bytes=16 << 20)
    convs = conversations(3, 3)
    serve_and_check(model, m, convs, max_running=1, prefill_chunk=20)
    remote = tier(m, "remote")
    assert remote["real"] and remote["store"]["puts"] > 0 and remote["store"]["gets"] > 0
    assert remote["promoted_tokens"] > 0
    assert m.stats()["evictions"]["window_released_blocks"] > 0


def test_remote_hits_from_another_instance(model: TinyHybridModel, remote_server: Any) -> None:
    def manager(**kw: Any) -> kvalloc.KVCacheManager:
        return kvalloc.KVCacheManager(
            model.spec, 1 << 20, block_tokens=B, remote_url=remote_server.url, remote_bytes=16 << 20, **kw
        )

    writer = manager(write_through=True)  # ample memory: nothing is evicted, all is written through
    convs = conversations(2, 2)
    serve_and_check(model, writer, convs)
    assert writer.stats()["evictions"]["leaf"] == 0 and tier(writer, "remote")["store"]["puts"] > 0

    reader = manager()  # another instance that never saw these conversations
    engine = Engine(model, reader, validate=True)
    for c, p in zip(convs, next_prompts(convs)):
        hits = reader.match_prefix_tiers(p)
        assert hits["device"] == 0 and hits["remote"] == (len(c.history) // B) * B, hits
    more_turns(convs, 1)
    serve_and_check(model, reader, convs, engine)
    assert tier(reader, "remote")["promoted_tokens"] > 0
    assert all(c.turns[2].hits[0] == (c.turns[2].prompt_len - 14) // B * B for c in convs)


# -- faults while loading from disk or a remote store --------------------------------------------


class HookEngine(Engine):
    """Calls ``hook`` once, at the first step in which an admission waits for its KV (a
    background load from disk or a remote store is in flight), right after scheduling it."""

    def __init__(self, *args: Any, hook: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hook = hook
        self.fired = False

    def _schedule(self) -> list[tuple[Request, int, int]]:
        scheduled = super()._schedule()
        if not self.fired and self.stats.kv_waits > 0:
            self.fired = True
            self.hook()  # before the step computes, or waits, for anything
        return scheduled


def remote_reader(
    model: TinyHybridModel, server: Any, hook: Any = None, **kw: Any
) -> tuple[list[Conversation], kvalloc.KVCacheManager, HookEngine]:
    """Conversations served once by a writer that writes everything through to the remote
    store, and a second instance (``kw``: its settings; its engine calls ``hook`` at its first
    wait for KV) that has seen the records (a lookup indexed them) but holds nothing itself:
    its next turns must load from the store."""
    def manager(**more: Any) -> kvalloc.KVCacheManager:
        return kvalloc.KVCacheManager(
            model.spec, 1 << 20, block_tokens=B, remote_url=server.url, remote_bytes=16 << 20, **more
        )

    writer = manager(write_through=True)
    convs = conversations(2, 2)
    serve_and_check(model, writer, convs)
    reader = manager(**kw)
    engine = HookEngine(model, reader, validate=True, hook=hook or (lambda: None))
    for c, p in zip(convs, next_prompts(convs)):
        assert reader.match_prefix_tiers(p)["remote"] == (len(c.history) // B) * B
    more_turns(convs, 1)
    return convs, reader, engine


def test_a_frozen_store_mid_load_recomputes_bit_exact(model: TinyHybridModel, remote_server: Any) -> None:
    """The server hangs (SIGSTOP) with the loads in flight: each passes its deadline, the
    request computes what did not verify, and every logit matches the cache-free model."""
    import signal

    convs, m, engine = remote_reader(model, remote_server, remote_timeout_ms=5000, load_deadline_ms=50)
    remote_server.signal(signal.SIGSTOP)
    try:
        serve_and_check(model, m, convs, engine)
    finally:
        remote_server.signal(signal.SIGCONT)
    loads = m.stats()["loads"]
    assert loads["started"] > 0 and loads["timed_out"] > 0 and loads["verified"] == 0, loads
    assert engine.stats.kv_waits > 0
    assert all(c.turns[2].hits[0] < (c.turns[2].prompt_len - 14) // B * B for c in convs)


def test_a_store_killed_mid_load_recomputes_bit_exact(model: TinyHybridModel, remote_server: Any) -> None:
    """The server is killed while the loads wait on it: the reads fail, nothing is served
    from them, every logit matches."""
    import signal

    convs, m, engine = remote_reader(
        model, remote_server, remote_server.kill, remote_timeout_ms=5000, load_deadline_ms=5000
    )
    remote_server.signal(signal.SIGSTOP)  # holds the loads in flight until the kill
    serve_and_check(model, m, convs, engine)
    assert engine.fired
    loads = m.stats()["loads"]
    assert loads["started"] > 0 and loads["failed"] > 0 and loads["verified"] == 0, loads
    assert m.stats()["tiers"]["remote"]["store"]["unavailable"] > 0


def test_a_load_slower_than_its_deadline_recomputes_bit_exact(model: TinyHybridModel, remote_server: Any) -> None:
    """The server answers, but only after the loads' deadline: they are given up (the late
    replies are dropped, never written over pages reused since), every logit matches."""
    import signal
    import threading

    thaw = threading.Timer(0.4, remote_server.signal, (signal.SIGCONT,))
    convs, m, engine = remote_reader(model, remote_server, thaw.start, remote_timeout_ms=5000, load_deadline_ms=100)
    remote_server.signal(signal.SIGSTOP)
    try:
        serve_and_check(model, m, convs, engine)
    finally:
        thaw.join()
    loads = m.stats()["loads"]
    assert engine.fired and loads["timed_out"] > 0, loads


def served_then_restarted(
    model: TinyHybridModel, tmp_path: Path, tear: bool
) -> tuple[list[Conversation], kvalloc.KVCacheManager, Engine]:
    """Conversations served once and flushed to disk (every record damaged if ``tear``), then
    a restarted manager (host memory and a disk tier on the same directory) and its engine,
    with one more turn per conversation to serve: its hits must come from disk."""
    def manager() -> kvalloc.KVCacheManager:
        return kvalloc.KVCacheManager(
            model.spec, DEVICE, block_tokens=B, host_bytes=256 << 10, disk_dir=str(tmp_path), disk_bytes=16 << 20
        )

    first = manager()
    convs = conversations(3, 2)
    serve_and_check(model, first, convs, max_running=1, prefill_chunk=20)
    first.flush()
    del first
    gc.collect()
    records = sorted(tmp_path.rglob("*.kvb"))
    assert records
    if tear:
        for i, f in enumerate(records):
            data = bytearray(f.read_bytes())
            data[len(data) // 2 + i % 7] ^= 0x5A  # a torn or rotten payload
            f.write_bytes(bytes(data))
    m = manager()
    more_turns(convs, 1)
    return convs, m, Engine(model, m, validate=True, max_running=1, prefill_chunk=20)


def test_torn_disk_records_recompute_bit_exact(model: TinyHybridModel, tmp_path: Path) -> None:
    """Every record on disk is damaged after a restart: the background reads fail their
    checks, the requests compute instead, every logit matches."""
    convs, m, engine = served_then_restarted(model, tmp_path, tear=True)
    serve_and_check(model, m, convs, engine)
    loads = m.stats()["loads"]
    assert loads["started"] > 0 and loads["failed"] > 0 and loads["verified"] == 0, loads
    assert m.stats()["tiers"]["disk"]["store"]["checksum_failures"] > 0


def test_background_disk_loads_serve_bit_exact(model: TinyHybridModel, tmp_path: Path) -> None:
    """The same without damage: the requests wait for their KV, then resume from disk."""
    convs, m, engine = served_then_restarted(model, tmp_path, tear=False)
    serve_and_check(model, m, convs, engine)
    loads = m.stats()["loads"]
    assert loads["verified"] > 0 and loads["failed"] == loads["timed_out"] == 0, loads
    assert engine.stats.kv_waits > 0
    assert all(c.turns[2].hits[0] == (c.turns[2].prompt_len - 14) // B * B for c in convs)


# -- errors ------------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(model: TinyHybridModel) -> None:
    other = kvalloc.KVCacheManager(kvalloc.ModelSpec.preset("mimo-v2.5-pro"), 1 << 30)
    with pytest.raises(kvalloc.InvalidArgumentError, match="spec"):
        Engine(model, other)
    engine = Engine(model, kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B))
    with pytest.raises(kvalloc.InvalidArgumentError, match="vocabulary"):
        engine.submit([1, 2, 500], 3)
    with pytest.raises(kvalloc.InvalidArgumentError, match="non-empty"):
        engine.submit([], 3)


def test_a_request_larger_than_the_budget_is_an_engine_error(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 200 << 10, block_tokens=B)
    engine = Engine(model, m)
    engine.submit(np.arange(300) % 128, 2)
    with pytest.raises(EngineError, match="cannot"):
        engine.run(max_steps=100)


def test_the_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert reference_main(["--conversations", "2", "--turns", "2", "--new-tokens", "3"]) == 0
    assert "bit for bit" in capsys.readouterr().out


# -- the chunk's window (regressions) -----------------------------------------------------------
#
# A step's block tables must keep what its chunk reads and writes: the window before the chunk
# (its first tokens attend to it) and every checkpoint block the chunk computes. The manager
# once released both while it scheduled the chunk; they now leave the table at the request's
# next call, so the engine's chunks are as large as it wants.


def test_admission_table_shows_the_window_before_the_hit(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    prompt = np.arange(100)
    m.admit(1, prompt)
    m.finish(1)
    hit = m.admit(2, np.concatenate([prompt[:96], np.arange(200, 240)]))
    assert hit == 96
    # Position 96 attends to 81..96: block 5 (tokens 80..95) must be in the table.
    assert m.block_table(2, 1)[(hit - W) // B] != kvalloc.NULL_PAGE


def test_admission_table_shows_every_checkpoint_block_it_must_write(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    m.admit(1, np.arange(100))
    # The prompt-end checkpoint holds blocks 4 and 5 (tokens 64..95), written by this request
    # in this step; block 4 must therefore be in its table.
    assert m.block_table(1, 1)[4] != kvalloc.NULL_PAGE


def test_chunks_spanning_many_windows(model: TinyHybridModel) -> None:
    m = kvalloc.KVCacheManager(model.spec, 1 << 20, block_tokens=B)
    convs = conversations(2, 2)
    engine = Engine(model, m, validate=True, prefill_chunk=64)
    serve(engine, convs)
    assert not [msg for c in convs for msg in conversation_mismatches(model, c)]
    assert max(r.prompt_len - r.hits[0] for c in convs for r in c.turns) > 2 * W  # chunks past W
    assert_nothing_leaked(m)
