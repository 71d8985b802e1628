"""The scheduler-step scripts the README quotes still run (a few steps each): the plain loop,
the prefault comparison, two builds side by side (here the installed one twice, also in a large
cache), a fresh manager beside one with a large cache, the count of a step's code lines, and
admissions beside a frozen remote store."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvalloc

BENCHES = Path(__file__).resolve().parent.parent / "benches"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=BENCHES, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_step_loop_runs():
    out = run("step_loop.py", "128", "96", "5")
    assert re.search(r"median [\d.]+ us, mean [\d.]+ us, max [\d.]+ us over 5 steps", out), out
    assert re.search(r"^\d+ steps took page faults", out, re.M), out


def test_remote_frozen_runs():
    out = run("remote_frozen.py", "4")
    assert re.search(r"frozen server: 4 admissions, median [\d.]+ ms, max [\d.]+ ms", out), out
    assert "'timeouts': " in out and "after SIGCONT: resumed hit 160 of 160" in out, out


def test_step_prefault_runs():
    out = run("step_prefault.py", "5")
    assert "paired (default - none)" in out, out


def test_step_ab_runs_two_builds_side_by_side():
    core = Path(kvalloc._core.__file__)
    out = run("step_ab.py", str(core), str(core), "6")
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{core}: p10") for line in lines[:2]), out
    assert re.match(r"paired \(second - first\) over 6 steps: .* median ratio [\d.]+$", lines[2]), out


def test_step_ab_explains_its_arguments():
    done = subprocess.run(
        [sys.executable, "step_ab.py"], cwd=BENCHES, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "build_rev.sh" in done.stderr


def test_step_scale_runs_on_a_given_build():
    out = run("step_scale.py", "2000", "6", str(Path(kvalloc._core.__file__)))
    assert re.search(r"^fresh: p10 [\d.]+ us", out, re.M), out
    assert re.search(r"^2000 cached: p10 [\d.]+ us", out, re.M), out
    assert re.search(r"median ratio \(cached / fresh\) over 6 steps: [\d.]+$", out, re.M), out


def test_step_ab_runs_in_a_large_cache_with_cold_caches():
    core = Path(kvalloc._core.__file__)
    out = run("step_ab.py", str(core), str(core), "4", "2000", "1")
    assert re.search(r"paired \(second - first\) over 4 steps: .* median ratio [\d.]+$", out), out


def test_step_cold_runs():
    out = run("step_cold.py", "8", "1")
    assert re.search(r"^decode of 256 after writing 1 MiB: median [\d.]+ us$", out, re.M), out


def test_code_lines_counts_distinct_lines_per_part(tmp_path):
    sys.path.insert(0, str(BENCHES))
    from step_code_lines import code_lines

    dump = tmp_path / "callgrind.out"
    dump.write_text(
        "ob=/x/_core.abi3.so\n"
        "fn=kvalloc::manager::KVCacheManager::admit_with\n"
        "0x1000 5\n0x103f 2\n0x1040 1\n"  # two lines (0x1000-0x103f, 0x1040)
        "fn=pyo3::marker::Python::detach\n"
        "0x1000 3\n"  # the same line again: counted once
        "calls=1 0x2000\n"
        "fn=numpy::borrow::shared::acquire\n"
        "0x2000 1\n"
        "ob=/usr/lib/libc.so.6\n"
        "fn=_int_malloc\n"
        "0x1000 4\n"  # same address, another object: its own line
        "fn=__memcmp_avx2\n"
        "0x5000 1\n"
    )
    core = "kvalloc core (the step runs inside Python::detach)"
    assert code_lines(dump) == {
        core: 2,
        "rust-numpy": 1,
        "malloc/free": 1,
        "libc, other": 1,
    }


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_step_code_lines_runs():
    out = run("step_code_lines.py", "3")
    assert re.match(r"one step after 3: \d+ lines of code \(\d+ KiB\)", out), out
    assert "kvalloc core" in out, out


def test_pgo_training_run_drives_every_part():
    """scripts/pgo_train.py (the profile-guided build's training run) runs against the
    installed build too, so a change to the API it drives fails here, not only in a setup
    that has llvm-profdata."""
    script = BENCHES.parent / "scripts" / "pgo_train.py"
    core = Path(kvalloc._core.__file__)
    out = run(str(script), str(core))
    # The simulator's JSON reports of its four replays.
    assert out.count('"policy": "swa-aware"') >= 2 and '"policy": "dense"' in out, out[-2000:]


def test_step_stretches_runs():
    out = run("step_stretches.py", "0", "5")
    assert re.search(r"^2 blocks of 5 steps; correlation of the step's median", out, re.M), out
    assert len(re.findall(r"^step median [\d.]+ us +cpu probe [\d.]+ ms +memory probe", out, re.M)) == 2


def test_simulate_ab_replays_on_two_builds():
    core = str(Path(kvalloc._core.__file__))
    out = run("simulate_ab.py", core, core, "1")
    assert re.search(r"ratio of medians \(second / first\): [\d.]+", out), out
    assert len(re.findall(r"_core\.abi3\.so: [\d.]+ s \(median", out)) == 2, out


@pytest.mark.parametrize(
    "script,args,usage",
    [
        ("build_rev.sh", [], "REV OUT_DIR [--pgo]"),
        ("build_rev.sh", ["HEAD"], "REV OUT_DIR [--pgo]"),
        ("build_rev.sh", ["HEAD", "/tmp/kv-x", "--fast"], "REV OUT_DIR [--pgo]"),
        ("pgo_profile.sh", [], "OUT.profdata [TRAINING_LOG]"),
        ("pgo_profile.sh", ["a", "b", "c"], "OUT.profdata [TRAINING_LOG]"),
    ],
)
def test_build_scripts_explain_their_arguments(script, args, usage):
    """Anything but their documented arguments is the usage line, before any worktree or build."""
    path = BENCHES.parent / "scripts" / script
    done = subprocess.run(["bash", str(path), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"usage: scripts/{script} {usage}" in done.stderr
