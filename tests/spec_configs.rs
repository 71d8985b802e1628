//! `ModelSpec` from presets and from hand-written configs in each convention real models use.
//! Every expected number is worked out by hand in the comment next to it.

use std::path::{Path, PathBuf};

use kvalloc::error::Error;
use kvalloc::spec::{AttentionKind, DType, KVGroup, ModelSpec};
use proptest::prelude::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn spec(cfg: Value) -> ModelSpec {
    ModelSpec::from_hf_config(&cfg, None).unwrap_or_else(|e| panic!("{e}"))
}

/// The (field, message) of a config error; panics on success or another error.
fn config_err(cfg: Value) -> (String, String) {
    match ModelSpec::from_hf_config(&cfg, None) {
        Err(Error::Config { field, message }) => (field, message),
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// (kind, window, layers, kv_heads, k_dim, v_dim) of every group, for compact assertions.
type Summary = (AttentionKind, Option<u32>, Vec<u32>, u32, u32, u32);

fn summary(s: &ModelSpec) -> Vec<Summary> {
    s.groups
        .iter()
        .map(|g| {
            (
                g.kind,
                g.window,
                g.layers.clone(),
                g.kv_heads,
                g.k_dim,
                g.v_dim,
            )
        })
        .collect()
}

fn every(step: u32, start: u32, end: u32) -> Vec<u32> {
    (start..end).step_by(step as usize).collect()
}

fn preset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rust/kvalloc/presets")
}

// ---------------------------------------------------------------------------------------------
// presets
// ---------------------------------------------------------------------------------------------

#[test]
fn preset_names_are_listed_in_order() {
    assert_eq!(
        ModelSpec::presets(),
        [
            "mimo-v2.5-pro",
            "mimo-v2-flash",
            "gemma-3-27b",
            "gpt-oss-120b"
        ]
    );
}

#[test]
fn mimo_v25_pro_geometry() {
    let s = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    assert_eq!(s.name, "mimo-v2.5-pro");
    assert_eq!((s.num_layers, s.dtype), (70, DType::Bf16));
    let full = every(7, 0, 70);
    let sliding: Vec<u32> = (0..70).filter(|i| i % 7 != 0).collect();
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, full, 8, 192, 128),
            (AttentionKind::Sliding, Some(128), sliding, 8, 192, 128),
        ]
    );
    // 8 heads x (192 + 128) x 2 bytes = 5,120 per layer; x10 and x60.
    assert_eq!(s.groups[0].layer_bytes_per_token(), 5_120);
    assert_eq!(s.groups[0].bytes_per_token(), 51_200);
    assert_eq!(s.groups[1].bytes_per_token(), 307_200);
    assert_eq!(s.bytes_per_token_dense(), 358_400);
    assert_eq!(s.block_bytes(16), [819_200, 4_915_200]);
    assert_eq!(s.max_window(), Some(128));
}

#[test]
fn kv_bytes_that_overflow_64_bits_are_an_error_not_a_saturated_count() {
    let s = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    for ctx in [1 << 63, u64::MAX, 1 << 50] {
        for e in [
            s.kv_bytes(ctx, 16).unwrap_err(),
            s.kv_bytes_dense(ctx).unwrap_err(),
        ] {
            assert!(
                matches!(e, Error::InvalidArgument { ref what, .. } if what == "context_tokens"),
                "{e}"
            );
        }
    }
    let e = s.kv_bytes(100, 0).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref what, .. } if what == "block_tokens"));
    // The largest context whose dense bytes fit still has an exact count.
    let most = u64::MAX / s.bytes_per_token_dense();
    assert_eq!(
        s.kv_bytes_dense(most).unwrap(),
        most * s.bytes_per_token_dense()
    );
    assert!(s.kv_bytes_dense(most + 1).is_err());
}

#[test]
fn geometry_whose_token_bytes_overflow_is_a_config_error() {
    // 2^32 - 1 heads of 2^32 - 1 dims: the per-token bytes would wrap a u64.
    let (field, message) = config_err(json!({
        "num_hidden_layers": 2, "num_attention_heads": 4294967295u32,
        "num_key_value_heads": 4294967295u32, "head_dim": 4294967295u32
    }));
    assert_eq!(field, "<geometry>", "{message}");
    assert!(message.contains("implausible"), "{message}");
}

#[test]
fn mimo_v25_pro_kv_bytes_worked_examples() {
    let s = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    assert_eq!(s.kv_bytes(0, 16).unwrap(), 0);
    // ctx 100: full ceil(100/16) = 7 blocks; sliding window covers all 7.
    // 7 x 819,200 + 7 x 4,915,200 = 5,734,400 + 34,406,400.
    assert_eq!(s.kv_bytes(100, 16).unwrap(), 40_140_800);
    // ctx 1024: full 64 blocks x 819,200 = 52,428,800;
    // sliding ceil(1024/16) - floor(896/16) = 64 - 56 = 8 blocks x 4,915,200 = 39,321,600.
    assert_eq!(s.kv_bytes(1024, 16).unwrap(), 52_428_800 + 39_321_600);
    // ctx 1030: full 65 blocks = 53,248,000; sliding 65 - floor(902/16) = 65 - 56 = 9 blocks
    // = 44,236,800 (the ceil(128/16) + 1 maximum).
    assert_eq!(s.kv_bytes(1030, 16).unwrap(), 53_248_000 + 44_236_800);
    // Dense: every layer keeps every token: 1024 x 358,400.
    assert_eq!(s.kv_bytes_dense(1024).unwrap(), 367_001_600);
    assert_eq!(s.kv_bytes_dense(0).unwrap(), 0);
    // 32K context: full 2048 blocks x 819,200 = 1,677,721,600; sliding 8 blocks = 39,321,600.
    assert_eq!(s.kv_bytes(32_768, 16).unwrap(), 1_677_721_600 + 39_321_600);
}

#[test]
fn mimo_v2_flash_geometry() {
    let s = ModelSpec::preset("mimo-v2-flash").unwrap();
    assert_eq!(s.num_layers, 48);
    let full = vec![0, 5, 11, 17, 23, 29, 35, 41, 47];
    let sliding: Vec<u32> = (0..48).filter(|i| !full.contains(i)).collect();
    assert_eq!(sliding.len(), 39);
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, full, 4, 192, 128),
            (AttentionKind::Sliding, Some(128), sliding, 8, 192, 128),
        ]
    );
    // 9 x 4 x 320 x 2 = 23,040; 39 x 8 x 320 x 2 = 199,680.
    assert_eq!(s.groups[0].bytes_per_token(), 23_040);
    assert_eq!(s.groups[1].bytes_per_token(), 199_680);
}

#[test]
fn gemma_3_27b_geometry() {
    let s = ModelSpec::preset("gemma-3-27b").unwrap();
    assert_eq!((s.num_layers, s.dtype), (62, DType::Bf16));
    let full = every(6, 5, 62); // 5, 11, ..., 59
    assert_eq!(full.len(), 10);
    let sliding: Vec<u32> = (0..62).filter(|i| (i + 1) % 6 != 0).collect();
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, full, 16, 128, 128),
            (AttentionKind::Sliding, Some(1024), sliding, 16, 128, 128),
        ]
    );
    // 16 x 256 x 2 = 8,192 per layer: x10 = 81,920; x52 = 425,984.
    assert_eq!(s.groups[0].bytes_per_token(), 81_920);
    assert_eq!(s.groups[1].bytes_per_token(), 425_984);
    // ctx 4096, B 256: full 16 blocks x 20,971,520; sliding 16 - floor(3072/256) = 4 blocks
    // x 109,051,904.
    assert_eq!(s.block_bytes(256), [20_971_520, 109_051_904]);
    assert_eq!(
        s.kv_bytes(4096, 256).unwrap(),
        16 * 20_971_520 + 4 * 109_051_904
    );
}

#[test]
fn gpt_oss_120b_geometry() {
    let s = ModelSpec::preset("gpt-oss-120b").unwrap();
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, every(2, 1, 36), 8, 64, 64),
            (
                AttentionKind::Sliding,
                Some(128),
                every(2, 0, 36),
                8,
                64,
                64
            ),
        ]
    );
    // 18 x 8 x 128 x 2 = 36,864 each.
    assert_eq!(s.groups[0].bytes_per_token(), 36_864);
    assert_eq!(s.groups[1].bytes_per_token(), 36_864);
}

#[test]
fn presets_match_the_shipped_files_and_reference_data() {
    let files = [
        ("mimo-v2.5-pro", "mimo-v2.5-pro.json", "mimo_v2_pro"),
        ("mimo-v2-flash", "mimo-v2-flash.json", "mimo_v2_flash"),
        ("gemma-3-27b", "gemma-3-27b-it.json", "gemma3"),
        ("gpt-oss-120b", "gpt-oss-120b.json", "gpt_oss"),
    ];
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/configs");
    for (name, file, model_type) in files {
        let preset = ModelSpec::preset(name).unwrap();
        let loaded = ModelSpec::from_hf_config_path(&preset_dir().join(file), None).unwrap();
        // Same geometry, so same fingerprint; only the name differs.
        assert_eq!(loaded.name, model_type);
        assert_eq!(loaded.fingerprint(), preset.fingerprint());
        assert_eq!(loaded.groups, preset.groups);
        // The copies must stay identical to the reference data, where it is around.
        let reference = shared.join(file);
        if reference.exists() {
            let a = std::fs::read(&reference).unwrap();
            let b = std::fs::read(preset_dir().join(file)).unwrap();
            assert!(a == b, "{file} differs from {}", reference.display());
        }
    }
}

#[test]
fn preset_lookup_is_case_insensitive_and_rejects_unknown_names() {
    assert_eq!(
        ModelSpec::preset("GPT-OSS-120B").unwrap().name,
        "gpt-oss-120b"
    );
    match ModelSpec::preset("llama-3-8b") {
        Err(Error::InvalidArgument { what, message }) => {
            assert_eq!(what, "name");
            assert!(
                message.contains("known presets: mimo-v2.5-pro"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn fingerprints_differ_between_presets() {
    let prints: Vec<u64> = ModelSpec::presets()
        .iter()
        .map(|n| ModelSpec::preset(n).unwrap().fingerprint())
        .collect();
    for (i, a) in prints.iter().enumerate() {
        for b in &prints[i + 1..] {
            assert_ne!(a, b);
        }
    }
    // Stable across calls.
    let again = ModelSpec::preset("gemma-3-27b").unwrap().fingerprint();
    assert_eq!(again, prints[2]);
}

// ---------------------------------------------------------------------------------------------
// conventions for saying which layers slide
// ---------------------------------------------------------------------------------------------

#[test]
fn qwen2_use_sliding_window_from_max_window_layers() {
    let s = spec(json!({
        "model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 512,
        "num_attention_heads": 8, "num_key_value_heads": 2,
        "use_sliding_window": true, "max_window_layers": 2, "sliding_window": 4096,
        "torch_dtype": "bfloat16"
    }));
    // head_dim = 512 / 8 = 64; 2 x 128 x 2 = 512 bytes per layer.
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, vec![0, 1], 2, 64, 64),
            (AttentionKind::Sliding, Some(4096), vec![2, 3], 2, 64, 64),
        ]
    );
    assert_eq!(s.groups[0].bytes_per_token(), 1024);
    assert_eq!(s.name, "qwen2");
}

#[test]
fn qwen2_sliding_disabled_is_all_full_despite_a_window() {
    let s = spec(json!({
        "num_hidden_layers": 3, "hidden_size": 512, "num_attention_heads": 8,
        "num_key_value_heads": 2, "use_sliding_window": false, "max_window_layers": 28,
        "sliding_window": 131072
    }));
    assert_eq!(
        summary(&s),
        [(AttentionKind::Full, None, vec![0, 1, 2], 2, 64, 64)]
    );
    assert_eq!(s.max_window(), None);
}

#[test]
fn mistral_v01_window_without_pattern_slides_every_layer() {
    let s = spec(json!({
        "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
        "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096
    }));
    assert_eq!(s.groups.len(), 1);
    let g = &s.groups[0];
    assert!(g.is_sliding());
    assert_eq!((g.window, g.layers.len(), g.k_dim), (Some(4096), 32, 128));
    // 32 layers x 8 x 256 x 2 = 131,072 per token; block of 16 = 2,097,152.
    assert_eq!(s.bytes_per_token_dense(), 131_072);
    // ctx 10,000: ceil(10000/16) - floor(5904/16) = 625 - 369 = 256 blocks.
    assert_eq!(s.kv_bytes(10_000, 16).unwrap(), 256 * 2_097_152);
    // ctx 100: nothing has left the window yet, ceil(100/16) = 7 blocks.
    assert_eq!(s.kv_bytes(100, 16).unwrap(), 7 * 2_097_152);
}

#[test]
fn mistral_v02_null_window_is_all_full() {
    let s = spec(json!({
        "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
        "sliding_window": null
    }));
    // No num_key_value_heads: plain multi-head attention, 4 KV heads of 64.
    assert_eq!(
        summary(&s),
        [(AttentionKind::Full, None, vec![0, 1], 4, 64, 64)]
    );
}

#[test]
fn gemma2_alternates_sliding_first() {
    let s = spec(json!({
        "model_type": "gemma2", "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "hidden_size": 2304,
        "sliding_window": 4096, "sliding_window_size": 4096
    }));
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, vec![1, 3, 5], 4, 256, 256),
            (
                AttentionKind::Sliding,
                Some(4096),
                vec![0, 2, 4],
                4,
                256,
                256
            ),
        ]
    );
}

#[test]
fn cohere2_sliding_window_pattern() {
    let s = spec(json!({
        "model_type": "cohere2", "num_hidden_layers": 8, "hidden_size": 1024,
        "num_attention_heads": 8, "num_key_value_heads": 8, "sliding_window": 4096,
        "sliding_window_pattern": 4
    }));
    assert_eq!(s.groups[0].layers, [3, 7]);
    assert_eq!(s.groups[1].layers, [0, 1, 2, 4, 5, 6]);
}

#[test]
fn layer_types_beat_sliding_window_pattern() {
    let s = spec(json!({
        "num_hidden_layers": 3, "head_dim": 64, "num_attention_heads": 4,
        "num_key_value_heads": 1, "sliding_window": 512, "sliding_window_pattern": 6,
        "layer_types": ["full_attention", "sliding_attention", "global_attention"]
    }));
    assert_eq!(s.groups[0].layers, [0, 2]);
    assert_eq!(s.groups[1].layers, [1]);
}

#[test]
fn gemma4_like_global_heads_and_dims_in_text_config() {
    let mut layer_types = Vec::new();
    for _ in 0..2 {
        layer_types.extend(["sliding_attention"; 5]);
        layer_types.push("full_attention");
    }
    let s = spec(json!({
        "model_type": "gemma4",
        "text_config": {
            "model_type": "gemma4_text", "num_hidden_layers": 12,
            "num_attention_heads": 16, "num_key_value_heads": 8,
            "num_global_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
            "sliding_window": 1024, "layer_types": layer_types, "dtype": "bfloat16"
        },
        "vision_config": {"num_hidden_layers": 27, "hidden_size": 1152}
    }));
    assert_eq!(s.name, "gemma4");
    assert_eq!(s.num_layers, 12);
    assert_eq!(
        summary(&s),
        [
            (AttentionKind::Full, None, vec![5, 11], 2, 512, 512),
            (
                AttentionKind::Sliding,
                Some(1024),
                vec![0, 1, 2, 3, 4, 6, 7, 8, 9, 10],
                8,
                256,
                256
            ),
        ]
    );
    // Full: 2 layers x 2 x 1024 x 2 = 8,192; sliding: 10 x 8 x 512 x 2 = 81,920.
    assert_eq!(s.groups[0].bytes_per_token(), 8_192);
    assert_eq!(s.groups[1].bytes_per_token(), 81_920);
}

#[test]
fn sliding_specific_head_keys_are_read() {
    for key in [
        "swa_num_key_value_heads",
        "sliding_window_num_key_value_heads",
        "num_local_key_value_heads",
    ] {
        let mut cfg = json!({
            "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2,
            "head_dim": 128, "local_head_dim": 64, "sliding_window": 256,
            "layer_types": ["sliding_attention", "full_attention"]
        });
        cfg[key] = json!(4);
        let s = spec(cfg);
        assert_eq!(
            summary(&s),
            [
                (AttentionKind::Full, None, vec![1], 2, 128, 128),
                (AttentionKind::Sliding, Some(256), vec![0], 4, 64, 64),
            ],
            "{key}"
        );
    }
}

#[test]
fn nemotron_pattern_without_mamba_keeps_only_attention_layers() {
    let s = spec(json!({
        "num_hidden_layers": 4, "hybrid_override_pattern": "*-*E",
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128
    }));
    assert_eq!(s.num_layers, 4);
    assert_eq!(
        summary(&s),
        [(AttentionKind::Full, None, vec![0, 2], 2, 128, 128)]
    );
}

#[test]
fn jamba_with_every_layer_attention_is_accepted() {
    let s = spec(json!({
        "num_hidden_layers": 2, "attn_layer_period": 1, "attn_layer_offset": 0,
        "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 512
    }));
    assert_eq!(s.groups[0].layers, [0, 1]);
}

#[test]
fn minimax_all_softmax_is_full() {
    let s = spec(json!({
        "num_hidden_layers": 2, "attn_type_list": [1, 1],
        "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64
    }));
    assert_eq!(s.groups[0].layers, [0, 1]);
}

#[test]
fn deepseek_mla_caches_one_latent() {
    let cfg = json!({
        "model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168,
        "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
        "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "q_lora_rank": 1536, "torch_dtype": "bfloat16"
    });
    let s = spec(cfg.clone());
    assert_eq!(
        summary(&s),
        [(AttentionKind::Full, None, (0..61).collect(), 1, 576, 0)]
    );
    // 576 x 2 bytes = 1,152 per layer; x61 = 70,272.
    assert_eq!(s.bytes_per_token_dense(), 70_272);
    let fp8 = ModelSpec::from_hf_config(&cfg, Some(DType::Fp8)).unwrap();
    assert_eq!(fp8.bytes_per_token_dense(), 35_136);
}

#[test]
fn mla_without_rope_dim_is_an_error() {
    let (field, _) = config_err(json!({
        "num_hidden_layers": 2, "num_attention_heads": 8, "kv_lora_rank": 512
    }));
    assert_eq!(field, "qk_rope_head_dim");
}

// ---------------------------------------------------------------------------------------------
// unsupported layer kinds
// ---------------------------------------------------------------------------------------------

fn assert_unsupported(cfg: Value, want_field: &str, layer: usize, kind: &str) {
    let (field, message) = config_err(cfg);
    assert_eq!(field, want_field, "{message}");
    assert!(message.contains(&format!("layer {layer} ")), "{message}");
    assert!(message.contains(&format!("'{kind}'")), "{message}");
    assert!(message.contains("does not support"), "{message}");
}

fn base_with(extra: Value) -> Value {
    let mut cfg = json!({
        "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 2,
        "head_dim": 128
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    cfg
}

#[test]
fn qwen3_next_linear_attention_is_rejected_with_its_layer() {
    let pattern = [
        "linear_attention",
        "linear_attention",
        "linear_attention",
        "full_attention",
    ];
    let types: Vec<&str> = pattern.iter().cycle().take(8).copied().collect();
    assert_unsupported(
        base_with(json!({"layer_types": types})),
        "layer_types[0]",
        0,
        "linear_attention",
    );
    // The first unsupported index is named, not just layer 0.
    let mut types: Vec<&str> = vec!["full_attention"; 8];
    types[3] = "linear_attention";
    assert_unsupported(
        base_with(json!({"layer_types": types})),
        "layer_types[3]",
        3,
        "linear_attention",
    );
}

#[test]
fn lfm2_conv_and_other_kinds_are_rejected() {
    let mut types = vec!["conv"; 8];
    types[2] = "full_attention";
    assert_unsupported(
        base_with(json!({"layer_types": types})),
        "layer_types[0]",
        0,
        "conv",
    );
    for kind in [
        "mamba",
        "mamba2",
        "ssm",
        "short_conv",
        "recurrent",
        "moe_magic",
    ] {
        let mut types = vec!["full_attention"; 8];
        types[5] = kind;
        assert_unsupported(
            base_with(json!({"layer_types": types})),
            "layer_types[5]",
            5,
            kind,
        );
    }
}

#[test]
fn llama4_chunked_attention_is_rejected() {
    // Newer configs spell it in layer_types.
    let mut types = vec!["chunked_attention"; 8];
    types[3] = "full_attention";
    assert_unsupported(
        base_with(json!({"layer_types": types})),
        "layer_types[0]",
        0,
        "chunked_attention",
    );
    // Older ones: attention_chunk_size plus no_rope_layers (1 = RoPE = chunked).
    assert_unsupported(
        base_with(json!({
            "attention_chunk_size": 8192,
            "no_rope_layers": [0, 1, 1, 0, 1, 1, 1, 0]
        })),
        "attention_chunk_size",
        1,
        "chunked_attention",
    );
    assert_unsupported(
        base_with(json!({"attention_chunk_size": 8192})),
        "attention_chunk_size",
        0,
        "chunked_attention",
    );
    // A null chunk size means no chunking.
    let s = spec(base_with(json!({"attention_chunk_size": null})));
    assert_eq!(s.groups[0].layers.len(), 8);
}

#[test]
fn jamba_mamba_layers_are_rejected() {
    assert_unsupported(
        base_with(json!({"attn_layer_period": 8, "attn_layer_offset": 4})),
        "attn_layer_period",
        0,
        "mamba",
    );
    let (field, _) = config_err(base_with(
        json!({"attn_layer_period": 4, "attn_layer_offset": 4}),
    ));
    assert_eq!(field, "attn_layer_offset");
}

#[test]
fn nemotron_h_mamba_is_rejected() {
    assert_unsupported(
        base_with(json!({"hybrid_override_pattern": "*-M-*-*-"})),
        "hybrid_override_pattern[2]",
        2,
        "mamba",
    );
    let (field, _) = config_err(base_with(json!({"hybrid_override_pattern": "*-*"})));
    assert_eq!(field, "hybrid_override_pattern");
    let (field, _) = config_err(base_with(json!({"hybrid_override_pattern": "--E--E--"})));
    assert_eq!(field, "hybrid_override_pattern");
}

/// A config error naming `field` and the unsupported `kind`.
fn assert_refused(cfg: Value, want_field: &str, kind: &str) {
    let (field, message) = config_err(cfg);
    assert_eq!(field, want_field, "{message}");
    assert!(message.contains(&format!("'{kind}'")), "{message}");
    assert!(message.contains("does not support"), "{message}");
}

#[test]
fn qwen3_next_without_layer_types_is_refused_not_read_as_all_full() {
    // Qwen3-Next-80B-A3B's config.json as published: 48 layers, every 4th full attention, the
    // rest Gated DeltaNet (linear attention), described by `full_attention_interval` and the
    // `linear_*` keys, with no `layer_types`. It used to be read as 48 full-attention layers.
    let cfg = json!({
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "num_hidden_layers": 48, "hidden_size": 2048, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 256, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128,
        "max_position_embeddings": 262144, "torch_dtype": "bfloat16"
    });
    assert_unsupported(
        cfg.clone(),
        "full_attention_interval",
        0,
        "linear_attention",
    );
    // Either marker alone is enough.
    let mut only_linear_keys = cfg.clone();
    only_linear_keys
        .as_object_mut()
        .unwrap()
        .remove("full_attention_interval");
    assert_refused(
        only_linear_keys,
        "linear_conv_kernel_dim",
        "linear_attention",
    );
    let mut only_interval = cfg;
    only_interval
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.starts_with("linear_"));
    assert_unsupported(
        only_interval,
        "full_attention_interval",
        0,
        "linear_attention",
    );
    // An interval of 1 means every layer is full attention: nothing to refuse.
    let s = spec(base_with(json!({"full_attention_interval": 1})));
    assert_eq!(s.groups[0].layers.len(), 8);
}

#[test]
fn mamba_and_ssm_layers_are_refused_however_the_config_says_so() {
    // Bamba / Granite 4: the layers not listed in attn_layer_indices are Mamba.
    assert_unsupported(
        base_with(json!({"attn_layer_indices": [2, 5]})),
        "attn_layer_indices",
        0,
        "mamba",
    );
    let s = spec(base_with(
        json!({"attn_layer_indices": [0, 1, 2, 3, 4, 5, 6, 7]}),
    ));
    assert_eq!(s.groups[0].layers.len(), 8);
    let (field, _) = config_err(base_with(json!({"attn_layer_indices": "all"})));
    assert_eq!(field, "attn_layer_indices");
    // Zamba: a block type per layer.
    let mut types = vec!["attention"; 8];
    types[3] = "mamba";
    assert_unsupported(
        base_with(json!({"layers_block_type": types})),
        "layers_block_type[3]",
        3,
        "mamba",
    );
    types[1] = "hybrid";
    assert_unsupported(
        base_with(json!({"layers_block_type": types})),
        "layers_block_type[1]",
        1,
        "hybrid",
    );
    // RecurrentGemma.
    assert_unsupported(
        base_with(json!({"block_types": ["recurrent", "recurrent", "attention"]})),
        "block_types[0]",
        0,
        "recurrent",
    );
    // Falcon-H1 (attention and Mamba in every layer) and Jamba: only the mamba_* keys say so.
    assert_refused(
        base_with(json!({"mamba_d_ssm": 1024, "mamba_n_heads": 64})),
        "mamba_d_ssm",
        "mamba",
    );
    // Nemotron-H's ssm_* keys, even with a pattern that has no 'M'.
    assert_refused(
        base_with(json!({"hybrid_override_pattern": "*-*E*-*E", "ssm_state_size": 128})),
        "ssm_state_size",
        "ssm",
    );
    // Pure state-space or recurrent models.
    for (model_type, kind) in [
        ("mamba", "mamba"),
        ("mamba2", "mamba"),
        ("falcon_mamba", "mamba"),
        ("rwkv", "rwkv"),
        ("recurrent_gemma", "recurrent"),
    ] {
        assert_refused(
            base_with(json!({"model_type": model_type})),
            "model_type",
            kind,
        );
    }
    // Null values are unset options, not layers.
    let s = spec(base_with(
        json!({"mamba_d_state": null, "linear_num_key_heads": null}),
    ));
    assert_eq!(s.groups[0].layers.len(), 8);
}

#[test]
fn minimax_linear_attention_is_rejected() {
    assert_unsupported(
        base_with(json!({"attn_type_list": [1, 0, 0, 1, 0, 0, 0, 1]})),
        "attn_type_list[1]",
        1,
        "linear_attention",
    );
}

// ---------------------------------------------------------------------------------------------
// dtype
// ---------------------------------------------------------------------------------------------

#[test]
fn dtype_argument_overrides_config() {
    let path = preset_dir().join("gpt-oss-120b.json");
    // 18 x 8 x 128 x 1 = 18,432; x 4 bytes = 73,728.
    let fp8 = ModelSpec::from_hf_config_path(&path, Some(DType::Fp8)).unwrap();
    assert_eq!(fp8.groups[0].bytes_per_token(), 18_432);
    assert!(fp8.groups.iter().all(|g| g.dtype == DType::Fp8));
    let f32 = ModelSpec::from_hf_config_path(&path, Some(DType::F32)).unwrap();
    assert_eq!(f32.groups[1].bytes_per_token(), 73_728);
    assert_ne!(fp8.fingerprint(), f32.fingerprint());
}

#[test]
fn dtype_from_config_either_level_default_bf16() {
    assert_eq!(spec(base_with(json!({}))).dtype, DType::Bf16);
    assert_eq!(
        spec(base_with(json!({"torch_dtype": "float32"}))).dtype,
        DType::F32
    );
    assert_eq!(
        spec(base_with(json!({"dtype": "float16"}))).dtype,
        DType::F16
    );
    let nested = json!({"torch_dtype": "float16", "text_config": base_with(json!({}))});
    assert_eq!(spec(nested).dtype, DType::F16);
}

#[test]
fn unknown_dtype_names_its_key() {
    let (field, message) = config_err(base_with(json!({"torch_dtype": "int3"})));
    assert_eq!(field, "torch_dtype");
    assert!(
        message.contains("int3") && message.contains("bfloat16"),
        "{message}"
    );
    let (field, _) = config_err(base_with(json!({"dtype": "complex64"})));
    assert_eq!(field, "dtype");
}

// ---------------------------------------------------------------------------------------------
// missing, malformed and contradictory fields
// ---------------------------------------------------------------------------------------------

#[test]
fn layer_count_must_be_a_positive_integer() {
    let (field, _) = config_err(json!({"num_attention_heads": 8, "head_dim": 64}));
    assert_eq!(field, "num_hidden_layers");
    for bad in [json!(0), json!(-2), json!(2.5), json!("32"), json!(true)] {
        let mut cfg = base_with(json!({}));
        cfg["num_hidden_layers"] = bad.clone();
        assert_eq!(config_err(cfg).0, "num_hidden_layers", "{bad}");
    }
    let mut cfg = base_with(json!({}));
    cfg.as_object_mut().unwrap().remove("num_hidden_layers");
    cfg["n_layer"] = json!(3);
    assert_eq!(spec(cfg).num_layers, 3);
}

#[test]
fn missing_heads_and_dims() {
    let (field, _) = config_err(json!({"num_hidden_layers": 2, "head_dim": 64}));
    assert_eq!(field, "num_key_value_heads");
    let (field, _) = config_err(json!({"num_hidden_layers": 2, "num_attention_heads": 8}));
    assert_eq!(field, "head_dim");
    let (field, message) = config_err(json!({
        "num_hidden_layers": 2, "num_attention_heads": 3, "hidden_size": 100
    }));
    assert_eq!(field, "head_dim");
    assert!(message.contains("100"), "{message}");
    let (field, _) = config_err(base_with(json!({"head_dim": 0})));
    assert_eq!(field, "head_dim");
    let (field, _) = config_err(base_with(json!({"v_head_dim": "128"})));
    assert_eq!(field, "v_head_dim");
    let (field, _) = config_err(base_with(json!({"num_global_key_value_heads": -1})));
    assert_eq!(field, "num_global_key_value_heads");
}

#[test]
fn more_kv_heads_than_query_heads_is_a_contradiction() {
    let (field, message) = config_err(base_with(json!({"num_key_value_heads": 32})));
    assert_eq!(field, "num_key_value_heads");
    assert!(
        message.contains("32") && message.contains("16"),
        "{message}"
    );
    let (field, _) = config_err(base_with(json!({
        "sliding_window": 128, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 8
    })));
    assert_eq!(field, "swa_num_key_value_heads");
}

#[test]
fn sliding_layers_need_a_window() {
    let (field, _) = config_err(base_with(json!({"sliding_window_pattern": 2})));
    assert_eq!(field, "sliding_window");
    let (field, _) = config_err(base_with(
        json!({"sliding_window_pattern": 2, "sliding_window": 0}),
    ));
    assert_eq!(field, "sliding_window");
    let (field, _) = config_err(base_with(
        json!({"sliding_window_pattern": 0, "sliding_window": 64}),
    ));
    assert_eq!(field, "sliding_window_pattern");
}

#[test]
fn contradictory_windows_are_rejected() {
    let (field, message) = config_err(base_with(json!({
        "sliding_window_pattern": 2, "sliding_window": 128, "sliding_window_size": 256
    })));
    assert_eq!(field, "sliding_window");
    assert!(message.contains("contradict"), "{message}");
    // Alternative key alone works.
    let s = spec(base_with(
        json!({"sliding_window_pattern": 2, "window_size": 96}),
    ));
    assert_eq!(s.max_window(), Some(96));
}

#[test]
fn pattern_lists_must_match_the_layer_count() {
    let seven = vec!["full_attention"; 7];
    let (field, message) = config_err(base_with(json!({ "layer_types": seven })));
    assert_eq!(field, "layer_types");
    assert!(message.contains('7') && message.contains('8'), "{message}");
    let (field, _) = config_err(base_with(json!({"layer_types": "full_attention"})));
    assert_eq!(field, "layer_types");
    let (field, _) = config_err(base_with(json!({"hybrid_layer_pattern": [0, 1]})));
    assert_eq!(field, "hybrid_layer_pattern");
    let (field, _) = config_err(base_with(json!({
        "sliding_window": 64, "hybrid_layer_pattern": [0, 1, 2, 1, 1, 1, 1, 0]
    })));
    assert_eq!(field, "hybrid_layer_pattern");
    let (field, _) = config_err(base_with(json!({"use_sliding_window": "yes"})));
    assert_eq!(field, "use_sliding_window");
}

#[test]
fn bad_json_files_and_roots() {
    match ModelSpec::from_hf_config_str("{ not json", None) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "<json>"),
        other => panic!("{other:?}"),
    }
    assert_eq!(config_err(json!([1, 2, 3])).0, "<json>");
    assert_eq!(config_err(json!({"text_config": 5})).0, "text_config");
    let missing = Path::new("/nonexistent/kvalloc/config.json");
    match ModelSpec::from_hf_config_path(missing, None) {
        Err(Error::Config { field, message }) => {
            assert!(
                field.contains("/nonexistent/kvalloc/config.json"),
                "{field}"
            );
            assert!(message.contains("config.json"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let text = std::fs::read_to_string(preset_dir().join("gemma-3-27b-it.json")).unwrap();
    let from_str = ModelSpec::from_hf_config_str(&text, None).unwrap();
    assert_eq!(from_str.name, "gemma3");
    assert_eq!(
        from_str.fingerprint(),
        ModelSpec::preset("gemma-3-27b").unwrap().fingerprint()
    );
}

// ---------------------------------------------------------------------------------------------
// kv_bytes against a brute-force block count
// ---------------------------------------------------------------------------------------------

/// Blocks of `g` a sequence of `ctx` tokens holds, counted one block at a time: a sliding
/// group keeps the blocks overlapping `[E - W, ctx)`, `E` the last whole-block boundary (the
/// manager keeps the window ending at `E` so it can become a checkpoint).
fn brute_force_blocks(g: &KVGroup, ctx: u64, b: u64) -> u64 {
    let start = match g.window {
        Some(w) => (ctx / b * b).saturating_sub(u64::from(w)),
        None => 0,
    };
    (0..ctx.div_ceil(b))
        .filter(|j| j * b < ctx && (j + 1) * b > start)
        .count() as u64
}

proptest! {
    #[test]
    fn kv_bytes_matches_brute_force(
        preset in 0usize..4,
        ctx in 0u64..5_000,
        block_tokens in 1u32..300,
    ) {
        let s = ModelSpec::preset(ModelSpec::presets()[preset]).unwrap();
        let b = u64::from(block_tokens);
        let expected: u64 = s
            .groups
            .iter()
            .map(|g| brute_force_blocks(g, ctx, b) * g.block_bytes(block_tokens))
            .sum();
        prop_assert_eq!(s.kv_bytes(ctx, block_tokens).unwrap(), expected);
        // Sliding groups never hold more than ceil(W / B) + 1 blocks.
        for g in s.groups.iter().filter(|g| g.is_sliding()) {
            let w = u64::from(g.window.unwrap());
            prop_assert!(brute_force_blocks(g, ctx, b) <= w.div_ceil(b) + 1);
        }
        // With one-token blocks there is no rounding, so it never exceeds the dense count.
        // (Nor with blocks that divide every window: then E - W is block-aligned.)
        prop_assert!(s.kv_bytes(ctx, 1).unwrap() <= s.kv_bytes_dense(ctx).unwrap());
    }
}
