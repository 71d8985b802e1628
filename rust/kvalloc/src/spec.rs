//! Model geometry: which layers keep a KV cache, of what kind, and how many bytes per token.
//!
//! A [`ModelSpec`] splits a model's layers into [`KVGroup`]s: layers of one attention kind
//! (full or sliding-window) and one geometry (KV heads, K and V head dims). Every group has its
//! own block size in bytes, so the allocator gives it its own slab class.
//!
//! Specs come from Hugging Face `config.json` files ([`ModelSpec::from_hf_config`] and friends)
//! or from the bundled presets ([`ModelSpec::preset`]). The loader follows the conventions real
//! configs use to say which layers slide (`layer_types`, `hybrid_layer_pattern`,
//! `sliding_window_pattern`, `use_sliding_window`, ...) and rejects layers without a KV cache
//! kvalloc can manage (linear attention, Mamba, short convolutions, chunked attention) with a
//! [`Error::Config`] naming the layer index and kind.
//!
//! ```
//! use kvalloc::spec::{AttentionKind, ModelSpec};
//!
//! let spec = ModelSpec::preset("mimo-v2.5-pro")?;
//! assert_eq!(spec.num_layers, 70);
//! // 10 full layers x 8 KV heads x (192 + 128) dims x 2 bytes (bf16):
//! assert_eq!(spec.groups[0].kind, AttentionKind::Full);
//! assert_eq!(spec.groups[0].bytes_per_token(), 51_200);
//! // 60 sliding layers with a 128-token window:
//! assert_eq!(spec.groups[1].bytes_per_token(), 307_200);
//! assert_eq!(spec.max_window(), Some(128));
//! # Ok::<(), kvalloc::error::Error>(())
//! ```

use std::fmt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

type Obj = Map<String, Value>;

// ------------------------------------------------------------------------------------------
// DType
// ------------------------------------------------------------------------------------------

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16, 2 bytes.
    Bf16,
    /// IEEE half precision, 2 bytes.
    F16,
    /// IEEE single precision, 4 bytes.
    F32,
    /// Any 8-bit float format (e4m3 or e5m2), 1 byte.
    Fp8,
}

/// Spellings [`DType::parse`] accepts (after lower-casing and dropping a `torch.` prefix).
const DTYPE_NAMES: &[(&str, DType)] = &[
    ("bf16", DType::Bf16),
    ("bfloat16", DType::Bf16),
    ("fp16", DType::F16),
    ("f16", DType::F16),
    ("float16", DType::F16),
    ("half", DType::F16),
    ("fp32", DType::F32),
    ("f32", DType::F32),
    ("float32", DType::F32),
    ("float", DType::F32),
    ("fp8", DType::Fp8),
    ("fp8_e4m3", DType::Fp8),
    ("fp8_e5m2", DType::Fp8),
    ("fp8_e4m3fn", DType::Fp8),
    ("float8_e4m3fn", DType::Fp8),
    ("float8_e4m3fnuz", DType::Fp8),
    ("float8_e5m2", DType::Fp8),
    ("float8_e5m2fnuz", DType::Fp8),
];

impl DType {
    /// Bytes per element: 2, 2, 4, 1.
    pub fn bytes(self) -> u32 {
        match self {
            DType::Bf16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::Fp8 => 1,
        }
    }

    /// Canonical name: `"bfloat16"`, `"float16"`, `"float32"`, `"fp8"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::Fp8 => "fp8",
        }
    }

    /// Parses the names PyTorch, Hugging Face configs and serving engines use, case-insensitively
    /// and with an optional `torch.` prefix (`"torch.bfloat16"`, `"half"`, `"fp8_e4m3"`, ...).
    ///
    /// An unknown name is a [`Error::Config`] for field `dtype` listing the accepted names.
    pub fn parse(s: &str) -> Result<DType> {
        let lower = s.trim().to_ascii_lowercase();
        let key = lower.strip_prefix("torch.").unwrap_or(&lower);
        DTYPE_NAMES
            .iter()
            .find(|(name, _)| *name == key)
            .map(|&(_, dtype)| dtype)
            .ok_or_else(|| {
                let accepted: Vec<&str> = DTYPE_NAMES.iter().map(|(name, _)| *name).collect();
                Error::config(
                    "dtype",
                    format!(
                        "unknown dtype '{s}'; accepted (case-insensitive, optional 'torch.' \
                         prefix): {}",
                        accepted.join(", ")
                    ),
                )
            })
    }

    /// Stable one-byte code for [`ModelSpec::fingerprint`]; never renumber.
    fn code(self) -> u8 {
        match self {
            DType::Bf16 => 1,
            DType::F16 => 2,
            DType::F32 => 3,
            DType::Fp8 => 4,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ------------------------------------------------------------------------------------------
// AttentionKind, KVGroup
// ------------------------------------------------------------------------------------------

/// The attention kinds that have a KV cache kvalloc manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    /// Every token attends to the whole context: KV is kept for every token.
    Full,
    /// A token attends to the last `window` tokens only.
    Sliding,
}

impl AttentionKind {
    /// `"full"` or `"sliding"`.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Full => "full",
            AttentionKind::Sliding => "sliding",
        }
    }

    /// Stable one-byte code for [`ModelSpec::fingerprint`]; never renumber.
    fn code(self) -> u8 {
        match self {
            AttentionKind::Full => 1,
            AttentionKind::Sliding => 2,
        }
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Layers of one attention kind and one geometry; the unit that gets its own slab class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KVGroup {
    /// Full or sliding-window attention.
    pub kind: AttentionKind,
    /// `Some(W)` iff `kind` is [`AttentionKind::Sliding`].
    pub window: Option<u32>,
    /// Layer indices, ascending.
    pub layers: Vec<u32>,
    /// KV heads per layer (1 for MLA).
    pub kv_heads: u32,
    /// K head dim (for MLA: `kv_lora_rank + qk_rope_head_dim`).
    pub k_dim: u32,
    /// V head dim (0 for MLA, whose latent serves as both K and V).
    pub v_dim: u32,
    /// Element type of the cache.
    pub dtype: DType,
}

impl KVGroup {
    /// KV bytes one token costs in one layer: `kv_heads * (k_dim + v_dim) * dtype bytes`.
    pub fn layer_bytes_per_token(&self) -> u64 {
        u64::from(self.kv_heads)
            * (u64::from(self.k_dim) + u64::from(self.v_dim))
            * u64::from(self.dtype.bytes())
    }

    /// KV bytes one token costs over all layers of the group.
    pub fn bytes_per_token(&self) -> u64 {
        self.layer_bytes_per_token() * self.layers.len() as u64
    }

    /// Bytes of one block of `block_tokens` tokens (all layers of the group).
    pub fn block_bytes(&self, block_tokens: u32) -> u64 {
        self.bytes_per_token() * u64::from(block_tokens)
    }

    /// Whether the group is sliding-window attention.
    pub fn is_sliding(&self) -> bool {
        self.kind == AttentionKind::Sliding
    }

    /// Blocks this group holds for one sequence of `ctx` tokens: all of them for full
    /// attention; for a sliding window, those overlapping `[E - W, ctx)` where `E` is the last
    /// whole-block boundary — what the manager keeps, so that the window ending at `E` can
    /// become a checkpoint (one block more than `[ctx - W, ctx)` only when W is not a multiple
    /// of the block size).
    fn live_blocks(&self, ctx: u64, block_tokens: u64) -> u64 {
        let total = ctx.div_ceil(block_tokens);
        match self.window {
            Some(w) if self.is_sliding() => {
                let whole_end = ctx / block_tokens * block_tokens;
                total - whole_end.saturating_sub(u64::from(w)) / block_tokens
            }
            _ => total,
        }
    }
}

// ------------------------------------------------------------------------------------------
// ModelSpec
// ------------------------------------------------------------------------------------------

/// KV geometry of a whole model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Preset name, or the config's `model_type`. Not part of [`ModelSpec::fingerprint`].
    pub name: String,
    /// All layers of the text model, including any without a KV cache.
    pub num_layers: u32,
    /// Element type of the cache (every group uses it).
    pub dtype: DType,
    /// Full-attention groups first, then sliding ones; each ordered by first layer.
    pub groups: Vec<KVGroup>,
    /// Which weights the KV belongs to: from the config, `_name_or_path` and the revision
    /// (`_commit_hash`, else `revision`) as `name@revision`, or whatever the deployment sets
    /// (a fine-tune saved over its base's directory has the same config: set it there). Part
    /// of the lower tiers' namespace ([`crate::tiers::namespace`]), not of
    /// [`ModelSpec::fingerprint`]: two models of the same geometry share KV layout, never KV.
    /// None: the config names neither, and such models share a namespace per geometry.
    pub model_id: Option<String>,
}

/// Bundled presets: (name, config JSON). Order is the order [`ModelSpec::presets`] lists.
const PRESETS: &[(&str, &str)] = &[
    (
        "mimo-v2.5-pro",
        include_str!("../presets/mimo-v2.5-pro.json"),
    ),
    (
        "mimo-v2-flash",
        include_str!("../presets/mimo-v2-flash.json"),
    ),
    (
        "gemma-3-27b",
        include_str!("../presets/gemma-3-27b-it.json"),
    ),
    ("gpt-oss-120b", include_str!("../presets/gpt-oss-120b.json")),
];

const PRESET_NAMES: &[&str] = &[
    "mimo-v2.5-pro",
    "mimo-v2-flash",
    "gemma-3-27b",
    "gpt-oss-120b",
];

impl ModelSpec {
    /// Builds a spec from a parsed Hugging Face `config.json`.
    ///
    /// * Multimodal wrappers: the text model is read from `text_config`, `language_config` or
    ///   `llm_config` when one is present.
    /// * `dtype`: the argument wins; else `torch_dtype` / `dtype` of the outer config, then of
    ///   the text config (the outer one is what `save_pretrained` wrote for the checkpoint);
    ///   else bfloat16.
    /// * Layer count: `num_hidden_layers` (or `n_layer`, `num_layers`).
    /// * Layer kinds: the first of `layer_types`, `hybrid_layer_pattern`, `attn_type_list`,
    ///   `hybrid_override_pattern`, `attn_layer_period`, `sliding_window_pattern`,
    ///   `use_sliding_window`, `attention_chunk_size` that is present decides (Gemma 2 configs, which say nothing,
    ///   alternate sliding/full); otherwise every layer slides if a sliding window
    ///   (`sliding_window`, `sliding_window_size` or `window_size`) is given, else every layer
    ///   is full. Linear attention, Mamba, convolution, recurrent, chunked and unknown layer
    ///   kinds are rejected, naming the layer index and kind; so is a config that describes
    ///   such layers any other way (a model type without attention, `full_attention_interval`,
    ///   `attn_layer_indices`, `layers_block_type`, `block_types`, or `linear_*`, `mamba_*`,
    ///   `ssm_*` keys), naming the key and kind.
    /// * Geometry: full layers read `num_global_key_value_heads`/`num_key_value_heads`,
    ///   `global_head_dim`/`head_dim`, `global_v_head_dim`/`v_head_dim`; sliding layers read
    ///   the `swa_*`, `sliding_window_*` and `*local*` variants first, then the plain keys.
    ///   Missing head counts fall back to `num_attention_heads`, missing head dims to
    ///   `hidden_size / num_attention_heads`, missing V dims to the K dim.
    /// * MLA (`kv_lora_rank` present): one latent "head" of `kv_lora_rank + qk_rope_head_dim`
    ///   elements per token and layer, stored as K with `v_dim = 0`.
    ///
    /// Every problem is an [`Error::Config`] naming the offending key.
    pub fn from_hf_config(cfg: &Value, dtype: Option<DType>) -> Result<ModelSpec> {
        let root = cfg
            .as_object()
            .ok_or_else(|| Error::config("<json>", "expected a JSON object at the top level"))?;
        let text = text_model(root)?;
        let dtype = match dtype {
            Some(d) => d,
            None => config_dtype(root, text)?,
        };
        let num_layers = num_layers(text)?;
        let kinds = layer_kinds(root, text, num_layers)?;
        let groups = build_groups(text, &kinds, dtype)?;
        Ok(ModelSpec {
            name: model_name(root, text),
            num_layers,
            dtype,
            groups,
            model_id: model_identity(root, text)?,
        })
    }

    /// [`ModelSpec::from_hf_config`] on JSON text; malformed JSON is a config error for field
    /// `<json>`.
    pub fn from_hf_config_str(json: &str, dtype: Option<DType>) -> Result<ModelSpec> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::config("<json>", format!("not valid JSON: {e}")))?;
        ModelSpec::from_hf_config(&value, dtype)
    }

    /// [`ModelSpec::from_hf_config`] on a file; an unreadable file is a config error whose
    /// field is the path.
    pub fn from_hf_config_path(path: &Path, dtype: Option<DType>) -> Result<ModelSpec> {
        let shown = path.display().to_string();
        let json = crate::files::read_text(path).map_err(|e| {
            Error::config(
                shown.clone(),
                format!("cannot read model config '{shown}': {e}"),
            )
        })?;
        let value: Value = serde_json::from_str(&json)
            .map_err(|e| Error::config("<json>", format!("'{shown}' is not valid JSON: {e}")))?;
        ModelSpec::from_hf_config(&value, dtype)
    }

    /// A bundled model (names in [`ModelSpec::presets`], matched case-insensitively); its
    /// `name` is the preset name.
    pub fn preset(name: &str) -> Result<ModelSpec> {
        let wanted = name.trim().to_ascii_lowercase();
        let (preset_name, json) = PRESETS.iter().find(|(n, _)| *n == wanted).ok_or_else(|| {
            Error::invalid(
                "name",
                format!(
                    "unknown preset '{name}'; known presets: {}",
                    PRESET_NAMES.join(", ")
                ),
            )
        })?;
        let mut spec = ModelSpec::from_hf_config_str(json, None)?;
        spec.name = (*preset_name).to_string();
        Ok(spec)
    }

    /// Names [`ModelSpec::preset`] accepts.
    pub fn presets() -> &'static [&'static str] {
        PRESET_NAMES
    }

    /// KV bytes one sequence of `context_tokens` tokens holds with blocks of `block_tokens`
    /// tokens: full groups hold `ceil(ctx / B)` blocks; a sliding group holds the blocks that
    /// overlap its window (`[max(0, E - W), ctx)` with `E = floor(ctx / B) * B`, at most
    /// `ceil(W / B) + 1`), as a running request does in the manager.
    ///
    /// An [`Error::InvalidArgument`] if `block_tokens` is 0 or the bytes do not fit in 64 bits
    /// (never a saturated or wrapped count).
    pub fn kv_bytes(&self, context_tokens: u64, block_tokens: u32) -> Result<u64> {
        if block_tokens == 0 {
            return Err(Error::invalid("block_tokens", "must be positive"));
        }
        let b = u64::from(block_tokens);
        self.groups
            .iter()
            .try_fold(0u64, |acc, g| {
                let block = g.bytes_per_token().checked_mul(b)?;
                acc.checked_add(g.live_blocks(context_tokens, b).checked_mul(block)?)
            })
            .ok_or_else(|| too_many_bytes(context_tokens))
    }

    /// KV bytes if every layer kept every token, without block rounding (the naive cache). An
    /// [`Error::InvalidArgument`] if they do not fit in 64 bits.
    pub fn kv_bytes_dense(&self, context_tokens: u64) -> Result<u64> {
        context_tokens
            .checked_mul(self.bytes_per_token_dense())
            .ok_or_else(|| too_many_bytes(context_tokens))
    }

    /// Sum over groups of [`KVGroup::bytes_per_token`].
    pub fn bytes_per_token_dense(&self) -> u64 {
        self.groups.iter().map(KVGroup::bytes_per_token).sum()
    }

    /// Block size in bytes of every group, in group order.
    pub fn block_bytes(&self, block_tokens: u32) -> Vec<u64> {
        self.groups
            .iter()
            .map(|g| g.block_bytes(block_tokens))
            .collect()
    }

    /// Largest sliding window, or `None` when no group slides.
    pub fn max_window(&self) -> Option<u32> {
        self.groups.iter().filter_map(|g| g.window).max()
    }

    /// xxh3-64 of a canonical encoding of the geometry (layer count, dtype, and every group's
    /// kind, window, layers, heads, dims and dtype), not of the name: two specs with the same
    /// fingerprint lay out KV identically, so cached blocks may be shared between them.
    pub fn fingerprint(&self) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&self.canonical_bytes())
    }

    /// The byte string [`ModelSpec::fingerprint`] hashes. Little-endian, length-prefixed lists,
    /// a version tag first so the encoding can change without silent collisions.
    fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 4 * self.num_layers as usize);
        out.extend_from_slice(b"kvalloc.spec.v1\0");
        out.extend_from_slice(&self.num_layers.to_le_bytes());
        out.push(self.dtype.code());
        out.extend_from_slice(&(self.groups.len() as u32).to_le_bytes());
        for g in &self.groups {
            out.push(g.kind.code());
            out.extend_from_slice(&g.window.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&(g.layers.len() as u32).to_le_bytes());
            for layer in &g.layers {
                out.extend_from_slice(&layer.to_le_bytes());
            }
            for x in [g.kv_heads, g.k_dim, g.v_dim] {
                out.extend_from_slice(&x.to_le_bytes());
            }
            out.push(g.dtype.code());
        }
        out
    }
}

/// The error for a context whose KV bytes overflow 64 bits.
fn too_many_bytes(context_tokens: u64) -> Error {
    Error::invalid(
        "context_tokens",
        format!("the KV bytes of {context_tokens} tokens do not fit in 64 bits"),
    )
}

// ------------------------------------------------------------------------------------------
// HF config parsing: field helpers
// ------------------------------------------------------------------------------------------

/// Keys under which multimodal wrappers nest the text model's config.
const TEXT_CONFIG_KEYS: &[&str] = &["text_config", "language_config", "llm_config"];
const NUM_LAYERS_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers"];
const WINDOW_KEYS: &[&str] = &["sliding_window", "sliding_window_size", "window_size"];
const DTYPE_KEYS: &[&str] = &["torch_dtype", "dtype"];
/// Guards against a config that would make us allocate per-layer vectors of absurd size.
const MAX_LAYERS: u64 = 1 << 20;

/// The value of `key`, treating JSON `null` as absent (HF writes `null` for unset options).
fn get<'a>(obj: &'a Obj, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// `key` as an integer in `[min, u32::MAX]`, or `None` when absent; anything else is an error
/// naming `key`.
fn get_u32_at_least(obj: &Obj, key: &str, min: u32) -> Result<Option<u32>> {
    let Some(v) = get(obj, key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(n) if n >= u64::from(min) && n <= u64::from(u32::MAX) => Ok(Some(n as u32)),
        _ => Err(Error::config(
            key,
            format!("expected an integer >= {min} (and < 2^32), got {v}"),
        )),
    }
}

/// `key` as a positive integer, or `None` when absent.
fn get_positive(obj: &Obj, key: &str) -> Result<Option<u32>> {
    get_u32_at_least(obj, key, 1)
}

/// The first of `keys` that is present, as a positive integer, with the key it came from.
fn first_positive(obj: &Obj, keys: &[&'static str]) -> Result<Option<(u32, &'static str)>> {
    for &key in keys {
        if let Some(n) = get_positive(obj, key)? {
            return Ok(Some((n, key)));
        }
    }
    Ok(None)
}

/// `key` as a list of exactly `n` items; wrong type or length is an error naming `key`.
fn get_list<'a>(obj: &'a Obj, key: &str, n: u32) -> Result<Option<&'a Vec<Value>>> {
    let Some(v) = get(obj, key) else {
        return Ok(None);
    };
    let list = v
        .as_array()
        .ok_or_else(|| Error::config(key, format!("expected a list, got {v}")))?;
    if list.len() != n as usize {
        return Err(Error::config(
            key,
            format!(
                "has {} entries but the model has {n} layers (num_hidden_layers)",
                list.len()
            ),
        ));
    }
    Ok(Some(list))
}

/// The error for a layer whose kind has no KV cache kvalloc can manage.
fn unsupported_layer(field: impl Into<String>, layer: usize, kind: &str) -> Error {
    Error::config(
        field,
        format!(
            "layer {layer} has kind '{kind}', which kvalloc does not support (only full and \
             sliding-window attention have a KV cache it manages)"
        ),
    )
}

// ------------------------------------------------------------------------------------------
// HF config parsing: model-level fields
// ------------------------------------------------------------------------------------------

/// The object describing the text model: a nested text config if there is one, else the root.
fn text_model(root: &Obj) -> Result<&Obj> {
    for &key in TEXT_CONFIG_KEYS {
        if let Some(v) = get(root, key) {
            return v
                .as_object()
                .ok_or_else(|| Error::config(key, format!("expected an object, got {v}")));
        }
    }
    Ok(root)
}

/// `model_type` of the outer config, else of the text config, else the first architecture.
fn model_name(root: &Obj, text: &Obj) -> String {
    let model_type = |o: &Obj| {
        get(o, "model_type")
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    model_type(root)
        .or_else(|| model_type(text))
        .or_else(|| {
            get(root, "architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The weights' identity: `_name_or_path` (outer config, then text config) and the revision
/// (`_commit_hash`, then `revision`, at either level), as `name`, `name@revision` or
/// `@revision`; None when neither is given. A present key that is not a string is an error.
fn model_identity(root: &Obj, text: &Obj) -> Result<Option<String>> {
    let first = |keys: &[&str]| -> Result<Option<String>> {
        for obj in [root, text] {
            for &key in keys {
                if let Some(v) = get(obj, key) {
                    let s = v
                        .as_str()
                        .ok_or_else(|| Error::config(key, format!("expected a string, got {v}")))?;
                    if !s.is_empty() {
                        return Ok(Some(s.to_owned()));
                    }
                }
            }
        }
        Ok(None)
    };
    let name = first(&["_name_or_path"])?;
    let revision = first(&["_commit_hash", "revision"])?;
    Ok(match (name, revision) {
        (None, None) => None,
        (Some(n), None) => Some(n),
        (n, Some(r)) => Some(format!("{}@{r}", n.unwrap_or_default())),
    })
}

/// dtype from the outer config, then the text config (first of `torch_dtype`, `dtype` at each
/// level); bfloat16 when neither says.
fn config_dtype(root: &Obj, text: &Obj) -> Result<DType> {
    for obj in [root, text] {
        for &key in DTYPE_KEYS {
            if let Some(v) = get(obj, key) {
                let s = v
                    .as_str()
                    .ok_or_else(|| Error::config(key, format!("expected a string, got {v}")))?;
                return DType::parse(s).map_err(|e| retarget(e, key));
            }
        }
    }
    Ok(DType::Bf16)
}

/// Moves a config error to another field (e.g. `dtype` -> `torch_dtype`), keeping its message.
fn retarget(err: Error, field: &str) -> Error {
    match err {
        Error::Config { message, .. } => Error::config(field, message),
        other => other,
    }
}

/// Layer count of the text model.
fn num_layers(text: &Obj) -> Result<u32> {
    let (n, key) = first_positive(text, NUM_LAYERS_KEYS)?.ok_or_else(|| {
        Error::config(
            "num_hidden_layers",
            "missing: the number of layers (num_hidden_layers, n_layer or num_layers) is required",
        )
    })?;
    if u64::from(n) > MAX_LAYERS {
        return Err(Error::config(
            key,
            format!("{n} layers is implausible (limit {MAX_LAYERS})"),
        ));
    }
    Ok(n)
}

/// The sliding window, from `sliding_window` or its alternative keys; all present ones must be
/// positive and agree.
fn window(text: &Obj) -> Result<Option<u32>> {
    let mut found: Option<(u32, &str)> = None;
    for &key in WINDOW_KEYS {
        let Some(w) = get_positive(text, key)? else {
            continue;
        };
        match found {
            Some((prev, prev_key)) if prev != w => {
                return Err(Error::config(
                    "sliding_window",
                    format!("{prev_key} = {prev} and {key} = {w} contradict each other"),
                ));
            }
            Some(_) => {}
            None => found = Some((w, key)),
        }
    }
    Ok(found.map(|(w, _)| w))
}

// ------------------------------------------------------------------------------------------
// HF config parsing: layer kinds
// ------------------------------------------------------------------------------------------

/// What one layer needs from the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerKind {
    Full,
    Sliding,
    /// A layer without attention (an MLP or MoE block in a pattern string): no KV at all.
    NoCache,
}

/// Decides every layer's kind. The first convention present in the config wins, in the
/// order documented on [`ModelSpec::from_hf_config`]; then a config that describes layers
/// without a KV cache in any other way is refused ([`reject_unmodelled_layers`]), so that
/// such a model is never read as attention only.
fn layer_kinds(root: &Obj, text: &Obj, n: u32) -> Result<Vec<LayerKind>> {
    let kinds = declared_kinds(root, text, n)?;
    reject_unmodelled_layers(root, text, n)?;
    Ok(kinds)
}

/// Layer kinds by the first per-layer convention present (see [`layer_kinds`]).
fn declared_kinds(root: &Obj, text: &Obj, n: u32) -> Result<Vec<LayerKind>> {
    type Rule = fn(&Obj, u32) -> Result<Option<Vec<LayerKind>>>;
    const RULES: &[Rule] = &[
        kinds_from_layer_types,
        kinds_from_hybrid_layer_pattern,
        kinds_from_attn_type_list,
        kinds_from_hybrid_override_pattern,
        kinds_from_attn_layer_period,
        kinds_from_sliding_window_pattern,
    ];
    for rule in RULES {
        if let Some(kinds) = rule(text, n)? {
            return Ok(kinds);
        }
    }
    // Gemma 2 configs say nothing: its layers alternate, sliding first.
    if is_gemma2(root) || is_gemma2(text) {
        return Ok(alternating_kinds(2, n));
    }
    if let Some(kinds) = kinds_from_use_sliding_window(text, n)? {
        return Ok(kinds);
    }
    reject_chunked_attention(text)?;
    let kind = plain_attention_kind(text)?;
    Ok(vec![kind; n as usize])
}

/// Model types whose layers are all recurrent or state-space: no attention KV at all.
const NON_KV_MODEL_TYPES: &[(&str, &str)] = &[
    ("mamba", "mamba"),
    ("mamba2", "mamba"),
    ("falcon_mamba", "mamba"),
    ("rwkv", "rwkv"),
    ("xlstm", "xlstm"),
    ("recurrent_gemma", "recurrent"),
];

/// Prefixes of keys that describe layers other than attention (Qwen3-Next's `linear_*`,
/// Jamba's, Bamba's, Zamba's and Falcon-H1's `mamba_*`, Nemotron-H's `ssm_*`), with the kind
/// they describe.
const NON_KV_KEY_PREFIXES: &[(&str, &str)] = &[
    ("linear_", "linear_attention"),
    ("mamba_", "mamba"),
    ("ssm_", "ssm"),
];

/// The error for a config that describes layers kvalloc cannot model, without saying which
/// layers they are.
fn unsupported_kind(field: impl Into<String>, kind: &str) -> Error {
    Error::config(
        field,
        format!(
            "the model has '{kind}' layers, which kvalloc does not support (only full and \
             sliding-window attention have a KV cache it manages)"
        ),
    )
}

/// Refuses a config that has layers without a KV cache (linear attention, Mamba/SSM,
/// recurrent) however it says so, beyond the per-layer lists the rules read: a model type
/// without attention; Qwen3-Next's `full_attention_interval` (the other layers are linear
/// attention); `attn_layer_indices` (Bamba, Granite 4: the other layers are Mamba);
/// `layers_block_type` (Zamba) and `block_types` (RecurrentGemma) lists; any key with a
/// `linear_`, `mamba_` or `ssm_` prefix (the parameters of such layers). Counting such a model
/// as attention only would mis-state its memory, so it is an error naming the kind.
fn reject_unmodelled_layers(root: &Obj, text: &Obj, n: u32) -> Result<()> {
    for obj in [root, text] {
        let model_type = get(obj, "model_type").and_then(Value::as_str);
        if let Some(&(_, kind)) = NON_KV_MODEL_TYPES
            .iter()
            .find(|(t, _)| Some(*t) == model_type)
        {
            return Err(unsupported_kind("model_type", kind));
        }
    }
    if let Some(interval) = get_positive(text, "full_attention_interval")? {
        // Layer i is full attention iff (i + 1) % interval == 0; the others are linear.
        if let Some(i) = (0..n).find(|i| (i + 1) % interval != 0) {
            return Err(unsupported_layer(
                "full_attention_interval",
                i as usize,
                "linear_attention",
            ));
        }
    }
    if let Some(v) = get(text, "attn_layer_indices") {
        let listed: Vec<u64> = v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| {
                Error::config(
                    "attn_layer_indices",
                    format!("expected a list of layer indices, got {v}"),
                )
            })?;
        if let Some(i) = (0..u64::from(n)).find(|i| !listed.contains(i)) {
            return Err(unsupported_layer("attn_layer_indices", i as usize, "mamba"));
        }
    }
    for key in ["layers_block_type", "block_types"] {
        let Some(list) = get(text, key).and_then(Value::as_array) else {
            continue;
        };
        for (i, v) in list.iter().enumerate() {
            let kind = v.as_str().unwrap_or("?");
            if kind != "attention" {
                return Err(unsupported_layer(format!("{key}[{i}]"), i, kind));
            }
        }
    }
    for (key, _) in text.iter().filter(|(_, v)| !v.is_null()) {
        if let Some(&(_, kind)) = NON_KV_KEY_PREFIXES
            .iter()
            .find(|(prefix, _)| key.starts_with(prefix))
        {
            return Err(unsupported_kind(key.as_str(), kind));
        }
    }
    Ok(())
}

/// Rule 1, `layer_types`: one string per layer (the current transformers convention).
fn kinds_from_layer_types(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    let Some(list) = get_list(text, "layer_types", n)? else {
        return Ok(None);
    };
    let parse = |(i, v): (usize, &Value)| {
        let field = format!("layer_types[{i}]");
        let s = v
            .as_str()
            .ok_or_else(|| Error::config(field.clone(), format!("expected a string, got {v}")))?;
        match s {
            "full_attention" | "global_attention" | "attention" => Ok(LayerKind::Full),
            "sliding_attention" | "sliding_window_attention" => Ok(LayerKind::Sliding),
            // Chunked, linear, Mamba/SSM, convolution, recurrent, or a kind we don't know:
            // refuse rather than guess a cache size.
            other => Err(unsupported_layer(field, i, other)),
        }
    };
    list.iter()
        .enumerate()
        .map(parse)
        .collect::<Result<_>>()
        .map(Some)
}

/// Rule 2, `hybrid_layer_pattern` (MiMo): 0 = full, 1 = sliding.
fn kinds_from_hybrid_layer_pattern(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    const KEY: &str = "hybrid_layer_pattern";
    let Some(list) = get_list(text, KEY, n)? else {
        return Ok(None);
    };
    let parse = |(i, v): (usize, &Value)| match v.as_u64() {
        Some(0) => Ok(LayerKind::Full),
        Some(1) => Ok(LayerKind::Sliding),
        _ => Err(Error::config(
            KEY,
            format!("entry {i} is {v}; expected 0 (full) or 1 (sliding)"),
        )),
    };
    list.iter()
        .enumerate()
        .map(parse)
        .collect::<Result<_>>()
        .map(Some)
}

/// Rule 3, `attn_type_list` (MiniMax-01): 1 = softmax (full) attention, 0 = linear attention.
fn kinds_from_attn_type_list(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    const KEY: &str = "attn_type_list";
    let Some(list) = get_list(text, KEY, n)? else {
        return Ok(None);
    };
    let parse = |(i, v): (usize, &Value)| match v.as_u64() {
        Some(1) => Ok(LayerKind::Full),
        Some(0) => Err(unsupported_layer(
            format!("{KEY}[{i}]"),
            i,
            "linear_attention",
        )),
        _ => Err(Error::config(
            format!("{KEY}[{i}]"),
            format!("is {v}; expected 1 (softmax attention) or 0 (linear attention)"),
        )),
    };
    list.iter()
        .enumerate()
        .map(parse)
        .collect::<Result<_>>()
        .map(Some)
}

/// Rule 4, `hybrid_override_pattern` (Nemotron-H): one character per layer; `*` attention,
/// `M` Mamba, `-` MLP and `E` MoE (the last two have no KV).
fn kinds_from_hybrid_override_pattern(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    const KEY: &str = "hybrid_override_pattern";
    let Some(v) = get(text, KEY) else {
        return Ok(None);
    };
    let pattern = v
        .as_str()
        .ok_or_else(|| Error::config(KEY, format!("expected a string, got {v}")))?;
    if pattern.chars().count() != n as usize {
        return Err(Error::config(
            KEY,
            format!(
                "has {} characters but the model has {n} layers (num_hidden_layers)",
                pattern.chars().count()
            ),
        ));
    }
    let attention = plain_attention_kind(text)?;
    let parse = |(i, c): (usize, char)| match c {
        '*' => Ok(attention),
        '-' | 'E' => Ok(LayerKind::NoCache),
        'M' => Err(unsupported_layer(format!("{KEY}[{i}]"), i, "mamba")),
        other => Err(Error::config(
            format!("{KEY}[{i}]"),
            format!("unknown layer symbol '{other}'; expected '*', 'M', '-' or 'E'"),
        )),
    };
    let kinds: Vec<LayerKind> = pattern
        .chars()
        .enumerate()
        .map(parse)
        .collect::<Result<_>>()?;
    if kinds.iter().all(|&k| k == LayerKind::NoCache) {
        return Err(Error::config(
            KEY,
            "no attention layer ('*'): the model has no KV cache",
        ));
    }
    Ok(Some(kinds))
}

/// Rule 5, `attn_layer_period` / `attn_layer_offset` (Jamba): layer i is attention iff
/// `i % period == offset`; the others are Mamba, which we reject at the first one.
fn kinds_from_attn_layer_period(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    const KEY: &str = "attn_layer_period";
    let Some(period) = get_positive(text, KEY)? else {
        return Ok(None);
    };
    let offset = get_u32_at_least(text, "attn_layer_offset", 0)?.unwrap_or(0);
    if offset >= period {
        return Err(Error::config(
            "attn_layer_offset",
            format!("{offset} must be smaller than attn_layer_period ({period})"),
        ));
    }
    if let Some(i) = (0..n).find(|i| i % period != offset) {
        return Err(unsupported_layer(KEY, i as usize, "mamba"));
    }
    Ok(Some(vec![plain_attention_kind(text)?; n as usize]))
}

/// Rule 6, `sliding_window_pattern` = N (Gemma 3, Cohere2): layer i is full iff
/// `(i + 1) % N == 0`, so every N-th layer is full and the others slide.
fn kinds_from_sliding_window_pattern(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    // Newer transformers write the key with a leading underscore.
    for key in ["sliding_window_pattern", "_sliding_window_pattern"] {
        if let Some(period) = get_positive(text, key)? {
            return Ok(Some(alternating_kinds(period, n)));
        }
    }
    Ok(None)
}

/// Layer i is full iff `(i + 1) % period == 0`, else sliding.
fn alternating_kinds(period: u32, n: u32) -> Vec<LayerKind> {
    (0..n)
        .map(|i| {
            if (i + 1) % period == 0 {
                LayerKind::Full
            } else {
                LayerKind::Sliding
            }
        })
        .collect()
}

/// Whether a config object is Gemma 2's (whose layers alternate without saying so).
fn is_gemma2(obj: &Obj) -> bool {
    get(obj, "model_type").and_then(Value::as_str) == Some("gemma2")
}

/// Rule 7, `use_sliding_window` (Qwen2 style): false -> all full; true -> layer i slides iff
/// `i >= max_window_layers` (default 0).
fn kinds_from_use_sliding_window(text: &Obj, n: u32) -> Result<Option<Vec<LayerKind>>> {
    const KEY: &str = "use_sliding_window";
    let Some(v) = get(text, KEY) else {
        return Ok(None);
    };
    let enabled = v
        .as_bool()
        .ok_or_else(|| Error::config(KEY, format!("expected true or false, got {v}")))?;
    if !enabled {
        return Ok(Some(vec![LayerKind::Full; n as usize]));
    }
    let first_sliding = get_u32_at_least(text, "max_window_layers", 0)?.unwrap_or(0);
    let kind = |i: u32| {
        if i >= first_sliding {
            LayerKind::Sliding
        } else {
            LayerKind::Full
        }
    };
    Ok(Some((0..n).map(kind).collect()))
}

/// Rule 8, `attention_chunk_size` (Llama 4): chunked local attention keeps KV per chunk, which
/// is neither full nor sliding, so we refuse. With `no_rope_layers`, the layers whose entry is
/// truthy are the chunked ones; without it, layer 0 is.
fn reject_chunked_attention(text: &Obj) -> Result<()> {
    const KEY: &str = "attention_chunk_size";
    if get(text, KEY).is_none() {
        return Ok(());
    }
    let first_chunked = match get(text, "no_rope_layers").and_then(Value::as_array) {
        Some(list) => list.iter().position(is_truthy),
        None => Some(0),
    };
    match first_chunked {
        Some(i) => Err(unsupported_layer(KEY, i, "chunked_attention")),
        None => Ok(()),
    }
}

/// Python truthiness of a JSON scalar, as the `no_rope_layers` list uses it.
fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(x) => x.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Null => false,
    }
}

/// Rule 9, and the kind of "plain attention" layers elsewhere: sliding when the config gives a
/// window (Mistral v0.1 style), else full.
fn plain_attention_kind(text: &Obj) -> Result<LayerKind> {
    Ok(match window(text)? {
        Some(_) => LayerKind::Sliding,
        None => LayerKind::Full,
    })
}

// ------------------------------------------------------------------------------------------
// HF config parsing: geometry and groups
// ------------------------------------------------------------------------------------------

/// Per-layer KV geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    kv_heads: u32,
    k_dim: u32,
    v_dim: u32,
}

/// Config keys, in order of preference, for one kind's geometry.
struct GeometryKeys {
    kv_heads: &'static [&'static str],
    /// Query heads that `kv_heads` must not exceed.
    attention_heads: &'static [&'static str],
    k_dim: &'static [&'static str],
    v_dim: &'static [&'static str],
}

const FULL_KEYS: GeometryKeys = GeometryKeys {
    kv_heads: &["num_global_key_value_heads", "num_key_value_heads"],
    attention_heads: &["num_attention_heads"],
    k_dim: &["global_head_dim", "head_dim"],
    v_dim: &["global_v_head_dim", "v_head_dim"],
};

const SLIDING_KEYS: GeometryKeys = GeometryKeys {
    kv_heads: &[
        "swa_num_key_value_heads",
        "sliding_window_num_key_value_heads",
        "num_local_key_value_heads",
        "num_key_value_heads",
    ],
    attention_heads: &["swa_num_attention_heads", "num_attention_heads"],
    k_dim: &["swa_head_dim", "local_head_dim", "head_dim"],
    v_dim: &["swa_v_head_dim", "v_head_dim"],
};

/// Geometry of one attention kind. MLA, when configured, overrides the per-kind keys.
fn geometry(text: &Obj, keys: &GeometryKeys) -> Result<Geometry> {
    if let Some(mla) = mla_geometry(text)? {
        return Ok(mla);
    }
    let heads = get_positive(text, "num_attention_heads")?;
    let kv_heads = kv_heads(text, keys, heads)?;
    let k_dim = match first_positive(text, keys.k_dim)? {
        Some((d, _)) => d,
        None => derived_head_dim(text, heads)?,
    };
    let v_dim = first_positive(text, keys.v_dim)?.map_or(k_dim, |(d, _)| d);
    Ok(Geometry {
        kv_heads,
        k_dim,
        v_dim,
    })
}

/// KV heads for one kind, falling back to `num_attention_heads` (plain multi-head attention);
/// more KV heads than query heads is a contradiction.
fn kv_heads(text: &Obj, keys: &GeometryKeys, heads: Option<u32>) -> Result<u32> {
    let Some((kv, key)) = first_positive(text, keys.kv_heads)? else {
        return heads.ok_or_else(|| {
            Error::config(
                "num_key_value_heads",
                "missing: neither num_key_value_heads nor num_attention_heads is given",
            )
        });
    };
    if let Some((q, q_key)) = first_positive(text, keys.attention_heads)? {
        if kv > q {
            return Err(Error::config(
                key,
                format!("{key} = {kv} exceeds {q_key} = {q}"),
            ));
        }
    }
    Ok(kv)
}

/// `hidden_size / num_attention_heads`, the head dim of configs that do not state one.
fn derived_head_dim(text: &Obj, heads: Option<u32>) -> Result<u32> {
    let hidden = get_positive(text, "hidden_size")?;
    match (hidden, heads) {
        (Some(h), Some(q)) if h % q == 0 => Ok(h / q),
        (Some(h), Some(q)) => Err(Error::config(
            "head_dim",
            format!(
                "missing, and hidden_size ({h}) is not a multiple of num_attention_heads ({q})"
            ),
        )),
        _ => Err(Error::config(
            "head_dim",
            "missing, and cannot be derived: needs hidden_size and num_attention_heads",
        )),
    }
}

/// MLA (DeepSeek V2/V3 style, `kv_lora_rank` present): each layer caches one compressed latent
/// of `kv_lora_rank` plus the shared RoPE key of `qk_rope_head_dim` per token. We model it as a
/// single head whose K dim is their sum and whose V dim is 0, so byte counts come out right.
fn mla_geometry(text: &Obj) -> Result<Option<Geometry>> {
    let Some(rank) = get_positive(text, "kv_lora_rank")? else {
        return Ok(None);
    };
    let rope = get_positive(text, "qk_rope_head_dim")?.ok_or_else(|| {
        Error::config(
            "qk_rope_head_dim",
            "missing: required with kv_lora_rank (MLA)",
        )
    })?;
    let k_dim = rank.checked_add(rope).ok_or_else(|| {
        Error::config("kv_lora_rank", "kv_lora_rank + qk_rope_head_dim overflows")
    })?;
    Ok(Some(Geometry {
        kv_heads: 1,
        k_dim,
        v_dim: 0,
    }))
}

/// What makes two layers share a group: kind, window and geometry.
type GroupKey = (AttentionKind, Option<u32>, Geometry);

/// Resolves every KV layer's kind, window and geometry, and groups equal ones.
/// Geometry and window are read only for kinds that occur, so a config need not describe
/// layers it does not have.
fn build_groups(text: &Obj, kinds: &[LayerKind], dtype: DType) -> Result<Vec<KVGroup>> {
    let has = |k: LayerKind| kinds.contains(&k);
    let full_key = if has(LayerKind::Full) {
        Some((AttentionKind::Full, None, geometry(text, &FULL_KEYS)?))
    } else {
        None
    };
    let sliding_key = if has(LayerKind::Sliding) {
        let w = window(text)?.ok_or_else(|| {
            Error::config(
                "sliding_window",
                "missing: some layers slide, so a positive sliding_window is required",
            )
        })?;
        let geom = geometry(text, &SLIDING_KEYS)?;
        Some((AttentionKind::Sliding, Some(w), geom))
    } else {
        None
    };
    let layers = kinds.iter().enumerate().filter_map(|(i, k)| {
        let key = match k {
            LayerKind::Full => full_key?,
            LayerKind::Sliding => sliding_key?,
            LayerKind::NoCache => return None,
        };
        Some((i as u32, key))
    });
    let groups = group_layers(layers, dtype);
    if groups.is_empty() {
        return Err(Error::config(
            "num_hidden_layers",
            "no layer has a KV cache kvalloc manages",
        ));
    }
    check_token_bytes(&groups)?;
    Ok(groups)
}

/// Bytes per token (every layer) must stay below 2^32, so that a block of up to 2^32 tokens
/// has a size that fits in 64 bits: the byte counts derived from a spec never overflow.
/// Real models are far below (hundreds of KiB per token).
fn check_token_bytes(groups: &[KVGroup]) -> Result<()> {
    const LIMIT: u128 = 1 << 32;
    let total: u128 = groups
        .iter()
        .map(|g| {
            u128::from(g.kv_heads)
                * (u128::from(g.k_dim) + u128::from(g.v_dim))
                * u128::from(g.dtype.bytes())
                * g.layers.len() as u128
        })
        .sum();
    if total >= LIMIT {
        return Err(Error::config(
            "<geometry>",
            format!(
                "{total} KV bytes per token over all layers is implausible (limit 2^32): \
                 check num_key_value_heads, head_dim and num_hidden_layers"
            ),
        ));
    }
    Ok(())
}

/// Groups layers with equal keys; full groups first, then sliding, each by first layer.
fn group_layers(layers: impl Iterator<Item = (u32, GroupKey)>, dtype: DType) -> Vec<KVGroup> {
    let mut buckets: Vec<(GroupKey, Vec<u32>)> = Vec::new();
    for (layer, key) in layers {
        match buckets.iter_mut().find(|(k, _)| *k == key) {
            Some((_, ls)) => ls.push(layer),
            None => buckets.push((key, vec![layer])),
        }
    }
    let mut groups: Vec<KVGroup> = buckets
        .into_iter()
        .map(|((kind, window, g), layers)| KVGroup {
            kind,
            window,
            layers,
            kv_heads: g.kv_heads,
            k_dim: g.k_dim,
            v_dim: g.v_dim,
            dtype,
        })
        .collect();
    // Buckets were created in order of first layer; a stable sort by kind keeps that within
    // each kind.
    groups.sort_by_key(|g| g.kind.code());
    groups
}

// ------------------------------------------------------------------------------------------
// Unit tests
// ------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Obj {
        v.as_object().unwrap().clone()
    }

    fn config_field(err: Error) -> String {
        match err {
            Error::Config { field, .. } => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn dtype_parse_accepts_common_spellings() {
        for (s, d) in [
            ("bf16", DType::Bf16),
            ("torch.bfloat16", DType::Bf16),
            ("BFloat16", DType::Bf16),
            ("half", DType::F16),
            ("fp16", DType::F16),
            ("float", DType::F32),
            ("FP32", DType::F32),
            ("float8_e4m3fn", DType::Fp8),
            ("fp8_e5m2", DType::Fp8),
        ] {
            assert_eq!(DType::parse(s).unwrap(), d, "{s}");
        }
    }

    #[test]
    fn dtype_parse_rejects_unknown_listing_names() {
        let err = DType::parse("int4").unwrap_err();
        assert!(err.to_string().contains("bfloat16"), "{err}");
        assert_eq!(config_field(err), "dtype");
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in [DType::Bf16, DType::F16, DType::F32, DType::Fp8] {
            assert_eq!(DType::parse(d.name()).unwrap(), d);
        }
        assert_eq!(
            [DType::Bf16, DType::F16, DType::F32, DType::Fp8].map(DType::bytes),
            [2, 2, 4, 1]
        );
    }

    #[test]
    fn positive_helper_treats_null_as_absent_and_rejects_junk() {
        let o = obj(json!({"a": null, "b": 0, "c": -3, "d": 2.5, "e": "8", "f": 8}));
        assert_eq!(get_positive(&o, "a").unwrap(), None);
        assert_eq!(get_positive(&o, "missing").unwrap(), None);
        for k in ["b", "c", "d", "e"] {
            assert_eq!(config_field(get_positive(&o, k).unwrap_err()), k);
        }
        assert_eq!(get_positive(&o, "f").unwrap(), Some(8));
    }

    #[test]
    fn alternating_pattern_marks_every_nth_layer_full() {
        use LayerKind::*;
        assert_eq!(
            alternating_kinds(3, 7),
            [Sliding, Sliding, Full, Sliding, Sliding, Full, Sliding]
        );
        assert_eq!(alternating_kinds(1, 2), [Full, Full]);
    }

    #[test]
    fn window_keys_must_agree() {
        let ok = obj(json!({"sliding_window": 128, "sliding_window_size": 128}));
        assert_eq!(window(&ok).unwrap(), Some(128));
        let bad = obj(json!({"sliding_window": 128, "window_size": 256}));
        let err = window(&bad).unwrap_err();
        assert!(err.to_string().contains("contradict"), "{err}");
        assert_eq!(config_field(err), "sliding_window");
        assert_eq!(window(&obj(json!({"sliding_window": null}))).unwrap(), None);
    }

    #[test]
    fn grouping_splits_one_kind_with_two_geometries() {
        let g4 = Geometry {
            kv_heads: 4,
            k_dim: 64,
            v_dim: 64,
        };
        let g8 = Geometry { kv_heads: 8, ..g4 };
        let s = (AttentionKind::Sliding, Some(64), g8);
        let layers = vec![
            (0, s),
            (1, (AttentionKind::Full, None, g8)),
            (2, (AttentionKind::Full, None, g4)),
            (3, (AttentionKind::Full, None, g8)),
            (4, s),
        ];
        let groups = group_layers(layers.into_iter(), DType::Bf16);
        let summary: Vec<(AttentionKind, u32, Vec<u32>)> = groups
            .iter()
            .map(|g| (g.kind, g.kv_heads, g.layers.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (AttentionKind::Full, 8, vec![1, 3]),
                (AttentionKind::Full, 4, vec![2]),
                (AttentionKind::Sliding, 8, vec![0, 4]),
            ]
        );
    }

    #[test]
    fn sliding_live_blocks_cover_the_window() {
        let g = KVGroup {
            kind: AttentionKind::Sliding,
            window: Some(128),
            layers: vec![0],
            kv_heads: 1,
            k_dim: 1,
            v_dim: 1,
            dtype: DType::Bf16,
        };
        assert_eq!(g.live_blocks(0, 16), 0);
        assert_eq!(g.live_blocks(100, 16), 7);
        assert_eq!(g.live_blocks(128, 16), 8);
        assert_eq!(g.live_blocks(1024, 16), 8);
        assert_eq!(g.live_blocks(1030, 16), 9);
        // Never more than ceil(W / B) + 1.
        assert!((0..2000).all(|ctx| g.live_blocks(ctx, 16) <= 9));
        assert!((0..2000).all(|ctx| g.live_blocks(ctx, 48) <= 4));
    }

    #[test]
    fn model_identity_comes_from_name_and_revision() {
        let geometry = serde_json::json!({
            "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 4,
        });
        let with = |extra: Value| {
            let mut cfg = geometry.clone();
            for (k, v) in extra.as_object().unwrap() {
                cfg[k] = v.clone();
            }
            ModelSpec::from_hf_config(&cfg, None)
        };
        assert_eq!(with(serde_json::json!({})).unwrap().model_id, None);
        let id = |extra| with(extra).unwrap().model_id.unwrap();
        assert_eq!(id(serde_json::json!({"_name_or_path": "org/m"})), "org/m");
        assert_eq!(
            id(serde_json::json!({"_name_or_path": "org/m", "_commit_hash": "abc"})),
            "org/m@abc"
        );
        assert_eq!(id(serde_json::json!({"revision": "v2"})), "@v2");
        let err = with(serde_json::json!({"_name_or_path": 3})).unwrap_err();
        assert!(err.to_string().contains("_name_or_path"), "{err}");
        // Identity is not geometry.
        let a = with(serde_json::json!({"_name_or_path": "a"})).unwrap();
        let b = with(serde_json::json!({"_name_or_path": "b"})).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_ignores_name_but_not_geometry() {
        let a = ModelSpec::preset("gpt-oss-120b").unwrap();
        let mut b = a.clone();
        b.name = "something else".into();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.groups[1].window = Some(256);
        assert_ne!(a.fingerprint(), c.fingerprint());
        let mut d = a.clone();
        d.dtype = DType::Fp8;
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    #[test]
    fn presets_all_load_with_their_names() {
        for &name in ModelSpec::presets() {
            let spec = ModelSpec::preset(name).unwrap();
            assert_eq!(spec.name, name);
        }
        let err = ModelSpec::preset("llama-7b").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref what, .. } if what == "name"));
        assert!(err.to_string().contains("gemma-3-27b"), "{err}");
    }
}
