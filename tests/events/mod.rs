//! Shared by the manager tests: replays a manager's KV cache events into the set of cached
//! blocks they describe and checks it against what the manager holds.
#![allow(dead_code)]

use std::collections::HashSet;

use kvalloc::{CacheEvent, KVCacheManager};

/// The `(group, hash)` blocks a stream of events says are cached.
#[derive(Debug, Default)]
pub struct Replay {
    pub blocks: HashSet<(usize, u64)>,
    /// Events applied so far, by kind: stored, removed, cleared.
    pub counts: [u64; 3],
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
                    self.counts[2] += 1;
                }
            }
        }
        Ok(())
    }

    /// Drains `m`'s events, applies them, and checks that the set equals the manager's cached
    /// blocks.
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
        Ok(())
    }
}
