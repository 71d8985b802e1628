"""Replaying the whole Mooncake conversation trace (12,031 requests, 144.8M prompt tokens)
through the manager, per policy, at `kvalloc simulate`'s defaults (mimo-v2.5-pro, 256 GiB,
128-token blocks, LRU). Target: at most 3 s per policy on the 2-core CI machine.

    pytest benches/test_bench_simulate.py --benchmark-only
"""

import pytest

import kvalloc
from kvalloc._simulate import default_trace_path

BUDGET = 256 << 30


@pytest.fixture(scope="module")
def sim() -> kvalloc.Simulator:
    spec = kvalloc.ModelSpec.preset("mimo-v2.5-pro")
    return kvalloc.Simulator(spec, kvalloc.Trace.load(default_trace_path()))


@pytest.mark.parametrize("policy", ["swa-aware", "dense"])
def test_replay_conversation_trace(benchmark, sim, policy):
    benchmark.group = "simulate: whole conversation trace, 256 GiB"
    report = benchmark.pedantic(sim.run, args=(BUDGET, policy, "lru"), rounds=3, iterations=1)
    assert report["completed"] + report["rejected"] == report["requests"] == 12_031
