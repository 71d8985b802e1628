//! `ModelSpec` and `KVGroup`: a model's KV geometry.

use kvalloc::{AttentionKind, DType, KVGroup, ModelSpec};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

/// Tokens per block when the caller does not say.
pub(crate) const DEFAULT_BLOCK_TOKENS: u32 = 16;

use crate::convert::{non_negative, path, positive, text, type_name};
use crate::errors::{invalid, IntoPyResult};

/// One KV group: the layers of one attention kind and geometry.
#[pyclass(frozen, name = "KVGroup", module = "kvalloc._core", eq)]
#[derive(Clone, PartialEq)]
pub struct PyKVGroup {
    pub inner: KVGroup,
}

#[pymethods]
impl PyKVGroup {
    /// "full" or "sliding".
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.name()
    }
    #[getter]
    fn window(&self) -> Option<u32> {
        self.inner.window
    }
    #[getter]
    fn layers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.layers)
    }
    #[getter]
    fn kv_heads(&self) -> u32 {
        self.inner.kv_heads
    }
    #[getter]
    fn k_dim(&self) -> u32 {
        self.inner.k_dim
    }
    #[getter]
    fn v_dim(&self) -> u32 {
        self.inner.v_dim
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype.name()
    }
    /// Bytes of one token over all layers of the group.
    #[getter]
    fn bytes_per_token(&self) -> u64 {
        self.inner.bytes_per_token()
    }
    /// Bytes of one token in one layer of the group.
    #[getter]
    fn layer_bytes_per_token(&self) -> u64 {
        self.inner.layer_bytes_per_token()
    }
    /// Bytes of one block of `block_tokens` tokens (all layers of the group).
    #[pyo3(signature = (block_tokens = None))]
    fn block_bytes(&self, block_tokens: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
        let b = block_tokens_arg(block_tokens)?;
        Ok(self.inner.block_bytes(b))
    }
    fn __repr__(&self) -> String {
        let g = &self.inner;
        format!(
            "KVGroup(kind={:?}, window={}, layers={} layers, kv_heads={}, k_dim={}, v_dim={}, bytes_per_token={})",
            g.kind.name(),
            g.window.map_or("None".to_string(), |w| w.to_string()),
            g.layers.len(),
            g.kv_heads,
            g.k_dim,
            g.v_dim,
            g.bytes_per_token()
        )
    }
}

/// A model's KV-cache geometry: its groups of layers and their per-token bytes.
#[pyclass(frozen, name = "ModelSpec", module = "kvalloc._core", eq)]
#[derive(Clone, PartialEq)]
pub struct PyModelSpec {
    pub inner: ModelSpec,
}

/// `block_tokens`, defaulting to 16 when absent.
pub(crate) fn block_tokens_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(DEFAULT_BLOCK_TOKENS);
    };
    let b = positive(obj, "block_tokens")?;
    u32::try_from(b).map_err(|_| invalid("block_tokens", format!("{b} is too large")))
}

fn dtype_arg(dtype: Option<&Bound<'_, PyAny>>) -> PyResult<Option<DType>> {
    let Some(d) = dtype else { return Ok(None) };
    if d.is_none() {
        return Ok(None);
    }
    // Accept "bf16", numpy/torch dtype objects (via str()) alike.
    let s: String = if d.cast::<PyString>().is_ok() {
        text(d, "dtype")?
    } else {
        let shown = d.str().map_err(|_| {
            invalid(
                "dtype",
                format!("expected a dtype name, got {}", type_name(d)),
            )
        })?;
        text(shown.as_any(), "dtype")?
    };
    Ok(Some(DType::parse(&s).py()?))
}

fn u32_arg(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u32> {
    let v = non_negative(obj, what)?;
    u32::try_from(v).map_err(|_| invalid(what, format!("{v} does not fit in 32 bits")))
}

/// One group of `ModelSpec.from_groups`: a dict, each field named in its errors.
fn group_arg(g: &Bound<'_, PyAny>, i: usize) -> PyResult<KVGroup> {
    let field = |f: &str| format!("groups[{i}].{f}");
    let d = g
        .cast::<PyDict>()
        .map_err(|_| invalid(&field(""), format!("expected a dict, got {}", type_name(g))))?;
    let get = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(d.get_item(key)?.filter(|v| !v.is_none()))
    };
    let need = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        get(key)?.ok_or_else(|| invalid(&field(key), "is missing"))
    };
    for key in d.keys() {
        let k = text(&key, &field("<key>"))?;
        if !matches!(
            k.as_str(),
            "kind" | "window" | "layers" | "kv_heads" | "head_dim" | "k_dim" | "v_dim" | "dtype"
        ) {
            return Err(invalid(&field(&k), "is not a group field"));
        }
    }
    let kind = match text(&need("kind")?, &field("kind"))?.as_str() {
        "full" => AttentionKind::Full,
        "sliding" => AttentionKind::Sliding,
        other => {
            return Err(invalid(
                &field("kind"),
                format!("{other:?}: expected \"full\" or \"sliding\""),
            ))
        }
    };
    let window = match get("window")? {
        Some(w) => Some(u32_arg(&w, &field("window"))?),
        None => None,
    };
    let layers_obj = need("layers")?;
    let mut layers = Vec::new();
    for l in layers_obj.try_iter().map_err(|_| {
        invalid(
            &field("layers"),
            format!("expected a list of ints, got {}", type_name(&layers_obj)),
        )
    })? {
        layers.push(u32_arg(&l?, &field("layers"))?);
    }
    let head_dim = match get("head_dim")? {
        Some(h) => Some(u32_arg(&h, &field("head_dim"))?),
        None => None,
    };
    let dim = |key: &str| -> PyResult<u32> {
        match (get(key)?, head_dim) {
            (Some(v), _) => u32_arg(&v, &field(key)),
            (None, Some(h)) => Ok(h),
            (None, None) => Err(invalid(
                &field(key),
                "is missing (give head_dim, or k_dim and v_dim)",
            )),
        }
    };
    let dtype = dtype_arg(Some(&need("dtype")?))?.expect("dtype was given");
    Ok(KVGroup {
        kind,
        window,
        layers,
        kv_heads: u32_arg(&need("kv_heads")?, &field("kv_heads"))?,
        k_dim: dim("k_dim")?,
        v_dim: dim("v_dim")?,
        dtype,
    })
}

#[pymethods]
impl PyModelSpec {
    /// Reads a Hugging Face `config.json` (a path or an already-loaded dict).
    #[staticmethod]
    #[pyo3(signature = (path_or_dict, dtype = None, model_id = None))]
    fn from_hf_config(
        py: Python<'_>,
        path_or_dict: &Bound<'_, PyAny>,
        dtype: Option<&Bound<'_, PyAny>>,
        model_id: Option<String>,
    ) -> PyResult<Self> {
        let dtype = dtype_arg(dtype)?;
        if model_id.as_deref() == Some("") {
            return Err(invalid("model_id", "is empty; name the weights, or None"));
        }
        let mut inner = if path_or_dict.is_instance_of::<PyDict>() {
            let json: String = py
                .import("json")?
                .call_method1("dumps", (path_or_dict,))
                .map_err(|e| {
                    invalid(
                        "path_or_dict",
                        format!("the dict is not JSON-serialisable: {e}"),
                    )
                })?
                .extract()?;
            py.detach(|| ModelSpec::from_hf_config_str(&json, dtype))
                .py()?
        } else {
            let path = path(path_or_dict, "path_or_dict")?;
            py.detach(|| ModelSpec::from_hf_config_path(&path, dtype))
                .py()?
        };
        if model_id.is_some() {
            inner.model_id = model_id;
        }
        Ok(PyModelSpec { inner })
    }

    /// A spec with exactly these groups, for engines that group layers themselves: each a
    /// dict with `kind` ("full" or "sliding"), `window` (sliding only), `layers`, `kv_heads`,
    /// `head_dim` (or `k_dim` and `v_dim`) and `dtype`.
    #[staticmethod]
    #[pyo3(signature = (name, groups, num_layers = None, model_id = None))]
    fn from_groups(
        name: &Bound<'_, PyAny>,
        groups: &Bound<'_, PyAny>,
        num_layers: Option<&Bound<'_, PyAny>>,
        model_id: Option<String>,
    ) -> PyResult<Self> {
        let name = text(name, "name")?;
        let list = groups.try_iter().map_err(|_| {
            invalid(
                "groups",
                format!("expected a list of dicts, got {}", type_name(groups)),
            )
        })?;
        let mut parsed = Vec::new();
        for (i, g) in list.enumerate() {
            parsed.push(group_arg(&g?, i)?);
        }
        let num_layers = match num_layers.filter(|n| !n.is_none()) {
            Some(n) => Some(u32_arg(n, "num_layers")?),
            None => None,
        };
        if model_id.as_deref() == Some("") {
            return Err(invalid("model_id", "is empty; name the weights, or None"));
        }
        Ok(PyModelSpec {
            inner: ModelSpec::from_groups(&name, parsed, num_layers, model_id).py()?,
        })
    }

    /// A built-in model; see `kvalloc.presets()`.
    #[staticmethod]
    fn preset(name: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PyModelSpec {
            inner: ModelSpec::preset(&text(name, "name")?).py()?,
        })
    }

    /// Names accepted by `ModelSpec.preset`.
    #[staticmethod]
    #[pyo3(name = "presets")]
    fn presets_static() -> Vec<&'static str> {
        ModelSpec::presets().to_vec()
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }
    #[getter]
    fn num_layers(&self) -> u32 {
        self.inner.num_layers
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype.name()
    }
    /// The KV groups: full-attention groups first, then sliding ones.
    #[getter]
    fn groups(&self) -> Vec<PyKVGroup> {
        self.inner
            .groups
            .iter()
            .map(|g| PyKVGroup { inner: g.clone() })
            .collect()
    }
    /// The largest sliding window, or None when no layer slides.
    #[getter]
    fn max_window(&self) -> Option<u32> {
        self.inner.max_window()
    }
    /// Bytes of one token when every layer keeps it.
    #[getter]
    fn bytes_per_token_dense(&self) -> u64 {
        self.inner.bytes_per_token_dense()
    }
    /// Which weights the KV belongs to (the config's `_name_or_path@revision`, or the
    /// `model_id` given); part of the lower tiers' namespace. None: the config names neither.
    #[getter]
    fn model_id(&self) -> Option<&str> {
        self.inner.model_id.as_deref()
    }
    /// A 64-bit digest of the geometry (not the name, not the model id): equal for models
    /// whose KV layout is interchangeable.
    #[getter]
    fn fingerprint(&self) -> u64 {
        self.inner.fingerprint()
    }
    /// Bytes one sequence of `context_tokens` holds when sliding groups keep only their window.
    #[pyo3(signature = (context_tokens, block_tokens = None))]
    fn kv_bytes(
        &self,
        context_tokens: &Bound<'_, PyAny>,
        block_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let ctx = non_negative(context_tokens, "context_tokens")?;
        let b = block_tokens_arg(block_tokens)?;
        self.inner.kv_bytes(ctx, b).py()
    }
    /// Bytes one sequence of `context_tokens` holds when every layer keeps every token.
    fn kv_bytes_dense(&self, context_tokens: &Bound<'_, PyAny>) -> PyResult<u64> {
        let ctx = non_negative(context_tokens, "context_tokens")?;
        self.inner.kv_bytes_dense(ctx).py()
    }
    /// Block size in bytes of each group, in group order.
    #[pyo3(signature = (block_tokens = None))]
    fn block_bytes(&self, block_tokens: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<u64>> {
        Ok(self.inner.block_bytes(block_tokens_arg(block_tokens)?))
    }
    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "ModelSpec(name={:?}, num_layers={}, dtype={:?}, groups={})",
            s.name,
            s.num_layers,
            s.dtype.name(),
            s.groups.len()
        )
    }
}

/// Names of the built-in model presets.
#[pyfunction]
pub fn presets() -> Vec<&'static str> {
    ModelSpec::presets().to_vec()
}

/// A `spec` argument: a `kvalloc.ModelSpec`, or an `InvalidArgumentError` naming what it was.
pub fn spec_arg<'a, 'py>(spec: &'a Bound<'py, PyAny>) -> PyResult<&'a Bound<'py, PyModelSpec>> {
    spec.cast::<PyModelSpec>().map_err(|_| {
        invalid(
            "spec",
            format!("expected a kvalloc.ModelSpec, got {}", type_name(spec)),
        )
    })
}
