//! Lower tiers: where cached KV goes when it leaves device memory.
//!
//! - L1, device: the engine's buffer, registered with the manager (see [`device`]);
//! - L2, host: memory owned by the core, carved by a [`crate::SlabArena`];
//! - L3, local disk: one file per record under a directory ([`disk`]);
//! - L4, remote: a Valkey/Redis server shared by many instances ([`remote`]).
//!
//! [`store`] defines the byte-store interface and record format L3 and L4 share.

pub mod disk;
pub mod remote;
pub mod store;

pub use disk::{DiskOptions, DiskStore, RecoveryStats};
pub use remote::{RemoteConfig, RemoteStore};
pub use store::{BlockKey, BlockStore, RecordHeader, StoreCounters, StoreError};
