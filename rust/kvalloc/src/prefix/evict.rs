//! Eviction from the tree: the entry with the smallest key goes first (leaves and checkpoints,
//! keyed by the tree's eviction order); a caller that needs whole slabs emptied picks units by
//! where their blocks lie ([`PrefixTree::for_each_hold`], [`PrefixTree::evict_unit`]).

use super::*;

/// An evictable unit, as [`PrefixTree::for_each_hold`] lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// The leaf evicted first, or where an interior checkpoint ends.
    pub leaf: NodeId,
    /// The last node evicted: `leaf`, or an ancestor of it that the leaf's chain reaches (each
    /// node from `leaf` up to it goes, each a leaf by its turn).
    pub node: NodeId,
    /// The highest eviction key among those nodes, each keyed as the leaf it becomes (the
    /// smallest key goes first).
    pub key: u64,
    /// `leaf` ends a checkpoint: the deepest resume point of a cached sequence. Evicting
    /// it loses the hits there and, soon after, the full-attention prefix only it unlocked (its
    /// ancestors become leaves that save nothing); an interior checkpoint takes only SWA blocks
    /// and leaves the prefix to the deeper resume points.
    pub tip: bool,
}

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
        self.evict_node(n, kind, freed);
        Some(kind)
    }

    /// Evicts the unit at node `n` out of key order (a leaf, or an interior checkpoint's SWA
    /// blocks), as [`evict_one`](Self::evict_one) would when its turn came, without moving the
    /// order's clock: the victim was chosen for where its blocks lie, not for its key. None
    /// (changing nothing) when `n` is not an evictable unit now.
    pub fn evict_unit(&mut self, n: NodeId, freed: &mut Freed) -> Option<Evicted> {
        let node = self.nodes.get(n as usize)?;
        let kind = match node.filed()? {
            (SetKind::Leaf, _) => Evicted::Leaf,
            (SetKind::Ckpt, _) => Evicted::Checkpoint,
        };
        self.evict_node(n, kind, freed);
        Some(kind)
    }

    fn evict_node(&mut self, n: NodeId, kind: Evicted, freed: &mut Freed) {
        self.evicting = Some((n, self.nodes[n as usize].ckpt_end));
        match kind {
            Evicted::Leaf => self.remove(n, freed),
            Evicted::Checkpoint => self.remove_checkpoint(n, freed),
        }
    }

    /// Calls `f(block, unit, holders)` for every block that evicting units would free: a
    /// leaf's own blocks that no checkpoint covers, and those of the chain below it that would
    /// follow it (ancestors with one child, unpinned, ending no checkpoint: a leaf's eviction
    /// makes its parent the next leaf), with `holders` = 1; and each block of an unpinned node in
    /// the run of an evictable checkpoint, with `holders` = the checkpoints covering it. A block
    /// is freed once every one of its `holders` units is evicted; blocks no unit reaches
    /// (pinned ones, those under a branch) are never listed. O(evictable units x (window +
    /// chain) blocks): for choosing victims by where their blocks lie, off the common path.
    pub fn for_each_hold(&self, mut f: impl FnMut(Handle, Unit, u32)) {
        for (key, n) in self.leaves.iter() {
            let tip = self.nodes[n as usize].ckpt_end;
            let mut unit = Unit {
                leaf: n,
                node: n,
                key,
                tip,
            };
            self.for_each_own_block(n, |h| f(h, unit, 1));
            if tip {
                self.for_each_run_block(n, |h, refs| f(h, unit, refs));
            }
            let mut a = self.nodes[n as usize].parent;
            while a != NONE && self.follows_leaf(a) {
                let as_leaf = self.order.key(&self.candidate(a, SetKind::Leaf));
                unit.node = a;
                unit.key = unit.key.max(as_leaf);
                self.for_each_own_block(a, |h| f(h, unit, 1));
                a = self.nodes[a as usize].parent;
            }
        }
        for (key, n) in self.ckpts.iter() {
            let unit = Unit {
                leaf: n,
                node: n,
                key,
                tip: false,
            };
            self.for_each_run_block(n, |h, refs| f(h, unit, refs));
        }
    }

    /// Whether interior node `a` becomes a leaf that saves nothing once its only child goes.
    fn follows_leaf(&self, a: NodeId) -> bool {
        let node = &self.nodes[a as usize];
        node.children == 1 && node.refs == 0 && !node.ckpt_end && !node.doomed
    }

    /// `f(block)` for node `n`'s blocks that no checkpoint covers.
    fn for_each_own_block(&self, n: NodeId, mut f: impl FnMut(Handle)) {
        for g in 0..self.g() {
            let s = self.slot(n, g);
            if self.blocks[s] != 0 && self.ckpt_refs[s] == 0 {
                f(self.blocks[s]);
            }
        }
    }

    /// `f(block, checkpoints covering it)` for the blocks of unpinned nodes in the run of the
    /// checkpoint ending at `end`.
    fn for_each_run_block(&self, end: NodeId, mut f: impl FnMut(Handle, u32)) {
        for &g in &self.sliding {
            let start = self.ckpt_start[self.slot(end, g)];
            let mut m = end;
            while m != NONE && self.nodes[m as usize].depth >= start {
                let s = self.slot(m, g);
                if self.nodes[m as usize].refs == 0 && self.blocks[s] != 0 {
                    f(self.blocks[s], self.ckpt_refs[s]);
                }
                m = self.nodes[m as usize].parent;
            }
        }
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
                if self.nodes[n as usize].key_kind.is_some() {
                    self.refresh(n);
                }
            }
        }
    }

    pub(super) fn take_key(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        if let Some((kind, key)) = node.filed() {
            node.key_kind = None;
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
        if !node.alive || node.refs > 0 || node.retained > 0 || node.doomed {
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
        let node = &mut self.nodes[n as usize];
        (node.key, node.key_kind) = (key, Some(kind));
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
                        if pn.children != 1 || self.held(p) || self.is_resume_point(p) {
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
            hits: if node.children >= 2 {
                u32::from(node.hits)
            } else {
                0
            },
            prior: if node.ckpt_end {
                self.kinds.prior(node.ckpt_kind)
            } else {
                1.0
            },
            priority: self.priority(n),
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
