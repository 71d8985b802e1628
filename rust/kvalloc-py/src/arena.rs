//! `SlabArena`: the slab allocator, with numpy handle arrays in and out.

use std::sync::{Mutex, MutexGuard};

use kvalloc::SlabArena;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert::{figures, non_negative, positive, u64_array};
use crate::errors::{invalid, to_py, IntoPyResult};

/// One byte budget carved into slabs; each slab serves blocks of one size class at a time.
#[pyclass(frozen, name = "SlabArena", module = "kvalloc._core")]
pub struct PySlabArena {
    inner: Mutex<SlabArena>,
}

impl PySlabArena {
    fn lock(&self) -> PyResult<MutexGuard<'_, SlabArena>> {
        self.inner.lock().map_err(|_| {
            to_py(kvalloc::Error::Invariant(
                "the arena lock is poisoned by an earlier panic".into(),
            ))
        })
    }
}

/// Batches up to this many blocks run without releasing the GIL (releasing and re-taking it
/// costs about as much as allocating a few dozen blocks).
const DETACH_ABOVE: usize = 64;

fn class_arg(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    Ok(non_negative(obj, "class_index")? as usize)
}

#[pymethods]
impl PySlabArena {
    /// `block_bytes`: one block size per class (an int or a sequence of ints).
    /// `slab_bytes`: must be a multiple of every block size; chosen when None.
    #[new]
    #[pyo3(signature = (capacity_bytes, block_bytes, slab_bytes = None))]
    fn new(
        capacity_bytes: &Bound<'_, PyAny>,
        block_bytes: &Bound<'_, PyAny>,
        slab_bytes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let capacity = positive(capacity_bytes, "capacity_bytes")?;
        let sizes: Vec<u64> = if block_bytes.extract::<i128>().is_ok() {
            vec![positive(block_bytes, "block_bytes")?]
        } else {
            let items = block_bytes
                .try_iter()
                .map_err(|_| invalid("block_bytes", "expected an int or a sequence of ints"))?;
            let mut v = Vec::new();
            for item in items {
                v.push(positive(&item?, "block_bytes")?);
            }
            v
        };
        let slab = match slab_bytes {
            Some(s) if !s.is_none() => Some(positive(s, "slab_bytes")?),
            _ => None,
        };
        Ok(PySlabArena {
            inner: Mutex::new(SlabArena::new(capacity, &sizes, slab).py()?),
        })
    }

    /// Allocates `n` blocks of class `class_index`, all or nothing; returns uint64 handles.
    /// Raises `OutOfMemoryError` (nothing allocated) when they do not fit.
    fn alloc<'py>(
        &self,
        py: Python<'py>,
        class_index: &Bound<'py, PyAny>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let class = class_arg(class_index)?;
        let n = non_negative(n, "n")? as usize;
        let work = || self.lock().and_then(|mut a| a.alloc(class, n).py());
        // Releasing the GIL costs more than a small batch: only large ones run detached.
        let handles = if n > DETACH_ABOVE {
            py.detach(work)?
        } else {
            work()?
        };
        Ok(PyArray1::from_vec(py, handles))
    }

    /// Frees a uint64 array of handles, all or nothing: a stale, foreign or repeated handle
    /// raises `StaleHandleError` and frees nothing.
    fn free(&self, py: Python<'_>, handles: &Bound<'_, PyAny>) -> PyResult<()> {
        let arr = u64_array(handles, "handles")?;
        let hs = arr.as_slice()?;
        let work = || self.lock().and_then(|mut a| a.free(hs).py());
        if hs.len() > DETACH_ABOVE {
            py.detach(work)
        } else {
            work()
        }
    }

    /// Byte offset of each handle from the start of the arena (uint64).
    fn offsets<'py>(
        &self,
        py: Python<'py>,
        handles: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        self.map_handles(py, handles, |a, h| a.offset(h))
    }

    /// Page index of each handle in its class's view of the arena (`offset // block_bytes`).
    fn pages<'py>(
        &self,
        py: Python<'py>,
        handles: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        self.map_handles(py, handles, |a, h| a.page(h))
    }

    /// Blocks of a class an allocation could get right now.
    fn available(&self, class_index: &Bound<'_, PyAny>) -> PyResult<u64> {
        let class = class_arg(class_index)?;
        self.lock()?.available(class).py()
    }

    /// Pages in a class's view of the arena.
    fn num_pages(&self, class_index: &Bound<'_, PyAny>) -> PyResult<u64> {
        let class = class_arg(class_index)?;
        self.lock()?.num_pages(class).py()
    }

    #[getter]
    fn capacity_bytes(&self) -> PyResult<u64> {
        Ok(self.lock()?.capacity_bytes())
    }

    #[getter]
    fn slab_bytes(&self) -> PyResult<u64> {
        Ok(self.lock()?.slab_bytes())
    }

    #[getter]
    fn block_bytes(&self) -> PyResult<Vec<u64>> {
        let a = self.lock()?;
        (0..a.num_classes())
            .map(|c| a.block_bytes(c).py())
            .collect()
    }

    /// Accounting snapshot: arena totals and a list of per-class figures.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock()?.stats();
        let d = figures(
            py,
            &[
                ("capacity_bytes", s.capacity_bytes),
                ("slab_bytes", s.slab_bytes),
                ("num_slabs", u64::from(s.num_slabs)),
                ("slabs_free", u64::from(s.slabs_free)),
                ("bytes_in_use", s.bytes_in_use),
                ("bytes_free", s.bytes_free),
                ("padding_waste_bytes", s.padding_waste_bytes),
                ("tail_bytes", s.tail_bytes),
            ],
        )?;
        let classes = PyList::empty(py);
        for c in &s.classes {
            classes.append(figures(
                py,
                &[
                    ("block_bytes", c.block_bytes),
                    ("blocks_per_slab", u64::from(c.blocks_per_slab)),
                    ("blocks_in_use", c.blocks_in_use),
                    ("slabs_held", u64::from(c.slabs_held)),
                    ("blocks_free_in_slabs", c.blocks_free_in_slabs),
                ],
            )?)?;
        }
        d.set_item("classes", classes)?;
        Ok(d)
    }

    /// Checks every invariant; raises `InvariantError` naming the first violation.
    fn validate(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.lock().and_then(|a| a.validate().py()))
    }

    fn __repr__(&self) -> PyResult<String> {
        let s = self.lock()?.stats();
        Ok(format!(
            "SlabArena(capacity_bytes={}, slab_bytes={}, classes={}, slabs_free={}/{})",
            s.capacity_bytes,
            s.slab_bytes,
            s.classes.len(),
            s.slabs_free,
            s.num_slabs
        ))
    }
}

impl PySlabArena {
    fn map_handles<'py>(
        &self,
        py: Python<'py>,
        handles: &Bound<'py, PyAny>,
        f: impl Fn(&SlabArena, u64) -> kvalloc::Result<u64> + Send + Sync,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let arr = u64_array(handles, "handles")?;
        let hs = arr.as_slice()?;
        let out = py.detach(|| {
            let a = self.lock()?;
            hs.iter()
                .map(|&h| f(&a, h).py())
                .collect::<PyResult<Vec<u64>>>()
        })?;
        Ok(PyArray1::from_vec(py, out))
    }
}
