"""SGLang's UnifiedRadixCache with a FULL and an SWA component, on its real allocator
(SWATokenToKVPoolAllocator over an SWAKVPool, page size = block size) and its real `Req`s,
driven with the calls its scheduler makes. Every call below names the place in SGLang 0.5.23
(paths under `sglang/srt/`) whose call it mirrors; the same references sit next to the calls.

- admission (`Scheduler._get_new_batch_prefill_raw`, managers/scheduler.py):
  - `req.init_next_round_input(tree_cache)`: the prefix match (`match_kv_cache`),
    managers/scheduler.py:4260;
  - `tree_cache.lock(req.last_node)`: `PrefillAdder._commit_prefill_admission`,
    managers/schedule_policy.py:1690;
  - the fit check evicts with `allocator.evict_to_free_tokens`, the call
    `evict_from_tree_cache` makes (mem_cache/common.py:287) inside
    `alloc_paged_token_slots_extend` (mem_cache/allocation.py:201); SGLang's own PrefillAdder
    counts the evictable tokens into its budget instead (`add_one_req`,
    managers/schedule_policy.py:1395);
  - then for the admitted batch, as `alloc_for_extend` (mem_cache/allocation.py:374) does:
    `tree_cache.prefix_device_indices` (`_prefix_kv_indices`, allocation.py:371, called at 387),
    `alloc_req_slots` (allocation.py:405), `alloc_paged_token_slots_extend` (allocation.py:439;
    evicts, then `alloc_extend` of full and SWA pages), `write_cache_indices` (allocation.py:452);
- after the prefill (`process_batch_result_prefill`,
  managers/scheduler_components/batch_result_processor.py): the sampled token goes to
  `req.output_ids` (line 365); a request the token does not finish is checkpointed with
  `checkpoint_kv_cache(req, tree_cache)` (line 394): its prompt enters the tree while it runs,
  so later requests can match it before it finishes;
- decode (`Scheduler.update_running_batch`, managers/scheduler.py:4459):
  - `batch.check_decode_mem` (line 4469; managers/schedule_batch.py:3432, which calls
    `allocator.check_decode_capacity` at 3444 and evicts);
  - on failure, `batch.retract_decode` (scheduler.py:4493; schedule_batch.py:3451): retract from
    the tail with `release_req` (schedule_batch.py:3488 -> 2360, which releases the KV without
    inserting it: SGLang recomputes a retracted request) until the check passes, keeping at
    least one request;
  - then `prepare_for_decode` -> `alloc_for_decode_default` (mem_cache/allocation.py:625):
    `maybe_evict_swa` (schedule_batch.py:4068: `free_group_begin` at 4080, the per-request
    `tree_cache.evict_sliding_windows` at 4127 that frees out-of-window SWA pages,
    `free_group_end` at 4123), one batched `alloc_paged_token_slots_decode` for every running
    request (allocation.py:647) and the `req_to_token_pool.write` (allocation.py:663);
  - the sampled token is appended to `req.output_ids` (`process_batch_result_decode`,
    batch_result_processor.py:1046);
- finish: `release_kv_cache(req, tree_cache, checkpoint=True)`
  (`_handle_finish_state_updated_req`, batch_result_processor.py:1466; mem_cache/common.py:400:
  insert into the tree, free the duplicates and the row, unlock).

The admission criterion is the shared simulator's (fits now), not PrefillAdder's reservation
for future decode tokens, so every manager admits by the same rule. Where SGLang aborts the
last request left in a decode batch that still does not fit (`retract_decode`,
schedule_batch.py:3508-3527), the driver retracts it like the others, and the simulator
refuses it when it cannot be admitted again with nothing running.

Memory: SGLang sizes a hybrid SWA model from bytes per "cell" = full bytes/token +
swa_full_tokens_ratio x SWA bytes/token (model_executor/pool_configurator.py), with the ratio's
default 0.8: full tokens = budget // cell, SWA tokens = 0.8 x full tokens, both page-aligned.
The scheduler's config is published from a default `ServerArgs` (CPU, torch_native attention,
no model), as the scheduler process does at start.

Timed: each of `finish`, `decode` and `admit` from its first line, so building each `Req` and
every tensor the calls take is inside the timed region, as kvalloc's driver times building its
arrays.
"""

from __future__ import annotations

import logging
import time
from array import array

import torch

from sglang.srt.environ import envs
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req, release_req
from sglang.srt.mem_cache.allocation import (
    alloc_paged_token_slots_decode,
    alloc_paged_token_slots_extend,
    alloc_req_slots,
    write_cache_indices,
)
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import checkpoint_kv_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
from sglang.srt.runtime_context import publish
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

from geometry import Geometry
from workload import Request

# SGLang's default --swa-full-tokens-ratio (arg_groups/fields/schedule.py).
SWA_FULL_TOKENS_RATIO = 0.8
# Request rows (--max-running-requests) and their width (--context-length); rows are
# written only where used.
REQ_SLOTS = 1024
MAX_CONTEXT = 1 << 18
DEVICE = "cpu"


def pool_tokens(geo: Geometry, capacity_bytes: int) -> tuple[int, int]:
    """(full tokens, SWA tokens) as SGLang's pool configurator splits the budget."""
    page = geo.block_tokens
    cell = geo.kind_bytes_per_token * (1 + SWA_FULL_TOKENS_RATIO)
    full = int(capacity_bytes // cell) // page * page
    return full, int(full * SWA_FULL_TOKENS_RATIO) // page * page


class SglangDriver:
    name = "SGLang"

    def __init__(self, geo: Geometry, capacity_bytes: int) -> None:
        logging.getLogger("sglang").setLevel(logging.ERROR)
        page = geo.block_tokens
        # The scheduler process's published config (defaults; no model is loaded): the
        # memory helpers read it (disaggregation mode, speculative decoding, attention backend).
        publish(
            ServerArgs(model_path="dummy", device=DEVICE, page_size=page, attention_backend="torch_native"),
            role="scheduler",
        )
        self.page = page
        self.full_tokens, self.swa_tokens = pool_tokens(geo, capacity_bytes)
        n = geo.layers_per_kind
        pool = SWAKVPool(
            size=self.full_tokens,
            size_swa=self.swa_tokens,
            page_size=page,
            dtype=torch.bfloat16,
            head_num=geo.kv_heads,
            head_dim=geo.head_dim,
            swa_attention_layer_ids=[2 * i for i in range(n)],
            full_attention_layer_ids=[2 * i + 1 for i in range(n)],
            device=DEVICE,
            enable_memory_saver=False,
        )
        self.alloc = SWATokenToKVPoolAllocator(
            self.full_tokens, self.swa_tokens, page, torch.bfloat16, DEVICE, pool, need_sort=False
        )
        self.rtp = ReqToTokenPool(size=REQ_SLOTS, max_context_len=MAX_CONTEXT, device=DEVICE, enable_memory_saver=False)
        self.tree = UnifiedRadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=self.rtp,
                token_to_kv_pool_allocator=self.alloc,
                page_size=page,
                sliding_window_size=geo.window,
                tree_components=(ComponentType.FULL, ComponentType.SWA),
            )
        )
        self.window = self.tree.swa_retain_window
        self.evict_interval = max(1, envs.SGLANG_SWA_EVICTION_INTERVAL.get())
        self.retract_steps = envs.SGLANG_RETRACT_DECODE_STEPS.get()
        self.reqs: dict[int, Req] = {}
        self.seconds = 0.0

    @property
    def backend(self) -> str:
        return self.tree._tree_core_backend

    def _req(self, r: Request) -> Req:
        # A retracted request keeps its Req (prompt + outputs so far), as in the scheduler.
        req = self.reqs.get(r.rid)
        if req is None:
            req = Req(
                rid=str(r.rid),
                origin_input_text="",
                origin_input_ids=array("q", r.prompt.tobytes()),
                sampling_params=SamplingParams(max_new_tokens=len(r.output)),
            )
            self.reqs[r.rid] = req
        return req

    def finish(self, reqs: list[Request]) -> None:
        t0 = time.perf_counter()
        for r in reqs:
            req = self.reqs.pop(r.rid)
            req.finished_reason = FINISH_LENGTH(length=len(r.output))
            # batch_result_processor.py:1466 (_handle_finish_state_updated_req)
            release_kv_cache(req, self.tree, checkpoint=True)
        self.seconds += time.perf_counter() - t0

    def refuse(self, r: Request) -> None:
        # Its lock was released when it did not fit; only the Req is left.
        self.reqs.pop(r.rid, None)

    def _retract(self, req: Req, remaining: int) -> None:
        # schedule_batch.py:3488 (ScheduleBatch.retract_decode) -> release_req at 2360
        release_req(
            req=req,
            remaing_req_count=remaining,
            req_to_token_pool=self.rtp,
            token_to_kv_pool_allocator=self.alloc,
            tree_cache=self.tree,
            hisparse_coordinator=None,
        )

    def decode(self, running: list[Request]) -> list[Request]:
        t0 = time.perf_counter()
        alloc, tree, page = self.alloc, self.tree, self.page
        reqs = [self.reqs[r.rid] for r in running]
        preempted: list[Request] = []
        # update_running_batch: check_decode_mem, retracting (from the tail, the shared
        # simulator's order) until the step fits.
        while reqs:
            need = sum(1 for q in reqs if q.kv.kv_committed_len % page == 0) * page
            # scheduler.py:4469 (update_running_batch) -> schedule_batch.py:3444 (check_decode_mem)
            if alloc.check_decode_capacity(num_tokens=need, tree_cache=tree, requests=reqs):
                break
            # A last request that still does not fit is retracted too (SGLang aborts it,
            # schedule_batch.py:3508-3527); the simulator refuses it if it cannot come back.
            victim = running.pop()
            self._retract(reqs.pop(), len(reqs))
            preempted.append(victim)
        if reqs:
            # prepare_for_decode -> alloc_for_decode_default (allocation.py:625): maybe_evict_swa,
            # then one batched alloc.
            alloc.free_group_begin()  # schedule_batch.py:4080 (maybe_evict_swa)
            for q in reqs:
                # schedule_batch.py:4086-4090, the trigger of _swa_eviction_trigger (4063)
                if (
                    q.decode_batch_idx >= 1
                    and q.seqlen - 1 - self.window >= q.kv.get_evicted_seqlen(ComponentType.SWA) + self.evict_interval
                ):
                    tree.evict_sliding_windows(q, q.seqlen - 1)  # schedule_batch.py:4127 (_evict_swa)
            alloc.free_group_end()  # schedule_batch.py:4123
            rows = torch.tensor([q.kv.req_pool_idx for q in reqs], dtype=torch.int64)
            seq_lens = torch.tensor([q.kv.kv_committed_len for q in reqs], dtype=torch.int64)
            last_loc = self.rtp.req_to_token[rows, seq_lens - 1]
            out = alloc_paged_token_slots_decode(  # allocation.py:647 (alloc_for_decode_default)
                tree_cache=tree, seq_lens=seq_lens + 1, seq_lens_cpu=seq_lens + 1, last_loc=last_loc
            )
            self.rtp.write((rows, seq_lens), out.to(torch.int32))  # allocation.py:663
            for q, r in zip(reqs, running):
                q.kv.kv_allocated_len += 1
                q.kv.kv_committed_len += 1
                q.decode_batch_idx += 1
                # the step's sampled token: batch_result_processor.py:1046 (process_batch_result_decode)
                q.output_ids.append(int(r.output[r.generated]))
        self.seconds += time.perf_counter() - t0
        return preempted

    def admit(self, reqs: list[Request]) -> list[int]:
        t0 = time.perf_counter()
        alloc, tree, page = self.alloc, self.tree, self.page
        batch: list[Req] = []
        demand = 0
        for r in reqs:
            req = self._req(r)
            req.init_next_round_input(tree)  # scheduler.py:4260 (_get_new_batch_prefill_raw)
            extend = len(req.full_untruncated_fill_ids) - req.prefix_len
            # alloc_paged_token_slots_extend's estimate: the extend plus a page per request.
            need = demand + extend + page
            lock = tree.lock(req.last_node)  # schedule_policy.py:1690 (_commit_prefill_admission)
            # The eviction alloc_paged_token_slots_extend would make (allocation.py:201 ->
            # common.py:287), made before the fit check so that it sees what eviction frees.
            alloc.evict_to_free_tokens(tree, need)
            if alloc.available_size() < need or self.rtp.available_size() <= len(batch):
                tree.unlock(lock)
                break
            req.lock = lock
            req.extend_end = len(req.full_untruncated_fill_ids)
            batch.append(req)
            demand = need
        hits = [q.prefix_len for q in batch]
        if batch:
            self._alloc_extend(batch)
            # process_batch_result_prefill (batch_result_processor.py:258), per request:
            for q, r in zip(batch, reqs):
                q.output_ids.append(int(r.output[r.generated]))  # line 365: the sampled token
                # line 394: a request the token does not finish publishes its prompt now (the
                # workload's only finish is its length: `update_finish_state`'s length cap).
                if len(q.output_ids) < q.sampling_params.max_new_tokens:
                    checkpoint_kv_cache(q, tree)
        self.seconds += time.perf_counter() - t0
        return hits

    def _alloc_extend(self, batch: list[Req]) -> None:
        """alloc_for_extend for a batch of new (or retracted) requests."""
        tree = self.tree
        prefix = [tree.prefix_device_indices(q) for q in batch]  # allocation.py:371 via 387
        prefix_lens = torch.tensor([q.prefix_len for q in batch], dtype=torch.int64)
        seq_lens = torch.tensor([q.extend_end for q in batch], dtype=torch.int64)
        extend_lens = seq_lens - prefix_lens
        rows = torch.tensor(alloc_req_slots(self.rtp, batch, tree), dtype=torch.int64)  # allocation.py:405
        last_loc = torch.cat([t[-1:] if len(t) else torch.full((1,), -1, dtype=torch.int64) for t in prefix])
        out = alloc_paged_token_slots_extend(  # allocation.py:439
            tree_cache=tree,
            prefix_lens=prefix_lens,
            prefix_lens_cpu=prefix_lens,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens,
            last_loc=last_loc,
            extend_num_tokens=int(extend_lens.sum()),
        )
        write_cache_indices(  # allocation.py:452
            out, rows, rows, prefix_lens, prefix_lens, seq_lens, seq_lens, extend_lens, extend_lens, prefix, self.rtp
        )
        for q, n in zip(batch, seq_lens.tolist()):
            q.kv.kv_allocated_len = n
            q.kv.kv_committed_len = n

    def blocks_back(self) -> bool:
        a, t = self.alloc, self.tree
        return (
            not self.reqs
            and self.rtp.available_size() == REQ_SLOTS
            and a.full_available_size() + t.full_evictable_size() == self.full_tokens
            and a.swa_available_size() + t.swa_evictable_size() == self.swa_tokens
        )
