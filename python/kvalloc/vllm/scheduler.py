"""vLLM's stock scheduler with kvalloc as its KV-cache manager.

``LLM(..., scheduler_cls="kvalloc.vllm.KvallocScheduler")``. Options go in vLLM's
``additional_config={"kvalloc": {...}}`` (or the ``KVALLOC_VLLM_OPTIONS`` environment variable,
JSON), e.g. ``{"eviction": "lru", "checkpoint_interval": 4}``: the keyword arguments of
``kvalloc.KVCacheManager`` listed in ``MANAGER_OPTIONS``, plus ``verify`` and
``events_endpoint``.

KV events: with vLLM's ``kv_events_config`` on, vLLM's own publisher sends kvalloc's device-cache
events (BlockStored, BlockRemoved, AllBlocksCleared); ``events_endpoint`` (e.g.
``"tcp://*:5558"``) also publishes kvalloc's own events (window-safe resume points, lower-tier
residency) on a second socket in the same format (``kvalloc.kv_events``; needs pyzmq and
msgpack, the ``kvalloc[events]`` extra).

What vLLM could ask of it that kvalloc would not do right is refused here, at start-up, with an
error naming it: KV connectors, speculative decoding, encoder-decoder models, Mamba and other
non-attention groups, asynchronous scheduling and pipelined batches, context parallelism.
"""

from __future__ import annotations

import json
import os
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from .geometry import UnsupportedError, geometry_from_kv_cache_config
from .manager import KvallocKVCacheManager


def kvalloc_options(vllm_config: Any) -> dict[str, Any]:
    """The deployment's kvalloc options: ``additional_config["kvalloc"]``, else the
    ``KVALLOC_VLLM_OPTIONS`` environment variable (a JSON object)."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and "kvalloc" in extra:
        options = extra["kvalloc"]
    else:
        options = json.loads(os.environ.get("KVALLOC_VLLM_OPTIONS", "{}") or "{}")
    if not isinstance(options, dict):
        raise UnsupportedError(f"kvalloc options must be a dict, got {type(options).__name__}")
    return dict(options)


def check_supported(vllm_config: Any, scheduler: Any) -> None:
    """Raises ``UnsupportedError`` naming every feature in use that kvalloc does not run."""
    refused = []
    if vllm_config.kv_transfer_config is not None:
        refused.append("KV connectors (kv_transfer_config)")
    if vllm_config.speculative_config is not None:
        refused.append("speculative decoding (speculative_config)")
    if vllm_config.model_config.is_encoder_decoder:
        refused.append("encoder-decoder models")
    if vllm_config.scheduler_config.async_scheduling or vllm_config.max_concurrent_batches > 1:
        refused.append("asynchronous scheduling / pipelined batches (pass async_scheduling=False)")
    parallel = vllm_config.parallel_config
    if getattr(parallel, "decode_context_parallel_size", 1) > 1 or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        refused.append("context parallelism")
    if getattr(scheduler, "prefix_replay_tokens", 0):
        refused.append("SWA bounded replay")
    if getattr(scheduler, "has_mamba_layers", False):
        refused.append("Mamba layers")
    if refused:
        raise UnsupportedError("kvalloc's vLLM scheduler does not support: " + "; ".join(refused))


class KvallocScheduler(Scheduler):
    """vLLM's ``Scheduler`` whose ``kv_cache_manager`` is kvalloc's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_supported(self.vllm_config, self)
        geometry = geometry_from_kv_cache_config(self.kv_cache_config)
        if self.hash_block_size != geometry.block_size:
            raise UnsupportedError(f"hash_block_size {self.hash_block_size} differs from block size {geometry.block_size}")
        self.kv_cache_manager = KvallocKVCacheManager(
            self.kv_cache_config,
            geometry,
            max_model_len=self.max_model_len,
            enable_caching=bool(self.cache_config.enable_prefix_caching),
            log_stats=self.log_stats,
            enable_kv_cache_events=self.enable_kv_cache_events,
            watermark=self.scheduler_config.watermark,
            options=kvalloc_options(self.vllm_config),
            data_parallel_rank=self.vllm_config.parallel_config.data_parallel_rank,
        )

    def shutdown(self) -> None:
        super().shutdown()
        if self.kv_cache_manager.events_publisher is not None:
            self.kv_cache_manager.events_publisher.close()
