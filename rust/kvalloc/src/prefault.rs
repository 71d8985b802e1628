//! Committing bookkeeping memory ahead of use.
//!
//! A page's first touch is a page fault: 3.5-5 us each on the 2-core VM the benches run on
//! (`benches/page_fault_cost.py`). A cache that grows its node and slab arrays page by page pays
//! that on its hot path, about twice per scheduler step in `benches/step_loop.py`.
//! A serving engine sets its memory up once, at start (vLLM creates every block object of its
//! pool up front), and so does kvalloc, within a budget
//! ([`ManagerConfig::prefault_bytes`](crate::ManagerConfig::prefault_bytes)).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

/// Makes room for `additional` more elements in `v` and touches that memory, leaving `v`'s
/// contents and length unchanged: its growth over those elements allocates and faults nothing.
pub(crate) fn commit<T: Clone>(v: &mut Vec<T>, additional: usize, fill: T) {
    let len = v.len();
    v.reserve_exact(additional);
    v.resize(len + additional, fill);
    v.truncate(len);
}

/// Makes room for `additional` more entries in an empty map and touches its buckets, leaving it
/// empty. `key(i)` must give distinct keys that spread over the buckets.
pub(crate) fn commit_map<K: Eq + Hash, V: Copy, S: BuildHasher>(
    map: &mut HashMap<K, V, S>,
    additional: usize,
    key: impl Fn(usize) -> K,
    fill: V,
) {
    debug_assert!(map.is_empty());
    map.reserve(additional);
    for i in 0..additional {
        map.insert(key(i), fill);
    }
    map.clear(); // keeps the table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_keeps_contents_and_makes_room() {
        let mut v = vec![1u32, 2, 3];
        commit(&mut v, 1000, 7);
        assert_eq!(v, [1, 2, 3]);
        assert!(v.capacity() >= 1003);
        let p = v.as_ptr();
        v.extend(std::iter::repeat_n(9, 1000));
        assert_eq!(p, v.as_ptr(), "the growth reallocated");
    }

    #[test]
    fn commit_map_leaves_an_empty_map_with_room() {
        let mut m: HashMap<u64, u32> = HashMap::new();
        commit_map(&mut m, 500, |i| i as u64, 0);
        assert!(m.is_empty());
        assert!(m.capacity() >= 500);
    }
}
