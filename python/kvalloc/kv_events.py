"""kvalloc's KV cache events in vLLM's wire format, for cache-aware routers.

A manager made with ``events=True`` records its events; ``KVCacheManager.take_events`` (or
``StepResult.events``) returns them as numpy columns. :class:`KVEventPublisher` sends them the
way vLLM's ``ZmqEventPublisher`` does (vLLM 0.32, ``vllm/distributed/kv_events.py``), so that a
router written for vLLM consumes them unchanged:

- a ZeroMQ PUB socket; each batch is one multipart message ``(topic, seq, payload)``: the
  topic's UTF-8 bytes, the batch's sequence number as 8 big-endian bytes (0, 1, 2, ... per
  socket), and the payload;
- the payload is msgpack of vLLM's ``KVEventBatch`` (an array-like struct):
  ``[ts, events, data_parallel_rank]`` (``ts`` a float of seconds since the epoch);
- each event is a msgpack map tagged by its ``"type"`` (msgspec's tagged structs):
  ``{"type": "BlockStored", "block_hashes": [h, ...], "parent_block_hash": p | None,
  "token_ids": [...], "block_size": B, "lora_id": None, "medium": "GPU", "lora_name": None,
  "group_idx": g, "kv_cache_spec_kind": "full_attention" | "sliding_window",
  "kv_cache_spec_sliding_window": W}`` (the last two when the publisher knows the groups),
  ``{"type": "BlockRemoved", "block_hashes": [h, ...], "medium": "GPU", "group_idx": g}`` and
  ``{"type": "AllBlocksCleared"}``.

Block hashes are kvalloc's 64-bit chained block hashes (msgpack unsigned ints, what vLLM sends
with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``; ``KVCacheManager.block_hashes`` gives a prompt's).
A run of stored blocks of one group, each the previous one's child, is one ``BlockStored``
(as vLLM sends a request's new blocks); a run of removed blocks of one group, one
``BlockRemoved``. ``group_idx`` is the kvalloc group (or what ``group_idx=`` maps it to: the
vLLM plug-in's KV cache group ids).

kvalloc's own events never reach that socket: a stock consumer decodes every batch as vLLM's
``KVEventBatch`` and would reject an unknown event tag, and a ZeroMQ subscription to the empty
topic (what most consumers use) receives every topic of a socket. They go to a second PUB
socket (``extensions_endpoint``, off unless given), framed the same way on topic
``extensions_topic``, with the same batch layout:

- ``{"type": "Resumable", "block_hash": h, "block_index": b, "num_tokens": (b + 1) * B}``: a
  request whose prompt's chained hashes run through ``h`` can resume after ``num_tokens``
  tokens here (a window-safe checkpoint); ``{"type": "NotResumable", "block_hash": h}``: that
  resume point is gone. A router's hit for a prompt is the deepest resume point on its chain,
  at most ``len - 1`` tokens: never more than the instance's ``match_prefix``;
- ``BlockStored`` / ``BlockRemoved`` as above for the lower tiers, with vLLM's own medium and
  locality: host memory ``"CPU"``, disk ``"STORAGE"``, the remote store ``"STORAGE"`` with
  ``"locality": "REMOTE"`` (``parent_block_hash`` None, ``token_ids`` empty);
- ``AllBlocksCleared``, as on the main socket (a reset empties the device cache and its resume
  points; the lower tiers keep theirs).

A consumer of the extension socket alone has everything a window-safe router needs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLEARED",
    "group_specs_of",
    "NOT_RESUMABLE",
    "REMOVED",
    "RESUMABLE",
    "STORED",
    "TIER_REMOVED",
    "TIER_STORED",
    "KVEventPublisher",
    "encode_batch",
    "extension_events",
    "resume_hit",
    "vllm_events",
]

# The ``kind`` column's codes (``KVCacheManager.take_events``).
STORED, REMOVED, CLEARED, RESUMABLE, NOT_RESUMABLE, TIER_STORED, TIER_REMOVED = range(7)

# (medium, locality) of each lower tier, in vLLM's words.
_TIER_WHERE = (("CPU", "LOCAL"), ("STORAGE", "LOCAL"), ("STORAGE", "REMOTE"))


def _runs(start: np.ndarray) -> list[tuple[int, int]]:
    """``[from, to)`` of each run, given where runs start (a bool array)."""
    starts = np.flatnonzero(start)
    ends = np.append(starts[1:], len(start))
    return list(zip(starts.tolist(), ends.tolist()))


def _same_as_previous(*cols: np.ndarray) -> np.ndarray:
    """Row i equals row i - 1 in every column (False for row 0)."""
    same = np.zeros(len(cols[0]), dtype=bool)
    if len(same) > 1:
        same[1:] = True
        for c in cols:
            same[1:] &= c[1:] == c[:-1]
    return same


def vllm_events(
    batch: Mapping[str, np.ndarray],
    *,
    block_size: int,
    tokens: Mapping[int, Sequence[int] | np.ndarray] | None = None,
    group_idx: Sequence[int | None] | None = None,
    group_specs: Sequence[tuple[str, int | None]] | None = None,
) -> list[dict[str, Any]]:
    """The batch's device-cache events (kinds 0-2) as vLLM event maps, in order.

    ``tokens``: token ids by request id, for ``token_ids`` (empty where unknown, and for
    promotions); ``group_idx``: the group index to publish per kvalloc group (default: the
    same); ``group_specs``: per kvalloc group, vLLM's ``kv_cache_spec_kind`` and sliding
    window (see :func:`group_specs_of`)."""
    kind, group, h = batch["kind"], batch["group"], batch["hash"]
    parent, has_parent, block, req = batch["parent"], batch["has_parent"], batch["block"], batch["req"]
    stored = kind == STORED
    # A stored block continues the run when it is the previous stored block's child.
    chained = np.zeros(len(kind), dtype=bool)
    if len(kind) > 1:
        chained[1:] = stored[1:] & stored[:-1] & has_parent[1:] & (parent[1:] == h[:-1]) & (block[1:] == block[:-1] + 1)
    chained &= _same_as_previous(group, req)
    removed_run = (kind == REMOVED) & _same_as_previous(kind, group)
    l1 = kind <= CLEARED
    starts = l1 & ~chained & ~removed_run
    out: list[dict[str, Any]] = []
    hashes = h.tolist()
    for a, b in _runs(starts | ~l1):
        k = int(kind[a])
        if k > CLEARED:
            continue
        if k == CLEARED:
            out.append({"type": "AllBlocksCleared"})
            continue
        g = int(group[a])
        gi = group_idx[g] if group_idx is not None else g
        if k == REMOVED:
            out.append({"type": "BlockRemoved", "block_hashes": hashes[a:b], "medium": "GPU", "group_idx": gi})
            continue
        r, first = int(req[a]), int(block[a])
        toks: list[int] = []
        if tokens is not None and r in tokens:
            toks = [int(t) for t in tokens[r][first * block_size : (first + b - a) * block_size]]
        e: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": hashes[a:b],
            "parent_block_hash": int(parent[a]) if has_parent[a] else None,
            "token_ids": toks,
            "block_size": block_size,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "group_idx": gi,
        }
        if group_specs is not None:
            spec_kind, window = group_specs[g]
            e["kv_cache_spec_kind"] = spec_kind
            if window is not None:
                e["kv_cache_spec_sliding_window"] = window
        out.append(e)
    return out


def extension_events(
    batch: Mapping[str, np.ndarray],
    *,
    block_size: int,
    group_idx: Sequence[int | None] | None = None,
) -> list[dict[str, Any]]:
    """The batch's kvalloc events (resume points, lower tiers) and its clears, as the
    extension socket's event maps, in order (see the module docs)."""
    kind, group, h, block, tier = batch["kind"], batch["group"], batch["hash"], batch["block"], batch["tier"]
    mine = kind >= CLEARED
    tier_run = (kind >= TIER_STORED) & _same_as_previous(kind, group, tier)
    out: list[dict[str, Any]] = []
    hashes = h.tolist()
    for a, b in _runs(mine & ~tier_run | ~mine):
        k = int(kind[a])
        if k < CLEARED:
            continue
        if k == CLEARED:
            out.append({"type": "AllBlocksCleared"})
        elif k == RESUMABLE:
            i = int(block[a])
            out.append({"type": "Resumable", "block_hash": hashes[a], "block_index": i,
                        "num_tokens": (i + 1) * block_size})
        elif k == NOT_RESUMABLE:
            out.append({"type": "NotResumable", "block_hash": hashes[a]})
        else:
            g = int(group[a])
            medium, locality = _TIER_WHERE[int(tier[a])]
            gi = group_idx[g] if group_idx is not None else g
            if k == TIER_STORED:
                out.append({"type": "BlockStored", "block_hashes": hashes[a:b], "parent_block_hash": None,
                            "token_ids": [], "block_size": block_size, "lora_id": None, "medium": medium,
                            "lora_name": None, "group_idx": gi, "locality": locality})
            else:
                out.append({"type": "BlockRemoved", "block_hashes": hashes[a:b], "medium": medium,
                            "group_idx": gi, "locality": locality})
    return out


def encode_batch(events: list[dict[str, Any]], ts: float, data_parallel_rank: int | None = 0) -> bytes:
    """msgpack of vLLM's ``KVEventBatch``: ``[ts, events, data_parallel_rank]`` (the rank left
    out when None, as msgspec omits a default)."""
    fields: list[Any] = [ts, events] if data_parallel_rank is None else [ts, events, data_parallel_rank]
    try:
        import msgpack  # type: ignore[import-untyped]
    except ImportError:  # inside vLLM, whose msgspec writes the same bytes
        import msgspec  # type: ignore[import-not-found]

        return bytes(msgspec.msgpack.encode(fields))
    return bytes(msgpack.packb(fields, use_bin_type=True))


def group_specs_of(groups: Sequence[Any]) -> list[tuple[str, int | None]]:
    """vLLM's ``kv_cache_spec_kind`` and sliding window for each of a ``ModelSpec``'s groups."""
    return [("sliding_window", g.window) if g.kind == "sliding" else ("full_attention", None) for g in groups]


def resume_hit(
    resume: Mapping[int, int], hashes: Sequence[int] | np.ndarray, num_tokens: int, block_size: int
) -> int:
    """A router's hit estimate for a prompt of ``num_tokens`` tokens whose chained block hashes
    are ``hashes``, from the resume points it replayed (hash -> block index): the deepest one on
    the chain, at most ``num_tokens - 1`` tokens. Never more than the instance's
    ``match_prefix``."""
    hs = [int(x) for x in hashes]
    for k in range(min((num_tokens - 1) // block_size, len(hs)), 0, -1):
        if resume.get(hs[k - 1]) == k - 1:
            return k * block_size
    return 0


def _last_endpoint(sock: Any) -> str:
    import zmq

    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _is_bind(endpoint: str) -> bool:
    # vLLM's rule: bind wildcards and ipc/inproc endpoints, connect to the rest.
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """Publishes drained event batches in vLLM's wire format (see the module docs).

    ``endpoint``: the vLLM-format socket (``tcp://*:5557`` binds, as vLLM's default;
    ``tcp://127.0.0.1:*`` binds a free port: read :attr:`endpoint`; None: none, where vLLM's
    own publisher sends those events); ``extensions_endpoint``: the socket for kvalloc's own
    events (None: not published). ``block_size``: the manager's
    ``block_tokens``. ``groups``: the model's groups (``spec.groups``), to tag stored blocks
    with vLLM's spec kind and window. Sends on the caller's thread (a PUB socket never blocks:
    past ``hwm`` queued messages per subscriber it drops, as vLLM's does). Not thread-safe:
    one publisher per engine loop."""

    def __init__(
        self,
        endpoint: str | None = "tcp://*:5557",
        *,
        block_size: int,
        topic: str = "",
        data_parallel_rank: int = 0,
        extensions_endpoint: str | None = None,
        extensions_topic: str = "kvalloc",
        groups: Sequence[Any] | None = None,
        group_idx: Sequence[int | None] | None = None,
        hwm: int = 100_000,
    ) -> None:
        import zmq

        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.data_parallel_rank = data_parallel_rank
        self._group_specs = group_specs_of(groups) if groups is not None else None
        self._group_idx = list(group_idx) if group_idx is not None else None
        self._ctx: Any = zmq.Context.instance()
        self._main = self._socket(endpoint, hwm) if endpoint else None
        self._ext = self._socket(extensions_endpoint, hwm) if extensions_endpoint else None
        self._topics = (topic.encode(), extensions_topic.encode())
        self._seq = [0, 0]

    def _socket(self, endpoint: str, hwm: int) -> Any:
        import zmq

        # XPUB: a PUB socket to subscribers, that also tells the publisher who subscribed
        # (``wait_for_subscriber``).
        s = self._ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscriber's subscription, not the first
        s.set_hwm(hwm)
        s.setsockopt(zmq.LINGER, 0)
        if _is_bind(endpoint):
            s.bind(endpoint)
        else:
            s.connect(endpoint)
        return s

    @property
    def endpoint(self) -> str | None:
        """The vLLM-format socket's endpoint (the port a ``*`` port bound, resolved), or None."""
        return None if self._main is None else _last_endpoint(self._main)

    @property
    def extensions_endpoint(self) -> str | None:
        """The extension socket's endpoint, or None."""
        return None if self._ext is None else _last_endpoint(self._ext)

    def wait_for_subscriber(self, timeout: float = 10.0, extensions: bool = False) -> bool:
        """Waits until a subscriber's subscription reached the (extension) socket, so that
        the next batch reaches it; False after ``timeout`` seconds."""
        sock = self._ext if extensions else self._main
        if sock is None:
            raise ValueError(f"no {'extensions_' if extensions else ''}endpoint was given")
        if sock.poll(int(timeout * 1000)):
            sock.recv()  # b"\x01" + the topic subscribed to
            return True
        return False

    def publish(
        self,
        batch: Mapping[str, np.ndarray] | None,
        *,
        tokens: Mapping[int, Sequence[int] | np.ndarray] | None = None,
        ts: float | None = None,
    ) -> tuple[int, int]:
        """Sends one drained batch (``take_events()`` or ``StepResult.events``; None sends
        nothing): its device-cache events on the vLLM socket, kvalloc's on the extension
        socket, each as one message where there is any. ``tokens``: token ids by request id,
        for ``BlockStored.token_ids``. Returns the events sent on each socket."""
        if batch is None or len(batch["kind"]) == 0:
            return 0, 0
        ts = time.time() if ts is None else ts
        main: list[dict[str, Any]] = []
        if self._main is not None:
            main = vllm_events(batch, block_size=self.block_size, tokens=tokens, group_idx=self._group_idx,
                               group_specs=self._group_specs)
            self._send(0, main, ts)
        ext: list[dict[str, Any]] = []
        if self._ext is not None:
            ext = extension_events(batch, block_size=self.block_size, group_idx=self._group_idx)
            self._send(1, ext, ts)
        return len(main), len(ext)

    def _send(self, which: int, events: list[dict[str, Any]], ts: float) -> None:
        if not events:
            return
        sock = self._ext if which else self._main
        assert sock is not None
        payload = encode_batch(events, ts, self.data_parallel_rank)
        seq = self._seq[which]
        self._seq[which] += 1
        sock.send_multipart((self._topics[which], seq.to_bytes(8, "big"), payload))

    def close(self) -> None:
        """Closes the sockets (unsent messages are dropped)."""
        for s in (self._main, self._ext):
            if s is not None:
                s.close(linger=0)

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
