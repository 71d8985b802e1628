//! Tier-related bindings: the device buffer an engine registers, and load handles.

use std::time::Duration;

use kvalloc::tiers::{HostBuffer, LoadHandle};
use numpy::{PyReadwriteArrayDyn, PyUntypedArray};
use pyo3::prelude::*;

use crate::convert::{non_negative, number, type_name};
use crate::errors::{invalid, IntoPyResult};

/// Wraps a writable, C-contiguous numpy uint8 array as a device buffer. The array object is
/// kept alive by the buffer; kvalloc copies blocks in and out of it (see the block layout in
/// the README) without holding the GIL.
pub fn device_from_numpy(buffer: &Bound<'_, PyAny>) -> PyResult<HostBuffer> {
    if buffer.cast::<PyUntypedArray>().is_err() {
        return Err(invalid(
            "buffer",
            format!("expected a numpy uint8 array, got {}", type_name(buffer)),
        ));
    }
    let mut arr = buffer
        .extract::<PyReadwriteArrayDyn<'_, u8>>()
        .map_err(|e| {
            invalid(
                "buffer",
                format!("expected a writeable numpy uint8 array not borrowed elsewhere ({e})"),
            )
        })?;
    let slice = arr
        .as_slice_mut()
        .map_err(|_| invalid("buffer", "the array must be C-contiguous"))?;
    let (ptr, len) = (slice.as_mut_ptr(), slice.len());
    drop(arr); // the pointer stays valid: the buffer keeps the array object alive
    let owner: Py<PyAny> = buffer.clone().unbind();
    // SAFETY: a contiguous array's data pointer is valid for `len` bytes for as long as the
    // array object lives; the buffer holds a strong reference to it, and numpy refuses to
    // resize an array that other references point to.
    Ok(unsafe { HostBuffer::from_raw(ptr, len, Box::new(owner)) })
}

/// What an engine waits on before computing a request's layers: the loads that bring its hit
/// into the device buffer (done at once for L1 hits).
#[pyclass(frozen, name = "LoadHandle", module = "kvalloc._core")]
pub struct PyLoadHandle {
    pub(crate) inner: LoadHandle,
}

/// A timeout in seconds: None or `math.inf` wait as long as it takes, and so does one too long
/// for the clock (centuries); NaN, a negative number or a non-number is an
/// `InvalidArgumentError`.
pub(crate) fn timeout_arg(timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Duration>> {
    let Some(t) = timeout.filter(|t| !t.is_none()) else {
        return Ok(None);
    };
    let secs = number(t, "timeout")?;
    if secs.is_nan() || secs < 0.0 {
        return Err(invalid(
            "timeout",
            format!("must be a non-negative number of seconds, got {secs}"),
        ));
    }
    Ok(Duration::try_from_secs_f64(secs).ok())
}

#[pymethods]
impl PyLoadHandle {
    /// Blocks (without the GIL) until layer `layer`'s KV is in the device buffer; False on
    /// timeout.
    #[pyo3(signature = (layer, timeout = None))]
    fn wait_layer(
        &self,
        py: Python<'_>,
        layer: &Bound<'_, PyAny>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let layer = usize::try_from(non_negative(layer, "layer")?).unwrap_or(usize::MAX);
        let t = timeout_arg(timeout)?;
        py.detach(|| self.inner.wait_layer(layer, t)).py()
    }

    /// Blocks (without the GIL) until every layer is in the device buffer; False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn wait_all(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<bool> {
        let t = timeout_arg(timeout)?;
        Ok(py.detach(|| self.inner.wait_all(t)))
    }

    /// Whether every copy landed.
    #[getter]
    fn done(&self) -> bool {
        self.inner.is_done()
    }

    /// Bytes the loads copy.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes()
    }

    fn __repr__(&self) -> String {
        format!(
            "LoadHandle(bytes={}, done={})",
            self.inner.bytes(),
            self.inner.is_done()
        )
    }
}
