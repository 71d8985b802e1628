//! Retention arguments (see the core's `manager::retention`): `admit`'s keywords, `step`'s
//! per-admission columns, and the clock's seconds.

use std::time::Duration;

use kvalloc::{Retention, MAX_PRIORITY};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyString};

use crate::convert::{flag, non_negative, number, type_name};
use crate::errors::invalid;

/// A retention priority: an int in `[-MAX_PRIORITY, MAX_PRIORITY]`.
fn priority(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<i8> {
    if obj.is_instance_of::<PyBool>() {
        return Err(invalid(what, "expected an integer, got bool"));
    }
    let v: i128 = obj
        .extract()
        .map_err(|_| invalid(what, format!("expected an integer, got {}", type_name(obj))))?;
    let max = i128::from(MAX_PRIORITY);
    if !(-max..=max).contains(&v) {
        return Err(invalid(
            what,
            format!("{v} is outside [-{MAX_PRIORITY}, {MAX_PRIORITY}]"),
        ));
    }
    Ok(v as i8)
}

/// A duration in seconds: positive, `inf` for "until reset".
fn pin_seconds(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Duration> {
    let s = number(obj, what)?;
    if s.is_nan() || s <= 0.0 {
        return Err(invalid(
            what,
            format!("must be positive (inf: until reset), got {s}"),
        ));
    }
    Ok(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

/// A point or a span on the clock, in seconds: finite and not negative.
pub(crate) fn clock_seconds(obj: &Bound<'_, PyAny>) -> PyResult<Duration> {
    let s = number(obj, "seconds")?;
    Duration::try_from_secs_f64(s)
        .map_err(|_| invalid("seconds", format!("expected finite seconds >= 0, got {s}")))
}

/// Whether to insert into the cache: None is yes.
fn cache(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<bool> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(true),
        some => flag(some, what),
    }
}

/// An optional argument that is not Python None.
fn given<'a, 'py>(obj: Option<&'a Bound<'py, PyAny>>) -> Option<&'a Bound<'py, PyAny>> {
    obj.filter(|o| !o.is_none())
}

/// One request's retention from `admit`'s keywords (None: the default of each).
pub(crate) fn retention_arg(
    prio: Option<&Bound<'_, PyAny>>,
    pin_tokens: Option<&Bound<'_, PyAny>>,
    secs: Option<&Bound<'_, PyAny>>,
    cache_obj: Option<&Bound<'_, PyAny>>,
) -> PyResult<Retention> {
    let r = Retention {
        priority: given(prio)
            .map(|o| priority(o, "priority"))
            .transpose()?
            .unwrap_or(0),
        pin_tokens: given(pin_tokens)
            .map(|o| non_negative(o, "pin_tokens"))
            .transpose()?
            .unwrap_or(0),
        pin_for: given(secs)
            .map(|o| pin_seconds(o, "pin_seconds"))
            .transpose()?
            .unwrap_or(Duration::ZERO),
        cache: cache(cache_obj, "cache")?,
    };
    r.check().map_err(crate::errors::to_py)?;
    Ok(r)
}

/// `step`'s retention columns, as Python gave them.
pub(crate) struct Columns<'a, 'py> {
    pub priority: Option<&'a Bound<'py, PyAny>>,
    pub pin_tokens: Option<&'a Bound<'py, PyAny>>,
    pub pin_seconds: Option<&'a Bound<'py, PyAny>>,
    pub cache: Option<&'a Bound<'py, PyAny>>,
}

impl Columns<'_, '_> {
    /// Fills `out` with one retention per admission (`n` of them: the listed ones, then the
    /// flat ones), or leaves it empty when no column is given (every admission's default).
    /// Each column is one value for all, or a sequence of one per admission. The core checks
    /// each retention before the step changes anything.
    pub(crate) fn fill(&self, n: usize, out: &mut Vec<Retention>) -> PyResult<()> {
        if ![self.priority, self.pin_tokens, self.pin_seconds, self.cache]
            .into_iter()
            .any(|o| given(o).is_some())
        {
            return Ok(());
        }
        out.clear();
        out.resize(n, Retention::default());
        column(self.priority, "admit_priority", out, |r, o| {
            r.priority = priority(o, "admit_priority")?;
            Ok(())
        })?;
        column(self.pin_tokens, "admit_pin_tokens", out, |r, o| {
            r.pin_tokens = non_negative(o, "admit_pin_tokens")?;
            Ok(())
        })?;
        column(self.pin_seconds, "admit_pin_seconds", out, |r, o| {
            r.pin_for = pin_seconds(o, "admit_pin_seconds")?;
            Ok(())
        })?;
        column(self.cache, "admit_cache", out, |r, o| {
            r.cache = cache(Some(o), "admit_cache")?;
            Ok(())
        })
    }
}

/// Applies one column to every admission's retention: `set` with the one value for all (a
/// scalar), or with each entry of a sequence as long as `out`.
fn column(
    obj: Option<&Bound<'_, PyAny>>,
    what: &str,
    out: &mut [Retention],
    set: impl Fn(&mut Retention, &Bound<'_, PyAny>) -> PyResult<()>,
) -> PyResult<()> {
    let Some(obj) = given(obj) else {
        return Ok(());
    };
    if obj.cast::<PyString>().is_ok() || obj.cast::<PyBytes>().is_ok() {
        return Err(invalid(
            what,
            format!(
                "expected a value or one per admission, got {}",
                type_name(obj)
            ),
        ));
    }
    let Ok(items) = obj.try_iter() else {
        for r in out.iter_mut() {
            set(r, obj)?;
        }
        return Ok(());
    };
    let (n, mut k) = (out.len(), 0);
    for item in items {
        let item = item.map_err(|_| invalid(what, "could not be iterated"))?;
        let r = out
            .get_mut(k)
            .ok_or_else(|| invalid(what, format!("more values than the {n} admissions")))?;
        set(r, &item)?;
        k += 1;
    }
    if k != n {
        return Err(invalid(
            what,
            format!("{k} values for {} admissions", out.len()),
        ));
    }
    Ok(())
}
