"""A tiny hybrid-attention transformer in numpy, and its cache-free forward pass.

The model is small enough to run on a CPU in milliseconds per token, yet has what makes KV
caching hard for hybrid models: full-attention layers every few sliding-window layers, and
grouped-query attention whose KV head count and head dims differ between the two kinds. Its
weights come from a fixed seed, so no download is needed.

Every token's arithmetic depends only on that token's inputs and on the keys and values it
attends to, never on how tokens are batched: projections are per-token vector-matrix products,
and every sum runs over the first axis of a fresh array (a sequential sum, in position order for
attention). So the cached engine and :func:`reference_logits`, which recomputes everything over
plain contiguous arrays, produce bit-identical logits if and only if the engine fed attention the
same keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import kvalloc

F32 = np.float32
Vec = npt.NDArray[np.float32]


def default_config() -> dict[str, Any]:
    """A Hugging Face style config: 8 layers, 1 full : 3 sliding (window 16), GQA with a
    different KV geometry per kind (full: 1 KV head of K 24 / V 16; sliding: 2 KV heads of
    K 16 / V 12), float32 KV."""
    return {
        "model_type": "kvalloc-reference",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 24,
        "v_head_dim": 16,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 16,
        "swa_v_head_dim": 12,
        "sliding_window": 16,
        "layer_types": ["full_attention"] + ["sliding_attention"] * 3
        + ["full_attention"] + ["sliding_attention"] * 3,
        "vocab_size": 128,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float32",
    }


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's attention shape, as the KV cache sees it."""

    sliding: bool
    window: int | None
    q_heads: int
    kv_heads: int
    k_dim: int
    v_dim: int


@dataclass
class _LayerWeights:
    attn_norm: Vec
    wqkv: Vec  # [hidden, (q_heads + kv_heads) * k_dim + kv_heads * v_dim]
    wo: Vec  # [q_heads * v_dim, hidden]
    mlp_norm: Vec
    w_gate_up: Vec  # [hidden, 2 * intermediate]
    w_down: Vec  # [intermediate, hidden]


def _matvec(x: Vec, w: Vec) -> Vec:
    """``x @ w`` as a sequential sum over the input dimension (no BLAS: its blocking may depend
    on shapes and alignment)."""
    return np.add.reduce(x[:, None] * w, axis=0)


def _rms_norm(x: Vec, weight: Vec, eps: F32) -> Vec:
    ms = np.add.reduce(x * x, axis=0) / F32(x.shape[0])
    return x / np.sqrt(ms + eps) * weight


def _silu(x: Vec) -> Vec:
    out: Vec = x / (1 + np.exp(-x))
    return out


class TinyHybridModel:
    """The reference model. Construct with a config dict (default: :func:`default_config`) and
    a seed; ``spec`` is the geometry kvalloc manages (from the same config)."""

    def __init__(self, config: dict[str, Any] | None = None, seed: int = 0) -> None:
        self.config = dict(config if config is not None else default_config())
        c = self.config
        self.spec = kvalloc.ModelSpec.from_hf_config(c, dtype="float32")
        self.hidden = int(c["hidden_size"])
        self.vocab = int(c["vocab_size"])
        self.eps = F32(c.get("rms_norm_eps", 1e-5))
        self.layers: list[LayerGeometry] = [None] * self.spec.num_layers  # type: ignore[list-item]
        for group in self.spec.groups:
            if group.dtype != "float32":
                raise kvalloc.ConfigError(f"dtype: the reference model runs float32, not {group.dtype}")
            geo = LayerGeometry(
                sliding=group.kind == "sliding",
                window=group.window,
                q_heads=int(c["num_attention_heads"]),
                kv_heads=group.kv_heads,
                k_dim=group.k_dim,
                v_dim=group.v_dim,
            )
            if geo.q_heads % geo.kv_heads or geo.k_dim % 2:
                raise kvalloc.ConfigError(
                    "num_attention_heads must be a multiple of each kind's KV heads, and K head "
                    "dims even (RoPE rotates pairs)"
                )
            for layer in group.layers:
                self.layers[layer] = geo
        rng = np.random.default_rng(seed)

        def mat(rows: int, cols: int) -> Vec:
            return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(F32)

        def norm_weight() -> Vec:
            return (1.0 + 0.1 * rng.standard_normal(self.hidden)).astype(F32)

        inter = int(c["intermediate_size"])
        self.embedding = rng.standard_normal((self.vocab, self.hidden)).astype(F32)
        self.weights = [
            _LayerWeights(
                attn_norm=norm_weight(),
                wqkv=mat(self.hidden, (g.q_heads + g.kv_heads) * g.k_dim + g.kv_heads * g.v_dim),
                wo=mat(g.q_heads * g.v_dim, self.hidden),
                mlp_norm=norm_weight(),
                w_gate_up=mat(self.hidden, 2 * inter),
                w_down=mat(inter, self.hidden),
            )
            for g in self.layers
        ]
        self.final_norm = norm_weight()
        self.unembed = mat(self.hidden, self.vocab)
        self._theta = float(c.get("rope_theta", 10000.0))
        self._rope_cache: dict[tuple[int, int], tuple[Vec, Vec]] = {}

    # -- per-token steps, shared by the cached engine and the cache-free reference ----------

    def embed(self, token: int) -> Vec:
        if not 0 <= token < self.vocab:
            raise kvalloc.InvalidArgumentError(f"token {token} outside the vocabulary [0, {self.vocab})")
        return self.embedding[token].copy()

    def first_key(self, layer: int, pos: int) -> int:
        """First position token ``pos`` attends to in ``layer`` (sliding: the last W tokens)."""
        w = self.layers[layer].window
        return 0 if w is None else max(0, pos - w + 1)

    def qkv(self, layer: int, x: Vec, pos: int) -> tuple[Vec, Vec, Vec]:
        """Query ``[q_heads, k_dim]``, key ``[kv_heads, k_dim]`` (both rotated for ``pos``)
        and value ``[kv_heads, v_dim]`` of one token."""
        g, w = self.layers[layer], self.weights[layer]
        h = _rms_norm(x, w.attn_norm, self.eps)
        # One product for q, k and v: each output column is its own sequential sum.
        qkv = _matvec(h, w.wqkv)
        nq, nk = g.q_heads * g.k_dim, g.kv_heads * g.k_dim
        q = qkv[:nq].reshape(g.q_heads, g.k_dim)
        k = qkv[nq : nq + nk].reshape(g.kv_heads, g.k_dim)
        v = qkv[nq + nk :].reshape(g.kv_heads, g.v_dim)
        return self._rope(q, pos), self._rope(k, pos), v

    def attend(self, layer: int, q: Vec, keys: Vec, values: Vec) -> Vec:
        """Softmax attention of one query over ``keys [n, kv_heads, k_dim]`` and ``values
        [n, kv_heads, v_dim]`` in position order; returns ``[q_heads * v_dim]``."""
        g = self.layers[layer]
        qg = q.reshape(g.kv_heads, g.q_heads // g.kv_heads, g.k_dim)  # query heads by KV head
        # Scores [n, kv_heads, group]: the sum over k_dim, moved to the first axis.
        prod = np.ascontiguousarray((keys[:, :, None, :] * qg[None]).transpose(3, 0, 1, 2))
        scores = np.add.reduce(prod, axis=0) * F32(1.0 / np.sqrt(g.k_dim))
        e = np.exp(scores - scores.max(axis=0))
        p = e / np.add.reduce(e, axis=0)
        return np.add.reduce(p[..., None] * values[:, :, None, :], axis=0).reshape(-1)

    def after_attention(self, layer: int, x: Vec, attn: Vec) -> Vec:
        """Output projection, residual, and the gated MLP with its residual."""
        w = self.weights[layer]
        x = x + _matvec(attn, w.wo)
        h = _rms_norm(x, w.mlp_norm, self.eps)
        gate_up = _matvec(h, w.w_gate_up)
        half = gate_up.shape[0] // 2
        return x + _matvec(_silu(gate_up[:half]) * gate_up[half:], w.w_down)

    def logits(self, x: Vec) -> Vec:
        return _matvec(_rms_norm(x, self.final_norm, self.eps), self.unembed)

    def _rope(self, t: Vec, pos: int) -> Vec:
        half = t.shape[1] // 2
        cos, sin = self._rope_table(half, pos)
        a, b = t[:, :half], t[:, half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=1)

    def _rope_table(self, half: int, pos: int) -> tuple[Vec, Vec]:
        """cos and sin of ``pos`` times each rotation frequency, rounded to float32 (cached:
        they are the same for every layer and every request)."""
        key = (half, pos)
        hit = self._rope_cache.get(key)
        if hit is None:
            angles = pos * self._theta ** (-np.arange(half, dtype=np.float64) / half)
            hit = self._rope_cache[key] = (np.cos(angles).astype(F32), np.sin(angles).astype(F32))
        return hit


def reference_logits(model: TinyHybridModel, tokens: npt.ArrayLike) -> Vec:
    """Logits ``[len, vocab]`` at every position, recomputing every token without any cache:
    each layer's keys and values live in plain contiguous arrays."""
    toks = [int(t) for t in np.asarray(tokens).reshape(-1)]
    n = len(toks)
    xs = [model.embed(t) for t in toks]
    for layer, g in enumerate(model.layers):
        keys = np.empty((n, g.kv_heads, g.k_dim), F32)
        values = np.empty((n, g.kv_heads, g.v_dim), F32)
        queries = []
        for pos in range(n):
            q, keys[pos], values[pos] = model.qkv(layer, xs[pos], pos)
            queries.append(q)
        for pos in range(n):
            lo = model.first_key(layer, pos)
            attn = model.attend(layer, queries[pos], keys[lo : pos + 1], values[lo : pos + 1])
            xs[pos] = model.after_attention(layer, xs[pos], attn)
    return np.stack([model.logits(x) for x in xs]) if xs else np.empty((0, model.vocab), F32)
