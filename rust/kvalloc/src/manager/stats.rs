//! The manager's accounting: per group, per lower tier, and the snapshot [`KVCacheManager::stats`]
//! takes.

use super::KVCacheManager;
use crate::prefix::CheckpointKind;
use crate::tiers::{Tier, TierCounters};

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
    /// Promotions abandoned because a lower-tier read failed (checksum, store down).
    pub promotion_failures: u64,
    /// Loads from host memory still in flight.
    pub loads_in_flight: u64,
    /// Bytes of the cached blocks retention pins hold (never evicted while pinned; at most
    /// [`ManagerConfig::max_pinned_bytes`](super::ManagerConfig::max_pinned_bytes)).
    pub pinned_bytes: u64,
    /// Retention pins in force (pins of the same prefix end count once).
    pub pins: u64,
    /// Pins the cap on pinned bytes clipped (shortened, or dropped when nothing fit).
    pub pins_clipped: u64,
    /// Per checkpoint kind (where they were placed): how many, and how many later requests
    /// resumed at (or would have, had they not been evicted). The value policy's priors.
    pub checkpoint_kinds: Vec<CheckpointKindStats>,
}

/// One checkpoint kind's record (see [`CheckpointKind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointKindStats {
    /// The kind.
    pub kind: CheckpointKind,
    /// Checkpoints of this kind placed.
    pub placed: u64,
    /// Of those, resumed at by a later request (or reached by one after an eviction).
    pub resumed: u64,
}

/// One lower tier's accounting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStats {
    /// Which tier.
    pub tier: Tier,
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

impl KVCacheManager {
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
                    tier: t,
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
                    store: self
                        .lower
                        .store(t)
                        .map(|s| s.counters().plus(self.fetching.reader_counters(t))),
                })
                .collect(),
            promotion_failures: self.promotion_failures,
            loads_in_flight: self.inflight.len() as u64,
            pinned_bytes: self.tree.retained_bytes(),
            pins: self.pins.len() as u64,
            pins_clipped: self.pins.clipped,
            checkpoint_kinds: CheckpointKind::KINDS
                .iter()
                .map(|&kind| {
                    let (placed, resumed) = self.tree.kind_record(kind);
                    CheckpointKindStats {
                        kind,
                        placed,
                        resumed,
                    }
                })
                .collect(),
        }
    }
}
