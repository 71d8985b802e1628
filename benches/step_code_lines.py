"""How much machine code one scheduler step runs: the step of `step_loop.py` (256 decode tokens
plus 16 admissions of 128-token prompts sharing 96), after WARM_STEPS steps, under valgrind's
callgrind with instruction-level output; prints the distinct 64-byte lines of code it executed,
by where they come from. A step whose code does not fit the first-level instruction cache
fetches it again every step, and from memory when other work ran in between.

    .venv/bin/python benches/step_code_lines.py [WARM_STEPS]     # default 100; needs valgrind
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

LINE = 64


def kind(obj: str, fn: str) -> str:
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
    """Distinct code lines executed, per `kind`, in a callgrind dump written with
    `--dump-instr=yes --compress-pos=no --compress-strings=no`."""
    seen: dict[str, set[tuple[str, int]]] = defaultdict(set)
    obj = fn = ""
    for line in Path(dump).read_text().splitlines():
        if line.startswith("ob="):
            obj = line[3:]
        elif line.startswith("fn="):
            fn = line[3:]
        elif m := re.match(r"(0x[0-9a-f]+)\s+\d", line):
            seen[kind(obj, fn)].add((obj, int(m.group(1), 16) // LINE))
    return {k: len(v) for k, v in seen.items()}


def inner(warm: int) -> None:
    """Under callgrind: WARM_STEPS steps, counters zeroed, one step, counters dumped."""
    sys.path.insert(0, str(Path(__file__).parent))
    from step_workload import start, take_turns

    m, ids, running = start(1 << 40, 128, 96)
    take_turns([m], ids, running, warm, 128, 96)
    pid = str(os.getpid())
    subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
    take_turns([m], ids, running, 1, 128, 96)
    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)


def main() -> None:
    if sys.argv[1:2] == ["--inner"]:
        inner(int(sys.argv[2]))
        return
    warm = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind", "--tool=callgrind", "--dump-instr=yes", "--compress-pos=no",
                "--compress-strings=no", f"--callgrind-out-file={out}",
                "--toggle-collect=*PyKVCacheManager*step*",
                sys.executable, __file__, "--inner", str(warm),
            ],
            check=True,
            capture_output=True,
        )
        counts = code_lines(f"{out}.1")  # the dump `callgrind_control -d` wrote
    total = sum(counts.values())
    print(f"one step after {warm}: {total} lines of code ({total * LINE // 1024} KiB)")
    for k, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{n:>6}  {k}")


if __name__ == "__main__":
    main()
