//! Retention controls: how an engine says that one request's prefix matters more than
//! another's, and the clock that times pins.
//!
//! Per request, a [`Retention`] (with [`KVCacheManager::admit_with_retention`], or
//! [`Admission::retention`](super::Admission::retention) in a step):
//! - **priority** weighs the value policy's eviction key of the cached blocks the request held
//!   when it finished: a block keeps the highest priority of the requests that finished holding
//!   it, and its value counts `2^priority` times (see
//!   [`priority_weight`](crate::eviction::priority_weight)). LRU ignores it. A block past the
//!   prefix's last resume point saves nothing at any priority, so a prefix still loses its tail
//!   before its head.
//! - **pin**: the cached blocks of the request's first `pin_tokens` tokens stay for `pin_for`
//!   after it finishes, with every block their nodes hold: never evicted while pinned.
//! - **cache**: `false` opts the request out of insertion: none of its blocks enter the prefix
//!   cache (none are published while it runs either, and at its end they are freed), while its
//!   prompt still reads the cache.
//!
//! ## Pins
//! A pin is applied when its request finishes (while it runs, its path is held anyway); an
//! aborted request pins nothing. It covers the tree nodes of the first `pin_tokens` tokens that
//! are cached then, shortened to the deepest window-safe resume point (a pinned prefix is there
//! to be resumed at), and further to what fits under [`ManagerConfig::max_pinned_bytes`]: a pin
//! over the cap is *clipped*, never refused, and [`ManagerStats::pins_clipped`] counts it. So
//! that the pin's end is a resume point, an admission with a pin that computes that position
//! keeps a checkpoint there (as at a prompt's end). Pins ending at the same node merge (the
//! later expiry wins), so a system prompt every request pins costs one pin.
//!
//! Pinned bytes are exactly the bytes of the pinned nodes ([`ManagerStats::pinned_bytes`]), and
//! never exceed the cap at a public boundary: when a later checkpoint lays sliding-window blocks
//! over a pinned prefix and the total would pass the cap, the most recently applied pins are
//! shortened from their tail until it fits (counted as clipped too).
//!
//! Expired pins go at the next `admit`, `extend`, `finish`, `step` or clock change; their nodes
//! are then evictable as any other. [`reset_prefix_cache`](KVCacheManager::reset_prefix_cache)
//! drops every pin. Retention acts on the device tier (L1) only: the lower tiers keep their own
//! order.
//!
//! A retention pin is not a running request's pin of its path (the tree's `refs`): the tree
//! counts the two apart, and either one keeps a node.
//!
//! ## Clock
//! Pins are timed by the manager's clock: monotonic wall time since the manager was made, until
//! a caller drives it with [`set_clock`](KVCacheManager::set_clock) or
//! [`advance_clock`](KVCacheManager::advance_clock) (tests, and the simulator with its
//! simulated time); from then on it moves only when driven.
//!
//! ```
//! use std::time::Duration;
//! use kvalloc::{KVCacheManager, ManagerConfig, ModelSpec, Prompt, Retention};
//! let spec = ModelSpec::preset("mimo-v2.5-pro")?;
//! let mut m = KVCacheManager::new(spec, 1 << 30, ManagerConfig::default())?;
//! m.set_clock(Duration::ZERO)?; // a driven clock: no sleeping in tests
//! let system: Vec<i64> = (0..512).collect();
//! let mut prompt = system.clone();
//! prompt.extend(9000..9100);
//! // Pin the system prompt for a minute, and weigh the rest up.
//! let keep = Retention {
//!     priority: 4,
//!     pin_tokens: 512,
//!     pin_for: Duration::from_secs(60),
//!     ..Retention::default()
//! };
//! m.admit_with_retention(1, Prompt::Tokens(&prompt), None, None, keep)?;
//! m.finish(1)?;
//! let st = m.stats();
//! assert_eq!(st.pins, 1);
//! assert!(st.pinned_bytes > 0);
//! m.advance_clock(Duration::from_secs(61))?; // expired: evictable again
//! assert_eq!(m.stats().pins, 0);
//! // An opted-out request reads the cache but adds nothing to it.
//! let before = m.stats().cached_blocks;
//! let mut other = system.clone();
//! other.extend(7000..7300);
//! let quiet = Retention { cache: false, ..Retention::default() };
//! assert_eq!(m.admit_with_retention(2, Prompt::Tokens(&other), None, None, quiet)?, Some(512));
//! m.finish(2)?;
//! assert_eq!(m.stats().cached_blocks, before);
//! m.validate()?;
//! # Ok::<(), kvalloc::Error>(())
//! ```

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::request::Request;
use super::KVCacheManager;
use crate::error::{Error, Result};
use crate::prefix::{NodeId, NONE};

/// The highest retention priority (and minus the lowest): a priority's weight is `2^p`, so
/// this spans a factor of about 4 billion either way.
pub const MAX_PRIORITY: i8 = 16;

/// What a request asks of the prefix cache beyond being served (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Weighs the value policy's key of the blocks it held when it finished, `2^priority`
    /// times; higher is kept longer. In `[-MAX_PRIORITY, MAX_PRIORITY]`; 0 (default): neutral.
    pub priority: i8,
    /// Pin the cached blocks of the first this many tokens (prompt, then output) when it
    /// finishes. 0 (default): no pin.
    pub pin_tokens: u64,
    /// How long the pin lasts from the finish (positive when `pin_tokens` is;
    /// [`Duration::MAX`]: until [`reset_prefix_cache`](KVCacheManager::reset_prefix_cache)).
    pub pin_for: Duration,
    /// Insert its blocks into the prefix cache (default). `false`: it only reads the cache.
    pub cache: bool,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            priority: 0,
            pin_tokens: 0,
            pin_for: Duration::ZERO,
            cache: true,
        }
    }
}

impl Retention {
    /// Checks the priority's range and that a pin has a duration.
    pub fn check(&self) -> Result<()> {
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "{} is outside [-{MAX_PRIORITY}, {MAX_PRIORITY}]",
                    self.priority
                ),
            ));
        }
        if self.pin_tokens > 0 && self.pin_for.is_zero() {
            return Err(Error::invalid(
                "pin_seconds",
                "a pin (pin_tokens > 0) needs a positive duration",
            ));
        }
        Ok(())
    }
}

/// One pin: the prefix ending at its key's node (`depth + 1` nodes from the root).
#[derive(Debug, Clone, Copy)]
struct Pin {
    /// When it expires, in nanoseconds on the manager's clock (`u64::MAX`: never).
    expires: u64,
    /// Order of application (the cap shortens the latest first).
    seq: u64,
}

/// The manager's retention pins, by the node each ends at.
#[derive(Debug, Default)]
pub(super) struct Pins {
    by_end: HashMap<NodeId, Pin>,
    /// The earliest expiry (`u64::MAX` when there is none).
    next_expiry: u64,
    seq: u64,
    /// Pins the cap clipped (shortened or dropped).
    pub(super) clipped: u64,
}

impl Pins {
    pub(super) fn new() -> Self {
        Pins {
            next_expiry: u64::MAX,
            ..Pins::default()
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_end.len()
    }

    fn recompute_next(&mut self) {
        self.next_expiry = self
            .by_end
            .values()
            .map(|p| p.expires)
            .min()
            .unwrap_or(u64::MAX);
    }
}

/// What times pins: wall time since the manager was made, or a time a caller drives.
#[derive(Debug, Clone, Copy)]
pub(super) enum Clock {
    Wall(Instant),
    Driven(u64),
}

/// Nanoseconds of `d`, saturating (u64 nanoseconds span 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl KVCacheManager {
    /// [`admit`](Self::admit) with retention controls (see [`Retention`]; `admit` is this with
    /// `Retention::default()`). An invalid `retention` is an error and changes nothing.
    pub fn admit_with_retention(
        &mut self,
        req: u64,
        prompt: super::Prompt<'_>,
        salt: Option<&[u8]>,
        max_tokens: Option<u64>,
        retention: Retention,
    ) -> Result<Option<u64>> {
        retention.check()?;
        self.forget_promotions();
        self.expire_pins();
        self.admit_with(req, prompt, salt, max_tokens, &retention, None)
    }

    /// The manager's clock: wall time since it was made, or the time last driven.
    pub fn clock(&self) -> Duration {
        Duration::from_nanos(self.now_ns())
    }

    /// Drives the clock to `now` (from then on it moves only when driven), and releases the
    /// pins that expired by then. The first call may set any time (the pins' remaining times
    /// carry over); later ones may not go backwards.
    pub fn set_clock(&mut self, now: Duration) -> Result<()> {
        let t = nanos(now);
        match self.clock {
            Clock::Driven(c) if t < c => {
                return Err(Error::invalid(
                    "clock",
                    format!(
                        "{:?} is before the clock's {:?}: it does not go backwards",
                        now,
                        Duration::from_nanos(c)
                    ),
                ))
            }
            Clock::Driven(_) => {}
            Clock::Wall(_) => {
                let w = self.now_ns();
                for p in self.pins.by_end.values_mut() {
                    if p.expires != u64::MAX {
                        p.expires = t.saturating_add(p.expires.saturating_sub(w));
                    }
                }
                self.pins.recompute_next();
            }
        }
        self.clock = Clock::Driven(t);
        self.expire_pins();
        Ok(())
    }

    /// Drives the clock `by` forward (see [`set_clock`](Self::set_clock)).
    pub fn advance_clock(&mut self, by: Duration) -> Result<()> {
        let now = self
            .clock()
            .checked_add(by)
            .ok_or_else(|| Error::invalid("clock", "the clock would overflow"))?;
        self.set_clock(now)
    }

    pub(super) fn now_ns(&self) -> u64 {
        match self.clock {
            Clock::Wall(origin) => nanos(origin.elapsed()),
            Clock::Driven(t) => t,
        }
    }

    /// The most bytes pins may hold: [`ManagerConfig::max_pinned_bytes`], by default half the
    /// capacity.
    pub(super) fn pin_cap(&self) -> u64 {
        self.config
            .max_pinned_bytes
            .unwrap_or(self.arena.capacity_bytes() / 2)
    }

    /// Releases the pins that expired (one branch when there are none).
    #[inline]
    pub(super) fn expire_pins(&mut self) {
        if self.pins.by_end.is_empty() {
            return;
        }
        let now = self.now_ns();
        if now >= self.pins.next_expiry {
            self.expire_pins_at(now);
        }
    }

    #[cold]
    fn expire_pins_at(&mut self, now: u64) {
        let expired: Vec<NodeId> = self
            .pins
            .by_end
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(&n, _)| n)
            .collect();
        for end in expired {
            self.pins.by_end.remove(&end);
            self.release_chain(end);
        }
        self.pins.recompute_next();
    }

    /// Takes one retention pin off `end` and each of its ancestors (a pin's nodes).
    fn release_chain(&mut self, end: NodeId) {
        let mut freed = std::mem::take(&mut self.scratch);
        let mut n = end;
        while n != NONE {
            // The parent first: releasing a doomed node may remove it.
            let parent = self.tree.parent(n);
            self.tree.release(n, &mut freed);
            n = parent;
        }
        self.release(&mut freed);
        self.scratch = freed;
    }

    /// Drops every pin (the cache is being emptied).
    pub(super) fn drop_pins(&mut self) {
        let ends: Vec<NodeId> = self.pins.by_end.keys().copied().collect();
        for end in ends {
            self.pins.by_end.remove(&end);
            self.release_chain(end);
        }
        self.pins.recompute_next();
    }

    /// At a request's finish, before its path is unpinned: raises its path's priority, and
    /// applies its pin (see the module docs).
    pub(super) fn retain_finished(&mut self, r: &Request) {
        let ret = r.retention;
        for &n in &r.path {
            self.tree.raise_priority(n, ret.priority);
        }
        // Blocks attached to pinned nodes may have taken the pins past the cap.
        self.enforce_pin_cap();
        if ret.pin_tokens == 0 {
            return;
        }
        let want = (self.bm.floor(ret.pin_tokens) as usize).min(r.path.len());
        let room = self.pin_cap().saturating_sub(self.tree.retained_bytes());
        let (k, _) = self.tree.pin_extent(&r.path[..want], room);
        if k < self.tree.pin_extent(&r.path[..want], u64::MAX).0 {
            self.pins.clipped += 1;
        }
        if k == 0 {
            return;
        }
        let expires = self.now_ns().saturating_add(nanos(ret.pin_for));
        self.pins.seq += 1;
        let seq = self.pins.seq;
        match self.pins.by_end.entry(r.path[k - 1]) {
            Entry::Occupied(mut e) => {
                let p = e.get_mut();
                p.expires = p.expires.max(expires);
                p.seq = seq;
            }
            Entry::Vacant(e) => {
                e.insert(Pin { expires, seq });
                for &n in &r.path[..k] {
                    self.tree.retain(n);
                }
            }
        }
        self.pins.recompute_next();
    }

    /// Shortens the latest pins from their tail until the pinned bytes fit under the cap (they
    /// grow past it only when blocks are attached to pinned nodes).
    pub(super) fn enforce_pin_cap(&mut self) {
        if self.pins.by_end.is_empty() {
            return;
        }
        let cap = self.pin_cap();
        let mut shortened: Vec<u64> = Vec::new();
        while self.tree.retained_bytes() > cap {
            let Some((&end, &pin)) = self.pins.by_end.iter().max_by_key(|(_, p)| p.seq) else {
                break;
            };
            if !shortened.contains(&pin.seq) {
                shortened.push(pin.seq);
                self.pins.clipped += 1;
            }
            self.pins.by_end.remove(&end);
            let parent = self.tree.parent(end);
            let mut freed = std::mem::take(&mut self.scratch);
            self.tree.release(end, &mut freed);
            self.release(&mut freed);
            self.scratch = freed;
            if parent == NONE {
                continue;
            }
            match self.pins.by_end.entry(parent) {
                // Another pin ends there: the two merge, and the shorter one's hold goes.
                Entry::Occupied(mut e) => {
                    let p = e.get_mut();
                    p.expires = p.expires.max(pin.expires);
                    self.release_chain(parent);
                }
                Entry::Vacant(e) => {
                    e.insert(pin);
                }
            }
        }
        self.pins.recompute_next();
    }

    /// The pins' invariants: each node counts exactly the pins covering it, pinned bytes fit
    /// under the cap, and the next expiry is the earliest.
    pub(super) fn validate_pins(&self) -> Result<()> {
        let mut expected: HashMap<NodeId, u32> = HashMap::new();
        for &end in self.pins.by_end.keys() {
            if !self.tree.is_alive(end) {
                return Err(Error::Invariant(format!(
                    "manager: a pin ends at node {end}, which is not alive"
                )));
            }
            let mut n = end;
            while n != NONE {
                *expected.entry(n).or_default() += 1;
                n = self.tree.parent(n);
            }
        }
        self.tree.validate_retained(&expected)?;
        let cap = self.pin_cap();
        if self.tree.retained_bytes() > cap {
            return Err(Error::Invariant(format!(
                "manager: {} pinned bytes exceed the cap of {cap}",
                self.tree.retained_bytes()
            )));
        }
        let earliest = self.pins.by_end.values().map(|p| p.expires).min();
        if earliest.unwrap_or(u64::MAX) != self.pins.next_expiry {
            return Err(Error::Invariant(
                "manager: the pins' next expiry is not the earliest".into(),
            ));
        }
        Ok(())
    }
}
