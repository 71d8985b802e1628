//! # kvalloc
//!
//! An SWA-aware KV-cache memory manager for hybrid-attention LLMs (models that interleave a few
//! full-attention layers with many sliding-window layers, such as MiMo-V2.5-Pro, Gemma 3 and
//! gpt-oss).
//!
//! The core is plain Rust with no Python in it; the `kvalloc` Python package is a thin layer over
//! it. An engine's scheduler drives one [`KVCacheManager`]: it admits requests, extends them as
//! they are computed, finishes or aborts them, and reads each request's block tables (the page
//! indices its attention kernels use). Finished requests' KV stays cached in a prefix tree, so a
//! later prompt with the same prefix resumes from it; sliding-window layers keep only the windows
//! where prompts resume (checkpoints), not every token.
//!
//! ## Modules
//!
//! Lowest first; nothing lower imports anything higher (`error`, `events`, `spec`, `hash`,
//! `eviction` and the private `mem` (memory hints) and `files` (reading configs and traces) are leaves; then
//! `slab`, `prefix`, `tiers`, `manager`, `sim`):
//!
//! - [`error`]: the one error enum every fallible call returns;
//! - [`events`]: [`CacheEvent`], what entered and left the prefix cache (for an engine's event
//!   stream or a cache-aware router), recorded when
//!   [`ManagerConfig::events`](manager::ManagerConfig::events) is on;
//! - [`spec`]: a model's KV geometry ([`ModelSpec`], [`KVGroup`]), from Hugging Face configs or
//!   bundled presets;
//! - [`hash`]: chained block hashes (a hash names its whole prefix) and the open-addressing
//!   hash index the prefix tree and the running set use;
//! - [`eviction`]: the order cached entries leave in ([`Eviction`]: value or LRU);
//! - [`slab`]: the [`SlabArena`], one byte budget carved into slabs that each serve one block
//!   size class, so memory flows between the full-attention and sliding-window classes;
//! - [`prefix`]: the prefix tree of cached blocks, with SWA checkpoints and leaf-first eviction;
//! - [`tiers`]: the lower tiers below device memory (host memory, local disk, a remote store),
//!   their residency index and the background loader;
//! - [`manager`]: the [`KVCacheManager`] the scheduler drives;
//! - [`sim`]: trace-driven simulation over a real manager (hit rate, memory, latency), with the
//!   overlap model that prices loads from the lower tiers.
//!
//! ## Invariants
//!
//! Checked by `validate()` on the arena, the tree and the manager (tests call it after every
//! operation):
//!
//! - every live block has exactly one owner, the prefix tree or one running request, and the
//!   arena's free plus used bytes equal its capacity;
//! - handles carry generations: a stale or double-freed handle is an error, never an alias;
//! - a block becomes matchable only once its owner has scheduled all of its tokens, and a cached
//!   prefix has no holes (full-attention KV leaves leaf first);
//! - a running request holds at most its window (plus one block, plus a chunk in flight) of
//!   private blocks per sliding group;
//! - a cached prefix under a retention pin (see [`Retention`]) is in no eviction set, its
//!   pinned bytes are counted exactly and never exceed
//!   [`ManagerConfig::max_pinned_bytes`](manager::ManagerConfig::max_pinned_bytes);
//! - bad input is an [`Error`], never a panic, and leaves the state as it was.
//!
//! ## Example: a request's life
//!
//! ```
//! use kvalloc::{Extension, KVCacheManager, ManagerConfig, ModelSpec, Prompt, NULL_PAGE};
//!
//! let spec = ModelSpec::preset("mimo-v2.5-pro")?; // group 0 full, group 1 a 128-token window
//! let mut m = KVCacheManager::new(spec, 8 << 30, ManagerConfig::default())?; // 16-token blocks
//!
//! // Admit a 1,000-token prompt: nothing is cached yet, so every token is computed.
//! let prompt: Vec<i64> = (0..1000).collect();
//! assert_eq!(m.admit(1, Prompt::Tokens(&prompt), None, None)?, Some(0));
//!
//! // The engine's kernels read one block table per group: one page per block of 16 tokens.
//! let full = m.block_table(1, 0)?;
//! assert_eq!(full.len(), 63);
//! assert!(full.iter().all(|&p| p != NULL_PAGE));
//! // The sliding group holds only the blocks its window (and the checkpoint) needs.
//! let sliding = m.block_table(1, 1)?;
//! assert_eq!(sliding[0], NULL_PAGE);
//!
//! // Decode: one token per step.
//! for token in 0..20 {
//!     assert!(m.extend(1, Extension::Tokens(&[token]))?);
//! }
//! assert_eq!(m.num_tokens(1)?, 1020);
//!
//! // Finish: its whole blocks stay cached, and the same prompt resumes at its last whole block.
//! m.finish(1)?;
//! assert_eq!(m.admit(2, Prompt::Tokens(&prompt), None, None)?, Some(992));
//! m.validate()?;
//! # Ok::<(), kvalloc::Error>(())
//! ```
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
pub mod events;
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
pub use events::{CacheEvent, CacheView};
pub use eviction::Eviction;
pub use manager::{
    Admission, BlockResidency, CheckpointKindStats, Decode, Extension, GroupStats, KVCacheManager,
    LoadPolicy, LoadStats, ManagerConfig, ManagerStats, Policy, Promotion, Prompt, Retention, Step,
    StepOutcome, TierStats, MAX_PRIORITY, NULL_PAGE,
};
pub use prefix::CheckpointKind;
pub use slab::{ArenaStats, ClassStats, Handle, PageMap, SlabArena};
pub use spec::{AttentionKind, DType, KVGroup, ModelSpec};

/// The README's Rust example, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
