"""Trace replay on two builds of kvalloc, alternating: `kvalloc simulate --no-capacity-search`
on the shipped Mooncake trace (both policies), each run in a fresh process on build A or B
(`scripts/build_rev.sh` makes a plain build of any revision; `python/kvalloc/_core.abi3.so` is
the installed one, profile-guided by default). Prints each build's times and the ratio of the
medians (B over A).

    .venv/bin/python benches/simulate_ab.py A.so B.so [ROUNDS]    # default 3 rounds
"""

import contextlib
import io
import subprocess
import sys
import time

import numpy as np

ARGS = ["simulate", "--no-progress", "--no-capacity-search", "--json"]


def inner(path: str) -> None:
    """In the child: the replay on the build at `path`; prints its seconds."""
    from as_kvalloc import install

    install(path)
    from kvalloc.cli import main

    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(ARGS)
    if status != 0:
        raise SystemExit(f"kvalloc {' '.join(ARGS)} failed on {path}")
    print(time.perf_counter() - t)


def main() -> None:
    if sys.argv[1:2] == ["--inner"]:
        inner(sys.argv[2])
        return
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    paths = sys.argv[1:3]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    seconds: list[list[float]] = [[], []]
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            out = subprocess.run(
                [sys.executable, __file__, "--inner", paths[k]],
                check=True, capture_output=True, text=True,
            ).stdout
            seconds[k].append(float(out.split()[-1]))
    for path, s in zip(paths, seconds):
        print(f"{path}: " + ", ".join(f"{x:.2f}" for x in s) + f" s (median {np.median(s):.2f} s)")
    print(f"ratio of medians (second / first): {np.median(seconds[1]) / np.median(seconds[0]):.3f}")


if __name__ == "__main__":
    main()
