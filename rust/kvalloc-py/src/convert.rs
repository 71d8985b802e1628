//! Argument conversions with kvalloc's own error messages (the default pyo3 ones name Rust types).

use numpy::{
    npyffi, Element, PyArray1, PyArrayDescr, PyArrayMethods, PyReadonlyArray1,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::errors::invalid;

/// A non-negative integer argument; negative values and non-integers are `InvalidArgumentError`,
/// and so is a bool (an `int` to Python, but `finish(True)` finishing request 1 is a bug in the
/// caller, not a request id).
pub fn non_negative(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(invalid(what, "expected an integer, got bool"));
    }
    // Fast path: an int that fits in u64 (the usual case); the rest explains the error.
    if let Ok(v) = obj.extract::<u64>() {
        return Ok(v);
    }
    let v: i128 = obj
        .extract()
        .map_err(|_| invalid(what, format!("expected an integer, got {}", type_name(obj))))?;
    u64::try_from(v).map_err(|_| {
        if v < 0 {
            negative(what, v)
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

/// A text argument (a name, a URL): a `str` that is valid Unicode. Anything else, or a string
/// with a lone surrogate (which no UTF-8 text can hold), is an `InvalidArgumentError` naming
/// the argument.
pub fn text(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let s = obj
        .cast::<PyString>()
        .map_err(|_| invalid(what, format!("expected a string, got {}", type_name(obj))))?;
    s.to_str().map(str::to_owned).map_err(|_| {
        invalid(
            what,
            "the string holds a lone surrogate (not valid Unicode)",
        )
    })
}

/// An optional [`text`] argument; None (or Python None) stays None.
pub fn opt_text(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<String>> {
    obj.filter(|o| !o.is_none())
        .map(|o| text(o, what))
        .transpose()
}

/// A path argument: a `str`, `bytes` or `os.PathLike`, encoded as the OS does (`os.fsencode`:
/// on POSIX a lone surrogate from undecodable bytes is those bytes). What cannot name a path
/// is an `InvalidArgumentError` naming the argument.
pub fn path(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<std::path::PathBuf> {
    let py = obj.py();
    let not_a_path = |why: String| invalid(what, why);
    let os = py.import("os")?;
    let fspath = os
        .call_method1("fspath", (obj,))
        .map_err(|_| not_a_path(format!("expected a path, got {}", type_name(obj))))?;
    let bytes = os
        .call_method1("fsencode", (&fspath,))
        .map_err(|e| not_a_path(format!("the path cannot be encoded for this system ({e})")))?;
    let bytes = bytes
        .cast::<PyBytes>()
        .map_err(|_| not_a_path("os.fsencode returned no bytes".into()))?
        .as_bytes();
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::ffi::OsStr::from_bytes(bytes).into())
    }
    #[cfg(not(unix))]
    {
        let s = std::str::from_utf8(bytes)
            .map_err(|_| not_a_path("the path is not valid UTF-8".into()))?;
        Ok(s.into())
    }
}

/// An optional [`path`] argument.
pub fn opt_path(
    obj: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<std::path::PathBuf>> {
    obj.filter(|o| !o.is_none())
        .map(|o| path(o, what))
        .transpose()
}

/// A real-number argument (an int or a float, numpy's too); the caller checks its range.
pub fn number(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    if obj.is_instance_of::<pyo3::types::PyBool>() || obj.cast::<PyString>().is_ok() {
        return Err(invalid(
            what,
            format!("expected a number, got {}", type_name(obj)),
        ));
    }
    obj.extract::<f64>()
        .map_err(|_| invalid(what, format!("expected a number, got {}", type_name(obj))))
}

/// An optional callable (a progress callback); None stays None.
pub fn opt_callable(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Py<PyAny>>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(None),
        Some(o) if o.is_callable() => Ok(Some(o.clone().unbind())),
        Some(o) => Err(invalid(
            what,
            format!("expected a callable, got {}", type_name(o)),
        )),
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

/// numpy's array type and its own descriptors of the dtypes the step's arrays come in, looked
/// up once (as addresses: the descriptors are kept alive here, the type lives as long as numpy).
struct NumpyTypes {
    array: usize,
    i64: Py<PyArrayDescr>,
    u64: Py<PyArrayDescr>,
    i32: Py<PyArrayDescr>,
}

static NUMPY_TYPES: PyOnceLock<NumpyTypes> = PyOnceLock::new();

fn numpy_types(py: Python<'_>) -> &'static NumpyTypes {
    NUMPY_TYPES.get_or_init(py, || NumpyTypes {
        // SAFETY: numpy's C API is loaded by the call (rust-numpy imports it on first use).
        array: unsafe { npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type) } as usize,
        i64: i64::get_dtype(py).unbind(),
        u64: u64::get_dtype(py).unbind(),
        i32: i32::get_dtype(py).unbind(),
    })
}

/// The element types [`exact_slice`] reads: numpy's descriptor for each.
trait Builtin: numpy::Element {
    fn descr(t: &NumpyTypes) -> *mut pyo3::ffi::PyObject;
}

macro_rules! builtin {
    ($($t:ident),*) => {$(
        impl Builtin for $t {
            fn descr(t: &NumpyTypes) -> *mut pyo3::ffi::PyObject {
                t.$t.as_ptr()
            }
        }
    )*};
}
builtin!(i64, u64, i32);

/// The elements of `obj` when it is exactly a numpy array (not a subclass), 1-D, aligned and
/// C-contiguous, whose dtype is numpy's own descriptor for `T` (what `dtype=np.int64`,
/// `np.arange` and arithmetic on such arrays give): a type and four fields read, where
/// rust-numpy's typed cast calls numpy's C API twice for the dtype. None: anything else, which
/// the typed cast then judges. The slice is valid while `obj` is and nothing runs Python code.
fn exact_slice<'a, T: Builtin>(obj: &'a Bound<'_, PyAny>) -> Option<&'a [T]> {
    use numpy::npyffi::{PyArrayObject, NPY_ARRAY_ALIGNED, NPY_ARRAY_C_CONTIGUOUS};
    let types = numpy_types(obj.py());
    let p = obj.as_ptr();
    // SAFETY: `p` is a live object; its fields are read only once its type is numpy's array
    // type exactly, whose instances have `PyArrayObject`'s layout.
    unsafe {
        if pyo3::ffi::Py_TYPE(p) as usize != types.array {
            return None;
        }
        let a = &(*p.cast::<PyArrayObject>()).fields;
        let need = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED;
        if a.nd != 1 || a.descr.cast() != T::descr(types) || a.flags & need != need {
            return None;
        }
        let n = *a.dimensions as usize;
        if n == 0 {
            return Some(&[]);
        }
        // Aligned, contiguous, `n` elements of `T` (the descriptor says so).
        Some(std::slice::from_raw_parts(a.data.cast::<T>(), n))
    }
}

/// The token ids of `obj` when it is exactly a numpy int64 array that [`exact_slice`] reads
/// (what `np.concatenate` of int64 prompts gives), without a copy or a borrow; None otherwise.
///
/// A step's prompts are read through this slice with the GIL released. The caller holds a
/// reference to `obj` for as long as the slice lives, so the array and its buffer stay alive:
/// numpy refuses to resize an array others reference. What the slice does not exclude,
/// another thread writing into the array meanwhile, rust-numpy's readonly borrow does not
/// exclude either (it only coordinates Rust extensions, not Python code); an engine must not
/// change a step's arguments while the step runs.
pub fn exact_tokens<'a>(obj: &'a Bound<'_, PyAny>) -> Option<&'a [i64]> {
    exact_slice::<i64>(obj)
}

/// The elements of `obj` if it is a 1-D numpy array of `T` (None if it is not one of `T`),
/// handed to `read` while attached. No borrow is taken: nothing runs Python code meanwhile, so
/// nothing can resize, free or write the array while `read` has the slice (for one call's ids
/// a readonly borrow costs more than the copy; `step` reads its flat prompts, which can be
/// megabytes, in place: [`exact_tokens`]).
fn with_array<T: Builtin, R>(
    obj: &Bound<'_, PyAny>,
    what: &str,
    read: impl FnOnce(&[T]) -> R,
) -> PyResult<Option<R>> {
    if let Some(slice) = exact_slice::<T>(obj) {
        return Ok(Some(read(slice)));
    }
    let Ok(a) = obj.cast::<PyArray1<T>>() else {
        return Ok(None);
    };
    let not_contiguous = || {
        invalid(
            what,
            "the array must be C-contiguous (use np.ascontiguousarray)",
        )
    };
    if !a.is_c_contiguous() {
        return Err(not_contiguous());
    }
    // SAFETY: attached for the whole of `read`, which calls no Python code (see above).
    let slice = unsafe { a.as_slice() }.map_err(|_| not_contiguous())?;
    Ok(Some(read(slice)))
}

/// Token ids: a 1-D C-contiguous numpy array of int32 or int64 (or a list of ints), copied to
/// `i64`s while attached.
pub fn token_ids(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    let mut v = Vec::new();
    token_ids_into(obj, what, &mut v)?;
    Ok(v)
}

/// [`token_ids`], appended to `out` (a step reuses its buffers).
pub fn token_ids_into(obj: &Bound<'_, PyAny>, what: &str, out: &mut Vec<i64>) -> PyResult<()> {
    if with_array::<i64, _>(obj, what, |t| out.extend_from_slice(t))?.is_some() {
        return Ok(());
    }
    if with_array::<i32, _>(obj, what, |t| out.extend(t.iter().map(|&x| i64::from(x))))?.is_some() {
        return Ok(());
    }
    if obj.cast::<numpy::PyUntypedArray>().is_err() {
        if let Ok(v) = obj.extract::<Vec<i64>>() {
            out.extend_from_slice(&v);
            return Ok(());
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
    let mut v = Vec::new();
    uint_list_into(obj, what, &mut v)?;
    Ok(v)
}

/// [`uint_list`], appended to `out` (a step reuses its buffers); on an error `out` may hold
/// part of the values.
pub fn uint_list_into(obj: &Bound<'_, PyAny>, what: &str, out: &mut Vec<u64>) -> PyResult<()> {
    // A list first (schedulers keep ids in lists; an empty one is common), then int64 arrays:
    // what `np.array(ids)` and `np.arange` give.
    if let Ok(list) = obj.cast::<pyo3::types::PyList>() {
        out.reserve(list.len());
        for item in list.iter() {
            out.push(non_negative(&item, what)?);
        }
        return Ok(());
    }
    if let Some(r) = with_array::<i64, _>(obj, what, |v| signed_into(v, what, out))? {
        return r;
    }
    if with_array::<u64, _>(obj, what, |v| out.extend_from_slice(v))?.is_some() {
        return Ok(());
    }
    if let Some(r) = with_array::<i32, _>(obj, what, |v| signed_into(v, what, out))? {
        return r;
    }
    if obj.cast::<numpy::PyUntypedArray>().is_ok() {
        return Err(invalid(
            what,
            format!("expected a 1-D integer array, got {}", describe(obj)),
        ));
    }
    let v = obj.extract::<Vec<i64>>().map_err(|_| {
        invalid(
            what,
            format!(
                "expected a list or 1-D integer array, got {}",
                describe(obj)
            ),
        )
    })?;
    signed_into(&v, what, out)
}

/// The error for a negative value where only non-negative ones are accepted.
fn negative(what: &str, v: impl std::fmt::Display) -> PyErr {
    invalid(what, format!("must be >= 0, got {v}"))
}

/// Appends `signed` (int64 or int32 values) to `out` as unsigned values, or fails on the first
/// negative one.
fn signed_into<T: Copy + Into<i64>>(signed: &[T], what: &str, out: &mut Vec<u64>) -> PyResult<()> {
    // One OR over the values finds a negative one (the sign bit), then the cast: both
    // vectorize, where a per-element `try_from` does not.
    if signed.iter().fold(0i64, |acc, &x| acc | x.into()) < 0 {
        let x: i64 = signed
            .iter()
            .map(|&x| x.into())
            .find(|&x| x < 0)
            .expect("the OR saw a sign bit");
        return Err(negative(what, x));
    }
    out.extend(signed.iter().map(|&x| x.into() as u64));
    Ok(())
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
