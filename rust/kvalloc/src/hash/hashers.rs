//! `Hasher`s for keys that need little or no mixing (std's SipHash costs more than the rest of
//! a decode step).

use std::hash::Hasher;

/// Keys are already uniformly distributed hashes: hashing them again is wasted work.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Request ids are often sequential integers: spread them with one multiply (Fibonacci
/// hashing) rather than SipHash, which costs more than the rest of a decode step.
#[derive(Default, Clone, Copy)]
pub struct ReqIdHasher(u64);

impl Hasher for ReqIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
