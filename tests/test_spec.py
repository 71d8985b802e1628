"""Model KV geometry: the shared configs worked out by hand, presets, general HF conventions, errors."""

import json

import pytest

import kvalloc
from kvalloc import ConfigError, InvalidArgumentError, KvAllocError, ModelSpec

BF16 = 2


def per_layer(kv_heads: int, k: int, v: int, dtype_bytes: int = BF16) -> int:
    return kv_heads * (k + v) * dtype_bytes


def test_mimo_v2_flash(shared_configs):
    spec = ModelSpec.from_hf_config(shared_configs / "mimo-v2-flash.json")
    full, swa = spec.groups
    # hybrid_layer_pattern: 0 = full at layers 0, 5, 11, 17, ..., 47.
    assert full.kind == "full" and full.window is None
    assert full.layers == (0, 5, 11, 17, 23, 29, 35, 41, 47)
    assert (full.kv_heads, full.k_dim, full.v_dim) == (4, 192, 128)
    assert full.bytes_per_token == 9 * 4 * 320 * 2 == 23_040
    assert swa.kind == "sliding" and swa.window == 128
    assert len(swa.layers) == 39
    assert (swa.kv_heads, swa.k_dim, swa.v_dim) == (8, 192, 128)
    assert swa.bytes_per_token == 39 * 8 * 320 * 2 == 199_680
    assert spec.num_layers == 48 and spec.dtype == "bfloat16"


def test_gemma_3_27b_nested_text_config(shared_configs):
    spec = ModelSpec.from_hf_config(shared_configs / "gemma-3-27b-it.json")
    full, swa = spec.groups
    # sliding_window_pattern 6: layer i is full when (i + 1) % 6 == 0.
    assert full.layers == tuple(range(5, 62, 6))
    assert len(full.layers) == 10 and len(swa.layers) == 52
    assert swa.window == 1024
    assert full.bytes_per_token == 10 * per_layer(16, 128, 128) == 81_920
    assert swa.bytes_per_token == 52 * per_layer(16, 128, 128) == 425_984


def test_gpt_oss_layer_types(shared_configs):
    spec = ModelSpec.from_hf_config(shared_configs / "gpt-oss-120b.json")
    full, swa = spec.groups  # full groups come first even though layer 0 slides
    assert full.layers == tuple(range(1, 36, 2))
    assert swa.layers == tuple(range(0, 36, 2))
    assert full.bytes_per_token == swa.bytes_per_token == 18 * per_layer(8, 64, 64) == 36_864
    assert swa.window == 128


def test_config_as_dict_equals_path(shared_configs):
    path = shared_configs / "gpt-oss-120b.json"
    assert ModelSpec.from_hf_config(json.loads(path.read_text())) == ModelSpec.from_hf_config(str(path))


def test_presets():
    assert {"mimo-v2.5-pro", "mimo-v2-flash", "gemma-3-27b", "gpt-oss-120b"} <= set(kvalloc.presets())
    assert ModelSpec.presets() == kvalloc.presets()
    pro = ModelSpec.preset("mimo-v2.5-pro")
    full, swa = pro.groups
    assert pro.num_layers == 70
    assert full.layers == tuple(range(0, 70, 7))
    assert len(swa.layers) == 60 and swa.window == 128
    assert full.bytes_per_token == 10 * per_layer(8, 192, 128) == 51_200
    assert swa.bytes_per_token == 60 * 5_120 == 307_200
    assert pro.bytes_per_token_dense == 358_400
    with pytest.raises(InvalidArgumentError, match="mimo-v2.5-pro"):
        ModelSpec.preset("no-such-model")


def test_kv_bytes_worked_example():
    pro = ModelSpec.preset("mimo-v2.5-pro")
    full_block, swa_block = pro.block_bytes(16)
    assert (full_block, swa_block) == (51_200 * 16, 307_200 * 16)
    # 1,024 tokens: 64 full blocks; the window [896, 1024) covers blocks 56..63 = 8 blocks.
    assert pro.kv_bytes(1024) == 64 * full_block + 8 * swa_block
    # 1,030 tokens: 65 full blocks; window [902, 1030) touches blocks 56..64 = 9 = ceil(128/16) + 1.
    assert pro.kv_bytes(1030, 16) == 65 * full_block + 9 * swa_block
    assert pro.kv_bytes_dense(1030) == 1030 * 358_400
    assert pro.kv_bytes(0) == 0
    # Short sequences: the window is the whole sequence.
    assert pro.kv_bytes(10, 16) == full_block + swa_block
    # 32K tokens: the dense holding is ~7x the SWA-aware one.
    assert 6.5 < pro.kv_bytes_dense(32768) / pro.kv_bytes(32768) < 7.0


def test_every_layer_sliding_mistral_style():
    spec = ModelSpec.from_hf_config(
        {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "hidden_size": 4096, "sliding_window": 4096, "torch_dtype": "float16"}
    )
    (g,) = spec.groups
    assert g.kind == "sliding" and g.window == 4096 and len(g.layers) == 32
    assert g.k_dim == 128 and g.bytes_per_token == 32 * per_layer(8, 128, 128, 2)


def test_qwen2_use_sliding_window():
    base = {"num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 64, "sliding_window": 512, "max_window_layers": 6}
    assert [g.kind for g in ModelSpec.from_hf_config({**base, "use_sliding_window": False}).groups] == ["full"]
    spec = ModelSpec.from_hf_config({**base, "use_sliding_window": True})
    assert spec.groups[0].layers == tuple(range(6)) and spec.groups[1].layers == (6, 7)


def test_per_kind_heads_and_dims_gemma4_style():
    # Full layers use global_* fields; sliding layers use the plain ones.
    cfg = {"text_config": {
        "num_hidden_layers": 6, "num_attention_heads": 16, "num_key_value_heads": 8,
        "num_global_key_value_heads": 2, "head_dim": 128, "global_head_dim": 256,
        "sliding_window": 512, "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}
    full, swa = ModelSpec.from_hf_config(cfg, dtype="fp8").groups
    assert (full.kv_heads, full.k_dim, full.v_dim, full.layers) == (2, 256, 256, (5,))
    assert (swa.kv_heads, swa.k_dim, swa.layers) == (8, 128, (0, 1, 2, 3, 4))
    assert full.bytes_per_token == per_layer(2, 256, 256, 1)


def test_same_kind_different_geometry_makes_separate_groups():
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64,
           "hybrid_layer_pattern": [0, 1, 1, 0], "sliding_window": 128,
           "swa_num_key_value_heads": 4}
    spec = ModelSpec.from_hf_config(cfg)
    assert [(g.kind, g.kv_heads) for g in spec.groups] == [("full", 8), ("sliding", 4)]


@pytest.mark.parametrize("dtype,nbytes", [("bf16", 2), ("float16", 2), ("fp32", 4), ("fp8", 1), ("float8_e4m3fn", 1)])
def test_dtypes(shared_configs, dtype, nbytes):
    spec = ModelSpec.from_hf_config(shared_configs / "gpt-oss-120b.json", dtype=dtype)
    assert spec.groups[0].bytes_per_token == 18 * per_layer(8, 64, 64, nbytes)


@pytest.mark.parametrize(
    "kind,cfg",
    [
        ("linear_attention", {"layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"]}),
        ("chunked_attention", {"layer_types": ["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"]}),
        ("conv", {"layer_types": ["conv", "full_attention", "conv", "full_attention"]}),
        ("mamba", {"layer_types": ["full_attention", "mamba", "full_attention", "mamba"]}),
    ],
)
def test_unsupported_layer_kinds_name_kind_and_layer(kind, cfg):
    base = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config({**base, **cfg})
    first = cfg["layer_types"].index(kind)
    assert kind in str(e.value) and str(first) in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, KvAllocError)


@pytest.mark.parametrize(
    "kind,field,cfg",
    [
        # Qwen3-Next as published: no layer_types; every 4th layer full, the rest linear.
        ("linear_attention", "full_attention_interval",
         {"model_type": "qwen3_next", "full_attention_interval": 4, "linear_conv_kernel_dim": 4,
          "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32}),
        ("linear_attention", "linear_num_key_heads", {"linear_num_key_heads": 16}),
        ("mamba", "attn_layer_indices", {"attn_layer_indices": [3]}),
        ("mamba", "layers_block_type", {"layers_block_type": ["attention", "mamba", "attention", "mamba"]}),
        ("mamba", "mamba_d_state", {"mamba_d_state": 16, "mamba_expand": 2}),
        ("ssm", "ssm_state_size", {"ssm_state_size": 128}),
        ("recurrent", "block_types", {"block_types": ["recurrent", "attention", "recurrent", "attention"]}),
        ("mamba", "model_type", {"model_type": "falcon_mamba"}),
    ],
)
def test_configs_with_layers_kvalloc_cannot_model_are_refused_not_read_as_attention(kind, field, cfg):
    base = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}
    with pytest.raises(ConfigError) as e:
        ModelSpec.from_hf_config({**base, **cfg})
    assert type(e.value) is ConfigError
    assert f"`{field}" in str(e.value) and f"'{kind}'" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "cfg,field",
    [
        ({"num_attention_heads": 8, "head_dim": 64}, "num_hidden_layers"),
        ({"num_hidden_layers": 4, "num_attention_heads": 8, "head_dim": 64, "layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 64, "layer_types": ["sliding_attention"] * 2}, "sliding_window"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 64, "sliding_window": 128, "sliding_window_size": 256}, "sliding_window"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": -64}, "head_dim"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 64, "hybrid_layer_pattern": [0, 2]}, "hybrid_layer_pattern"),
        ({"num_hidden_layers": 2, "num_attention_heads": 8, "head_dim": 64, "torch_dtype": "int3"}, "dtype"),
    ],
)
def test_missing_or_contradictory_fields_name_the_field(cfg, field):
    with pytest.raises(ConfigError, match=field):
        ModelSpec.from_hf_config(cfg)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        ModelSpec.from_hf_config("/nonexistent/config.json")
    with pytest.raises(InvalidArgumentError):
        ModelSpec.from_hf_config(42)
    with pytest.raises(ConfigError, match="dtype"):
        ModelSpec.preset("gpt-oss-120b")  # fine
        ModelSpec.from_hf_config({"num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 8}, dtype="int4")
    pro = ModelSpec.preset("mimo-v2.5-pro")
    for bad in (0, -16):
        with pytest.raises(InvalidArgumentError, match="block_tokens"):
            pro.kv_bytes(1024, bad)
    with pytest.raises(InvalidArgumentError, match="context_tokens"):
        pro.kv_bytes(-1)
    with pytest.raises(InvalidArgumentError, match="context_tokens"):
        pro.kv_bytes_dense("lots")


def test_fingerprint_is_geometry_not_name(shared_configs):
    a = ModelSpec.preset("gpt-oss-120b")
    b = ModelSpec.from_hf_config(shared_configs / "gpt-oss-120b.json")
    c = ModelSpec.from_hf_config(shared_configs / "gpt-oss-120b.json", dtype="fp8")
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.fingerprint != ModelSpec.preset("mimo-v2.5-pro").fingerprint
