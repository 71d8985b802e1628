"""vLLM's KV-cache manager interface over one ``kvalloc.KVCacheManager``.

vLLM's scheduler (``vllm/v1/core/sched/scheduler.py``, 0.32.0) drives its ``KVCacheManager``
through the calls below; this class answers them from kvalloc. What maps onto what:

- a vLLM request (a string id) is a kvalloc request (an int id) from its admission
  (the first ``allocate_slots``) to ``free``;
- ``get_computed_blocks`` is ``match_prefix`` (window-safe: a sliding-window group's hit
  needs its window, which kvalloc keeps only at checkpoints);
- ``allocate_slots`` is ``admit`` for a new request (``max_tokens``: this step's chunk) and
  ``extend`` for a running one: by a count inside the prompt it was admitted with (chunked
  prefill), by token ids past it (decode), so output tokens are hashed and cached too;
- ``free`` is ``finish`` (the request's whole blocks stay cached) once every scheduled token
  was computed, else ``abort``: a request preempted after this step scheduled it has blocks
  the model never wrote, and those must never be served as a hit;
- block ids are arena pages plus one (id 0 is vLLM's null block, kvalloc's ``NULL_PAGE``);
- a request's ``priority`` (lower is more important, default 0) is kvalloc's retention
  ``priority`` negated (higher is kept longer), clamped to kvalloc's range: a request vLLM
  schedules first also keeps its cached prefix longer under ``eviction="value"``.

The engine keeps its own copy of each request's block table and appends the new ids each step
(vLLM's ``new_block_ids``), so kvalloc's tables must only grow at the end: an entry the engine
already has is never changed, only released to the null block out of the window, where
attention does not read. ``verify=True`` checks that on every call.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _core
from .geometry import VllmGeometry

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.metrics.stats import PrefixCacheStats

#: Options a deployment may set (``additional_config={"kvalloc": {...}}``), passed to
#: ``kvalloc.KVCacheManager``; ``verify`` checks the tables the engine holds on every call.
MANAGER_OPTIONS = (
    "policy",
    "eviction",
    "checkpoint_interval",
    "host_bytes",
    "disk_dir",
    "disk_bytes",
    "remote_url",
    "remote_bytes",
    "remote_prefix",
    "remote_timeout_ms",
    "secret",
    "model_id",
    "prefault_bytes",
)


def _token_array(request: Any, start: int, end: int) -> np.ndarray:
    return np.asarray(request.all_token_ids[start:end], dtype=np.int64)


def retention_priority(request: Any) -> int:
    """kvalloc's retention priority for a vLLM request: vLLM's ``priority`` (lower is more
    important, default 0) negated, clamped to ``[-MAX_PRIORITY, MAX_PRIORITY]``."""
    p = -int(getattr(request, "priority", 0) or 0)
    return max(-_core.MAX_PRIORITY, min(_core.MAX_PRIORITY, p))


def request_salt(request: Any) -> bytes | None:
    """The salt that keeps a request's KV apart from requests it must not share with.

    vLLM hashes a block with its cache salt, LoRA name, multimodal inputs and prompt embeddings
    ("extra keys"); kvalloc hashes token ids under a salt. The salt here carries the cache salt
    and the LoRA name (as vLLM's do for every block) and every multimodal input's identity and
    position for the whole request (stricter than vLLM, which keys only the blocks an input
    overlaps: such requests share less, never more). Prompt embeddings get a salt of their own:
    such a request shares nothing.
    """
    parts: list[bytes] = []
    if request.cache_salt is not None:
        parts.append(b"salt\0" + str(request.cache_salt).encode())
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(b"lora\0" + str(lora.lora_name).encode())
    for f in getattr(request, "mm_features", None) or ():
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        pos = getattr(f, "mm_position", None)
        parts.append(f"mm\0{ident}\0{getattr(pos, 'offset', None)}\0{getattr(pos, 'length', None)}".encode())
    if getattr(request, "prompt_embeds", None) is not None:
        parts.append(b"embeds\0" + uuid.uuid4().bytes)
    if not parts:
        return None
    return hashlib.blake2b(b"\1".join(parts), digest_size=16).digest()


@dataclass(frozen=True)
class GroupView:
    """What vLLM reads of a KV-cache group's manager (``coordinator.single_type_managers``)."""

    kv_cache_group_id: int
    kv_cache_spec: Any
    block_size: int
    retains_longer_hit: bool = False


@dataclass(frozen=True)
class CoordinatorView:
    """The parts of vLLM's coordinator its engine and scheduler read outside the manager:
    per-group specs and block sizes, and the features kvalloc's plug-in runs without."""

    single_type_managers: tuple[GroupView, ...]
    enable_partial_hash_hits: bool = False
    eagle_group_ids: tuple[int, ...] = ()
    num_reprefillable_tokens: int = 0


class BlockPoolView:
    """What vLLM's scheduler and tests read of its block pool: free blocks (free or held only by
    the cache, as in vLLM's free queue; the null block not counted) and usage."""

    def __init__(self, manager: "KvallocKVCacheManager") -> None:
        self._manager = manager
        self.num_gpu_blocks = manager.geometry.num_blocks

    def get_num_free_blocks(self) -> int:
        m = self._manager
        return m.kv.room_bytes() // m.geometry.page_bytes

    def get_usage(self) -> float:
        return 1.0 - self.get_num_free_blocks() / (self.num_gpu_blocks - 1)


class KvallocKVCacheManager:
    """The manager interface vLLM's ``Scheduler`` calls, backed by kvalloc.

    ``enable_caching=False`` still allocates through kvalloc, but no request shares or keeps
    KV (each gets a private salt and is aborted when freed).
    """

    def __init__(
        self,
        kv_cache_config: Any,
        geometry: VllmGeometry,
        max_model_len: int,
        enable_caching: bool = True,
        log_stats: bool = False,
        enable_kv_cache_events: bool = False,
        watermark: float = 0.0,
        options: dict[str, Any] | None = None,
        data_parallel_rank: int = 0,
    ) -> None:
        options = dict(options or {})
        self.verify = bool(options.pop("verify", False))
        # Where kvalloc's own events (resume points, lower tiers) go, beside vLLM's stream.
        events_endpoint = options.pop("events_endpoint", None)
        unknown = sorted(set(options) - set(MANAGER_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown kvalloc option(s) {unknown}; known: {list(MANAGER_OPTIONS)}, 'verify' and 'events_endpoint'"
            )
        self.geometry = geometry
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.log_stats = log_stats
        self.enable_kv_cache_events = enable_kv_cache_events
        self.block_size = geometry.block_size
        self.num_kv_cache_groups = len(geometry.kvalloc_group)
        self.kv_cache_config = kv_cache_config
        self.coordinator = CoordinatorView(
            tuple(
                GroupView(i, g.kv_cache_spec, g.kv_cache_spec.block_size)
                for i, g in enumerate(kv_cache_config.kv_cache_groups)
            )
        )
        self.mamba_shared_prefix_checkpoint = False
        self.block_pool = BlockPoolView(self)
        self.kv = _core.KVCacheManager(
            geometry.spec,
            geometry.capacity_bytes,
            block_tokens=geometry.block_size,
            slab_bytes=geometry.page_bytes,
            watermark=watermark or None,
            # vLLM's kernels read a prefill chunk's own keys from the cache.
            prefill_reads_cache=True,
            **({"events": True} if enable_kv_cache_events else {}),
            **options,
        )
        self.events_publisher: Any = None
        if enable_kv_cache_events and events_endpoint:
            from kvalloc.kv_events import KVEventPublisher

            to_vllm = {k: v for v, k in enumerate(geometry.kvalloc_group)}
            self.events_publisher = KVEventPublisher(
                None,
                block_size=geometry.block_size,
                extensions_endpoint=str(events_endpoint),
                data_parallel_rank=data_parallel_rank,
                groups=geometry.spec.groups,
                group_idx=[to_vllm.get(g) for g in range(len(geometry.spec.groups))],
            )
        # One block object per id, as vLLM's block pool keeps them: the scheduler and the model
        # runner read only `block_id` (and `is_null`).
        self._blocks = [KVCacheBlock(block_id=i) for i in range(geometry.num_blocks)]
        self._blocks[0].is_null = True
        self.empty_kv_cache_blocks = KVCacheBlocks(tuple(() for _ in range(self.num_kv_cache_groups)))
        self.prefix_cache_stats = PrefixCacheStats() if log_stats else None
        self._ids: dict[str, int] = {}  # running vLLM request id -> kvalloc id
        self._next_id = 1
        self._prompt_len: dict[str, int] = {}  # tokens the request was admitted with
        self._private: set[str] = set()  # admitted under a private salt: aborted when freed
        self._known: dict[str, int] = {}  # blocks per group the engine holds
        self._handed: dict[str, list[list[int]]] = {}  # with `verify`: the ids it holds
        # Request objects by kvalloc id, running or freed since the last `take_events` (the
        # token ids of a stored block's event are the request's).
        self._requests: dict[int, Any] = {}

    # -- lookups -------------------------------------------------------------------------------

    def prefix_cache_lookup_enabled(self, request: Any) -> bool:
        return self.enable_caching and not request.skip_reading_prefix_cache

    def get_computed_blocks(self, request: Any) -> tuple[KVCacheBlocks, int, int]:
        """The window-safe hit, in tokens (the last token is always computed, for its logits).

        The blocks themselves come with the admission (``get_blocks``): the scheduler only
        passes this lookup's blocks back to ``allocate_slots``, where kvalloc takes the hit.
        """
        if not self.prefix_cache_lookup_enabled(request):
            return self.empty_kv_cache_blocks, 0, 0
        salt = request_salt(request)
        hit = self.kv.match_prefix(_token_array(request, 0, request.num_tokens), salt)
        return self.empty_kv_cache_blocks, hit, 0

    # -- allocation ----------------------------------------------------------------------------

    def allocate_slots(
        self,
        request: Any,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: KVCacheBlocks | None = None,
        num_lookahead_tokens: int = 0,
        num_external_computed_tokens: int = 0,
        delay_cache_blocks: bool = False,
        num_encoder_tokens: int = 0,
        full_sequence_must_fit: bool = False,
        reserved_blocks: int = 0,
        has_scheduled_reqs: bool = True,
        skip_zeroing_group_ids: tuple[int, ...] = (),
    ) -> KVCacheBlocks | None:
        """Slots for ``num_new_tokens`` more tokens: the new blocks, or None when they do not
        fit even after eviction (the scheduler then preempts)."""
        if num_lookahead_tokens or num_external_computed_tokens or num_encoder_tokens or delay_cache_blocks:
            raise NotImplementedError(
                "kvalloc's vLLM plug-in runs no speculative decoding, KV connector or "
                "encoder-decoder model (refused at start-up)"
            )
        rid = request.request_id
        if rid not in self._ids:
            return self._admit(request, num_new_tokens, num_new_computed_tokens, full_sequence_must_fit)
        if num_new_tokens == 0:
            raise ValueError("num_new_tokens must be greater than 0 for a running request")
        kid = self._ids[rid]
        target = min(request.num_computed_tokens + num_new_tokens, self.max_model_len)
        # From kvalloc's own length: a retry after a refusal (the scheduler preempts another
        # request and asks again) asks for what is still missing, never twice.
        have = self.kv.num_tokens(kid)
        if target > have and not self._extend(request, kid, have, target):
            return None
        return self._new_blocks(rid, kid)

    def _admit(
        self, request: Any, num_new_tokens: int, expected_hit: int, full_sequence_must_fit: bool
    ) -> KVCacheBlocks | None:
        rid = request.request_id
        num_tokens = request.num_tokens
        if full_sequence_must_fit and not self._whole_prompt_fits(num_tokens, expected_hit):
            return None
        private = not self.prefix_cache_lookup_enabled(request)
        salt = uuid.uuid4().bytes if private else request_salt(request)
        kid = self._next_id
        tokens = _token_array(request, 0, num_tokens)
        hit = self.kv.admit(kid, tokens, salt, num_new_tokens, priority=retention_priority(request))
        if hit is None:
            return None
        if hit != expected_hit:
            self.kv.abort(kid)
            raise _core.InvariantError(
                f"request {rid}: kvalloc's hit at admission ({hit} tokens) differs from its "
                f"lookup ({expected_hit}) in the same step"
            )
        self._next_id += 1
        self._ids[rid] = kid
        self._requests[kid] = request
        self._prompt_len[rid] = num_tokens
        if private:
            self._private.add(rid)
        self._known[rid] = 0
        if self.verify:
            self._handed[rid] = [[] for _ in range(self.num_kv_cache_groups)]
        # The scheduler reads a new request's blocks with `get_blocks`.
        return self.empty_kv_cache_blocks

    def _whole_prompt_fits(self, num_tokens: int, hit: int) -> bool:
        """vLLM's admission gate (``scheduler_reserve_full_isl``): whether the blocks the whole
        prompt needs past its hit (a sliding group needs its window's, as vLLM's own cap
        counts them) fit in the free and evictable blocks now."""
        b = self.block_size
        remaining = -(-num_tokens // b) - hit // b
        need = 0
        for group in self.geometry.spec.groups:
            if group.window is None:
                need += remaining
            else:
                need += min(remaining, -(-group.window // b) + 1)
        return need <= self.kv.room_bytes() // self.geometry.page_bytes

    def _extend(self, request: Any, kid: int, have: int, target: int) -> bool:
        prompt_len = self._prompt_len[request.request_id]
        if have < prompt_len:
            # Chunked prefill: the rest of the prompt kvalloc was admitted with, by count.
            step = min(target, prompt_len) - have
            if not self.kv.extend(kid, step):
                return False
            have += step
        if target > have:
            return self.kv.extend(kid, _token_array(request, have, target))
        return True

    def _tables(self, kid: int, start: int) -> list[np.ndarray]:
        tables = self.kv.block_tables(np.array([kid], dtype=np.int64), None, None, start)
        return [tables[g][0] for g in self.geometry.kvalloc_group]

    def _to_blocks(self, pages: list[np.ndarray]) -> KVCacheBlocks:
        blocks = self._blocks
        return KVCacheBlocks(tuple([blocks[p + 1] for p in row.tolist()] for row in pages))

    def _new_blocks(self, rid: str, kid: int) -> KVCacheBlocks:
        start = self._known[rid]
        if self.verify:
            self._check_tables(rid, kid)
        pages = self._tables(kid, start)
        self._known[rid] = start + len(pages[0])
        if self.verify:
            for held, row in zip(self._handed[rid], pages):
                held.extend(p + 1 for p in row.tolist())
        if not len(pages[0]):
            return self.empty_kv_cache_blocks
        return self._to_blocks(pages)

    def _check_tables(self, rid: str, kid: int) -> None:
        """Every block the engine holds is still the request's, or released (null)."""
        for group, (held, row) in enumerate(zip(self._handed[rid], self._tables(kid, 0))):
            now = (row + 1).tolist()
            for i, (h, n) in enumerate(zip(held, now)):
                if n != 0 and n != h:
                    raise _core.InvariantError(
                        f"request {rid}, group {group}: block {i} is id {n} in kvalloc's table "
                        f"but the engine holds id {h}"
                    )

    # -- what the scheduler reads --------------------------------------------------------------

    def get_blocks(self, request_id: str) -> KVCacheBlocks:
        """Every block of a running request (the engine's table from scratch: new and resumed
        requests)."""
        kid = self._ids.get(request_id)
        if kid is None:
            return self.empty_kv_cache_blocks
        pages = self._tables(kid, 0)
        self._known[request_id] = len(pages[0])
        if self.verify:
            self._handed[request_id] = [[p + 1 for p in row.tolist()] for row in pages]
        return self._to_blocks(pages)

    def get_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        kid = self._ids.get(request_id)
        if kid is None:
            return tuple([] for _ in range(self.num_kv_cache_groups))
        return tuple((row + 1).tolist() for row in self._tables(kid, 0))

    def get_block_ids_for_computed_tokens(self, request_id: str, num_computed_tokens: int) -> tuple[list[int], ...]:
        n = -(-num_computed_tokens // self.block_size)
        return tuple(ids[:n] for ids in self.get_block_ids(request_id))

    def estimate_cached_tokens(self, request: Any) -> int:
        """Tokens of the request in whole blocks the cache now holds (0 for a private one)."""
        rid = request.request_id
        kid = self._ids.get(rid)
        if kid is None or rid in self._private:
            return 0
        return self.kv.num_tokens(kid) // self.block_size * self.block_size

    @property
    def usage(self) -> float:
        """Blocks held by running requests, as a share of all blocks (cached blocks nobody
        runs are free to take, as in vLLM's pool): one call, not a `stats()` dict per step."""
        return self.block_pool.get_usage()

    # -- release -------------------------------------------------------------------------------

    def free(self, request: Any) -> None:
        """Releases a finished or preempted request: its whole blocks stay cached, unless some
        scheduled token was not computed (then nothing of it is kept)."""
        rid = request.request_id
        kid = self._ids.pop(rid, None)
        if kid is None:
            return
        if not self.enable_kv_cache_events:
            self._requests.pop(kid, None)
        self._known.pop(rid, None)
        self._handed.pop(rid, None)
        self._prompt_len.pop(rid, None)
        if rid in self._private:
            self._private.discard(rid)
            self.kv.abort(kid)
            return
        if self.kv.num_tokens(kid) > request.num_computed_tokens:
            self.kv.abort(kid)
            return
        self.kv.finish(kid)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int, num_prompt_tokens: int | None = None) -> None:
        """kvalloc releases blocks out of the window itself, on each extension."""

    def reset_prefix_cache(self) -> bool:
        ok = self.kv.reset_prefix_cache()
        if ok and self.log_stats:
            assert self.prefix_cache_stats is not None
            self.prefix_cache_stats.reset = True
        return ok

    def cache_blocks(self, request: Any, num_computed_tokens: int) -> None:
        """kvalloc publishes whole blocks as they are scheduled (only connectors call this)."""

    def new_step_starts(self) -> None:
        pass

    # -- stats and events ----------------------------------------------------------------------

    def record_prefix_cache_stats(self, request: Any, num_hits: int) -> None:
        if not self.log_stats or not self.prefix_cache_lookup_enabled(request):
            return
        assert self.prefix_cache_stats is not None
        self.prefix_cache_stats.record(
            num_tokens=request.num_tokens, num_hits=num_hits, preempted=request.num_preemptions > 0
        )

    def make_prefix_cache_stats(self) -> PrefixCacheStats | None:
        if not self.log_stats:
            return None
        stats, self.prefix_cache_stats = self.prefix_cache_stats, PrefixCacheStats()
        return stats

    def take_events(self) -> list[KVCacheEvent]:
        """vLLM's BlockStored and BlockRemoved events for the blocks kvalloc caches and evicts
        (one event per block; hashes are kvalloc's 64-bit chained block hashes), which vLLM's
        own publisher sends. With the ``events_endpoint`` option, kvalloc's own events (resume
        points, lower tiers) of the same drain go to that socket (``kvalloc.kv_events``)."""
        if not self.enable_kv_cache_events:
            return []
        batch = self.kv.take_events()
        if self.events_publisher is not None:
            self.events_publisher.publish(batch)
        events: list[KVCacheEvent] = []
        group_of = {k: v for v, k in enumerate(self.geometry.kvalloc_group)}
        for kind, group, h, parent, has_parent, block, req in zip(
            batch["kind"].tolist(),
            batch["group"].tolist(),
            batch["hash"].tolist(),
            batch["parent"].tolist(),
            batch["has_parent"].tolist(),
            batch["block"].tolist(),
            batch["req"].tolist(),
        ):
            if kind == 0:
                tokens: list[int] = []
                request = self._requests.get(req)
                if request is not None and block >= 0:
                    tokens = list(request.all_token_ids[block * self.block_size : (block + 1) * self.block_size])
                lora = getattr(request, "lora_request", None)
                events.append(
                    BlockStored(
                        block_hashes=[h],
                        parent_block_hash=parent if has_parent else None,
                        token_ids=tokens,
                        block_size=self.block_size,
                        lora_id=lora.lora_int_id if lora is not None else None,
                        medium="GPU",
                        lora_name=lora.lora_name if lora is not None else None,
                        group_idx=group_of.get(group),
                    )
                )
            elif kind == 1:
                events.append(BlockRemoved(block_hashes=[h], medium="GPU", group_idx=group_of.get(group)))
            elif kind == 2:
                from vllm.distributed.kv_events import AllBlocksCleared

                events.append(AllBlocksCleared())
            # Kinds 3-6 (resume points, lower tiers) have no vLLM event: see kvalloc.kv_events.
        running = set(self._ids.values())
        self._requests = {k: r for k, r in self._requests.items() if k in running}
        return events

    # -- parts of the interface with nothing to do here ------------------------------------------

    def take_kv_cache_block_copies(self) -> tuple[list[Any], list[Any]]:
        return [], []

    def take_boundary_state_offloads(self) -> dict[str, list[tuple[int, int, int]]]:
        return {}

    def take_new_block_ids(self) -> list[int]:
        return []

    def get_num_common_prefix_blocks(self, running_request_id: str) -> list[int]:
        return [0] * self.num_kv_cache_groups

    def validate(self) -> None:
        self.kv.validate()
