//! KV cache events: which blocks entered and left the prefix cache, in order, for an engine's
//! event stream or a cache-aware router (what vLLM calls BlockStored, BlockRemoved and
//! AllBlocksCleared).
//!
//! The log is opt-in ([`ManagerConfig::events`](crate::ManagerConfig::events)): off, recording
//! costs one predictable branch where a block enters or leaves the tree and nothing on the
//! decode path, which never changes the tree.
//!
//! ## What replaying the events gives
//! Applying a manager's events in order to an empty set (insert on `Stored`, remove on
//! `Removed`, empty it on `Cleared`) gives exactly the `(group, hash)` blocks the prefix tree
//! holds in matchable nodes ([`KVCacheManager::cached_blocks`](crate::KVCacheManager::cached_blocks)):
//! a `Stored` never names a block already in the set and a `Removed` always names one that is.
//! A node an aborted request leaves behind, still pinned by others, is never matched again: its
//! blocks are reported removed when it stops being matchable, not when their memory goes.
//!
//! New kinds (per-tier stores and removals, window-safe resume points) are to come as new
//! variants: the crate is not 1.0, and a match without a wildcard arm then shows every consumer
//! that needs to learn them.

/// One change to what the prefix cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    /// Group `group`'s block of a cached block position entered the tree: a new node, or a
    /// node that lacked this group's block (a sliding-window checkpoint block, a promotion
    /// from a lower tier).
    Stored {
        /// KV group (index into the model's groups).
        group: usize,
        /// The node's chained block hash (what a prompt walking the tree looks up).
        hash: u64,
        /// The parent node's chained hash; None for a sequence's first block.
        parent: Option<u64>,
        /// Block index in the sequence: tokens `[block * B, (block + 1) * B)`.
        block: u32,
        /// The request whose call published it; None for a promotion from a lower tier.
        req: Option<u64>,
    },
    /// Group `group`'s block of node `hash` left the tree (evicted, a checkpoint dropped, the
    /// node removed, or no longer matchable).
    Removed {
        /// KV group.
        group: usize,
        /// The node's chained block hash.
        hash: u64,
    },
    /// Every cached block left the tree at once
    /// ([`reset_prefix_cache`](crate::KVCacheManager::reset_prefix_cache)); no `Removed`
    /// event lists them.
    Cleared,
}

/// The tree's event log: off, or the events since the last drain plus the request whose call
/// is publishing.
#[derive(Debug, Default)]
pub(crate) struct EventLog {
    on: bool,
    /// The request publishing now (set by the manager before it links or attaches blocks).
    req: Option<u64>,
    events: Vec<CacheEvent>,
}

impl EventLog {
    pub(crate) fn new(on: bool) -> Self {
        EventLog {
            on,
            ..EventLog::default()
        }
    }

    /// Whether events are recorded (the only cost when they are not).
    #[inline(always)]
    pub(crate) fn on(&self) -> bool {
        self.on
    }

    /// Names the request whose call publishes the next blocks (None: a promotion).
    #[inline(always)]
    pub(crate) fn set_req(&mut self, req: Option<u64>) {
        self.req = req;
    }

    pub(crate) fn req(&self) -> Option<u64> {
        self.req
    }

    pub(crate) fn push(&mut self, e: CacheEvent) {
        self.events.push(e);
    }

    /// Events recorded so far (undrained).
    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    /// Forgets the events after the first `n` (a reset replaces them with one `Cleared`).
    pub(crate) fn truncate(&mut self, n: usize) {
        self.events.truncate(n);
    }

    /// Moves the recorded events into `out` (cleared first), keeping both buffers' capacity.
    pub(crate) fn take_into(&mut self, out: &mut Vec<CacheEvent>) {
        out.clear();
        std::mem::swap(&mut self.events, out);
    }
}
