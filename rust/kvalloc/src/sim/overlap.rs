//! The overlap model: how much of a cache load the engine's compute hides. The manager reports
//! what each promotion loads ([`Promotion`]); the simulator prices it here.
//!
//! A request that hits below L1 must load its KV before the layers that read it run. kvalloc's
//! loader copies all sliding windows first (they are small), then the full-attention layers in
//! layer order, so the read for full layer `k` runs while the layers before it compute
//! ("cache read overlap"). With per-layer compute time `c` (the uncached part of the prompt, or
//! one decode step, divided evenly over the layers) and each tier's bandwidth, layer `i` can
//! start when both layer `i - 1` finished and its KV arrived:
//!
//! `start_i = max(end_{i-1}, arrival_i)`, `end_i = start_i + c`.
//!
//! The exposed load time is `end_last - layers * c`: the part of the load the compute did not
//! hide.
//!
//! Only host-memory copies overlap compute that way. Disk and remote records are read and
//! verified in the background before the request is scheduled at all (see
//! [`crate::tiers::fetch`]): the first layer starts once the slower of those two tiers has
//! delivered everything (they read side by side), as the manager's own load-or-recompute choice
//! ([`crate::tiers::LoadCost`]) counts it.

use crate::error::{Error, Result};
use crate::manager::Promotion;
use crate::tiers::LoadBytes;

pub use crate::manager::LoadPolicy;

/// Bandwidths and compute speed for the overlap model.
#[derive(Debug, Clone, PartialEq)]
pub struct OverlapModel {
    /// Bytes per second from each lower tier to L1: `[host, disk, remote]`.
    pub bandwidth: [f64; 3],
    /// Seconds before the first byte of a load from each lower tier arrives (seek, round trip):
    /// `[host, disk, remote]`.
    pub latency: [f64; 3],
    /// Prefill throughput of the whole model, tokens per second.
    pub prefill_tokens_per_second: f64,
}

impl Default for OverlapModel {
    fn default() -> Self {
        OverlapModel {
            // PCIe 5 x16 host-to-device, an NVMe drive, a 100 Gb/s network.
            bandwidth: [50e9, 6e9, 12e9],
            // Zero keeps the bandwidth-only results; set them to model seeks and round trips.
            latency: [0.0; 3],
            prefill_tokens_per_second: 20_000.0,
        }
    }
}

impl OverlapModel {
    /// Checks that bandwidths are positive and latencies non-negative, all finite.
    pub fn validate(&self) -> Result<()> {
        const NAMES: [&str; 3] = ["host", "disk", "remote"];
        for (name, &bw) in NAMES.iter().zip(&self.bandwidth) {
            if !(bw.is_finite() && bw > 0.0) {
                return Err(Error::invalid(
                    "bandwidth",
                    format!("{name}: {bw} is not a positive number of bytes per second"),
                ));
            }
        }
        for (name, &l) in NAMES.iter().zip(&self.latency) {
            if !(l.is_finite() && l >= 0.0) {
                return Err(Error::invalid(
                    "latency",
                    format!("{name}: {l} is not a non-negative number of seconds"),
                ));
            }
        }
        Ok(())
    }

    /// Seconds the tier's link is busy with `bytes` (its latency plus the transfer).
    pub fn transfer_seconds(&self, tier: usize, bytes: u64) -> f64 {
        if bytes == 0 {
            0.0
        } else {
            self.latency[tier] + bytes as f64 / self.bandwidth[tier]
        }
    }

    /// Exposed seconds of a load that precedes computing `compute_tokens` tokens.
    pub fn exposed_seconds(&self, load: &LoadBytes, compute_tokens: u64) -> f64 {
        let layers = load.per_layer.len();
        if layers == 0 {
            return 0.0;
        }
        let per_layer_compute =
            compute_tokens.max(1) as f64 / self.prefill_tokens_per_second / layers as f64;
        // Disk and remote: everything, side by side, before the first layer runs.
        let deep = (1..3)
            .map(|k| self.transfer_seconds(k, load.per_layer.iter().map(|b| b[k]).sum()))
            .fold(0.0, f64::max);
        // Host memory: sliding layers' copies first (in layer order), then full layers'.
        let mut arrival = vec![0.0; layers];
        let mut clock = if load.per_layer.iter().any(|b| b[0] > 0) {
            self.latency[0]
        } else {
            0.0
        };
        for pass in [true, false] {
            for i in 0..layers {
                if load.sliding[i] == pass {
                    clock += load.per_layer[i][0] as f64 / self.bandwidth[0];
                    arrival[i] = clock;
                }
            }
        }
        let mut end: f64 = deep;
        for &a in &arrival {
            end = end.max(a) + per_layer_compute;
        }
        (end - layers as f64 * per_layer_compute).max(0.0)
    }

    /// Exposed seconds of a promotion: its load precedes computing the tokens it serves.
    pub fn promotion_seconds(&self, p: &Promotion) -> f64 {
        self.exposed_seconds(&p.load, p.tokens.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hide_behind_compute_when_fast_enough() {
        let m = OverlapModel {
            bandwidth: [1e9, 1e9, 1e9],
            latency: [0.0; 3],
            prefill_tokens_per_second: 1000.0,
        };
        // 4 layers, 1 ms each for 4 tokens; 1 full layer of 0.5 ms read at the end.
        let load = LoadBytes {
            per_layer: vec![[0; 3], [0; 3], [0; 3], [500_000, 0, 0]],
            sliding: vec![true, true, true, false],
        };
        assert_eq!(m.exposed_seconds(&load, 4), 0.0);
        // The same bytes needed by layer 0: nothing hides them.
        let first = LoadBytes {
            per_layer: vec![[500_000, 0, 0], [0; 3], [0; 3], [0; 3]],
            sliding: vec![false, true, true, true],
        };
        assert!((m.exposed_seconds(&first, 4) - 0.0005).abs() < 1e-9);
    }

    #[test]
    fn latency_delays_the_first_byte_and_bad_links_are_refused() {
        let mut m = OverlapModel {
            bandwidth: [1e9, 1e9, 1e9],
            latency: [0.0, 0.002, 0.0],
            prefill_tokens_per_second: 1000.0,
        };
        // A disk read needed by layer 0: the latency adds to the exposed time.
        let first = LoadBytes {
            per_layer: vec![[0, 500_000, 0], [0; 3]],
            sliding: vec![false, true],
        };
        assert!((m.exposed_seconds(&first, 2) - 0.0025).abs() < 1e-9);
        assert!((m.transfer_seconds(1, 500_000) - 0.0025).abs() < 1e-9);
        assert_eq!(m.transfer_seconds(1, 0), 0.0);
        assert!(m.validate().is_ok());
        m.latency[2] = -1.0;
        assert!(m.validate().is_err());
        m.latency[2] = 0.0;
        m.bandwidth[0] = 0.0;
        assert!(m.validate().is_err());
    }
}
