"""One model geometry, described once and handed to each manager in its own terms.

gpt-oss-120b's attention layout by default: 36 layers alternating sliding (window 128) and full,
8 KV heads of dim 64, bfloat16. Equal layer counts per kind let vLLM run it as exactly one
FullAttentionSpec group and one SlidingWindowSpec group (vLLM groups layers into groups of
equal size), as the issue asks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    layers_per_kind: int = 18
    kv_heads: int = 8
    head_dim: int = 64
    dtype_bytes: int = 2  # bfloat16
    window: int = 128
    block_tokens: int = 16

    @property
    def layer_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kind_bytes_per_token(self) -> int:
        """One token in every layer of one kind (full or sliding)."""
        return self.layers_per_kind * self.layer_bytes_per_token

    def hf_config(self) -> dict:
        """A Hugging Face style config with this geometry, for kvalloc.ModelSpec.from_hf_config."""
        n = 2 * self.layers_per_kind
        return {
            "model_type": "gpt_oss",
            "num_hidden_layers": n,
            "num_attention_heads": 8 * self.kv_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": 8 * self.kv_heads * self.head_dim,
            "torch_dtype": "bfloat16",
            "sliding_window": self.window,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        }
