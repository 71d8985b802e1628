//! The manager's side of the lower tiers: demotion on eviction, promotion on admission,
//! write-through at finish, layer-wise loads and per-tier matching.
//!
//! Promotion happens before an admission's own walk of the prefix tree: when L1 together with
//! the lower tiers gives a longer window-safe prefix than L1 alone, the missing blocks are
//! allocated in L1 and linked into the tree as cached nodes (a checkpoint at the new resume point
//! covers the SWA window), and their bytes are copied in: from disk and the remote store at once
//! (each read verified; any failure abandons the promotion, so a hit never rests on bad bytes),
//! from host memory by the background loader, layer by layer. Until its copies land, a load pins
//! the nodes it fills and the L2 records it reads. The admission's walk then finds the longer
//! prefix as an ordinary L1 hit.

use std::sync::Arc;

use super::fetching::FetchPlan;
use super::{KVCacheManager, LoadPolicy, MAX_GROUPS};
use crate::error::{Error, Result};
use crate::prefix::{CheckpointKind, Freed, Link, NodeId, Victim, NONE};
use crate::slab::Handle;
use crate::tiers::loader::{CopyTask, LoadHandle, LoadJob, Loader};
use crate::tiers::{BlockKey, DeviceBuffer, LoadBytes, Tier};

/// A load in flight and what it keeps pinned.
#[derive(Debug)]
pub(super) struct Inflight {
    job: Arc<LoadJob>,
    nodes: Vec<NodeId>,
    records: Vec<u64>,
}

/// What a promotion's copies amount to: the loader's tasks (host memory), the bytes per layer
/// and tier, and the deepest tier read.
struct Copies {
    tasks: Vec<CopyTask>,
    load: LoadBytes,
    deepest: Tier,
}

/// What one promotion loaded, for a latency model to price: the loader copies sliding layers
/// first, then full layers in order, so the bytes per layer say how much compute can hide.
#[derive(Debug, Clone, PartialEq)]
pub struct Promotion {
    /// Bytes per layer and tier.
    pub load: LoadBytes,
    /// Prompt tokens it serves from the lower tiers (the compute its load precedes).
    pub tokens: u64,
}

/// Window-safe hit length in blocks using L1 only, then L1 plus each lower tier in turn.
pub type TierHits = [u32; 4];

impl KVCacheManager {
    /// Registers the engine's device buffer (at least `capacity_bytes` long; group `g`'s page
    /// `p` starts at `p * block_bytes[g]`). From then on demotions and promotions move real
    /// bytes. Must happen before the first admission.
    pub fn register_device(&mut self, device: Arc<dyn DeviceBuffer>) -> Result<()> {
        if device.len() < self.arena.capacity_bytes() {
            return Err(Error::invalid(
                "device",
                format!(
                    "the buffer has {} bytes; the manager's arena needs {}",
                    device.len(),
                    self.arena.capacity_bytes()
                ),
            ));
        }
        if self.device.is_some() {
            return Err(Error::invalid(
                "device",
                "a device buffer is already registered",
            ));
        }
        if self.serial > 0 {
            return Err(Error::invalid(
                "device",
                "register the device buffer before the first admission",
            ));
        }
        for t in [Tier::Disk, Tier::Remote] {
            if self.lower.present(t) && self.lower.store(t).is_none() {
                return Err(Error::invalid(
                    "device",
                    format!(
                        "the {} tier has a capacity but no store: real bytes need one",
                        t.name()
                    ),
                ));
            }
        }
        self.lower.materialize()?;
        if let Some(host) = self.lower.host_memory() {
            self.loader = Some(Loader::start(host, device.clone()));
        }
        self.device = Some(device);
        self.start_fetchers();
        Ok(())
    }

    /// What each promotion of the last [`admit`](Self::admit) or [`step`](Self::step) call
    /// loaded, in order (empty when it promoted nothing): the bytes per layer and tier a
    /// latency model (the simulator's [`OverlapModel`](crate::sim::OverlapModel)) prices.
    pub fn promotions(&self) -> &[Promotion] {
        &self.promotions
    }

    /// Forgets the last call's promotions (at the start of each `admit` and `step`): a test
    /// inline, the clearing (drop glue) out of line, so that the step keeps its shape.
    #[inline(always)]
    pub(super) fn forget_promotions(&mut self) {
        if !self.promotions.is_empty() {
            self.clear_promotions();
        }
    }

    #[cold]
    #[inline(never)]
    fn clear_promotions(&mut self) {
        self.promotions.clear();
    }

    /// Unpins what finished loads held.
    pub(super) fn reap_loads(&mut self) {
        if self.inflight.is_empty() {
            return;
        }
        let mut freed = std::mem::take(&mut self.scratch);
        let mut i = 0;
        while i < self.inflight.len() {
            if !self.inflight[i].job.is_done() {
                i += 1;
                continue;
            }
            let done = self.inflight.swap_remove(i);
            for &n in &done.nodes {
                self.node_jobs.remove(&n);
                self.tree.unpin(n, &mut freed);
            }
            for &h in &done.records {
                self.lower.index.unpin(h);
            }
        }
        self.release(&mut freed);
        self.scratch = freed;
    }

    /// Waits for every load in flight (tests, shutdown), and settles the background loads
    /// from disk and the remote store (each until its deadline).
    pub fn wait_loads(&mut self) {
        self.settle_all();
        for f in &self.inflight {
            f.job.wait_all(None);
        }
        self.reap_loads();
    }

    /// Node pins held by loads in flight and requests waiting for KV (for validation).
    pub(super) fn load_pins(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.inflight
            .iter()
            .flat_map(|f| f.nodes.iter().copied())
            .chain(self.fetch_pins())
    }

    /// What the engine waits on before computing request `req`'s first layers: the loads that
    /// fill its hit (done at once when it hit only L1).
    pub fn load_handle(&self, req: u64) -> Result<LoadHandle> {
        let layers = self.spec().num_layers as usize;
        Ok(LoadHandle::new(self.running(req)?.loads.clone(), layers))
    }

    /// Demotes what an eviction took out of L1 (write on eviction), before its blocks are freed.
    pub(super) fn demote(&mut self, victims: &[Victim]) {
        if !self.lower.active() {
            return;
        }
        let mut i = 0;
        let mut entries: Vec<(usize, u64)> = Vec::with_capacity(MAX_GROUPS);
        while i < victims.len() {
            let v = victims[i];
            entries.clear();
            let mut j = i;
            let mut ckpt_end = false;
            while j < victims.len() && victims[j].hash == v.hash {
                let off = self
                    .arena
                    .offset(victims[j].handle)
                    .expect("victim is live");
                entries.push((victims[j].group, off));
                ckpt_end |= victims[j].ckpt_end;
                j += 1;
            }
            let device = self.device.clone();
            self.lower
                .put_block(v.hash, v.depth, ckpt_end, &entries, device.as_deref(), None);
            i = j;
        }
    }

    /// Persists the cache for a planned shutdown: host-memory records move down to disk (or
    /// the remote store), and every cached L1 block without a lower copy is written there too
    /// (full KV of every block, SWA KV where a checkpoint covers it), staying cached in L1. A
    /// restart then finds the whole cache on disk. Without a disk or remote tier it does
    /// nothing.
    pub fn flush(&mut self) {
        let Some(durable) = self.lower.durable() else {
            return;
        };
        self.wait_loads();
        self.lower.persist_host();
        let nodes = self.tree.nodes_deepest_first();
        self.put_nodes(&nodes, Some(durable));
    }

    /// Writes a finished request's cached path through to the remote store (full KV of every
    /// block, SWA KV where a checkpoint covers it).
    pub(super) fn write_through(&mut self, path: &[NodeId]) {
        if !self.config.write_through || !self.lower.present(Tier::Remote) {
            return;
        }
        self.put_nodes(path, Some(Tier::Remote));
    }

    fn put_nodes(&mut self, path: &[NodeId], first: Option<Tier>) {
        let device = self.device.clone();
        let mut entries = Vec::with_capacity(MAX_GROUPS);
        for &n in path {
            entries.clear();
            for g in 0..self.spec.groups.len() {
                let h = self.tree.block(n, g);
                let keep =
                    self.window(g).is_none() || !self.swa_aware() || self.tree.ckpt_covered(n, g);
                if h != 0 && keep {
                    entries.push((g, self.arena.offset(h).expect("tree block is live")));
                }
            }
            let hash = self.tree.hash_of(n);
            let depth = self.tree.depth(n);
            let ckpt = self.tree.is_checkpoint(n);
            self.lower
                .put_block(hash, depth, ckpt, &entries, device.as_deref(), first);
        }
    }

    /// Marks the lower copies of a hit path as used now, so a lower tier never evicts the
    /// prefixes of the hottest sequences because their hits were served from above.
    pub(super) fn touch_lower(&mut self, hashes: &[u64]) {
        if self.lower.index.is_empty() {
            return;
        }
        let now = self.lower.index.now();
        for &h in hashes {
            self.lower.index.touch(h, now);
        }
    }

    /// Asks the remote store which of the prompt's blocks past `from` it holds (blocks another
    /// instance wrote) and indexes them.
    fn discover_remote(&mut self, hashes: &[u64], from: usize) {
        // Without bytes, only a virtual store (the simulator's shared remote) can be asked.
        let askable = self.lower.materialized() || self.lower.has_virtual_store(Tier::Remote);
        if !self.lower.present(Tier::Remote) || !askable || from >= hashes.len() {
            return;
        }
        let groups = self.spec.groups.len();
        let mut keys: Vec<BlockKey> = Vec::with_capacity((hashes.len() - from) * groups);
        for &h in &hashes[from..] {
            let k = self.lower.store_key(h, 0); // one keyed hash per block
            for g in 0..groups {
                keys.push(BlockKey {
                    group: g as u16,
                    ..k
                });
            }
        }
        let Some(store) = self.lower.store_mut(Tier::Remote) else {
            return;
        };
        let Ok(found) = store.contains_many(&keys) else {
            return; // unavailable: a miss, counted by the store
        };
        for (k, &h) in hashes[from..].iter().enumerate() {
            let mut mask = 0u16;
            for g in 0..groups {
                if found[k * groups + g] {
                    mask |= 1 << g;
                }
            }
            if mask & self.full_mask() != self.full_mask() {
                break;
            }
            self.lower.discovered(h, (from + k) as u32, mask);
        }
    }

    pub(super) fn full_mask(&self) -> u16 {
        let mut m = 0;
        for g in 0..self.spec.groups.len() {
            if self.window(g).is_none() {
                m |= 1 << g;
            }
        }
        m
    }

    /// Walks L1, asks the remote store about the blocks past what is known locally (another
    /// instance may have written them), and returns the L1 path and the hits per level.
    fn walk_tiers(&mut self, hashes: &[u64], max_safe: u32) -> (Vec<NodeId>, TierHits) {
        let mut path = Vec::new();
        self.tree.walk(hashes, max_safe, &mut path);
        // Past the L1 path, blocks recovered from disk are claimed as the walk reaches them
        // (one keyed hash per block while unclaimed records remain; none on the L1 path).
        let mut from = path.len();
        while from < max_safe as usize
            && (self.lower.index.get(hashes[from]).is_some() || self.lower.claim(hashes[from]))
        {
            from += 1;
        }
        if from < max_safe as usize {
            self.discover_remote(&hashes[..max_safe as usize], from);
        }
        let hits = self.tier_walk(hashes, max_safe, &path);
        (path, hits)
    }

    /// Window-safe hits (in blocks) at each level: L1 alone, then adding host, disk, remote.
    /// `path` is the L1 walk's matched nodes. Window safety is checked per block across tiers:
    /// a block counts at a level if L1 or a record in a tier at or above the level holds it.
    pub(super) fn tier_walk(&self, hashes: &[u64], max_safe: u32, path: &[NodeId]) -> TierHits {
        let groups = self.spec.groups.len();
        let full = self.full_mask();
        let sliding: Vec<usize> = (0..groups).filter(|&g| self.window(g).is_some()).collect();
        let spans: Vec<u32> = sliding
            .iter()
            .map(|&g| {
                self.tree
                    .layout()
                    .window_blocks(u32::MAX, self.window(g).expect("sliding"))
            })
            .collect();
        let mut safe = [0u32; 4];
        let mut broken = [false; 4];
        let mut runs = vec![[0u32; 4]; sliding.len()];
        for (i, &h) in hashes.iter().enumerate() {
            let node = path.get(i).copied();
            // A hash the tree holds elsewhere (a conflict) cannot be linked here.
            if node.is_none() && self.tree.lookup(h).is_some() {
                break;
            }
            let rec = self.lower.index.get(h);
            let k = i as u32 + 1;
            for level in 0..4 {
                if broken[level] {
                    continue;
                }
                let rec_here = rec.filter(|r| (r.tier as usize) < level);
                let full_ok = node.is_some() || rec_here.is_some_and(|r| r.groups & full == full);
                if !full_ok {
                    broken[level] = true;
                    continue;
                }
                let mut ok = true;
                for (s, &g) in sliding.iter().enumerate() {
                    let have = node.is_some_and(|n| self.tree.block(n, g) != 0)
                        || rec_here.is_some_and(|r| r.groups & (1 << g) != 0);
                    runs[s][level] = if have { runs[s][level] + 1 } else { 0 };
                    ok &= runs[s][level] >= k.min(spans[s]);
                }
                if ok && k <= max_safe {
                    safe[level] = k;
                }
            }
            if broken[3] {
                break;
            }
        }
        // A level never does worse than the one above it.
        for level in 1..4 {
            safe[level] = safe[level].max(safe[level - 1]);
        }
        safe
    }

    /// Promotes the lower-tier part of a prompt's best window-safe prefix into L1 (see the
    /// module docs), or starts its background load (see `fetching`): then it returns true and
    /// request `req` waits for its KV. Doing nothing is always correct: the admission's own
    /// walk decides the hit. In four moves: the walk (which blocks L1 lacks, and which of the
    /// hits the tiers offer is worth loading), the allocation (all or nothing, after making
    /// room), the copies (host memory queued; disk and remote verified now, or in the
    /// background), and the links of the new blocks into the tree. `deep_ok`: whether disk and
    /// remote may serve (not for a request whose earlier load from them failed).
    pub(super) fn promote(
        &mut self,
        req: u64,
        hashes: &[u64],
        max_safe: u32,
        prompt_len: u64,
        deep_ok: bool,
    ) -> Result<bool> {
        self.tree.set_publisher(None);
        let (path, hits) = self.walk_tiers(hashes, max_safe);
        let k = self.choose_hit(hashes, &path, &hits, prompt_len, deep_ok);
        if k <= hits[0] {
            return Ok(false);
        }
        let need = self.promotion_need(&path, k);
        let Some(counts) = self.promotion_counts(&need, k, prompt_len) else {
            return Ok(false);
        };
        // Every needed block must have a lower copy (the walk says so); pin the records and the
        // L1 path while room is made.
        let mut records: Vec<u64> = need.iter().map(|&(i, _)| hashes[i as usize]).collect();
        records.sort_unstable();
        records.dedup();
        if records.iter().any(|&h| self.lower.index.get(h).is_none()) {
            return Ok(false);
        }
        // A record a load in flight reads: wait for that load instead of reading it twice.
        if let Some(id) = records.iter().find_map(|&h| self.fetching.reader_of(h)) {
            self.wait_on(req, id);
            return Ok(true);
        }
        let deep: Vec<Tier> = records
            .iter()
            .map(|&h| self.lower.index.get(h).expect("checked").tier)
            .filter(|&t| t != Tier::Host)
            .collect();
        let in_background = self.device.is_some()
            && !deep.is_empty()
            && deep.iter().all(|&t| self.fetching.background(t));
        for &h in &records {
            self.lower.index.pin(h);
        }
        for &n in &path {
            self.tree.pin(n);
        }
        let groups = self.spec.groups.len();
        if !self.make_room(&counts[..groups])? {
            self.unpin_promotion(&path, &records);
            return Ok(false);
        }
        let new_tokens = u64::from(k - hits[0]) * u64::from(self.config.block_tokens);
        if in_background {
            let pages = self.alloc_promotion(&need, &counts)?;
            // The load keeps the path and the records pinned until it settles.
            self.start_fetch(FetchPlan {
                req,
                hashes,
                path,
                k,
                need,
                pages,
                records,
                tokens: new_tokens,
            });
            return Ok(true);
        }
        let by_need = self.alloc_promotion(&need, &counts)?;
        let Some(copies) = self.copy_promotion(hashes, &need, &by_need, &mut records) else {
            self.arena.free(&by_need).expect("just allocated");
            self.unpin_promotion(&path, &records);
            self.promotion_failures += 1;
            return Ok(false);
        };
        // Every copy is verified or queued: the pages hold whole blocks.
        for &h in &by_need {
            self.written.set(h, true);
        }
        let mut freed = std::mem::take(&mut self.scratch);
        let filling = self.link_promotion(hashes, &path, k, &need, &by_need, &mut freed);
        self.start_load(copies.tasks, filling, &records, &mut freed);
        self.release(&mut freed);
        self.scratch = freed;
        // The temporary pins on the L1 path.
        self.unpin_promotion(&path, &[]);
        self.promoted_tokens[copies.deepest as usize] += new_tokens;
        self.promotions.push(Promotion {
            load: copies.load,
            tokens: new_tokens,
        });
        let now = self.lower.index.now();
        for &h in &hashes[..k as usize] {
            self.lower.index.touch(h, now);
        }
        Ok(false)
    }

    /// Which of the window-safe hits the tiers offer (`hits`: L1, then adding host, disk,
    /// remote; disk and remote only if `deep_ok`) an admission of `prompt_len` tokens takes:
    /// the deepest, or with [`LoadPolicy::Decide`] and real bytes, the one that delays the
    /// first token least, loading against recomputing (see [`crate::tiers::cost`]). Counts the
    /// decision.
    fn choose_hit(
        &mut self,
        hashes: &[u64],
        path: &[NodeId],
        hits: &TierHits,
        prompt_len: u64,
        deep_ok: bool,
    ) -> u32 {
        let top = if deep_ok { hits[3] } else { hits[1] };
        if top <= hits[0] || self.device.is_none() || self.config.load_policy == LoadPolicy::Always
        {
            return top;
        }
        let b = self.b();
        let est = self.fetching.estimate.now(std::time::Instant::now());
        let backlog = self.fetching.backlog(&est.bandwidth);
        let compute = |k: u32| prompt_len.saturating_sub(u64::from(k) * b);
        let mut best = (est.seconds([0; 3], backlog, compute(hits[0])), hits[0]);
        let mut last = hits[0];
        for &k in &hits[1..] {
            if k <= last || k > top {
                continue;
            }
            last = k;
            let mut bytes = [0u64; 3];
            for (i, g) in self.promotion_need(path, k) {
                let Some(r) = self.lower.index.get(hashes[i as usize]) else {
                    continue;
                };
                bytes[r.tier as usize] += self.tree.layout().block_bytes[g];
            }
            let cost = est.seconds(bytes, backlog, compute(k));
            // Ascending: a tie keeps the longer hit.
            if cost <= best.0 {
                best = (cost, k);
            }
        }
        let st = &mut self.fetching.stats;
        match best.1 {
            k if k == top => st.taken += 1,
            k if k == hits[0] => st.declined += 1,
            _ => st.split += 1,
        }
        st.declined_tokens += u64::from(top - best.1) * b;
        best.1
    }

    /// The (block, group) pairs L1 lacks for a hit of `k` blocks, `path` being the L1 walk's
    /// matched nodes: every full-attention block past the path, and each sliding group's window
    /// before block `k` where L1 has no block.
    fn promotion_need(&self, path: &[NodeId], k: u32) -> Vec<(u32, usize)> {
        let groups = self.spec.groups.len();
        let d1 = path.len() as u32;
        let mut need: Vec<(u32, usize)> = Vec::new();
        for i in d1.min(k)..k {
            for g in 0..groups {
                if self.window(g).is_none() || !self.swa_aware() {
                    need.push((i, g));
                }
            }
        }
        if self.swa_aware() {
            for g in (0..groups).filter(|&g| self.window(g).is_some()) {
                let span = self
                    .tree
                    .layout()
                    .window_blocks(k, self.window(g).expect("sliding"));
                for i in k - span..k {
                    let have = (i < d1) && self.tree.block(path[i as usize], g) != 0;
                    if !have {
                        need.push((i, g));
                    }
                }
            }
        }
        need
    }

    /// Blocks to allocate per group for `need`, as `make_room` takes them; None when the whole
    /// admission cannot fit: the promoted blocks plus what the rest of the prompt needs (its
    /// full blocks, a window and a checkpoint per sliding group). Otherwise the copy would be
    /// wasted and would evict other blocks for nothing.
    fn promotion_counts(
        &self,
        need: &[(u32, usize)],
        k: u32,
        prompt_len: u64,
    ) -> Option<[u64; MAX_GROUPS]> {
        let groups = self.spec.groups.len();
        let mut counts = [0u64; MAX_GROUPS];
        for (g, c) in counts.iter_mut().enumerate().take(groups) {
            *c = need.iter().filter(|x| x.1 == g).count() as u64;
        }
        let rest_blocks = self.bm.ceil(prompt_len).saturating_sub(u64::from(k));
        let mut need_bytes = 0u64;
        for g in 0..groups {
            let bb = self.tree.layout().block_bytes[g];
            let promoted = counts[g];
            let rest = match self.window(g) {
                Some(w) if self.swa_aware() => {
                    rest_blocks.min(2 * u64::from(w).div_ceil(self.b()) + 2)
                }
                _ => rest_blocks,
            };
            need_bytes += (promoted + rest) * bb;
        }
        (need_bytes <= self.arena.bytes_free() + self.tree.evictable_bytes()).then_some(counts)
    }

    /// Undoes a promotion's temporary pins: on the L1 `path` and on the lower `records`.
    fn unpin_promotion(&mut self, path: &[NodeId], records: &[u64]) {
        let mut freed = std::mem::take(&mut self.scratch);
        for &n in path {
            self.tree.unpin(n, &mut freed);
        }
        self.release(&mut freed);
        self.scratch = freed;
        for &h in records {
            self.lower.index.unpin(h);
        }
    }

    /// Allocates the L1 blocks of a promotion (room was made): `by_need[i]` holds `need[i]`.
    fn alloc_promotion(
        &mut self,
        need: &[(u32, usize)],
        counts: &[u64; MAX_GROUPS],
    ) -> Result<Vec<Handle>> {
        let mut by_need = vec![0 as Handle; need.len()];
        let mut per_group = Vec::new();
        for g in 0..self.spec.groups.len() {
            per_group.clear();
            self.arena
                .alloc_into(g, counts[g] as usize, &mut per_group)?;
            let slots = need.iter().enumerate().filter(|(_, x)| x.1 == g);
            for ((idx, _), &h) in slots.zip(&per_group) {
                by_need[idx] = h;
            }
        }
        Ok(by_need)
    }

    /// Copies a promotion's blocks into their L1 pages: from disk and the remote store now
    /// (each read verified), from host memory as copy tasks for the loader; without a device,
    /// only counts. None at the first failed read, whose record is dropped from `records`
    /// (unpinned and forgotten: it is bad).
    fn copy_promotion(
        &mut self,
        hashes: &[u64],
        need: &[(u32, usize)],
        by_need: &[Handle],
        records: &mut Vec<u64>,
    ) -> Option<Copies> {
        let device = self.device.clone();
        let mut tasks = Vec::new();
        let mut load = LoadBytes {
            per_layer: vec![[0u64; 3]; self.spec.num_layers as usize],
            sliding: self.layer_sliding.clone(),
        };
        let mut deepest = Tier::Host;
        for (idx, &(i, g)) in need.iter().enumerate() {
            let hash = hashes[i as usize];
            let tier = self.lower.index.get(hash).expect("pinned").tier;
            deepest = deepest.max(tier);
            let group = &self.spec.groups[g];
            let layer_bytes = group.layer_bytes_per_token() * u64::from(self.config.block_tokens);
            for &l in &group.layers {
                load.per_layer[l as usize][tier as usize] += layer_bytes;
            }
            let dst = self.arena.offset(by_need[idx]).expect("allocated");
            match (&device, tier) {
                (Some(_), Tier::Host) => {
                    let src = self
                        .lower
                        .host_offset(hash, g)
                        .expect("host record has the block");
                    for (j, &l) in group.layers.iter().enumerate() {
                        let off = j as u64 * layer_bytes;
                        tasks.push(CopyTask {
                            layer: l,
                            src: src + off,
                            dst: dst + off,
                            len: layer_bytes,
                        });
                    }
                    self.lower.count_read(hash, g);
                }
                (Some(dev), _) => {
                    if !self.lower.read_to_device(hash, g, dev.as_ref(), dst) {
                        self.lower.index.unpin(hash);
                        records.retain(|&h| h != hash);
                        self.lower.forget(hash);
                        return None;
                    }
                }
                (None, Tier::Host) => self.lower.count_read(hash, g),
                (None, _) => {
                    // Virtual: a shared virtual store may have lost the record meanwhile.
                    if !self.lower.virtual_read(hash, g) {
                        self.lower.index.unpin(hash);
                        records.retain(|&h| h != hash);
                        self.lower.forget(hash);
                        return None;
                    }
                }
            }
        }
        Some(Copies {
            tasks,
            load,
            deepest,
        })
    }

    /// Links a promotion's new blocks into the tree: nodes past the L1 `path` up to block `k`,
    /// blocks attached to nodes on it, and a checkpoint at the new resume point. Returns the
    /// nodes being filled (pinned: the new nodes are created pinned, the others are pinned
    /// here).
    fn link_promotion(
        &mut self,
        hashes: &[u64],
        path: &[NodeId],
        k: u32,
        need: &[(u32, usize)],
        by_need: &[Handle],
        freed: &mut Freed,
    ) -> Vec<NodeId> {
        let groups = self.spec.groups.len();
        let d1 = path.len() as u32;
        let placed: std::collections::HashMap<(u32, usize), Handle> =
            need.iter().copied().zip(by_need.iter().copied()).collect();
        let block_of = |i: u32, g: usize| -> Handle { placed.get(&(i, g)).copied().unwrap_or(0) };
        let mut created: Vec<NodeId> = Vec::new();
        let mut parent = path.last().copied().unwrap_or(NONE);
        for i in d1..k {
            let hash = hashes[i as usize];
            match self.tree.claim_child(hash, parent, i, freed) {
                Link::Absent => {}
                _ => unreachable!("the tier walk stops at blocks the tree holds"),
            }
            let mut blocks = [0 as Handle; MAX_GROUPS];
            for (g, b) in blocks.iter_mut().enumerate().take(groups) {
                *b = block_of(i, g);
            }
            let n = self.tree.insert(hash, parent, i, &blocks[..groups]);
            created.push(n);
            parent = n;
        }
        let mut attached: Vec<NodeId> = Vec::new();
        for &(i, g) in need {
            if i < d1 {
                let n = path[i as usize];
                self.tree.attach(n, g, block_of(i, g));
                attached.push(n);
            }
        }
        attached.sort_unstable();
        attached.dedup();
        let end = created
            .last()
            .copied()
            .unwrap_or_else(|| path[k as usize - 1]);
        if self.swa_aware() {
            let max_blocks = self.run_lengths(k, false);
            self.tree
                .add_checkpoint(end, &max_blocks, CheckpointKind::Restored);
        }
        // Nodes being filled stay pinned until their copies land.
        let mut pinned_nodes = created;
        for &n in &attached {
            self.tree.pin(n);
            pinned_nodes.push(n);
        }
        pinned_nodes
    }

    /// Hands a promotion's host-memory copies to the loader, keeping the `nodes` they fill and
    /// the host records they read pinned until they land (see [`Inflight`]); the other records'
    /// pins go now. Without copies to wait for, every pin goes now.
    fn start_load(
        &mut self,
        tasks: Vec<CopyTask>,
        nodes: Vec<NodeId>,
        records: &[u64],
        freed: &mut Freed,
    ) {
        let host_records: Vec<u64> = records
            .iter()
            .copied()
            .filter(|&h| {
                self.lower
                    .index
                    .get(h)
                    .is_some_and(|r| r.tier == Tier::Host)
            })
            .collect();
        if tasks.is_empty() {
            for &n in &nodes {
                self.tree.unpin(n, freed);
            }
            for &h in records {
                self.lower.index.unpin(h);
            }
            return;
        }
        for &h in records.iter().filter(|h| !host_records.contains(h)) {
            self.lower.index.unpin(h);
        }
        let job = LoadJob::new(tasks, self.spec.num_layers as usize, &self.layer_sliding);
        self.loader
            .as_ref()
            .expect("a loader runs when L2 holds bytes")
            .submit(job.clone());
        for &n in &nodes {
            self.node_jobs.insert(n, job.clone());
        }
        self.inflight.push(Inflight {
            job,
            nodes,
            records: host_records,
        });
    }

    /// Window-safe hit lengths in tokens for a prompt at each level (L1 alone, then adding host,
    /// disk and remote), without changing anything.
    pub fn match_prefix_tiers(
        &mut self,
        prompt: super::Prompt<'_>,
        salt: Option<&[u8]>,
    ) -> Result<[u64; 4]> {
        let seed = crate::hash::root_seed(salt);
        let hashes = self.prompt_hashes(&prompt, seed)?;
        let max_safe = ((prompt.len() - 1) / self.b()) as u32;
        let (_, hits) = self.walk_tiers(&hashes, max_safe);
        Ok(hits.map(|k| u64::from(k) * self.b()))
    }
}

/// Where one block of a prompt lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockResidency {
    /// Bit g set: L1 holds group g's block (its tree node).
    pub device_groups: u16,
    /// The lower tier holding a copy, and which groups it holds.
    pub lower: Option<(Tier, u16)>,
}

impl KVCacheManager {
    /// Where each whole block of a prompt lives, L1 and below (one entry per block, up to the
    /// first block cached nowhere).
    pub fn residency(
        &self,
        prompt: super::Prompt<'_>,
        salt: Option<&[u8]>,
    ) -> Result<Vec<BlockResidency>> {
        let seed = crate::hash::root_seed(salt);
        let hashes = self.prompt_hashes(&prompt, seed)?;
        let mut path = Vec::new();
        self.tree.walk(&hashes, 0, &mut path);
        let mut out = Vec::new();
        for (i, &h) in hashes.iter().enumerate() {
            let mut device_groups = 0u16;
            if let Some(&n) = path.get(i) {
                for g in 0..self.spec.groups.len() {
                    if self.tree.block(n, g) != 0 {
                        device_groups |= 1 << g;
                    }
                }
            }
            let lower = self.lower.lookup(h).map(|r| (r.tier, r.groups));
            if device_groups == 0 && lower.is_none() {
                break;
            }
            out.push(BlockResidency {
                device_groups,
                lower,
            });
        }
        Ok(out)
    }
}
