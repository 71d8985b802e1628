//! `KVCacheManager.step`: one scheduler step's arguments, converted while attached into
//! vectors the manager keeps from step to step, then run by the core with the GIL released.
//!
//! A decode step's own work is a few tens of microseconds, so what the call costs around it
//! counts: each conversion appends to a kept vector instead of allocating, and the step's
//! outcome is written into a kept `StepOutcome`.

use std::sync::Mutex;

use kvalloc::{Admission, Decode, Extension, KVCacheManager, Prompt, Retention, Step, StepOutcome};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::args::{req_arg, salt_arg, OwnedAdmission, OwnedPrompt};
use crate::convert::{exact_tokens, opt_positive, token_ids_into, type_name, uint_list_into};
use crate::errors::{self, invalid, IntoPyResult};
use crate::latency::ExposedLoad;
use crate::retention::Columns;
use crate::step_result::PyStepResult;

/// `step`'s arguments as Python gave them (flags already read).
pub(crate) struct StepArgs<'a, 'py> {
    pub finish: Option<&'a Bound<'py, PyAny>>,
    pub abort: Option<&'a Bound<'py, PyAny>>,
    pub extend_ids: Option<&'a Bound<'py, PyAny>>,
    pub extend_tokens: Option<&'a Bound<'py, PyAny>>,
    pub extend_lens: Option<&'a Bound<'py, PyAny>>,
    pub extend_counts: Option<&'a Bound<'py, PyAny>>,
    pub admit: Option<&'a Bound<'py, PyAny>>,
    pub admit_ids: Option<&'a Bound<'py, PyAny>>,
    pub admit_tokens: Option<&'a Bound<'py, PyAny>>,
    pub admit_lens: Option<&'a Bound<'py, PyAny>>,
    pub fcfs: bool,
    pub admit_if_extended: bool,
    pub retention: Columns<'a, 'py>,
}

/// The vectors a step's arguments are converted into, kept by the manager between steps.
/// Empty between calls (`clear` keeps their capacity).
#[derive(Default)]
pub(crate) struct StepBuffers {
    finish: Vec<u64>,
    abort: Vec<u64>,
    ext_ids: Vec<u64>,
    ext_tokens: Vec<i64>,
    ext_lens: Vec<u64>,
    ext_counts: Vec<u64>,
    ext_spans: Vec<(usize, usize)>,
    flat_ids: Vec<u64>,
    flat_lens: Vec<u64>,
    flat_tokens: Vec<i64>,
    flat_spans: Vec<(usize, usize)>,
    /// One per admission when a retention column was given, else empty (defaults).
    retention: Vec<Retention>,
    outcome: StepOutcome,
}

/// Entries a kept vector keeps room for between steps: a burst (a prefill step's millions of
/// token ids) gives back what it took above this.
const KEEP: usize = 1 << 16;

/// Empties `v`, keeping at most [`KEEP`] entries of room.
fn empty<T>(v: &mut Vec<T>) {
    v.clear();
    v.shrink_to(KEEP);
}

impl StepBuffers {
    /// Empties every vector; a burst's room above [`KEEP`] goes back.
    pub fn clear(&mut self) {
        empty(&mut self.finish);
        empty(&mut self.abort);
        empty(&mut self.ext_ids);
        empty(&mut self.ext_tokens);
        empty(&mut self.ext_lens);
        empty(&mut self.ext_counts);
        empty(&mut self.ext_spans);
        empty(&mut self.flat_ids);
        empty(&mut self.flat_lens);
        empty(&mut self.flat_tokens);
        empty(&mut self.flat_spans);
        empty(&mut self.retention);
        empty(&mut self.outcome.refused);
        empty(&mut self.outcome.admitted);
        empty(&mut self.outcome.waiting);
        empty(&mut self.outcome.ready);
    }
}

/// Appends the ids in `obj` (None or Python None: nothing) to `out`.
fn ids_into(obj: Option<&Bound<'_, PyAny>>, what: &str, out: &mut Vec<u64>) -> PyResult<()> {
    match obj.filter(|o| !o.is_none()) {
        Some(o) => uint_list_into(o, what, out),
        None => Ok(()),
    }
}

/// The `admit` list: `(req_id, tokens[, salt[, max_tokens]])` tuples.
fn listed_admissions(admit: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<OwnedAdmission>> {
    let Some(a) = admit.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    let list = a.cast::<PyList>().map_err(|_| {
        invalid(
            "admit",
            "expected a list of (req_id, tokens[, salt[, max_tokens]]) tuples",
        )
    })?;
    let mut admits = Vec::with_capacity(list.len());
    for item in list.iter() {
        let t = item.cast::<PyTuple>().map_err(|_| {
            invalid(
                "admit",
                format!("each entry must be a tuple, got {}", type_name(&item)),
            )
        })?;
        if !(2..=4).contains(&t.len()) {
            return Err(invalid(
                "admit",
                "each entry is (req_id, tokens[, salt[, max_tokens]])",
            ));
        }
        let salt = if t.len() >= 3 {
            salt_arg(Some(&t.get_item(2)?))?
        } else {
            None
        };
        let max_tokens = if t.len() == 4 {
            opt_positive(Some(&t.get_item(3)?), "max_tokens")?
        } else {
            None
        };
        admits.push((
            req_arg(&t.get_item(0)?)?,
            OwnedPrompt::extract(&t.get_item(1)?)?,
            salt,
            max_tokens,
        ));
    }
    Ok(admits)
}

/// Checks that `lens` (one per id) add up to `n_tokens` and appends each one's
/// `(from, to)` in the flat token array to `out`. `names`: the ids', lengths' and tokens'
/// argument names, for errors.
fn spans_into(
    lens: &[u64],
    n_ids: usize,
    n_tokens: usize,
    [ids, lens_name, tokens]: [&str; 3],
    out: &mut Vec<(usize, usize)>,
) -> PyResult<()> {
    if lens.len() != n_ids {
        return Err(invalid(
            lens_name,
            format!("{} lengths for {n_ids} {ids}", lens.len()),
        ));
    }
    // Checked: lengths near 2^64 (uint64 arrays) must not wrap around to a matching sum.
    let total = lens.iter().try_fold(0u64, |a, &l| a.checked_add(l));
    if total != Some(n_tokens as u64) {
        let sum = total.map_or("more than 2^64".into(), |t| t.to_string());
        return Err(invalid(
            tokens,
            format!("{n_tokens} tokens, but {lens_name} adds up to {sum}"),
        ));
    }
    let mut at = 0usize;
    out.extend(lens.iter().map(|&l| {
        at += l as usize;
        (at - l as usize, at)
    }));
    Ok(())
}

/// One `step` call on the manager behind `manager`: converts `args` into `buf`, runs the core
/// step detached (its promotions priced into `exposed`), and returns its result.
pub(crate) fn run_step<'py>(
    py: Python<'py>,
    manager: &Mutex<KVCacheManager>,
    exposed: &ExposedLoad,
    args: &StepArgs<'_, 'py>,
    buf: &mut StepBuffers,
) -> PyResult<PyStepResult> {
    let (admits, exact) = convert_args(args, buf)?;
    let StepBuffers {
        finish,
        abort,
        ext_ids,
        ext_tokens: ext_token_ids,
        ext_lens,
        ext_counts,
        ext_spans,
        flat_ids,
        flat_lens,
        flat_tokens: flat_copied,
        flat_spans,
        retention,
        outcome,
    } = buf;
    let flat_tokens: &[i64] = exact.unwrap_or(flat_copied);
    spans_into(
        flat_lens,
        flat_ids.len(),
        flat_tokens.len(),
        ["admit_ids", "admit_lens", "admit_tokens"],
        flat_spans,
    )?;
    let has_tokens = args.extend_tokens.is_some_and(|o| !o.is_none());
    extension_spans(
        has_tokens,
        ext_ids,
        ext_token_ids,
        ext_lens,
        ext_counts,
        ext_spans,
    )?;
    let n_admits = admits.len() + flat_ids.len();
    args.retention.fill(n_admits, retention)?;
    let retention_of = |k: usize| retention.get(k).copied().unwrap_or_default();
    let one_token_each = has_tokens && ext_lens.is_empty();
    let (fcfs, admit_if_extended) = (args.fcfs, args.admit_if_extended);
    // The step's events, drained under the same lock (when the manager records them).
    let mut events = None;
    py.detach(|| {
        let mut step = Step {
            finish: std::mem::take(finish),
            abort: std::mem::take(abort),
            extend: Vec::new(),
            decode: Decode::default(),
            admit: Vec::with_capacity(n_admits),
            fcfs,
            admit_if_extended,
        };
        if one_token_each {
            // One token each (checked above): the columns as they are.
            step.decode = Decode {
                ids: ext_ids,
                tokens: ext_token_ids,
            };
        } else if has_tokens {
            step.extend.extend(
                ext_ids
                    .iter()
                    .zip(ext_spans.iter())
                    .map(|(&id, &(from, to))| (id, Extension::Tokens(&ext_token_ids[from..to]))),
            );
        } else {
            step.extend.extend(
                ext_ids
                    .iter()
                    .zip(ext_counts.iter())
                    .map(|(&id, &n)| (id, Extension::Count(n))),
            );
        }
        for (req, prompt, salt, max_tokens) in &admits {
            step.admit.push(Admission {
                req: *req,
                prompt: prompt.as_prompt(),
                salt: salt.as_deref(),
                max_tokens: *max_tokens,
                retention: retention_of(step.admit.len()),
            });
        }
        for (&req, &(from, to)) in flat_ids.iter().zip(flat_spans.iter()) {
            step.admit.push(Admission {
                retention: retention_of(step.admit.len()),
                ..Admission::new(req, Prompt::Tokens(&flat_tokens[from..to]))
            });
        }
        let res = errors::lock(manager, "manager").and_then(|mut m| {
            let res = m.step_into(&step, outcome);
            exposed.add(&m);
            if res.is_ok() && m.config().events {
                let mut batch = Vec::new();
                m.take_events_into(&mut batch);
                events = Some(batch);
            }
            res.py()
        });
        // The id vectors go back to the buffers.
        *finish = step.finish;
        *abort = step.abort;
        res
    })?;
    Ok(PyStepResult::new(outcome, n_admits, events))
}

/// Converts a step's arguments into `buf` while attached. Returns the listed admissions and
/// the flat admissions' token ids when numpy's own int64 array holds them (read in place;
/// anything else was copied into `buf`).
fn convert_args<'a>(
    args: &StepArgs<'a, '_>,
    buf: &mut StepBuffers,
) -> PyResult<(Vec<OwnedAdmission>, Option<&'a [i64]>)> {
    ids_into(args.finish, "finish", &mut buf.finish)?;
    ids_into(args.abort, "abort", &mut buf.abort)?;
    ids_into(args.extend_ids, "extend_ids", &mut buf.ext_ids)?;
    if let Some(t) = args.extend_tokens.filter(|o| !o.is_none()) {
        token_ids_into(t, "extend_tokens", &mut buf.ext_tokens)?;
    }
    ids_into(args.extend_lens, "extend_lens", &mut buf.ext_lens)?;
    ids_into(args.extend_counts, "extend_counts", &mut buf.ext_counts)?;
    let admits = listed_admissions(args.admit)?;
    // Admissions in flat form: ids, one token array, and each prompt's length (three
    // conversions, whatever the number of requests).
    ids_into(args.admit_ids, "admit_ids", &mut buf.flat_ids)?;
    ids_into(args.admit_lens, "admit_lens", &mut buf.flat_lens)?;
    let admit_tokens = args.admit_tokens.filter(|o| !o.is_none());
    // numpy's own int64 arrays are read in place (`exact_tokens`), without a copy or a
    // borrow: a step's prompts can be megabytes, even a few prompts' ids cost more to copy
    // than to read in place (`benches/step.py ab`), and rust-numpy's borrow tracking costs
    // more than the read. Anything else (int32, a subclass, a strided view, a list) is
    // converted into the kept vector.
    let exact = admit_tokens.and_then(exact_tokens);
    if let (Some(t), None) = (admit_tokens, exact) {
        token_ids_into(t, "admit_tokens", &mut buf.flat_tokens)?;
    }
    Ok((admits, exact))
}

/// Checks the extension columns against each other (tokens or counts, one per id or spanned
/// by lengths) and fills `spans` when lengths split the tokens.
fn extension_spans(
    has_tokens: bool,
    ids: &[u64],
    tokens: &[i64],
    lens: &[u64],
    counts: &[u64],
    spans: &mut Vec<(usize, usize)>,
) -> PyResult<()> {
    match (has_tokens, counts.is_empty()) {
        (true, false) => Err(invalid(
            "extend_counts",
            "give extend_tokens or extend_counts, not both",
        )),
        // One token each (the decode step): no lengths to check, no spans to build.
        (true, true) if lens.is_empty() => {
            if tokens.len() != ids.len() {
                return Err(invalid(
                    "extend_tokens",
                    format!(
                        "{} tokens for {} extend_ids (one each without extend_lens)",
                        tokens.len(),
                        ids.len()
                    ),
                ));
            }
            Ok(())
        }
        (true, true) => spans_into(
            lens,
            ids.len(),
            tokens.len(),
            ["extend_ids", "extend_lens", "extend_tokens"],
            spans,
        ),
        (false, false) => {
            if counts.len() != ids.len() {
                return Err(invalid(
                    "extend_counts",
                    format!("{} counts for {} ids", counts.len(), ids.len()),
                ));
            }
            Ok(())
        }
        (false, true) => {
            if !ids.is_empty() {
                return Err(invalid(
                    "extend_ids",
                    "give extend_tokens or extend_counts with extend_ids",
                ));
            }
            Ok(())
        }
    }
}
