//! The clairvoyant reference (`Eviction::Oracle`): on a unit-size toy it equals Belady's MIN
//! computed by a small independent implementation, whether the prompts are block ids (trace
//! files) or token ids (the generators' prompts), and no online policy beats it on the bundled
//! conversation trace nor, for the dense policy, on generated workloads.

use std::path::Path;
use std::sync::Arc;

use kvalloc::sim::{
    generate, readers, Content, RunConfig, ServiceModel, SimReport, Simulator, Trace, TraceRequest,
};
use kvalloc::{Eviction, KVCacheManager, ManagerConfig, ModelSpec, Policy};

const TRACE: &str = "python/kvalloc/data/mooncake_conversation.jsonl";
const B: u32 = 16;

/// One full-attention layer: one group, every block the same size.
fn unit_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 8,
    });
    let mut spec = ModelSpec::from_hf_config(&cfg, None).unwrap();
    spec.name = "unit".into();
    spec
}

fn run(sim: &Simulator, policy: Policy, eviction: Eviction, device_bytes: u64) -> SimReport {
    let cfg = RunConfig {
        policy,
        eviction,
        device_bytes,
        lower_tiers: vec![],
        service: ServiceModel::default(),
        overlap: Default::default(),
        load_policy: Default::default(),
    };
    sim.run(&cfg, eviction.name(), &mut |_, _| true).unwrap()
}

/// A tiny xorshift: the toy's prompts, reproducibly.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Prompts of 1 to 6 whole blocks drawn from a small alphabet (so prefixes are shared), each
/// with one more token: every whole block can hit.
fn toy_prompts(seed: u64, n: usize) -> Vec<Vec<u64>> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(6) as usize;
            let first = rng.below(3);
            let mut ids = vec![first];
            ids.extend((1..len).map(|_| rng.below(2)));
            ids
        })
        .collect()
}

/// Requests far apart (one runs at a time), one output token each.
fn toy_trace(prompts: &[Vec<u64>]) -> Trace {
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let mut all = ids.clone();
            all.push(1_000_000 + i as u64); // the partial block: the prompt's last token
            TraceRequest {
                arrival: i as f64 * 1000.0,
                session: None,
                prompt_tokens: ids.len() as u64 * u64::from(B) + 1,
                output_tokens: 1,
                content: Content::Blocks(all),
            }
        })
        .collect();
    Trace {
        name: "unit-toy".into(),
        block_tokens: B,
        requests,
        streams: vec![],
        spread: None,
    }
}

/// The same toy with token-id prompts, as the generators write them: block k of a prompt is
/// `B` tokens derived from its id, then one token of its own. Each request has its own stream
/// (its output is opaque).
fn toy_stream_trace(prompts: &[Vec<u64>]) -> Trace {
    let mut t = toy_trace(prompts);
    for (i, (r, ids)) in t.requests.iter_mut().zip(prompts).enumerate() {
        let mut tokens: Vec<i64> = ids
            .iter()
            .flat_map(|&id| (0..i64::from(B)).map(move |j| id as i64 * 100 + j))
            .collect();
        tokens.push(1_000_000 + i as i64);
        r.content = Content::Stream(t.streams.len() as u32);
        t.streams.push(tokens);
    }
    t.block_tokens = 0;
    t
}

/// Belady's MIN over blocks (a block is a prefix of ids), written independently of the manager.
/// Request i holds its whole blocks plus one partial block while it runs; a miss takes a free
/// block, else evicts the cached block used again farthest in the future (never: first), the
/// deepest first among equals (so a prefix never loses a block before its extension). Returns
/// the hit blocks.
fn belady_hits(prompts: &[Vec<u64>], capacity: usize) -> u64 {
    let next_use = |block: &[u64], after: usize| -> usize {
        (after + 1..prompts.len())
            .find(|&j| prompts[j].len() >= block.len() && prompts[j][..block.len()] == *block)
            .unwrap_or(usize::MAX)
    };
    let mut cache: Vec<Vec<u64>> = Vec::new();
    let mut hits = 0;
    for (i, ids) in prompts.iter().enumerate() {
        let h = (1..=ids.len())
            .take_while(|&k| cache.iter().any(|c| c[..] == ids[..k]))
            .count();
        hits += h as u64;
        let need = ids.len() - h + 1;
        while capacity - cache.len() < need {
            let victim = (0..cache.len())
                .filter(|&v| !(cache[v].len() <= h && cache[v][..] == ids[..cache[v].len()]))
                .max_by_key(|&v| (next_use(&cache[v], i), cache[v].len()))
                .expect("a request fits the cache");
            cache.swap_remove(victim);
        }
        for k in h + 1..=ids.len() {
            cache.push(ids[..k].to_vec());
        }
    }
    hits
}

#[test]
fn oracle_equals_belady_min_on_unit_blocks() {
    let spec = unit_spec();
    let block_bytes = spec.bytes_per_token_dense() * u64::from(B);
    for (seed, n, blocks) in [(7, 300, 9), (11, 300, 14), (23, 400, 20)] {
        let bytes = blocks * block_bytes;
        // The capacity the arena really gives, in blocks.
        let config = ManagerConfig {
            block_tokens: B,
            policy: Policy::Dense,
            ..ManagerConfig::default()
        };
        let m = KVCacheManager::new(spec.clone(), bytes, config).unwrap();
        let capacity = m.arena().available(0).unwrap() as usize;
        let prompts = toy_prompts(seed, n);
        let expected = belady_hits(&prompts, capacity);
        for trace in [toy_trace(&prompts), toy_stream_trace(&prompts)] {
            let sim = Simulator::new(spec.clone(), Arc::new(trace), B).unwrap();
            let oracle = run(&sim, Policy::Dense, Eviction::Oracle, bytes);
            assert_eq!((oracle.completed, oracle.rejected), (n as u64, 0));
            assert_eq!(
                oracle.hit_tokens,
                expected * u64::from(B),
                "seed {seed}, {capacity} blocks, {:?}",
                sim.trace().requests[0].content
            );
            for e in [Eviction::Lru, Eviction::Value] {
                let online = run(&sim, Policy::Dense, e, bytes);
                assert!(online.hit_tokens <= oracle.hit_tokens, "{e:?} seed {seed}");
            }
        }
    }
}

/// The first `n` requests of the conversation trace.
fn conversation(n: usize) -> Trace {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(TRACE)).unwrap();
    let head: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    readers::parse_trace(&head, "conversation-head", readers::ReadOptions::default()).unwrap()
}

#[test]
fn no_online_policy_beats_the_oracle_on_the_conversation_trace() {
    let sim = Simulator::new(
        ModelSpec::preset("mimo-v2.5-pro").unwrap(),
        Arc::new(conversation(2_000)),
        512,
    )
    .unwrap();
    // Below 128 GiB the running requests of this burst leave almost no cache to any policy.
    for gib in [128u64, 256] {
        let oracle = run(&sim, Policy::SwaAware, Eviction::Oracle, gib << 30);
        assert!(oracle.hit_tokens <= oracle.upper_bound_hit_tokens);
        for e in [Eviction::Lru, Eviction::Value] {
            let online = run(&sim, Policy::SwaAware, e, gib << 30);
            assert!(
                online.hit_tokens <= oracle.hit_tokens,
                "{} beats the oracle at {gib} GiB: {} vs {}",
                e.name(),
                online.hit_rate(),
                oracle.hit_rate()
            );
        }
    }
}

#[test]
fn no_online_policy_beats_the_dense_oracle_on_generated_workloads() {
    // Budgets at which every request fits (no rejection reshapes the traffic), small enough
    // that eviction decides the hit rate.
    for (kind, size, budgets) in [("chat", 60, [8u64, 16]), ("shared-prompt", 400, [4, 8])] {
        let trace = generate::generate(kind, 3, Some(size)).unwrap();
        let sim = Simulator::new(
            ModelSpec::preset("mimo-v2.5-pro").unwrap(),
            Arc::new(trace),
            128,
        )
        .unwrap();
        for gib in budgets {
            let oracle = run(&sim, Policy::Dense, Eviction::Oracle, gib << 30);
            assert_eq!(oracle.rejected, 0, "{kind} at {gib} GiB");
            assert!(oracle.hit_tokens <= oracle.upper_bound_hit_tokens);
            for e in [Eviction::Lru, Eviction::Value] {
                let online = run(&sim, Policy::Dense, e, gib << 30);
                assert!(
                    online.hit_tokens < oracle.hit_tokens,
                    "{} reaches the oracle on {kind} at {gib} GiB: {} vs {}",
                    e.name(),
                    online.hit_rate(),
                    oracle.hit_rate()
                );
            }
        }
    }
}
