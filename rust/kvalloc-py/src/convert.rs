//! Argument conversions with kvalloc's own error messages (the default pyo3 ones name Rust types).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::invalid;

/// A non-negative integer argument; negative values and non-integers are `InvalidArgumentError`.
pub fn non_negative(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    // Fast path: an int that fits in u64 (the usual case); the rest explains the error.
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(v);
    }
    let v: i128 = obj
        .extract()
        .map_err(|_| invalid(what, format!("expected an integer, got {}", type_name(obj))))?;
    u64::try_from(v).map_err(|_| {
        if v < 0 {
            invalid(what, format!("must be >= 0, got {v}"))
        } else {
            invalid(what, format!("must be below 2**64, got {v}"))
        }
    })
}

/// A strictly positive integer argument.
pub fn positive(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let v = non_negative(obj, what)?;
    if v == 0 {
        return Err(invalid(what, "must be positive, got 0"));
    }
    Ok(v)
}

/// An optional non-negative integer; None (or Python None) is 0.
pub fn opt_non_negative(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<u64> {
    match obj.filter(|o| !o.is_none()) {
        Some(o) => non_negative(o, what),
        None => Ok(0),
    }
}

/// An optional positive integer; None (or Python None) stays None.
pub fn opt_positive(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<u64>> {
    match obj.filter(|o| !o.is_none()) {
        Some(o) => Ok(Some(positive(o, what)?)),
        None => Ok(None),
    }
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Describes what an array-like argument actually was, for error messages.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<numpy::PyUntypedArray>() {
        Ok(arr) => format!(
            "a {}-D numpy array of dtype {}",
            arr.ndim(),
            arr.dtype()
                .str()
                .map(|s| s.to_string())
                .unwrap_or_else(|_| "?".into())
        ),
        Err(_) => format!("a {}", type_name(obj)),
    }
}

/// A 1-D, C-contiguous numpy array of uint64 (handles). Anything else is an
/// `InvalidArgumentError` saying what was expected and what came.
pub fn u64_array<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray1<'py, u64>> {
    let arr: PyReadonlyArray1<'py, u64> = obj.extract().map_err(|_| {
        invalid(
            what,
            format!(
                "expected a 1-D numpy array of uint64, got {}",
                describe(obj)
            ),
        )
    })?;
    if !arr.is_c_contiguous() {
        return Err(invalid(
            what,
            "the array must be C-contiguous (use np.ascontiguousarray)",
        ));
    }
    Ok(arr)
}

/// Copies a 1-D C-contiguous numpy array of `T`, or returns None if `obj` is not one of `T`.
/// No borrow is taken: the copy happens while attached, so no other Python code can mutate
/// the array meanwhile (a readonly borrow costs more than copying a prompt).
fn copy_array<T: numpy::Element + Copy>(
    obj: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<Option<Vec<T>>> {
    let Ok(a) = obj.cast::<PyArray1<T>>() else {
        return Ok(None);
    };
    if !a.is_c_contiguous() {
        return Err(invalid(
            what,
            "the array must be C-contiguous (use np.ascontiguousarray)",
        ));
    }
    // SAFETY: we are attached to the interpreter for the whole copy and call no Python code,
    // so nothing can resize, free or write the array while the slice is alive.
    let slice = unsafe { a.as_slice() }.map_err(|_| {
        invalid(
            what,
            "the array must be C-contiguous (use np.ascontiguousarray)",
        )
    })?;
    Ok(Some(slice.to_vec()))
}

/// Token ids: a 1-D C-contiguous numpy array of int32 or int64 (or a list of ints), copied to
/// `i64`s while attached.
pub fn token_ids(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    if let Some(v) = copy_array::<i64>(obj, what)? {
        return Ok(v);
    }
    if let Some(v) = copy_array::<i32>(obj, what)? {
        return Ok(v.into_iter().map(i64::from).collect());
    }
    if obj.cast::<numpy::PyUntypedArray>().is_err() {
        if let Ok(v) = obj.extract::<Vec<i64>>() {
            return Ok(v);
        }
    }
    Err(invalid(
        what,
        format!(
            "expected a 1-D numpy array of int32 or int64 token ids, got {}",
            describe(obj)
        ),
    ))
}

/// Request ids, lengths, counts or block positions: a 1-D array of non-negative integers (any
/// integer dtype) or a list of ints.
pub fn uint_list(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    // A list first (schedulers keep ids in lists; an empty one is common), then int64 arrays:
    // what `np.array(ids)` and `np.arange` give.
    let signed: Vec<i64> = if let Ok(list) = obj.cast::<pyo3::types::PyList>() {
        let mut v = Vec::with_capacity(list.len());
        for item in list.iter() {
            v.push(item.extract::<i64>().map_err(|_| {
                invalid(what, format!("expected integers, got {}", type_name(&item)))
            })?);
        }
        v
    } else if let Some(v) = copy_array::<i64>(obj, what)? {
        v
    } else if let Some(v) = copy_array::<u64>(obj, what)? {
        return Ok(v);
    } else if let Some(v) = copy_array::<i32>(obj, what)? {
        v.into_iter().map(i64::from).collect()
    } else if obj.cast::<numpy::PyUntypedArray>().is_err() {
        obj.extract::<Vec<i64>>().map_err(|_| {
            invalid(
                what,
                format!(
                    "expected a list or 1-D integer array, got {}",
                    describe(obj)
                ),
            )
        })?
    } else {
        return Err(invalid(
            what,
            format!("expected a 1-D integer array, got {}", describe(obj)),
        ));
    };
    // One OR over the values finds a negative one (the sign bit), then the cast reuses the
    // buffer: both vectorize, where a per-element `try_from` into a new vector does not.
    if signed.iter().fold(0, |acc, &x| acc | x) < 0 {
        let x = signed
            .iter()
            .find(|&&x| x < 0)
            .expect("the OR saw a sign bit");
        return Err(invalid(what, format!("must be >= 0, got {x}")));
    }
    Ok(signed.into_iter().map(|x| x as u64).collect())
}

/// A dict of named integer figures (what every `stats()` returns, level by level).
pub fn figures<'py>(py: Python<'py>, items: &[(&str, u64)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for &(k, v) in items {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// An optional yes/no argument: True or False (numpy bools too); None or absent is false.
pub fn flag(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<bool> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(false),
        Some(o) => o.extract::<bool>().map_err(|_| {
            invalid(
                what,
                format!("expected True or False, got {}", type_name(o)),
            )
        }),
    }
}
