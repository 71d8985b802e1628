"""A serving engine around :class:`KVCacheManager`: the template for integrating kvalloc.

Each engine step does what a real scheduler does, in this order:

1. tell the manager what happened and what runs next (``m.step``): requests that finished or
   are preempted, one decode token per running request, the next prefill chunk of requests
   still in their prompt; then admit waiting requests (``m.admit(..., max_tokens=chunk)``,
   which returns how many prompt tokens the cache already holds);
2. read each scheduled request's block tables (``m.block_table``) and compute its new tokens:
   write their K and V where the table has a page, attend to cached positions through the
   table and to the chunk's own fresh keys;
3. sample greedily; a request that has its tokens is finished in the next step, and its
   prompt and output stay cached for the next turn.

Running out of memory is not an error: an extension the manager refuses preempts that request
(``finish``, so its computed blocks stay cached, then admitted again later from where the cache
still has it); an admission it refuses waits.

Requests are computed in the order the manager scheduled them, because a request admitted
later in a step may reuse blocks an earlier one computes in the same step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

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
    admissions: int = 0
    preemptions: int = 0
    computed_tokens: int = 0
    hit_tokens: int = 0


class Engine:
    """The reference engine: one model, one manager, one device buffer.

    ``prefill_chunk`` caps the tokens a request computes per step. ``clip_chunks_to_window``
    (default on) also ends a chunk early where the manager would release, while scheduling it,
    sliding-window blocks that the chunk itself must read or write (see
    :meth:`prefill_end`); it is a workaround for a manager limitation reported with this
    engine. ``validate`` runs ``m.validate()`` after every step.
    """

    def __init__(
        self,
        model: TinyHybridModel,
        manager: kvalloc.KVCacheManager,
        *,
        max_running: int = 8,
        prefill_chunk: int = 64,
        clip_chunks_to_window: bool = True,
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
        self.clip_chunks_to_window = clip_chunks_to_window
        self.validate = validate
        self.stats = EngineStats()
        self._groups = len(manager.spec.groups)
        self._windows = [g.window for g in manager.spec.groups if g.window is not None]
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._finish_next: list[Request] = []
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

    # -- chunking ---------------------------------------------------------------------------

    def prefill_end(self, start: int, want_end: int) -> int:
        """Where a chunk of a request at ``start`` ends: ``want_end``, or earlier with
        ``clip_chunks_to_window``.

        The manager releases a sliding group's blocks below the window of the new length's
        last block boundary E (``[E - W, E)``) when it schedules a chunk, before the engine has
        computed it. The chunk's first token still needs keys from ``start + 1 - W``, and the
        chunk must write every block it covers that the manager keeps as a checkpoint. Both
        hold when block ``(start + 1 - W) // B`` is not released, i.e. when
        ``(E - W) // B <= (start + 1 - W) // B``.
        """
        if not self.clip_chunks_to_window or not self._windows:
            return want_end
        b = self.m.block_tokens
        end = want_end
        for w in self._windows:
            keep_from = max(start + 1 - w, 0) // b
            # Largest boundary E with max(E - W, 0) // B <= keep_from; a chunk may end up to
            # B - 1 tokens past it.
            e_max = ((keep_from + 1) * b + w - 1) // b * b
            end = min(end, e_max + b - 1)
        return max(end, start + 1)

    def _admission_chunk(self) -> int:
        """``max_tokens`` for an admission: the hit is unknown until the manager answers, so
        take the smallest safe chunk over block-aligned starts (hits are block-aligned)."""
        chunk = self.prefill_chunk
        if self.clip_chunks_to_window and self._windows:
            b = self.m.block_tokens
            period = max(self._windows) // b + 3
            for k in range(period):
                s = k * b
                chunk = min(chunk, self.prefill_end(s, s + chunk) - s)
        return chunk

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Schedules and computes one step; returns the requests that completed in it."""
        self.stats.steps += 1
        finish = [r.req_id for r in self._finish_next]
        self._finish_next = []
        scheduled: list[tuple[Request, int, int]] = []
        refused: list[Request] = []

        # 1a. Finishes and preemptions free memory first; then one decode token per request.
        decode = [r for r in self._running.values() if r.computed >= r.admitted_len]
        _, ok = self.m.step(
            finish=finish,
            extend_ids=[r.req_id for r in decode],
            extend_tokens=np.array([r.tokens[r.computed] for r in decode], dtype=np.int64),
        )
        for r, fit in zip(decode, ok):
            (scheduled.append((r, r.computed, r.computed + 1)) if fit else refused.append(r))
        # 1b. The next chunk of requests still in their prompt. (m.step takes token ids or
        # counts for its extensions, not both, hence a second call.)
        prefill = [r for r in self._running.values() if r.computed < r.admitted_len]
        if prefill:
            ends = [self.prefill_end(r.computed, min(r.computed + self.prefill_chunk, r.admitted_len)) for r in prefill]
            _, ok = self.m.step(
                extend_ids=[r.req_id for r in prefill],
                extend_counts=[e - r.computed for r, e in zip(prefill, ends)],
            )
            for r, e, fit in zip(prefill, ends, ok):
                (scheduled.append((r, r.computed, e)) if fit else refused.append(r))
        # 1c. Out of memory: preempt the newest refused request (finish it next step, so its
        # computed blocks stay cached, and admit it again before new requests). The others
        # refused wait a step: the memory it frees lets the oldest requests go on.
        if refused:
            victim = max(refused, key=lambda r: r.admit_seq)
            if len(self._running) == 1:
                raise EngineError(f"request {victim.req_id} cannot grow past {victim.computed} tokens in the budget")
            del self._running[victim.req_id]
            victim.preemptions += 1
            self.stats.preemptions += 1
            self._finish_next.append(victim)
            self._waiting.appendleft(victim)
        # 1d. Admissions, oldest first, while there is room (none when memory is short).
        chunk = self._admission_chunk()
        while self._waiting and len(self._running) < self.max_running and not refused:
            r = self._waiting[0]
            if r in self._finish_next:
                break  # preempted this step: not finished yet
            hit = self.m.admit(r.req_id, np.array(r.tokens, dtype=np.int64), max_tokens=chunk)
            if hit is None:
                if not self._running and not finish:
                    raise EngineError(f"request {r.req_id} ({len(r.tokens)} tokens) cannot fit in the budget")
                break
            self._waiting.popleft()
            self._running[r.req_id] = r
            self.stats.admissions += 1
            self.stats.hit_tokens += hit
            r.admit_seq = self.stats.admissions
            r.hits.append(hit)
            r.admitted_len = len(r.tokens)
            r.computed = hit
            scheduled.append((r, hit, self.m.num_tokens(r.req_id)))
        if self.validate:
            self.m.validate()

        # 2. Compute, in scheduling order.
        completed = []
        for r, start, end in scheduled:
            self._forward(r, start, end)
            if r.done:
                del self._running[r.req_id]
                self._finish_next.append(r)
                completed.append(r)
        return completed

    def run(self, max_steps: int = 100_000) -> None:
        """Steps until every submitted request has completed and been finished."""
        for _ in range(max_steps):
            if self.idle:
                return
            self.step()
        raise EngineError(f"not idle after {max_steps} steps")

    # -- the forward pass over a chunk ------------------------------------------------------

    def _forward(self, r: Request, start: int, end: int) -> None:
        """Computes positions ``[start, end)`` of ``r``; samples a token when they reach its
        last known token."""
        model, kv = self.model, self.kv
        tables = [self.m.block_table(r.req_id, g) for g in range(self._groups)]
        xs = [model.embed(t) for t in r.tokens[start:end]]
        n = end - start
        for layer, geo in enumerate(model.layers):
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
