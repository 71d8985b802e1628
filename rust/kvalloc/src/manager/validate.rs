//! The manager's invariants, checked in full (tests call this after every operation).

use std::collections::HashMap;

use super::request::Request;
use super::KVCacheManager;
use crate::error::{Error, Result};
use crate::prefix::NodeId;
use crate::slab::Handle;

/// Who owns each live block, and how many each group has (what the arena must agree with).
struct Owners {
    owner: HashMap<Handle, &'static str>,
    per_group: Vec<u64>,
}

fn bad<T>(m: String) -> Result<T> {
    Err(Error::Invariant(format!("manager: {m}")))
}

impl KVCacheManager {
    /// Checks every invariant: each live block is owned exactly once (by the tree or one
    /// request) and the arena agrees; tree invariants; pins match the running requests; running
    /// requests' private SWA is bounded by their window; retention pins match the tree's counts
    /// and fit under their cap.
    pub fn validate(&self) -> Result<()> {
        self.arena.validate()?;
        self.lower.validate()?;
        let mut pins: HashMap<NodeId, u32> = HashMap::new();
        for n in self.load_pins() {
            *pins.entry(n).or_default() += 1;
        }
        let mut owners = self.tree_owners()?;
        for (g, h) in self.fetch_pages() {
            owners.per_group[g] += 1;
            if owners.owner.insert(h, "load").is_some() {
                return bad(format!("block {h:#x} is held by a load and another owner"));
            }
            if self.written.is_whole(h) {
                return bad(format!("block {h:#x} is recorded whole while it loads"));
            }
        }
        self.requests
            .validate()
            .map_err(|m| Error::Invariant(format!("running requests: {m}")))?;
        for (id, r) in self.requests.iter() {
            for &n in &r.path {
                *pins.entry(n).or_default() += 1;
            }
            self.validate_request(id, r, &mut owners)?;
        }
        for (g, &n) in owners.per_group.iter().enumerate() {
            if self.arena.blocks_in_use(g)? != n {
                return bad(format!(
                    "group {g}: arena has {} live blocks, owners account for {n}",
                    self.arena.blocks_in_use(g)?
                ));
            }
        }
        self.tree.validate(&pins)?;
        self.validate_pins()
    }

    /// The tree's blocks: each held once, each on a page its owner computed whole.
    fn tree_owners(&self) -> Result<Owners> {
        let mut owner: HashMap<Handle, &'static str> = HashMap::new();
        let mut per_group = vec![0u64; self.spec.groups.len()];
        let mut dup = None;
        let mut unwritten = None;
        self.tree.for_each_block(|g, h| {
            per_group[g] += 1;
            if owner.insert(h, "tree").is_some() {
                dup = Some(h);
            }
            if !self.written.is_whole(h) {
                unwritten = Some((g, h));
            }
        });
        if let Some(h) = dup {
            return bad(format!("block {h:#x} is held twice by the tree"));
        }
        if let Some((g, h)) = unwritten {
            return bad(format!(
                "the tree holds group {g}'s block {h:#x}, whose page its owner has not computed whole"
            ));
        }
        Ok(Owners { owner, per_group })
    }

    /// One running request: its length, its tables (one entry per block of its length, no
    /// full-attention hole, pages recorded whole exactly below its length, private blocks
    /// owned once, private SWA within the window's bound), its path.
    fn validate_request(&self, id: u64, r: &Request, owners: &mut Owners) -> Result<()> {
        let b = self.b();
        if r.len < r.hit || r.len > r.prompt_len.max(r.len) {
            return bad(format!("request {id}: scheduled length out of range"));
        }
        for g in 0..r.tables.len() {
            if r.tables[g].len() as u64 != self.bm.ceil(r.len) {
                return bad(format!(
                    "request {id} group {g}: table length != blocks of len"
                ));
            }
            let mut private_swa = 0;
            for i in 0..r.tables[g].len() as u64 {
                let h = r.tables[g][i as usize];
                if self.window(g).is_none() && h == 0 {
                    return bad(format!("request {id}: full-attention hole at block {i}"));
                }
                if h != 0 && self.written.is_whole(h) != ((i + 1) * b <= r.len) {
                    return bad(format!(
                        "request {id} group {g} block {i}: page recorded {} but {} tokens \
                         are scheduled",
                        if self.written.is_whole(h) {
                            "whole"
                        } else {
                            "partial"
                        },
                        r.len
                    ));
                }
                if self.is_private(r, g, i) {
                    owners.per_group[g] += 1;
                    private_swa += u64::from(self.window(g).is_some());
                    if owners.owner.insert(h, "request").is_some() {
                        return bad(format!("block {h:#x} owned twice (request {id})"));
                    }
                } else if h != 0 && !self.arena.is_live(h) {
                    return bad(format!("request {id} references a dead block"));
                }
            }
            if let (Some(w), true) = (self.window(g), self.swa_aware()) {
                // The running window, or, while a chunk is computed, the window before it
                // plus the chunk.
                let chunk = r.len - r.last_start.min(r.len);
                let bound = (u64::from(w).div_ceil(b) + 1)
                    .max((u64::from(w) + chunk.saturating_sub(1)).div_ceil(b) + 1);
                if private_swa > bound {
                    return bad(format!(
                        "request {id} group {g}: {private_swa} private SWA blocks > {bound}"
                    ));
                }
            }
        }
        // The path holds every node the prompt matched at admission, which can reach past a
        // chunked prefill's first chunk (full match deeper than the window-safe hit).
        if r.path.len() as u64 > self.bm.ceil(r.len).max(r.prompt_len / b) {
            return bad(format!("request {id}: path longer than its blocks"));
        }
        Ok(())
    }
}
