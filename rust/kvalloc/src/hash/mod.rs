//! Chained 64-bit block hashes.
//!
//! Block `i` of a sequence is identified by `h_i = xxh3_64_with_seed(content_i, h_{i-1})`, where
//! `content_i` is the block's token ids (little-endian `i64`s) or, for traces that carry their
//! own block ids, the id's bytes. The chain makes a hash name the whole prefix up to its block,
//! so a prefix index can key blocks by hash alone. The seed of block 0 is derived from the
//! tenant salt: two salts never produce the same chain, so tenants never share KV.
//!
//! xxh3 is used for speed (tens of GB/s) and quality; it is not a cryptographic hash. A
//! collision between two different prefixes (probability ~n^2 / 2^65 for n cached blocks) would
//! alias their KV; engines that need adversarial resistance should put a secret in the salt.

mod hashers;
mod table;

pub use hashers::{IdentityHasher, ReqIdHasher};
pub use table::HashIndex;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The hash chain's seed for a tenant salt (`None`: the shared, unsalted namespace).
pub fn root_seed(salt: Option<&[u8]>) -> u64 {
    const UNSALTED: u64 = 0x6b76_616c_6c6f_6321; // "kvalloc!"
    match salt {
        None => UNSALTED,
        // Distinct from UNSALTED for every salt, including the empty one.
        Some(s) => xxh3_64_with_seed(s, UNSALTED ^ 0x5a17),
    }
}

/// Hash of one block of token ids, chained to `prev`: xxh3 of the ids' little-endian bytes.
pub fn token_block(prev: u64, tokens: &[i64]) -> u64 {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: `i64` has no padding and any byte pattern is a valid `u8`; the byte slice
        // covers exactly the same memory as `tokens` and lives no longer than it. On a
        // little-endian target these are the ids' little-endian bytes, hashed without a copy.
        let bytes = unsafe {
            std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens))
        };
        xxh3_64_with_seed(bytes, prev)
    }
    #[cfg(not(target_endian = "little"))]
    {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, prev)
    }
}

/// Hash of a block given by an external id (a trace's block hash), chained to `prev`. Chaining
/// again is harmless for ids that are already prefix-chained and makes unchained ids match on
/// the whole sequence, never on one id alone.
pub fn id_block(prev: u64, id: u64) -> u64 {
    xxh3_64_with_seed(&id.to_le_bytes(), prev ^ 0x1d5)
}

/// Chains the whole blocks of `tokens` (a trailing partial block is not hashed).
pub fn chain_tokens(seed: u64, tokens: &[i64], block_tokens: usize, out: &mut Vec<u64>) {
    let mut prev = out.last().copied().unwrap_or(seed);
    for block in tokens.chunks_exact(block_tokens) {
        prev = token_block(prev, block);
        out.push(prev);
    }
}

/// Chains externally given block ids.
pub fn chain_ids(seed: u64, ids: &[u64], out: &mut Vec<u64>) {
    let mut prev = out.last().copied().unwrap_or(seed);
    for &id in ids {
        prev = id_block(prev, id);
        out.push(prev);
    }
}

/// A 64-bit digest of arbitrary bytes (fingerprints, derived ids).
pub fn digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_prefix_and_salt() {
        let a: Vec<i64> = (0..64).collect();
        let mut b = a.clone();
        b[3] = 99; // differs in block 0 only
        let (mut ha, mut hb) = (Vec::new(), Vec::new());
        chain_tokens(root_seed(None), &a, 16, &mut ha);
        chain_tokens(root_seed(None), &b, 16, &mut hb);
        assert_eq!(ha.len(), 4);
        // Block 1 has equal content but a different prefix, so a different hash.
        assert!(ha.iter().zip(&hb).all(|(x, y)| x != y));
        let mut hs = Vec::new();
        chain_tokens(root_seed(Some(b"tenant")), &a, 16, &mut hs);
        assert_ne!(ha[0], hs[0]);
        assert_ne!(root_seed(Some(b"")), root_seed(None));
    }

    #[test]
    fn chaining_is_incremental() {
        let t: Vec<i64> = (0..100).collect();
        let mut all = Vec::new();
        chain_tokens(7, &t[..96], 16, &mut all);
        let mut parts = Vec::new();
        chain_tokens(7, &t[..32], 16, &mut parts);
        chain_tokens(7, &t[32..96], 16, &mut parts);
        assert_eq!(all, parts);
        // The hash is of the ids' little-endian bytes, whatever the target.
        let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(token_block(1, &t), xxh3_64_with_seed(&bytes, 1));
        assert_ne!(token_block(1, &t), token_block(2, &t));
    }

    #[test]
    fn unchained_ids_match_on_sequence() {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        chain_ids(1, &[10, 20, 30], &mut x);
        chain_ids(1, &[11, 20, 30], &mut y);
        assert_ne!(x[1], y[1]); // same id 20, different prefix
    }
}
