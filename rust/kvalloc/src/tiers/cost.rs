//! Loading or recomputing: what a hit from the lower tiers costs against computing its tokens
//! again, from each tier's bandwidth and latency and the engine's prefill rate.
//!
//! A hit's blocks from host memory are copied layer by layer while the model computes the rest
//! of the prompt (see [`loader`](super::loader)), so only the part of that copy the compute
//! does not cover delays the first token. A hit's blocks from disk or the remote store are read
//! and verified before the request is scheduled (see [`fetch`](super::fetch)): all of that time
//! delays it, the tiers reading side by side, each after the loads already queued on it. The
//! alternative is the prefill of those tokens. The manager takes, of the window-safe hits each
//! tier adds (L1, then host, disk, remote), the one with the least delay; a tie keeps the
//! longer hit.
//!
//! [`LoadEstimate`] keeps what was measured: each finished background load's bytes over its
//! seconds, and the prefill rate the engine reports. A measurement fades back to the configured
//! figure (geometrically: its weight halves every [`FADE_SECONDS`]), so a tier that was slow
//! once (a frozen server) is declined for a while, then tried again, rather than declined
//! forever: a declined tier is not measured.

use std::time::Instant;

use super::residency::Tier;
use crate::error::{Error, Result};

/// A measurement's weight halves every this many seconds.
pub const FADE_SECONDS: f64 = 5.0;

/// The figures the load-or-recompute choice starts from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadCost {
    /// Bytes per second from each lower tier to the device: `[host, disk, remote]`.
    pub bandwidth: [f64; 3],
    /// Seconds before a load's first byte arrives from each tier (seek, round trip).
    pub latency: [f64; 3],
    /// The engine's prefill rate, prompt tokens per second.
    pub prefill_tokens_per_second: f64,
}

impl Default for LoadCost {
    fn default() -> Self {
        LoadCost {
            // PCIe 5 x16 host-to-device, an NVMe drive, a 100 Gb/s network.
            bandwidth: [50e9, 6e9, 12e9],
            latency: [0.0, 100e-6, 500e-6],
            prefill_tokens_per_second: 20_000.0,
        }
    }
}

impl LoadCost {
    /// Checks that bandwidths and the prefill rate are positive and latencies non-negative,
    /// all finite.
    pub fn validate(&self) -> Result<()> {
        for t in [Tier::Host, Tier::Disk, Tier::Remote] {
            let bw = self.bandwidth[t as usize];
            if !(bw.is_finite() && bw > 0.0) {
                return Err(Error::invalid(
                    "bandwidth",
                    format!(
                        "{}: {bw} is not a positive number of bytes per second",
                        t.name()
                    ),
                ));
            }
            let l = self.latency[t as usize];
            if !(l.is_finite() && l >= 0.0) {
                return Err(Error::invalid(
                    "latency",
                    format!("{}: {l} is not a non-negative number of seconds", t.name()),
                ));
            }
        }
        let p = self.prefill_tokens_per_second;
        if !(p.is_finite() && p > 0.0) {
            return Err(Error::invalid(
                "prefill_tokens_per_second",
                format!("{p} is not a positive rate"),
            ));
        }
        Ok(())
    }

    /// Seconds a load of `bytes` (per tier) delays a prompt that then computes
    /// `compute_tokens` tokens, `backlog` being the seconds each tier is still busy with loads
    /// queued before it; plus those tokens' prefill. See the module docs.
    pub fn seconds(&self, bytes: [u64; 3], backlog: [f64; 3], compute_tokens: u64) -> f64 {
        let compute = compute_tokens as f64 / self.prefill_tokens_per_second;
        let link = |t: usize| -> f64 {
            if bytes[t] == 0 {
                0.0
            } else {
                backlog[t] + self.latency[t] + bytes[t] as f64 / self.bandwidth[t]
            }
        };
        let deep = link(1).max(link(2));
        let host = (link(0) - compute).max(0.0);
        deep + host + compute
    }
}

/// Running estimates: the configured [`LoadCost`] corrected by what was measured.
#[derive(Debug, Clone)]
pub struct LoadEstimate {
    prior: LoadCost,
    /// Per tier: the last measured bandwidth (an average over loads) and when.
    measured: [Option<(f64, Instant)>; 3],
    /// The engine's reported prefill rate (an average over reports).
    prefill: Option<f64>,
}

impl LoadEstimate {
    /// Estimates starting from `prior`.
    pub fn new(prior: LoadCost) -> Self {
        LoadEstimate {
            prior,
            measured: [None; 3],
            prefill: None,
        }
    }

    /// The estimates now: each measurement weighted by its age against the prior.
    pub fn now(&self, now: Instant) -> LoadCost {
        let mut c = self.prior;
        for t in 0..3 {
            if let Some((bw, at)) = self.measured[t] {
                let age = now.saturating_duration_since(at).as_secs_f64();
                let w = 0.5f64.powf(age / FADE_SECONDS);
                // Between the two in ratio: a tier a thousand times slower than configured
                // recovers in a few half-lives, as one ten times slower does.
                c.bandwidth[t] = bw.powf(w) * self.prior.bandwidth[t].powf(1.0 - w);
            }
        }
        if let Some(p) = self.prefill {
            c.prefill_tokens_per_second = p;
        }
        c
    }

    /// Records a background load from `tier`: `bytes` in `seconds`.
    pub fn record_load(&mut self, tier: Tier, bytes: u64, seconds: f64, now: Instant) {
        if bytes == 0 || !(seconds.is_finite() && seconds > 0.0) {
            return;
        }
        let bw = bytes as f64 / seconds;
        let t = tier as usize;
        let avg = match self.measured[t] {
            Some((old, _)) => (old * bw).sqrt(),
            None => bw,
        };
        self.measured[t] = Some((avg, now));
    }

    /// Records that the engine computed `tokens` prompt tokens in `seconds`.
    pub fn record_prefill(&mut self, tokens: u64, seconds: f64) -> Result<()> {
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(Error::invalid(
                "seconds",
                format!("{seconds} is not a positive duration"),
            ));
        }
        if tokens == 0 {
            return Ok(());
        }
        let rate = tokens as f64 / seconds;
        self.prefill = Some(match self.prefill {
            Some(old) => 0.8 * old + 0.2 * rate,
            None => rate,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slow_deep_loads_lose_to_recompute_and_host_loads_hide_behind_compute() {
        let c = LoadCost::default();
        // 1 GB from disk at 6 GB/s against 1,000 tokens at 20k/s: 0.167 s vs 0.05 s.
        let load = c.seconds([0, 1 << 30, 0], [0.0; 3], 0);
        let recompute = c.seconds([0; 3], [0.0; 3], 1000);
        assert!(load > recompute);
        // Host bytes that take less than the compute are free.
        let hidden = c.seconds([1 << 20, 0, 0], [0.0; 3], 1000);
        assert!((hidden - recompute).abs() < 1e-12);
        // Disk and remote read side by side: the slower decides.
        let both = c.seconds([0, 6_000_000, 12_000_000], [0.0; 3], 0);
        assert!((both - (0.001 + 500e-6)).abs() < 1e-9, "{both}");
    }

    #[test]
    fn a_measurement_fades_back_to_the_prior() {
        let mut e = LoadEstimate::new(LoadCost::default());
        let t0 = Instant::now();
        e.record_load(Tier::Remote, 1_000, 1.0, t0); // 1 kB/s: a frozen server
        assert!((e.now(t0).bandwidth[2] - 1_000.0).abs() < 1e-3);
        let later = e
            .now(t0 + Duration::from_secs_f64(20.0 * FADE_SECONDS))
            .bandwidth[2];
        assert!(later > 0.9 * 12e9, "{later}");
        assert_eq!(e.now(t0).bandwidth[1], 6e9, "other tiers keep their prior");
        assert!(e.record_prefill(10, 0.0).is_err());
        e.record_prefill(1000, 0.1).unwrap();
        assert_eq!(e.now(t0).prefill_tokens_per_second, 10_000.0);
    }
}
