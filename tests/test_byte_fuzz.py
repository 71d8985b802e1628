"""No wrong byte: random operation sequences through the byte-checking engine, which checks every
KV byte attention reads against what the request that computed it wrote (kvalloc.reference.
byte_check). A fixed set of seeds runs here; `scripts/fuzz_bytes.sh SECONDS` runs new seeds for
as long as asked. Every seed that ever failed stays in REGRESSION_SEEDS."""

from __future__ import annotations

import numpy as np
import pytest

import kvalloc
from kvalloc.reference import byte_fuzz
from kvalloc.reference.byte_check import ByteCheckEngine, WrongBytesError

# (seed, generation) of every case that failed before a fix (300 operations each, with a remote
# server): 0, 1, 7, 12: a decode of several tokens released the window its step reads (missing
# KV); 18, 43: a preempted chunk published a partly computed page (wrong KV).
REGRESSION_SEEDS = [(0, 1), (1, 1), (7, 1), (12, 1), (18, 1), (43, 1)]


def test_issue_21_reproducer_is_served_the_right_bytes() -> None:
    """The issue's sequence, checking bytes: request 20's hit used to include, as its sliding
    group's block 1, the page request 10 wrote one token of before it was preempted."""
    spec = kvalloc.ModelSpec.from_hf_config(byte_fuzz.CONFIG)
    for preempt in ("finish", "abort"):
        m = kvalloc.KVCacheManager(spec, 96 << 10, block_tokens=16)
        e = ByteCheckEngine(m)
        shared = list(range(1000, 1048))
        assert e.admit(5, shared + list(range(5000, 5057)), max_tokens=33) == 0
        assert e.admit(10, shared + list(range(6000, 6023)), max_tokens=16) == 0
        assert e.extend(10, 1)
        getattr(e, preempt)(10)
        assert e.extend(5, 16)
        e.finish(5)
        assert e.admit(20, shared + list(range(7000, 7017))) == 48
        m.validate()
        assert e.checked_slots > 0


def test_a_paged_engine_needs_every_block_of_its_chunk() -> None:
    """A paged-attention engine (vLLM's kernels) reads a prefill chunk's own keys from the
    cache: with ``prefill_reads_cache`` every block of a chunk has a page and every key checks
    out, through chunks, decode and a hit; without it the checker finds the chunk's early
    sliding blocks missing (inside vLLM that changed every output of a long prompt)."""
    spec = kvalloc.ModelSpec.from_hf_config(byte_fuzz.CONFIG)
    prompt = list(range(2000, 2100))
    for reads_cache in (True, False):
        m = kvalloc.KVCacheManager(spec, 256 << 10, block_tokens=16, prefill_reads_cache=reads_cache)
        e = ByteCheckEngine(m, paged=True)
        if not reads_cache:
            with pytest.raises(WrongBytesError, match="no page to write"):
                e.admit(1, prompt)
            continue
        assert e.admit(1, prompt, max_tokens=40) == 0
        assert e.extend(1, 60)
        assert e.extend(1, 3, [7, 8, 9])
        e.finish(1)
        assert e.admit(2, prompt + [5]) == 96
        m.validate()
        assert e.checked_slots > 0


def test_the_checker_sees_a_corrupted_page() -> None:
    """One flipped byte in a cached page fails the next hit on it (the check can fail)."""
    spec = kvalloc.ModelSpec.from_hf_config(byte_fuzz.CONFIG)
    m = kvalloc.KVCacheManager(spec, 1 << 20, block_tokens=16)
    e = ByteCheckEngine(m)
    prompt = list(range(64))
    e.admit(1, prompt)
    page = int(m.block_table(1, 0)[1])
    e.finish(1)
    bb = spec.block_bytes(16)[0]
    e.buffer[page * bb + 5] ^= 0x40
    with pytest.raises(WrongBytesError, match="group 0 block 1"):
        e.admit(2, prompt + [99])


@pytest.mark.parametrize("seed", range(100, 130))
def test_random_operations_serve_only_right_bytes(seed: int) -> None:
    f = byte_fuzz.run_case(seed, 300)
    assert f.ops_done == 300 and f.checked_slots > 0


def test_random_operations_with_every_tier(remote_server) -> None:
    """10 seeds with the lower tiers on a real server; between them they promote hits from
    host memory, disk and the remote store (so the bytes served from each are checked)."""
    promoted = {"host": 0, "disk": 0, "remote": 0}
    for seed in range(200, 210):
        f = byte_fuzz.run_case(seed, 300, remote_server.url)
        assert f.ops_done == 300
        for tier, n in f.promoted.items():
            promoted[tier] += n
    assert all(v > 0 for v in promoted.values()), promoted


@pytest.mark.parametrize(("seed", "generation"), REGRESSION_SEEDS)
def test_regression_seeds(remote_server, seed: int, generation: int) -> None:
    byte_fuzz.run_case(seed, 300, remote_server.url, generation)


def test_the_long_mode_runs_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert byte_fuzz.main(["--seed", "5", "--ops", "60"]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


def test_the_long_mode_script_starts_its_own_server() -> None:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [str(root / "scripts" / "fuzz_bytes.sh"), "1", "7"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert ", 0 failed" in out.stdout
    bad = subprocess.run([str(root / "scripts" / "fuzz_bytes.sh"), "ten"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
