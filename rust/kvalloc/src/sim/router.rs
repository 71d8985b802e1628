//! The fleet's request routers, and what the prefix-aware ones believe each instance holds.
//!
//! A prefix-aware router learns only from the [`CacheEvent`]s each instance publishes (the
//! simulator drains every manager's log after each call and hands it here, never the managers
//! themselves), as a cache-aware router in front of real engines does:
//! - **window-safe** ([`RouterKind::Prefix`]) keeps, per instance, the resume points it was told
//!   of (`Resumable` adds one, `NotResumable` takes it away, `Cleared` empties the set); its
//!   estimate of a prompt's hit is the deepest resume point on the prompt's hash chain;
//! - **naive** ([`RouterKind::PrefixNaive`]) keeps the blocks stored in any group (`Stored` /
//!   `Removed`), taking a block stored at face value, as routers that consume vLLM's
//!   `BlockStored` do; its estimate is the longest run of stored blocks from the prompt's start.
//!   On a sliding-window model a full-attention block without the window before it is no
//!   resume point, so this over-estimates.
//!
//! The window-safe router may also keep the stored blocks, as a locality signal only
//! ([`FleetConfig::stored_credit`](super::fleet::FleetConfig::stored_credit)): its score then
//! credits the stored full-attention run past the deepest resume point, at that weight, as the
//! resume points later requests of the same prefix would find there; its estimate (the hit it
//! reports, and what the over-estimation figures measure) stays the deepest resume point.
//!
//! Both estimates stop at the prompt's last whole block before its last token (the rule every
//! hit obeys: at least one token is computed), so the two differ only by what the events say.
//!
//! Both score an instance the way Dynamo's KV router does (ai-dynamo/dynamo,
//! `lib/kv-router/src/scheduling/selector.rs`: `logit = overlap_score_weight *
//! potential_prefill_block + decode_block`, lowest wins): the blocks the instance would have
//! to prefill (its prefill backlog plus the prompt's blocks it is not believed to hold, times
//! [`FleetConfig::overlap_weight`](super::fleet::FleetConfig::overlap_weight)) plus the blocks
//! of the requests it holds. Least-loaded is the same score with no credit for cached blocks.
//! Ties go to the first instance at or after a rotating start, so an idle fleet is filled
//! round robin rather than from instance 0, or, with
//! [`FleetConfig::tie_seed`](super::fleet::FleetConfig::tie_seed), after a seeded random start
//! (to measure how much a figure owes to tie-breaking).

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::events::CacheEvent;
use crate::hash::IdentityHasher;

use super::fleet::FleetConfig;
use super::rng::Rng;

type Set = HashSet<u64, std::hash::BuildHasherDefault<IdentityHasher>>;
type Counts = HashMap<u64, u16, std::hash::BuildHasherDefault<IdentityHasher>>;

/// How a fleet routes each arriving request to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouterKind {
    /// Instance `k mod N` for the k-th arrival.
    RoundRobin,
    /// The instance with the least queued and running work (no cache knowledge).
    LeastLoaded,
    /// Prefix-aware from the window-safe resume points kvalloc publishes
    /// (`CacheEvent::Resumable`), with load balancing.
    Prefix,
    /// Prefix-aware from block-stored events taken at face value, with load balancing.
    PrefixNaive,
}

impl RouterKind {
    /// Every router, in the order reports list them.
    pub const ALL: [RouterKind; 4] = [
        RouterKind::RoundRobin,
        RouterKind::LeastLoaded,
        RouterKind::Prefix,
        RouterKind::PrefixNaive,
    ];

    /// Parses "round-robin", "least-loaded", "prefix" or "prefix-naive".
    pub fn parse(s: &str) -> Result<RouterKind> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "round-robin" => Ok(RouterKind::RoundRobin),
            "least-loaded" => Ok(RouterKind::LeastLoaded),
            "prefix" => Ok(RouterKind::Prefix),
            "prefix-naive" => Ok(RouterKind::PrefixNaive),
            other => Err(Error::invalid(
                "router",
                format!(
                    "unknown router {other:?}; expected \"round-robin\", \"least-loaded\", \
                     \"prefix\" or \"prefix-naive\""
                ),
            )),
        }
    }

    /// The router's name.
    pub fn name(self) -> &'static str {
        match self {
            RouterKind::RoundRobin => "round-robin",
            RouterKind::LeastLoaded => "least-loaded",
            RouterKind::Prefix => "prefix",
            RouterKind::PrefixNaive => "prefix-naive",
        }
    }

    /// Whether it estimates hits from the instances' events.
    pub fn prefix_aware(self) -> bool {
        matches!(self, RouterKind::Prefix | RouterKind::PrefixNaive)
    }
}

/// One instance's load as the router sees it (what a router learns from its own routing and
/// the engines' load reports; no cache state).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Load {
    /// Prefill tokens the instance has yet to compute for requests already routed to it.
    pub prefill_tokens: f64,
    /// Blocks of the requests it holds (queued and running): Dynamo's decode blocks.
    pub active_blocks: f64,
}

/// A router's state: its rotation and, for the prefix-aware ones, what each instance holds.
#[derive(Debug)]
pub(crate) struct Router {
    kind: RouterKind,
    next: usize,
    weight: f64,
    /// Window-safe: the weight of the stored run past the deepest resume point in the score.
    stored_credit: f64,
    /// Seeded tie-breaking (None: rotation).
    ties: Option<Rng>,
    /// Window-safe: resume points per instance.
    resumable: Vec<Set>,
    /// Naive, and window-safe with a stored credit: groups stored per block, per instance.
    stored: Vec<Counts>,
}

impl Router {
    /// A router over `instances` instances with the fleet's weights and tie-breaking.
    pub(crate) fn new(kind: RouterKind, instances: usize, fleet: &FleetConfig) -> Self {
        let stored_credit = if kind == RouterKind::Prefix {
            fleet.stored_credit
        } else {
            0.0
        };
        let resumable = if kind == RouterKind::Prefix {
            vec![Set::default(); instances]
        } else {
            Vec::new()
        };
        let stored = if kind == RouterKind::PrefixNaive || stored_credit > 0.0 {
            vec![Counts::default(); instances]
        } else {
            Vec::new()
        };
        Router {
            kind,
            next: 0,
            weight: fleet.overlap_weight,
            stored_credit,
            ties: fleet.tie_seed.map(Rng::new),
            resumable,
            stored,
        }
    }

    pub(crate) fn kind(&self) -> RouterKind {
        self.kind
    }

    /// Learns from instance `k`'s events, oldest first.
    pub(crate) fn observe(&mut self, k: usize, events: &[CacheEvent]) {
        match self.kind {
            RouterKind::Prefix => {
                let set = &mut self.resumable[k];
                for e in events {
                    match *e {
                        CacheEvent::Resumable { hash, .. } => {
                            set.insert(hash);
                        }
                        CacheEvent::NotResumable { hash } => {
                            set.remove(&hash);
                        }
                        CacheEvent::Cleared => set.clear(),
                        // Device residency only: lower-tier copies are not resume points here.
                        CacheEvent::Stored { .. }
                        | CacheEvent::Removed { .. }
                        | CacheEvent::TierStored { .. }
                        | CacheEvent::TierRemoved { .. } => {}
                    }
                }
                if let Some(map) = self.stored.get_mut(k) {
                    observe_stored(map, events);
                }
            }
            RouterKind::PrefixNaive => observe_stored(&mut self.stored[k], events),
            RouterKind::RoundRobin | RouterKind::LeastLoaded => {}
        }
    }

    /// The hit (in blocks) the router believes instance `k` gives a prompt whose chained block
    /// hashes are `hashes`, at most `max_safe` blocks.
    pub(crate) fn estimate(&self, k: usize, hashes: &[u64], max_safe: usize) -> usize {
        let hashes = &hashes[..max_safe.min(hashes.len())];
        match self.kind {
            RouterKind::Prefix => {
                let set = &self.resumable[k];
                hashes
                    .iter()
                    .rposition(|h| set.contains(h))
                    .map_or(0, |i| i + 1)
            }
            RouterKind::PrefixNaive => self.stored_run(k, hashes),
            RouterKind::RoundRobin | RouterKind::LeastLoaded => 0,
        }
    }

    /// The longest run of blocks stored (in any group) on instance `k` from the start of
    /// `hashes` (already capped).
    fn stored_run(&self, k: usize, hashes: &[u64]) -> usize {
        let map = &self.stored[k];
        hashes.iter().take_while(|h| map.contains_key(h)).count()
    }

    /// The blocks the score credits instance `k` with: the estimate `est`, plus, for the
    /// window-safe router with a stored credit, that share of the stored run past it.
    fn credit(&self, k: usize, hashes: &[u64], max_safe: usize, est: usize) -> f64 {
        if self.stored_credit == 0.0 {
            return est as f64;
        }
        let run = self.stored_run(k, &hashes[..max_safe.min(hashes.len())]);
        est as f64 + self.stored_credit * run.saturating_sub(est) as f64
    }

    /// Picks the instance for a prompt of `prompt_blocks` blocks (chained hashes `hashes`,
    /// hits capped at `max_safe` blocks) given each instance's `loads`. Returns the instance
    /// and the hit in blocks the router believes it gives (0 for the routers without cache
    /// knowledge).
    pub(crate) fn route(
        &mut self,
        loads: &[Load],
        hashes: &[u64],
        max_safe: usize,
        prompt_blocks: f64,
        block_tokens: f64,
    ) -> (usize, usize) {
        let n = loads.len();
        let mut start = self.next % n;
        self.next = (self.next + 1) % n;
        if self.kind == RouterKind::RoundRobin {
            return (start, 0);
        }
        if let Some(rng) = self.ties.as_mut() {
            start = rng.range(0, n as u64) as usize;
        }
        let mut best = (f64::INFINITY, start, 0usize);
        for j in 0..n {
            let k = (start + j) % n;
            let est = self.estimate(k, hashes, max_safe);
            let credit = self.credit(k, hashes, max_safe, est);
            let prefill = loads[k].prefill_tokens / block_tokens + prompt_blocks - credit;
            let cost = self.weight * prefill + loads[k].active_blocks;
            if cost < best.0 {
                best = (cost, k, est);
            }
        }
        (best.1, best.2)
    }
}

/// Applies `events` to the blocks `map` counts as stored (in how many groups).
fn observe_stored(map: &mut Counts, events: &[CacheEvent]) {
    for e in events {
        match *e {
            CacheEvent::Stored { hash, .. } => *map.entry(hash).or_insert(0) += 1,
            CacheEvent::Removed { hash, .. } => {
                if let Some(c) = map.get_mut(&hash) {
                    *c -= 1;
                    if *c == 0 {
                        map.remove(&hash);
                    }
                }
            }
            CacheEvent::Cleared => map.clear(),
            CacheEvent::Resumable { .. }
            | CacheEvent::NotResumable { .. }
            | CacheEvent::TierStored { .. }
            | CacheEvent::TierRemoved { .. } => {}
        }
    }
}
