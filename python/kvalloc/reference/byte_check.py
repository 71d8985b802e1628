"""A byte-checking engine: every KV byte kvalloc hands out is checked against what it must be.

The engine computes no model. It writes, for every token it computes, a token slot of the
token's block in every group: 8-byte words holding a pure function of (salt, the token prefix up
to and including that token, group). Before each computation it reads what attention would read
(every earlier position of a full-attention group, the window before the first new token of a
sliding one) through the manager's block tables and checks each slot against that function. A
page handed out that another request wrote, that nobody finished writing, or that a lower tier
brought back wrong fails the check, whatever the bookkeeping says.

With ``paged=True`` the engine is a paged-attention one (vLLM's kernels): it writes the new
tokens first and then reads every key each new token attends to through the tables, the chunk's
own keys included, so every block of a scheduled range must have a page (the manager's
``prefill_reads_cache=True``).

A block's layout here (``block_tokens`` token slots of ``bytes_per_token`` each) is not kvalloc's
layer-major one: the tiers move whole blocks, so any layout that fills the block works, and one
slot per token makes a partly written block visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

import kvalloc

_MASK = (1 << 64) - 1


def _mix(h: int, x: int) -> int:
    """One step of the prefix function (splitmix64 over the running value and the input)."""
    z = (h ^ (x * 0x9E3779B97F4A7C15)) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _salt_seed(salt: str | bytes | None) -> int:
    if salt is None:
        return 0x5EED
    data = salt.encode() if isinstance(salt, str) else salt
    h = 0x5A17
    for b in data:
        h = _mix(h, b + 1)
    return h


class WrongBytesError(AssertionError):
    """A page read through a block table does not hold what the engine computed there."""


@dataclass
class ByteRequest:
    """A running request as the engine sees it."""

    salt: str | bytes | None
    prompt_len: int
    # The token stream: prompt token ids (or per-position ids derived from block hashes), then
    # output tokens as they are decoded.
    tokens: list[int]
    # prefix[p]: the prefix function over tokens[0..=p].
    # Given as block hashes: decodes are counts, not token ids.
    hash_mode: bool = False
    prefix: list[int] = field(default_factory=list)
    len: int = 0

    def extend_prefix(self, upto: int) -> None:
        h = self.prefix[-1] if self.prefix else _salt_seed(self.salt)
        for p in range(len(self.prefix), upto):
            h = _mix(h, self.tokens[p] + 1)
            self.prefix.append(h)


class ByteCheckEngine:
    """Drives ``manager`` as an engine would and checks every byte it reads.

    ``admit``/``extend``/``finish``/``abort`` mirror the manager's calls; after each call that
    schedules ``[start, end)`` for a request the engine waits for the request's loads, checks
    what attention reads, then writes ``[start, end)``. ``checked_slots`` counts the token slots
    verified."""

    def __init__(
        self, manager: kvalloc.KVCacheManager, buffer: npt.NDArray[np.uint8] | None = None, paged: bool = False
    ) -> None:
        self.m = manager
        self.paged = paged
        self.b = manager.block_tokens
        spec = manager.spec
        self.block_bytes = spec.block_bytes(self.b)
        self.windows = [g.window for g in spec.groups]
        for bb in self.block_bytes:
            if bb % (8 * self.b):
                raise kvalloc.ConfigError("byte check: a token slot must be a whole number of 8-byte words")
        if buffer is None:
            buffer = np.zeros(manager.capacity_bytes, dtype=np.uint8)
            manager.register_device(buffer)
        self.buffer = buffer
        # Per group: the buffer as [pages, block_tokens, words per token] of uint64.
        self.views = []
        for g, bb in enumerate(self.block_bytes):
            pages = manager.num_pages(g)
            words = bb // self.b // 8
            self.views.append(buffer[: pages * bb].view(np.uint64).reshape(pages, self.b, words))
        self.requests: dict[int, ByteRequest] = {}
        self.checked_slots = 0
        self.hit_tokens = 0

    # -- the content function ------------------------------------------------------------------

    @staticmethod
    def word(prefix_value: int, group: int) -> int:
        return _mix(prefix_value, 0x6A09E667 + group)

    # -- manager calls ---------------------------------------------------------------------------

    def prompt(
        self,
        tokens: list[int] | None = None,
        *,
        block_ids: list[int] | None = None,
        num_tokens: int | None = None,
    ) -> tuple[object, list[int], bool]:
        """The manager's form of a prompt, its token stream as the engine sees it, and whether it
        is given as block hashes."""
        if block_ids is not None:
            if num_tokens is None:
                raise kvalloc.InvalidArgumentError("block_ids need num_tokens")
            ids = np.array(block_ids, dtype=np.uint64)
            # A position's "token" is its block's id and its offset in the block: two prompts
            # with the same block ids have the same KV, as the manager assumes.
            stream = [(block_ids[p // self.b] * 64 + p % self.b) & ((1 << 62) - 1) for p in range(num_tokens)]
            return kvalloc.BlockHashes(ids, num_tokens), stream, True
        if tokens is None:
            raise kvalloc.InvalidArgumentError("a prompt needs tokens or block_ids")
        return np.array(tokens, dtype=np.int64), list(tokens), False

    def admit(
        self,
        req: int,
        tokens: list[int] | None = None,
        *,
        block_ids: list[int] | None = None,
        num_tokens: int | None = None,
        salt: str | bytes | None = None,
        max_tokens: int | None = None,
    ) -> int | None:
        """Admits a prompt of token ids, or of block hashes (``block_ids`` with ``num_tokens``);
        on admission checks the hit's bytes and computes the first chunk."""
        prompt, stream, hash_mode = self.prompt(tokens, block_ids=block_ids, num_tokens=num_tokens)
        hit = self.m.admit(req, prompt, salt, max_tokens)
        if hit is not None:
            self._admitted(req, hit, stream, hash_mode, salt)
        return hit

    def _admitted(self, req: int, hit: int, stream: list[int], hash_mode: bool, salt: str | bytes | None) -> None:
        r = ByteRequest(salt=salt, prompt_len=len(stream), tokens=stream, hash_mode=hash_mode)
        self.requests[req] = r
        self.hit_tokens += hit
        r.len = hit
        self._compute(req, r, self.m.num_tokens(req))

    def extend(self, req: int, n: int, new_tokens: list[int] | None = None) -> bool:
        """Continues a prefill by ``n`` tokens, or decodes ``new_tokens`` (ids mode) / ``n``
        counted tokens (a block-hash prompt)."""
        if new_tokens is not None:
            ok = self.m.extend(req, np.array(new_tokens, dtype=np.int64))
        else:
            ok = self.m.extend(req, n)
        if ok:
            self._extended(req, new_tokens)
        return bool(ok)

    def _extended(self, req: int, new_tokens: list[int] | None) -> None:
        r = self.requests[req]
        end = self.m.num_tokens(req)
        if new_tokens is not None and len(r.tokens) < end:
            r.tokens.extend(new_tokens)
        while len(r.tokens) < end:
            # Counted output tokens get ids no other request has.
            r.tokens.append((1 << 61) + req * 1_000_003 + len(r.tokens))
        self._compute(req, r, end)

    def step(
        self,
        finish: list[int],
        decodes: list[tuple[int, int]],
        counts: list[tuple[int, int]],
        admits: list[tuple[int, dict, int | None]],
    ) -> kvalloc.StepResult:
        """One batched step: ``finish``, then one-token ``decodes`` (req, token id) or ``counts``
        (req, tokens: prefill chunks, block-hash decodes) — not both, as the manager takes one
        kind per call — then ``admits`` (req, prompt keywords as for ``admit``, max_tokens).
        The engine then computes the step's requests in the manager's order."""
        if decodes and counts:
            raise kvalloc.InvalidArgumentError("a step extends by tokens or by counts, not both")
        forms = []
        for req, p, max_tokens in admits:
            salt = p.get("salt")
            prompt, stream, hash_mode = self.prompt(
                p.get("tokens"), block_ids=p.get("block_ids"), num_tokens=p.get("num_tokens")
            )
            forms.append(((req, prompt, salt, max_tokens), stream, hash_mode, salt))
        kw: dict = {"finish": np.array(finish, dtype=np.uint64), "admit": [f[0] for f in forms]}
        if decodes:
            kw["extend_ids"] = np.array([d[0] for d in decodes], dtype=np.uint64)
            kw["extend_tokens"] = np.array([d[1] for d in decodes], dtype=np.int64)
        elif counts:
            kw["extend_ids"] = np.array([c[0] for c in counts], dtype=np.uint64)
            kw["extend_counts"] = np.array([c[1] for c in counts], dtype=np.uint64)
        res = self.m.step(**kw)
        for req in finish:
            del self.requests[req]
        extensions = decodes or counts
        for (req, x), ok in zip(extensions, res.extended):
            if ok:
                self._extended(req, [x] if decodes else None)
        for (args, stream, hash_mode, salt), hit in zip(forms, res.hits):
            if hit >= 0:
                self._admitted(args[0], int(hit), stream, hash_mode, salt)
        return res

    def finish(self, req: int) -> None:
        self.m.finish(req)
        del self.requests[req]

    def abort(self, req: int) -> None:
        self.m.abort(req)
        del self.requests[req]

    def forget_all(self) -> None:
        """The engine restarts: nothing it was computing is running any more."""
        self.requests.clear()

    # -- the check and the write -----------------------------------------------------------------

    def _tables(self, req: int) -> list[npt.NDArray[np.int32]]:
        return [self.m.block_table(req, g) for g in range(len(self.block_bytes))]

    def _compute(self, req: int, r: ByteRequest, end: int) -> None:
        start = r.len
        self.m.load_handle(req).wait_all()
        r.extend_prefix(end)
        tables = self._tables(req)
        if self.paged:
            # Write first, then read what each new token attends to, its own chunk included.
            self._write(r, tables, start, end, strict=True)
            self._check_reads(req, r, tables, start, end)
        else:
            self._check_reads(req, r, tables, start, start)
            self._write(r, tables, start, end)
        r.len = end

    def _check_reads(
        self, req: int, r: ByteRequest, tables: list[npt.NDArray[np.int32]], start: int, last: int
    ) -> None:
        """Checks every key the tokens ``start..max(start, last - 1)`` attend to (before ``last``;
        a sliding group's from the window of the first of them)."""
        for g, table in enumerate(tables):
            w = self.windows[g]
            first = 0 if w is None else max(0, start - w + 1)
            for p in range(first, last):
                page = int(table[p // self.b])
                if page == kvalloc.NULL_PAGE:
                    raise WrongBytesError(f"request {req}: group {g} position {p} (< {start}) has no page")
                got = self.views[g][page, p % self.b]
                want = self.word(r.prefix[p], g)
                if not (got == want).all():
                    raise WrongBytesError(
                        f"request {req}: group {g} block {p // self.b} (page {page}) slot {p % self.b}: "
                        f"wrong KV for position {p} (scheduled from {start})"
                    )
                self.checked_slots += 1

    def _write(
        self, r: ByteRequest, tables: list[npt.NDArray[np.int32]], start: int, end: int, strict: bool = False
    ) -> None:
        for g, table in enumerate(tables):
            view = self.views[g]
            for p in range(start, end):
                page = int(table[p // self.b])
                if page != kvalloc.NULL_PAGE:
                    view[page, p % self.b] = self.word(r.prefix[p], g)
                elif strict:
                    raise WrongBytesError(f"group {g} position {p} (scheduled {start}..{end}) has no page to write")
