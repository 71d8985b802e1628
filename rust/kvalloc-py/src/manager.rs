//! `KVCacheManager`: the scheduler-facing API.

use std::sync::{Mutex, MutexGuard};

use kvalloc::tiers::{LowerCapacity, RemoteSetup, StoreSetup};
use kvalloc::{Eviction, Extension, KVCacheManager, LoadPolicy, ManagerConfig, Policy};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::args::{req_arg, salt_arg, secret_arg, OwnedPrompt};
use crate::convert::{
    figures, flag, non_negative, number, opt_non_negative, opt_path, opt_positive, opt_text,
    positive, token_ids, type_name, uint_list,
};
use crate::errors::{self, invalid, IntoPyResult};
use crate::events::EventColumns;
use crate::latency::ExposedLoad;
use crate::retention::{clock_seconds, retention_arg, Columns};
use crate::spec::{block_tokens_arg, spec_arg, PyModelSpec};
use crate::step::{run_step, StepArgs, StepBuffers};
use crate::step_result::PyStepResult;

/// The SWA-aware KV cache manager an engine scheduler drives.
#[pyclass(frozen, name = "KVCacheManager", module = "kvalloc._core")]
pub struct PyKVCacheManager {
    inner: Mutex<KVCacheManager>,
    /// Its promotions' exposed load time (see `latency`).
    exposed: ExposedLoad,
    spec: Py<PyModelSpec>,
    /// `step`'s vectors, kept for the next call (None while a step has them).
    step_buffers: Mutex<Option<Box<StepBuffers>>>,
}

impl PyKVCacheManager {
    pub(crate) fn lock(&self) -> PyResult<MutexGuard<'_, KVCacheManager>> {
        errors::lock(&self.inner, "manager")
    }
}

#[pymethods]
impl PyKVCacheManager {
    #[new]
    #[allow(clippy::too_many_arguments)] // mirrors the Python constructor's keyword arguments
    #[pyo3(signature = (spec, capacity_bytes, block_tokens = None, policy = None, eviction = None, checkpoint_interval = None, slab_bytes = None, *, host_bytes = None, disk_dir = None, disk_bytes = None, remote_url = None, remote_bytes = None, remote_username = None, remote_password = None, remote_prefix = None, remote_timeout_ms = None, remote_tls_ca = None, remote_tls_cert = None, remote_tls_key = None, write_through = None, watermark = None, prefault_bytes = None, secret = None, model_id = None, prefill_reads_cache = None, events = None, max_pinned_bytes = None, speculative_checkpoints = None, async_loads = None, load_policy = None, load_deadline_ms = None, prefill_tokens_per_second = None))]
    fn new(
        py: Python<'_>,
        spec: &Bound<'_, PyAny>,
        capacity_bytes: &Bound<'_, PyAny>,
        block_tokens: Option<&Bound<'_, PyAny>>,
        policy: Option<&Bound<'_, PyAny>>,
        eviction: Option<&Bound<'_, PyAny>>,
        checkpoint_interval: Option<&Bound<'_, PyAny>>,
        slab_bytes: Option<&Bound<'_, PyAny>>,
        host_bytes: Option<&Bound<'_, PyAny>>,
        disk_dir: Option<&Bound<'_, PyAny>>,
        disk_bytes: Option<&Bound<'_, PyAny>>,
        remote_url: Option<&Bound<'_, PyAny>>,
        remote_bytes: Option<&Bound<'_, PyAny>>,
        remote_username: Option<&Bound<'_, PyAny>>,
        remote_password: Option<&Bound<'_, PyAny>>,
        remote_prefix: Option<&Bound<'_, PyAny>>,
        remote_timeout_ms: Option<&Bound<'_, PyAny>>,
        remote_tls_ca: Option<&Bound<'_, PyAny>>,
        remote_tls_cert: Option<&Bound<'_, PyAny>>,
        remote_tls_key: Option<&Bound<'_, PyAny>>,
        write_through: Option<&Bound<'_, PyAny>>,
        watermark: Option<&Bound<'_, PyAny>>,
        prefault_bytes: Option<&Bound<'_, PyAny>>,
        secret: Option<&Bound<'_, PyAny>>,
        model_id: Option<&Bound<'_, PyAny>>,
        prefill_reads_cache: Option<&Bound<'_, PyAny>>,
        events: Option<&Bound<'_, PyAny>>,
        max_pinned_bytes: Option<&Bound<'_, PyAny>>,
        speculative_checkpoints: Option<&Bound<'_, PyAny>>,
        async_loads: Option<&Bound<'_, PyAny>>,
        load_policy: Option<&Bound<'_, PyAny>>,
        load_deadline_ms: Option<&Bound<'_, PyAny>>,
        prefill_tokens_per_second: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let spec = spec_arg(spec)?;
        let secret = secret_arg(secret)?;
        let model_id = opt_text(model_id, "model_id")?;
        if model_id.as_deref() == Some("") {
            return Err(invalid("model_id", "is empty; name the weights, or None"));
        }
        let write_through = flag(write_through, "write_through")?;
        let watermark = match watermark.filter(|w| !w.is_none()) {
            None => 0.0,
            Some(w) => w.extract::<f64>().map_err(|_| {
                invalid(
                    "watermark",
                    format!("expected a fraction of the capacity, got {}", type_name(w)),
                )
            })?,
        };
        if !(0.0..1.0).contains(&watermark) {
            return Err(invalid(
                "watermark",
                format!("{watermark} is not a fraction of the capacity in [0, 1)"),
            ));
        }
        let capacity = positive(capacity_bytes, "capacity_bytes")?;
        let eviction =
            Eviction::parse(&opt_text(eviction, "eviction")?.unwrap_or("value".into())).py()?;
        if eviction == Eviction::Oracle {
            // It reads the trace's future: only the simulator has one.
            return Err(invalid(
                "eviction",
                "\"oracle\" is the simulator's offline reference; a manager takes \"value\" or \"lru\"",
            ));
        }
        let config = ManagerConfig {
            block_tokens: block_tokens_arg(block_tokens)?,
            policy: Policy::parse(&opt_text(policy, "policy")?.unwrap_or("swa-aware".into()))
                .py()?,
            eviction,
            checkpoint_interval: opt_positive(checkpoint_interval, "checkpoint_interval")?,
            slab_bytes: opt_positive(slab_bytes, "slab_bytes")?,
            lower: LowerCapacity {
                host: opt_non_negative(host_bytes, "host_bytes")?,
                disk: opt_non_negative(disk_bytes, "disk_bytes")?,
                remote: opt_non_negative(remote_bytes, "remote_bytes")?,
            },
            write_through,
            admission_reserve_bytes: (capacity as f64 * watermark) as u64,
            prefault_bytes: match prefault_bytes.filter(|p| !p.is_none()) {
                Some(p) => non_negative(p, "prefault_bytes")?,
                None => ManagerConfig::default().prefault_bytes,
            },
            prefill_reads_cache: flag(prefill_reads_cache, "prefill_reads_cache")?,
            events: flag(events, "events")?,
            max_pinned_bytes: max_pinned_bytes
                .filter(|b| !b.is_none())
                .map(|b| non_negative(b, "max_pinned_bytes"))
                .transpose()?,
            speculative_checkpoints: flag(speculative_checkpoints, "speculative_checkpoints")?,
            async_loads: async_loads.is_none_or(|a| a.is_none())
                || flag(async_loads, "async_loads")?,
            load_policy: LoadPolicy::parse(
                &opt_text(load_policy, "load_policy")?.unwrap_or("decide".into()),
            )
            .py()?,
            load_deadline: match load_deadline_ms.filter(|d| !d.is_none()) {
                Some(d) => std::time::Duration::from_millis(non_negative(d, "load_deadline_ms")?),
                None => ManagerConfig::default().load_deadline,
            },
            load_cost: {
                let mut c = ManagerConfig::default().load_cost;
                if let Some(p) = prefill_tokens_per_second.filter(|p| !p.is_none()) {
                    c.prefill_tokens_per_second = number(p, "prefill_tokens_per_second")?;
                    if !(c.prefill_tokens_per_second.is_finite()
                        && c.prefill_tokens_per_second > 0.0)
                    {
                        return Err(invalid(
                            "prefill_tokens_per_second",
                            format!("{} is not a positive rate", c.prefill_tokens_per_second),
                        ));
                    }
                }
                c
            },
            ..ManagerConfig::default()
        };
        let remote_timeout = opt_positive(remote_timeout_ms, "remote_timeout_ms")?;
        let remote_tls_ca = opt_path(remote_tls_ca, "remote_tls_ca")?;
        let remote_tls_cert = opt_path(remote_tls_cert, "remote_tls_cert")?;
        let remote_tls_key = opt_path(remote_tls_key, "remote_tls_key")?;
        let remote = match opt_text(remote_url, "remote_url")? {
            Some(url) => Some(RemoteSetup {
                url,
                username: opt_text(remote_username, "remote_username")?,
                password: opt_text(remote_password, "remote_password")?,
                key_prefix: opt_text(remote_prefix, "remote_prefix")?,
                timeout: remote_timeout.map(std::time::Duration::from_millis),
                tls_ca: remote_tls_ca,
                tls_cert: remote_tls_cert,
                tls_key: remote_tls_key,
            }),
            None => {
                let transport = [
                    ("remote_timeout_ms", remote_timeout.is_some()),
                    ("remote_tls_ca", remote_tls_ca.is_some()),
                    ("remote_tls_cert", remote_tls_cert.is_some()),
                    ("remote_tls_key", remote_tls_key.is_some()),
                ];
                if let Some((what, _)) = transport.iter().find(|(_, given)| *given) {
                    return Err(invalid(what, "needs remote_url"));
                }
                None
            }
        };
        let stores = StoreSetup {
            disk_dir: opt_path(disk_dir, "disk_dir")?,
            remote,
            secret,
        };
        let mut core_spec = spec.get().inner.clone();
        if model_id.is_some() {
            core_spec.model_id = model_id;
        }
        let m = py
            .detach(|| KVCacheManager::with_setup(core_spec, capacity, config, stores))
            .py()?;
        Ok(PyKVCacheManager {
            inner: Mutex::new(m),
            exposed: ExposedLoad::default(),
            step_buffers: Mutex::new(None),
            spec: spec.clone().unbind(),
        })
    }

    /// Window-safe hit length in tokens for a prompt (token ids or `BlockHashes`); changes
    /// nothing.
    #[pyo3(signature = (tokens, salt = None))]
    fn match_prefix(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        let prompt = OwnedPrompt::extract(tokens)?;
        let salt = salt_arg(salt)?;
        py.detach(|| {
            self.lock()?
                .match_prefix(prompt.as_prompt(), salt.as_deref())
                .py()
        })
    }

    /// uint64 array: the chained hashes of a prompt's whole blocks (token ids or
    /// `BlockHashes`) under `salt`, as the KV events name them; changes nothing.
    #[pyo3(signature = (tokens, salt = None))]
    fn block_hashes<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        salt: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let prompt = OwnedPrompt::extract(tokens)?;
        let salt = salt_arg(salt)?;
        let hashes = py.detach(|| {
            self.lock()?
                .block_hashes(prompt.as_prompt(), salt.as_deref())
                .py()
        })?;
        Ok(PyArray1::from_vec(py, hashes))
    }

    /// Admits a request: returns the prompt tokens served from cache, or None when even
    /// eviction cannot make room. `max_tokens` schedules only that many prompt tokens now
    /// (chunked prefill; continue with `extend(req_id, n)`). Retention (the core's
    /// `Retention`): `priority`, `pin_tokens` for `pin_seconds`, `cache`.
    #[pyo3(signature = (req_id, tokens, salt = None, max_tokens = None, *, priority = None, pin_tokens = None, pin_seconds = None, cache = None))]
    #[allow(clippy::too_many_arguments)] // mirrors the Python method's keyword arguments
    fn admit(
        &self,
        py: Python<'_>,
        req_id: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
        max_tokens: Option<&Bound<'_, PyAny>>,
        priority: Option<&Bound<'_, PyAny>>,
        pin_tokens: Option<&Bound<'_, PyAny>>,
        pin_seconds: Option<&Bound<'_, PyAny>>,
        cache: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Option<u64>> {
        let req = req_arg(req_id)?;
        let prompt = OwnedPrompt::extract(tokens)?;
        let salt = salt_arg(salt)?;
        let max_tokens = opt_positive(max_tokens, "max_tokens")?;
        let retention = retention_arg(priority, pin_tokens, pin_seconds, cache)?;
        py.detach(|| {
            let mut m = self.lock()?;
            let hit = m.admit_with_retention(
                req,
                prompt.as_prompt(),
                salt.as_deref(),
                max_tokens,
                retention,
            );
            self.exposed.add(&m);
            hit.py()
        })
    }

    /// Appends tokens to a running request: an array of token ids (decode), or an int count
    /// (continue a chunked prefill; for `BlockHashes` requests also opaque output tokens).
    /// Returns False, changing nothing, when there is no room.
    fn extend(
        &self,
        py: Python<'_>,
        req_id: &Bound<'_, PyAny>,
        tokens: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let req = req_arg(req_id)?;
        if tokens.extract::<i128>().is_ok() {
            let n = non_negative(tokens, "tokens")?;
            return py.detach(|| self.lock()?.extend(req, Extension::Count(n)).py());
        }
        let t = token_ids(tokens, "tokens")?;
        let work = || self.lock()?.extend(req, Extension::Tokens(&t)).py();
        // A decode step's few tokens cost less than releasing the GIL.
        if t.len() > 64 {
            py.detach(work)
        } else {
            work()
        }
    }

    /// The request's prompt and output enter the prefix cache; its other blocks are freed.
    fn finish(&self, py: Python<'_>, req_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let req = req_arg(req_id)?;
        py.detach(|| self.lock()?.finish(req).py())
    }

    /// Drops a request; nothing of it stays in the cache.
    fn abort(&self, py: Python<'_>, req_id: &Bound<'_, PyAny>) -> PyResult<()> {
        let req = req_arg(req_id)?;
        py.detach(|| self.lock()?.abort(req).py())
    }

    /// Page indices (int32) of the request's blocks in group `group` of `spec.groups`, one per
    /// block of its scheduled tokens; `kvalloc.NULL_PAGE` (-1) where it holds no block.
    fn block_table<'py>(
        &self,
        py: Python<'py>,
        req_id: &Bound<'py, PyAny>,
        group: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i32>>> {
        let req = req_arg(req_id)?;
        let g = non_negative(group, "group")? as usize;
        let t = self.lock()?.block_table(req, g).py()?;
        Ok(PyArray1::from_vec(py, t))
    }

    /// Block tables of many running requests in one call, for group `group`: row i holds
    /// `block_table(req_ids[i], group)`. Without `out`, a new 2D int32 array as wide as the
    /// longest table, padded with `NULL_PAGE`. With `out` (a C-contiguous 2D int32 array with a
    /// row per request, as wide as each table: the engine's own block-table array), the rows'
    /// first entries are written in place, the rest of each row is left as it was, and `out`
    /// is returned. With `group=None`, every group's at once: a tuple with one array per group
    /// (and `out`, if given, a sequence of one array per group). With `start` (an int, or one
    /// per request), only the blocks from `start[i]` on are read (those an engine that keeps its
    /// own tables does not have yet): a new array holds them left-aligned, while `out` gets them
    /// at their own positions (columns `start[i]` onward), so an engine's table receives only
    /// its new entries.
    #[pyo3(signature = (req_ids, group = None, out = None, start = None))]
    fn block_tables<'py>(
        &self,
        py: Python<'py>,
        req_ids: &Bound<'py, PyAny>,
        group: Option<&Bound<'py, PyAny>>,
        out: Option<&Bound<'py, PyAny>>,
        start: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let ids = uint_list(req_ids, "req_ids")?;
        let starts = Starts::extract(start, ids.len())?;
        let m = self.lock()?;
        // Every id, start, group and length is checked before anything is written. `width`:
        // the longest read (a new array's width); `span`: the furthest block (`out`'s).
        let (mut width, mut span) = (0, 0);
        for (k, &id) in ids.iter().enumerate() {
            let len = m.block_table_len(id).py()?;
            let from = starts.at(k);
            if from > len {
                return Err(invalid(
                    "start",
                    format!("request {id} holds {len} blocks; block {from} is past them"),
                ));
            }
            width = width.max(len - from);
            span = span.max(len);
        }
        let groups = m.spec().groups.len();
        let out = out.filter(|o| !o.is_none());
        let tables = Tables {
            m: &m,
            ids: &ids,
            starts: &starts,
            width,
        };
        match group.filter(|g| !g.is_none()) {
            Some(group) => {
                let g = non_negative(group, "group")? as usize;
                if g >= groups {
                    return Err(invalid(
                        "group",
                        format!("{g} is out of range: the model has {groups} groups"),
                    ));
                }
                let out = out.map(|o| table_out(o, ids.len(), span)).transpose()?;
                Ok(tables.fill(py, g, out)?.into_any())
            }
            None => {
                let outs: Vec<Option<Bound<'py, PyArray2<i32>>>> = match out {
                    Some(o) => {
                        let list: Vec<Bound<'py, PyAny>> = o.extract().map_err(|_| {
                            invalid("out", "with group=None, a sequence of one array per group")
                        })?;
                        if list.len() != groups {
                            return Err(invalid(
                                "out",
                                format!("{} arrays for {groups} groups", list.len()),
                            ));
                        }
                        list.iter()
                            .map(|a| table_out(a, ids.len(), span).map(Some))
                            .collect::<PyResult<_>>()?
                    }
                    None => vec![None; groups],
                };
                let arrays = outs
                    .into_iter()
                    .enumerate()
                    .map(|(g, o)| tables.fill(py, g, o))
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(PyTuple::new(py, arrays)?.into_any())
            }
        }
    }

    /// Tokens scheduled for a running request.
    fn num_tokens(&self, req_id: &Bound<'_, PyAny>) -> PyResult<u64> {
        let req = req_arg(req_id)?;
        self.lock()?.num_tokens(req).py()
    }

    fn __contains__(&self, req_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(match non_negative(req_id, "req_id") {
            Ok(r) => self.lock()?.is_running(r),
            Err(_) => false,
        })
    }

    /// One scheduler step in one call, with the GIL released: finishes and aborts first, then
    /// extensions, then admissions. Every id is checked before anything changes.
    ///
    /// - `finish`, `abort`: request ids (list or integer array);
    /// - `extend_ids` with `extend_tokens` (flat int32/int64 token ids) and `extend_lens`
    ///   (tokens per request; default 1 each), or with `extend_counts` (counts);
    /// - `admit`: a list of `(req_id, tokens[, salt[, max_tokens]])` tuples, where tokens may
    ///   be a `BlockHashes` and `max_tokens` schedules only that many prompt tokens now (chunked
    ///   prefill, as in `admit`); and/or, cheaper for many prompts, `admit_ids` with
    ///   `admit_tokens` (all prompts' token ids, concatenated) and `admit_lens`. Flat
    ///   admissions come after the listed ones.
    ///
    /// - `fcfs`: first come, first served: admissions stop at the first that does not fit (the
    ///   rest are not attempted: a queue whose head waits costs one lookup per step);
    /// - `admit_if_extended`: admit only if every extension fit, so that a scheduler that
    ///   preempts admits nothing new in that step and decode and admissions share one call.
    /// - `admit_priority`, `admit_pin_tokens`, `admit_pin_seconds`, `admit_cache`: each
    ///   admission's retention (as `admit`'s keywords), one value for all or one per admission
    ///   (the listed ones, then the flat ones).
    ///
    /// Returns a `StepResult`: int64 hits per admission (-1 where it did not fit, -2 where it
    /// was not attempted), bools per extension, and their counts.
    #[pyo3(signature = (finish = None, abort = None, extend_ids = None, extend_tokens = None, extend_lens = None, extend_counts = None, admit = None, admit_ids = None, admit_tokens = None, admit_lens = None, fcfs = None, admit_if_extended = None, admit_priority = None, admit_pin_tokens = None, admit_pin_seconds = None, admit_cache = None))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        finish: Option<&Bound<'py, PyAny>>,
        abort: Option<&Bound<'py, PyAny>>,
        extend_ids: Option<&Bound<'py, PyAny>>,
        extend_tokens: Option<&Bound<'py, PyAny>>,
        extend_lens: Option<&Bound<'py, PyAny>>,
        extend_counts: Option<&Bound<'py, PyAny>>,
        admit: Option<&Bound<'py, PyAny>>,
        admit_ids: Option<&Bound<'py, PyAny>>,
        admit_tokens: Option<&Bound<'py, PyAny>>,
        admit_lens: Option<&Bound<'py, PyAny>>,
        fcfs: Option<&Bound<'py, PyAny>>,
        admit_if_extended: Option<&Bound<'py, PyAny>>,
        admit_priority: Option<&Bound<'py, PyAny>>,
        admit_pin_tokens: Option<&Bound<'py, PyAny>>,
        admit_pin_seconds: Option<&Bound<'py, PyAny>>,
        admit_cache: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<PyStepResult> {
        let args = StepArgs {
            finish,
            abort,
            extend_ids,
            extend_tokens,
            extend_lens,
            extend_counts,
            admit,
            admit_ids,
            admit_tokens,
            admit_lens,
            fcfs: flag(fcfs, "fcfs")?,
            admit_if_extended: flag(admit_if_extended, "admit_if_extended")?,
            retention: Columns {
                priority: admit_priority,
                pin_tokens: admit_pin_tokens,
                pin_seconds: admit_pin_seconds,
                cache: admit_cache,
            },
        };
        // The last step's vectors (a new set while another thread's step holds them).
        let mut buf = self
            .step_buffers
            .lock()
            .ok()
            .and_then(|mut b| b.take())
            .unwrap_or_default();
        let res = run_step(py, &self.inner, &self.exposed, &args, &mut buf);
        buf.clear();
        if let Ok(mut b) = self.step_buffers.lock() {
            *b = Some(buf);
        }
        res
    }

    /// Accounting: per-group blocks (running / cached / free / tombstones), checkpoints, hit
    /// and miss tokens, evictions by cause, bytes and padding waste.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock()?.stats();
        let d = figures(
            py,
            &[
                ("running_requests", s.running_requests),
                ("cached_blocks", s.cached_blocks),
                ("checkpoints", s.checkpoints),
                ("hit_tokens", s.hit_tokens),
                ("miss_tokens", s.miss_tokens),
                ("admissions_refused", s.admissions_refused),
                ("extensions_refused", s.extensions_refused),
                ("bytes_in_use", s.bytes_in_use),
                ("capacity_bytes", s.capacity_bytes),
                ("padding_waste_bytes", s.padding_waste_bytes),
                ("pinned_bytes", s.pinned_bytes),
                ("pins", s.pins),
                ("pins_clipped", s.pins_clipped),
            ],
        )?;
        let groups = PyList::empty(py);
        for g in &s.groups {
            groups.append(figures(
                py,
                &[
                    ("running", g.running),
                    ("cached", g.cached),
                    ("free", g.free),
                    ("tombstones", g.tombstones),
                ],
            )?)?;
        }
        d.set_item("groups", groups)?;
        let evictions = figures(
            py,
            &[
                ("leaf", s.evicted_leaves),
                ("checkpoint", s.evicted_checkpoints),
                ("abort_blocks", s.aborted_blocks),
                ("window_released_blocks", s.window_released_blocks),
            ],
        )?;
        d.set_item("evictions", evictions)?;
        let kinds = PyDict::new(py);
        for k in &s.checkpoint_kinds {
            kinds.set_item(
                k.kind.name(),
                figures(py, &[("placed", k.placed), ("resumed", k.resumed)])?,
            )?;
        }
        d.set_item("checkpoint_kinds", kinds)?;
        let tiers = PyDict::new(py);
        for t in &s.tiers {
            let c = t.counters;
            let td = figures(
                py,
                &[
                    ("capacity_bytes", t.capacity_bytes),
                    ("used_bytes", t.used_bytes),
                    ("records", t.records),
                    ("promoted_tokens", t.promoted_tokens),
                    ("bytes_written", c.bytes_written),
                    ("full_bytes_written", c.full_bytes_written),
                    ("bytes_read", c.bytes_read),
                    ("records_in", c.records_in),
                    ("evicted", c.evicted),
                    ("write_failures", c.write_failures),
                    ("read_failures", c.read_failures),
                ],
            )?;
            td.set_item("real", t.real)?;
            if let Some(sc) = t.store {
                td.set_item(
                    "store",
                    figures(
                        py,
                        &[
                            ("puts", sc.puts),
                            ("gets", sc.gets),
                            ("bytes_written", sc.bytes_written),
                            ("bytes_read", sc.bytes_read),
                            ("checksum_failures", sc.checksum_failures),
                            ("writes_skipped_full", sc.writes_skipped_full),
                            ("unavailable", sc.unavailable),
                            ("timeouts", sc.timeouts),
                            ("io_errors", sc.io_errors),
                        ],
                    )?,
                )?;
            }
            tiers.set_item(t.tier.name(), td)?;
        }
        d.set_item("tiers", tiers)?;
        d.set_item("exposed_load_seconds", self.exposed.seconds())?;
        d.set_item("promotion_failures", s.promotion_failures)?;
        d.set_item("loads_in_flight", s.loads_in_flight)?;
        let (ls, est, waiting) = {
            let m = self.lock()?;
            (m.load_stats(), m.load_estimates(), m.num_waiting())
        };
        let loads = figures(
            py,
            &[
                ("taken", ls.taken),
                ("split", ls.split),
                ("declined", ls.declined),
                ("declined_tokens", ls.declined_tokens),
                ("started", ls.started),
                ("verified", ls.verified),
                ("failed", ls.failed),
                ("timed_out", ls.timed_out),
                ("failed_records", ls.failed_records),
                ("waits", ls.waits),
                ("waiting_requests", waiting as u64),
            ],
        )?;
        loads.set_item("load_seconds", ls.load_seconds)?;
        let bw = PyDict::new(py);
        for (name, b) in ["host", "disk", "remote"].iter().zip(est.bandwidth) {
            bw.set_item(name, b)?;
        }
        loads.set_item("bandwidth_bytes_per_second", bw)?;
        loads.set_item("prefill_tokens_per_second", est.prefill_tokens_per_second)?;
        d.set_item("loads", loads)?;
        Ok(d)
    }

    /// Whether the request waits for its KV to load from disk or the remote store (its
    /// admission answered None for that reason, not for memory): admit it again once
    /// `take_ready()` or a step's `ready` names it.
    fn waiting_for_kv(&self, req_id: &Bound<'_, PyAny>) -> PyResult<bool> {
        let req = req_arg(req_id)?;
        Ok(self.lock()?.waiting_for_kv(req))
    }

    /// Requests whose KV finished loading (or whose load failed or ran past its deadline:
    /// their hit shrinks to what verified) since the last call or step: admit them again.
    fn take_ready(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        py.detach(|| Ok(self.lock()?.take_ready()))
    }

    /// Blocks (the GIL and the manager's lock released) until the load the request waits on
    /// settles, or `timeout` seconds pass (None: up to the load's deadline); True if it is then
    /// ready to admit.
    #[pyo3(signature = (req_id, timeout = None))]
    fn wait_for_kv(
        &self,
        py: Python<'_>,
        req_id: &Bound<'_, PyAny>,
        timeout: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<bool> {
        let req = req_arg(req_id)?;
        let timeout = crate::tiers::timeout_arg(timeout)?;
        py.detach(|| {
            // Waits without the manager's lock: other threads keep stepping meanwhile.
            let wait = self.lock()?.kv_wait(req);
            if let Some(w) = wait {
                w.wait(timeout);
            }
            let mut m = self.lock()?;
            m.settle_loads();
            Ok(m.kv_ready(req))
        })
    }

    /// Reports that the engine computed `tokens` prompt tokens in `seconds`: the prefill rate
    /// the load-or-recompute decision weighs loads against.
    fn record_prefill(
        &self,
        tokens: &Bound<'_, PyAny>,
        seconds: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let tokens = non_negative(tokens, "tokens")?;
        let seconds = number(seconds, "seconds")?;
        self.lock()?.record_prefill(tokens, seconds).py()
    }

    /// Registers the engine's device buffer: a writable, C-contiguous numpy uint8 array of at
    /// least `capacity_bytes` (group g's page p starts at byte `p * block_bytes[g]`). From then on
    /// evictions write real bytes to the lower tiers and hits below L1 are copied back into it.
    /// Call it before the first admission.
    fn register_device(&self, py: Python<'_>, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
        let dev = crate::tiers::device_from_numpy(buffer)?;
        py.detach(|| self.lock()?.register_device(std::sync::Arc::new(dev)).py())
    }

    /// The loads a running request's hit waits for (promotions from host memory are copied
    /// into the device buffer in the background, sliding layers first, then full layers in
    /// order). Call `wait_layer(i)` before computing layer i.
    fn load_handle(&self, req_id: &Bound<'_, PyAny>) -> PyResult<crate::tiers::PyLoadHandle> {
        let req = req_arg(req_id)?;
        Ok(crate::tiers::PyLoadHandle {
            inner: self.lock()?.load_handle(req).py()?,
        })
    }

    /// Writes every cached block that has no lower copy into the lower tiers, keeping it
    /// cached: call it before a planned shutdown so a restart finds the cache on disk.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.lock()?.flush();
            Ok(())
        })
    }

    /// Blocks until every background load landed (tests, shutdown).
    fn wait_loads(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.lock()?.wait_loads();
            Ok(())
        })
    }

    /// Window-safe hit lengths in tokens at each level: `{"device": L1 alone, "host": L1 and
    /// host, "disk": ... and disk, "remote": ... and remote}`; changes nothing but may ask the
    /// remote store which blocks it holds.
    #[pyo3(signature = (tokens, salt = None))]
    fn match_prefix_tiers<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        salt: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let prompt = OwnedPrompt::extract(tokens)?;
        let salt = salt_arg(salt)?;
        let h = py.detach(|| {
            self.lock()?
                .match_prefix_tiers(prompt.as_prompt(), salt.as_deref())
                .py()
        })?;
        figures(
            py,
            &[
                ("device", h[0]),
                ("host", h[1]),
                ("disk", h[2]),
                ("remote", h[3]),
            ],
        )
    }

    /// Where each whole block of a prompt lives: a list of `(device_groups, tier, tier_groups)`
    /// per block, where the groups are bit masks over `spec.groups` and `tier` is "host",
    /// "disk", "remote" or None; it stops at the first block cached nowhere.
    #[pyo3(signature = (tokens, salt = None))]
    fn residency(
        &self,
        tokens: &Bound<'_, PyAny>,
        salt: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<(u16, Option<&'static str>, u16)>> {
        let prompt = OwnedPrompt::extract(tokens)?;
        let salt = salt_arg(salt)?;
        let r = self
            .lock()?
            .residency(prompt.as_prompt(), salt.as_deref())
            .py()?;
        Ok(r.iter()
            .map(|b| match b.lower {
                Some((t, g)) => (b.device_groups, Some(t.name()), g),
                None => (b.device_groups, None, 0),
            })
            .collect())
    }

    /// The KV cache events since the last call, as equal-length numpy columns (see
    /// `events::EventColumns`); empty when the manager was made without `events=True`.
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let events = self.lock()?.take_events();
        EventColumns::new(&events).into_dict(py)
    }

    /// `{"group": int32, "hash": uint64}` arrays of every block the prefix cache holds: what
    /// replaying every event gives.
    fn cached_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let blocks = self.lock()?.cached_blocks();
        let group: Vec<i32> = blocks.iter().map(|&(g, _)| g as i32).collect();
        let hash: Vec<u64> = blocks.iter().map(|&(_, h)| h).collect();
        let d = PyDict::new(py);
        d.set_item("group", PyArray1::from_vec(py, group))?;
        d.set_item("hash", PyArray1::from_vec(py, hash))?;
        Ok(d)
    }

    /// `{"hash": uint64, "block": int64}` arrays of every resume point the prefix cache holds,
    /// sorted by hash: what replaying the RESUMABLE and NOT_RESUMABLE events gives.
    fn resume_points<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let points = self.lock()?.resume_points();
        let hash: Vec<u64> = points.iter().map(|&(h, _)| h).collect();
        let block: Vec<i64> = points.iter().map(|&(_, b)| i64::from(b)).collect();
        let d = PyDict::new(py);
        d.set_item("hash", PyArray1::from_vec(py, hash))?;
        d.set_item("block", PyArray1::from_vec(py, block))?;
        Ok(d)
    }

    /// `{"tier": int8, "group": int32, "hash": uint64}` arrays of every block the lower tiers
    /// hold (tier 0 host, 1 disk, 2 remote): what replaying the TIER_STORED and TIER_REMOVED
    /// events gives.
    fn lower_blocks<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let blocks = self.lock()?.lower_blocks();
        let tier: Vec<i8> = blocks.iter().map(|&(t, _, _)| t as i8).collect();
        let group: Vec<i32> = blocks.iter().map(|&(_, g, _)| g as i32).collect();
        let hash: Vec<u64> = blocks.iter().map(|&(_, _, h)| h).collect();
        let d = PyDict::new(py);
        d.set_item("tier", PyArray1::from_vec(py, tier))?;
        d.set_item("group", PyArray1::from_vec(py, group))?;
        d.set_item("hash", PyArray1::from_vec(py, hash))?;
        Ok(d)
    }

    /// Empties the prefix cache when no request runs (True); False, changing nothing, while
    /// one does.
    fn reset_prefix_cache(&self, py: Python<'_>) -> PyResult<bool> {
        py.detach(|| Ok(self.lock()?.reset_prefix_cache()))
    }

    /// Drives the clock that times retention pins to `seconds` (from then on it moves only
    /// when driven; the first call may set any time, later ones not go back), releasing the
    /// pins expired by then.
    fn set_clock(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let now = clock_seconds(seconds)?;
        py.detach(|| self.lock()?.set_clock(now).py())
    }

    /// Drives the clock `seconds` forward (see `set_clock`).
    fn advance_clock(&self, py: Python<'_>, seconds: &Bound<'_, PyAny>) -> PyResult<()> {
        let by = clock_seconds(seconds)?;
        py.detach(|| self.lock()?.advance_clock(by).py())
    }

    /// The clock in seconds: wall time since the manager was made, or the time last driven.
    fn clock(&self) -> PyResult<f64> {
        Ok(self.lock()?.clock().as_secs_f64())
    }

    /// Checks every invariant; raises `InvariantError` naming the first violation.
    fn validate(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.lock()?.validate().py())
    }

    /// The model.
    #[getter]
    fn spec(&self, py: Python<'_>) -> Py<PyModelSpec> {
        self.spec.clone_ref(py)
    }
    #[getter]
    fn block_tokens(&self) -> PyResult<u32> {
        Ok(self.lock()?.config().block_tokens)
    }
    #[getter]
    fn policy(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.config().policy.name())
    }
    #[getter]
    fn eviction(&self) -> PyResult<&'static str> {
        Ok(self.lock()?.config().eviction.name())
    }
    #[getter]
    fn capacity_bytes(&self) -> PyResult<u64> {
        Ok(self.lock()?.arena().capacity_bytes())
    }
    /// Bytes an admission could have now: free plus evictable (held only by the cache).
    fn room_bytes(&self) -> PyResult<u64> {
        Ok(self.lock()?.room_bytes())
    }
    /// Pages in group `group`'s view of the arena: an engine's buffer for the group holds this
    /// many blocks (block tables index into it).
    fn num_pages(&self, group: &Bound<'_, PyAny>) -> PyResult<u64> {
        let g = non_negative(group, "group")? as usize;
        self.lock()?.arena().num_pages(g).py()
    }
    fn __repr__(&self) -> PyResult<String> {
        let m = self.lock()?;
        Ok(format!(
            "KVCacheManager(model={:?}, capacity_bytes={}, block_tokens={}, policy={:?}, eviction={:?})",
            m.spec().name,
            m.arena().capacity_bytes(),
            m.config().block_tokens,
            m.config().policy.name(),
            m.config().eviction.name()
        ))
    }
}

/// An engine's block-table array given as `out`: a 2D int32 array with at least `rows` rows of
/// at least `width` entries.
fn table_out<'py>(
    o: &Bound<'py, PyAny>,
    rows: usize,
    width: usize,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let arr = o.cast::<PyArray2<i32>>().map_err(|_| {
        invalid(
            "out",
            format!("expected a 2D int32 numpy array, got {}", type_name(o)),
        )
    })?;
    if arr.shape()[0] < rows || arr.shape()[1] < width {
        return Err(invalid(
            "out",
            format!(
                "shape {:?} for {rows} requests of up to {width} blocks",
                arr.shape()
            ),
        ));
    }
    if !arr.is_c_contiguous() {
        return Err(invalid("out", "must be C-contiguous"));
    }
    Ok(arr.clone())
}

/// Where each row of a `block_tables` read starts: one block for all, or one per request.
enum Starts {
    All(usize),
    Each(Vec<u64>),
}

impl Starts {
    fn extract(obj: Option<&Bound<'_, PyAny>>, rows: usize) -> PyResult<Self> {
        let Some(obj) = obj.filter(|o| !o.is_none()) else {
            return Ok(Starts::All(0));
        };
        if obj.is_instance_of::<pyo3::types::PyInt>() {
            return Ok(Starts::All(non_negative(obj, "start")? as usize));
        }
        let each = uint_list(obj, "start")?;
        if each.len() != rows {
            return Err(invalid(
                "start",
                format!("{} starts for {rows} req_ids", each.len()),
            ));
        }
        Ok(Starts::Each(each))
    }

    fn at(&self, row: usize) -> usize {
        match self {
            Starts::All(s) => *s,
            Starts::Each(v) => v[row] as usize,
        }
    }
}

/// One checked `block_tables` read: the requests, where each row starts, the rows' width.
struct Tables<'a> {
    m: &'a KVCacheManager,
    ids: &'a [u64],
    starts: &'a Starts,
    width: usize,
}

impl Tables<'_> {
    /// Writes group `g`'s rows into `out` (each read at its own columns), or into a new array
    /// `width` wide (left-aligned) padded with `NULL_PAGE`.
    fn fill<'py>(
        &self,
        py: Python<'py>,
        g: usize,
        out: Option<Bound<'py, PyArray2<i32>>>,
    ) -> PyResult<Bound<'py, PyArray2<i32>>> {
        // `at_start`: write row k from column start[k] (into `out`) rather than from column 0.
        let write = |cells: &mut [i32], width: usize, at_start: bool| -> PyResult<()> {
            for (k, &id) in self.ids.iter().enumerate() {
                let from = self.starts.at(k);
                let first = k * width + if at_start { from } else { 0 };
                let row = &mut cells[first..(k + 1) * width];
                self.m.block_table_range_into(id, g, from, row).py()?;
            }
            Ok(())
        };
        match out {
            Some(arr) => {
                let mut rw = arr
                    .try_readwrite()
                    .map_err(|_| invalid("out", "the array is borrowed elsewhere"))?;
                let cells = rw
                    .as_slice_mut()
                    .map_err(|_| invalid("out", "must be C-contiguous"))?;
                write(cells, arr.shape()[1], true)?;
                drop(rw);
                Ok(arr)
            }
            None => {
                // SAFETY: every cell of the new array is written (filled right below) before
                // it is read, and nothing else refers to it yet, so no borrow tracking is
                // needed (it costs more than the copy for small tables).
                let a = unsafe { PyArray2::<i32>::new(py, [self.ids.len(), self.width], false) };
                let cells = unsafe { a.as_slice_mut() }.expect("a new array is contiguous");
                cells.fill(kvalloc::NULL_PAGE);
                write(cells, self.width, false)?;
                Ok(a)
            }
        }
    }
}
