//! The interface of a byte store behind a lower tier (L3 local disk, L4 remote), and the record
//! format both use.
//!
//! A store keeps *records*: one KV group's block of one cached prefix block, keyed by
//! [`BlockKey`] (the block's record id and the group index) inside a *namespace* (a digest of
//! the model identity, geometry and block size, so different models never share KV). The
//! record id is a keyed one-way function of the block's chained hash ([`RecordKeys`]): tenants
//! are kept apart by the hash chain, which is seeded from the tenant salt, and no id reveals a
//! chain a prompt could be built to land on.
//!
//! A record is the block's bytes in the block layout (layer-major: each layer's slice of
//! `layer_bytes` is contiguous, K then V inside it), preceded by a header that carries one tag
//! per layer, so one layer can be read and verified on its own (layer-wise loading), and a tag
//! over the header.
//!
//! Stores never return unverified bytes: a tag mismatch (damage, a value copied under another
//! key, a record written under another secret or format version) is reported as
//! [`StoreError::Corrupt`], counted as a checksum failure, and the caller counts it as a miss.

use super::keys::RecordKeys;

/// Identifies one record: a cached block's record id and the KV group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// The record id: [`RecordKeys::record_id`] of the block's chained hash (which names the
    /// whole prefix up to and including the block).
    pub hash: u64,
    /// KV group index in the model spec.
    pub group: u16,
}

/// Why a store operation did not succeed. None of these is fatal to the manager: a failed read
/// is a miss, a failed write is a skipped demotion; each is counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such record.
    #[error("no such record")]
    Missing,
    /// The record exists but failed its checksum, or its header does not match the request
    /// (torn write, bit rot, foreign data).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The medium is full (disk full, server out of memory): the write was skipped.
    #[error("store full: {0}")]
    Full(String),
    /// The store cannot be reached (server down, connection refused, timeout).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Any other I/O failure.
    #[error("i/o error: {0}")]
    Io(String),
}

/// Counters every store keeps (monotonic, for stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Records written.
    pub puts: u64,
    /// Bytes written (payload, without headers).
    pub bytes_written: u64,
    /// Successful reads (whole records or layer ranges).
    pub gets: u64,
    /// Bytes read and verified (payload).
    pub bytes_read: u64,
    /// Reads that found a checksum or header mismatch (counted as misses).
    pub checksum_failures: u64,
    /// Writes skipped because the medium was full.
    pub writes_skipped_full: u64,
    /// Operations that failed because the store was unavailable.
    pub unavailable: u64,
    /// Of those, the ones that ran past their deadline (a hung or slow server).
    pub timeouts: u64,
    /// Other I/O errors.
    pub io_errors: u64,
}

impl StoreCounters {
    /// The sum of two handles' counters (a store's and its background reader's).
    pub fn plus(self, o: StoreCounters) -> StoreCounters {
        StoreCounters {
            puts: self.puts + o.puts,
            bytes_written: self.bytes_written + o.bytes_written,
            gets: self.gets + o.gets,
            bytes_read: self.bytes_read + o.bytes_read,
            checksum_failures: self.checksum_failures + o.checksum_failures,
            writes_skipped_full: self.writes_skipped_full + o.writes_skipped_full,
            unavailable: self.unavailable + o.unavailable,
            timeouts: self.timeouts + o.timeouts,
            io_errors: self.io_errors + o.io_errors,
        }
    }
}

/// A byte store behind a lower tier. Implementations: the disk store (files under a
/// directory) and the remote store (Valkey/Redis). Capacity and eviction *policy* are not the
/// store's business: the tier manager decides what to write and what to remove.
pub trait BlockStore: Send {
    /// Short name for stats and logs ("disk", "remote").
    fn name(&self) -> &'static str;

    /// Writes (or overwrites) a record from `data`, which is `data.len() / layer_bytes` layers
    /// of `layer_bytes` each.
    fn put(&mut self, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Result<(), StoreError>;

    /// Writes several records; the default loops over [`put`](Self::put). Remote stores batch.
    fn put_many(&mut self, items: &[(BlockKey, u32, &[u8])]) -> Vec<Result<(), StoreError>> {
        items.iter().map(|&(k, lb, d)| self.put(k, lb, d)).collect()
    }

    /// Reads layers `[first_layer, first_layer + dst.len() / layer_bytes)` of a record into
    /// `dst`, verifying each layer's checksum. `dst` must be a whole number of layers.
    fn get_layers(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError>;

    /// Reads a whole record into `dst` (its exact payload size).
    fn get(&mut self, key: BlockKey, dst: &mut [u8]) -> Result<(), StoreError> {
        self.get_layers(key, 0, dst)
    }

    /// Which of `keys` exist (without reading payloads). Remote stores batch this.
    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError>;

    /// Removes a record (absent is fine).
    fn remove(&mut self, key: BlockKey) -> Result<(), StoreError>;

    /// Records present when the store was opened (the disk store's recovered index: key and
    /// payload bytes). Torn or unreadable records found while recovering are removed and
    /// counted, never listed.
    fn recovered(&mut self) -> Vec<(BlockKey, u64)> {
        Vec::new()
    }

    /// Monotonic counters.
    fn counters(&self) -> StoreCounters;

    /// A second handle on the same records for a background reader (its own file handles or
    /// connection, its own counters), or None when the store has none to give; then reads
    /// from it happen in the admission.
    fn reader(&self) -> Option<Box<dyn BlockStore>> {
        None
    }

    /// Whether the store keeps residency but no bytes (the simulator's shared remote tier,
    /// [`crate::sim::fleet`]). Virtual tiers (no device buffer registered) tell such a store
    /// what they write (`put` with an empty payload) and remove, read it (`get` into an empty
    /// buffer: a miss when the record is gone) and ask it what other instances wrote; they never
    /// talk to a store that keeps bytes, since they have none to give it.
    fn is_virtual(&self) -> bool {
        false
    }

    /// The keys its records are checked with (namespace, secret); the tiers derive record ids
    /// from the same keys.
    fn keys(&self) -> &RecordKeys;
}

/// Record header: magic, version, key, namespace, geometry, one tag per layer and a tag over
/// the header itself. The tags are seeded xxh3 checksums, or BLAKE3 MACs where a deployment
/// secret is configured ([`RecordKeys`]); either way each binds the header's fixed part (key,
/// namespace, geometry, mode), so a payload is accepted only under the key, in the namespace
/// and at the layer it was written for, and any change to the header is caught.
///
/// Layout (version 2, little-endian): `b"KVAB"`, u16 version, u16 group, u64 namespace,
/// u64 key, u32 layers, u32 layer_bytes, u32 mode (0: checksums, 1: MACs), u32 0, u64 header
/// tag (over the 40 bytes before it and the layer tags), then `layers` u64 layer tags; the
/// payload follows. Version 1 records (no header tag, unbound checksums) are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Namespace digest (model identity, geometry and block size).
    pub namespace: u64,
    /// The record's key (its id, never a chained hash: see [`RecordKeys`]).
    pub key: BlockKey,
    /// Bytes of one layer's slice.
    pub layer_bytes: u32,
    /// Whether the tags are MACs.
    pub authenticated: bool,
    /// One tag per layer slice.
    pub tags: Vec<u64>,
    /// The tag over the header's fixed part and the layer tags.
    pub header_tag: u64,
}

/// Magic bytes opening every record.
pub const RECORD_MAGIC: [u8; 4] = *b"KVAB";
/// Record format version.
pub const RECORD_VERSION: u16 = 2;
/// Bytes of the part of a header every tag binds (everything before the header tag).
const BASE_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4 + 4 + 4 + 4;
/// Bytes of the fixed part of a header (before the layer tags).
pub const HEADER_FIXED_BYTES: usize = BASE_BYTES + 8;
/// Offset of the u32 layer count in a header (to size a read of a long header).
pub const LAYERS_OFFSET: usize = 24;

impl RecordHeader {
    /// The header for `data` (a whole number of `layer_bytes` layers) under `keys`.
    pub fn for_payload(keys: &RecordKeys, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Self {
        assert!(layer_bytes > 0 && data.len().is_multiple_of(layer_bytes as usize));
        let mut h = RecordHeader {
            namespace: keys.namespace(),
            key,
            layer_bytes,
            authenticated: keys.authenticated(),
            tags: vec![0; data.len() / layer_bytes as usize],
            header_tag: 0,
        };
        let base = h.base();
        for (i, (t, chunk)) in h
            .tags
            .iter_mut()
            .zip(data.chunks_exact(layer_bytes as usize))
            .enumerate()
        {
            *t = keys.layer_tag(&base, i as u32, chunk);
        }
        h.header_tag = keys.header_tag(&base, &h.encoded_tags());
        h
    }

    /// Number of layers.
    pub fn layers(&self) -> u32 {
        self.tags.len() as u32
    }

    /// Payload bytes.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.layer_bytes) * self.tags.len() as u64
    }

    /// Encoded size of this header.
    pub fn encoded_len(&self) -> usize {
        HEADER_FIXED_BYTES + 8 * self.tags.len()
    }

    /// The fixed part every tag binds.
    fn base(&self) -> [u8; BASE_BYTES] {
        let mut b = [0u8; BASE_BYTES];
        let fields: [&[u8]; 8] = [
            &RECORD_MAGIC,
            &RECORD_VERSION.to_le_bytes(),
            &self.key.group.to_le_bytes(),
            &self.namespace.to_le_bytes(),
            &self.key.hash.to_le_bytes(),
            &self.layers().to_le_bytes(),
            &self.layer_bytes.to_le_bytes(),
            &u32::from(self.authenticated).to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            b[at..at + f.len()].copy_from_slice(f);
            at += f.len();
        }
        b // the last 4 bytes stay zero (reserved)
    }

    fn encoded_tags(&self) -> Vec<u8> {
        self.tags.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.base());
        out.extend_from_slice(&self.header_tag.to_le_bytes());
        for t in &self.tags {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }

    /// The format version of an encoded record, if `buf` starts like one.
    pub fn version_of(buf: &[u8]) -> Option<u16> {
        (buf.len() >= 6 && buf[0..4] == RECORD_MAGIC).then(|| u16::from_le_bytes([buf[4], buf[5]]))
    }

    /// Decodes a header from the start of `buf` and checks its tag under `keys`: `Corrupt`
    /// when it is short, malformed, of another version or mode, or its tag does not match
    /// (damaged, forged, or written under another secret).
    pub fn decode(buf: &[u8], keys: &RecordKeys) -> Result<RecordHeader, StoreError> {
        let corrupt = |m: &str| StoreError::Corrupt(m.to_string());
        if buf.len() < HEADER_FIXED_BYTES {
            return Err(corrupt("header truncated"));
        }
        if buf[0..4] != RECORD_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let u16_at = |i: usize| u16::from_le_bytes(buf[i..i + 2].try_into().expect("2 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes"));
        let version = u16_at(4);
        if version != RECORD_VERSION {
            return Err(StoreError::Corrupt(format!(
                "record format version {version}; this build reads {RECORD_VERSION}"
            )));
        }
        let layers = u32_at(LAYERS_OFFSET) as usize;
        let layer_bytes = u32_at(28);
        if layers == 0 || layer_bytes == 0 || layers > 1 << 16 {
            return Err(corrupt("bad layer geometry"));
        }
        let mode = u32_at(32);
        if mode > 1 || u32_at(36) != 0 {
            return Err(corrupt("unknown record mode"));
        }
        if (mode == 1) != keys.authenticated() {
            return Err(corrupt(if keys.authenticated() {
                "record has no MAC, and this store requires one"
            } else {
                "record has a MAC, and this store has no secret to check it"
            }));
        }
        let need = HEADER_FIXED_BYTES + 8 * layers;
        if buf.len() < need {
            return Err(corrupt("header truncated"));
        }
        let header_tag = u64_at(BASE_BYTES);
        if keys.header_tag(&buf[..BASE_BYTES], &buf[HEADER_FIXED_BYTES..need]) != header_tag {
            return Err(corrupt("header tag mismatch"));
        }
        Ok(RecordHeader {
            namespace: u64_at(8),
            key: BlockKey {
                hash: u64_at(16),
                group: u16_at(6),
            },
            layer_bytes,
            authenticated: mode == 1,
            tags: (0..layers)
                .map(|i| u64_at(HEADER_FIXED_BYTES + 8 * i))
                .collect(),
            header_tag,
        })
    }

    /// Checks that this header describes `key` in `namespace`.
    pub fn check(&self, namespace: u64, key: BlockKey) -> Result<(), StoreError> {
        if self.namespace != namespace || self.key != key {
            return Err(StoreError::Corrupt("header names another record".into()));
        }
        Ok(())
    }

    /// Whether reading `len` bytes from layer `first_layer` stays inside the record (whole
    /// layers only).
    pub fn check_range(&self, first_layer: u32, len: usize) -> Result<(), StoreError> {
        let lb = self.layer_bytes as usize;
        if !len.is_multiple_of(lb) || first_layer as usize + len / lb > self.layers() as usize {
            return Err(StoreError::Io(format!(
                "read of {len} bytes from layer {first_layer} does not fit the record's {} layers of {lb} bytes",
                self.layers()
            )));
        }
        Ok(())
    }

    /// Verifies layers `[first, first + n)` read into `data` under `keys`.
    pub fn verify_layers(
        &self,
        keys: &RecordKeys,
        first_layer: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let lb = self.layer_bytes as usize;
        if !data.len().is_multiple_of(lb) {
            return Err(StoreError::Io(format!(
                "read of {} bytes is not a whole number of {lb}-byte layers",
                data.len()
            )));
        }
        let n = data.len() / lb;
        if first_layer as usize + n > self.tags.len() {
            return Err(StoreError::Io("layer range beyond the record".into()));
        }
        let base = self.base();
        for (i, chunk) in data.chunks_exact(lb).enumerate() {
            let layer = first_layer as usize + i;
            if keys.layer_tag(&base, layer as u32, chunk) != self.tags[layer] {
                return Err(StoreError::Corrupt(format!(
                    "checksum mismatch in layer {layer}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::Secret;
    use super::*;

    #[test]
    fn header_round_trip_and_verification() {
        let data: Vec<u8> = (0..64u32).map(|i| (i * 7) as u8).collect();
        let key = BlockKey { hash: 42, group: 1 };
        let secret = Secret::new(*b"s").unwrap();
        for keys in [RecordKeys::new(9, None), RecordKeys::new(9, Some(&secret))] {
            let h = RecordHeader::for_payload(&keys, key, 16, &data);
            let mut buf = Vec::new();
            h.encode(&mut buf);
            assert_eq!(buf.len(), h.encoded_len());
            let d = RecordHeader::decode(&buf, &keys).unwrap();
            assert_eq!(d, h);
            d.check(9, key).unwrap();
            assert!(d.check(8, key).is_err());
            d.verify_layers(&keys, 0, &data).unwrap();
            d.verify_layers(&keys, 2, &data[32..48]).unwrap();
            // A layer checks only in its own place.
            assert!(d.verify_layers(&keys, 1, &data[32..48]).is_err());
            let mut bad = data.clone();
            bad[20] ^= 1;
            assert!(matches!(
                d.verify_layers(&keys, 0, &bad),
                Err(StoreError::Corrupt(_))
            ));
            assert!(RecordHeader::decode(&buf[..10], &keys).is_err());
            // Any change to the header is caught, whatever field it hits.
            for i in 0..buf.len() {
                let mut b = buf.clone();
                b[i] ^= 0x40;
                assert!(
                    matches!(RecordHeader::decode(&b, &keys), Err(StoreError::Corrupt(_))),
                    "byte {i}"
                );
            }
        }
    }

    #[test]
    fn records_check_only_under_their_own_mode_and_secret() {
        let data = [7u8; 32];
        let key = BlockKey { hash: 1, group: 0 };
        let (s, t) = (Secret::new(*b"s").unwrap(), Secret::new(*b"t").unwrap());
        let all = [
            RecordKeys::new(9, None),
            RecordKeys::new(9, Some(&s)),
            RecordKeys::new(9, Some(&t)),
        ];
        for (i, w) in all.iter().enumerate() {
            let mut buf = Vec::new();
            RecordHeader::for_payload(w, key, 16, &data).encode(&mut buf);
            for (j, r) in all.iter().enumerate() {
                assert_eq!(
                    RecordHeader::decode(&buf, r).is_ok(),
                    i == j,
                    "{i} read by {j}"
                );
            }
        }
        // An older format is refused, naming the version.
        let mut buf = Vec::new();
        RecordHeader::for_payload(&all[0], key, 16, &data).encode(&mut buf);
        buf[4] = 1;
        assert_eq!(RecordHeader::version_of(&buf), Some(1));
        let err = RecordHeader::decode(&buf, &all[0]).unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
    }

    #[test]
    fn reads_must_be_whole_layers_inside_the_record() {
        // 4 layers of 16 bytes.
        let keys = RecordKeys::new(9, None);
        let h = RecordHeader::for_payload(&keys, BlockKey { hash: 1, group: 0 }, 16, &[0u8; 64]);
        h.check_range(0, 64).unwrap();
        h.check_range(3, 16).unwrap();
        h.check_range(4, 0).unwrap();
        for (first, len) in [(0, 65), (3, 32), (5, 0), (1, 8)] {
            assert!(
                matches!(h.check_range(first, len), Err(StoreError::Io(_))),
                "layer {first}, {len} bytes"
            );
        }
    }
}
