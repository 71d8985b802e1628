"""kvalloc's KVCacheManager, driven through its batched `step` call: one call per scheduler step.

Per step one `step(finish=..., extend_ids=..., extend_tokens=..., admit_ids=..., admit_tokens=...,
admit_lens=..., fcfs=True, admit_if_extended=True)`: last step's finishes, this step's decode
tokens, then the waiting queue's head in order, stopping at the first that does not fit (`fcfs`,
as the peers' schedulers do) and admitting nothing if a decode token did not fit
(`admit_if_extended`: as in the peers, a step that preempts admits nothing new). The step's
`StepResult` answers "did every extension fit" and "how many got in" as ints. The engine keeps
its own block tables, as vLLM's workers do, and reads only what it lacks, with one
`block_tables` call for all groups: the whole tables of the admitted requests, and only the new
block of each running request whose decode token opened one (`start=`, as vLLM's
`allocate_slots` returns only new blocks). Preemption is `finish` (the computed blocks stay
cached) and a later admission of prompt + output so far, as the README prescribes.

Timed: the whole `step` method, from its first line: building the id, token and context arrays
(`np.fromiter`, `np.concatenate`), the `step` call, any preemption's `finish`/`extend` calls and
the `block_tables` read. A finish costs nothing until the next step carries it.
"""

from __future__ import annotations

import time
from typing import Any

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
        self.block = geo.block_tokens
        self.seconds = 0.0
        self._finish: list[int] = []

    def finish(self, reqs: list[Request]) -> None:
        # Deferred into the next decode call: one `step` carries both.
        self._finish.extend(r.rid for r in reqs)

    def step(self, running: list[Request], candidates: list[Request]) -> tuple[list[Request], list[int]]:
        # Timed from the top of the step: building the input arrays is part of the cost, as
        # building request objects and tensors is in the peers' drivers.
        t0 = time.perf_counter()
        m = self.m
        ids = np.fromiter((r.rid for r in running), dtype=np.int64, count=len(running))
        toks = np.fromiter((r.output[r.generated - 1] for r in running), dtype=np.int64, count=len(running))
        # Requests whose new token opens a block, and that block's index (the scheduler knows
        # every request's length).
        block = self.block
        rows: list[int] = []
        starts: list[int] = []
        for r in running:
            n = len(r.prompt) + r.generated - 1  # tokens before the new one
            if n % block == 0:
                rows.append(r.rid)
                starts.append(n // block)
        admit: dict[str, Any] = {}
        if candidates:
            ctxs = [r.context() for r in candidates]
            admit = dict(
                admit_ids=np.fromiter((r.rid for r in candidates), dtype=np.int64, count=len(candidates)),
                admit_tokens=np.concatenate(ctxs),
                admit_lens=np.fromiter((len(c) for c in ctxs), dtype=np.int64, count=len(candidates)),
                fcfs=True,
                admit_if_extended=True,
            )
        res = m.step(finish=self._finish, extend_ids=ids, extend_tokens=toks, **admit)
        self._finish = []
        preempted: list[Request] = []
        hits: list[int] = []
        if res.refused_extensions:
            # Preempt from the tail until each refused extension fits (nothing was admitted).
            ok = res.extended
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
            kept = [k for k, rid in enumerate(rows) if rid not in gone]
            rows, starts = [rows[k] for k in kept], [starts[k] for k in kept]
        elif res.admitted:
            # FCFS: the admitted requests are the first `res.admitted` candidates; their whole
            # tables are new.
            n = res.admitted
            hits = res.hits[:n].tolist()
            rows.extend(r.rid for r in candidates[:n])
            starts.extend([0] * n)
        if rows:
            m.block_tables(rows, start=starts)  # every group's, one call
        self.seconds += time.perf_counter() - t0
        return preempted, hits

    def refuse(self, r: Request) -> None:
        """Nothing to drop: a refused admission registers nothing, and a preempted request was
        finished."""

    def blocks_back(self) -> bool:
        if self._finish:
            self.m.step(finish=self._finish)
            self._finish = []
        self.m.validate()
        s = self.m.stats()
        return s["running_requests"] == 0 and all(g["running"] == 0 for g in s["groups"])
