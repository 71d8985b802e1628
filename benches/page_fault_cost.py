"""What a page's first touch costs on this machine: the cost `ManagerConfig::prefault_bytes`
moves out of the scheduler's path (see rust/kvalloc/src/prefault.rs).

    .venv/bin/python benches/page_fault_cost.py [MIB]

Touches one byte of every 4 KiB page of a fresh anonymous mapping, then the same pages again
(mapped by now: the loop's own cost), and prints the difference per page.
"""

import mmap
import sys
import time

PAGE = 4096


def touch(buf: mmap.mmap, pages: int) -> float:
    t = time.perf_counter()
    for i in range(pages):
        buf[i * PAGE] = 1
    return time.perf_counter() - t


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    pages = (mib << 20) // PAGE
    for _ in range(3):
        buf = mmap.mmap(-1, pages * PAGE)
        first = touch(buf, pages)
        again = touch(buf, pages)
        buf.close()
        print(f"first touch {(first - again) / pages * 1e6:.2f} us per page ({pages:,} pages; loop {again / pages * 1e6:.2f} us)")


if __name__ == "__main__":
    main()
