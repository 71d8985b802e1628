"""Type stubs for the Rust extension module ``kvalloc._core`` (hand-written)."""

import os
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence, final, overload

import numpy as np
import numpy.typing as npt

__version__: str
NULL_PAGE: int
"""Page index marking "no block here" in a block table (-1)."""
MAX_PRIORITY: int
"""The highest retention priority: ``admit``'s ``priority`` lies in ``[-MAX_PRIORITY,
MAX_PRIORITY]`` (16)."""

class KvAllocError(Exception):
    """Base class of every error kvalloc raises."""

class ConfigError(KvAllocError, ValueError):
    """A model config is missing a field, contradicts itself or uses an unsupported layer kind."""

class OutOfMemoryError(KvAllocError, MemoryError):
    """An allocation could not be satisfied; nothing was allocated."""

class StaleHandleError(KvAllocError, ValueError):
    """A handle that is not live (double free, reused slot, or from another arena); nothing changed."""

class InvalidArgumentError(KvAllocError, ValueError):
    """An argument has the wrong type, dtype, shape or range; nothing changed."""

class RequestError(KvAllocError, LookupError):
    """A request id that is not running (finish, extend, ...) or already running (admit)."""

class InvariantError(KvAllocError, RuntimeError):
    """validate() found a broken internal invariant: a bug in kvalloc, please report it."""

def presets() -> list[str]:
    """Names of the built-in model presets."""

@final
class KVGroup:
    """One KV group: the layers of one attention kind and geometry."""

    @property
    def kind(self) -> Literal["full", "sliding"]: ...
    @property
    def window(self) -> int | None: ...
    @property
    def layers(self) -> tuple[int, ...]: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def k_dim(self) -> int: ...
    @property
    def v_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token over all layers of the group."""
    @property
    def layer_bytes_per_token(self) -> int:
        """Bytes of one token in one layer of the group."""
    def block_bytes(self, block_tokens: int | None = None) -> int:
        """Bytes of one block of ``block_tokens`` tokens (default 16), all layers of the group."""

@final
class ModelSpec:
    """A model's KV-cache geometry: its groups of layers and their per-token bytes."""

    @staticmethod
    def from_hf_config(
        path_or_dict: str | os.PathLike[str] | dict[str, Any],
        dtype: str | None = None,
        model_id: str | None = None,
    ) -> ModelSpec:
        """Reads a Hugging Face ``config.json`` (a path or an already-loaded dict).

        ``model_id`` names the weights (default: the config's ``_name_or_path`` and
        ``_commit_hash``/``revision``); models with different ids never share lower-tier KV.
        Give one wherever two weights have the same config (a fine-tune saved in its base's
        directory). Raises ``ConfigError`` naming the field (or the layer index and kind) that
        is missing, contradictory or unsupported: a model with linear-attention, Mamba/SSM or
        recurrent layers is refused however its config says so. A path must name a regular file
        (a directory or FIFO is a ``ConfigError``, not a hang)."""
    @staticmethod
    def from_groups(
        name: str,
        groups: Sequence[Mapping[str, Any]],
        num_layers: int | None = None,
        model_id: str | None = None,
    ) -> ModelSpec:
        """A spec with exactly these groups, for engines that group layers themselves (vLLM
        splits one attention kind into groups of equal layer counts). Each group is a dict:
        ``kind`` ("full" or "sliding"), ``window`` (sliding only), ``layers``, ``kv_heads``,
        ``head_dim`` (or ``k_dim`` and ``v_dim``) and ``dtype``. Groups are reordered as in
        every spec (full first, then sliding, each by first layer). A wrong type or unknown key
        is an ``InvalidArgumentError``, an inconsistent geometry a ``ConfigError``, each naming
        ``groups[i].field``."""
    @staticmethod
    def preset(name: str) -> ModelSpec:
        """A built-in model; see ``kvalloc.presets()``."""
    @staticmethod
    def presets() -> list[str]:
        """Names accepted by ``ModelSpec.preset``."""
    @property
    def name(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def groups(self) -> list[KVGroup]:
        """The KV groups: full-attention groups first, then sliding ones."""
    @property
    def max_window(self) -> int | None:
        """The largest sliding window, or None when no layer slides."""
    @property
    def bytes_per_token_dense(self) -> int:
        """Bytes of one token when every layer keeps it."""
    @property
    def model_id(self) -> str | None:
        """Which weights the KV belongs to (``name@revision`` from the config, or the id given);
        part of the lower tiers' namespace. None: the config names neither."""
    @property
    def fingerprint(self) -> int:
        """A 64-bit digest of the geometry (not the name, not the model id)."""
    def kv_bytes(self, context_tokens: int, block_tokens: int | None = None) -> int:
        """Bytes one sequence holds when sliding groups keep only their window (blocks of
        ``block_tokens``, default 16). Bytes that do not fit in 64 bits are an
        ``InvalidArgumentError``, never a saturated count."""
    def kv_bytes_dense(self, context_tokens: int) -> int:
        """Bytes one sequence holds when every layer keeps every token (``InvalidArgumentError``
        past 64 bits)."""
    def block_bytes(self, block_tokens: int | None = None) -> list[int]:
        """Block size in bytes of each group, in group order (blocks of ``block_tokens``, default 16)."""

@final
class SlabArena:
    """One byte budget carved into slabs; each slab serves blocks of one size class at a time."""

    def __new__(
        cls, capacity_bytes: int, block_bytes: int | list[int], slab_bytes: int | None = None
    ) -> SlabArena: ...
    def alloc(self, class_index: int, n: int) -> npt.NDArray[np.uint64]:
        """Allocates ``n`` blocks, all or nothing (``OutOfMemoryError``); returns uint64 handles."""
    def free(self, handles: npt.NDArray[np.uint64]) -> None:
        """Frees handles, all or nothing (``StaleHandleError`` on a stale, foreign or repeated one)."""
    def offsets(self, handles: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Byte offset of each block from the start of the arena."""
    def pages(self, handles: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Page index of each block in its class's view of the arena."""
    def available(self, class_index: int) -> int:
        """Blocks of a class an allocation could get right now."""
    def num_pages(self, class_index: int) -> int:
        """Pages in a class's view of the arena."""
    @property
    def capacity_bytes(self) -> int: ...
    @property
    def slab_bytes(self) -> int: ...
    @property
    def block_bytes(self) -> list[int]: ...
    def stats(self) -> dict[str, Any]:
        """Arena totals and per-class figures (``classes``: a list of dicts)."""
    def validate(self) -> None:
        """Checks every invariant; raises ``InvariantError`` on a violation."""

_TokenArray = npt.NDArray[np.int32] | npt.NDArray[np.int64] | list[int]
_IdArray = npt.NDArray[np.integer[Any]] | list[int]

@final
class BlockHashes:
    """A prompt given as precomputed block hashes (one per block of ``block_tokens``)."""

    def __new__(cls, hashes: npt.NDArray[np.uint64], num_tokens: int) -> BlockHashes: ...
    @property
    def num_tokens(self) -> int: ...
    def __len__(self) -> int: ...

@final
class StepResult:
    """What one ``KVCacheManager.step`` did. Unpacks as ``hits, extended = m.step(...)``."""

    @property
    def hits(self) -> npt.NDArray[np.int64]:
        """Per admission: prompt tokens served from cache; -1 refused; -2 not attempted
        (after an ``fcfs`` refusal, or a refused extension with ``admit_if_extended``); -3
        waiting for its KV to load from disk or the remote store (admit it again once
        ``ready`` names it; an ``fcfs`` queue goes on past it)."""
    @property
    def waiting(self) -> list[int]:
        """Positions (among the step's admissions) of those waiting for their KV."""
    @property
    def ready(self) -> list[int]:
        """Requests whose KV finished loading since the last step (or whose load failed or
        passed its deadline: their hit shrinks to what verified): admit them again."""
    @property
    def extended(self) -> npt.NDArray[np.bool_]:
        """Per extension: whether it fit."""
    @property
    def admitted(self) -> int:
        """Admissions that got in (with ``fcfs``, the first ``admitted`` of the step's)."""
    @property
    def refused_extensions(self) -> int:
        """Extensions that did not fit (0: every one did)."""
    @property
    def events(self) -> dict[str, npt.NDArray[Any]] | None:
        """The KV cache events recorded up to the end of this step and not drained before, as
        ``KVCacheManager.take_events`` returns them (the step drains the log); None when the
        manager was made without ``events=True``."""
    def __len__(self) -> int: ...
    @overload
    def __getitem__(self, index: Literal[0, -2], /) -> npt.NDArray[np.int64]: ...
    @overload
    def __getitem__(self, index: Literal[1, -1], /) -> npt.NDArray[np.bool_]: ...
    @overload
    def __getitem__(self, index: int, /) -> npt.NDArray[np.int64] | npt.NDArray[np.bool_]:
        """0 or -2: ``hits``; 1 or -1: ``extended``; any other int is an ``IndexError`` (as for
        a tuple), a non-int an ``InvalidArgumentError``."""
    def __iter__(self) -> Iterator[npt.NDArray[np.int64] | npt.NDArray[np.bool_]]: ...

@final
class KVCacheManager:
    """The SWA-aware KV cache manager an engine scheduler drives.

    Memory is one SlabArena with one class per KV group. Full-attention KV is kept for every
    cached token; with ``policy="swa-aware"`` sliding-window KV only as checkpoints at resume
    points (``policy="dense"`` keeps every group for every cached token, for comparison).
    """

    def __new__(
        cls,
        spec: ModelSpec,
        capacity_bytes: int,
        block_tokens: int | None = None,
        policy: Literal["swa-aware", "dense"] | str | None = None,
        eviction: Literal["value", "lru"] | str | None = None,
        checkpoint_interval: int | None = None,
        slab_bytes: int | None = None,
        *,
        host_bytes: int | None = None,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int | None = None,
        remote_url: str | None = None,
        remote_bytes: int | None = None,
        remote_username: str | None = None,
        remote_password: str | None = None,
        remote_prefix: str | None = None,
        remote_timeout_ms: int | None = None,
        remote_tls_ca: str | os.PathLike[str] | None = None,
        remote_tls_cert: str | os.PathLike[str] | None = None,
        remote_tls_key: str | os.PathLike[str] | None = None,
        write_through: bool | None = None,
        watermark: float | None = None,
        prefault_bytes: int | None = None,
        secret: str | bytes | None = None,
        model_id: str | None = None,
        prefill_reads_cache: bool | None = None,
        events: bool | None = None,
        max_pinned_bytes: int | None = None,
        speculative_checkpoints: bool | None = None,
        async_loads: bool | None = None,
        load_policy: str | None = None,
        load_deadline_ms: int | None = None,
        prefill_tokens_per_second: float | None = None,
    ) -> KVCacheManager:
        """``policy`` (None: ``"swa-aware"``) and ``eviction`` (None: ``"value"``) name the
        caching and eviction policies. Lower tiers (each off unless given a capacity): ``host_bytes`` of host memory (L2),
        ``disk_bytes`` of files under ``disk_dir`` (L3, survives restarts), ``remote_bytes`` in
        a Valkey/Redis store at ``remote_url`` (``redis://host:port/db``, or ``rediss://`` for
        TLS; a cluster: ``redis+cluster://host:port,host:port`` listing seed nodes, or
        ``rediss+cluster://``; optional ACL user, password and key prefix). Each call to the remote store has a
        deadline of ``remote_timeout_ms`` (None: 50 ms; connecting included): past it a read is
        a miss and a write a failed write (counted in its ``timeouts``), so a hung server
        never holds a step for long. Over TLS the server's certificate must be signed by the CA
        in the PEM file ``remote_tls_ca`` (None: the bundled public roots);
        ``remote_tls_cert`` and ``remote_tls_key`` (PEM) are a client certificate for servers
        that require one. ``write_through`` writes each finished request's prefix to
        the remote store so other instances can use it. Bytes move only once a device buffer is
        registered (``register_device``). ``watermark``: a fraction of ``capacity_bytes`` that
        every admission must leave free or evictable (room for the running requests' next
        decode blocks, so fewer preemptions); extensions ignore it. ``prefault_bytes``: at
        most this much bookkeeping memory (tree nodes, slab records) is committed at
        construction, as much as the capacity can use, so that the tree and the arena grow
        without page faults on the scheduler's path (None: 32 MiB; 0: none).

        ``secret``: the deployment secret of the disk and remote tiers (None: the
        ``KVALLOC_SECRET`` environment variable, if set). Records are stored under ids keyed by
        it and carry MACs under it, so only instances with the same secret (and model) share
        records, and a writer without it cannot forge one; give every instance of a deployment
        the same secret of at least 16 random bytes. Without one, ids are still one-way and
        records still checked, but not authenticated. ``model_id`` overrides ``spec.model_id``
        (which weights; part of the namespace). The remote key prefix defaults to one derived
        from the model and the secret. Every argument of the wrong type or range (a negative or
        >= 2**64 size, a string with a lone surrogate, a path the OS cannot encode) is an
        ``InvalidArgumentError`` naming it; ``host_bytes`` is allocated only by
        ``register_device``. ``events=True`` records KV cache events for ``take_events``
        (None/False: no log, and no cost beyond a branch where the cache changes).

        ``prefill_reads_cache``: the engine's attention reads a chunk's own keys from the cache,
        as paged kernels do (vLLM's, prefill included), so sliding groups hold every block of a
        scheduled range until the next call. Without it (the default) a long chunk's early
        sliding-window blocks are never allocated: right only for an engine whose prefill
        attends within the chunk from its fresh tensors (SGLang's extend kernels).

        ``max_pinned_bytes``: the most bytes retention pins (``admit(..., pin_tokens=,
        pin_seconds=)``) may hold; a pin that would pass it is clipped to the prefix that fits
        (None: half of ``capacity_bytes``; 0: no pins).

        ``speculative_checkpoints`` (None: off): while the arena's free bytes cover twice a
        prompt's KV at every layer, the prompt keeps its sliding-window KV at every block
        boundary it computes (swa-aware policy), so the second request sharing a system
        prompt already hits it; the value order drops them first unless requests resume there.
        They never cost an eviction. False: checkpoints only where requests resume or branch.

        Loads from disk and the remote store run in the background once a device buffer is
        registered (``async_loads``, None: on): an admission whose hit needs them answers None
        at once and ``waiting_for_kv(req_id)`` is True; their blocks are published only once
        read and verified; ``take_ready()`` (or a step's ``ready``) then names the request,
        to be admitted again (its hit is what verified; after a failed or late load the engine
        computes the rest). ``load_policy`` (None: ``"decide"``): take a hit from a lower tier
        only where loading it is faster than recomputing it (from each tier's measured
        bandwidth and the prefill rate: ``prefill_tokens_per_second``, None: 20,000 until
        ``record_prefill`` reports the engine's); ``"always"`` takes every hit.
        ``load_deadline_ms`` (None: 500): what a background load may take beyond its estimate
        before it is given up."""
    def match_prefix(self, tokens: _TokenArray | BlockHashes, salt: str | bytes | None = None) -> int:
        """Window-safe hit length in tokens for a prompt; changes nothing."""
    def block_hashes(
        self, tokens: _TokenArray | BlockHashes, salt: str | bytes | None = None
    ) -> npt.NDArray[np.uint64]:
        """The chained hashes of the prompt's whole blocks under ``salt``, as the KV events
        name them (what a router looks a prompt up by); changes nothing."""
    def admit(
        self,
        req_id: int,
        tokens: _TokenArray | BlockHashes,
        salt: str | bytes | None = None,
        max_tokens: int | None = None,
        *,
        priority: int | None = None,
        pin_tokens: int | None = None,
        pin_seconds: float | None = None,
        cache: bool | None = None,
    ) -> int | None:
        """Admits a request; returns prompt tokens served from cache, or None when it does not
        fit or waits for its KV (``waiting_for_kv``: admit it again once ``take_ready`` names
        it).

        Retention (each None: its default):

        - ``priority`` (int in ``[-MAX_PRIORITY, MAX_PRIORITY]``, default 0): with
          ``eviction="value"``, the cached blocks this request held when it finishes count
          ``2**priority`` times their value (a block keeps the highest priority of the requests
          that finished holding it); higher is kept longer. LRU ignores it. Blocks past a
          prefix's last resume point still go first: a prefix loses its tail before its head.
        - ``pin_tokens`` with ``pin_seconds`` (positive; ``inf``: until
          ``reset_prefix_cache``): when the request finishes, the cached blocks of its first
          ``pin_tokens`` tokens are pinned for that long on the manager's clock (``clock()``):
          never evicted while pinned. The pin ends at the deepest resume point within them
          (the admission keeps a checkpoint there when it computes it) and is clipped to what
          fits under ``max_pinned_bytes``; pins of the same prefix merge. An aborted request
          pins nothing.
        - ``cache=False``: nothing of this request enters the prefix cache (its blocks are
          freed when it finishes); it still reads the cache. Its priority and pin apply to the
          cached blocks it read."""
    def extend(self, req_id: int, tokens: _TokenArray | int) -> bool:
        """Appends token ids (decode) or continues a chunked prefill by a count; False when no room."""
    def finish(self, req_id: int) -> None:
        """The request's prompt and output enter the prefix cache."""
    def abort(self, req_id: int) -> None:
        """Drops a request; nothing of it stays."""
    def block_table(self, req_id: int, group: int) -> npt.NDArray[np.int32]:
        """Page indices of the request's blocks in group ``group`` (NULL_PAGE where none)."""
    @overload
    def block_tables(
        self,
        req_ids: _IdArray,
        group: int,
        out: npt.NDArray[np.int32] | None = None,
        start: int | _IdArray | None = None,
    ) -> npt.NDArray[np.int32]: ...
    @overload
    def block_tables(
        self,
        req_ids: _IdArray,
        group: None = None,
        out: Sequence[npt.NDArray[np.int32]] | None = None,
        start: int | _IdArray | None = None,
    ) -> tuple[npt.NDArray[np.int32], ...]:
        """Block tables of many requests in one call: row i is ``block_table(req_ids[i],
        group)``. A new array padded with NULL_PAGE, or written into the rows of ``out`` (a
        C-contiguous 2D int32 array; entries past each table are left as they were). With
        ``group=None``, a tuple with every group's (``out``: one array per group). With
        ``start`` (an int, or one per request) only blocks ``start[i]`` onward are read (the new
        ones, for an engine that keeps its own tables): left-aligned in a new array, at their own
        columns in ``out``."""
    def num_tokens(self, req_id: int) -> int:
        """Tokens scheduled for a running request."""
    def __contains__(self, req_id: object, /) -> bool: ...
    def step(
        self,
        finish: _IdArray | None = None,
        abort: _IdArray | None = None,
        extend_ids: _IdArray | None = None,
        extend_tokens: _TokenArray | None = None,
        extend_lens: _IdArray | None = None,
        extend_counts: _IdArray | None = None,
        admit: list[
            tuple[int, _TokenArray | BlockHashes]
            | tuple[int, _TokenArray | BlockHashes, str | bytes | None]
            | tuple[int, _TokenArray | BlockHashes, str | bytes | None, int | None]
        ]
        | None = None,
        admit_ids: _IdArray | None = None,
        admit_tokens: _TokenArray | None = None,
        admit_lens: _IdArray | None = None,
        fcfs: bool | None = None,
        admit_if_extended: bool | None = None,
        admit_priority: int | _IdArray | Sequence[int] | None = None,
        admit_pin_tokens: int | _IdArray | None = None,
        admit_pin_seconds: float | Sequence[float] | npt.NDArray[np.floating[Any]] | None = None,
        admit_cache: bool | Sequence[bool] | npt.NDArray[np.bool_] | None = None,
    ) -> StepResult:
        """One scheduler step in one call (GIL released): finishes and aborts, then extensions,
        then admissions (the ``admit`` list of ``(req_id, tokens[, salt[, max_tokens]])``, then
        the flat ``admit_ids``/``admit_tokens``/``admit_lens`` form). With ``fcfs``, admissions
        stop at the first that does not fit; with ``admit_if_extended``, none is attempted when
        an extension did not fit (a step that must preempt admits nothing new).
        ``admit_priority``, ``admit_pin_tokens``, ``admit_pin_seconds`` and ``admit_cache`` are
        the admissions' retention (``admit``'s ``priority``, ``pin_tokens``, ``pin_seconds``,
        ``cache``): one value for every admission, or one per admission (the listed ones, then
        the flat ones). Returns a ``StepResult``, which also unpacks as ``hits, extended``."""
    def stats(self) -> dict[str, Any]:
        """Per-group blocks, checkpoints, hit/miss tokens, evictions by cause, bytes; retention
        pins (``pinned_bytes``: bytes the pins hold, ``pins`` in force, ``pins_clipped`` by the
        cap); ``checkpoint_kinds[kind]`` (``branch``, ``prompt_end``, ``output_end``,
        ``interval``, ``pin``, ``speculative``, ``restored``): checkpoints ``placed`` and
        ``resumed`` at later (the value order's learned record of where requests resume); per
        tier (``tiers["host" | "disk" | "remote"]``) capacity, records, promoted tokens, bytes
        written and read, failures; ``loads``: the load-or-recompute decisions (``taken``,
        ``split``, ``declined`` admissions, ``declined_tokens``), the background loads
        (``started``, ``verified``, ``failed``, ``timed_out``, ``failed_records``, ``waits``,
        ``waiting_requests``, ``load_seconds``) and the estimates they use
        (``bandwidth_bytes_per_second`` per tier, ``prefill_tokens_per_second``)."""
    def waiting_for_kv(self, req_id: int) -> bool:
        """Whether the request waits for its KV to load (its admission answered None for
        that reason, not for memory)."""
    def take_ready(self) -> list[int]:
        """Requests whose KV finished loading (or whose load failed or passed its deadline)
        since the last call or step: admit them again."""
    def wait_for_kv(self, req_id: int, timeout: float | None = None) -> bool:
        """Blocks (the GIL and the manager's lock released: other threads keep stepping)
        until the load the request waits on settles, or ``timeout`` seconds pass (None: up to
        the load's deadline); True if it is ready."""
    def record_prefill(self, tokens: int, seconds: float) -> None:
        """Reports that the engine computed ``tokens`` prompt tokens in ``seconds``: the
        prefill rate the load-or-recompute decision weighs loads against."""
    def validate(self) -> None:
        """Checks every invariant; raises ``InvariantError`` on a violation."""
    def set_clock(self, seconds: float) -> None:
        """Drives the clock that times retention pins to ``seconds`` (from then on it moves only
        when driven: tests and simulations need no sleeping), releasing the pins expired by
        then. The first call may set any time (pins keep their remaining time); later ones may
        not go back."""
    def advance_clock(self, seconds: float) -> None:
        """Drives the clock ``seconds`` forward (see ``set_clock``)."""
    def clock(self) -> float:
        """The clock in seconds: monotonic wall time since the manager was made, or the time
        last driven."""
    def take_events(self) -> dict[str, npt.NDArray[Any]]:
        """The KV cache events since the last call, oldest first, as numpy arrays of one
        length (one entry per event, no Python object per event):

        - ``kind`` (uint8): 0 stored (a group's block entered the prefix cache: a new cached
          block, a sliding-window checkpoint block, a promotion from a lower tier), 1 removed
          (it left: evicted, checkpoint dropped, aborted), 2 cleared (``reset_prefix_cache``
          emptied the cache; no removed or not-resumable event lists what went), 3 resumable
          (a request whose prompt's chained hashes run through ``hash`` can resume after its
          block ``block`` here: a window-safe checkpoint; every cached block of a model
          without sliding layers or under ``policy="dense"``), 4 not resumable (that resume
          point is gone), 5 tier stored (group ``group``'s block of ``hash`` entered lower
          tier ``tier``), 6 tier removed (it left that tier; a move down reports the tier
          below's 5 first);
        - ``group`` (int32): the KV group, -1 for kinds 2-4;
        - ``hash`` (uint64): the block's chained hash (0 for cleared);
        - ``parent`` (uint64) and ``has_parent`` (bool): the previous block's chained hash,
          where the block is not a sequence's first (``parent`` is 0 where ``has_parent`` is
          False; stored events only);
        - ``block`` (int64): the block's index in its sequence (tokens ``[block * B, (block +
          1) * B)``) for kinds 0, 3 and 5 (-1 for a 5 whose tier does not know it yet), -1
          for the others;
        - ``tier`` (int8): -1 for kinds 0-4 (the prefix cache, L1), else 0 host, 1 disk, 2
          remote;
        - ``req`` (int64): the request whose call stored it, -1 for a promotion and for other
          kinds (ids from 2**63 read negative: ``req.view(np.uint64)``).

        Replaying them in order gives exactly ``cached_blocks()`` (kinds 0-2),
        ``resume_points()`` (kinds 2-4) and ``lower_blocks()`` (kinds 5-6; a reset keeps the
        lower tiers). A drain lists the prefix cache's events first, then the lower tiers'.
        A router's hit estimate for a prompt, the deepest resume point on its chain at least
        one token short of its end, never exceeds ``match_prefix``. Without ``events=True``
        the arrays are empty. The log grows until drained: call this every step (``step``
        drains it into ``StepResult.events``)."""
    def cached_blocks(self) -> dict[str, npt.NDArray[Any]]:
        """``{"group": int32, "hash": uint64}`` arrays, sorted, of every block the prefix
        cache holds: what replaying every event gives (a snapshot for a late consumer)."""
    def resume_points(self) -> dict[str, npt.NDArray[Any]]:
        """``{"hash": uint64, "block": int64}`` arrays, sorted by hash, of every resume point the
        prefix cache holds: what replaying the resumable and not-resumable events gives."""
    def lower_blocks(self) -> dict[str, npt.NDArray[Any]]:
        """``{"tier": int8, "group": int32, "hash": uint64}`` arrays, sorted, of every block
        the lower tiers hold (tier 0 host, 1 disk, 2 remote): what replaying the tier events
        gives."""
    def reset_prefix_cache(self) -> bool:
        """Empties the prefix cache (device tier; lower tiers keep their copies) and records
        one cleared event; only when no request is running: False, changing nothing,
        otherwise."""
    def register_device(self, buffer: npt.NDArray[np.uint8]) -> None:
        """Registers the engine's device buffer (writable, C-contiguous uint8, at least
        ``capacity_bytes``; group g's page p at byte ``p * block_bytes[g]``), before the first
        admission: evictions then write real bytes to the lower tiers and hits below L1 are
        copied back into it. The host tier's ``host_bytes`` are mapped here, not touched (a
        page is backed when a demotion first writes it); more than the system has available is
        an ``OutOfMemoryError`` and nothing changes."""
    def load_handle(self, req_id: int) -> LoadHandle:
        """The loads a running request's hit waits for; call ``wait_layer(i)`` before
        computing layer i."""
    def wait_loads(self) -> None:
        """Blocks until every background load landed."""
    def flush(self) -> None:
        """Writes host records and cached L1 blocks to the durable tier (disk, else remote),
        keeping them cached: call it before a planned shutdown."""
    def match_prefix_tiers(self, tokens: _TokenArray | BlockHashes, salt: str | bytes | None = None) -> dict[str, int]:
        """Window-safe hit lengths, cumulative by level: ``device`` (L1 alone), ``host``,
        ``disk``, ``remote``; changes nothing."""
    def residency(
        self, tokens: _TokenArray | BlockHashes, salt: str | bytes | None = None
    ) -> list[tuple[int, str | None, int]]:
        """Per whole block: (group mask on device, lower tier or None, group mask there);
        stops at the first block cached nowhere."""
    @property
    def spec(self) -> ModelSpec: ...
    @property
    def block_tokens(self) -> int: ...
    @property
    def policy(self) -> str: ...
    @property
    def eviction(self) -> str: ...
    @property
    def capacity_bytes(self) -> int: ...
    def room_bytes(self) -> int:
        """Bytes an admission could have now: free plus evictable (held only by the cache)."""
    def num_pages(self, group: int) -> int:
        """Blocks in group ``group``'s view of the arena (the size of the engine's buffer)."""

@final
class Trace:
    """A request trace, read from a file (Mooncake or generic JSONL) or generated."""

    @staticmethod
    def load(
        path: str | os.PathLike[str],
        trace_block_tokens: int | None = None,
        tokens_per_id: str | None = None,
    ) -> Trace:
        """Reads a trace; the format is detected from its first line. A malformed line raises
        InvalidArgumentError naming the file, the line number and the field.

        ``tokens_per_id``: what a block id (``hash_ids``, ``block_hashes``) stands for.
        ``"exact"`` (None): ``trace_block_tokens`` tokens each (default 512), the prompt's last
        id possibly fewer. ``"spread"``: a varying number; each prompt's tokens are spread over
        its ids, an id's count fixed where it first appears (see ``spread``);
        ``trace_block_tokens`` must then be None."""
    @staticmethod
    def generate(kind: str, seed: int | None = None, size: int | None = None) -> Trace:
        """A seeded synthetic trace: "chat", "agent" or "shared-prompt"; ``size`` is sessions
        (requests for "shared-prompt"). A size whose trace would not fit in the memory the
        system has available is an ``OutOfMemoryError`` naming the largest that fits."""
    @staticmethod
    def generators() -> list[str]:
        """The generators' names."""
    @property
    def name(self) -> str: ...
    @property
    def num_requests(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def duration_seconds(self) -> float: ...
    @property
    def spread(self) -> dict[str, Any] | None:
        """For a ``tokens_per_id="spread"`` trace, what spreading found: ``requests``,
        ``min_tokens_per_id`` and ``max_tokens_per_id`` (prompt tokens per id of one request),
        ``requests_disagreeing`` (an id seen before keeps a count other than the request's own
        even share), ``requests_cut`` (ids seen before cover more than the prompt) and
        ``requests_padded`` (fewer: the rest are the request's own). None otherwise."""

@final
class Simulator:
    """A model, a trace and a block size, ready for replays through the real manager."""

    def __new__(cls, spec: ModelSpec, trace: Trace, block_tokens: int | None = None) -> Simulator: ...
    @property
    def block_tokens(self) -> int: ...
    @property
    def upper_bound_hit_rate(self) -> float:
        """The trace's hit rate with an unbounded cache, at this block size."""
    def run(
        self,
        device_bytes: int,
        policy: str | None = None,
        eviction: str | None = None,
        *,
        host_bytes: int | None = None,
        disk_bytes: int | None = None,
        remote_bytes: int | None = None,
        prefill_tokens_per_s: float | None = None,
        decode_tokens_per_s: float | None = None,
        host_gbps: float | None = None,
        disk_gbps: float | None = None,
        remote_gbps: float | None = None,
        disk_latency_ms: float | None = None,
        remote_latency_ms: float | None = None,
        load_policy: str | None = None,
        progress: Callable[[str, float], object] | None = None,
    ) -> dict[str, Any]:
        """Replays the trace once (GIL released); returns the report as a dict. None: the
        defaults (``"swa-aware"``, ``"lru"``, 60,000 prefill tokens/s, 30 decode tokens/s;
        lower tiers at 50, 6 and 12 GB/s with no latency; ``load_policy`` ``"decide"``: a hit
        promoted from a lower tier, or dense's prefix of it, loads only where that beats
        recomputing it, ``"always"`` loads every one). Bad values raise
        ``InvalidArgumentError``. The report's ``tier_hit_tokens``, ``declined_tokens``,
        ``exposed_load_seconds`` and ``load_queue_seconds`` say what the loads did.
        ``eviction`` ``"oracle"`` is the offline clairvoyant reference: it evicts the cached
        unit whose next use in the trace is farthest away (a manager refuses it)."""
    def run_fleet(
        self,
        device_bytes: int,
        policy: str | None = None,
        eviction: str | None = None,
        *,
        instances: int,
        router: str,
        host_bytes: int | None = None,
        disk_bytes: int | None = None,
        remote_bytes: int | None = None,
        prefill_tokens_per_s: float | None = None,
        decode_tokens_per_s: float | None = None,
        host_gbps: float | None = None,
        disk_gbps: float | None = None,
        remote_gbps: float | None = None,
        disk_latency_ms: float | None = None,
        remote_latency_ms: float | None = None,
        load_policy: str | None = None,
        write_through: bool | None = None,
        overlap_weight: float | None = None,
        progress: Callable[[str, float], object] | None = None,
    ) -> dict[str, Any]:
        """Replays the trace over a fleet of ``instances`` (1 to 4096) instances behind
        ``router``: ``"round-robin"``, ``"least-loaded"``, ``"prefix"`` (window-safe: learns the
        resume points each instance publishes as ``Resumable`` events) or ``"prefix-naive"``
        (learns from ``Stored``/``Removed`` events, a stored block taken at face value); the
        prefix-aware ones score instances as Dynamo's KV router does, with ``overlap_weight``
        (default 1) on the blocks to prefill. ``device_bytes``, ``host_bytes`` and ``disk_bytes``
        are per instance; ``remote_bytes`` is one remote tier shared by the fleet (virtual: an
        index of what every instance wrote, its own budget, LRU); ``prefill_tokens_per_s`` is
        the whole fleet's, split evenly. ``write_through`` (default True): finished requests
        write through to the shared remote tier. Returns ``run``'s report for the whole fleet
        plus ``router``, ``instances``, ``per_instance`` (``requests``, ``prompt_tokens``,
        ``hit_tokens`` each), ``request_imbalance`` and ``token_imbalance`` (max over mean),
        ``estimate`` (prefix-aware routers, else None: ``requests``, ``estimated_tokens``,
        ``real_tokens``, ``over``/``exact``/``under`` counts, ``over_share``,
        ``mean_error_tokens``, ``mean_over_tokens``, ``over_tokens`` and ``error_percentiles``
        ``p1``/``p10``/``p50``/``p90``/``p99``/``max`` of estimated minus real hit tokens per
        request) and ``shared_remote`` (``records``, ``bytes``, ``evicted``, ``bytes_written``,
        ``bytes_read``; None without a remote tier). One instance with any router and no remote
        tier reports what ``run`` reports. An instance count out of range, an unknown router or a bad weight is
        an ``InvalidArgumentError``; the oracle eviction order is for one instance only."""
    def budget_to_match(
        self,
        target_hit_rate: float,
        start_bytes: int,
        policy: str | None = None,
        eviction: str | None = None,
        *,
        rel_tol: float | None = None,
        prefill_tokens_per_s: float | None = None,
        decode_tokens_per_s: float | None = None,
        progress: Callable[[str, float], object] | None = None,
    ) -> dict[str, Any]:
        """The smallest device budget at which ``policy`` reaches ``target_hit_rate``:
        ``{"budget_bytes": int | None, "replays": int, "report": dict}``. None: the defaults
        (``"dense"``, ``"lru"``, ``rel_tol`` 0.02, the service rates of ``run``)."""

@final
class LoadHandle:
    """What an engine waits on before computing a request's layers: the loads that bring its
    hit into the device buffer (already done for hits served from L1)."""

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        """Blocks (GIL released) until layer ``layer``'s KV is in the device buffer; False on
        timeout. ``timeout`` in seconds: None, ``math.inf`` or one too long for the clock wait
        as long as it takes; NaN or a negative one is an ``InvalidArgumentError``, and so is a
        layer the model does not have."""
    def wait_all(self, timeout: float | None = None) -> bool:
        """Blocks until every layer is in the device buffer; False on timeout (``timeout`` as
        for ``wait_layer``)."""
    @property
    def done(self) -> bool: ...
    @property
    def bytes(self) -> int:
        """Bytes the loads copy."""
