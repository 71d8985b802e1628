"""The benches' entry point (`benches/step.py`, one subcommand per measurement the README
quotes) still runs (a few steps each): the plain loop, the prefault comparison, two builds side
by side (here the installed one twice, also in a large cache), a fresh manager beside one with a
large cache, the count of a step's code lines, admissions beside a frozen remote store; every
subcommand explains its arguments; the set-up scripts keep stdout for the job's output."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvalloc

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ROOT / "benches"
STEP = BENCHES / "step.py"


def run(*args: str) -> str:
    """`benches/step.py ARGS` (run from elsewhere: it finds its helpers itself); its stdout."""
    done = subprocess.run(
        [sys.executable, str(STEP), *args], cwd=ROOT / "tests", capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_step_loop_runs():
    out = run("loop", "128", "96", "5")
    assert re.search(r"median [\d.]+ us, mean [\d.]+ us, max [\d.]+ us over 5 steps", out), out
    assert re.search(r"^\d+ steps took page faults", out, re.M), out


def test_step_loop_runs_on_a_given_build(tmp_path):
    """`--build` loads that file as the extension: the installed one under another path runs,
    a file that is not an extension does not."""
    core = tmp_path / "_core.abi3.so"
    core.write_bytes(Path(kvalloc._core.__file__).read_bytes())
    out = run("loop", "128", "96", "3", "--build", str(core))
    assert re.search(r"over 3 steps", out), out
    bogus = tmp_path / "not_core.so"
    bogus.write_text("no")
    done = subprocess.run(
        [sys.executable, str(STEP), "loop", "128", "96", "3", "--build", str(bogus)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0 and "not_core.so" in done.stderr


def test_frozen_step_runs():
    """Both managers step; the frozen one's loads fail or are declined, never hang."""
    out = run("frozen-step", "6")
    assert re.search(r"^healthy  server: 6 steps, median [\d.]+ ms", out, re.M), out
    assert re.search(r"^frozen   server: 6 steps, median [\d.]+ ms", out, re.M), out
    assert re.search(r"^frozen / healthy, medians: [\d.]+x", out, re.M), out


def test_remote_frozen_runs():
    out = run("remote-frozen", "4")
    assert re.search(r"frozen server: 4 admissions, median [\d.]+ ms, max [\d.]+ ms", out), out
    assert "'timeouts': " in out and "after SIGCONT: resumed hit 160 of 160" in out, out


def test_step_prefault_runs():
    out = run("prefault", "5")
    assert "paired (default - none)" in out, out


def test_page_fault_cost_runs():
    out = run("page-faults", "1")
    assert len(re.findall(r"^first touch -?[\d.]+ us per page \(256 pages; loop", out, re.M)) == 3, out


def test_step_ab_runs_two_builds_side_by_side():
    core = Path(kvalloc._core.__file__)
    out = run("ab", str(core), str(core), "6")
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{core}: p10") for line in lines[:2]), out
    assert re.match(r"paired \(second - first\) over 6 steps: .* median ratio [\d.]+$", lines[2]), out


def test_step_scale_runs_on_a_given_build():
    out = run("scale", "2000", "6", str(Path(kvalloc._core.__file__)))
    assert re.search(r"^fresh: p10 [\d.]+ us", out, re.M), out
    assert re.search(r"^2000 cached: p10 [\d.]+ us", out, re.M), out
    assert re.search(r"median ratio \(cached / fresh\) over 6 steps: [\d.]+$", out, re.M), out


def test_step_ab_runs_in_a_large_cache_with_cold_caches():
    core = Path(kvalloc._core.__file__)
    out = run("ab", str(core), str(core), "4", "2000", "1")
    assert re.search(r"paired \(second - first\) over 4 steps: .* median ratio [\d.]+$", out), out


def test_step_cold_runs():
    out = run("cold", "8", "1")
    assert re.search(r"^decode of 256 after writing 1 MiB: median [\d.]+ us$", out, re.M), out


def test_code_lines_counts_distinct_lines_per_part(tmp_path):
    sys.path.insert(0, str(BENCHES))
    from step import code_lines
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
    out = run("code-lines", "3")
    assert re.match(r"one step after 3: \d+ lines of code \(\d+ KiB\)", out), out
    assert "kvalloc core" in out, out


def test_pgo_training_run_drives_every_part():
    """scripts/pgo_train.py (the profile-guided build's training run) runs against the
    installed build too, so a change to the API it drives fails here, not only in a setup
    that has llvm-profdata."""
    script = ROOT / "scripts" / "pgo_train.py"
    core = Path(kvalloc._core.__file__)
    done = subprocess.run(
        [sys.executable, str(script), str(core)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # The simulator's JSON reports of its four replays.
    assert out.count('"policy": "swa-aware"') >= 2 and '"policy": "dense"' in out, out[-2000:]


def test_step_stretches_runs():
    out = run("stretches", "0", "5")
    assert re.search(r"^2 blocks of 5 steps; correlation of the step's median", out, re.M), out
    assert len(re.findall(r"^step median [\d.]+ us +cpu probe [\d.]+ ms +memory probe", out, re.M)) == 2


def test_simulate_ab_replays_on_two_builds():
    core = str(Path(kvalloc._core.__file__))
    out = run("simulate-ab", core, core, "1")
    assert re.search(r"ratio of medians \(second / first\): [\d.]+", out), out
    assert len(re.findall(r"_core\.abi3\.so: [\d.]+ s \(median", out)) == 2, out


USAGE = {
    # subcommand: arguments it refuses (too many, or not a number where one is due)
    "loop": ["128", "96", "5", "0", "extra"],
    "ab": ["only-one.so"],
    "build": ["HEAD"],
    "scale": ["many"],
    "cold": ["8", "1", "extra"],
    "prefault": ["-5"],
    "page-faults": ["0"],
    "stretches": ["0", "0"],
    "code-lines": ["-1"],
    "simulate-ab": ["only-one.so"],
    "remote-frozen": ["4", "ms"],
    "frozen-step": ["0"],
}


def test_every_subcommand_is_checked_here():
    """A new subcommand gets its usage check below."""
    sys.path.insert(0, str(BENCHES))
    from step import parser

    listed = parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {name for name in listed if not name.startswith("_")} == set(USAGE)


@pytest.mark.parametrize("command", sorted(USAGE))
def test_step_subcommands_explain_their_arguments(command):
    """Arguments a subcommand does not take are its usage line and exit status 2, before any
    manager, worktree or build."""
    done = subprocess.run(
        [sys.executable, str(STEP), command, *USAGE[command]], capture_output=True, text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"usage: benches/step.py {command} [-h]"), done.stderr
    assert done.stdout == ""


def test_step_without_a_subcommand_lists_them():
    done = subprocess.run([sys.executable, str(STEP)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SUBCOMMAND" in done.stderr
    listing = subprocess.run(
        [sys.executable, str(STEP), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(command in listing for command in USAGE), listing
    assert "_simulate-inner" not in listing


@pytest.mark.parametrize("args", [["--tree"], ["--out"], ["--fast"], ["--tree", "/tmp"]])
def test_pgo_build_explains_its_arguments(args):
    """Anything but its documented arguments is the usage line, before any build."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pgo_build.sh"), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "usage: scripts/pgo_build.sh [--tree DIR] [--out FILE]" in done.stderr


def test_source_key_follows_the_sources(tmp_path):
    """The key scripts/setup.sh records with the installed build changes with a Rust source, a
    Python source or the manifest, and with nothing else in the tree (a bench's output)."""
    for part in ("rust", "python/kvalloc"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for f in ("Cargo.toml", "Cargo.lock", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)

    def key() -> str:
        done = subprocess.run(
            [str(ROOT / "scripts" / "source_key.sh"), str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        return done.stdout.strip()

    first = key()
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    (tmp_path / "bench-output.txt").write_text("not a source")
    assert key() == first
    seen = {first}
    for f in ("rust/kvalloc/src/lib.rs", "python/kvalloc/cli.py", "Cargo.toml"):
        with open(tmp_path / f, "a") as out:
            out.write("\n")
        seen.add(key())
    assert len(seen) == 4


def test_run_sh_prints_only_the_jobs_output():
    """`scripts/run.sh --json | python -m json.tool` works: set-up progress (pip, the build)
    goes to stderr, and stdout is the one JSON object of the job. Uses the .venv the tests run
    in (scripts/setup.sh finds it set up: nothing to install, the build up to date)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "run.sh"), "--json", "--no-progress", "--no-capacity-search"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert {r["policy"] for r in report["runs"]} == {"swa-aware", "dense"}, report.keys()
    assert "ready in .venv" in done.stderr
