//! Which pages hold a whole block: the manager's record of what the engine has computed.
//!
//! A block's page is *whole* once its owner has scheduled every token of the block (the engine
//! computes what it is scheduled in the step that schedules it). Only whole pages may be
//! published in the prefix tree: a page that a later request reads as cached must hold every
//! token of its block, computed by the request that allocated it. The record is independent of
//! the tree's bookkeeping, so [`KVCacheManager::validate`](super::KVCacheManager::validate) can
//! check the tree against it: a tree block whose page is not whole is a wrong-bytes bug.
//!
//! One bit per slot id (a handle's low half: unique among live handles, reused after a free),
//! written whenever a request's table entry is (re)computed, so a reused slot never carries an
//! earlier life's bit.

use crate::slab::Handle;

#[derive(Debug, Default)]
pub(super) struct WrittenPages {
    bits: Vec<u64>,
}

impl WrittenPages {
    #[inline(always)]
    fn at(h: Handle) -> (usize, u64) {
        let id = h as u32 as usize;
        (id >> 6, 1u64 << (id & 63))
    }

    /// Records whether `h`'s block is whole.
    #[inline(always)]
    pub(super) fn set(&mut self, h: Handle, whole: bool) {
        let (word, bit) = Self::at(h);
        if word >= self.bits.len() {
            if !whole {
                return; // absent reads as "not whole"
            }
            self.bits.resize(word + 1, 0);
        }
        if whole {
            self.bits[word] |= bit;
        } else {
            self.bits[word] &= !bit;
        }
    }

    /// Whether `h`'s block is whole.
    pub(super) fn is_whole(&self, h: Handle) -> bool {
        let (word, bit) = Self::at(h);
        self.bits.get(word).is_some_and(|w| w & bit != 0)
    }
}
