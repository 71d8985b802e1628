"""vLLM's ``KVCacheConfig`` as a kvalloc ``ModelSpec`` and capacity.

vLLM splits a hybrid model's layers into KV-cache groups of equal layer counts, so that every
group's page (one block of one group, all its layers) has the same bytes, and all groups draw
block ids from one pool of ``num_blocks`` (id 0 is the null block). kvalloc mirrors that with
one group per vLLM group (``ModelSpec.from_groups``) and slabs of exactly one page: every page
can serve any group, and arena page ``p`` is vLLM block id ``p + 1``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .._core import ModelSpec

#: vLLM spec types kvalloc manages: plain full attention and sliding-window attention.
SUPPORTED_SPECS = ("FullAttentionSpec", "SlidingWindowSpec")


class UnsupportedError(ValueError):
    """A vLLM configuration kvalloc's plug-in does not run (it would run it wrongly)."""


@dataclass(frozen=True)
class VllmGeometry:
    """How kvalloc's manager maps onto one vLLM ``KVCacheConfig``."""

    spec: ModelSpec
    #: kvalloc group index of each vLLM group, in vLLM's group order.
    kvalloc_group: tuple[int, ...]
    block_size: int
    num_blocks: int
    #: Bytes of one page in kvalloc's geometry (equal for every group).
    page_bytes: int

    @property
    def capacity_bytes(self) -> int:
        """Every block id but the null block."""
        return (self.num_blocks - 1) * self.page_bytes


def _layer_index(name: str) -> int | None:
    numbers = re.findall(r"\.(\d+)(?=\.|$)", name)
    return int(numbers[-1]) if numbers else None


def _layer_indices(groups: list[Any]) -> list[list[int]]:
    """Each group's layer indices, read from vLLM's layer names (``model.layers.3.self_attn``).
    When a name carries no index or two names share one (a scheduler built outside a model
    runner, e.g. vLLM's own tests, names a layer ``"layer"``), the layers are numbered in group
    order instead: kvalloc only needs them told apart, consistently for one config."""
    names = [list(g.layer_names) for g in groups]
    parsed = [[_layer_index(n) for n in group] for group in names]
    flat = [i for group in parsed for i in group]
    if None not in flat and len(set(flat)) == len(flat):
        return parsed  # type: ignore[return-value]
    numbered, start = [], 0
    for group in names:
        numbered.append(list(range(start, start + len(group))))
        start += len(group)
    return numbered


def _group(spec: Any, layers: list[int], index: int) -> dict[str, Any]:
    kind = type(spec).__name__
    if kind not in SUPPORTED_SPECS:
        raise UnsupportedError(
            f"KV-cache group {index} is a {kind}; kvalloc manages {' and '.join(SUPPORTED_SPECS)} "
            "groups only (no Mamba, chunked-local, cross-attention, encoder-only or MLA groups)"
        )
    if getattr(spec, "extra_retained_tokens", 0):
        raise UnsupportedError(
            f"KV-cache group {index} retains {spec.extra_retained_tokens} tokens past its window "
            "(multi-module speculative decoding), which kvalloc does not model"
        )
    group: dict[str, Any] = {
        "kind": "sliding" if kind == "SlidingWindowSpec" else "full",
        "layers": sorted(layers),
        "kv_heads": spec.num_kv_heads,
        "k_dim": spec.head_size,
        "v_dim": getattr(spec, "head_size_v", None) or spec.head_size,
        "dtype": str(spec.dtype),
    }
    if kind == "SlidingWindowSpec":
        group["window"] = spec.sliding_window
    return group


def geometry_from_kv_cache_config(config: Any, model_id: str | None = None) -> VllmGeometry:
    """A kvalloc spec and capacity for a vLLM ``KVCacheConfig``.

    Raises ``UnsupportedError`` naming the group or setting when the config has a group kind
    kvalloc does not manage, groups of different block sizes, or groups whose pages differ in
    size (vLLM pads those to one page; kvalloc would not map block ids onto them one to one).
    """
    groups = list(config.kv_cache_groups)
    if not groups:
        raise UnsupportedError("the model has no KV-cache groups (attention-free model)")
    block_sizes = {g.kv_cache_spec.block_size for g in groups}
    if len(block_sizes) != 1:
        raise UnsupportedError(f"KV-cache groups have different block sizes {sorted(block_sizes)}")
    block_size = block_sizes.pop()
    # None: not resolved by an engine core (a scheduler built directly), i.e. the block size;
    # the scheduler checks its own resolved value.
    hash_block_size = getattr(config, "hash_block_size", None) or block_size
    if hash_block_size != block_size:
        raise UnsupportedError(f"hash_block_size {hash_block_size} differs from block_size {block_size}")
    layers = _layer_indices(groups)
    described = [_group(g.kv_cache_spec, layers[i], i) for i, g in enumerate(groups)]
    spec = ModelSpec.from_groups("vllm", described, model_id=model_id)
    page = spec.block_bytes(block_size)
    if len(set(page)) != 1:
        raise UnsupportedError(
            f"KV-cache groups' pages differ ({page} bytes in kvalloc's geometry); kvalloc's "
            "plug-in needs groups of one page size, as vLLM's uniform-page grouping makes them"
        )
    first_layers = [tuple(g.layers) for g in spec.groups]
    order = tuple(first_layers.index(tuple(d["layers"])) for d in described)
    if config.num_blocks < 2:
        raise UnsupportedError(f"num_blocks {config.num_blocks}: nothing but the null block")
    return VllmGeometry(spec, order, block_size, config.num_blocks, page[0])
