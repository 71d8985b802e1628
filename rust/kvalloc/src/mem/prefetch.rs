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
/// prefetch of any other address is harmless and wasted); nothing when `count` is 0. A loop
/// over a length known at run time: for one value, [`prefetch_whole`] unrolls (the records an
/// admission rewrites: a loop there costs more per record).
#[inline(always)]
pub(crate) fn prefetch_range<T>(p: *const T, count: usize) {
    let start = p as usize;
    let end = start + count * std::mem::size_of::<T>();
    // From the line holding the first byte; none when the range is empty.
    let mut line = if end > start { start & !63 } else { end };
    while line < end {
        prefetch(line as *const u8);
        line += 64;
    }
}
