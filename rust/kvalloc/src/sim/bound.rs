//! The trace's hit-rate upper bound: what an unbounded cache that keeps every computed block
//! would serve, replaying in arrival order.
//!
//! A request hits the longest prefix of its whole blocks that an earlier request computed
//! (prompt blocks, and output blocks where the trace knows the output's token ids), short of
//! its last token (a prompt's last token is always computed, as in the manager). The block
//! chain is the manager's own (`hash`), so the bound is exact for the dense policy with an
//! unbounded budget.

use std::collections::HashSet;

use super::trace::Trace;
use crate::hash;

/// Prompt tokens an unbounded cache would serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bound {
    /// Prompt tokens served from cache.
    pub hit_tokens: u64,
    /// All prompt tokens.
    pub prompt_tokens: u64,
}

impl Bound {
    /// `hit_tokens / prompt_tokens`.
    pub fn hit_rate(&self) -> f64 {
        ratio(self.hit_tokens, self.prompt_tokens)
    }
}

pub(crate) fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The bound at `block_tokens`; `ids(i)` gives request i's whole-block ids when it is a
/// block-id prompt (see `trace::sim_block_ids`).
pub(crate) fn upper_bound<'a>(
    trace: &'a Trace,
    block_tokens: u32,
    ids: impl Fn(usize) -> Option<&'a [u64]>,
) -> Bound {
    let b = u64::from(block_tokens);
    let seed = hash::root_seed(None);
    let mut seen: HashSet<u64> = HashSet::new();
    let mut chain = Vec::new();
    let mut bound = Bound::default();
    for (i, r) in trace.requests.iter().enumerate() {
        chain.clear();
        match ids(i) {
            Some(ids) => hash::chain_ids(seed, ids, &mut chain),
            None => {
                let p = trace.prompt_token_ids(r).expect("a token-id prompt");
                hash::chain_tokens(seed, p, block_tokens as usize, &mut chain);
            }
        }
        let max_safe = ((r.prompt_tokens - 1) / b) as usize;
        let hit = chain
            .iter()
            .take(max_safe)
            .take_while(|h| seen.contains(h))
            .count();
        bound.hit_tokens += hit as u64 * b;
        bound.prompt_tokens += r.prompt_tokens;
        seen.extend(chain.iter().copied());
        if let (Some(p), Some(o)) = (trace.prompt_token_ids(r), trace.output_token_ids(r)) {
            // The output's blocks continue the prompt's chain (the manager hashes them so).
            let whole = (p.len() + o.len()) / block_tokens as usize * block_tokens as usize;
            let all: Vec<i64> = p.iter().chain(o).copied().take(whole).collect();
            chain.clear();
            hash::chain_tokens(seed, &all, block_tokens as usize, &mut chain);
            seen.extend(chain.iter().copied());
        }
    }
    bound
}
