//! Making room: evicting cached entries until an allocation fits.
//!
//! Two shortages are told apart. Too few free *bytes*: entries go in the eviction order until
//! their bytes cover the shortfall. Free bytes in the wrong *place*: a class needs whole slabs
//! while the free space lies in partial slabs (a slab serves one class, so a free sliding slot
//! cannot hold a full-attention block). Evicting on in the order then frees blocks scattered
//! over many slabs and empties few: with slabs of pool / 64 the cache kept 80% of an unbounded
//! cache's hit rate on a round-robin load at 90% occupancy, against 94% with fine slabs
//! (issue 24).
//!
//! So the order goes on while its victims free at most one slab's worth of bytes beyond the
//! shortfall, or while little of the pool (1/16) is stranded in partial slabs: then its choice
//! stands (with fine slabs that nearly always suffices). Past that, whole slabs are emptied: of
//! the slabs whose every live block evictable units reach (a leaf with the chain that follows
//! it, a checkpoint's run), the one whose emptying costs the fewest sequence tips (see
//! [`Unit::tip`]; not for the oracle, whose keys know the future), then whose most valuable
//! unit has the lowest key, goes first, and only the units reaching its blocks are evicted.
//! When no slab can be emptied that way (running requests' blocks lie in every one, or blocks
//! under a branch), the order decides again until the need fits or nothing is left.
//!
//! Victims are never moved: blocks are offsets into the engine's KV memory, so compaction would
//! need the engine to copy bytes. Nor can victims help when running requests' blocks strand the
//! space: then an admission is refused as before (after the order has evicted what it could).

use super::KVCacheManager;
use crate::error::Result;
use crate::eviction::Eviction;
use crate::prefix::{Evicted, Freed, NodeId, Unit, NONE};
use crate::slab::Handle;

/// A block an evictable unit holds, as [`PrefixTree::for_each_hold`] lists it, with its slab.
///
/// [`PrefixTree::for_each_hold`]: crate::prefix::PrefixTree::for_each_hold
#[derive(Debug, Clone, Copy)]
struct Hold {
    slab: u32,
    block: Handle,
    unit: Unit,
    /// Units that must all go for the block to be freed.
    holders: u32,
}

/// Whole slabs are emptied only while more than 1 / this of the pool is free inside held slabs:
/// below that the order's scattered frees strand little, and its choice stands (on the
/// conversation trace, where evicting a leaf lets its chain follow and so empties slabs on its
/// own, emptying slabs earlier took checkpoints the order would have kept: the value order's
/// hit rate at 128 GiB fell from 7.6% to 6.2% at 1/64, none at 1/16).
const STRANDED_SHARE: u64 = 16;

/// What emptying one slab costs: sequence tips lost, then the highest key among its units.
type Cost = (usize, u64);

impl KVCacheManager {
    /// Evicts until `need` fits. False if it cannot (the pre-check keeps a hopeless request
    /// from emptying the cache).
    pub(super) fn make_room(&mut self, need: &[u64]) -> Result<bool> {
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
        let ok = self.evict_until_fits(need, need_bytes, &mut freed);
        self.scratch = freed;
        Ok(ok)
    }

    fn evict_until_fits(&mut self, need: &[u64], need_bytes: u64, freed: &mut Freed) -> bool {
        // 1. Bytes. Until the evicted bytes cover the shortfall nothing can fit: evict without
        // giving blocks back or asking the arena, then free them in one batch.
        let short = need_bytes.saturating_sub(self.arena.bytes_free());
        let mut evicted_bytes = 0;
        while evicted_bytes < short {
            match self.evict(None, freed) {
                Some(bytes) => evicted_bytes += bytes,
                None => {
                    self.release(freed);
                    return false;
                }
            }
        }
        self.release(freed);
        // 2. Place, in the order, while that costs at most one slab beyond the shortfall.
        let mut over = 0;
        while !self.arena.fits(need) {
            if over >= self.arena.slab_bytes() && self.stranded() {
                // 3. Whole slabs, then the order again for whatever they could not give.
                return self.empty_slabs(need, freed) || self.evict_in_order(need, freed);
            }
            let Some(bytes) = self.evict(None, freed) else {
                return false;
            };
            over += bytes;
            self.release(freed);
        }
        true
    }

    /// Whether more than [`STRANDED_SHARE`] of the pool is free inside held slabs.
    fn stranded(&self) -> bool {
        self.arena.bytes_free_in_slabs() * STRANDED_SHARE > self.arena.capacity_bytes()
    }

    /// Evicts in the order until `need` fits; false when nothing is left to evict.
    fn evict_in_order(&mut self, need: &[u64], freed: &mut Freed) -> bool {
        while !self.arena.fits(need) {
            let evicted = self.evict(None, freed);
            self.release(freed);
            if evicted.is_none() {
                return false;
            }
        }
        true
    }

    /// Empties whole slabs, cheapest first (see the module docs), until `need` fits. False when
    /// the slabs that can be emptied run out first.
    fn empty_slabs(&mut self, need: &[u64], freed: &mut Freed) -> bool {
        let mut holds: Vec<Hold> = Vec::new();
        let arena = &self.arena;
        self.tree.for_each_hold(|block, unit, holders| {
            holds.push(Hold {
                slab: arena.slab_of(block),
                block,
                unit,
                holders,
            });
        });
        holds.sort_unstable_by_key(|h| (h.slab, h.block, h.unit.node));
        // (cost, range of `holds`), one per slab that the units listed for it empty.
        let mut plans: Vec<(Cost, usize, usize)> = Vec::new();
        let mut start = 0;
        for run in holds.chunk_by(|a, b| a.slab == b.slab) {
            if let Some(cost) = self.emptying_cost(run) {
                plans.push((cost, start, start + run.len()));
            }
            start += run.len();
        }
        plans.sort_unstable();
        for &(_, start, end) in &plans {
            for h in &holds[start..end] {
                self.evict_held(h.unit, freed);
            }
            self.release(freed);
            if self.arena.fits(need) {
                return true;
            }
        }
        false
    }

    /// What evicting the units of one slab's holds costs, when it empties the slab: every
    /// listed block has all its holders listed, and the listed blocks are all its live ones.
    fn emptying_cost(&self, run: &[Hold]) -> Option<Cost> {
        let mut blocks = 0;
        for block in run.chunk_by(|a, b| a.block == b.block) {
            if block.len() as u32 != block[0].holders {
                return None;
            }
            blocks += 1;
        }
        if blocks != self.arena.slab_used(run[0].slab) {
            return None;
        }
        let max_key = run.iter().map(|h| h.unit.key).max().unwrap_or(0);
        // The oracle's keys already know which units are used again: no tip counting there.
        let counted = self.config.eviction != Eviction::Oracle;
        let mut tips: Vec<NodeId> = run
            .iter()
            .filter(|h| counted && h.unit.tip)
            .map(|h| h.unit.leaf)
            .collect();
        tips.sort_unstable();
        tips.dedup();
        Some((tips.len(), max_key))
    }

    /// Evicts `unit`: its leaf, then each ancestor up to its node (each a leaf by then).
    /// Nodes already evicted (for an earlier slab) are passed over.
    fn evict_held(&mut self, unit: Unit, freed: &mut Freed) {
        let mut n = unit.leaf;
        loop {
            let parent = self.tree.parent(n);
            self.evict(Some(n), freed);
            if n == unit.node || parent == NONE {
                break;
            }
            n = parent;
        }
    }

    /// Evicts the unit at node `unit` (None: the first in the eviction order), counting it and
    /// demoting its blocks to the lower tiers first; its blocks are added to `freed`. Returns
    /// their bytes, or None when there is no such unit.
    fn evict(&mut self, unit: Option<NodeId>, freed: &mut Freed) -> Option<u64> {
        let before = freed.len();
        let evicted = if self.lower.active() {
            let mut victims = std::mem::take(&mut self.victims);
            victims.clear();
            let evicted = match unit {
                None => self.tree.evict_one_logged(freed, &mut victims),
                Some(n) => self.tree.evict_unit_logged(n, freed, &mut victims),
            };
            // Before the blocks go back: their bytes are copied down first.
            self.demote(&victims);
            self.victims = victims;
            evicted
        } else {
            match unit {
                None => self.tree.evict_one(freed),
                Some(n) => self.tree.evict_unit(n, freed),
            }
        };
        match evicted? {
            Evicted::Leaf => self.evicted_leaves += 1,
            Evicted::Checkpoint => self.evicted_checkpoints += 1,
        }
        let layout = self.tree.layout();
        Some(
            freed[before..]
                .iter()
                .map(|&(g, _)| layout.block_bytes[g])
                .sum(),
        )
    }
}
