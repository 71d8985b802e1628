"""`kvalloc simulate` / `sweep` and the Simulator they drive: the issue's checks on the whole
Mooncake conversation trace (against the release-built extension), trace errors, generators,
progress, and the --json schema."""

import json
from pathlib import Path

import pytest

import kvalloc
from kvalloc import InvalidArgumentError, Simulator, Trace
from kvalloc._simulate import default_trace_path, parse_size
from kvalloc.cli import main

MIMO = kvalloc.ModelSpec.preset("mimo-v2.5-pro")
# Every token the whole trace schedules (~150M) at dense bytes (358,400 per token), with slack.
UNBOUNDED = 64 << 40


@pytest.fixture(scope="module")
def conversation() -> Trace:
    return Trace.load(default_trace_path())


def independent_bound(path: Path) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of an unbounded cache at 512-token blocks, computed here."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        ids, n = r["hash_ids"], r["input_length"]
        k = 0
        while k < min(len(ids), (n - 1) // 512) and tuple(ids[: k + 1]) in seen:
            k += 1
        hit += 512 * k
        total += n
        seen.update(tuple(ids[: j + 1]) for j in range(len(ids)))
    return hit, total


def test_default_trace_is_packaged_with_its_attribution():
    path = default_trace_path()
    assert path.is_file()
    attribution = (path.parent / "ATTRIBUTION.md").read_text()
    assert "Apache" in attribution and "Mooncake" in attribution


def test_dense_unbounded_hits_the_bound_and_swa_aware_comes_close(conversation):
    hit, total = independent_bound(default_trace_path())
    # 37.4% in the data's README counts partial last blocks too; whole 512-token blocks: 37.34%.
    assert abs(hit / total - 0.374) < 0.001
    sim = Simulator(MIMO, conversation, block_tokens=512)
    dense = sim.run(UNBOUNDED, "dense", "lru")
    assert dense["hit_tokens"] == hit and dense["prompt_tokens"] == total
    assert dense["hit_rate"] == pytest.approx(dense["upper_bound_hit_rate"], abs=0)
    swa = sim.run(UNBOUNDED, "swa-aware", "lru")
    closeness = swa["hit_rate"] / dense["hit_rate"]
    print(f"swa-aware reaches {closeness:.1%} of the bound at 512-token blocks")
    assert 0.95 <= closeness <= 1.0
    assert swa["rejected"] == dense["rejected"] == 0


def test_swa_aware_close_to_the_bound_at_the_default_block_size(conversation):
    sim = Simulator(MIMO, conversation)
    assert sim.block_tokens == 128
    swa = sim.run(UNBOUNDED, "swa-aware")
    assert swa["hit_rate"] >= 0.95 * sim.upper_bound_hit_rate


def test_malformed_trace_lines_name_file_line_and_field(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}\n'
        '{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, "x", 2.5]}\n'
    )
    with pytest.raises(InvalidArgumentError, match=r"broken\.jsonl line 2, field `hash_ids\[2\]`"):
        Trace.load(bad)
    bad.write_text('{"timestamp": 0, "tokens": [1, 2], "output_tokens": -1}\n')
    with pytest.raises(InvalidArgumentError, match=r"line 1, field `output_tokens`"):
        Trace.load(bad)
    with pytest.raises(InvalidArgumentError, match="cannot read"):
        Trace.load(tmp_path / "missing.jsonl")


def test_cli_reports_trace_errors(tmp_path, capsys):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"timestamp": "soon", "input_length": 10, "output_length": 1, "hash_ids": [1]}\n')
    assert main(["simulate", "--trace", str(bad)]) == 2
    assert "t.jsonl line 1, field `timestamp`" in capsys.readouterr().err


def test_generic_jsonl_with_sessions(tmp_path):
    lines = [
        {"timestamp": 0, "session": "a", "tokens": list(range(300)), "output": list(range(900, 950))},
        {"timestamp": 0.1, "session": "a", "tokens": list(range(300)) + list(range(900, 950)) + [5] * 40,
         "output_tokens": 10},
        {"timestamp": 0.2, "block_hashes": ["p", "q"], "prompt_tokens": 30, "output_tokens": 4},
    ]
    p = tmp_path / "g.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    t = Trace.load(p, trace_block_tokens=16)
    r = Simulator(MIMO, t, block_tokens=16).run(1 << 40, "dense")
    # The second turn resumes after the first turn's output: 336 of its 390 tokens (21 blocks).
    assert r["hit_tokens"] == 336
    assert r["completed"] == 3


def test_generators_are_deterministic_by_seed():
    for kind in Trace.generators():
        a, b, c = (Trace.generate(kind, seed=s, size=5) for s in (1, 1, 2))
        assert (a.num_requests, a.prompt_tokens) == (b.num_requests, b.prompt_tokens)
        ra = Simulator(MIMO, a, 16).run(1 << 36, "swa-aware")
        rb = Simulator(MIMO, b, 16).run(1 << 36, "swa-aware")
        assert ra["hit_tokens"] == rb["hit_tokens"]
        assert (c.num_requests, c.prompt_tokens) != (a.num_requests, a.prompt_tokens)
    with pytest.raises(InvalidArgumentError, match="unknown generator"):
        Trace.generate("nope")


def test_progress_is_called_and_can_stop_a_replay():
    t = Trace.generate("chat", seed=3, size=40)
    sim = Simulator(MIMO, t, 16)
    seen = []
    sim.run(1 << 36, progress=lambda label, f: seen.append((label, f)))
    assert seen[0][1] == 0.0 and seen[-1][1] == 1.0 and seen[0][0] == "swa-aware"

    def stop(label, f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim.run(1 << 36, progress=stop)


def test_lower_tiers_serve_what_the_device_evicts():
    t = Trace.generate("chat", seed=1, size=40)
    sim = Simulator(MIMO, t, 16)
    small = sim.run(2 << 30)
    tiered = sim.run(2 << 30, host_bytes=1 << 40, disk_bytes=1 << 40)
    assert tiered["hit_rate"] >= small["hit_rate"]
    assert tiered["tier_bytes_written"]["host"] > 0
    assert set(tiered["tier_bytes_read"]) == {"host", "disk"}
    assert tiered["exposed_load_seconds"] >= 0.0


def test_bad_arguments():
    t = Trace.generate("chat", size=2)
    with pytest.raises(InvalidArgumentError, match="block_tokens"):
        Simulator(MIMO, Trace.load(default_trace_path()), block_tokens=48)
    sim = Simulator(MIMO, t, 16)
    with pytest.raises(InvalidArgumentError, match="host_bytes"):
        sim.run(1 << 30, host_bytes=-1)
    with pytest.raises(InvalidArgumentError, match="policy"):
        sim.run(1 << 30, "sometimes")
    with pytest.raises(InvalidArgumentError, match="device_bytes"):
        sim.run(0)
    with pytest.raises(InvalidArgumentError, match="spec"):
        Simulator("mimo", t)


def test_load_policy_declines_a_slow_disk_and_reports_it(tmp_path, capsys):
    """A 0.5 GB/s disk: deciding recomputes what loads slower, so fewer hits and a lower mean
    TTFT than always loading; the JSON and the text report say what was declined."""
    trace = head_trace(tmp_path, 3000)
    runs = {}
    for lp in ("always", "decide"):
        argv = ["simulate", "--trace", str(trace), "--device", "64GiB", "--host", "512GiB",
                "--disk", "4TiB", "--disk-gbps", "0.5", "--disk-latency-ms", "0.1",
                "--policy", "swa-aware", "--load-policy", lp, "--no-capacity-search"]
        assert main([*argv, "--json"]) == 0
        runs[lp] = json.loads(capsys.readouterr().out)["runs"][0]
        assert main(argv) == 0
        assert f"loads ({lp})" in capsys.readouterr().out
    always, decide = runs["always"], runs["decide"]
    assert always["load_policy"] == "always" and always["declined_tokens"] == 0
    assert decide["declined_tokens"] > 0
    assert decide["hit_rate"] < always["hit_rate"]
    assert decide["ttft_mean_seconds"] < always["ttft_mean_seconds"]
    assert decide["tier_hit_tokens"]["disk"] < always["tier_hit_tokens"]["disk"]
    assert always["load_queue_seconds"] > 0


def test_bad_load_settings_are_invalid_arguments():
    sim = Simulator(MIMO, Trace.generate("chat", size=2), 16)
    for kw in ({"host_gbps": 0}, {"disk_gbps": -1.0}, {"remote_gbps": float("nan")},
               {"disk_latency_ms": -1}, {"remote_latency_ms": float("inf")},
               {"load_policy": "sometimes"}, {"disk_gbps": "fast"}):
        with pytest.raises(InvalidArgumentError, match=next(iter(kw))):
            sim.run(1 << 30, disk_bytes=1 << 40, **kw)


def test_parse_size():
    assert parse_size("80GiB") == 80 << 30
    assert parse_size("1PiB") == 1 << 50
    assert parse_size("1.5TiB") == 3 << 39
    assert parse_size("100GB") == 100 * 10**9
    with pytest.raises(Exception, match="invalid size"):
        parse_size("lots")


def head_trace(tmp_path: Path, n: int) -> Path:
    p = tmp_path / "head.jsonl"
    p.write_text("".join(default_trace_path().read_text().splitlines(keepends=True)[:n]))
    return p


def test_simulate_json_schema(tmp_path, capsys):
    trace = head_trace(tmp_path, 400)
    assert main(["simulate", "--trace", str(trace), "--device", "16GiB", "--json", "--tolerance", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["runs"]] == ["swa-aware", "dense"]
    for r in out["runs"]:
        for key in ("policy", "hit_rate", "upper_bound_hit_rate", "prefill_tokens_saved",
                    "cached_tokens_per_gib", "tier_bytes_written", "tier_bytes_read",
                    "exposed_load_seconds", "wall_seconds", "ttft_mean_seconds", "ttft_change"):
            assert key in r, key
        assert isinstance(r["tier_bytes_written"], dict) and isinstance(r["tier_bytes_read"], dict)
        assert 0 <= r["hit_rate"] <= r["upper_bound_hit_rate"] <= 1
    swa, dense = out["runs"]
    assert swa["hit_rate"] > dense["hit_rate"]
    assert out["capacity_multiplier"] == pytest.approx(out["dense_budget_to_match_bytes"] / (16 << 30))
    assert out["capacity_multiplier"] > 1
    assert out["model"] == "mimo-v2.5-pro" and out["block_tokens"] == 128


def test_simulate_single_policy_has_no_multiplier_and_prints_a_table(tmp_path, capsys):
    trace = head_trace(tmp_path, 200)
    assert main(["simulate", "--trace", str(trace), "--policy", "swa-aware", "--device", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "swa-aware" in out and "upper bound" in out and "capacity:" not in out


def test_sweep_table_json_and_plot(tmp_path, capsys):
    trace = head_trace(tmp_path, 200)
    args = ["sweep", "--trace", str(trace), "--budgets", "4GiB,16GiB"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["device_bytes"]) for r in out["runs"]] == [
        ("swa-aware", 4 << 30), ("swa-aware", 16 << 30), ("dense", 4 << 30), ("dense", 16 << 30)]
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    assert main([*args, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_oracle_row_is_a_reference_no_policy_beats(tmp_path, capsys):
    trace = head_trace(tmp_path, 2000)
    args = ["simulate", "--trace", str(trace), "--device", "256GiB", "--block-tokens", "512",
            "--no-capacity-search", "--oracle"]
    for eviction in ("lru", "value"):
        assert main([*args, "--eviction", eviction, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [o["policy"] for o in out["oracle"]] == [r["policy"] for r in out["runs"]]
        for r, o in zip(out["runs"], out["oracle"]):
            assert o["eviction"] == "oracle"
            assert r["hit_rate"] <= o["hit_rate"] <= o["upper_bound_hit_rate"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "oracle" in text and "reaches" in text
    # A manager has no future to read: the oracle is the simulator's alone.
    with pytest.raises(InvalidArgumentError, match="oracle"):
        kvalloc.KVCacheManager(MIMO, 1 << 30, eviction="oracle")


def test_sweep_oracle_per_budget_in_table_json_and_plot(tmp_path, capsys):
    # A generated workload: the oracle is the simulator's, whatever the trace's source.
    args = ["sweep", "--generator", "chat", "--size", "30", "--budgets", "2GiB,8GiB", "--oracle",
            "--policy", "dense"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(o["policy"], o["device_bytes"], o["eviction"]) for o in out["oracle"]] == [
        ("dense", 2 << 30, "oracle"), ("dense", 8 << 30, "oracle")]
    for r, o in zip(out["runs"], out["oracle"]):
        assert r["eviction"] == "value"
        assert r["oracle_hit_rate"] == o["hit_rate"] > 0
        assert r["oracle_share"] == pytest.approx(r["hit_rate"] / o["hit_rate"])
        assert r["hit_rate"] <= o["hit_rate"] <= o["upper_bound_hit_rate"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "oracle" in text and "share" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("2 GiB"))
    r = out["runs"][0]
    assert f"{r['hit_rate']:.2%}" in row and f"{r['oracle_hit_rate']:.2%}" in row
    assert f"{r['oracle_share']:.1%}" in row
    # Without --oracle: no second replay, no oracle anywhere.
    assert main(["sweep", "--generator", "chat", "--size", "30", "--budgets", "2GiB", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "oracle" not in plain and "oracle_share" not in plain["runs"][0]
    pytest.importorskip("matplotlib")
    # The oracle is its own dashed line per policy (matplotlib's SVG keeps each text as a comment).
    svg = tmp_path / "sweep.svg"
    assert main([*args, "--policy", "swa-aware", "--plot", str(svg)]) == 0
    drawing = svg.read_text()
    assert "dense, oracle eviction" in drawing and "swa-aware, oracle eviction" in drawing
    assert main(["sweep", "--generator", "chat", "--size", "30", "--budgets", "2GiB,8GiB",
                 "--plot", str(svg)]) == 0
    assert "oracle eviction" not in svg.read_text()


def varying_trace(path: Path) -> list[tuple[int, list[int]]]:
    """A Mooncake-style trace whose tokens per hash id vary from 6 to 101 within the file: 8
    conversations of 4 turns, each turn the previous turn's ids plus new ones. Returns each
    line's (input_length, hash_ids)."""
    import random

    rng = random.Random(5)
    lines, state = [], {s: ([], 0) for s in range(8)}
    for turn in range(4):
        for s in range(8):
            ids, n = state[s]
            new = rng.randint(1, 10)
            per = 6 if (turn, s) == (0, 0) else 101 if (turn, s) == (0, 1) else rng.randint(6, 101)
            ids = ids + [s * 1000 + len(ids) + k for k in range(new)]
            n += new * per
            state[s] = (ids, n)
            lines.append((n, ids))
    path.write_text("".join(
        json.dumps({"timestamp": 10_000 * i, "input_length": n, "output_length": 2, "hash_ids": ids}) + "\n"
        for i, (n, ids) in enumerate(lines)))
    return lines


def test_spread_trace_keeps_totals_and_prefix_sharing(tmp_path, capsys):
    path = tmp_path / "varying.jsonl"
    lines = varying_trace(path)
    ratios = [n / len(ids) for n, ids in lines]
    assert min(ratios) == 6 and max(ratios) == 101
    # Exact ids of 512 tokens cannot describe it; the error says what to do.
    with pytest.raises(InvalidArgumentError, match="--trace-tokens-per-id spread"):
        Trace.load(path)
    t = Trace.load(path, tokens_per_id="spread")
    assert t.prompt_tokens == sum(n for n, _ in lines)
    assert t.spread == {"requests": 32, "min_tokens_per_id": 6.0, "max_tokens_per_id": 101.0,
                        "requests_disagreeing": t.spread["requests_disagreeing"],
                        "requests_cut": 0, "requests_padded": 0}
    # Each turn repeats its previous turn's ids: an unbounded cache hits the previous prompt's
    # whole blocks, whatever the tokens per id.
    for b in (16, 64):
        prev: dict[int, int] = {}
        expected = 0
        for n, ids in lines:
            s = ids[0] // 1000
            expected += prev.get(s, 0) // b * b
            prev[s] = n
        r = Simulator(MIMO, t, block_tokens=b).run(1 << 40, "dense")
        assert r["hit_tokens"] == r["upper_bound_hit_tokens"] == expected
    assert main(["simulate", "--trace", str(path), "--trace-tokens-per-id", "spread", "--device", "1TiB",
                 "--no-capacity-search", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace_tokens_per_id"] == "spread" and out["spread"]["requests"] == 32
    assert main(["simulate", "--trace", str(path), "--trace-tokens-per-id", "spread", "--device", "1TiB",
                 "--no-capacity-search"]) == 0
    assert "hash ids spread over 6.0 to 101.0 tokens per id" in capsys.readouterr().out


def test_spread_bad_arguments_and_lines_are_invalid_arguments(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n')
    for bad in ("auto", "", 5):
        with pytest.raises(InvalidArgumentError, match="tokens_per_id"):
            Trace.load(path, tokens_per_id=bad)
    with pytest.raises(InvalidArgumentError, match="exact traces"):
        Trace.load(path, trace_block_tokens=16, tokens_per_id="spread")
    for fields, what in (('"input_length": 10, "hash_ids": []', "`hash_ids`: no ids"),
                         ('"input_length": 2, "hash_ids": [1, 2, 3]', "`hash_ids`: .*at least one token"),
                         ('"input_length": 0, "hash_ids": [1]', "`input_length`: must be positive")):
        path.write_text('{"timestamp": 0, "output_length": 1, ' + fields + '}\n')
        with pytest.raises(InvalidArgumentError, match=rf"t\.jsonl line 1, field {what}"):
            Trace.load(path, tokens_per_id="spread")


def test_exact_mode_is_the_default_and_unchanged_on_the_bundled_trace(conversation):
    exact = Trace.load(default_trace_path(), tokens_per_id="exact")
    assert conversation.spread is None and exact.spread is None
    a = Simulator(MIMO, conversation, 512).run(256 << 30, "swa-aware")
    b = Simulator(MIMO, exact, 512).run(256 << 30, "swa-aware")
    keys = ("hit_tokens", "prompt_tokens", "upper_bound_hit_tokens", "cached_tokens", "evicted_leaves")
    assert [a[k] for k in keys] == [b[k] for k in keys]
