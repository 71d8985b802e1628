"""Deterministic workloads for the side-by-side benchmark: one list of requests that every
manager sees identically (same token ids, same outputs, same dependencies).

A request's output tokens are fixed in advance, so the three managers cache exactly the same
token sequences; a dependent request (the next turn of a conversation) becomes ready only when
the request it resumes has finished.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Token ids stay below this (a typical vocabulary size); derived ids wrap into it.
VOCAB = 150_000
# The Mooncake trace names 512-token blocks by hash id.
MOONCAKE_BLOCK_TOKENS = 512


@dataclass
class Request:
    rid: int
    prompt: np.ndarray  # int64 token ids
    output: np.ndarray  # int64 token ids the "model" samples, in order
    after: int | None = None  # rid that must finish before this one arrives
    # Scheduler state, reset by `reset()` before each manager's run.
    generated: int = field(default=0)
    preemptions: int = field(default=0)

    def context(self) -> np.ndarray:
        """Tokens whose KV a (re)admission must have: the prompt plus the output fed so far."""
        if self.generated == 0:
            return self.prompt
        return np.concatenate([self.prompt, self.output[: self.generated]])

    def reset(self) -> None:
        self.generated = 0
        self.preemptions = 0


def chat(
    conversations: int,
    turns: int,
    system_prompts: int,
    system_len: int,
    user_len: int,
    output_len: int,
    seed: int = 0,
) -> list[Request]:
    """Multi-turn chat: each conversation opens with one of `system_prompts` shared system
    prompts; turn k's prompt is the whole previous context (prompt and output of turn k-1)
    plus `user_len` new tokens. Requests are listed turn by turn, conversations interleaved
    (round robin), the order in which users come back."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, VOCAB, system_len, dtype=np.int64) for _ in range(system_prompts)]
    reqs: list[Request] = []
    contexts = [systems[c % system_prompts] for c in range(conversations)]
    last: list[int | None] = [None] * conversations
    for _turn in range(turns):
        for c in range(conversations):
            user = rng.integers(0, VOCAB, user_len, dtype=np.int64)
            prompt = np.concatenate([contexts[c], user])
            out = rng.integers(0, VOCAB, output_len, dtype=np.int64)
            r = Request(rid=len(reqs), prompt=prompt, output=out, after=last[c])
            reqs.append(r)
            last[c] = r.rid
            contexts[c] = np.concatenate([prompt, out])
    return reqs


def block_tokens_of(hash_id: int) -> np.ndarray:
    """The 512 token ids of one Mooncake block: a pure function of its hash id, so equal hash
    ids give equal tokens and distinct ones (almost surely) differ from the first token."""
    rng = np.random.default_rng(hash_id + 1)
    return rng.integers(0, VOCAB, MOONCAKE_BLOCK_TOKENS, dtype=np.int64)


def mooncake(path: Path, requests: int, max_output: int | None = None) -> list[Request]:
    """The first `requests` rows of a Mooncake trace (timestamp, input_length, output_length,
    hash_ids), in trace order. Prompt tokens come from the hash ids (512 tokens each, the last
    block cut to input_length); outputs are derived from the row number. Rows arrive in trace
    order and are admitted as the memory allows (closed loop: timestamps are not replayed)."""
    reqs: list[Request] = []
    cache: dict[int, np.ndarray] = {}
    with open(path) as f:
        for line in f:
            if len(reqs) == requests:
                break
            row = json.loads(line)
            blocks = []
            for h in row["hash_ids"]:
                if h not in cache:
                    cache[h] = block_tokens_of(h)
                blocks.append(cache[h])
            prompt = np.concatenate(blocks)[: row["input_length"]]
            n_out = max(1, row["output_length"])
            if max_output is not None:
                n_out = min(n_out, max_output)
            out = np.random.default_rng(1_000_000 + len(reqs)).integers(0, VOCAB, n_out, dtype=np.int64)
            reqs.append(Request(rid=len(reqs), prompt=prompt, output=out))
    return reqs
