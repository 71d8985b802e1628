//! Eviction from the tree: the entry with the smallest key goes first (leaves and checkpoints,
//! keyed by the tree's eviction order).

use super::*;

impl PrefixTree {
    /// Evicts the entry with the smallest key. Returns what kind it was, or None when nothing
    /// is evictable.
    pub fn evict_one(&mut self, freed: &mut Freed) -> Option<Evicted> {
        let leaf = self.leaves.first();
        let ckpt = self.ckpts.first();
        let (key, n, kind) = match (leaf, ckpt) {
            (None, None) => return None,
            (Some((k, n)), None) => (k, n, Evicted::Leaf),
            (None, Some((k, n))) => (k, n, Evicted::Checkpoint),
            (Some(l), Some(c)) => {
                if c.0 < l.0 {
                    (c.0, c.1, Evicted::Checkpoint)
                } else {
                    (l.0, l.1, Evicted::Leaf)
                }
            }
        };
        self.order.evicted(key);
        self.evicting = Some((n, self.nodes[n as usize].ckpt_end));
        match kind {
            Evicted::Leaf => self.remove(n, freed),
            Evicted::Checkpoint => self.remove_checkpoint(n, freed),
        }
        Some(kind)
    }

    /// Gives the oracle order its future (see [`Eviction::Oracle`]).
    pub fn set_future(&mut self, future: std::sync::Arc<FutureUses>) {
        self.order.set_future(future);
    }

    /// Tells the oracle order that request i (of its future) was admitted: the cached nodes it
    /// uses are re-keyed to their next use after it.
    pub fn oracle_admitted(&mut self, i: usize) {
        let Some(future) = self.order.admitted(i) else {
            return;
        };
        for &h in future.hashes(i) {
            if let Some(n) = self.lookup(h) {
                if self.nodes[n as usize].key.is_some() {
                    self.refresh(n);
                }
            }
        }
    }

    pub(super) fn take_key(&mut self, n: NodeId) {
        if let Some((kind, key)) = self.nodes[n as usize].key.take() {
            match kind {
                SetKind::Leaf => self.leaves.remove(&(key, n)),
                SetKind::Ckpt => self.ckpts.remove(&(key, n)),
            };
        }
    }

    /// Re-files node `n` in the eviction sets after its state changed.
    pub(super) fn refresh(&mut self, n: NodeId) {
        self.take_key(n);
        let node = &self.nodes[n as usize];
        if !node.alive || node.refs > 0 || node.doomed {
            return;
        }
        let kind = if node.children == 0 {
            SetKind::Leaf
        } else if node.ckpt_end {
            SetKind::Ckpt
        } else {
            return;
        };
        let cand = self.candidate(n, kind);
        let key = self.order.key(&cand);
        self.nodes[n as usize].key = Some((kind, key));
        match kind {
            SetKind::Leaf => self.leaves.insert((key, n)),
            SetKind::Ckpt => self.ckpts.insert((key, n)),
        };
    }

    pub(super) fn node_bytes(&self, n: NodeId) -> u64 {
        (0..self.g())
            .filter(|&g| self.block(n, g) != 0)
            .map(|g| self.layout.block_bytes[g])
            .sum()
    }

    /// Whether a request can resume at the end of `n` from the tree alone: a checkpoint ends
    /// there, or nothing needs one (dense policy, or no sliding group).
    pub(super) fn is_resume_point(&self, n: NodeId) -> bool {
        !self.layout.swa_aware || self.sliding.is_empty() || self.nodes[n as usize].ckpt_end
    }

    /// The unit a candidate stands for: see the policy docs.
    pub(super) fn candidate(&self, n: NodeId, kind: SetKind) -> Candidate {
        let node = &self.nodes[n as usize];
        let kind_of_order = self.order.kind();
        // Where every block is a resume point (dense policy, or no sliding group), a leaf saves
        // one block beyond its parent, which stays a resume point when the leaf goes. A
        // checkpoint saves its whole prefix: the checkpoints above it may go first.
        let saved = if !self.layout.swa_aware || self.sliding.is_empty() {
            u64::from(self.layout.block_tokens)
        } else if node.ckpt_end {
            u64::from(node.depth + 1) * u64::from(self.layout.block_tokens)
        } else {
            0
        };
        // LRU ignores size, and a value key with nothing saved is `L` whatever the size: skip
        // the walk in both cases (it dominates eviction otherwise). The oracle breaks ties by
        // size: the node's own blocks are enough there.
        let bytes = if kind_of_order == Eviction::Oracle && saved == 0 {
            self.node_bytes(n)
        } else if kind_of_order == Eviction::Lru || saved == 0 {
            0
        } else {
            match kind {
                // The checkpoint plus the prefix only it unlocks.
                SetKind::Leaf => {
                    let mut bytes = self.node_bytes(n);
                    let mut p = node.parent;
                    let mut steps = 0;
                    while p != NONE && steps < 256 {
                        let pn = &self.nodes[p as usize];
                        if pn.children != 1 || pn.refs > 0 || self.is_resume_point(p) {
                            break;
                        }
                        bytes += self.node_bytes(p);
                        p = pn.parent;
                        steps += 1;
                    }
                    bytes
                }
                // The SWA blocks only this checkpoint holds.
                SetKind::Ckpt => {
                    let mut bytes = 0;
                    for &g in &self.sliding {
                        let start = self.ckpt_start[self.slot(n, g)];
                        let mut m = n;
                        while m != NONE && self.nodes[m as usize].depth >= start {
                            if self.ckpt_refs[self.slot(m, g)] == 1 {
                                bytes += self.layout.block_bytes[g];
                            }
                            m = self.nodes[m as usize].parent;
                        }
                    }
                    bytes
                }
            }
        };
        Candidate {
            saved_tokens: saved,
            bytes,
            // Frequency counts where requests branch (a system prompt, a regenerated answer).
            // A node with one child was passed through: its hits were made by a conversation
            // that went on below it, and say nothing about its own future.
            hits: if node.children >= 2 { node.hits } else { 0 },
            prior: if node.ckpt_end {
                self.kinds.prior(node.ckpt_kind)
            } else {
                1.0
            },
            last_access: node.last_access,
            base: f64::from(node.base),
            next_use: if kind_of_order == Eviction::Oracle {
                self.order.next_use(node.hash)
            } else {
                NEVER
            },
        }
    }
}
