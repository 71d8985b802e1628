//! KV events of the lower tiers (`TierStored`, `TierRemoved`) over host memory, a disk store and
//! a real remote server: conversations that push records down every tier and back up. After
//! every operation, replaying the events gives exactly what each tier holds (and L1's blocks
//! and resume points as before); each stored block names its chained hash and block index; a
//! move down reports the block stored below before it is removed above; a promotion's restored
//! checkpoint is a resume point; and a router trusting the resume points never estimates more
//! than `match_prefix`.

mod common;
mod events;
mod support;

use std::collections::HashMap;

use common::{prompt_of, Engine, B};
use events::Replay;
use kvalloc::hash::{chain_tokens, root_seed};
use kvalloc::tiers::{BlockStore, DiskStore, LowerCapacity, RemoteStore, Tier};
use kvalloc::{CacheEvent, ManagerConfig, Policy, Prompt};
use support::{remote_config, RemoteServer, TempDir};

fn ns() -> u64 {
    kvalloc::tiers::namespace(&common::small_spec(), B as u32)
}

fn engine(policy: Policy, dir: &std::path::Path, server: &RemoteServer) -> Engine {
    let disk: Box<dyn BlockStore> = Box::new(DiskStore::open(dir, ns()).unwrap());
    let remote: Box<dyn BlockStore> =
        Box::new(RemoteStore::open(remote_config(server.url(), ns())).unwrap());
    let cfg = ManagerConfig {
        policy,
        lower: LowerCapacity {
            host: 48 << 10,
            disk: 64 << 10,
            remote: 96 << 10,
        },
        events: true,
        ..ManagerConfig::default()
    };
    Engine::with_config(cfg, 96 << 10, Some(disk), Some(remote))
}

/// Block index of every chained hash of the prompts served so far.
#[derive(Default)]
struct Chains(HashMap<u64, u32>);

impl Chains {
    fn add(&mut self, prompt: &[i64]) -> Vec<u64> {
        let mut hashes = Vec::new();
        chain_tokens(root_seed(None), prompt, B, &mut hashes);
        for (i, &h) in hashes.iter().enumerate() {
            self.0.insert(h, i as u32);
        }
        hashes
    }
}

/// Checks one drained batch: each tier event names a block of a prompt served (at its index
/// when the tier knows it), and a block moved down is reported stored below before it is
/// reported removed above.
fn check_batch(events: &[CacheEvent], chains: &Chains) -> u64 {
    let mut moves = 0;
    for (i, e) in events.iter().enumerate() {
        match *e {
            CacheEvent::TierStored {
                hash, block, group, ..
            } => {
                let want = chains.0.get(&hash).copied();
                assert!(want.is_some(), "{e:?}: not a block of any prompt");
                assert!(
                    block.is_none() || block == want,
                    "{e:?}: block index {want:?}"
                );
                assert!(group < 2, "{e:?}");
            }
            CacheEvent::TierRemoved { tier, group, hash } => {
                let stored_below = |x: &CacheEvent| {
                    matches!(*x, CacheEvent::TierStored { tier: t, group: g, hash: h, .. }
                        if t > tier && g == group && h == hash)
                };
                if events.iter().any(stored_below) {
                    assert!(
                        events[..i].iter().any(stored_below),
                        "{e:?}: reported before the move"
                    );
                    moves += 1;
                }
            }
            _ => {}
        }
    }
    moves
}

fn run(policy: Policy) {
    let dir = TempDir::new("tier-events");
    let server = RemoteServer::start(&[]);
    let mut e = engine(policy, dir.path(), &server);
    let mut replay = Replay::default();
    let mut chains = Chains::default();
    let mut promoted_resumable = 0;
    let mut moves = 0;
    let mut probes = (0u64, 0u64);
    let mut id = 0u64;
    // Six families of growing conversations, twice over: the second round finds the first
    // round's prefixes below L1.
    for round in 0..2u8 {
        for turns in 1..6u8 {
            for family in 0..6u8 {
                id += 1;
                let prompt = prompt_of(family, turns, 3 + family + round);
                let hashes = chains.add(&prompt);
                let hit = e.admit(id, &prompt).unwrap();
                let batch = e.m.take_events();
                moves += check_batch(&batch, &chains);
                let promoted: Vec<u64> = batch
                    .iter()
                    .filter_map(|x| match *x {
                        CacheEvent::Stored {
                            req: None, hash, ..
                        } => Some(hash),
                        _ => None,
                    })
                    .collect();
                promoted_resumable += batch
                    .iter()
                    .filter(|x| matches!(x, CacheEvent::Resumable { hash, .. } if promoted.contains(hash)))
                    .count();
                replay.apply(&batch, None).unwrap();
                replay.sync(&mut e.m, None).unwrap();
                if hit.is_some() {
                    e.m.finish(id).unwrap();
                }
                e.m.wait_loads();
                let batch = e.m.take_events();
                moves += check_batch(&batch, &chains);
                replay.apply(&batch, None).unwrap();
                replay.sync(&mut e.m, None).unwrap();
                e.m.validate().unwrap();
                // A router over the replayed events, on this prompt and a longer one.
                for probe in [prompt.clone(), prompt_of(family, turns + 1, 0)] {
                    let mut h = Vec::new();
                    chain_tokens(root_seed(None), &probe, B, &mut h);
                    let est = events::router_hit(&replay.resume, &h, probe.len(), B);
                    let real = e.m.match_prefix(Prompt::Tokens(&probe), None).unwrap();
                    assert!(est <= real, "router {est} > match_prefix {real}");
                    probes.0 += 1;
                    probes.1 += u64::from(est == real);
                }
                assert_eq!(hashes.len(), prompt.len() / B);
            }
        }
    }
    let [stored, removed] = [replay.counts[5], replay.counts[6]];
    assert!(
        stored > 0 && removed > 0,
        "tier stored {stored}, removed {removed}"
    );
    assert!(moves > 0, "no record moved down");
    if std::env::var("KVSTATS").is_ok() {
        eprintln!(
            "STATS tier stored {stored} removed {removed} moves {moves} promoted resume \
             points {promoted_resumable} router exact {probes:?} held {:?}",
            e.m.lower_blocks().len()
        );
    }
    // Records reached every tier (the replayed set at the end, or what went through).
    let st = e.m.stats();
    for t in Tier::ALL {
        let c = &st.tiers[t as usize].counters;
        assert!(c.records_in > 0, "{t:?}: {c:?}");
        if t == Tier::Remote {
            assert!(c.evicted > 0, "records dropped at the bottom: {c:?}");
        }
    }
    assert!(
        promoted_resumable > 0,
        "a restored checkpoint is a resume point"
    );
    assert!(probes.1 > 0, "{probes:?}");
}

#[test]
fn tier_events_replay_across_host_disk_and_remote_swa_aware() {
    run(Policy::SwaAware);
}

#[test]
fn tier_events_replay_across_host_disk_and_remote_dense() {
    run(Policy::Dense);
}
