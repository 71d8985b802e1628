//! Tier-related bindings: the device buffer an engine registers, and load handles.

use std::time::Duration;

use kvalloc::tiers::{DeviceBuffer, HostBuffer, LoadHandle};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::convert::type_name;
use crate::errors::invalid;

/// Wraps a writable, C-contiguous numpy uint8 array as a device buffer. The array object is
/// kept alive by the buffer; kvalloc copies blocks in and out of it (see the block layout in
/// the README) without holding the GIL.
pub fn device_from_numpy(buffer: &Bound<'_, PyAny>) -> PyResult<HostBuffer> {
    let arr = buffer.cast::<PyUntypedArray>().map_err(|_| {
        invalid(
            "buffer",
            format!("expected a numpy uint8 array, got {}", type_name(buffer)),
        )
    })?;
    let dtype = arr.dtype();
    if dtype.itemsize() != 1 || dtype.kind() != b'u' {
        return Err(invalid("buffer", format!("expected dtype uint8, got {dtype}")));
    }
    if !arr.is_c_contiguous() {
        return Err(invalid("buffer", "the array must be C-contiguous"));
    }
    // SAFETY: reading the flags field of a live array object.
    let writeable = unsafe { (*arr.as_array_ptr()).flags & numpy::npyffi::NPY_ARRAY_WRITEABLE != 0 };
    if !writeable {
        return Err(invalid("buffer", "the array must be writeable"));
    }
    let len: usize = arr.shape().iter().product();
    // SAFETY: a C-contiguous uint8 array's data pointer is valid for `len` bytes for as long as
    // the array object lives; the buffer holds a strong reference to it, and numpy refuses to
    // resize an array that other references point to.
    let ptr = unsafe { (*arr.as_array_ptr()).data.cast::<u8>() };
    let owner: Py<PyAny> = buffer.clone().unbind();
    // SAFETY: as above.
    Ok(unsafe { HostBuffer::from_raw(ptr, len, Box::new(owner)) })
}

/// Bytes of a device buffer (for error messages).
pub fn device_len(d: &dyn DeviceBuffer) -> u64 {
    d.len()
}

/// What an engine waits on before computing a request's layers: the loads that bring its hit
/// into the device buffer (done at once for L1 hits).
#[pyclass(frozen, name = "LoadHandle", module = "kvalloc._core")]
pub struct PyLoadHandle {
    pub(crate) inner: LoadHandle,
}

fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(t) => Err(invalid("timeout", format!("must be a non-negative number of seconds, got {t}"))),
    }
}

#[pymethods]
impl PyLoadHandle {
    /// Blocks (without the GIL) until layer `layer`'s KV is in the device buffer; False on
    /// timeout.
    #[pyo3(signature = (layer, timeout = None))]
    fn wait_layer(&self, py: Python<'_>, layer: usize, timeout: Option<f64>) -> PyResult<bool> {
        let t = timeout_arg(timeout)?;
        Ok(py.detach(|| self.inner.wait_layer(layer, t)))
    }

    /// Blocks (without the GIL) until every layer is in the device buffer; False on timeout.
    #[pyo3(signature = (timeout = None))]
    fn wait_all(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
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
        format!("LoadHandle(bytes={}, done={})", self.inner.bytes(), self.inner.is_done())
    }
}
