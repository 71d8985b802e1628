//! Retention controls (`kvalloc::Retention`): priority weighs the value policy's eviction order,
//! pins keep a prefix for a time under a cap, and an opted-out request caches nothing. Every test
//! drives the manager's clock: no sleeping, no timed assertion.

use std::time::Duration;

use kvalloc::{
    Admission, Eviction, KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt, Retention, Step,
};

/// One full layer and three sliding layers (window 128), small heads: cheap blocks.
fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

fn manager(capacity: u64, config: ManagerConfig) -> KVCacheManager {
    let mut m = KVCacheManager::new(small_spec(), capacity, config).unwrap();
    m.set_clock(Duration::ZERO).unwrap();
    m
}

fn seq(start: i64, n: usize) -> Vec<i64> {
    (start..start + n as i64).collect()
}

fn hit(m: &KVCacheManager, prompt: &[i64]) -> u64 {
    m.match_prefix(Prompt::Tokens(prompt), None).unwrap()
}

/// Admits `prompt` with `retention` and finishes it at once (its prompt is cached).
fn run(m: &mut KVCacheManager, id: u64, prompt: &[i64], retention: Retention) -> u64 {
    let h = m
        .admit_with_retention(id, Prompt::Tokens(prompt), None, None, retention)
        .unwrap()
        .expect("fits");
    m.validate().unwrap();
    m.finish(id).unwrap();
    m.validate().unwrap();
    h
}

fn priority(p: i8) -> Retention {
    Retention {
        priority: p,
        ..Retention::default()
    }
}

fn pin(tokens: u64, secs: u64) -> Retention {
    Retention {
        pin_tokens: tokens,
        pin_for: Duration::from_secs(secs),
        ..Retention::default()
    }
}

/// Two equal prefixes, A cached before B, then one running request grows until the first
/// eviction: which of the two lost blocks first (true: A).
fn first_victim_is_a(eviction: Eviction, a: Retention, b: Retention) -> bool {
    let (pa, pb) = (seq(0, 200), seq(100_000, 200));
    for filler in (16..4096).step_by(16) {
        let config = ManagerConfig {
            eviction,
            ..ManagerConfig::default()
        };
        let mut m = manager(96 << 10, config);
        run(&mut m, 1, &pa, a);
        run(&mut m, 2, &pb, b);
        let (ha, hb) = (hit(&m, &pa), hit(&m, &pb));
        assert_eq!((ha, hb), (192, 192));
        let admitted = m
            .admit(3, Prompt::Tokens(&seq(500_000, filler)), None, None)
            .unwrap();
        m.validate().unwrap();
        if admitted.is_none() || m.stats().evicted_leaves == 0 {
            continue;
        }
        let (after_a, after_b) = (hit(&m, &pa), hit(&m, &pb));
        assert!(
            (after_a < ha) != (after_b < hb),
            "one of them goes first: {after_a} {after_b}"
        );
        return after_a < ha;
    }
    panic!("no filler size evicted anything");
}

#[test]
fn priority_keeps_a_prefix_longer_under_the_value_policy() {
    let neutral = Retention::default();
    // Without priorities one of the two goes first (the value policy's learned priors move
    // between the two keyings, so not necessarily the older); a priority on that one, or a
    // lower one on the other, turns that around.
    let a_first = first_victim_is_a(Eviction::Value, neutral, neutral);
    let (up, down) = (priority(1), priority(-1));
    if a_first {
        assert!(!first_victim_is_a(Eviction::Value, up, neutral));
        assert!(!first_victim_is_a(Eviction::Value, neutral, down));
        assert!(first_victim_is_a(Eviction::Value, neutral, up));
    } else {
        assert!(first_victim_is_a(Eviction::Value, neutral, up));
        assert!(first_victim_is_a(Eviction::Value, down, neutral));
        assert!(!first_victim_is_a(Eviction::Value, up, neutral));
    }
    // LRU ignores priority: the least recently used goes first whatever it says.
    assert!(first_victim_is_a(Eviction::Lru, priority(5), neutral));
}

#[test]
fn a_block_keeps_the_highest_priority_of_the_requests_that_finished_holding_it() {
    // A is cached with a high priority, then read (and finished) by a low-priority request; B
    // is cached and read at priority 0 (the same hits and the later use): A still outranks B.
    let (pa, pb) = (seq(0, 200), seq(100_000, 200));
    let mut m = manager(96 << 10, ManagerConfig::default());
    run(&mut m, 1, &pa, priority(2));
    run(&mut m, 2, &pb, Retention::default());
    assert_eq!(run(&mut m, 3, &pa, priority(-3)), 192);
    assert_eq!(run(&mut m, 4, &pb, Retention::default()), 192);
    // Fill until something goes: B's blocks go before A's.
    let mut id = 10;
    while m.stats().evicted_leaves == 0 {
        let got = m
            .admit(
                id,
                Prompt::Tokens(&seq(1_000_000 + id as i64 * 1000, 64)),
                None,
                None,
            )
            .unwrap();
        assert!(got.is_some(), "room is made by evicting");
        id += 1;
    }
    m.validate().unwrap();
    assert_eq!(hit(&m, &pa), 192);
    assert!(hit(&m, &pb) < 192);
}

/// Fills a manager with running requests of 64 tokens until an admission is refused; returns
/// how many got in.
fn fill(m: &mut KVCacheManager, first_id: u64) -> u64 {
    let mut id = first_id;
    while m
        .admit(
            id,
            Prompt::Tokens(&seq(2_000_000 + id as i64 * 1000, 64)),
            None,
            None,
        )
        .unwrap()
        .is_some()
    {
        m.validate().unwrap();
        id += 1;
    }
    m.validate().unwrap();
    id - first_id
}

#[test]
fn a_pinned_prefix_is_never_evicted_until_its_pin_expires() {
    let system = seq(0, 512);
    let mut a = system.clone();
    a.extend(seq(9_000, 100));
    let b = seq(300_000, 300);
    let mut m = manager(256 << 10, ManagerConfig::default());
    run(&mut m, 1, &a, pin(512, 60));
    run(&mut m, 2, &b, Retention::default());
    let st = m.stats();
    assert_eq!(st.pins, 1);
    assert!(st.pinned_bytes > 0);
    // Never more than free plus evictable: the pinned bytes are neither.
    assert!(m.room_bytes() <= st.capacity_bytes - st.pinned_bytes);
    // Fill the memory: everything unpinned goes, the pinned system prompt stays whole and
    // still resumes at its end (its end was kept as a resume point).
    let n = fill(&mut m, 100);
    assert!(n > 0);
    assert!(m.stats().evicted_leaves > 0);
    let mut other = system.clone();
    other.extend(seq(7_000, 50));
    assert_eq!(hit(&m, &other), 512);
    assert_eq!(hit(&m, &b), 0, "the unpinned prefix went");
    assert_eq!(
        hit(&m, &a),
        512,
        "a's unpinned tail went, its pinned head stayed"
    );
    // A minute later, still refused while the pin holds...
    m.advance_clock(Duration::from_secs(59)).unwrap();
    assert_eq!(m.stats().pins, 1);
    for id in 100..100 + n {
        m.abort(id).unwrap();
    }
    // ...and once it expired, the same pressure takes it.
    m.advance_clock(Duration::from_secs(1)).unwrap();
    let st = m.stats();
    assert_eq!((st.pins, st.pinned_bytes), (0, 0));
    m.validate().unwrap();
    fill(&mut m, 1_000);
    assert_eq!(hit(&m, &other), 0, "expired: evicted as any other");
}

#[test]
fn the_cap_clips_a_pin_to_the_prefix_that_fits() {
    let prompt = seq(0, 1024);
    // No cap: the whole prompt's last resume point is pinned.
    let mut free = manager(1 << 20, ManagerConfig::default());
    run(&mut free, 1, &prompt, pin(1024, 10));
    let whole = free.stats().pinned_bytes;
    assert!(whole > 0);
    assert_eq!(free.stats().pins_clipped, 0);
    // A cap of half that: the pin ends at the deepest resume point that fits (one every 128
    // tokens here), within the cap, and is counted as clipped.
    let config = ManagerConfig {
        max_pinned_bytes: Some(whole / 2),
        checkpoint_interval: Some(128),
        ..ManagerConfig::default()
    };
    let mut capped = manager(1 << 20, config);
    run(&mut capped, 1, &prompt, pin(1024, 10));
    let st = capped.stats();
    assert!(
        st.pinned_bytes > 0 && st.pinned_bytes <= whole / 2,
        "{st:?}"
    );
    assert_eq!((st.pins, st.pins_clipped), (1, 1));
    // The pinned part still resumes after everything else went.
    let k = hit(&capped, &prompt);
    fill(&mut capped, 100);
    let mut resumed = prompt[..k as usize].to_vec();
    resumed.extend(seq(700_000, 10));
    assert!(hit(&capped, &resumed) > 0);
    // A cap of 0: no pin at all.
    let config = ManagerConfig {
        max_pinned_bytes: Some(0),
        ..ManagerConfig::default()
    };
    let mut none = manager(1 << 20, config);
    run(&mut none, 1, &prompt, pin(1024, 10));
    let st = none.stats();
    assert_eq!((st.pins, st.pinned_bytes, st.pins_clipped), (0, 0, 1));
}

/// Blocks attached to a pinned prefix later (a checkpoint laid over its tombstones) must not take
/// the pins past their cap: the pin is shortened from its tail.
#[test]
fn a_checkpoint_over_a_pinned_prefix_shortens_the_pin_to_the_cap() {
    let long = seq(0, 1600); // 100 blocks, pinned whole
    let mut probe = manager(4 << 20, ManagerConfig::default());
    run(&mut probe, 1, &long, pin(1600, 100));
    let pinned = probe.stats().pinned_bytes;
    // Exactly the pin's bytes: it fits, unclipped.
    let config = ManagerConfig {
        max_pinned_bytes: Some(pinned),
        ..ManagerConfig::default()
    };
    let mut m = manager(4 << 20, config);
    run(&mut m, 1, &long, pin(1600, 100));
    assert_eq!(m.stats().pinned_bytes, pinned);
    assert_eq!(m.stats().pins_clipped, 0);
    // A prompt that is the first 30 blocks (and a token) resumes at 0 (no window there) and
    // keeps a checkpoint at its end: its sliding blocks go to the pinned nodes 21..29.
    let short = seq(0, 481);
    assert_eq!(
        m.admit(2, Prompt::Tokens(&short), None, None).unwrap(),
        Some(0)
    );
    m.validate().unwrap();
    let st = m.stats();
    assert!(st.pinned_bytes <= pinned, "{st:?}");
    assert_eq!((st.pins, st.pins_clipped), (1, 1));
    m.finish(2).unwrap();
    m.validate().unwrap();
    assert!(m.stats().pinned_bytes <= pinned);
}

#[test]
fn pins_of_the_same_prefix_merge_and_the_later_expiry_wins() {
    let system = seq(0, 256);
    let mut m = manager(1 << 20, ManagerConfig::default());
    for (id, secs) in [(1, 30), (2, 90), (3, 10)] {
        let mut p = system.clone();
        p.extend(seq(10_000 * id, 40));
        run(&mut m, id as u64, &p, pin(256, secs));
        m.advance_clock(Duration::from_secs(1)).unwrap();
    }
    let st = m.stats();
    assert_eq!(st.pins, 1, "one prefix, one pin");
    let pinned = st.pinned_bytes;
    // Request 2 pinned at t=1 for 90 s: it holds until t=91.
    m.set_clock(Duration::from_secs(90)).unwrap();
    assert_eq!(m.stats().pinned_bytes, pinned);
    m.set_clock(Duration::from_secs(91)).unwrap();
    assert_eq!(m.stats().pins, 0);
    m.validate().unwrap();
}

#[test]
fn an_opted_out_request_reads_the_cache_and_adds_nothing() {
    let system = seq(0, 512);
    let mut m = manager(1 << 20, ManagerConfig::default());
    run(&mut m, 1, &system, Retention::default());
    let before = m.stats();
    let mut p = system.clone();
    p.extend(seq(50_000, 300));
    let quiet = Retention {
        cache: false,
        ..Retention::default()
    };
    // It reads the cache.
    let got = m
        .admit_with_retention(2, Prompt::Tokens(&p), None, None, quiet)
        .unwrap();
    assert_eq!(got, Some(512));
    m.validate().unwrap();
    // While it runs, nothing of it is shared: the same prompt finds only the system prompt.
    assert_eq!(hit(&m, &p), 512);
    assert!(m.extend(2, kvalloc::Extension::Tokens(&[1, 2, 3])).unwrap());
    m.finish(2).unwrap();
    m.validate().unwrap();
    let after = m.stats();
    assert_eq!(after.cached_blocks, before.cached_blocks);
    assert_eq!(after.checkpoints, before.checkpoints);
    assert_eq!(
        after.bytes_in_use, before.bytes_in_use,
        "its blocks were freed"
    );
    assert_eq!(hit(&m, &p), 512);
    // The same prompt with caching on adds its blocks.
    run(&mut m, 3, &p, Retention::default());
    assert!(m.stats().cached_blocks > before.cached_blocks);
    assert_eq!(hit(&m, &p), 800);
}

#[test]
fn an_opted_out_chunked_prefill_and_abort_change_nothing_cached() {
    for policy in [Policy::SwaAware, Policy::Dense] {
        let config = ManagerConfig {
            policy,
            ..ManagerConfig::default()
        };
        let mut m = manager(1 << 20, config);
        let p = seq(0, 700);
        let quiet = Retention {
            cache: false,
            ..Retention::default()
        };
        m.admit_with_retention(1, Prompt::Tokens(&p), None, Some(100), quiet)
            .unwrap()
            .unwrap();
        while m.num_tokens(1).unwrap() < 700 {
            let left = 700 - m.num_tokens(1).unwrap();
            assert!(m
                .extend(1, kvalloc::Extension::Count(left.min(90)))
                .unwrap());
            m.validate().unwrap();
            assert_eq!(m.stats().cached_blocks, 0, "{policy:?}");
        }
        m.finish(1).unwrap();
        m.validate().unwrap();
        let st = m.stats();
        assert_eq!((st.cached_blocks, st.bytes_in_use), (0, 0), "{policy:?}");
    }
}

#[test]
fn an_aborted_request_pins_nothing_and_a_reset_drops_every_pin() {
    let p = seq(0, 512);
    let mut m = manager(1 << 20, ManagerConfig::default());
    m.admit_with_retention(1, Prompt::Tokens(&p), None, None, pin(512, 60))
        .unwrap()
        .unwrap();
    m.abort(1).unwrap();
    assert_eq!(m.stats().pins, 0);
    run(&mut m, 2, &p, pin(512, 60));
    assert_eq!(m.stats().pins, 1);
    assert!(m.reset_prefix_cache());
    let st = m.stats();
    assert_eq!((st.pins, st.pinned_bytes, st.cached_blocks), (0, 0, 0));
    m.validate().unwrap();
}

#[test]
fn retention_in_a_step_and_bad_retention_change_nothing() {
    let p = seq(0, 512);
    let mut m = manager(1 << 20, ManagerConfig::default());
    let bad = [
        Retention {
            priority: 17,
            ..Retention::default()
        },
        Retention {
            priority: -17,
            ..Retention::default()
        },
        Retention {
            pin_tokens: 16,
            ..Retention::default()
        },
    ];
    for r in bad {
        assert!(m
            .admit_with_retention(1, Prompt::Tokens(&p), None, None, r)
            .is_err());
        let step = Step {
            admit: vec![Admission {
                retention: r,
                ..Admission::new(1, Prompt::Tokens(&p))
            }],
            ..Step::default()
        };
        assert!(m.step(&step).is_err());
        assert_eq!(m.stats().running_requests, 0);
        m.validate().unwrap();
    }
    let out = m
        .step(&Step {
            admit: vec![Admission {
                retention: pin(512, 5),
                ..Admission::new(1, Prompt::Tokens(&p))
            }],
            ..Step::default()
        })
        .unwrap();
    assert_eq!(out.admitted, vec![Some(0)]);
    m.step(&Step {
        finish: vec![1],
        ..Step::default()
    })
    .unwrap();
    assert_eq!(m.stats().pins, 1);
    // The next step after the expiry releases it.
    m.set_clock(Duration::from_secs(5)).unwrap();
    assert_eq!(m.stats().pins, 0);
    m.validate().unwrap();
}

#[test]
fn the_clock_is_monotonic_once_driven() {
    let mut m = KVCacheManager::new(small_spec(), 1 << 20, ManagerConfig::default()).unwrap();
    // Wall time first; the first drive may set any time, pins keep their remaining time.
    run(&mut m, 1, &seq(0, 256), pin(256, 30));
    m.set_clock(Duration::from_secs(1000)).unwrap();
    assert_eq!(m.clock(), Duration::from_secs(1000));
    m.advance_clock(Duration::from_secs(28)).unwrap();
    assert_eq!(m.stats().pins, 1);
    m.advance_clock(Duration::from_secs(2)).unwrap();
    assert_eq!(m.stats().pins, 0);
    assert!(m.set_clock(Duration::from_secs(5)).is_err());
    assert!(m.advance_clock(Duration::MAX).is_err());
    assert_eq!(m.clock(), Duration::from_secs(1030));
    m.validate().unwrap();
}

/// A refused admission is remembered so that its retry is refused without a walk; a retry with
/// another retention needs other blocks (a pin keeps a checkpoint at its end) and is evaluated
/// anew.
#[test]
fn a_retry_with_another_retention_is_not_refused_from_memory() {
    let p = seq(0, 1024);
    let pinned = pin(512, 60);
    let mut found = false;
    for filler in (16..8192).step_by(16) {
        let mut m = manager(256 << 10, ManagerConfig::default());
        let quiet = Retention {
            cache: false,
            ..Retention::default()
        };
        // A running request that leaves some room, and nothing cached to evict.
        if m.admit_with_retention(1, Prompt::Tokens(&seq(900_000, filler)), None, None, quiet)
            .unwrap()
            .is_none()
        {
            break;
        }
        let with_pin = m
            .admit_with_retention(2, Prompt::Tokens(&p), None, None, pinned)
            .unwrap();
        if with_pin.is_some() {
            continue;
        }
        let plain = m
            .admit_with_retention(2, Prompt::Tokens(&p), None, None, Retention::default())
            .unwrap();
        m.validate().unwrap();
        if plain.is_some() {
            found = true;
            break;
        }
    }
    assert!(
        found,
        "no room fits the prompt without its pin's checkpoint only"
    );
}
