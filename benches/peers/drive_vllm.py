"""vLLM v1's KVCacheManager with one FullAttentionSpec group and one SlidingWindowSpec group,
prefix caching on, driven as `Scheduler` drives it. Every call below names the line of
vllm/v1/core/sched/scheduler.py (vLLM 0.33.0) whose call it mirrors; the same references sit
next to the calls.

- step start: `new_step_starts()` (`schedule`, line 746);
- decode, the running loop of `schedule`: `allocate_slots(request, 1)` per running request in
  order (line 914); on None, preempt `running.pop()` (line 970) with `_preempt_request`
  (line 1799: `free` through `_free_request_blocks` at 3089, status PREEMPTED,
  `num_computed_tokens = 0`) and retry, until the request fits or preempted itself; the new
  block ids are read with `get_block_ids(allow_none=True)` (line 1964);
- admission, the waiting loop of `schedule` (only in a step that preempted nothing):
  `get_computed_blocks(request)` (`_get_local_prefix_cache_hit`, line 674, called at 1127),
  then `allocate_slots(request, new tokens, num_new_computed_tokens=hit,
  new_computed_blocks=blocks, has_scheduled_reqs=bool(self.running))` (line 1435); a None
  ends the step's admissions (line 1461); an admitted request's blocks are read with
  `get_blocks(request_id)` (line 1566) and `.get_block_ids()` (line 1658);
- after the step: `num_computed_tokens += scheduled` (`_update_after_schedule`, line 1858)
  and `append_output_token_ids` (`_update_request_with_output`, line 2753; it hashes each
  newly filled block: part of the prefix cache's work);
- finish: `free(request)` (`_free_request` -> `_free_blocks` -> `_free_request_blocks`,
  line 3089).

Timed: each of `finish`, `decode` and `admit` from its first line, including building each
`Request` (which hashes the prompt's blocks), as kvalloc's driver times building its arrays.
Memory: `num_blocks = budget // (layers per group x page bytes per layer)`: in vLLM's hybrid
layout each block id names one page in each of 18 tensors, each tensor shared by one full and
one sliding layer (a block id belongs to one group at a time).
"""

from __future__ import annotations

import time

import torch

from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    KVCacheTensor,
    SlidingWindowSpec,
)
from vllm.v1.request import Request as VllmRequest
from vllm.v1.request import RequestStatus

from geometry import Geometry
from workload import Request

MAX_MODEL_LEN = 1 << 20
# vLLM's default (CacheConfig.prefix_caching_hash_algo).
HASH_ALGO = "sha256"


def kv_cache_config(geo: Geometry, capacity_bytes: int) -> KVCacheConfig:
    common = dict(
        block_size=geo.block_tokens,
        num_kv_heads=geo.kv_heads,
        head_size=geo.head_dim,
        dtype=torch.bfloat16,
    )
    full = FullAttentionSpec(**common)
    swa = SlidingWindowSpec(sliding_window=geo.window, **common)
    page = full.page_size_bytes
    assert page == swa.page_size_bytes == geo.block_tokens * geo.layer_bytes_per_token
    num_blocks = capacity_bytes // (geo.layers_per_kind * page)
    full_names = [f"model.layers.{2 * i + 1}.self_attn" for i in range(geo.layers_per_kind)]
    swa_names = [f"model.layers.{2 * i}.self_attn" for i in range(geo.layers_per_kind)]
    tensors = [
        KVCacheTensor(size=page * num_blocks, layers=[f, s], layer_stride=0, block_stride=page)
        for f, s in zip(full_names, swa_names)
    ]
    return KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=tensors,
        kv_cache_groups=[KVCacheGroupSpec(full_names, full), KVCacheGroupSpec(swa_names, swa)],
    )


class VllmDriver:
    name = "vLLM"

    def __init__(self, geo: Geometry, capacity_bytes: int) -> None:
        self.config = kv_cache_config(geo, capacity_bytes)
        self.m = KVCacheManager(
            kv_cache_config=self.config,
            max_model_len=MAX_MODEL_LEN,
            scheduler_block_size=geo.block_tokens,
            hash_block_size=geo.block_tokens,
            enable_caching=True,
        )
        hash_fn = get_hash_fn_by_name(HASH_ALGO)
        init_none_hash(hash_fn)
        self.hasher = get_request_block_hasher(geo.block_tokens, hash_fn)
        self.reqs: dict[int, VllmRequest] = {}
        self.running = 0  # requests the last decode kept running (the scheduler's self.running)
        self.seconds = 0.0

    def _request(self, r: Request) -> VllmRequest:
        # A preempted request keeps its Request (prompt + outputs so far), as in the scheduler.
        vr = self.reqs.get(r.rid)
        if vr is None:
            vr = VllmRequest(
                request_id=str(r.rid),
                prompt_token_ids=r.prompt.tolist(),
                sampling_params=SamplingParams(max_tokens=len(r.output)),
                pooling_params=None,
                block_hasher=self.hasher,
            )
            self.reqs[r.rid] = vr
        return vr

    def finish(self, reqs: list[Request]) -> None:
        t0 = time.perf_counter()
        for r in reqs:
            vr = self.reqs.pop(r.rid)
            vr.status = RequestStatus.FINISHED_LENGTH_CAPPED
            self.m.free(vr)  # scheduler.py:3089 (_free_request_blocks)
        self.seconds += time.perf_counter() - t0

    def refuse(self, r: Request) -> None:
        # allocate_slots said None before taking a block; only the Request is left.
        self.reqs.pop(r.rid, None)

    def _after_step(self, vr: VllmRequest, scheduled: int, token: int) -> None:
        vr.num_computed_tokens += scheduled  # scheduler.py:1858 (_update_after_schedule)
        vr.append_output_token_ids(int(token))  # scheduler.py:2753 (_update_request_with_output)

    def decode(self, running: list[Request]) -> list[Request]:
        m = self.m
        t0 = time.perf_counter()
        m.new_step_starts()  # scheduler.py:746 (schedule)
        preempted: list[Request] = []
        scheduled: list[Request] = []
        i = 0
        while i < len(running):
            r = running[i]
            vr = self.reqs[r.rid]
            while True:
                new_blocks = m.allocate_slots(vr, 1)  # scheduler.py:914
                if new_blocks is not None:
                    new_blocks.get_block_ids(allow_none=True)  # scheduler.py:1964
                    scheduled.append(r)
                    break
                victim = running.pop()  # scheduler.py:970
                vv = self.reqs[victim.rid]
                # scheduler.py:1799 (_preempt_request): free at 3089, then the request's reset
                m.free(vv)
                vv.status = RequestStatus.PREEMPTED
                vv.num_computed_tokens = 0
                vv.num_preemptions += 1
                preempted.append(victim)
                if victim is r:
                    break
            if preempted and preempted[-1] is r:
                break
            i += 1
        for r in scheduled:
            self._after_step(self.reqs[r.rid], 1, r.output[r.generated])
        self.running = len(running)
        self.seconds += time.perf_counter() - t0
        return preempted

    def admit(self, reqs: list[Request]) -> list[int]:
        m = self.m
        t0 = time.perf_counter()
        hits: list[int] = []
        admitted: list[tuple[VllmRequest, int, Request]] = []
        for r in reqs:
            vr = self._request(r)
            blocks, hit, _boundary = m.get_computed_blocks(vr)  # scheduler.py:674, via 1127
            new_tokens = vr.num_tokens - hit
            new_blocks = m.allocate_slots(  # scheduler.py:1435
                vr, new_tokens, num_new_computed_tokens=hit, new_computed_blocks=blocks,
                has_scheduled_reqs=bool(self.running + len(admitted)),  # bool(self.running), 1451
            )
            if new_blocks is None:
                break  # scheduler.py:1461
            vr.status = RequestStatus.RUNNING
            m.get_blocks(vr.request_id).get_block_ids()  # scheduler.py:1566, then 1658
            admitted.append((vr, new_tokens, r))
            hits.append(hit)
        for vr, new_tokens, r in admitted:
            self._after_step(vr, new_tokens, r.output[r.generated])
        self.seconds += time.perf_counter() - t0
        return hits

    def blocks_back(self) -> bool:
        pool = self.m.block_pool
        # Every block but the null block is free or an evictable cached block.
        return not self.reqs and pool.get_num_free_blocks() == self.config.num_blocks - 1
