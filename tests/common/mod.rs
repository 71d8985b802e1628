//! Shared by the tier tests: a small hybrid model, KV content as a pure function of the prefix,
//! and an "engine" that writes and checks real bytes in a registered device buffer.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kvalloc::hash::{chain_tokens, root_seed};
use kvalloc::tiers::{BlockStore, DeviceBuffer, HostBuffer, LowerCapacity};
use kvalloc::{KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt, NULL_PAGE};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const B: usize = 16;

pub fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// The KV bytes of block `hash` in group `g`: a pure function of the prefix.
pub fn content(hash: u64, g: usize, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8))
        .flat_map(|i| {
            xxh3_64_with_seed(&(i as u64).to_le_bytes(), hash ^ (g as u64) << 56).to_le_bytes()
        })
        .take(len)
        .collect()
}

pub struct Engine {
    pub m: KVCacheManager,
    pub dev: Arc<HostBuffer>,
    pub block_bytes: Vec<u64>,
}

impl Engine {
    /// 96 KiB of L1 over `host` bytes of host memory (no disk, no remote).
    pub fn with_host(policy: Policy, host: u64) -> Engine {
        Self::new(
            policy,
            96 << 10,
            LowerCapacity {
                host,
                disk: 0,
                remote: 0,
            },
        )
    }

    pub fn new(policy: Policy, l1: u64, lower: LowerCapacity) -> Engine {
        Self::with_stores(policy, l1, lower, None, None, false)
    }

    pub fn with_stores(
        policy: Policy,
        l1: u64,
        lower: LowerCapacity,
        disk: Option<Box<dyn BlockStore>>,
        remote: Option<Box<dyn BlockStore>>,
        write_through: bool,
    ) -> Engine {
        let cfg = ManagerConfig {
            policy,
            lower,
            write_through,
            ..ManagerConfig::default()
        };
        Self::with_config(cfg, l1, disk, remote)
    }

    /// An engine over a manager with settings `cfg` (block size `B`) and `l1` bytes of L1.
    pub fn with_config(
        cfg: ManagerConfig,
        l1: u64,
        disk: Option<Box<dyn BlockStore>>,
        remote: Option<Box<dyn BlockStore>>,
    ) -> Engine {
        let spec = small_spec();
        let block_bytes = spec.block_bytes(B as u32);
        let mut m = KVCacheManager::with_stores(spec, l1, cfg, disk, remote).unwrap();
        let dev = Arc::new(HostBuffer::zeroed(l1 as usize));
        m.register_device(dev.clone() as Arc<dyn DeviceBuffer>)
            .unwrap();
        Engine {
            m,
            dev,
            block_bytes,
        }
    }

    pub fn page_bytes(&self, g: usize, page: i32) -> Vec<u8> {
        let bb = self.block_bytes[g] as usize;
        let mut out = vec![0u8; bb];
        self.dev.read(page as u64 * bb as u64, &mut out);
        out
    }

    /// Admits, checks the hit's bytes, then "computes" the rest of the prompt.
    pub fn admit(&mut self, id: u64, prompt: &[i64]) -> Result<Option<u64>, TestCaseError> {
        // Waits for a background load from disk or the remote store (none: admitted at once).
        let Some(hit) = self
            .m
            .admit_waiting(id, Prompt::Tokens(prompt), None, None, None)
            .unwrap()
        else {
            return Ok(None);
        };
        self.check_and_fill(id, prompt, hit)?;
        Ok(Some(hit))
    }

    /// For a request admitted with `hit` tokens from cache: waits for its loads, checks every
    /// block of the hit holds its prefix's bytes, and writes the rest (the "compute").
    pub fn check_and_fill(
        &mut self,
        id: u64,
        prompt: &[i64],
        hit: u64,
    ) -> Result<(), TestCaseError> {
        assert!(self
            .m
            .load_handle(id)
            .unwrap()
            .wait_all(Some(Duration::from_secs(10))));
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
        Ok(())
    }
}

/// `turns` turns of conversation `family` after a 48-token shared system prompt, then `tail`
/// tokens that make a partial last block.
pub fn prompt_of(family: u8, turns: u8, tail: u8) -> Vec<i64> {
    let mut p: Vec<i64> = (0..48).collect();
    for t in 0..turns {
        p.extend((0..40).map(|j| 1000 * (i64::from(family) + 1) + 40 * i64::from(t) + j));
    }
    p.extend((0..i64::from(tail)).map(|j| 900_000 + j));
    p
}

/// Admits and finishes at once (a request whose prompt is cached for later ones).
pub fn serve(e: &mut Engine, id: u64, prompt: &[i64]) -> Option<u64> {
    let hit = e.admit(id, prompt).unwrap()?;
    e.m.finish(id).unwrap();
    Some(hit)
}

/// Serves one conversation of `turns` turns for each family in `families` (ids from
/// `first_id`), pushing older conversations down the tiers.
pub fn churn(e: &mut Engine, first_id: u64, families: std::ops::Range<u8>, turns: u8) {
    for (id, f) in (first_id..).zip(families) {
        serve(e, id, &prompt_of(f, turns, 0));
    }
}
