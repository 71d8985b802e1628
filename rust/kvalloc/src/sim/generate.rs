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
///
/// A size whose trace would not fit in the memory the system has available is an
/// [`Error::SystemMemory`] that names the largest size that fits, before anything is
/// generated (a chat trace of 10^9 sessions would need tens of terabytes).
pub fn generate(kind: &str, seed: u64, size: Option<u32>) -> Result<Trace> {
    if size == Some(0) {
        return Err(Error::invalid("size", "must be positive"));
    }
    if let (Some(n), Some(avail)) = (size, crate::mem::prefault::available_memory()) {
        check_size(kind, n, avail)?;
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

/// Mean tokens of a shared-prompt request: its system prompt, question and output.
const SHARED_PROMPT_TOKENS: f64 = 3_000.0 + 300.0 + 200.0;

/// Memory per byte of the generated trace's mean size: its vectors grow by doubling (up to
/// twice their length), and a replay builds its own per-request state beside the trace. Peak
/// memory of generating and replaying (`Simulator.run`) thousands of chat and agent sessions
/// and shared-prompt requests stayed below this estimate.
const MEMORY_FACTOR: f64 = 2.0;

/// Bytes one unit of `size` (a session, or a shared-prompt request) is expected to need, from
/// the shape's means: its token stream, its requests and their bookkeeping, times
/// [`MEMORY_FACTOR`]. None for an unknown generator.
fn bytes_per_unit(kind: &str) -> Option<f64> {
    let token = std::mem::size_of::<i64>() as f64;
    let request = std::mem::size_of::<TraceRequest>() as f64;
    let stream = std::mem::size_of::<Vec<i64>>() as f64;
    let session = |s: &SessionShape| {
        let turns = (s.min_turns as f64 + s.extra_turns_mean).min(s.max_turns as f64);
        let tokens = s.opening_mean + turns * (s.user_mean + s.output_mean);
        tokens * token + turns * request + stream
    };
    let mean = match kind {
        "chat" => session(&CHAT),
        "agent" => session(&AGENT),
        "shared-prompt" => SHARED_PROMPT_TOKENS * token + request + stream,
        _ => return None,
    };
    Some(mean * MEMORY_FACTOR)
}

/// An [`Error::SystemMemory`] naming the largest size that fits when `size` units of `kind`
/// are expected to need more than `available` bytes.
fn check_size(kind: &str, size: u32, available: u64) -> Result<()> {
    let Some(per_unit) = bytes_per_unit(kind) else {
        return Ok(()); // an unknown generator is refused by name
    };
    let need = f64::from(size) * per_unit;
    if need <= available as f64 {
        return Ok(());
    }
    let unit = if kind == "shared-prompt" {
        "requests"
    } else {
        "sessions"
    };
    let largest = (available as f64 / per_unit).floor() as u64;
    Err(Error::SystemMemory {
        what: "size".into(),
        requested_bytes: need as u64,
        message: format!(
            "(estimated for a {kind} trace of {size} {unit}), but the system has {available} \
             bytes available: enough for at most {largest} {unit}"
        ),
    })
}

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
    fn sizes_that_cannot_fit_are_refused_naming_the_largest_that_can() {
        const GIB: u64 = 1 << 30;
        for kind in GENERATORS {
            let per_unit = bytes_per_unit(kind).unwrap();
            let largest = (16.0 * GIB as f64 / per_unit) as u32;
            assert!(largest > 1_000, "{kind}: {per_unit} bytes per unit");
            assert!(check_size(kind, largest, 16 * GIB).is_ok());
            let e = check_size(kind, largest + 1, 16 * GIB).unwrap_err();
            let Error::SystemMemory { what, message, .. } = &e else {
                panic!("{e}")
            };
            assert_eq!(what, "size");
            assert!(
                message.contains(&format!("at most {largest} ")),
                "{message}"
            );
        }
        // The estimates cover what generation really takes: the tokens of a small trace stay
        // below a third of the estimate (the rest is for growth and the replay).
        for kind in GENERATORS {
            let t = generate(kind, 7, Some(200)).unwrap();
            let tokens: usize = t.streams.iter().map(Vec::len).sum();
            let estimate = 200.0 * bytes_per_unit(kind).unwrap() / MEMORY_FACTOR;
            let actual = (tokens * 8) as f64;
            assert!(
                actual < 1.3 * estimate && actual > 0.5 * estimate,
                "{kind}: {actual} vs {estimate}"
            );
        }
        // A size this machine cannot hold is refused before anything is generated.
        let e = generate("chat", 0, Some(1_000_000_000)).unwrap_err();
        assert!(matches!(e, Error::SystemMemory { .. }), "{e}");
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
