//! KV cache events, one test per kind of change: blocks a prompt and its checkpoint store,
//! output blocks a finish stores, evictions (whole nodes and checkpoints), an abort's blocks,
//! promotions from a lower tier, the whole-cache reset; and a manager without events behaving
//! exactly as one with them.

use kvalloc::hash::{chain_tokens, root_seed};
use kvalloc::tiers::LowerCapacity;
use kvalloc::{CacheEvent, Eviction, Extension, KVCacheManager, ManagerConfig, ModelSpec, Prompt};

mod events;
use events::Replay;

const B: usize = 16;

/// One full layer and three sliding layers (window 32: two blocks), small heads.
fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

fn config(events: bool) -> ManagerConfig {
    ManagerConfig {
        events,
        ..ManagerConfig::default()
    }
}

fn manager(capacity: u64) -> KVCacheManager {
    KVCacheManager::new(small_spec(), capacity, config(true)).unwrap()
}

fn seq(start: i64, n: usize) -> Vec<i64> {
    (start..start + n as i64).collect()
}

fn chain(tokens: &[i64]) -> Vec<u64> {
    let mut h = Vec::new();
    chain_tokens(root_seed(None), tokens, B, &mut h);
    h
}

/// Admits, decodes `gen` tokens one by one, finishes; checks the events after each call.
fn run(m: &mut KVCacheManager, replay: &mut Replay, id: u64, prompt: &[i64], gen: usize) {
    m.admit(id, Prompt::Tokens(prompt), None, None)
        .unwrap()
        .expect("fits");
    replay.sync(m, Some(Some(id))).unwrap();
    for t in 0..gen as i64 {
        assert!(m.extend(id, Extension::Tokens(&[7_000_000 + t])).unwrap());
    }
    replay.sync(m, Some(Some(id))).unwrap();
    m.finish(id).unwrap();
    replay.sync(m, Some(Some(id))).unwrap();
    m.validate().unwrap();
}

/// `(group, block)` of each `Stored` event, with its hash checked against `hashes`.
fn stored_blocks(events: &[CacheEvent], hashes: &[u64], req: u64) -> Vec<(usize, u32)> {
    events
        .iter()
        .filter_map(|e| match *e {
            CacheEvent::Stored {
                group,
                hash,
                parent,
                block,
                req: r,
            } => {
                assert_eq!(hash, hashes[block as usize], "{e:?}");
                let want_parent = block.checked_sub(1).map(|p| hashes[p as usize]);
                assert_eq!(parent, want_parent, "{e:?}");
                assert_eq!(r, Some(req), "{e:?}");
                Some((group, block))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_prompt_stores_its_blocks_and_its_checkpoint() {
    let mut m = manager(64 << 20);
    let prompt = seq(0, 100); // 6 whole blocks; the checkpoint ends at 96
    let hashes = chain(&prompt);
    m.admit(5, Prompt::Tokens(&prompt), None, None).unwrap();
    let events = m.take_events();
    let mut stored = stored_blocks(&events, &hashes, 5);
    // The checkpoint makes its end (block 5, token 96) and the block before it (the one it
    // keeps beyond the window) resume points, after their blocks are stored.
    let resumable: Vec<CacheEvent> = events[stored.len()..].to_vec();
    assert_eq!(
        resumable,
        vec![
            CacheEvent::Resumable {
                hash: hashes[5],
                block: 5
            },
            CacheEvent::Resumable {
                hash: hashes[4],
                block: 4
            },
        ],
        "an admission removes nothing here"
    );
    stored.sort_unstable();
    let full: Vec<u32> = stored.iter().filter(|s| s.0 == 0).map(|s| s.1).collect();
    let swa: Vec<u32> = stored.iter().filter(|s| s.0 == 1).map(|s| s.1).collect();
    assert_eq!(full, (0..6).collect::<Vec<_>>());
    // W + one block before 96: [48, 96).
    assert_eq!(swa, vec![3, 4, 5]);
    // The same picture as residency's.
    let res = m.residency(Prompt::Tokens(&prompt), None).unwrap();
    for (i, r) in res.iter().enumerate() {
        for g in 0..2 {
            let bit = r.device_groups >> g & 1 == 1;
            assert_eq!(bit, stored.contains(&(g, i as u32)), "block {i} group {g}");
        }
    }

    // Decoding to 130 tokens, then finishing: output blocks 6 and 7 (full), and the window
    // at the end of the output ([96, 128): blocks 6 and 7 of the sliding group).
    for t in 0..30 {
        assert!(m.extend(5, Extension::Tokens(&[1_000 + t])).unwrap());
    }
    m.finish(5).unwrap();
    let mut all = prompt.clone();
    all.extend(1_000..1_030);
    let events = m.take_events();
    let mut stored = stored_blocks(&events, &chain(&all), 5);
    stored.sort_unstable();
    assert_eq!(stored, vec![(0, 6), (0, 7), (1, 6), (1, 7)]);
    // What the running window held in the tree and no checkpoint covers goes at the finish.
    assert!(events
        .iter()
        .all(|e| !matches!(e, CacheEvent::Removed { group: 0, .. })));
    let mut replay = Replay::default();
    let mut log = Vec::new();
    m.take_events_into(&mut log);
    assert!(log.is_empty());
    replay.blocks = m.cached_blocks().into_iter().collect();
    replay.resume = m.resume_points().into_iter().collect();
    replay.sync(&mut m, None).unwrap();
}

#[test]
fn evictions_are_removed_events() {
    // Room for about three of the prompts below.
    let mut m = KVCacheManager::new(
        small_spec(),
        96 << 10,
        ManagerConfig {
            eviction: Eviction::Lru,
            ..config(true)
        },
    )
    .unwrap();
    let mut replay = Replay::default();
    let base = seq(0, 320);
    let mut ckpt_only = 0;
    for id in 1..=12u64 {
        // Half of them continue the shared base (interior checkpoints), half are new.
        let mut prompt = if id % 2 == 0 {
            base.clone()
        } else {
            Vec::new()
        };
        prompt.extend(seq(id as i64 * 10_000, 100));
        let before = m.cached_blocks();
        run(&mut m, &mut replay, id, &prompt, 20);
        // A sliding block removed while its node's full block stayed: a checkpoint went.
        let after = m.cached_blocks();
        ckpt_only += before
            .iter()
            .filter(|&&(g, h)| g == 1 && !after.contains(&(1, h)) && after.contains(&(0, h)))
            .count();
    }
    let st = m.stats();
    assert!(
        st.evicted_leaves > 0 && st.evicted_checkpoints > 0,
        "{st:?}"
    );
    assert!(replay.counts[1] > 0);
    assert!(
        ckpt_only > 0,
        "a checkpoint's eviction removed its sliding blocks only"
    );
    let per_group: Vec<u64> = (0..2)
        .map(|g| replay.blocks.iter().filter(|b| b.0 == g).count() as u64)
        .collect();
    assert_eq!(per_group, vec![st.groups[0].cached, st.groups[1].cached]);
}

#[test]
fn an_abort_reports_what_it_created_removed_even_while_others_hold_it() {
    let mut m = manager(64 << 20);
    let mut replay = Replay::default();
    let prompt = seq(0, 200);
    m.admit(1, Prompt::Tokens(&prompt), None, Some(200))
        .unwrap();
    replay.sync(&mut m, Some(Some(1))).unwrap();
    // Request 2 shares request 1's blocks in flight.
    m.admit(2, Prompt::Tokens(&prompt), None, None).unwrap();
    replay.sync(&mut m, Some(Some(2))).unwrap();
    let held = replay.blocks.len();
    assert!(held > 0);
    m.abort(1).unwrap();
    // Request 1's nodes are never matched again: all their blocks are reported gone now,
    // though request 2 still reads them.
    replay.sync(&mut m, Some(None)).unwrap();
    assert!(replay.blocks.len() < held);
    assert_eq!(m.match_prefix(Prompt::Tokens(&prompt), None).unwrap(), 0);
    m.finish(2).unwrap();
    replay.sync(&mut m, Some(Some(2))).unwrap();
    m.validate().unwrap();
    // The same prompt is cached again under the same hashes: stored again, once.
    run(&mut m, &mut replay, 3, &prompt, 0);
    assert!(m.match_prefix(Prompt::Tokens(&prompt), None).unwrap() > 0);
}

#[test]
fn promotions_are_stored_by_no_request() {
    let cfg = ManagerConfig {
        lower: LowerCapacity {
            host: 64 << 20,
            ..LowerCapacity::default()
        },
        ..config(true)
    };
    let mut m = KVCacheManager::new(small_spec(), 64 << 10, cfg).unwrap();
    let mut replay = Replay::default();
    let first = seq(0, 200);
    run(&mut m, &mut replay, 1, &first, 0);
    // Evict `first` to host memory.
    for id in 2..10u64 {
        run(&mut m, &mut replay, id, &seq(id as i64 * 10_000, 200), 0);
    }
    assert_eq!(m.match_prefix(Prompt::Tokens(&first), None).unwrap(), 0);
    let mut again = first.clone();
    again.extend(seq(900_000, 40));
    let hit = m.admit(20, Prompt::Tokens(&again), None, None).unwrap();
    assert!(hit.unwrap() > 0, "promoted from host memory");
    let events = m.take_events();
    let promoted = events
        .iter()
        .filter(|e| matches!(e, CacheEvent::Stored { req: None, .. }))
        .count();
    assert!(promoted > 0, "{events:?}");
    // Only the promotion (None) and the admission (20) store anything.
    assert!(events.iter().all(|e| !matches!(
        e,
        CacheEvent::Stored { req: Some(r), .. } if *r != 20
    )));
    replay.apply(&events, None).unwrap();
    replay.sync(&mut m, Some(Some(20))).unwrap();
    m.finish(20).unwrap();
    replay.sync(&mut m, Some(Some(20))).unwrap();
}

#[test]
fn reset_prefix_cache_clears_everything_once_no_request_runs() {
    let mut m = manager(64 << 20);
    let mut replay = Replay::default();
    let prompt = seq(0, 200);
    run(&mut m, &mut replay, 1, &prompt, 40);
    m.admit(2, Prompt::Tokens(&seq(50_000, 70)), None, None)
        .unwrap();
    replay.sync(&mut m, None).unwrap();
    let cached = m.stats().cached_blocks;
    // A running request holds blocks: nothing changes.
    assert!(!m.reset_prefix_cache());
    assert!(m.take_events().is_empty());
    assert_eq!(m.stats().cached_blocks, cached);
    m.finish(2).unwrap();
    replay.sync(&mut m, None).unwrap();
    assert!(m.reset_prefix_cache());
    assert_eq!(m.take_events(), vec![CacheEvent::Cleared]);
    m.validate().unwrap();
    let st = m.stats();
    assert_eq!((st.cached_blocks, st.bytes_in_use), (0, 0));
    assert!(m.cached_blocks().is_empty());
    assert_eq!(m.match_prefix(Prompt::Tokens(&prompt), None).unwrap(), 0);
    // Empty already: true again, and still one `Cleared`.
    assert!(m.reset_prefix_cache());
    replay.apply(&[CacheEvent::Cleared], None).unwrap();
    replay.sync(&mut m, None).unwrap();
    // The cache fills again as before.
    run(&mut m, &mut replay, 3, &prompt, 0);
    assert_eq!(m.match_prefix(Prompt::Tokens(&prompt), None).unwrap(), 192);
}

#[test]
fn events_are_off_by_default_and_change_nothing() {
    assert!(!ManagerConfig::default().events);
    let mut on = KVCacheManager::new(small_spec(), 256 << 10, config(true)).unwrap();
    let mut off = KVCacheManager::new(small_spec(), 256 << 10, config(false)).unwrap();
    let base = seq(0, 150);
    for id in 1..=10u64 {
        let mut prompt = if id % 3 == 0 {
            Vec::new()
        } else {
            base.clone()
        };
        prompt.extend(seq(id as i64 * 1_000, 60 + 7 * id as usize));
        let chunk = (id % 2 == 0).then_some(64);
        for m in [&mut on, &mut off] {
            let hit = m.admit(id, Prompt::Tokens(&prompt), None, chunk).unwrap();
            assert!(hit.is_some());
            let rest = prompt.len() as u64 - m.num_tokens(id).unwrap();
            if rest > 0 {
                assert!(m.extend(id, Extension::Count(rest)).unwrap());
            }
        }
        assert_eq!(on.num_tokens(id).unwrap(), off.num_tokens(id).unwrap());
        for g in 0..2 {
            assert_eq!(
                on.block_table(id, g).unwrap(),
                off.block_table(id, g).unwrap()
            );
        }
        if id % 4 != 1 {
            let done = id - 1;
            if on.is_running(done) {
                on.finish(done).unwrap();
                off.finish(done).unwrap();
            }
        }
        assert_eq!(on.stats(), off.stats());
        assert!(off.take_events().is_empty());
    }
    assert!(!on.take_events().is_empty());
    assert!(off.reset_prefix_cache() || off.stats().running_requests > 0);
    assert!(off.take_events().is_empty());
}
