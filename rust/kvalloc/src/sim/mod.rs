//! Trace-driven simulation: replays a request trace through a real [`KVCacheManager`](crate::KVCacheManager) and
//! reports hit rate, memory efficiency and latency, so that a team can ask "what hit rate do I
//! get from how much memory, and what does SWA-aware caching buy me?".
//!
//! - [`trace`]: the trace model (block-id or token-id prompts) and block-id splitting;
//! - [`readers`]: Mooncake JSONL and the generic JSONL (formats documented there);
//! - [`spread`]: block-id traces whose ids stand for varying numbers of tokens;
//! - [`generate`]: seeded synthetic traffic (multi-turn chat, agent loops, shared prompts);
//! - [`service`]: the service model (prefill and decode throughput) that makes requests overlap;
//! - [`overlap`]: the overlap model that prices loads from the lower tiers;
//! - [`replay`]: the discrete-event replay that drives the manager;
//! - [`fleet`]: the same replay over N instances behind a [`router`], sharing one virtual
//!   remote tier ([`shared_remote`]);
//! - [`bound`]: the trace's unbounded-cache upper bound;
//! - [`oracle`]: the future the clairvoyant eviction order ([`Eviction::Oracle`](crate::Eviction::Oracle)) reads;
//! - [`capacity`]: the budget a policy needs to reach a hit rate (bisection over replays);
//! - [`report`]: what a replay measured.
//!
//! ```
//! use kvalloc::sim::{generate, RunConfig, Simulator};
//! use kvalloc::{Eviction, ModelSpec, Policy};
//!
//! let trace = generate::generate("chat", 7, Some(20))?;
//! let sim = Simulator::new(ModelSpec::preset("mimo-v2.5-pro")?, trace.into(), 64)?;
//! let cfg = RunConfig {
//!     policy: Policy::SwaAware,
//!     eviction: Eviction::Value,
//!     device_bytes: 64 << 30,
//!     lower_tiers: vec![],
//!     service: Default::default(),
//!     overlap: Default::default(),
//!     load_policy: Default::default(),
//! };
//! let report = sim.run(&cfg, "swa-aware", &mut |_, _| true)?;
//! assert!(report.hit_rate() <= report.upper_bound_hit_rate());
//! # Ok::<(), kvalloc::Error>(())
//! ```
//!
//! ## Lower tiers
//! [`RunConfig::lower_tiers`] gives the manager host, disk and remote budgets (virtual: every
//! placement decision is made and every byte counted, no bytes move). The manager reports what
//! each promotion loads per layer and tier ([`KVCacheManager::promotions`](crate::KVCacheManager::promotions));
//! the [`overlap`] model prices it (the part of the load compute cannot hide), and the service
//! model adds that time to the prefill. [`SimReport::tiers`] and
//! [`SimReport::exposed_load_seconds`] report the traffic and the total.

pub mod bound;
pub mod capacity;
pub mod fleet;
pub mod generate;
pub mod oracle;
pub mod overlap;
pub mod readers;
pub mod replay;
pub mod report;
pub mod rng;
pub mod router;
pub mod service;
pub mod shared_remote;
pub mod spread;
pub mod trace;

use std::sync::{Arc, OnceLock};

pub use bound::Bound;
pub use capacity::BudgetMatch;
pub use fleet::{EstimateStats, FleetConfig, FleetReport, InstanceReport, RouterKind};
pub use overlap::{LoadPolicy, OverlapModel};
pub use replay::{Progress, RunConfig, TierBudget};
pub use report::{SimReport, TierTraffic};
pub use service::ServiceModel;
pub use spread::SpreadStats;
pub use trace::{Content, Span, Trace, TraceRequest};

use crate::error::{Error, Result};
use crate::eviction::{Eviction, FutureUses};
use crate::spec::ModelSpec;

/// A model, a trace and a block size, prepared for any number of replays.
#[derive(Debug, Clone)]
pub struct Simulator {
    spec: ModelSpec,
    trace: Arc<Trace>,
    block_tokens: u32,
    /// Whole-block ids of block-id and spans prompts at `block_tokens`, flat;
    /// `offsets[i]..offsets[i+1]` is request i's (empty for token-id prompts).
    ids: Vec<u64>,
    offsets: Vec<usize>,
    bound: Bound,
    /// What the oracle knows of the future, built on its first run.
    future: OnceLock<Arc<FutureUses>>,
}

impl Simulator {
    /// Prepares `trace` for replays of `spec` at `block_tokens` tokens per block.
    pub fn new(spec: ModelSpec, trace: Arc<Trace>, block_tokens: u32) -> Result<Simulator> {
        if block_tokens == 0 {
            return Err(Error::invalid("block_tokens", "must be positive"));
        }
        trace.validate()?;
        let mut ids = Vec::new();
        let mut offsets = Vec::with_capacity(trace.requests.len() + 1);
        offsets.push(0);
        for r in &trace.requests {
            match &r.content {
                Content::Blocks(b) => trace::sim_block_ids(
                    b,
                    trace.block_tokens,
                    r.prompt_tokens,
                    block_tokens,
                    &mut ids,
                )?,
                Content::Spans(s) => spread::block_ids(s, r.prompt_tokens, block_tokens, &mut ids),
                Content::Stream(_) => {}
            }
            offsets.push(ids.len());
        }
        let mut sim = Simulator {
            spec,
            trace,
            block_tokens,
            ids,
            offsets,
            bound: Bound::default(),
            future: OnceLock::new(),
        };
        sim.bound = bound::upper_bound(&sim.trace, block_tokens, |i| sim.block_ids(i));
        Ok(sim)
    }

    /// Request i's whole-block ids (block-id and spans prompts), else None.
    fn block_ids(&self, i: usize) -> Option<&[u64]> {
        match self.trace.requests[i].content {
            Content::Blocks(_) | Content::Spans(_) => {
                Some(&self.ids[self.offsets[i]..self.offsets[i + 1]])
            }
            Content::Stream(_) => None,
        }
    }

    /// The model.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The trace.
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// The trace's unbounded-cache upper bound at this block size.
    pub fn upper_bound(&self) -> Bound {
        self.bound
    }

    /// Replays the trace once. `label` is passed to `progress` with the fraction done.
    pub fn run(&self, cfg: &RunConfig, label: &str, progress: Progress<'_>) -> Result<SimReport> {
        let ids = |i: usize| self.block_ids(i);
        let future = self.oracle_future(cfg);
        replay::Replay::new(
            &self.spec,
            &self.trace,
            self.block_tokens,
            &ids,
            cfg,
            self.bound.hit_tokens,
            &FleetConfig::single(),
        )?
        .with_future(future)
        .run(label, progress)
    }

    /// What the oracle eviction order knows of the future (built on its first run); None for
    /// the other orders.
    fn oracle_future(&self, cfg: &RunConfig) -> Option<Arc<FutureUses>> {
        (cfg.eviction == Eviction::Oracle).then(|| {
            self.future
                .get_or_init(|| {
                    let f =
                        oracle::future_uses(&self.trace, self.block_tokens, |i| self.block_ids(i));
                    Arc::new(f)
                })
                .clone()
        })
    }
}
