//! `StepResult`: what one `KVCacheManager.step` call did.
//!
//! A scheduler mostly asks two cheap questions after a step: did every extension fit, and how
//! many queued requests got in. The counts answer them as plain ints; the per-request arrays
//! are made only when read (a numpy array costs more to make than a decode step's core work,
//! and `.all()` on a small array more still). It unpacks like the `(hits, extended)` tuple
//! `step` returned before.

use kvalloc::{CacheEvent, StepOutcome};
use numpy::{Element, PyArray1};
use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyInt, PyTuple};

use crate::convert::type_name;
use crate::errors::invalid;
use crate::events::EventColumns;

/// What one `step` call did: per admission the prompt tokens served from cache (-1: refused;
/// -2: not attempted, after an `fcfs` refusal or a refused extension with `admit_if_extended`;
/// -3: waiting for its KV),
/// per extension whether it fit, and their counts.
#[pyclass(frozen, name = "StepResult", module = "kvalloc._core")]
pub struct PyStepResult {
    /// What the core reported (a copy of the manager's kept outcome: its refused extensions,
    /// usually none, and one entry per admission attempted).
    outcome: StepOutcome,
    /// Admissions the step was given (those `outcome` lacks were not attempted).
    admissions: usize,
    // Made on first read, then the same array on every read.
    hits_array: PyOnceLock<Py<PyArray1<i64>>>,
    extended_array: PyOnceLock<Py<PyArray1<bool>>>,
    /// The events the step drained (None: the manager records none); made into columns on
    /// first read.
    events: Option<Vec<CacheEvent>>,
    events_dict: PyOnceLock<Py<PyDict>>,
}

impl PyStepResult {
    /// The result of a step of `admissions` admissions, with the events it drained.
    pub fn new(outcome: &StepOutcome, admissions: usize, events: Option<Vec<CacheEvent>>) -> Self {
        PyStepResult {
            outcome: outcome.clone(),
            admissions,
            hits_array: PyOnceLock::new(),
            extended_array: PyOnceLock::new(),
            events,
            events_dict: PyOnceLock::new(),
        }
    }
}

/// The array `make` returns, made on the first call.
fn cached_array<'py, T: Element>(
    py: Python<'py>,
    cell: &PyOnceLock<Py<PyArray1<T>>>,
    make: impl FnOnce() -> Bound<'py, PyArray1<T>>,
) -> Bound<'py, PyArray1<T>> {
    cell.get_or_init(py, || make().unbind()).bind(py).clone()
}

#[pymethods]
impl PyStepResult {
    /// int64 array, one entry per admission: prompt tokens served from cache, -1 when it did
    /// not fit, -2 when it was not attempted, -3 when it waits for its KV to load from disk or
    /// the remote store (admit it again once `ready` names it).
    #[getter]
    fn hits<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        cached_array(py, &self.hits_array, || {
            let admitted = &self.outcome.admitted;
            let mut hits: Vec<i64> = admitted
                .iter()
                .map(|h| h.map_or(-1, |h| h as i64))
                .chain(std::iter::repeat_n(-2, self.admissions - admitted.len()))
                .collect();
            for &k in &self.outcome.waiting {
                hits[k] = -3;
            }
            PyArray1::from_vec(py, hits)
        })
    }

    /// Positions (among the step's admissions) of those waiting for their KV.
    #[getter]
    fn waiting(&self) -> Vec<usize> {
        self.outcome.waiting.clone()
    }

    /// Requests whose KV finished loading since the last step (or whose load failed: their
    /// hit shrinks to what verified): admit them again.
    #[getter]
    fn ready(&self) -> Vec<u64> {
        self.outcome.ready.clone()
    }

    /// bool array, one entry per extension: whether it fit.
    #[getter]
    fn extended<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<bool>> {
        cached_array(py, &self.extended_array, || {
            PyArray1::from_vec(py, self.outcome.extended())
        })
    }

    /// The KV cache events recorded up to the end of this step and not drained before (the
    /// step drains the log: a later `take_events` starts after it), as `take_events` returns
    /// them; None when the manager was made without `events=True`.
    #[getter]
    fn events<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(events) = &self.events else {
            return Ok(None);
        };
        if let Some(d) = self.events_dict.get(py) {
            return Ok(Some(d.bind(py).clone()));
        }
        let d = EventColumns::new(events).into_dict(py)?.unbind();
        Ok(Some(
            self.events_dict.get_or_init(py, || d).bind(py).clone(),
        ))
    }

    /// Admissions that got in (with `fcfs`, they are the first `admitted` of the step's).
    #[getter]
    fn admitted(&self) -> usize {
        self.outcome.admitted.iter().filter(|h| h.is_some()).count()
    }

    /// Extensions that did not fit (0: every one did).
    #[getter]
    fn refused_extensions(&self) -> usize {
        self.outcome.refused.len()
    }

    /// Two: it unpacks as `hits, extended = m.step(...)`.
    fn __len__(&self) -> usize {
        2
    }

    /// `0` (or `-2`): hits; `1` (or `-1`): extended. Any other integer, however large, is an
    /// `IndexError` as for a tuple (the sequence protocol's own error); a non-integer is an
    /// `InvalidArgumentError`.
    fn __getitem__(&self, py: Python<'_>, index: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if !index.is_instance_of::<PyInt>() && index.call_method0("__index__").is_err() {
            return Err(invalid(
                "index",
                format!("expected an integer, got {}", type_name(index)),
            ));
        }
        match index.extract::<i64>() {
            Ok(0 | -2) => Ok(self.hits(py).into_any().unbind()),
            Ok(1 | -1) => Ok(self.extended(py).into_any().unbind()),
            _ => Err(PyIndexError::new_err(format!(
                "StepResult index {index} out of range: it holds (hits, extended)"
            ))),
        }
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pair = PyTuple::new(py, [self.hits(py).into_any(), self.extended(py).into_any()])?;
        Ok(pair.as_any().try_iter()?.into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "StepResult(admitted={} of {}, refused_extensions={} of {})",
            self.admitted(),
            self.admissions,
            self.outcome.refused.len(),
            self.outcome.extensions
        )
    }
}
