"""How long the scheduler waits on a frozen remote store: a manager with a small host tier over a
real server (scripts/remote-store.sh), filled, then the server is stopped with SIGSTOP and each
admission is timed: resumed conversations (whose prefixes sit in the remote tier: remote reads)
and new ones (a remote lookup, and evictions written down). Prints the median and the largest
admission, and the remote store's counters; SIGCONT at the end, then one more resumed
conversation to show service is back.

    .venv/bin/python benches/remote_frozen.py [ADMISSIONS [TIMEOUT_MS]]   # default 20, 50
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tier_engine import Engine, conversation, resume  # noqa: E402


def script(*args: str) -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "remote-store.sh"), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return done.stdout


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    # Always given: the tests' Engine would otherwise give the store a 2 s deadline.
    timeout = {"remote_timeout_ms": int(sys.argv[2]) if len(sys.argv) > 2 else 50}
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script("start", port)
    try:
        pid = int((ROOT / ".remote-store" / f"server-{port}.pid").read_text())
        e = Engine(host_bytes=32 << 10, remote_url=f"redis://127.0.0.1:{port}",
                   remote_bytes=64 << 20, **timeout)
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
        script("stop", port)


if __name__ == "__main__":
    main()
