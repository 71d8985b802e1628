//! The fleet simulator: a trace replayed over N instances behind a router.
//!
//! Each instance is one engine with its own [`KVCacheManager`](crate::KVCacheManager): its own
//! device budget ([`RunConfig::device_bytes`]) and host and disk tiers (their budgets in
//! [`RunConfig::lower_tiers`] are per instance), its own admission queue and its share
//! (1/N) of the deployment's prefill throughput ([`ServiceModel::prefill_tokens_per_s`](super::ServiceModel)
//! is the whole fleet's, so that adding instances splits the same compute rather than adding
//! some). The remote tier's budget is the whole fleet's: every instance reads and writes one
//! shared virtual store ([`super::shared_remote`]), finds blocks the others wrote there, and
//! loses records the store evicts for its budget.
//!
//! Requests are routed when they arrive ([`RouterKind`], [`super::router`]); a preempted
//! request waits on the instance it was routed to. The prefix-aware routers learn what each
//! instance holds only from the [`CacheEvent`](crate::CacheEvent)s it publishes, drained after
//! every manager call. For them the report also says how far each request's estimated hit (at
//! routing) was from the hit its instance gave it at its first admission
//! ([`EstimateStats`]). A request can wait between the two (its instance's queue), so even a
//! truthful estimate can go stale; the window-safe router's over-estimates are those only.
//!
//! One instance with any router replays exactly as [`Simulator::run`] (the same event loop
//! drives one instance or many), except that a remote tier then goes through the shared store.
//!
//! ```
//! use kvalloc::sim::{generate, FleetConfig, RouterKind, RunConfig, Simulator};
//! use kvalloc::{Eviction, ModelSpec, Policy};
//!
//! let trace = generate::generate("chat", 7, Some(20))?;
//! let sim = Simulator::new(ModelSpec::preset("mimo-v2.5-pro")?, trace.into(), 64)?;
//! let cfg = RunConfig {
//!     policy: Policy::SwaAware,
//!     eviction: Eviction::Value,
//!     device_bytes: 16 << 30,
//!     lower_tiers: vec![],
//!     service: Default::default(),
//!     overlap: Default::default(),
//!     load_policy: Default::default(),
//! };
//! let fleet = FleetConfig::new(4, RouterKind::Prefix);
//! let r = sim.run_fleet(&cfg, &fleet, "prefix", &mut |_, _| true)?;
//! assert_eq!(r.per_instance.len(), 4);
//! assert_eq!(r.estimate.expect("prefix-aware").requests, r.report.completed + r.report.rejected);
//! # Ok::<(), kvalloc::Error>(())
//! ```

pub use super::router::RouterKind;
pub use super::shared_remote::SharedRemoteStats;

use super::replay::{Progress, Replay, RunConfig};
use super::report::SimReport;
use super::Simulator;
use crate::error::{Error, Result};
use crate::eviction::Eviction;

/// Most instances a fleet may have.
pub const MAX_INSTANCES: u32 = 4096;

/// How the fleet is laid out and routed.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Instances (1 to [`MAX_INSTANCES`]).
    pub instances: u32,
    /// How requests are routed.
    pub router: RouterKind,
    /// Finished requests write their cached blocks through to the shared remote tier (when
    /// there is one), so that other instances find them at once; off, blocks reach it only by
    /// demotion from the instances' lower tiers.
    pub write_through: bool,
    /// The prefix-aware routers' weight on the prefill blocks an instance would compute
    /// (Dynamo's `overlap_score_weight`; 1 by default): higher favours cache hits over load.
    pub overlap_weight: f64,
    /// The window-safe router's credit, in its score, for the blocks an instance stores past
    /// the prompt's deepest resume point there (0 by default: resume points only). At `c`, such
    /// a run of `r` blocks counts as `c * r` cached blocks against the load: a locality signal
    /// (the prompt's family lives there, and its next resume points will), never part of the
    /// estimate the router reports, which stays the resume point. 1 routes as the naive router.
    pub stored_credit: f64,
    /// The scoring routers break ties from a random start seeded by this (None, the default: a
    /// rotating start; round-robin always rotates). Replays under a few seeds show how much a
    /// figure owes to tie-breaking.
    pub tie_seed: Option<u64>,
}

impl FleetConfig {
    /// `instances` instances behind `router`, writing through to the shared remote tier, with
    /// Dynamo's default overlap weight (1).
    pub fn new(instances: u32, router: RouterKind) -> Self {
        FleetConfig {
            instances,
            router,
            write_through: true,
            overlap_weight: 1.0,
            stored_credit: 0.0,
            tie_seed: None,
        }
    }

    /// What a plain replay is: one instance, nothing routed, no events.
    pub(crate) fn single() -> Self {
        FleetConfig {
            write_through: false,
            ..FleetConfig::new(1, RouterKind::RoundRobin)
        }
    }

    /// Whether this is a fleet replay (a plain replay keeps its plain virtual tiers).
    pub(crate) fn is_fleet(&self) -> bool {
        *self != FleetConfig::single()
    }

    /// Checks the instance count and the weights.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_INSTANCES).contains(&self.instances) {
            return Err(Error::invalid(
                "instances",
                format!(
                    "{} instances: expected 1 to {MAX_INSTANCES}",
                    self.instances
                ),
            ));
        }
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(Error::invalid(
                "overlap_weight",
                format!("{} is not a finite number, 0 or above", self.overlap_weight),
            ));
        }
        if !(self.stored_credit.is_finite() && self.stored_credit >= 0.0) {
            return Err(Error::invalid(
                "stored_credit",
                format!("{} is not a finite number, 0 or above", self.stored_credit),
            ));
        }
        Ok(())
    }
}

/// What one instance was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceReport {
    /// Requests routed to it.
    pub requests: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// Their hit tokens (first admissions, as the fleet's `hit_tokens`).
    pub hit_tokens: u64,
}

/// How a prefix-aware router's estimates compare with the hits its instances gave: per request,
/// the estimated hit at routing minus the real hit at the first admission, in tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct EstimateStats {
    /// Requests measured (every first admission).
    pub requests: u64,
    /// Hit tokens the router estimated, all requests together.
    pub estimated_tokens: u64,
    /// Hit tokens the instances gave (before any load was declined as slower than
    /// recomputing: that is the service model's choice, not the cache's), all together.
    pub real_tokens: u64,
    /// Requests whose hit was over-estimated.
    pub over: u64,
    /// Requests estimated exactly.
    pub exact: u64,
    /// Requests whose hit was under-estimated (a hit from a lower tier, which the events do
    /// not cover, or blocks cached between routing and admission).
    pub under: u64,
    /// Mean error, tokens (positive: over-estimates dominate).
    pub mean_error_tokens: f64,
    /// Mean over-estimate among the over-estimated requests, tokens (0 when none).
    pub mean_over_tokens: f64,
    /// Over-estimated tokens, all requests together.
    pub over_tokens: u64,
    /// Error percentiles: `(q, tokens)` for q in 0.01, 0.1, 0.5, 0.9, 0.99 and the maximum.
    pub percentiles: Vec<(f64, i64)>,
}

impl EstimateStats {
    /// Statistics of the per-request `(estimated, real)` hit tokens.
    pub(crate) fn from_pairs(pairs: &[(u64, u64)]) -> Self {
        let n = pairs.len();
        let mut errors: Vec<i64> = pairs.iter().map(|&(e, r)| e as i64 - r as i64).collect();
        errors.sort_unstable();
        let over: Vec<i64> = errors.iter().copied().filter(|&e| e > 0).collect();
        let at = |q: f64| -> i64 {
            if n == 0 {
                0
            } else {
                errors[((n - 1) as f64 * q).round() as usize]
            }
        };
        let over_tokens: u64 = over.iter().map(|&e| e as u64).sum();
        EstimateStats {
            requests: n as u64,
            estimated_tokens: pairs.iter().map(|p| p.0).sum(),
            real_tokens: pairs.iter().map(|p| p.1).sum(),
            over: over.len() as u64,
            exact: errors.iter().filter(|&&e| e == 0).count() as u64,
            under: errors.iter().filter(|&&e| e < 0).count() as u64,
            mean_error_tokens: if n == 0 {
                0.0
            } else {
                errors.iter().map(|&e| e as f64).sum::<f64>() / n as f64
            },
            mean_over_tokens: if over.is_empty() {
                0.0
            } else {
                over_tokens as f64 / over.len() as f64
            },
            over_tokens,
            percentiles: [0.01, 0.1, 0.5, 0.9, 0.99, 1.0]
                .into_iter()
                .map(|q| (q, at(q)))
                .collect(),
        }
    }

    /// Share of the requests whose hit was over-estimated.
    pub fn over_share(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.over as f64 / self.requests as f64
        }
    }
}

/// What a fleet replay measured.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetReport {
    /// The whole fleet's figures, as one replay reports them (hit rate, TTFT, tier traffic
    /// summed over the instances: the remote tier's is the shared store's).
    pub report: SimReport,
    /// The router.
    pub router: RouterKind,
    /// Instances.
    pub instances: u32,
    /// What each instance was given.
    pub per_instance: Vec<InstanceReport>,
    /// The router's estimates against the real hits (prefix-aware routers only).
    pub estimate: Option<EstimateStats>,
    /// The shared remote store at the end (None without a remote tier, or for one instance
    /// replayed as a plain replay).
    pub shared_remote: Option<SharedRemoteStats>,
}

impl FleetReport {
    /// The busiest instance's requests over the mean (1: perfectly even).
    pub fn request_imbalance(&self) -> f64 {
        imbalance(self.per_instance.iter().map(|x| x.requests))
    }

    /// The busiest instance's prompt tokens over the mean (1: perfectly even).
    pub fn token_imbalance(&self) -> f64 {
        imbalance(self.per_instance.iter().map(|x| x.prompt_tokens))
    }
}

fn imbalance(xs: impl Iterator<Item = u64> + Clone) -> f64 {
    let n = xs.clone().count();
    let total: u64 = xs.clone().sum();
    let max = xs.max().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        max as f64 * n as f64 / total as f64
    }
}

impl Simulator {
    /// Replays the trace over a fleet (see the module docs). `cfg`'s device, host and disk
    /// budgets are per instance, its remote budget the shared store's, its prefill throughput
    /// the whole fleet's.
    pub fn run_fleet(
        &self,
        cfg: &RunConfig,
        fleet: &FleetConfig,
        label: &str,
        progress: Progress<'_>,
    ) -> Result<FleetReport> {
        fleet.validate()?;
        if cfg.eviction == Eviction::Oracle && fleet.instances > 1 {
            return Err(Error::invalid(
                "eviction",
                "the oracle eviction order replays one instance only",
            ));
        }
        let ids = |i: usize| self.block_ids(i);
        let future = self.oracle_future(cfg);
        Replay::new(
            self.spec(),
            self.trace(),
            self.block_tokens(),
            &ids,
            cfg,
            self.upper_bound().hit_tokens,
            fleet,
        )?
        .with_future(future)
        .run_fleet(label, progress)
    }
}
