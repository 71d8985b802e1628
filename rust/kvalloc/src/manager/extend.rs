//! Growing and ending a running request: the decode fast path, the general extension, finish
//! and abort.

use super::api::Extension;
use super::request::Request;
use super::schedule::release_below_window;
use super::written::WrittenPages;
use super::{BlockMath, KVCacheManager, MAX_GROUPS, MAX_SEQUENCE_TOKENS};
use crate::error::{Error, Result};
use crate::hash;
use crate::prefix::{CheckpointKind, Freed};
use crate::slab::SlabArena;

/// The decode path's new blocks: one per group (the newest block is inside every window), or
/// false, changing nothing, when that needs eviction. Out of line: one decode token in B
/// crosses a block boundary, and the rest keep their registers.
#[cold]
#[inline(never)]
pub(super) fn decode_new_blocks(
    arena: &mut SlabArena,
    written: &mut WrittenPages,
    groups: usize,
    r: &mut Request,
) -> bool {
    if !arena.fits(&[1; MAX_GROUPS][..groups]) {
        return false;
    }
    for g in 0..groups {
        let h = arena.alloc_one(g).expect("fits was checked");
        written.set(h, false);
        r.tables[g].push(h);
    }
    true
}

/// A decode that reaches `end`, a block boundary, completes the block before it in every group.
#[cold]
#[inline(never)]
pub(super) fn mark_last_whole(bm: BlockMath, written: &mut WrittenPages, r: &Request, end: u64) {
    let i = (bm.floor(end) - 1) as usize;
    for table in &r.tables {
        if table[i] != 0 {
            written.set(table[i], true);
        }
    }
}

/// Hashes a running request's newly completed output blocks (prompt blocks are hashed at
/// admission): from its token ids, or, for a request admitted with block hashes, from ids
/// unique to the request and position (opaque output nothing else can match).
#[inline(always)]
pub(super) fn hash_output(bm: BlockMath, r: &mut Request, tokens: Option<&[i64]>) {
    match tokens {
        // A decode token that completes no block: only remember it.
        Some(&[t]) if r.tail.len() + 1 < bm.b as usize => r.tail.push(t),
        _ => hash_output_blocks(bm, r, tokens),
    }
}

/// [`hash_output`] when blocks may complete (out of line, as for `decode_new_blocks`).
#[cold]
#[inline(never)]
pub(super) fn hash_output_blocks(bm: BlockMath, r: &mut Request, tokens: Option<&[i64]>) {
    match tokens {
        Some(t) => {
            r.tail.extend_from_slice(t);
            let whole = (bm.floor(r.tail.len() as u64) * bm.b) as usize;
            if whole > 0 {
                hash::chain_tokens(r.seed, &r.tail[..whole], bm.b as usize, &mut r.hashes);
                r.tail.drain(..whole);
            }
        }
        None => {
            while (r.hashes.len() as u64) < bm.floor(r.len) {
                let i = r.hashes.len() as u64;
                let id = hash::digest(&[r.serial.to_le_bytes(), i.to_le_bytes()].concat());
                hash::chain_ids(r.seed, &[id], &mut r.hashes);
            }
        }
    }
}

impl KVCacheManager {
    /// The decode hot path: appends up to one block of output tokens (ids, or a count for a
    /// request admitted with block hashes) to a request whose prompt is fully scheduled,
    /// touching only that request, the arena and (read-only) the tree. Returns None when the
    /// general path must handle the call: unknown request, prompt pending, an extension the
    /// request does not accept (the general path reports it), or no block without evicting.
    #[inline(always)]
    pub(super) fn try_decode(&mut self, slot: usize, ext: Extension<'_>) -> Option<bool> {
        let (n, tokens) = match ext {
            Extension::Tokens(t) => (t.len() as u64, Some(t)),
            Extension::Count(n) => (n, None),
        };
        let bm = self.bm;
        let swa_aware = self.swa_aware();
        let KVCacheManager {
            requests,
            arena,
            tree,
            spec,
            window_released,
            scratch_handles,
            written,
            ..
        } = self;
        let r = requests.at_mut(slot)?;
        if r.len < r.prompt_len || r.by_ids != tokens.is_some() || n == 0 || n > bm.b {
            return None;
        }
        let end = r.len + n;
        // The tables hold `ceil(len / B)` blocks (checked by `validate`): no need to read them
        // unless the tokens go past the last one.
        let (opens, closes) = bm.boundaries(r.len, n);
        if opens && !decode_new_blocks(arena, written, spec.groups.len(), r) {
            return None; // eviction needed: the general path
        }
        if closes {
            mark_last_whole(bm, written, r, end);
        }
        // The window's floor moves only when a block boundary is crossed, or after a chunk
        // (whose step kept the window before it).
        let crossed = closes || r.len - r.last_start.min(r.len) > 1;
        let start = r.len;
        r.last_start = start;
        r.len = end;
        if swa_aware && crossed {
            // Several tokens at once (speculative decoding): the step computing them reads the
            // window before the first, which stays until the next call.
            let keep = if n > 1 { start } else { u64::MAX };
            *window_released +=
                release_below_window(bm, &spec.groups, tree, arena, r, scratch_handles, keep);
        }
        hash_output(bm, r, tokens);
        Some(true)
    }

    /// A decode token that `check_step` found to be a plain append (no block boundary, no
    /// window to move, a token-id request past its prompt): what [`try_decode`](Self::try_decode)
    /// would do, without asking again.
    #[inline(always)]
    pub(super) fn append_plain(&mut self, slot: usize, token: i64) {
        let r = self.requests.at_mut(slot).expect("checked this step");
        debug_assert!(r.by_ids && r.len >= r.prompt_len && r.tail.len() + 1 < self.bm.b as usize);
        r.last_start = r.len;
        r.len += 1;
        r.tail.push(token);
    }

    /// Appends tokens to a running request (see [`Extension`]). Returns false, changing
    /// nothing, when there is no room even after eviction.
    pub fn extend(&mut self, req: u64, ext: Extension<'_>) -> Result<bool> {
        self.expire_pins();
        let slot = self.requests.slot(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        self.extend_at(slot, req, ext)
    }

    /// [`extend`](Self::extend) of the request in `slot` (named `req` in errors): the decode
    /// fast path inline, the general one out of line (a batched step runs this per request).
    #[inline(always)]
    pub(super) fn extend_at(&mut self, slot: usize, req: u64, ext: Extension<'_>) -> Result<bool> {
        match self.try_decode(slot, ext) {
            Some(ok) => Ok(ok),
            None => self.extend_general(slot, req, ext),
        }
    }

    /// The general path of [`extend_at`](Self::extend_at): prompt chunks, eviction, errors.
    #[inline(never)]
    pub(super) fn extend_general(
        &mut self,
        slot: usize,
        req: u64,
        ext: Extension<'_>,
    ) -> Result<bool> {
        // Take the record out of its slot for the general path (and put it back).
        let mut r = self.requests.slots[slot].take().ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        let res = self.extend_inner(req, &mut r, ext);
        self.requests.slots[slot] = Some(r);
        if res == Ok(false) {
            self.extensions_refused += 1;
        }
        res
    }

    pub(super) fn extend_inner(
        &mut self,
        req: u64,
        r: &mut Request,
        ext: Extension<'_>,
    ) -> Result<bool> {
        Self::check_extension(req, r, ext)?;
        let (n, tokens) = match ext {
            Extension::Tokens(t) => (t.len() as u64, Some(t)),
            Extension::Count(n) => (n, None),
        };
        if n == 0 {
            return Ok(true);
        }
        self.tree.set_publisher(Some(req));
        if !self.schedule(r, r.len + n)? {
            return Ok(false);
        }
        hash_output(self.bm, r, tokens);
        Ok(true)
    }

    /// Finishes a request: its computed whole blocks (prompt and output) enter the prefix cache,
    /// with the output-end checkpoint (unless it opted out of caching), its retention priority
    /// and pin apply; everything else it held is freed.
    pub fn finish(&mut self, req: u64) -> Result<()> {
        if !self.requests.contains(req) && self.drop_wait(req) {
            return Ok(()); // it was waiting for KV: nothing of it runs
        }
        self.expire_pins();
        let mut r = self.requests.remove(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        if r.retention.cache {
            self.cache_finished(req, &mut r);
        }
        self.retain_finished(&r);
        let mut freed = std::mem::take(&mut self.scratch);
        self.collect_private(&r, &mut freed);
        for &n in &r.path {
            self.tree.unpin(n, &mut freed);
        }
        self.release(&mut freed);
        self.scratch = freed;
        r.loads.clear();
        self.recycle(r);
        self.reap_loads();
        Ok(())
    }

    /// A finishing request's whole blocks enter the tree: output blocks are linked, the window
    /// at its end attached as the output-end checkpoint, and (with write-through) the path is
    /// written to the remote store.
    fn cache_finished(&mut self, req: u64, r: &mut Request) {
        self.tree.set_publisher(Some(req));
        let b = self.b();
        let groups = self.spec.groups.len();
        let e = (r.len / b).min(r.hashes.len() as u64);
        // Link output blocks: the tree takes their full-attention blocks (every block under
        // the dense policy); SWA blocks are attached below for the output-end window only.
        let mut take = [false; MAX_GROUPS];
        for (g, t) in take.iter_mut().enumerate().take(groups) {
            *t = self.window(g).is_none() || !self.swa_aware();
        }
        for i in r.path.len() as u64..e {
            if r.path.len() as u64 != i || self.link_block(r, i, &take[..groups]).is_none() {
                break; // linking stopped at a conflict: the rest stays private
            }
        }
        let e = e.min(r.path.len() as u64);
        // Keep the window ending at E (swa-aware) or every sliding block (dense).
        for g in 0..groups {
            let Some(w) = self.window(g) else { continue };
            let first = if self.swa_aware() {
                self.window_first(e * b, w)
            } else {
                0
            };
            for i in first..e {
                let h = r.tables[g][i as usize];
                let n = r.path[i as usize];
                if h != 0 && self.tree.block(n, g) == 0 {
                    self.tree.attach(n, g, h);
                }
            }
        }
        if e > 0 && self.swa_aware() {
            let max_blocks = self.run_lengths(e as u32, false);
            self.tree.add_checkpoint(
                r.path[e as usize - 1],
                &max_blocks,
                CheckpointKind::OutputEnd,
            );
        }
        if self.config.write_through {
            let path = std::mem::take(&mut r.path);
            self.write_through(&path[..e as usize]);
            r.path = path;
        }
    }

    pub(super) fn collect_private(&self, r: &Request, freed: &mut Freed) {
        for g in 0..r.tables.len() {
            for i in 0..r.tables[g].len() as u64 {
                if self.is_private(r, g, i) {
                    freed.push((g, r.tables[g][i as usize]));
                }
            }
        }
    }

    /// Drops a request: nothing of it stays in the cache.
    pub fn abort(&mut self, req: u64) -> Result<()> {
        if !self.requests.contains(req) && self.drop_wait(req) {
            return Ok(()); // it was waiting for KV: its load goes on for the cache
        }
        let r = self.requests.remove(req).ok_or(Error::Request {
            req,
            message: "is not running".into(),
        })?;
        let mut freed = std::mem::take(&mut self.scratch);
        self.collect_private(&r, &mut freed);
        for &n in &r.created_ckpts {
            if self.tree.is_checkpoint(n) {
                self.tree.remove_checkpoint(n, &mut freed);
            }
        }
        for &n in &r.path {
            self.tree.unpin(n, &mut freed);
        }
        for &n in r.created.iter().rev() {
            self.tree.discard(n, &mut freed);
        }
        self.aborted_blocks += freed.len() as u64;
        self.release(&mut freed);
        self.scratch = freed;
        self.recycle(r);
        self.reap_loads();
        Ok(())
    }

    /// Whether request `id` accepts `ext` (used by `extend` and, for the whole batch before
    /// anything changes, by `step`).
    #[inline(always)]
    pub(super) fn check_extension(id: u64, r: &Request, ext: Extension<'_>) -> Result<()> {
        let n = match ext {
            Extension::Tokens(t) => t.len() as u64,
            Extension::Count(n) => n,
        };
        if r.len.saturating_add(n) > MAX_SEQUENCE_TOKENS {
            return Err(Error::invalid(
                "count",
                format!("request {id} would exceed {MAX_SEQUENCE_TOKENS} tokens"),
            ));
        }
        match ext {
            Extension::Tokens(_) if r.len < r.prompt_len => Err(Error::invalid(
                "tokens",
                format!(
                    "request {id}: the prompt is not fully scheduled ({} of {} tokens); \
                     continue it with a count",
                    r.len, r.prompt_len
                ),
            )),
            Extension::Tokens(_) if !r.by_ids => Err(Error::invalid(
                "tokens",
                format!("request {id} was admitted with block hashes; extend it with a count"),
            )),
            Extension::Count(n) if r.by_ids && r.len + n > r.prompt_len => Err(Error::invalid(
                "count",
                format!(
                    "request {id}: {n} tokens would go past the prompt ({} of {} scheduled); \
                     output tokens of a token-id request must be given as ids",
                    r.len, r.prompt_len
                ),
            )),
            _ => Ok(()),
        }
    }
}
