use super::*;

#[test]
fn slab_size_is_common_multiple() {
    let a = SlabArena::new(100 << 20, &[819_200, 4_915_200], None).unwrap();
    assert_eq!(a.slab_bytes() % 819_200, 0);
    assert_eq!(a.slab_bytes() % 4_915_200, 0);
    assert_eq!(a.stats().padding_waste_bytes, 0);
}

#[test]
fn prefault_commits_memory_and_changes_nothing() {
    // 256 slabs of two classes; room for the records of 10 of them. The first allocation
    // materializes one batch of slabs; the rest are unborn.
    let mut a = SlabArena::new(256 << 10, &[256, 1024], Some(1024)).unwrap();
    let held = a.alloc(1, 3).unwrap();
    assert_eq!(a.slabs.len(), MATERIALIZE_BATCH as usize);
    let before = a.stats();
    let per_slab = SlabArena::record_bytes(a.stride);
    assert_eq!(a.prefault(10 * per_slab + 1).unwrap(), 10 * per_slab);
    assert_eq!(a.stats(), before);
    assert!(a.slabs.capacity() >= a.slabs.len() + 10);
    assert!(a.slots.capacity() >= (a.slabs.len() + 10) * a.stride as usize);
    a.validate().unwrap();
    // Allocation goes on as without it, up to every slab, and everything flows back.
    let more = a.alloc(0, 4 * 253).unwrap();
    assert_eq!(a.stats().slabs_free, 0);
    a.free(&more).unwrap();
    a.free(&held).unwrap();
    assert_eq!(a.stats().slabs_free, 256);
    a.validate().unwrap();
    // Never more than the unborn slabs, whatever the budget.
    let mut b = SlabArena::new(4096, &[1024], Some(1024)).unwrap();
    let per_slab = SlabArena::record_bytes(b.stride);
    assert_eq!(b.prefault(u64::MAX).unwrap(), 4 * per_slab);
    assert_eq!(b.prefault(0).unwrap(), 0);
}

#[test]
fn slabs_materialize_in_batches_and_in_index_order() {
    // 150 slabs of one block each: slabs come in index order, recycled ones first, across
    // batch boundaries and the short last batch.
    let mut a = SlabArena::new(150 * 1024, &[1024], Some(1024)).unwrap();
    let first = a.alloc(0, 100).unwrap();
    let pages: Vec<u64> = first.iter().map(|&h| a.page(h).unwrap()).collect();
    assert_eq!(pages, (0..100).collect::<Vec<u64>>());
    a.free(&first[10..12]).unwrap();
    let next = a.alloc(0, 50).unwrap();
    let pages: Vec<u64> = next.iter().map(|&h| a.page(h).unwrap()).collect();
    let expected: Vec<u64> = [11, 10].into_iter().chain(100..148).collect();
    assert_eq!(pages, expected);
    assert_eq!(a.slabs.len(), 150);
    assert_eq!(a.available(0).unwrap(), 2);
    a.validate().unwrap();
}

#[test]
fn page_map_numbers_like_page() {
    // Two classes with different blocks per slab, interleaved over several slabs, after
    // frees that reuse slots: the map's arithmetic matches the checked lookup.
    let mut a = SlabArena::new(64 << 10, &[96, 256], Some(3072)).unwrap();
    let mut live = [a.alloc(0, 70).unwrap(), a.alloc(1, 30).unwrap()];
    a.free(&live[0][10..40]).unwrap();
    live[0].drain(10..40);
    live[0].extend(a.alloc(0, 50).unwrap());
    live[1].extend(a.alloc(1, 9).unwrap());
    for (class, handles) in live.iter().enumerate() {
        let map = a.pages_of(class).unwrap();
        for &h in handles {
            assert_eq!(
                map.page(h),
                a.page(h).unwrap(),
                "class {class} handle {h:#x}"
            );
        }
    }
    assert!(a.pages_of(2).is_err());
}

#[test]
fn allocation_fills_the_current_then_the_fullest_partial_slab() {
    // 4 slabs of 16 blocks. Fill three, then free 10, 3 and 6 slots of them: the partial
    // slabs hold 6, 13 and 10 blocks.
    let mut a = SlabArena::new(4096, &[64], Some(1024)).unwrap();
    let h = a.alloc(0, 48).unwrap();
    let slab_of = |h: Handle| (h & 0xFFFF_FFFF) / 16;
    a.free(&h[0..10]).unwrap();
    a.free(&h[16..19]).unwrap();
    a.free(&h[32..38]).unwrap();
    a.validate().unwrap();
    // The current slab first (slab 2, the last one filled), then the fullest partial one
    // (slab 1), then slab 0.
    let got = a.alloc(0, 10).unwrap();
    let slabs: Vec<u64> = got.iter().map(|&x| slab_of(x)).collect();
    assert_eq!(slabs, [2, 2, 2, 2, 2, 2, 1, 1, 1, 0]);
    a.validate().unwrap();
    // Frees into the slab being filled and into others keep the accounting exact.
    a.free(&got[9..]).unwrap();
    a.free(&h[40..41]).unwrap();
    a.validate().unwrap();
    assert_eq!(a.available(0).unwrap(), 10 + 1 + 16);
    // Emptying every slab returns all four to the arena.
    let mut live: Vec<Handle> = h[10..16].to_vec();
    live.extend(&h[19..32]);
    live.extend(&h[38..40]);
    live.extend(&h[41..48]);
    live.extend(&got[..9]);
    a.free(&live).unwrap();
    a.validate().unwrap();
    assert_eq!(a.stats().slabs_free, 4);
}

#[test]
fn given_slab_must_divide() {
    let e = SlabArena::new(1 << 20, &[3, 4], Some(16)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { ref what, .. } if what == "slab_bytes"));
    assert!(SlabArena::new(1 << 20, &[3, 4], Some(24)).is_ok());
}

#[test]
fn capacity_below_one_slab_is_an_error() {
    assert!(SlabArena::new(100, &[64, 96], None).is_err());
    assert!(SlabArena::new(0, &[64], None).is_err());
    assert!(SlabArena::new(100, &[0], None).is_err());
    assert!(SlabArena::new(100, &[], None).is_err());
}

#[test]
fn alloc_is_all_or_nothing() {
    let mut a = SlabArena::new(4096, &[64], Some(1024)).unwrap();
    assert_eq!(a.available(0).unwrap(), 64);
    let h = a.alloc(0, 60).unwrap();
    let e = a.alloc(0, 5).unwrap_err();
    assert!(matches!(
        e,
        Error::OutOfMemory {
            requested: 5,
            available: 4,
            ..
        }
    ));
    assert_eq!(a.blocks_in_use(0).unwrap(), 60);
    a.free(&h).unwrap();
    a.validate().unwrap();
}

#[test]
fn stale_double_and_foreign_handles_change_nothing() {
    let mut a = SlabArena::new(4096, &[64], Some(1024)).unwrap();
    let h = a.alloc(0, 3).unwrap();
    a.free(&h[..1]).unwrap();
    let before = a.stats();
    for bad in [
        vec![h[1], h[0]],
        vec![h[1], h[1]],
        vec![0],
        vec![u64::MAX],
        vec![h[2] + (1 << 32)],
    ] {
        assert!(
            matches!(a.free(&bad), Err(Error::StaleHandle { .. })),
            "{bad:?}"
        );
        assert_eq!(a.stats(), before);
        a.validate().unwrap();
    }
    // A reused slot gets a new generation: the old handle stays stale.
    let again = a.alloc(0, 1).unwrap();
    assert_ne!(again[0], h[0]);
    assert!(matches!(
        a.free(&h[..1]),
        Err(Error::StaleHandle {
            reason: StaleReason::OldGeneration,
            ..
        })
    ));
}

#[test]
fn absurd_counts_are_out_of_memory_and_change_nothing() {
    // The count is checked before anything is sized: 2^32 and 2^63 blocks used to abort
    // (a capacity reserved first) or panic with the arena half-way through a call.
    let mut a = SlabArena::new(1 << 20, &[64, 192], None).unwrap();
    let held = a.alloc(0, 5).unwrap();
    let before = a.stats();
    for n in [1usize << 32, 1 << 63, usize::MAX] {
        for class in 0..2 {
            let e = a.alloc(class, n).unwrap_err();
            assert!(
                matches!(e, Error::OutOfMemory { requested, .. } if requested == n),
                "{e}"
            );
            let mut out = vec![7];
            assert!(a.alloc_into(class, n, &mut out).is_err());
            assert_eq!(out, [7]);
        }
        assert_eq!(a.stats(), before);
        a.validate().unwrap();
    }
    assert_eq!(a.alloc(1, 1).unwrap().len(), 1);
    a.free(&held).unwrap();
}

#[test]
fn handles_of_another_arena_are_refused() {
    let mut a = SlabArena::new(4096, &[64], Some(1024)).unwrap();
    let mut b = SlabArena::new(4096, &[64], Some(1024)).unwrap();
    // Both arenas hand out the same slot ids and generations: only the tag differs.
    let own = a.alloc(0, 2).unwrap();
    let theirs = b.alloc(0, 2).unwrap();
    assert_eq!(
        own[0] & 0xFF_FFFF_FFFF_FFFF,
        theirs[0] & 0xFF_FFFF_FFFF_FFFF
    );
    let before = a.stats();
    for bad in [vec![theirs[0]], vec![own[1], theirs[1]]] {
        assert!(matches!(
            a.free(&bad),
            Err(Error::StaleHandle {
                reason: StaleReason::Foreign,
                ..
            })
        ));
        assert_eq!(a.stats(), before);
        a.validate().unwrap();
    }
    assert!(a.offset(theirs[0]).is_err() && a.page(theirs[0]).is_err());
    assert!(!a.is_live(theirs[0]) && a.class_of(theirs[0]).is_err());
    a.free(&own).unwrap();
    b.free(&theirs).unwrap();
    a.validate().unwrap();
    b.validate().unwrap();
}

#[test]
fn generations_wrap_within_their_bits_and_skip_zero() {
    assert_eq!(next_gen(1), 2);
    assert_eq!(next_gen(GEN_MASK - 1), GEN_MASK);
    assert_eq!(next_gen(GEN_MASK), 1);
}

#[test]
fn memory_flows_between_classes() {
    let mut a = SlabArena::new(8 * 1024, &[64, 256], Some(1024)).unwrap();
    let small = a.alloc(0, 8 * 16).unwrap(); // every slab to class 0
    assert!(a.alloc(1, 1).is_err());
    a.free(&small).unwrap();
    let big = a.alloc(1, 8 * 4).unwrap(); // every slab to class 1
    assert_eq!(a.stats().classes[1].slabs_held, 8);
    a.free(&big).unwrap();
    a.validate().unwrap();
}

#[test]
fn prefers_fuller_slabs() {
    let mut a = SlabArena::new(4 * 1024, &[64], Some(1024)).unwrap();
    let first = a.alloc(0, 16).unwrap(); // slab A full
    let second = a.alloc(0, 16).unwrap(); // slab B full
    a.free(&first[..10]).unwrap(); // A has 6 used
    a.free(&second[..2]).unwrap(); // B has 14 used
    let h = a.alloc(0, 1).unwrap();
    // The new block lands in B, the fuller slab.
    assert_eq!(
        a.offset(h[0]).unwrap() / 1024,
        a.offset(second[5]).unwrap() / 1024
    );
}

#[test]
fn pages_and_offsets_agree() {
    let mut a = SlabArena::new(1 << 20, &[64, 192], Some(3 * 1024)).unwrap();
    for class in 0..2 {
        let bb = a.block_bytes(class).unwrap();
        for h in a.alloc(class, 40).unwrap() {
            assert_eq!(a.page(h).unwrap() * bb, a.offset(h).unwrap());
            assert!(a.page(h).unwrap() < a.num_pages(class).unwrap());
        }
    }
    a.validate().unwrap();
}

#[test]
fn can_alloc_all_counts_shared_slabs() {
    let a = SlabArena::new(2 * 1024, &[64, 512], Some(1024)).unwrap();
    assert!(a.can_alloc_all(&[(0, 16), (1, 2)]).unwrap());
    assert!(!a.can_alloc_all(&[(0, 17), (1, 2)]).unwrap());
    assert!(a.fits(&[16, 2]) && !a.fits(&[17, 2]) && a.fits(&[]) && a.fits(&[0, 0]));
    // A class named twice is summed; an unknown class is an error; huge counts do not wrap.
    assert!(a.can_alloc_all(&[(1, 1), (0, 16), (1, 1)]).unwrap());
    assert!(!a.can_alloc_all(&[(0, 8), (1, 2), (0, 9)]).unwrap());
    assert!(a.can_alloc_all(&[(2, 1)]).is_err());
    assert!(!a.can_alloc_all(&[(0, u64::MAX), (0, u64::MAX)]).unwrap());
    assert!(!a.fits(&[u64::MAX, u64::MAX]));
}
