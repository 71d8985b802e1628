//! The replay: a discrete-event simulation of one deployment serving a trace through a real
//! [`KVCacheManager`], under the [`ServiceModel`]; or of a fleet of instances, each with its own
//! manager, queues and share of the prefill throughput, behind a router (see [`super::fleet`]).
//!
//! Events, in time order (ties in the order they were scheduled):
//! - *arrive*: the request is routed to an instance (the only one, in a single deployment) and
//!   joins its admission queue; a session's next turn arrives no earlier than its previous
//!   turn's finish;
//! - *prefill done*: the first token is out (TTFT); decoding starts;
//! - *decode*: the request's output reaches the next block boundary, so it asks the manager for
//!   the next block (`extend`); or its output is complete and it finishes (`finish`: its blocks
//!   enter the prefix cache).
//!
//! After every arrival and finish, the instance's stalled decodes are retried first, then its
//! queued admissions in order (head-of-line: a refused head waits for memory). A head refused
//! while nothing runs on its instance can never fit and is rejected. When every request running
//! on an instance is stalled, the one admitted last is preempted (see `service`) and waits on
//! the same instance.
//!
//! Hit rates count each request's first admission only (a preempted request's re-admission
//! is recompute, not traffic), so they compare directly with the trace's upper bound.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use super::fleet::{EstimateStats, FleetConfig, FleetReport, InstanceReport};
use super::overlap::{LoadPolicy, OverlapModel};
use super::report::{SimReport, TierTraffic};
use super::router::{Load, Router};
use super::service::ServiceModel;
use super::shared_remote::SharedRemote;
use super::trace::Trace;
use crate::error::{Error, Result};
use crate::events::CacheEvent;
use crate::eviction::{Eviction, FutureUses};
use crate::manager::{Extension, KVCacheManager, ManagerConfig, Policy, Prompt};
use crate::spec::ModelSpec;
use crate::tiers::{BlockStore, LoadBytes, Tier};

/// A budget for one tier below the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierBudget {
    /// The tier.
    pub tier: Tier,
    /// Its capacity in bytes.
    pub bytes: u64,
}

/// One replay's settings (the model, trace and block size are the simulator's).
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// How sliding-window groups are cached.
    pub policy: Policy,
    /// Eviction order.
    pub eviction: Eviction,
    /// Device (L1) budget in bytes.
    pub device_bytes: u64,
    /// Budgets of lower tiers (virtual: decisions and byte counts, no bytes).
    pub lower_tiers: Vec<TierBudget>,
    /// Throughputs.
    pub service: ServiceModel,
    /// Lower tiers' bandwidths and latencies (its prefill rate is replaced by `service`'s).
    pub overlap: OverlapModel,
    /// Whether promoted hits are always loaded or only where loading beats recomputing.
    pub load_policy: LoadPolicy,
}

/// Progress callback: a label for what runs and the fraction done; returning false stops the
/// replay with an error.
pub type Progress<'a> = &'a mut dyn FnMut(&str, f64) -> bool;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pending,
    Queued,
    Prefill,
    Decoding,
    Stalled,
    Done,
}

#[derive(Debug, Clone, Copy)]
struct ReqState {
    phase: Phase,
    /// Arrival after waiting for the session's previous turn.
    arrival: f64,
    /// Output tokens scheduled so far.
    generated: u64,
    /// When the next output token can start generating.
    clock: f64,
    /// Admission serial (preemption picks the latest).
    admitted_at: u64,
    first_admission_done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Arrive,
    PrefillDone,
    Decode,
}

/// Non-negative finite times order like their bit patterns.
fn time_key(t: f64) -> u64 {
    debug_assert!(t.is_finite() && t >= 0.0);
    t.max(0.0).to_bits()
}

/// One instance of the deployment: its manager, its queues and its prefill line.
struct Instance {
    m: KVCacheManager,
    queue: VecDeque<u32>,
    stalled: VecDeque<u32>,
    running: u64,
    prefill_free: f64,
    no_cache_free: f64,
    /// When each lower tier's link finishes the loads queued on it (`[host, disk, remote]`):
    /// a tier serves its loads one after another.
    tier_busy: [f64; 3],
    /// Prompt tokens of its queued requests (the router's view of its prefill backlog).
    queued_tokens: f64,
    /// Prompt blocks of the requests routed here and not done (the router's active blocks).
    active_blocks: f64,
    /// Requests routed here, their prompt tokens and their hit tokens.
    routed: InstanceReport,
}

impl Instance {
    fn new(m: KVCacheManager) -> Self {
        Instance {
            m,
            queue: VecDeque::new(),
            stalled: VecDeque::new(),
            running: 0,
            prefill_free: 0.0,
            no_cache_free: 0.0,
            tier_busy: [0.0; 3],
            queued_tokens: 0.0,
            active_blocks: 0.0,
            routed: InstanceReport::default(),
        }
    }
}

/// The per-run state of the event loop.
pub(crate) struct Replay<'a> {
    trace: &'a Trace,
    /// Whole-block ids per request at the replay's block size (block-id prompts).
    ids: &'a dyn Fn(usize) -> Option<&'a [u64]>,
    /// Throughputs of one instance (its share of the deployment's prefill).
    service: ServiceModel,
    b: u64,
    inst: Vec<Instance>,
    /// The instance each request was routed to.
    at: Vec<u32>,
    router: Router,
    /// Whether the router learns from the managers' events (they are drained after each call).
    learns: bool,
    event_buf: Vec<CacheEvent>,
    hash_buf: Vec<u64>,
    /// The router's estimate of each request's hit (tokens), for the prefix-aware routers.
    estimates: Vec<u64>,
    /// Estimated and real hit tokens, per first admission (prefix-aware routers).
    estimate_pairs: Vec<(u64, u64)>,
    shared_remote: Option<SharedRemote>,
    st: Vec<ReqState>,
    next_in_session: Vec<u32>,
    events: BinaryHeap<Reverse<(u64, u64, Kind, u32)>>,
    seq: u64,
    running: u64,
    admissions: u64,
    scratch: Vec<i64>,
    report: SimReport,
    ttfts: Vec<f64>,
    ttft_no_cache_sum: f64,
    queue_wait_sum: f64,
    last_time: f64,
    /// Prices the manager's promotions (the exposed part of their loads).
    overlap: OverlapModel,
    /// Exposed load seconds of every promotion so far.
    exposed_load_seconds: f64,
    load_policy: LoadPolicy,
    /// Splitting a hit needs every layer's KV at the split point: only dense has it.
    can_split: bool,
    /// Seconds admissions' loads waited for their tier's earlier loads.
    load_queue_seconds: f64,
}

/// What an admission does with the hit the manager promoted from the lower tiers.
#[derive(Debug, Clone, Copy)]
struct LoadPlan {
    /// Promoted tokens recomputed instead of loaded.
    declined: u64,
    /// Promoted tokens loaded, attributed to tiers by their share of the bytes.
    taken: [u64; 3],
    /// Seconds the load delays the prefill (queue, latency and transfer compute did not hide).
    delay: f64,
    /// Seconds the load waited for its tiers' earlier loads.
    queued: f64,
}

/// The first `num/den` of a load: full-attention bytes scale with the tokens; a sliding
/// layer's window is whole whenever anything loads.
fn scaled(load: &LoadBytes, num: u64, den: u64, dense: bool) -> LoadBytes {
    let per_layer = load
        .per_layer
        .iter()
        .zip(&load.sliding)
        .map(|(b, &sliding)| {
            if num == 0 {
                [0; 3]
            } else if sliding && !dense {
                *b
            } else {
                b.map(|x| (u128::from(x) * u128::from(num) / u128::from(den)) as u64)
            }
        })
        .collect();
    LoadBytes {
        per_layer,
        sliding: load.sliding.clone(),
    }
}

/// Bytes per tier of a load.
fn tier_bytes(load: &LoadBytes) -> [u64; 3] {
    let mut out = [0u64; 3];
    for b in &load.per_layer {
        for k in 0..3 {
            out[k] += b[k];
        }
    }
    out
}

const NO_NEXT: u32 = u32::MAX;

/// The manager a replay drives: the run's policy, eviction and lower tiers at the replay's
/// block size.
fn manager_config(cfg: &RunConfig, trace: &Trace, block_tokens: u32) -> ManagerConfig {
    // Lower tiers are virtual here: the manager makes every placement decision and counts
    // every byte, but no bytes move.
    let mut lower = crate::tiers::LowerCapacity::default();
    for t in &cfg.lower_tiers {
        match t.tier {
            Tier::Host => lower.host = t.bytes,
            Tier::Disk => lower.disk = t.bytes,
            Tier::Remote => lower.remote = t.bytes,
        }
    }
    // A block-id trace coarser than the replay's blocks resumes only at its own block
    // boundaries: checkpoint prompts there (see `trace`).
    let t = trace.block_tokens;
    let resume_granularity =
        (t > block_tokens && t.is_multiple_of(block_tokens)).then_some(u64::from(t));
    ManagerConfig {
        block_tokens,
        policy: cfg.policy,
        eviction: cfg.eviction,
        resume_granularity,
        lower,
        ..ManagerConfig::default()
    }
}

/// A replay's report before anything ran: the run's settings and the trace's totals.
fn empty_report(
    cfg: &RunConfig,
    trace: &Trace,
    block_tokens: u32,
    upper_bound_hit_tokens: u64,
) -> SimReport {
    SimReport {
        policy: cfg.policy,
        eviction: cfg.eviction,
        block_tokens,
        device_bytes: cfg.device_bytes,
        requests: trace.requests.len() as u64,
        completed: 0,
        rejected: 0,
        preemptions: 0,
        prompt_tokens: trace.prompt_tokens(),
        hit_tokens: 0,
        upper_bound_hit_tokens,
        cached_tokens: 0,
        cache_bytes: 0,
        peak_running: 0,
        admissions_refused: 0,
        extensions_refused: 0,
        evicted_leaves: 0,
        evicted_checkpoints: 0,
        ttft_mean: 0.0,
        ttft_p50: 0.0,
        ttft_p99: 0.0,
        ttft_no_cache_mean: 0.0,
        queue_wait_mean: 0.0,
        simulated_seconds: 0.0,
        wall_seconds: 0.0,
        tiers: Vec::new(),
        exposed_load_seconds: 0.0,
        load_policy: cfg.load_policy,
        tier_hit_tokens: [0; 3],
        declined_tokens: 0,
        load_queue_seconds: 0.0,
    }
}

/// The fleet's managers: each instance's own device, host and disk budgets; the remote tier,
/// where there is one, shared by all of them through one [`SharedRemote`] (its budget is the
/// whole fleet's). A single deployment keeps the plain virtual remote tier.
fn managers(
    spec: &ModelSpec,
    trace: &Trace,
    block_tokens: u32,
    cfg: &RunConfig,
    fleet: &FleetConfig,
) -> Result<(Vec<KVCacheManager>, Option<SharedRemote>)> {
    let mut config = manager_config(cfg, trace, block_tokens);
    if !fleet.is_fleet() {
        let m = KVCacheManager::new(spec.clone(), cfg.device_bytes, config)?;
        return Ok((vec![m], None));
    }
    config.events = fleet.router.prefix_aware();
    config.write_through = fleet.write_through;
    // Many arenas at once: no bookkeeping committed up front (it changes no decision).
    config.prefault_bytes = 0;
    let shared = (config.lower.remote > 0).then(|| {
        SharedRemote::new(
            config.lower.remote,
            spec.block_bytes(block_tokens),
            crate::tiers::namespace(spec, block_tokens),
        )
    });
    let mut out = Vec::with_capacity(fleet.instances as usize);
    for _ in 0..fleet.instances {
        let remote = shared.clone().map(|s| Box::new(s) as Box<dyn BlockStore>);
        let m = KVCacheManager::with_stores(
            spec.clone(),
            cfg.device_bytes,
            config.clone(),
            None,
            remote,
        )?;
        out.push(m);
    }
    Ok((out, shared))
}

impl<'a> Replay<'a> {
    pub(crate) fn new(
        spec: &ModelSpec,
        trace: &'a Trace,
        block_tokens: u32,
        ids: &'a dyn Fn(usize) -> Option<&'a [u64]>,
        cfg: &RunConfig,
        upper_bound_hit_tokens: u64,
        fleet: &FleetConfig,
    ) -> Result<Self> {
        cfg.service.validate()?;
        cfg.overlap.validate()?;
        fleet.validate()?;
        let (ms, shared_remote) = managers(spec, trace, block_tokens, cfg, fleet)?;
        let instances = ms.len();
        // Each instance computes its share of the deployment's prefill throughput.
        let service = ServiceModel {
            prefill_tokens_per_s: cfg.service.prefill_tokens_per_s / instances as f64,
            ..cfg.service
        };
        let n = trace.requests.len();
        if n >= NO_NEXT as usize {
            return Err(Error::invalid("trace", format!("{n} requests is too many")));
        }
        let mut next_in_session = vec![NO_NEXT; n];
        let mut last_of: std::collections::HashMap<u64, u32> = Default::default();
        for (i, r) in trace.requests.iter().enumerate() {
            if let Some(s) = r.session {
                if let Some(prev) = last_of.insert(s, i as u32) {
                    next_in_session[prev as usize] = i as u32;
                }
            }
        }
        let st = trace
            .requests
            .iter()
            .map(|r| ReqState {
                phase: Phase::Pending,
                arrival: r.arrival,
                generated: 0,
                clock: 0.0,
                admitted_at: 0,
                first_admission_done: false,
            })
            .collect();
        let report = empty_report(cfg, trace, block_tokens, upper_bound_hit_tokens);
        let prefix_aware = fleet.router.prefix_aware();
        Ok(Replay {
            trace,
            ids,
            service,
            b: u64::from(block_tokens),
            inst: ms.into_iter().map(Instance::new).collect(),
            at: vec![0; n],
            router: Router::new(fleet.router, instances, fleet),
            learns: prefix_aware,
            event_buf: Vec::new(),
            hash_buf: Vec::new(),
            estimates: if prefix_aware { vec![0; n] } else { Vec::new() },
            estimate_pairs: Vec::new(),
            shared_remote,
            st,
            next_in_session,
            events: BinaryHeap::new(),
            seq: 0,
            running: 0,
            admissions: 0,
            scratch: Vec::new(),
            report,
            ttfts: Vec::with_capacity(n),
            ttft_no_cache_sum: 0.0,
            queue_wait_sum: 0.0,
            last_time: 0.0,
            overlap: OverlapModel {
                prefill_tokens_per_second: service.prefill_tokens_per_s,
                ..cfg.overlap.clone()
            },
            exposed_load_seconds: 0.0,
            load_policy: cfg.load_policy,
            can_split: cfg.policy == Policy::Dense,
            load_queue_seconds: 0.0,
        })
    }

    /// Gives an oracle replay the trace's future (see `oracle`).
    pub(crate) fn with_future(mut self, future: Option<std::sync::Arc<FutureUses>>) -> Self {
        if let Some(f) = future {
            for inst in &mut self.inst {
                inst.m.set_future(f.clone());
            }
        }
        self
    }

    /// Hands instance `k`'s new events to the router (prefix-aware routers only).
    fn drain(&mut self, k: usize) {
        if self.learns {
            self.inst[k].m.take_events_into(&mut self.event_buf);
            self.router.observe(k, &self.event_buf);
        }
    }

    /// Request i's chained block hashes, as its manager computes them, into `hash_buf`.
    fn prompt_hashes(&mut self, i: usize) {
        self.hash_buf.clear();
        let seed = crate::hash::root_seed(None);
        let r = &self.trace.requests[i];
        match (self.ids)(i) {
            Some(ids) => {
                let whole = (r.prompt_tokens / self.b) as usize;
                crate::hash::chain_ids(seed, &ids[..whole.min(ids.len())], &mut self.hash_buf);
            }
            None => {
                let tokens = self.trace.prompt_token_ids(r).expect("token prompt");
                crate::hash::chain_tokens(seed, tokens, self.b as usize, &mut self.hash_buf);
            }
        }
    }

    /// Picks request i's instance at time t (the only one in a single deployment).
    fn route(&mut self, i: u32, t: f64) -> usize {
        if self.inst.len() == 1 && !self.learns {
            return 0;
        }
        let r = &self.trace.requests[i as usize];
        let prompt_tokens = r.prompt_tokens;
        let max_safe = (prompt_tokens.saturating_sub(1) / self.b) as usize;
        if self.learns {
            self.prompt_hashes(i as usize);
        } else {
            self.hash_buf.clear();
        }
        let rate = self.service.prefill_tokens_per_s;
        let loads: Vec<Load> = self
            .inst
            .iter()
            .map(|x| Load {
                prefill_tokens: (x.prefill_free - t).max(0.0) * rate + x.queued_tokens,
                active_blocks: x.active_blocks,
            })
            .collect();
        let b = self.b as f64;
        let blocks = (prompt_tokens as f64 / b).ceil();
        let (k, est) = self
            .router
            .route(&loads, &self.hash_buf, max_safe, blocks, b);
        if self.learns {
            self.estimates[i as usize] = est as u64 * self.b;
        }
        k
    }

    /// Decides what the last admission loads of the hit the manager promoted: the whole hit,
    /// none of it (recompute), or (dense) a prefix, whichever delays its first token least.
    /// The load starts at the admission `t` once its tiers are free; the prefill starts at
    /// `start` and computes `miss` tokens besides any it declines. Books the chosen load on
    /// its tiers and in the totals.
    fn plan_loads(&mut self, k: usize, t: f64, start: f64, miss: u64) -> LoadPlan {
        let mut plan = LoadPlan {
            declined: 0,
            taken: [0; 3],
            delay: 0.0,
            queued: 0.0,
        };
        let inst = &mut self.inst[k];
        let promotions = inst.m.promotions();
        let tokens: u64 = promotions.iter().map(|p| p.tokens).sum();
        if tokens == 0 {
            return plan;
        }
        // All promotions of one admission load together: one load, summed per layer and tier.
        let mut load = promotions[0].load.clone();
        for p in &promotions[1..] {
            for (a, b) in load.per_layer.iter_mut().zip(&p.load.per_layer) {
                for k in 0..3 {
                    a[k] += b[k];
                }
            }
        }
        const STEPS: u64 = 16;
        let candidates: Vec<u64> = match (self.load_policy, self.can_split) {
            (LoadPolicy::Always, _) => vec![STEPS],
            (LoadPolicy::Decide, true) => (0..=STEPS).rev().collect(),
            (LoadPolicy::Decide, false) => vec![STEPS, 0],
        };
        let mut best: Option<(f64, u64, LoadBytes, f64)> = None;
        for f in candidates {
            let part = scaled(&load, f, STEPS, self.can_split);
            let declined = tokens - tokens * f / STEPS;
            let bytes = tier_bytes(&part);
            let ready = (0..3)
                .filter(|&x| bytes[x] > 0)
                .map(|x| inst.tier_busy[x])
                .fold(t, f64::max);
            let exposed = self.overlap.exposed_seconds(&part, miss + declined);
            let delay = if f == 0 {
                0.0
            } else {
                (ready + exposed - start).max(0.0)
            };
            let cost = delay + self.service.prefill_seconds(declined);
            // Candidates come largest first: a tie keeps the larger load.
            if best.as_ref().is_none_or(|b| cost < b.0) {
                best = Some((cost, f, part, delay));
            }
        }
        let (_, f, part, delay) = best.expect("a candidate");
        let bytes = tier_bytes(&part);
        let total: u64 = bytes.iter().sum();
        let loaded = tokens * f / STEPS;
        plan.declined = tokens - loaded;
        plan.delay = delay;
        for x in 0..3 {
            if bytes[x] == 0 {
                continue;
            }
            let from = inst.tier_busy[x].max(t);
            plan.queued = plan.queued.max(from - t);
            inst.tier_busy[x] = from + self.overlap.transfer_seconds(x, bytes[x]);
            plan.taken[x] = (u128::from(loaded) * u128::from(bytes[x]) / u128::from(total)) as u64;
        }
        self.exposed_load_seconds += plan.delay;
        self.load_queue_seconds += plan.queued;
        plan
    }

    fn push(&mut self, t: f64, kind: Kind, i: u32) {
        self.seq += 1;
        self.events.push(Reverse((time_key(t), self.seq, kind, i)));
    }

    /// Runs the replay to the end.
    pub(crate) fn run(self, label: &str, progress: Progress<'_>) -> Result<SimReport> {
        Ok(self.run_fleet(label, progress)?.report)
    }

    /// Runs the replay to the end; the report with the fleet's parts.
    pub(crate) fn run_fleet(mut self, label: &str, progress: Progress<'_>) -> Result<FleetReport> {
        let start = Instant::now();
        // A session's later turns arrive when the earlier one finishes.
        let mut later = vec![false; self.st.len()];
        for &nx in &self.next_in_session {
            if nx != NO_NEXT {
                later[nx as usize] = true;
            }
        }
        for i in 0..self.st.len() {
            if !later[i] {
                self.push(self.st[i].arrival, Kind::Arrive, i as u32);
            }
        }
        let n = self.st.len() as f64;
        let mut handled = 0u64;
        if !progress(label, 0.0) {
            return Err(stopped());
        }
        while let Some(Reverse((tk, _, kind, i))) = self.events.pop() {
            let t = f64::from_bits(tk);
            self.last_time = self.last_time.max(t);
            // Retention pins are timed in simulated time (events come in time order).
            if let Ok(now) = std::time::Duration::try_from_secs_f64(self.last_time) {
                for inst in &mut self.inst {
                    inst.m.set_clock(now)?;
                }
            }
            match kind {
                Kind::Arrive => self.arrive(i, t)?,
                Kind::PrefillDone => self.prefill_done(i, t)?,
                Kind::Decode => self.decode(i, t)?,
            }
            handled += 1;
            if handled.is_multiple_of(4096) {
                let done = (self.report.completed + self.report.rejected) as f64;
                if !progress(label, done / n) {
                    return Err(stopped());
                }
            }
        }
        debug_assert!(
            self.st.iter().all(|s| s.phase == Phase::Done),
            "{:?}",
            self.st
                .iter()
                .filter(|s| s.phase != Phase::Done)
                .map(|s| s.phase)
                .collect::<Vec<_>>()
        );
        if cfg!(debug_assertions) {
            for inst in &self.inst {
                inst.m.validate()?;
            }
        }
        self.totals();
        let k = self.ttfts.len().max(1) as f64;
        let r = &mut self.report;
        r.exposed_load_seconds = self.exposed_load_seconds;
        r.load_queue_seconds = self.load_queue_seconds;
        r.ttft_mean = self.ttfts.iter().sum::<f64>() / k;
        r.ttft_no_cache_mean = self.ttft_no_cache_sum / k;
        r.queue_wait_mean = self.queue_wait_sum / k;
        r.ttft_p50 = percentile(&mut self.ttfts, 0.50);
        r.ttft_p99 = percentile(&mut self.ttfts, 0.99);
        r.simulated_seconds = self.last_time;
        r.wall_seconds = start.elapsed().as_secs_f64();
        progress(label, 1.0);
        let estimate = self
            .learns
            .then(|| EstimateStats::from_pairs(&self.estimate_pairs));
        Ok(FleetReport {
            report: self.report,
            router: self.router.kind(),
            instances: self.inst.len() as u32,
            per_instance: self.inst.iter().map(|x| x.routed).collect(),
            estimate,
            shared_remote: self.shared_remote.as_ref().map(SharedRemote::stats),
        })
    }

    /// The managers' end-of-run statistics, summed over the instances, into the report.
    fn totals(&mut self) {
        let r = &mut self.report;
        let mut tiers: Vec<TierTraffic> = Vec::new();
        for inst in &self.inst {
            let stats = inst.m.stats();
            r.cached_tokens += stats.cached_blocks * self.b;
            r.cache_bytes += stats.bytes_in_use;
            r.admissions_refused += stats.admissions_refused;
            r.extensions_refused += stats.extensions_refused;
            r.evicted_leaves += stats.evicted_leaves;
            r.evicted_checkpoints += stats.evicted_checkpoints;
            for t in &stats.tiers {
                match tiers.iter_mut().find(|x| x.tier == t.tier) {
                    Some(x) => {
                        x.bytes_written += t.counters.bytes_written;
                        x.bytes_read += t.counters.bytes_read;
                    }
                    None => tiers.push(TierTraffic {
                        tier: t.tier,
                        bytes_written: t.counters.bytes_written,
                        bytes_read: t.counters.bytes_read,
                    }),
                }
            }
        }
        r.tiers = tiers;
    }

    /// Routes an arriving request (its first arrival; a preempted request stays where it is)
    /// and queues it there.
    fn arrive(&mut self, i: u32, t: f64) -> Result<()> {
        let k = self.route(i, t);
        self.at[i as usize] = k as u32;
        let prompt = self.trace.requests[i as usize].prompt_tokens;
        let inst = &mut self.inst[k];
        inst.routed.requests += 1;
        inst.routed.prompt_tokens += prompt;
        inst.active_blocks += (prompt as f64 / self.b as f64).ceil();
        self.st[i as usize].arrival = t;
        self.enqueue(k, i, false);
        self.pump(k, t)
    }

    /// Puts request i in instance k's admission queue (at its head: a preempted request).
    fn enqueue(&mut self, k: usize, i: u32, front: bool) {
        let inst = &mut self.inst[k];
        inst.queued_tokens += self.trace.requests[i as usize].prompt_tokens as f64;
        self.st[i as usize].phase = Phase::Queued;
        if front {
            inst.queue.push_front(i);
        } else {
            inst.queue.push_back(i);
        }
    }

    /// Takes instance k's queue head out of its queue.
    fn dequeue(&mut self, k: usize) -> u32 {
        let inst = &mut self.inst[k];
        let i = inst.queue.pop_front().expect("a queued request");
        inst.queued_tokens -= self.trace.requests[i as usize].prompt_tokens as f64;
        i
    }

    /// Retries instance k's stalled decodes, then admits its queued requests, while memory
    /// allows.
    fn pump(&mut self, k: usize, t: f64) -> Result<()> {
        loop {
            while let Some(&j) = self.inst[k].stalled.front() {
                if !self.try_extend(j, t)? {
                    break;
                }
                self.inst[k].stalled.pop_front();
            }
            while let Some(&i) = self.inst[k].queue.front() {
                if self.try_admit(k, i, t)? {
                    self.dequeue(k);
                } else if self.inst[k].running == 0 {
                    // Nothing will ever free memory for it: it cannot fit in this budget.
                    self.dequeue(k);
                    self.report.rejected += 1;
                    self.done(i, t);
                } else {
                    break;
                }
            }
            let inst = &self.inst[k];
            if inst.stalled.is_empty() || inst.stalled.len() as u64 != inst.running {
                return Ok(());
            }
            // Every running request waits for memory only another could free: preempt the
            // latest admitted. If it was the only one, its output can never fit: it ends.
            let (pos, &j) = inst
                .stalled
                .iter()
                .enumerate()
                .max_by_key(|(_, &j)| self.st[j as usize].admitted_at)
                .expect("non-empty");
            self.inst[k].stalled.remove(pos);
            self.inst[k].m.finish(u64::from(j))?;
            self.drain(k);
            self.inst[k].running -= 1;
            self.running -= 1;
            if self.inst[k].running == 0 {
                self.report.rejected += 1;
                self.done(j, t);
            } else {
                self.report.preemptions += 1;
                self.st[j as usize].generated = 0;
                self.enqueue(k, j, true);
            }
        }
    }

    fn try_admit(&mut self, k: usize, i: u32, t: f64) -> Result<bool> {
        let trace = self.trace;
        let r = &trace.requests[i as usize];
        let prompt = match (self.ids)(i as usize) {
            Some(hashes) => Prompt::BlockHashes {
                hashes,
                num_tokens: r.prompt_tokens,
            },
            None => Prompt::Tokens(trace.prompt_token_ids(r).expect("token prompt")),
        };
        let admitted = self.inst[k].m.admit(u64::from(i), prompt, None, None)?;
        self.drain(k);
        let Some(hit) = admitted else {
            return Ok(false);
        };
        self.running += 1;
        self.inst[k].running += 1;
        self.report.peak_running = self.report.peak_running.max(self.running);
        self.admissions += 1;
        let service = self.service;
        let s = &mut self.st[i as usize];
        s.phase = Phase::Prefill;
        s.admitted_at = self.admissions;
        let start = self.inst[k].prefill_free.max(t);
        // A hit promoted from a lower tier delays the prefill by the part of its load that the
        // overlap model says compute cannot hide, or is recomputed where that is faster.
        // (The manager's state is the same either way: the engine writes recomputed KV to the
        // same blocks.)
        let plan = self.plan_loads(k, t, start, r.prompt_tokens - hit);
        let served = hit - plan.declined;
        let inst = &mut self.inst[k];
        inst.prefill_free = start + plan.delay + service.prefill_seconds(r.prompt_tokens - served);
        let s = &mut self.st[i as usize];
        if !s.first_admission_done {
            s.first_admission_done = true;
            // Its uses are no longer ahead (a refused try keeps them: it still waits).
            inst.m.oracle_admitted(i as usize);
            inst.routed.hit_tokens += served;
            self.report.hit_tokens += served;
            self.report.declined_tokens += plan.declined;
            for x in 0..3 {
                self.report.tier_hit_tokens[x] += plan.taken[x];
            }
            self.queue_wait_sum += t - s.arrival;
            inst.no_cache_free =
                inst.no_cache_free.max(t) + service.prefill_seconds(r.prompt_tokens);
            self.ttft_no_cache_sum += inst.no_cache_free - s.arrival;
            self.ttfts.push(inst.prefill_free - s.arrival);
            if self.learns {
                // What the router believed against what the instance had (before any load
                // was declined: that is the service model's choice, not the cache's).
                self.estimate_pairs.push((self.estimates[i as usize], hit));
            }
        }
        let done = inst.prefill_free;
        self.push(done, Kind::PrefillDone, i);
        Ok(true)
    }

    fn prefill_done(&mut self, i: u32, t: f64) -> Result<()> {
        let s = &mut self.st[i as usize];
        s.phase = Phase::Decoding;
        s.clock = t;
        self.decode(i, t)
    }

    /// Takes the next output block, or finishes when the output is complete.
    fn decode(&mut self, i: u32, t: f64) -> Result<()> {
        let k = self.at[i as usize] as usize;
        let out = self.trace.requests[i as usize].output_tokens;
        if self.st[i as usize].generated >= out {
            self.inst[k].m.finish(u64::from(i))?;
            self.drain(k);
            self.inst[k].running -= 1;
            self.running -= 1;
            self.report.completed += 1;
            self.done(i, t);
            return self.pump(k, t);
        }
        if !self.try_extend(i, t)? {
            self.st[i as usize].phase = Phase::Stalled;
            self.inst[k].stalled.push_back(i);
            // This may have been the last request able to move: check for a deadlock.
            return self.pump(k, t);
        }
        Ok(())
    }

    /// Schedules request i's tokens up to its next block boundary (or its output's end).
    /// Returns false when the manager has no room.
    fn try_extend(&mut self, i: u32, t: f64) -> Result<bool> {
        let k = self.at[i as usize] as usize;
        let trace = self.trace;
        let r = &trace.requests[i as usize];
        let s = self.st[i as usize];
        let len = r.prompt_tokens + s.generated;
        let n = (self.b - len % self.b).min(r.output_tokens - s.generated);
        let m = &mut self.inst[k].m;
        let ok = match trace.prompt_token_ids(r) {
            None => m.extend(u64::from(i), Extension::Count(n))?,
            Some(_) => {
                let from = s.generated as usize..(s.generated + n) as usize;
                let ids = match trace.output_token_ids(r) {
                    Some(out) => &out[from],
                    None => {
                        // Opaque output: ids no prompt contains (negative, unique per position).
                        self.scratch.clear();
                        let base = i64::MIN.wrapping_add(i64::from(i) << 32);
                        self.scratch
                            .extend(from.map(|p| base.wrapping_add(p as i64)));
                        &self.scratch[..]
                    }
                };
                m.extend(u64::from(i), Extension::Tokens(ids))?
            }
        };
        self.drain(k);
        if !ok {
            return Ok(false);
        }
        let service = self.service;
        let s = &mut self.st[i as usize];
        s.phase = Phase::Decoding;
        s.generated += n;
        s.clock = s.clock.max(t) + service.decode_seconds(n);
        let at = s.clock;
        self.push(at, Kind::Decode, i);
        Ok(true)
    }

    /// Marks request i done, takes it off its instance's load, and lets its session's next
    /// turn arrive.
    fn done(&mut self, i: u32, t: f64) {
        self.st[i as usize].phase = Phase::Done;
        let k = self.at[i as usize] as usize;
        let prompt = self.trace.requests[i as usize].prompt_tokens as f64;
        self.inst[k].active_blocks -= (prompt / self.b as f64).ceil();
        let nx = self.next_in_session[i as usize];
        if nx != NO_NEXT {
            let at = self.st[nx as usize].arrival.max(t);
            self.push(at, Kind::Arrive, nx);
        }
    }
}

fn stopped() -> Error {
    Error::invalid(
        "progress",
        "the replay was stopped by its progress callback",
    )
}

fn percentile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let k = ((xs.len() - 1) as f64 * q).round() as usize;
    *xs.select_nth_unstable_by(k, f64::total_cmp).1
}
