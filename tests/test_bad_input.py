"""Garbage in: every call answers with a documented exception (a KvAllocError subclass, or a
TypeError for a wrong number of arguments), never a Rust panic, and state stays valid."""

import itertools

import numpy as np
import pytest

import kvalloc
from kvalloc import KVCacheManager, ModelSpec, SlabArena

WEIRD = [
    None, -1, 0, 2**64, 10**30, 1.5, "x", b"y", [], [1, -2], {}, object(),
    np.array([], dtype=np.int64), np.array([[1]], dtype=np.int64), np.array([1.0]),
    np.array([-5], dtype=np.int64), np.arange(6, dtype=np.int64)[::2], np.array([2**63], dtype=np.uint64),
]


def call(f, *args):
    try:
        f(*args)
    except (kvalloc.KvAllocError, TypeError):
        pass
    except BaseException as e:  # a PanicException is a BaseException
        pytest.fail(f"{f.__name__}{args!r} raised {type(e).__name__}: {e}")


def small_manager() -> KVCacheManager:
    spec = ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )
    return KVCacheManager(spec, 16 << 20)


def test_manager_survives_garbage():
    m = small_manager()
    assert m.admit(1, np.arange(100, dtype=np.int64)) == 0
    for w in WEIRD:
        call(m.match_prefix, w)
        call(m.admit, w, np.arange(10, dtype=np.int64))
        call(m.admit, 2, w)
        call(m.extend, 1, w)
        call(m.extend, w, np.array([1], dtype=np.int64))
        call(m.finish, w)
        call(m.abort, w)
        call(m.block_table, 1, w)
        call(m.block_table, w, 0)
        call(m.num_tokens, w)
        call(m.match_prefix, np.arange(10, dtype=np.int64), w)
        call(lambda x: m.step(finish=x), w)
        call(lambda x: m.step(extend_ids=x, extend_tokens=x), w)
        call(lambda x: m.step(admit=x), w)
        call(lambda x: m.step(admit=[(3, x)]), w)
        call(lambda x: m.step(admit_ids=x, admit_tokens=x, admit_lens=x), w)
        call(kvalloc.BlockHashes, w, 16)
        call(kvalloc.BlockHashes, np.arange(2, dtype=np.uint64), w)
        m.validate()
    assert 1 in m and m.num_tokens(1) >= 100


def test_constructors_survive_garbage():
    spec = ModelSpec.preset("gpt-oss-120b")
    for a, b in itertools.product(WEIRD, repeat=2):
        call(SlabArena, a, b)
        call(KVCacheManager, spec, a, b)
    for w in WEIRD:
        call(KVCacheManager, spec, 1 << 30, 16, w)
        call(KVCacheManager, spec, 1 << 30, 16, "dense", w)
        call(ModelSpec.from_hf_config, w)
        call(ModelSpec.preset, w)
        call(spec.kv_bytes, w)
        call(spec.kv_bytes, 100, w)


def test_arena_survives_garbage():
    a = SlabArena(1 << 20, [64, 192])
    held = a.alloc(0, 5)
    for w in WEIRD:
        call(a.alloc, w, 1)
        call(a.alloc, 0, w)
        call(a.free, w)
        call(a.offsets, w)
        call(a.pages, w)
        call(a.available, w)
        a.validate()
    a.free(held)
    a.validate()
