"""The side-by-side bench (`benches/peers/`) runs from a clone (its default trace is the one the
repository ships), every contender's run terminates (a request that never fits is refused and
counted), rounds are reported as medians, and, where `.venv-peers` exists, SGLang's driver makes
its scheduler's post-prefill checkpoint and every contender runs on one torch thread."""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benches" / "peers"
COMPARE = PEERS / "compare.py"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


def compare(python: Path | str, *args: str) -> str:
    """`compare.py ARGS` run from outside the repository; its stdout."""
    done = subprocess.run(
        [str(python), "-W", "ignore", str(COMPARE), *args],
        cwd=ROOT.parent, capture_output=True, text=True, timeout=300,
        env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def rows(out: str) -> dict[str, list[str]]:
    """The result table's rows by manager: the cells after the name."""
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 11 and cells[0] in ("kvalloc", "vLLM", "SGLang"):
            table[cells[0]] = cells[1:]
    return table


# Column indexes into a row's cells (after the manager's name).
HITS, PREEMPTIONS, REFUSED, BLOCKS_BACK = 3, 5, 6, 7


def test_default_trace_is_the_repositorys(monkeypatch):
    # compare.py pins the thread pools' variables as it loads: keep them to this test.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.syspath_prepend(str(PEERS))
    mod = importlib.import_module("compare")
    assert mod.TRACE.is_file()
    assert mod.TRACE.is_relative_to(ROOT), mod.TRACE


def test_missing_trace_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, str(COMPARE), "--workload", "mooncake", "--managers", "kvalloc",
         "--trace", str(tmp_path / "none.jsonl")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "--trace: no trace at" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_kvalloc_refuses_what_never_fits_and_goes_on():
    """The README's Mooncake example at 2 GiB: rows 11, 95, 97, 119, 123, 178, 179 and 189
    (70k-121k tokens) cannot fit with nothing running; the run refuses them, serves the other
    192 and returns every block (it used to stop at row 11 with `Stalled`)."""
    out = compare(sys.executable, "--workload", "mooncake", "--requests", "200", "--memory-gib", "2",
                  "--managers", "kvalloc", "--rounds", "3")
    assert "3 interleaved rounds" in out, out
    assert re.search(r"kvalloc: median [\d.]+ s in the manager \(runs in order: [\d.]+, [\d.]+, [\d.]+;", out), out
    assert "refused 8 requests" in out and "11 (87,169), 95 (82,276), 97 (120,633)" in out, out
    row = rows(out)["kvalloc"]
    assert row[REFUSED] == "8" and row[BLOCKS_BACK] == "yes", row


def peers_python() -> Path:
    if not PEERS_PYTHON.exists():
        pytest.skip("no .venv-peers (benches/peers/setup_venv.sh makes it: 6.7 GB)")
    return PEERS_PYTHON


def test_peers_refuse_what_never_fits_and_go_on():
    """Each manager refuses what it cannot hold alone (SGLang's `alloc_extend` takes SWA slots
    for a whole prompt, so at 2 GiB it refuses row 7's 26,888 tokens too) and finishes."""
    out = compare(peers_python(), "--workload", "mooncake", "--requests", "12", "--memory-gib", "2", "--rounds", "1")
    table = rows(out)
    assert {k: v[REFUSED] for k, v in table.items()} == {"kvalloc": "1", "vLLM": "1", "SGLang": "2"}, out
    assert all(v[BLOCKS_BACK] == "yes" for v in table.values()), out
    assert "torch threads 1," in out, out


def test_sglang_checkpoints_after_prefill():
    """One system prompt, one admission per step: a request admitted while an earlier one still
    runs hits the system prompt only if SGLang's post-prefill `checkpoint_kv_cache` put it in
    the tree (without it SGLang hits nothing here)."""
    out = compare(peers_python(), "--workload", "chat", "--requests", "8", "--turns", "1",
                  "--system-prompts", "1", "--max-prefill-tokens", "1280", "--managers", "kvalloc,sglang",
                  "--rounds", "1")
    table = rows(out)
    assert table["SGLang"][HITS] == table["kvalloc"][HITS] == "6,144", out
