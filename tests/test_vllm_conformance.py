"""vLLM's own scheduler tests with kvalloc as the KV-cache manager (``benches/vllm/conformance.sh``),
and the plug-in's reading of the ``KVCacheConfig`` a directly built scheduler gets.

Needs ``.venv-vllm`` (``benches/vllm/setup_venv.sh``: vLLM for CPU, about 4 minutes and 6 GB);
skipped without it. The conformance test runs only the kvalloc half of the script (224 of vLLM's
tests; about 4.5 minutes on two busy cores), and fetches vLLM's sdist (44 MB, for its ``tests/``)
from PyPI the first time.
"""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from conftest import ROOT, VLLM_PYTHON, needs_vllm

CONFORMANCE = ROOT / "benches" / "vllm" / "conformance.sh"

pytestmark = needs_vllm


def run_in_vllm(code: str) -> str:
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_geometry_of_a_config_no_engine_core_resolved() -> None:
    """A scheduler built without vLLM's engine core (as vLLM's tests build it) gets a config
    whose ``hash_block_size`` is None (the block size) and whose layers are named without an
    index; both were refused as unsupported."""
    out = run_in_vllm(
        """
        import torch
        from vllm.v1.kv_cache_interface import (
            FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec)
        from kvalloc.vllm import geometry_from_kv_cache_config

        full = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
        one = KVCacheConfig(num_blocks=10, kv_cache_tensors=[],
                            kv_cache_groups=[KVCacheGroupSpec(["layer"], full)])
        assert one.hash_block_size is None
        g = geometry_from_kv_cache_config(one)
        assert (g.block_size, g.num_blocks, len(g.spec.groups)) == (16, 10, 1), g

        swa = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=8,
                                dtype=torch.float32, sliding_window=32)
        two = KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["attn"], swa), KVCacheGroupSpec(["other_attn"], full)])
        g = geometry_from_kv_cache_config(two)
        layers = [tuple(x.layers) for x in g.spec.groups]
        assert sorted(layers) == [(0,), (1,)], layers
        # vLLM's group 0 (sliding) is kvalloc's sliding group, whatever kvalloc's order.
        assert g.spec.groups[g.kvalloc_group[0]].window == 32
        assert g.spec.groups[g.kvalloc_group[1]].window is None

        named = KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec(["model.layers.0.attn", "model.layers.2.attn"], swa),
            KVCacheGroupSpec(["model.layers.1.attn", "model.layers.3.attn"], full)])
        g = geometry_from_kv_cache_config(named)
        print(sorted(tuple(x.layers) for x in g.spec.groups))
        """
    )
    # Indices read from the names are kept.
    assert out.strip() == "[(0, 2), (1, 3)]"


def test_vllm_priority_maps_to_retention_priority() -> None:
    """vLLM's request priority (lower is more important) reaches kvalloc's retention priority
    (higher is kept longer), negated and clamped."""
    out = run_in_vllm(
        """
        from types import SimpleNamespace as R
        import kvalloc
        from kvalloc.vllm import retention_priority
        m = kvalloc.MAX_PRIORITY
        got = [retention_priority(R(priority=p)) for p in (0, -3, 5, -1000, 1000)]
        assert got == [0, 3, -5, m, -m], got
        assert retention_priority(R()) == 0
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_vllm_scheduler_tests_pass_with_kvalloc() -> None:
    """Every test of vLLM 0.32.0's ``test_scheduler.py`` passes with ``KvallocScheduler``
    (each also checked by ``validate()`` and for blocks left held), or is in
    ``benches/vllm/conformance_skips.txt`` with its reason."""
    proc = subprocess.run(
        ["bash", str(CONFORMANCE), "kvalloc"], capture_output=True, text=True, timeout=1800, cwd=ROOT
    )
    summary = proc.stdout + proc.stderr
    assert proc.returncode == 0, summary[-6000:]
    assert "conformance: ok" in summary, summary[-6000:]
