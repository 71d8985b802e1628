//! A running request's record and the sets that hold records: the running map (id -> slot),
//! the last hopeless refusal, and a step's hashes computed ahead.

use std::hash::BuildHasherDefault;
use std::sync::Arc;

use super::api::Prompt;
use super::retention::Retention;
use crate::hash::{HashIndex, ReqIdHasher};
use crate::prefix::{CheckpointKind, NodeId};
use crate::slab::Handle;
use crate::tiers::loader::LoadJob;

pub(super) type ReqSet = std::collections::HashSet<u64, BuildHasherDefault<ReqIdHasher>>;

/// Running requests: an id -> slot map over a slab of boxed records, so that a batched step looks
/// each request up once (while checking the step) and then works on it by slot. A slot is `None`
/// when free, or while its record is taken out for an operation. The map is the prefix tree's
/// open-addressing [`HashIndex`]: one cache line per lookup where `HashMap` reads two (a decode
/// step looks up every running request).
#[derive(Debug, Default)]
pub(super) struct Running {
    pub(super) slots_by_id: HashIndex,
    pub(super) slots: Vec<Option<Box<Request>>>,
    pub(super) free: Vec<u32>,
}

impl Running {
    pub(super) fn len(&self) -> usize {
        self.slots_by_id.len()
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.slots_by_id.contains_key(id)
    }

    #[inline(always)]
    pub(super) fn slot(&self, id: u64) -> Option<usize> {
        self.slots_by_id.get(id).map(|s| s as usize)
    }

    pub(super) fn get(&self, id: u64) -> Option<&Request> {
        self.slots[self.slot(id)?].as_deref()
    }

    pub(super) fn at_mut(&mut self, slot: usize) -> Option<&mut Request> {
        self.slots[slot].as_deref_mut()
    }

    pub(super) fn insert(&mut self, id: u64, r: Box<Request>) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(r);
                s
            }
            None => {
                self.slots.push(Some(r));
                (self.slots.len() - 1) as u32
            }
        };
        let present = self.slots_by_id.get_or_insert(id, slot);
        debug_assert!(present.is_none(), "request {id} inserted twice");
    }

    pub(super) fn remove(&mut self, id: u64) -> Option<Box<Request>> {
        let slot = self.slots_by_id.remove(id)?;
        self.free.push(slot);
        self.slots[slot as usize].take()
    }

    /// (id, record) of every running request not taken out.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, &Request)> {
        self.slots_by_id
            .iter()
            .filter_map(|(id, s)| self.slots[s as usize].as_deref().map(|r| (id, r)))
    }

    /// The map's invariants, and every slot either holds a running request or is listed free.
    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        self.slots_by_id.validate()?;
        let free = self.slots.iter().filter(|s| s.is_none()).count();
        if self.len() + free != self.slots.len() || free != self.free.len() {
            return Err(format!(
                "{} running requests, {} slots, {free} of them free but {} listed free",
                self.len(),
                self.slots.len(),
                self.free.len()
            ));
        }
        Ok(())
    }
}

/// A running request. `repr(C)`, aligned to a cache line, with the fields a decode step reads
/// first, so that step touches one line of the record (plus its tail) when no block boundary
/// is crossed.
#[derive(Debug, Default)]
#[repr(C, align(64))]
pub(super) struct Request {
    /// Number of the last batched step that named this request.
    pub(super) stamp: u64,
    /// Scheduled tokens: the block tables cover `[0, len)` (`ceil(len / B)` blocks each).
    pub(super) len: u64,
    pub(super) prompt_len: u64,
    /// Where the last scheduled range began (its step still reads the window before it).
    pub(super) last_start: u64,
    /// Token ids after the last whole block (ids mode), for hashing output blocks.
    pub(super) tail: Vec<i64>,
    pub(super) by_ids: bool,
    pub(super) seed: u64,
    /// Chained hashes of the whole blocks known so far.
    pub(super) hashes: Vec<u64>,
    /// Per group, per block index: the block, or 0.
    pub(super) tables: Vec<Vec<Handle>>,
    /// Per group: blocks below this index hold nothing any more (released out of the window).
    pub(super) swa_floor: Vec<u64>,
    pub(super) hit: u64,
    /// Pinned tree nodes; `path[i]` is block i's node.
    pub(super) path: Vec<NodeId>,
    /// Nodes this request inserted (removed again on abort).
    pub(super) created: Vec<NodeId>,
    /// Checkpoints this request registered (removed again on abort).
    pub(super) created_ckpts: Vec<NodeId>,
    /// Planned prompt checkpoints: (end block, run includes one extra block), ascending.
    pub(super) plans: Vec<(u32, bool, CheckpointKind)>,
    /// Plans registered so far.
    pub(super) plans_done: usize,
    /// Speculative checkpoints: every prompt block this request computes keeps its SWA KV, as
    /// a checkpoint at each block boundary (see [`ManagerConfig::speculative_checkpoints`]).
    /// The next boundary to register; 0: not speculating.
    pub(super) spec_next: u32,
    /// Serial for synthetic output-block ids (hash mode).
    pub(super) serial: u64,
    /// Loads its hit waits for (promotions from host memory in flight at admission).
    pub(super) loads: Vec<Arc<LoadJob>>,
    /// What it asked of the cache (priority, pin, opt-out).
    pub(super) retention: Retention,
}

/// The last admission refused as hopeless. A scheduler retries its queue's head every step: a
/// retry of the same prompt reuses its chained hashes, and while its walk would give the same
/// answer (the tree's version stands still, or at least no node of the matched path changed
/// and the path cannot be extended: then the need is the same too) and free plus all evictable
/// bytes are still short of that need, it is refused without a walk.
#[derive(Debug, Default)]
pub(super) struct Refused {
    pub(super) valid: bool,
    pub(super) req: u64,
    pub(super) seed: u64,
    pub(super) by_ids: bool,
    /// Its retention (an opt-out or a pin changes what admitting it needs).
    pub(super) retention: Retention,
    /// The prompt as given: token ids, or block ids with the length in tokens.
    pub(super) tokens: Vec<i64>,
    pub(super) ids: Vec<u64>,
    pub(super) num_tokens: u64,
    /// Its chained block hashes.
    pub(super) hashes: Vec<u64>,
    /// The nodes its last walk matched.
    pub(super) path: Vec<NodeId>,
    /// At the last refusal: the chunk limit, the need in bytes, the tree's version.
    pub(super) max_tokens: Option<u64>,
    pub(super) need_bytes: u64,
    pub(super) version: u64,
}

impl Refused {
    pub(super) fn same(
        &self,
        req: u64,
        seed: u64,
        prompt: &Prompt<'_>,
        retention: &Retention,
    ) -> bool {
        self.valid
            && self.req == req
            && self.seed == seed
            && self.retention == *retention
            && match *prompt {
                Prompt::Tokens(t) => self.by_ids && self.tokens == t,
                Prompt::BlockHashes { hashes, num_tokens } => {
                    !self.by_ids && self.num_tokens == num_tokens && self.ids == hashes
                }
            }
    }

    pub(super) fn remember(&mut self, req: u64, seed: u64, prompt: &Prompt<'_>, r: &Request) {
        self.valid = true;
        self.retention = r.retention;
        self.req = req;
        self.seed = seed;
        self.tokens.clear();
        self.ids.clear();
        match *prompt {
            Prompt::Tokens(t) => {
                self.by_ids = true;
                self.tokens.extend_from_slice(t);
            }
            Prompt::BlockHashes { hashes, num_tokens } => {
                self.by_ids = false;
                self.ids.extend_from_slice(hashes);
                self.num_tokens = num_tokens;
            }
        }
        self.hashes.clear();
        self.hashes.extend_from_slice(&r.hashes);
    }
}

/// A batched step's admissions' chained hashes, computed before its extensions run so that the
/// index lines their walks read can be prefetched meanwhile (see [`KVCacheManager::prehash`]).
#[derive(Debug, Default)]
pub(super) struct Prehashed {
    /// Per admission of the step: its chained hashes, where `ready`. Each is swapped with the
    /// admitted request's (emptied) vector, so capacity circulates and nothing is copied.
    pub(super) lists: Vec<Vec<u64>>,
    pub(super) ready: Vec<bool>,
}
