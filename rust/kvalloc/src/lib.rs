//! # kvalloc
//!
//! An SWA-aware KV-cache memory manager for hybrid-attention LLMs (models that interleave a few
//! full-attention layers with many sliding-window layers, such as MiMo-V2.5-Pro, Gemma 3 and
//! gpt-oss).
//!
//! The core is plain Rust with no Python in it; the `kvalloc` Python package is a thin layer over
//! it. Modules, lowest first (nothing lower imports anything higher):
//!
//! - [`error`]: the one error enum;
//! - [`spec`]: a model's KV geometry ([`ModelSpec`], [`KVGroup`]) read from Hugging Face configs;
//! - [`slab`]: the [`SlabArena`], one byte budget carved into slabs that each serve one block
//!   size class, so memory flows between the full-attention and sliding-window classes.
//!
//! ## Example: how much KV does one sequence hold?
//!
//! ```
//! use kvalloc::{ModelSpec, SlabArena};
//!
//! let spec = ModelSpec::preset("mimo-v2.5-pro")?;
//! assert_eq!(spec.groups[0].bytes_per_token(), 51_200); // 10 full layers, bf16
//!
//! // 32K tokens: sliding groups keep only their window (rounded to 16-token blocks).
//! let swa = spec.kv_bytes(32_768, 16)?;
//! let dense = spec.kv_bytes_dense(32_768)?;
//! assert!(dense > 6 * swa);
//!
//! // One arena, one class per KV group; every block size divides the slab exactly.
//! let arena_budget = 1 << 30;
//! let mut arena = SlabArena::new(arena_budget, &spec.block_bytes(16), None)?;
//! let full_blocks = arena.alloc(0, 4)?;
//! let pages: Vec<u64> = full_blocks.iter().map(|&h| arena.page(h).unwrap()).collect();
//! assert_eq!(pages.len(), 4);
//! arena.free(&full_blocks)?;
//! arena.validate()?;
//! # Ok::<(), kvalloc::Error>(())
//! ```

#![forbid(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]
// Group indices address several parallel per-group arrays at once; an index loop says so best.
#![allow(clippy::needless_range_loop)]

pub mod error;
pub mod eviction;
mod files;
pub mod hash;
pub mod manager;
mod mem;
pub mod prefix;
pub mod sim;
pub mod slab;
pub mod spec;
pub mod tiers;

/// The eviction module's old name (`kvalloc::policy`), kept for existing users.
#[doc(hidden)]
pub use eviction as policy;

pub use error::{Error, Result, StaleReason};
pub use eviction::Eviction;
pub use manager::{
    Admission, BlockResidency, Decode, Extension, GroupStats, KVCacheManager, ManagerConfig,
    ManagerStats, Policy, Promotion, Prompt, Step, StepOutcome, TierStats, NULL_PAGE,
};
pub use slab::{ArenaStats, ClassStats, Handle, PageMap, SlabArena};
pub use spec::{AttentionKind, DType, KVGroup, ModelSpec};
