//! The service model: how long requests take, so that they overlap in time and hold memory as
//! they would in an engine.
//!
//! - **Prefill**: one first-come-first-served queue over the deployment's prefill throughput
//!   (`prefill_tokens_per_s`); a request's prefill computes only its prompt tokens that missed
//!   the cache. Its first token appears when its prefill ends (TTFT = that moment minus its
//!   arrival).
//! - **Decode**: each running request generates `decode_tokens_per_s` tokens per second,
//!   independently of the others (continuous batching at a steady per-sequence speed), and
//!   takes a new block of KV when its output crosses a block boundary.
//! - **Memory**: a request holds its KV from admission to finish. An admission the manager
//!   refuses waits in a first-come-first-served queue; a decode step it refuses stalls the
//!   request until memory is freed (when every running request is stalled, the one admitted
//!   last is preempted: finished, its computed blocks left in the cache, and queued again).
//!
//! - **Lower tiers**: a hit promoted from below the device tier delays its prefill by the
//!   *exposed* part of its load time (layer-wise overlap, [`super::overlap`]).

use crate::error::{Error, Result};

/// Throughputs of the simulated deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceModel {
    /// Prompt tokens the deployment computes per second, all prefills together.
    pub prefill_tokens_per_s: f64,
    /// Tokens each running request generates per second.
    pub decode_tokens_per_s: f64,
}

impl Default for ServiceModel {
    /// 60,000 prefill tokens/s keeps the Mooncake conversation trace (41,000 prompt tokens/s
    /// arriving) below saturation even without a cache; 30 tokens/s per sequence is a typical
    /// interactive decode speed for a large MoE model.
    fn default() -> Self {
        ServiceModel {
            prefill_tokens_per_s: 60_000.0,
            decode_tokens_per_s: 30.0,
        }
    }
}

impl ServiceModel {
    /// Checks that both throughputs are positive and finite.
    pub fn validate(&self) -> Result<()> {
        for (what, x) in [
            ("prefill_tokens_per_s", self.prefill_tokens_per_s),
            ("decode_tokens_per_s", self.decode_tokens_per_s),
        ] {
            if !(x.is_finite() && x > 0.0) {
                return Err(Error::invalid(
                    what,
                    format!("{x} is not a positive number"),
                ));
            }
        }
        Ok(())
    }

    /// Seconds to prefill `tokens` computed tokens.
    pub fn prefill_seconds(&self, tokens: u64) -> f64 {
        tokens as f64 / self.prefill_tokens_per_s
    }

    /// Seconds to generate `tokens` output tokens of one request.
    pub fn decode_seconds(&self, tokens: u64) -> f64 {
        tokens as f64 / self.decode_tokens_per_s
    }
}
