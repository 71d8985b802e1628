"""The scheduler loop every manager is driven by: continuous batching, one decode token per
running request per step, FCFS admission, preemption of the newest running request when a
decode allocation fails (vLLM's and SGLang's default), no admission in a step that preempted.

A driver owns one manager and does, per step, what its engine's scheduler does with it:

- ``finish(reqs)``: free requests that finished last step (their KV enters the prefix cache);
- ``decode(running) -> preempted``: called once per step, first (even with nothing running);
  allocate one token for each running request (the token it
  sampled last step), preempting from the tail of ``running`` when memory runs out; returns
  the preempted requests in preemption order, already removed from ``running``;
- ``admit(reqs) -> hits``: look up and admit waiting requests in order, stopping at the first
  that does not fit; returns the hit tokens of those admitted (a prefix of ``reqs``);
- ``refuse(req)``: drop what the driver keeps for a request the simulator refuses (one that
  does not fit with nothing running: an engine rejects it rather than wait forever); the
  manager itself holds nothing for it by then;
- ``blocks_back() -> bool``: after the run, whether every block is free or cached, i.e. no
  request still holds one;
- ``seconds``: time spent in the manager's calls, accumulated by the driver itself.

A driver whose manager serves a whole step in one call has, instead of ``decode`` and
``admit``, ``step(running, candidates) -> (preempted, hits)``: what ``decode`` does and then,
only if nothing was preempted, what ``admit(candidates)`` does (``hits`` empty otherwise). The
candidates are chosen before the step, as they would be after a decode that preempts nothing,
so the outcome is the same.

Every run terminates: a request that a manager cannot admit with nothing running never will
(all its memory is free or evictable then), so the simulator refuses it, counts it, and goes
on; the next turn of a refused conversation arrives as if it had finished. Each admission
samples a token, so a request that is admitted and then preempted still progresses.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, cast

from workload import Request


class Driver(Protocol):
    name: str
    seconds: float

    def finish(self, reqs: list[Request]) -> None: ...
    def refuse(self, req: Request) -> None: ...
    def blocks_back(self) -> bool: ...


class StepwiseDriver(Driver, Protocol):
    def decode(self, running: list[Request]) -> list[Request]: ...
    def admit(self, reqs: list[Request]) -> list[int]: ...


class CombinedDriver(Driver, Protocol):
    def step(self, running: list[Request], candidates: list[Request]) -> tuple[list[Request], list[int]]: ...


def _candidates(waiting: deque[Request], running: int, max_running: int, max_prefill_tokens: int) -> list[Request]:
    """Waiting requests to try in order, within the running cap and the step's prefill budget
    (always at least one, so a long prompt is not starved)."""
    candidates: list[Request] = []
    if running >= max_running:
        return candidates
    budget = max_prefill_tokens
    for r in waiting:
        if running + len(candidates) == max_running:
            break
        n = len(r.prompt) + r.generated
        if candidates and n > budget:
            break
        candidates.append(r)
        budget -= n
    return candidates


@dataclass
class Result:
    name: str
    seconds: float
    wall_seconds: float
    requests: int
    admissions: int
    prompt_tokens: int  # of first admissions
    hit_tokens: int  # prompt tokens served from cache at first admissions
    preemptions: int
    refused: list[int]  # rids refused: they did not fit with nothing running
    steps: int
    blocks_back: bool


def run(driver: StepwiseDriver | CombinedDriver, reqs: list[Request], max_running: int, max_prefill_tokens: int) -> Result:
    for r in reqs:
        r.reset()
    dependents: dict[int, list[Request]] = {}
    waiting: deque[Request] = deque()
    for r in reqs:
        if r.after is None:
            waiting.append(r)
        else:
            dependents.setdefault(r.after, []).append(r)

    running: list[Request] = []
    finished: list[Request] = []
    done = admissions = prompt_tokens = hit_tokens = preemptions = steps = 0
    refused: list[int] = []
    combined = cast(CombinedDriver, driver) if hasattr(driver, "step") else None
    stepwise = cast(StepwiseDriver, driver)
    wall = time.perf_counter()
    while done < len(reqs):
        steps += 1
        if finished:
            driver.finish(finished)
            for r in finished:
                waiting.extend(dependents.pop(r.rid, ()))
            finished = []

        if combined is not None:
            candidates = _candidates(waiting, len(running), max_running, max_prefill_tokens)
            preempted, hits = combined.step(running, candidates)
        else:
            preempted = stepwise.decode(running)
            candidates, hits = [], []
            if not preempted and waiting:
                candidates = _candidates(waiting, len(running), max_running, max_prefill_tokens)
                if candidates:
                    hits = stepwise.admit(candidates)
        for r in preempted:
            r.preemptions += 1
        preemptions += len(preempted)
        waiting.extendleft(reversed(preempted))

        if not preempted and candidates:
            for r, hit in zip(candidates, hits):
                waiting.popleft()
                running.append(r)
                admissions += 1
                if r.preemptions == 0:  # a resumed request's hits recover its own work
                    prompt_tokens += len(r.prompt)
                    hit_tokens += hit
            if not hits and not running:
                # Nothing runs and the head does not fit: it never will. Refuse it.
                r = waiting.popleft()
                driver.refuse(r)
                refused.append(r.rid)
                done += 1
                waiting.extend(dependents.pop(r.rid, ()))

        # The step's forward pass samples one token for every running request.
        still: list[Request] = []
        for r in running:
            r.generated += 1
            if r.generated == len(r.output):
                finished.append(r)
                done += 1
            else:
                still.append(r)
        running[:] = still

    if finished:
        driver.finish(finished)
    return Result(
        name=driver.name,
        seconds=driver.seconds,
        wall_seconds=time.perf_counter() - wall,
        requests=len(reqs),
        admissions=admissions,
        prompt_tokens=prompt_tokens,
        hit_tokens=hit_tokens,
        preemptions=preemptions,
        refused=refused,
        steps=steps,
        blocks_back=driver.blocks_back(),
    )
