"""pytest plug-in that runs vLLM's own scheduler tests with kvalloc as the KV-cache manager.

Loaded by ``benches/vllm/conformance.sh`` (``-p conformance_plugin``) into a run of vLLM
0.32.0's ``tests/v1/core/test_scheduler.py``; vLLM's test files are not edited. Environment:

- ``KVALLOC_CONFORMANCE=kvalloc``: every scheduler the tests build through ``create_scheduler``
  (``tests/v1/core/utils.py``, and the test modules' own ``Scheduler(...)`` calls) is a
  ``kvalloc.vllm.KvallocScheduler``, also where a test asks for vLLM's ``AsyncScheduler``
  (kvalloc refuses asynchronous scheduling at start-up: such tests are in the skip list).
  A test that asks for another scheduler class (the diffusion schedulers) keeps it.
  ``stock`` (the default) changes nothing.
- ``KVALLOC_CONFORMANCE_SKIPS``: the skip list, applied in the kvalloc run only: per line a
  test id, its kind and the reason (``#`` comments). Each listed test still runs, and must fail
  the way its kind says (a strict xfail): ``refused:`` with kvalloc's ``UnsupportedError`` (a
  feature the plug-in refuses at start-up), ``internals:`` with an ``AttributeError`` (it reads
  a part of vLLM's own manager that kvalloc's does not have). So a listed test that starts
  passing, or fails some other way, fails the run; and an entry that names no collected test is
  an error: the list cannot go stale silently.
- ``KVALLOC_CONFORMANCE_OUT``: a JSON file of every test's outcome, with the scheduler classes
  the test built, for ``conformance_report.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

MODE = os.environ.get("KVALLOC_CONFORMANCE", "stock")
_results: dict[str, dict[str, Any]] = {}


#: Skip-list kinds: the exception a listed test must fail with.
SKIP_KINDS = ("refused", "internals")


def read_skips(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """Test id (relative to vLLM's tree, as pytest prints it) -> (kind, reason)."""
    skips: dict[str, tuple[str, str]] = {}
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        test_id, _, rest = line.partition(" ")
        kind, _, reason = rest.strip().partition(":")
        if kind not in SKIP_KINDS or not reason.strip():
            raise pytest.UsageError(f"{path}:{n}: expected 'TEST_ID KIND: REASON', KIND one of {SKIP_KINDS}")
        skips[test_id] = (kind, reason.strip())
    return skips


def _expected_failure(kind: str, reason: str) -> pytest.MarkDecorator:
    if kind == "refused":
        from kvalloc.vllm import UnsupportedError

        raises: type[BaseException] = UnsupportedError
    else:
        raises = AttributeError
    return pytest.mark.xfail(raises=raises, strict=True, reason=f"kvalloc conformance skip, {kind}: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    if MODE not in ("stock", "kvalloc"):
        raise pytest.UsageError(f"KVALLOC_CONFORMANCE={MODE!r}: expected 'stock' or 'kvalloc'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = os.environ.get("KVALLOC_CONFORMANCE_SKIPS")
    if MODE != "kvalloc" or not path:
        return
    skips = read_skips(path)
    seen = set()
    for item in items:
        entry = skips.get(item.nodeid)
        if entry is not None:
            seen.add(item.nodeid)
            item.add_marker(_expected_failure(*entry))
    stale = sorted(set(skips) - seen)
    # Only a run of the whole file can tell a stale entry from a deselected one.
    if stale and not config.getoption("keyword") and not config.getoption("markexpr"):
        raise pytest.UsageError(f"skip list entries that name no collected test: {stale}")


def _kvalloc_create_scheduler(original: Any) -> Any:
    from kvalloc.vllm import KvallocScheduler

    def create_scheduler(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("scheduler_cls") is None:
            kwargs["scheduler_cls"] = KvallocScheduler
        return original(*args, **kwargs)

    return create_scheduler


@pytest.fixture(autouse=True)
def _conformance_scheduler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Injects kvalloc's scheduler (kvalloc mode), records which schedulers a test built, and
    checks kvalloc's own state after the test (``kvalloc_checks``)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    built: list[Any] = []
    init = Scheduler.__init__

    def recording_init(self: Any, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "__init__", recording_init)
    if MODE == "kvalloc":
        from kvalloc.vllm import KvallocScheduler

        # Every module of vLLM's tests: helpers defined in one test file build schedulers for
        # another (test_priority_scheduler_random.py calls test_scheduler.py's).
        for module in [m for name, m in sys.modules.items() if name.startswith("tests.") and m is not None]:
            create = getattr(module, "create_scheduler", None)
            if callable(create):
                monkeypatch.setattr(module, "create_scheduler", _kvalloc_create_scheduler(create))
            if getattr(module, "Scheduler", None) is Scheduler:
                monkeypatch.setattr(module, "Scheduler", KvallocScheduler)
    yield
    _results.setdefault(request.node.nodeid, {})["built"] = sorted({type(s).__name__ for s in built})
    for scheduler in built:
        kvalloc_checks(scheduler)


def kvalloc_checks(scheduler: Any) -> None:
    """What the kvalloc run checks on top of each test, on every kvalloc manager it built: its
    invariants (``validate``), and no blocks held once the scheduler holds no request (the
    public-interface half of vLLM's ``assert_scheduler_empty``, which reads the stock manager's
    internals)."""
    from kvalloc.vllm import KvallocKVCacheManager

    manager = getattr(scheduler, "kv_cache_manager", None)
    if not isinstance(manager, KvallocKVCacheManager):
        return
    manager.validate()
    if not scheduler.requests:
        assert manager.usage == 0, f"no request left, but kvalloc's usage is {manager.usage}"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed"})
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xfailed"
        entry["reason"] = report.wasxfail
    elif report.skipped:
        entry["outcome"] = "skipped"
        entry["reason"] = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    elif report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        entry.setdefault("message", crash.message if crash else report.longreprtext.strip()[-500:])


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get("KVALLOC_CONFORMANCE_OUT")
    if out:
        Path(out).write_text(json.dumps({"mode": MODE, "tests": _results}, indent=1, sort_keys=True))
