//! `Trace` and `Simulator`: the trace-driven replay of `kvalloc simulate`.
//!
//! Replays run in the core with the interpreter detached; an optional progress callable is
//! called (attached) every few thousand events with `(label, fraction)`. If it raises, the
//! replay stops and the exception propagates; Ctrl-C stops a replay the same way.

use std::path::PathBuf;
use std::sync::Arc;

use kvalloc::sim::readers::{ReadOptions, TokensPerId};
use kvalloc::sim::{
    generate, readers, FleetConfig, FleetReport, LoadPolicy, RouterKind, RunConfig, ServiceModel,
    SimReport, Simulator, TierBudget, Trace,
};
use kvalloc::tiers::Tier;
use kvalloc::{Eviction, Policy};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert::{
    self, non_negative, number, opt_callable, opt_non_negative, opt_text, positive, text, type_name,
};
use crate::errors::{invalid, IntoPyResult};
use crate::spec::spec_arg;

/// Tokens per block of a replay when the caller does not say (see the README: the Mooncake
/// trace resolves sharing to 512 tokens, and 128 is MiMo's sliding window).
const DEFAULT_SIM_BLOCK_TOKENS: u32 = 128;

/// A request trace, read from a file or generated.
#[pyclass(frozen, name = "Trace", module = "kvalloc._core")]
pub struct PyTrace {
    inner: Arc<Trace>,
}

#[pymethods]
impl PyTrace {
    /// Reads a Mooncake or generic JSONL trace (detected from its first line). `tokens_per_id`:
    /// "exact" (default; `trace_block_tokens` per id) or "spread" (ids of varying token counts).
    #[staticmethod]
    #[pyo3(signature = (path, trace_block_tokens = None, tokens_per_id = None))]
    fn load(
        py: Python<'_>,
        path: &Bound<'_, PyAny>,
        trace_block_tokens: Option<&Bound<'_, PyAny>>,
        tokens_per_id: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let path: PathBuf = convert::path(path, "path")?;
        let block_tokens = match trace_block_tokens.filter(|o| !o.is_none()) {
            Some(o) => Some(u32_arg(o, "trace_block_tokens")?),
            None => None,
        };
        let tokens_per_id = match opt_text(tokens_per_id, "tokens_per_id")? {
            Some(m) => TokensPerId::parse(&m).py()?,
            None => TokensPerId::Exact,
        };
        let opts = ReadOptions {
            block_tokens,
            tokens_per_id,
        };
        let trace = py.detach(|| readers::read_trace(&path, opts)).py()?;
        Ok(PyTrace {
            inner: Arc::new(trace),
        })
    }

    /// A seeded synthetic trace: "chat", "agent" or "shared-prompt"; `size` is sessions
    /// (requests for "shared-prompt").
    #[staticmethod]
    #[pyo3(signature = (kind, seed = None, size = None))]
    fn generate(
        py: Python<'_>,
        kind: &Bound<'_, PyAny>,
        seed: Option<&Bound<'_, PyAny>>,
        size: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let kind = text(kind, "kind")?;
        let seed = match seed.filter(|o| !o.is_none()) {
            Some(o) => non_negative(o, "seed")?,
            None => 0,
        };
        let size = match size.filter(|o| !o.is_none()) {
            Some(o) => Some(u32_arg(o, "size")?),
            None => None,
        };
        let trace = py.detach(|| generate::generate(&kind, seed, size)).py()?;
        Ok(PyTrace {
            inner: Arc::new(trace),
        })
    }

    /// The generators' names.
    #[staticmethod]
    fn generators() -> Vec<&'static str> {
        generate::GENERATORS.to_vec()
    }

    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }
    #[getter]
    fn num_requests(&self) -> usize {
        self.inner.requests.len()
    }
    #[getter]
    fn prompt_tokens(&self) -> u64 {
        self.inner.prompt_tokens()
    }
    #[getter]
    fn output_tokens(&self) -> u64 {
        self.inner.output_tokens()
    }
    #[getter]
    fn duration_seconds(&self) -> f64 {
        self.inner.duration()
    }
    /// How a spread trace's tokens were assigned to its ids (None for other traces).
    #[getter]
    fn spread<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(st) = &self.inner.spread else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("requests", st.requests)?;
        d.set_item("min_tokens_per_id", st.min_tokens_per_id)?;
        d.set_item("max_tokens_per_id", st.max_tokens_per_id)?;
        d.set_item("requests_disagreeing", st.requests_disagreeing)?;
        d.set_item("requests_cut", st.requests_cut)?;
        d.set_item("requests_padded", st.requests_padded)?;
        Ok(Some(d))
    }

    fn __repr__(&self) -> String {
        format!(
            "Trace({:?}, {} requests, {} prompt tokens)",
            self.inner.name,
            self.inner.requests.len(),
            self.inner.prompt_tokens()
        )
    }
}

fn u32_arg(o: &Bound<'_, PyAny>, what: &str) -> PyResult<u32> {
    let v = positive(o, what)?;
    u32::try_from(v).map_err(|_| invalid(what, format!("{v} is too large")))
}

/// A model, a trace and a block size, ready for replays.
#[pyclass(frozen, name = "Simulator", module = "kvalloc._core")]
pub struct PySimulator {
    inner: Simulator,
}

/// Lower tiers' link settings of `run`: `gbps` the host, disk and remote bandwidths in GB/s,
/// `latency_ms` the disk and remote latencies in milliseconds (None: the defaults), and the load
/// policy (None: decide).
struct LoadArgs<'a, 'py> {
    gbps: [Option<&'a Bound<'py, PyAny>>; 3],
    latency_ms: [Option<&'a Bound<'py, PyAny>>; 2],
    policy: Option<String>,
}

impl LoadArgs<'_, '_> {
    /// Applies the settings to `cfg`, checking each by its argument's name.
    fn apply(&self, cfg: &mut RunConfig) -> PyResult<()> {
        for (k, (o, name)) in self
            .gbps
            .iter()
            .zip(["host_gbps", "disk_gbps", "remote_gbps"])
            .enumerate()
        {
            if let Some(o) = o.filter(|o| !o.is_none()) {
                let x = number(o, name)?;
                if !(x.is_finite() && x > 0.0) {
                    return Err(invalid(name, format!("{x} is not a positive number")));
                }
                cfg.overlap.bandwidth[k] = x * 1e9;
            }
        }
        for (k, (o, name)) in self
            .latency_ms
            .iter()
            .zip(["disk_latency_ms", "remote_latency_ms"])
            .enumerate()
        {
            if let Some(o) = o.filter(|o| !o.is_none()) {
                let x = number(o, name)?;
                if !(x.is_finite() && x >= 0.0) {
                    return Err(invalid(name, format!("{x} is not a non-negative number")));
                }
                cfg.overlap.latency[k + 1] = x / 1e3;
            }
        }
        if let Some(p) = &self.policy {
            cfg.load_policy = LoadPolicy::parse(p).py()?;
        }
        Ok(())
    }
}

/// Settings shared by `run` and `budget_to_match`. `lower` holds the host, disk and remote
/// budgets (None: no such tier); `service` the prefill and decode rates (None: the defaults).
/// The settings `run` and `run_fleet` share: the policy's name (default "swa-aware") and the
/// replay's configuration with its budgets, service rates and load settings.
fn replay_config<'py>(
    policy: Option<&Bound<'py, PyAny>>,
    eviction: Option<&Bound<'py, PyAny>>,
    device_bytes: &Bound<'py, PyAny>,
    budgets: [Option<&Bound<'py, PyAny>>; 3],
    rates: [Option<&Bound<'py, PyAny>>; 2],
    loads: LoadArgs<'_, 'py>,
) -> PyResult<(String, RunConfig)> {
    let policy = opt_text(policy, "policy")?.unwrap_or_else(|| "swa-aware".into());
    let eviction = opt_text(eviction, "eviction")?.unwrap_or_else(|| "lru".into());
    let mut cfg = run_config(&policy, &eviction, device_bytes, budgets, rates)?;
    loads.apply(&mut cfg)?;
    Ok((policy, cfg))
}

fn run_config(
    policy: &str,
    eviction: &str,
    device_bytes: &Bound<'_, PyAny>,
    lower: [Option<&Bound<'_, PyAny>>; 3],
    service: [Option<&Bound<'_, PyAny>>; 2],
) -> PyResult<RunConfig> {
    let defaults = ServiceModel::default();
    let rate = |obj: Option<&Bound<'_, PyAny>>, what: &str, default: f64| match obj
        .filter(|o| !o.is_none())
    {
        Some(o) => number(o, what),
        None => Ok(default),
    };
    let prefill_tokens_per_s = rate(
        service[0],
        "prefill_tokens_per_s",
        defaults.prefill_tokens_per_s,
    )?;
    let decode_tokens_per_s = rate(
        service[1],
        "decode_tokens_per_s",
        defaults.decode_tokens_per_s,
    )?;
    let mut lower_tiers = Vec::new();
    for (tier, b) in Tier::ALL.into_iter().zip(lower) {
        let bytes = opt_non_negative(b, &format!("{}_bytes", tier.name()))?;
        if bytes > 0 {
            lower_tiers.push(TierBudget { tier, bytes });
        }
    }
    Ok(RunConfig {
        policy: Policy::parse(policy).py()?,
        eviction: Eviction::parse(eviction).py()?,
        device_bytes: positive(device_bytes, "device_bytes")?,
        lower_tiers,
        service: ServiceModel {
            prefill_tokens_per_s,
            decode_tokens_per_s,
        },
        overlap: Default::default(),
        load_policy: Default::default(),
    })
}

/// Runs `work` detached, with a progress closure that calls `progress` (attached) and checks
/// for Ctrl-C; the first Python error stops the work and is returned.
fn with_progress<T: Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    work: impl FnOnce(&mut dyn FnMut(&str, f64) -> bool) -> kvalloc::Result<T> + Send,
) -> PyResult<T> {
    let mut failure: Option<PyErr> = None;
    let out = py.detach(|| {
        let mut report = |label: &str, fraction: f64| -> bool {
            Python::attach(|py| {
                let res = py.check_signals().and_then(|()| match &progress {
                    Some(cb) => cb.call1(py, (label, fraction)).map(drop),
                    None => Ok(()),
                });
                match res {
                    Ok(()) => true,
                    Err(e) => {
                        failure = Some(e);
                        false
                    }
                }
            })
        };
        work(&mut report)
    });
    if let Some(e) = failure {
        return Err(e);
    }
    out.py()
}

fn report_dict<'py>(py: Python<'py>, r: &SimReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("policy", r.policy.name())?;
    d.set_item("eviction", r.eviction.name())?;
    d.set_item("block_tokens", r.block_tokens)?;
    d.set_item("device_bytes", r.device_bytes)?;
    d.set_item("hit_rate", r.hit_rate())?;
    d.set_item("upper_bound_hit_rate", r.upper_bound_hit_rate())?;
    d.set_item("prefill_tokens_saved", r.prefill_tokens_saved())?;
    d.set_item("cached_tokens_per_gib", r.cached_tokens_per_gib())?;
    let written = PyDict::new(py);
    let read = PyDict::new(py);
    for t in &r.tiers {
        written.set_item(t.tier.name(), t.bytes_written)?;
        read.set_item(t.tier.name(), t.bytes_read)?;
    }
    d.set_item("tier_bytes_written", written)?;
    d.set_item("tier_bytes_read", read)?;
    d.set_item("exposed_load_seconds", r.exposed_load_seconds)?;
    d.set_item("load_policy", r.load_policy.name())?;
    let taken = PyDict::new(py);
    for t in &r.tiers {
        taken.set_item(t.tier.name(), r.tier_hit_tokens[t.tier as usize])?;
    }
    d.set_item("tier_hit_tokens", taken)?;
    d.set_item("declined_tokens", r.declined_tokens)?;
    d.set_item("load_queue_seconds", r.load_queue_seconds)?;
    d.set_item("wall_seconds", r.wall_seconds)?;
    d.set_item("requests", r.requests)?;
    d.set_item("completed", r.completed)?;
    d.set_item("rejected", r.rejected)?;
    d.set_item("preemptions", r.preemptions)?;
    d.set_item("prompt_tokens", r.prompt_tokens)?;
    d.set_item("hit_tokens", r.hit_tokens)?;
    d.set_item("upper_bound_hit_tokens", r.upper_bound_hit_tokens)?;
    d.set_item("cached_tokens", r.cached_tokens)?;
    d.set_item("cache_bytes", r.cache_bytes)?;
    d.set_item("peak_running", r.peak_running)?;
    d.set_item("admissions_refused", r.admissions_refused)?;
    d.set_item("extensions_refused", r.extensions_refused)?;
    d.set_item("evicted_leaves", r.evicted_leaves)?;
    d.set_item("evicted_checkpoints", r.evicted_checkpoints)?;
    d.set_item("ttft_mean_seconds", r.ttft_mean)?;
    d.set_item("ttft_p50_seconds", r.ttft_p50)?;
    d.set_item("ttft_p99_seconds", r.ttft_p99)?;
    d.set_item("ttft_no_cache_mean_seconds", r.ttft_no_cache_mean)?;
    d.set_item("ttft_change", r.ttft_change())?;
    d.set_item("queue_wait_mean_seconds", r.queue_wait_mean)?;
    d.set_item("simulated_seconds", r.simulated_seconds)?;
    Ok(d)
}

/// A fleet replay's report: the fleet's figures as `run` reports them, plus the router, the
/// load per instance, the router's estimates against the real hits and the shared store.
fn fleet_dict<'py>(py: Python<'py>, r: &FleetReport) -> PyResult<Bound<'py, PyDict>> {
    let d = report_dict(py, &r.report)?;
    d.set_item("router", r.router.name())?;
    d.set_item("instances", r.instances)?;
    let per = PyList::empty(py);
    for x in &r.per_instance {
        let e = PyDict::new(py);
        e.set_item("requests", x.requests)?;
        e.set_item("prompt_tokens", x.prompt_tokens)?;
        e.set_item("hit_tokens", x.hit_tokens)?;
        per.append(e)?;
    }
    d.set_item("per_instance", per)?;
    d.set_item("request_imbalance", r.request_imbalance())?;
    d.set_item("token_imbalance", r.token_imbalance())?;
    match &r.estimate {
        Some(s) => {
            let e = PyDict::new(py);
            e.set_item("requests", s.requests)?;
            e.set_item("estimated_tokens", s.estimated_tokens)?;
            e.set_item("real_tokens", s.real_tokens)?;
            e.set_item("over", s.over)?;
            e.set_item("exact", s.exact)?;
            e.set_item("under", s.under)?;
            e.set_item("over_share", s.over_share())?;
            e.set_item("mean_error_tokens", s.mean_error_tokens)?;
            e.set_item("mean_over_tokens", s.mean_over_tokens)?;
            e.set_item("over_tokens", s.over_tokens)?;
            let q = PyDict::new(py);
            for &(p, v) in &s.percentiles {
                let key = if p >= 1.0 {
                    "max".to_string()
                } else {
                    format!("p{}", (p * 100.0).round() as u32)
                };
                q.set_item(key, v)?;
            }
            e.set_item("error_percentiles", q)?;
            d.set_item("estimate", e)?;
        }
        None => d.set_item("estimate", py.None())?,
    }
    match &r.shared_remote {
        Some(s) => {
            let e = PyDict::new(py);
            e.set_item("records", s.records)?;
            e.set_item("bytes", s.bytes)?;
            e.set_item("evicted", s.evicted)?;
            e.set_item("bytes_written", s.counters.bytes_written)?;
            e.set_item("bytes_read", s.counters.bytes_read)?;
            d.set_item("shared_remote", e)?;
        }
        None => d.set_item("shared_remote", py.None())?,
    }
    Ok(d)
}

#[pymethods]
impl PySimulator {
    #[new]
    #[pyo3(signature = (spec, trace, block_tokens = None))]
    fn new(
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        trace: &Bound<'_, PyAny>,
        block_tokens: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let spec = spec_arg(spec)?;
        let trace = trace.cast::<PyTrace>().map_err(|_| {
            invalid(
                "trace",
                format!("expected a kvalloc.Trace, got {}", type_name(trace)),
            )
        })?;
        let b = match block_tokens.filter(|o| !o.is_none()) {
            Some(o) => u32_arg(o, "block_tokens")?,
            None => DEFAULT_SIM_BLOCK_TOKENS,
        };
        let (spec, trace) = (spec.get().inner.clone(), trace.get().inner.clone());
        let inner = py.detach(|| Simulator::new(spec, trace, b)).py()?;
        Ok(PySimulator { inner })
    }

    #[getter]
    fn block_tokens(&self) -> u32 {
        self.inner.block_tokens()
    }

    /// The trace's hit rate with an unbounded cache, at this block size.
    #[getter]
    fn upper_bound_hit_rate(&self) -> f64 {
        self.inner.upper_bound().hit_rate()
    }

    /// Replays the trace once and returns the report as a dict.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (device_bytes, policy = None, eviction = None, *, host_bytes = None, disk_bytes = None, remote_bytes = None, prefill_tokens_per_s = None, decode_tokens_per_s = None, host_gbps = None, disk_gbps = None, remote_gbps = None, disk_latency_ms = None, remote_latency_ms = None, load_policy = None, progress = None))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        device_bytes: &Bound<'py, PyAny>,
        policy: Option<&Bound<'py, PyAny>>,
        eviction: Option<&Bound<'py, PyAny>>,
        host_bytes: Option<&Bound<'py, PyAny>>,
        disk_bytes: Option<&Bound<'py, PyAny>>,
        remote_bytes: Option<&Bound<'py, PyAny>>,
        prefill_tokens_per_s: Option<&Bound<'py, PyAny>>,
        decode_tokens_per_s: Option<&Bound<'py, PyAny>>,
        host_gbps: Option<&Bound<'py, PyAny>>,
        disk_gbps: Option<&Bound<'py, PyAny>>,
        remote_gbps: Option<&Bound<'py, PyAny>>,
        disk_latency_ms: Option<&Bound<'py, PyAny>>,
        remote_latency_ms: Option<&Bound<'py, PyAny>>,
        load_policy: Option<&Bound<'py, PyAny>>,
        progress: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (policy, cfg) = replay_config(
            policy,
            eviction,
            device_bytes,
            [host_bytes, disk_bytes, remote_bytes],
            [prefill_tokens_per_s, decode_tokens_per_s],
            LoadArgs {
                gbps: [host_gbps, disk_gbps, remote_gbps],
                latency_ms: [disk_latency_ms, remote_latency_ms],
                policy: opt_text(load_policy, "load_policy")?,
            },
        )?;
        let progress = opt_callable(progress, "progress")?;
        let r = with_progress(py, progress, |p| self.inner.run(&cfg, &policy, p))?;
        report_dict(py, &r)
    }

    /// Replays the trace over a fleet of `instances` instances behind `router` ("round-robin",
    /// "least-loaded", "prefix" or "prefix-naive") and returns the report as a dict (see
    /// `fleet_dict`). Device, host and disk budgets are per instance; the remote budget is the
    /// shared store's; the prefill rate is the whole fleet's.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (device_bytes, policy = None, eviction = None, *, instances, router, host_bytes = None, disk_bytes = None, remote_bytes = None, prefill_tokens_per_s = None, decode_tokens_per_s = None, host_gbps = None, disk_gbps = None, remote_gbps = None, disk_latency_ms = None, remote_latency_ms = None, load_policy = None, write_through = None, overlap_weight = None, progress = None))]
    fn run_fleet<'py>(
        &self,
        py: Python<'py>,
        device_bytes: &Bound<'py, PyAny>,
        policy: Option<&Bound<'py, PyAny>>,
        eviction: Option<&Bound<'py, PyAny>>,
        instances: &Bound<'py, PyAny>,
        router: &Bound<'py, PyAny>,
        host_bytes: Option<&Bound<'py, PyAny>>,
        disk_bytes: Option<&Bound<'py, PyAny>>,
        remote_bytes: Option<&Bound<'py, PyAny>>,
        prefill_tokens_per_s: Option<&Bound<'py, PyAny>>,
        decode_tokens_per_s: Option<&Bound<'py, PyAny>>,
        host_gbps: Option<&Bound<'py, PyAny>>,
        disk_gbps: Option<&Bound<'py, PyAny>>,
        remote_gbps: Option<&Bound<'py, PyAny>>,
        disk_latency_ms: Option<&Bound<'py, PyAny>>,
        remote_latency_ms: Option<&Bound<'py, PyAny>>,
        load_policy: Option<&Bound<'py, PyAny>>,
        write_through: Option<&Bound<'py, PyAny>>,
        overlap_weight: Option<&Bound<'py, PyAny>>,
        progress: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let (policy, cfg) = replay_config(
            policy,
            eviction,
            device_bytes,
            [host_bytes, disk_bytes, remote_bytes],
            [prefill_tokens_per_s, decode_tokens_per_s],
            LoadArgs {
                gbps: [host_gbps, disk_gbps, remote_gbps],
                latency_ms: [disk_latency_ms, remote_latency_ms],
                policy: opt_text(load_policy, "load_policy")?,
            },
        )?;
        let n = non_negative(instances, "instances")?;
        let router = RouterKind::parse(&text(router, "router")?).py()?;
        let mut fleet = FleetConfig::new(u32::try_from(n).unwrap_or(u32::MAX), router);
        if let Some(o) = write_through.filter(|o| !o.is_none()) {
            fleet.write_through = convert::flag(Some(o), "write_through")?;
        }
        if let Some(o) = overlap_weight.filter(|o| !o.is_none()) {
            fleet.overlap_weight = number(o, "overlap_weight")?;
        }
        fleet.validate().py()?;
        let progress = opt_callable(progress, "progress")?;
        let label = format!("{policy}, {} x{n}", router.name());
        let r = with_progress(py, progress, |p| {
            self.inner.run_fleet(&cfg, &fleet, &label, p)
        })?;
        fleet_dict(py, &r)
    }

    /// The smallest device budget at which `policy` reaches `target_hit_rate`, searched from
    /// `start_bytes` by doubling then bisection to `rel_tol`. Returns
    /// `{"budget_bytes": int | None, "replays": int, "report": dict}`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (target_hit_rate, start_bytes, policy = None, eviction = None, *, rel_tol = None, prefill_tokens_per_s = None, decode_tokens_per_s = None, progress = None))]
    fn budget_to_match<'py>(
        &self,
        py: Python<'py>,
        target_hit_rate: &Bound<'py, PyAny>,
        start_bytes: &Bound<'py, PyAny>,
        policy: Option<&Bound<'py, PyAny>>,
        eviction: Option<&Bound<'py, PyAny>>,
        rel_tol: Option<&Bound<'py, PyAny>>,
        prefill_tokens_per_s: Option<&Bound<'py, PyAny>>,
        decode_tokens_per_s: Option<&Bound<'py, PyAny>>,
        progress: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let target_hit_rate = number(target_hit_rate, "target_hit_rate")?;
        let rel_tol = match rel_tol.filter(|o| !o.is_none()) {
            Some(o) => number(o, "rel_tol")?,
            None => 0.02,
        };
        let policy = opt_text(policy, "policy")?.unwrap_or_else(|| "dense".into());
        let eviction = opt_text(eviction, "eviction")?.unwrap_or_else(|| "lru".into());
        let cfg = run_config(
            &policy,
            &eviction,
            start_bytes,
            [None, None, None],
            [prefill_tokens_per_s, decode_tokens_per_s],
        )?;
        let progress = opt_callable(progress, "progress")?;
        let m = with_progress(py, progress, |p| {
            self.inner
                .budget_to_match(&cfg, target_hit_rate, rel_tol, p)
        })?;
        let d = PyDict::new(py);
        d.set_item("budget_bytes", m.budget_bytes)?;
        d.set_item("replays", m.replays)?;
        d.set_item("report", report_dict(py, &m.report)?)?;
        Ok(d)
    }
}
