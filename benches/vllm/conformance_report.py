"""Summary of ``conformance.sh``'s runs: passed/failed/skipped per run, and every test that
passes with vLLM's stock scheduler but not with kvalloc's (a conformance failure unless the skip
list names it).

    python benches/vllm/conformance_report.py benches/vllm/.conformance benches/vllm/conformance_skips.txt

Reads ``stock.json`` and ``kvalloc.json`` (written by ``conformance_plugin.py``); either may be
missing (a one-mode run). Exits 1 on a conformance failure or a kvalloc run that built no
kvalloc scheduler at all (the injection broke), else 0.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed")


def load(path: Path) -> dict[str, dict] | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())["tests"]


def counts(tests: dict[str, dict]) -> str:
    c = Counter(t.get("outcome", "passed") for t in tests.values())
    return ", ".join(f"{c[o]} {o}" for o in OUTCOMES) + f" ({len(tests)} tests)"


def main() -> int:
    work, skips_path = Path(sys.argv[1]), Path(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conformance_plugin import read_skips

    skips = read_skips(skips_path)
    stock, kvalloc = load(work / "stock.json"), load(work / "kvalloc.json")
    if stock is not None:
        print(f"stock:   {counts(stock)}")
    if kvalloc is None:
        return 0
    print(f"kvalloc: {counts(kvalloc)}; {len(skips)} in the skip list (xfailed: each failed as its entry says)")
    ran_kvalloc = [n for n, t in kvalloc.items() if "KvallocScheduler" in t.get("built", ())]
    passed = [n for n in ran_kvalloc if kvalloc[n].get("outcome") == "passed"]
    print(f"kvalloc: {len(passed)} passed with a KvallocScheduler built; "
          f"{sum(1 for t in kvalloc.values() if t.get('outcome') == 'passed') - len(passed)} "
          "passed without building one (tests of other schedulers or of no scheduler)")
    bad = 0
    if not ran_kvalloc:
        print("FAIL: the kvalloc run built no KvallocScheduler (the injection did not apply)")
        bad = 1
    failing = sorted(n for n, t in kvalloc.items() if t.get("outcome") in ("failed", "error"))
    for name in failing:
        was = stock.get(name, {}).get("outcome") if stock is not None else None
        if was in ("failed", "error", "skipped"):
            print(f"  (fails stock too, {was}) {name}")
            continue
        bad = 1
        print(f"FAIL: {name}: {kvalloc[name].get('message', '')}")
    if stock is not None:
        for name in sorted(skips):
            if stock.get(name, {}).get("outcome") != "passed":
                print(f"  (skip list entry that does not pass stock either) {name}")
    print("conformance: " + ("FAILED" if bad else "ok"))
    return bad


if __name__ == "__main__":
    sys.exit(main())
