//! The prefix tree's index: chained block hash -> node id. The manager's running-request
//! table uses it too (request id -> slot).
//!
//! An open-addressing table with linear probing over 16-byte entries (key and id side by side),
//! four to a cache line. Why not `HashMap`: its lookup reads a control-byte group and then the
//! entry on another line, and it offers no prefetch. At the sizes a serving cache reaches
//! (hundreds of thousands of nodes) a walk's first unmatched hash and a link's new one are cache
//! misses either way; here each is one line, and a batched step
//! [`prefetch`](HashIndex::prefetch)es the line of every hash it will look up before it needs it
//! (`KVCacheManager::prehash`; `benches/step.py scale` measures a step in a large cache).
//! The table is allocated with huge pages advised (`crate::mem::hugepage`).
//!
//! Invariants (checked by [`HashIndex::validate`]): the capacity is a power of two and at least
//! twice the length; every entry is reachable from its home slot without crossing a free slot
//! (linear probing; removal shifts entries back rather than leaving tombstones); keys are unique.

/// The ids the table maps to: the prefix tree's [`NodeId`](crate::prefix::NodeId)s, or the
/// manager's request slots.
type NodeId = u32;
/// A free slot's id (the tree's [`NONE`](crate::prefix::NONE)).
const NONE: NodeId = u32::MAX;

/// One slot: a key and its node, or `id == NONE` when free.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Entry {
    key: u64,
    id: NodeId,
}

const FREE: Entry = Entry { key: 0, id: NONE };

/// Four entries, aligned so that one never straddles two cache lines.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([Entry; 4]);

/// Smallest table, in slots.
const MIN_SLOTS: usize = 16;

/// A map from 64-bit hashes to node ids (see the module docs).
#[derive(Debug, Clone)]
pub struct HashIndex {
    lines: Vec<Line>,
    /// Slots - 1 (the slot count is a power of two).
    mask: usize,
    /// 64 - log2(slots): a key's home slot is the top bits of its scrambled value.
    shift: u32,
    len: usize,
}

impl Default for HashIndex {
    fn default() -> Self {
        Self::with_slots(MIN_SLOTS)
    }
}

impl HashIndex {
    fn with_slots(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two() && slots >= MIN_SLOTS);
        // Advised before it is filled: huge pages back memory at its first touch.
        let mut lines = Vec::with_capacity(slots / 4);
        crate::mem::hugepage::advise(&lines);
        lines.resize(slots / 4, Line([FREE; 4]));
        HashIndex {
            lines,
            mask: slots - 1,
            shift: 64 - slots.trailing_zeros(),
            len: 0,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `key`'s probe starts. Keys are chained hashes, but a trace may carry ids with
    /// structure in their low bits: one multiply (Fibonacci hashing) spreads them.
    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline(always)]
    fn at(&self, i: usize) -> &Entry {
        &self.lines[i >> 2].0[i & 3]
    }

    #[inline(always)]
    fn at_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.lines[i >> 2].0[i & 3]
    }

    /// The slot holding `key`, or the free slot that ends its probe.
    #[inline(always)]
    fn probe(&self, key: u64) -> (usize, bool) {
        let mut i = self.home(key);
        loop {
            let e = self.at(i);
            if e.id == NONE {
                return (i, false);
            }
            if e.key == key {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// The node indexed under `key`.
    #[inline]
    pub fn get(&self, key: u64) -> Option<NodeId> {
        match self.probe(key) {
            (i, true) => Some(self.at(i).id),
            _ => None,
        }
    }

    /// Whether `key` is indexed.
    pub fn contains_key(&self, key: u64) -> bool {
        self.probe(key).1
    }

    /// Indexes `id` under `key` unless the key is there already: then returns the node it
    /// names and changes nothing. One probe either way.
    ///
    /// # Panics
    /// If `id` is [`NONE`](crate::prefix::NONE) (it marks free slots).
    #[inline]
    pub fn get_or_insert(&mut self, key: u64, id: NodeId) -> Option<NodeId> {
        assert_ne!(id, NONE, "NONE is not a node");
        if (self.len + 1) * 2 > self.mask + 1 {
            self.grow();
        }
        match self.probe(key) {
            (i, true) => Some(self.at(i).id),
            (i, false) => {
                *self.at_mut(i) = Entry { key, id };
                self.len += 1;
                None
            }
        }
    }

    /// Removes `key`; returns the node it named.
    pub fn remove(&mut self, key: u64) -> Option<NodeId> {
        let (slot, found) = self.probe(key);
        found.then(|| self.remove_at(slot))
    }

    /// Removes `key` if it names `id` (one probe); whether it did. The tree unindexes a node
    /// only while its hash still names it (a doomed node's hash may name a newer one).
    pub fn remove_if(&mut self, key: u64, id: NodeId) -> bool {
        let (slot, found) = self.probe(key);
        let names_id = found && self.at(slot).id == id;
        if names_id {
            self.remove_at(slot);
        }
        names_id
    }

    /// Empties `hole` (taken) and returns the node it held. The entries after it in its run
    /// move back into the gap where their probe allows, so no tombstone is left behind.
    fn remove_at(&mut self, mut hole: usize) -> NodeId {
        let id = self.at(hole).id;
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let e = *self.at(j);
            if e.id == NONE {
                break;
            }
            // `e` may fill the hole if the hole lies on its probe path: no further from `j`
            // than its home is.
            let dist_home = j.wrapping_sub(self.home(e.key)) & self.mask;
            let dist_hole = j.wrapping_sub(hole) & self.mask;
            if dist_hole <= dist_home {
                *self.at_mut(hole) = e;
                hole = j;
            }
        }
        *self.at_mut(hole) = FREE;
        self.len -= 1;
        id
    }

    /// Asks the CPU to start loading the line where `key`'s probe starts (and its page's
    /// translation), so that a lookup shortly after finds it in cache. No effect on the contents;
    /// a no-op where the architecture has no stable prefetch instruction.
    #[inline(always)]
    pub fn prefetch(&self, key: u64) {
        crate::mem::prefetch::prefetch(&self.lines[self.home(key) >> 2]);
    }

    /// Doubles the table (load factor at most 1/2 keeps a missing key's probe to about 2.5
    /// slots).
    #[cold]
    fn grow(&mut self) {
        let mut bigger = Self::with_slots((self.mask + 1) * 2);
        for line in &self.lines {
            for e in &line.0 {
                if e.id != NONE {
                    let (i, found) = bigger.probe(e.key);
                    debug_assert!(!found);
                    *bigger.at_mut(i) = *e;
                }
            }
        }
        bigger.len = self.len;
        *self = bigger;
    }

    /// Every (key, node) pair, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, NodeId)> + '_ {
        self.lines
            .iter()
            .flat_map(|l| l.0.iter())
            .filter(|e| e.id != NONE)
            .map(|e| (e.key, e.id))
    }

    /// Checks the invariants in the module docs; the message names the first violation.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let slots = self.mask + 1;
        if !slots.is_power_of_two() || self.lines.len() * 4 != slots || self.len * 2 > slots {
            return Err(format!(
                "{} entries in {} slots ({} lines)",
                self.len,
                slots,
                self.lines.len()
            ));
        }
        let mut count = 0;
        for i in 0..slots {
            let e = self.at(i);
            if e.id == NONE {
                continue;
            }
            count += 1;
            // Every slot from home to here must be taken, and none may hold the same key.
            let mut k = self.home(e.key);
            while k != i {
                let o = self.at(k);
                if o.id == NONE {
                    return Err(format!(
                        "key {:#x} at slot {i} is cut off from its home",
                        e.key
                    ));
                }
                if o.key == e.key {
                    return Err(format!("key {:#x} is indexed twice", e.key));
                }
                k = (k + 1) & self.mask;
            }
        }
        if count != self.len {
            return Err(format!("{count} entries found, {} counted", self.len));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, NodeId),
        Remove(u64),
        RemoveIf(u64, NodeId),
        Get(u64),
    }

    /// Keys from a small pool, some of them sharing home slots at every table size (equal low
    /// bits after scrambling are rare, so also use keys that differ only in a high bit, which
    /// the multiply keeps apart, and plain small integers as a trace might carry).
    fn key() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..64, any::<u64>(), (0u64..8).prop_map(|k| k << 60)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (key(), 0u32..8).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key().prop_map(Op::Remove),
            1 => (key(), 0u32..8).prop_map(|(k, v)| Op::RemoveIf(k, v)),
            1 => key().prop_map(Op::Get),
        ]
    }

    proptest! {
        /// The index answers as a `HashMap` does under any sequence of operations, and its
        /// invariants hold after each one.
        #[test]
        fn behaves_as_a_map(ops in prop::collection::vec(op(), 1..400)) {
            let mut index = HashIndex::default();
            let mut model: HashMap<u64, NodeId> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let expected = model.get(&k).copied();
                        prop_assert_eq!(index.get_or_insert(k, v), expected);
                        model.entry(k).or_insert(v);
                    }
                    Op::Remove(k) => prop_assert_eq!(index.remove(k), model.remove(&k)),
                    Op::RemoveIf(k, v) => {
                        let names = model.get(&k) == Some(&v);
                        if names {
                            model.remove(&k);
                        }
                        prop_assert_eq!(index.remove_if(k, v), names);
                    }
                    Op::Get(k) => prop_assert_eq!(index.get(k), model.get(&k).copied()),
                }
                prop_assert_eq!(index.len(), model.len());
                if let Err(e) = index.validate() {
                    return Err(TestCaseError::fail(e));
                }
            }
            let mut all: Vec<_> = index.iter().collect();
            all.sort_unstable();
            let mut expected: Vec<_> = model.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn removal_across_the_wrap_keeps_every_key_reachable() {
        // Keys whose probes start in the table's last two slots: their run wraps to the front.
        let mut index = HashIndex::default();
        let last = index.mask;
        let at_home = |h: usize, n: usize| -> Vec<u64> {
            (0u64..).filter(|&k| index.home(k) == h).take(n).collect()
        };
        let mut keys = at_home(last - 1, 2);
        keys.extend(at_home(last, 3));
        for (n, &k) in keys.iter().enumerate() {
            assert_eq!(index.get_or_insert(k, n as NodeId), None);
        }
        index.validate().unwrap();
        assert!(
            index.at(0).id != NONE && index.at(2).id != NONE,
            "the run wraps"
        );
        for (n, &k) in keys.iter().enumerate().step_by(2) {
            assert_eq!(index.remove(k), Some(n as NodeId));
            index.validate().unwrap();
        }
        for (n, &k) in keys.iter().enumerate() {
            assert_eq!(index.get(k), (n % 2 == 1).then_some(n as NodeId));
        }
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn grows_and_keeps_entries() {
        let mut index = HashIndex::default();
        for k in 0..10_000u64 {
            assert_eq!(index.get_or_insert(k * 16, k as NodeId), None);
        }
        index.validate().unwrap();
        assert_eq!(index.len(), 10_000);
        assert!((0..10_000u64).all(|k| index.get(k * 16) == Some(k as NodeId)));
        assert_eq!(index.get(1), None);
        index.prefetch(5); // a hint: nothing changes
        assert_eq!(index.len(), 10_000);
    }

    #[test]
    #[should_panic(expected = "NONE is not a node")]
    fn none_is_not_an_id() {
        HashIndex::default().get_or_insert(1, NONE);
    }
}
