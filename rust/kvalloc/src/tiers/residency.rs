//! The residency index of the lower tiers: one record per cached block that lives below L1.
//!
//! A record names a block by its chained hash and says which lower tier holds it (a record
//! lives in exactly one of host, disk, remote: demotion *moves* it down), which KV groups it
//! holds there (full-attention groups; sliding groups only where the block was part of an SWA
//! checkpoint, or every group under the dense policy), its depth and parent in the prefix, and
//! its recency. L1 residency is the prefix tree's node for the same hash; a block can be in L1
//! and in one lower tier at once (a promoted block keeps its lower copy, so evicting it again
//! writes nothing).
//!
//! Eviction order inside a tier: least recently used first and, at equal recency, deepest
//! first. Every hit touches its whole path and a record is created no earlier than its
//! descendants' (L1 evicts leaves first; a record created under an older child touches the
//! child's ancestors), so a parent is never older than its children and a tier evicts prefixes
//! from the end: no holes in the middle of a cached prefix.
//!
//! ## Invariants (checked by [`LowerIndex::validate`])
//! - each unpinned record is in exactly its tier's eviction set under its current key; a pinned
//!   record (a load reads it) is in no set;
//! - `used[t]` is the sum of the payload bytes of the records in tier t.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::events::CacheEvent;

/// The lower tiers, in demotion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// L2: host memory owned by the core.
    Host = 0,
    /// L3: local disk.
    Disk = 1,
    /// L4: a remote Valkey/Redis store.
    Remote = 2,
}

impl Tier {
    /// All lower tiers, top first.
    pub const ALL: [Tier; 3] = [Tier::Host, Tier::Disk, Tier::Remote];

    /// The tier's name in stats.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Host => "host",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }

    /// Parses a tier's name: "host", "disk" or "remote".
    pub fn parse(s: &str) -> Result<Tier> {
        match s {
            "host" => Ok(Tier::Host),
            "disk" => Ok(Tier::Disk),
            "remote" => Ok(Tier::Remote),
            _ => Err(Error::invalid(
                "tier",
                format!("unknown tier {s:?}; expected host, disk or remote"),
            )),
        }
    }

    /// The next tier down.
    pub fn below(self) -> Option<Tier> {
        match self {
            Tier::Host => Some(Tier::Disk),
            Tier::Disk => Some(Tier::Remote),
            Tier::Remote => None,
        }
    }
}

/// Depth of a record whose position is not known yet (recovered from disk after a restart, or
/// found in the remote store); fixed the first time a walk reaches it.
pub const UNKNOWN_DEPTH: u32 = u32::MAX;

/// One block below L1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The tier that holds it.
    pub tier: Tier,
    /// Bit g set: the record holds group g's block.
    pub groups: u16,
    /// Block index in its sequence ([`UNKNOWN_DEPTH`] if not known yet).
    pub depth: u32,
    /// A checkpoint (a resume point) ended at this block when it left L1.
    pub ckpt_end: bool,
    /// Logical time of the last use.
    pub access: u64,
    /// Loads reading it right now (a pinned record is not evicted or moved).
    pub pins: u32,
    /// Payload bytes (sum of its groups' block bytes).
    pub bytes: u64,
}

type Key = (u64, u32, u64); // (access, u32::MAX - depth, hash)

/// The groups whose bits `mask` sets, lowest first.
fn groups(mask: u16) -> impl Iterator<Item = usize> {
    (0..16).filter(move |g| mask >> g & 1 == 1)
}

/// The index. See the module docs.
#[derive(Debug, Default)]
pub struct LowerIndex {
    records: HashMap<u64, Record, std::hash::BuildHasherDefault<crate::hash::IdentityHasher>>,
    sets: [BTreeSet<Key>; 3],
    used: [u64; 3],
    count: [u64; 3],
    clock: u64,
    /// Residency changes since the last drain ([`CacheEvent::TierStored`],
    /// [`CacheEvent::TierRemoved`]), when the manager records events.
    events: Option<Vec<CacheEvent>>,
}

fn key(hash: u64, r: &Record) -> Key {
    (r.access, u32::MAX - r.depth.min(u32::MAX - 1), hash)
}

impl LowerIndex {
    /// Whether no block lives below L1.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Advances the logical clock.
    pub fn now(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The record for a hash.
    pub fn get(&self, hash: u64) -> Option<&Record> {
        self.records.get(&hash)
    }

    /// Payload bytes in tier `t`.
    pub fn used(&self, t: Tier) -> u64 {
        self.used[t as usize]
    }

    /// Records in tier `t`.
    pub fn count(&self, t: Tier) -> u64 {
        self.count[t as usize]
    }

    /// Starts (or stops) recording the residency changes, on an empty index.
    pub fn record_events(&mut self, on: bool) {
        debug_assert!(self.records.is_empty());
        self.events = on.then(Vec::new);
    }

    /// Appends the residency changes recorded since the last call to `out`.
    pub fn take_events_into(&mut self, out: &mut Vec<CacheEvent>) {
        if let Some(log) = self.events.as_mut() {
            out.append(log);
        }
    }

    /// `(tier, group, hash)` of every block the lower tiers hold, sorted: what replaying the
    /// tier events gives.
    pub fn blocks(&self) -> Vec<(Tier, usize, u64)> {
        let mut v: Vec<(Tier, usize, u64)> = self
            .records
            .iter()
            .flat_map(|(&h, r)| groups(r.groups).map(move |g| (r.tier, g, h)))
            .collect();
        v.sort_unstable();
        v
    }

    /// Records `TierStored` (`stored`) or `TierRemoved` for the groups in `mask` of record
    /// `hash` in tier `tier`.
    fn log(&mut self, stored: bool, hash: u64, tier: Tier, mask: u16, depth: u32) {
        let Some(log) = self.events.as_mut() else {
            return;
        };
        for group in groups(mask) {
            log.push(if stored {
                let block = (depth != UNKNOWN_DEPTH).then_some(depth);
                CacheEvent::TierStored {
                    tier,
                    group,
                    hash,
                    block,
                }
            } else {
                CacheEvent::TierRemoved { tier, group, hash }
            });
        }
    }

    /// Adds a new record (its hash must be absent).
    pub fn insert(&mut self, hash: u64, rec: Record) {
        self.log(true, hash, rec.tier, rec.groups, rec.depth);
        self.insert_quiet(hash, rec);
    }

    fn insert_quiet(&mut self, hash: u64, rec: Record) {
        debug_assert!(!self.records.contains_key(&hash));
        let t = rec.tier as usize;
        self.used[t] += rec.bytes;
        self.count[t] += 1;
        if rec.pins == 0 {
            self.sets[t].insert(key(hash, &rec));
        }
        self.records.insert(hash, rec);
    }

    /// Removes a record and returns it.
    pub fn remove(&mut self, hash: u64) -> Option<Record> {
        let rec = self.remove_quiet(hash)?;
        self.log(false, hash, rec.tier, rec.groups, rec.depth);
        Some(rec)
    }

    fn remove_quiet(&mut self, hash: u64) -> Option<Record> {
        let rec = self.records.remove(&hash)?;
        let t = rec.tier as usize;
        self.used[t] -= rec.bytes;
        self.count[t] -= 1;
        if rec.pins == 0 {
            self.sets[t].remove(&key(hash, &rec));
        }
        Some(rec)
    }

    /// Changes a record through `f`, keeping sets and counters exact. A move to another tier
    /// is recorded as the blocks stored there, then removed from the old one (a router never
    /// sees them nowhere); groups added or dropped in place as stored or removed.
    pub fn update(&mut self, hash: u64, f: impl FnOnce(&mut Record)) -> bool {
        let Some(mut rec) = self.remove_quiet(hash) else {
            return false;
        };
        let (tier, mask) = (rec.tier, rec.groups);
        f(&mut rec);
        if self.events.is_some() && (rec.tier, rec.groups) != (tier, mask) {
            let kept = if rec.tier == tier {
                mask & rec.groups
            } else {
                0
            };
            self.log(true, hash, rec.tier, rec.groups & !kept, rec.depth);
            self.log(false, hash, tier, mask & !kept, rec.depth);
        }
        self.insert_quiet(hash, rec);
        true
    }

    /// Marks a record used now; returns false if absent.
    pub fn touch(&mut self, hash: u64, now: u64) -> bool {
        match self.records.get(&hash) {
            None => false,
            Some(r) if r.access >= now => true,
            Some(_) => self.update(hash, |r| r.access = now),
        }
    }

    /// Pins a record (a load reads it).
    pub fn pin(&mut self, hash: u64) {
        self.update(hash, |r| r.pins += 1);
    }

    /// Unpins a record.
    pub fn unpin(&mut self, hash: u64) {
        self.update(hash, |r| r.pins = r.pins.saturating_sub(1));
    }

    /// The next record tier `t` would evict (least recent, deepest), if any.
    pub fn victim(&self, t: Tier) -> Option<u64> {
        self.sets[t as usize].first().map(|&(_, _, h)| h)
    }

    /// Every record (hash and record), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Record)> {
        self.records.iter().map(|(&h, r)| (h, r))
    }

    /// Checks the invariants in the module docs.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invariant(format!("lower tiers: {m}")));
        let mut used = [0u64; 3];
        let mut count = [0u64; 3];
        let mut in_sets = 0usize;
        for (&h, r) in &self.records {
            let t = r.tier as usize;
            used[t] += r.bytes;
            count[t] += 1;
            let k = key(h, r);
            let listed = self.sets[t].contains(&k);
            if listed != (r.pins == 0) {
                return bad(format!(
                    "record {h:#x} pinned {} but listed {listed}",
                    r.pins
                ));
            }
            in_sets += usize::from(listed);
            if r.groups == 0 {
                return bad(format!("record {h:#x} holds no group"));
            }
        }
        if in_sets != self.sets.iter().map(BTreeSet::len).sum::<usize>() {
            return bad("an eviction set lists a record that is not there".into());
        }
        if used != self.used || count != self.count {
            return bad(format!(
                "counters {:?}/{:?} != recount {used:?}/{count:?}",
                self.used, self.count
            ));
        }
        Ok(())
    }
}
