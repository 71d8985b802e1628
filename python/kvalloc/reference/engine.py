"""A serving engine around :class:`KVCacheManager`: the template for integrating kvalloc.

Each engine step does what a real scheduler does, in this order:

1. tell the manager what happened and what runs next, in one batched ``m.step`` where it can:
   requests that finished or are preempted, one decode token per running request, the next
   prefill chunk of requests still in their prompt, and admissions of waiting requests
   (``(id, prompt, salt, max_tokens)``: each hit is how many prompt tokens the cache already
   holds, and ``max_tokens`` caps the first chunk);
2. for each admitted request whose hit came from below the device (host memory, disk, a remote
   store), take its load handle (``m.load_handle``): kvalloc copies those blocks into the
   registered device buffer, in the background for host memory. An admission whose hit needs
   disk or remote records answers "waiting for KV" (hit -3): kvalloc reads and verifies them in
   the background and the request stays queued, admitted again in a later step (its hit is
   then what verified); the engine computes other requests meanwhile;
3. compute each scheduled request layer by layer: before layer i, ``handle.wait_layer(i)``
   (the loads of later layers overlap this layer's compute); write the new tokens' K and V
   where the block table (``m.block_table``) has a page, attend to cached positions through
   the table and to the chunk's own fresh keys;
4. sample greedily; a request that has its tokens is finished in the next step, and its
   prompt and output stay cached (and move down the tiers as L1 fills) for the next turn.

Running out of memory is not an error: an extension the manager refuses preempts that request
(``finish``, so its computed blocks stay cached, then admitted again later from where the cache
still has it); an admission it refuses waits.

Requests are computed in the order the manager scheduled them, because a request admitted
later in a step may reuse blocks an earlier one computes in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

import kvalloc
from kvalloc.reference.kv_buffer import PagedKVBuffer
from kvalloc.reference.model import TinyHybridModel


class EngineError(kvalloc.KvAllocError, RuntimeError):
    """The engine cannot make progress (a request that can never fit in the budget)."""


@dataclass
class Request:
    """One generation request: a prompt and what the engine produced for it."""

    req_id: int
    tokens: list[int]
    """The prompt, then each sampled token."""
    prompt_len: int
    max_new_tokens: int
    logits: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)
    """Logits computed at each position (they predict the token after it)."""
    hits: list[int] = field(default_factory=list)
    """Tokens served from cache at each admission (more than one after preemption)."""
    preemptions: int = 0
    computed: int = 0
    """Tokens whose KV the engine has computed in the current admission."""
    admitted_len: int = 0
    """Tokens given to the manager as this admission's prompt."""
    admit_seq: int = 0
    """Admission order (the newest is preempted first)."""

    @property
    def outputs(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def done(self) -> bool:
        return len(self.outputs) >= self.max_new_tokens


@dataclass
class EngineStats:
    steps: int = 0
    manager_calls: int = 0
    """Batched ``m.step`` calls (one per step unless decode and prefill extensions both run:
    ``m.step`` takes token ids or counts for its extensions, not both)."""
    admissions: int = 0
    preemptions: int = 0
    computed_tokens: int = 0
    hit_tokens: int = 0
    tier_loads: int = 0
    """Admissions whose hit was loaded from below the device (they waited layer by layer)."""
    layer_waits: int = 0
    kv_waits: int = 0
    """Admissions answered "waiting for KV" (a background load from disk or a remote store)."""
    idle_waits: int = 0
    """Steps with nothing to compute but loads to wait for (the engine blocked on one)."""


LOAD_TIMEOUT_S = 60.0
"""How long the engine waits for one layer's KV before giving up (a stuck load is a bug)."""


class Engine:
    """The reference engine: one model, one manager, one device buffer (registered with the
    manager, so kvalloc can move blocks between it and the lower tiers).

    ``prefill_chunk`` caps the tokens a request computes per step. ``validate`` runs
    ``m.validate()`` after every step's scheduling.
    """

    def __init__(
        self,
        model: TinyHybridModel,
        manager: kvalloc.KVCacheManager,
        *,
        max_running: int = 8,
        prefill_chunk: int = 64,
        validate: bool = False,
    ) -> None:
        if manager.spec.fingerprint != model.spec.fingerprint:
            raise kvalloc.InvalidArgumentError("manager: its spec is not the model's geometry")
        if max_running < 1 or prefill_chunk < 1:
            raise kvalloc.InvalidArgumentError("max_running and prefill_chunk must be positive")
        self.model = model
        self.m = manager
        self.kv = PagedKVBuffer(manager)
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.validate = validate
        self.stats = EngineStats()
        self._groups = len(manager.spec.groups)
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._finish_next: list[Request] = []
        self._loads: dict[int, kvalloc.LoadHandle] = {}
        self._kv_waiting: set[int] = set()
        self._next_id = 1

    # -- submission -------------------------------------------------------------------------

    def submit(self, prompt: npt.ArrayLike, max_new_tokens: int) -> Request:
        tokens = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not tokens or max_new_tokens < 1:
            raise kvalloc.InvalidArgumentError("a request needs a non-empty prompt and max_new_tokens >= 1")
        for t in tokens:
            self.model.embed(t)  # rejects tokens outside the vocabulary now, not mid-step
        r = Request(self._next_id, tokens, len(tokens), max_new_tokens)
        self._next_id += 1
        self._waiting.append(r)
        return r

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._finish_next)

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Schedules and computes one step; returns the requests that completed in it."""
        self.stats.steps += 1
        scheduled = self._schedule()
        if self.validate:
            self.m.validate()
        if not scheduled and self._kv_waiting and not self._running:
            # Nothing to compute until a load settles: block on one rather than spin.
            self.stats.idle_waits += 1
            self.m.wait_for_kv(next(iter(self._kv_waiting)), timeout=LOAD_TIMEOUT_S)
        # Compute, in scheduling order.
        completed = []
        for r, start, end in scheduled:
            self._forward(r, start, end, self._loads.pop(r.req_id, None))
            if r.done:
                del self._running[r.req_id]
                self._finish_next.append(r)
                completed.append(r)
        return completed

    def _schedule(self) -> list[tuple[Request, int, int]]:
        """Tells the manager what happened and what runs next; returns ``(request, start,
        end)`` for every request to compute in this step, in the manager's order."""
        finishing = self._finish_next
        self._finish_next = []
        finish = [r.req_id for r in finishing]
        decode = [r for r in self._running.values() if r.computed >= r.admitted_len]
        prefill = [r for r in self._running.values() if r.computed < r.admitted_len]
        scheduled: list[tuple[Request, int, int]] = []
        refused: list[Request] = []

        def extended(reqs: list[Request], ends: list[int], ok: npt.NDArray[np.bool_]) -> None:
            for r, e, fit in zip(reqs, ends, ok):
                (scheduled.append((r, r.computed, e)) if fit else refused.append(r))

        # Finishes and preemptions free memory first, then one decode token per running request
        # and the next chunk of those still in their prompt, then admissions: one call. m.step
        # takes token ids or counts for its extensions, not both, so with decode and prefill
        # requests both running, decode goes first in a call of its own.
        if decode and prefill:
            res = self._call(finish=finish, extend_ids=self._ids(decode), extend_tokens=self._decode_tokens(decode))
            extended(decode, [r.computed + 1 for r in decode], res.extended)
            finish, decode = [], []
        ext = decode or prefill
        ends = [r.computed + 1 if decode else min(r.computed + self.prefill_chunk, r.admitted_len) for r in ext]
        # Admissions, oldest first, while there are free slots, none when memory is short
        # (`admit_if_extended`: none is attempted if an extension of this call does not fit). A
        # request preempted last step is finished in this call, so it cannot be admitted in it.
        admit = [] if refused else self._admission_candidates({r.req_id for r in finishing})
        res = self._call(
            finish=finish,
            extend_ids=self._ids(ext),
            extend_tokens=self._decode_tokens(decode) if decode else None,
            extend_counts=None if decode else [e - r.computed for r, e in zip(ext, ends)],
            admit=[(r.req_id, np.array(r.tokens, dtype=np.int64), None, self.prefill_chunk) for r in admit],
            admit_if_extended=True,
        )
        hits = res.hits
        extended(ext, ends, res.extended)
        # Admissions waiting for KV stay queued; they are offered again each step.
        self._kv_waiting = {admit[k].req_id for k in res.waiting}
        self.stats.kv_waits += len(res.waiting)
        if refused:
            self._preempt(refused)
        elif admit and hits[0] == -1 and not self._running and not finishing:
            r = admit[0]
            raise EngineError(f"request {r.req_id} ({len(r.tokens)} tokens) cannot fit in the budget")
        for r, hit in zip(admit, hits.tolist()):
            if hit >= 0:
                scheduled.append(self._admitted(r, hit))
        return scheduled

    def _call(self, **kw: Any) -> kvalloc.StepResult:
        self.stats.manager_calls += 1
        return self.m.step(**kw)

    def _preempt(self, refused: list[Request]) -> None:
        """Out of memory: preempts the newest refused request (finished next step, so its
        computed blocks stay cached, and admitted again before new requests). The others wait a
        step: the memory it frees lets the oldest requests go on."""
        victim = max(refused, key=lambda r: r.admit_seq)
        if len(self._running) == 1:
            raise EngineError(f"request {victim.req_id} cannot grow past {victim.computed} tokens in the budget")
        del self._running[victim.req_id]
        victim.preemptions += 1
        self.stats.preemptions += 1
        self._finish_next.append(victim)
        self._waiting.appendleft(victim)

    def _admitted(self, r: Request, hit: int) -> tuple[Request, int, int]:
        """Books an admission that served ``hit`` tokens from cache; takes its load handle when
        they (partly) come from below the device."""
        self._waiting.remove(r)
        self._running[r.req_id] = r
        self.stats.admissions += 1
        self.stats.hit_tokens += hit
        r.admit_seq = self.stats.admissions
        r.hits.append(hit)
        r.admitted_len = len(r.tokens)
        r.computed = hit
        if hit > 0:
            handle = self._load_handle(r.req_id)
            if handle.bytes > 0 or not handle.done:
                self._loads[r.req_id] = handle
                self.stats.tier_loads += 1
        return r, hit, self.m.num_tokens(r.req_id)

    @staticmethod
    def _ids(reqs: list[Request]) -> list[int]:
        return [r.req_id for r in reqs]

    @staticmethod
    def _decode_tokens(decode: list[Request]) -> npt.NDArray[np.int64]:
        return np.array([r.tokens[r.computed] for r in decode], dtype=np.int64)

    def _admission_candidates(self, finishing: set[int]) -> list[Request]:
        out: list[Request] = []
        for r in self._waiting:
            if len(self._running) + len(out) >= self.max_running or r.req_id in finishing:
                break
            out.append(r)
        return out

    def _load_handle(self, req_id: int) -> kvalloc.LoadHandle:
        """The loads an admitted request's hit waits for (a method, so tests can watch it)."""
        return self.m.load_handle(req_id)

    def run(self, max_steps: int = 100_000) -> None:
        """Steps until every submitted request has completed and been finished."""
        for _ in range(max_steps):
            if self.idle:
                return
            self.step()
        raise EngineError(f"not idle after {max_steps} steps")

    # -- the forward pass over a chunk ------------------------------------------------------

    def _forward(self, r: Request, start: int, end: int, loads: kvalloc.LoadHandle | None) -> None:
        """Computes positions ``[start, end)`` of ``r``; samples a token when they reach its
        last known token. ``loads``: what its hit still waits for, layer by layer."""
        model, kv = self.model, self.kv
        tables = [self.m.block_table(r.req_id, g) for g in range(self._groups)]
        xs = [model.embed(t) for t in r.tokens[start:end]]
        n = end - start
        for layer, geo in enumerate(model.layers):
            if loads is not None:
                # Layer-wise loading: this layer's cached KV must be in the device buffer
                # before it is read; later layers keep loading while this one computes.
                self.stats.layer_waits += 1
                if not loads.wait_layer(layer, timeout=LOAD_TIMEOUT_S):
                    raise EngineError(f"request {r.req_id}: layer {layer}'s KV not loaded after {LOAD_TIMEOUT_S} s")
            table = tables[kv.group_of_layer[layer]]
            keys = np.empty((n, geo.kv_heads, geo.k_dim), np.float32)
            values = np.empty((n, geo.kv_heads, geo.v_dim), np.float32)
            queries = []
            for i in range(n):
                q, keys[i], values[i] = model.qkv(layer, xs[i], start + i)
                queries.append(q)
            kv.write(layer, table, start, keys, values)
            # Cached positions before the chunk come through the block table.
            lo0 = model.first_key(layer, start)
            old_k, old_v = kv.read(layer, table, lo0, start)
            for i in range(n):
                lo = model.first_key(layer, start + i)
                if lo < start:
                    k = np.concatenate([old_k[lo - lo0 :], keys[: i + 1]])
                    v = np.concatenate([old_v[lo - lo0 :], values[: i + 1]])
                else:
                    k, v = keys[lo - start : i + 1], values[lo - start : i + 1]
                xs[i] = model.after_attention(layer, xs[i], model.attend(layer, queries[i], k, v))
        r.computed = end
        self.stats.computed_tokens += n
        if end == len(r.tokens):
            logits = model.logits(xs[-1])
            r.logits[end - 1] = logits
            r.tokens.append(int(np.argmax(logits)))
