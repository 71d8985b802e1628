"""Runs a worker in several threads at once and fails the test if any of them raised."""

import threading
from collections.abc import Callable


def run_threads(worker: Callable[[int], None], n: int) -> None:
    """`worker(i)` for i in range(n), each in its own thread; re-raises the first error any
    thread hit (all are listed), after every thread has ended."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            worker(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} of {n} threads failed: {errors!r}") from errors[0]
