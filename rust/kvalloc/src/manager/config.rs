//! The manager's settings: how sliding groups are cached, and everything beyond the model and
//! the budget.

use crate::error::{Error, Result};
use crate::eviction::Eviction;
use crate::tiers::LowerCapacity;

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
    /// The engine's attention reads a chunk's own keys from the cache, as paged kernels do
    /// (vLLM's, for prefill too), rather than from the chunk's fresh tensors (SGLang's extend
    /// kernels): a sliding group then holds every block of a scheduled range, not only the
    /// range's last window, until the next call. Off, a long chunk's early sliding blocks are
    /// never allocated (their keys are written to the null page), which only an engine whose
    /// prefill attends within the chunk from its fresh tensors may do.
    pub prefill_reads_cache: bool,
    /// Record [`CacheEvent`](crate::CacheEvent)s (blocks stored in and removed from the prefix
    /// cache) for [`take_events`](crate::KVCacheManager::take_events). Off: no log, one branch
    /// where the tree changes.
    pub events: bool,
    /// The most bytes retention pins may hold (see [`Retention`](super::Retention)): a pin
    /// that would pass it is clipped to the prefix that fits. None: half of the capacity (the
    /// rest stays free for running requests and the unpinned cache); 0: no pins.
    pub max_pinned_bytes: Option<u64>,
    /// While memory is plentiful, keep the sliding-window KV of every prompt block a request
    /// computes, as a checkpoint at each block boundary (swa-aware policy): a later request
    /// that shares any prefix of it (a system prompt shared by requests 1 and 2) resumes there
    /// at once, instead of from the third request on. They are placed only when the arena's
    /// free bytes cover twice the prompt's KV at every layer, so they never cost an eviction;
    /// the value order drops them first unless requests resume at them (their kind's record).
    /// Off by default: the simulator's figures and the checkpoint-only behaviour the engine
    /// plug-ins were measured with stay as they are until it has been measured as widely.
    pub speculative_checkpoints: bool,
    /// Promotions from disk and the remote store run in the background once a device buffer
    /// is registered: an admission whose hit rests on them returns at once as waiting for KV
    /// ([`waiting_for_kv`](crate::KVCacheManager::waiting_for_kv)), its blocks are published
    /// only once read and verified, and the engine admits it again when it is ready. Off:
    /// those reads are made, verified, inside the admission (a slow store stalls it).
    pub async_loads: bool,
    /// Whether an admission takes every hit the lower tiers offer, or only the part that is
    /// faster to load than to recompute (see [`LoadCost`](crate::tiers::LoadCost)). Only where
    /// bytes move (a registered device buffer): virtual tiers always promote, and the
    /// simulator prices the choice itself.
    pub load_policy: LoadPolicy,
    /// What a background load may take beyond its estimate before it is given up and the
    /// rest of the prompt recomputed (a soft deadline: the load's verified prefix is kept).
    pub load_deadline: std::time::Duration,
    /// The load-or-recompute estimates before anything is measured: each tier's bandwidth and
    /// latency, and the engine's prefill rate (see [`LoadCost`](crate::tiers::LoadCost)).
    pub load_cost: crate::tiers::LoadCost,
}

/// Whether an admission takes every hit the lower tiers offer, or only the part that is faster
/// to load than to recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadPolicy {
    /// Load every promoted hit, however slow.
    Always,
    /// Load a hit, or its prefix, only where that beats recomputing it.
    #[default]
    Decide,
}

impl LoadPolicy {
    /// Parses `always` or `decide`.
    pub fn parse(s: &str) -> Result<LoadPolicy> {
        match s {
            "always" => Ok(LoadPolicy::Always),
            "decide" => Ok(LoadPolicy::Decide),
            _ => Err(Error::invalid(
                "load_policy",
                format!("{s:?} is not one of always, decide"),
            )),
        }
    }

    /// The name [`LoadPolicy::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            LoadPolicy::Always => "always",
            LoadPolicy::Decide => "decide",
        }
    }
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
            resume_granularity: None,
            admission_reserve_bytes: 0,
            prefault_bytes: 32 << 20,
            prefill_reads_cache: false,
            events: false,
            max_pinned_bytes: None,
            speculative_checkpoints: false,
            async_loads: true,
            load_policy: LoadPolicy::Decide,
            load_deadline: std::time::Duration::from_millis(500),
            load_cost: crate::tiers::LoadCost::default(),
        }
    }
}
