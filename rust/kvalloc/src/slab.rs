//! The slab arena: one byte budget, carved into equal slabs, each serving blocks of one size class.
//!
//! A *class* is a block size in bytes (in kvalloc: one class per KV group, block =
//! `block_tokens x bytes_per_token`). The slab size is a common multiple of every class's block
//! size, so a slab holds a whole number of blocks of any class: there is no padding inside a slab.
//! A slab that becomes empty goes back to the arena and may next serve another class, so memory
//! flows between the full-attention and sliding-window classes as demand shifts, with no static
//! split (the failure of SGLang's two pools) and no padding of small pages to large ones (vLLM's).
//!
//! Allocation takes blocks from the class's *current* slab while it has room, then from the
//! *fullest* partial slab, which becomes the current one, so that lightly used slabs drain and
//! return to the arena. Allocations and frees in the current slab touch no ordered set.
//!
//! ## Handles
//! A [`Handle`] is `tag << 56 | generation << 32 | slot_id`, with `slot_id = slab * stride +
//! slot`. Each slab issues generations from its own counter (24 bits, never 0), so a freed or
//! reallocated block's old handle never matches a live one: using it is an
//! [`Error::StaleHandle`], never an alias. (After 2^24 allocations within one slab the counter
//! wraps; a handle kept that long could alias.) The tag is 8 bits of the arena's serial number,
//! so a handle of another arena is refused too (one compare per handle; two arenas made 256
//! apart share a tag, and their handles are told apart only by the slot's generation).
//!
//! ## Invariants (checked by [`SlabArena::validate`])
//! - every slab is either free (no class, no blocks, listed once in the free-slab stack) or held by
//!   exactly one class, with `used + free slots = blocks_per_slab`;
//! - a held slab with free slots is in its class's partial set under its current free count,
//!   except the class's current slab, which is in no set; a full slab is not in it; an empty slab
//!   is never held;
//! - per-class counters equal the sums over slabs; `bytes_in_use + bytes_free = capacity`.

use std::collections::BTreeSet;

use crate::error::{Error, Result, StaleReason};
use crate::mem::prefault;

/// An allocated block: `tag << 56 | generation << 32 | slot_id`. Opaque to users; `0` is never
/// valid (a generation is never 0), so callers may use it for "no block".
pub type Handle = u64;

/// [`SlabArena::page`] for the live handles of one class, with no per-handle lookup: a
/// handle's page is `slab * blocks_per_slab + slot`. Valid only for live handles of that class
/// while the arena is not changed.
#[derive(Debug, Clone, Copy)]
pub struct PageMap {
    stride_shift: u32,
    slot_mask: u64,
    blocks_per_slab: u64,
}

impl PageMap {
    /// The page of a live handle of this map's class.
    #[inline]
    pub fn page(self, h: Handle) -> u64 {
        let id = h & 0xFFFF_FFFF;
        (id >> self.stride_shift) * self.blocks_per_slab + (id & self.slot_mask)
    }
}

/// Marks a slot as "seen in this batch" while a batch free validates its handles.
const PENDING_FREE: u32 = 1 << 31;
/// Generations use the low 24 bits (a handle's bits 32..56).
const GEN_MASK: u32 = (1 << 24) - 1;
/// A handle's arena tag: its top 8 bits.
const TAG_SHIFT: u32 = 56;
/// Serial numbers of arenas, whose low 8 bits tag their handles.
static ARENA_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The tag of a new arena's handles: the next serial number's low 8 bits, in place.
fn next_tag() -> u64 {
    let serial = ARENA_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (serial & 0xFF) << TAG_SHIFT
}
/// Smallest slab we aim for when the block sizes' common multiple is tiny: small slabs make
/// the per-slab bookkeeping dominate, large ones make memory flow in coarse steps.
const TARGET_MIN_SLAB_BYTES: u64 = 4 << 20;
/// Keep at least this many slabs when the budget is small, so that memory can still flow.
const MIN_SLABS_WANTED: u64 = 64;

/// The generation after `gen`: 1..=GEN_MASK, never 0 (a compare, not a modulo: this runs for
/// every block allocated).
#[inline(always)]
fn next_gen(gen: u32) -> u32 {
    if gen >= GEN_MASK {
        1
    } else {
        gen + 1
    }
}

/// Never-used slabs materialized at once when the free stack runs out.
const MATERIALIZE_BATCH: u32 = 64;

/// End of a slab's free list.
const NIL: u32 = u32::MAX;

/// One slot's bookkeeping in [`SlabArena::slots`].
#[derive(Debug, Clone, Copy, Default)]
struct SlotMeta {
    /// Generation of the block in the slot; 0 = free.
    gen: u32,
    /// Next free slot of the slab plus one (0 ends the list), so that all zeroes is a valid
    /// start.
    next: u32,
}

#[derive(Debug, Clone)]
struct Slab {
    /// Class served, or `None` when the slab is free.
    class: Option<u32>,
    /// Live blocks.
    used: u32,
    /// Head of the slab's free-slot list (threaded through `SlabArena::next`), or `NIL`.
    free_head: u32,
    /// Length of that list.
    free_len: u32,
    /// Last generation issued by this slab (monotone across classes, wraps at 2^31).
    gen_counter: u32,
    /// Set while a batch free is releasing blocks of this slab.
    in_batch: bool,
}

impl Slab {
    /// A slab serving no class.
    fn free() -> Self {
        Slab {
            class: None,
            used: 0,
            free_head: NIL,
            free_len: 0,
            gen_counter: 0,
            in_batch: false,
        }
    }
}

#[derive(Debug)]
struct Class {
    block_bytes: u64,
    blocks_per_slab: u32,
    /// Held slabs with at least one free slot, keyed by (free slots, slab): the first entry is
    /// the fullest partial slab. The current slab is not in it.
    partial: BTreeSet<(u32, u32)>,
    /// The slab allocations take from until it is full (NIL: none): a held slab of this class,
    /// in no set, possibly full. Always NIL for a one-block-per-slab class (`take_whole_slab`).
    current: u32,
    /// Free slots in this class's held slabs: the counts in `partial` plus the current slab's
    /// (kept exact, so availability is O(1)).
    free_in_partial: u64,
    slabs_held: u32,
    blocks_in_use: u64,
}

impl Class {
    fn free_in_partial(&self) -> u64 {
        self.free_in_partial
    }

    fn insert_partial(&mut self, free: u32, slab: u32) {
        self.partial.insert((free, slab));
        self.free_in_partial += u64::from(free);
    }

    fn remove_partial(&mut self, free: u32, slab: u32) {
        if self.partial.remove(&(free, slab)) {
            self.free_in_partial -= u64::from(free);
        }
    }
}

/// Per-class figures from [`SlabArena::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassStats {
    /// Block size of the class in bytes.
    pub block_bytes: u64,
    /// Blocks of this class that fit in one slab.
    pub blocks_per_slab: u32,
    /// Live blocks of this class.
    pub blocks_in_use: u64,
    /// Slabs currently serving this class.
    pub slabs_held: u32,
    /// Free blocks inside the slabs this class holds.
    pub blocks_free_in_slabs: u64,
}

/// Arena-wide figures from [`SlabArena::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaStats {
    /// The byte budget the arena was given.
    pub capacity_bytes: u64,
    /// Size of every slab.
    pub slab_bytes: u64,
    /// Number of slabs carved from the budget.
    pub num_slabs: u32,
    /// Slabs serving no class.
    pub slabs_free: u32,
    /// Bytes of live blocks.
    pub bytes_in_use: u64,
    /// Bytes that can still be allocated (free slabs plus free blocks in held slabs).
    pub bytes_free: u64,
    /// Bytes inside held slabs that no block can use; 0 by construction (every block size
    /// divides the slab size).
    pub padding_waste_bytes: u64,
    /// The remainder of the budget that is smaller than one slab.
    pub tail_bytes: u64,
    /// One entry per class, in class order.
    pub classes: Vec<ClassStats>,
}

/// One byte budget carved into slabs, each serving blocks of exactly one size class at a time.
///
/// ```
/// use kvalloc::SlabArena;
/// // Two classes: 4 KiB and 12 KiB blocks; the slab size is a common multiple of both.
/// let mut arena = SlabArena::new(16 << 20, &[4096, 12288], None)?;
/// assert_eq!(arena.slab_bytes() % 12288, 0);
/// let a = arena.alloc(0, 10)?;
/// let b = arena.alloc(1, 3)?;
/// assert!(arena.free(&a).is_ok());
/// assert!(arena.free(&a).is_err()); // double free is refused and changes nothing
/// arena.free(&b)?;
/// assert_eq!(arena.stats().slabs_free, arena.stats().num_slabs); // everything flowed back
/// # Ok::<(), kvalloc::Error>(())
/// ```
#[derive(Debug)]
pub struct SlabArena {
    capacity_bytes: u64,
    slab_bytes: u64,
    /// Slot-id spacing between slabs: the most blocks any class fits in one slab, rounded up
    /// to a power of two (`1 << stride_shift`).
    stride: u64,
    stride_shift: u32,
    /// This arena's handle tag (`serial << 56`), ORed into every handle it issues.
    tag: u64,
    classes: Vec<Class>,
    slabs: Vec<Slab>,
    /// Every slot's generation and free-list link, at `slab * stride + slot`. One flat array
    /// rather than a vector per slab (taking a fresh slab allocates nothing), the two fields
    /// side by side (allocating or freeing a block touches one cache line, not two).
    slots: Vec<SlotMeta>,
    /// Free materialized slabs, as a stack (the most recently freed slab is reused first;
    /// below the recycled ones, fresh ones of the last batch, lowest index on top). Slabs
    /// never materialized (`slabs.len()..num_slabs`) are free too: they are materialized as
    /// needed, [`MATERIALIZE_BATCH`] at a time, so a huge budget (a simulation's "unbounded" 1 PiB) costs
    /// nothing up front.
    free_slabs: Vec<u32>,
    /// Slabs the budget holds (materialized or not).
    num_slabs: u32,
    /// Scratch for `free`: slabs touched by the batch and their free counts before it (kept to
    /// avoid an allocation per call).
    touched: Vec<(u32, u32)>,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: u64, b: u64) -> Option<u64> {
    (a / gcd(a, b)).checked_mul(b)
}

/// Slots to reserve (address space only) for the per-slot arrays: all of them up to 2^24 (64
/// MiB of address space per array), beyond that the arrays grow as slabs materialize.
fn reserve_slots(num_slabs: u64, stride: u64) -> usize {
    const MAX_RESERVED: u64 = 1 << 24;
    num_slabs.saturating_mul(stride).min(MAX_RESERVED) as usize
}

/// `v`, with huge pages advised for its reserved (untouched) capacity.
fn advised<T>(v: Vec<T>) -> Vec<T> {
    crate::mem::hugepage::advise(&v);
    v
}

impl SlabArena {
    /// Creates an arena of `capacity_bytes` serving one class per entry of `block_bytes`.
    ///
    /// `slab_bytes`, when given, must be a multiple of every block size; when `None`, the arena
    /// picks the least common multiple of the block sizes (for a single class: scaled up towards
    /// 4 MiB while leaving at least 64 slabs in small budgets).
    pub fn new(capacity_bytes: u64, block_bytes: &[u64], slab_bytes: Option<u64>) -> Result<Self> {
        if capacity_bytes == 0 {
            return Err(Error::invalid("capacity_bytes", "must be positive"));
        }
        if block_bytes.is_empty() {
            return Err(Error::invalid(
                "block_bytes",
                "at least one class is needed",
            ));
        }
        if block_bytes.len() > u32::MAX as usize {
            return Err(Error::invalid("block_bytes", "too many classes"));
        }
        if let Some(i) = block_bytes.iter().position(|&b| b == 0) {
            return Err(Error::invalid(
                "block_bytes",
                format!("class {i} has a block size of 0"),
            ));
        }
        let mut common = 1u64;
        for &b in block_bytes {
            common = lcm(common, b).ok_or_else(|| {
                Error::invalid(
                    "block_bytes",
                    "the least common multiple of the block sizes overflows 64 bits",
                )
            })?;
        }
        let slab = match slab_bytes {
            Some(s) => {
                if s == 0 {
                    return Err(Error::invalid("slab_bytes", "must be positive"));
                }
                if let Some((i, b)) = block_bytes.iter().enumerate().find(|(_, &b)| s % b != 0) {
                    return Err(Error::invalid(
                        "slab_bytes",
                        format!(
                            "{s} is not a multiple of class {i}'s block size {b} \
                             (the smallest valid slab is {common} bytes)"
                        ),
                    ));
                }
                s
            }
            // Several classes: the least common multiple itself, so that a slab holds as few
            // blocks of the largest class as possible and frees up for another class as soon
            // as those few blocks go (larger slabs strand free blocks of one class that another
            // class cannot use). One class: nothing flows, so scale up to amortise per-slab work.
            None if block_bytes.len() > 1 => common,
            None => {
                let target = TARGET_MIN_SLAB_BYTES.min(capacity_bytes / MIN_SLABS_WANTED);
                common * (target / common).max(1)
            }
        };
        if slab > capacity_bytes {
            return Err(Error::invalid(
                "capacity_bytes",
                format!(
                    "{capacity_bytes} bytes is less than one slab ({slab} bytes, a common \
                     multiple of the block sizes {block_bytes:?})"
                ),
            ));
        }
        let num_slabs = capacity_bytes / slab;
        let min_block = *block_bytes.iter().min().expect("non-empty");
        // A power of two, so that decoding a handle is a shift and a mask, not a division.
        let stride = (slab / min_block).next_power_of_two();
        if num_slabs > u64::from(u32::MAX) || num_slabs.saturating_mul(stride) > u64::from(u32::MAX)
        {
            return Err(Error::invalid(
                "capacity_bytes",
                format!(
                    "{capacity_bytes} bytes holds more than 2^32 blocks of {min_block} bytes; \
                     use larger blocks"
                ),
            ));
        }
        let classes = block_bytes
            .iter()
            .map(|&b| Class {
                block_bytes: b,
                blocks_per_slab: (slab / b) as u32,
                partial: BTreeSet::new(),
                current: NIL,
                free_in_partial: 0,
                slabs_held: 0,
                blocks_in_use: 0,
            })
            .collect();
        Ok(SlabArena {
            capacity_bytes,
            slab_bytes: slab,
            stride,
            stride_shift: stride.trailing_zeros(),
            tag: next_tag(),
            classes,
            slabs: Vec::new(),
            // Reserved, not touched: the pages are committed as slabs materialize, and growing
            // never copies (a realloc of these arrays showed up on the admission path).
            slots: advised(Vec::with_capacity(reserve_slots(num_slabs, stride))),
            free_slabs: Vec::new(),
            num_slabs: num_slabs as u32,
            touched: Vec::new(),
        })
    }

    /// Commits the bookkeeping memory of as many not yet materialized slabs as `max_bytes`
    /// covers, so that materializing them faults no page in (see
    /// [`ManagerConfig::prefault_bytes`](crate::ManagerConfig::prefault_bytes)). Changes no
    /// state. Returns the bytes committed; an error if the system refuses the memory.
    pub fn prefault(&mut self, max_bytes: u64) -> Result<u64> {
        let per_slab = Self::record_bytes(self.stride);
        let unborn = u64::from(self.num_slabs) - self.slabs.len() as u64;
        let n = unborn.min(max_bytes / per_slab) as usize;
        let slots = n * self.stride as usize;
        prefault::commit(&mut self.slots, slots, SlotMeta::default())?;
        prefault::commit(&mut self.slabs, n, Slab::free())?;
        Ok(n as u64 * per_slab)
    }

    /// Bookkeeping bytes per slab: its record, and a generation and a free-list link per slot.
    fn record_bytes(stride: u64) -> u64 {
        (std::mem::size_of::<Slab>() + stride as usize * std::mem::size_of::<SlotMeta>()) as u64
    }

    /// The byte budget.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// The size of every slab.
    pub fn slab_bytes(&self) -> u64 {
        self.slab_bytes
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Block size of `class`.
    pub fn block_bytes(&self, class: usize) -> Result<u64> {
        Ok(self.class(class)?.block_bytes)
    }

    /// Live blocks of `class`.
    pub fn blocks_in_use(&self, class: usize) -> Result<u64> {
        Ok(self.class(class)?.blocks_in_use)
    }

    /// Number of pages in `class`'s view of the whole arena (`capacity / block_bytes`): every
    /// page index this arena can return for the class is below it.
    pub fn num_pages(&self, class: usize) -> Result<u64> {
        let c = self.class(class)?;
        Ok(u64::from(self.num_slabs) * self.slab_bytes / c.block_bytes)
    }

    /// Blocks of `class` that an allocation could get right now (free slots in the class's
    /// slabs plus every free slab).
    pub fn available(&self, class: usize) -> Result<u64> {
        let c = self.class(class)?;
        Ok(c.free_in_partial() + self.free_slab_count() * u64::from(c.blocks_per_slab))
    }

    /// Bytes that can still be allocated (free slabs plus free blocks in held slabs), in O(classes).
    pub fn bytes_free(&self) -> u64 {
        self.bytes_free_in_slabs() + self.free_slab_count() * self.slab_bytes
    }

    /// Free bytes inside held slabs (usable only by each slab's own class), in O(classes).
    pub fn bytes_free_in_slabs(&self) -> u64 {
        self.classes
            .iter()
            .map(|c| c.free_in_partial * c.block_bytes)
            .sum()
    }

    /// Free slabs: recycled ones plus those never used.
    fn free_slab_count(&self) -> u64 {
        self.free_slabs.len() as u64 + u64::from(self.num_slabs) - self.slabs.len() as u64
    }

    /// Requests the lines that taking the next `n` free slabs writes (each slab's record and its
    /// first slot's metadata): a hint for a step about to allocate, since a free slab's lines
    /// are rarely in cache.
    pub fn prefetch_free_slabs(&self, n: usize) {
        use crate::mem::prefetch::prefetch;
        for &s in self.free_slabs.iter().rev().take(n) {
            prefetch(self.slabs.as_ptr().wrapping_add(s as usize));
            prefetch(
                self.slots
                    .as_ptr()
                    .wrapping_add(s as usize * self.stride as usize),
            );
        }
    }

    /// Whether `counts[c]` blocks of each class `c` (in class order; missing classes: none)
    /// could be allocated together right now. Each class first fills its own slabs' free
    /// blocks; the rest needs whole free slabs.
    pub fn fits(&self, counts: &[u64]) -> bool {
        debug_assert!(counts.len() <= self.classes.len());
        let mut slabs_needed = 0u64;
        for (&n, c) in counts.iter().zip(&self.classes) {
            if n > c.free_in_partial {
                let slabs = (n - c.free_in_partial).div_ceil(u64::from(c.blocks_per_slab));
                slabs_needed = slabs_needed.saturating_add(slabs);
            }
        }
        slabs_needed <= self.free_slab_count()
    }

    /// [`fits`](Self::fits) for requests `(class, n)` in any order, a class possibly named
    /// more than once. An error names an unknown class.
    pub fn can_alloc_all(&self, requests: &[(usize, u64)]) -> Result<bool> {
        let mut counts = vec![0u64; self.classes.len()];
        for &(class, n) in requests {
            self.class(class)?;
            counts[class] = counts[class].saturating_add(n);
        }
        Ok(self.fits(&counts))
    }

    /// Allocates `n` blocks of `class`, all or nothing.
    pub fn alloc(&mut self, class: usize, n: usize) -> Result<Vec<Handle>> {
        // Checked before the vector is sized: an absurd `n` is an error, not an abort.
        self.ensure_available(class, n)?;
        let mut out = Vec::with_capacity(n);
        self.alloc_into(class, n, &mut out)?;
        Ok(out)
    }

    /// Allocates `n` blocks of `class` and appends their handles to `out`, all or nothing
    /// (on error `out` is unchanged).
    pub fn alloc_into(&mut self, class: usize, n: usize, out: &mut Vec<Handle>) -> Result<()> {
        self.ensure_available(class, n)?;
        out.reserve(n);
        if self.classes[class].blocks_per_slab == 1 {
            for _ in 0..n {
                out.push(self.take_whole_slab(class));
            }
            return Ok(());
        }
        let mut remaining = n as u32;
        while remaining > 0 {
            let s = self.slab_with_room(class);
            let take = remaining.min(self.slabs[s as usize].free_len);
            for _ in 0..take {
                out.push(self.take_slot(s));
            }
            remaining -= take;
        }
        self.count_taken(class, n as u64);
        Ok(())
    }

    /// Allocates one block of `class`: [`alloc_into`](Self::alloc_into) for a single block
    /// without an output vector (a decode step takes one block per group when it crosses a
    /// block boundary).
    pub fn alloc_one(&mut self, class: usize) -> Result<Handle> {
        self.ensure_available(class, 1)?;
        if self.classes[class].blocks_per_slab == 1 {
            return Ok(self.take_whole_slab(class));
        }
        let s = self.slab_with_room(class);
        let h = self.take_slot(s);
        self.count_taken(class, 1);
        Ok(h)
    }

    /// One block of a class whose slab holds a single block (a large sliding-window block): a
    /// free slab taken whole. Such a class never has a current or partial slab (a slab of it is
    /// full or free), so its free-slot count stays 0. Availability was checked.
    fn take_whole_slab(&mut self, class: usize) -> Handle {
        let s = self.pop_free_slab();
        let c = &mut self.classes[class];
        c.slabs_held += 1;
        c.blocks_in_use += 1;
        let slab = &mut self.slabs[s as usize];
        slab.class = Some(class as u32);
        slab.used = 1;
        slab.free_head = NIL;
        slab.free_len = 0;
        slab.gen_counter = next_gen(slab.gen_counter);
        let gen = slab.gen_counter;
        // Slot 0; the free list is empty (its link is 0, the end).
        let base = s as usize * self.stride as usize;
        self.slots[base] = SlotMeta { gen, next: 0 };
        self.tag | (u64::from(gen) << 32) | base as u64
    }

    /// Hands out the first free slot of slab `s` (it has one) under the slab's next
    /// generation.
    #[inline(always)]
    fn take_slot(&mut self, s: u32) -> Handle {
        let base = s as usize * self.stride as usize;
        let slab = &mut self.slabs[s as usize];
        let slot = slab.free_head;
        let meta = &mut self.slots[base + slot as usize];
        slab.gen_counter = next_gen(slab.gen_counter);
        meta.gen = slab.gen_counter;
        slab.free_head = meta.next.wrapping_sub(1); // 0 - 1 = NIL
        slab.free_len -= 1;
        slab.used += 1;
        self.tag | (u64::from(meta.gen) << 32) | (base as u64 + u64::from(slot))
    }

    /// Counts `n` blocks of `class` taken from its slabs' free slots.
    fn count_taken(&mut self, class: usize, n: u64) {
        let c = &mut self.classes[class];
        c.free_in_partial -= n;
        c.blocks_in_use += n;
    }

    /// An out-of-memory error unless `n` blocks of `class` are available (an error names an
    /// unknown class).
    fn ensure_available(&self, class: usize, n: usize) -> Result<()> {
        let available = self.available(class)?;
        if n as u64 > available {
            return Err(Error::OutOfMemory {
                class,
                block_bytes: self.classes[class].block_bytes,
                requested: n,
                available: available as usize,
            });
        }
        Ok(())
    }

    /// The slab `class` allocates from next: its current slab while that has room, else (the
    /// current one stays out of every set, full) the fullest partial slab or a free one, which
    /// becomes current. Availability was checked.
    #[inline]
    fn slab_with_room(&mut self, class: usize) -> u32 {
        let current = self.classes[class].current;
        if current != NIL && self.slabs[current as usize].free_len > 0 {
            return current;
        }
        self.next_current(class)
    }

    /// [`slab_with_room`](Self::slab_with_room) when the current slab is full or absent (out
    /// of line: the common case keeps its current slab).
    #[inline(never)]
    fn next_current(&mut self, class: usize) -> u32 {
        let s = match self.classes[class].partial.pop_first() {
            Some((_, s)) => s,
            None => {
                let s = self.take_free_slab(class as u32);
                let c = &mut self.classes[class];
                c.free_in_partial += u64::from(c.blocks_per_slab);
                s
            }
        };
        self.classes[class].current = s;
        s
    }

    /// A free slab (from the stack, else newly materialized), still marked free.
    #[inline]
    fn pop_free_slab(&mut self) -> u32 {
        match self.free_slabs.pop() {
            Some(s) => s,
            None => self.materialize(),
        }
    }

    /// Materializes never-used slabs a batch at a time (one resize of the slot array per batch,
    /// not per slab: a growing cache takes a fresh slab for nearly every SWA block) and returns
    /// the first. The rest wait in the free stack, lowest index on top, so slabs are still
    /// taken in index order after any recycled one.
    #[cold]
    #[inline(never)]
    fn materialize(&mut self) -> u32 {
        let s = self.slabs.len() as u32;
        assert!(s < self.num_slabs, "availability was checked");
        let n = MATERIALIZE_BATCH.min(self.num_slabs - s);
        crate::mem::hugepage::reserve(&mut self.slabs, n as usize);
        self.slabs.resize((s + n) as usize, Slab::free());
        crate::mem::hugepage::reserve(&mut self.slots, n as usize * self.stride as usize);
        self.slots
            .resize(self.slabs.len() * self.stride as usize, SlotMeta::default());
        self.free_slabs.extend((s + 1..s + n).rev());
        s
    }

    fn take_free_slab(&mut self, class: u32) -> u32 {
        let s = self.pop_free_slab();
        let c = &mut self.classes[class as usize];
        let bps = c.blocks_per_slab;
        c.slabs_held += 1;
        let slab = &mut self.slabs[s as usize];
        slab.class = Some(class);
        slab.used = 0;
        // Thread the free list 0 -> 1 -> ... so slot 0 is handed out first. Generations are
        // already 0: a slab is only returned once every block in it is free.
        let base = (u64::from(s) * self.stride) as usize;
        for (i, meta) in self.slots[base..base + bps as usize].iter_mut().enumerate() {
            meta.next = if i as u32 + 1 < bps { i as u32 + 2 } else { 0 };
        }
        slab.free_head = 0;
        slab.free_len = bps;
        s
    }

    /// Frees a batch of handles, all or nothing: if any handle is stale, foreign or repeated,
    /// nothing is freed and the error names the first bad handle.
    pub fn free(&mut self, handles: &[Handle]) -> Result<()> {
        // Phase 1: check every handle and mark its slot, so that a repeat is caught.
        for (i, &h) in handles.iter().enumerate() {
            if let Err(e) = self.check_and_mark(h) {
                for &done in &handles[..i] {
                    let (s, slot, _) = self.split(done);
                    self.slots[s * self.stride as usize + slot].gen &= GEN_MASK;
                }
                return Err(e);
            }
        }
        // Phase 2: release. Partial-set keys are fixed once per slab touched, not per block:
        // `touched` remembers each slab's free count before the batch.
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for &h in handles {
            let (s, slot, _) = self.split(h);
            let at = s * self.stride as usize + slot;
            debug_assert!(
                self.slots[at].gen & PENDING_FREE != 0,
                "phase 1 marks every slot"
            );
            let slab = &mut self.slabs[s];
            if !slab.in_batch {
                slab.in_batch = true;
                touched.push((s as u32, slab.free_len));
            }
            self.slots[at] = SlotMeta {
                gen: 0,
                next: slab.free_head.wrapping_add(1), // NIL + 1 = 0
            };
            slab.free_head = slot as u32;
            slab.free_len += 1;
            slab.used -= 1;
        }
        for &(s, old_free) in &touched {
            let slab = &mut self.slabs[s as usize];
            slab.in_batch = false;
            let class = slab.class.expect("checked live") as usize;
            let freed = slab.free_len - old_free;
            let now_empty = slab.used == 0;
            let free_now = slab.free_len;
            if now_empty {
                slab.class = None;
                slab.free_head = NIL;
                slab.free_len = 0;
            }
            let c = &mut self.classes[class];
            c.blocks_in_use -= u64::from(freed);
            if s == c.current {
                // In no set: only the free count moves (or the whole slab goes back).
                if now_empty {
                    c.free_in_partial -= u64::from(old_free);
                    c.current = NIL;
                } else {
                    c.free_in_partial += u64::from(freed);
                }
            } else {
                if old_free > 0 {
                    c.remove_partial(old_free, s);
                }
                if !now_empty {
                    c.insert_partial(free_now, s);
                }
            }
            if now_empty {
                c.slabs_held -= 1;
                self.free_slabs.push(s);
            }
        }
        self.touched = touched;
        Ok(())
    }

    fn split(&self, h: Handle) -> (usize, usize, u32) {
        let id = h & 0xFFFF_FFFF;
        (
            (id >> self.stride_shift) as usize,
            (id & (self.stride - 1)) as usize,
            (h >> 32) as u32 & GEN_MASK,
        )
    }

    fn check_and_mark(&mut self, h: Handle) -> Result<()> {
        let (s, slot, gen) = self.locate(h)?;
        let g = &mut self.slots[s * self.stride as usize + slot].gen;
        *g |= PENDING_FREE;
        debug_assert_eq!(*g & GEN_MASK, gen);
        Ok(())
    }

    /// Checks that `h` is live and returns (slab, slot, generation).
    fn locate(&self, h: Handle) -> Result<(usize, usize, u32)> {
        let stale = |reason| Error::StaleHandle { handle: h, reason };
        if h & !((1 << TAG_SHIFT) - 1) != self.tag {
            return Err(stale(StaleReason::Foreign));
        }
        let (s, slot, gen) = self.split(h);
        if gen == 0 || s >= self.slabs.len() {
            return Err(stale(StaleReason::OutOfRange));
        }
        let slab = &self.slabs[s];
        let Some(class) = slab.class else {
            return Err(stale(StaleReason::NotLive));
        };
        if slot >= self.classes[class as usize].blocks_per_slab as usize {
            return Err(stale(StaleReason::OutOfRange));
        }
        let live = self.slots[s * self.stride as usize + slot].gen;
        if live & PENDING_FREE != 0 {
            return Err(stale(StaleReason::Duplicate));
        }
        if live == 0 {
            return Err(stale(StaleReason::NotLive));
        }
        if live != gen {
            return Err(stale(StaleReason::OldGeneration));
        }
        Ok((s, slot, gen))
    }

    /// The slab that holds live handle `h` (not checked: for handles the caller knows are live).
    #[inline]
    pub fn slab_of(&self, h: Handle) -> u32 {
        ((h & 0xFFFF_FFFF) >> self.stride_shift) as u32
    }

    /// Bytes of the live blocks in slab `s` (0 for a free or never used slab).
    pub fn slab_used_bytes(&self, s: u32) -> u64 {
        match self.slabs.get(s as usize) {
            Some(Slab {
                class: Some(c),
                used,
                ..
            }) => u64::from(*used) * self.classes[*c as usize].block_bytes,
            _ => 0,
        }
    }

    /// Live blocks in slab `s` (0 for a free or never used slab).
    pub fn slab_used(&self, s: u32) -> u32 {
        self.slabs.get(s as usize).map_or(0, |slab| slab.used)
    }

    /// Whether `h` is a live handle of this arena.
    pub fn is_live(&self, h: Handle) -> bool {
        self.locate(h).is_ok()
    }

    /// The class of a live handle.
    pub fn class_of(&self, h: Handle) -> Result<usize> {
        let (s, _, _) = self.locate(h)?;
        Ok(self.slabs[s].class.expect("live") as usize)
    }

    /// Byte offset of a live block from the start of the arena.
    pub fn offset(&self, h: Handle) -> Result<u64> {
        let (s, slot, _) = self.locate(h)?;
        let class = self.slabs[s].class.expect("live") as usize;
        Ok(s as u64 * self.slab_bytes + slot as u64 * self.classes[class].block_bytes)
    }

    /// Page index of a live block in its class's view of the arena (`offset / block_bytes`),
    /// so an engine can view one buffer per class as an array of blocks.
    pub fn page(&self, h: Handle) -> Result<u64> {
        let (s, slot, _) = self.locate(h)?;
        Ok(self.page_at(s, slot))
    }

    /// Page numbering of class `class`'s live handles, with the per-class lookups done once:
    /// for reading a whole block table (every entry is of the same class).
    pub fn pages_of(&self, class: usize) -> Result<PageMap> {
        Ok(PageMap {
            stride_shift: self.stride_shift,
            slot_mask: self.stride - 1,
            blocks_per_slab: u64::from(self.class(class)?.blocks_per_slab),
        })
    }

    fn page_at(&self, s: usize, slot: usize) -> u64 {
        let class = self.slabs[s].class.expect("live") as usize;
        s as u64 * u64::from(self.classes[class].blocks_per_slab) + slot as u64
    }

    fn class(&self, class: usize) -> Result<&Class> {
        self.classes.get(class).ok_or_else(|| {
            Error::invalid(
                "class_index",
                format!(
                    "{class} is out of range: the arena has {} class(es)",
                    self.classes.len()
                ),
            )
        })
    }

    /// A snapshot of the arena's accounting.
    pub fn stats(&self) -> ArenaStats {
        let classes: Vec<ClassStats> = self
            .classes
            .iter()
            .map(|c| ClassStats {
                block_bytes: c.block_bytes,
                blocks_per_slab: c.blocks_per_slab,
                blocks_in_use: c.blocks_in_use,
                slabs_held: c.slabs_held,
                blocks_free_in_slabs: c.free_in_partial(),
            })
            .collect();
        let bytes_in_use: u64 = classes
            .iter()
            .map(|c| c.blocks_in_use * c.block_bytes)
            .sum();
        let free_in_slabs: u64 = classes
            .iter()
            .map(|c| c.blocks_free_in_slabs * c.block_bytes)
            .sum();
        let padding: u64 = classes
            .iter()
            .map(|c| {
                u64::from(c.slabs_held)
                    * (self.slab_bytes - u64::from(c.blocks_per_slab) * c.block_bytes)
            })
            .sum();
        let num_slabs = u64::from(self.num_slabs);
        ArenaStats {
            capacity_bytes: self.capacity_bytes,
            slab_bytes: self.slab_bytes,
            num_slabs: num_slabs as u32,
            slabs_free: self.free_slab_count() as u32,
            bytes_in_use,
            bytes_free: free_in_slabs + self.free_slab_count() * self.slab_bytes,
            padding_waste_bytes: padding,
            tail_bytes: self.capacity_bytes - num_slabs * self.slab_bytes,
            classes,
        }
    }
}

#[cfg(test)]
mod tests;
mod validate;
