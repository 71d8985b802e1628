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

use crate::error::{Error, Result};

mod explicit;
mod hf;
mod presets;

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

/// Most KV groups a model may have (real hybrid models have 2 to 4).
pub const MAX_GROUPS: usize = 16;

impl ModelSpec {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
