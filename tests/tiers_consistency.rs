//! The four cross-tier consistency failures Xiaomi reported for its MiMo serving stack, as named
//! scenarios with real bytes (L1 and host memory; the disk and remote variants live with their
//! stores' tests). Every hit's bytes are checked against what the engine wrote, and
//! `validate()` runs after every request.

mod common;

use common::{prompt_of, serve, Engine, B};
use kvalloc::tiers::Tier;
use kvalloc::{Policy, Prompt};

fn engine(host: u64) -> Engine {
    Engine::with_host(Policy::SwaAware, host)
}

fn hits(e: &mut Engine, p: &[i64]) -> [u64; 4] {
    e.m.match_prefix_tiers(Prompt::Tokens(p), None).unwrap()
}

/// Per whole block of `p`: (in L1, host copy with its full-attention KV).
fn where_is(e: &Engine, p: &[i64]) -> Vec<(bool, bool)> {
    e.m.residency(Prompt::Tokens(p), None)
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.device_groups & 1 == 1,
                matches!(r.lower, Some((Tier::Host, g)) if g & 1 == 1),
            )
        })
        .collect()
}

/// Serves other conversations (families 10..) until `until` says stop; returns the next id.
fn churn(e: &mut Engine, mut id: u64, turns: u8, until: impl Fn(&mut Engine) -> bool) -> u64 {
    for f in 10u8..250 {
        if until(e) {
            return id;
        }
        id += 1;
        serve(e, id, &prompt_of(f, turns, 0));
        e.m.validate().unwrap();
    }
    panic!("churn never reached its condition");
}

/// Resume point of a finished `prompt_of(f, turns, 0)` (its last whole block).
fn resume(turns: u8) -> u64 {
    let len = 48 + 40 * u64::from(turns);
    len / B as u64 * B as u64
}

#[test]
fn prefix_complete_on_host_but_incomplete_on_device() {
    let mut e = engine(4 << 20);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    let next = prompt_of(0, 4, 0);
    // Push the conversation's own blocks out of L1 (the shared system prompt stays hot there).
    let id = churn(&mut e, 1, 2, |e| hits(e, &next)[0] < resume(3));
    let h = hits(&mut e, &next);
    assert!(h[0] < resume(3), "{h:?}");
    assert_eq!(h[1], resume(3), "L1 plus host hold the whole prefix: {h:?}");
    // The device part and the host part together serve the whole prefix, with the right bytes.
    assert_eq!(e.admit(id + 1, &next).unwrap(), Some(resume(3)));
    e.m.finish(id + 1).unwrap();
    e.m.validate().unwrap();
}

#[test]
fn prefix_complete_on_device_but_incomplete_on_host() {
    let mut e = engine(4 << 20);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    let t4 = prompt_of(0, 4, 0);
    let id = churn(&mut e, 1, 2, |e| hits(e, &t4)[0] < resume(3));
    // Turn 4 resumes from host (promotion) and adds new blocks that exist only in L1.
    assert_eq!(e.admit(id + 1, &t4).unwrap(), Some(resume(3)));
    e.m.finish(id + 1).unwrap();
    let t5 = prompt_of(0, 5, 0);
    let h = hits(&mut e, &t5);
    assert_eq!(h[0], resume(4), "complete on device: {h:?}");
    let blocks = resume(4) as usize / B;
    let w = where_is(&e, &t5);
    assert!(w[..blocks].iter().all(|x| x.0), "complete on device");
    assert!(w[..blocks].iter().any(|x| !x.1), "incomplete on host");
    let written_before = e.m.stats().tiers[0].counters.bytes_written;
    // Evict it from L1: only the blocks the host lacks are written, and the host copy becomes
    // complete.
    let id = churn(&mut e, id + 1, 2, |e| hits(e, &t5)[0] < resume(4));
    let w = where_is(&e, &t5);
    assert!(
        w[..blocks].iter().all(|&(dev, host)| dev || host),
        "every block L1 dropped went to the host: {w:?}"
    );
    let written = e.m.stats().tiers[0].counters.bytes_written - written_before;
    assert!(written > 0);
    assert_eq!(e.admit(id + 1, &t5).unwrap(), Some(resume(4)));
    e.m.finish(id + 1).unwrap();
    e.m.validate().unwrap();
}

#[test]
fn lower_tier_keeps_prefixes_of_hot_sequences_served_from_above() {
    // A small host tier that many cold conversations pass through.
    let mut e = engine(160 << 10);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    let hot = prompt_of(0, 3, 8);
    // Get a host copy of the hot conversation, then bring it back to L1.
    let mut id = churn(&mut e, 1, 2, |e| hits(e, &hot)[0] < resume(3));
    id += 1;
    assert_eq!(e.admit(id, &hot).unwrap(), Some(resume(3)));
    e.m.finish(id).unwrap();
    let before = where_is(&e, &hot);
    let host_copies = before.iter().filter(|x| x.1).count();
    assert!(host_copies > 0, "{before:?}");
    // From now on the hot conversation is served from L1 between cold ones; the host sees the
    // cold ones arrive and would evict the hot copy first if recency did not propagate down.
    for round in 0..40u8 {
        id += 1;
        serve(&mut e, id, &prompt_of(20 + round, 3, 0));
        id += 1;
        let hit = e.admit(id, &hot).unwrap().expect("fits");
        assert_eq!(hit, resume(3), "round {round}: served from L1");
        e.m.finish(id).unwrap();
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    assert!(
        st.tiers[0].counters.evicted > 0,
        "the host tier was under pressure: {st:?}"
    );
    let after = where_is(&e, &hot);
    assert_eq!(
        after.iter().filter(|x| x.1).count(),
        host_copies,
        "the hot prefix's host copies survived (its hits were served from L1): {after:?}"
    );
}

#[test]
fn swa_checkpoints_of_short_and_medium_sequences_are_not_lost_first() {
    // Short (56-token) and medium (168-token) conversations, then long cold ones.
    let mut e = engine(256 << 10);
    let shorts: Vec<Vec<i64>> = (0..4).map(|f| prompt_of(f, 0, 8)).collect();
    let mediums: Vec<Vec<i64>> = (4..8).map(|f| prompt_of(f, 3, 0)).collect();
    let mut id = 0;
    for p in shorts.iter().chain(&mediums) {
        id += 1;
        serve(&mut e, id, p);
    }
    // Long conversations churn L1; evicted checkpoints go down with their full KV.
    for f in 30u8..45 {
        id += 1;
        serve(&mut e, id, &prompt_of(f, 12, 0));
        // The short and medium ones stay in use.
        for p in shorts.iter().chain(&mediums) {
            id += 1;
            let want = (p.len() as u64 - 1) / B as u64 * B as u64;
            let hit = e.admit(id, p).unwrap().expect("fits");
            assert_eq!(
                hit, want,
                "a used short/medium sequence keeps its resume point"
            );
            e.m.finish(id).unwrap();
        }
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    assert!(
        st.evicted_checkpoints + st.evicted_leaves > 0,
        "L1 was under pressure: {st:?}"
    );
    // Wherever a short/medium sequence's KV sits, its window came along: the union hit is its
    // whole resume point.
    for p in shorts.iter().chain(&mediums) {
        let want = (p.len() as u64 - 1) / B as u64 * B as u64;
        assert_eq!(hits(&mut e, p)[3], want);
    }
}
