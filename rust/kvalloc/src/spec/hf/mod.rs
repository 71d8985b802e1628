//! Reading a model's KV geometry from a Hugging Face `config.json`: which layers slide, their
//! heads and dims, and the layer kinds kvalloc refuses (no KV cache it can manage).

use std::path::Path;

use serde_json::{Map, Value};

use super::{AttentionKind, DType, KVGroup, ModelSpec};
use crate::error::{Error, Result};

mod kinds;

#[cfg(test)]
use kinds::alternating_kinds;
use kinds::{layer_kinds, LayerKind};

type Obj = Map<String, Value>;

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
pub(super) fn check_token_bytes(groups: &[KVGroup]) -> Result<()> {
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
}
