//! Traces whose hash ids stand for varying numbers of tokens (`TokensPerId::Spread`): read from
//! a generated Mooncake-style file whose `input_length / len(hash_ids)` varies from 6 to 101
//! within it, every prompt's tokens sum to its `input_length`, and a turn that repeats the
//! previous turn's ids hits exactly the previous prompt's tokens (whole blocks) in an
//! unbounded replay, computed here without the simulator.

use kvalloc::sim::readers::{self, ReadOptions, TokensPerId};
use kvalloc::sim::{Content, RunConfig, ServiceModel, Simulator, Trace};
use kvalloc::{Eviction, ModelSpec, Policy};

const SPREAD: ReadOptions = ReadOptions {
    block_tokens: None,
    tokens_per_id: TokensPerId::Spread,
};

/// A tiny xorshift: the file's lengths, reproducibly.
struct Rng(u64);
impl Rng {
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + self.0 % (hi - lo + 1)
    }
}

/// `sessions` conversations of `turns` turns, interleaved in time, 10 s apart. Turn k's ids are
/// turn k-1's plus a few new ones, each new id worth 6 to 101 tokens (drawn per turn), plus a
/// remainder smaller than the new ids' count. Returns the JSONL text and each line's
/// (session, input_length) in file (= arrival) order.
fn varying_trace(sessions: u64, turns: u64) -> (String, Vec<(u64, u64)>) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut state: Vec<(Vec<u64>, u64)> = vec![(Vec::new(), 0); sessions as usize];
    let (mut text, mut lines) = (String::new(), Vec::new());
    for k in 0..turns {
        for s in 0..sessions {
            let (ids, len) = &mut state[s as usize];
            let new = rng.range(1, 12);
            // The extremes once each, then anything between.
            let per = match (k, s) {
                (0, 0) => 6,
                (0, 1) => 101,
                _ => rng.range(6, 101),
            };
            for _ in 0..new {
                ids.push(s * 1_000_000 + ids.len() as u64);
            }
            *len += new * per + rng.range(0, new - 1);
            let ts = (k * sessions + s) * 10_000;
            text += &format!(
                "{{\"timestamp\": {ts}, \"input_length\": {len}, \"output_length\": 3, \"hash_ids\": {ids:?}}}\n"
            );
            lines.push((s, *len));
        }
    }
    (text, lines)
}

fn unbounded_run(sim: &Simulator, policy: Policy) -> kvalloc::sim::SimReport {
    let cfg = RunConfig {
        policy,
        eviction: Eviction::Lru,
        device_bytes: 64 << 30,
        lower_tiers: vec![],
        service: ServiceModel::default(),
        overlap: Default::default(),
        load_policy: Default::default(),
    };
    sim.run(&cfg, policy.name(), &mut |_, _| true).unwrap()
}

#[test]
fn spread_trace_keeps_totals_and_prefix_sharing() {
    let (text, lines) = varying_trace(6, 5);
    // An exact reading refuses it: no one block size fits every line.
    let exact = readers::parse_trace(&text, "varying.jsonl", ReadOptions::default());
    assert!(exact.is_err());
    let trace: Trace = readers::parse_trace(&text, "varying.jsonl", SPREAD).unwrap();
    let st = trace.spread.expect("spread stats");
    assert_eq!(st.requests, lines.len() as u64);
    assert!(
        st.min_tokens_per_id < 7.0 && st.max_tokens_per_id >= 101.0,
        "{st:?}"
    );
    // Turns extend their previous turn: no request is cut or padded.
    assert_eq!((st.requests_cut, st.requests_padded), (0, 0));
    for (r, &(_, len)) in trace.requests.iter().zip(&lines) {
        assert_eq!(r.prompt_tokens, len);
        let Content::Spans(spans) = &r.content else {
            panic!("{:?}", r.content)
        };
        assert_eq!(spans.iter().map(|s| s.tokens).sum::<u64>(), len);
    }
    // The previous turn of the same session holds the whole previous prompt: an unbounded
    // cache hits its whole blocks (outputs are opaque; sessions share nothing).
    let spec = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    for b in [16u32, 64, 128] {
        let mut prev = [0u64; 6];
        let mut expected = 0;
        for &(s, len) in &lines {
            expected += prev[s as usize] / u64::from(b) * u64::from(b);
            prev[s as usize] = len;
        }
        let sim = Simulator::new(spec.clone(), trace.clone().into(), b).unwrap();
        assert_eq!(sim.upper_bound().hit_tokens, expected, "b = {b}");
        let dense = unbounded_run(&sim, Policy::Dense);
        assert_eq!((dense.hit_tokens, dense.rejected), (expected, 0), "b = {b}");
        // Prompt-end checkpoints sit on the resume points: SWA-aware serves them all too.
        assert_eq!(unbounded_run(&sim, Policy::SwaAware).hit_tokens, expected);
    }
}
