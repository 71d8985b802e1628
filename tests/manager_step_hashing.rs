//! Differential test of a batched step's admissions against the same admissions one `admit`
//! call at a time. The step hashes its prompts ahead, and a prompt takes the hashes of the
//! leading blocks it shares with the previous prompt hashed from token ids under the same salt
//! (requests admitted together often share a system prompt) instead of hashing them again.
//! The prompts here share prefixes of random lengths (inside and across block boundaries),
//! carry salts or none, and mix token ids with precomputed block hashes, so that every pairing
//! the sharing must refuse (another salt, a block-hash prompt in between, a prompt that
//! diverges inside a block) occurs. Every hit, the accounting, the cached contents afterwards
//! and `validate()` must agree.

use kvalloc::{Admission, KVCacheManager, ManagerConfig, ModelSpec, Prompt, Step};
use proptest::prelude::*;

const B: usize = 16;

/// One full layer and three sliding layers (window 32): cheap blocks.
fn spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// An admission: a prefix of one of a few shared token streams, then its own tokens.
#[derive(Debug, Clone)]
struct Gen {
    base: u8,
    shared: usize,
    own: usize,
    salt: Option<u8>,
    /// Admitted with block hashes (one id per whole block) instead of token ids.
    hashes: bool,
}

fn gen() -> impl Strategy<Value = Gen> {
    (
        0u8..3,
        0usize..6 * B,
        0usize..3 * B,
        prop_oneof![4 => Just(None), 1 => Just(Some(1u8)), 1 => Just(Some(2u8))],
        proptest::bool::weighted(0.15),
    )
        .prop_filter("a prompt is not empty", |(_, shared, own, _, _)| {
            shared + own > 0
        })
        .prop_map(|(base, shared, own, salt, hashes)| Gen {
            base,
            shared,
            own,
            salt,
            hashes,
        })
}

/// The prompt of `g` for request `id`: tokens, and its whole blocks' ids for hash mode.
fn tokens(g: &Gen, id: u64) -> Vec<i64> {
    let mut t: Vec<i64> = (0..g.shared as i64)
        .map(|i| i64::from(g.base) * 1_000_000 + i)
        .collect();
    t.extend((0..g.own as i64).map(|i| 500_000_000 + id as i64 * 1000 + i));
    t
}

fn block_ids(t: &[i64]) -> Vec<u64> {
    t.chunks(B)
        .map(|c| kvalloc::hash::digest(&c[0].to_le_bytes()) ^ c.len() as u64)
        .collect()
}

/// A prompt's token ids, block ids (hash mode) and salt.
type Owned = (Vec<i64>, Vec<u64>, Option<Vec<u8>>);

fn salt_bytes(s: Option<u8>) -> Option<Vec<u8>> {
    s.map(|s| vec![s; 3])
}

fn prompt<'a>(g: &Gen, t: &'a [i64], ids: &'a [u64]) -> Prompt<'a> {
    if g.hashes {
        Prompt::BlockHashes {
            hashes: ids,
            num_tokens: t.len() as u64,
        }
    } else {
        Prompt::Tokens(t)
    }
}

fn run(warm: &[Gen], batch: &[Gen]) -> Result<(), TestCaseError> {
    let config = ManagerConfig::default();
    let mut stepped = KVCacheManager::new(spec(), 64 << 20, config.clone()).unwrap();
    let mut single = KVCacheManager::new(spec(), 64 << 20, config).unwrap();
    // Both caches first hold the same finished requests.
    for (i, g) in warm.iter().enumerate() {
        let id = 1_000_000 + i as u64;
        let t = tokens(g, id);
        let ids = block_ids(&t);
        let salt = salt_bytes(g.salt);
        for m in [&mut stepped, &mut single] {
            prop_assert!(m
                .admit(id, prompt(g, &t, &ids), salt.as_deref(), None)
                .unwrap()
                .is_some());
            m.finish(id).unwrap();
        }
    }
    let prompts: Vec<Owned> = batch
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let t = tokens(g, i as u64);
            let ids = block_ids(&t);
            (t, ids, salt_bytes(g.salt))
        })
        .collect();
    let admit = batch
        .iter()
        .zip(&prompts)
        .enumerate()
        .map(|(i, (g, (t, ids, salt)))| Admission {
            salt: salt.as_deref(),
            ..Admission::new(i as u64, prompt(g, t, ids))
        })
        .collect();
    let out = stepped
        .step(&Step {
            admit,
            ..Step::default()
        })
        .unwrap();
    stepped
        .validate()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (i, (g, (t, ids, salt))) in batch.iter().zip(&prompts).enumerate() {
        let hit = single
            .admit(i as u64, prompt(g, t, ids), salt.as_deref(), None)
            .unwrap();
        prop_assert_eq!(out.admitted[i], hit, "admission {} ({:?})", i, g);
    }
    prop_assert_eq!(stepped.stats(), single.stats());
    // The same blocks entered the cache: every prompt matches alike once all have finished.
    for i in 0..batch.len() as u64 {
        stepped.finish(i).unwrap();
        single.finish(i).unwrap();
    }
    stepped
        .validate()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (g, (t, ids, salt)) in batch.iter().zip(&prompts) {
        let p = prompt(g, t, ids);
        prop_assert_eq!(
            stepped.match_prefix(p, salt.as_deref()).unwrap(),
            single.match_prefix(p, salt.as_deref()).unwrap(),
            "match of {:?}",
            g
        );
    }
    prop_assert_eq!(stepped.stats(), single.stats());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn batched_admissions_hash_as_single_ones(
        warm in proptest::collection::vec(gen(), 0..4),
        batch in proptest::collection::vec(gen(), 1..8),
    ) {
        run(&warm, &batch)?;
    }
}

/// Consecutive prompts that share whole blocks, then diverge inside a block, under one salt,
/// another salt and none: each hits exactly what was cached for its own salt.
#[test]
fn shared_blocks_are_not_shared_across_salts() {
    let g = |salt, own| Gen {
        base: 0,
        shared: 3 * B + 5,
        own,
        salt,
        hashes: false,
    };
    let warm = [g(Some(1), 0), g(None, 2 * B)];
    let batch = [
        g(None, B),
        g(Some(1), B),
        g(Some(2), B),
        g(Some(1), 3),
        g(None, 0),
    ];
    run(&warm, &batch).unwrap();
}
