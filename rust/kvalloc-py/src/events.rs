//! KV cache events as one batch of numpy columns (no Python object per event).

use kvalloc::CacheEvent;
use numpy::PyArray1;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Event kinds in the `kind` column.
const STORED: u8 = 0;
const REMOVED: u8 = 1;
const CLEARED: u8 = 2;
const RESUMABLE: u8 = 3;
const NOT_RESUMABLE: u8 = 4;

/// A batch of events as equal-length columns; -1 where a field does not apply.
#[derive(Debug, Default)]
pub(crate) struct EventColumns {
    kind: Vec<u8>,
    group: Vec<i32>,
    hash: Vec<u64>,
    parent: Vec<u64>,
    has_parent: Vec<bool>,
    block: Vec<i64>,
    req: Vec<i64>,
}

impl EventColumns {
    pub(crate) fn new(events: &[CacheEvent]) -> Self {
        let mut c = EventColumns::default();
        let n = events.len();
        c.kind.reserve(n);
        c.group.reserve(n);
        c.hash.reserve(n);
        c.parent.reserve(n);
        c.has_parent.reserve(n);
        c.block.reserve(n);
        c.req.reserve(n);
        for e in events {
            c.push(e);
        }
        c
    }

    fn push(&mut self, e: &CacheEvent) {
        let (kind, group, hash, parent, block, req) = match *e {
            CacheEvent::Stored {
                group,
                hash,
                parent,
                block,
                req,
            } => (STORED, group as i32, hash, parent, i64::from(block), req),
            CacheEvent::Removed { group, hash } => (REMOVED, group as i32, hash, None, -1, None),
            CacheEvent::Cleared => (CLEARED, -1, 0, None, -1, None),
            CacheEvent::Resumable { hash, block } => {
                (RESUMABLE, -1, hash, None, i64::from(block), None)
            }
            CacheEvent::NotResumable { hash } => (NOT_RESUMABLE, -1, hash, None, -1, None),
        };
        self.kind.push(kind);
        self.group.push(group);
        self.hash.push(hash);
        self.parent.push(parent.unwrap_or(0));
        self.has_parent.push(parent.is_some());
        self.block.push(block);
        // An id's bits: ids from 2**63 read negative (`req.view(np.uint64)` gives them back);
        // only id 2**64 - 1 reads as "none".
        self.req.push(req.map_or(-1, |r| r as i64));
    }

    /// `{"kind", "group", "hash", "parent", "has_parent", "block", "req"}`: numpy arrays.
    pub(crate) fn into_dict(self, py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("kind", PyArray1::from_vec(py, self.kind))?;
        d.set_item("group", PyArray1::from_vec(py, self.group))?;
        d.set_item("hash", PyArray1::from_vec(py, self.hash))?;
        d.set_item("parent", PyArray1::from_vec(py, self.parent))?;
        d.set_item("has_parent", PyArray1::from_vec(py, self.has_parent))?;
        d.set_item("block", PyArray1::from_vec(py, self.block))?;
        d.set_item("req", PyArray1::from_vec(py, self.req))?;
        Ok(d)
    }
}
