//! Eviction order for cached entries.
//!
//! The prefix tree offers two kinds of victims (see [`crate::prefix`]):
//! - a *leaf*: an unpinned node without children; evicting it frees its full-attention block and
//!   any SWA block it holds (full KV goes leaf first, so a cached prefix never has holes);
//! - a *checkpoint*: the SWA window kept at an interior resume point; evicting it frees the SWA
//!   blocks no other checkpoint needs and leaves tombstones (the full prefix stays).
//!
//! Each candidate gets a key when it becomes evictable; the smallest key goes first.
//!
//! ## Value policy (default)
//! Greedy-Dual-Size-Frequency, with a unit's value measured in recompute avoided:
//!
//! ```text
//! key = L + (hits + 1) x saved_tokens / (bytes / 1 MiB)
//! ```
//!
//! - `saved_tokens`: the prefill tokens a hit on this entry avoids (its resume position). A leaf
//!   that is not a resume point saves nothing on its own: its key is `L` and it goes first.
//! - `bytes`: what evicting the unit frees. For a leaf that ends a checkpoint, that is the
//!   checkpoint plus the full-attention prefix that only it unlocks (the chain of single-child,
//!   non-resume ancestors): the checkpoint and its prefix are one unit. For an interior
//!   checkpoint, the SWA blocks only it holds.
//! - `hits`: requests that resumed at this entry (frequency).
//! - `L`: the key of the last victim. New and recently used entries are keyed against the current
//!   `L`, so an entry that is not used ages relative to the others (recency).
//!
//! ## LRU
//! `key = last access tick`, for comparison with what engines do today.

/// Which eviction order to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Value per byte with frequency and recency (GDSF); the default.
    #[default]
    Value,
    /// Least recently used.
    Lru,
}

impl Eviction {
    /// Parses "value" or "lru".
    pub fn parse(s: &str) -> crate::error::Result<Eviction> {
        match s.to_ascii_lowercase().as_str() {
            "value" | "gdsf" => Ok(Eviction::Value),
            "lru" => Ok(Eviction::Lru),
            other => Err(crate::error::Error::invalid(
                "eviction",
                format!("unknown eviction policy {other:?}; expected \"value\" or \"lru\""),
            )),
        }
    }

    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            Eviction::Value => "value",
            Eviction::Lru => "lru",
        }
    }
}

/// What the policy needs to know about a candidate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Prefill tokens a hit on this entry avoids (0 if it is not a resume point).
    pub saved_tokens: u64,
    /// Bytes freed by evicting it.
    pub bytes: u64,
    /// Requests that resumed here.
    pub hits: u32,
    /// Logical time of the last use.
    pub last_access: u64,
}

/// Keys candidates; holds the GDSF inflation value `L`.
#[derive(Debug, Clone)]
pub struct EvictionOrder {
    kind: Eviction,
    inflation: f64,
}

impl EvictionOrder {
    /// A fresh order of the given kind.
    pub fn new(kind: Eviction) -> Self {
        EvictionOrder {
            kind,
            inflation: 0.0,
        }
    }

    /// The policy in use.
    pub fn kind(&self) -> Eviction {
        self.kind
    }

    /// The sort key of a candidate (smaller goes first). Non-negative floats compare like their
    /// bit patterns, so the key is an integer.
    pub fn key(&self, c: &Candidate) -> u64 {
        match self.kind {
            Eviction::Lru => c.last_access,
            Eviction::Value => {
                let mib = (c.bytes.max(1) as f64) / (1u64 << 20) as f64;
                let value = (f64::from(c.hits) + 1.0) * c.saved_tokens as f64 / mib;
                (self.inflation + value).to_bits()
            }
        }
    }

    /// Records that the entry with `key` was evicted (advances `L`).
    pub fn evicted(&mut self, key: u64) {
        if self.kind == Eviction::Value {
            let k = f64::from_bits(key);
            if k > self.inflation {
                self.inflation = k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_prefers_evicting_cheap_per_byte_and_cold() {
        let o = EvictionOrder::new(Eviction::Value);
        let c = |saved, bytes, hits| Candidate {
            saved_tokens: saved,
            bytes,
            hits,
            last_access: 0,
        };
        assert!(o.key(&c(0, 1 << 20, 5)) < o.key(&c(16, 1 << 20, 0)));
        assert!(o.key(&c(1024, 64 << 20, 0)) < o.key(&c(1024, 16 << 20, 0)));
        assert!(o.key(&c(1024, 1 << 20, 0)) < o.key(&c(1024, 1 << 20, 3)));
    }

    #[test]
    fn inflation_ages_old_entries() {
        let mut o = EvictionOrder::new(Eviction::Value);
        let hot = Candidate {
            saved_tokens: 100,
            bytes: 1 << 20,
            hits: 0,
            last_access: 0,
        };
        let before = o.key(&hot);
        o.evicted(o.key(&Candidate {
            saved_tokens: 1000,
            ..hot
        }));
        // The same entry keyed now ranks above one keyed before the eviction.
        assert!(o.key(&hot) > before);
    }

    #[test]
    fn parse_names() {
        assert_eq!(Eviction::parse("LRU").unwrap(), Eviction::Lru);
        assert_eq!(Eviction::parse("value").unwrap().name(), "value");
        assert!(Eviction::parse("fifo").is_err());
    }
}
