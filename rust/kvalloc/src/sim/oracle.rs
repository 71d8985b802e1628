//! The clairvoyant reference's input: for each request of the trace, the chained block hashes it
//! can match (its prompt's whole blocks short of its last token, chained as the manager and
//! `bound` chain them). [`Eviction::Oracle`](crate::Eviction::Oracle) evicts the cached unit
//! whose next use in this table is farthest away; the replay tells it which requests were
//! admitted. Same manager, same replay: only the eviction order knows the future.

use super::trace::Trace;
use crate::eviction::FutureUses;
use crate::hash;

/// The table at `block_tokens`; `ids(i)` gives request i's whole-block ids when it is a
/// block-id prompt (see `trace::sim_block_ids`).
pub(crate) fn future_uses<'a>(
    trace: &'a Trace,
    block_tokens: u32,
    ids: impl Fn(usize) -> Option<&'a [u64]>,
) -> FutureUses {
    let b = u64::from(block_tokens);
    let seed = hash::root_seed(None);
    let chains: Vec<Vec<u64>> = trace
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut chain = Vec::new();
            match ids(i) {
                Some(ids) => hash::chain_ids(seed, ids, &mut chain),
                None => {
                    let p = trace.prompt_token_ids(r).expect("a token-id prompt");
                    hash::chain_tokens(seed, p, block_tokens as usize, &mut chain);
                }
            }
            chain.truncate(((r.prompt_tokens - 1) / b) as usize);
            chain
        })
        .collect();
    FutureUses::new(chains.iter().map(Vec::as_slice))
}
