//! The manager's KV cache events (see [`crate::events`]) and the whole-cache reset.

use super::KVCacheManager;
use crate::events::CacheEvent;

impl KVCacheManager {
    /// The events recorded since the last drain, oldest first (empty when
    /// [`ManagerConfig::events`](super::ManagerConfig::events) is off). The log grows until it
    /// is drained: an engine drains it every step.
    ///
    /// ```
    /// use kvalloc::{CacheEvent, KVCacheManager, ManagerConfig, ModelSpec, Prompt};
    /// let spec = ModelSpec::preset("mimo-v2.5-pro")?;
    /// let config = ManagerConfig { events: true, ..ManagerConfig::default() };
    /// let mut m = KVCacheManager::new(spec, 1 << 30, config)?;
    /// let prompt: Vec<i64> = (0..40).collect();
    /// m.admit(7, Prompt::Tokens(&prompt), None, None)?;
    /// let events = m.take_events();
    /// // Two whole blocks, each stored in the full-attention group by request 7.
    /// assert!(events.iter().any(|e| matches!(
    ///     e,
    ///     CacheEvent::Stored { group: 0, block: 1, parent: Some(_), req: Some(7), .. }
    /// )));
    /// assert!(m.take_events().is_empty());
    /// # Ok::<(), kvalloc::Error>(())
    /// ```
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        let mut out = Vec::new();
        self.tree.take_events_into(&mut out);
        out
    }

    /// [`take_events`](Self::take_events) into `out` (cleared first), swapping buffers so that
    /// a caller draining every step allocates nothing in the steady state.
    pub fn take_events_into(&mut self, out: &mut Vec<CacheEvent>) {
        self.tree.take_events_into(out);
    }

    /// `(group, chained hash)` of every block the prefix cache holds in a matchable node,
    /// sorted: the set that replaying every event since construction gives. A snapshot for a
    /// consumer that starts listening late.
    pub fn cached_blocks(&self) -> Vec<(usize, u64)> {
        let mut v = self.tree.matchable_blocks();
        v.sort_unstable();
        v
    }

    /// `(chained hash, block)` of every resume point the prefix cache holds, sorted by hash:
    /// the set that replaying every `Resumable` and `NotResumable` event since construction
    /// gives (a `Cleared` empties it). See [`crate::events`] for what a resume point is and
    /// how it relates to [`match_prefix`](Self::match_prefix).
    pub fn resume_points(&self) -> Vec<(u64, u32)> {
        let mut v = self.tree.resume_points();
        v.sort_unstable();
        v
    }

    /// Empties the prefix cache (L1; lower tiers keep their copies), as vLLM's
    /// `reset_prefix_cache` does after a weight update. Only when no request is running (their
    /// blocks are in use): returns false, changing nothing, otherwise. Waits for loads in
    /// flight first. Records one [`CacheEvent::Cleared`] instead of a `Removed` per block.
    /// Every retention pin goes with it.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.requests.len() > 0 {
            return false;
        }
        self.wait_loads();
        self.drop_pins();
        let mark = self.tree.events_len();
        let mut freed = std::mem::take(&mut self.scratch);
        // Nothing pins a node now: evicting leaves until none is left empties the tree.
        while self.tree.evict_one(&mut freed).is_some() {
            self.release(&mut freed);
        }
        self.scratch = freed;
        debug_assert_eq!(self.tree.num_nodes(), 0);
        if self.tree.num_nodes() == 0 {
            self.tree.replace_events_since(mark, CacheEvent::Cleared);
        }
        true
    }
}
