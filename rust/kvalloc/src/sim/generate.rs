//! Seeded synthetic traces for three traffic shapes.
//!
//! Every generator is deterministic in its seed and emits token-id prompts over per-session
//! token streams (see `trace`), so that a turn's prompt contains the previous turns' prompts and
//! outputs, as a chat engine sees them. Timestamps are the *earliest* submission; the replay
//! also waits for a session's previous turn to finish.
//!
//! - `chat` (multi-turn chat): `size` sessions (default 300) starting uniformly over 10
//!   minutes; each opens with one of 4 shared system prompts (~800 tokens), then 1 + Exp(5)
//!   turns of ~250 user tokens and ~300 output tokens, 40 s of thinking (mean) between turns.
//! - `agent` (agent loops): `size` sessions (default 40) starting over 10 minutes, each on one
//!   of 3 long tool prompts (~12K tokens), then 5 + Exp(20) short turns: ~300 tokens of tool
//!   results in, ~80 tokens of tool call out, 1 s apart (mean); a context stops at 120K tokens.
//! - `shared-prompt` (shared-system-prompt traffic): `size` single-turn requests (default 2,000)
//!   arriving as a Poisson process at 4 per second, each one of 8 system prompts (~3K tokens,
//!   Zipf popularity) plus a unique ~300-token question and ~200 output tokens.
//!
//! Lengths are log-normal around the stated means, clamped to sensible ranges.

use super::rng::Rng;
use super::trace::{Content, Trace, TraceRequest};
use crate::error::{Error, Result};

/// The generators' names, for help texts and errors.
pub const GENERATORS: &[&str] = &["chat", "agent", "shared-prompt"];

/// Generates a trace. `size`: sessions (`chat`, `agent`) or requests (`shared-prompt`); None
/// for the default.
pub fn generate(kind: &str, seed: u64, size: Option<u32>) -> Result<Trace> {
    if size == Some(0) {
        return Err(Error::invalid("size", "must be positive"));
    }
    let mut g = Gen {
        rng: Rng::new(seed),
        trace: Trace {
            name: format!("{kind} (seed {seed})"),
            block_tokens: 0,
            ..Trace::default()
        },
    };
    match kind {
        "chat" => g.sessions(size.unwrap_or(300), &CHAT),
        "agent" => g.sessions(size.unwrap_or(40), &AGENT),
        "shared-prompt" => g.shared_prompt(size.unwrap_or(2_000)),
        other => {
            return Err(Error::invalid(
                "generator",
                format!("unknown generator {other:?}; expected one of {GENERATORS:?}"),
            ))
        }
    }
    let mut trace = g.trace;
    trace
        .requests
        .sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    trace.validate()?;
    Ok(trace)
}

/// The shape of a multi-turn workload.
struct SessionShape {
    /// Shared opening prompts and their mean length.
    openings: usize,
    opening_mean: f64,
    opening_sigma: f64,
    /// Turns = min_turns + Exp(extra_turns_mean), at most max_turns.
    min_turns: u64,
    extra_turns_mean: f64,
    max_turns: u64,
    user_mean: f64,
    output_mean: f64,
    think_mean: f64,
    max_context: u64,
}

const CHAT: SessionShape = SessionShape {
    openings: 4,
    opening_mean: 800.0,
    opening_sigma: 0.5,
    min_turns: 1,
    extra_turns_mean: 5.0,
    max_turns: 30,
    user_mean: 250.0,
    output_mean: 300.0,
    think_mean: 40.0,
    max_context: 120_000,
};

const AGENT: SessionShape = SessionShape {
    openings: 3,
    opening_mean: 12_000.0,
    opening_sigma: 0.3,
    min_turns: 5,
    extra_turns_mean: 20.0,
    max_turns: 80,
    user_mean: 300.0,
    output_mean: 80.0,
    think_mean: 1.0,
    max_context: 120_000,
};

/// Seconds over which sessions start.
const SPAN: f64 = 600.0;

struct Gen {
    rng: Rng,
    trace: Trace,
}

impl Gen {
    fn tokens(&mut self, n: u64) -> Vec<i64> {
        (0..n)
            .map(|_| (self.rng.next_u64() % 150_000) as i64)
            .collect()
    }

    fn sessions(&mut self, n: u32, s: &SessionShape) {
        let openings: Vec<Vec<i64>> = (0..s.openings)
            .map(|_| {
                let len = self
                    .rng
                    .lognormal(s.opening_mean, s.opening_sigma, 16, 64_000);
                self.tokens(len)
            })
            .collect();
        for session in 0..n {
            let mut t = self.rng.uniform() * SPAN;
            let turns =
                (s.min_turns + self.rng.exponential(s.extra_turns_mean) as u64).min(s.max_turns);
            let mut stream = openings[self.rng.range(0, s.openings as u64 - 1) as usize].clone();
            let stream_id = self.trace.streams.len() as u32;
            for _ in 0..turns {
                let user = self.rng.lognormal(s.user_mean, 0.8, 4, 8_000);
                let output = self.rng.lognormal(s.output_mean, 0.7, 4, 4_000);
                if stream.len() as u64 + user + output > s.max_context {
                    break;
                }
                let u = self.tokens(user);
                stream.extend(u);
                self.trace.requests.push(TraceRequest {
                    arrival: t,
                    session: Some(u64::from(session)),
                    prompt_tokens: stream.len() as u64,
                    output_tokens: output,
                    content: Content::Stream(stream_id),
                });
                let o = self.tokens(output);
                stream.extend(o);
                t += self.rng.exponential(s.think_mean);
            }
            self.trace.streams.push(stream);
        }
    }

    fn shared_prompt(&mut self, n: u32) {
        let prompts: Vec<Vec<i64>> = (0..8)
            .map(|_| {
                let len = self.rng.lognormal(3_000.0, 0.6, 500, 16_000);
                self.tokens(len)
            })
            .collect();
        let mut t = 0.0;
        for _ in 0..n {
            let mut stream = prompts[self.rng.zipf(prompts.len(), 1.0)].clone();
            let user = self.rng.lognormal(300.0, 0.8, 4, 4_000);
            let output = self.rng.lognormal(200.0, 0.7, 4, 2_000);
            let u = self.tokens(user);
            stream.extend(u);
            let prompt_tokens = stream.len() as u64;
            let o = self.tokens(output);
            stream.extend(o);
            self.trace.streams.push(stream);
            self.trace.requests.push(TraceRequest {
                arrival: t,
                session: None,
                prompt_tokens,
                output_tokens: output,
                content: Content::Stream(self.trace.streams.len() as u32 - 1),
            });
            t += self.rng.exponential(0.25);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_by_seed() {
        for kind in GENERATORS {
            let a = generate(kind, 3, Some(5)).unwrap();
            let b = generate(kind, 3, Some(5)).unwrap();
            let c = generate(kind, 4, Some(5)).unwrap();
            assert_eq!(a, b, "{kind}");
            assert_ne!(a.streams, c.streams, "{kind}");
            a.validate().unwrap();
        }
        assert!(generate("nope", 1, None).is_err());
    }

    #[test]
    fn turns_extend_their_session() {
        let t = generate("chat", 1, Some(20)).unwrap();
        for r in &t.requests {
            let out = t.output_token_ids(r).expect("outputs are known");
            assert_eq!(out.len() as u64, r.output_tokens);
        }
        // A later turn of a session starts with the previous turn's prompt and output.
        let s0: Vec<_> = t.requests.iter().filter(|r| r.session == Some(0)).collect();
        for w in s0.windows(2) {
            assert!(w[1].prompt_tokens > w[0].prompt_tokens + w[0].output_tokens);
            assert_eq!(w[0].content, w[1].content);
        }
    }
}
