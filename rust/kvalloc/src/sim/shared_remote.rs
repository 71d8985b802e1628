//! The fleet's shared remote tier, virtual: one index of the records every instance wrote,
//! with one budget and least-recently-used eviction, and no bytes.
//!
//! Each instance's manager gets a handle as its remote [`BlockStore`] (a virtual one,
//! [`BlockStore::is_virtual`]), so the managers share it exactly as instances share a real
//! Valkey server: an instance writes its own records (write-through at finish, demotions),
//! finds blocks others wrote by asking the store (the manager's `discover_remote`), and reads
//! them on promotion. Each manager keeps its own view (its residency index, its remote budget);
//! the store is the truth. When the whole fleet's records pass the store's budget it evicts the
//! least recently used (as a Valkey server with `maxmemory-policy allkeys-lru` does), and an
//! instance that still indexes such a record misses when it reads it (counted as a failed read,
//! the record forgotten), as it would against the real server.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::tiers::{BlockKey, BlockStore, RecordKeys, StoreCounters, StoreError};

/// What the store holds, shared by every instance's handle.
#[derive(Debug, Default)]
struct Index {
    capacity: u64,
    used: u64,
    clock: u64,
    /// Record key -> (payload bytes, last use).
    records: HashMap<BlockKey, (u64, u64)>,
    /// (last use, key): eviction order.
    lru: BTreeSet<(u64, BlockKey)>,
    counters: StoreCounters,
    evicted: u64,
}

impl Index {
    fn touch(&mut self, key: BlockKey) -> bool {
        self.clock += 1;
        let now = self.clock;
        let Some(rec) = self.records.get_mut(&key) else {
            return false;
        };
        self.lru.remove(&(rec.1, key));
        rec.1 = now;
        self.lru.insert((now, key));
        true
    }

    fn remove(&mut self, key: BlockKey) -> bool {
        match self.records.remove(&key) {
            Some((bytes, at)) => {
                self.used -= bytes;
                self.lru.remove(&(at, key));
                true
            }
            None => false,
        }
    }
}

/// A handle on the shared virtual remote store; every clone names the same store.
#[derive(Debug, Clone)]
pub struct SharedRemote {
    index: Arc<Mutex<Index>>,
    keys: RecordKeys,
    /// Block bytes per KV group (a record's payload: the store holds no bytes to measure).
    block_bytes: Arc<[u64]>,
}

/// What the shared store saw over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedRemoteStats {
    /// Records held at the end.
    pub records: u64,
    /// Payload bytes held at the end.
    pub bytes: u64,
    /// Records the store evicted for its budget (not the instances' own removals).
    pub evicted: u64,
    /// The store's counters (all instances together).
    pub counters: StoreCounters,
}

impl SharedRemote {
    /// An empty store of `capacity` payload bytes for records of `block_bytes` per group,
    /// keyed as the managers of one model and block size key them (`namespace`, no secret).
    pub fn new(capacity: u64, block_bytes: Vec<u64>, namespace: u64) -> Self {
        SharedRemote {
            index: Arc::new(Mutex::new(Index {
                capacity,
                ..Index::default()
            })),
            keys: RecordKeys::new(namespace, None),
            block_bytes: block_bytes.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Nothing panics while holding it; a poisoned lock still holds a consistent index.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store's totals.
    pub fn stats(&self) -> SharedRemoteStats {
        let ix = self.lock();
        SharedRemoteStats {
            records: ix.records.len() as u64,
            bytes: ix.used,
            evicted: ix.evicted,
            counters: ix.counters,
        }
    }

    fn bytes_of(&self, key: BlockKey) -> u64 {
        self.block_bytes
            .get(usize::from(key.group))
            .copied()
            .unwrap_or(0)
    }
}

impl BlockStore for SharedRemote {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn put(&mut self, key: BlockKey, _layer_bytes: u32, _data: &[u8]) -> Result<(), StoreError> {
        let bytes = self.bytes_of(key);
        let mut ix = self.lock();
        if bytes > ix.capacity {
            ix.counters.writes_skipped_full += 1;
            return Err(StoreError::Full("larger than the store".into()));
        }
        ix.remove(key);
        while ix.used + bytes > ix.capacity {
            let (_, victim) = *ix.lru.first().expect("used > 0 means records");
            ix.remove(victim);
            ix.evicted += 1;
        }
        ix.clock += 1;
        let now = ix.clock;
        ix.records.insert(key, (bytes, now));
        ix.lru.insert((now, key));
        ix.used += bytes;
        ix.counters.puts += 1;
        ix.counters.bytes_written += bytes;
        Ok(())
    }

    fn get_layers(
        &mut self,
        key: BlockKey,
        _first_layer: u32,
        _dst: &mut [u8],
    ) -> Result<(), StoreError> {
        let bytes = self.bytes_of(key);
        let mut ix = self.lock();
        if ix.touch(key) {
            ix.counters.gets += 1;
            ix.counters.bytes_read += bytes;
            Ok(())
        } else {
            Err(StoreError::Missing)
        }
    }

    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        let ix = self.lock();
        Ok(keys.iter().map(|k| ix.records.contains_key(k)).collect())
    }

    fn remove(&mut self, key: BlockKey) -> Result<(), StoreError> {
        self.lock().remove(key);
        Ok(())
    }

    fn counters(&self) -> StoreCounters {
        self.lock().counters
    }

    fn keys(&self) -> &RecordKeys {
        &self.keys
    }

    fn is_virtual(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hash: u64, group: u16) -> BlockKey {
        BlockKey { hash, group }
    }

    #[test]
    fn handles_share_one_store_that_evicts_the_least_recently_used() {
        let mut a = SharedRemote::new(300, vec![100, 50], 7);
        let mut b = a.clone();
        a.put(key(1, 0), 1, &[]).unwrap();
        b.put(key(2, 0), 1, &[]).unwrap();
        assert_eq!(
            b.contains_many(&[key(1, 0), key(2, 0), key(1, 1)]).unwrap(),
            vec![true, true, false]
        );
        // A read makes record 1 the most recent: the next overflow evicts record 2.
        b.get(key(1, 0), &mut []).unwrap();
        a.put(key(3, 0), 1, &[]).unwrap();
        a.put(key(3, 1), 1, &[]).unwrap();
        assert_eq!(b.get(key(2, 0), &mut []), Err(StoreError::Missing));
        let s = a.stats();
        assert_eq!((s.records, s.bytes, s.evicted), (3, 250, 1));
        assert_eq!(s.counters.bytes_read, 100);
        b.remove(key(1, 0)).unwrap();
        assert_eq!(a.stats().bytes, 150);
        // A record larger than the whole store is refused, not stored.
        let mut tiny = SharedRemote::new(60, vec![100, 50], 7);
        assert!(tiny.put(key(9, 0), 1, &[]).is_err());
        assert!(tiny.put(key(9, 1), 1, &[]).is_ok());
        assert!(tiny.is_virtual() && !a.keys().authenticated());
    }
}
