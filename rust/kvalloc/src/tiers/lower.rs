//! Placement and migration below L1: where a demoted block goes, what makes room for it, and
//! how bytes move between host memory (L2), disk (L3) and the remote store (L4).
//!
//! - A block leaving L1 goes to the highest configured lower tier ("write on eviction"),
//!   unless it already has a lower copy (then nothing is written).
//! - A tier over its capacity moves its least recently used record one tier down (reading its
//!   bytes and writing them below); the last tier drops it.
//! - A record is moved or dropped whole (all its groups together): an SWA checkpoint never
//!   leaves without the full-attention KV it makes usable, nor vice versa.
//! - A write that fails (disk full, store down) drops the record and is counted; a read that
//!   fails its checksum is a miss and is counted. Nothing fails the caller.
//!
//! Without a registered device buffer ("virtual" tiers, used by the simulator) the same
//! decisions are made and the same bytes are counted, but no bytes move. A store that keeps
//! residency without bytes ([`BlockStore::is_virtual`]: the simulator's remote tier shared by a
//! fleet) is still told what is written and removed, asked what other instances wrote, and
//! checked on each read (a record it evicted is a miss).
//!
//! Records are indexed by chained block hash, and stored under their record id
//! ([`RecordKeys::record_id`], a keyed one-way function of the chain). Records the disk store
//! recovers at start name only their id: they are kept *unclaimed*, apart from the index, until
//! a lookup or a write computes the id of the chain they belong to and moves them into the
//! index under it ([`LowerTiers::claim`]). Apart, because ids are visible (file names) and a
//! `BlockHashes` prompt can be built to have any chain it likes: an id must never be found by
//! a chain lookup. Unclaimed records count against the disk's capacity and are its first
//! victims (nothing has used them since the start); an evicted one is dropped, not moved down.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::device::{DeviceBuffer, HostMemory};
use super::keys::RecordKeys;
use super::residency::{LowerIndex, Record, Tier, UNKNOWN_DEPTH};
use super::store::{BlockKey, BlockStore, StoreError};
use crate::error::{Error, Result};
use crate::slab::{Handle, SlabArena};

/// Capacities of the lower tiers (0: the tier is absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LowerCapacity {
    /// L2 host memory, bytes.
    pub host: u64,
    /// L3 disk, bytes of payload.
    pub disk: u64,
    /// L4 remote, bytes of payload.
    pub remote: u64,
}

impl LowerCapacity {
    fn of(&self, t: Tier) -> u64 {
        match t {
            Tier::Host => self.host,
            Tier::Disk => self.disk,
            Tier::Remote => self.remote,
        }
    }
}

/// Per-tier traffic and failure counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounters {
    /// Payload bytes written into the tier (demotions and write-through).
    pub bytes_written: u64,
    /// The part of `bytes_written` that is full-attention KV (every written block carries its
    /// full KV, so this over the full bytes per token counts the tokens written).
    pub full_bytes_written: u64,
    /// Payload bytes read from the tier (promotions and moves down).
    pub bytes_read: u64,
    /// Records that entered the tier.
    pub records_in: u64,
    /// Records that left the tier by eviction (moved down or dropped).
    pub evicted: u64,
    /// Records dropped because a write into the tier failed (full, unavailable).
    pub write_failures: u64,
    /// Reads that failed (checksum mismatch, missing, unavailable): counted as misses.
    pub read_failures: u64,
}

/// The static facts the tiers need about the model.
#[derive(Debug, Clone)]
pub struct BlockShape {
    /// Block bytes per group.
    pub block_bytes: Vec<u64>,
    /// Bytes of one layer's slice of a block, per group.
    pub layer_bytes: Vec<u32>,
    /// Bit g set for full-attention groups.
    pub full_mask: u16,
}

/// The lower tiers. See the module docs.
pub struct LowerTiers {
    /// The residency index.
    pub index: LowerIndex,
    capacity: LowerCapacity,
    shape: BlockShape,
    host_arena: Option<SlabArena>,
    host_mem: Option<Arc<HostMemory>>,
    host_blocks: HashMap<(u64, u16), Handle>,
    /// `stores[1]`: disk, `stores[2]`: remote (`None`: virtual).
    stores: [Option<Box<dyn BlockStore>>; 3],
    counters: [TierCounters; 3],
    staging: Vec<u8>,
    materialized: bool,
    /// The stores' keys (record ids); unkeyed when no store is real.
    keys: RecordKeys,
    /// Disk records recovered at start and not claimed by a chain yet, by record id.
    unclaimed: HashMap<u64, Record>,
    /// Their ids in recovery order (eviction order; ids claimed since are skipped).
    unclaimed_order: VecDeque<u64>,
    /// Their payload bytes.
    unclaimed_bytes: u64,
}

impl std::fmt::Debug for LowerTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LowerTiers")
            .field("capacity", &self.capacity)
            .field(
                "records",
                &[
                    self.index.count(Tier::Host),
                    self.index.count(Tier::Disk),
                    self.index.count(Tier::Remote),
                ],
            )
            .finish()
    }
}

impl LowerTiers {
    /// Lower tiers with the given capacities. `disk` and `remote` are the byte stores of L3 and
    /// L4 (None: virtual, bytes counted but not moved); both must have been opened for
    /// `namespace` (the model's, see [`crate::tiers::namespace`]) with the same secret.
    pub fn new(
        shape: BlockShape,
        capacity: LowerCapacity,
        namespace: u64,
        disk: Option<Box<dyn BlockStore>>,
        remote: Option<Box<dyn BlockStore>>,
    ) -> Result<Self> {
        let mut keys = None::<RecordKeys>;
        for s in disk.iter().chain(remote.iter()) {
            let k = s.keys();
            if k.namespace() != namespace {
                return Err(Error::invalid(
                    "tiers",
                    format!(
                        "the {} store was opened for namespace {:016x}; this model's is {namespace:016x}",
                        s.name(),
                        k.namespace()
                    ),
                ));
            }
            if keys.as_ref().is_some_and(|first| first != k) {
                return Err(Error::invalid(
                    "tiers",
                    "the disk and remote stores were opened with different secrets",
                ));
            }
            keys = Some(k.clone());
        }
        let host_arena = if capacity.host > 0 {
            // The arena's complaints about its capacity are about `host_bytes` here.
            let arena =
                SlabArena::new(capacity.host, &shape.block_bytes, None).map_err(|e| match e {
                    Error::InvalidArgument { message, .. } => Error::invalid("host_bytes", message),
                    other => other,
                })?;
            Some(arena)
        } else {
            None
        };
        let mut t = LowerTiers {
            index: LowerIndex::default(),
            capacity,
            shape,
            host_arena,
            host_mem: None,
            host_blocks: HashMap::new(),
            stores: [None, disk, remote],
            counters: [TierCounters::default(); 3],
            staging: Vec::new(),
            materialized: false,
            keys: keys.unwrap_or_else(|| RecordKeys::new(namespace, None)),
            unclaimed: HashMap::new(),
            unclaimed_order: VecDeque::new(),
            unclaimed_bytes: 0,
        };
        t.recover();
        Ok(t)
    }

    /// Whether any lower tier is configured.
    pub fn active(&self) -> bool {
        Tier::ALL.iter().any(|&t| self.present(t))
    }

    /// Whether tier `t` is configured.
    pub fn present(&self, t: Tier) -> bool {
        self.capacity.of(t) > 0
    }

    /// The configured capacities.
    pub fn capacity(&self) -> LowerCapacity {
        self.capacity
    }

    /// Payload bytes in tier `t` (unclaimed records included).
    pub fn used(&self, t: Tier) -> u64 {
        self.index.used(t)
            + if t == Tier::Disk {
                self.unclaimed_bytes
            } else {
                0
            }
    }

    /// Records in tier `t` (unclaimed records included).
    pub fn count(&self, t: Tier) -> u64 {
        self.index.count(t)
            + if t == Tier::Disk {
                self.unclaimed.len() as u64
            } else {
                0
            }
    }

    /// Counters of tier `t`.
    pub fn counters(&self, t: Tier) -> TierCounters {
        self.counters[t as usize]
    }

    /// The byte store behind tier `t`, if real.
    pub fn store(&self, t: Tier) -> Option<&dyn BlockStore> {
        self.stores[t as usize].as_deref()
    }

    /// The byte store behind tier `t`, if real (mutable).
    pub fn store_mut(&mut self, t: Tier) -> Option<&mut (dyn BlockStore + 'static)> {
        self.stores[t as usize].as_deref_mut()
    }

    /// Whether bytes really move (a device buffer is registered).
    pub fn materialized(&self) -> bool {
        self.materialized
    }

    /// Allocates L2's memory: from now on bytes move. Called when the engine registers its
    /// device buffer. Memory the system cannot give is an [`Error::SystemMemory`] naming
    /// `host_bytes`, and nothing changes.
    ///
    /// The memory is mapped, not touched, and a background thread backs it front to back
    /// ([`HostMemory::populate_in_background`]): registration returns at once (touching every
    /// page first would take seconds per GiB), and demotions, which fill the tier front to back too, mostly
    /// find their pages already there instead of faulting each one on the scheduler's path.
    ///
    /// [`Error::SystemMemory`]: crate::error::Error::SystemMemory
    pub fn materialize(&mut self) -> Result<()> {
        if let (Some(a), None) = (&self.host_arena, &self.host_mem) {
            let len = usize::try_from(a.capacity_bytes()).unwrap_or(usize::MAX);
            let mem = Arc::new(HostMemory::anonymous(len, "host_bytes")?);
            // Detached: it ends once the tier is backed, or soon after the tier is dropped.
            let _ = mem.populate_in_background();
            self.host_mem = Some(mem);
        }
        self.materialized = true;
        Ok(())
    }

    /// L2's memory (for the loader), once materialized.
    pub fn host_memory(&self) -> Option<Arc<HostMemory>> {
        self.host_mem.clone()
    }

    /// Byte offset of `(hash, group)` in L2's memory, if it is there.
    pub fn host_offset(&self, hash: u64, g: usize) -> Option<u64> {
        let h = *self.host_blocks.get(&(hash, g as u16))?;
        self.host_arena.as_ref()?.offset(h).ok()
    }

    /// The highest configured tier at or below `t`.
    fn next_present(&self, mut t: Option<Tier>) -> Option<Tier> {
        while let Some(x) = t {
            if self.present(x) {
                return Some(x);
            }
            t = x.below();
        }
        None
    }

    /// Records found in the real stores at start (the disk survives restarts; remote records
    /// are found by lookups instead), unclaimed.
    fn recover(&mut self) {
        let Some(store) = self.stores[Tier::Disk as usize].as_mut() else {
            return;
        };
        let mut found: HashMap<u64, (u16, u64)> = HashMap::new();
        let mut order = Vec::new();
        for (k, bytes) in store.recovered() {
            let e = found.entry(k.hash).or_insert_with(|| {
                order.push(k.hash);
                (0, 0)
            });
            e.0 |= 1 << k.group;
            e.1 += bytes;
        }
        for id in order {
            let (groups, bytes) = found[&id];
            if bytes > self.capacity.disk.saturating_sub(self.used(Tier::Disk)) {
                continue; // over capacity after a restart with a smaller budget: not indexed
            }
            self.unclaimed.insert(
                id,
                Record {
                    tier: Tier::Disk,
                    groups,
                    depth: UNKNOWN_DEPTH,
                    ckpt_end: false,
                    access: 0,
                    pins: 0,
                    bytes,
                },
            );
            self.unclaimed_order.push_back(id);
            self.unclaimed_bytes += bytes;
        }
    }

    /// Moves the unclaimed record of `chain` (the one stored under its id) into the index
    /// under `chain`; true if there was one. Costs one keyed hash while unclaimed records
    /// remain, nothing after.
    pub fn claim(&mut self, chain: u64) -> bool {
        if self.unclaimed.is_empty() {
            return false;
        }
        let Some(mut rec) = self.unclaimed.remove(&self.keys.record_id(chain)) else {
            return false;
        };
        self.unclaimed_bytes -= rec.bytes;
        // Every insert under a chain claims first, so the chain is free.
        debug_assert!(self.index.get(chain).is_none());
        if self.index.get(chain).is_none() {
            rec.access = self.index.now();
            self.index.insert(chain, rec);
        }
        true
    }

    /// The record of chained hash `chain`, claimed or not (claims nothing).
    pub fn lookup(&self, chain: u64) -> Option<&Record> {
        self.index.get(chain).or_else(|| {
            if self.unclaimed.is_empty() {
                return None;
            }
            self.unclaimed.get(&self.keys.record_id(chain))
        })
    }

    /// Drops the oldest unclaimed record (its files too); false if there is none.
    fn evict_unclaimed(&mut self) -> bool {
        while let Some(id) = self.unclaimed_order.pop_front() {
            let Some(rec) = self.unclaimed.remove(&id) else {
                continue; // claimed since
            };
            self.unclaimed_bytes -= rec.bytes;
            if let Some(s) = self.stores[Tier::Disk as usize].as_mut() {
                for g in 0..self.shape.block_bytes.len() {
                    if rec.groups & (1 << g) != 0 {
                        let _ = s.remove(BlockKey {
                            hash: id,
                            group: g as u16,
                        });
                    }
                }
            }
            return true;
        }
        false
    }

    /// The store key of group `g` of the record of chained hash `chain`.
    pub fn store_key(&self, chain: u64, g: usize) -> BlockKey {
        self.keys.block_key(chain, g as u16)
    }

    fn record_bytes(&self, groups: u16) -> u64 {
        (0..self.shape.block_bytes.len())
            .filter(|g| groups & (1 << g) != 0)
            .map(|g| self.shape.block_bytes[g])
            .sum()
    }

    /// Makes room in tier `t` for a record of `groups`, moving older records down. False when it
    /// cannot (everything left is pinned).
    fn make_room(&mut self, t: Tier, groups: u16, protect: u64) -> bool {
        loop {
            let fits = match t {
                Tier::Host => {
                    let arena = self.host_arena.as_ref().expect("host tier present");
                    // One block of each group in the record (a 16-bit mask: 16 groups at most).
                    let mut need = [0u64; 16];
                    let n = self.shape.block_bytes.len();
                    for (g, x) in need.iter_mut().enumerate().take(n) {
                        *x = u64::from(groups >> g & 1);
                    }
                    arena.fits(&need[..n])
                }
                _ => self.used(t) + self.record_bytes(groups) <= self.capacity.of(t),
            };
            if fits {
                return true;
            }
            if t == Tier::Disk && self.evict_unclaimed() {
                self.counters[t as usize].evicted += 1;
                continue;
            }
            let Some(v) = self.index.victim(t) else {
                return false;
            };
            if v == protect {
                return false;
            }
            self.counters[t as usize].evicted += 1;
            self.move_down(v);
        }
    }

    /// Moves record `hash` one configured tier down, or drops it from the last one.
    fn move_down(&mut self, hash: u64) {
        let rec = self.index.get(hash).expect("victim exists").clone();
        let below = self.next_present(rec.tier.below());
        let Some(t2) = below else {
            self.drop_record(hash);
            return;
        };
        if !self.make_room(t2, rec.groups, hash) {
            self.drop_record(hash);
            return;
        }
        // Copy group by group through the staging buffer; any failure drops the record.
        let mut ok = true;
        let mut moved = Vec::new();
        for g in 0..self.shape.block_bytes.len() {
            if rec.groups & (1 << g) == 0 {
                continue;
            }
            if self.materialized() {
                let mut buf = std::mem::take(&mut self.staging);
                buf.resize(self.shape.block_bytes[g] as usize, 0);
                let res = self
                    .read_entry(rec.tier, hash, g, &mut buf)
                    .and_then(|()| self.write_entry(t2, hash, g, &buf));
                self.staging = buf;
                if res.is_err() {
                    ok = false;
                    break;
                }
            } else {
                self.counters[rec.tier as usize].bytes_read += self.shape.block_bytes[g];
                self.count_write(t2, g);
                self.alloc_host_block(t2, hash, g);
                self.virtual_put(t2, hash, g);
            }
            moved.push(g);
        }
        if !ok {
            for g in moved {
                self.remove_entry(t2, hash, g);
            }
            self.drop_record(hash);
            return;
        }
        for g in 0..self.shape.block_bytes.len() {
            if rec.groups & (1 << g) != 0 {
                self.remove_entry(rec.tier, hash, g);
            }
        }
        self.counters[t2 as usize].records_in += 1;
        self.index.update(hash, |r| r.tier = t2);
    }

    fn count_write(&mut self, t: Tier, g: usize) {
        let bytes = self.shape.block_bytes[g];
        let c = &mut self.counters[t as usize];
        c.bytes_written += bytes;
        if self.shape.full_mask & (1 << g) != 0 {
            c.full_bytes_written += bytes;
        }
    }

    /// Allocates record `hash`'s block of group `g` in L2 (tier `t` only; other tiers keep no
    /// block table). Done even when no bytes move, so L2 capacity (slabs, classes) is modelled
    /// exactly.
    fn alloc_host_block(&mut self, t: Tier, hash: u64, g: usize) {
        if t == Tier::Host {
            let h = self
                .host_arena
                .as_mut()
                .expect("host present")
                .alloc(g, 1)
                .expect("room was made")[0];
            self.host_blocks.insert((hash, g as u16), h);
        }
    }

    fn drop_record(&mut self, hash: u64) {
        if let Some(rec) = self.index.remove(hash) {
            for g in 0..self.shape.block_bytes.len() {
                if rec.groups & (1 << g) != 0 {
                    self.remove_entry(rec.tier, hash, g);
                }
            }
        }
    }

    /// Reads group `g` of record `hash` from tier `t` into `dst` (its whole block).
    fn read_entry(
        &mut self,
        t: Tier,
        hash: u64,
        g: usize,
        dst: &mut [u8],
    ) -> std::result::Result<(), StoreError> {
        let res = match t {
            Tier::Host => {
                let off = self.host_offset(hash, g).ok_or(StoreError::Missing)?;
                let mem = self.host_mem.as_ref().ok_or(StoreError::Missing)?;
                mem.read(off, dst);
                Ok(())
            }
            _ => {
                let key = self.store_key(hash, g);
                match self.stores[t as usize].as_mut() {
                    Some(s) => s.get(key, dst),
                    None => Err(StoreError::Missing),
                }
            }
        };
        let c = &mut self.counters[t as usize];
        match res {
            Ok(()) => c.bytes_read += dst.len() as u64,
            Err(_) => c.read_failures += 1,
        }
        res
    }

    /// Writes group `g` of record `hash` into tier `t` (room was made).
    fn write_entry(
        &mut self,
        t: Tier,
        hash: u64,
        g: usize,
        src: &[u8],
    ) -> std::result::Result<(), StoreError> {
        let res = match t {
            Tier::Host => {
                self.alloc_host_block(t, hash, g);
                let off = self.host_offset(hash, g).expect("just allocated");
                self.host_mem
                    .as_ref()
                    .expect("materialized")
                    .write(off, src);
                Ok(())
            }
            _ => {
                let lb = self.shape.layer_bytes[g];
                let key = self.store_key(hash, g);
                match self.stores[t as usize].as_mut() {
                    Some(s) => s.put(key, lb, src),
                    None => Ok(()),
                }
            }
        };
        match res {
            Ok(()) => self.count_write(t, g),
            Err(_) => self.counters[t as usize].write_failures += 1,
        }
        res
    }

    fn remove_entry(&mut self, t: Tier, hash: u64, g: usize) {
        match t {
            Tier::Host => {
                if let Some(h) = self.host_blocks.remove(&(hash, g as u16)) {
                    self.host_arena
                        .as_mut()
                        .expect("host present")
                        .free(&[h])
                        .expect("host blocks are live and owned once");
                }
            }
            _ => {
                let key = self.store_key(hash, g);
                if let Some(s) = self.stores[t as usize].as_mut() {
                    let _ = s.remove(key); // best effort: an orphan only wastes space
                }
            }
        }
    }

    /// Takes a block leaving L1 (or written through): `entries` are its groups and their bytes
    /// in L1 (device offsets), read through `device` when bytes move. Groups the block already
    /// has below L1 are not written again. `first` is the tier to write into (None: the highest
    /// configured one).
    pub fn put_block(
        &mut self,
        hash: u64,
        depth: u32,
        ckpt_end: bool,
        entries: &[(usize, u64)],
        device: Option<&dyn DeviceBuffer>,
        first: Option<Tier>,
    ) {
        // A recovered record of this block is this record (never two under one id).
        self.claim(hash);
        let now = self.index.now();
        let (tier, have) = match self.index.get(hash) {
            Some(r) => (r.tier, r.groups),
            None => match first
                .filter(|&t| self.present(t))
                .or_else(|| self.next_present(Some(Tier::Host)))
            {
                Some(t) => (t, 0),
                None => return,
            },
        };
        let mut new_groups = 0u16;
        for &(g, _) in entries {
            if have & (1 << g) == 0 {
                new_groups |= 1 << g;
            }
        }
        if new_groups == 0 {
            self.index.update(hash, |r| {
                r.access = r.access.max(now);
                r.ckpt_end |= ckpt_end;
                if r.depth == UNKNOWN_DEPTH {
                    r.depth = depth;
                }
            });
            return;
        }
        let Some((tier, have)) = self.place(hash, tier, have, new_groups) else {
            return;
        };
        let written = self.write_groups(tier, hash, entries, new_groups, device);
        if written == 0 {
            return;
        }
        let bytes = self.record_bytes(written);
        if have != 0 {
            self.index.update(hash, |r| {
                r.groups |= written;
                r.bytes += bytes;
                r.access = r.access.max(now);
                r.ckpt_end |= ckpt_end;
            });
        } else {
            self.counters[tier as usize].records_in += 1;
            self.index.insert(
                hash,
                Record {
                    tier,
                    groups: written,
                    depth,
                    ckpt_end,
                    access: now,
                    pins: 0,
                    bytes,
                },
            );
        }
    }

    /// Makes room for `new_groups` of block `hash` in `tier` (where its record with groups
    /// `have` is, or where a new one goes). Room for the new groups; an existing record is
    /// protected from its own eviction. A new record that its tier cannot take (everything
    /// there pinned, or the tier smaller than its slab classes need) goes to the next tier down
    /// rather than nowhere. Returns the tier and the groups the record has there (0: a new
    /// record), or None when no tier takes it.
    fn place(
        &mut self,
        hash: u64,
        mut tier: Tier,
        mut have: u16,
        new_groups: u16,
    ) -> Option<(Tier, u16)> {
        while have != 0 {
            self.index.pin(hash);
            let room = self.make_room(tier, new_groups, hash);
            self.index.unpin(hash);
            if room {
                break;
            }
            // No room beside the record here: move it down whole and add the groups there.
            self.counters[tier as usize].write_failures += 1;
            self.next_present(tier.below())?;
            self.move_down(hash);
            match self.index.get(hash) {
                Some(r) => tier = r.tier,
                None => {
                    // Dropped on the way: start a new record below.
                    have = 0;
                    tier = self.next_present(tier.below())?;
                }
            }
        }
        if have == 0 {
            loop {
                if self.make_room(tier, new_groups, hash) {
                    break;
                }
                self.counters[tier as usize].write_failures += 1;
                tier = self.next_present(tier.below())?;
            }
        }
        Some((tier, have))
    }

    /// Writes the groups of `entries` in `new_groups` (their bytes read from `device` at their
    /// L1 offsets when bytes move) into `tier` for block `hash`. Returns the groups written.
    fn write_groups(
        &mut self,
        tier: Tier,
        hash: u64,
        entries: &[(usize, u64)],
        new_groups: u16,
        device: Option<&dyn DeviceBuffer>,
    ) -> u16 {
        let mut written = 0u16;
        for &(g, off) in entries {
            if new_groups & (1 << g) == 0 {
                continue;
            }
            let ok = match device.filter(|_| self.materialized()) {
                Some(dev) if tier == Tier::Host => {
                    // Straight from the device into host memory: one copy.
                    self.alloc_host_block(tier, hash, g);
                    let dst = self.host_offset(hash, g).expect("just allocated");
                    let len = self.shape.block_bytes[g] as usize;
                    let mem = self.host_mem.as_ref().expect("materialized");
                    // SAFETY: the block was just allocated to this record; nothing else reads
                    // or writes it until this copy is done.
                    dev.read(off, unsafe { mem.slice_mut(dst, len) });
                    self.count_write(tier, g);
                    true
                }
                Some(dev) => {
                    let mut buf = std::mem::take(&mut self.staging);
                    buf.resize(self.shape.block_bytes[g] as usize, 0);
                    dev.read(off, &mut buf);
                    let r = self.write_entry(tier, hash, g, &buf);
                    self.staging = buf;
                    r.is_ok()
                }
                None => {
                    self.alloc_host_block(tier, hash, g);
                    self.count_write(tier, g);
                    self.virtual_put(tier, hash, g);
                    true
                }
            };
            if ok {
                written |= 1 << g;
            }
        }
        written
    }

    /// Reads group `g` of `hash` from wherever it lives below L1 straight into the device at
    /// `dst` (verified for disk and remote). Counts a failed read; the caller treats it as a
    /// miss and drops the record with [`forget`](Self::forget).
    pub fn read_to_device(
        &mut self,
        hash: u64,
        g: usize,
        device: &dyn DeviceBuffer,
        dst: u64,
    ) -> bool {
        let Some(t) = self.index.get(hash).map(|r| r.tier) else {
            return false;
        };
        let mut buf = std::mem::take(&mut self.staging);
        buf.resize(self.shape.block_bytes[g] as usize, 0);
        let ok = self.read_entry(t, hash, g, &mut buf).is_ok();
        if ok {
            device.write(dst, &buf);
        }
        self.staging = buf;
        ok
    }

    /// The store behind tier `t` if it keeps residency without bytes ([`BlockStore::is_virtual`]).
    fn virtual_store(&mut self, t: Tier) -> Option<&mut (dyn BlockStore + 'static)> {
        self.stores[t as usize]
            .as_deref_mut()
            .filter(|s| s.is_virtual())
    }

    /// Whether tier `t` is backed by a store that keeps residency without bytes.
    pub fn has_virtual_store(&self, t: Tier) -> bool {
        self.stores[t as usize]
            .as_deref()
            .is_some_and(|s| s.is_virtual())
    }

    /// Tells a virtual store (if tier `t` has one) that group `g` of `hash` was written.
    fn virtual_put(&mut self, t: Tier, hash: u64, g: usize) {
        let key = self.store_key(hash, g);
        let lb = self.shape.layer_bytes[g];
        if let Some(s) = self.virtual_store(t) {
            if s.put(key, lb, &[]).is_err() {
                self.counters[t as usize].write_failures += 1;
            }
        }
    }

    /// A read of group `g` of `hash` without bytes (no device buffer): counted, and checked
    /// against the tier's virtual store where it has one (another instance may have evicted the
    /// record there). False on a miss, counted as a failed read; the caller drops the record
    /// with [`forget`](Self::forget), as after a real failed read.
    pub fn virtual_read(&mut self, hash: u64, g: usize) -> bool {
        let Some(t) = self.index.get(hash).map(|r| r.tier) else {
            return false;
        };
        let key = self.store_key(hash, g);
        let ok = match self.virtual_store(t) {
            Some(s) => s.get(key, &mut []).is_ok(),
            None => true,
        };
        let c = &mut self.counters[t as usize];
        if ok {
            c.bytes_read += self.shape.block_bytes[g];
        } else {
            c.read_failures += 1;
        }
        ok
    }

    /// Counts a read of group `g` of `hash` that a virtual tier (or the async loader) serves.
    pub fn count_read(&mut self, hash: u64, g: usize) {
        if let Some(t) = self.index.get(hash).map(|r| r.tier) {
            self.counters[t as usize].bytes_read += self.shape.block_bytes[g];
        }
    }

    /// Counts a read of `hash` that failed in the background (the fetcher's own store handle
    /// counted the cause).
    pub fn count_failed_read(&mut self, hash: u64) {
        if let Some(t) = self.index.get(hash).map(|r| r.tier) {
            self.counters[t as usize].read_failures += 1;
        }
    }

    /// The tier a planned shutdown writes to: disk, else remote (None: nothing survives).
    pub fn durable(&self) -> Option<Tier> {
        self.next_present(Some(Tier::Disk))
    }

    /// Moves every host-memory record down to the durable tiers (host memory does not survive
    /// a restart). Records that do not fit are dropped, as in any move down.
    pub fn persist_host(&mut self) {
        if self.durable().is_none() || !self.present(Tier::Host) {
            return;
        }
        let hashes: Vec<u64> = self
            .index
            .iter()
            .filter(|(_, r)| r.tier == Tier::Host && r.pins == 0)
            .map(|(h, _)| h)
            .collect();
        for h in hashes {
            self.move_down(h);
        }
    }

    /// Drops a record that failed a read.
    pub fn forget(&mut self, hash: u64) {
        self.drop_record(hash);
    }

    /// Adds records found in the remote store by a lookup (written by another instance).
    pub fn discovered(&mut self, hash: u64, depth: u32, groups: u16) {
        if self.claim(hash)
            || self.index.get(hash).is_some()
            || groups == 0
            || !self.present(Tier::Remote)
        {
            return;
        }
        let access = self.index.now();
        let bytes = self.record_bytes(groups);
        self.index.insert(
            hash,
            Record {
                tier: Tier::Remote,
                groups,
                depth,
                ckpt_end: false,
                access,
                pins: 0,
                bytes,
            },
        );
    }

    /// Checks the index and that L2's blocks match it.
    pub fn validate(&self) -> Result<()> {
        self.index.validate()?;
        let mut host = 0usize;
        for (h, r) in self.index.iter() {
            if r.tier == Tier::Host {
                for g in 0..self.shape.block_bytes.len() {
                    if r.groups & (1 << g) != 0 {
                        host += 1;
                        if !self.host_blocks.contains_key(&(h, g as u16)) {
                            return Err(crate::error::Error::Invariant(format!(
                                "lower tiers: host record {h:#x} lacks group {g}'s block"
                            )));
                        }
                    }
                }
            }
        }
        if host != self.host_blocks.len() {
            return Err(crate::error::Error::Invariant(format!(
                "lower tiers: {} host blocks for {host} indexed entries",
                self.host_blocks.len()
            )));
        }
        let mut unclaimed = 0;
        for (&id, r) in &self.unclaimed {
            unclaimed += r.bytes;
            if r.tier != Tier::Disk || r.pins != 0 {
                return Err(crate::error::Error::Invariant(format!(
                    "lower tiers: unclaimed record {id:#x} is {r:?}"
                )));
            }
        }
        if unclaimed != self.unclaimed_bytes || self.unclaimed_order.len() < self.unclaimed.len() {
            return Err(crate::error::Error::Invariant(format!(
                "lower tiers: unclaimed bytes {} != recount {unclaimed}",
                self.unclaimed_bytes
            )));
        }
        if let Some(a) = &self.host_arena {
            a.validate()?;
        }
        Ok(())
    }
}
