//! Which layers of a Hugging Face config slide, which are full attention, and which kinds
//! kvalloc refuses (layers without a KV cache it can manage), from the conventions real configs
//! use to say so.

use super::*;

/// What one layer needs from the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LayerKind {
    Full,
    Sliding,
    /// A layer without attention (an MLP or MoE block in a pattern string): no KV at all.
    NoCache,
}

/// Decides every layer's kind. The first convention present in the config wins, in the
/// order documented on [`ModelSpec::from_hf_config`]; then a config that describes layers
/// without a KV cache in any other way is refused ([`reject_unmodelled_layers`]), so that
/// such a model is never read as attention only.
pub(super) fn layer_kinds(root: &Obj, text: &Obj, n: u32) -> Result<Vec<LayerKind>> {
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
pub(super) fn alternating_kinds(period: u32, n: u32) -> Vec<LayerKind> {
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
