"""kvalloc's KVCacheManager, driven through its batched `step` call.

Per scheduler step: one `step(finish=..., extend_ids=..., extend_tokens=...)` for last step's
finishes and this step's decode tokens; one flat `step(admit_ids=, admit_tokens=, admit_lens=)`
for the admissions (kept apart so that, as in the peers, nothing is admitted in a step that
had to preempt). The engine's block tables are read where they change: both groups' tables of
each admitted request, and of each running request whose new token opens a block. Preemption
is `finish` (the computed blocks stay cached) and a later admission of prompt + output so far,
as the README prescribes.
"""

from __future__ import annotations

import time

import numpy as np

import kvalloc
from geometry import Geometry
from workload import Request


class KvallocDriver:
    name = "kvalloc"

    def __init__(self, geo: Geometry, capacity_bytes: int) -> None:
        spec = kvalloc.ModelSpec.from_hf_config(geo.hf_config())
        self.m = kvalloc.KVCacheManager(spec, capacity_bytes, block_tokens=geo.block_tokens)
        self.groups = len(spec.groups)
        self.block = geo.block_tokens
        self.seconds = 0.0
        self._finish: list[int] = []

    def finish(self, reqs: list[Request]) -> None:
        # Deferred into the next decode call: one `step` carries both.
        self._finish.extend(r.rid for r in reqs)

    def _tables(self, rid: int) -> None:
        for g in range(self.groups):
            self.m.block_table(rid, g)

    def decode(self, running: list[Request]) -> list[Request]:
        m = self.m
        ids = np.fromiter((r.rid for r in running), dtype=np.int64, count=len(running))
        toks = np.fromiter((r.output[r.generated - 1] for r in running), dtype=np.int64, count=len(running))
        t0 = time.perf_counter()
        fin = np.array(self._finish, dtype=np.int64)
        self._finish.clear()
        _, ok = m.step(finish=fin, extend_ids=ids, extend_tokens=toks)
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
        block = self.block
        for r in running:
            if (len(r.prompt) + r.generated - 1) % block == 0:  # the new token opened a block
                self._tables(r.rid)
        self.seconds += time.perf_counter() - t0
        return preempted

    def admit(self, reqs: list[Request]) -> list[int]:
        ctxs = [r.context() for r in reqs]
        ids = np.fromiter((r.rid for r in reqs), dtype=np.int64, count=len(reqs))
        lens = np.fromiter((len(c) for c in ctxs), dtype=np.int64, count=len(reqs))
        toks = np.concatenate(ctxs)
        t0 = time.perf_counter()
        if self._finish:
            self.m.step(finish=np.array(self._finish, dtype=np.int64))
            self._finish.clear()
        hits, _ = self.m.step(admit_ids=ids, admit_tokens=toks, admit_lens=lens)
        out: list[int] = []
        for r, h in zip(reqs, hits):
            if h < 0:
                # FCFS: the first refusal ends the step's admissions; later ones that did fit
                # are dropped again so every manager admits the same prefix of the queue.
                for later in reqs[len(out) + 1 :]:
                    if later.rid in self.m:
                        self.m.abort(later.rid)
                break
            self._tables(r.rid)
            out.append(int(h))
        self.seconds += time.perf_counter() - t0
        return out

    def blocks_back(self) -> bool:
        if self._finish:
            self.m.step(finish=np.array(self._finish, dtype=np.int64))
            self._finish.clear()
        self.m.validate()
        s = self.m.stats()
        return s["running_requests"] == 0 and all(g["running"] == 0 for g in s["groups"])
