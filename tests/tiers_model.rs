//! Residency across tiers with real bytes: random admissions and finishes over a tiny L1 and
//! small lower tiers, an "engine" that writes each block's KV as a pure function of its prefix,
//! and, after every admission, a check that every page the block tables show below the hit holds
//! exactly the bytes that prefix produced, wherever it was served from (L1, or promoted from a
//! lower tier). `validate()` runs after every operation.

use std::sync::Arc;
use std::time::Duration;

use kvalloc::hash::{chain_tokens, root_seed};
use kvalloc::tiers::{DeviceBuffer, HostBuffer, LowerCapacity};
use kvalloc::{KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt, NULL_PAGE};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const B: usize = 16;

fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// The KV bytes of block `hash` in group `g`: a pure function of the prefix.
fn content(hash: u64, g: usize, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8))
        .flat_map(|i| xxh3_64_with_seed(&(i as u64).to_le_bytes(), hash ^ (g as u64) << 56).to_le_bytes())
        .take(len)
        .collect()
}

struct Engine {
    m: KVCacheManager,
    dev: Arc<HostBuffer>,
    block_bytes: Vec<u64>,
}

impl Engine {
    fn new(policy: Policy, l1: u64, lower: LowerCapacity) -> Engine {
        let spec = small_spec();
        let block_bytes = spec.block_bytes(B as u32);
        let cfg = ManagerConfig {
            policy,
            lower,
            ..ManagerConfig::default()
        };
        let mut m = KVCacheManager::new(spec, l1, cfg).unwrap();
        let dev = Arc::new(HostBuffer::zeroed(l1 as usize));
        m.register_device(dev.clone() as Arc<dyn DeviceBuffer>).unwrap();
        Engine { m, dev, block_bytes }
    }

    fn page_bytes(&self, g: usize, page: i32) -> Vec<u8> {
        let bb = self.block_bytes[g] as usize;
        let mut out = vec![0u8; bb];
        self.dev.read(page as u64 * bb as u64, &mut out);
        out
    }

    /// Admits, checks the hit's bytes, then "computes" the rest of the prompt.
    fn admit(&mut self, id: u64, prompt: &[i64]) -> Result<Option<u64>, TestCaseError> {
        let Some(hit) = self.m.admit(id, Prompt::Tokens(prompt), None, None).unwrap() else {
            return Ok(None);
        };
        assert!(self.m.load_handle(id).unwrap().wait_all(Some(Duration::from_secs(10))));
        let mut hashes = Vec::new();
        chain_tokens(root_seed(None), prompt, B, &mut hashes);
        for g in 0..self.block_bytes.len() {
            let table = self.m.block_table(id, g).unwrap();
            for (i, &page) in table.iter().enumerate() {
                if page == NULL_PAGE {
                    continue;
                }
                let Some(&h) = hashes.get(i) else { continue };
                let want = content(h, g, self.block_bytes[g] as usize);
                if (i as u64) < hit / B as u64 {
                    let got = self.page_bytes(g, page);
                    prop_assert!(
                        got == want,
                        "request {} group {} block {} (hit {}): wrong bytes (first 8: {:?} vs {:?})",
                        id, g, i, hit, &got[..8], &want[..8]
                    );
                } else {
                    self.dev.write(page as u64 * self.block_bytes[g], &want);
                }
            }
        }
        Ok(Some(hit))
    }
}

fn prompt_of(family: u8, turns: u8, tail: u8) -> Vec<i64> {
    // Families share a 48-token system prompt; each turn adds 40 tokens of the family's
    // conversation; the tail makes a partial last block.
    let mut p: Vec<i64> = (0..48).collect();
    for t in 0..turns {
        p.extend((0..40).map(|j| 1000 * (i64::from(family) + 1) + 40 * i64::from(t) + j));
    }
    p.extend((0..i64::from(tail)).map(|j| 900_000 + j));
    p
}

#[derive(Debug, Clone)]
enum Op {
    Admit { family: u8, turns: u8, tail: u8 },
    Finish(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0u8..6, 1u8..8, 0u8..16).prop_map(|(family, turns, tail)| Op::Admit { family, turns, tail }),
            2 => (0usize..8).prop_map(Op::Finish),
        ],
        1..60,
    )
}

fn run(policy: Policy, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let spec = small_spec();
    let slab: u64 = spec.block_bytes(B as u32).iter().product::<u64>() / 1024; // LCM here
    let _ = slab;
    let mut e = Engine::new(
        policy,
        96 << 10,
        LowerCapacity { host: 128 << 10, disk: 0, remote: 0 },
    );
    let mut running: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Admit { family, turns, tail } => {
                let p = prompt_of(family, turns, tail);
                next += 1;
                if e.admit(next, &p)?.is_some() {
                    running.push(next);
                }
            }
            Op::Finish(i) => {
                if !running.is_empty() {
                    let id = running.remove(i % running.len());
                    e.m.finish(id).unwrap();
                }
            }
        }
        e.m.validate().map_err(|x| TestCaseError::fail(x.to_string()))?;
    }
    for id in running {
        e.m.finish(id).unwrap();
    }
    e.m.wait_loads();
    e.m.validate().map_err(|x| TestCaseError::fail(x.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn bytes_survive_demotion_and_promotion_swa_aware(ops in ops()) {
        run(Policy::SwaAware, ops)?;
    }

    #[test]
    fn bytes_survive_demotion_and_promotion_dense(ops in ops()) {
        run(Policy::Dense, ops)?;
    }
}

/// A whole conversation evicted to host memory comes back: its next turn hits the whole
/// previous prompt, promoted from L2, with the bytes the engine wrote.
#[test]
fn next_turn_hits_from_host_after_eviction() {
    let mut e = Engine::new(
        Policy::SwaAware,
        96 << 10,
        LowerCapacity { host: 1 << 20, disk: 0, remote: 0 },
    );
    let p1 = prompt_of(0, 3, 0); // 168 tokens
    assert_eq!(e.admit(1, &p1).unwrap(), Some(0));
    e.m.finish(1).unwrap();
    // Other families push it out of L1.
    for (id, f) in (2..12).zip(1..) {
        let p = prompt_of(f, 4, 0);
        if e.admit(id, &p).unwrap().is_some() {
            e.m.finish(id).unwrap();
        }
    }
    let hits = e.m.match_prefix_tiers(Prompt::Tokens(&prompt_of(0, 4, 0)), None).unwrap();
    assert!(hits[0] < 160, "evicted from L1: {hits:?}");
    assert_eq!(hits[1], 160, "whole previous prompt from host: {hits:?}");
    let hit = e.admit(20, &prompt_of(0, 4, 0)).unwrap();
    assert_eq!(hit, Some(160));
    let st = e.m.stats();
    assert!(st.tiers[0].promoted_tokens > 0, "{st:?}");
    e.m.finish(20).unwrap();
    e.m.wait_loads();
    e.m.validate().unwrap();
}
