"""The scheduler step of issue 3 and what it depends on, one subcommand per measurement. The
step: 256 running requests each extended by one decode token plus 16 admissions of 128-token
prompts sharing 96, in one `KVCacheManager.step` call (`step_workload.py`, shared with
`test_bench_manager.py`). Run with the .venv's Python, from anywhere:

    .venv/bin/python benches/step.py loop [PROMPT_TOKENS SHARED_TOKENS STEPS [THRASH_MIB]] [--build SO]
    .venv/bin/python benches/step.py ab A.so B.so [STEPS [CACHED_REQUESTS [THRASH_MIB]]]
    .venv/bin/python benches/step.py build REV OUT_DIR [--pgo]   # A.so / B.so of any revision
    .venv/bin/python benches/step.py scale [CACHED_REQUESTS STEPS [EXTENSION]]
    .venv/bin/python benches/step.py cold [ROUNDS THRASH_MIB]
    .venv/bin/python benches/step.py prefault [STEPS]
    .venv/bin/python benches/step.py page-faults [MIB]
    .venv/bin/python benches/step.py stretches [SECONDS [STEPS_PER_BLOCK]]
    .venv/bin/python benches/step.py code-lines [WARM_STEPS]            # needs valgrind
    .venv/bin/python benches/step.py simulate-ab A.so B.so [ROUNDS]
    .venv/bin/python benches/step.py remote-frozen [ADMISSIONS [TIMEOUT_MS]]
    .venv/bin/python benches/step.py frozen-step [ROUNDS [TIMEOUT_MS]]

`benches/step.py SUBCOMMAND --help` says what each prints. Instructions per step (the figure the
README quotes; plain loop, counted inside the binding's `step` only):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        --toggle-collect='*PyKVCacheManager*__pymethod_step__*' \\
        .venv/bin/python benches/step.py loop 128 96 300     # "Collected" / 300

(Name the outermost function only: a build that does not inline `PyKVCacheManager::step` into
it would toggle collection off again on entering that one with `*PyKVCacheManager*step*`.)

Absolute times on a shared VM move by 1.5-2x within minutes; `ab` (two builds in one process,
taking turns on the same steps) measures a change, paired.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import mmap
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHES = Path(__file__).resolve().parent
ROOT = BENCHES.parent
sys.path.insert(0, str(BENCHES))

PROMPT, SHARED = 128, 96
PAGE = 4096
CODE_LINE = 64


# ---- loop: the step in a plain loop ----


def loop(length: int, shared: int, steps: int, thrash_mib: int, build: str | None) -> None:
    """Prints min / median / mean / max and page faults per step, then the steps that took any
    (the memory the bookkeeping first touches). `build`: another build's extension (the
    installed one by default)."""
    import numpy as np

    if build is not None:
        from as_kvalloc import install

        install(build)

    from step_workload import cache_thrasher, start, take_turns

    m, ids, running = start(1 << 40, length, shared)
    times, faults = take_turns(
        [m], ids, running, steps, length, shared, before_step=cache_thrasher(thrash_mib)
    )
    us, f = times[0] * 1e6, faults[0]
    print(
        f"{length}-token prompts: min {us.min():.1f} us, median {np.median(us):.1f} us, "
        f"mean {us.mean():.1f} us, max {us.max():.1f} us over {steps} steps; "
        f"{f.sum() / steps:.2f} page faults per step"
    )
    faulted = np.flatnonzero(f)
    listed = ", ".join(f"step {i}: {f[i]} ({us[i]:.0f} us)" for i in faulted[:20])
    print(f"{len(faulted)} steps took page faults{': ' + listed if listed else ''}")


# ---- ab: two builds side by side ----


def ab(paths: list[str], steps: int, cached: int, thrash_mib: int) -> None:
    """Both builds load into one process; their managers take turns on the same steps (which
    goes first alternates). Prints each build's p10 / median / p90 / mean, the paired
    differences (second minus first) and the ratio of the medians."""
    import numpy as np

    from step_workload import cache_thrasher, fill_cache, load_core, start, summary, take_turns

    capacity = 1 << 44 if cached else 1 << 40
    # Both admit the same requests; from here they share one id stream and every step.
    m0, ids, running = start(capacity, PROMPT, SHARED, core=load_core(paths[0], "kvalloc_ab0"))
    managers = [m0, start(capacity, PROMPT, SHARED, core=load_core(paths[1], "kvalloc_ab1"))[0]]
    for m in managers:
        fill_cache(m, cached)
    times, _ = take_turns(
        managers, ids, running, steps, PROMPT, SHARED, before_step=cache_thrasher(thrash_mib)
    )
    us = times * 1e6
    for k, path in enumerate(paths):
        print(summary(path, us[k]))
    d = us[1] - us[0]
    ratio = np.median(us[1]) / np.median(us[0])
    print(
        f"paired (second - first) over {steps} steps: median {np.median(d):+.1f} us, "
        f"mean {d.mean():+.1f} us; median ratio {ratio:.3f}"
    )


# ---- build: the extension of any revision ----


def build(rev: str, out: Path, pgo: bool) -> None:
    """Builds revision `rev`'s extension into OUT/_core.abi3.so in a temporary worktree, with a
    target directory kept under target/ (later builds are incremental). Plain: the release
    profile, as `scripts/setup.sh` installs it. `pgo`: this checkout's `scripts/pgo_build.sh`
    on that tree (its own training run)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(
        [*git, "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "_core.abi3.so"
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run([*git, "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
        try:
            if pgo:
                env = dict(os.environ, PYTHON=sys.executable,
                           CARGO_TARGET_DIR=str(ROOT / "target" / "rev-pgo"))
                subprocess.run(
                    [str(ROOT / "scripts" / "pgo_build.sh"), "--tree", str(tree), "--out", str(lib)],
                    check=True, env=env,
                )
            else:
                target = ROOT / "target" / "rev"
                env = dict(os.environ, PYO3_PYTHON=sys.executable, CARGO_TARGET_DIR=str(target))
                subprocess.run(["cargo", "build", "--release", "-q", "-p", "kvalloc-py"],
                               cwd=tree, check=True, env=env)
                lib.write_bytes((target / "release" / "lib_core.so").read_bytes())
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)
    print(f"{lib}: kvalloc at {commit[:12]}{', profile-guided' if pgo else ''}")


# ---- scale: a fresh manager beside one with a large cache ----


def scale(cached: int, steps: int, extension: str | None) -> None:
    """Both managers have 16 TiB of (virtual) capacity, so neither evicts; one first caches
    `cached` distinct 33-token requests (two tree nodes each). Prints each one's p10 / median /
    p90 / mean and the ratio of the medians."""
    import numpy as np

    import kvalloc
    from step_workload import fill_cache, load_core, start, summary, take_turns

    core: Any = load_core(extension, "kvalloc_scale") if extension else kvalloc
    capacity = 1 << 44
    fresh, ids, running = start(capacity, PROMPT, SHARED, core=core)
    large = start(capacity, PROMPT, SHARED, core=core)[0]
    fill_cache(large, cached)
    times, _ = take_turns([fresh, large], ids, running, steps, PROMPT, SHARED)
    us = times * 1e6
    print(summary("fresh", us[0]))
    print(summary(f"{cached} cached", us[1]))
    print(f"median ratio (cached / fresh) over {steps} steps: {np.median(us[1]) / np.median(us[0]):.3f}")


# ---- cold: decode steps of several sizes with cold caches ----

COLD_SIZES = (1, 16, 64, 256)


def cold(rounds: int, mib: int) -> None:
    """After THRASH_MIB is written, a step extends 1, 16, 64 or 256 of the running requests by
    one token (the rest untimed). Prints each size's median: the fixed cost of a call and the
    cost per request."""
    import numpy as np

    from step_workload import ADMITS, cache_thrasher, start, step_args

    m, ids, running = start(1 << 40, PROMPT, SHARED)
    rng = np.random.default_rng(0)
    thrash = cache_thrasher(mib)
    times: dict[int, list[float]] = {n: [] for n in COLD_SIZES}
    for i in range(rounds):
        for rid in running[:ADMITS]:
            m.finish(rid)
        del running[:ADMITS]
        args = step_args(running, ids, rng, PROMPT, SHARED)
        m.step(**{k: v for k, v in args.items() if k.startswith("admit")})
        n = COLD_SIZES[i % len(COLD_SIZES)]
        timed = np.array(running[:n], dtype=np.int64)
        rest = np.array(running[n:], dtype=np.int64)
        thrash()
        t = time.perf_counter()
        m.step(extend_ids=timed, extend_tokens=np.ones(len(timed), dtype=np.int64))
        times[n].append(time.perf_counter() - t)
        if len(rest):
            m.step(extend_ids=rest, extend_tokens=np.ones(len(rest), dtype=np.int64))
    for n in COLD_SIZES:
        print(f"decode of {n} after writing {mib} MiB: median {np.median(times[n]) * 1e6:.1f} us")


# ---- prefault: bookkeeping committed up front against none ----


def prefault(steps: int) -> None:
    """What building a manager costs with and without `prefault_bytes`, then the two managers
    side by side: page faults per step, min / median / mean, the paired differences."""
    import numpy as np

    from kvalloc import KVCacheManager, ModelSpec
    from step_workload import start, take_turns

    spec = ModelSpec.preset("mimo-v2.5-pro")
    for capacity in (1 << 40, 80 << 30):
        built = []
        for option in (0, None):
            t = time.perf_counter()
            KVCacheManager(spec, capacity, prefault_bytes=option)
            built.append(time.perf_counter() - t)
        print(
            f"building a {capacity >> 30} GiB manager: {built[0] * 1e3:.1f} ms with prefault_bytes=0, "
            f"{built[1] * 1e3:.1f} ms by default"
        )
    m0, ids, running = start(1 << 40, PROMPT, SHARED, prefault_bytes=0)
    ms = [m0, start(1 << 40, PROMPT, SHARED)[0]]
    times, faults = take_turns(ms, ids, running, steps, PROMPT, SHARED)
    us = times * 1e6
    for k, name in enumerate(["prefault_bytes=0", "default"]):
        print(
            f"{name:>17}: {faults[k].sum() / steps:.2f} page faults per step; min {us[k].min():.1f} us, "
            f"median {np.median(us[k]):.1f} us, mean {us[k].mean():.1f} us"
        )
    d = us[1] - us[0]
    print(f"paired (default - none): median {np.median(d):+.1f} us, mean {d.mean():+.1f} us over {steps} steps")


# ---- page-faults: what a page's first touch costs here ----


def touch(buf: mmap.mmap, pages: int) -> float:
    t = time.perf_counter()
    for i in range(pages):
        buf[i * PAGE] = 1
    return time.perf_counter() - t


def page_faults(mib: int) -> None:
    """Touches one byte of every 4 KiB page of a fresh mapping, then the same pages again (the
    loop's own cost), and prints the difference per page: what `prefault_bytes` moves out of
    the scheduler's path."""
    pages = (mib << 20) // PAGE
    for _ in range(3):
        buf = mmap.mmap(-1, pages * PAGE)
        first = touch(buf, pages)
        again = touch(buf, pages)
        buf.close()
        print(f"first touch {(first - again) / pages * 1e6:.2f} us per page ({pages:,} pages; loop {again / pages * 1e6:.2f} us)")


# ---- stretches: does a slow stretch slow the core or memory? ----


def cpu_probe() -> float:
    """Seconds for a fixed pure-Python loop (best of five): its code and data stay in the
    first-level caches, so it slows only when the core itself is slower."""
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x = 0
        for i in range(20_000):
            x += i * i
        best = min(best, time.perf_counter() - t)
    return best


def memory_probe(junk: Any, idx: Any) -> float:
    """Seconds for 200,000 random reads over `junk` (best of three)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        junk[idx].sum()
        best = min(best, time.perf_counter() - t)
    return best


def stretches(seconds: float, block: int) -> None:
    """Blocks of steps, each followed by a cpu probe and a memory probe (16 MiB of random
    reads); prints one line per block and how the step's median follows each probe."""
    import numpy as np

    from step_workload import start, take_turns

    junk = np.zeros(1 << 21)
    idx = np.random.default_rng(0).integers(0, len(junk), 200_000)
    rows: list[tuple[float, float, float]] = []
    end = time.time() + seconds
    while time.time() < end or len(rows) < 2:
        # A fresh manager every ten blocks, so the cache's growth does not slow later blocks.
        if len(rows) % 10 == 0:
            m, ids, running = start(1 << 40, PROMPT, SHARED)
        times, _ = take_turns([m], ids, running, block, PROMPT, SHARED)
        row = (np.median(times[0]) * 1e6, cpu_probe() * 1e3, memory_probe(junk, idx) * 1e3)
        print(f"step median {row[0]:.1f} us   cpu probe {row[1]:.2f} ms   memory probe {row[2]:.2f} ms")
        rows.append(row)
    r = np.array(rows)
    cpu = np.corrcoef(r[:, 0], r[:, 1])[0, 1]
    mem = np.corrcoef(r[:, 0], r[:, 2])[0, 1]
    print(f"{len(rows)} blocks of {block} steps; correlation of the step's median with the cpu "
          f"probe {cpu:.2f}, with the memory probe {mem:.2f}")


# ---- code-lines: the machine code one step runs ----


def code_kind(obj: str, fn: str) -> str:
    """Which part of the stack a function belongs to."""
    if "libc.so" in obj:
        return "malloc/free" if re.search(r"alloc|free|consolidate", fn) else "libc, other"
    if "libpython" in obj:
        return "CPython"
    if fn.startswith("kvalloc::") or "Python::detach" in fn:
        return "kvalloc core (the step runs inside Python::detach)"
    if "numpy::" in fn:
        return "rust-numpy"
    return "binding, PyO3 and the rest"


def code_lines(dump: str | Path) -> dict[str, int]:
    """Distinct 64-byte code lines executed, per `code_kind`, in a callgrind dump written with
    `--dump-instr=yes --compress-pos=no --compress-strings=no`."""
    seen: dict[str, set[tuple[str, int]]] = defaultdict(set)
    obj = fn = ""
    for line in Path(dump).read_text().splitlines():
        if line.startswith("ob="):
            obj = line[3:]
        elif line.startswith("fn="):
            fn = line[3:]
        elif m := re.match(r"(0x[0-9a-f]+)\s+\d", line):
            seen[code_kind(obj, fn)].add((obj, int(m.group(1), 16) // CODE_LINE))
    return {k: len(v) for k, v in seen.items()}


def code_lines_inner(warm: int) -> None:
    """Under callgrind: WARM_STEPS steps, counters zeroed, one step, counters dumped."""
    from step_workload import start, take_turns

    m, ids, running = start(1 << 40, PROMPT, SHARED)
    take_turns([m], ids, running, warm, PROMPT, SHARED)
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    take_turns([m], ids, running, 1, PROMPT, SHARED)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)


def code_lines_run(warm: int) -> None:
    """One step after WARM_STEPS under callgrind with instruction-level output; prints the
    distinct lines of code it executed, by where they come from (a step whose code does not
    fit the first-level instruction cache fetches it again every step)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--dump-instr=yes", "--compress-pos=no",
                "--compress-strings=no", f"--callgrind-out-file={out}",
                "--toggle-collect=*PyKVCacheManager*__pymethod_step__*",
                sys.executable, __file__, "_code-lines-inner", str(warm),
            ],
            check=True,
            capture_output=True,
        )
        counts = code_lines(f"{out}.1")  # the dump `callgrind_control -d` wrote
    total = sum(counts.values())
    print(f"one step after {warm}: {total} lines of code ({total * CODE_LINE // 1024} KiB)")
    for k, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n:>6}  {k}")


# ---- simulate-ab: trace replay on two builds ----

SIMULATE = ["simulate", "--no-progress", "--no-capacity-search", "--json"]


def simulate_inner(path: str) -> None:
    """In the child: the replay on the build at `path`; prints its seconds."""
    from as_kvalloc import install

    install(path)
    from kvalloc.cli import main

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(SIMULATE)
    if status != 0:
        raise SystemExit(f"kvalloc {' '.join(SIMULATE)} failed on {path}")
    print(time.perf_counter() - t)


def simulate_ab(paths: list[str], rounds: int) -> None:
    """`kvalloc simulate --no-capacity-search` on the shipped trace (both policies), each run in
    a fresh process on build A or B, alternating. Prints each build's times and the ratio of
    the medians (B over A)."""
    import numpy as np

    seconds: list[list[float]] = [[], []]
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            out = subprocess.run(
                [sys.executable, __file__, "_simulate-inner", paths[k]],
                check=True, capture_output=True, text=True,
            ).stdout
            seconds[k].append(float(out.split()[-1]))
    for path, s in zip(paths, seconds):
        print(f"{path}: " + ", ".join(f"{x:.2f}" for x in s) + f" s (median {np.median(s):.2f} s)")
    print(f"ratio of medians (second / first): {np.median(seconds[1]) / np.median(seconds[0]):.3f}")


# ---- remote-frozen: admissions beside a frozen remote store ----


def store_script(*args: str) -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "remote-store.sh"), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout


def remote_frozen(n: int, timeout_ms: int) -> None:
    """A manager with a small host tier over a real server (scripts/remote-store.sh), filled,
    then the server is stopped with SIGSTOP and each admission timed: resumed conversations
    (remote reads) and new ones (a remote lookup, evictions written down). Prints the median
    and largest admission and the store's counters; after SIGCONT, one more resumed
    conversation shows service is back."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tier_engine import Engine, conversation, resume

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    store_script("start", port)
    try:
        pid = int((ROOT / ".remote-store" / f"server-{port}.pid").read_text())
        # Always given: the tests' Engine would otherwise give the store a 2 s deadline.
        e = Engine(host_bytes=32 << 10, remote_url=f"redis://127.0.0.1:{port}",
                   remote_bytes=64 << 20, remote_timeout_ms=timeout_ms)
        for f in range(n):
            e.serve(conversation(f, 3))
        e.churn(range(1000, 1030))
        os.kill(pid, signal.SIGSTOP)
        times = []
        try:
            for i in range(n):
                prompt = conversation(i, 4) if i % 2 == 0 else conversation(5000 + i, 3)
                t = time.perf_counter()
                rid = 100_000 + i
                hit = e.m.admit(rid, prompt)
                times.append(time.perf_counter() - t)
                if hit is not None:
                    e.m.load_handle(rid).wait_all(timeout=10)
                    e.m.finish(rid)
                e.m.validate()
        finally:
            os.kill(pid, signal.SIGCONT)
        ms = sorted(1e3 * t for t in times)
        print(f"frozen server: {n} admissions, median {statistics.median(ms):.1f} ms, "
              f"max {ms[-1]:.1f} ms, total {sum(ms):.0f} ms")
        print("remote store:", e.m.stats()["tiers"]["remote"]["store"])
        time.sleep(2.5)  # past the reconnect back-off
        e.serve(conversation(7777, 3))
        e.churn(range(2000, 2030))
        print("after SIGCONT: resumed hit", e.serve(conversation(7777, 4)),
              "of", resume(conversation(7777, 3)))
    finally:
        store_script("stop", port)


# ---- frozen-step: the scheduler step beside a frozen remote store, against a healthy one ----


def frozen_step(rounds: int, timeout_ms: int) -> None:
    """Two managers, each over its own real server (scripts/remote-store.sh), filled alike:
    conversations pushed down to the remote store. Then one server is frozen (SIGSTOP) and
    both serve the same rounds, taking turns: each round is one `step` per manager that
    finishes the requests admitted two rounds before and admits two (a conversation resuming
    from the remote store, a new one) plus those whose KV became ready. Prints each manager's
    median, p90 and largest step and the ratio of the medians (frozen / healthy), and what the
    loads did."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tier_engine import Engine, conversation

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(str(sock.getsockname()[1]))
    for port in ports:
        store_script("start", port)
    try:
        engines = [Engine(host_bytes=32 << 10, remote_url=f"redis://127.0.0.1:{port}",
                          remote_bytes=64 << 20, remote_timeout_ms=timeout_ms) for port in ports]
        for e in engines:
            for f in range(40):
                e.serve(conversation(f, 3))
            e.churn(range(1000, 1030))
        frozen_pid = int((ROOT / ".remote-store" / f"server-{ports[1]}.pid").read_text())
        os.kill(frozen_pid, signal.SIGSTOP)
        times: list[list[float]] = [[], []]
        try:
            state = [{"running": [], "waiting": {}} for _ in engines]
            for i in range(rounds):
                order = (0, 1) if i % 2 == 0 else (1, 0)  # interleaved: neither always goes first
                for k in order:
                    e, st = engines[k], state[k]
                    admit = [(200_000 + 2 * i, conversation(i % 40, 4)),
                             (200_001 + 2 * i, conversation(5000 + i, 3))]
                    admit += list(st["waiting"].items())
                    finish = [rid for rid, at in st["running"] if at <= i - 2]
                    t = time.perf_counter()
                    res = e.m.step(finish=finish, admit=admit)
                    times[k].append(time.perf_counter() - t)
                    st["running"] = [(rid, at) for rid, at in st["running"] if at > i - 2]
                    st["waiting"] = {}
                    for (rid, prompt), hit in zip(admit, res.hits.tolist()):
                        if hit >= 0:
                            st["running"].append((rid, i))
                        elif hit == -3:
                            st["waiting"][rid] = prompt
        finally:
            os.kill(frozen_pid, signal.SIGCONT)
        names = ("healthy", "frozen")
        medians = []
        for k in range(2):
            ms = sorted(1e3 * t for t in times[k])
            medians.append(statistics.median(ms))
            print(f"{names[k]:8s} server: {len(ms)} steps, median {medians[-1]:.3f} ms, "
                  f"p90 {ms[int(0.9 * (len(ms) - 1))]:.3f} ms, max {ms[-1]:.1f} ms")
            print(f"  loads: {engines[k].m.stats()['loads']}")
        print(f"frozen / healthy, medians: {medians[1] / medians[0]:.2f}x")
    finally:
        for port in ports:
            store_script("stop", port)


# ---- the command line ----


def nonnegative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benches/step.py",
        description="The scheduler step's benchmarks (see this file's header).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], None], doc: str) -> argparse.ArgumentParser:
        # The listing shows the description up to its first colon.
        s = sub.add_parser(name, help=doc.split(":")[0], description=doc)
        s.set_defaults(run=run, parser=s)
        return s

    s = command("loop",
                lambda a: loop(a.prompt_tokens, a.shared_tokens, a.steps, a.thrash_mib, a.build),
                "The step in a plain loop: min / median / mean / max and page faults per step. "
                "Between steps the 16 oldest requests finish through `finish`, so a profiler "
                "collecting only inside `step` sees only the timed steps.")
    s.add_argument("prompt_tokens", metavar="PROMPT_TOKENS", nargs="?", type=positive, default=PROMPT)
    s.add_argument("shared_tokens", metavar="SHARED_TOKENS", nargs="?", type=nonnegative, default=SHARED)
    s.add_argument("steps", metavar="STEPS", nargs="?", type=positive, default=3000)
    s.add_argument("thrash_mib", metavar="THRASH_MIB", nargs="?", type=nonnegative, default=0,
                   help="write an array this large between steps (cold caches)")
    s.add_argument("--build", metavar="SO",
                   help="another build's _core.abi3.so (`step.py build`; default: the installed one)")

    s = command("ab", lambda a: ab([a.a, a.b], a.steps, a.cached_requests, a.thrash_mib),
                "Two builds side by side: both load into one process (e.g. `step.py build REV DIR`'s "
                "and python/kvalloc/_core.abi3.so) and take turns on the same steps; prints the "
                "paired differences (B - A) and the ratio of the medians.")
    s.add_argument("a", metavar="A.so")
    s.add_argument("b", metavar="B.so")
    s.add_argument("steps", metavar="STEPS", nargs="?", type=positive, default=3000)
    s.add_argument("cached_requests", metavar="CACHED_REQUESTS", nargs="?", type=nonnegative, default=0,
                   help="cache this many other requests first (the step in a large cache)")
    s.add_argument("thrash_mib", metavar="THRASH_MIB", nargs="?", type=nonnegative, default=0,
                   help="write an array this large before every step (cold caches)")

    s = command("build", lambda a: build(a.rev, a.out_dir, a.pgo),
                "The extension of any revision, for `ab`, `scale` and `simulate-ab`: REV's release "
                "build in a temporary worktree, copied to OUT_DIR/_core.abi3.so (target/rev is "
                "kept, so later builds are incremental).")
    s.add_argument("rev", metavar="REV")
    s.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    s.add_argument("--pgo", action="store_true",
                   help="profile-guided, with that revision's own training run (scripts/pgo_build.sh)")

    s = command("scale", lambda a: scale(a.cached_requests, a.steps, a.extension),
                "What a large prefix tree costs the step: a fresh manager beside one whose cache "
                "holds CACHED_REQUESTS other requests (two tree nodes each), side by side.")
    s.add_argument("cached_requests", metavar="CACHED_REQUESTS", nargs="?", type=nonnegative, default=200_000)
    s.add_argument("steps", metavar="STEPS", nargs="?", type=positive, default=3000)
    s.add_argument("extension", metavar="EXTENSION", nargs="?",
                   help="another build's _core.abi3.so (default: the installed one)")

    s = command("cold", lambda a: cold(a.rounds, a.thrash_mib),
                "Decode steps with cold caches: 1, 16, 64 and 256 requests after THRASH_MIB is "
                "written; the fixed cost of a call and the cost per request.")
    s.add_argument("rounds", metavar="ROUNDS", nargs="?", type=positive, default=2000)
    s.add_argument("thrash_mib", metavar="THRASH_MIB", nargs="?", type=nonnegative, default=16)

    s = command("prefault", lambda a: prefault(a.steps),
                "Bookkeeping committed up front: the default prefault_bytes against none, side "
                "by side.")
    s.add_argument("steps", metavar="STEPS", nargs="?", type=positive, default=3000)

    s = command("page-faults", lambda a: page_faults(a.mib),
                "What a page's first touch costs on this machine: the cost prefault_bytes moves "
                "out of the scheduler's path.")
    s.add_argument("mib", metavar="MIB", nargs="?", type=positive, default=64)

    s = command("stretches", lambda a: stretches(a.seconds, a.steps_per_block),
                "Whether a slow stretch of this VM slows the whole core or only memory: blocks "
                "of steps, each followed by a cpu probe and a memory probe.")
    s.add_argument("seconds", metavar="SECONDS", nargs="?", type=float, default=60.0)
    s.add_argument("steps_per_block", metavar="STEPS_PER_BLOCK", nargs="?", type=positive, default=200)

    s = command("code-lines", lambda a: code_lines_run(a.warm_steps),
                "The machine code one step runs: its distinct 64-byte lines after WARM_STEPS "
                "steps, by where they come from (callgrind; needs valgrind).")
    s.add_argument("warm_steps", metavar="WARM_STEPS", nargs="?", type=nonnegative, default=100)

    s = command("simulate-ab", lambda a: simulate_ab([a.a, a.b], a.rounds),
                "Trace replay on two builds: kvalloc simulate --no-capacity-search (both "
                "policies), alternating, each run in a fresh process; the ratio of the medians.")
    s.add_argument("a", metavar="A.so")
    s.add_argument("b", metavar="B.so")
    s.add_argument("rounds", metavar="ROUNDS", nargs="?", type=positive, default=3)

    s = command("frozen-step", lambda a: frozen_step(a.rounds, a.timeout_ms),
                "The scheduler step beside a frozen remote store against a healthy one: two "
                "managers over two real servers, one frozen, stepping in turns; medians and ratio.")
    s.add_argument("rounds", metavar="ROUNDS", nargs="?", type=positive, default=400)
    s.add_argument("timeout_ms", metavar="TIMEOUT_MS", nargs="?", type=positive, default=50)

    s = command("remote-frozen", lambda a: remote_frozen(a.admissions, a.timeout_ms),
                "Admissions beside a frozen remote store: a real server, SIGSTOPped; median and "
                "largest admission, the store's counters, and service after SIGCONT.")
    s.add_argument("admissions", metavar="ADMISSIONS", nargs="?", type=positive, default=20)
    s.add_argument("timeout_ms", metavar="TIMEOUT_MS", nargs="?", type=positive, default=50)

    # The child processes of `code-lines` and `simulate-ab` (not listed: no help).
    s = sub.add_parser("_code-lines-inner")
    s.set_defaults(run=lambda a: code_lines_inner(a.warm_steps), parser=s)
    s.add_argument("warm_steps", metavar="WARM_STEPS", type=nonnegative)
    s = sub.add_parser("_simulate-inner")
    s.set_defaults(run=lambda a: simulate_inner(a.path), parser=s)
    s.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> None:
    args, extra = parser().parse_known_args(argv)
    if extra:  # the subcommand's own usage line, not the list of subcommands
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.run(args)


if __name__ == "__main__":
    main()
