//! The tree's invariants (see the module docs), checked in full.

use super::*;

fn bad<T>(m: String) -> Result<T> {
    Err(Error::Invariant(format!("prefix tree: {m}")))
}

impl PrefixTree {
    /// Checks the invariants in the module docs. `pins` holds, per node id, how many running
    /// requests the manager believes pin it (the retention counts are checked against the
    /// manager's pins by [`validate_retained`](Self::validate_retained)).
    pub fn validate(&self, pins: &HashMap<NodeId, u32>) -> Result<()> {
        let children = self.validate_nodes(pins)?;
        let (refs, ckpts) = self.validate_checkpoints(&children)?;
        self.validate_bytes()?;
        if ckpts != self.checkpoints {
            return bad("checkpoint count disagrees".into());
        }
        self.validate_eviction_sets(&refs)?;
        self.validate_resume()
    }

    /// Each live node: indexed under its hash, under a live parent one level up, holding its
    /// full-attention blocks (every block under the dense policy), pinned as often as the
    /// running requests say; the live count agrees with the index. Returns each node's
    /// children, counted.
    fn validate_nodes(&self, pins: &HashMap<NodeId, u32>) -> Result<Vec<u32>> {
        let g = self.g();
        let mut children = vec![0u32; self.nodes.len()];
        let mut live = 0u64;
        let mut doomed = 0u64;
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.alive {
                continue;
            }
            live += 1;
            if n.doomed {
                doomed += 1; // unindexed (see `discard`)
            } else if self.index.get(n.hash) != Some(i as NodeId) {
                return bad(format!("node {i} is not indexed under its hash"));
            }
            if n.parent != NONE {
                let p = &self.nodes[n.parent as usize];
                if !p.alive || p.depth + 1 != n.depth {
                    return bad(format!("node {i}: parent missing or at the wrong depth"));
                }
                children[n.parent as usize] += 1;
            } else if n.depth != 0 {
                return bad(format!("node {i}: no parent but depth {}", n.depth));
            }
            for gi in 0..g {
                let full = self.layout.windows[gi].is_none();
                let has = self.blocks[i * g + gi] != 0;
                if full && !has {
                    return bad(format!(
                        "node {i} lacks its full-attention block (group {gi})"
                    ));
                }
                if !full && !self.layout.swa_aware && !has {
                    return bad(format!(
                        "dense policy: node {i} lacks sliding block (group {gi})"
                    ));
                }
            }
            if n.refs != pins.get(&(i as NodeId)).copied().unwrap_or(0) {
                return bad(format!(
                    "node {i}: {} pins recorded, {} running requests hold it",
                    n.refs,
                    pins.get(&(i as NodeId)).copied().unwrap_or(0)
                ));
            }
        }
        if let Err(e) = self.index.validate() {
            return bad(format!("hash index: {e}"));
        }
        if live != self.live_nodes || self.index.len() as u64 != live - doomed {
            return bad("live-node count disagrees with the index".into());
        }
        Ok(children)
    }

    /// Child counts against `children`; each checkpoint at least its window long and covering
    /// no tombstone. Returns the checkpoint references of each (node, group) slot, recomputed
    /// from the registered checkpoints, and how many checkpoints there are.
    fn validate_checkpoints(&self, children: &[u32]) -> Result<(Vec<u32>, u64)> {
        let g = self.g();
        let mut refs = vec![0u32; self.blocks.len()];
        let mut ckpts = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.alive {
                continue;
            }
            if children[i] != n.children {
                return bad(format!(
                    "node {i}: child count {} != {}",
                    n.children, children[i]
                ));
            }
            if !n.ckpt_end {
                continue;
            }
            ckpts += 1;
            for &gi in &self.sliding {
                let start = self.ckpt_start[i * g + gi];
                let w = self.layout.windows[gi].expect("sliding");
                if n.depth + 1 - start < self.layout.window_blocks(n.depth + 1, w) {
                    return bad(format!("checkpoint at node {i} is shorter than its window"));
                }
                let mut m = i as NodeId;
                while m != NONE && self.nodes[m as usize].depth >= start {
                    if self.blocks[m as usize * g + gi] == 0 {
                        return bad(format!("checkpoint at node {i} covers a tombstone at {m}"));
                    }
                    refs[m as usize * g + gi] += 1;
                    m = self.nodes[m as usize].parent;
                }
            }
        }
        Ok((refs, ckpts))
    }

    /// The held, pinned (a request or a retention pin holds the node) and retained byte
    /// counters against the live nodes' bytes.
    fn validate_bytes(&self) -> Result<()> {
        let (mut held, mut pinned, mut retained) = (0u64, 0u64, 0u64);
        for (i, n) in self.nodes.iter().enumerate() {
            if n.alive {
                let nb = self.node_bytes(i as NodeId);
                held += nb;
                if n.refs > 0 || n.retained > 0 {
                    pinned += nb;
                }
                if n.retained > 0 {
                    retained += nb;
                }
            }
        }
        if held != self.held_bytes || pinned != self.pinned_bytes || retained != self.retained_bytes
        {
            return bad(format!(
                "byte counters: held {} (counted {held}), pinned {} (counted {pinned}), \
                 retained {} (counted {retained})",
                self.held_bytes, self.pinned_bytes, self.retained_bytes
            ));
        }
        Ok(())
    }

    /// Checkpoint references against `refs`, no SWA block kept by nothing, and each node in
    /// exactly the eviction set its state calls for.
    fn validate_eviction_sets(&self, refs: &[u32]) -> Result<()> {
        let g = self.g();
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.alive {
                continue;
            }
            for &gi in &self.sliding {
                let s = i * g + gi;
                if refs[s] != self.ckpt_refs[s] {
                    return bad(format!(
                        "node {i} group {gi}: ckpt_refs {} != {}",
                        self.ckpt_refs[s], refs[s]
                    ));
                }
                let held = n.refs > 0 || n.retained > 0;
                if self.layout.swa_aware && self.blocks[s] != 0 && refs[s] == 0 && !held {
                    return bad(format!(
                        "node {i} group {gi}: SWA block kept by no checkpoint"
                    ));
                }
            }
            // Held nodes (a running request's path, a retention pin) are never evicted.
            let want = if n.refs > 0 || n.retained > 0 || n.doomed {
                None
            } else if n.children == 0 {
                Some(SetKind::Leaf)
            } else if n.ckpt_end {
                Some(SetKind::Ckpt)
            } else {
                None
            };
            let have = n.key_kind;
            if want != have {
                return bad(format!(
                    "node {i}: eviction set {have:?}, expected {want:?}"
                ));
            }
            if let Some((kind, key)) = n.filed() {
                let set = if kind == SetKind::Leaf {
                    &self.leaves
                } else {
                    &self.ckpts
                };
                if !set.contains(&(key, i as NodeId)) {
                    return bad(format!("node {i}: key missing from its set"));
                }
            }
        }
        let filed = self
            .nodes
            .iter()
            .filter(|n| n.alive && n.key_kind.is_some())
            .count();
        if filed != self.leaves.len() + self.ckpts.len() {
            return bad("eviction sets hold stale entries".into());
        }
        Ok(())
    }
}
