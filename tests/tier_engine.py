"""A tiny "engine" for the tier tests: it writes each block's KV as a pure function of the
prefix into a registered device buffer and checks, after every admission, that every page below
the hit holds exactly those bytes, wherever kvalloc served them from."""

from __future__ import annotations

import hashlib

import numpy as np

import kvalloc

B = 16
CONFIG = {
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
}


def spec() -> kvalloc.ModelSpec:
    return kvalloc.ModelSpec.from_hf_config(CONFIG)


def content(prefix: np.ndarray, group: int, nbytes: int) -> np.ndarray:
    seed = hashlib.blake2b(prefix.astype(np.int64).tobytes() + bytes([group]), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(seed, "little")).integers(0, 256, nbytes, dtype=np.uint8)


def conversation(family: int, turns: int, tail: int = 0) -> np.ndarray:
    """48 shared system-prompt tokens, `turns` turns of 40 tokens, `tail` extra tokens."""
    parts = [np.arange(48)]
    for t in range(turns):
        parts.append(1000 * (family + 1) + 40 * t + np.arange(40))
    parts.append(900_000 + np.arange(tail))
    return np.concatenate(parts).astype(np.int64)


class Engine:
    def __init__(self, capacity: int = 96 << 10, **tiers) -> None:
        if "remote_url" in tiers:
            # A generous deadline for the remote store: most tests count exact hits, and a
            # busy test machine can stall a loopback reply past the 50 ms default. Tests of
            # the deadline pass their own.
            tiers.setdefault("remote_timeout_ms", 2000)
        self.spec = spec()
        self.m = kvalloc.KVCacheManager(self.spec, capacity, block_tokens=B, **tiers)
        self.buf = np.zeros(capacity, dtype=np.uint8)
        self.m.register_device(self.buf)
        self.block_bytes = self.spec.block_bytes(B)
        self.next_id = 0

    def page(self, g: int, p: int) -> np.ndarray:
        bb = self.block_bytes[g]
        return self.buf[p * bb:(p + 1) * bb]

    def admit(self, prompt: np.ndarray) -> tuple[int, int | None]:
        self.next_id += 1
        rid = self.next_id
        hit = self.m.admit(rid, prompt)
        while hit is None and self.m.waiting_for_kv(rid):
            # A background load from disk or the remote store: wait for it, admit again.
            assert self.m.wait_for_kv(rid, timeout=30)
            hit = self.m.admit(rid, prompt)
        if hit is None:
            return rid, None
        handle = self.m.load_handle(rid)
        for layer in range(self.spec.num_layers):
            assert handle.wait_layer(layer, timeout=10)
        assert handle.wait_all(timeout=10)
        for g in range(len(self.block_bytes)):
            for i, p in enumerate(self.m.block_table(rid, g)):
                if p == kvalloc.NULL_PAGE or (i + 1) * B > len(prompt):
                    continue
                want = content(prompt[:(i + 1) * B], g, self.block_bytes[g])
                if i < hit // B:
                    assert np.array_equal(self.page(g, p), want), f"req {rid} group {g} block {i} (hit {hit})"
                else:
                    self.page(g, p)[:] = want
        self.m.validate()
        return rid, hit

    def serve(self, prompt: np.ndarray) -> int | None:
        rid, hit = self.admit(prompt)
        if hit is not None:
            self.m.finish(rid)
            self.m.validate()
        return hit

    def churn(self, families: range, turns: int = 2) -> None:
        for f in families:
            self.serve(conversation(f, turns))


def resume(prompt: np.ndarray) -> int:
    """The hit a previously served `prompt` gives its next turn: its last whole block."""
    return len(prompt) // B * B
