//! Resume points for the KV events ([`CacheEvent::Resumable`], [`CacheEvent::NotResumable`]).
//!
//! A node is a *resume point* when a registered checkpoint makes it window-safe on its own:
//! the node is the checkpoint's end or an ancestor of it, and each sliding group's run of the
//! checkpoint covers the window before the node's end (the block a checkpoint keeps beyond W
//! makes the end's parent one too). Where no position needs a checkpoint (the dense policy,
//! or no sliding group), every node is one. A node under a doomed node is none: no walk
//! reaches it.
//!
//! Every resume point is window-safe, so a router's longest resumable prefix never exceeds the
//! tree's window-safe hit. Positions made window-safe only by the union of two checkpoints'
//! runs, or by the SWA blocks a running request holds, are not resume points: there the
//! router's estimate falls short of the hit (the safe side), and they come and go with the
//! requests' steps, which events do not follow.
//!
//! The log counts, per node, the checkpoints serving it; a node is reported `Resumable` when
//! the count leaves 0 (if a walk reaches it) and `NotResumable` when it returns to 0 or the
//! node stops being reachable (it or an ancestor doomed).

use super::*;

impl PrefixTree {
    /// Whether every live node is a resume point: no position needs a checkpoint.
    pub(super) fn every_node_resumes(&self) -> bool {
        !self.layout.swa_aware || self.sliding.is_empty()
    }

    /// Whether the checkpoint ending at `end` makes node `n` (on its path) window-safe: each
    /// sliding group's run starts no later than `n`'s window.
    fn serves(&self, end: NodeId, n: NodeId) -> bool {
        let k = self.nodes[n as usize].depth + 1;
        self.sliding.iter().all(|&g| {
            let w = self.layout.windows[g].expect("sliding");
            self.ckpt_start[self.slot(end, g)] + self.layout.window_blocks(k, w) <= k
        })
    }

    /// Calls `f` for each node the checkpoint ending at `end` serves: `end` and its ancestors
    /// up to the first it does not serve. (`k - min(k, span)` never grows toward the root, so
    /// none above that one is served either.)
    fn for_each_served(&self, end: NodeId, mut f: impl FnMut(NodeId)) {
        let mut n = end;
        while n != NONE && self.serves(end, n) {
            f(n);
            n = self.nodes[n as usize].parent;
        }
    }

    /// Whether a walk can reach live node `n`: neither it nor an ancestor is doomed.
    fn reachable(&self, n: NodeId) -> bool {
        if self.events.doomed == 0 {
            return true;
        }
        let mut a = n;
        while a != NONE {
            if self.nodes[a as usize].doomed {
                return false;
            }
            a = self.nodes[a as usize].parent;
        }
        true
    }

    /// One more reason for `n` to be a resume point: reported when it is the first.
    pub(super) fn resume_ref(&mut self, n: NodeId) {
        if self.events.add_resume_ref(n) && self.reachable(n) {
            self.events.set_resumable(n, true);
            let node = &self.nodes[n as usize];
            let e = CacheEvent::Resumable {
                hash: node.hash,
                block: node.depth,
            };
            self.events.push(e);
        }
    }

    /// One reason fewer for `n` to be a resume point: reported gone when it was the last.
    pub(super) fn resume_unref(&mut self, n: NodeId) {
        if self.events.sub_resume_ref(n) && self.events.is_resumable(n) {
            self.unpublish(n);
        }
    }

    fn unpublish(&mut self, n: NodeId) {
        self.events.set_resumable(n, false);
        let hash = self.nodes[n as usize].hash;
        self.events.push(CacheEvent::NotResumable { hash });
    }

    /// The checkpoint ending at `end` was registered (`added`) or is being unregistered (its
    /// runs' starts still in place).
    #[cold]
    #[inline(never)]
    pub(super) fn log_checkpoint(&mut self, end: NodeId, added: bool) {
        let mut served = Vec::new();
        self.for_each_served(end, |n| served.push(n));
        for n in served {
            if added {
                self.resume_ref(n);
            } else {
                self.resume_unref(n);
            }
        }
    }

    /// Node `n` was just doomed: it, and every resume point below it, is no longer reachable.
    #[cold]
    #[inline(never)]
    pub(super) fn log_doomed(&mut self, n: NodeId) {
        self.events.doomed += 1;
        if self.nodes[n as usize].children == 0 {
            if self.events.is_resumable(n) {
                self.unpublish(n);
            }
            return;
        }
        // Rare (an abort whose blocks others hold and built on): no child lists to walk down,
        // so every reported resume point is checked.
        for r in self.events.resumable_nodes() {
            if !self.reachable(r) {
                self.unpublish(r);
            }
        }
    }

    /// `(hash, block)` of every resume point the tree holds, computed from scratch: what
    /// replaying the `Resumable` and `NotResumable` events gives.
    pub fn resume_points(&self) -> Vec<(u64, u32)> {
        let reach = self.reachability();
        let every = self.every_node_resumes();
        let mut is_point = vec![false; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            if every {
                is_point[i] = true;
            } else if node.ckpt_end {
                self.for_each_served(i as NodeId, |n| is_point[n as usize] = true);
            }
        }
        (0..self.nodes.len())
            .filter(|&i| is_point[i] && reach[i])
            .map(|i| (self.nodes[i].hash, self.nodes[i].depth))
            .collect()
    }

    /// Per node id: live and reachable by a walk (no doomed node on its path).
    fn reachability(&self) -> Vec<bool> {
        let mut order: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive)
            .collect();
        order.sort_by_key(|&i| self.nodes[i].depth);
        let mut reach = vec![false; self.nodes.len()];
        for i in order {
            let node = &self.nodes[i];
            reach[i] = !node.doomed && (node.parent == NONE || reach[node.parent as usize]);
        }
        reach
    }

    /// The log's resume points agree with the tree's (events on): the reported set is
    /// [`resume_points`](Self::resume_points), and each node's count is the checkpoints
    /// serving it.
    pub(super) fn validate_resume(&self) -> Result<()> {
        if !self.events.on() {
            return Ok(());
        }
        let mut refs = vec![0u32; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.alive {
                continue;
            }
            if self.every_node_resumes() {
                refs[i] += 1;
            } else if node.ckpt_end {
                self.for_each_served(i as NodeId, |n| refs[n as usize] += 1);
            }
        }
        let reach = self.reachability();
        for (i, &want) in refs.iter().enumerate() {
            let n = i as NodeId;
            let got = self.events.resume_refs(n);
            let reported = self.events.is_resumable(n);
            if got != want || reported != (want > 0 && reach[i]) {
                return Err(Error::Invariant(format!(
                    "node {i}: {got} resume refs counted, {want} checkpoints serve it; \
                     reported resumable {reported}, reachable {}",
                    reach[i]
                )));
            }
        }
        Ok(())
    }
}
