//! The scheduler-facing KV cache manager.
//!
//! One [`SlabArena`] holds every group's blocks (one class per KV group). A [`PrefixTree`]
//! indexes cached blocks. Requests go through `admit` → `extend`* → `finish` (or `abort`).
//!
//! ## What a request holds
//! Token positions `[0, len)` of a running request are *scheduled*: their KV is in the cache or
//! is being computed by the engine in the current step. Its block table for group `g` has one
//! entry per block of `[0, len)`:
//! - positions below the hit come from the prefix tree (shared, read-only);
//! - positions at or above the hit are written by the engine this step or were written in an
//!   earlier one; each such block is either private to the request or was attached to the tree
//!   by this request (in-flight sharing);
//! - in a sliding group (swa-aware policy) only blocks overlapping the running window
//!   `[len - W, len)` (or `[E - W, E)` for the last whole-block boundary `E`, one block more
//!   when W is not a multiple of B) and blocks of planned checkpoints are present; every other
//!   entry is [`NULL_PAGE`]. An engine's prefill kernel writes KV only where the table has a page
//!   and attends to the chunk's own freshly computed keys elsewhere (as flash-attention prefill
//!   does).
//!   Blocks leave the table at the request's *next* call, not in the call that schedules a
//!   range: the engine's step over `[start, end)` still reads the window before `start` and
//!   writes every block of the range (a checkpoint's extra block included). A decoding request
//!   therefore never holds more than `ceil(W / B) + 1` private blocks per sliding group; while a
//!   chunk of `n` tokens is computed, `ceil((W + n - 1) / B) + 1`.
//!
//! ## Checkpoints (swa-aware policy)
//! SWA KV is kept as windows ending where later requests resume:
//! - the end of each prompt's last whole block `Pc`: the blocks overlapping `[Pc - W - B, Pc)`,
//!   so that a resume at `Pc` and at `Pc - B` (a prompt that diverges inside the last block, or
//!   an identical prompt) are both window-safe;
//! - the end of each finished request's last whole block `E`: the window `[E - W, E)` its
//!   running window still holds;
//! - a branch point: when a prompt's full-attention KV matches the tree deeper than its
//!   window-safe hit, it recomputes the window before the divergence; that window is kept;
//! - optionally every `checkpoint_interval` tokens of long prompts.
//!
//! ## What the tree publishes
//! A block (of every group) becomes matchable only once all of its tokens are scheduled into the
//! very page the tree hands out, by the request that allocated that page: a chunk that ends
//! inside a block publishes it at the call that completes it (a branch window's block on a node
//! another request linked included), and a finish or abort publishes nothing past the last whole
//! block its owner scheduled. The manager records which pages hold a whole block
//! (`manager/written.rs`) and `validate` checks every tree block against that record.
//!
//! ## Failed steps
//! Whole prompt blocks become matchable as soon as they are scheduled, so a request admitted
//! later in the same step can reuse them (the engine computes both in one forward pass). If a
//! step fails, the engine must `abort` every request scheduled in it: abort removes what a
//! request created, and anything another aborted request still pinned is removed when that
//! request is aborted.

mod admit;
mod api;
mod config;
mod events;
mod extend;
mod fetching;
mod request;
mod retention;
mod room;
mod schedule;
mod stats;
mod step;
mod tables;
mod tiering;
mod validate;
mod written;

pub use api::{Admission, Decode, Extension, Prompt, Step, StepOutcome};
pub use config::{LoadPolicy, ManagerConfig, Policy};
pub use fetching::{KvWait, LoadStats};
pub use retention::{Retention, MAX_PRIORITY};
pub use stats::{CheckpointKindStats, GroupStats, ManagerStats, TierStats};
pub use tiering::{BlockResidency, Promotion, TierHits};

use std::collections::HashMap;
use std::sync::Arc;

use request::{Prehashed, Refused, ReqSet, Request, Running};
use retention::{Clock, Pins};
use schedule::Slot;
use written::WrittenPages;

use crate::error::{Error, Result};
use crate::prefix::{Freed, Layout, NodeId, PrefixTree, Victim};
use crate::slab::{Handle, SlabArena};
use crate::spec::ModelSpec;
use crate::tiers::loader::{LoadJob, Loader};
use crate::tiers::{BlockStore, DeviceBuffer, LowerTiers};

pub use crate::spec::MAX_GROUPS;

/// Longest sequence a request may reach, in tokens (far beyond any model's context; it keeps a
/// mistaken count from turning into a loop over billions of blocks).
pub const MAX_SEQUENCE_TOKENS: u64 = 1 << 32;

/// Page index marking "no block here" in a block table (a released or never-written SWA
/// position).
pub const NULL_PAGE: i32 = -1;

/// The KV cache manager: one arena of blocks, the prefix tree over the cached ones, the running
/// requests, and the lower tiers (see the module docs for what a request holds).
///
/// A request's lifecycle:
/// 1. [`admit`](Self::admit) (or an admission in [`step`](Self::step)): the prompt's chained
///    block hashes are walked in the tree (after promoting what the lower tiers add); the
///    window-safe hit is served from cache, and the rest of the prompt (or its first chunk,
///    `max_tokens`) gets new blocks, evicting cached ones if needed. `None` when even eviction
///    cannot make room: nothing changed.
/// 2. [`extend`](Self::extend) (or `extend`/`decode` in a step), any number of times: the rest
///    of the prompt (chunked prefill) and then output tokens. Whole prompt blocks are published
///    to the tree as soon as they are scheduled (other requests may share them in flight);
///    sliding-window blocks leave the table as the window moves on. `false` when there is no
///    room: nothing changed (the scheduler preempts).
/// 3. [`finish`](Self::finish): its whole blocks enter the cache with the window at its end;
///    or [`abort`](Self::abort): nothing of it stays.
///
/// A request may also say how its prefix is retained ([`Retention`]: a priority for eviction, a
/// timed pin of its first tokens, or no caching at all) with
/// [`admit_with_retention`](Self::admit_with_retention) or [`Admission::retention`].
///
/// Between calls the engine reads [`block_table`](Self::block_table) (or its `_into` and
/// `_range_into` forms) for each group, and, with
/// [`ManagerConfig::events`], drains
/// [`take_events`](Self::take_events): the blocks that entered and left the prefix cache.
#[derive(Debug)]
pub struct KVCacheManager {
    spec: ModelSpec,
    config: ManagerConfig,
    arena: SlabArena,
    tree: PrefixTree,
    /// Running requests, boxed so that taking one out for an operation moves a pointer, not
    /// the whole record (the decode hot path does it for every request every step).
    requests: Running,
    serial: u64,
    hit_tokens: u64,
    miss_tokens: u64,
    admissions_refused: u64,
    extensions_refused: u64,
    evicted_leaves: u64,
    evicted_checkpoints: u64,
    aborted_blocks: u64,
    window_released: u64,
    /// Which pages hold a whole block (what the tree may publish; checked by `validate`).
    written: WrittenPages,
    scratch: Freed,
    scratch_handles: Vec<Handle>,
    scratch_plan: Vec<Slot>,
    /// Slots of a step's extensions, and the ids it admits (see `check_step`).
    scratch_slots: Vec<usize>,
    /// The slots of a step's extensions that start or complete a block (found by the check
    /// pass; their block-table lines are requested before the run pass).
    crossing: Vec<usize>,
    scratch_ids: ReqSet,
    /// A step's admissions' chained hashes, computed before its extensions (see `prehash`).
    prehashed: Prehashed,
    /// Token <-> block arithmetic for `config.block_tokens`.
    bm: BlockMath,
    /// Records of finished requests, reused by admissions. Boxed because the running map holds
    /// boxes: recycling moves a pointer, not the record.
    #[allow(clippy::vec_box)]
    request_pool: Vec<Box<Request>>,
    /// Batched steps served (stamps requests named in a step).
    steps: u64,
    /// Host memory, disk and remote store below L1.
    lower: LowerTiers,
    /// The engine's buffer, once registered (bytes move only then).
    device: Option<Arc<dyn DeviceBuffer>>,
    loader: Option<Loader>,
    inflight: Vec<tiering::Inflight>,
    node_jobs: HashMap<NodeId, Arc<LoadJob>>,
    /// Per model layer: whether it slides (the loader copies those first).
    layer_sliding: Vec<bool>,
    victims: Vec<Victim>,
    /// Prompt tokens served by promotion, by the deepest tier they came from.
    promoted_tokens: [u64; 3],
    promotion_failures: u64,
    /// What the promotions of the last `admit` or `step` call loaded (see [`Promotion`]).
    promotions: Vec<Promotion>,
    refused: Refused,
    /// Retention pins on cached prefixes, and the clock that times them (see `retention`).
    pins: Pins,
    clock: Clock,
    /// Background loads from disk and the remote store, the requests waiting on them, and the
    /// load-or-recompute estimates (see `fetching`). Boxed: rarely touched on the hot path.
    fetching: Box<fetching::Fetching>,
}

/// Token <-> block arithmetic; a shift when the block size is a power of two (it nearly always
/// is), as this runs several times per decode token.
#[derive(Debug, Clone, Copy)]
struct BlockMath {
    b: u64,
    /// log2(b) when b is a power of two, else u32::MAX.
    shift: u32,
}

impl BlockMath {
    fn new(block_tokens: u32) -> Self {
        let shift = if block_tokens.is_power_of_two() {
            block_tokens.trailing_zeros()
        } else {
            u32::MAX
        };
        BlockMath {
            b: u64::from(block_tokens),
            shift,
        }
    }

    /// `x / B`.
    fn floor(self, x: u64) -> u64 {
        if self.shift != u32::MAX {
            x >> self.shift
        } else {
            x / self.b
        }
    }

    /// `ceil(x / B)`.
    fn ceil(self, x: u64) -> u64 {
        self.floor(x + self.b - 1)
    }

    /// What appending `n` tokens to a sequence of `len` does at block boundaries: (needs a new
    /// block: `len` is at a boundary or the tokens go past its last block, i.e.
    /// `ceil((len + n) / B) > ceil(len / B)`; completes a block: the window's floor may move and
    /// a whole block may be hashed).
    #[inline(always)]
    fn boundaries(self, len: u64, n: u64) -> (bool, bool) {
        let into = self.rem(len);
        (into == 0 || into + n > self.b, into + n >= self.b)
    }

    /// `x mod B`: how far `x` is into its block.
    fn rem(self, x: u64) -> u64 {
        if self.shift != u32::MAX {
            x & (self.b - 1)
        } else {
            x % self.b
        }
    }
}

impl KVCacheManager {
    /// A manager for `spec` over `capacity_bytes` of memory.
    pub fn new(spec: ModelSpec, capacity_bytes: u64, config: ManagerConfig) -> Result<Self> {
        Self::with_stores(spec, capacity_bytes, config, None, None)
    }

    /// A manager whose disk and remote tiers use the stores `setup` names (see
    /// [`StoreSetup`](crate::tiers::StoreSetup)).
    pub fn with_setup(
        spec: ModelSpec,
        capacity_bytes: u64,
        config: ManagerConfig,
        setup: crate::tiers::StoreSetup,
    ) -> Result<Self> {
        if setup.disk_dir.is_some() && config.lower.disk == 0 {
            return Err(Error::invalid(
                "disk_bytes",
                "a disk directory needs a positive disk_bytes",
            ));
        }
        if setup.remote.is_some() && config.lower.remote == 0 {
            return Err(Error::invalid(
                "remote_bytes",
                "a remote store needs a positive remote_bytes",
            ));
        }
        let (disk, remote) = setup.open(&spec, config.block_tokens)?;
        Self::with_stores(spec, capacity_bytes, config, disk, remote)
    }

    /// A manager whose disk (L3) and remote (L4) tiers keep real bytes in the given stores
    /// (`None`: the tier, if it has a capacity, is virtual: counted, no bytes).
    pub fn with_stores(
        spec: ModelSpec,
        capacity_bytes: u64,
        config: ManagerConfig,
        disk: Option<Box<dyn BlockStore>>,
        remote: Option<Box<dyn BlockStore>>,
    ) -> Result<Self> {
        check_config(&spec, &config)?;
        let block_bytes = spec.block_bytes(config.block_tokens);
        let mut arena = SlabArena::new(capacity_bytes, &block_bytes, config.slab_bytes)?;
        let layout = Layout {
            windows: spec.groups.iter().map(|g| g.window).collect(),
            block_bytes,
            block_tokens: config.block_tokens,
            swa_aware: config.policy == Policy::SwaAware,
        };
        let bm = BlockMath::new(config.block_tokens);
        let shape = block_shape(&spec, &layout)?;
        if config.lower.disk == 0 && disk.is_some() || config.lower.remote == 0 && remote.is_some()
        {
            return Err(Error::invalid(
                "tiers",
                "a store was given for a tier with no capacity",
            ));
        }
        let namespace = crate::tiers::namespace(&spec, config.block_tokens);
        let mut lower = LowerTiers::new(shape, config.lower, namespace, disk, remote)?;
        lower.index.record_events(config.events);
        let mut layer_sliding = vec![false; spec.num_layers as usize];
        for g in &spec.groups {
            for &l in &g.layers {
                layer_sliding[l as usize] = g.window.is_some();
            }
        }
        let load_cost = config.load_cost;
        let mut tree = PrefixTree::new(layout, config.eviction);
        tree.record_events(config.events);
        prefault(&spec, &config, &mut arena, &mut tree)?;
        Ok(KVCacheManager {
            spec,
            config,
            arena,
            tree,
            requests: Running::default(),
            serial: 0,
            hit_tokens: 0,
            miss_tokens: 0,
            admissions_refused: 0,
            extensions_refused: 0,
            evicted_leaves: 0,
            evicted_checkpoints: 0,
            aborted_blocks: 0,
            window_released: 0,
            written: WrittenPages::default(),
            scratch: Vec::new(),
            scratch_handles: Vec::new(),
            scratch_plan: Vec::new(),
            scratch_slots: Vec::new(),
            crossing: Vec::new(),
            scratch_ids: ReqSet::default(),
            prehashed: Prehashed::default(),
            bm,
            request_pool: Vec::new(),
            steps: 0,
            lower,
            device: None,
            loader: None,
            inflight: Vec::new(),
            node_jobs: HashMap::new(),
            layer_sliding,
            victims: Vec::new(),
            promoted_tokens: [0; 3],
            promotion_failures: 0,
            promotions: Vec::new(),
            refused: Refused::default(),
            pins: Pins::new(),
            clock: Clock::Wall(std::time::Instant::now()),
            fetching: Box::new(fetching::Fetching::new(crate::tiers::LoadEstimate::new(
                load_cost,
            ))),
        })
    }

    /// Gives [`Eviction::Oracle`](crate::Eviction::Oracle) the trace's future: request i of
    /// `future` is the i-th request the simulator replays (its id is i).
    pub(crate) fn set_future(&mut self, future: std::sync::Arc<crate::eviction::FutureUses>) {
        self.tree.set_future(future);
    }

    /// Tells the oracle that request i of its future is being admitted.
    pub(crate) fn oracle_admitted(&mut self, i: usize) {
        self.tree.oracle_admitted(i);
    }

    /// The model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The settings.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The arena (read-only: pages, offsets, class sizes).
    pub fn arena(&self) -> &SlabArena {
        &self.arena
    }

    /// Bytes an admission could have now: free in the arena plus held only by the cache
    /// (evictable). An engine's admission gate compares a request's need with it.
    pub fn room_bytes(&self) -> u64 {
        self.arena.bytes_free() + self.tree.evictable_bytes()
    }

    fn b(&self) -> u64 {
        u64::from(self.config.block_tokens)
    }

    fn swa_aware(&self) -> bool {
        self.config.policy == Policy::SwaAware
    }

    fn window(&self, g: usize) -> Option<u32> {
        self.spec.groups[g].window
    }

    /// First block overlapping the window `[end - w, end)`.
    fn window_first(&self, end: u64, w: u32) -> u64 {
        self.bm.floor(end.saturating_sub(u64::from(w)))
    }
}

/// Checks the settings and the model's shape before anything is built.
fn check_config(spec: &ModelSpec, config: &ManagerConfig) -> Result<()> {
    if config.block_tokens == 0 {
        return Err(Error::invalid("block_tokens", "must be positive"));
    }
    if config.checkpoint_interval == Some(0) {
        return Err(Error::invalid(
            "checkpoint_interval",
            "must be positive (or None)",
        ));
    }
    if let Some(a) = config.resume_granularity {
        if a == 0 || a % u64::from(config.block_tokens) != 0 {
            return Err(Error::invalid(
                "resume_granularity",
                format!(
                    "{a} is not a positive multiple of block_tokens ({})",
                    config.block_tokens
                ),
            ));
        }
    }
    config.load_cost.validate()?;
    if spec.groups.is_empty() {
        return Err(Error::invalid("spec", "the model has no KV groups"));
    }
    if spec.groups.len() > MAX_GROUPS {
        return Err(Error::invalid(
            "spec",
            format!(
                "{} KV groups; kvalloc supports at most {MAX_GROUPS}",
                spec.groups.len()
            ),
        ));
    }
    Ok(())
}

/// What the lower tiers store per block: each group's block and layer sizes, and which groups
/// are full attention.
fn block_shape(spec: &ModelSpec, layout: &Layout) -> Result<crate::tiers::BlockShape> {
    Ok(crate::tiers::BlockShape {
        block_bytes: layout.block_bytes.clone(),
        layer_bytes: spec
            .groups
            .iter()
            .map(|g| {
                u32::try_from(g.layer_bytes_per_token() * u64::from(layout.block_tokens))
                    .map_err(|_| Error::invalid("block_tokens", "a layer's block exceeds 4 GiB"))
            })
            .collect::<Result<_>>()?,
        full_mask: spec
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.window.is_none())
            .fold(0u16, |m, (i, _)| m | (1 << i)),
    })
}

/// Commits the bookkeeping memory `config.prefault_bytes` allows: half for the tree, the rest
/// for the arena's records.
fn prefault(
    spec: &ModelSpec,
    config: &ManagerConfig,
    arena: &mut SlabArena,
    tree: &mut PrefixTree,
) -> Result<()> {
    // Every node holds a block of each full group, so those bound the tree. A model with
    // sliding groups only has no such bound (tombstones hold nothing); its blocks serve as
    // the estimate there (this only sizes what is committed up front).
    let pages = |g| arena.num_pages(g).expect("a class per group");
    let max_nodes = (0..spec.groups.len())
        .filter(|&g| spec.groups[g].window.is_none())
        .map(pages)
        .min()
        .unwrap_or_else(|| (0..spec.groups.len()).map(pages).sum());
    if let Some(ram) = crate::mem::prefault::physical_memory() {
        if config.prefault_bytes > ram {
            return Err(Error::invalid(
                "prefault_bytes",
                format!(
                    "{} bytes is more than this machine's memory ({ram} bytes)",
                    config.prefault_bytes
                ),
            ));
        }
    }
    let tree_bytes = tree.prefault(config.prefault_bytes / 2, max_nodes)?;
    arena.prefault(config.prefault_bytes - tree_bytes)?;
    Ok(())
}
