//! Block-id traces whose ids stand for varying numbers of tokens.
//!
//! In some public traces one hash id covers no fixed number of tokens: `input_length /
//! len(hash_ids)` varies from line to line (6 to 101 tokens in one file). Such a trace is read
//! with `tokens_per_id = spread` (`kvalloc simulate --trace-tokens-per-id spread`); exact traces
//! keep `--trace-block-tokens`.
//!
//! ## The rule
//! A prefix hit needs two requests that share their first k ids to get the same tokens for
//! those ids. So an id's token count cannot depend on the length of whichever request mentions
//! it: **an id's count is fixed when it first appears** (in arrival order), and never changes.
//! For each request, in arrival order, with `L` prompt tokens and `n` ids:
//! 1. ids seen before keep their counts; say they cover `K` tokens;
//! 2. the request's new ids (their `q` positions) share the rest, `R = L - K`, evenly: `R / q`
//!    each, the first `R % q` of them one more. Then the counts sum to `L` exactly;
//! 3. if the ids seen before already leave less than one token per new id (`R < q`), each new
//!    id gets the request's own even share, `L / n`, and the prompt is *cut*: its tokens stop
//!    inside its ids (a prefix of what the ids name, so sharing up to the cut is kept);
//! 4. if every id was seen before and they cover fewer than `L` tokens, the rest are *padded*
//!    with tokens of a request-unique id: nothing describes them, so nothing can share them.
//!
//! A line must have at least one id and no more ids than tokens (each id covers at least one
//! token); anything else is an error naming the line. [`SpreadStats`] counts how often the
//! history disagreed with a request: an id seen before with a count other than the request's
//! own even share (`L / n`, rounded down or up), a cut, a pad.
//!
//! ## Tokens
//! Token `j` of id `X` is [`token`]`(X, j)`, the same wherever `X` appears. The replay hashes
//! the synthesized tokens at its own block size ([`block_ids`]), as it hashes any token prompt,
//! so sharing is found at token granularity, whatever the trace's ids cover.

use std::collections::HashMap;

use super::trace::{Content, Span, Trace};
use crate::hash;

/// What spreading a trace's tokens over its ids found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpreadStats {
    /// Requests with block ids (all of them were spread).
    pub requests: u64,
    /// Fewest and most prompt tokens per id of one request (`input_length / len(ids)`).
    pub min_tokens_per_id: f64,
    /// See `min_tokens_per_id`.
    pub max_tokens_per_id: f64,
    /// Requests in which an id seen before keeps a count other than the request's own even
    /// share (rule 1): the request's new ids absorb the difference.
    pub requests_disagreeing: u64,
    /// Requests whose ids cover more tokens than the prompt (rule 3).
    pub requests_cut: u64,
    /// Requests whose ids cover fewer tokens than the prompt (rule 4).
    pub requests_padded: u64,
}

/// Token `j` of the run named by trace id `id`: deterministic in `(id, j)`, the same on every
/// platform. Distinct pairs give distinct tokens but for a 64-bit coincidence.
pub fn token(id: u64, j: u64) -> i64 {
    mix(mix(id) ^ j) as i64
}

/// SplitMix64's finalizer: a bijection on u64 that scatters nearby inputs.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The id of request `i`'s padding (rule 4): unique to the request.
fn pad_id(i: usize) -> u64 {
    let mut bytes = *b"kvalloc-spread-pad\0\0\0\0\0\0\0\0";
    bytes[18..].copy_from_slice(&(i as u64).to_le_bytes());
    hash::digest(&bytes)
}

/// Turns every `Content::Blocks` prompt of `trace` (in arrival order) into spans by the rule
/// in the module docs. The reader has checked that each has between 1 and `prompt_tokens` ids.
pub(crate) fn spread(trace: &mut Trace) -> SpreadStats {
    let mut counts: HashMap<u64, u64> = HashMap::new();
    let mut stats = SpreadStats {
        min_tokens_per_id: f64::INFINITY,
        max_tokens_per_id: 0.0,
        ..SpreadStats::default()
    };
    for (i, r) in trace.requests.iter_mut().enumerate() {
        let Content::Blocks(ids) = &r.content else {
            continue;
        };
        let (l, n) = (r.prompt_tokens, ids.len() as u64);
        debug_assert!(n >= 1 && n <= l, "the reader checks the id count");
        stats.requests += 1;
        let ratio = l as f64 / n as f64;
        stats.min_tokens_per_id = stats.min_tokens_per_id.min(ratio);
        stats.max_tokens_per_id = stats.max_tokens_per_id.max(ratio);
        let (own_lo, own_hi) = (l / n, l.div_ceil(n));
        // Rule 1: what the ids seen before cover.
        let mut known = 0u64;
        let mut new_positions = 0u64;
        let mut disagrees = false;
        for id in ids {
            match counts.get(id) {
                Some(&c) => {
                    known += c;
                    disagrees |= c != own_lo && c != own_hi;
                }
                None => new_positions += 1,
            }
        }
        stats.requests_disagreeing += u64::from(disagrees);
        // Rules 2 and 3: the new ids' counts, fixed from now on.
        let rest = l.saturating_sub(known);
        let mut t = 0u64;
        for id in ids {
            if counts.contains_key(id) {
                continue;
            }
            let c = if new_positions > 0 && rest >= new_positions {
                rest / new_positions + u64::from(t < rest % new_positions)
            } else {
                own_lo
            };
            counts.insert(*id, c);
            t += 1;
        }
        let (spans, cut) = spans_of(ids, &counts, l);
        let covered: u64 = spans.iter().map(|s| s.tokens).sum();
        let mut spans = spans;
        if covered < l {
            spans.push(Span {
                id: pad_id(i),
                tokens: l - covered,
            });
            stats.requests_padded += 1;
        }
        stats.requests_cut += u64::from(cut);
        r.content = Content::Spans(spans);
    }
    if stats.requests == 0 {
        stats.min_tokens_per_id = 0.0;
    }
    stats
}

/// The spans of `ids` at their fixed counts, stopped at `l` tokens; and whether they were cut.
fn spans_of(ids: &[u64], counts: &HashMap<u64, u64>, l: u64) -> (Vec<Span>, bool) {
    let mut spans = Vec::with_capacity(ids.len());
    let mut left = l;
    for id in ids {
        let c = counts[id];
        if left == 0 {
            return (spans, true);
        }
        let tokens = c.min(left);
        spans.push(Span { id: *id, tokens });
        left -= tokens;
        if tokens < c {
            return (spans, true);
        }
    }
    (spans, false)
}

/// Appends the ids of a spans prompt's whole `b`-token blocks to `out`: each the hash of the
/// block's synthesized tokens (the replay chains them, as it chains any block ids).
pub fn block_ids(spans: &[Span], prompt_tokens: u64, b: u32, out: &mut Vec<u64>) {
    let b = b as usize;
    let whole = (prompt_tokens / b as u64) as usize;
    let mut block: Vec<i64> = Vec::with_capacity(b);
    let mut done = 0;
    'spans: for s in spans {
        for j in 0..s.tokens {
            if done == whole {
                break 'spans;
            }
            block.push(token(s.id, j));
            if block.len() == b {
                out.push(hash::token_block(0, &block));
                block.clear();
                done += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::trace::TraceRequest;

    fn trace(lines: &[(u64, &[u64])]) -> Trace {
        Trace {
            name: "t".into(),
            block_tokens: 0,
            requests: lines
                .iter()
                .map(|&(l, ids)| TraceRequest {
                    arrival: 0.0,
                    session: None,
                    prompt_tokens: l,
                    output_tokens: 1,
                    content: Content::Blocks(ids.to_vec()),
                })
                .collect(),
            streams: vec![],
            spread: None,
        }
    }

    fn counts(t: &Trace, i: usize) -> Vec<(u64, u64)> {
        match &t.requests[i].content {
            Content::Spans(s) => s.iter().map(|s| (s.id, s.tokens)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn first_appearance_fixes_counts_and_new_ids_take_the_rest() {
        let mut t = trace(&[
            (302, &[1, 2, 3]),   // 101, 101, 100
            (402, &[1, 2, 4]),   // ids 1, 2 keep 101 each: id 4 gets 200
            (150, &[1, 2, 5]),   // 202 > 150: cut inside id 2; id 5 gets 150 / 3
            (300, &[1, 2]),      // 202 < 300: padded
            (60, &[1, 2, 3, 6]), // 302 > 60: cut inside id 1; id 6 gets 60 / 4
            (100, &[6, 8]),      // id 6 keeps 15: id 8 gets 85
        ]);
        let st = spread(&mut t);
        assert_eq!(counts(&t, 0), [(1, 101), (2, 101), (3, 100)]);
        assert_eq!(counts(&t, 1), [(1, 101), (2, 101), (4, 200)]);
        assert_eq!(counts(&t, 2), [(1, 101), (2, 49)]);
        let pad = counts(&t, 3);
        assert_eq!(pad[..2], [(1, 101), (2, 101)]);
        assert_eq!(pad[2].1, 98);
        assert_eq!(counts(&t, 4), [(1, 60)]);
        assert_eq!(counts(&t, 5), [(6, 15), (8, 85)]);
        assert_eq!(
            (st.requests, st.requests_cut, st.requests_padded),
            (6, 2, 1)
        );
        // Requests 1 to 5 reuse ids at counts other than their own share (50).
        assert_eq!(st.requests_disagreeing, 5);
        assert_eq!((st.min_tokens_per_id, st.max_tokens_per_id), (15.0, 150.0));
        t.validate().unwrap();
    }

    #[test]
    fn equal_id_prefixes_give_equal_block_ids() {
        let mut t = trace(&[(700, &[1, 2, 3, 4, 5, 6, 7]), (3000, &[1, 2, 3, 9])]);
        spread(&mut t);
        let ids = |i: usize| {
            let Content::Spans(s) = &t.requests[i].content else {
                unreachable!()
            };
            let mut out = Vec::new();
            block_ids(s, t.requests[i].prompt_tokens, 16, &mut out);
            out
        };
        let (a, b) = (ids(0), ids(1));
        assert_eq!((a.len(), b.len()), (700 / 16, 3000 / 16));
        // Ids 1 to 3 cover 300 tokens in both: 18 whole blocks of 16 are equal, the 19th not.
        assert_eq!(a[..18], b[..18]);
        assert_ne!(a[18], b[18]);
        assert_ne!(token(1, 0), token(2, 0));
        assert_ne!(token(1, 0), token(1, 1));
    }
}
