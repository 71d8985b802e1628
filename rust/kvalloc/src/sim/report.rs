//! What a replay measured.

use super::bound::ratio;
use super::overlap::LoadPolicy;
use crate::eviction::Eviction;
use crate::manager::Policy;
use crate::tiers::Tier;

/// Bytes one tier below the device received and served during a replay.
///
/// The replay fills one entry per lower tier it ran with (host, disk, remote, in that order);
/// the device tier itself has none (its traffic is the engine's own prefill and decode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierTraffic {
    /// The tier.
    pub tier: Tier,
    /// Bytes written to it (demotions, write-through).
    pub bytes_written: u64,
    /// Bytes read from it (promotions for hits).
    pub bytes_read: u64,
}

/// The outcome of one replay (one policy at one budget).
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// How sliding-window groups were cached.
    pub policy: Policy,
    /// Eviction order.
    pub eviction: Eviction,
    /// Tokens per block.
    pub block_tokens: u32,
    /// The device budget.
    pub device_bytes: u64,
    /// Requests in the trace.
    pub requests: u64,
    /// Requests that ran to the end of their output.
    pub completed: u64,
    /// Requests that could never fit in the budget (dropped; their prompt tokens count as misses).
    pub rejected: u64,
    /// Times a running request was preempted because every running request was stalled.
    pub preemptions: u64,
    /// All prompt tokens of the trace.
    pub prompt_tokens: u64,
    /// Prompt tokens served from cache at each request's first admission.
    pub hit_tokens: u64,
    /// What an unbounded cache would have served (see `bound`).
    pub upper_bound_hit_tokens: u64,
    /// Tokens whose full-attention KV the cache held when the replay ended.
    pub cached_tokens: u64,
    /// Bytes the cache held when the replay ended.
    pub cache_bytes: u64,
    /// Most requests running at once.
    pub peak_running: u64,
    /// Admissions the manager refused (each retry counts).
    pub admissions_refused: u64,
    /// Decode extensions the manager refused.
    pub extensions_refused: u64,
    /// Cached leaves evicted.
    pub evicted_leaves: u64,
    /// SWA checkpoints evicted on their own.
    pub evicted_checkpoints: u64,
    /// Mean time to first token, seconds.
    pub ttft_mean: f64,
    /// Median time to first token, seconds.
    pub ttft_p50: f64,
    /// 99th percentile time to first token, seconds.
    pub ttft_p99: f64,
    /// Mean TTFT had the same admissions computed every prompt token (no cache), seconds.
    pub ttft_no_cache_mean: f64,
    /// Mean wait for memory between arrival and admission, seconds.
    pub queue_wait_mean: f64,
    /// Simulated time from the first arrival to the last finish, seconds.
    pub simulated_seconds: f64,
    /// Wall-clock time the replay took, seconds.
    pub wall_seconds: f64,
    /// Traffic per lower tier (empty when the replay ran on the device tier alone).
    pub tiers: Vec<TierTraffic>,
    /// Load time not hidden behind compute (layer-wise overlap), seconds; zero without lower
    /// tiers. Counts only the loads taken.
    pub exposed_load_seconds: f64,
    /// Whether promoted hits were always loaded or only where faster than recomputing.
    pub load_policy: LoadPolicy,
    /// Hit tokens (first admissions) loaded from each lower tier, `[host, disk, remote]`; a
    /// load reading several tiers is split by their shares of its bytes. Included in
    /// `hit_tokens`.
    pub tier_hit_tokens: [u64; 3],
    /// Promoted hit tokens (first admissions) recomputed because loading them was slower; not
    /// in `hit_tokens`.
    pub declined_tokens: u64,
    /// Seconds loads waited for the earlier loads of their tier, all admissions together.
    pub load_queue_seconds: f64,
}

impl SimReport {
    /// Prompt tokens served from cache over all prompt tokens.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hit_tokens, self.prompt_tokens)
    }

    /// The unbounded cache's hit rate.
    pub fn upper_bound_hit_rate(&self) -> f64 {
        ratio(self.upper_bound_hit_tokens, self.prompt_tokens)
    }

    /// Prefill tokens not computed thanks to the cache.
    pub fn prefill_tokens_saved(&self) -> u64 {
        self.hit_tokens
    }

    /// Cached tokens per GiB of cache memory when the replay ended.
    pub fn cached_tokens_per_gib(&self) -> f64 {
        if self.cache_bytes == 0 {
            0.0
        } else {
            self.cached_tokens as f64 * (1u64 << 30) as f64 / self.cache_bytes as f64
        }
    }

    /// Relative change of mean TTFT against computing every prompt token (negative: faster).
    pub fn ttft_change(&self) -> f64 {
        if self.ttft_no_cache_mean > 0.0 {
            self.ttft_mean / self.ttft_no_cache_mean - 1.0
        } else {
            0.0
        }
    }
}
