"""The reference engine: a tiny hybrid model served through kvalloc's block tables produces,
for every turn, the logits of the same model recomputing everything without a cache, bit for
bit (L1, device-only paths)."""

from __future__ import annotations

import numpy as np
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


def serve_and_check(model: TinyHybridModel, m: kvalloc.KVCacheManager, convs: list[Conversation], **kw: int) -> Engine:
    """Serves with m.validate() after every step, then checks every turn bit for bit and that
    nothing leaked: no request holds a block, and every byte in use is a cached block."""
    engine = Engine(model, m, validate=True, **kw)
    serve(engine, convs)
    bad = [msg for c in convs for msg in conversation_mismatches(model, c)]
    assert not bad, "\n".join(bad)
    assert all(len(c.turns) == len(c.messages) for c in convs)
    assert_nothing_leaked(m)
    return engine


def assert_nothing_leaked(m: kvalloc.KVCacheManager) -> None:
    m.validate()
    st = m.stats()
    assert st["running_requests"] == 0
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


@pytest.mark.parametrize(("eviction", "turns"), [("value", 5), ("lru", 4)])
def test_l1_hits_with_released_windows_dropped_checkpoints_and_tombstones(
    model: TinyHybridModel, eviction: str, turns: int
) -> None:
    # One request at a time in a budget that holds the running request but not every
    # conversation: the cache drops interior checkpoints (and leaves). Chunks of 20 tokens
    # release each chunk's private out-of-window blocks at the next chunk.
    m = kvalloc.KVCacheManager(model.spec, 400 << 10, block_tokens=B, eviction=eviction)
    convs = conversations(3, turns)
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
