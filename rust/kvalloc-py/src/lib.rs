//! `kvalloc._core`: thin Python bindings over the `kvalloc` core crate.
//!
//! Rules kept here (see STYLE.md): every class is `frozen` and guards its core object with an
//! explicit lock; batch calls extract numpy arguments while attached and run the core work with
//! the interpreter detached; every core error crosses through `errors::to_py`.

mod arena;
mod args;
mod convert;
mod errors;
mod events;
mod latency;
mod manager;
mod retention;
mod sim;
mod spec;
mod step;
mod step_result;
mod tiers;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<spec::PyModelSpec>()?;
    m.add_class::<spec::PyKVGroup>()?;
    m.add_class::<arena::PySlabArena>()?;
    m.add_class::<manager::PyKVCacheManager>()?;
    m.add_class::<args::PyBlockHashes>()?;
    m.add_class::<step_result::PyStepResult>()?;
    m.add_class::<tiers::PyLoadHandle>()?;
    m.add_class::<sim::PyTrace>()?;
    m.add_class::<sim::PySimulator>()?;
    m.add("NULL_PAGE", kvalloc::NULL_PAGE)?;
    m.add("MAX_PRIORITY", kvalloc::MAX_PRIORITY)?;
    m.add_function(wrap_pyfunction!(spec::presets, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
