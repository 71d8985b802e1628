//! Retention pins and priorities on cached nodes (the manager's `retention` module keeps the
//! pins themselves: which prefix, until when; the tree counts how many cover each node).

use super::*;

impl PrefixTree {
    /// Covers node `n` by one more retention pin (see the module docs): it stays, with every
    /// block it holds, until as many [`release`](Self::release) calls.
    pub fn retain(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        node.retained += 1;
        if node.retained == 1 {
            let nb = self.node_bytes(n);
            self.retained_bytes += nb;
            if self.nodes[n as usize].refs == 0 {
                self.pinned_bytes += nb;
                self.refresh(n);
            }
        }
    }

    /// Takes one retention pin off node `n`. When nothing holds it any more, it is treated as
    /// a request's last [`unpin`](Self::unpin) treats it: SWA blocks no checkpoint covers are
    /// freed, a doomed node goes, and it becomes evictable.
    pub fn release(&mut self, n: NodeId, freed: &mut Freed) {
        let node = &mut self.nodes[n as usize];
        debug_assert!(node.retained > 0);
        node.retained -= 1;
        if node.retained > 0 {
            return;
        }
        self.retained_bytes -= self.node_bytes(n);
        if self.nodes[n as usize].refs == 0 {
            self.unheld(n, freed);
        }
    }

    /// Whether `n` names a live node.
    pub fn is_alive(&self, n: NodeId) -> bool {
        self.nodes.get(n as usize).is_some_and(|node| node.alive)
    }

    /// Retention pins covering `n`.
    pub fn retained(&self, n: NodeId) -> u32 {
        self.nodes[n as usize].retained
    }

    /// Bytes of the nodes a retention pin covers.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes
    }

    /// Raises `n`'s retention priority to `p` (a request holding it finished with `p`): a
    /// node keeps the highest priority of the requests that finished holding it.
    pub fn raise_priority(&mut self, n: NodeId, p: i8) {
        let node = &mut self.nodes[n as usize];
        if node.priority == UNSET_PRIORITY || p > node.priority {
            node.priority = p;
            if node.key_kind.is_some() {
                self.refresh(n);
            }
        }
    }

    /// `n`'s retention priority (0 until a request holding it finished).
    pub fn priority(&self, n: NodeId) -> i8 {
        match self.nodes[n as usize].priority {
            UNSET_PRIORITY => 0,
            p => p,
        }
    }

    /// How far a retention pin over `path` (a matched path from the root) may reach: the
    /// deepest `k <= path.len()` such that a resume after `k` blocks is window-safe (a pinned
    /// prefix no prompt could resume at is not worth its bytes) and the nodes of `path[..k]`
    /// that no retention pin covers yet hold at most `room` bytes. Returns `(k, those bytes)`.
    /// It stops at a doomed node (never matched again).
    pub fn pin_extent(&self, path: &[NodeId], room: u64) -> (usize, u64) {
        let mut runs = [0u32; 16];
        let (mut best, mut best_bytes, mut bytes) = (0, 0, 0u64);
        for (i, &n) in path.iter().enumerate() {
            let node = &self.nodes[n as usize];
            if node.doomed || !node.alive {
                break;
            }
            if node.retained == 0 {
                bytes += self.node_bytes(n);
            }
            if bytes > room {
                break;
            }
            let k = i as u32 + 1;
            let mut ok = true;
            for (r, &g) in runs.iter_mut().zip(&self.sliding) {
                *r = if self.block(n, g) != 0 { *r + 1 } else { 0 };
                let w = self.layout.windows[g].expect("sliding");
                ok &= *r >= self.layout.window_blocks(k, w);
            }
            if ok {
                (best, best_bytes) = (k as usize, bytes);
            }
        }
        (best, best_bytes)
    }

    /// Checks each live node's retention count against `expected` (per node id, the pins the
    /// manager holds that cover it), and that every node a pin covers is alive.
    pub fn validate_retained(&self, expected: &HashMap<NodeId, u32>) -> Result<()> {
        for (&n, &count) in expected {
            if !self.nodes.get(n as usize).is_some_and(|node| node.alive) {
                return Err(Error::Invariant(format!(
                    "prefix tree: node {n} is covered by {count} retention pins but is not alive"
                )));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let want = expected.get(&(i as NodeId)).copied().unwrap_or(0);
            if node.alive && node.retained != want {
                return Err(Error::Invariant(format!(
                    "prefix tree: node {i} counts {} retention pins, the manager holds {want}",
                    node.retained
                )));
            }
        }
        Ok(())
    }
}
