//! Shared by the manager tests: replays a manager's KV cache events into the set of cached
//! blocks they describe and checks it against what the manager holds.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};

use kvalloc::{CacheEvent, KVCacheManager};

/// The `(group, hash)` blocks a stream of events says are cached.
#[derive(Debug, Default)]
pub struct Replay {
    pub blocks: HashSet<(usize, u64)>,
    /// The resume points the events say there are: chained hash -> block.
    pub resume: HashMap<u64, u32>,
    /// Events applied so far, by kind: stored, removed, cleared, resumable, not resumable.
    pub counts: [u64; 5],
    /// `Stored` events of promotions (no request).
    pub promoted: u64,
}

impl Replay {
    /// Applies `events` strictly: a `Stored` block must be new (its `block` index 0 exactly when
    /// it has no parent; published by `publisher` when that is given), a `Removed` one present.
    pub fn apply(
        &mut self,
        events: &[CacheEvent],
        publisher: Option<Option<u64>>,
    ) -> Result<(), String> {
        for (i, e) in events.iter().enumerate() {
            match *e {
                CacheEvent::Stored {
                    group,
                    hash,
                    parent,
                    block,
                    req,
                } => {
                    if !self.blocks.insert((group, hash)) {
                        return Err(format!("event {i} {e:?}: stored twice"));
                    }
                    if parent.is_none() != (block == 0) {
                        return Err(format!("event {i} {e:?}: parent and block disagree"));
                    }
                    if publisher.is_some_and(|p| p != req) {
                        return Err(format!("event {i} {e:?}: expected publisher {publisher:?}"));
                    }
                    self.counts[0] += 1;
                    self.promoted += u64::from(req.is_none());
                }
                CacheEvent::Removed { group, hash } => {
                    if !self.blocks.remove(&(group, hash)) {
                        return Err(format!("event {i} {e:?}: removed but not stored"));
                    }
                    self.counts[1] += 1;
                }
                CacheEvent::Cleared => {
                    self.blocks.clear();
                    self.resume.clear();
                    self.counts[2] += 1;
                }
                CacheEvent::Resumable { hash, block } => {
                    if self.resume.insert(hash, block).is_some() {
                        return Err(format!("event {i} {e:?}: resumable twice"));
                    }
                    // A resume point is a cached node: its full-attention block is there.
                    if !self.holds(hash) {
                        return Err(format!("event {i} {e:?}: resumable before stored"));
                    }
                    self.counts[3] += 1;
                }
                CacheEvent::NotResumable { hash } => {
                    if self.resume.remove(&hash).is_none() {
                        return Err(format!("event {i} {e:?}: not resumable but never was"));
                    }
                    if !self.holds(hash) {
                        return Err(format!("event {i} {e:?}: blocks removed before it"));
                    }
                    self.counts[4] += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether some group's block of the node `hash` is cached.
    fn holds(&self, hash: u64) -> bool {
        (0..kvalloc::spec::MAX_GROUPS).any(|g| self.blocks.contains(&(g, hash)))
    }

    /// Drains `m`'s events, applies them, and checks that the sets equal the manager's cached
    /// blocks and resume points.
    pub fn sync(
        &mut self,
        m: &mut KVCacheManager,
        publisher: Option<Option<u64>>,
    ) -> Result<(), String> {
        let events = m.take_events();
        self.apply(&events, publisher)?;
        let cached: HashSet<(usize, u64)> = m.cached_blocks().into_iter().collect();
        if cached != self.blocks {
            let missing: Vec<_> = cached.difference(&self.blocks).take(4).collect();
            let extra: Vec<_> = self.blocks.difference(&cached).take(4).collect();
            return Err(format!(
                "replayed events disagree with the cache: {} cached, {} replayed; \
                 not reported {missing:?}, reported but gone {extra:?}",
                cached.len(),
                self.blocks.len()
            ));
        }
        let mut resume: Vec<(u64, u32)> = self.resume.iter().map(|(&h, &b)| (h, b)).collect();
        resume.sort_unstable();
        if resume != m.resume_points() {
            return Err(format!(
                "replayed resume points disagree with the cache: {} replayed, {} in the tree",
                resume.len(),
                m.resume_points().len()
            ));
        }
        Ok(())
    }
}

/// The hit a router that trusts the resume points (`hash -> block`) estimates for a prompt of
/// `len` tokens with these chained block hashes: the deepest resume point on its path, at
/// least one token short of its end (as the manager's hits are), in tokens.
pub fn router_hit(resume: &HashMap<u64, u32>, hashes: &[u64], len: usize, b: usize) -> u64 {
    let max_safe = (len.saturating_sub(1) / b).min(hashes.len());
    (1..=max_safe)
        .rev()
        .find(|&k| resume.get(&hashes[k - 1]) == Some(&(k as u32 - 1)))
        .map_or(0, |k| (k * b) as u64)
}
