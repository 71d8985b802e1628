//! What a lower-tier record is stored under, and what authenticates it.
//!
//! # Record ids
//!
//! A store never sees a chained block hash. The chain is not secret enough to be a key: for
//! `BlockHashes` prompts each chaining step (xxh3 of an 8-byte id) is a bijection, so whoever
//! reads one chain value from a file name or a remote key can build a prompt, under any salt,
//! whose chain lands on it. A record is stored under its *id* instead:
//!
//! ```text
//! id = first 8 bytes of BLAKE3-keyed(id_key, chain)
//! id_key = BLAKE3-derive_key("kvalloc ... record ids", namespace ++ secret)
//! ```
//!
//! BLAKE3 in keyed mode is a PRF, so an id reveals nothing of its chain (and without the
//! deployment secret, nothing of it can be computed either); the chain itself is seeded from the
//! tenant salt, so no id is computable without the salt. Without a secret the key is public
//! but the id is still one-way: finding a chain for a given id is a 2^64 search. Ids are 64 bits
//! because the chain is: a wider id would not make two chains less likely to collide.
//!
//! BLAKE3 rather than HMAC-SHA256: one well-kept crate, a keyed mode that is a PRF by design,
//! one compression for an id and SIMD throughput for record MACs, where
//! HMAC costs four SHA-256 compressions per id and runs at SHA-256's speed on payloads.
//! Ids are computed on demotion, promotion and remote lookups only: the L1 step path never
//! touches a store.
//!
//! # Record authentication
//!
//! With a secret, every layer of a record and its header carry a BLAKE3-keyed MAC
//! ([`RecordKeys::layer_tag`], [`RecordKeys::header_tag`]): a writer without the secret cannot
//! make a record this deployment accepts. Without one, the tags are seeded xxh3 checksums
//! bound to the header (key, namespace, geometry): they catch bit rot and a value copied
//! under another key, not a deliberate forger, who can recompute them.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::store::BlockKey;

/// A deployment secret: keys record ids and authenticates records (see the module docs).
/// Every instance that should share a store's records must be given the same secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from its bytes (any length; use at least 16 random bytes). `None` when empty:
    /// an empty secret would authenticate nothing.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Secret> {
        let b = bytes.into();
        (!b.is_empty()).then_some(Secret(b))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

const ID_CONTEXT: &str = "kvalloc 2026-12 lower-tier record ids v1";
const MAC_CONTEXT: &str = "kvalloc 2026-12 lower-tier record MACs v1";

/// The keys of one namespace's records: what they are stored under, and how they are checked.
/// Cheap to clone (two 32-byte keys).
#[derive(Clone, PartialEq, Eq)]
pub struct RecordKeys {
    namespace: u64,
    id_key: [u8; 32],
    /// Set when a secret is configured: records carry BLAKE3 MACs, else xxh3 checksums.
    mac_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKeys")
            .field("namespace", &format_args!("{:016x}", self.namespace))
            .field("authenticated", &self.authenticated())
            .finish_non_exhaustive()
    }
}

impl RecordKeys {
    /// The keys of `namespace`'s records under `secret` (None: ids keyed by a public key,
    /// records checked, not authenticated).
    pub fn new(namespace: u64, secret: Option<&Secret>) -> RecordKeys {
        // The namespace is fixed-width, so namespace ++ secret is unambiguous.
        let mut material = namespace.to_le_bytes().to_vec();
        if let Some(s) = secret {
            material.extend_from_slice(&s.0);
        }
        RecordKeys {
            namespace,
            id_key: blake3::derive_key(ID_CONTEXT, &material),
            mac_key: secret.map(|_| blake3::derive_key(MAC_CONTEXT, &material)),
        }
    }

    /// The namespace (a digest of the model's identity, geometry and block size).
    pub fn namespace(&self) -> u64 {
        self.namespace
    }

    /// Whether records carry MACs (a secret is configured).
    pub fn authenticated(&self) -> bool {
        self.mac_key.is_some()
    }

    /// The id a record of chained hash `chain` is stored under.
    pub fn record_id(&self, chain: u64) -> u64 {
        first_u64(blake3::keyed_hash(&self.id_key, &chain.to_le_bytes()).as_bytes())
    }

    /// The store key of group `group` of the block with chained hash `chain`.
    pub fn block_key(&self, chain: u64, group: u16) -> BlockKey {
        BlockKey {
            hash: self.record_id(chain),
            group,
        }
    }

    /// A tag naming these keys (namespace and secret) without revealing either: the default
    /// remote key prefix, so deployments with different secrets or models never share keys.
    pub fn tag(&self) -> u64 {
        first_u64(blake3::keyed_hash(&self.id_key, b"key prefix").as_bytes())
    }

    /// The tag of one layer: bound to the header's fixed part `base` (key, namespace,
    /// geometry, mode) and the layer's index, so a layer checks only in its own place.
    pub fn layer_tag(&self, base: &[u8], layer: u32, data: &[u8]) -> u64 {
        match &self.mac_key {
            Some(k) => {
                let mut h = blake3::Hasher::new_keyed(k);
                h.update(b"layer").update(base).update(&layer.to_le_bytes());
                first_u64(h.update(data).finalize().as_bytes())
            }
            None => xxh3_64_with_seed(data, xxh3_64_with_seed(&layer.to_le_bytes(), xxh3_64(base))),
        }
    }

    /// The tag of a header: its fixed part `base` and every layer's tag (`tags`, encoded).
    pub fn header_tag(&self, base: &[u8], tags: &[u8]) -> u64 {
        match &self.mac_key {
            Some(k) => {
                let mut h = blake3::Hasher::new_keyed(k);
                h.update(b"header").update(base);
                first_u64(h.update(tags).finalize().as_bytes())
            }
            None => xxh3_64_with_seed(tags, xxh3_64(base)),
        }
    }
}

fn first_u64(b: &[u8; 32]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_namespace_and_secret_and_hide_the_chain() {
        let s = Secret::new(*b"0123456789abcdef").unwrap();
        let t = Secret::new(*b"0123456789abcdeF").unwrap();
        let plain = RecordKeys::new(1, None);
        let keyed = RecordKeys::new(1, Some(&s));
        let ids = [
            plain.record_id(42),
            keyed.record_id(42),
            RecordKeys::new(2, Some(&s)).record_id(42),
            RecordKeys::new(1, Some(&t)).record_id(42),
        ];
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, 42);
            for b in &ids[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(
            keyed.record_id(42),
            RecordKeys::new(1, Some(&s)).record_id(42)
        );
        assert_ne!(plain.tag(), keyed.tag());
        assert!(keyed.authenticated() && !plain.authenticated());
        assert!(Secret::new(Vec::new()).is_none());
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn tags_bind_base_layer_and_key() {
        let s = Secret::new(*b"k").unwrap();
        for keys in [RecordKeys::new(1, None), RecordKeys::new(1, Some(&s))] {
            let t = keys.layer_tag(b"base", 0, b"data");
            assert_ne!(t, keys.layer_tag(b"basf", 0, b"data"));
            assert_ne!(t, keys.layer_tag(b"base", 1, b"data"));
            assert_ne!(t, keys.layer_tag(b"base", 0, b"datb"));
            assert_ne!(keys.header_tag(b"b", b"t"), keys.header_tag(b"b", b"u"));
        }
        let other = RecordKeys::new(1, Some(&Secret::new(*b"l").unwrap()));
        assert_ne!(
            RecordKeys::new(1, Some(&s)).layer_tag(b"base", 0, b"data"),
            other.layer_tag(b"base", 0, b"data")
        );
    }
}
