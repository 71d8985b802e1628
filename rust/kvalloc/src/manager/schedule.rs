//! Scheduling a request's range: which blocks it allocates, which go to the tree (in-flight
//! sharing and checkpoints), and releasing what leaves the window (making room by eviction is
//! in `room.rs`).

use super::request::Request;
use super::{BlockMath, KVCacheManager, MAX_GROUPS};
use crate::error::Result;
use crate::prefix::{CheckpointKind, Freed, Linked, PrefixTree, NONE};
use crate::slab::{Handle, SlabArena};
use crate::spec::KVGroup;

/// Releases a running request's sliding-window blocks below the window ending at its last
/// whole-block boundary `E` (the window `[E - W, E)` may still become the output-end
/// checkpoint), keeping what the step computing tokens from `keep_start` on reads and writes
/// (`u64::MAX`: nothing extra): private blocks go back to the arena, tree blocks are simply no
/// longer referenced. Returns how many blocks went back. A free function over the fields it needs, so
/// the decode path can call it while holding the request.
pub(super) fn release_below_window(
    bm: BlockMath,
    groups: &[KVGroup],
    tree: &PrefixTree,
    arena: &mut SlabArena,
    r: &mut Request,
    scratch: &mut Vec<Handle>,
    keep_start: u64,
) -> u64 {
    scratch.clear();
    let whole = bm.floor(r.len) * bm.b;
    for (g, group) in groups.iter().enumerate() {
        let Some(w) = group.window else { continue };
        let wf = bm
            .floor(whole.saturating_sub(u64::from(w)))
            .min(r.tables[g].len() as u64);
        // The step that computes `[keep_start, len)` reads keys from `keep_start + 1 - W` on
        // and writes every block of the range: those stay in the table until the next call.
        let keep_from = match keep_start {
            u64::MAX => u64::MAX,
            s => bm.floor((s + 1).saturating_sub(u64::from(w))),
        };
        let wf = wf.min(keep_from);
        for i in r.swa_floor[g]..wf {
            let h = std::mem::replace(&mut r.tables[g][i as usize], 0);
            let shared = r
                .path
                .get(i as usize)
                .is_some_and(|&node| tree.block(node, g) == h);
            if h != 0 && !shared {
                scratch.push(h);
            }
        }
        r.swa_floor[g] = r.swa_floor[g].max(wf);
    }
    if !scratch.is_empty() {
        arena
            .free(scratch)
            .expect("a running request's private blocks are live");
    }
    scratch.len() as u64
}

/// What `schedule` does with one block of the range it extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// Nothing (already held, or a sliding position outside every window and checkpoint).
    Skip,
    /// A new block the request keeps to itself.
    Private,
    /// A new block that goes to the tree (full KV of a prompt block, or a checkpoint block).
    Tree,
    /// A block allocated by an earlier chunk that goes to the tree now that it is whole.
    Carried,
}

impl Slot {
    pub(super) fn to_tree(self) -> bool {
        matches!(self, Slot::Tree | Slot::Carried)
    }
}

impl KVCacheManager {
    /// Planned prompt checkpoints: (end block, with the extra block). `pin_end`: the block a
    /// retention pin of the prompt ends at (0: none), kept as a resume point when this request
    /// computes it.
    pub(super) fn plan_checkpoints(
        &self,
        safe: u32,
        depth: u32,
        n_full: u32,
        pin_end: u32,
        plans: &mut Vec<(u32, bool, CheckpointKind)>,
    ) {
        if !self.swa_aware() || !self.spec.groups.iter().any(|g| g.window.is_some()) {
            return;
        }
        if safe < depth && depth < n_full {
            plans.push((depth, false, CheckpointKind::Branch)); // branch point: this request computes the window
        }
        // The prompt's end has its own plan (with the extra block), which this must not replace.
        if safe < pin_end && pin_end < n_full {
            plans.push((pin_end, false, CheckpointKind::Pin));
        }
        if let Some(iv) = self.config.checkpoint_interval {
            let b = self.b();
            let mut t = iv;
            while t < u64::from(n_full) * b {
                let e = (t / b) as u32;
                if e > safe && e != depth {
                    plans.push((e, false, CheckpointKind::Interval));
                }
                t += iv;
            }
        }
        match self.config.resume_granularity {
            // The prompt's last resume point; one this request did not compute needs no plan.
            Some(a) => {
                let b = self.b();
                let e = (u64::from(n_full) * b / a * a / b) as u32;
                if e > safe {
                    plans.push((e, false, CheckpointKind::PromptEnd));
                }
            }
            None if n_full > 0 => plans.push((n_full, true, CheckpointKind::PromptEnd)),
            None => {}
        }
        plans.sort_unstable();
        plans.dedup_by_key(|p| p.0);
    }

    /// Whether a prompt computing blocks `safe..n_full` keeps their SWA KV as speculative
    /// checkpoints: the option is on, the policy is swa-aware with a sliding group, and the
    /// arena's free bytes cover twice those blocks at every group (they never cost an eviction).
    pub(super) fn speculates(&self, safe: u32, n_full: u32) -> bool {
        if !self.config.speculative_checkpoints
            || !self.swa_aware()
            || n_full <= safe
            || !self.spec.groups.iter().any(|g| g.window.is_some())
        {
            return false;
        }
        let per_block: u64 = self.tree.layout().block_bytes.iter().sum();
        let need = u64::from(n_full - safe).saturating_mul(per_block);
        self.arena.bytes_free() / 2 >= need
    }

    /// Whether block `i` of sliding group `g` belongs to a planned checkpoint run.
    pub(super) fn in_plan(&self, r: &Request, g: usize, i: u64) -> bool {
        if r.spec_next > 0 && i + 1 >= u64::from(r.spec_next) {
            return true; // a speculating prompt keeps every block it computes
        }
        let w = self.window(g).expect("sliding");
        r.plans.iter().any(|&(e, extra, _)| {
            let e = u64::from(e);
            let first = self
                .window_first(e * self.b(), w)
                .saturating_sub(u64::from(extra));
            i >= first && i < e
        })
    }

    /// Extends `r`'s scheduled range to `end`: allocates what the new positions need (evicting
    /// cached entries if necessary), links prompt blocks into the tree, registers checkpoints
    /// whose windows are complete, and releases SWA blocks that left the window. Returns false,
    /// changing nothing, when it does not fit.
    pub(super) fn schedule(&mut self, r: &mut Request, end: u64) -> Result<bool> {
        // 1. Decide each block of `[first_blk, end_blk)` once (the buffer is reused).
        let mut plan = std::mem::take(&mut self.scratch_plan);
        let counts = self.plan_range(r, r.len, end, &mut plan);
        self.schedule_planned(r, end, plan, &counts)
    }

    /// [`schedule`](Self::schedule) with the plan of `[r.len, end)` and its counts already made.
    pub(super) fn schedule_planned(
        &mut self,
        r: &mut Request,
        end: u64,
        plan: Vec<Slot>,
        counts: &[u64; MAX_GROUPS],
    ) -> Result<bool> {
        let start = r.len;
        debug_assert!(end > start);
        let groups = self.spec.groups.len();
        // 2. Make room, all or nothing.
        if !self.make_room(&counts[..groups])? {
            self.scratch_plan = plan;
            return Ok(false);
        }
        // 3. Allocate and fill the tables in block order.
        self.fill_range(r, end, &plan, counts)?;
        // 4. Link whole prompt blocks into the tree (in-flight sharing), unless the request
        // opted out of caching.
        let whole_end = self.bm.floor(end).min(self.bm.floor(r.prompt_len));
        if r.retention.cache {
            self.link_range(r, end, whole_end, &plan);
        }
        self.scratch_plan = plan;
        r.len = end;
        // 5. Register planned checkpoints whose runs are complete.
        self.register_plans(r, whole_end);
        // Blocks attached to pinned nodes may have taken the pins past their cap.
        self.enforce_pin_cap();
        // 6. Release SWA blocks that left the window, except what the engine's step over
        // `[start, end)` still reads (the window before `start`) or writes (a checkpoint's extra
        // block below the new window): those go at the request's next call.
        if self.swa_aware() {
            self.window_released += release_below_window(
                self.bm,
                &self.spec.groups,
                &self.tree,
                &mut self.arena,
                r,
                &mut self.scratch_handles,
                start,
            );
            r.last_start = start;
        }
        Ok(true)
    }

    /// Allocates the blocks `plan` asks for in `[r.len, end)` (room was made) and puts them in
    /// `r`'s tables, recording which pages of the range hold a whole block.
    fn fill_range(
        &mut self,
        r: &mut Request,
        end: u64,
        plan: &[Slot],
        counts: &[u64; MAX_GROUPS],
    ) -> Result<()> {
        let first_blk = self.bm.floor(r.len);
        let end_blk = self.bm.ceil(end);
        let span = (end_blk - first_blk) as usize;
        for t in r.tables.iter_mut() {
            if (t.len() as u64) < end_blk {
                t.resize(end_blk as usize, 0);
            }
        }
        let mut handles = std::mem::take(&mut self.scratch_handles);
        for g in 0..self.spec.groups.len() {
            if counts[g] == 0 {
                continue;
            }
            handles.clear();
            self.arena.alloc_into(g, counts[g] as usize, &mut handles)?;
            let mut next = handles.iter();
            for (k, slot) in plan[g * span..(g + 1) * span].iter().enumerate() {
                if matches!(slot, Slot::Tree | Slot::Private) {
                    r.tables[g][first_blk as usize + k] = *next.next().expect("allocated");
                }
            }
            debug_assert!(next.next().is_none());
        }
        self.scratch_handles = handles;
        // Every page of the range is the request's own (new, or left partial by its last
        // call): whole once the range covers its block.
        let whole_blocks = self.bm.floor(end);
        for table in &r.tables {
            for (i, &h) in table[first_blk as usize..end_blk as usize]
                .iter()
                .enumerate()
            {
                if h != 0 {
                    self.written.set(h, first_blk + (i as u64) < whole_blocks);
                }
            }
        }
        Ok(())
    }

    /// Links `r`'s whole prompt blocks of `[r.len, end)` below `whole_end` into the tree (the
    /// blocks `plan` sends there), and attaches the checkpoint blocks of nodes that already
    /// existed.
    fn link_range(&mut self, r: &mut Request, end: u64, whole_end: u64, plan: &[Slot]) {
        let first_blk = self.bm.floor(r.len);
        let span = (self.bm.ceil(end) - first_blk) as usize;
        let groups = self.spec.groups.len();
        let path_before = r.path.len();
        let mut linked_shared = false;
        for i in r.path.len() as u64..whole_end {
            // `i < first_blk`: a conflict in an earlier call stopped linking; those blocks'
            // attach state is not in this call's span (and `i - first_blk` would underflow).
            if r.path.len() as u64 != i || i < first_blk {
                break; // linking stopped at a conflict: the rest stays private
            }
            let mut take = [false; MAX_GROUPS];
            let k = (i - first_blk) as usize;
            // `plan` holds `groups` runs of `span` slots.
            for (t, group_plan) in take.iter_mut().zip(plan.chunks_exact(span)) {
                *t = group_plan[k].to_tree();
            }
            match self.link_block(r, i, &take[..groups]) {
                None => break,
                Some(true) => r.created.push(*r.path.last().expect("just linked")),
                Some(false) => linked_shared = true,
            }
        }
        // Checkpoint blocks for nodes that already existed (a branch window, or a node another
        // request linked first): nodes this call inserted took their blocks already. Only whole
        // blocks: a block this call computes part of is published by the call that completes
        // it (as `Carried`), so the tree never hands out a page its owner has not finished.
        let existing_end = if linked_shared {
            r.path.len()
        } else {
            path_before
        };
        let attach_span = existing_end
            .min(whole_end as usize)
            .saturating_sub(first_blk as usize)
            .min(span);
        for g in 0..groups {
            for k in 0..attach_span {
                let i = first_blk as usize + k;
                if plan[g * span + k].to_tree() && self.tree.block(r.path[i], g) == 0 {
                    self.tree.attach(r.path[i], g, r.tables[g][i]);
                }
            }
        }
    }

    /// Registers `r`'s planned checkpoints whose runs end at or below `whole_end`.
    fn register_plans(&mut self, r: &mut Request, whole_end: u64) {
        while r.plans_done < r.plans.len() && u64::from(r.plans[r.plans_done].0) <= whole_end {
            let (e, extra, kind) = r.plans[r.plans_done];
            r.plans_done += 1;
            if e as usize > r.path.len() {
                continue; // not linked (a hash conflict): no checkpoint there
            }
            let max_blocks = self.run_lengths(e, extra);
            let n = r.path[e as usize - 1];
            if self.tree.add_checkpoint(n, &max_blocks, kind) {
                r.created_ckpts.push(n);
            }
        }
        if r.spec_next > 0 {
            let n_full = self.bm.floor(r.prompt_len);
            let upto = whole_end.min(n_full).min(r.path.len() as u64) as u32;
            while r.spec_next <= upto {
                let e = r.spec_next;
                r.spec_next += 1;
                let max_blocks = self.run_lengths(e, false);
                let n = r.path[e as usize - 1];
                if self
                    .tree
                    .add_checkpoint(n, &max_blocks, CheckpointKind::Speculative)
                {
                    r.created_ckpts.push(n);
                }
            }
        }
    }

    /// What scheduling `[start, end)` for `r` does with each block: `plan[g * span + k]` for
    /// block `first_blk + k` of group g. Returns the blocks to allocate per group. Reads only:
    /// admission uses it to refuse a hopeless request before pinning anything.
    pub(super) fn plan_range(
        &self,
        r: &Request,
        start: u64,
        end: u64,
        plan: &mut Vec<Slot>,
    ) -> [u64; MAX_GROUPS] {
        let b = self.b();
        let first_blk = self.bm.floor(start);
        let end_blk = self.bm.ceil(end);
        let n_full_prompt = self.bm.floor(r.prompt_len);
        let whole_tokens = self.bm.floor(end) * b;
        let groups = self.spec.groups.len();
        let span = (end_blk - first_blk) as usize;
        plan.clear();
        plan.resize(groups * span, Slot::Skip);
        let mut counts = [0u64; MAX_GROUPS];
        for g in 0..groups {
            let table = &r.tables[g];
            // Keep the window of the last whole-block boundary too (see `release_below_window`).
            let window_first = self.window(g).map(|w| self.window_first(whole_tokens, w));
            for i in first_blk..end_blk {
                let k = g * span + (i - first_blk) as usize;
                let is_prompt_block = i < n_full_prompt;
                if (i as usize) < table.len() && table[i as usize] != 0 {
                    // A block a previous chunk left partial is in the table but not in the
                    // tree: it goes there once whole (its full KV, or its checkpoint SWA KV),
                    // into the node this call links, or into the node already on the path
                    // that lacks it (a branch window), never before.
                    let unpublished = is_prompt_block
                        && r.path
                            .get(i as usize)
                            .is_none_or(|&n| self.tree.block(n, g) == 0);
                    let sliding = window_first.is_some() && self.swa_aware();
                    if r.retention.cache && unpublished && (!sliding || self.in_plan(r, g, i)) {
                        plan[k] = Slot::Carried;
                    }
                    continue;
                }
                let node = r.path.get(i as usize).copied();
                let node_has = node.is_some_and(|n| self.tree.block(n, g) != 0);
                plan[k] = match window_first {
                    Some(wf) if self.swa_aware() => {
                        if is_prompt_block && !node_has && self.in_plan(r, g, i) {
                            Slot::Tree // a checkpoint block
                        } else if i >= wf || self.config.prefill_reads_cache {
                            // The running window; or, for an engine whose attention reads the
                            // chunk from the cache, every block of the range (released by the
                            // next call, below its window).
                            Slot::Private
                        } else {
                            Slot::Skip
                        }
                    }
                    // Full groups, and every group under the dense policy (a request that opted
                    // out of caching publishes nothing: its blocks stay its own).
                    _ if is_prompt_block && !node_has && r.retention.cache => Slot::Tree,
                    _ => Slot::Private,
                };
                if matches!(plan[k], Slot::Tree | Slot::Private) {
                    counts[g] += 1;
                }
            }
        }
        counts
    }

    /// Per sliding group, the longest run a checkpoint ending at block `e` may cover.
    /// Indexed like the sliding groups; no allocation (it runs for every admission).
    pub(super) fn run_lengths(&self, e: u32, extra: bool) -> [u32; MAX_GROUPS] {
        let mut out = [0; MAX_GROUPS];
        let windows = self.spec.groups.iter().filter_map(|g| g.window);
        for (o, w) in out.iter_mut().zip(windows) {
            let t = self.tree.layout().window_blocks(e, w);
            *o = (t + u32::from(extra)).min(e);
        }
        out
    }

    pub(super) fn is_private(&self, r: &Request, g: usize, i: u64) -> bool {
        let h = r.tables[g][i as usize];
        h != 0
            && r.path
                .get(i as usize)
                .is_none_or(|&n| self.tree.block(n, g) != h)
    }

    /// Links block `i` of `r` (its parent is `r.path[i - 1]`) into the tree and pins it: shares
    /// the node if one is there (the request's blocks stay private), else inserts one that takes
    /// the request's block of each group with `take[g]`. Returns `Some(true)` for a new node,
    /// `Some(false)` for a shared one, `None` when the hash belongs elsewhere (linking stops).
    pub(super) fn link_block(&mut self, r: &mut Request, i: u64, take: &[bool]) -> Option<bool> {
        let hash = r.hashes[i as usize];
        let parent = if i == 0 { NONE } else { r.path[i as usize - 1] };
        let mut blocks = [0 as Handle; MAX_GROUPS];
        for (g, b) in blocks.iter_mut().enumerate().take(take.len()) {
            if take[g] {
                *b = r.tables[g][i as usize];
            }
        }
        let mut freed = std::mem::take(&mut self.scratch);
        let link = self
            .tree
            .link(hash, parent, i as u32, &blocks[..take.len()], &mut freed);
        self.release(&mut freed);
        self.scratch = freed;
        match link {
            Linked::Present(n) => {
                self.tree.pin(n);
                r.path.push(n);
                Some(false)
            }
            Linked::Conflict => None,
            Linked::Inserted(n) => {
                r.path.push(n);
                Some(true)
            }
        }
    }

    pub(super) fn release(&mut self, freed: &mut Freed) {
        if freed.is_empty() {
            return;
        }
        let mut hs = std::mem::take(&mut self.scratch_handles);
        hs.clear();
        hs.extend(freed.iter().map(|&(_, h)| h));
        freed.clear();
        self.arena
            .free(&hs)
            .expect("blocks released by the manager are live and owned once");
        self.scratch_handles = hs;
    }
}
