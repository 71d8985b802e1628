//! L1: the engine's device buffer, behind a copy interface.
//!
//! The engine registers one buffer of the manager's `capacity_bytes`; group `g`'s blocks are
//! pages of that buffer (page `p` of group `g` starts at `p * block_bytes[g]`, the arena's byte
//! offset). kvalloc moves bytes in and out of it only through [`DeviceBuffer`], so a CUDA
//! implementation (`cudaMemcpyAsync` on a copy stream) can replace [`HostBuffer`] without
//! touching any policy.
//!
//! Contract: kvalloc reads a block only after the engine finished writing it (the request that
//! wrote it has finished or been extended past it), and writes a block only while no request
//! reads it (a block being loaded belongs to a request that waits for the load).

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Copies between host memory and a device buffer.
pub trait DeviceBuffer: Send + Sync {
    /// Size of the buffer in bytes.
    fn len(&self) -> u64;

    /// Whether the buffer is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `src` into the buffer at `offset` (host to device). The range is in bounds (the
    /// caller checks).
    fn write(&self, offset: u64, src: &[u8]);

    /// Copies from the buffer at `offset` into `dst` (device to host).
    fn read(&self, offset: u64, dst: &mut [u8]);
}

/// A device buffer that is plain host memory (a numpy array, or memory the caller owns): the
/// CPU reference implementation.
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    /// Keeps the memory alive (e.g. a reference to the numpy array).
    _owner: Box<dyn Any + Send + Sync>,
}

// SAFETY: the buffer is plain memory kept alive by `_owner`; concurrent copies touch disjoint
// blocks (the contract in the module docs), as a device's copy engines would.
unsafe impl Send for HostBuffer {}
// SAFETY: as above.
unsafe impl Sync for HostBuffer {}

impl fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostBuffer({} bytes)", self.len)
    }
}

impl HostBuffer {
    /// A buffer over `len` bytes at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as `owner` lives, and
    /// nothing else may free or move that memory meanwhile.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, owner: Box<dyn Any + Send + Sync>) -> Self {
        HostBuffer {
            ptr,
            len,
            _owner: owner,
        }
    }

    /// A buffer that owns `len` zeroed bytes (tests, benches, Rust engines).
    pub fn zeroed(len: usize) -> Self {
        let mut v = vec![0u8; len].into_boxed_slice();
        let ptr = v.as_mut_ptr();
        // SAFETY: the boxed slice is the owner; a Box's heap memory does not move when the box
        // does, and it lives as long as `_owner`.
        unsafe { HostBuffer::from_raw(ptr, len, Box::new(SendBox(v))) }
    }

    /// `len` zeroed bytes of anonymous memory, reserved but not touched: a page is backed when
    /// it is first written, or by [`populate_in_background`](Self::populate_in_background),
    /// so a large host tier costs nothing up front (touching every page costs seconds per
    /// GiB). Transparent huge pages are asked for. More than the system reports available
    /// now, or a mapping the system refuses, is an [`Error::SystemMemory`] naming `what`, never an abort.
    pub fn anonymous(len: usize, what: &str) -> Result<Self> {
        let refuse = |message: String| Error::SystemMemory {
            what: what.to_string(),
            requested_bytes: len as u64,
            message,
        };
        if let Some(avail) = crate::mem::prefault::available_memory() {
            if len as u64 > avail {
                return Err(refuse(format!(
                    "but the system has {avail} bytes available: give at most that"
                )));
            }
        }
        let map =
            Mapping::new(len).map_err(|e| refuse(format!("but the system refused them: {e}")))?;
        map.advise_huge_pages();
        let ptr = map.ptr;
        // SAFETY: the mapping is valid for reads and writes of `len` bytes until it is
        // dropped with the buffer, and nothing else refers to it.
        Ok(unsafe { HostBuffer::from_raw(ptr, len, Box::new(map)) })
    }

    /// Backs the whole buffer with memory from a background thread, front to back, without
    /// changing its contents (Linux's `MADV_POPULATE_WRITE`, a chunk at a time), so that copies
    /// into it find their pages already there: a first-touch fault per page on the demotion
    /// path makes L1 -> L2 copies an order of magnitude slower (`benches/test_bench_tiers.py`),
    /// while faulting them all in before returning made registration take seconds per GiB.
    /// Copies may run meanwhile: a page either side of them is faulted in once, by whichever
    /// comes first. The thread holds the buffer only during a chunk and stops once the buffer
    /// is dropped. None where the system offers neither the call nor a thread; the memory is
    /// then backed page by page as it is first written.
    pub fn populate_in_background(self: &Arc<Self>) -> Option<std::thread::JoinHandle<()>> {
        if cfg!(not(target_os = "linux")) {
            return None;
        }
        let buffer = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("kvalloc-populate".into())
            .spawn(move || {
                let mut at = 0;
                while let Some(buf) = buffer.upgrade() {
                    if at >= buf.len || !buf.populate(at, POPULATE_CHUNK) {
                        break;
                    }
                    at += POPULATE_CHUNK;
                }
            })
            .ok()
    }

    /// Faults in the pages of `[at, at + len)` (clipped to the buffer) for writing, keeping
    /// their contents; false where the system cannot.
    fn populate(&self, at: usize, len: usize) -> bool {
        #[cfg(target_os = "linux")]
        {
            const PAGE: usize = 4096;
            let start = (self.ptr as usize + at) / PAGE * PAGE;
            let end = self.ptr as usize + at + len.min(self.len - at);
            // SAFETY: the pages hold the range, inside memory this buffer keeps mapped (a page
            // it shares with a neighbour is faulted in, not changed); MADV_POPULATE_WRITE
            // changes no contents.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_POPULATE_WRITE,
                ) == 0
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (at, len);
            false
        }
    }

    /// Asks for transparent huge pages (fewer TLB misses in big copies; numpy does the same for
    /// its large arrays) and writes one byte per page so the memory is resident before the
    /// first copy.
    pub fn prefault(&self) {
        const PAGE: usize = 4096;
        advise_huge_pages(self.ptr, self.len);
        let mut o = 0;
        while o < self.len {
            // SAFETY: in bounds; called before the buffer is shared with any copy.
            unsafe { self.ptr.add(o).write_volatile(0) };
            o += PAGE;
        }
    }

    fn check(&self, offset: u64, n: usize) -> usize {
        let o = usize::try_from(offset).expect("offset fits usize");
        assert!(
            o.checked_add(n).is_some_and(|e| e <= self.len),
            "copy of {n} bytes at {o} outside a {}-byte device buffer",
            self.len
        );
        o
    }
}

struct SendBox(#[allow(dead_code)] Box<[u8]>);

/// Bytes [`HostBuffer::populate_in_background`] faults in per call: a dropped buffer stops
/// the thread within one chunk (tens of milliseconds).
const POPULATE_CHUNK: usize = 64 << 20;

/// Zeroed anonymous memory of [`HostBuffer::anonymous`], unmapped (freed) on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; access goes through the `HostBuffer` that owns it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` zeroed bytes (an empty mapping for 0), or the system's refusal.
    #[cfg(unix)]
    fn new(len: usize) -> std::io::Result<Self> {
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        // SAFETY: a new private anonymous mapping: no file, no existing memory involved.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// `len` zeroed bytes from the allocator (zeroed lazily where it maps large blocks).
    #[cfg(not(unix))]
    fn new(len: usize) -> std::io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 64)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::OutOfMemory, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        Ok(Mapping { ptr, len })
    }

    /// Transparent huge pages for the whole 2 MiB pages inside the mapping (advice only).
    fn advise_huge_pages(&self) {
        advise_huge_pages(self.ptr, self.len);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        #[cfg(unix)]
        if self.len > 0 {
            // SAFETY: the mapping made in `new`, unmapped once.
            unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            }
        }
        #[cfg(not(unix))]
        {
            let layout = std::alloc::Layout::from_size_align(self.len.max(1), 64)
                .expect("the layout of `new`");
            // SAFETY: allocated in `new` with this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr, layout) }
        }
    }
}

/// Copies `n` bytes from `src` to `dst`. Block-sized copies (hundreds of KiB to MiB) are below
/// the size where libc switches to non-temporal stores, yet each destination block is written
/// once and not read again soon: streaming stores skip the read-for-ownership of every
/// destination line, which makes such copies about a third faster.
///
/// # Safety
/// `src` valid for `n` reads, `dst` for `n` writes, the ranges disjoint.
unsafe fn copy_block(dst: *mut u8, src: *const u8, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        const MIN_STREAM: usize = 64 << 10;
        if n >= MIN_STREAM && (dst as usize).is_multiple_of(16) {
            let chunks = n / 64;
            // SAFETY: SSE2 is part of x86_64; every access is inside the ranges the caller
            // vouches for; `dst` is 16-byte aligned as streaming stores require.
            unsafe {
                let (mut d, mut s) = (dst.cast::<__m128i>(), src.cast::<__m128i>());
                for _ in 0..chunks {
                    let a = _mm_loadu_si128(s);
                    let b = _mm_loadu_si128(s.add(1));
                    let c = _mm_loadu_si128(s.add(2));
                    let e = _mm_loadu_si128(s.add(3));
                    _mm_stream_si128(d, a);
                    _mm_stream_si128(d.add(1), b);
                    _mm_stream_si128(d.add(2), c);
                    _mm_stream_si128(d.add(3), e);
                    d = d.add(4);
                    s = s.add(4);
                }
                _mm_sfence();
                let done = chunks * 64;
                std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), n - done);
            }
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, n) }
}

impl DeviceBuffer for HostBuffer {
    fn len(&self) -> u64 {
        self.len as u64
    }

    fn write(&self, offset: u64, src: &[u8]) {
        let o = self.check(offset, src.len());
        // SAFETY: in bounds (checked); the region is not aliased by a Rust reference (the
        // contract); `src` is a different allocation from the device buffer.
        unsafe { copy_block(self.ptr.add(o), src.as_ptr(), src.len()) }
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        let o = self.check(offset, dst.len());
        // SAFETY: as in `write`.
        unsafe { copy_block(dst.as_mut_ptr(), self.ptr.add(o), dst.len()) }
    }
}

impl HostBuffer {
    /// The bytes at `[offset, offset + len)`.
    ///
    /// # Safety
    /// No other reference to the range may exist while the slice lives, and no copy may write
    /// it concurrently (the pinning contract in the module docs).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: usize) -> &mut [u8] {
        let o = self.check(offset, len);
        // SAFETY: in bounds; exclusivity is the caller's obligation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(o), len) }
    }

    /// The bytes at `[offset, offset + len)`, read-only.
    ///
    /// # Safety
    /// No copy may write the range while the slice lives.
    pub unsafe fn slice(&self, offset: u64, len: usize) -> &[u8] {
        let o = self.check(offset, len);
        // SAFETY: in bounds; no concurrent writer is the caller's obligation.
        unsafe { std::slice::from_raw_parts(self.ptr.add(o), len) }
    }
}

/// Host memory shared between the manager and the loader thread (the L2 tier's bytes), with the
/// same disjointness contract as [`HostBuffer`]: an L2 block being read by a load is pinned and
/// cannot be reused until the load finished.
pub type HostMemory = HostBuffer;

impl fmt::Debug for dyn DeviceBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuffer({} bytes)", self.len())
    }
}

/// Asks for transparent huge pages over the whole 2 MiB pages inside `[ptr, ptr + len)`, a live
/// allocation (fewer TLB misses in big copies): advice, not a promise.
fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the caller's live allocation; MADV_HUGEPAGE changes
            // no contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_memory_is_zeroed_and_usable() {
        let buf = HostBuffer::anonymous(3 << 20, "test").unwrap();
        let mut back = vec![1u8; 4096];
        buf.read((3 << 20) - 4096, &mut back);
        assert!(back.iter().all(|&b| b == 0));
        buf.write(12345, &[7; 300]);
        buf.read(12345, &mut back[..300]);
        assert_eq!(back[..300], [7; 300]);
        assert!(HostBuffer::anonymous(0, "test").unwrap().is_empty());
    }

    /// Pages of `buf` in memory (Linux's `mincore`); `buf` must start on a page.
    #[cfg(target_os = "linux")]
    fn resident_pages(buf: &HostBuffer) -> usize {
        let pages = buf.len.div_ceil(4096);
        let mut v = vec![0u8; pages];
        // SAFETY: a page-aligned mapping of `len` bytes and a vector of one byte per page.
        let rc = unsafe { libc::mincore(buf.ptr.cast(), buf.len, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn anonymous_memory_is_untouched_until_populated_and_keeps_its_contents() {
        let len = 3 * POPULATE_CHUNK + 12345;
        let buf = Arc::new(HostBuffer::anonymous(len, "test").unwrap());
        assert_eq!(resident_pages(&buf), 0, "mapped, not touched");
        buf.write(5 << 20, &[9; 100]);
        buf.populate_in_background().unwrap().join().unwrap();
        assert_eq!(resident_pages(&buf), len.div_ceil(4096));
        let mut back = [0u8; 101];
        buf.read((5 << 20) - 1, &mut back);
        assert_eq!(back[0], 0);
        assert_eq!(back[1..], [9; 100]);
        // A dropped buffer stops the thread (it holds the buffer only during a chunk).
        let short = Arc::new(HostBuffer::anonymous(8 * POPULATE_CHUNK, "test").unwrap());
        let t = short.populate_in_background().unwrap();
        drop(short);
        t.join().unwrap();
    }

    #[test]
    fn memory_the_system_does_not_have_is_an_error_not_an_abort() {
        let avail = crate::mem::prefault::available_memory().expect("this platform says");
        for len in [avail + 1, 1 << 62, u64::MAX] {
            let e = HostBuffer::anonymous(len as usize, "host_bytes").unwrap_err();
            assert!(
                matches!(e, Error::SystemMemory { ref what, requested_bytes, .. }
                    if what == "host_bytes" && requested_bytes == len),
                "{e}"
            );
        }
    }

    #[test]
    fn block_copies_of_every_shape_are_exact() {
        let src: Vec<u8> = (0..(300u32 << 10))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let dev = HostBuffer::zeroed(1 << 20);
        // Large (streaming) and small copies, aligned and not, with tails that are not a
        // multiple of 64 bytes.
        for &(off, len) in &[
            (0u64, 300usize << 10),
            (4096, (128 << 10) + 37),
            (17, 100 << 10),
            (512, 63),
            (65536, 1),
        ] {
            dev.write(off, &src[..len]);
            let mut back = vec![0u8; len];
            dev.read(off, &mut back);
            assert_eq!(back, src[..len], "offset {off} len {len}");
        }
    }
}
