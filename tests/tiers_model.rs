//! Residency across tiers with real bytes: random admissions and finishes over a tiny L1 and
//! small lower tiers, an "engine" that writes each block's KV as a pure function of its prefix,
//! and, after every admission, a check that every page the block tables show below the hit holds
//! exactly the bytes that prefix produced, wherever it was served from (L1, or promoted from a
//! lower tier). `validate()` runs after every operation, and replaying the manager's KV cache
//! events (promotions included) gives exactly the blocks it caches.

mod common;
mod events;

use common::{prompt_of, Engine};
use kvalloc::tiers::LowerCapacity;
use kvalloc::{ManagerConfig, Policy, Prompt};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

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
    let cfg = ManagerConfig {
        policy,
        lower: LowerCapacity {
            host: 128 << 10,
            ..LowerCapacity::default()
        },
        events: true,
        ..ManagerConfig::default()
    };
    let mut e = Engine::with_config(cfg, 96 << 10, None, None);
    let mut replay = events::Replay::default();
    let mut running: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Admit {
                family,
                turns,
                tail,
            } => {
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
        e.m.validate()
            .map_err(|x| TestCaseError::fail(x.to_string()))?;
        replay.sync(&mut e.m, None).map_err(TestCaseError::fail)?;
    }
    for id in running {
        e.m.finish(id).unwrap();
    }
    e.m.wait_loads();
    e.m.validate()
        .map_err(|x| TestCaseError::fail(x.to_string()))?;
    replay.sync(&mut e.m, None).map_err(TestCaseError::fail)?;
    if std::env::var("KVSTATS").is_ok() {
        eprintln!("STATS promoted blocks stored {}", replay.promoted);
    }
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

/// The manager reports what a promotion loads (bytes per layer and tier, and the tokens it
/// serves) until its next admission or step; the simulator's overlap model prices it.
#[test]
fn a_promotion_reports_its_load_until_the_next_call() {
    let mut e = Engine::with_host(Policy::SwaAware, 1 << 20);
    assert_eq!(e.admit(1, &prompt_of(0, 3, 0)).unwrap(), Some(0));
    e.m.finish(1).unwrap();
    assert!(e.m.promotions().is_empty(), "nothing below L1 yet");
    for (id, f) in (2..12).zip(1..) {
        if e.admit(id, &prompt_of(f, 4, 0)).unwrap().is_some() {
            e.m.finish(id).unwrap();
        }
    }
    let before = e.m.stats().tiers[0].promoted_tokens;
    assert_eq!(e.admit(20, &prompt_of(0, 4, 0)).unwrap(), Some(160));
    let promoted = e.m.stats().tiers[0].promoted_tokens - before;
    let p = e.m.promotions().to_vec();
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].tokens, promoted);
    let layers = e.m.spec().num_layers as usize;
    assert_eq!(
        (p[0].load.per_layer.len(), p[0].load.sliding.len()),
        (layers, layers)
    );
    // Host bytes only, in every layer (full layers for the prefix, sliding ones for the
    // checkpoint window).
    assert!(p[0]
        .load
        .per_layer
        .iter()
        .all(|b| b[0] > 0 && b[1] == 0 && b[2] == 0));
    let model = kvalloc::sim::OverlapModel::default();
    assert!(model.promotion_seconds(&p[0]) >= 0.0);
    // Finishing keeps the report; the next admission (the same prompt, now in L1) replaces it
    // with nothing.
    e.m.finish(20).unwrap();
    assert_eq!(e.m.promotions().len(), 1);
    assert_eq!(e.admit(21, &prompt_of(0, 4, 0)).unwrap(), Some(192));
    assert!(e.m.promotions().is_empty());
    e.m.finish(21).unwrap();
    e.m.wait_loads();
    e.m.validate().unwrap();
}

/// A whole conversation evicted to host memory comes back: its next turn hits the whole
/// previous prompt, promoted from L2, with the bytes the engine wrote.
#[test]
fn next_turn_hits_from_host_after_eviction() {
    let mut e = Engine::with_host(Policy::SwaAware, 1 << 20);
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
    let hits =
        e.m.match_prefix_tiers(Prompt::Tokens(&prompt_of(0, 4, 0)), None)
            .unwrap();
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
