//! The interface of a byte store behind a lower tier (L3 local disk, L4 remote), and the record
//! format both use.
//!
//! A store keeps *records*: one KV group's block of one cached prefix block, keyed by
//! [`BlockKey`] (the block's chained hash and the group index) inside a *namespace* (a digest of
//! the model geometry and block size, so different models never share KV; tenants are kept apart
//! by the hash chain itself, which is seeded from the tenant salt).
//!
//! A record is the block's bytes in the block layout (layer-major: each layer's slice of
//! `layer_bytes` is contiguous, K then V inside it), preceded by a header that carries one
//! checksum per layer, so one layer can be read and verified on its own (layer-wise loading).
//!
//! Stores never return unverified bytes: a checksum mismatch is reported as
//! [`StoreError::Corrupt`] and the caller counts it as a miss.

use xxhash_rust::xxh3::xxh3_64;

/// Identifies one record: a cached block's chained hash and the KV group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey {
    /// Chained block hash (names the whole prefix up to and including the block).
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
}

/// Record header: magic, version, namespace, key, layer geometry and one xxh3-64 per layer.
///
/// Layout (little-endian): `b"KVAB"`, u16 version, u16 group, u64 namespace, u64 hash,
/// u32 layers, u32 layer_bytes, then `layers` u64 checksums; the payload follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Namespace digest (model geometry and block size).
    pub namespace: u64,
    /// The record's key.
    pub key: BlockKey,
    /// Bytes of one layer's slice.
    pub layer_bytes: u32,
    /// One checksum per layer slice.
    pub checksums: Vec<u64>,
}

/// Magic bytes opening every record.
pub const RECORD_MAGIC: [u8; 4] = *b"KVAB";
/// Record format version.
pub const RECORD_VERSION: u16 = 1;
/// Bytes of the fixed part of a header (before the checksums).
pub const HEADER_FIXED_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4 + 4;

impl RecordHeader {
    /// The header for `data` (a whole number of `layer_bytes` layers).
    pub fn for_payload(namespace: u64, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Self {
        assert!(layer_bytes > 0 && data.len() % layer_bytes as usize == 0);
        RecordHeader {
            namespace,
            key,
            layer_bytes,
            checksums: data
                .chunks_exact(layer_bytes as usize)
                .map(xxh3_64)
                .collect(),
        }
    }

    /// Number of layers.
    pub fn layers(&self) -> u32 {
        self.checksums.len() as u32
    }

    /// Payload bytes.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.layer_bytes) * self.checksums.len() as u64
    }

    /// Encoded size of this header.
    pub fn encoded_len(&self) -> usize {
        HEADER_FIXED_BYTES + 8 * self.checksums.len()
    }

    /// Appends the encoded header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&RECORD_MAGIC);
        out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
        out.extend_from_slice(&self.key.group.to_le_bytes());
        out.extend_from_slice(&self.namespace.to_le_bytes());
        out.extend_from_slice(&self.key.hash.to_le_bytes());
        out.extend_from_slice(&self.layers().to_le_bytes());
        out.extend_from_slice(&self.layer_bytes.to_le_bytes());
        for c in &self.checksums {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }

    /// Decodes a header from the start of `buf`; `Corrupt` when it is short or malformed.
    pub fn decode(buf: &[u8]) -> Result<RecordHeader, StoreError> {
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
        if u16_at(4) != RECORD_VERSION {
            return Err(corrupt("unknown record version"));
        }
        let group = u16_at(6);
        let namespace = u64_at(8);
        let hash = u64_at(16);
        let layers = u32_at(24) as usize;
        let layer_bytes = u32_at(28);
        if layers == 0 || layer_bytes == 0 || layers > 1 << 16 {
            return Err(corrupt("bad layer geometry"));
        }
        let need = HEADER_FIXED_BYTES + 8 * layers;
        if buf.len() < need {
            return Err(corrupt("header truncated"));
        }
        let checksums = (0..layers)
            .map(|i| u64_at(HEADER_FIXED_BYTES + 8 * i))
            .collect();
        Ok(RecordHeader {
            namespace,
            key: BlockKey { hash, group },
            layer_bytes,
            checksums,
        })
    }

    /// Checks that this header describes `key` in `namespace` with `layer_bytes` slices.
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
        if len % lb != 0 || first_layer as usize + len / lb > self.layers() as usize {
            return Err(StoreError::Io(format!(
                "read of {len} bytes from layer {first_layer} does not fit the record's {} layers of {lb} bytes",
                self.layers()
            )));
        }
        Ok(())
    }

    /// Verifies layers `[first, first + n)` read into `data`.
    pub fn verify_layers(&self, first_layer: u32, data: &[u8]) -> Result<(), StoreError> {
        let lb = self.layer_bytes as usize;
        if data.len() % lb != 0 {
            return Err(StoreError::Io(format!(
                "read of {} bytes is not a whole number of {lb}-byte layers",
                data.len()
            )));
        }
        let n = data.len() / lb;
        if first_layer as usize + n > self.checksums.len() {
            return Err(StoreError::Io("layer range beyond the record".into()));
        }
        for (i, chunk) in data.chunks_exact(lb).enumerate() {
            if xxh3_64(chunk) != self.checksums[first_layer as usize + i] {
                return Err(StoreError::Corrupt(format!(
                    "checksum mismatch in layer {}",
                    first_layer as usize + i
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_verification() {
        let data: Vec<u8> = (0..64u32).map(|i| (i * 7) as u8).collect();
        let key = BlockKey { hash: 42, group: 1 };
        let h = RecordHeader::for_payload(9, key, 16, &data);
        let mut buf = Vec::new();
        h.encode(&mut buf);
        assert_eq!(buf.len(), h.encoded_len());
        let d = RecordHeader::decode(&buf).unwrap();
        assert_eq!(d, h);
        d.check(9, key).unwrap();
        assert!(d.check(8, key).is_err());
        d.verify_layers(0, &data).unwrap();
        d.verify_layers(2, &data[32..48]).unwrap();
        let mut bad = data.clone();
        bad[20] ^= 1;
        assert!(matches!(
            d.verify_layers(0, &bad),
            Err(StoreError::Corrupt(_))
        ));
        assert!(RecordHeader::decode(&buf[..10]).is_err());
    }

    #[test]
    fn reads_must_be_whole_layers_inside_the_record() {
        // 4 layers of 16 bytes.
        let h = RecordHeader::for_payload(9, BlockKey { hash: 1, group: 0 }, 16, &[0u8; 64]);
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
