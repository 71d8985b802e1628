"""Workloads for the vLLM plug-in's exactness tests and capacity bench: token-id prompts for the
tiny hybrid model (vocab 1024, sliding window 32, blocks of 32), generated turn by turn.

Each workload is a list of rounds; a round is a list of prompts given to ``LLM.generate``
together, built from the outputs of the rounds before it (multi-turn chats).
"""

from __future__ import annotations

import random
from typing import Callable

Prompt = list[int]
# Builds round r's prompts from every earlier round's (prompt, output) pairs.
RoundFn = Callable[[int, list[list[tuple[Prompt, list[int]]]]], list[Prompt]]


def _tokens(rng: random.Random, n: int) -> Prompt:
    return [rng.randrange(3, 1000) for _ in range(n)]


def chat(conversations: int = 6, turns: int = 3, system: int = 200, user: int = 40, systems: int = 2, seed: int = 0):
    """Multi-turn chats: ``systems`` system prompts shared by the conversations, each turn the
    whole history plus a new user message (prompts much longer than the window)."""
    rng = random.Random(seed)
    system_prompts = [_tokens(rng, system + 7 * i) for i in range(systems)]
    users = [[_tokens(rng, user + (c * 5 + t * 3) % 17) for t in range(turns)] for c in range(conversations)]

    def build(r: int, history: list[list[tuple[Prompt, list[int]]]]) -> list[Prompt]:
        prompts = []
        for c in range(conversations):
            if r == 0:
                prompts.append(system_prompts[c % systems] + users[c][0])
            else:
                prev_prompt, prev_out = history[r - 1][c]
                prompts.append(prev_prompt + prev_out + users[c][r])
        return prompts

    return turns, build


def diverge(requests: int = 8, length: int = 150, seed: int = 1):
    """Prompts sharing a prefix that ends inside a block (offsets 1..31 into block 3 and 4),
    then diverging; given in two rounds so the second finds the first's blocks cached."""
    rng = random.Random(seed)
    base = _tokens(rng, length)
    splits = [96 + 1 + (i * 13) % 60 for i in range(requests)]
    prompts = [base[:s] + _tokens(rng, length - s + i) for i, s in enumerate(splits)]

    def build(r: int, history) -> list[Prompt]:
        half = len(prompts) // 2
        return prompts[:half] if r == 0 else prompts[half:] + [base[:splits[0]] + _tokens(rng, 5)]

    return 2, build


def single(length: int = 100, seed: int = 2, count: int = 1):
    """``count`` unrelated prompts in one round: the smallest cases."""
    rng = random.Random(seed)
    prompts = [_tokens(rng, length + 7 * i) for i in range(count)]
    return 1, lambda r, history: prompts


WORKLOADS = {"chat": chat, "diverge": diverge, "single": single}
