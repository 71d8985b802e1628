//! The request trace a replay consumes, whatever it was read or generated from.
//!
//! A request's prompt is either
//! - **block ids** (`Content::Blocks`): one id per `Trace::block_tokens` tokens of the prompt
//!   (the last block may be partial), as Mooncake-style traces give them. Equal ids at equal
//!   positions after equal prefixes mean equal KV; the replay chains ids, so a match is always
//!   on the whole sequence of ids, never on one id alone, whether or not the trace's ids are
//!   prefix-chained already. Output tokens are opaque: nothing later can match them.
//! - **spans** (`Content::Spans`): block ids that stand for varying numbers of tokens, each with
//!   the count it covers in this prompt (see `spread`: how a trace's tokens are spread over its
//!   ids). The same id always yields the same tokens, so equal id prefixes are equal token
//!   prefixes; the replay hashes the synthesized tokens at its own block size.
//! - **token ids** (`Content::Stream`): a prefix of a token stream shared by the turns of one
//!   conversation, so that the next turn's prompt contains the previous turn's prompt *and*
//!   output. When the stream is long enough, the request's output tokens are the stream's next
//!   `output_tokens` ids (the generators and the generic JSONL's `output` field); otherwise the
//!   output is opaque.
//!
//! ## Block ids at another block size
//! A replay at `block_tokens = b` needs one id per `b` tokens. For a trace of `T`-token blocks:
//! - `b == T`: the ids as they are;
//! - `T` a multiple of `b`: trace block `X` is split into sub-blocks with ids derived from
//!   `(X, sub-index)`, so equal trace blocks give equal sub-blocks and sharing is kept;
//! - `b` a multiple of `T`: `b / T` consecutive ids are combined into one.
//!
//! Only the prompt's whole blocks of `b` tokens get ids (the manager caches whole blocks).
//!
//! A block-id trace resolves resume points only to its own block size: the next turn of a
//! conversation matches up to the previous prompt's last whole *trace* block, not to its last
//! token. The replay therefore places prompt-end checkpoints there (see
//! `ManagerConfig::resume_granularity`).

use crate::error::{Error, Result};
use crate::hash;

/// What a request's prompt is made of. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// One id per trace block (`Trace::block_tokens` tokens; the last may be partial).
    Blocks(Vec<u64>),
    /// Ids of varying token counts, in prompt order; the counts sum to the prompt's length.
    Spans(Vec<Span>),
    /// Index into `Trace::streams`: the prompt is the stream's first `prompt_tokens` ids.
    Stream(u32),
}

/// A run of tokens named by one trace id: its first `tokens` tokens (see `spread::token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The trace's id.
    pub id: u64,
    /// Tokens it covers in this prompt (positive).
    pub tokens: u64,
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Arrival, in seconds since the trace's first request.
    pub arrival: f64,
    /// Conversation it belongs to, if the trace says: a session's next turn is not submitted
    /// before its previous turn has finished.
    pub session: Option<u64>,
    /// Prompt length in tokens (positive).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub output_tokens: u64,
    /// The prompt itself.
    pub content: Content,
}

/// A request trace: requests in arrival order, plus the token streams token-id prompts refer to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trace {
    /// Where it came from (a file name or a generator), for reports.
    pub name: String,
    /// Tokens per block of `Content::Blocks` prompts (0 when there are none).
    pub block_tokens: u32,
    /// The requests, sorted by arrival (ties keep their order in the source).
    pub requests: Vec<TraceRequest>,
    /// Token streams (`Content::Stream` indexes them).
    pub streams: Vec<Vec<i64>>,
    /// How the tokens of a spread trace were assigned to its ids (None for other traces).
    pub spread: Option<super::spread::SpreadStats>,
}

impl Trace {
    /// Sum of prompt lengths.
    pub fn prompt_tokens(&self) -> u64 {
        self.requests.iter().map(|r| r.prompt_tokens).sum()
    }

    /// Sum of output lengths.
    pub fn output_tokens(&self) -> u64 {
        self.requests.iter().map(|r| r.output_tokens).sum()
    }

    /// Seconds from the first arrival to the last.
    pub fn duration(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.arrival)
    }

    /// Checks what the replay relies on: arrivals finite and sorted, prompts non-empty, block
    /// counts matching lengths, stream indices and lengths in range.
    pub fn validate(&self) -> Result<()> {
        if self.requests.is_empty() {
            return Err(Error::invalid(
                "trace",
                format!("{}: no requests", self.name),
            ));
        }
        let mut prev = f64::NEG_INFINITY;
        for (i, r) in self.requests.iter().enumerate() {
            let bad =
                |m: String| Error::invalid("trace", format!("{} request {i}: {m}", self.name));
            if !r.arrival.is_finite() || r.arrival < prev {
                return Err(bad(format!(
                    "arrival {} is not finite or earlier than the previous one",
                    r.arrival
                )));
            }
            prev = r.arrival;
            if r.prompt_tokens == 0 {
                return Err(bad("empty prompt".into()));
            }
            match &r.content {
                Content::Blocks(ids) => {
                    let t = u64::from(self.block_tokens.max(1));
                    let (whole, all) = (r.prompt_tokens / t, r.prompt_tokens.div_ceil(t));
                    if self.block_tokens == 0
                        || (ids.len() as u64) < whole
                        || ids.len() as u64 > all
                    {
                        return Err(bad(format!(
                            "{} block ids for {} tokens in blocks of {}",
                            ids.len(),
                            r.prompt_tokens,
                            self.block_tokens
                        )));
                    }
                }
                Content::Spans(spans) => {
                    let total = spans.iter().try_fold(0u64, |t, s| {
                        (s.tokens > 0).then(|| t.checked_add(s.tokens)).flatten()
                    });
                    if total != Some(r.prompt_tokens) {
                        return Err(bad(format!(
                            "{} spans do not cover the {}-token prompt with positive counts",
                            spans.len(),
                            r.prompt_tokens
                        )));
                    }
                }
                Content::Stream(s) => match self.streams.get(*s as usize) {
                    Some(st) if st.len() as u64 >= r.prompt_tokens => {}
                    _ => {
                        return Err(bad(format!(
                            "stream {s} is missing or shorter than the prompt"
                        )))
                    }
                },
            }
        }
        Ok(())
    }

    /// The prompt's token ids (a `Content::Stream` request), else None.
    pub fn prompt_token_ids(&self, r: &TraceRequest) -> Option<&[i64]> {
        match r.content {
            Content::Stream(s) => Some(&self.streams[s as usize][..r.prompt_tokens as usize]),
            Content::Blocks(_) | Content::Spans(_) => None,
        }
    }

    /// The output's token ids when the trace knows them, else None (opaque output).
    pub fn output_token_ids(&self, r: &TraceRequest) -> Option<&[i64]> {
        match r.content {
            Content::Stream(s) => {
                let st = &self.streams[s as usize];
                let (p, o) = (r.prompt_tokens as usize, r.output_tokens as usize);
                st.get(p..p + o)
            }
            Content::Blocks(_) | Content::Spans(_) => None,
        }
    }
}

/// Appends the ids of a block-id prompt's whole `b`-token blocks to `out` (see the module docs).
pub fn sim_block_ids(
    ids: &[u64],
    trace_block_tokens: u32,
    prompt_tokens: u64,
    b: u32,
    out: &mut Vec<u64>,
) -> Result<()> {
    let (t, b64) = (trace_block_tokens, u64::from(b));
    let whole = (prompt_tokens / b64) as usize;
    if t == b {
        out.extend_from_slice(&ids[..whole]);
    } else if t % b == 0 {
        let per = (t / b) as usize;
        out.extend((0..whole).map(|k| sub_block_id(ids[k / per], (k % per) as u64)));
    } else if b.is_multiple_of(t) {
        let per = (b / t) as usize;
        out.extend(ids[..whole * per].chunks_exact(per).map(|c| {
            let bytes: Vec<u8> = c.iter().flat_map(|x| x.to_le_bytes()).collect();
            hash::digest(&bytes)
        }));
    } else {
        return Err(Error::invalid(
            "block_tokens",
            format!("{b} neither divides nor is a multiple of the trace's {t}-token blocks"),
        ));
    }
    Ok(())
}

/// The id of sub-block `j` of trace block `id`: deterministic in `(id, j)`.
pub fn sub_block_id(id: u64, j: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&id.to_le_bytes());
    bytes[8..].copy_from_slice(&j.to_le_bytes());
    hash::digest(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_sharing_and_merge_combines() {
        let mut a = Vec::new();
        sim_block_ids(&[7, 8, 9], 512, 1300, 64, &mut a).unwrap();
        assert_eq!(a.len(), 1300 / 64); // whole sub-blocks only
        let mut b = Vec::new();
        sim_block_ids(&[7, 8], 512, 1024, 64, &mut b).unwrap();
        assert_eq!(a[..16], b[..]);
        assert_ne!(a[0], a[1]);
        assert_eq!(a[0], sub_block_id(7, 0));
        let mut m = Vec::new();
        sim_block_ids(&[1, 2, 3, 4, 5], 16, 80, 32, &mut m).unwrap();
        assert_eq!(m.len(), 2);
        let mut same = Vec::new();
        sim_block_ids(&[7, 8, 9], 512, 1536, 512, &mut same).unwrap();
        assert_eq!(same, vec![7, 8, 9]);
        assert!(sim_block_ids(&[1], 512, 512, 48, &mut Vec::new()).is_err());
    }

    #[test]
    fn validate_names_the_request() {
        let t = Trace {
            name: "t".into(),
            block_tokens: 512,
            requests: vec![TraceRequest {
                arrival: 0.0,
                session: None,
                prompt_tokens: 1500,
                output_tokens: 1,
                content: Content::Blocks(vec![1]),
            }],
            streams: vec![],
            spread: None,
        };
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("request 0") && e.contains("1 block ids"), "{e}");
    }
}
