"""Garbage in: every public call and every CLI option answers bad values with a documented
exception of the exact class (a ``KvAllocError`` subclass), never a panic, an abort, a hang or a
builtin error, and the object stays valid and usable afterwards.

The public API is read from ``_core.pyi`` and ``kvalloc.__all__``; a public method or CLI option
that none of the tables below exercises fails ``test_every_public_call_is_covered`` /
``test_every_cli_option_is_covered``.

Values that found the faults: sizes between 2**32 and 2**63 and above 2**64, negatives, floats,
NaN and infinities, lone surrogates, wrong shapes and dtypes, and paths that are FIFOs,
directories or have missing parents.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvalloc
from kvalloc import (
    BlockHashes,
    ConfigError,
    InvalidArgumentError,
    KVCacheManager,
    KvAllocError,
    ModelSpec,
    OutOfMemoryError,
    SlabArena,
    Simulator,
    StaleHandleError,
    Trace,
)
from kvalloc.cli import build_parser, main

NAN, INF = float("nan"), float("inf")
SURROGATES = ["\udc80", "\ud800", "a\udfffb"]
STUB = Path(kvalloc.__file__).with_name("_core.pyi")

# Integers of every range that an extraction can trip on: negative, the u32 and i64 edges,
# between 2**32 and 2**63, and at or above 2**64.
BAD_INTS = [-1, -(2**63), -(2**64), 2**32, 2**32 + 1, 2**40, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]
BAD_NUMBERS = [1.5, NAN, INF, -INF, np.float64(NAN), np.int64(-1), True]
BAD_OBJECTS = [None, "x", *SURROGATES, b"\xff", [], [1, -2], [2**64], {}, object()]
BAD_ARRAYS = [
    np.array([], dtype=np.int64),
    np.array([[1]], dtype=np.int64),
    np.array([1.0]),
    np.array([-5], dtype=np.int64),
    np.arange(6, dtype=np.int64)[::2],
    np.array([2**63], dtype=np.uint64),
    np.array([True]),
    np.zeros((2, 2), dtype=np.uint8),
]
WEIRD = [*BAD_INTS, *BAD_NUMBERS, *BAD_OBJECTS, *BAD_ARRAYS]


def small_spec() -> ModelSpec:
    return ModelSpec.from_hf_config(
        {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1]}
    )


SPEC = small_spec()
CAPACITY = 16 << 20


def small_manager(**kw: Any) -> KVCacheManager:
    m = KVCacheManager(SPEC, CAPACITY, **kw)
    assert m.admit(1, np.arange(100, dtype=np.int64)) == 0
    return m


def exactly(cls: type[BaseException], f: Callable[..., Any], *args: Any, **kw: Any) -> BaseException:
    """Calls ``f``, which must raise exactly ``cls`` (not a subclass, not a panic)."""
    with pytest.raises(BaseException) as info:
        f(*args, **kw)
    e = info.value
    assert type(e) is cls, f"{getattr(f, '__name__', f)}{args!r} raised {type(e).__name__}: {e}"
    return e


def healthy_arena(a: SlabArena) -> None:
    a.validate()
    h = a.alloc(0, 3)
    a.free(h)
    a.validate()


_next_id = itertools.count(1000)


def healthy_manager(m: KVCacheManager) -> None:
    m.validate()
    rid = next(_next_id)
    assert m.admit(rid, np.arange(40, dtype=np.int64) + rid) is not None
    m.abort(rid)
    m.validate()


def kvalloc_error_or_success(f: Callable[..., Any], *args: Any, **kw: Any) -> None:
    """The fuzz rule: succeed, or raise a KvAllocError subclass (never a panic, a TypeError, ...)."""
    try:
        f(*args, **kw)
    except KvAllocError:
        pass
    except BaseException as e:  # a PanicException is a BaseException
        pytest.fail(f"{getattr(f, '__name__', f)}{args!r} {kw!r} raised {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# 1. SlabArena: absurd counts, and 6. foreign handles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2**32, 2**32 + 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1])
def test_arena_alloc_of_absurd_counts_is_out_of_memory_and_changes_nothing(n):
    a = SlabArena(1 << 20, [64, 192])
    held = a.alloc(0, 5)
    before = a.stats()
    for cls in (0, 1):
        e = exactly(OutOfMemoryError, a.alloc, cls, n)
        assert f"requested {n} block(s)" in str(e)
        assert a.stats() == before
        healthy_arena(a)
    a.free(held)


@pytest.mark.parametrize("n", [-1, -(2**63), 2**64, 2**70, 1.5, NAN, INF, "3", *SURROGATES, None, [], np.array([1])])
def test_arena_alloc_of_invalid_counts_is_invalid_argument(n):
    a = SlabArena(1 << 20, [64, 192])
    exactly(InvalidArgumentError, a.alloc, 0, n)
    exactly(InvalidArgumentError, a.alloc, n, 1)
    healthy_arena(a)


def test_a_foreign_arena_handle_is_stale_and_frees_nothing():
    a = SlabArena(1 << 20, [64, 192])
    b = SlabArena(1 << 20, [64, 192])
    mine = a.alloc(0, 1)
    theirs = b.alloc(0, 1)
    before = a.stats()
    for call in (a.free, a.offsets, a.pages):
        e = exactly(StaleHandleError, call, theirs)
        assert "another arena" in str(e)
    exactly(StaleHandleError, a.free, np.concatenate([mine, theirs]))
    assert a.stats() == before
    a.free(mine)
    b.free(theirs)
    healthy_arena(a)
    healthy_arena(b)


def test_arena_constructor_and_handles_survive_garbage():
    for c, b in itertools.product(WEIRD, repeat=2):
        kvalloc_error_or_success(SlabArena, c, b)
    for w in WEIRD:
        kvalloc_error_or_success(SlabArena, 1 << 20, [64], w)
    a = SlabArena(1 << 20, [64, 192])
    held = a.alloc(0, 5)
    for w in WEIRD:
        for f in (a.free, a.offsets, a.pages, a.available, a.num_pages):
            kvalloc_error_or_success(f, w)
        kvalloc_error_or_success(a.alloc, w, 1)
        kvalloc_error_or_success(a.alloc, 0, w)
        a.validate()
    a.free(held)
    healthy_arena(a)


# ---------------------------------------------------------------------------------------------
# 2. Memory the system cannot give
# ---------------------------------------------------------------------------------------------


def test_a_host_tier_larger_than_the_machine_is_out_of_memory_at_register_device():
    # More host memory than the machine has (the 64 GiB on a 24 GiB machine, and 2 TiB
    # anywhere): the constructor only books it (the tier is virtual until a device is
    # registered); registering asks for the memory and must refuse, not abort.
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for host in [h for h in (64 << 30, 2 << 40) if h > physical]:
        m = KVCacheManager(SPEC, CAPACITY, host_bytes=host)
        e = exactly(OutOfMemoryError, m.register_device, np.zeros(CAPACITY, dtype=np.uint8))
        assert "host_bytes" in str(e) and "available" in str(e)
        healthy_manager(m)
        assert m.stats()["tiers"]["host"]["real"] is False
    # A host tier the arena cannot even number is refused at construction, naming host_bytes.
    e = exactly(InvalidArgumentError, KVCacheManager, SPEC, CAPACITY, host_bytes=64 << 40)
    assert "host_bytes" in str(e)


def test_a_host_tier_is_registered_and_serves():
    # Mapped at once, backed in the background (the Rust test of HostBuffer::anonymous checks
    # that nothing is touched up front): it is real and demotes and promotes bytes.
    m = KVCacheManager(SPEC, CAPACITY, host_bytes=1 << 30)
    m.register_device(np.zeros(CAPACITY, dtype=np.uint8))
    assert m.stats()["tiers"]["host"]["real"] is True
    healthy_manager(m)


def test_a_trace_too_large_for_this_machine_is_refused_naming_the_largest_size():
    for kind in Trace.generators():
        e = exactly(OutOfMemoryError, Trace.generate, kind, 0, 10**9)
        assert "at most" in str(e)
    exactly(OutOfMemoryError, Trace.generate, "chat", 0, 2**32 - 1)
    for size in (2**32, 2**63, 2**64, -1, 0, 1.5, NAN, "9", *SURROGATES):
        exactly(InvalidArgumentError, Trace.generate, "chat", 0, size)
    assert Trace.generate("chat", 0, 2).num_requests > 0


# ---------------------------------------------------------------------------------------------
# 3. LoadHandle
# ---------------------------------------------------------------------------------------------


def test_load_handle_timeouts_and_layers():
    m = small_manager()
    h = m.load_handle(1)
    # Huge and infinite timeouts wait as long as it takes (here: nothing to wait for).
    for t in (1e300, 1e308, 2**63, 2**64, INF, 0, 0.0, None):
        assert h.wait_layer(0, t) is True
        assert h.wait_all(t) is True
    for t in (NAN, -1, -0.5, -INF, "1", *SURROGATES, [], object(), True):
        exactly(InvalidArgumentError, h.wait_layer, 0, t)
        exactly(InvalidArgumentError, h.wait_all, t)
    # Layers the model does not have (it has 4).
    for layer in (4, 10**6, 2**32, 2**63, 2**64, -1, 1.5, NAN, "0", None):
        exactly(InvalidArgumentError, h.wait_layer, layer)
    assert h.wait_layer(3) is True and h.done and h.bytes == 0
    healthy_manager(m)


# ---------------------------------------------------------------------------------------------
# 4. Strings, paths and indexes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", SURROGATES)
def test_lone_surrogates_are_invalid_arguments(s, tmp_path):
    m = small_manager()
    toks = np.arange(50, dtype=np.int64)
    exactly(InvalidArgumentError, m.match_prefix, toks, s)
    exactly(InvalidArgumentError, m.admit, 7, toks, s)
    exactly(InvalidArgumentError, m.match_prefix_tiers, toks, s)
    exactly(InvalidArgumentError, m.residency, toks, s)
    exactly(InvalidArgumentError, m.step, admit=[(8, toks, s)])
    assert 7 not in m and 8 not in m
    healthy_manager(m)
    for kw in ("policy", "eviction", "remote_url"):
        exactly(InvalidArgumentError, KVCacheManager, SPEC, CAPACITY, **{kw: s})
    for kw in ("remote_username", "remote_password", "remote_prefix"):
        exactly(InvalidArgumentError, KVCacheManager, SPEC, CAPACITY, remote_url="redis://127.0.0.1:1", **{kw: s})
    exactly(InvalidArgumentError, ModelSpec.preset, s)
    exactly(InvalidArgumentError, ModelSpec.from_hf_config, {"num_hidden_layers": 1}, dtype=s)
    exactly(InvalidArgumentError, Trace.generate, s)
    sim = Simulator(SPEC, Trace.generate("chat", 0, 2), 16)
    exactly(InvalidArgumentError, sim.run, 1 << 30, s)
    exactly(InvalidArgumentError, sim.run, 1 << 30, "dense", s)
    exactly(InvalidArgumentError, sim.budget_to_match, 0.5, 1 << 30, s)
    # A key with a lone surrogate is JSON text no parser accepts: a config error.
    exactly(ConfigError, ModelSpec.from_hf_config, {s: 1, "num_hidden_layers": 2})


def test_paths_that_cannot_be_encoded_are_invalid_arguments():
    # "\ud800" is no byte string under the filesystem encoding ("\udc80" is the byte 0x80).
    exactly(InvalidArgumentError, ModelSpec.from_hf_config, "\ud800.json")
    exactly(InvalidArgumentError, Trace.load, "\ud800.jsonl")
    exactly(InvalidArgumentError, KVCacheManager, SPEC, CAPACITY, disk_dir="\ud800", disk_bytes=1 << 20)
    for bad in (3, 1.5, [], object()):
        exactly(InvalidArgumentError, ModelSpec.from_hf_config, bad)
        exactly(InvalidArgumentError, Trace.load, bad)
        exactly(InvalidArgumentError, KVCacheManager, SPEC, CAPACITY, disk_dir=bad, disk_bytes=1 << 20)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_input_paths_that_are_fifos_directories_or_missing_are_refused_without_hanging(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    missing = tmp_path / "no" / "such.json"
    for p in (fifo, tmp_path, missing, str(fifo), str(tmp_path)):
        exactly(ConfigError, ModelSpec.from_hf_config, p)
        exactly(InvalidArgumentError, Trace.load, p)
    e = exactly(ConfigError, ModelSpec.from_hf_config, fifo)
    assert "FIFO" in str(e)


def test_indexes_out_of_every_range():
    m = small_manager()
    for w in (-1, 2**32, 2**63, 2**64, 1.5, NAN, "0", None):
        exactly(InvalidArgumentError, m.block_table, 1, w)
        exactly(InvalidArgumentError, m.num_pages, w)
        if w is not None:  # None: every group's table
            exactly(InvalidArgumentError, m.block_tables, [1], w)
    for w in (-1, 2**64, 1.5, NAN, "1"):
        exactly(InvalidArgumentError, m.block_table, w, 0)
        exactly(InvalidArgumentError, m.num_tokens, w)
        exactly(InvalidArgumentError, m.finish, w)
        exactly(InvalidArgumentError, m.load_handle, w)
    assert (-1 in m, 2**64 in m, "x" in m, 1 in m) == (False, False, False, True)
    r = m.step()
    # StepResult is a sequence of two: any other integer is the sequence protocol's IndexError.
    for i in (2, -3, 2**63, 2**64, -(2**70)):
        exactly(IndexError, r.__getitem__, i)
    for i in (1.5, "0", None, NAN):
        exactly(InvalidArgumentError, r.__getitem__, i)
    hits, extended = r
    assert len(hits) == 0 and len(extended) == 0
    healthy_manager(m)


def test_counts_near_2_64_mean_what_they_say_or_are_invalid():
    m = small_manager()
    m.finish(1)
    toks = np.arange(100, dtype=np.int64)
    # A chunk limit near 2**64 is the whole prompt (it used to overflow: a panic that poisoned
    # the manager in debug builds, a wrapped tiny limit in release ones).
    for rid, limit in ((2, 2**64 - 1), (3, 2**63), (4, 2**64 - 97)):
        assert m.admit(rid, toks, max_tokens=limit) == 96
        assert m.num_tokens(rid) == 100
        m.abort(rid)
    m.validate()
    assert m.admit(5, toks) == 96
    for n in (2**32, 2**63, 2**64 - 1):
        exactly(InvalidArgumentError, m.extend, 5, n)
        e = exactly(InvalidArgumentError, m.step, extend_ids=[5], extend_counts=[n])
        assert "expected integers" not in str(e), str(e)
    for bad in ([2**64], [-1], [1.5], ["1"]):
        exactly(InvalidArgumentError, m.step, finish=bad)
        exactly(InvalidArgumentError, m.step, extend_ids=[5], extend_counts=bad)
    assert m.num_tokens(5) == 100
    healthy_manager(m)


# ---------------------------------------------------------------------------------------------
# 7. Checked byte counts
# ---------------------------------------------------------------------------------------------


def test_kv_bytes_that_overflow_are_invalid_arguments_not_saturated():
    spec = ModelSpec.preset("mimo-v2.5-pro")
    for ctx in (2**63, 2**64 - 1, 2**50):
        exactly(InvalidArgumentError, spec.kv_bytes, ctx)
        exactly(InvalidArgumentError, spec.kv_bytes_dense, ctx)
    for ctx in (2**64, -1, 1.5, NAN, "1"):
        exactly(InvalidArgumentError, spec.kv_bytes, ctx)
        exactly(InvalidArgumentError, spec.kv_bytes_dense, ctx)
    for b in (0, -1, 2**32, 2**64, 1.5):
        exactly(InvalidArgumentError, spec.kv_bytes, 100, b)
        exactly(InvalidArgumentError, spec.block_bytes, b)
        exactly(InvalidArgumentError, spec.groups[0].block_bytes, b)
    most = (2**64 - 1) // spec.bytes_per_token_dense
    assert spec.kv_bytes_dense(most) == most * spec.bytes_per_token_dense


# ---------------------------------------------------------------------------------------------
# 9. Configs kvalloc cannot model
# ---------------------------------------------------------------------------------------------


def test_hybrid_linear_and_state_space_configs_are_config_errors():
    qwen3_next = {
        "model_type": "qwen3_next", "num_hidden_layers": 48, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    }
    e = exactly(ConfigError, ModelSpec.from_hf_config, qwen3_next)
    assert "linear_attention" in str(e)
    base = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    for extra, kind in [
        ({"layer_types": ["linear_attention", "full_attention"] * 2}, "linear_attention"),
        ({"layer_types": ["mamba", "attention"] * 2}, "mamba"),
        ({"attn_layer_indices": [1]}, "mamba"),
        ({"attn_layer_period": 2}, "mamba"),
        ({"layers_block_type": ["mamba", "attention", "hybrid", "attention"]}, "mamba"),
        ({"mamba_d_state": 16}, "mamba"),
        ({"ssm_state_size": 16}, "ssm"),
        ({"hybrid_override_pattern": "M*M*"}, "mamba"),
        ({"model_type": "mamba2"}, "mamba"),
    ]:
        e = exactly(ConfigError, ModelSpec.from_hf_config, {**base, **extra})
        assert f"'{kind}'" in str(e), (extra, str(e))


# ---------------------------------------------------------------------------------------------
# The manager and the rest of the API under garbage
# ---------------------------------------------------------------------------------------------


def test_manager_survives_garbage():
    m = small_manager()
    for w in WEIRD:
        for f, args in [
            (m.match_prefix, (w,)),
            (m.admit, (w, np.arange(10, dtype=np.int64))),
            (m.admit, (2, w)),
            (m.admit, (2, np.arange(10, dtype=np.int64), None, w)),
            (lambda x: m.admit(2, np.arange(10, dtype=np.int64), priority=x), (w,)),
            (lambda x: m.admit(2, np.arange(10, dtype=np.int64), pin_tokens=x, pin_seconds=1.0), (w,)),
            (lambda x: m.admit(2, np.arange(10, dtype=np.int64), pin_tokens=16, pin_seconds=x), (w,)),
            (lambda x: m.admit(2, np.arange(10, dtype=np.int64), cache=x), (w,)),
            (m.extend, (1, w)),
            (m.extend, (w, np.array([1], dtype=np.int64))),
            (m.finish, (w,)),
            (m.abort, (w,)),
            (m.block_table, (1, w)),
            (m.block_table, (w, 0)),
            (m.block_tables, (w,)),
            (m.block_tables, ([1], 0, w)),
            (m.block_tables, ([1], None, None, w)),
            (m.num_tokens, (w,)),
            (m.num_pages, (w,)),
            (m.load_handle, (w,)),
            (m.register_device, (w,)),
            (m.match_prefix, (np.arange(10, dtype=np.int64), w)),
            (m.match_prefix_tiers, (w,)),
            (m.residency, (w,)),
            (lambda x: m.step(finish=x), (w,)),
            (lambda x: m.step(extend_ids=x, extend_tokens=x), (w,)),
            (lambda x: m.step(extend_ids=[1], extend_counts=x), (w,)),
            (lambda x: m.step(admit=x), (w,)),
            (lambda x: m.step(admit=[(3, x)]), (w,)),
            (lambda x: m.step(admit_ids=x, admit_tokens=x, admit_lens=x), (w,)),
            (lambda x: m.step(fcfs=x), (w,)),
            (lambda x: m.step(admit=[(3, np.arange(10, dtype=np.int64))], admit_priority=x), (w,)),
            (lambda x: m.step(admit=[(3, np.arange(10, dtype=np.int64))], admit_pin_tokens=x,
                              admit_pin_seconds=x), (w,)),
            (lambda x: m.step(admit=[(3, np.arange(10, dtype=np.int64))], admit_cache=x), (w,)),
            (m.set_clock, (w,)),
            (m.advance_clock, (w,)),
            (m.waiting_for_kv, (w,)),
            (m.wait_for_kv, (1, w)),
            (m.record_prefill, (w, 1.0)),
            (m.record_prefill, (1, w)),
            (BlockHashes, (w, 16)),
            (BlockHashes, (np.arange(2, dtype=np.uint64), w)),
        ]:
            kvalloc_error_or_success(f, *args)
        m.validate()
    healthy_manager(m)


def test_constructors_survive_garbage():
    spec = ModelSpec.preset("gpt-oss-120b")
    for a, b in itertools.product(WEIRD, repeat=2):
        kvalloc_error_or_success(KVCacheManager, spec, a, b)
    keywords = ["host_bytes", "disk_bytes", "remote_bytes", "write_through", "watermark",
                "prefault_bytes", "checkpoint_interval", "slab_bytes", "policy", "eviction",
                "max_pinned_bytes", "speculative_checkpoints", "async_loads", "load_policy",
                "load_deadline_ms", "prefill_tokens_per_second"]
    for w in WEIRD:
        for kw in keywords:
            kvalloc_error_or_success(KVCacheManager, spec, 1 << 30, **{kw: w})
        kvalloc_error_or_success(KVCacheManager, w, 1 << 30)
        kvalloc_error_or_success(ModelSpec.from_hf_config, w)
        kvalloc_error_or_success(ModelSpec.from_hf_config, {"num_hidden_layers": w, "num_attention_heads": 2, "head_dim": 4})
        kvalloc_error_or_success(ModelSpec.preset, w)
        kvalloc_error_or_success(Simulator, spec, w)
        kvalloc_error_or_success(Simulator, w, Trace.generate("chat", 0, 1))
        kvalloc_error_or_success(Simulator, spec, Trace.generate("chat", 0, 1), w)
        kvalloc_error_or_success(Trace.load, w)
        kvalloc_error_or_success(Trace.generate, w)
        kvalloc_error_or_success(Trace.generate, "chat", w, 1)


def test_simulator_survives_garbage():
    sim = Simulator(SPEC, Trace.generate("chat", 0, 2), 16)
    for w in WEIRD:
        kvalloc_error_or_success(sim.run, w)
        for kw in ("host_bytes", "disk_bytes", "remote_bytes", "prefill_tokens_per_s",
                   "decode_tokens_per_s", "progress"):
            kvalloc_error_or_success(sim.run, 1 << 30, **{kw: w})
        kvalloc_error_or_success(sim.budget_to_match, w, 1 << 30)
        kvalloc_error_or_success(sim.budget_to_match, 0.5, w)
        for kw in ("rel_tol", "prefill_tokens_per_s", "decode_tokens_per_s", "progress"):
            kvalloc_error_or_success(sim.budget_to_match, 0.5, 1 << 30, **{kw: w})
    for bad in (0, -1.0, NAN, INF):
        exactly(InvalidArgumentError, sim.run, 1 << 30, prefill_tokens_per_s=bad)
        exactly(InvalidArgumentError, sim.budget_to_match, 0.5, 1 << 30, rel_tol=bad)
    exactly(InvalidArgumentError, sim.run, 1 << 30, progress=3)
    assert sim.run(1 << 30)["requests"] > 0


# ---------------------------------------------------------------------------------------------
# Random bad values over every public method (hypothesis)
# ---------------------------------------------------------------------------------------------

bad_values = st.one_of(
    st.sampled_from(WEIRD),
    st.integers(min_value=0, max_value=4),  # valid ids and indexes, so bad ones meet good ones
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd"]), max_size=4),
    st.lists(st.integers(min_value=-(2**65), max_value=2**65), max_size=3),
    st.builds(lambda xs, dt: np.array(xs).astype(dt, casting="unsafe"),
              st.lists(st.integers(min_value=-(2**62), max_value=2**62), max_size=4),
              st.sampled_from([np.int64, np.int32, np.uint64, np.float64, np.uint8, np.bool_])),
)
# Values that must not be acted on for real: a size that does fit would generate a large trace,
# a path could name a real file or make a directory, a URL could name a real host.
bad_sizes = st.one_of(st.sampled_from([2**32 - 1, 2**32, 2**63, 2**64, 10**9, -1, 0, 1.5, NAN, "9", None, *SURROGATES]))
bad_paths = st.sampled_from([3, 1.5, b"", "", "\ud800", "/nonexistent/dir/x", [], object(), None])


class World:
    """One of every kvalloc object, made once per hypothesis run."""

    def __init__(self) -> None:
        self.arena = SlabArena(1 << 20, [64, 192])
        self.held = self.arena.alloc(0, 4)
        self.m = small_manager()
        self.spec = SPEC
        self.group = SPEC.groups[0]
        self.trace = Trace.generate("chat", 0, 2)
        self.sim = Simulator(SPEC, self.trace, 16)
        self.load = self.m.load_handle(1)
        self.result = self.m.step()
        self.hashes = BlockHashes(np.arange(3, dtype=np.uint64), 40)

    def check(self) -> None:
        healthy_arena(self.arena)
        healthy_manager(self.m)


# Every public method, with how many arguments it takes (bad values fill them) or a strategy
# of its own. Key: "Class.method" as in _core.pyi.
FUZZ: dict[str, tuple[Callable[..., Any], Any]] = {
    "presets": (lambda w, *a: kvalloc.presets(*a), 0),
    "KVGroup.block_bytes": (lambda w, a: w.group.block_bytes(a), 1),
    "ModelSpec.from_hf_config": (lambda w, a, b: ModelSpec.from_hf_config(a, b), 2),
    "ModelSpec.preset": (lambda w, a: ModelSpec.preset(a), 1),
    "ModelSpec.from_groups": (lambda w, a, b, c: ModelSpec.from_groups(a, b, c), 3),
    "ModelSpec.presets": (lambda w: ModelSpec.presets(), 0),
    "ModelSpec.kv_bytes": (lambda w, a, b: w.spec.kv_bytes(a, b), 2),
    "ModelSpec.kv_bytes_dense": (lambda w, a: w.spec.kv_bytes_dense(a), 1),
    "ModelSpec.block_bytes": (lambda w, a: w.spec.block_bytes(a), 1),
    "SlabArena.__new__": (lambda w, a, b, c: SlabArena(a, b, c), 3),
    "SlabArena.alloc": (lambda w, a, b: w.arena.alloc(a, b), 2),
    "SlabArena.free": (lambda w, a: w.arena.free(a), 1),
    "SlabArena.offsets": (lambda w, a: w.arena.offsets(a), 1),
    "SlabArena.pages": (lambda w, a: w.arena.pages(a), 1),
    "SlabArena.available": (lambda w, a: w.arena.available(a), 1),
    "SlabArena.num_pages": (lambda w, a: w.arena.num_pages(a), 1),
    "SlabArena.stats": (lambda w: w.arena.stats(), 0),
    "SlabArena.validate": (lambda w: w.arena.validate(), 0),
    "BlockHashes.__new__": (lambda w, a, b: BlockHashes(a, b), 2),
    "BlockHashes.__len__": (lambda w: len(w.hashes), 0),
    "StepResult.__len__": (lambda w: len(w.result), 0),
    "StepResult.__getitem__": (lambda w, a: w.result[a], 1),
    "StepResult.__iter__": (lambda w: list(w.result), 0),
    "KVCacheManager.__new__": (lambda w, a, b, c, d: KVCacheManager(w.spec, a, b, c, d), 4),
    "KVCacheManager.match_prefix": (lambda w, a, b: w.m.match_prefix(a, b), 2),
    "KVCacheManager.admit": (lambda w, *a: w.m.admit(*a[:4], priority=a[4], pin_tokens=a[5], pin_seconds=a[6],
                                                     cache=a[7]), 8),
    "KVCacheManager.extend": (lambda w, a, b: w.m.extend(a, b), 2),
    "KVCacheManager.finish": (lambda w, a: w.m.finish(a), 1),
    "KVCacheManager.abort": (lambda w, a: w.m.abort(a), 1),
    "KVCacheManager.block_table": (lambda w, a, b: w.m.block_table(a, b), 2),
    "KVCacheManager.block_tables": (lambda w, a, b, c, d: w.m.block_tables(a, b, c, d), 4),
    "KVCacheManager.num_tokens": (lambda w, a: w.m.num_tokens(a), 1),
    "KVCacheManager.__contains__": (lambda w, a: a in w.m, 1),
    "KVCacheManager.step": (lambda w, *a: w.m.step(*a), 16),
    "KVCacheManager.stats": (lambda w: w.m.stats(), 0),
    "KVCacheManager.validate": (lambda w: w.m.validate(), 0),
    "KVCacheManager.register_device": (lambda w, a: w.m.register_device(a), 1),
    "KVCacheManager.load_handle": (lambda w, a: w.m.load_handle(a), 1),
    "KVCacheManager.wait_loads": (lambda w: w.m.wait_loads(), 0),
    "KVCacheManager.waiting_for_kv": (lambda w, a: w.m.waiting_for_kv(a), 1),
    "KVCacheManager.take_ready": (lambda w: w.m.take_ready(), 0),
    "KVCacheManager.wait_for_kv": (lambda w, a, b: w.m.wait_for_kv(a, b), 2),
    "KVCacheManager.record_prefill": (lambda w, a, b: w.m.record_prefill(a, b), 2),
    "KVCacheManager.flush": (lambda w: w.m.flush(), 0),
    "KVCacheManager.match_prefix_tiers": (lambda w, a, b: w.m.match_prefix_tiers(a, b), 2),
    "KVCacheManager.residency": (lambda w, a, b: w.m.residency(a, b), 2),
    "KVCacheManager.num_pages": (lambda w, a: w.m.num_pages(a), 1),
    "KVCacheManager.room_bytes": (lambda w: w.m.room_bytes(), 0),
    "KVCacheManager.take_events": (lambda w: w.m.take_events(), 0),
    "KVCacheManager.cached_blocks": (lambda w: w.m.cached_blocks(), 0),
    "KVCacheManager.resume_points": (lambda w: w.m.resume_points(), 0),
    "KVCacheManager.block_hashes": (lambda w, a, b: w.m.block_hashes(a, b), 2),
    "KVCacheManager.lower_blocks": (lambda w: w.m.lower_blocks(), 0),
    "KVCacheManager.reset_prefix_cache": (lambda w: w.m.reset_prefix_cache(), 0),
    # Only forward from the clock's reading: the shared manager's clock must stay usable.
    "KVCacheManager.set_clock": (lambda w, a: w.m.set_clock(a if not isinstance(a, (int, float)) else w.m.clock() + abs(a)),
                                 1),
    "KVCacheManager.advance_clock": (lambda w, a: w.m.advance_clock(a), 1),
    "KVCacheManager.clock": (lambda w: w.m.clock(), 0),
    "Trace.load": (lambda w, a, b, c: Trace.load(a, b, c), st.tuples(bad_paths, bad_values, bad_values)),
    "Trace.generate": (lambda w, a, b, c: Trace.generate(a, b, c),
                       st.tuples(st.one_of(st.sampled_from(["chat", "agent", "shared-prompt"]), bad_values), bad_values, bad_sizes)),
    "Trace.generators": (lambda w: Trace.generators(), 0),
    "Simulator.__new__": (lambda w, a, b: Simulator(w.spec, w.trace, a) if b is None else Simulator(a, b), 2),
    "Simulator.run": (lambda w, *a: w.sim.run(*a[:3], host_bytes=a[3], prefill_tokens_per_s=a[4], progress=a[5]), 6),
    "Simulator.budget_to_match": (lambda w, *a: w.sim.budget_to_match(*a[:4], rel_tol=a[4], decode_tokens_per_s=a[5]), 6),
    # A real router now and then, so that the other arguments' checks are reached too.
    "Simulator.run_fleet": (lambda w, *a: w.sim.run_fleet(a[0], a[1], instances=a[2], router=a[3],
                                                          write_through=a[4], overlap_weight=a[5]),
                            st.tuples(bad_values, bad_values, bad_values,
                                      st.one_of(bad_values, st.sampled_from(["prefix", "round-robin"])),
                                      bad_values, bad_values)),
    "LoadHandle.wait_layer": (lambda w, a, b: w.load.wait_layer(a, b), 2),
    "LoadHandle.wait_all": (lambda w, a: w.load.wait_all(a), 1),
}
# The manager's keyword-only constructor arguments, fuzzed one at a time (disk_dir and the
# remote settings with values that name nothing real).
MANAGER_KEYWORDS = {
    "host_bytes": bad_values, "disk_bytes": bad_values, "remote_bytes": bad_values,
    "write_through": bad_values, "watermark": bad_values, "prefault_bytes": bad_values,
    "disk_dir": bad_paths, "remote_url": st.sampled_from([3, b"x", "\udc80", "no scheme", None]),
    "remote_username": bad_values, "remote_password": bad_values, "remote_prefix": bad_values,
    "max_pinned_bytes": bad_values, "speculative_checkpoints": bad_values,
    "async_loads": bad_values, "load_policy": bad_values, "load_deadline_ms": bad_values,
    "prefill_tokens_per_second": bad_values,
}

_world: World | None = None


def world() -> World:
    global _world
    if _world is None:
        _world = World()
    return _world


@pytest.mark.parametrize("name", sorted(FUZZ))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_random_bad_values_raise_kvalloc_errors_and_leave_state_valid(name, data):
    f, arity = FUZZ[name]
    w = world()
    args = data.draw(arity if not isinstance(arity, int) else st.tuples(*[bad_values] * arity))
    try:
        f(w, *args)
    except KvAllocError:
        pass
    except IndexError:
        assert name == "StepResult.__getitem__"  # the sequence protocol's own error
    except BaseException as e:
        pytest.fail(f"{name}{args!r} raised {type(e).__name__}: {e}")
    w.check()


@pytest.mark.parametrize("keyword", sorted(MANAGER_KEYWORDS))
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_random_bad_manager_keywords(keyword, data):
    value = data.draw(MANAGER_KEYWORDS[keyword])
    # The remote user, password and prefix are read only with a URL (one that names no host).
    needs_url = keyword in ("remote_username", "remote_password", "remote_prefix")
    extra = {"remote_url": "no scheme"} if needs_url else {}
    try:
        m = KVCacheManager(SPEC, CAPACITY, **extra, **{keyword: value})
    except KvAllocError:
        return
    except BaseException as e:
        pytest.fail(f"{keyword}={value!r} raised {type(e).__name__}: {e}")
    healthy_manager(m)


# ---------------------------------------------------------------------------------------------
# Coverage of the public API
# ---------------------------------------------------------------------------------------------

PROTOCOL = {"__new__", "__len__", "__getitem__", "__iter__", "__contains__"}


def stub_api() -> tuple[set[str], set[str]]:
    """(methods, properties) of ``_core.pyi``: "Class.name", or "name" for functions."""
    tree = ast.parse(STUB.read_text())
    methods: set[str] = set()
    properties: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            methods.add(node.name)
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.FunctionDef):
                continue
            if item.name.startswith("_") and item.name not in PROTOCOL:
                continue
            decorators = {getattr(d, "id", None) for d in item.decorator_list}
            target = properties if "property" in decorators else methods
            target.add(f"{node.name}.{item.name}")
    return methods, properties


def runtime_api() -> set[str]:
    """Every public name on the classes and functions ``kvalloc.__all__`` exports."""
    names: set[str] = set()
    for export in kvalloc.__all__:
        obj = getattr(kvalloc, export)
        if isinstance(obj, type) and not issubclass(obj, BaseException):
            names |= {f"{export}.{n}" for n in dir(obj) if not n.startswith("_")}
            names |= {f"{export}.{n}" for n in PROTOCOL if n in vars(obj)}
        elif callable(obj) and not isinstance(obj, type):
            names.add(export)
    return names


def test_every_public_call_is_covered():
    methods, properties = stub_api()
    assert methods, "no methods found in the stub"
    # Properties take no arguments: test_properties_answer_after_garbage reads them all.
    uncovered = (methods | runtime_api()) - properties - set(FUZZ)
    assert not uncovered, f"public calls no bad-input test exercises: {sorted(uncovered)}"
    stale = set(FUZZ) - methods - runtime_api()
    assert not stale, f"FUZZ names calls that no longer exist: {sorted(stale)}"


def test_properties_answer_after_garbage():
    _, properties = stub_api()
    w = world()
    objects = {"KVGroup": w.group, "ModelSpec": w.spec, "SlabArena": w.arena, "BlockHashes": w.hashes,
               "StepResult": w.result, "KVCacheManager": w.m, "Trace": w.trace, "Simulator": w.sim,
               "LoadHandle": w.load}
    for name in sorted(properties):
        cls, attr = name.split(".")
        getattr(objects[cls], attr)  # must not raise
    w.check()


# ---------------------------------------------------------------------------------------------
# 8. The command line
# ---------------------------------------------------------------------------------------------


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs ``kvalloc ARGV`` in process: (exit code, stdout, stderr). An exception other than
    the exit escapes and fails the test (that is the traceback a user would see)."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo) if hasattr(os, "mkfifo") else fifo.write_text("")
    fifo_in = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo_in) if hasattr(os, "mkfifo") else fifo_in.write_text("")
    bad_trace = tmp_path / "bad.jsonl"
    bad_trace.write_text('{"timestamp": "soon", "input_length": 10, "output_length": 1, "hash_ids": [1]}\n')
    no_ids = tmp_path / "no_ids.jsonl"
    no_ids.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": []}\n')
    more_ids = tmp_path / "more_ids.jsonl"
    more_ids.write_text('{"timestamp": 0, "input_length": 2, "output_length": 1, "hash_ids": [1, 2, 3]}\n')
    bad_config = tmp_path / "config.json"
    bad_config.write_text('{"num_hidden_layers": 4, "full_attention_interval": 4, "num_attention_heads": 2, "head_dim": 4}')
    (tmp_path / "dir.png").mkdir()
    return {"fifo_out": str(fifo), "fifo_in": str(fifo_in), "dir": str(tmp_path), "dir_png": str(tmp_path / "dir.png"),
            "missing_parent": str(tmp_path / "no" / "such" / "x.png"), "missing": str(tmp_path / "no.jsonl"),
            "bad_trace": str(bad_trace), "config": str(bad_config), "no_suffix": str(tmp_path / "plot"),
            "no_ids": str(no_ids), "more_ids": str(more_ids)}


# Bad values for every option of every subcommand: option -> list of argv tails (with
# "{key}" naming a path from the `paths` fixture). Every one must exit 2 with a one-line
# error and no traceback, before any replay.
SIM = ["--generator", "chat", "--size", "2"]
CLI_BAD: dict[tuple[str, str], list[list[str]]] = {
    ("inspect", "--model"): [["--model", "nope"], ["--model", "\udc80"], ["--model"]],
    ("inspect", "--config"): [["--config", "{missing}"], ["--config", "{dir}"], ["--config", "{fifo_in}"],
                              ["--config", "{config}"], ["--config", "\udc80"]],
    ("inspect", "--dtype"): [["--dtype", "bf16"], ["--config", "{config}", "--dtype", "nope"]],
    ("inspect", "--block-tokens"): [["--block-tokens", v] for v in ("0", "-1", "4294967296", "1.5", "x", "\udc80")],
    ("inspect", "--json"): [["--json=1"]],
    ("presets", "an unknown option"): [["--json"], ["x"]],
    ("simulate", "--model"): [[*SIM, "--model", "nope"]],
    ("simulate", "--config"): [[*SIM, "--config", "{fifo_in}"], [*SIM, "--config", "{config}"]],
    ("simulate", "--dtype"): [[*SIM, "--dtype", "fp8"]],
    ("simulate", "--trace"): [["--trace", p] for p in ("{missing}", "{dir}", "{fifo_in}", "{bad_trace}", "\udc80")],
    ("simulate", "--generator"): [["--generator", "nope"], ["--generator", "\udc80"]],
    ("simulate", "--seed"): [["--generator", "chat", "--seed", v] for v in ("-1", str(2**64), "1.5", "x")],
    ("simulate", "--size"): [["--generator", "chat", "--size", v] for v in ("0", "-5", str(2**32), "10000000", "nan")],
    ("simulate", "--trace-block-tokens"): [["--trace-block-tokens", v] for v in ("0", "-1", str(2**32), "x")],
    ("simulate", "--trace-tokens-per-id"): [["--trace-tokens-per-id", "auto"], ["--trace-tokens-per-id"],
                                            ["--trace-tokens-per-id", "spread", "--trace-block-tokens", "16"],
                                            [*SIM, "--trace-tokens-per-id", "spread"],
                                            ["--trace", "{no_ids}", "--trace-tokens-per-id", "spread"],
                                            ["--trace", "{more_ids}", "--trace-tokens-per-id", "spread"]],
    ("simulate", "--block-tokens"): [[*SIM, "--block-tokens", v] for v in ("0", "-1", str(2**32), "x")],
    ("simulate", "--policy"): [[*SIM, "--policy", "nope"]],
    ("simulate", "--eviction"): [[*SIM, "--eviction", "nope"]],
    ("simulate", "--host"): [[*SIM, "--host", v] for v in ("-1GiB", "lots", "20000000PiB", "")],
    ("simulate", "--disk"): [[*SIM, "--disk", "-5"]],
    ("simulate", "--remote"): [[*SIM, "--remote", "1e9"]],
    ("simulate", "--prefill-tps"): [[*SIM, "--prefill-tps", v] for v in ("0", "-1", "nan", "inf", "x")],
    ("simulate", "--decode-tps"): [[*SIM, "--decode-tps", v] for v in ("0", "-.5", "nan")],
    **{("simulate", f"--{t}-gbps"): [[*SIM, f"--{t}-gbps", v] for v in ("0", "-1", "nan", "inf", "x")]
       for t in ("host", "disk", "remote")},
    **{("simulate", f"--{t}-latency-ms"): [[*SIM, f"--{t}-latency-ms", v] for v in ("-1", "nan", "inf", "x")]
       for t in ("disk", "remote")},
    ("simulate", "--load-policy"): [[*SIM, "--load-policy", v] for v in ("sometimes", "")],
    ("simulate", "--json"): [[*SIM, "--json=yes"]],
    ("simulate", "--plot"): [[*SIM, "--plot", p] for p in ("{missing_parent}", "{dir}", "{dir_png}", "{no_suffix}", "{fifo_out}")]
                            + [["--trace", "{bad_trace}", "--plot", "{missing_parent}"]],
    ("simulate", "--no-progress"): [[*SIM, "--no-progress=1"]],
    ("simulate", "--device"): [[*SIM, "--device", v] for v in ("-5GiB", "0", "lots", "20000000PiB", "-1")],
    ("simulate", "--no-capacity-search"): [[*SIM, "--no-capacity-search=x"]],
    ("simulate", "--oracle"): [[*SIM, "--oracle=1"]],
    ("simulate", "--tolerance"): [[*SIM, "--tolerance", v] for v in ("0", "-0.1", "nan", "inf", "2", "x")],
    ("sweep", "--budgets"): [[*SIM, "--budgets", v] for v in ("1MiB,,2MiB", "", ",", "-1GiB", "0", "x", "1GiB,-2GiB")],
    ("sweep", "--plot"): [[*SIM, "--plot", "{dir}"], [*SIM, "--plot", "{missing_parent}"]],
    ("sweep", "--oracle"): [[*SIM, "--oracle=1"], [*SIM, "--oracle", "--budgets", "0"]],
    ("simulate", "--instances"): [[*SIM, "--instances", v] for v in ("0", "-1", "4097", "1.5", "x", "")]
                                 + [[*SIM, "--instances", "2", "--oracle"],
                                    [*SIM, "--instances", "2", "--plot", "{dir}/fleet.png"]],
    ("simulate", "--router"): [[*SIM, "--instances", "2", "--router", v] for v in ("nope", "", "\udc80")]
                              + [[*SIM, "--router", "prefix"]],
    ("simulate", "--no-write-through"): [[*SIM, "--no-write-through"], [*SIM, "--instances", "2", "--no-write-through=1"]],
    ("simulate", "--overlap-weight"): [[*SIM, "--instances", "2", "--overlap-weight", v]
                                       for v in ("-1", "nan", "inf", "x")] + [[*SIM, "--overlap-weight", "2"]],
    ("sweep", "--instances"): [[*SIM, "--instances", v] for v in ("1,,2", "", ",", "0", "1,4097", "x", "2,-1")]
                              + [[*SIM, "--instances", "1,2", "--oracle"]],
    ("sweep", "--router"): [[*SIM, "--instances", "1,2", "--router", "nope"], [*SIM, "--router", "prefix"]],
}
# sweep shares simulate's source options (same code): a few of them again through sweep.
CLI_BAD[("sweep", "simulate's options")] = [[*SIM, "--host", "-1GiB"], [*SIM, "--tolerance", "0.1"]]


@pytest.mark.parametrize("key", sorted(CLI_BAD), ids=lambda k: f"{k[0]} {k[1]}")
def test_cli_refuses_bad_options_with_one_line_and_exit_2(key, paths, capsys):
    command = key[0]
    for tail in CLI_BAD[key]:
        argv = [command, *(t.format(**paths) for t in tail)]
        rc, out, err = cli(argv, capsys)
        assert rc == 2, (argv, rc, out, err)
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("kvalloc") and "error:" in last, err
        # Refused before any replay: nothing was reported.
        assert "hit rate" not in out and "policy" not in out, out


def test_plot_path_is_checked_before_the_trace_is_read(paths, capsys):
    rc, _, err = cli(["simulate", "--trace", paths["bad_trace"], "--plot", paths["missing_parent"]], capsys)
    assert rc == 2 and "--plot" in err and "does not exist" in err


def test_negative_sizes_are_named_not_mistaken_for_options(capsys):
    rc, _, err = cli(["simulate", *SIM, "--device", "-5GiB"], capsys)
    assert rc == 2 and "cannot be negative" in err and "expected one argument" not in err


def test_a_plot_is_written_where_asked_and_nowhere_else(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    rc, out, _ = cli(["sweep", *SIM, "--budgets", "1GiB,2GiB", "--plot", str(png)], capsys)
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def cli_options() -> set[tuple[str, str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        (name, opt)
        for name, p in sub.choices.items()
        for a in p._actions
        for opt in a.option_strings
        if opt.startswith("--") and opt != "--help"
    }


def test_every_cli_option_is_covered():
    covered = set(CLI_BAD)
    # Options shared by simulate and sweep are one function's: covered through simulate.
    shared = {("sweep", o) for (c, o) in cli_options() if c == "sweep" and ("simulate", o) in covered}
    uncovered = cli_options() - covered - shared
    assert not uncovered, f"CLI options no bad-value test exercises: {sorted(uncovered)}"


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "kvalloc.cli", "sweep", *SIM, "--budgets", "1MiB,,2MiB"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("kvalloc sweep: error:")


def test_a_bool_is_not_a_request_id_or_a_size() -> None:
    """`finish(True)` used to finish request 1 (a bool is an int to Python)."""
    m = KVCacheManager(small_spec(), 1 << 20, block_tokens=16)
    assert m.admit(1, np.arange(40, dtype=np.int64)) == 0
    for call in (lambda: m.finish(True), lambda: m.abort(True), lambda: m.extend(True, 1),
                 lambda: m.admit(False, np.arange(8, dtype=np.int64)), lambda: m.num_tokens(True),
                 lambda: SlabArena(True, 1024)):
        with pytest.raises(kvalloc.InvalidArgumentError, match="bool") as e:
            call()
        assert type(e.value) is kvalloc.InvalidArgumentError
    assert 1 in m and 0 not in m
    m.validate()
    m.finish(1)


def test_model_spec_from_groups_names_the_bad_field():
    """Each wrong group is an error naming ``groups[i].field``: a wrong type or an unknown or
    missing key is an InvalidArgumentError, an inconsistent geometry a ConfigError."""
    good = {"kind": "full", "layers": [0], "kv_heads": 1, "head_dim": 64, "dtype": "bf16"}
    cases = [
        (InvalidArgumentError, "groups", 5),
        (InvalidArgumentError, "groups[0]", [None]),
        (InvalidArgumentError, "groups[0].kinds", [{**good, "kinds": "full"}]),
        (InvalidArgumentError, "groups[0].kind", [{**good, "kind": "mamba"}]),
        (InvalidArgumentError, "groups[0].kv_heads", [{k: v for k, v in good.items() if k != "kv_heads"}]),
        (InvalidArgumentError, "groups[0].layers", [{**good, "layers": [-1]}]),
        (InvalidArgumentError, "groups[0].k_dim", [{k: v for k, v in good.items() if k != "head_dim"}]),
        (ConfigError, "groups[1].layers", [good, good]),
        (ConfigError, "groups[0].window", [{**good, "kind": "sliding"}]),
        (ConfigError, "groups", []),
    ]
    for cls, field, groups in cases:
        with pytest.raises(cls, match=re.escape(field)):
            ModelSpec.from_groups("x", groups)
    spec = ModelSpec.from_groups("x", [good, {**good, "kind": "sliding", "window": 8, "layers": [1]}])
    assert [g.kind for g in spec.groups] == ["full", "sliding"]
