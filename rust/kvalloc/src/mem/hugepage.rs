//! Asking the kernel to back large bookkeeping arrays with huge pages.
//!
//! In a cache holding hundreds of thousands of blocks, a scheduler step reads and writes lines
//! spread over tens of megabytes of index and node arrays: with 4 KiB pages nearly every such
//! access also misses the TLB, and in a virtual machine each page walk costs several memory
//! reads. With transparent huge pages on for the whole process, a step in a large cache runs
//! nearly as fast as in a fresh one (`benches/step.py scale`). Most systems run transparent
//! huge pages in `madvise` mode, so kvalloc asks for its own large arrays (the tree's node
//! arrays and index, the arena's slab records and slot metadata): that advice alone recovers
//! most of the difference.

/// Arrays smaller than this are left alone: they fit a few pages' TLB entries anyway, and a huge
/// page is only worth it once the array spans several.
pub(crate) const MIN_BYTES: usize = 4 << 20;

/// Advises huge pages for the whole 2 MiB-aligned part of `v`'s allocation (its capacity, not
/// just its length, so growth within it is covered), when that is at least [`MIN_BYTES`]. A hint:
/// where the system refuses or does not support it, nothing happens.
pub(crate) fn advise<T>(v: &Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < MIN_BYTES {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + bytes) / HUGE * HUGE;
        if end > first {
            // SAFETY: the range lies inside `v`'s live allocation; MADV_HUGEPAGE changes no
            // contents and cannot unmap anything.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// Makes room for `additional` more elements in `v` as `Vec::reserve` does (amortized
/// doubling), advising huge pages for the new allocation before anything touches its new part.
#[inline(always)]
pub(crate) fn reserve<T>(v: &mut Vec<T>, additional: usize) {
    if v.capacity() - v.len() < additional {
        grow(v, additional);
    }
}

#[cold]
#[inline(never)]
fn grow<T>(v: &mut Vec<T>, additional: usize) {
    v.reserve(additional);
    advise(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_leaves_contents_alone() {
        let mut v: Vec<u64> = Vec::with_capacity(MIN_BYTES);
        v.extend(0..1000);
        advise(&v);
        v.extend(1000..(MIN_BYTES as u64));
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        advise(&Vec::<u8>::new()); // nothing to advise
    }

    #[test]
    fn reserve_makes_room_and_keeps_contents() {
        let mut v: Vec<u32> = (0..10).collect();
        reserve(&mut v, 5 << 20);
        assert!(v.capacity() >= 10 + (5 << 20));
        assert_eq!(v, (0..10).collect::<Vec<_>>());
        let cap = v.capacity();
        reserve(&mut v, 1);
        assert_eq!(v.capacity(), cap, "room already there: no reallocation");
    }
}
