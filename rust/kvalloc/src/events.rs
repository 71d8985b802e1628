//! KV cache events: which blocks entered and left the prefix cache, in order, for an engine's
//! event stream or a cache-aware router (what vLLM calls BlockStored, BlockRemoved and
//! AllBlocksCleared), and where a request can resume: the window-safe positions a router should
//! count as hits.
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
//! ## Resume points: what a router should trust
//! A block being stored does not mean a request can resume after it: for a hybrid model a
//! resume needs each sliding group's window before the position, which kvalloc keeps only as
//! checkpoints. [`CacheEvent::Resumable`] and [`CacheEvent::NotResumable`] report the *resume
//! points*: the nodes a registered checkpoint makes window-safe on its own (its end, and the
//! nodes above it whose windows its runs still cover: the block it keeps beyond W makes the
//! end's parent one too). Where no position needs a checkpoint (a model without sliding layers,
//! or the dense policy), every cached node is one, and each new node's `Stored` events are
//! followed by its `Resumable`: a router treats every model the same way.
//!
//! Replaying them (insert on `Resumable`, remove on `NotResumable`, empty on `Cleared`) gives
//! exactly [`KVCacheManager::resume_points`](crate::KVCacheManager::resume_points). A
//! `Resumable` follows the `Stored` events of its blocks, and a `NotResumable` comes before the
//! `Removed` events of the blocks it loses.
//!
//! A router estimates a prompt's hit as the deepest resume point on its chain of block hashes,
//! capped one token short of the prompt (as the manager caps hits):
//! `max { (k) * B : k <= (len - 1) / B, hashes[k - 1] resumable }`. That estimate never
//! exceeds [`match_prefix`](crate::KVCacheManager::match_prefix), because every resume point is
//! window-safe and reachable (a node under one an aborted request doomed is none). It equals
//! `match_prefix` whenever the hit ends at a resume point, which includes every hit where no
//! position needs a checkpoint. It falls short only where the window before the hit is held by
//! the union of two checkpoints' runs (a checkpoint whose run meets an older one), or by blocks
//! a running request holds outside any checkpoint: those positions come and go with steps the
//! events do not follow, and an estimate short of the hit is the safe side.
//!
//! New kinds are added as new variants: the crate is not 1.0, and a match without a wildcard
//! arm then shows every consumer that needs to learn them.

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
    /// event lists them, and no `NotResumable` lists the resume points that went with them.
    Cleared,
    /// A request whose prompt's chained block hashes run through `hash` (its block `block`)
    /// can resume at token `(block + 1) * B` here: a window-safe checkpoint (full KV of every
    /// block up to it, each sliding group's window before it).
    Resumable {
        /// The chained hash of the block the resume point ends.
        hash: u64,
        /// That block's index in the sequence.
        block: u32,
    },
    /// The resume point at the end of `hash`'s block is gone (checkpoint dropped or evicted).
    NotResumable {
        /// The chained hash of the block the resume point ended.
        hash: u64,
    },
}

/// The tree's event log: off, or the events since the last drain plus the request whose call
/// is publishing, and what the resume points' events need to know per node.
#[derive(Debug, Default)]
pub(crate) struct EventLog {
    on: bool,
    /// The request publishing now (set by the manager before it links or attaches blocks).
    req: Option<u64>,
    events: Vec<CacheEvent>,
    /// Per node id: the checkpoints that make the node a resume point (1 for every node where
    /// none is needed). Grown on demand; 0 for a removed node.
    resume_refs: Vec<u32>,
    /// Per node id: reported `Resumable`, not since `NotResumable` (`resume_refs` positive and
    /// the node reachable by a walk).
    resumable: Vec<bool>,
    /// Live doomed nodes: while there is none, a walk reaches every live node.
    pub(crate) doomed: u64,
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

    /// Counts one more reason for node `n` to be a resume point; true when it is the first.
    pub(crate) fn add_resume_ref(&mut self, n: u32) -> bool {
        let i = n as usize;
        if i >= self.resume_refs.len() {
            self.resume_refs.resize(i + 1, 0);
            self.resumable.resize(i + 1, false);
        }
        self.resume_refs[i] += 1;
        self.resume_refs[i] == 1
    }

    /// Takes back one reason for node `n` to be a resume point; true when it was the last.
    pub(crate) fn sub_resume_ref(&mut self, n: u32) -> bool {
        let r = &mut self.resume_refs[n as usize];
        debug_assert!(*r > 0);
        *r -= 1;
        *r == 0
    }

    /// The reasons node `n` is a resume point (0 for a node never counted).
    pub(crate) fn resume_refs(&self, n: u32) -> u32 {
        self.resume_refs.get(n as usize).copied().unwrap_or(0)
    }

    /// Whether node `n` was last reported `Resumable`.
    pub(crate) fn is_resumable(&self, n: u32) -> bool {
        self.resumable.get(n as usize).copied().unwrap_or(false)
    }

    /// Marks node `n` reported `Resumable` (true) or `NotResumable` (false); counted first.
    pub(crate) fn set_resumable(&mut self, n: u32, on: bool) {
        self.resumable[n as usize] = on;
    }

    /// Node ids last reported `Resumable`.
    pub(crate) fn resumable_nodes(&self) -> Vec<u32> {
        (0..self.resumable.len() as u32)
            .filter(|&n| self.resumable[n as usize])
            .collect()
    }

    /// Moves the recorded events into `out` (cleared first), keeping both buffers' capacity.
    pub(crate) fn take_into(&mut self, out: &mut Vec<CacheEvent>) {
        out.clear();
        std::mem::swap(&mut self.events, out);
    }
}
