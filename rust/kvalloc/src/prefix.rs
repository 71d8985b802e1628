//! The prefix index: a tree of cached blocks keyed by chained block hash.
//!
//! Each node is one whole block of some cached sequence. It always holds the block's KV for every
//! full-attention group; for a sliding group it holds the block's SWA KV only where it is kept
//! (part of a *checkpoint*), and is a *tombstone* for that group otherwise.
//!
//! A checkpoint is the SWA KV of the blocks just before a resume point, so that a request can
//! resume there: it ends at a node (`ckpt_end`) and covers, per sliding group, the blocks from
//! `ckpt_start` to the end node. Blocks can belong to several checkpoints (`ckpt_refs` counts
//! them); a block's SWA KV is freed when no checkpoint covers it and no running request pins it.
//!
//! The tree returns freed blocks as data (`Freed`); the manager gives them back to the arena.
//!
//! ## Invariants (checked by [`PrefixTree::validate`])
//! - `index` maps exactly the live, non-doomed nodes' hashes; a node's depth is its parent's plus
//!   one and `children` counts its live children: a cached prefix has no holes in the full groups;
//! - every live node holds a block for every full group;
//! - `ckpt_refs` equals the number of registered checkpoints covering the block, and a kept SWA
//!   block is covered by a checkpoint or its node is pinned (swa-aware policy); under the dense
//!   policy every node holds every sliding block;
//! - `retained` counts the retention pins covering the node, and the retained bytes are the
//!   bytes of the nodes it is positive for (exact);
//! - the eviction sets hold exactly the unheld leaves and the unheld interior checkpoints: a
//!   node that a running request pins (`refs`) or a retention pin covers (`retained`) is in
//!   neither, and every block it holds stays (an SWA block no checkpoint covers included).
//!
//! ## Two kinds of hold
//! - `refs`: running requests whose path runs through the node (the manager checks it against
//!   the running requests' paths); gone when the requests finish or abort.
//! - `retained`: *retention pins*, time-bounded holds on a cached prefix that an engine asked
//!   for (see `manager::retention`); the manager keeps the pins, the tree only counts them.
//!
//! Either keeps the node and every block it holds; a node neither holds is evictable as before.
//! Eviction takes leaves first, so an unheld prefix loses its tail before its head (a pinned
//! head with an unpinned tail loses exactly the tail).

mod min_set;

pub use crate::hash::{HashIndex, IdentityHasher};
use min_set::MinSet;
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::events::{CacheEvent, EventLog};
use crate::eviction::{Candidate, Eviction, EvictionOrder, FutureUses, NEVER};
use crate::mem::prefault;
use crate::slab::Handle;

/// Node id; `NONE` marks "no node" (the parent of depth-0 nodes).
pub type NodeId = u32;
/// No node.
pub const NONE: NodeId = u32::MAX;

/// Blocks released by a tree operation: (group, handle).
pub type Freed = Vec<(usize, Handle)>;

/// A node's priority before any request finished holding it (read as 0).
const UNSET_PRIORITY: i8 = i8::MIN;

#[derive(Debug, Clone, Default)]
struct Node {
    hash: u64,
    parent: NodeId,
    depth: u32,
    children: u32,
    /// Running requests that pin this node (their path runs through it).
    refs: u32,
    /// Retention pins covering this node (see the module docs): not a request's pin.
    retained: u32,
    /// Requests that resumed exactly at the end of this node (saturating: the value policy
    /// needs its order of magnitude, and the node stays one cache line).
    hits: u16,
    /// The highest retention priority of the requests that finished holding this node
    /// ([`UNSET_PRIORITY`] until one did; read as 0). Weighs its eviction key.
    priority: i8,
    last_access: u64,
    /// The value policy's inflation `L` at the last access: the node's key is priced against
    /// it, so a node that becomes evictable late (a parent whose children went) keeps its age.
    base: f32,
    /// A registered checkpoint ends at this node.
    ckpt_end: bool,
    /// Why the checkpoint ending here was placed (meaningful while `ckpt_end`).
    ckpt_kind: CheckpointKind,
    /// Created by an aborted request while others still pinned it: never matched again and
    /// removed as soon as it is unpinned and childless.
    doomed: bool,
    alive: bool,
    /// Current key in `leaves` or `ckpts` (which one: `key_kind`).
    key: u64,
    /// The eviction set the node is in, if any. Apart from `key` (rather than an
    /// `Option<(SetKind, u64)>`, 16 bytes) so that a node fits in one 64-byte line.
    key_kind: Option<SetKind>,
    /// The tree's version when this node was created or last changed in a way a walk sees
    /// (blocks attached or dropped, doomed, removed): see [`PrefixTree::path_unchanged`].
    changed: u64,
}

// A walk reads one node per block: keep each node in one cache line.
const _: () = assert!(std::mem::size_of::<Node>() <= 64);

impl Node {
    /// The eviction set the node is in and its key there, if any.
    fn filed(&self) -> Option<(SetKind, u64)> {
        self.key_kind.map(|k| (k, self.key))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetKind {
    Leaf,
    Ckpt,
}

/// Why a checkpoint was placed. The tree counts, per kind, how many were placed and how many
/// were resumed at, and the value policy prices an unproven checkpoint by its kind's record:
/// where a workload resumes (a prompt's end, an answer's end, a branch) is learned as it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum CheckpointKind {
    /// Where a request left a cached path (others are likely to branch there too).
    Branch,
    /// The end of a prompt.
    PromptEnd,
    /// The end of a finished request's output.
    OutputEnd,
    /// A fixed interval (`checkpoint_interval`) or a resume granularity.
    Interval,
    /// The end of a retention pin.
    Pin,
    /// One of the block-boundary checkpoints a prompt left while memory was plentiful (see
    /// `ManagerConfig::speculative_checkpoints`). Not remembered as ghosts: they are many, and
    /// would push the other kinds' ghosts out.
    Speculative,
    /// Rebuilt by a promotion from a lower tier.
    #[default]
    Restored,
}

impl CheckpointKind {
    const ALL: usize = 7;

    /// Every kind, in the order of [`CheckpointKind::index`].
    pub const KINDS: [CheckpointKind; CheckpointKind::ALL] = [
        CheckpointKind::Branch,
        CheckpointKind::PromptEnd,
        CheckpointKind::OutputEnd,
        CheckpointKind::Interval,
        CheckpointKind::Pin,
        CheckpointKind::Speculative,
        CheckpointKind::Restored,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The kind's name in stats: "branch", "prompt_end", "output_end", "interval", "pin",
    /// "speculative", "restored".
    pub fn name(self) -> &'static str {
        match self {
            CheckpointKind::Branch => "branch",
            CheckpointKind::PromptEnd => "prompt_end",
            CheckpointKind::OutputEnd => "output_end",
            CheckpointKind::Interval => "interval",
            CheckpointKind::Pin => "pin",
            CheckpointKind::Speculative => "speculative",
            CheckpointKind::Restored => "restored",
        }
    }
}

/// Per checkpoint kind: placed, and resumed at least once, or reached by a later prompt after
/// it was evicted unproven (a *ghost* resume). Counting ghosts keeps the record from confirming
/// itself: a kind evicted early because its record is poor would otherwise never be resumed
/// at, and its record would only get worse.
#[derive(Debug, Clone, Default)]
struct KindRecord {
    placed: [u64; CheckpointKind::ALL],
    proven: [u64; CheckpointKind::ALL],
    /// Hashes of checkpoints removed unproven, with their kind: a bounded FIFO.
    ghosts: HashMap<u64, CheckpointKind>,
    ghost_order: std::collections::VecDeque<u64>,
}

/// Ghosts remembered; older ones are forgotten.
const MAX_GHOSTS: usize = 1 << 16;

impl KindRecord {
    /// The expected resumes of an unproven checkpoint of this kind, in (0, 1): the share of
    /// its kind that was resumed at, with one success and one failure assumed (so a kind not
    /// yet seen counts one half, and none ever counts zero).
    fn prior(&self, k: CheckpointKind) -> f64 {
        let i = k.index();
        (self.proven[i] as f64 + 1.0) / (self.placed[i] as f64 + 2.0)
    }

    fn add_ghost(&mut self, hash: u64, kind: CheckpointKind) {
        if self.ghost_order.len() == MAX_GHOSTS {
            if let Some(old) = self.ghost_order.pop_front() {
                self.ghosts.remove(&old);
            }
        }
        if self.ghosts.insert(hash, kind).is_none() {
            self.ghost_order.push_back(hash);
        }
    }
}

/// One cached block an eviction took out of the tree: where it came from, so it can be demoted
/// to a lower tier before its memory is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Victim {
    /// The node's chained hash.
    pub hash: u64,
    /// The node's depth (block index).
    pub depth: u32,
    /// A checkpoint ended at the node.
    pub ckpt_end: bool,
    /// KV group.
    pub group: usize,
    /// The block (still live until the caller frees it).
    pub handle: Handle,
}

/// What an eviction removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// A leaf node (its full block and any SWA block).
    Leaf,
    /// An interior checkpoint's SWA blocks.
    Checkpoint,
}

/// What [`PrefixTree::find_child`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// No node has the hash: insert one.
    Absent,
    /// The node for this block under this parent.
    Present(NodeId),
    /// The hash belongs to a node elsewhere in the tree.
    Conflict,
}

/// What [`PrefixTree::link`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linked {
    /// A new node (pinned once).
    Inserted(NodeId),
    /// The node already there for this block under this parent (not pinned by the call).
    Present(NodeId),
    /// The hash belongs to a node elsewhere in the tree.
    Conflict,
}

/// Result of walking a prompt's block hashes down the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Walk {
    /// Leading blocks whose full-attention KV is cached.
    pub depth: u32,
    /// Leading blocks that form a window-safe hit (`safe <= depth`).
    pub safe: u32,
}

/// Static description of the KV groups the tree serves.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Window of each group (`None` for full attention).
    pub windows: Vec<Option<u32>>,
    /// Block size in bytes of each group.
    pub block_bytes: Vec<u64>,
    /// Tokens per block.
    pub block_tokens: u32,
    /// `false`: the dense policy (every group keeps every cached block).
    pub swa_aware: bool,
}

impl Layout {
    fn groups(&self) -> usize {
        self.windows.len()
    }

    /// Blocks that must hold SWA KV, ending at block boundary `k` (exclusive), for a resume at
    /// token `k * B` to be window-safe in a group with window `w`: those overlapping
    /// `[kB - w, kB)`, counted at token granularity.
    ///
    /// `kB` is a multiple of B, so this is `min(k, ceil(w / B))`.
    pub fn window_blocks(&self, k: u32, w: u32) -> u32 {
        let bt = self.block_tokens;
        // A shift when the block size is a power of two: this runs per sliding group in every
        // admission, and a division costs tens of cycles.
        let span = if bt.is_power_of_two() {
            (w >> bt.trailing_zeros()) + u32::from(w & (bt - 1) != 0)
        } else {
            w.div_ceil(bt)
        };
        k.min(span)
    }
}

/// The prefix tree.
#[derive(Debug)]
pub struct PrefixTree {
    layout: Layout,
    sliding: Vec<usize>,
    nodes: Vec<Node>,
    /// `blocks[node * G + g]`: the node's block of group g, 0 when absent.
    blocks: Vec<Handle>,
    /// Checkpoints covering the node's block of group g.
    ckpt_refs: Vec<u32>,
    /// For a checkpoint ending at the node: first block index it covers in group g.
    ckpt_start: Vec<u32>,
    free_ids: Vec<NodeId>,
    index: HashIndex,
    leaves: MinSet<(u64, NodeId)>,
    ckpts: MinSet<(u64, NodeId)>,
    order: EvictionOrder,
    tick: u64,
    /// Counts changes to what a prompt matches and what admitting it needs (nodes indexed or
    /// removed, blocks attached or dropped): equal readings mean equal answers.
    version: u64,
    live_nodes: u64,
    checkpoints: u64,
    /// Bytes of every block the tree holds, and of those in pinned nodes (kept exact, so the
    /// evictable amount is O(1)).
    held_bytes: u64,
    pinned_bytes: u64,
    /// Bytes of the nodes a retention pin covers (a subset of `pinned_bytes`).
    retained_bytes: u64,
    /// Checkpoints placed and proven, per kind (the value policy's priors).
    kinds: KindRecord,
    /// While an eviction runs with a log: the blocks it takes out (see [`Victim`]).
    victims: Option<Vec<Victim>>,
    /// The node an eviction with a log removes, and whether a checkpoint ended there.
    evicting: Option<(NodeId, bool)>,
    /// Blocks entering and leaving matchable nodes (see [`crate::events`]); off by default.
    events: EventLog,
}

impl PrefixTree {
    /// An empty tree for the given layout and eviction order.
    ///
    /// # Panics
    /// If the layout has more than 16 groups ([`crate::spec::MAX_GROUPS`]; the manager
    /// checks this and returns an error instead).
    pub fn new(layout: Layout, eviction: Eviction) -> Self {
        assert!(
            layout.windows.len() <= crate::spec::MAX_GROUPS,
            "kvalloc supports at most {} KV groups",
            crate::spec::MAX_GROUPS
        );
        let sliding = (0..layout.groups())
            .filter(|&g| layout.windows[g].is_some())
            .collect();
        PrefixTree {
            layout,
            sliding,
            nodes: Vec::new(),
            blocks: Vec::new(),
            ckpt_refs: Vec::new(),
            ckpt_start: Vec::new(),
            free_ids: Vec::new(),
            index: HashIndex::default(),
            leaves: MinSet::new(),
            ckpts: MinSet::new(),
            order: EvictionOrder::new(eviction),
            tick: 0,
            version: 0,
            live_nodes: 0,
            checkpoints: 0,
            held_bytes: 0,
            pinned_bytes: 0,
            retained_bytes: 0,
            kinds: KindRecord::default(),
            victims: None,
            evicting: None,
            events: EventLog::default(),
        }
    }

    /// Starts (or stops) recording [`CacheEvent`]s on a new tree; stopping drops the undrained
    /// ones.
    pub fn record_events(&mut self, on: bool) {
        debug_assert!(
            !on || self.live_nodes == 0,
            "resume points are counted from the start"
        );
        self.events = EventLog::new(on);
    }

    /// Whether events are recorded.
    pub fn events_on(&self) -> bool {
        self.events.on()
    }

    /// Names the request whose call publishes the blocks linked or attached next (None: a
    /// promotion), for their `Stored` events.
    #[inline(always)]
    pub fn set_publisher(&mut self, req: Option<u64>) {
        self.events.set_req(req);
    }

    /// Moves the events recorded since the last drain into `out` (cleared first).
    pub fn take_events_into(&mut self, out: &mut Vec<CacheEvent>) {
        self.events.take_into(out);
    }

    /// Undrained events (a mark for [`replace_events_since`](Self::replace_events_since)).
    pub fn events_len(&self) -> usize {
        self.events.len()
    }

    /// Replaces the events recorded after `mark` with `e` (a reset reports one `Cleared`
    /// instead of a `Removed` per block).
    pub fn replace_events_since(&mut self, mark: usize, e: CacheEvent) {
        if self.events.on() {
            self.events.truncate(mark);
            self.events.push(e);
        }
    }

    /// Records `Stored` for every block node `n` holds (a new node).
    #[cold]
    #[inline(never)]
    fn log_node_stored(&mut self, n: NodeId) {
        for g in 0..self.g() {
            if self.block(n, g) != 0 {
                self.log_stored(n, g);
            }
        }
    }

    /// Records `Stored` for node `n`'s block of group `g`.
    #[cold]
    #[inline(never)]
    fn log_stored(&mut self, n: NodeId, g: usize) {
        let node = &self.nodes[n as usize];
        let parent = (node.parent != NONE).then(|| self.nodes[node.parent as usize].hash);
        let e = CacheEvent::Stored {
            group: g,
            hash: node.hash,
            parent,
            block: node.depth,
            req: self.events.req(),
        };
        self.events.push(e);
    }

    /// Records `Removed` for every block node `n` holds (it stops being matchable).
    #[cold]
    #[inline(never)]
    fn log_node_removed(&mut self, n: NodeId) {
        let hash = self.nodes[n as usize].hash;
        for g in 0..self.g() {
            if self.block(n, g) != 0 {
                self.events.push(CacheEvent::Removed { group: g, hash });
            }
        }
    }

    /// Commits the memory of up to `max_nodes` nodes within `max_bytes` (their arrays; not the
    /// index, whose buckets a big table spreads over more cache lines than the young tree
    /// needs), so that the tree grows to that size faulting no page in (see
    /// [`ManagerConfig::prefault_bytes`](crate::ManagerConfig::prefault_bytes)). Changes no
    /// state; for a new tree. Returns the bytes committed; an error if the system refuses the
    /// memory.
    pub fn prefault(&mut self, max_bytes: u64, max_nodes: u64) -> Result<u64> {
        debug_assert!(self.nodes.is_empty());
        let g = self.g();
        use std::mem::size_of;
        let per_node = size_of::<Node>() + g * (size_of::<Handle>() + 2 * size_of::<u32>());
        let n = max_nodes.min(max_bytes / per_node as u64) as usize;
        // Past the length: never read, so any value fills it.
        prefault::commit(&mut self.nodes, n, Node::default())?;
        prefault::commit(&mut self.blocks, n * g, 0)?;
        prefault::commit(&mut self.ckpt_refs, n * g, 0)?;
        prefault::commit(&mut self.ckpt_start, n * g, 0)?;
        Ok((n * per_node) as u64)
    }

    /// The layout served.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn g(&self) -> usize {
        self.layout.groups()
    }

    fn slot(&self, n: NodeId, g: usize) -> usize {
        n as usize * self.g() + g
    }

    /// Like [`find_child`](Self::find_child), for linking: a node whose parent is doomed (left
    /// behind under a node an aborted request created) can never be matched again, so it gives
    /// up its hash (and goes, if nothing holds it) instead of blocking the new link.
    pub fn claim_child(
        &mut self,
        hash: u64,
        parent: NodeId,
        depth: u32,
        freed: &mut Freed,
    ) -> Link {
        match self.find_child(hash, parent, depth) {
            Link::Conflict => {
                let n = self.lookup(hash).expect("conflict means indexed");
                let old_parent = self.nodes[n as usize].parent;
                if old_parent != NONE && self.nodes[old_parent as usize].doomed {
                    self.discard(n, freed);
                    if self.lookup(hash).is_none() {
                        return Link::Absent;
                    }
                }
                Link::Conflict
            }
            other => other,
        }
    }

    /// The version counter: between equal readings, walking any prompt and planning its
    /// admission give the same result.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Advances and returns the logical clock.
    pub fn now(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The live node for a chained hash, if any (doomed nodes are not indexed).
    pub fn lookup(&self, hash: u64) -> Option<NodeId> {
        self.index.get(hash)
    }

    /// Starts loading the index line a lookup of `hash` reads (a hint; see
    /// [`HashIndex::prefetch`]).
    #[inline(always)]
    pub fn prefetch(&self, hash: u64) {
        self.index.prefetch(hash);
    }

    /// Requests the lines the next `n` nodes created will be written to: a freed node's record
    /// and block slots, else the ends of the node arrays (a growing tree writes there, and a
    /// line not written for a while is out of cache). A hint, for a step about to admit.
    pub fn prefetch_new_nodes(&self, n: usize) {
        use crate::mem::prefetch::{prefetch, prefetch_range};
        let g = self.g();
        let reused = self.free_ids.len().min(n);
        for &id in self.free_ids.iter().rev().take(reused) {
            prefetch(self.nodes.as_ptr().wrapping_add(id as usize));
            prefetch(self.blocks.as_ptr().wrapping_add(id as usize * g));
        }
        let fresh = n - reused;
        let end = self.nodes.len();
        prefetch_range(self.nodes.as_ptr().wrapping_add(end), fresh);
        prefetch_range(self.blocks.as_ptr().wrapping_add(end * g), fresh * g);
        prefetch_range(self.ckpt_refs.as_ptr().wrapping_add(end * g), fresh * g);
        prefetch_range(self.ckpt_start.as_ptr().wrapping_add(end * g), fresh * g);
    }

    /// What linking block `depth` with `hash` under `parent` finds in the tree.
    pub fn find_child(&self, hash: u64, parent: NodeId, depth: u32) -> Link {
        match self.lookup(hash) {
            None => Link::Absent,
            Some(n) => {
                let node = &self.nodes[n as usize];
                if node.depth == depth && node.parent == parent {
                    Link::Present(n)
                } else {
                    // Another subtree holds this hash (a collision, or a path through a node
                    // an aborted request left behind): this block cannot be linked.
                    Link::Conflict
                }
            }
        }
    }

    /// The block of group `g` held by node `n` (0 when absent).
    pub fn block(&self, n: NodeId, g: usize) -> Handle {
        self.blocks[self.slot(n, g)]
    }

    /// Depth (block index) of a node.
    pub fn depth(&self, n: NodeId) -> u32 {
        self.nodes[n as usize].depth
    }

    /// Running requests pinning `n`.
    pub fn refs(&self, n: NodeId) -> u32 {
        self.nodes[n as usize].refs
    }

    /// The parent of `n` (`NONE` at depth 0); still readable after `n` is removed.
    pub fn parent(&self, n: NodeId) -> NodeId {
        self.nodes[n as usize].parent
    }

    /// Whether a checkpoint ends at `n`.
    pub fn is_checkpoint(&self, n: NodeId) -> bool {
        self.nodes[n as usize].ckpt_end
    }

    /// Walks `hashes` from the root, collecting the matched nodes into `path`, and finds the
    /// longest window-safe prefix of at most `max_safe` blocks.
    pub fn walk(&self, hashes: &[u64], max_safe: u32, path: &mut Vec<NodeId>) -> Walk {
        let mut runs_buf = [0u32; 16];
        let runs = &mut runs_buf[..self.sliding.len()];
        let mut safe = 0;
        let mut parent = NONE;
        // Blocks each sliding window spans (`ceil(W / B)`), hoisted out of the loop.
        let mut spans_buf = [0u32; 16];
        let spans = &mut spans_buf[..self.sliding.len()];
        for (span, &g) in spans.iter_mut().zip(&self.sliding) {
            *span = self
                .layout
                .window_blocks(u32::MAX, self.layout.windows[g].expect("sliding"));
        }
        for (i, &h) in hashes.iter().enumerate() {
            let Link::Present(n) = self.find_child(h, parent, i as u32) else {
                break;
            };
            parent = n;
            path.push(n);
            let k = i as u32 + 1;
            let mut ok = true;
            for ((r, &g), &span) in runs.iter_mut().zip(&self.sliding).zip(spans.iter()) {
                *r = if self.block(n, g) != 0 { *r + 1 } else { 0 };
                ok &= *r >= k.min(span);
            }
            if ok && k <= max_safe {
                safe = k;
            }
        }
        Walk {
            depth: path.len() as u32,
            safe,
        }
    }

    /// Inserts a node for block `depth` under `parent` (NONE at depth 0). `blocks` holds one
    /// handle per group (0 for an absent sliding block). The node starts pinned once.
    pub fn insert(&mut self, hash: u64, parent: NodeId, depth: u32, blocks: &[Handle]) -> NodeId {
        let id = self.next_id();
        let present = self.index.get_or_insert(hash, id);
        debug_assert!(present.is_none());
        self.add_node(id, hash, parent, depth, blocks);
        id
    }

    /// Links block `depth` with `hash` under `parent` with one index probe in the common cases:
    /// the node already there ([`Linked::Present`], not pinned by this call), a new node holding
    /// `blocks` and pinned once, as [`insert`](Self::insert) makes ([`Linked::Inserted`]), or a
    /// conflict as [`claim_child`](Self::claim_child) finds it.
    pub fn link(
        &mut self,
        hash: u64,
        parent: NodeId,
        depth: u32,
        blocks: &[Handle],
        freed: &mut Freed,
    ) -> Linked {
        let id = self.next_id();
        match self.index.get_or_insert(hash, id) {
            None => {
                self.add_node(id, hash, parent, depth, blocks);
                return Linked::Inserted(id);
            }
            Some(n) => {
                let node = &self.nodes[n as usize];
                if node.depth == depth && node.parent == parent {
                    return Linked::Present(n);
                }
            }
        }
        // Elsewhere in the tree: the rare path.
        match self.claim_child(hash, parent, depth, freed) {
            Link::Absent => Linked::Inserted(self.insert(hash, parent, depth, blocks)),
            Link::Present(n) => Linked::Present(n),
            Link::Conflict => Linked::Conflict,
        }
    }

    /// Counts a change to node `n` that a walk sees.
    fn touch(&mut self, n: NodeId) {
        self.version += 1;
        self.nodes[n as usize].changed = self.version;
    }

    /// Whether walking a prompt whose walk matched `path` (all of its nodes) when the tree's
    /// version was `version` still gives the same answer: every node of the path is alive,
    /// still matched (not doomed) and unchanged since, and `next` (the hash after the path,
    /// None when the walk matched every hash) still matches nothing. A node's id that was
    /// freed and reused carries the newer version of its new node.
    pub fn path_unchanged(&self, path: &[NodeId], version: u64, next: Option<u64>) -> bool {
        path.iter().all(|&n| {
            let node = &self.nodes[n as usize];
            node.alive && !node.doomed && node.changed <= version
        }) && next.is_none_or(|h| !self.index.contains_key(h))
    }

    /// The id the next node gets (a freed one first).
    fn next_id(&self) -> NodeId {
        self.free_ids
            .last()
            .copied()
            .unwrap_or(self.nodes.len() as NodeId)
    }

    /// Creates node `id` (from [`next_id`](Self::next_id), already indexed under `hash`).
    fn add_node(&mut self, id: NodeId, hash: u64, parent: NodeId, depth: u32, blocks: &[Handle]) {
        debug_assert_eq!(blocks.len(), self.g());
        self.version += 1;
        let tick = self.now();
        let node = Node {
            hash,
            parent,
            depth,
            children: 0,
            refs: 1,
            retained: 0,
            hits: 0,
            priority: UNSET_PRIORITY,
            last_access: tick,
            base: self.order.inflation() as f32,
            ckpt_end: false,
            ckpt_kind: CheckpointKind::Restored,
            doomed: false,
            alive: true,
            key: 0,
            key_kind: None,
            changed: self.version,
        };
        if self.free_ids.last() == Some(&id) {
            self.free_ids.pop();
            self.nodes[id as usize] = node;
            for (g, &h) in blocks.iter().enumerate() {
                let s = self.slot(id, g);
                self.blocks[s] = h;
                self.ckpt_refs[s] = 0;
                self.ckpt_start[s] = 0;
            }
        } else {
            debug_assert_eq!(id as usize, self.nodes.len());
            // Growth in huge pages: a large tree's arrays span tens of megabytes.
            crate::mem::hugepage::reserve(&mut self.nodes, 1);
            crate::mem::hugepage::reserve(&mut self.blocks, blocks.len());
            crate::mem::hugepage::reserve(&mut self.ckpt_refs, blocks.len());
            crate::mem::hugepage::reserve(&mut self.ckpt_start, blocks.len());
            self.nodes.push(node);
            // Pushes, not `resize` then stores: a handful of groups is cheaper than a memset call.
            for &h in blocks {
                self.blocks.push(h);
                self.ckpt_refs.push(0);
                self.ckpt_start.push(0);
            }
        }
        let nb = self.node_bytes(id);
        self.held_bytes += nb;
        self.pinned_bytes += nb; // a new node starts pinned
        self.live_nodes += 1;
        if parent != NONE {
            self.nodes[parent as usize].children += 1;
            self.refresh(parent);
        }
        if self.events.on() {
            self.log_node_stored(id);
            if self.every_node_resumes() {
                self.resume_ref(id);
            }
        }
    }

    /// Gives node `n` the SWA block `h` of sliding group `g` (it had none).
    pub fn attach(&mut self, n: NodeId, g: usize, h: Handle) {
        let s = self.slot(n, g);
        debug_assert_eq!(self.blocks[s], 0);
        self.touch(n);
        self.blocks[s] = h;
        let bb = self.layout.block_bytes[g];
        self.held_bytes += bb;
        if self.held(n) {
            self.pinned_bytes += bb;
        }
        if self.nodes[n as usize].retained > 0 {
            self.retained_bytes += bb;
        }
        // A doomed node's blocks were reported removed when it was doomed.
        if self.events.on() && !self.nodes[n as usize].doomed {
            self.log_stored(n, g);
        }
    }

    /// Takes node `n`'s block of group `g` out of the tree into `freed`.
    fn drop_block(&mut self, n: NodeId, g: usize, freed: &mut Freed) {
        self.touch(n);
        let s = self.slot(n, g);
        let h = std::mem::replace(&mut self.blocks[s], 0);
        debug_assert_ne!(h, 0);
        let bb = self.layout.block_bytes[g];
        self.held_bytes -= bb;
        if self.held(n) {
            self.pinned_bytes -= bb;
        }
        if self.nodes[n as usize].retained > 0 {
            self.retained_bytes -= bb;
        }
        if let Some(log) = self.victims.as_mut() {
            let node = &self.nodes[n as usize];
            if !node.doomed {
                let ckpt_end = node.ckpt_end || self.evicting == Some((n, true));
                log.push(Victim {
                    hash: node.hash,
                    depth: node.depth,
                    ckpt_end,
                    group: g,
                    handle: h,
                });
            }
        }
        if self.events.on() && !self.nodes[n as usize].doomed {
            let hash = self.nodes[n as usize].hash;
            self.events.push(CacheEvent::Removed { group: g, hash });
        }
        freed.push((g, h));
    }

    /// Like [`evict_one`](Self::evict_one), also listing the cached blocks it takes out (for
    /// demotion) in `victims`.
    pub fn evict_one_logged(
        &mut self,
        freed: &mut Freed,
        victims: &mut Vec<Victim>,
    ) -> Option<Evicted> {
        self.logged(victims, |t| t.evict_one(freed))
    }

    /// Like [`evict_unit`](Self::evict_unit), also listing the cached blocks it takes out (for
    /// demotion) in `victims`.
    pub fn evict_unit_logged(
        &mut self,
        n: NodeId,
        freed: &mut Freed,
        victims: &mut Vec<Victim>,
    ) -> Option<Evicted> {
        self.logged(victims, |t| t.evict_unit(n, freed))
    }

    /// Runs an eviction with its victims logged into `victims`.
    fn logged<T>(&mut self, victims: &mut Vec<Victim>, f: impl FnOnce(&mut Self) -> T) -> T {
        self.victims = Some(std::mem::take(victims));
        let out = f(self);
        *victims = self.victims.take().expect("log set above");
        self.evicting = None;
        out
    }

    /// Whether a checkpoint covers node `n`'s block of group `g`.
    pub fn ckpt_covered(&self, n: NodeId, g: usize) -> bool {
        self.ckpt_refs[self.slot(n, g)] > 0
    }

    /// The chained hash of node `n`.
    pub fn hash_of(&self, n: NodeId) -> u64 {
        self.nodes[n as usize].hash
    }

    /// Pins a node for a running request.
    pub fn pin(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        node.refs += 1;
        if node.refs == 1 {
            if node.retained == 0 {
                self.pinned_bytes += self.node_bytes(n);
            }
            self.refresh(n);
        }
    }

    /// Whether a running request or a retention pin holds `n`: it keeps every block it holds
    /// and is in no eviction set.
    #[inline(always)]
    pub(super) fn held(&self, n: NodeId) -> bool {
        let node = &self.nodes[n as usize];
        node.refs > 0 || node.retained > 0
    }

    /// Counts a resume at the end of `n`.
    pub fn record_hit(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        if node.hits == 0 && node.ckpt_end {
            self.kinds.proven[node.ckpt_kind.index()] += 1;
        }
        node.hits = node.hits.saturating_add(1);
    }

    /// Unpins a node. When its last hold goes (no request pins it and no retention pin covers
    /// it), SWA blocks no checkpoint covers are freed (swa-aware policy), a doomed node is
    /// removed, and the node becomes evictable.
    pub fn unpin(&mut self, n: NodeId, freed: &mut Freed) {
        let tick = self.now();
        let base = self.order.inflation() as f32;
        let node = &mut self.nodes[n as usize];
        debug_assert!(node.refs > 0);
        node.refs -= 1;
        node.last_access = tick;
        node.base = base;
        if node.refs > 0 || node.retained > 0 {
            return;
        }
        self.unheld(n, freed);
    }

    /// Node `n`'s last hold (a request's pin or a retention pin) went: SWA blocks no
    /// checkpoint covers are freed (swa-aware policy), a doomed node is removed, and the node
    /// becomes evictable.
    pub(super) fn unheld(&mut self, n: NodeId, freed: &mut Freed) {
        self.pinned_bytes -= self.node_bytes(n);
        if self.layout.swa_aware {
            for i in 0..self.sliding.len() {
                let g = self.sliding[i];
                let s = self.slot(n, g);
                if self.blocks[s] != 0 && self.ckpt_refs[s] == 0 {
                    self.drop_block(n, g, freed);
                }
            }
        }
        if self.nodes[n as usize].doomed && self.nodes[n as usize].children == 0 {
            self.remove(n, freed);
            return;
        }
        self.refresh(n);
    }

    /// A prompt with these chained block hashes resumed at block `safe`: a ghost deeper than
    /// that (a checkpoint evicted unproven, which would have served it) proves its kind.
    pub fn note_ghost_resume(&mut self, hashes: &[u64], safe: u32) {
        if self.kinds.ghosts.is_empty() {
            return;
        }
        for &h in hashes.iter().skip(safe as usize).rev() {
            if let Some(kind) = self.kinds.ghosts.remove(&h) {
                self.kinds.proven[kind.index()] += 1;
                return;
            }
        }
    }

    /// Per kind: checkpoints placed, and those later requests resumed at (or reached after
    /// they were evicted unproven).
    pub fn kind_record(&self, kind: CheckpointKind) -> (u64, u64) {
        let i = kind.index();
        (self.kinds.placed[i], self.kinds.proven[i])
    }

    /// The value policy's prior for an unproven checkpoint of this kind (see [`CheckpointKind`]).
    pub fn kind_prior(&self, kind: CheckpointKind) -> f64 {
        self.kinds.prior(kind)
    }

    /// Registers a checkpoint of `kind` ending at node `end`: for each sliding group, the run of blocks
    /// holding SWA KV that ends at `end`, at most `max_blocks[g]` long. Returns false (and
    /// registers nothing) when `end` already ends a checkpoint or some group lacks the blocks a
    /// window-safe resume at `end` needs.
    pub fn add_checkpoint(
        &mut self,
        end: NodeId,
        max_blocks: &[u32],
        kind: CheckpointKind,
    ) -> bool {
        if !self.layout.swa_aware || self.nodes[end as usize].ckpt_end || self.sliding.is_empty() {
            return false;
        }
        let k = self.nodes[end as usize].depth + 1;
        // One walk per group, counting the run's references as it goes (a run too short,
        // which is rare, takes them back).
        let mut lens = [0u32; 16];
        for i in 0..self.sliding.len() {
            let g = self.sliding[i];
            let w = self.layout.windows[g].expect("sliding");
            let need = self.layout.window_blocks(k, w);
            let limit = max_blocks[i].max(need);
            let mut len = 0;
            let mut n = end;
            while n != NONE && len < limit {
                let s = self.slot(n, g);
                if self.blocks[s] == 0 {
                    break;
                }
                self.ckpt_refs[s] += 1;
                len += 1;
                n = self.nodes[n as usize].parent;
            }
            lens[i] = len;
            if len < need {
                for j in 0..=i {
                    self.unref_run(end, self.sliding[j], lens[j]);
                }
                return false;
            }
        }
        for i in 0..self.sliding.len() {
            let s = self.slot(end, self.sliding[i]);
            self.ckpt_start[s] = k - lens[i];
        }
        let node = &mut self.nodes[end as usize];
        node.ckpt_end = true;
        node.ckpt_kind = kind;
        self.kinds.placed[kind.index()] += 1;
        self.checkpoints += 1;
        self.refresh(end);
        if self.events.on() {
            self.log_checkpoint(end, true);
        }
        true
    }

    /// Takes back the references `add_checkpoint` gave the `len` blocks of group `g` ending at
    /// `end`.
    fn unref_run(&mut self, end: NodeId, g: usize, len: u32) {
        let mut n = end;
        for _ in 0..len {
            let s = self.slot(n, g);
            self.ckpt_refs[s] -= 1;
            n = self.nodes[n as usize].parent;
        }
    }

    /// Unregisters the checkpoint ending at `end`, freeing SWA blocks no longer covered by any
    /// checkpoint whose nodes are unpinned.
    pub fn remove_checkpoint(&mut self, end: NodeId, freed: &mut Freed) {
        debug_assert!(self.nodes[end as usize].ckpt_end);
        // Before its blocks go: a router stops counting on it first.
        if self.events.on() {
            self.log_checkpoint(end, false);
        }
        self.nodes[end as usize].ckpt_end = false;
        let node = &self.nodes[end as usize];
        if node.hits == 0 && node.ckpt_kind != CheckpointKind::Speculative {
            let (hash, kind) = (node.hash, node.ckpt_kind);
            self.kinds.add_ghost(hash, kind);
        }
        self.checkpoints -= 1;
        for i in 0..self.sliding.len() {
            let g = self.sliding[i];
            let start = self.ckpt_start[self.slot(end, g)];
            let mut n = end;
            while n != NONE && self.nodes[n as usize].depth >= start {
                let s = self.slot(n, g);
                self.ckpt_refs[s] -= 1;
                if self.ckpt_refs[s] == 0 && !self.held(n) {
                    self.drop_block(n, g, freed);
                }
                n = self.nodes[n as usize].parent;
            }
        }
        self.refresh(end);
    }

    /// Removes an unheld, childless node and its blocks (its checkpoint first).
    fn remove(&mut self, n: NodeId, freed: &mut Freed) {
        self.touch(n);
        debug_assert!(!self.held(n) && self.nodes[n as usize].children == 0);
        if self.nodes[n as usize].ckpt_end {
            self.remove_checkpoint(n, freed);
        }
        if self.events.on() {
            if self.every_node_resumes() {
                self.resume_unref(n);
            }
            debug_assert_eq!(self.events.resume_refs(n), 0);
            self.events.doomed -= u64::from(self.nodes[n as usize].doomed);
        }
        self.take_key(n);
        for g in 0..self.g() {
            let s = self.slot(n, g);
            if self.blocks[s] != 0 {
                self.drop_block(n, g, freed);
            }
            debug_assert_eq!(self.ckpt_refs[s], 0);
        }
        let node = &mut self.nodes[n as usize];
        node.alive = false;
        let (hash, parent) = (node.hash, node.parent);
        // A doomed node was unindexed already; its hash may now name a newer node.
        self.index.remove_if(hash, n);
        self.free_ids.push(n);
        self.live_nodes -= 1;
        if parent != NONE {
            let p = &mut self.nodes[parent as usize];
            p.children -= 1;
            if p.doomed && p.children == 0 && p.refs == 0 && p.retained == 0 {
                self.remove(parent, freed);
            } else {
                self.refresh(parent);
            }
        }
    }

    /// Removes what an aborted request created: `n` goes now if nothing else holds it,
    /// otherwise it is doomed (never matched again, removed when released).
    pub fn discard(&mut self, n: NodeId, freed: &mut Freed) {
        self.version += 1;
        let node = &mut self.nodes[n as usize];
        if !node.alive {
            return;
        }
        node.changed = self.version;
        if node.refs == 0 && node.retained == 0 && node.children == 0 {
            self.remove(n, freed);
        } else {
            let was_doomed = std::mem::replace(&mut self.nodes[n as usize].doomed, true);
            if self.events.on() && !was_doomed {
                // Resume points first, then the blocks (as a checkpoint's removal reports).
                self.log_doomed(n);
                self.log_node_removed(n);
            }
            self.take_key(n);
            // A doomed node is never matched again: unindex it now, or a later request with the
            // same prefix would insert a second node under the same hash (the index keeps one).
            let hash = self.nodes[n as usize].hash;
            self.index.remove_if(hash, n);
        }
    }

    /// Live nodes.
    pub fn num_nodes(&self) -> u64 {
        self.live_nodes
    }

    /// Registered checkpoints.
    pub fn num_checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// Counts per group: (blocks held by the tree, tombstones).
    pub fn block_counts(&self) -> (Vec<u64>, Vec<u64>) {
        let g = self.g();
        let mut held = vec![0u64; g];
        let mut tomb = vec![0u64; g];
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            for (gi, (h, t)) in held.iter_mut().zip(tomb.iter_mut()).enumerate() {
                if self.blocks[i * g + gi] != 0 {
                    *h += 1;
                } else {
                    *t += 1;
                }
            }
        }
        (held, tomb)
    }

    /// Live, non-doomed nodes, deepest first.
    pub fn nodes_deepest_first(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = (0..self.nodes.len() as NodeId)
            .filter(|&n| self.nodes[n as usize].alive && !self.nodes[n as usize].doomed)
            .collect();
        v.sort_by_key(|&n| std::cmp::Reverse(self.nodes[n as usize].depth));
        v
    }

    /// `(group, hash)` of every block held by a live, matchable node: what replaying the
    /// tree's events gives (see [`crate::events`]).
    pub fn matchable_blocks(&self) -> Vec<(usize, u64)> {
        let g = self.g();
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.alive && !node.doomed {
                for gi in 0..g {
                    if self.blocks[i * g + gi] != 0 {
                        out.push((gi, node.hash));
                    }
                }
            }
        }
        out
    }

    /// Calls `f(group, handle)` for every block the tree holds.
    pub fn for_each_block(&self, mut f: impl FnMut(usize, Handle)) {
        let g = self.g();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.alive {
                for gi in 0..g {
                    let h = self.blocks[i * g + gi];
                    if h != 0 {
                        f(gi, h);
                    }
                }
            }
        }
    }

    /// Unpinned bytes the tree could give back by evicting everything evictable (an upper bound
    /// used to refuse hopeless admissions before evicting anything).
    pub fn evictable_bytes(&self) -> u64 {
        self.held_bytes - self.pinned_bytes
    }

    /// Bytes of the nodes in `path` that nothing holds: what pinning `path` would take out of
    /// [`evictable_bytes`](Self::evictable_bytes).
    pub fn unpinned_bytes(&self, path: &[NodeId]) -> u64 {
        path.iter()
            .filter(|&&n| !self.held(n))
            .map(|&n| self.node_bytes(n))
            .sum()
    }
}

mod evict;
mod resume;
mod retain;
pub use evict::Unit;
#[cfg(test)]
mod tests;
mod validate;
