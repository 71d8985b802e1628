//! Model-based test of the slab arena against a trivial reference (proptest).
//!
//! The reference is a map of live handles to (class, byte range). After every operation:
//! `validate()` passes; bytes in use equal the model's; used + free + waste = capacity; no two
//! live blocks overlap in bytes; offsets are stable for the life of a block; failed operations
//! change nothing; and memory flows between classes (a slab emptied by one class serves another).

#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;

use kvalloc::{Error, SlabArena};
use proptest::prelude::*;

// The last class fills a slab with one block (as a large sliding-window block does): its
// allocations take whole slabs (`SlabArena::take_whole_slab`).
const BLOCKS: [u64; 4] = [64, 192, 320, SLAB];
const SLAB: u64 = 960 * 4; // lcm(64, 192, 320) = 960

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        class: usize,
        n: usize,
    },
    /// `alloc_one`: must behave as `alloc` of one block.
    AllocOne {
        class: usize,
    },
    /// Free a subset of live handles chosen by index (mod live count).
    Free {
        picks: Vec<usize>,
    },
    /// Free one already-freed handle (or a made-up one if none): must be refused.
    FreeStale {
        pick: usize,
    },
    /// Free a batch that repeats one handle: must be refused whole.
    FreeDuplicate {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..BLOCKS.len(), 0usize..40).prop_map(|(class, n)| Op::Alloc { class, n }),
        2 => (0..BLOCKS.len()).prop_map(|class| Op::AllocOne { class }),
        3 => prop::collection::vec(any::<usize>(), 0..30).prop_map(|picks| Op::Free { picks }),
        1 => any::<usize>().prop_map(|pick| Op::FreeStale { pick }),
        1 => any::<usize>().prop_map(|pick| Op::FreeDuplicate { pick }),
    ]
}

struct Model {
    live: HashMap<u64, (usize, u64)>, // handle -> (class, offset)
    dead: Vec<u64>,
}

fn check(arena: &SlabArena, model: &Model) {
    arena.validate().unwrap();
    let st = arena.stats();
    let used: u64 = model.live.values().map(|&(c, _)| BLOCKS[c]).sum();
    assert_eq!(st.bytes_in_use, used);
    assert_eq!(
        st.bytes_in_use + st.bytes_free + st.padding_waste_bytes + st.tail_bytes,
        st.capacity_bytes
    );
    assert_eq!(st.padding_waste_bytes, 0);
    let mut ranges: Vec<(u64, u64)> = model
        .live
        .iter()
        .map(|(&h, &(c, off))| {
            assert_eq!(
                arena.offset(h).unwrap(),
                off,
                "offset of a live block moved"
            );
            assert_eq!(arena.class_of(h).unwrap(), c);
            assert_eq!(arena.page(h).unwrap() * BLOCKS[c], off);
            (off, off + BLOCKS[c])
        })
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(
            w[0].1 <= w[1].0,
            "live blocks overlap: {:?} {:?}",
            w[0],
            w[1]
        );
    }
    if let Some(last) = ranges.last() {
        assert!(last.1 <= st.capacity_bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn arena_matches_model(ops in prop::collection::vec(op(), 1..120), capacity_slabs in 2u64..12) {
        let mut arena = SlabArena::new(capacity_slabs * SLAB + 17, &BLOCKS, Some(SLAB)).unwrap();
        let mut model = Model { live: HashMap::new(), dead: Vec::new() };
        for op in ops {
            let before = arena.stats();
            match op {
                Op::Alloc { class, n } => {
                    let could = arena.available(class).unwrap() >= n as u64;
                    match arena.alloc(class, n) {
                        Ok(hs) => {
                            prop_assert!(could);
                            prop_assert_eq!(hs.len(), n);
                            for h in hs {
                                let off = arena.offset(h).unwrap();
                                prop_assert!(model.live.insert(h, (class, off)).is_none());
                            }
                        }
                        Err(Error::OutOfMemory { .. }) => {
                            prop_assert!(!could);
                            prop_assert_eq!(arena.stats(), before);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                Op::AllocOne { class } => {
                    let could = arena.available(class).unwrap() >= 1;
                    match arena.alloc_one(class) {
                        Ok(h) => {
                            prop_assert!(could);
                            let off = arena.offset(h).unwrap();
                            prop_assert!(model.live.insert(h, (class, off)).is_none());
                        }
                        Err(Error::OutOfMemory { requested: 1, available: 0, .. }) => {
                            prop_assert!(!could);
                            prop_assert_eq!(arena.stats(), before);
                        }
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                Op::Free { picks } => {
                    let mut keys: Vec<u64> = model.live.keys().copied().collect();
                    keys.sort();
                    let mut batch = Vec::new();
                    for p in picks {
                        if keys.is_empty() { break; }
                        batch.push(keys.swap_remove(p % keys.len()));
                    }
                    arena.free(&batch).unwrap();
                    for h in batch {
                        model.live.remove(&h);
                        model.dead.push(h);
                    }
                }
                Op::FreeStale { pick } => {
                    let h = if model.dead.is_empty() { 0xdead_0000_0001 } else { model.dead[pick % model.dead.len()] };
                    // A dead handle's slot may be live again, but never under the old generation.
                    prop_assert!(!model.live.contains_key(&h));
                    prop_assert!(matches!(arena.free(&[h]), Err(Error::StaleHandle { .. })), "freed a stale handle");
                    prop_assert_eq!(arena.stats(), before);
                }
                Op::FreeDuplicate { pick } => {
                    if model.live.is_empty() { continue; }
                    let mut keys: Vec<u64> = model.live.keys().copied().collect();
                    keys.sort();
                    let h = keys[pick % keys.len()];
                    prop_assert!(matches!(arena.free(&[h, h]), Err(Error::StaleHandle { .. })), "a repeated handle was freed");
                    prop_assert_eq!(arena.stats(), before);
                }
            }
            check(&arena, &model);
        }
        // Everything back: all slabs free, so any class can take the whole arena.
        let all: Vec<u64> = model.live.keys().copied().collect();
        arena.free(&all).unwrap();
        let st = arena.stats();
        prop_assert_eq!(st.slabs_free, st.num_slabs);
        for c in 0..BLOCKS.len() {
            let n = (st.num_slabs as u64 * (SLAB / BLOCKS[c])) as usize;
            let hs = arena.alloc(c, n).unwrap();
            arena.free(&hs).unwrap();
        }
    }
}

#[test]
fn memory_flows_when_demand_shifts() {
    // Phase 1: long prompts want mostly the big class; phase 2: short requests want the small one.
    let mut arena = SlabArena::new(16 * SLAB, &BLOCKS, Some(SLAB)).unwrap();
    let big = arena.alloc(2, 16 * (SLAB / 320) as usize).unwrap();
    assert_eq!(arena.available(0).unwrap(), 0);
    arena.free(&big).unwrap();
    let small = arena.alloc(0, 16 * (SLAB / 64) as usize).unwrap();
    assert_eq!(arena.stats().classes[0].slabs_held, 16);
    arena.free(&small).unwrap();
    arena.validate().unwrap();
}
