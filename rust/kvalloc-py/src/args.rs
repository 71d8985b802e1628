//! Arguments the manager's methods share with `step`: prompts (token ids or `BlockHashes`),
//! admissions extracted while attached, salts, secrets and request ids.

use kvalloc::tiers::Secret;
use kvalloc::Prompt;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::convert::{non_negative, positive, text, token_ids, type_name, u64_array};
use crate::errors::invalid;

/// A prompt given as precomputed block hashes (one per block of `block_tokens`, as traces
/// carry them) instead of token ids.
#[pyclass(frozen, name = "BlockHashes", module = "kvalloc._core")]
pub struct PyBlockHashes {
    hashes: Vec<u64>,
    num_tokens: u64,
}

#[pymethods]
impl PyBlockHashes {
    /// `hashes`: uint64 array, one id per block (the partial last block's id may be included);
    /// `num_tokens`: the prompt length in tokens.
    #[new]
    fn new(hashes: &Bound<'_, PyAny>, num_tokens: &Bound<'_, PyAny>) -> PyResult<Self> {
        let arr = u64_array(hashes, "hashes")?;
        Ok(PyBlockHashes {
            hashes: arr.as_slice()?.to_vec(),
            num_tokens: positive(num_tokens, "num_tokens")?,
        })
    }
    #[getter]
    fn num_tokens(&self) -> u64 {
        self.num_tokens
    }
    fn __len__(&self) -> usize {
        self.hashes.len()
    }
    fn __repr__(&self) -> String {
        format!(
            "BlockHashes({} blocks, num_tokens={})",
            self.hashes.len(),
            self.num_tokens
        )
    }
}

/// An admission extracted while attached: (request, prompt, salt, max_tokens).
pub(crate) type OwnedAdmission = (u64, OwnedPrompt, Option<Vec<u8>>, Option<u64>);

/// A prompt extracted while attached: owned, so the core can run detached.
pub(crate) enum OwnedPrompt {
    Tokens(Vec<i64>),
    Hashes(Vec<u64>, u64),
}

impl OwnedPrompt {
    pub(crate) fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(bh) = obj.cast::<PyBlockHashes>() {
            let bh = bh.get();
            return Ok(OwnedPrompt::Hashes(bh.hashes.clone(), bh.num_tokens));
        }
        Ok(OwnedPrompt::Tokens(token_ids(obj, "tokens")?))
    }

    pub(crate) fn as_prompt(&self) -> Prompt<'_> {
        match self {
            OwnedPrompt::Tokens(t) => Prompt::Tokens(t),
            OwnedPrompt::Hashes(h, n) => Prompt::BlockHashes {
                hashes: h,
                num_tokens: *n,
            },
        }
    }
}

pub(crate) fn salt_arg(salt: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    let Some(s) = salt.filter(|s| !s.is_none()) else {
        return Ok(None);
    };
    if s.cast::<PyString>().is_ok() {
        return Ok(Some(text(s, "salt")?.into_bytes()));
    }
    if let Ok(b) = s.cast::<PyBytes>() {
        return Ok(Some(b.as_bytes().to_vec()));
    }
    Err(invalid(
        "salt",
        format!("expected str or bytes, got {}", type_name(s)),
    ))
}

/// The deployment secret: `secret` (str or bytes), else the `KVALLOC_SECRET` environment
/// variable, else none. An empty one is refused: it would authenticate nothing.
pub(crate) fn secret_arg(secret: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Secret>> {
    let bytes = match salt_arg(secret).map_err(|_| {
        invalid(
            "secret",
            format!(
                "expected str or bytes, got {}",
                secret.map_or("None".into(), type_name)
            ),
        )
    })? {
        Some(b) => b,
        None => match std::env::var_os("KVALLOC_SECRET") {
            Some(v) => std::os::unix::ffi::OsStringExt::into_vec(v),
            None => return Ok(None),
        },
    };
    Secret::new(bytes)
        .map(Some)
        .ok_or_else(|| invalid("secret", "is empty; give at least 16 random bytes, or None"))
}

pub(crate) fn req_arg(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    non_negative(obj, "req_id")
}
