//! Eviction order for cached entries.
//!
//! The prefix tree offers two kinds of victims (see [`crate::prefix`]):
//! - a *leaf*: an unpinned node without children; evicting it frees its full-attention block and
//!   any SWA block it holds (full KV goes leaf first, so a cached prefix never has holes);
//! - a *checkpoint*: the SWA window kept at an interior resume point; evicting it frees the SWA
//!   blocks no other checkpoint needs and leaves tombstones (the full prefix stays).
//!
//! Each candidate gets a key when it becomes evictable; the smallest key goes first.
//!
//! ## Value policy (default)
//! Greedy-Dual-Size-Frequency, with a unit's value measured in recompute avoided:
//!
//! ```text
//! key = L_at_last_use + (branch_hits + 1) x prior x (saved_tokens / MiB)^(1/4)
//! ```
//!
//! - `saved_tokens`: the prefill tokens a hit on this entry avoids (its resume position). A leaf
//!   that is not a resume point saves nothing on its own: its key is its `L` and it goes first.
//! - `MiB`: what evicting the unit frees. For a leaf that ends a checkpoint, that is the
//!   checkpoint plus the full-attention prefix that only it unlocks (the chain of single-child,
//!   non-resume ancestors): the checkpoint and its prefix are one unit. For an interior
//!   checkpoint, the SWA blocks only it holds. The fourth root keeps size a tie-breaker among
//!   units of similar age: a stronger size term evicts young, small units that recency says are
//!   about to be used.
//! - `branch_hits`: requests that resumed at this entry, counted only where requests branch
//!   (two or more children: a system prompt, a regenerated answer). A conversation passes
//!   through its earlier resume points; their hits describe the turns below them, and counting
//!   them kept checkpoints the conversation had moved past ahead of its live tip.
//! - `prior`: for a checkpoint, the share of its kind (branch point, prompt end, answer end,
//!   interval) that later requests resumed at, learned as the workload runs, counting
//!   checkpoints evicted unproven that a later prompt reached (see
//!   [`crate::prefix::CheckpointKind`]); 1 for other resume points. A chat resumes at the
//!   answer's end, a trace without answers at the prompt's end: the policy learns which.
//! - `L`: the key of the last victim, read when the entry was last used, so an entry that
//!   becomes evictable late (a parent whose children went) keeps its age. Entries not used
//!   since age relative to the others (recency); equal keys go least recently used first.
//!
//! A retention priority `p` (an engine's per-request priority, see
//! [`Retention`](crate::manager::Retention)) weighs the value: `weight(p) x value`, with
//! `weight(p) = 2^p` ([`priority_weight`]), so each step of priority doubles the value. Priority 0 (the default) changes nothing, and an entry that saves nothing still
//! goes first whatever its priority: a prefix's tail (its leaves past the last resume point)
//! leaves before its head. It only reorders; it never keeps an entry (pins do that).
//!
//! ## LRU
//! `key = last access tick`, for comparison with what engines do today. It ignores retention
//! priority (every tick is distinct, so there are no ties for it to break).
//!
//! ## Oracle (offline, simulator only)
//! A clairvoyant reference: the simulator gives the tree a [`FutureUses`] table (for each
//! request of the trace, the block hashes it will match) and tells it which requests were
//! admitted; the unit whose next use is farthest away goes first (never used again: first of
//! all), ties broken by size (larger first). On unit-size blocks with one group this is
//! Belady's MIN; for variable-size units it is a reference, not a proof of optimality. Without
//! a table every unit counts as never used again, so the order is by size alone.

use std::collections::HashMap;
use std::sync::Arc;

/// Which eviction order to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Value per byte with frequency and recency (GDSF); the default.
    #[default]
    Value,
    /// Least recently used.
    Lru,
    /// Farthest next use first, from the trace's future: offline, for the simulator (see the
    /// module docs).
    Oracle,
}

impl Eviction {
    /// Parses "value" or "lru".
    pub fn parse(s: &str) -> crate::error::Result<Eviction> {
        match s.to_ascii_lowercase().as_str() {
            "value" | "gdsf" => Ok(Eviction::Value),
            "lru" => Ok(Eviction::Lru),
            "oracle" => Ok(Eviction::Oracle),
            other => Err(crate::error::Error::invalid(
                "eviction",
                format!(
                    "unknown eviction policy {other:?}; expected \"value\", \"lru\" or \"oracle\""
                ),
            )),
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Eviction::Value => "value",
            Eviction::Lru => "lru",
            Eviction::Oracle => "oracle",
        }
    }
}

/// What the policy needs to know about a candidate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Prefill tokens a hit on this entry avoids (0 if it is not a resume point).
    pub saved_tokens: u64,
    /// Bytes freed by evicting it.
    pub bytes: u64,
    /// Requests that resumed here.
    pub hits: u32,
    /// Retention priority (0: neutral; the value policy weighs by [`priority_weight`]).
    pub priority: i8,
    /// Resumes expected of it beyond `hits`: its kind's record for a checkpoint not yet
    /// resumed at (see [`crate::prefix::CheckpointKind`]), 1 otherwise.
    pub prior: f64,
    /// Logical time of the last use.
    pub last_access: u64,
    /// The value policy's `L` at the last use (see [`EvictionOrder::inflation`]).
    pub base: f64,
    /// Index of the next request that uses it ([`NEVER`] if none; the oracle's key).
    pub next_use: u32,
}

/// `Candidate::next_use` of a unit no later request uses.
pub const NEVER: u32 = u32::MAX;

/// How much a retention priority multiplies an entry's value under the value policy:
/// `2^priority` (priority 0: 1). The one place priority enters an eviction key.
pub fn priority_weight(priority: i8) -> f64 {
    match priority {
        0 => 1.0, // nearly every entry: no call
        p => 2f64.powi(i32::from(p)),
    }
}

/// The trace's future as the oracle sees it: which block hashes each request will match.
#[derive(Debug, Clone, Default)]
pub struct FutureUses {
    /// Per hash, the requests that match it, ascending.
    uses: HashMap<u64, Vec<u32>>,
    /// `hashes[offsets[i]..offsets[i + 1]]`: request i's matchable hashes.
    hashes: Vec<u64>,
    offsets: Vec<usize>,
}

impl FutureUses {
    /// A table from each request's matchable chained block hashes, in trace order.
    pub fn new<'a>(requests: impl IntoIterator<Item = &'a [u64]>) -> Self {
        let mut f = FutureUses {
            offsets: vec![0],
            ..Default::default()
        };
        for (i, hs) in requests.into_iter().enumerate() {
            for &h in hs {
                let list = f.uses.entry(h).or_default();
                // A prompt can repeat a hash only through a collision: count the use once.
                if list.last() != Some(&(i as u32)) {
                    list.push(i as u32);
                }
            }
            f.hashes.extend_from_slice(hs);
            f.offsets.push(f.hashes.len());
        }
        f
    }

    /// Requests in the table.
    pub fn requests(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Request i's matchable hashes (empty past the table).
    pub fn hashes(&self, i: usize) -> &[u64] {
        match self.offsets.get(i + 1) {
            Some(&end) => &self.hashes[self.offsets[i]..end],
            None => &[],
        }
    }
}

/// The oracle's view of time: the table and which requests were admitted.
#[derive(Debug, Clone)]
struct Clairvoyance {
    future: Arc<FutureUses>,
    admitted: Vec<bool>,
    /// Every request below it was admitted.
    pending_from: u32,
}

impl Clairvoyance {
    /// The first request not yet admitted that uses `hash`.
    fn next_use(&self, hash: u64) -> u32 {
        let Some(list) = self.future.uses.get(&hash) else {
            return NEVER;
        };
        let from = list.partition_point(|&j| j < self.pending_from);
        // Admissions run nearly in trace order: few admitted requests lie past `pending_from`.
        list[from..]
            .iter()
            .copied()
            .find(|&j| !self.admitted[j as usize])
            .unwrap_or(NEVER)
    }
}

/// Keys candidates; holds the GDSF inflation value `L`.
#[derive(Debug, Clone)]
pub struct EvictionOrder {
    kind: Eviction,
    inflation: f64,
    /// The oracle's future (None for the online policies, or an oracle without a table).
    future: Option<Clairvoyance>,
}

impl EvictionOrder {
    /// A fresh order of the given kind.
    pub fn new(kind: Eviction) -> Self {
        EvictionOrder {
            kind,
            inflation: 0.0,
            future: None,
        }
    }

    /// Gives the oracle its table; no request is admitted yet.
    pub fn set_future(&mut self, future: Arc<FutureUses>) {
        let n = future.requests();
        self.future = Some(Clairvoyance {
            future,
            admitted: vec![false; n],
            pending_from: 0,
        });
    }

    /// Marks request i admitted (its uses are no longer ahead). Returns the table, whose
    /// `hashes(i)` are the ones to re-key; None without a table.
    pub fn admitted(&mut self, i: usize) -> Option<Arc<FutureUses>> {
        let c = self.future.as_mut()?;
        if let Some(a) = c.admitted.get_mut(i) {
            *a = true;
        }
        while c.admitted.get(c.pending_from as usize) == Some(&true) {
            c.pending_from += 1;
        }
        Some(c.future.clone())
    }

    /// The next request that uses a block with `hash` (NEVER without a table).
    pub fn next_use(&self, hash: u64) -> u32 {
        self.future.as_ref().map_or(NEVER, |c| c.next_use(hash))
    }

    /// The policy in use.
    pub fn kind(&self) -> Eviction {
        self.kind
    }

    /// The sort key of a candidate (smaller goes first). Non-negative floats compare like their
    /// bit patterns, so the key is an integer.
    pub fn key(&self, c: &Candidate) -> u64 {
        match self.kind {
            Eviction::Lru => c.last_access,
            // Farthest next use first, then larger first (4 KiB units).
            Eviction::Oracle => {
                let size = (c.bytes >> 12).min(u64::from(u32::MAX)) as u32;
                (u64::from(u32::MAX - c.next_use) << 32) | u64::from(u32::MAX - size)
            }
            Eviction::Value => {
                let mib = (c.bytes.max(1) as f64) / (1u64 << 20) as f64;
                // The fourth root: tokens per byte orders units, but only as far as recency
                // agrees (see the module docs).
                let per_byte = (c.saved_tokens as f64 / mib).sqrt().sqrt();
                let value =
                    priority_weight(c.priority) * (f64::from(c.hits) + 1.0) * c.prior * per_byte;
                // H in the high half (an f32 compares like its bits when non-negative), the
                // last access in the low half: equal H goes least recently used first.
                let h = (c.base + value) as f32;
                (u64::from(h.to_bits()) << 32) | (c.last_access & 0xffff_ffff)
            }
        }
    }

    /// The value policy's `L`: the key of the last victim (0 for the other policies).
    pub fn inflation(&self) -> f64 {
        self.inflation
    }

    /// Records that the entry with `key` was evicted (advances `L`).
    pub fn evicted(&mut self, key: u64) {
        if self.kind == Eviction::Value {
            let k = f64::from(f32::from_bits((key >> 32) as u32));
            if k > self.inflation {
                self.inflation = k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_prefers_evicting_cheap_per_byte_and_cold() {
        let o = EvictionOrder::new(Eviction::Value);
        let c = |saved, bytes, hits| Candidate {
            saved_tokens: saved,
            bytes,
            hits,
            priority: 0,
            prior: 1.0,
            last_access: 0,
            base: 0.0,
            next_use: NEVER,
        };
        assert!(o.key(&c(0, 1 << 20, 5)) < o.key(&c(16, 1 << 20, 0)));
        assert!(o.key(&c(1024, 64 << 20, 0)) < o.key(&c(1024, 16 << 20, 0)));
        assert!(o.key(&c(1024, 1 << 20, 0)) < o.key(&c(1024, 1 << 20, 3)));
    }

    #[test]
    fn inflation_ages_old_entries() {
        let mut o = EvictionOrder::new(Eviction::Value);
        let old = Candidate {
            saved_tokens: 100,
            bytes: 1 << 20,
            hits: 0,
            priority: 0,
            prior: 1.0,
            last_access: 0,
            base: o.inflation(),
            next_use: NEVER,
        };
        o.evicted(o.key(&Candidate {
            saved_tokens: 1000,
            ..old
        }));
        // The same entry used after the eviction ranks above one last used before it, and the
        // old one keeps its key: becoming evictable later does not make it young.
        let young = Candidate {
            base: o.inflation(),
            last_access: 1,
            ..old
        };
        assert!(o.key(&young) > o.key(&old));
        assert_eq!(o.key(&old), EvictionOrder::new(Eviction::Value).key(&old));
    }

    #[test]
    fn equal_value_goes_least_recently_used_first() {
        let o = EvictionOrder::new(Eviction::Value);
        let c = |last_access| Candidate {
            saved_tokens: 128,
            bytes: 1 << 20,
            hits: 0,
            priority: 0,
            prior: 1.0,
            last_access,
            base: 0.0,
            next_use: NEVER,
        };
        assert!(o.key(&c(5)) < o.key(&c(6)));
    }

    #[test]
    fn a_kind_rarely_resumed_at_goes_first() {
        let o = EvictionOrder::new(Eviction::Value);
        let c = |prior| Candidate {
            saved_tokens: 1024,
            bytes: 64 << 20,
            hits: 0,
            priority: 0,
            prior,
            last_access: 0,
            base: 0.0,
            next_use: NEVER,
        };
        assert!(o.key(&c(0.01)) < o.key(&c(0.8)));
    }

    #[test]
    fn priority_weighs_value_but_not_a_unit_that_saves_nothing() {
        let o = EvictionOrder::new(Eviction::Value);
        let c = |saved, bytes, priority| Candidate {
            saved_tokens: saved,
            bytes,
            hits: 0,
            priority,
            prior: 1.0,
            last_access: 0,
            base: 0.0,
            next_use: NEVER,
        };
        // One step of priority doubles the value: worth 16 times the bytes (the size term is
        // a fourth root).
        assert!(o.key(&c(1024, 1 << 20, 1)) > o.key(&c(1024, 1 << 20, 0)));
        assert!(o.key(&c(1024, 8 << 20, 1)) > o.key(&c(1024, 1 << 20, 0)));
        assert!(o.key(&c(1024, 32 << 20, 1)) < o.key(&c(1024, 1 << 20, 0)));
        assert!(o.key(&c(1024, 1 << 20, -1)) < o.key(&c(1024, 1 << 20, 0)));
        // A tail that saves nothing goes first at any priority.
        assert!(o.key(&c(0, 1 << 20, 16)) < o.key(&c(16, 1 << 20, -16)));
        // LRU ignores it.
        let lru = EvictionOrder::new(Eviction::Lru);
        assert_eq!(lru.key(&c(16, 1, 5)), lru.key(&c(16, 1, -5)));
    }

    #[test]
    fn parse_names() {
        assert_eq!(Eviction::parse("LRU").unwrap(), Eviction::Lru);
        assert_eq!(Eviction::parse("value").unwrap().name(), "value");
        assert!(Eviction::parse("fifo").is_err());
        assert_eq!(Eviction::parse("oracle").unwrap(), Eviction::Oracle);
    }

    #[test]
    fn oracle_evicts_farthest_next_use_then_larger() {
        let mut o = EvictionOrder::new(Eviction::Oracle);
        // Request 0 uses hash 1; request 1 uses 1 and 2; request 2 uses 3.
        let reqs: [&[u64]; 3] = [&[1], &[1, 2], &[3]];
        o.set_future(Arc::new(FutureUses::new(reqs)));
        assert_eq!((o.next_use(1), o.next_use(3), o.next_use(9)), (0, 2, NEVER));
        o.admitted(0);
        assert_eq!(o.next_use(1), 1);
        o.admitted(2);
        assert_eq!((o.next_use(2), o.next_use(3)), (1, NEVER));
        let c = |next_use, bytes| Candidate {
            saved_tokens: 0,
            bytes,
            hits: 0,
            priority: 0,
            prior: 1.0,
            last_access: 0,
            base: 0.0,
            next_use,
        };
        assert!(o.key(&c(NEVER, 1 << 20)) < o.key(&c(5, 1 << 30)));
        assert!(o.key(&c(7, 1 << 20)) < o.key(&c(5, 1 << 20)));
        assert!(o.key(&c(5, 2 << 20)) < o.key(&c(5, 1 << 20)));
    }
}
