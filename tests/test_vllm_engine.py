"""kvalloc inside a real vLLM engine: the tiny hybrid model (6 layers, sliding window 32) through
``LLM.generate``, greedy, with vLLM's own manager, with ``kvalloc.vllm.KvallocScheduler`` (its
tables checked on every call: ``verify``), and with prefix caching off.

Needs ``.venv-vllm`` (``benches/vllm/setup_venv.sh``: vLLM for CPU, about 4 minutes and 6 GB);
skipped without it. Each engine runs in its own process (``benches/vllm/engine_run.py``).

In float32 the outputs must be the same tokens with the same logprobs. One allowance, measured
in the same test and reported: where vLLM's own two runs (with and without prefix caching)
differ, because they batch steps differently (preemption, chunked prefill) and the CPU kernels'
matrix products round differently by batch shape (by up to 4.8e-7), kvalloc is held to a few
ulps (2e-6); where they agree to the bit, so must kvalloc. A wrong KV byte moves logprobs by 1e-3
or more (seen while the plug-in was wrong).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, VLLM_PYTHON, needs_vllm

RUNNER = ROOT / "benches" / "vllm" / "engine_run.py"

pytestmark = needs_vllm

# Workloads of issue 23: chats sharing system prompts, prompts diverging inside a block,
# chunked prefill, and a budget that forces preemption and eviction.
CASES = {
    "chat": ["--workload", "chat"],
    "diverge": ["--workload", "diverge"],
    "chunked": ["--workload", "chat", "--max-batched-tokens", "64"],
    "preempt": [
        "--workload", "chat", "--workload-args", '{"conversations": 8}',
        "--blocks", "64", "--max-model-len", "512", "--max-tokens", "48",
    ],
}
KERNEL_NOISE = 2e-6


def run_engine(tmp_path: Path, name: str, args: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(RUNNER), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def run_check(script: str) -> dict:
    """Runs a check script of benches/vllm/ in the vLLM venv; its JSON summary (last line)."""
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "benches" / "vllm" / script)], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_logprob_diff(a: dict, b: dict) -> float:
    return max(
        (abs(p - q) for x, y in zip(a["outputs"], b["outputs"]) for p, q in zip(x["logprobs"], y["logprobs"])),
        default=0.0,
    )


def assert_same_tokens(a: dict, b: dict, what: str) -> None:
    assert len(a["outputs"]) == len(b["outputs"])
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        assert x["tokens"] == y["tokens"], f"{what}: output {i} (round {x['round']}) differs"


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_outputs_match_stock_vllm_and_no_caching(case: str, tmp_path: Path) -> None:
    args = [*CASES[case], "--dtype", "float32"]
    stock = run_engine(tmp_path, "stock", ["--scheduler", "stock", *args])
    kv = run_engine(tmp_path, "kvalloc", ["--scheduler", "kvalloc", "--kvalloc", '{"verify": true}', *args])
    off = run_engine(tmp_path, "off", ["--scheduler", "stock", "--no-prefix-caching", *args])
    assert_same_tokens(stock, kv, "kvalloc vs stock")
    assert_same_tokens(off, kv, "kvalloc vs no prefix caching")
    noise = max_logprob_diff(stock, off)
    diff = max(max_logprob_diff(stock, kv), max_logprob_diff(off, kv))
    hits = {n: r["counters"].get("prefix_cache_hits") for n, r in (("stock", stock), ("kvalloc", kv))}
    preemptions = {n: r["counters"].get("num_preemptions") for n, r in (("stock", stock), ("kvalloc", kv), ("off", off))}
    cached = [(x["cached"], y["cached"]) for x, y in zip(stock["outputs"], kv["outputs"])]
    print(f"{case}: max logprob diff {diff} (stock vs off {noise}), hits {hits}, preemptions {preemptions}")
    print(f"{case}: num_cached_tokens per output (stock, kvalloc): {cached}")
    if case == "preempt":
        assert preemptions["kvalloc"] > 0 and preemptions["stock"] > 0, "the budget must force preemption"
    assert diff <= (KERNEL_NOISE if noise > 0 else 0.0), f"logprobs moved by {diff} (vLLM's own runs: {noise})"
    # More of each prompt is served from cache, never less over the workload.
    assert hits["kvalloc"] >= hits["stock"]


def test_bfloat16_runs_are_reported(tmp_path: Path) -> None:
    """bfloat16 CPU kernels round differently by batch shape, so two correct managers may
    differ (issue 23 saw 1 of 64 outputs): reported, with the tokens compared, not asserted."""
    args = [*CASES["chat"], "--dtype", "bfloat16"]
    stock = run_engine(tmp_path, "stock", ["--scheduler", "stock", *args])
    kv = run_engine(tmp_path, "kvalloc", ["--scheduler", "kvalloc", "--kvalloc", '{"verify": true}', *args])
    same = sum(x["tokens"] == y["tokens"] for x, y in zip(stock["outputs"], kv["outputs"]))
    print(f"bfloat16 chat: {same} of {len(stock['outputs'])} outputs identical, max logprob diff {max_logprob_diff(stock, kv)}")
    assert len(kv["outputs"]) == len(stock["outputs"])


def test_unsupported_features_are_refused_at_start_up(tmp_path: Path) -> None:
    """Speculative decoding is refused with an error naming it, before any request runs."""
    script = (
        "import os; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'\n"
        "from vllm import LLM\n"
        f"LLM(model={str(ROOT / 'benches/vllm/tiny-gemma3')!r}, load_format='dummy', skip_tokenizer_init=True,"
        " dtype='float32', enforce_eager=True, num_gpu_blocks_override=64, block_size=32, max_model_len=512,"
        " gpu_memory_utilization=0.05, scheduler_cls='kvalloc.vllm.KvallocScheduler',"
        " speculative_config={'method': 'ngram', 'num_speculative_tokens': 2, 'prompt_lookup_max': 3})\n"
    )
    proc = subprocess.run([str(VLLM_PYTHON), "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0
    assert "does not support" in proc.stderr + proc.stdout and "speculative decoding" in proc.stderr + proc.stdout


def test_kv_events_replay_to_the_blocks_kvalloc_holds() -> None:
    """vLLM's BlockStored/BlockRemoved events, drained by its scheduler each step, replay to
    exactly the blocks kvalloc caches, and every stored block's token ids are a block the run
    computed (``benches/vllm/events_check.py``)."""
    summary = run_check("events_check.py")
    print(f"events: {summary}")
    assert summary["problems"] == [] and summary["removed"] > 0


def test_cache_salts_keep_tenants_apart() -> None:
    """The same prompt under another ``cache_salt`` (or none) is served nothing from a salted
    request's blocks; under its own salt it is (``benches/vllm/salt_check.py``)."""
    print(f"cached tokens: {run_check('salt_check.py')}")
