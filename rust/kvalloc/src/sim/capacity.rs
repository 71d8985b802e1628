//! The budget dense caching needs to match a hit rate, found by bisection over replays.
//!
//! Hit rate grows with the budget (not strictly: eviction can make a larger cache lose a hit
//! here and there, so the answer is the bisection's, within its tolerance). The search doubles
//! the budget from a starting point until the target is met, then bisects the last doubling in
//! log space until the bracket is within `rel_tol`.

use super::replay::{Progress, RunConfig};
use super::report::SimReport;
use super::Simulator;
use crate::error::{Error, Result};

/// Most doublings tried before giving up (2^12 = 4096x the starting budget).
const MAX_DOUBLINGS: u32 = 12;

/// The outcome of a budget search.
#[derive(Debug, Clone)]
pub struct BudgetMatch {
    /// The smallest budget found that meets the target (within the tolerance), or None when
    /// even the largest budget tried does not.
    pub budget_bytes: Option<u64>,
    /// The replay at that budget (the largest one tried when none met the target).
    pub report: SimReport,
    /// Replays run.
    pub replays: u32,
}

impl Simulator {
    /// The smallest device budget at which `base` (with its policy, typically dense) reaches
    /// `target_hit_rate`, starting the search at `base.device_bytes`; `rel_tol` is the relative
    /// width of the final bracket (e.g. 0.02).
    pub fn budget_to_match(
        &self,
        base: &RunConfig,
        target_hit_rate: f64,
        rel_tol: f64,
        progress: Progress<'_>,
    ) -> Result<BudgetMatch> {
        if !(rel_tol > 0.0 && rel_tol.is_finite()) {
            return Err(Error::invalid("rel_tol", "must be a positive number"));
        }
        if !(0.0..=1.0).contains(&target_hit_rate) {
            return Err(Error::invalid("target_hit_rate", "must be in [0, 1]"));
        }
        let mut replays = 0;
        let mut run = |bytes: u64, progress: &mut dyn FnMut(&str, f64) -> bool| {
            replays += 1;
            let cfg = RunConfig {
                device_bytes: bytes,
                ..base.clone()
            };
            let label = format!("{} @ {:.1} GiB", base.policy.name(), bytes as f64 / GIB);
            self.run(&cfg, &label, progress)
        };
        let meets = |r: &SimReport| r.hit_rate() >= target_hit_rate;
        // Bracket: `lo` misses the target (or is the floor), `hi` meets it.
        let first = run(base.device_bytes, progress)?;
        let (mut lo, mut hi, mut best) = if meets(&first) {
            // Already enough: search downwards.
            let mut hi = (base.device_bytes, first);
            let mut lo = None;
            for _ in 0..MAX_DOUBLINGS {
                let b = hi.0 / 2;
                if b == 0 {
                    break;
                }
                let r = run(b, progress)?;
                if meets(&r) {
                    hi = (b, r);
                } else {
                    lo = Some(b);
                    break;
                }
            }
            match lo {
                Some(lo) => (lo, hi.0, hi.1),
                None => {
                    return Ok(BudgetMatch {
                        budget_bytes: Some(hi.0),
                        report: hi.1,
                        replays,
                    })
                }
            }
        } else {
            let mut lo = (base.device_bytes, first);
            let mut found = None;
            for _ in 0..MAX_DOUBLINGS {
                let Some(b) = lo.0.checked_mul(2) else { break };
                let r = run(b, progress)?;
                if meets(&r) {
                    found = Some((b, r));
                    break;
                }
                lo = (b, r);
            }
            match found {
                Some((b, r)) => (lo.0, b, r),
                None => {
                    return Ok(BudgetMatch {
                        budget_bytes: None,
                        report: lo.1,
                        replays,
                    })
                }
            }
        };
        while (hi as f64) > (lo as f64) * (1.0 + rel_tol) {
            let mid = ((lo as f64) * (hi as f64)).sqrt() as u64;
            if mid <= lo || mid >= hi {
                break;
            }
            let r = run(mid, progress)?;
            if meets(&r) {
                (hi, best) = (mid, r);
            } else {
                lo = mid;
            }
        }
        Ok(BudgetMatch {
            budget_bytes: Some(hi),
            report: best,
            replays,
        })
    }
}

const GIB: f64 = (1u64 << 30) as f64;
