//! Block tables: the page indices an engine's kernels read, per request and group.

use super::request::Request;
use super::{KVCacheManager, NULL_PAGE};
use crate::error::{Error, Result};
use crate::slab::Handle;

impl KVCacheManager {
    /// Page indices of a running request's blocks in group `group`, one per block of its
    /// scheduled tokens; [`NULL_PAGE`] where it holds no block.
    pub fn block_table(&self, req: u64, group: usize) -> Result<Vec<i32>> {
        let mut out = vec![0; self.table(req, group)?.len()];
        self.block_table_into(req, group, &mut out)?;
        Ok(out)
    }

    /// Blocks in a running request's tables: `ceil(num_tokens / block_tokens)`.
    pub fn block_table_len(&self, req: u64) -> Result<usize> {
        Ok(self.running(req)?.tables.first().map_or(0, Vec::len))
    }

    /// Writes [`block_table`](Self::block_table) into the start of `out` (an engine's row of
    /// its block-table array) and returns how many entries it wrote; `out` past them is left
    /// as it was. An error if `out` is shorter than the table.
    pub fn block_table_into(&self, req: u64, group: usize, out: &mut [i32]) -> Result<usize> {
        self.block_table_range_into(req, group, 0, out)
    }

    /// Writes the entries of [`block_table`](Self::block_table) from block `start` on into the
    /// start of `out` and returns how many it wrote: an engine that keeps its own copy of the
    /// table reads only the blocks it does not have yet (a decode step adds at most one). An
    /// error if `start` is past the table or `out` is shorter than the rest.
    ///
    /// Entries below `start` that the engine read earlier may since have been released out of
    /// the window (they are [`NULL_PAGE`] in a full read): an engine keeping its copy must not
    /// read KV there, as attention within the window never does.
    pub fn block_table_range_into(
        &self,
        req: u64,
        group: usize,
        start: usize,
        out: &mut [i32],
    ) -> Result<usize> {
        let table = self.table(req, group)?;
        let Some(t) = table.get(start..) else {
            return Err(Error::invalid(
                "start",
                format!(
                    "request {req} holds {} blocks; block {start} is past them",
                    table.len()
                ),
            ));
        };
        if out.len() < t.len() {
            return Err(Error::invalid(
                "out",
                format!(
                    "request {req} has {} blocks from block {start} but the row has room for {}",
                    t.len(),
                    out.len()
                ),
            ));
        }
        // Only an arena of more than 2^31 blocks of one class overflows (simulations).
        if self.arena.num_pages(group)? > 1 << 31 {
            return Err(Error::invalid("group", "page indices exceed i32"));
        }
        let pages = self.arena.pages_of(group)?;
        for (o, &h) in out.iter_mut().zip(t) {
            debug_assert!(h == 0 || self.arena.class_of(h).ok() == Some(group));
            *o = if h == 0 {
                NULL_PAGE
            } else {
                pages.page(h) as i32
            };
        }
        Ok(t.len())
    }

    pub(super) fn table(&self, req: u64, group: usize) -> Result<&[Handle]> {
        let r = self.running(req)?;
        r.tables.get(group).map(Vec::as_slice).ok_or_else(|| {
            Error::invalid(
                "group",
                format!(
                    "{group} is out of range: the model has {} groups",
                    r.tables.len()
                ),
            )
        })
    }

    /// Tokens scheduled for a running request (the length its block tables cover).
    pub fn num_tokens(&self, req: u64) -> Result<u64> {
        Ok(self.running(req)?.len)
    }

    /// A running request, or the error naming it.
    pub(super) fn running(&self, req: u64) -> Result<&Request> {
        self.requests.get(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })
    }

    /// Whether a request is running.
    pub fn is_running(&self, req: u64) -> bool {
        self.requests.contains(req)
    }
}
