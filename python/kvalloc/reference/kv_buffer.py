"""The engine's device buffer: the only code that touches KV bytes.

One ``uint8`` arena of the manager's ``capacity_bytes``. Group ``g`` sees it as ``num_pages(g)``
blocks of ``block_bytes_g`` (its view of the one arena, ``buffer[: num_pages * block_bytes_g]``);
the manager's block tables hold page indices into that view.

Block layout (kvalloc's): for each layer of the group, in layer order, K for all
``block_tokens`` tokens ``[token, kv_head, k_dim]`` then V ``[token, kv_head, v_dim]``, in the
spec's dtype. Each layer's slice is contiguous, so one layer can move on its own.

The buffer is registered with the manager (``register_device``), so kvalloc can copy blocks
between it and its lower tiers (host memory, disk, a remote store): attention reads whatever
kvalloc loaded, through the same block tables.

The buffer starts filled with 0xFF bytes, a float32 NaN: KV read from a slot nobody wrote (or a
load that never landed) shows up as NaN logits instead of plausible numbers.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

import kvalloc

_DTYPES = {"float32": np.float32}


class MissingKVError(kvalloc.KvAllocError, LookupError):
    """The engine needed KV at a position whose block-table entry is NULL_PAGE."""


class PagedKVBuffer:
    """Per-layer K and V views over one arena, indexed by (page, slot). Registers the arena
    with ``manager`` as its device buffer (before the manager's first admission)."""

    def __init__(self, manager: kvalloc.KVCacheManager) -> None:
        spec = manager.spec
        b = manager.block_tokens
        self.block_tokens = b
        self.buffer = np.full(manager.capacity_bytes, 0xFF, dtype=np.uint8)
        self.group_of_layer: dict[int, int] = {}
        # Per layer: (K view [pages, B, kv_heads, k_dim], V view [pages, B, kv_heads, v_dim]).
        self._views: dict[int, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = {}
        for g, group in enumerate(spec.groups):
            dtype = _DTYPES.get(group.dtype)
            if dtype is None:
                raise kvalloc.ConfigError(f"dtype: the reference engine stores float32 KV, not {group.dtype}")
            item = np.dtype(dtype).itemsize
            block_bytes = group.block_bytes(b)
            pages = manager.num_pages(g)
            if pages * block_bytes > self.buffer.nbytes:
                raise kvalloc.InvariantError(f"group {g}: {pages} pages of {block_bytes} B exceed the arena")
            h, dk, dv = group.kv_heads, group.k_dim, group.v_dim
            k_bytes, v_bytes = b * h * dk * item, b * h * dv * item
            if len(group.layers) * (k_bytes + v_bytes) != block_bytes:
                raise kvalloc.InvariantError(f"group {g}: block size disagrees with the layout")
            for j, layer in enumerate(group.layers):
                at = j * (k_bytes + v_bytes)
                k = np.ndarray(
                    (pages, b, h, dk), dtype, self.buffer, at, (block_bytes, h * dk * item, dk * item, item)
                )
                v = np.ndarray(
                    (pages, b, h, dv), dtype, self.buffer, at + k_bytes, (block_bytes, h * dv * item, dv * item, item)
                )
                self._views[layer] = (k, v)
                self.group_of_layer[layer] = g
        manager.register_device(self.buffer)

    def write(
        self,
        layer: int,
        table: npt.NDArray[np.int32],
        start: int,
        keys: npt.NDArray[np.float32],
        values: npt.NDArray[np.float32],
    ) -> None:
        """Stores KV of positions ``[start, start + len(keys))`` where the table has a page
        (a sliding layer's table is NULL_PAGE outside what the manager keeps)."""
        pos = np.arange(start, start + len(keys))
        pages = table[pos // self.block_tokens]
        keep = pages != kvalloc.NULL_PAGE
        k, v = self._views[layer]
        slots = pos[keep] % self.block_tokens
        k[pages[keep], slots] = keys[keep]
        v[pages[keep], slots] = values[keep]

    def read(
        self, layer: int, table: npt.NDArray[np.int32], lo: int, hi: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """K ``[hi - lo, kv_heads, k_dim]`` and V of positions ``[lo, hi)``, gathered through
        the block table; every position must have a page."""
        pos = np.arange(lo, hi)
        pages = table[pos // self.block_tokens]
        if (pages == kvalloc.NULL_PAGE).any():
            missing = int(pos[pages == kvalloc.NULL_PAGE][0])
            raise MissingKVError(
                f"layer {layer}: no page for position {missing} (block {missing // self.block_tokens}), "
                f"which attention over [{lo}, {hi}) needs"
            )
        k, v = self._views[layer]
        slots = pos % self.block_tokens
        return k[pages, slots], v[pages, slots]
