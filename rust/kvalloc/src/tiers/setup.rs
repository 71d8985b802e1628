//! Opening the real byte stores behind the disk and remote tiers from plain settings.

use std::path::PathBuf;
use std::time::Duration;

use super::disk::{DiskOptions, DiskStore};
use super::keys::{RecordKeys, Secret};
use super::remote::{RemoteConfig, RemoteStore};
use super::store::BlockStore;
use crate::error::Result;
use crate::spec::ModelSpec;

/// Where the remote store is, and how to reach it (unset fields keep
/// [`RemoteConfig::new`]'s defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteSetup {
    /// `redis://[[user]:password@]host:port[/db]`, or `rediss://...` for TLS.
    pub url: String,
    /// ACL user name (overrides the URL's).
    pub username: Option<String>,
    /// Password (overrides the URL's).
    pub password: Option<String>,
    /// Key prefix (None: derived from the namespace and the secret, see
    /// [`RemoteConfig::key_prefix`]).
    pub key_prefix: Option<String>,
    /// Deadline of each call to the store (default 50 ms): past it, a read is a miss and a
    /// write a failed write.
    pub timeout: Option<Duration>,
    /// TLS: a PEM file of the CA certificates to trust (default: the bundled public roots).
    pub tls_ca: Option<PathBuf>,
    /// TLS: the client's certificate chain (PEM), for servers that require one.
    pub tls_cert: Option<PathBuf>,
    /// TLS: the client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

/// The real stores to open (a tier with a capacity but no store is virtual: counted, no bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreSetup {
    /// Directory of the disk tier's files.
    pub disk_dir: Option<PathBuf>,
    /// The remote store.
    pub remote: Option<RemoteSetup>,
    /// Deployment secret of both stores: keys record ids and authenticates records (see
    /// [`crate::tiers::keys`]). Instances that share a disk directory or a remote server share
    /// records only when they have the same secret.
    pub secret: Option<Secret>,
}

/// The namespace of a model's records: its identity ([`ModelSpec::model_id`]: which weights),
/// geometry and the block size, so that records of different models (a fine-tune and its base
/// included, when their ids differ) or block sizes never mix. Tenants are kept apart by the
/// hash chain, which is seeded from the tenant salt.
pub fn namespace(spec: &ModelSpec, block_tokens: u32) -> u64 {
    let mut b = b"kvalloc.ns.v2\0".to_vec();
    b.extend_from_slice(&spec.fingerprint().to_le_bytes());
    b.extend_from_slice(&block_tokens.to_le_bytes());
    if let Some(id) = &spec.model_id {
        // Length-prefixed: no two ids encode alike.
        b.extend_from_slice(&(id.len() as u64).to_le_bytes());
        b.extend_from_slice(id.as_bytes());
    }
    crate::hash::digest(&b)
}

type Stores = (Option<Box<dyn BlockStore>>, Option<Box<dyn BlockStore>>);

impl StoreSetup {
    /// Opens the stores. A remote server that is down is not an error (its calls miss until it
    /// is back); a malformed URL or an unusable directory is.
    pub fn open(&self, spec: &ModelSpec, block_tokens: u32) -> Result<Stores> {
        let ns = namespace(spec, block_tokens);
        let disk: Option<Box<dyn BlockStore>> = match &self.disk_dir {
            Some(dir) => {
                let keys = RecordKeys::new(ns, self.secret.as_ref());
                Some(Box::new(DiskStore::open_keyed(
                    dir,
                    keys,
                    DiskOptions::default(),
                )?))
            }
            None => None,
        };
        let remote: Option<Box<dyn BlockStore>> = match &self.remote {
            Some(r) => {
                let mut cfg = RemoteConfig::new(r.url.clone(), ns);
                cfg.username = r.username.clone();
                cfg.password = r.password.clone();
                cfg.key_prefix = r.key_prefix.clone();
                cfg.secret = self.secret.clone();
                if let Some(t) = r.timeout {
                    cfg.timeout = t;
                }
                cfg.tls_ca = r.tls_ca.clone();
                cfg.tls_cert = r.tls_cert.clone();
                cfg.tls_key = r.tls_key.clone();
                Some(Box::new(RemoteStore::open(cfg)?))
            }
            None => None,
        };
        Ok((disk, remote))
    }
}
