//! Asynchronous promotion from disk and the remote store: the admission that needs their
//! records starts the reads and returns at once; the blocks are published when read and
//! verified; the request is admitted again then.
//!
//! ## The life of a load
//! 1. **Start** (in an admission, see `tiering::promote`): the hit's blocks L1 lacks get device
//!    pages; host-memory blocks go to the loader, disk and remote records to their tier's
//!    fetcher ([`crate::tiers::fetch`]). Nothing is linked into the tree: no other request can
//!    match a block that is still loading. The request is *waiting for KV*
//!    ([`KVCacheManager::waiting_for_kv`]); its admission answered `None`. Another request
//!    needing a record a load is reading waits on that load rather than reading it twice.
//! 2. **Settle** (at the next `admit` or `step` once every read is done, or at the load's
//!    deadline, when the reads still pending are cancelled): the blocks whose reads verified
//!    are linked into the tree, up to the first block that did not (a full-attention block
//!    that failed ends the chain; the sliding windows are attached, with the checkpoint they
//!    make, only if every one of them verified). Pages of blocks not linked are freed; a
//!    record that failed verification is dropped from its tier. The waiting requests are
//!    *ready* ([`KVCacheManager::take_ready`], [`StepOutcome::ready`](super::StepOutcome)),
//!    each holding pins on the published path so that nothing evicts it before it comes back.
//! 3. **Admit again**: the engine admits the ready request as before; its walk finds the
//!    published blocks as an ordinary L1 hit (the verified part of what it waited for: after a
//!    failure, the engine computes the rest). A request whose load failed or timed out does
//!    not wait for disk or remote reads a second time. Aborting (or finishing) a waiting
//!    request drops its wait and its pins.
//!
//! ## Invariants (checked by `validate`)
//! - A load's pages are owned by the load until it settles; its L1 path and its records stay
//!   pinned until then.
//! - A ready request's pins are on tree nodes, released when it is admitted or dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::KVCacheManager;
use crate::prefix::{CheckpointKind, Link, NodeId, NONE};
use crate::slab::Handle;
use crate::tiers::fetch::{FetchJob, FetchStatus, FetchTask, Fetcher};
use crate::tiers::loader::{CopyTask, LoadJob};
use crate::tiers::{LoadEstimate, Tier};

/// What load-or-recompute decisions and background loads did (see [`crate::tiers::cost`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadStats {
    /// Admissions offered a hit below L1 that took all of it.
    pub taken: u64,
    /// Admissions that took a shorter window-safe hit (the deeper tiers' part was slower to
    /// load than to recompute).
    pub split: u64,
    /// Admissions that took none of it and recomputed.
    pub declined: u64,
    /// Prompt tokens the lower tiers held that were recomputed instead (splits and declines).
    pub declined_tokens: u64,
    /// Background loads from disk or the remote store started.
    pub started: u64,
    /// Of those settled: every record read and verified.
    pub verified: u64,
    /// Settled with at least one record that failed its read or its verification.
    pub failed: u64,
    /// Settled at their deadline with reads still pending (cancelled).
    pub timed_out: u64,
    /// Records (one group of one block) that failed.
    pub failed_records: u64,
    /// Admissions answered "waiting for KV" (the first answer and every repeat).
    pub waits: u64,
    /// Seconds from start to settle, summed over settled loads.
    pub load_seconds: f64,
}

/// A request waiting for KV: on a load in flight, or ready with pins on what it loaded.
#[derive(Debug)]
enum Wait {
    Loading(u64),
    Ready {
        pins: Vec<NodeId>,
        /// Whether its next admission may wait for disk or remote reads again (not after a
        /// failure or a timeout: it recomputes instead).
        deep_again: bool,
    },
}

/// One load in flight. See the module docs.
#[derive(Debug)]
pub(super) struct PendingLoad {
    id: u64,
    /// The prompt's chained hashes up to the hit it loads (`k` blocks).
    hashes: Vec<u64>,
    /// The L1 path when it started (pinned).
    path: Vec<NodeId>,
    /// (block, group) pairs it fills, their pages, and where each comes from: the tier and,
    /// below host memory, the index of its task in that tier's job.
    need: Vec<(u32, usize)>,
    pages: Vec<Handle>,
    source: Vec<(Tier, u32)>,
    host: Option<Arc<LoadJob>>,
    /// `jobs[1]`: disk, `jobs[2]`: remote.
    jobs: [Option<Arc<FetchJob>>; 3],
    /// The lower records it reads (pinned).
    records: Vec<u64>,
    waiters: Vec<u64>,
    started: Instant,
    deadline: Instant,
    /// Tokens its whole success adds to the hit L1 gave (`promoted_tokens`).
    tokens: u64,
    deepest: Tier,
}

/// The manager's background loads and the requests waiting on them.
#[derive(Debug)]
pub(super) struct Fetching {
    fetchers: [Option<Fetcher>; 3],
    loads: Vec<PendingLoad>,
    next_id: u64,
    waiting: HashMap<u64, Wait>,
    /// Records a load in flight reads: record hash -> load id.
    reading: HashMap<u64, u64>,
    ready: Vec<u64>,
    pub(super) estimate: LoadEstimate,
    pub(super) stats: LoadStats,
}

impl Fetching {
    pub(super) fn new(estimate: LoadEstimate) -> Self {
        Fetching {
            fetchers: [None, None, None],
            loads: Vec::new(),
            next_id: 0,
            waiting: HashMap::new(),
            reading: HashMap::new(),
            ready: Vec::new(),
            estimate,
            stats: LoadStats::default(),
        }
    }

    /// Whether reads from `tier` run in the background.
    pub(super) fn background(&self, tier: Tier) -> bool {
        self.fetchers[tier as usize].is_some()
    }

    /// Seconds each tier is still busy with the loads in flight, at the estimated bandwidths.
    pub(super) fn backlog(&self, bandwidth: &[f64; 3]) -> [f64; 3] {
        let mut out = [0.0; 3];
        for l in &self.loads {
            for (t, j) in l.jobs.iter().enumerate() {
                if let Some(j) = j.as_ref().filter(|j| !j.is_done()) {
                    out[t] += j.tasks().iter().map(|x| x.len).sum::<u64>() as f64 / bandwidth[t];
                }
            }
        }
        out
    }

    /// The counters of `tier`'s background reader (zero without one).
    pub(super) fn reader_counters(&self, tier: Tier) -> crate::tiers::StoreCounters {
        self.fetchers[tier as usize]
            .as_ref()
            .map(|f| f.counters())
            .unwrap_or_default()
    }

    /// The load reading `hash`, if one is.
    pub(super) fn reader_of(&self, hash: u64) -> Option<u64> {
        self.reading.get(&hash).copied()
    }

    fn is_loading(&self, req: u64) -> bool {
        matches!(self.waiting.get(&req), Some(Wait::Loading(_)))
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        // The fetcher threads end once their queues are empty: cancelled jobs end at once.
        for l in &self.loads {
            for j in l.jobs.iter().flatten() {
                j.cancel();
            }
        }
    }
}

/// A load to wait on outside the manager (see [`KVCacheManager::kv_wait`]): done when its
/// copies and reads are, or at its deadline; the next `admit`, `step` or
/// [`take_ready`](KVCacheManager::take_ready) then settles it.
#[derive(Debug, Clone)]
pub struct KvWait {
    host: Option<Arc<LoadJob>>,
    jobs: Vec<Arc<FetchJob>>,
    deadline: Instant,
}

impl KvWait {
    /// Blocks until the load is done or past its deadline, or `timeout` passes (None: up to
    /// the deadline); true unless `timeout` ran out first.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let until = match timeout.and_then(|t| Instant::now().checked_add(t)) {
            Some(d) => d.min(self.deadline),
            None => self.deadline,
        };
        let left = || until.saturating_duration_since(Instant::now());
        if let Some(h) = &self.host {
            h.wait_all(Some(left()));
        }
        for j in &self.jobs {
            j.wait(Some(left()));
        }
        Instant::now() >= self.deadline
            || (self.host.as_ref().is_none_or(|h| h.is_done())
                && self.jobs.iter().all(|j| j.is_done()))
    }
}

/// What `start_fetch` is given: a promotion whose pages are allocated.
pub(super) struct FetchPlan<'a> {
    pub(super) req: u64,
    pub(super) hashes: &'a [u64],
    pub(super) path: Vec<NodeId>,
    pub(super) k: u32,
    pub(super) need: Vec<(u32, usize)>,
    pub(super) pages: Vec<Handle>,
    pub(super) records: Vec<u64>,
    pub(super) tokens: u64,
}

impl KVCacheManager {
    /// Starts a fetcher for each store that can give a second reader (at device registration,
    /// with [`async_loads`](super::ManagerConfig::async_loads)).
    pub(super) fn start_fetchers(&mut self) {
        let Some(device) = self.device.clone() else {
            return;
        };
        if !self.config.async_loads {
            return;
        }
        for t in [Tier::Disk, Tier::Remote] {
            if let Some(reader) = self.lower.store(t).and_then(|s| s.reader()) {
                self.fetching.fetchers[t as usize] =
                    Some(Fetcher::start(t.name(), reader, device.clone()));
            }
        }
    }

    /// Whether request `req` is waiting for its KV to load (its admission answered `None` for
    /// that reason): admit it again once [`take_ready`](Self::take_ready) (or a step's
    /// [`ready`](super::StepOutcome::ready)) names it.
    pub fn waiting_for_kv(&self, req: u64) -> bool {
        self.fetching.is_loading(req)
    }

    /// Settles the loads that finished (or passed their deadline); the requests they make
    /// ready stay listed for [`take_ready`](Self::take_ready) and the next step.
    pub fn settle_loads(&mut self) {
        self.poll_loads();
    }

    /// Settles the loads that finished (or passed their deadline) and returns the requests
    /// that became ready since the last call, to be admitted again.
    pub fn take_ready(&mut self) -> Vec<u64> {
        self.poll_loads();
        std::mem::take(&mut self.fetching.ready)
    }

    /// Blocks until the load request `req` waits on settles (or `timeout` passes; None: as
    /// long as it takes); true if `req` is then ready. For engines that have nothing else to
    /// do, and tests.
    pub fn wait_for_kv(&mut self, req: u64, timeout: Option<Duration>) -> bool {
        if let Some(w) = self.kv_wait(req) {
            w.wait(timeout);
        }
        self.poll_loads();
        self.kv_ready(req)
    }

    /// What request `req`'s load is made of, to wait on without holding the manager (a
    /// binding releases its lock meanwhile); None if it is not loading.
    pub fn kv_wait(&self, req: u64) -> Option<KvWait> {
        let Some(Wait::Loading(id)) = self.fetching.waiting.get(&req) else {
            return None;
        };
        let l = self.fetching.loads.iter().find(|l| l.id == *id)?;
        Some(KvWait {
            host: l.host.clone(),
            jobs: l.jobs.iter().flatten().cloned().collect(),
            deadline: l.deadline,
        })
    }

    /// Whether `req` is ready to be admitted again (its load settled).
    pub fn kv_ready(&self, req: u64) -> bool {
        matches!(self.fetching.waiting.get(&req), Some(Wait::Ready { .. }))
    }

    /// [`take_ready`](Self::take_ready) into `out` (a step's outcome).
    #[inline(always)]
    pub(super) fn take_ready_into(&mut self, out: &mut Vec<u64>) {
        if !self.fetching.ready.is_empty() {
            out.append(&mut self.fetching.ready);
        }
    }

    /// Whether `req` waits for KV (loading or ready).
    pub(super) fn fetching_waits(&self, req: u64) -> bool {
        self.fetching.waiting.contains_key(&req)
    }

    /// [`admit`](Self::admit), waiting for a background load if the admission needs one, then
    /// admitting again: the hit (what verified), or None when it does not fit, or when the
    /// load is still running after `timeout` (then [`waiting_for_kv`](Self::waiting_for_kv)
    /// says so; None: wait up to the load's deadline, which always settles it). For callers
    /// with nothing else to do while it loads: a scheduler admits others meanwhile instead.
    pub fn admit_waiting(
        &mut self,
        req: u64,
        prompt: super::Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
        timeout: Option<Duration>,
    ) -> crate::Result<Option<u64>> {
        loop {
            let hit = self.admit(req, prompt, salt, max_tokens)?;
            if hit.is_some() || !self.waiting_for_kv(req) {
                return Ok(hit);
            }
            if !self.wait_for_kv(req, timeout) {
                return Ok(None); // still loading after `timeout`: still waiting
            }
        }
    }

    /// Requests waiting for KV (loading or ready).
    pub fn num_waiting(&self) -> usize {
        self.fetching.waiting.len()
    }

    /// What the load-or-recompute decisions and the background loads did so far.
    pub fn load_stats(&self) -> LoadStats {
        self.fetching.stats
    }

    /// Records that the engine computed `tokens` prompt tokens in `seconds` (its measured
    /// prefill rate, which the load-or-recompute decision weighs loads against).
    pub fn record_prefill(&mut self, tokens: u64, seconds: f64) -> crate::Result<()> {
        self.fetching.estimate.record_prefill(tokens, seconds)
    }

    /// The load-or-recompute figures now: the configured ones corrected by measurement.
    pub fn load_estimates(&self) -> crate::tiers::LoadCost {
        self.fetching.estimate.now(Instant::now())
    }

    /// At an admission of `req`: None if it is not waiting; Some(Err) while its load is in
    /// flight (the admission answers waiting); Some(Ok((pins, deep_again))) once it is ready
    /// (the pins are released after the admission).
    pub(super) fn take_wait(&mut self, req: u64) -> Option<Result<(Vec<NodeId>, bool), ()>> {
        if self.fetching.waiting.is_empty() {
            return None;
        }
        self.poll_loads();
        match self.fetching.waiting.remove(&req)? {
            Wait::Loading(id) => {
                self.fetching.waiting.insert(req, Wait::Loading(id));
                self.fetching.stats.waits += 1;
                Some(Err(()))
            }
            Wait::Ready { pins, deep_again } => {
                self.fetching.ready.retain(|&r| r != req);
                Some(Ok((pins, deep_again)))
            }
        }
    }

    /// Makes `req` wait on load `id` (a load it started or one reading what it needs).
    pub(super) fn wait_on(&mut self, req: u64, id: u64) {
        if let Some(l) = self.fetching.loads.iter_mut().find(|l| l.id == id) {
            l.waiters.push(req);
            self.fetching.waiting.insert(req, Wait::Loading(id));
            self.fetching.stats.waits += 1;
        }
    }

    /// Drops `req`'s wait (it was aborted or finished while waiting); false if it was not
    /// waiting.
    pub(super) fn drop_wait(&mut self, req: u64) -> bool {
        match self.fetching.waiting.remove(&req) {
            None => false,
            Some(Wait::Loading(id)) => {
                if let Some(l) = self.fetching.loads.iter_mut().find(|l| l.id == id) {
                    l.waiters.retain(|&w| w != req);
                }
                true
            }
            Some(Wait::Ready { pins, .. }) => {
                self.fetching.ready.retain(|&r| r != req);
                self.unpin_nodes(&pins);
                true
            }
        }
    }

    pub(super) fn unpin_nodes(&mut self, nodes: &[NodeId]) {
        let mut freed = std::mem::take(&mut self.scratch);
        for &n in nodes {
            self.tree.unpin(n, &mut freed);
        }
        self.release(&mut freed);
        self.scratch = freed;
    }

    /// Starts the background load of a promotion whose pages are allocated (see the module
    /// docs): host-memory blocks to the loader, disk and remote records to their fetchers,
    /// sliding groups' records first, then full-attention groups', block by block.
    pub(super) fn start_fetch(&mut self, plan: FetchPlan<'_>) {
        let device_ok = self.device.is_some();
        debug_assert!(device_ok);
        let mut copies: Vec<CopyTask> = Vec::new();
        let mut tasks: [Vec<FetchTask>; 3] = [Vec::new(), Vec::new(), Vec::new()];
        let mut source = Vec::with_capacity(plan.need.len());
        let mut deepest = Tier::Host;
        // Reading order: sliding groups first, then full groups, each by block.
        let mut order: Vec<usize> = (0..plan.need.len()).collect();
        order.sort_by_key(|&x| {
            let (i, g) = plan.need[x];
            (self.window(g).is_none(), g, i)
        });
        source.resize(plan.need.len(), (Tier::Host, 0));
        for x in order {
            let (i, g) = plan.need[x];
            let hash = plan.hashes[i as usize];
            let tier = self.lower.index.get(hash).expect("pinned").tier;
            deepest = deepest.max(tier);
            // A reused page may carry its last life's bit: not whole until verified.
            self.written.set(plan.pages[x], false);
            let dst = self.arena.offset(plan.pages[x]).expect("allocated");
            let len = self.tree.layout().block_bytes[g];
            if tier == Tier::Host {
                let group = &self.spec.groups[g];
                let layer_bytes =
                    group.layer_bytes_per_token() * u64::from(self.config.block_tokens);
                let src = self.lower.host_offset(hash, g).expect("host record");
                for (j, &l) in group.layers.iter().enumerate() {
                    let off = j as u64 * layer_bytes;
                    copies.push(CopyTask {
                        layer: l,
                        src: src + off,
                        dst: dst + off,
                        len: layer_bytes,
                    });
                }
                self.lower.count_read(hash, g);
                source[x] = (Tier::Host, 0);
            } else {
                let list = &mut tasks[tier as usize];
                source[x] = (tier, list.len() as u32);
                list.push(FetchTask {
                    key: self.lower.store_key(hash, g),
                    dst,
                    len,
                });
            }
        }
        let host = (!copies.is_empty()).then(|| {
            let job = LoadJob::new(copies, self.spec.num_layers as usize, &self.layer_sliding);
            self.loader
                .as_ref()
                .expect("a loader runs when host memory holds bytes")
                .submit(job.clone());
            job
        });
        let now = Instant::now();
        let est = self.fetching.estimate.now(now);
        let backlog = self.fetching.backlog(&est.bandwidth);
        let mut bytes = [0u64; 3];
        let mut jobs: [Option<Arc<FetchJob>>; 3] = [None, None, None];
        for t in [Tier::Disk, Tier::Remote] {
            let list = std::mem::take(&mut tasks[t as usize]);
            if list.is_empty() {
                continue;
            }
            bytes[t as usize] = list.iter().map(|x| x.len).sum();
            let job = FetchJob::new(list);
            self.fetching.fetchers[t as usize]
                .as_ref()
                .expect("a fetcher runs for this tier")
                .submit(job.clone());
            jobs[t as usize] = Some(job);
        }
        // The deadline: the estimate (queue included) plus the configured slack.
        let expect = est.seconds(bytes, backlog, 0);
        let deadline =
            now + Duration::from_secs_f64(expect.min(3600.0)) + self.config.load_deadline;
        self.fetching.next_id += 1;
        let id = self.fetching.next_id;
        for (x, &(i, _)) in plan.need.iter().enumerate() {
            if source[x].0 != Tier::Host {
                self.fetching.reading.insert(plan.hashes[i as usize], id);
            }
        }
        self.fetching.stats.started += 1;
        self.fetching.loads.push(PendingLoad {
            id,
            hashes: plan.hashes[..plan.k as usize].to_vec(),
            path: plan.path,
            need: plan.need,
            pages: plan.pages,
            source,
            host,
            jobs,
            records: plan.records,
            waiters: Vec::new(),
            started: now,
            deadline,
            tokens: plan.tokens,
            deepest,
        });
        self.wait_on(plan.req, id);
    }

    /// Settles every load whose reads are done or whose deadline passed. Inline: every step
    /// calls it, and nearly always no load is in flight.
    #[inline(always)]
    pub(super) fn poll_loads(&mut self) {
        if !self.fetching.loads.is_empty() {
            self.settle_finished();
        }
    }

    #[cold]
    #[inline(never)]
    fn settle_finished(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.fetching.loads.len() {
            let l = &self.fetching.loads[i];
            let done = l.host.as_ref().is_none_or(|j| j.is_done())
                && l.jobs.iter().flatten().all(|j| j.is_done());
            if done || now >= l.deadline {
                let load = self.fetching.loads.swap_remove(i);
                self.settle(load);
            } else {
                i += 1;
            }
        }
        self.enforce_pin_cap();
    }

    /// Waits for every load in flight and settles it (shutdown, flush, tests).
    pub(super) fn settle_all(&mut self) {
        while let Some(l) = self.fetching.loads.pop() {
            if let Some(h) = &l.host {
                h.wait_all(None);
            }
            for j in l.jobs.iter().flatten() {
                j.wait(Some(l.deadline.saturating_duration_since(Instant::now())));
            }
            self.settle(l);
        }
    }

    /// Publishes what a load verified and hands its waiters their pins (see the module docs).
    fn settle(&mut self, load: PendingLoad) {
        let now = Instant::now();
        // Past the deadline: no write of a cancelled job lands after `cancel` returns, so the
        // pages it did not fill can be freed below.
        for j in load.jobs.iter().flatten() {
            if !j.is_done() {
                j.cancel();
            }
        }
        if let Some(h) = &load.host {
            h.wait_all(None); // host copies cannot hang
        }
        let statuses: Vec<Vec<FetchStatus>> = load
            .jobs
            .iter()
            .map(|j| j.as_ref().map(|j| j.statuses()).unwrap_or_default())
            .collect();
        let status = |x: usize| -> FetchStatus {
            match load.source[x] {
                (Tier::Host, _) => FetchStatus::Verified,
                (t, task) => statuses[t as usize][task as usize],
            }
        };
        let ok: Vec<bool> = (0..load.need.len())
            .map(|x| status(x) == FetchStatus::Verified)
            .collect();
        let failed = (0..load.need.len()).filter(|&x| status(x) == FetchStatus::Failed);
        let failed: Vec<usize> = failed.collect();
        let cancelled = (0..load.need.len()).any(|x| status(x) == FetchStatus::Cancelled);
        for (x, &good) in ok.iter().enumerate() {
            if good {
                self.written.set(load.pages[x], true);
            }
        }
        let (published, complete) = self.publish(&load, &ok);
        // Pages not linked go back to the arena.
        let unused: Vec<Handle> = (0..load.need.len())
            .filter(|&x| !published[x])
            .map(|x| load.pages[x])
            .collect();
        for &h in &unused {
            self.written.set(h, false);
        }
        self.arena.free(&unused).expect("the load's pages are live");
        // The lower records: counted, unpinned, a failed one dropped.
        for &x in &failed {
            let (i, _) = load.need[x];
            self.lower.count_failed_read(load.hashes[i as usize]);
        }
        for (x, &good) in ok.iter().enumerate() {
            let (i, g) = load.need[x];
            if good && load.source[x].0 != Tier::Host {
                self.lower.count_read(load.hashes[i as usize], g);
            }
        }
        for &h in &load.records {
            self.lower.index.unpin(h);
            if self.fetching.reading.get(&h) == Some(&load.id) {
                self.fetching.reading.remove(&h);
            }
        }
        let mut dropped: Vec<u64> = failed
            .iter()
            .map(|&x| load.hashes[load.need[x].0 as usize])
            .collect();
        dropped.sort_unstable();
        dropped.dedup();
        for h in dropped {
            if self.lower.index.get(h).is_some_and(|r| r.pins == 0) {
                self.lower.forget(h);
            }
        }
        // The measured bandwidth: what each job read in its time; a job cut off at its
        // deadline counts every byte it was given over the time it had (a slow tier looks
        // slow), so the next decision weighs it.
        for (t, j) in load.jobs.iter().enumerate() {
            let Some(j) = j else { continue };
            let tier = [Tier::Host, Tier::Disk, Tier::Remote][t];
            let all: u64 = j.tasks().iter().map(|x| x.len).sum();
            match j.throughput() {
                Some((bytes, secs)) if bytes == all => {
                    self.fetching.estimate.record_load(tier, bytes, secs, now)
                }
                _ => self.fetching.estimate.record_load(
                    tier,
                    all,
                    (now - load.started).as_secs_f64(),
                    now,
                ),
            }
        }
        let st = &mut self.fetching.stats;
        st.load_seconds += (now - load.started).as_secs_f64();
        st.failed_records += failed.len() as u64;
        if !failed.is_empty() || cancelled {
            self.promotion_failures += 1;
        }
        let st = &mut self.fetching.stats;
        if cancelled {
            st.timed_out += 1;
        } else if !failed.is_empty() {
            st.failed += 1;
        } else {
            st.verified += 1;
        }
        if complete {
            self.promoted_tokens[load.deepest as usize] += load.tokens;
        }
        // The waiters: pins on the published path, until they are admitted again.
        let mut path = Vec::new();
        self.tree.walk(&load.hashes, 0, &mut path);
        let deep_again = complete;
        for &w in &load.waiters {
            for &n in &path {
                self.tree.pin(n);
            }
            self.fetching.waiting.insert(
                w,
                Wait::Ready {
                    pins: path.clone(),
                    deep_again,
                },
            );
            self.fetching.ready.push(w);
        }
        let now_lower = self.lower.index.now();
        for &h in &load.hashes[..path.len()] {
            self.lower.index.touch(h, now_lower);
        }
        // The load's own pins: its start's L1 path, and the nodes `publish` created.
        self.unpin_nodes(&load.path);
    }

    /// Links a load's verified blocks into the tree (see the module docs). Returns, per need,
    /// whether its page went into the tree, and whether the whole hit was published. The new
    /// nodes are unpinned before it returns (the waiters pin the path).
    fn publish(&mut self, load: &PendingLoad, ok: &[bool]) -> (Vec<bool>, bool) {
        let groups = self.spec.groups.len();
        let k = load.hashes.len() as u32;
        let kept = |m: &Self, g: usize| m.window(g).is_none() || !m.swa_aware();
        let at: HashMap<(u32, usize), usize> =
            load.need.iter().enumerate().map(|(x, &p)| (p, x)).collect();
        let mut used = vec![false; load.need.len()];
        self.tree.set_publisher(None);
        // The tree may have changed since the start: walk it again.
        let mut path = Vec::new();
        self.tree.walk(&load.hashes, 0, &mut path);
        let d = path.len() as u32;
        let mut freed = std::mem::take(&mut self.scratch);
        let mut created: Vec<NodeId> = Vec::new();
        let mut parent = path.last().copied().unwrap_or(NONE);
        for i in d..k {
            let mut blocks = [0 as Handle; super::MAX_GROUPS];
            let mut whole = true;
            for g in (0..groups).filter(|&g| kept(self, g)) {
                match at.get(&(i, g)) {
                    Some(&x) if ok[x] => blocks[g] = load.pages[x],
                    _ => whole = false,
                }
            }
            if !whole {
                break;
            }
            let hash = load.hashes[i as usize];
            if !matches!(
                self.tree.claim_child(hash, parent, i, &mut freed),
                Link::Absent
            ) {
                break;
            }
            let n = self.tree.insert(hash, parent, i, &blocks[..groups]);
            for g in (0..groups).filter(|&g| kept(self, g)) {
                used[at[&(i, g)]] = true;
            }
            created.push(n);
            parent = n;
        }
        let j = d + created.len() as u32;
        let node_at = |i: u32| -> NodeId {
            if i < d {
                path[i as usize]
            } else {
                created[(i - d) as usize]
            }
        };
        let mut complete = j == k;
        if complete && self.swa_aware() && k > 0 {
            // Every sliding group's window before `k` must be there (kept in L1 or verified)
            // for the checkpoint: else none of the sliding pages is linked.
            let mut attach = Vec::new();
            for g in (0..groups).filter(|&g| !kept(self, g)) {
                let span = self
                    .tree
                    .layout()
                    .window_blocks(k, self.window(g).expect("sliding"));
                for i in k - span..k {
                    let n = node_at(i);
                    if self.tree.block(n, g) != 0 {
                        continue;
                    }
                    match at.get(&(i, g)) {
                        Some(&x) if ok[x] => attach.push((n, g, x)),
                        _ => complete = false,
                    }
                }
            }
            if complete {
                for (n, g, x) in attach {
                    self.tree.attach(n, g, load.pages[x]);
                    used[x] = true;
                }
                let max_blocks = self.run_lengths(k, false);
                self.tree
                    .add_checkpoint(node_at(k - 1), &max_blocks, CheckpointKind::Restored);
            }
        }
        for &n in &created {
            self.tree.unpin(n, &mut freed);
        }
        self.release(&mut freed);
        self.scratch = freed;
        (used, complete)
    }

    /// Node pins and pages held by loads in flight and ready requests (for validation).
    pub(super) fn fetch_pins(&self) -> impl Iterator<Item = NodeId> + '_ {
        let loads = self
            .fetching
            .loads
            .iter()
            .flat_map(|l| l.path.iter().copied());
        let ready = self.fetching.waiting.values().flat_map(|w| match w {
            Wait::Ready { pins, .. } => pins.as_slice(),
            Wait::Loading(_) => &[],
        });
        loads.chain(ready.copied())
    }

    /// Pages loads in flight own, with their group.
    pub(super) fn fetch_pages(&self) -> impl Iterator<Item = (usize, Handle)> + '_ {
        self.fetching
            .loads
            .iter()
            .flat_map(|l| l.need.iter().zip(&l.pages).map(|(&(_, g), &h)| (g, h)))
    }
}
