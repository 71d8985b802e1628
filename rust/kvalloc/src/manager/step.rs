//! The batched step: one pass checks every id and argument (and requests the cache lines the
//! run will need), a second runs finishes, aborts, extensions and admissions. Every prefetch of
//! the hot path lives here.

use super::api::{Admission, Extension, Prompt, Step, StepOutcome};
use super::request::Request;
use super::{BlockMath, KVCacheManager};
use crate::error::{Error, Result};
use crate::hash;

/// At most this many prompt blocks are hashed ahead per step: an `fcfs` refusal leaves the
/// admissions after it unattempted, and their hashing wasted.
pub(super) const PREHASH_MAX_BLOCKS: usize = 4096;

/// Per-admission hash vectors kept between steps (a step admitting more allocates the rest).
pub(super) const PREHASH_KEPT_LISTS: usize = 256;

/// At most this many index lines are prefetched per step (more would push each other out of
/// the first-level cache before they are read).
pub(super) const PREFETCH_MAX_LINES: usize = 256;

/// Marks a decode's slot (in `check_step`'s slot list) as a plain append, run by
/// `append_plain`: its checks already made, most of a decode step's tokens skip them.
pub(super) const PLAIN: usize = 1 << (usize::BITS - 1);

/// [`KVCacheManager::check_step`] for one extension of the request in `slot` of `records`:
/// its stamp set (a second mention in the step finds it). Returns whether it is a plain
/// append: it neither starts nor completes a block and follows a decode (not a chunk), so
/// running it only appends (see [`PLAIN`]); one that does either is listed in `crossing`.
#[inline(always)]
pub(super) fn check_step_extension(
    bm: BlockMath,
    records: &mut [Option<Box<Request>>],
    crossing: &mut Vec<usize>,
    stamp: u64,
    id: u64,
    slot: usize,
    ext: Extension<'_>,
) -> Result<bool> {
    let Some(r) = records[slot].as_deref_mut().filter(|r| r.stamp != stamp) else {
        return Err(KVCacheManager::not_extensible(id));
    };
    r.stamp = stamp;
    KVCacheManager::check_extension(id, r, ext)?;
    // A decode token lands in the tail: start loading that line now, so the run pass
    // (after every check) finds it in cache rather than taking a miss per request.
    crate::mem::prefetch::prefetch(r.tail.as_ptr_range().end);
    // One that starts a block (new blocks) or completes one (its hash, and the window's
    // release) reaches into more of the record's vectors: request their lines too.
    let n = match ext {
        Extension::Tokens(t) => t.len() as u64,
        Extension::Count(n) => n,
    };
    let (opens, closes) = bm.boundaries(r.len, n);
    if opens || closes {
        crate::mem::prefetch::prefetch(r.tables.as_ptr());
        crate::mem::prefetch::prefetch(r.swa_floor.as_ptr());
        crate::mem::prefetch::prefetch(r.tail.as_ptr());
        crate::mem::prefetch::prefetch(r.hashes.as_ptr_range().end);
        crossing.push(slot);
        return Ok(false);
    }
    Ok(r.len - r.last_start.min(r.len) <= 1)
}

impl KVCacheManager {
    /// Serves a whole scheduler step in one call. Every id is checked before anything changes:
    /// an unknown or repeated id is an error and the step does nothing.
    pub fn step(&mut self, step: &Step<'_>) -> Result<StepOutcome> {
        let mut out = StepOutcome::default();
        self.step_into(step, &mut out)?;
        Ok(out)
    }

    /// [`step`](Self::step), writing into `out` (cleared first), so that a caller stepping
    /// many times reuses its vectors. On an error `out` holds nothing meaningful.
    // Inlinable across crates: the bindings call this once per step, and inlined there its
    // decode loop is optimized with the caller's `Step` in view (fewer instructions per decode
    // token in `benches/step.py loop` under callgrind).
    #[inline]
    pub fn step_into(&mut self, step: &Step<'_>, out: &mut StepOutcome) -> Result<()> {
        self.steps += 1;
        self.reap_loads();
        self.poll_loads();
        self.forget_promotions();
        self.expire_pins();
        out.extensions = 0;
        out.refused.clear();
        out.admitted.clear();
        out.waiting.clear();
        out.ready.clear();
        // The slot of each extension's request, found once while checking and used to run it.
        let mut slots = std::mem::take(&mut self.scratch_slots);
        let res = self
            .check_step(step, &mut slots)
            .and_then(|()| self.run_step(step, &slots, out));
        self.scratch_slots = slots;
        self.take_ready_into(&mut out.ready);
        res
    }

    /// Checks every id and argument of a step, changing nothing but stamps: each running
    /// request named is stamped with the step's number, so a second mention finds its stamp
    /// (one lookup per request, no temporary sets). Fills `slots` with the extensions' slots,
    /// a decode's marked [`PLAIN`] when running it only appends.
    pub(super) fn check_step(&mut self, step: &Step<'_>, slots: &mut Vec<usize>) -> Result<()> {
        let stamp = self.steps;
        self.crossing.clear();
        // The pooled records the admissions will take arrive while the step is checked.
        self.prefetch_pooled_records(step.admit.len(), step.finish.len() + step.abort.len());
        for &id in step.finish.iter().chain(&step.abort) {
            let fresh = match self.requests.slot(id).and_then(|s| self.requests.at_mut(s)) {
                Some(r) if r.stamp != stamp => {
                    r.stamp = stamp;
                    true
                }
                Some(_) => false,
                // A request waiting for KV may be finished or aborted too (it drops its wait).
                None => self.fetching_waits(id),
            };
            if !fresh {
                return Err(Error::Request {
                    req: id,
                    message: "is not running or appears twice in finish/abort".into(),
                });
            }
        }
        let decode = step.decode;
        if decode.ids.len() != decode.tokens.len() {
            return Err(Error::invalid(
                "decode",
                format!(
                    "{} tokens for {} ids (one each)",
                    decode.tokens.len(),
                    decode.ids.len()
                ),
            ));
        }
        // Every extension's slot first, each record's line requested as it is found: the
        // checks below then find the records arriving together instead of waiting for them one
        // by one (a step that follows other work finds them out of cache).
        slots.clear();
        for &(id, _) in &step.extend {
            slots.push(self.resolve_slot(id)?);
        }
        for &id in decode.ids {
            slots.push(self.resolve_slot(id)?);
        }
        // The block math and the two vectors in locals: through `&mut self` the compiler
        // reloads them after every store to a record.
        let bm = self.bm;
        let records = &mut self.requests.slots[..];
        let crossing = &mut self.crossing;
        let (ext_slots, decode_slots) = slots.split_at_mut(step.extend.len());
        for (&(id, ext), &mut slot) in step.extend.iter().zip(ext_slots) {
            check_step_extension(bm, records, crossing, stamp, id, slot, ext)?;
        }
        for ((&id, tok), slot) in decode.ids.iter().zip(decode.tokens).zip(decode_slots) {
            let ext = Extension::Tokens(std::slice::from_ref(tok));
            if check_step_extension(bm, records, crossing, stamp, id, *slot, ext)? {
                *slot |= PLAIN;
            }
        }
        let mut seen = std::mem::take(&mut self.scratch_ids);
        seen.clear();
        // A repeat among a few admissions is found by comparing ids (cheaper than a set).
        let few = step.admit.len() <= 32;
        let admissions = step.admit.iter().enumerate().try_for_each(|(i, a)| {
            let repeated = if few {
                step.admit[..i].iter().any(|b| b.req == a.req)
            } else {
                !seen.insert(a.req)
            };
            if self.requests.contains(a.req) || repeated {
                return Err(Error::Request {
                    req: a.req,
                    message: "is already running or admitted twice in this step".into(),
                });
            }
            self.check_prompt(&a.prompt)?;
            a.retention.check()?;
            match a.max_tokens {
                Some(0) => Err(Error::invalid("max_tokens", "must be positive (or None)")),
                _ => Ok(()),
            }
        });
        self.scratch_ids = seen;
        admissions
    }

    /// The slot of running request `id` named by a step's extension (an error if it is not
    /// running), with its record's first line requested.
    #[inline(always)]
    pub(super) fn resolve_slot(&self, id: u64) -> Result<usize> {
        let slot = self
            .requests
            .slot(id)
            .ok_or_else(|| Self::not_extensible(id))?;
        if let Some(r) = self.requests.slots[slot].as_deref() {
            crate::mem::prefetch::prefetch(r);
        }
        Ok(slot)
    }

    pub(super) fn not_extensible(id: u64) -> Error {
        Error::Request {
            req: id,
            message: "is not running, repeated, or also finished/aborted in this step".into(),
        }
    }

    /// Runs a checked step: finishes and aborts, extensions (by the slots `check_step` found),
    /// admissions.
    pub(super) fn run_step(
        &mut self,
        step: &Step<'_>,
        slots: &[usize],
        out: &mut StepOutcome,
    ) -> Result<()> {
        for &id in &step.finish {
            self.finish(id)?;
        }
        for &id in &step.abort {
            self.abort(id)?;
        }
        self.prefetch_crossing_tables();
        self.prefetch_pooled_vectors(step.admit.len());
        self.prehash(&step.admit);
        out.admitted.reserve(step.admit.len());
        // Two loops, not one over `extend` chained with `decode`: the chained iterator costs
        // more per step (`benches/step.py loop` under callgrind).
        let (ext_slots, decode_slots) = slots.split_at(step.extend.len());
        for (k, (&(id, ext), &slot)) in step.extend.iter().zip(ext_slots).enumerate() {
            if !self.extend_at(slot, id, ext)? {
                out.refused.push(k);
            }
        }
        let decode = step.decode;
        let first = step.extend.len();
        for (k, ((&id, tok), &slot)) in decode
            .ids
            .iter()
            .zip(decode.tokens)
            .zip(decode_slots)
            .enumerate()
        {
            if slot & PLAIN != 0 {
                self.append_plain(slot & !PLAIN, *tok);
            } else if !self.extend_at(slot, id, Extension::Tokens(std::slice::from_ref(tok)))? {
                out.refused.push(first + k);
            }
        }
        out.extensions = first + decode.ids.len();
        if step.admit_if_extended && !out.refused.is_empty() {
            return Ok(());
        }
        let mut pre = std::mem::take(&mut self.prehashed);
        let mut res = Ok(());
        for (a, (list, &ready)) in step.admit.iter().zip(pre.lists.iter_mut().zip(&pre.ready)) {
            let prehashed = ready.then_some(list);
            let hit = match self.admit_with(
                a.req,
                a.prompt,
                a.salt,
                a.max_tokens,
                &a.retention,
                prehashed,
            ) {
                Ok(hit) => hit,
                Err(e) => {
                    res = Err(e);
                    break;
                }
            };
            out.admitted.push(hit);
            if hit.is_none() && self.waiting_for_kv(a.req) {
                // Not a refusal for memory: a first-come-first-served queue goes on.
                out.waiting.push(out.admitted.len() - 1);
            } else if step.fcfs && hit.is_none() {
                break;
            }
        }
        // A burst step's many vectors are not worth keeping for the next one.
        pre.lists.truncate(PREHASH_KEPT_LISTS);
        self.prehashed = pre;
        res
    }

    /// Hashes a checked step's admissions' prompts before its extensions run, and prefetches
    /// the index line of each hash, so that their walks (and the links of their new blocks)
    /// find those lines in cache: in a large cache each is otherwise a cache and TLB miss
    /// (`benches/step.py scale`). A prompt the last refusal remembers is left to `admit` (its
    /// retry reuses those hashes), and so is every prompt past `PREHASH_MAX_BLOCKS`.
    pub(super) fn prehash(&mut self, admit: &[Admission<'_>]) {
        let mut pre = std::mem::take(&mut self.prehashed);
        if pre.lists.len() < admit.len() {
            pre.lists.resize_with(admit.len(), Vec::new);
        }
        pre.ready.clear();
        let (mut blocks, mut lines) = (0, 0);
        // The last admission hashed from token ids: (its tokens, index, seed, blocks it
        // shared with the one before).
        let mut prev: Option<(&[i64], usize, u64, usize)> = None;
        for (k, a) in admit.iter().enumerate() {
            let seed = hash::root_seed(a.salt);
            blocks += self.bm.floor(a.prompt.len()) as usize;
            let (done, rest) = pre.lists.split_at_mut(k);
            let list = &mut rest[0];
            list.clear();
            if blocks > PREHASH_MAX_BLOCKS
                || self.refused.same(a.req, seed, &a.prompt, &a.retention)
            {
                pre.ready.push(false);
                continue;
            }
            // Requests admitted together often share a system prompt: the blocks this prompt
            // has in common with the previous one (same seed) take its hashes.
            let shared = prev
                .filter(|&(_, _, s, _)| s == seed)
                .map(|(p, j, _, guess)| (p, &done[j][..], guess));
            let Ok(reused) = self.prompt_hashes_into(&a.prompt, seed, shared, list) else {
                pre.ready.push(false);
                continue;
            };
            pre.ready.push(true);
            if let Prompt::Tokens(t) = a.prompt {
                prev = Some((t, k, seed, reused));
            }
            // The reused hashes' lines were requested with the previous prompt's.
            for &h in list[reused..]
                .iter()
                .take(PREFETCH_MAX_LINES.saturating_sub(lines))
            {
                self.tree.prefetch(h);
            }
            lines += list.len() - reused;
        }
        // Each new hash may become a node holding a block of every group: request the lines
        // those writes go to while the extensions run.
        let new_blocks = lines.min(PREFETCH_MAX_LINES / 4);
        self.tree.prefetch_new_nodes(new_blocks);
        self.arena.prefetch_free_slabs(new_blocks);
        self.prehashed = pre;
    }

    /// For the extensions the check pass found starting or completing a block: requests the
    /// line each of their block tables is appended to or released from (the check pass
    /// requested the vectors holding the tables' addresses, so those are at hand by now).
    pub(super) fn prefetch_crossing_tables(&self) {
        for &slot in &self.crossing {
            let Some(r) = self.requests.slots[slot].as_deref() else {
                continue;
            };
            let end = self.bm.floor(r.len) as usize;
            for (t, &floor) in r.tables.iter().zip(&r.swa_floor) {
                crate::mem::prefetch::prefetch(t.as_ptr().wrapping_add(end));
                crate::mem::prefetch::prefetch(t.as_ptr().wrapping_add(floor as usize));
            }
        }
    }

    /// Requests the lines of the records the step's `admissions` will take from the pool (its
    /// top, after the step's `finished` requests, which are in cache, join it): an admission
    /// rewrites its record whole.
    pub(super) fn prefetch_pooled_records(&self, admissions: usize, finished: usize) {
        let cold = admissions.saturating_sub(finished);
        for r in self.request_pool.iter().rev().take(cold) {
            crate::mem::prefetch::prefetch_whole::<Request>(&**r);
        }
    }

    /// Requests the first line of each vector the admissions' pooled records will write (the
    /// path, the block tables, the window floors, the plans, the tail): a record left the
    /// running set steps ago, and its vectors' memory is cold. Called once the records' own
    /// lines (requested as the step was checked) have had time to arrive.
    pub(super) fn prefetch_pooled_vectors(&self, admissions: usize) {
        use crate::mem::prefetch::prefetch;
        for r in self.request_pool.iter().rev().take(admissions) {
            prefetch(r.path.as_ptr());
            prefetch(r.tail.as_ptr());
            prefetch(r.swa_floor.as_ptr());
            prefetch(r.plans.as_ptr());
            prefetch(r.created.as_ptr());
            for t in &r.tables {
                prefetch(t.as_ptr());
            }
        }
    }
}
