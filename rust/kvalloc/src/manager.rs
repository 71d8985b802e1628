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

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

mod tiering;
mod written;

pub use tiering::{BlockResidency, TierHits};
use written::WrittenPages;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::hash;
use crate::policy::Eviction;
use crate::prefix::{Evicted, Freed, HashIndex, Layout, Linked, NodeId, PrefixTree, Victim, NONE};
use crate::slab::{Handle, SlabArena};
use crate::spec::{KVGroup, ModelSpec};
use crate::tiers::loader::{LoadJob, Loader};
use crate::tiers::{
    BlockStore, DeviceBuffer, LowerCapacity, LowerTiers, OverlapModel, Tier, TierCounters,
};

/// Request ids are often sequential integers: spread them with one multiply (Fibonacci
/// hashing) rather than SipHash, which costs more than the rest of a decode step.
#[derive(Default, Clone, Copy)]
struct ReqIdHasher(u64);

impl Hasher for ReqIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ReqSet = std::collections::HashSet<u64, BuildHasherDefault<ReqIdHasher>>;

/// Running requests: an id -> slot map over a slab of boxed records, so that a batched step looks
/// each request up once (while checking the step) and then works on it by slot. A slot is `None`
/// when free, or while its record is taken out for an operation. The map is the prefix tree's
/// open-addressing [`HashIndex`]: one cache line per lookup where `HashMap` reads two (a decode
/// step looks up every running request).
#[derive(Debug, Default)]
struct Running {
    slots_by_id: HashIndex,
    slots: Vec<Option<Box<Request>>>,
    free: Vec<u32>,
}

impl Running {
    fn len(&self) -> usize {
        self.slots_by_id.len()
    }

    fn contains(&self, id: u64) -> bool {
        self.slots_by_id.contains_key(id)
    }

    #[inline(always)]
    fn slot(&self, id: u64) -> Option<usize> {
        self.slots_by_id.get(id).map(|s| s as usize)
    }

    fn get(&self, id: u64) -> Option<&Request> {
        self.slots[self.slot(id)?].as_deref()
    }

    fn at_mut(&mut self, slot: usize) -> Option<&mut Request> {
        self.slots[slot].as_deref_mut()
    }

    fn insert(&mut self, id: u64, r: Box<Request>) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(r);
                s
            }
            None => {
                self.slots.push(Some(r));
                (self.slots.len() - 1) as u32
            }
        };
        let present = self.slots_by_id.get_or_insert(id, slot);
        debug_assert!(present.is_none(), "request {id} inserted twice");
    }

    fn remove(&mut self, id: u64) -> Option<Box<Request>> {
        let slot = self.slots_by_id.remove(id)?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    /// (id, record) of every running request not taken out.
    fn iter(&self) -> impl Iterator<Item = (u64, &Request)> {
        self.slots_by_id
            .iter()
            .filter_map(|(id, s)| self.slots[s as usize].as_deref().map(|r| (id, r)))
    }

    /// The map's invariants, and every slot either holds a running request or is listed free.
    fn validate(&self) -> std::result::Result<(), String> {
        self.slots_by_id.validate()?;
        let free = self.slots.iter().filter(|s| s.is_none()).count();
        if self.len() + free != self.slots.len() || free != self.free.len() {
            return Err(format!(
                "{} running requests, {} slots, {free} of them free but {} listed free",
                self.len(),
                self.slots.len(),
                self.free.len()
            ));
        }
        Ok(())
    }
}

/// Most KV groups a model may have (real hybrid models have 2 to 4).
pub const MAX_GROUPS: usize = 16;

/// Longest sequence a request may reach, in tokens (far beyond any model's context; it keeps a
/// mistaken count from turning into a loop over billions of blocks).
pub const MAX_SEQUENCE_TOKENS: u64 = 1 << 32;

/// Page index marking "no block here" in a block table (a released or never-written SWA
/// position).
pub const NULL_PAGE: i32 = -1;

/// How sliding-window groups are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// SWA KV kept only as checkpoints at resume points.
    #[default]
    SwaAware,
    /// Every group keeps every cached token (what a non-SWA-aware prefix cache does).
    Dense,
}

impl Policy {
    /// Parses "swa-aware" or "dense".
    pub fn parse(s: &str) -> Result<Policy> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "swa-aware" | "swa" => Ok(Policy::SwaAware),
            "dense" => Ok(Policy::Dense),
            other => Err(Error::invalid(
                "policy",
                format!("unknown policy {other:?}; expected \"swa-aware\" or \"dense\""),
            )),
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::SwaAware => "swa-aware",
            Policy::Dense => "dense",
        }
    }
}

/// Manager settings beyond the model and the budget.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Tokens per block (the unit of allocation and hashing).
    pub block_tokens: u32,
    /// How sliding groups are cached.
    pub policy: Policy,
    /// Eviction order.
    pub eviction: Eviction,
    /// Also keep a checkpoint every this many tokens of a prompt (None: only at resume points).
    pub checkpoint_interval: Option<u64>,
    /// Slab size; chosen from the block sizes when None.
    pub slab_bytes: Option<u64>,
    /// Capacities of the lower tiers (host, disk, remote; 0: absent).
    pub lower: LowerCapacity,
    /// Write each finished request's cached blocks through to the remote store, so other
    /// instances can use them at once.
    pub write_through: bool,
    /// Bandwidths and compute speed for the exposed-load-time model.
    pub overlap: OverlapModel,
    /// Prompts resume only at multiples of this many tokens (a block-hash trace whose blocks
    /// are coarser than `block_tokens`: the next turn matches up to the previous prompt's last
    /// whole trace block). The prompt-end checkpoint then goes there, without the extra block,
    /// instead of at the prompt's last whole block. A multiple of `block_tokens`; None: any block.
    pub resume_granularity: Option<u64>,
    /// An admission must leave at least this many bytes free or evictable (a watermark, as in
    /// vLLM v0): room for the running requests' next decode blocks, so that a scheduler admitting
    /// "whatever fits now" does not have to preempt a step later. Extensions ignore it. 0: none.
    pub admission_reserve_bytes: u64,
    /// Bookkeeping memory (tree nodes, slab records) committed at construction: as much as the
    /// budget's blocks can use, up to this. Growth within it takes no page faults on the
    /// scheduler's path (a page's first touch costs microseconds in a virtual machine); beyond
    /// it the bookkeeping grows on demand. 0: none.
    pub prefault_bytes: u64,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            block_tokens: 16,
            policy: Policy::SwaAware,
            eviction: Eviction::Value,
            checkpoint_interval: None,
            slab_bytes: None,
            lower: LowerCapacity::default(),
            write_through: false,
            overlap: OverlapModel::default(),
            resume_granularity: None,
            admission_reserve_bytes: 0,
            prefault_bytes: 32 << 20,
        }
    }
}

/// A prompt: token ids, or precomputed block hashes (one per whole block; a trailing partial
/// block's id may be included and is ignored).
#[derive(Debug, Clone, Copy)]
pub enum Prompt<'a> {
    /// Token ids.
    Tokens(&'a [i64]),
    /// Block hashes plus the prompt's length in tokens.
    BlockHashes {
        /// One id per block of `block_tokens`.
        hashes: &'a [u64],
        /// Prompt length in tokens.
        num_tokens: u64,
    },
}

impl Prompt<'_> {
    fn len(&self) -> u64 {
        match self {
            Prompt::Tokens(t) => t.len() as u64,
            Prompt::BlockHashes { num_tokens, .. } => *num_tokens,
        }
    }
}

/// Tokens appended to a running request.
#[derive(Debug, Clone, Copy)]
pub enum Extension<'a> {
    /// New token ids (after the prompt is fully scheduled).
    Tokens(&'a [i64]),
    /// Schedule this many more tokens: the rest of the prompt first (chunked prefill), then, for
    /// requests admitted with block hashes, opaque output tokens.
    Count(u64),
}

/// One decode token for each of many running requests, as two columns: request `ids[k]` gets
/// token `tokens[k]`. The same as `extend` entries `(ids[k], Extension::Tokens(&[tokens[k]]))`,
/// without building a tuple per request (a decode step names every running request, and its
/// extension list was the largest thing a step read and wrote).
///
/// ```
/// use kvalloc::{Decode, KVCacheManager, ManagerConfig, ModelSpec, Prompt, Step};
/// let spec = ModelSpec::preset("mimo-v2.5-pro")?;
/// let mut m = KVCacheManager::new(spec, 40 << 30, ManagerConfig::default())?;
/// for id in 0..3 {
///     let prompt: Vec<i64> = (0..100).map(|t| t + 1000 * id).collect();
///     m.admit(id as u64, Prompt::Tokens(&prompt), None, None)?;
/// }
/// let out = m.step(&Step {
///     finish: vec![2],
///     decode: Decode { ids: &[0, 1], tokens: &[42, 43] },
///     ..Step::default()
/// })?;
/// assert_eq!((out.extensions, out.refused.len()), (2, 0));
/// assert_eq!(m.num_tokens(0)?, 101);
/// # Ok::<(), kvalloc::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct Decode<'a> {
    /// Running requests, each at most once per step (counting `extend` and finish/abort too).
    pub ids: &'a [u64],
    /// One token id per request, in the order of `ids`.
    pub tokens: &'a [i64],
}

/// One admission in a batched step.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// Request id (unique among running requests).
    pub req: u64,
    /// The prompt.
    pub prompt: Prompt<'a>,
    /// Tenant salt: requests with different salts never share KV.
    pub salt: Option<&'a [u8]>,
    /// Schedule at most this many prompt tokens now (chunked prefill); None: all.
    pub max_tokens: Option<u64>,
}

/// A whole scheduler step: finishes and aborts first (they free memory), then extensions of
/// running requests, then admissions.
#[derive(Debug, Clone, Default)]
pub struct Step<'a> {
    /// Requests that finished.
    pub finish: Vec<u64>,
    /// Requests to drop without caching anything.
    pub abort: Vec<u64>,
    /// Running requests to extend.
    pub extend: Vec<(u64, Extension<'a>)>,
    /// Running requests to extend by one token each, after `extend`.
    pub decode: Decode<'a>,
    /// New requests.
    pub admit: Vec<Admission<'a>>,
    /// First come, first served: stop at the first admission that does not fit. The ones after
    /// it are not attempted (`StepOutcome::admitted` ends at the refusal), so a queue whose head
    /// waits for memory costs one refused lookup per step, not one per queued request.
    pub fcfs: bool,
    /// Admit only if every extension fit: a scheduler that must preempt in a step admits
    /// nothing new in it (as vLLM's and SGLang's do), so decode and admissions can share one
    /// call. When an extension is refused no admission is attempted (`StepOutcome::admitted`
    /// is empty).
    pub admit_if_extended: bool,
}

/// What a step did, in the order of its inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutcome {
    /// Extensions attempted: those of `extend`, then those of `decode`.
    pub extensions: usize,
    /// Positions (in that order) of the extensions that did not fit, ascending. A list of the
    /// few refusals rather than a flag per extension: a decode step has hundreds of
    /// extensions and nearly always no refusal.
    pub refused: Vec<usize>,
    /// Per admission attempted: tokens served from cache, or None when it did not fit. With
    /// [`Step::fcfs`] it ends at the first None.
    pub admitted: Vec<Option<u64>>,
}

impl StepOutcome {
    /// Per extension, in order: whether it fit.
    pub fn extended(&self) -> Vec<bool> {
        let mut v = vec![true; self.extensions];
        for &i in &self.refused {
            v[i] = false;
        }
        v
    }
}

/// Per-group accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Blocks held privately by running requests.
    pub running: u64,
    /// Blocks held by the prefix cache (including those running requests share).
    pub cached: u64,
    /// Blocks the arena could still allocate for this group.
    pub free: u64,
    /// Cached nodes without this group's block (sliding groups).
    pub tombstones: u64,
}

/// A snapshot of the manager's accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerStats {
    /// One entry per KV group.
    pub groups: Vec<GroupStats>,
    /// Running requests.
    pub running_requests: u64,
    /// Cached blocks (tree nodes).
    pub cached_blocks: u64,
    /// Registered SWA checkpoints.
    pub checkpoints: u64,
    /// Prompt tokens served from cache.
    pub hit_tokens: u64,
    /// Prompt tokens computed.
    pub miss_tokens: u64,
    /// Admissions refused for lack of memory.
    pub admissions_refused: u64,
    /// Extensions refused for lack of memory.
    pub extensions_refused: u64,
    /// Leaf nodes evicted (full-attention prefix shortened).
    pub evicted_leaves: u64,
    /// Interior checkpoints evicted (SWA only; tombstones left).
    pub evicted_checkpoints: u64,
    /// Blocks released by aborts.
    pub aborted_blocks: u64,
    /// SWA blocks released as they left a running window.
    pub window_released_blocks: u64,
    /// Bytes of live blocks.
    pub bytes_in_use: u64,
    /// The budget.
    pub capacity_bytes: u64,
    /// Bytes no block can use (slab padding plus the tail below one slab).
    pub padding_waste_bytes: u64,
    /// The lower tiers that are configured (host, disk, remote, in that order).
    pub tiers: Vec<TierStats>,
    /// Exposed (not hidden by compute) load seconds of all promotions, from the overlap model.
    pub exposed_load_seconds: f64,
    /// Promotions abandoned because a lower-tier read failed (checksum, store down).
    pub promotion_failures: u64,
    /// Loads from host memory still in flight.
    pub loads_in_flight: u64,
}

/// One lower tier's accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStats {
    /// "host", "disk" or "remote".
    pub name: &'static str,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Payload bytes held.
    pub used_bytes: u64,
    /// Blocks (records) held.
    pub records: u64,
    /// Prompt tokens promoted from this tier (as the deepest source of their promotion).
    pub promoted_tokens: u64,
    /// Whether bytes really move (false: virtual, counted only).
    pub real: bool,
    /// Traffic and failure counters.
    pub counters: TierCounters,
    /// The byte store's own counters (disk, remote), when it is real.
    pub store: Option<crate::tiers::StoreCounters>,
}

/// A running request. `repr(C)`, aligned to a cache line, with the fields a decode step reads
/// first, so that step touches one line of the record (plus its tail) when no block boundary
/// is crossed.
#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Request {
    /// Number of the last batched step that named this request.
    stamp: u64,
    /// Scheduled tokens: the block tables cover `[0, len)` (`ceil(len / B)` blocks each).
    len: u64,
    prompt_len: u64,
    /// Where the last scheduled range began (its step still reads the window before it).
    last_start: u64,
    /// Token ids after the last whole block (ids mode), for hashing output blocks.
    tail: Vec<i64>,
    by_ids: bool,
    seed: u64,
    /// Chained hashes of the whole blocks known so far.
    hashes: Vec<u64>,
    /// Per group, per block index: the block, or 0.
    tables: Vec<Vec<Handle>>,
    /// Per group: blocks below this index hold nothing any more (released out of the window).
    swa_floor: Vec<u64>,
    hit: u64,
    /// Pinned tree nodes; `path[i]` is block i's node.
    path: Vec<NodeId>,
    /// Nodes this request inserted (removed again on abort).
    created: Vec<NodeId>,
    /// Checkpoints this request registered (removed again on abort).
    created_ckpts: Vec<NodeId>,
    /// Planned prompt checkpoints: (end block, run includes one extra block), ascending.
    plans: Vec<(u32, bool)>,
    /// Plans registered so far.
    plans_done: usize,
    /// Serial for synthetic output-block ids (hash mode).
    serial: u64,
    /// Loads its hit waits for (promotions from host memory in flight at admission).
    loads: Vec<Arc<LoadJob>>,
}

/// The last admission refused as hopeless. A scheduler retries its queue's head every step: a
/// retry of the same prompt reuses its chained hashes, and while its walk would give the same
/// answer (the tree's version stands still, or at least no node of the matched path changed
/// and the path cannot be extended: then the need is the same too) and free plus all evictable
/// bytes are still short of that need, it is refused without a walk.
#[derive(Debug, Default)]
struct Refused {
    valid: bool,
    req: u64,
    seed: u64,
    by_ids: bool,
    /// The prompt as given: token ids, or block ids with the length in tokens.
    tokens: Vec<i64>,
    ids: Vec<u64>,
    num_tokens: u64,
    /// Its chained block hashes.
    hashes: Vec<u64>,
    /// The nodes its last walk matched.
    path: Vec<NodeId>,
    /// At the last refusal: the chunk limit, the need in bytes, the tree's version.
    max_tokens: Option<u64>,
    need_bytes: u64,
    version: u64,
}

impl Refused {
    fn same(&self, req: u64, seed: u64, prompt: &Prompt<'_>) -> bool {
        self.valid
            && self.req == req
            && self.seed == seed
            && match *prompt {
                Prompt::Tokens(t) => self.by_ids && self.tokens == t,
                Prompt::BlockHashes { hashes, num_tokens } => {
                    !self.by_ids && self.num_tokens == num_tokens && self.ids == hashes
                }
            }
    }

    fn remember(&mut self, req: u64, seed: u64, prompt: &Prompt<'_>, r: &Request) {
        self.valid = true;
        self.req = req;
        self.seed = seed;
        self.tokens.clear();
        self.ids.clear();
        match *prompt {
            Prompt::Tokens(t) => {
                self.by_ids = true;
                self.tokens.extend_from_slice(t);
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                self.by_ids = false;
                self.ids.extend_from_slice(hashes);
                self.num_tokens = num_tokens;
            }
        }
        self.hashes.clear();
        self.hashes.extend_from_slice(&r.hashes);
    }
}

/// A batched step's admissions' chained hashes, computed before its extensions run so that the
/// index lines their walks read can be prefetched meanwhile (see [`KVCacheManager::prehash`]).
#[derive(Debug, Default)]
struct Prehashed {
    /// Per admission of the step: its chained hashes, where `ready`. Each is swapped with the
    /// admitted request's (emptied) vector, so capacity circulates and nothing is copied.
    lists: Vec<Vec<u64>>,
    ready: Vec<bool>,
}

/// At most this many prompt blocks are hashed ahead per step: an `fcfs` refusal leaves the
/// admissions after it unattempted, and their hashing wasted.
const PREHASH_MAX_BLOCKS: usize = 4096;

/// Per-admission hash vectors kept between steps (a step admitting more allocates the rest).
const PREHASH_KEPT_LISTS: usize = 256;

/// At most this many index lines are prefetched per step (more would push each other out of
/// the first-level cache before they are read).
const PREFETCH_MAX_LINES: usize = 256;

/// The KV cache manager. See the module docs.
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
    exposed_load_seconds: f64,
    refused: Refused,
}

/// Marks a decode's slot (in `check_step`'s slot list) as a plain append, run by
/// `append_plain`: its checks already made, most of a decode step's tokens skip them.
const PLAIN: usize = 1 << (usize::BITS - 1);

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

/// Releases a running request's sliding-window blocks below the window ending at its last
/// whole-block boundary `E` (the window `[E - W, E)` may still become the output-end
/// checkpoint), keeping what the step computing tokens from `keep_start` on reads and writes
/// (`u64::MAX`: nothing extra): private blocks go back to the arena, tree blocks are simply no
/// longer referenced. Returns how many blocks went back. A free function over the fields it needs, so
/// the decode path can call it while holding the request.
fn release_below_window(
    bm: BlockMath,
    groups: &[KVGroup],
    tree: &PrefixTree,
    arena: &mut SlabArena,
    r: &mut Request,
    scratch: &mut Vec<Handle>,
    keep_start: u64,
) -> u64 {
    scratch.clear();
    let whole = bm.floor(r.len) * bm.b;
    for (g, group) in groups.iter().enumerate() {
        let Some(w) = group.window else { continue };
        let wf = bm
            .floor(whole.saturating_sub(u64::from(w)))
            .min(r.tables[g].len() as u64);
        // The step that computes `[keep_start, len)` reads keys from `keep_start + 1 - W` on
        // and writes every block of the range: those stay in the table until the next call.
        let keep_from = match keep_start {
            u64::MAX => u64::MAX,
            s => bm.floor((s + 1).saturating_sub(u64::from(w))),
        };
        let wf = wf.min(keep_from);
        for i in r.swa_floor[g]..wf {
            let h = std::mem::replace(&mut r.tables[g][i as usize], 0);
            let shared = r
                .path
                .get(i as usize)
                .is_some_and(|&node| tree.block(node, g) == h);
            if h != 0 && !shared {
                scratch.push(h);
            }
        }
        r.swa_floor[g] = r.swa_floor[g].max(wf);
    }
    if !scratch.is_empty() {
        arena
            .free(scratch)
            .expect("a running request's private blocks are live");
    }
    scratch.len() as u64
}

/// [`KVCacheManager::check_step`] for one extension of the request in `slot` of `records`:
/// its stamp set (a second mention in the step finds it). Returns whether it is a plain
/// append: it neither starts nor completes a block and follows a decode (not a chunk), so
/// running it only appends (see [`PLAIN`]); one that does either is listed in `crossing`.
#[inline(always)]
fn check_step_extension(
    bm: BlockMath,
    records: &mut [Option<Box<Request>>],
    crossing: &mut Vec<usize>,
    stamp: u64,
    id: u64,
    slot: usize,
    ext: Extension<'_>,
) -> Result<bool> {
    let Some(r) = records[slot].as_deref_mut().filter(|r| r.stamp != stamp) else {
        return Err(KVCacheManager::not_extensible(id));
    };
    r.stamp = stamp;
    KVCacheManager::check_extension(id, r, ext)?;
    // A decode token lands in the tail: start loading that line now, so the run pass
    // (after every check) finds it in cache rather than taking a miss per request.
    crate::prefetch::prefetch(r.tail.as_ptr_range().end);
    // One that starts a block (new blocks) or completes one (its hash, and the window's
    // release) reaches into more of the record's vectors: request their lines too.
    let n = match ext {
        Extension::Tokens(t) => t.len() as u64,
        Extension::Count(n) => n,
    };
    let (opens, closes) = bm.boundaries(r.len, n);
    if opens || closes {
        crate::prefetch::prefetch(r.tables.as_ptr());
        crate::prefetch::prefetch(r.swa_floor.as_ptr());
        crate::prefetch::prefetch(r.tail.as_ptr());
        crate::prefetch::prefetch(r.hashes.as_ptr_range().end);
        crossing.push(slot);
        return Ok(false);
    }
    Ok(r.len - r.last_start.min(r.len) <= 1)
}

/// The decode path's new blocks: one per group (the newest block is inside every window), or
/// false, changing nothing, when that needs eviction. Out of line: one decode token in B
/// crosses a block boundary, and the rest keep their registers.
#[cold]
#[inline(never)]
fn decode_new_blocks(
    arena: &mut SlabArena,
    written: &mut WrittenPages,
    groups: usize,
    r: &mut Request,
) -> bool {
    if !arena.fits(&[1; MAX_GROUPS][..groups]) {
        return false;
    }
    for g in 0..groups {
        let h = arena.alloc_one(g).expect("fits was checked");
        written.set(h, false);
        r.tables[g].push(h);
    }
    true
}

/// A decode that reaches `end`, a block boundary, completes the block before it in every group.
#[cold]
#[inline(never)]
fn mark_last_whole(bm: BlockMath, written: &mut WrittenPages, r: &Request, end: u64) {
    let i = (bm.floor(end) - 1) as usize;
    for table in &r.tables {
        if table[i] != 0 {
            written.set(table[i], true);
        }
    }
}

/// Hashes a running request's newly completed output blocks (prompt blocks are hashed at
/// admission): from its token ids, or, for a request admitted with block hashes, from ids
/// unique to the request and position (opaque output nothing else can match).
#[inline(always)]
fn hash_output(bm: BlockMath, r: &mut Request, tokens: Option<&[i64]>) {
    match tokens {
        // A decode token that completes no block: only remember it.
        Some(&[t]) if r.tail.len() + 1 < bm.b as usize => r.tail.push(t),
        _ => hash_output_blocks(bm, r, tokens),
    }
}

/// [`hash_output`] when blocks may complete (out of line, as for `decode_new_blocks`).
#[cold]
#[inline(never)]
fn hash_output_blocks(bm: BlockMath, r: &mut Request, tokens: Option<&[i64]>) {
    match tokens {
        Some(t) => {
            r.tail.extend_from_slice(t);
            let whole = (bm.floor(r.tail.len() as u64) * bm.b) as usize;
            if whole > 0 {
                hash::chain_tokens(r.seed, &r.tail[..whole], bm.b as usize, &mut r.hashes);
                r.tail.drain(..whole);
            }
        }
        None => {
            while (r.hashes.len() as u64) < bm.floor(r.len) {
                let i = r.hashes.len() as u64;
                let id = hash::digest(&[r.serial.to_le_bytes(), i.to_le_bytes()].concat());
                hash::chain_ids(r.seed, &[id], &mut r.hashes);
            }
        }
    }
}

/// What `schedule` does with one block of the range it extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nothing (already held, or a sliding position outside every window and checkpoint).
    Skip,
    /// A new block the request keeps to itself.
    Private,
    /// A new block that goes to the tree (full KV of a prompt block, or a checkpoint block).
    Tree,
    /// A block allocated by an earlier chunk that goes to the tree now that it is whole.
    Carried,
}

impl Slot {
    fn to_tree(self) -> bool {
        matches!(self, Slot::Tree | Slot::Carried)
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
        let block_bytes = spec.block_bytes(config.block_tokens);
        let mut arena = SlabArena::new(capacity_bytes, &block_bytes, config.slab_bytes)?;
        let layout = Layout {
            windows: spec.groups.iter().map(|g| g.window).collect(),
            block_bytes,
            block_tokens: config.block_tokens,
            swa_aware: config.policy == Policy::SwaAware,
        };
        let bm = BlockMath::new(config.block_tokens);
        let shape = crate::tiers::BlockShape {
            block_bytes: layout.block_bytes.clone(),
            layer_bytes: spec
                .groups
                .iter()
                .map(|g| {
                    u32::try_from(g.layer_bytes_per_token() * u64::from(config.block_tokens))
                        .map_err(|_| {
                            Error::invalid("block_tokens", "a layer's block exceeds 4 GiB")
                        })
                })
                .collect::<Result<_>>()?,
            full_mask: spec
                .groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.window.is_none())
                .fold(0u16, |m, (i, _)| m | (1 << i)),
        };
        if config.lower.disk == 0 && disk.is_some() || config.lower.remote == 0 && remote.is_some()
        {
            return Err(Error::invalid(
                "tiers",
                "a store was given for a tier with no capacity",
            ));
        }
        let namespace = crate::tiers::namespace(&spec, config.block_tokens);
        let lower = LowerTiers::new(shape, config.lower, namespace, disk, remote)?;
        let mut layer_sliding = vec![false; spec.num_layers as usize];
        for g in &spec.groups {
            for &l in &g.layers {
                layer_sliding[l as usize] = g.window.is_some();
            }
        }
        let mut tree = PrefixTree::new(layout, config.eviction);
        // Every node holds a block of each full group, so those bound the tree. A model with
        // sliding groups only has no such bound (tombstones hold nothing); its blocks serve as
        // the estimate there (this only sizes what is committed up front).
        let pages = |g| arena.num_pages(g).expect("a class per group");
        let max_nodes = (0..spec.groups.len())
            .filter(|&g| spec.groups[g].window.is_none())
            .map(pages)
            .min()
            .unwrap_or_else(|| (0..spec.groups.len()).map(pages).sum());
        if let Some(ram) = crate::prefault::physical_memory() {
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
            exposed_load_seconds: 0.0,
            refused: Refused::default(),
        })
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

    /// Checks a prompt's shape without hashing it.
    fn check_prompt(&self, prompt: &Prompt<'_>) -> Result<()> {
        if prompt.len() > MAX_SEQUENCE_TOKENS {
            return Err(Error::invalid(
                "num_tokens",
                format!(
                    "{} tokens exceeds the limit of {MAX_SEQUENCE_TOKENS}",
                    prompt.len()
                ),
            ));
        }
        match *prompt {
            Prompt::Tokens(t) => {
                if t.is_empty() {
                    return Err(Error::invalid("tokens", "the prompt is empty"));
                }
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                if num_tokens == 0 {
                    return Err(Error::invalid("num_tokens", "the prompt is empty"));
                }
                let whole = self.bm.floor(num_tokens);
                let all = self.bm.ceil(num_tokens);
                if (hashes.len() as u64) < whole || hashes.len() as u64 > all {
                    return Err(Error::invalid(
                        "block_hashes",
                        format!(
                            "{} hashes for {num_tokens} tokens; expected {whole} (whole blocks of \
                             {}) or {all} (with the partial last block)",
                            hashes.len(),
                            self.b()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn prompt_hashes(&self, prompt: &Prompt<'_>, seed: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        self.prompt_hashes_into(prompt, seed, None, &mut out)?;
        Ok(out)
    }

    /// Appends the chained hashes of a prompt's whole blocks to `out` (empty on entry).
    /// `prev`: another token prompt, its chained hashes under the same seed (a batched step's
    /// previous admission) and how many blocks it shared with the one before it; a token
    /// prompt's leading blocks equal to `prev`'s take its hashes (a comparison of ids instead
    /// of a hash each), and the rest are hashed on from there. That many blocks are compared
    /// in one go first (prompts admitted together tend to share the same system prompt), then
    /// block by block. Returns how many hashes were taken from `prev`. Inlined: out of line, a
    /// batched step's hashing ahead ran 1,000 more instructions (callgrind,
    /// `benches/step_loop.py`).
    #[inline(always)]
    fn prompt_hashes_into(
        &self,
        prompt: &Prompt<'_>,
        seed: u64,
        prev: Option<(&[i64], &[u64], usize)>,
        out: &mut Vec<u64>,
    ) -> Result<usize> {
        self.check_prompt(prompt)?;
        let b = self.b() as usize;
        out.reserve(self.bm.floor(prompt.len()) as usize);
        match *prompt {
            Prompt::Tokens(t) => {
                let same = match prev {
                    Some((prev_tokens, prev_hashes, guess)) => {
                        // One comparison of the blocks the previous pair shared, if all of
                        // them are shared again; then block by block.
                        let g = guess * b;
                        let from = if guess > 0
                            && guess <= prev_hashes.len()
                            && g <= t.len()
                            && g <= prev_tokens.len()
                            && t[..g] == prev_tokens[..g]
                        {
                            guess
                        } else {
                            0
                        };
                        let same = from
                            + t[from * b..]
                                .chunks_exact(b)
                                .zip(prev_tokens[from * b..].chunks_exact(b))
                                .zip(&prev_hashes[from..])
                                .take_while(|((x, y), _)| x == y)
                                .count();
                        out.extend_from_slice(&prev_hashes[..same]);
                        same
                    }
                    None => 0,
                };
                hash::chain_tokens(seed, &t[same * b..], b, out);
                Ok(same)
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                let whole = self.bm.floor(num_tokens) as usize;
                hash::chain_ids(seed, &hashes[..whole], out);
                Ok(0)
            }
        }
    }

    /// Keeps a finished request's record (and its vectors' capacity) for the next admission.
    fn recycle(&mut self, r: Box<Request>) {
        // A bounded pool of modest records: a long request's vectors are not worth keeping.
        const POOL: usize = 256;
        const MAX_BLOCKS: usize = 4096;
        if self.request_pool.len() < POOL && r.hashes.capacity() <= MAX_BLOCKS {
            self.request_pool.push(r);
        }
    }

    /// Window-safe hit length in tokens for a prompt, without changing anything.
    pub fn match_prefix(&self, prompt: Prompt<'_>, salt: Option<&[u8]>) -> Result<u64> {
        let seed = hash::root_seed(salt);
        let hashes = self.prompt_hashes(&prompt, seed)?;
        let max_safe = self.bm.floor(prompt.len() - 1) as u32;
        let mut path = Vec::new();
        Ok(u64::from(self.tree.walk(&hashes, max_safe, &mut path).safe) * self.b())
    }

    /// Admits a request (see the module docs). Returns the prompt tokens served from cache, or
    /// `None` when even eviction cannot make room; then nothing changed but cache evictions.
    pub fn admit(
        &mut self,
        req: u64,
        prompt: Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
    ) -> Result<Option<u64>> {
        self.admit_with(req, prompt, salt, max_tokens, None)
    }

    /// [`admit`](Self::admit), with the prompt's chained hashes when a step computed them
    /// ahead (`prehashed`, taken by swapping vectors; the prompt was checked then).
    fn admit_with(
        &mut self,
        req: u64,
        prompt: Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
        prehashed: Option<&mut Vec<u64>>,
    ) -> Result<Option<u64>> {
        if self.requests.contains(req) {
            return Err(Error::Request {
                req,
                message: "is already running".into(),
            });
        }
        if max_tokens == Some(0) {
            return Err(Error::invalid("max_tokens", "must be positive (or None)"));
        }
        let seed = hash::root_seed(salt);
        let retry = self.refused.same(req, seed, &prompt);
        if retry && self.refused.max_tokens == max_tokens && self.refused_again() {
            // The walk is the same: the version is the tree's now.
            self.refused.version = self.tree.version();
            self.admissions_refused += 1;
            return Ok(None);
        }
        // A recycled request keeps its vectors' capacity: admission allocates nothing in the
        // steady state.
        let mut r = self.request_pool.pop().unwrap_or_default();
        r.hashes.clear();
        if retry {
            r.hashes.extend_from_slice(&self.refused.hashes);
        } else if let Some(h) = prehashed {
            std::mem::swap(&mut r.hashes, h);
        } else if let Err(e) = self.prompt_hashes_into(&prompt, seed, None, &mut r.hashes) {
            self.recycle(r);
            return Err(e);
        }
        let len = prompt.len();
        let b = self.b();
        let max_safe = self.bm.floor(len - 1) as u32;
        if self.lower.active() {
            self.reap_loads();
            let hashes = std::mem::take(&mut r.hashes);
            let promoted = self.promote(&hashes, max_safe, len);
            r.hashes = hashes;
            if let Err(e) = promoted {
                self.recycle(r);
                return Err(e);
            }
        }
        r.path.clear();
        let walk = self.tree.walk(&r.hashes, max_safe, &mut r.path);
        let hit = u64::from(walk.safe) * b;
        let n_full = self.bm.floor(len) as u32;

        self.serial += 1;
        r.seed = seed;
        r.by_ids = matches!(prompt, Prompt::Tokens(_));
        r.tail.clear();
        if let Prompt::Tokens(t) = prompt {
            r.tail
                .extend_from_slice(&t[(n_full as usize * b as usize)..]);
        }
        r.prompt_len = len;
        r.len = hit;
        r.hit = hit;
        r.created.clear();
        r.created_ckpts.clear();
        let groups = self.spec.groups.len();
        r.tables.resize_with(groups, Vec::new);
        r.swa_floor.clear();
        r.swa_floor.resize(groups, 0);
        r.plans.clear();
        self.plan_checkpoints(walk.safe, walk.depth, n_full, &mut r.plans);
        r.plans_done = 0;
        r.serial = self.serial;
        r.stamp = 0;
        // Blocks below the hit come from the tree: full groups everywhere, sliding groups in
        // the hit's window.
        for g in 0..self.spec.groups.len() {
            let first = match self.window(g) {
                Some(w) => self.window_first(hit, w),
                None => 0,
            };
            let tree = &self.tree;
            let table = &mut r.tables[g];
            table.clear();
            table.reserve(self.bm.ceil(len) as usize + 1);
            let (below, window) = r.path[..walk.safe as usize].split_at(first as usize);
            table.resize(below.len(), 0);
            table.extend(window.iter().map(|&n| tree.block(n, g)));
            // Nothing below the hit's window is held: no need to scan it for release.
            r.swa_floor[g] = first;
        }
        let end = match max_tokens {
            // Saturating: a limit near 2^64 is "the whole prompt", not a wrapped small one.
            Some(m) => len.min(hit.saturating_add(m)),
            None => len,
        };
        let mut plan = std::mem::take(&mut self.scratch_plan);
        let counts = self.plan_range(&r, r.len, end, &mut plan);
        if let Some(need_bytes) = self.hopeless(&r, &counts)? {
            self.scratch_plan = plan;
            if !retry {
                self.refused.remember(req, seed, &prompt, &r);
            }
            self.refused.max_tokens = max_tokens;
            self.refused.need_bytes = need_bytes;
            self.refused.version = self.tree.version();
            self.refused.path.clear();
            self.refused.path.extend_from_slice(&r.path);
            self.admissions_refused += 1;
            self.recycle(r);
            return Ok(None);
        }
        // Pin the matched path so eviction cannot take it while we make room.
        for &n in &r.path {
            self.tree.pin(n);
        }
        if !self.schedule_planned(&mut r, end, plan, &counts)? {
            let mut freed = std::mem::take(&mut self.scratch);
            for &n in &r.path {
                self.tree.unpin(n, &mut freed);
            }
            self.release(&mut freed);
            self.scratch = freed;
            self.admissions_refused += 1;
            self.recycle(r);
            return Ok(None);
        }
        if walk.safe > 0 {
            self.tree.record_hit(r.path[walk.safe as usize - 1]);
        }
        r.loads.clear();
        if self.lower.active() {
            self.touch_lower(&r.hashes[..walk.safe as usize]);
            for &n in &r.path[..walk.safe as usize] {
                if let Some(j) = self.node_jobs.get(&n) {
                    if !r.loads.iter().any(|x| Arc::ptr_eq(x, j)) {
                        r.loads.push(j.clone());
                    }
                }
            }
        }
        self.hit_tokens += hit;
        self.miss_tokens += len - hit;
        self.requests.insert(req, r);
        Ok(Some(hit))
    }

    /// Whether scheduling `[r.len, end)` of a request being admitted (`counts`: the blocks its
    /// plan allocates) cannot fit, with the admission reserve left over, even after evicting
    /// everything evictable once its matched path is pinned (then its need in bytes, reserve
    /// included; while loads are in flight the reserve is not applied):
    /// the test `make_room` makes, done before pinning, so that a refused admission (a
    /// scheduler retries its queue's head every step) changes nothing and costs a walk rather
    /// than a pin and unpin of its path.
    fn hopeless(&self, r: &Request, counts: &[u64; MAX_GROUPS]) -> Result<Option<u64>> {
        if !self.inflight.is_empty() {
            return Ok(None); // `make_room` waits for loads in flight before it refuses
        }
        let groups = self.spec.groups.len();
        let reserve = self.config.admission_reserve_bytes;
        if reserve == 0 && self.arena.fits(&counts[..groups]) {
            return Ok(None);
        }
        let need_bytes: u64 = (0..groups)
            .map(|g| counts[g] * self.tree.layout().block_bytes[g])
            .sum::<u64>()
            + reserve;
        let evictable = self.tree.evictable_bytes() - self.tree.unpinned_bytes(&r.path);
        Ok((need_bytes > self.arena.bytes_free() + evictable).then_some(need_bytes))
    }

    /// Drops the remembered refusal, so the next retry is evaluated in full. For tests that
    /// check the shortcut gives the same answers as the full evaluation.
    #[doc(hidden)]
    pub fn forget_refusal(&mut self) {
        self.refused.valid = false;
    }

    /// Whether the retry of the admission [`Refused`] remembers is sure to be refused again:
    /// its walk is unchanged since (the tree's version, else the nodes of its path: the same
    /// walk, the same need) and free plus all evictable bytes are still short of that need. Not
    /// with lower tiers, whose contents change outside this manager, nor with loads in flight.
    fn refused_again(&self) -> bool {
        let m = &self.refused;
        !self.lower.active()
            && self.inflight.is_empty()
            && self.arena.bytes_free() + self.tree.evictable_bytes() < m.need_bytes
            && (self.tree.version() == m.version
                || self.tree.path_unchanged(
                    &m.path,
                    m.version,
                    m.hashes.get(m.path.len()).copied(),
                ))
    }

    /// Planned prompt checkpoints: (end block, with the extra block).
    fn plan_checkpoints(&self, safe: u32, depth: u32, n_full: u32, plans: &mut Vec<(u32, bool)>) {
        if !self.swa_aware() || !self.spec.groups.iter().any(|g| g.window.is_some()) {
            return;
        }
        if safe < depth && depth < n_full {
            plans.push((depth, false)); // branch point: this request computes the window
        }
        if let Some(iv) = self.config.checkpoint_interval {
            let b = self.b();
            let mut t = iv;
            while t < u64::from(n_full) * b {
                let e = (t / b) as u32;
                if e > safe && e != depth {
                    plans.push((e, false));
                }
                t += iv;
            }
        }
        match self.config.resume_granularity {
            // The prompt's last resume point; one this request did not compute needs no plan.
            Some(a) => {
                let b = self.b();
                let e = (u64::from(n_full) * b / a * a / b) as u32;
                if e > safe {
                    plans.push((e, false));
                }
            }
            None if n_full > 0 => plans.push((n_full, true)),
            None => {}
        }
        plans.sort_unstable();
        plans.dedup_by_key(|p| p.0);
    }

    /// Whether block `i` of sliding group `g` belongs to a planned checkpoint run.
    fn in_plan(&self, r: &Request, g: usize, i: u64) -> bool {
        let w = self.window(g).expect("sliding");
        r.plans.iter().any(|&(e, extra)| {
            let e = u64::from(e);
            let first = self
                .window_first(e * self.b(), w)
                .saturating_sub(u64::from(extra));
            i >= first && i < e
        })
    }

    /// Extends `r`'s scheduled range to `end`: allocates what the new positions need (evicting
    /// cached entries if necessary), links prompt blocks into the tree, registers checkpoints
    /// whose windows are complete, and releases SWA blocks that left the window. Returns false,
    /// changing nothing, when it does not fit.
    fn schedule(&mut self, r: &mut Request, end: u64) -> Result<bool> {
        // 1. Decide each block of `[first_blk, end_blk)` once (the buffer is reused).
        let mut plan = std::mem::take(&mut self.scratch_plan);
        let counts = self.plan_range(r, r.len, end, &mut plan);
        self.schedule_planned(r, end, plan, &counts)
    }

    /// [`schedule`](Self::schedule) with the plan of `[r.len, end)` and its counts already made.
    fn schedule_planned(
        &mut self,
        r: &mut Request,
        end: u64,
        plan: Vec<Slot>,
        counts: &[u64; MAX_GROUPS],
    ) -> Result<bool> {
        let start = r.len;
        debug_assert!(end > start);
        let first_blk = self.bm.floor(start);
        let end_blk = self.bm.ceil(end);
        let n_full_prompt = self.bm.floor(r.prompt_len);
        let groups = self.spec.groups.len();
        let span = (end_blk - first_blk) as usize;
        // 2. Make room, all or nothing.
        if !self.make_room(&counts[..groups])? {
            self.scratch_plan = plan;
            return Ok(false);
        }
        // 3. Allocate and fill the tables in block order.
        for t in r.tables.iter_mut() {
            if (t.len() as u64) < end_blk {
                t.resize(end_blk as usize, 0);
            }
        }
        let mut handles = std::mem::take(&mut self.scratch_handles);
        for g in 0..groups {
            if counts[g] == 0 {
                continue;
            }
            handles.clear();
            self.arena.alloc_into(g, counts[g] as usize, &mut handles)?;
            let mut next = handles.iter();
            for (k, slot) in plan[g * span..(g + 1) * span].iter().enumerate() {
                if matches!(slot, Slot::Tree | Slot::Private) {
                    r.tables[g][first_blk as usize + k] = *next.next().expect("allocated");
                }
            }
            debug_assert!(next.next().is_none());
        }
        self.scratch_handles = handles;
        // Every page of the range is the request's own (new, or left partial by its last
        // call): whole once the range covers its block.
        let whole_blocks = self.bm.floor(end);
        for table in &r.tables {
            for (i, &h) in table[first_blk as usize..end_blk as usize]
                .iter()
                .enumerate()
            {
                if h != 0 {
                    self.written.set(h, first_blk + (i as u64) < whole_blocks);
                }
            }
        }
        // 4. Link whole prompt blocks into the tree (in-flight sharing).
        let whole_end = self.bm.floor(end).min(n_full_prompt);
        let path_before = r.path.len();
        let mut linked_shared = false;
        for i in r.path.len() as u64..whole_end {
            // `i < first_blk`: a conflict in an earlier call stopped linking; those blocks'
            // attach state is not in this call's span (and `i - first_blk` would underflow).
            if r.path.len() as u64 != i || i < first_blk {
                break; // linking stopped at a conflict: the rest stays private
            }
            let mut take = [false; MAX_GROUPS];
            let k = (i - first_blk) as usize;
            // `plan` holds `groups` runs of `span` slots.
            for (t, group_plan) in take.iter_mut().zip(plan.chunks_exact(span)) {
                *t = group_plan[k].to_tree();
            }
            match self.link_block(r, i, &take[..groups]) {
                None => break,
                Some(true) => r.created.push(*r.path.last().expect("just linked")),
                Some(false) => linked_shared = true,
            }
        }
        // Checkpoint blocks for nodes that already existed (a branch window, or a node another
        // request linked first): nodes this call inserted took their blocks already. Only whole
        // blocks: a block this call computes part of is published by the call that completes
        // it (as `Carried`), so the tree never hands out a page its owner has not finished.
        let existing_end = if linked_shared {
            r.path.len()
        } else {
            path_before
        };
        let attach_span = existing_end
            .min(whole_end as usize)
            .saturating_sub(first_blk as usize)
            .min(span);
        for g in 0..groups {
            for k in 0..attach_span {
                let i = first_blk as usize + k;
                if plan[g * span + k].to_tree() && self.tree.block(r.path[i], g) == 0 {
                    self.tree.attach(r.path[i], g, r.tables[g][i]);
                }
            }
        }
        self.scratch_plan = plan;
        r.len = end;
        // 5. Register planned checkpoints whose runs are complete.
        while r.plans_done < r.plans.len() && u64::from(r.plans[r.plans_done].0) <= whole_end {
            let (e, extra) = r.plans[r.plans_done];
            r.plans_done += 1;
            if e as usize > r.path.len() {
                continue; // not linked (a hash conflict): no checkpoint there
            }
            let max_blocks = self.run_lengths(e, extra);
            let n = r.path[e as usize - 1];
            if self.tree.add_checkpoint(n, &max_blocks) {
                r.created_ckpts.push(n);
            }
        }
        // 6. Release SWA blocks that left the window, except what the engine's step over
        // `[start, end)` still reads (the window before `start`) or writes (a checkpoint's extra
        // block below the new window): those go at the request's next call.
        if self.swa_aware() {
            self.window_released += release_below_window(
                self.bm,
                &self.spec.groups,
                &self.tree,
                &mut self.arena,
                r,
                &mut self.scratch_handles,
                start,
            );
            r.last_start = start;
        }
        Ok(true)
    }

    /// What scheduling `[start, end)` for `r` does with each block: `plan[g * span + k]` for
    /// block `first_blk + k` of group g. Returns the blocks to allocate per group. Reads only:
    /// admission uses it to refuse a hopeless request before pinning anything.
    fn plan_range(
        &self,
        r: &Request,
        start: u64,
        end: u64,
        plan: &mut Vec<Slot>,
    ) -> [u64; MAX_GROUPS] {
        let b = self.b();
        let first_blk = self.bm.floor(start);
        let end_blk = self.bm.ceil(end);
        let n_full_prompt = self.bm.floor(r.prompt_len);
        let whole_tokens = self.bm.floor(end) * b;
        let groups = self.spec.groups.len();
        let span = (end_blk - first_blk) as usize;
        plan.clear();
        plan.resize(groups * span, Slot::Skip);
        let mut counts = [0u64; MAX_GROUPS];
        for g in 0..groups {
            let table = &r.tables[g];
            // Keep the window of the last whole-block boundary too (see `release_below_window`).
            let window_first = self.window(g).map(|w| self.window_first(whole_tokens, w));
            for i in first_blk..end_blk {
                let k = g * span + (i - first_blk) as usize;
                let is_prompt_block = i < n_full_prompt;
                if (i as usize) < table.len() && table[i as usize] != 0 {
                    // A block a previous chunk left partial is in the table but not in the
                    // tree: it goes there once whole (its full KV, or its checkpoint SWA KV),
                    // into the node this call links, or into the node already on the path
                    // that lacks it (a branch window), never before.
                    let unpublished = is_prompt_block
                        && r.path
                            .get(i as usize)
                            .is_none_or(|&n| self.tree.block(n, g) == 0);
                    let sliding = window_first.is_some() && self.swa_aware();
                    if unpublished && (!sliding || self.in_plan(r, g, i)) {
                        plan[k] = Slot::Carried;
                    }
                    continue;
                }
                let node = r.path.get(i as usize).copied();
                let node_has = node.is_some_and(|n| self.tree.block(n, g) != 0);
                plan[k] = match window_first {
                    Some(wf) if self.swa_aware() => {
                        if is_prompt_block && !node_has && self.in_plan(r, g, i) {
                            Slot::Tree // a checkpoint block
                        } else if i >= wf {
                            Slot::Private // the running window
                        } else {
                            Slot::Skip
                        }
                    }
                    // Full groups, and every group under the dense policy.
                    _ if is_prompt_block && !node_has => Slot::Tree,
                    _ => Slot::Private,
                };
                if matches!(plan[k], Slot::Tree | Slot::Private) {
                    counts[g] += 1;
                }
            }
        }
        counts
    }

    /// Per sliding group, the longest run a checkpoint ending at block `e` may cover.
    /// Indexed like the sliding groups; no allocation (it runs for every admission).
    fn run_lengths(&self, e: u32, extra: bool) -> [u32; MAX_GROUPS] {
        let mut out = [0; MAX_GROUPS];
        let windows = self.spec.groups.iter().filter_map(|g| g.window);
        for (o, w) in out.iter_mut().zip(windows) {
            let t = self.tree.layout().window_blocks(e, w);
            *o = (t + u32::from(extra)).min(e);
        }
        out
    }

    fn is_private(&self, r: &Request, g: usize, i: u64) -> bool {
        let h = r.tables[g][i as usize];
        h != 0
            && r.path
                .get(i as usize)
                .is_none_or(|&n| self.tree.block(n, g) != h)
    }

    /// Links block `i` of `r` (its parent is `r.path[i - 1]`) into the tree and pins it: shares
    /// the node if one is there (the request's blocks stay private), else inserts one that takes
    /// the request's block of each group with `take[g]`. Returns `Some(true)` for a new node,
    /// `Some(false)` for a shared one, `None` when the hash belongs elsewhere (linking stops).
    fn link_block(&mut self, r: &mut Request, i: u64, take: &[bool]) -> Option<bool> {
        let hash = r.hashes[i as usize];
        let parent = if i == 0 { NONE } else { r.path[i as usize - 1] };
        let mut blocks = [0 as Handle; MAX_GROUPS];
        for (g, b) in blocks.iter_mut().enumerate().take(take.len()) {
            if take[g] {
                *b = r.tables[g][i as usize];
            }
        }
        let mut freed = std::mem::take(&mut self.scratch);
        let link = self
            .tree
            .link(hash, parent, i as u32, &blocks[..take.len()], &mut freed);
        self.release(&mut freed);
        self.scratch = freed;
        match link {
            Linked::Present(n) => {
                self.tree.pin(n);
                r.path.push(n);
                Some(false)
            }
            Linked::Conflict => None,
            Linked::Inserted(n) => {
                r.path.push(n);
                Some(true)
            }
        }
    }

    /// Evicts until `need` fits. False if it cannot (the pre-check keeps a hopeless request
    /// from emptying the cache).
    fn make_room(&mut self, need: &[u64]) -> Result<bool> {
        if self.arena.fits(need) {
            return Ok(true);
        }
        let need_bytes: u64 = need
            .iter()
            .zip(&self.tree.layout().block_bytes)
            .map(|(&n, &bb)| n * bb)
            .sum();
        if need_bytes > self.arena.bytes_free() + self.tree.evictable_bytes() {
            // Blocks that loads in flight are filling cannot be evicted until their copies land:
            // wait for them (milliseconds) rather than refuse.
            if self.inflight.is_empty() {
                return Ok(false);
            }
            self.wait_loads();
            if need_bytes > self.arena.bytes_free() + self.tree.evictable_bytes() {
                return Ok(false);
            }
        }
        let mut freed = std::mem::take(&mut self.scratch);
        let tiers = self.lower.active();
        let mut victims = std::mem::take(&mut self.victims);
        // Until the evicted bytes cover the shortfall nothing can fit: evict without giving
        // blocks back or asking the arena, then free them in one batch.
        let short = need_bytes.saturating_sub(self.arena.bytes_free());
        let mut evicted_bytes = 0;
        let ok = loop {
            victims.clear();
            let before = freed.len();
            let evicted = if tiers {
                self.tree.evict_one_logged(&mut freed, &mut victims)
            } else {
                self.tree.evict_one(&mut freed)
            };
            match evicted {
                None => {
                    self.release(&mut freed);
                    break false;
                }
                Some(Evicted::Leaf) => self.evicted_leaves += 1,
                Some(Evicted::Checkpoint) => self.evicted_checkpoints += 1,
            }
            if tiers {
                // Before the blocks go back: their bytes are copied down first.
                self.demote(&victims);
            }
            let layout = self.tree.layout();
            evicted_bytes += freed[before..]
                .iter()
                .map(|&(g, _)| layout.block_bytes[g])
                .sum::<u64>();
            if evicted_bytes < short {
                continue;
            }
            self.release(&mut freed);
            if self.arena.fits(need) {
                break true;
            }
        };
        self.scratch = freed;
        self.victims = victims;
        Ok(ok)
    }

    fn release(&mut self, freed: &mut Freed) {
        if freed.is_empty() {
            return;
        }
        let mut hs = std::mem::take(&mut self.scratch_handles);
        hs.clear();
        hs.extend(freed.iter().map(|&(_, h)| h));
        freed.clear();
        self.arena
            .free(&hs)
            .expect("blocks released by the manager are live and owned once");
        self.scratch_handles = hs;
    }

    /// The decode hot path: appends up to one block of output tokens (ids, or a count for a
    /// request admitted with block hashes) to a request whose prompt is fully scheduled,
    /// touching only that request, the arena and (read-only) the tree. Returns None when the
    /// general path must handle the call: unknown request, prompt pending, an extension the
    /// request does not accept (the general path reports it), or no block without evicting.
    #[inline(always)]
    fn try_decode(&mut self, slot: usize, ext: Extension<'_>) -> Option<bool> {
        let (n, tokens) = match ext {
            Extension::Tokens(t) => (t.len() as u64, Some(t)),
            Extension::Count(n) => (n, None),
        };
        let bm = self.bm;
        let swa_aware = self.swa_aware();
        let KVCacheManager {
            requests,
            arena,
            tree,
            spec,
            window_released,
            scratch_handles,
            written,
            ..
        } = self;
        let r = requests.at_mut(slot)?;
        if r.len < r.prompt_len || r.by_ids != tokens.is_some() || n == 0 || n > bm.b {
            return None;
        }
        let end = r.len + n;
        // The tables hold `ceil(len / B)` blocks (checked by `validate`): no need to read them
        // unless the tokens go past the last one.
        let (opens, closes) = bm.boundaries(r.len, n);
        if opens && !decode_new_blocks(arena, written, spec.groups.len(), r) {
            return None; // eviction needed: the general path
        }
        if closes {
            mark_last_whole(bm, written, r, end);
        }
        // The window's floor moves only when a block boundary is crossed, or after a chunk
        // (whose step kept the window before it).
        let crossed = closes || r.len - r.last_start.min(r.len) > 1;
        let start = r.len;
        r.last_start = start;
        r.len = end;
        if swa_aware && crossed {
            // Several tokens at once (speculative decoding): the step computing them reads the
            // window before the first, which stays until the next call.
            let keep = if n > 1 { start } else { u64::MAX };
            *window_released +=
                release_below_window(bm, &spec.groups, tree, arena, r, scratch_handles, keep);
        }
        hash_output(bm, r, tokens);
        Some(true)
    }

    /// A decode token that `check_step` found to be a plain append (no block boundary, no
    /// window to move, a token-id request past its prompt): what [`try_decode`](Self::try_decode)
    /// would do, without asking again.
    #[inline(always)]
    fn append_plain(&mut self, slot: usize, token: i64) {
        let r = self.requests.at_mut(slot).expect("checked this step");
        debug_assert!(r.by_ids && r.len >= r.prompt_len && r.tail.len() + 1 < self.bm.b as usize);
        r.last_start = r.len;
        r.len += 1;
        r.tail.push(token);
    }

    /// Appends tokens to a running request (see [`Extension`]). Returns false, changing
    /// nothing, when there is no room even after eviction.
    pub fn extend(&mut self, req: u64, ext: Extension<'_>) -> Result<bool> {
        let slot = self.requests.slot(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        self.extend_at(slot, req, ext)
    }

    /// [`extend`](Self::extend) of the request in `slot` (named `req` in errors): the decode
    /// fast path inline, the general one out of line (a batched step runs this per request).
    #[inline(always)]
    fn extend_at(&mut self, slot: usize, req: u64, ext: Extension<'_>) -> Result<bool> {
        match self.try_decode(slot, ext) {
            Some(ok) => Ok(ok),
            None => self.extend_general(slot, req, ext),
        }
    }

    /// The general path of [`extend_at`](Self::extend_at): prompt chunks, eviction, errors.
    #[inline(never)]
    fn extend_general(&mut self, slot: usize, req: u64, ext: Extension<'_>) -> Result<bool> {
        // Take the record out of its slot for the general path (and put it back).
        let mut r = self.requests.slots[slot].take().ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        let res = self.extend_inner(req, &mut r, ext);
        self.requests.slots[slot] = Some(r);
        if res == Ok(false) {
            self.extensions_refused += 1;
        }
        res
    }

    fn extend_inner(&mut self, req: u64, r: &mut Request, ext: Extension<'_>) -> Result<bool> {
        Self::check_extension(req, r, ext)?;
        let (n, tokens) = match ext {
            Extension::Tokens(t) => (t.len() as u64, Some(t)),
            Extension::Count(n) => (n, None),
        };
        if n == 0 {
            return Ok(true);
        }
        if !self.schedule(r, r.len + n)? {
            return Ok(false);
        }
        hash_output(self.bm, r, tokens);
        Ok(true)
    }

    /// Finishes a request: its computed whole blocks (prompt and output) enter the prefix cache,
    /// with the output-end checkpoint; everything else it held is freed.
    pub fn finish(&mut self, req: u64) -> Result<()> {
        let mut r = self.requests.remove(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        let b = self.b();
        let groups = self.spec.groups.len();
        let e = (r.len / b).min(r.hashes.len() as u64);
        // Link output blocks: the tree takes their full-attention blocks (every block under
        // the dense policy); SWA blocks are attached below for the output-end window only.
        let mut take = [false; MAX_GROUPS];
        for (g, t) in take.iter_mut().enumerate().take(groups) {
            *t = self.window(g).is_none() || !self.swa_aware();
        }
        for i in r.path.len() as u64..e {
            if r.path.len() as u64 != i || self.link_block(&mut r, i, &take[..groups]).is_none() {
                break; // linking stopped at a conflict: the rest stays private
            }
        }
        let e = e.min(r.path.len() as u64);
        // Keep the window ending at E (swa-aware) or every sliding block (dense).
        for g in 0..groups {
            let Some(w) = self.window(g) else { continue };
            let first = if self.swa_aware() {
                self.window_first(e * b, w)
            } else {
                0
            };
            for i in first..e {
                let h = r.tables[g][i as usize];
                let n = r.path[i as usize];
                if h != 0 && self.tree.block(n, g) == 0 {
                    self.tree.attach(n, g, h);
                }
            }
        }
        if e > 0 && self.swa_aware() {
            let max_blocks = self.run_lengths(e as u32, false);
            self.tree
                .add_checkpoint(r.path[e as usize - 1], &max_blocks);
        }
        if self.config.write_through {
            let path = std::mem::take(&mut r.path);
            self.write_through(&path[..e as usize]);
            r.path = path;
        }
        let mut freed = std::mem::take(&mut self.scratch);
        self.collect_private(&r, &mut freed);
        for &n in &r.path {
            self.tree.unpin(n, &mut freed);
        }
        self.release(&mut freed);
        self.scratch = freed;
        r.loads.clear();
        self.recycle(r);
        self.reap_loads();
        Ok(())
    }

    fn collect_private(&self, r: &Request, freed: &mut Freed) {
        for g in 0..r.tables.len() {
            for i in 0..r.tables[g].len() as u64 {
                if self.is_private(r, g, i) {
                    freed.push((g, r.tables[g][i as usize]));
                }
            }
        }
    }

    /// Drops a request: nothing of it stays in the cache.
    pub fn abort(&mut self, req: u64) -> Result<()> {
        let r = self.requests.remove(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        let mut freed = std::mem::take(&mut self.scratch);
        self.collect_private(&r, &mut freed);
        for &n in &r.created_ckpts {
            if self.tree.is_checkpoint(n) {
                self.tree.remove_checkpoint(n, &mut freed);
            }
        }
        for &n in &r.path {
            self.tree.unpin(n, &mut freed);
        }
        for &n in r.created.iter().rev() {
            self.tree.discard(n, &mut freed);
        }
        self.aborted_blocks += freed.len() as u64;
        self.release(&mut freed);
        self.scratch = freed;
        self.recycle(r);
        self.reap_loads();
        Ok(())
    }

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

    fn table(&self, req: u64, group: usize) -> Result<&[Handle]> {
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
    fn running(&self, req: u64) -> Result<&Request> {
        self.requests.get(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })
    }

    /// Whether a request is running.
    pub fn is_running(&self, req: u64) -> bool {
        self.requests.contains(req)
    }

    /// Serves a whole scheduler step in one call. Every id is checked before anything changes:
    /// an unknown or repeated id is an error and the step does nothing.
    pub fn step(&mut self, step: &Step<'_>) -> Result<StepOutcome> {
        let mut out = StepOutcome::default();
        self.step_into(step, &mut out)?;
        Ok(out)
    }

    /// [`step`](Self::step), writing into `out` (cleared first), so that a caller stepping
    /// many times reuses its vectors. On an error `out` holds nothing meaningful.
    pub fn step_into(&mut self, step: &Step<'_>, out: &mut StepOutcome) -> Result<()> {
        self.steps += 1;
        self.reap_loads();
        out.extensions = 0;
        out.refused.clear();
        out.admitted.clear();
        // The slot of each extension's request, found once while checking and used to run it.
        let mut slots = std::mem::take(&mut self.scratch_slots);
        let res = self
            .check_step(step, &mut slots)
            .and_then(|()| self.run_step(step, &slots, out));
        self.scratch_slots = slots;
        res
    }

    /// Checks every id and argument of a step, changing nothing but stamps: each running
    /// request named is stamped with the step's number, so a second mention finds its stamp
    /// (one lookup per request, no temporary sets). Fills `slots` with the extensions' slots,
    /// a decode's marked [`PLAIN`] when running it only appends.
    fn check_step(&mut self, step: &Step<'_>, slots: &mut Vec<usize>) -> Result<()> {
        let stamp = self.steps;
        self.crossing.clear();
        // The pooled records the admissions will take arrive while the step is checked.
        self.prefetch_pooled_records(step.admit.len(), step.finish.len() + step.abort.len());
        for &id in step.finish.iter().chain(&step.abort) {
            match self.requests.slot(id).and_then(|s| self.requests.at_mut(s)) {
                Some(r) if r.stamp != stamp => r.stamp = stamp,
                _ => {
                    return Err(Error::Request {
                        req: id,
                        message: "is not running or appears twice in finish/abort".into(),
                    })
                }
            }
        }
        let decode = step.decode;
        if decode.ids.len() != decode.tokens.len() {
            return Err(Error::invalid(
                "decode",
                format!(
                    "{} tokens for {} ids (one each)",
                    decode.tokens.len(),
                    decode.ids.len()
                ),
            ));
        }
        // Every extension's slot first, each record's line requested as it is found: the
        // checks below then find the records arriving together instead of waiting for them one
        // by one (a step that follows other work finds them out of cache).
        slots.clear();
        for &(id, _) in &step.extend {
            slots.push(self.resolve_slot(id)?);
        }
        for &id in decode.ids {
            slots.push(self.resolve_slot(id)?);
        }
        // The block math and the two vectors in locals: through `&mut self` the compiler
        // reloads them after every store to a record.
        let bm = self.bm;
        let records = &mut self.requests.slots[..];
        let crossing = &mut self.crossing;
        let (ext_slots, decode_slots) = slots.split_at_mut(step.extend.len());
        for (&(id, ext), &mut slot) in step.extend.iter().zip(ext_slots) {
            check_step_extension(bm, records, crossing, stamp, id, slot, ext)?;
        }
        for ((&id, tok), slot) in decode.ids.iter().zip(decode.tokens).zip(decode_slots) {
            let ext = Extension::Tokens(std::slice::from_ref(tok));
            if check_step_extension(bm, records, crossing, stamp, id, *slot, ext)? {
                *slot |= PLAIN;
            }
        }
        let mut seen = std::mem::take(&mut self.scratch_ids);
        seen.clear();
        // A repeat among a few admissions is found by comparing ids (cheaper than a set).
        let few = step.admit.len() <= 32;
        let admissions = step.admit.iter().enumerate().try_for_each(|(i, a)| {
            let repeated = if few {
                step.admit[..i].iter().any(|b| b.req == a.req)
            } else {
                !seen.insert(a.req)
            };
            if self.requests.contains(a.req) || repeated {
                return Err(Error::Request {
                    req: a.req,
                    message: "is already running or admitted twice in this step".into(),
                });
            }
            self.check_prompt(&a.prompt)?;
            match a.max_tokens {
                Some(0) => Err(Error::invalid("max_tokens", "must be positive (or None)")),
                _ => Ok(()),
            }
        });
        self.scratch_ids = seen;
        admissions
    }

    /// The slot of running request `id` named by a step's extension (an error if it is not
    /// running), with its record's first line requested.
    #[inline(always)]
    fn resolve_slot(&self, id: u64) -> Result<usize> {
        let slot = self
            .requests
            .slot(id)
            .ok_or_else(|| Self::not_extensible(id))?;
        if let Some(r) = self.requests.slots[slot].as_deref() {
            crate::prefetch::prefetch(r);
        }
        Ok(slot)
    }

    fn not_extensible(id: u64) -> Error {
        Error::Request {
            req: id,
            message: "is not running, repeated, or also finished/aborted in this step".into(),
        }
    }

    /// Runs a checked step: finishes and aborts, extensions (by the slots `check_step` found),
    /// admissions.
    fn run_step(&mut self, step: &Step<'_>, slots: &[usize], out: &mut StepOutcome) -> Result<()> {
        for &id in &step.finish {
            self.finish(id)?;
        }
        for &id in &step.abort {
            self.abort(id)?;
        }
        self.prefetch_crossing_tables();
        self.prefetch_pooled_vectors(step.admit.len());
        self.prehash(&step.admit);
        out.admitted.reserve(step.admit.len());
        // Two loops, not one over `extend` chained with `decode`: the chained iterator cost
        // 5.5% more instructions per step (callgrind, `benches/step_loop.py 128 96 300`).
        let (ext_slots, decode_slots) = slots.split_at(step.extend.len());
        for (k, (&(id, ext), &slot)) in step.extend.iter().zip(ext_slots).enumerate() {
            if !self.extend_at(slot, id, ext)? {
                out.refused.push(k);
            }
        }
        let decode = step.decode;
        let first = step.extend.len();
        for (k, ((&id, tok), &slot)) in decode
            .ids
            .iter()
            .zip(decode.tokens)
            .zip(decode_slots)
            .enumerate()
        {
            if slot & PLAIN != 0 {
                self.append_plain(slot & !PLAIN, *tok);
            } else if !self.extend_at(slot, id, Extension::Tokens(std::slice::from_ref(tok)))? {
                out.refused.push(first + k);
            }
        }
        out.extensions = first + decode.ids.len();
        if step.admit_if_extended && !out.refused.is_empty() {
            return Ok(());
        }
        let mut pre = std::mem::take(&mut self.prehashed);
        let mut res = Ok(());
        for (a, (list, &ready)) in step.admit.iter().zip(pre.lists.iter_mut().zip(&pre.ready)) {
            let hit =
                match self.admit_with(a.req, a.prompt, a.salt, a.max_tokens, ready.then_some(list))
                {
                    Ok(hit) => hit,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                };
            out.admitted.push(hit);
            if step.fcfs && hit.is_none() {
                break;
            }
        }
        // A burst step's many vectors are not worth keeping for the next one.
        pre.lists.truncate(PREHASH_KEPT_LISTS);
        self.prehashed = pre;
        res
    }

    /// Hashes a checked step's admissions' prompts before its extensions run, and prefetches
    /// the index line of each hash, so that their walks (and the links of their new blocks)
    /// find those lines in cache: in a large cache each is otherwise a cache and TLB miss
    /// (`benches/step_scale.py`). A prompt the last refusal remembers is left to `admit` (its
    /// retry reuses those hashes), and so is every prompt past `PREHASH_MAX_BLOCKS`.
    fn prehash(&mut self, admit: &[Admission<'_>]) {
        let mut pre = std::mem::take(&mut self.prehashed);
        if pre.lists.len() < admit.len() {
            pre.lists.resize_with(admit.len(), Vec::new);
        }
        pre.ready.clear();
        let (mut blocks, mut lines) = (0, 0);
        // The last admission hashed from token ids: (its tokens, index, seed, blocks it
        // shared with the one before).
        let mut prev: Option<(&[i64], usize, u64, usize)> = None;
        for (k, a) in admit.iter().enumerate() {
            let seed = hash::root_seed(a.salt);
            blocks += self.bm.floor(a.prompt.len()) as usize;
            let (done, rest) = pre.lists.split_at_mut(k);
            let list = &mut rest[0];
            list.clear();
            if blocks > PREHASH_MAX_BLOCKS || self.refused.same(a.req, seed, &a.prompt) {
                pre.ready.push(false);
                continue;
            }
            // Requests admitted together often share a system prompt: the blocks this prompt
            // has in common with the previous one (same seed) take its hashes.
            let shared = prev
                .filter(|&(_, _, s, _)| s == seed)
                .map(|(p, j, _, guess)| (p, &done[j][..], guess));
            let Ok(reused) = self.prompt_hashes_into(&a.prompt, seed, shared, list) else {
                pre.ready.push(false);
                continue;
            };
            pre.ready.push(true);
            if let Prompt::Tokens(t) = a.prompt {
                prev = Some((t, k, seed, reused));
            }
            // The reused hashes' lines were requested with the previous prompt's.
            for &h in list[reused..]
                .iter()
                .take(PREFETCH_MAX_LINES.saturating_sub(lines))
            {
                self.tree.prefetch(h);
            }
            lines += list.len() - reused;
        }
        // Each new hash may become a node holding a block of every group: request the lines
        // those writes go to while the extensions run.
        let new_blocks = lines.min(PREFETCH_MAX_LINES / 4);
        self.tree.prefetch_new_nodes(new_blocks);
        self.arena.prefetch_free_slabs(new_blocks);
        self.prehashed = pre;
    }

    /// For the extensions the check pass found starting or completing a block: requests the
    /// line each of their block tables is appended to or released from (the check pass
    /// requested the vectors holding the tables' addresses, so those are at hand by now).
    fn prefetch_crossing_tables(&self) {
        for &slot in &self.crossing {
            let Some(r) = self.requests.slots[slot].as_deref() else {
                continue;
            };
            let end = self.bm.floor(r.len) as usize;
            for (t, &floor) in r.tables.iter().zip(&r.swa_floor) {
                crate::prefetch::prefetch(t.as_ptr().wrapping_add(end));
                crate::prefetch::prefetch(t.as_ptr().wrapping_add(floor as usize));
            }
        }
    }

    /// Requests the lines of the records the step's `admissions` will take from the pool (its
    /// top, after the step's `finished` requests, which are in cache, join it): an admission
    /// rewrites its record whole.
    fn prefetch_pooled_records(&self, admissions: usize, finished: usize) {
        let cold = admissions.saturating_sub(finished);
        for r in self.request_pool.iter().rev().take(cold) {
            crate::prefetch::prefetch_whole::<Request>(&**r);
        }
    }

    /// Requests the first line of each vector the admissions' pooled records will write (the
    /// path, the block tables, the window floors, the plans, the tail): a record left the
    /// running set steps ago, and its vectors' memory is cold. Called once the records' own
    /// lines (requested as the step was checked) have had time to arrive.
    fn prefetch_pooled_vectors(&self, admissions: usize) {
        use crate::prefetch::prefetch;
        for r in self.request_pool.iter().rev().take(admissions) {
            prefetch(r.path.as_ptr());
            prefetch(r.tail.as_ptr());
            prefetch(r.swa_floor.as_ptr());
            prefetch(r.plans.as_ptr());
            prefetch(r.created.as_ptr());
            for t in &r.tables {
                prefetch(t.as_ptr());
            }
        }
    }

    /// Whether request `id` accepts `ext` (used by `extend` and, for the whole batch before
    /// anything changes, by `step`).
    #[inline(always)]
    fn check_extension(id: u64, r: &Request, ext: Extension<'_>) -> Result<()> {
        let n = match ext {
            Extension::Tokens(t) => t.len() as u64,
            Extension::Count(n) => n,
        };
        if r.len.saturating_add(n) > MAX_SEQUENCE_TOKENS {
            return Err(Error::invalid(
                "count",
                format!("request {id} would exceed {MAX_SEQUENCE_TOKENS} tokens"),
            ));
        }
        match ext {
            Extension::Tokens(_) if r.len < r.prompt_len => Err(Error::invalid(
                "tokens",
                format!(
                    "request {id}: the prompt is not fully scheduled ({} of {} tokens); \
                     continue it with a count",
                    r.len, r.prompt_len
                ),
            )),
            Extension::Tokens(_) if !r.by_ids => Err(Error::invalid(
                "tokens",
                format!("request {id} was admitted with block hashes; extend it with a count"),
            )),
            Extension::Count(n) if r.by_ids && r.len + n > r.prompt_len => Err(Error::invalid(
                "count",
                format!(
                    "request {id}: {n} tokens would go past the prompt ({} of {} scheduled); \
                     output tokens of a token-id request must be given as ids",
                    r.len, r.prompt_len
                ),
            )),
            _ => Ok(()),
        }
    }

    /// A snapshot of the accounting.
    pub fn stats(&self) -> ManagerStats {
        let (held, tomb) = self.tree.block_counts();
        let mut running = vec![0u64; self.spec.groups.len()];
        for (_, r) in self.requests.iter() {
            for (g, run) in running.iter_mut().enumerate() {
                *run += (0..r.tables[g].len() as u64)
                    .filter(|&i| self.is_private(r, g, i))
                    .count() as u64;
            }
        }
        let a = self.arena.stats();
        let groups = (0..self.spec.groups.len())
            .map(|g| GroupStats {
                running: running[g],
                cached: held[g],
                free: self.arena.available(g).unwrap_or(0),
                tombstones: if self.window(g).is_some() { tomb[g] } else { 0 },
            })
            .collect();
        ManagerStats {
            groups,
            running_requests: self.requests.len() as u64,
            cached_blocks: self.tree.num_nodes(),
            checkpoints: self.tree.num_checkpoints(),
            hit_tokens: self.hit_tokens,
            miss_tokens: self.miss_tokens,
            admissions_refused: self.admissions_refused,
            extensions_refused: self.extensions_refused,
            evicted_leaves: self.evicted_leaves,
            evicted_checkpoints: self.evicted_checkpoints,
            aborted_blocks: self.aborted_blocks,
            window_released_blocks: self.window_released,
            bytes_in_use: a.bytes_in_use,
            capacity_bytes: a.capacity_bytes,
            padding_waste_bytes: a.padding_waste_bytes + a.tail_bytes,
            tiers: Tier::ALL
                .iter()
                .filter(|&&t| self.lower.present(t))
                .map(|&t| TierStats {
                    name: t.name(),
                    capacity_bytes: match t {
                        Tier::Host => self.config.lower.host,
                        Tier::Disk => self.config.lower.disk,
                        Tier::Remote => self.config.lower.remote,
                    },
                    used_bytes: self.lower.used(t),
                    records: self.lower.count(t),
                    promoted_tokens: self.promoted_tokens[t as usize],
                    real: self.lower.materialized()
                        && (t == Tier::Host || self.lower.store(t).is_some()),
                    counters: self.lower.counters(t),
                    store: self.lower.store(t).map(|s| s.counters()),
                })
                .collect(),
            exposed_load_seconds: self.exposed_load_seconds,
            promotion_failures: self.promotion_failures,
            loads_in_flight: self.inflight.len() as u64,
        }
    }

    /// Checks every invariant: each live block is owned exactly once (by the tree or one
    /// request) and the arena agrees; tree invariants; pins match the running requests; running
    /// requests' private SWA is bounded by their window.
    pub fn validate(&self) -> Result<()> {
        self.arena.validate()?;
        let bad = |m: String| Err(Error::Invariant(format!("manager: {m}")));
        self.lower.validate()?;
        let mut pins: HashMap<NodeId, u32> = HashMap::new();
        for n in self.load_pins() {
            *pins.entry(n).or_default() += 1;
        }
        let mut owner: HashMap<Handle, &'static str> = HashMap::new();
        let mut per_group = vec![0u64; self.spec.groups.len()];
        let mut dup = None;
        let mut unwritten = None;
        self.tree.for_each_block(|g, h| {
            per_group[g] += 1;
            if owner.insert(h, "tree").is_some() {
                dup = Some(h);
            }
            if !self.written.is_whole(h) {
                unwritten = Some((g, h));
            }
        });
        if let Some(h) = dup {
            return bad(format!("block {h:#x} is held twice by the tree"));
        }
        if let Some((g, h)) = unwritten {
            return bad(format!(
                "the tree holds group {g}'s block {h:#x}, whose page its owner has not computed whole"
            ));
        }
        let b = self.b();
        self.requests
            .validate()
            .map_err(|m| Error::Invariant(format!("running requests: {m}")))?;
        for (id, r) in self.requests.iter() {
            for &n in &r.path {
                *pins.entry(n).or_default() += 1;
            }
            if r.len < r.hit || r.len > r.prompt_len.max(r.len) {
                return bad(format!("request {id}: scheduled length out of range"));
            }
            for g in 0..r.tables.len() {
                if r.tables[g].len() as u64 != self.bm.ceil(r.len) {
                    return bad(format!(
                        "request {id} group {g}: table length != blocks of len"
                    ));
                }
                let mut private_swa = 0;
                for i in 0..r.tables[g].len() as u64 {
                    let h = r.tables[g][i as usize];
                    if self.window(g).is_none() && h == 0 {
                        return bad(format!("request {id}: full-attention hole at block {i}"));
                    }
                    if h != 0 && self.written.is_whole(h) != ((i + 1) * b <= r.len) {
                        return bad(format!(
                            "request {id} group {g} block {i}: page recorded {} but {} tokens \
                             are scheduled",
                            if self.written.is_whole(h) {
                                "whole"
                            } else {
                                "partial"
                            },
                            r.len
                        ));
                    }
                    if self.is_private(r, g, i) {
                        per_group[g] += 1;
                        private_swa += u64::from(self.window(g).is_some());
                        if owner.insert(h, "request").is_some() {
                            return bad(format!("block {h:#x} owned twice (request {id})"));
                        }
                    } else if h != 0 && !self.arena.is_live(h) {
                        return bad(format!("request {id} references a dead block"));
                    }
                }
                if let (Some(w), true) = (self.window(g), self.swa_aware()) {
                    // The running window, or, while a chunk is computed, the window before it
                    // plus the chunk.
                    let chunk = r.len - r.last_start.min(r.len);
                    let bound = (u64::from(w).div_ceil(b) + 1)
                        .max((u64::from(w) + chunk.saturating_sub(1)).div_ceil(b) + 1);
                    if private_swa > bound {
                        return bad(format!(
                            "request {id} group {g}: {private_swa} private SWA blocks > {bound}"
                        ));
                    }
                }
            }
            // The path holds every node the prompt matched at admission, which can reach past a
            // chunked prefill's first chunk (full match deeper than the window-safe hit).
            if r.path.len() as u64 > self.bm.ceil(r.len).max(r.prompt_len / b) {
                return bad(format!("request {id}: path longer than its blocks"));
            }
        }
        for (g, &n) in per_group.iter().enumerate() {
            if self.arena.blocks_in_use(g)? != n {
                return bad(format!(
                    "group {g}: arena has {} live blocks, owners account for {n}",
                    self.arena.blocks_in_use(g)?
                ));
            }
        }
        self.tree.validate(&pins)
    }
}
