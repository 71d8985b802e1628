//! Lower tiers: where cached KV goes when it leaves device memory.
//!
//! - L1, device: the engine's buffer, registered with the manager (see [`device`]);
//! - L2, host: memory owned by the core, carved by a [`crate::SlabArena`];
//! - L3, local disk: one file per record under a directory ([`disk`]);
//! - L4, remote: a Valkey/Redis server shared by many instances ([`remote`]).
//!
//! [`store`] defines the byte-store interface and record format L3 and L4 share; [`keys`] what
//! records are stored under and how they are authenticated.

pub mod cost;
pub mod device;
pub mod disk;
pub mod fetch;
pub mod keys;
pub mod loader;
pub mod lower;
pub mod remote;
pub mod residency;
pub mod setup;
pub mod store;

pub use cost::{LoadCost, LoadEstimate};
pub use device::{DeviceBuffer, HostBuffer};
pub use disk::{DiskOptions, DiskStore, RecoveryStats};
pub use fetch::{FetchJob, FetchStatus, FetchTask, Fetcher};
pub use keys::{RecordKeys, Secret};
pub use loader::{LoadBytes, LoadHandle, LoadJob};
pub use lower::{BlockShape, LowerCapacity, LowerTiers, TierCounters};
pub use remote::{RemoteConfig, RemoteStore};
pub use residency::{LowerIndex, Record, Tier};
pub use setup::{namespace, RemoteSetup, StoreSetup};
pub use store::{BlockKey, BlockStore, RecordHeader, StoreCounters, StoreError};

/// The residency index's old path (`tiers::index`), kept for existing users.
#[doc(hidden)]
pub use residency as index;
