"""kvalloc's KVCacheManager, driven through its batched `step` call.

Per scheduler step: one `step(finish=..., extend_ids=..., extend_tokens=...)` for last step's
finishes and this step's decode tokens; one flat `step(admit_ids=, admit_tokens=, admit_lens=,
fcfs=True)` for the admissions (kept apart so that, as in the peers, nothing is admitted in a
step that had to preempt; `fcfs` stops at the first that does not fit, as the peers' schedulers
do). The engine's block tables are read where they change, with one `block_tables` call for
all groups: those of the admitted requests, and of the running requests whose new token opens a
block. Preemption is `finish` (the computed blocks stay cached) and a later admission of
prompt + output so far, as the README prescribes.
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

    def _tables(self, rids: list[int]) -> None:
        if rids:
            self.m.block_tables(rids)  # every group's, one call

    def decode(self, running: list[Request]) -> list[Request]:
        m = self.m
        ids = np.fromiter((r.rid for r in running), dtype=np.int64, count=len(running))
        toks = np.fromiter((r.output[r.generated - 1] for r in running), dtype=np.int64, count=len(running))
        # Requests whose new token opens a block (the scheduler knows every request's length).
        block = self.block
        opened = [r.rid for r in running if (len(r.prompt) + r.generated - 1) % block == 0]
        t0 = time.perf_counter()
        _, ok = m.step(finish=self._finish, extend_ids=ids, extend_tokens=toks)
        self._finish = []
        preempted: list[Request] = []
        if not ok.all():
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
        if preempted:
            gone = {r.rid for r in preempted}
            opened = [rid for rid in opened if rid not in gone]
        self._tables(opened)
        self.seconds += time.perf_counter() - t0
        return preempted

    def admit(self, reqs: list[Request]) -> list[int]:
        ctxs = [r.context() for r in reqs]
        ids = np.fromiter((r.rid for r in reqs), dtype=np.int64, count=len(reqs))
        lens = np.fromiter((len(c) for c in ctxs), dtype=np.int64, count=len(reqs))
        toks = np.concatenate(ctxs)
        t0 = time.perf_counter()
        hits, _ = self.m.step(finish=self._finish, admit_ids=ids, admit_tokens=toks, admit_lens=lens, fcfs=True)
        self._finish = []
        # FCFS: the admitted requests are a prefix of the queue (small: plain Python is faster
        # than numpy here).
        out: list[int] = []
        for h in hits.tolist():
            if h < 0:
                break
            out.append(h)
        self._tables([r.rid for r in reqs[: len(out)]])
        self.seconds += time.perf_counter() - t0
        return out

    def blocks_back(self) -> bool:
        if self._finish:
            self.m.step(finish=self._finish)
            self._finish = []
        self.m.validate()
        s = self.m.stats()
        return s["running_requests"] == 0 and all(g["running"] == 0 for g in s["groups"])
