"""Multi-turn conversations served by the reference engine, and their check against the
cache-free model.

A conversation is a list of user messages. Turn k's prompt is everything said so far (earlier
prompts and answers) plus message k, so each turn can resume from the previous turn's cached
prefix. Conversations start at given steps, so their turns interleave in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kvalloc.reference.engine import Engine, EngineError, Request
from kvalloc.reference.model import TinyHybridModel, reference_logits


@dataclass
class Conversation:
    messages: list[npt.NDArray[np.int64]]
    """User tokens of each turn."""
    max_new_tokens: int = 8
    start_step: int = 0
    """Engine step at which the first turn arrives."""
    turns: list[Request] = field(default_factory=list)
    """One completed request per turn."""

    @property
    def history(self) -> list[int]:
        return list(self.turns[-1].tokens) if self.turns else []


def serve(engine: Engine, conversations: list[Conversation], max_steps: int = 100_000) -> None:
    """Runs every conversation to its last turn."""
    pending: dict[int, Conversation] = {}  # request id -> its conversation

    def submit(c: Conversation) -> None:
        prompt = c.history + [int(t) for t in c.messages[len(c.turns)]]
        pending[engine.submit(prompt, c.max_new_tokens).req_id] = c

    step = 0
    while step < max_steps:
        for c in conversations:
            if c.start_step == step and c.messages:
                submit(c)
        if engine.idle and all(len(c.turns) == len(c.messages) for c in conversations):
            return
        for r in engine.step():
            c = pending.pop(r.req_id)
            c.turns.append(r)
            if len(c.turns) < len(c.messages):
                submit(c)
        step += 1
    raise EngineError(f"conversations not done after {max_steps} steps")


def mismatches(model: TinyHybridModel, r: Request, want: npt.NDArray[np.float32] | None = None) -> list[str]:
    """Differences between the logits the engine computed for a request and those of the
    cache-free model over the same tokens, compared bit for bit (empty when identical).

    ``want``: the cache-free logits of a sequence that starts with ``r.tokens[:-1]`` (the model
    is causal, so one pass over a conversation's final history serves all its turns)."""
    if want is None:
        want = reference_logits(model, r.tokens[:-1])
    out = []
    positions = range(r.prompt_len - 1, len(r.tokens) - 1)
    if sorted(r.logits) != list(positions):
        out.append(f"request {r.req_id}: logits at {sorted(r.logits)}, expected {list(positions)}")
    for pos in positions:
        got = r.logits.get(pos)
        if got is not None and not np.array_equal(got.view(np.uint32), want[pos].view(np.uint32)):
            diff = float(np.nanmax(np.abs(got - want[pos]))) if np.isfinite(got).all() else float("nan")
            out.append(f"request {r.req_id}: logits at position {pos} differ (max abs diff {diff})")
    return out


def conversation_mismatches(model: TinyHybridModel, c: Conversation) -> list[str]:
    """:func:`mismatches` for every turn, against one cache-free pass over the conversation
    (each turn's tokens are a prefix of the final history)."""
    history = c.history
    want = reference_logits(model, history[:-1])
    out = []
    for r in c.turns:
        if history[: len(r.tokens)] != r.tokens:
            out.append(f"request {r.req_id}: its tokens are not a prefix of the conversation")
        out += mismatches(model, r, want)
    return out
