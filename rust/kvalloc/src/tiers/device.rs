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

    /// Writes one byte per page so the memory is resident before the first copy.
    pub fn prefault(&self) {
        const PAGE: usize = 4096;
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

impl DeviceBuffer for HostBuffer {
    fn len(&self) -> u64 {
        self.len as u64
    }

    fn write(&self, offset: u64, src: &[u8]) {
        let o = self.check(offset, src.len());
        // SAFETY: in bounds (checked); the region is not aliased by a Rust reference (the
        // contract); `src` is a different allocation from the device buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(o), src.len()) }
    }

    fn read(&self, offset: u64, dst: &mut [u8]) {
        let o = self.check(offset, dst.len());
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(o), dst.as_mut_ptr(), dst.len()) }
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
