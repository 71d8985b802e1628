//! The one error type of the core.
//!
//! Every fallible public function returns [`Result`]. The Python bindings map each variant to
//! exactly one exception class in one exhaustive `match` (see `rust/kvalloc-py/src/errors.rs`),
//! so adding a variant here is a compile error there until it has a Python name.

use std::fmt;

/// Errors returned by the kvalloc core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A model configuration is missing a field, contradicts itself, or uses a layer kind
    /// kvalloc does not support. `field` names the offending key (or `layer_types[i]`).
    #[error("config error in `{field}`: {message}")]
    Config {
        /// The config key at fault, e.g. `sliding_window` or `layer_types[3]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// An allocation could not be satisfied; nothing was allocated.
    #[error("out of memory: requested {requested} block(s) of class {class} ({block_bytes} bytes each), {available} available")]
    OutOfMemory {
        /// The size class asked for.
        class: usize,
        /// Its block size in bytes.
        block_bytes: u64,
        /// Blocks requested.
        requested: usize,
        /// Blocks that could have been allocated.
        available: usize,
    },

    /// Memory the system cannot give (a host tier's buffer, a generated trace); nothing was
    /// allocated.
    #[error("out of memory: `{what}` needs {requested_bytes} bytes {message}")]
    SystemMemory {
        /// What asked for the memory, e.g. `host_bytes` or `size`.
        what: String,
        /// Bytes asked for (an estimate where the need is estimated).
        requested_bytes: u64,
        /// What the system has, and what would fit (follows the byte count).
        message: String,
    },

    /// A handle that is not live: freed already, from another arena, or never issued.
    #[error("stale or foreign handle {handle:#018x}: {reason}")]
    StaleHandle {
        /// The refused handle.
        handle: u64,
        /// Why it was refused.
        reason: StaleReason,
    },

    /// An argument is out of range or malformed; `what` names the argument.
    #[error("invalid argument `{what}`: {message}")]
    InvalidArgument {
        /// The argument's name.
        what: String,
        /// What is wrong with it.
        message: String,
    },

    /// A request id that is unknown (not running) or already in use.
    #[error("request {req} {message}")]
    Request {
        /// The request id.
        req: u64,
        /// What is wrong with it.
        message: String,
    },

    /// An internal invariant does not hold (reported by `validate()`); a bug in kvalloc.
    #[error("invariant violated: {0}")]
    Invariant(String),
}

/// Why a handle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// The slot is free (double free, or freed before use).
    NotLive,
    /// The slot is live but holds a newer generation (the handle was freed and the slot reused).
    OldGeneration,
    /// The handle names a slab or slot this arena does not have.
    OutOfRange,
    /// The same handle appears twice in one batch.
    Duplicate,
    /// The handle was issued by another arena.
    Foreign,
}

impl fmt::Display for StaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StaleReason::NotLive => "the block is not allocated (double free?)",
            StaleReason::OldGeneration => "the block was freed and reallocated since",
            StaleReason::OutOfRange => "no such block in this arena",
            StaleReason::Duplicate => "handle given twice in one call",
            StaleReason::Foreign => "the handle belongs to another arena",
        })
    }
}

/// Result alias used throughout the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            what: what.into(),
            message: message.into(),
        }
    }
}
