//! The one place where core errors become Python exceptions.
//!
//! The classes are created once at import, each deriving from `KvAllocError` and from the
//! nearest builtin (`ConfigError` is a `ValueError`, `OutOfMemoryError` a `MemoryError`), which
//! `create_exception!` cannot express (it takes one base).

use std::sync::{Mutex, MutexGuard};

use kvalloc::Error;
use pyo3::exceptions::{PyException, PyLookupError, PyMemoryError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pub struct Classes {
    pub base: Py<PyType>,
    pub config: Py<PyType>,
    pub out_of_memory: Py<PyType>,
    pub stale_handle: Py<PyType>,
    pub invalid_argument: Py<PyType>,
    pub invariant: Py<PyType>,
    pub request: Py<PyType>,
}

static CLASSES: PyOnceLock<Classes> = PyOnceLock::new();

fn make(
    py: Python<'_>,
    name: &str,
    doc: &str,
    bases: &[Bound<'_, PyType>],
) -> PyResult<Py<PyType>> {
    let ns = PyDict::new(py);
    ns.set_item("__doc__", doc)?;
    ns.set_item("__module__", "kvalloc")?;
    let bases = PyTuple::new(py, bases)?;
    let ty = py
        .get_type::<PyType>()
        .call1((name, bases, ns))?
        .cast_into::<PyType>()?;
    Ok(ty.unbind())
}

fn build(py: Python<'_>) -> PyResult<Classes> {
    let base = make(
        py,
        "KvAllocError",
        "Base class of every error kvalloc raises.",
        &[py.get_type::<PyException>()],
    )?;
    let b = || base.bind(py).clone();
    Ok(Classes {
        config: make(
            py,
            "ConfigError",
            "A model config is missing a field, contradicts itself or uses an unsupported layer kind.",
            &[b(), py.get_type::<PyValueError>()],
        )?,
        out_of_memory: make(
            py,
            "OutOfMemoryError",
            "An allocation could not be satisfied; nothing was allocated.",
            &[b(), py.get_type::<PyMemoryError>()],
        )?,
        stale_handle: make(
            py,
            "StaleHandleError",
            "A handle that is not live (double free, reused slot, or from another arena); nothing changed.",
            &[b(), py.get_type::<PyValueError>()],
        )?,
        invalid_argument: make(
            py,
            "InvalidArgumentError",
            "An argument has the wrong type, dtype, shape or range; nothing changed.",
            &[b(), py.get_type::<PyValueError>()],
        )?,
        request: make(
            py,
            "RequestError",
            "A request id that is not running (finish, extend, ...) or already running (admit).",
            &[b(), py.get_type::<PyLookupError>()],
        )?,
        invariant: make(
            py,
            "InvariantError",
            "validate() found a broken internal invariant: a bug in kvalloc, please report it.",
            &[b(), py.get_type::<PyRuntimeError>()],
        )?,
        base,
    })
}

pub fn classes(py: Python<'_>) -> PyResult<&Classes> {
    CLASSES.get_or_try_init(py, || build(py))
}

/// Registers the exception classes on the extension module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let c = classes(py)?;
    m.add("KvAllocError", c.base.bind(py))?;
    m.add("ConfigError", c.config.bind(py))?;
    m.add("OutOfMemoryError", c.out_of_memory.bind(py))?;
    m.add("StaleHandleError", c.stale_handle.bind(py))?;
    m.add("InvalidArgumentError", c.invalid_argument.bind(py))?;
    m.add("InvariantError", c.invariant.bind(py))?;
    m.add("RequestError", c.request.bind(py))?;
    Ok(())
}

fn raise(py: Python<'_>, ty: &Py<PyType>, msg: String) -> PyErr {
    match ty.bind(py).call1((msg,)) {
        Ok(value) => PyErr::from_value(value),
        Err(e) => e,
    }
}

/// Maps a core error to its Python exception. Exhaustive on purpose: a new core variant does
/// not compile until it has a Python class.
pub fn to_py(e: Error) -> PyErr {
    Python::attach(|py| {
        let c = match classes(py) {
            Ok(c) => c,
            Err(err) => return err,
        };
        let ty = match &e {
            Error::Config { .. } => &c.config,
            Error::OutOfMemory { .. } | Error::SystemMemory { .. } => &c.out_of_memory,
            Error::StaleHandle { .. } => &c.stale_handle,
            Error::InvalidArgument { .. } => &c.invalid_argument,
            Error::Invariant(_) => &c.invariant,
            Error::Request { .. } => &c.request,
        };
        raise(py, ty, e.to_string())
    })
}

/// An `InvalidArgumentError` raised from the binding layer itself (argument conversion).
pub fn invalid(what: &str, message: impl std::fmt::Display) -> PyErr {
    to_py(Error::InvalidArgument {
        what: what.to_string(),
        message: message.to_string(),
    })
}

/// Extension trait: `core_result.py()?` converts a core error at the boundary.
pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for kvalloc::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// Locks `m`, the `what` object's lock; a lock poisoned by an earlier panic is an
/// `InvariantError`, never a second panic.
pub(crate) fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> PyResult<MutexGuard<'a, T>> {
    m.lock().map_err(|_| {
        to_py(Error::Invariant(format!(
            "the {what} lock is poisoned by an earlier panic"
        )))
    })
}
