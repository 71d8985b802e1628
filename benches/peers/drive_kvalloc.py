"""kvalloc's KVCacheManager, driven through its batched `step` call.

Per scheduler step: one `step(finish=..., extend_ids=..., extend_tokens=...)` for last step's
finishes and this step's decode tokens; one flat `step(admit_ids=, admit_tokens=, admit_lens=,
fcfs=True)` for the admissions (kept apart so that, as in the peers, nothing is admitted in a
step that had to preempt; `fcfs` stops at the first that does not fit, as the peers' schedulers
do). The step's `StepResult` answers "did every extension fit" and "how many got in" as ints.
The engine keeps its own block tables, as vLLM's workers do, and reads only what it lacks,
with one `block_tables` call for all groups: the whole tables of the admitted requests, and
the new block of each running request whose new token opens one (`start=` its index, as
vLLM's `allocate_slots` returns only new blocks). Preemption is `finish` (the computed blocks
stay cached) and a later admission of prompt + output so far, as the README prescribes.
"""

from __future__ import annotations

import time

import numpy as np

import kvalloc
from geometry import Geometry
from workload import Request


class KvallocDriver:
    name = "kvalloc"

    def __init__(self, geo: Geometry, capacity_bytes: int, watermark: float = 0.0) -> None:
        spec = kvalloc.ModelSpec.from_hf_config(geo.hf_config())
        self.m = kvalloc.KVCacheManager(
            spec, capacity_bytes, block_tokens=geo.block_tokens, watermark=watermark
        )
        self.groups = len(spec.groups)
        self.block = geo.block_tokens
        self.seconds = 0.0
        self._finish: list[int] = []

    def finish(self, reqs: list[Request]) -> None:
        # Deferred into the next decode call: one `step` carries both.
        self._finish.extend(r.rid for r in reqs)

    def decode(self, running: list[Request]) -> list[Request]:
        m = self.m
        ids = np.fromiter((r.rid for r in running), dtype=np.int64, count=len(running))
        toks = np.fromiter((r.output[r.generated - 1] for r in running), dtype=np.int64, count=len(running))
        # Requests whose new token opens a block, and that block's index (the scheduler knows
        # every request's length).
        block = self.block
        opened: list[int] = []
        opened_at: list[int] = []
        for r in running:
            n = len(r.prompt) + r.generated - 1  # tokens before the new one
            if n % block == 0:
                opened.append(r.rid)
                opened_at.append(n // block)
        t0 = time.perf_counter()
        res = m.step(finish=self._finish, extend_ids=ids, extend_tokens=toks)
        self._finish = []
        preempted: list[Request] = []
        if res.refused_extensions:
            ok = res.extended
            # Preempt from the tail until each refused extension fits.
            i = 0
            while i < len(running):
                r = running[i]
                if not ok[i]:
                    while True:
                        victim = running.pop()
                        m.finish(victim.rid)
                        preempted.append(victim)
                        if victim is r or m.extend(r.rid, np.array([toks[i]], dtype=np.int64)):
                            break
                i += 1
            gone = {r.rid for r in preempted}
            kept = [k for k, rid in enumerate(opened) if rid not in gone]
            opened, opened_at = [opened[k] for k in kept], [opened_at[k] for k in kept]
        if opened:
            m.block_tables(opened, start=opened_at)
        self.seconds += time.perf_counter() - t0
        return preempted

    def admit(self, reqs: list[Request]) -> list[int]:
        ctxs = [r.context() for r in reqs]
        ids = np.fromiter((r.rid for r in reqs), dtype=np.int64, count=len(reqs))
        lens = np.fromiter((len(c) for c in ctxs), dtype=np.int64, count=len(reqs))
        toks = np.concatenate(ctxs)
        t0 = time.perf_counter()
        res = self.m.step(finish=self._finish, admit_ids=ids, admit_tokens=toks, admit_lens=lens, fcfs=True)
        self._finish = []
        # FCFS: the admitted requests are the first `res.admitted` of the queue.
        n = res.admitted
        out: list[int] = res.hits[:n].tolist() if n else []
        if n:
            self.m.block_tables([r.rid for r in reqs[:n]])  # whole tables, every group's
        self.seconds += time.perf_counter() - t0
        return out

    def blocks_back(self) -> bool:
        if self._finish:
            self.m.step(finish=self._finish)
            self._finish = []
        self.m.validate()
        s = self.m.stats()
        return s["running_requests"] == 0 and all(g["running"] == 0 for g in s["groups"])
