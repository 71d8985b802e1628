//! A small seeded random number generator for the trace generators.
//!
//! SplitMix64: one multiply-xorshift per draw, full 2^64 period, and the same stream on every
//! platform for a given seed, which is what "deterministic by seed" needs. Not cryptographic.

/// A seeded SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` (53 random bits).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }

    /// Log-normal with the given mean (of the distribution, not of its log) and log-space
    /// standard deviation `sigma`, rounded and clamped to `[lo, hi]`.
    pub fn lognormal(&mut self, mean: f64, sigma: f64, lo: u64, hi: u64) -> u64 {
        // Box-Muller; mu chosen so that E[X] = exp(mu + sigma^2 / 2) = mean.
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let mu = mean.ln() - sigma * sigma / 2.0;
        ((mu + sigma * z).exp().round() as u64).clamp(lo, hi)
    }

    /// Index in `[0, n)` with Zipf probabilities `1 / (k + 1)^s`.
    pub fn zipf(&mut self, n: usize, s: f64) -> usize {
        let weights: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
        let mut x = self.uniform() * weights.iter().sum::<f64>();
        for (k, w) in weights.iter().enumerate() {
            if x < *w {
                return k;
            }
            x -= w;
        }
        n - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        let (mut a, mut b, mut c) = (Rng::new(7), Rng::new(7), Rng::new(8));
        let xa: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn distributions_have_their_means() {
        let mut r = Rng::new(1);
        let n = 20_000;
        let e: f64 = (0..n).map(|_| r.exponential(3.0)).sum::<f64>() / n as f64;
        assert!((e - 3.0).abs() < 0.15, "exponential mean {e}");
        let l: f64 = (0..n)
            .map(|_| r.lognormal(500.0, 0.5, 0, u64::MAX) as f64)
            .sum::<f64>()
            / n as f64;
        assert!((l - 500.0).abs() < 20.0, "lognormal mean {l}");
        let mut counts = [0u32; 4];
        for _ in 0..n {
            counts[r.zipf(4, 1.0)] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > counts[3]);
        assert!((0..n).all(|_| {
            let u = r.uniform();
            (0.0..1.0).contains(&u)
        }));
    }
}
