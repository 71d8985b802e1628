//! Admission: a prompt's hashes, its walk of the prefix tree (after promotion from the lower
//! tiers), the plan of its first range, and the shortcut that refuses a hopeless retry without
//! a walk.

use std::sync::Arc;

use super::api::Prompt;
use super::request::Request;
use super::retention::Retention;
use super::{KVCacheManager, MAX_GROUPS, MAX_SEQUENCE_TOKENS};
use crate::error::{Error, Result};
use crate::hash;
use crate::prefix::Walk;

impl KVCacheManager {
    /// Checks a prompt's shape without hashing it.
    pub(super) fn check_prompt(&self, prompt: &Prompt<'_>) -> Result<()> {
        if prompt.len() > MAX_SEQUENCE_TOKENS {
            return Err(Error::invalid(
                "num_tokens",
                format!(
                    "{} tokens exceeds the limit of {MAX_SEQUENCE_TOKENS}",
                    prompt.len()
                ),
            ));
        }
        match *prompt {
            Prompt::Tokens(t) => {
                if t.is_empty() {
                    return Err(Error::invalid("tokens", "the prompt is empty"));
                }
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                if num_tokens == 0 {
                    return Err(Error::invalid("num_tokens", "the prompt is empty"));
                }
                let whole = self.bm.floor(num_tokens);
                let all = self.bm.ceil(num_tokens);
                if (hashes.len() as u64) < whole || hashes.len() as u64 > all {
                    return Err(Error::invalid(
                        "block_hashes",
                        format!(
                            "{} hashes for {num_tokens} tokens; expected {whole} (whole blocks of \
                             {}) or {all} (with the partial last block)",
                            hashes.len(),
                            self.b()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The chained hashes of a prompt's whole blocks under a tenant salt, as the prefix cache
    /// keys them and the KV events name them: what a router looks a prompt up by (the
    /// hashes themselves for a `BlockHashes` prompt). Changes nothing.
    pub fn block_hashes(&self, prompt: Prompt<'_>, salt: Option<&[u8]>) -> Result<Vec<u64>> {
        self.prompt_hashes(&prompt, hash::root_seed(salt))
    }

    pub(super) fn prompt_hashes(&self, prompt: &Prompt<'_>, seed: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        self.prompt_hashes_into(prompt, seed, None, &mut out)?;
        Ok(out)
    }

    /// Appends the chained hashes of a prompt's whole blocks to `out` (empty on entry).
    /// `prev`: another token prompt, its chained hashes under the same seed (a batched step's
    /// previous admission) and how many blocks it shared with the one before it; a token
    /// prompt's leading blocks equal to `prev`'s take its hashes (a comparison of ids instead
    /// of a hash each), and the rest are hashed on from there. That many blocks are compared
    /// in one go first (prompts admitted together tend to share the same system prompt), then
    /// block by block. Returns how many hashes were taken from `prev`. Inlined: out of line, a
    /// batched step's hashing ahead costs more (`benches/step.py loop` under callgrind).
    #[inline(always)]
    pub(super) fn prompt_hashes_into(
        &self,
        prompt: &Prompt<'_>,
        seed: u64,
        prev: Option<(&[i64], &[u64], usize)>,
        out: &mut Vec<u64>,
    ) -> Result<usize> {
        self.check_prompt(prompt)?;
        let b = self.b() as usize;
        out.reserve(self.bm.floor(prompt.len()) as usize);
        match *prompt {
            Prompt::Tokens(t) => {
                let same = match prev {
                    Some((prev_tokens, prev_hashes, guess)) => {
                        // One comparison of the blocks the previous pair shared, if all of
                        // them are shared again; then block by block.
                        let g = guess * b;
                        let from = if guess > 0
                            && guess <= prev_hashes.len()
                            && g <= t.len()
                            && g <= prev_tokens.len()
                            && t[..g] == prev_tokens[..g]
                        {
                            guess
                        } else {
                            0
                        };
                        let same = from
                            + t[from * b..]
                                .chunks_exact(b)
                                .zip(prev_tokens[from * b..].chunks_exact(b))
                                .zip(&prev_hashes[from..])
                                .take_while(|((x, y), _)| x == y)
                                .count();
                        out.extend_from_slice(&prev_hashes[..same]);
                        same
                    }
                    None => 0,
                };
                hash::chain_tokens(seed, &t[same * b..], b, out);
                Ok(same)
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                let whole = self.bm.floor(num_tokens) as usize;
                hash::chain_ids(seed, &hashes[..whole], out);
                Ok(0)
            }
        }
    }

    /// Keeps a finished request's record (and its vectors' capacity) for the next admission.
    pub(super) fn recycle(&mut self, r: Box<Request>) {
        // A bounded pool of modest records: a long request's vectors are not worth keeping.
        const POOL: usize = 256;
        const MAX_BLOCKS: usize = 4096;
        if self.request_pool.len() < POOL && r.hashes.capacity() <= MAX_BLOCKS {
            self.request_pool.push(r);
        }
    }

    /// Window-safe hit length in tokens for a prompt, without changing anything.
    pub fn match_prefix(&self, prompt: Prompt<'_>, salt: Option<&[u8]>) -> Result<u64> {
        let seed = hash::root_seed(salt);
        let hashes = self.prompt_hashes(&prompt, seed)?;
        let max_safe = self.bm.floor(prompt.len() - 1) as u32;
        let mut path = Vec::new();
        Ok(u64::from(self.tree.walk(&hashes, max_safe, &mut path).safe) * self.b())
    }

    /// Admits a request (see the module docs). Returns the prompt tokens served from cache, or
    /// `None` when even eviction cannot make room; then nothing changed but cache evictions.
    /// With default retention: see [`admit_with_retention`](Self::admit_with_retention).
    pub fn admit(
        &mut self,
        req: u64,
        prompt: Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
    ) -> Result<Option<u64>> {
        self.admit_with_retention(req, prompt, salt, max_tokens, Retention::default())
    }

    /// [`admit_with_retention`](Self::admit_with_retention) (`retention` checked), with the
    /// prompt's chained hashes when a step computed them ahead (`prehashed`, taken by swapping
    /// vectors; the prompt was checked then).
    pub(super) fn admit_with(
        &mut self,
        req: u64,
        prompt: Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
        retention: &Retention,
        prehashed: Option<&mut Vec<u64>>,
    ) -> Result<Option<u64>> {
        if self.requests.contains(req) {
            return Err(Error::Request {
                req,
                message: "is already running".into(),
            });
        }
        if max_tokens == Some(0) {
            return Err(Error::invalid("max_tokens", "must be positive (or None)"));
        }
        // A request waiting for KV: still loading (not now), or ready (admitted below, with
        // the pins on what it loaded released after).
        let (held, deep_ok) = match self.take_wait(req) {
            None => (Vec::new(), true),
            Some(Err(())) => return Ok(None),
            Some(Ok(w)) => w,
        };
        let res = self.admit_walk(req, prompt, salt, max_tokens, retention, prehashed, deep_ok);
        if !held.is_empty() {
            self.unpin_nodes(&held);
        }
        res
    }

    /// [`admit_with`](Self::admit_with) once a wait is dealt with.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn admit_walk(
        &mut self,
        req: u64,
        prompt: Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
        retention: &Retention,
        prehashed: Option<&mut Vec<u64>>,
        deep_ok: bool,
    ) -> Result<Option<u64>> {
        let seed = hash::root_seed(salt);
        let retry = self.refused.same(req, seed, &prompt, retention);
        if retry && self.refused.max_tokens == max_tokens && self.refused_again() {
            // The walk is the same: the version is the tree's now.
            self.refused.version = self.tree.version();
            self.admissions_refused += 1;
            return Ok(None);
        }
        // A recycled request keeps its vectors' capacity: admission allocates nothing in the
        // steady state.
        let mut r = self.request_pool.pop().unwrap_or_default();
        match self.hash_and_promote(req, &mut r, &prompt, seed, retry, prehashed, deep_ok) {
            Ok(false) => {}
            Ok(true) => {
                // Waiting for its KV: admitted again when the load settles.
                self.recycle(r);
                return Ok(None);
            }
            Err(e) => {
                self.recycle(r);
                return Err(e);
            }
        }
        self.tree.set_publisher(Some(req));
        let len = prompt.len();
        let max_safe = self.bm.floor(len - 1) as u32;
        r.path.clear();
        let walk = self.tree.walk(&r.hashes, max_safe, &mut r.path);
        self.start_record(&mut r, prompt, seed, walk, retention);
        let hit = r.hit;
        let end = match max_tokens {
            // Saturating: a limit near 2^64 is "the whole prompt", not a wrapped small one.
            Some(m) => len.min(hit.saturating_add(m)),
            None => len,
        };
        let mut plan = std::mem::take(&mut self.scratch_plan);
        let counts = self.plan_range(&r, r.len, end, &mut plan);
        if let Some(need_bytes) = self.hopeless(&r, &counts)? {
            self.scratch_plan = plan;
            self.remember_refusal(req, &prompt, retry, max_tokens, need_bytes, &r);
            self.recycle(r);
            return Ok(None);
        }
        // Pin the matched path so eviction cannot take it while we make room.
        for &n in &r.path {
            self.tree.pin(n);
        }
        if !self.schedule_planned(&mut r, end, plan, &counts)? {
            let mut freed = std::mem::take(&mut self.scratch);
            for &n in &r.path {
                self.tree.unpin(n, &mut freed);
            }
            self.release(&mut freed);
            self.scratch = freed;
            self.admissions_refused += 1;
            self.recycle(r);
            return Ok(None);
        }
        if walk.safe > 0 {
            self.tree.record_hit(r.path[walk.safe as usize - 1]);
        }
        self.tree.note_ghost_resume(&r.hashes, walk.safe);
        r.loads.clear();
        if self.lower.active() {
            self.await_loads(&mut r, walk.safe as usize);
        }
        self.hit_tokens += hit;
        self.miss_tokens += len - hit;
        self.requests.insert(req, r);
        Ok(Some(hit))
    }

    /// Fills `r.hashes` with the prompt's chained hashes (those of the remembered refusal when
    /// this is its retry, the step's when it computed them ahead, else hashed now), then
    /// promotes what the lower tiers add to its hit. True: request `req` now waits for its KV
    /// (a background load).
    #[allow(clippy::too_many_arguments)]
    fn hash_and_promote(
        &mut self,
        req: u64,
        r: &mut Request,
        prompt: &Prompt<'_>,
        seed: u64,
        retry: bool,
        prehashed: Option<&mut Vec<u64>>,
        deep_ok: bool,
    ) -> Result<bool> {
        r.hashes.clear();
        if retry {
            r.hashes.extend_from_slice(&self.refused.hashes);
        } else if let Some(h) = prehashed {
            std::mem::swap(&mut r.hashes, h);
        } else {
            self.prompt_hashes_into(prompt, seed, None, &mut r.hashes)?;
        }
        if self.lower.active() {
            let len = prompt.len();
            self.reap_loads();
            self.poll_loads();
            let hashes = std::mem::take(&mut r.hashes);
            let promoted = self.promote(req, &hashes, self.bm.floor(len - 1) as u32, len, deep_ok);
            r.hashes = hashes;
            // Promoted blocks attached to pinned nodes may have taken the pins past their cap.
            self.enforce_pin_cap();
            return promoted;
        }
        Ok(false)
    }

    /// Fills a (recycled) record for a prompt whose walk of the tree found `walk`: its
    /// scheduled length is the hit, its tables hold the tree's blocks below it (full groups
    /// everywhere, sliding groups in the hit's window), and its checkpoints are planned (none
    /// for a request that opted out of caching; one at its pin's end for a pin).
    fn start_record(
        &mut self,
        r: &mut Request,
        prompt: Prompt<'_>,
        seed: u64,
        walk: Walk,
        retention: &Retention,
    ) {
        let len = prompt.len();
        let b = self.b();
        let hit = u64::from(walk.safe) * b;
        let n_full = self.bm.floor(len) as u32;
        self.serial += 1;
        r.seed = seed;
        r.by_ids = matches!(prompt, Prompt::Tokens(_));
        r.tail.clear();
        if let Prompt::Tokens(t) = prompt {
            r.tail
                .extend_from_slice(&t[(n_full as usize * b as usize)..]);
        }
        r.prompt_len = len;
        r.len = hit;
        r.hit = hit;
        r.created.clear();
        r.created_ckpts.clear();
        let groups = self.spec.groups.len();
        r.tables.resize_with(groups, Vec::new);
        r.swa_floor.clear();
        r.swa_floor.resize(groups, 0);
        r.plans.clear();
        r.retention = *retention;
        if retention.cache {
            let pin_end = self.bm.floor(retention.pin_tokens).min(u64::from(n_full)) as u32;
            self.plan_checkpoints(walk.safe, walk.depth, n_full, pin_end, &mut r.plans);
        }
        r.plans_done = 0;
        r.spec_next = if retention.cache && self.speculates(walk.safe, n_full) {
            walk.safe + 1
        } else {
            0
        };
        r.serial = self.serial;
        r.stamp = 0;
        // Blocks below the hit come from the tree: full groups everywhere, sliding groups in
        // the hit's window.
        for g in 0..self.spec.groups.len() {
            let first = match self.window(g) {
                Some(w) => self.window_first(hit, w),
                None => 0,
            };
            let tree = &self.tree;
            let table = &mut r.tables[g];
            table.clear();
            table.reserve(self.bm.ceil(len) as usize + 1);
            let (below, window) = r.path[..walk.safe as usize].split_at(first as usize);
            table.resize(below.len(), 0);
            table.extend(window.iter().map(|&n| tree.block(n, g)));
            // Nothing below the hit's window is held: no need to scan it for release.
            r.swa_floor[g] = first;
        }
    }

    /// Counts a hopeless admission and remembers it (see [`Refused`](super::request::Refused)),
    /// so that its retry is refused without a walk while nothing changed.
    fn remember_refusal(
        &mut self,
        req: u64,
        prompt: &Prompt<'_>,
        retry: bool,
        max_tokens: Option<u64>,
        need_bytes: u64,
        r: &Request,
    ) {
        if !retry {
            self.refused.remember(req, r.seed, prompt, r);
        }
        self.refused.max_tokens = max_tokens;
        self.refused.need_bytes = need_bytes;
        self.refused.version = self.tree.version();
        self.refused.path.clear();
        self.refused.path.extend_from_slice(&r.path);
        self.admissions_refused += 1;
    }

    /// Marks the lower copies of an admitted request's hit (its first `safe` blocks) as used,
    /// and lists the loads in flight that fill them: the engine waits on those.
    fn await_loads(&mut self, r: &mut Request, safe: usize) {
        self.touch_lower(&r.hashes[..safe]);
        for &n in &r.path[..safe] {
            if let Some(j) = self.node_jobs.get(&n) {
                if !r.loads.iter().any(|x| Arc::ptr_eq(x, j)) {
                    r.loads.push(j.clone());
                }
            }
        }
    }

    /// Whether scheduling `[r.len, end)` of a request being admitted (`counts`: the blocks its
    /// plan allocates) cannot fit, with the admission reserve left over, even after evicting
    /// everything evictable once its matched path is pinned (then its need in bytes, reserve
    /// included; while loads are in flight the reserve is not applied):
    /// the test `make_room` makes, done before pinning, so that a refused admission (a
    /// scheduler retries its queue's head every step) changes nothing and costs a walk rather
    /// than a pin and unpin of its path.
    pub(super) fn hopeless(&self, r: &Request, counts: &[u64; MAX_GROUPS]) -> Result<Option<u64>> {
        if !self.inflight.is_empty() {
            return Ok(None); // `make_room` waits for loads in flight before it refuses
        }
        let groups = self.spec.groups.len();
        let reserve = self.config.admission_reserve_bytes;
        if reserve == 0 && self.arena.fits(&counts[..groups]) {
            return Ok(None);
        }
        let need_bytes: u64 = (0..groups)
            .map(|g| counts[g] * self.tree.layout().block_bytes[g])
            .sum::<u64>()
            + reserve;
        let evictable = self.tree.evictable_bytes() - self.tree.unpinned_bytes(&r.path);
        Ok((need_bytes > self.arena.bytes_free() + evictable).then_some(need_bytes))
    }

    /// Drops the remembered refusal, so the next retry is evaluated in full. For tests that
    /// check the shortcut gives the same answers as the full evaluation.
    #[doc(hidden)]
    pub fn forget_refusal(&mut self) {
        self.refused.valid = false;
    }

    /// Whether the retry of the admission [`Refused`] remembers is sure to be refused again:
    /// its walk is unchanged since (the tree's version, else the nodes of its path: the same
    /// walk, the same need) and free plus all evictable bytes are still short of that need. Not
    /// with lower tiers, whose contents change outside this manager, nor with loads in flight.
    pub(super) fn refused_again(&self) -> bool {
        let m = &self.refused;
        !self.lower.active()
            && self.inflight.is_empty()
            && self.arena.bytes_free() + self.tree.evictable_bytes() < m.need_bytes
            && (self.tree.version() == m.version
                || self.tree.path_unchanged(
                    &m.path,
                    m.version,
                    m.hashes.get(m.path.len()).copied(),
                ))
    }
}
