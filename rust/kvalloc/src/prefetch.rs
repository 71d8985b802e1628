//! A cache prefetch hint, for hot paths that know an address well before they read it.

/// Asks the CPU to start loading the cache line at `p` (and its page's translation). Never
/// faults, whatever `p` is; changes nothing observable. A no-op where the architecture has no
/// stable prefetch instruction.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it neither faults nor reads memory architecturally.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] for every cache line of the value at `p` (a record about to be rewritten).
#[inline(always)]
pub(crate) fn prefetch_whole<T>(p: *const T) {
    for line in 0..std::mem::size_of::<T>().div_ceil(64) {
        prefetch(p.cast::<u8>().wrapping_add(line * 64));
    }
}

/// [`prefetch`] for every cache line of `count` values from `p` (a range about to be written,
/// which may lie past a vector's length but must be within its allocation to be of use: a
/// prefetch of any other address is harmless and wasted).
#[inline(always)]
pub(crate) fn prefetch_range<T>(p: *const T, count: usize) {
    let bytes = count * std::mem::size_of::<T>();
    let start = p as usize;
    let mut line = start & !63;
    while line < start + bytes {
        prefetch(line as *const u8);
        line += 64;
    }
}
