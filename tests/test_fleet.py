"""The fleet simulator from Python: `Simulator.run_fleet` and `kvalloc simulate --instances` /
`kvalloc sweep --instances` (tests/sim_fleet.rs checks the core). A prefix of the Mooncake
conversation trace keeps them quick."""

import json
from pathlib import Path

import pytest

import kvalloc
from kvalloc import InvalidArgumentError, Simulator, Trace
from kvalloc._simulate import ROUTERS, default_trace_path
from kvalloc.cli import main

MIMO = kvalloc.ModelSpec.preset("mimo-v2.5-pro")


def head_trace(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "head.jsonl"
    p.write_text("".join(default_trace_path().read_text().splitlines(keepends=True)[:n]))
    return p


@pytest.fixture(scope="module")
def head(tmp_path_factory) -> Trace:
    return Trace.load(head_trace(tmp_path_factory.mktemp("fleet"), 600))


def test_one_instance_with_any_router_is_the_plain_replay(head):
    sim = Simulator(MIMO, head)
    plain = sim.run(12 << 30, "swa-aware", "value", host_bytes=48 << 30)
    assert plain["evicted_leaves"] > 0
    for router in ROUTERS:
        r = sim.run_fleet(12 << 30, "swa-aware", "value", instances=1, router=router, host_bytes=48 << 30)
        assert r["hit_tokens"] == plain["hit_tokens"], router
        assert (r["ttft_mean_seconds"], r["ttft_p99_seconds"]) == (plain["ttft_mean_seconds"], plain["ttft_p99_seconds"])
        assert r["per_instance"] == [{"requests": 600, "prompt_tokens": plain["prompt_tokens"],
                                      "hit_tokens": plain["hit_tokens"]}]


def test_round_robin_spreads_evenly(head):
    r = Simulator(MIMO, head).run_fleet(16 << 30, instances=6, router="round-robin")
    assert [x["requests"] for x in r["per_instance"]] == [100] * 6
    assert r["request_imbalance"] == 1.0 and r["estimate"] is None and r["shared_remote"] is None


def test_window_safe_estimates_never_exceed_the_hit_and_naive_ones_do(head):
    sim = Simulator(MIMO, head)
    safe = sim.run_fleet(32 << 30, "swa-aware", "value", instances=8, router="prefix")
    naive = sim.run_fleet(32 << 30, "swa-aware", "value", instances=8, router="prefix-naive")
    s, n = safe["estimate"], naive["estimate"]
    assert s["requests"] == n["requests"] == 600
    assert s["over"] == 0 and s["error_percentiles"]["max"] <= 0, s
    assert n["over"] > 0 and n["error_percentiles"]["max"] > 0 and n["over_share"] > 0, n
    assert s["over"] + s["exact"] + s["under"] == 600


def test_a_shared_remote_reports_its_traffic(head):
    r = Simulator(MIMO, head).run_fleet(8 << 30, instances=4, router="round-robin", remote_bytes=1 << 40)
    store = r["shared_remote"]
    assert store["bytes_written"] == r["tier_bytes_written"]["remote"] > 0
    assert store["bytes_read"] == r["tier_bytes_read"]["remote"] > 0
    off = Simulator(MIMO, head).run_fleet(8 << 30, instances=4, router="round-robin", remote_bytes=1 << 40,
                                          write_through=False)
    assert off["tier_bytes_written"]["remote"] < store["bytes_written"]


def test_bad_fleets_are_invalid_arguments(head):
    sim = Simulator(MIMO, head)
    with pytest.raises(InvalidArgumentError, match="instances"):
        sim.run_fleet(1 << 30, instances=0, router="round-robin")
    with pytest.raises(InvalidArgumentError, match="instances"):
        sim.run_fleet(1 << 30, instances=-2, router="round-robin")
    with pytest.raises(InvalidArgumentError, match="prefix-naive"):
        sim.run_fleet(1 << 30, instances=2, router="nearest")
    with pytest.raises(InvalidArgumentError, match="overlap_weight"):
        sim.run_fleet(1 << 30, instances=2, router="prefix", overlap_weight=float("nan"))
    with pytest.raises(InvalidArgumentError, match="oracle"):
        sim.run_fleet(1 << 30, "swa-aware", "oracle", instances=2, router="prefix")
    with pytest.raises(TypeError):
        sim.run_fleet(1 << 30, instances=2)  # type: ignore[call-arg]


def test_simulate_instances_table_and_json(tmp_path, capsys):
    trace = head_trace(tmp_path, 200)
    args = ["simulate", "--trace", str(trace), "--device", "16GiB", "--instances", "4"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["router"], r["instances"], r["policy"]) for r in out["runs"]] == [
        (x, 4, "swa-aware") for x in ROUTERS]
    for r in out["runs"]:
        for key in ("hit_rate", "request_imbalance", "token_imbalance", "ttft_mean_seconds",
                    "ttft_p50_seconds", "ttft_p99_seconds", "tier_bytes_read", "estimate", "per_instance"):
            assert key in r, key
        assert (r["estimate"] is not None) == (r["router"] in ("prefix", "prefix-naive"))
    assert main([*args, "--router", "prefix", "--router", "prefix-naive"]) == 0
    text = capsys.readouterr().out
    assert "prefix-naive" in text and "over-est" in text and "round-robin" not in text


def test_sweep_instances_table_json_and_plot(tmp_path, capsys):
    trace = head_trace(tmp_path, 200)
    args = ["sweep", "--trace", str(trace), "--budgets", "16GiB", "--instances", "1,2,4",
            "--router", "round-robin", "--router", "prefix"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["instances"], r["router"]) for r in out["runs"]] == [
        (n, x) for n in (1, 2, 4) for x in ("round-robin", "prefix")]
    one = [r for r in out["runs"] if r["instances"] == 1]
    assert one[0]["hit_tokens"] == one[1]["hit_tokens"]
    pytest.importorskip("matplotlib")
    png = tmp_path / "fleet.png"
    assert main([*args, "--plot", str(png)]) == 0
    assert "fleet hit rate by instance count" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
