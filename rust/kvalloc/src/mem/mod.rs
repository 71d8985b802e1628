//! Memory hints: cache-line prefetches for the hot path, huge-page advice for large tables,
//! and committing bookkeeping memory up front (prefaulting) within a budget. Leaves: they
//! import nothing of the crate but its error type.

pub(crate) mod hugepage;
pub(crate) mod prefault;
pub(crate) mod prefetch;
