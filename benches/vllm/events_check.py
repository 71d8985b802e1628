"""Checks kvalloc's vLLM events against its cache: runs a chat workload through ``vllm.LLM`` with
KV events on, collects every batch the scheduler drains (``take_events``), replays them, and
compares the result with the blocks kvalloc holds (``cached_blocks``). kvalloc's own events,
published by the plug-in on its ``events_endpoint`` socket, are received by a plain ZeroMQ
subscriber and replayed to its resume points (``resume_points``). Prints a JSON summary; exits
non-zero on a mismatch.

    .venv-vllm/bin/python benches/vllm/events_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import llm_kwargs  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def main() -> int:
    from vllm import LLM, SamplingParams
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    llm = LLM(
        **llm_kwargs(
            num_gpu_blocks_override=56,
            max_model_len=512,
            scheduler_cls="kvalloc.vllm.KvallocScheduler",
            kv_events_config={"enable_kv_cache_events": True, "publisher": "null"},
            additional_config={"kvalloc": {"events_endpoint": "tcp://127.0.0.1:*"}},
        )
    )
    manager = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    import msgspec
    import zmq

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kvalloc")
    sub.connect(manager.events_publisher.extensions_endpoint)
    assert manager.events_publisher.wait_for_subscriber(extensions=True)
    drained = []
    take = manager.take_events

    def recording_take():
        events = take()
        drained.extend(events)
        return events

    manager.take_events = recording_take
    sp = SamplingParams(max_tokens=16, temperature=0.0, detokenize=False, ignore_eos=True)
    rounds, build = WORKLOADS["chat"](conversations=6)
    history: list = []
    prompts_by_round = []
    for r in range(rounds):
        prompts = build(r, history)
        prompts_by_round.append(prompts)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        history.append([(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)])
    drained.extend(take())

    replay: set[tuple[int, int]] = set()
    problems = []
    stored = removed = 0
    for e in drained:
        if isinstance(e, BlockStored):
            stored += 1
            key = (e.group_idx, e.block_hashes[0])
            if key in replay:
                problems.append(f"stored twice: {key}")
            replay.add(key)
            if len(e.token_ids) not in (0, e.block_size):
                problems.append(f"stored block with {len(e.token_ids)} token ids")
        elif isinstance(e, BlockRemoved):
            removed += 1
            key = (e.group_idx, e.block_hashes[0])
            if key not in replay:
                problems.append(f"removed but never stored: {key}")
            replay.discard(key)
        elif isinstance(e, AllBlocksCleared):
            replay.clear()
    resume: dict[int, int] = {}
    kinds: set[str] = set()
    seqs = []
    while sub.poll(2000):
        topic, seq, payload = sub.recv_multipart()
        seqs.append(int.from_bytes(seq, "big"))
        for ev in msgspec.msgpack.decode(payload)[1]:
            kinds.add(ev["type"])
            if ev["type"] == "Resumable":
                resume[ev["block_hash"]] = ev["block_index"]
            elif ev["type"] == "NotResumable":
                del resume[ev["block_hash"]]
            elif ev["type"] == "AllBlocksCleared":
                resume.clear()
    points = manager.kv.resume_points()
    if resume != dict(zip(points["hash"].tolist(), points["block"].tolist())) or not resume:
        problems.append(f"resume points replayed {len(resume)}, kvalloc holds {len(points['hash'])}")
    if seqs != list(range(len(seqs))):
        problems.append("extension batches out of sequence")
    cached = manager.kv.cached_blocks()
    to_vllm = {k: v for v, k in enumerate(manager.geometry.kvalloc_group)}
    held = {(to_vllm[g], h) for g, h in zip(cached["group"].tolist(), cached["hash"].tolist())}
    if held != replay:
        problems.append(f"replay holds {len(replay)} blocks, kvalloc {len(held)}; {len(replay ^ held)} differ")
    with_tokens = sum(1 for e in drained if isinstance(e, BlockStored) and e.token_ids)
    # Each stored block's token ids are a block of some prompt or output the run saw.
    sequences = [p + o for rnd in history for p, o in rnd]
    blocks = {tuple(s[i : i + 32]) for s in sequences for i in range(0, len(s) - 31, 32)}
    for e in drained:
        if isinstance(e, BlockStored) and e.token_ids and tuple(e.token_ids) not in blocks:
            problems.append("a stored block's token ids are no block of any sequence")
            break
    print(json.dumps({"stored": stored, "removed": removed, "with_tokens": with_tokens, "held": len(held),
                      "resume_points": len(resume), "extension_kinds": sorted(kinds), "problems": problems[:10]}))
    return 1 if problems or removed == 0 or stored == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
