//! Differential test of the refusal shortcut: a scheduler retries its queue's head every step,
//! and the manager answers a retry it is sure to refuse without hashing and walking the prompt
//! again. Three managers run the same random operations under memory pressure; one forgets its
//! remembered refusal before every admission (always the full evaluation), and one admits
//! through batched steps (whose admissions are hashed ahead, except a remembered refusal's):
//! a retry step carries the queue's first two waiting requests, first come first served (the
//! second is attempted only if the first got in). Every answer, the accounting and `validate()`
//! must agree after every operation.

use kvalloc::{
    Admission, Extension, KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt, Step,
};
use proptest::prelude::*;

/// One full layer and three sliding layers (window 32): cheap blocks.
fn spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// Prompts from a few shared prefixes and private suffixes, so retries can gain hits when
/// others finish.
fn prompt(base: u8, len: u16, own: u16) -> Vec<i64> {
    let mut p: Vec<i64> = (0..i64::from(len))
        .map(|t| i64::from(base) * 100_000 + t)
        .collect();
    p.extend((0..i64::from(own)).map(|t| 9_000_000 + i64::from(own) * 1000 + t));
    p
}

#[derive(Debug, Clone)]
enum Op {
    /// Admit a new request with this prompt.
    Admit(u8, u16, u16),
    /// Admit the oldest waiting (refused) request again, unchanged (with a chunk limit when
    /// the flag is set).
    Retry(bool),
    /// Admit the oldest waiting request's id with half its prompt (a different prompt under a
    /// remembered id).
    RetryShorter,
    Extend(usize, u8),
    Finish(usize),
    Abort(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u16..400, 0u16..200).prop_map(|(b, l, o)| Op::Admit(b, l, o)),
        4 => any::<bool>().prop_map(Op::Retry),
        1 => Just(Op::RetryShorter),
        3 => (any::<usize>(), 1u8..40).prop_map(|(w, n)| Op::Extend(w, n)),
        2 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::Abort),
    ]
}

fn run(ops: &[Op], capacity: u64, policy: Policy, reserve: u64) -> Result<(), TestCaseError> {
    let config = ManagerConfig {
        policy,
        admission_reserve_bytes: reserve,
        ..ManagerConfig::default()
    };
    let mut fast = KVCacheManager::new(spec(), capacity, config.clone()).unwrap();
    let mut full = KVCacheManager::new(spec(), capacity, config.clone()).unwrap();
    let mut stepped = KVCacheManager::new(spec(), capacity, config).unwrap();
    let mut running: Vec<u64> = Vec::new();
    let mut prompt_len: std::collections::HashMap<u64, u64> = Default::default();
    let mut waiting: Vec<(u64, Vec<i64>)> = Vec::new();
    let mut next_id = 0u64;
    let mut next_tok = 50_000_000i64;
    for op in ops {
        let chunk = matches!(op, Op::Retry(true)).then_some(100);
        let admit = |id: u64, p: &[i64], fast: &mut KVCacheManager, full: &mut KVCacheManager| {
            full.forget_refusal();
            let a = fast.admit(id, Prompt::Tokens(p), None, chunk).unwrap();
            let b = full.admit(id, Prompt::Tokens(p), None, chunk).unwrap();
            (a, b)
        };
        // The same admissions as one step of `stepped`: its answers, in order.
        let step = |queue: &[(u64, Vec<i64>)], stepped: &mut KVCacheManager| {
            let admit = queue
                .iter()
                .map(|(id, p)| Admission {
                    max_tokens: chunk,
                    ..Admission::new(*id, Prompt::Tokens(p))
                })
                .collect();
            // First come, first served: after a refusal the rest are not attempted (their
            // hashes, computed ahead, go unused).
            let step = Step {
                admit,
                fcfs: true,
                ..Step::default()
            };
            stepped.step(&step).unwrap().admitted
        };
        match op {
            Op::Admit(base, len, own) => {
                let p = prompt(*base, *len, *own);
                let (a, b) = admit(next_id, &p, &mut fast, &mut full);
                prop_assert_eq!(a, b, "admission of {}", next_id);
                let c = step(&[(next_id, p.clone())], &mut stepped);
                prop_assert_eq!(c, vec![a], "stepped admission of {}", next_id);
                prompt_len.insert(next_id, p.len() as u64);
                if a.is_some() {
                    running.push(next_id);
                } else {
                    waiting.push((next_id, p));
                }
                next_id += 1;
            }
            Op::Retry(_) | Op::RetryShorter => {
                if waiting.is_empty() {
                    continue;
                }
                if matches!(op, Op::RetryShorter) {
                    let (id, p) = &mut waiting[0];
                    p.truncate(p.len().div_ceil(2));
                    prompt_len.insert(*id, p.len() as u64);
                }
                let queue: Vec<(u64, Vec<i64>)> = waiting.iter().take(2).cloned().collect();
                let stepped_hits = step(&queue, &mut stepped);
                for ((id, p), c) in queue.into_iter().zip(stepped_hits) {
                    let (a, b) = admit(id, &p, &mut fast, &mut full);
                    prop_assert_eq!(a, b, "retry of {}", id);
                    prop_assert_eq!(c, a, "stepped retry of {}", id);
                    if a.is_some() {
                        waiting.retain(|w| w.0 != id);
                        running.push(id);
                    }
                }
            }
            Op::Extend(who, n) => {
                if running.is_empty() {
                    continue;
                }
                let id = running[who % running.len()];
                let done = fast.num_tokens(id).unwrap();
                let ext_toks: Vec<i64> = (0..i64::from(*n).min(16)).map(|k| next_tok + k).collect();
                next_tok += 16;
                // The rest of a chunked prompt goes by count, output tokens by id.
                let ext = if done < prompt_len[&id] {
                    Extension::Count(u64::from(*n).min(prompt_len[&id] - done))
                } else {
                    Extension::Tokens(&ext_toks)
                };
                let a = fast.extend(id, ext).unwrap();
                let b = full.extend(id, ext).unwrap();
                prop_assert_eq!(a, b, "extension of {}", id);
                prop_assert_eq!(
                    stepped.extend(id, ext).unwrap(),
                    a,
                    "stepped extension of {}",
                    id
                );
            }
            Op::Finish(who) | Op::Abort(who) => {
                if running.is_empty() {
                    continue;
                }
                let id = running.remove(who % running.len());
                for m in [&mut fast, &mut full, &mut stepped] {
                    if matches!(op, Op::Finish(_)) {
                        m.finish(id).unwrap();
                    } else {
                        m.abort(id).unwrap();
                    }
                }
            }
        }
        fast.validate().unwrap();
        full.validate().unwrap();
        stepped.validate().unwrap();
        prop_assert_eq!(fast.stats(), full.stats());
        prop_assert_eq!(stepped.stats(), full.stats());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn retries_answer_as_the_full_evaluation(
        ops in proptest::collection::vec(op(), 1..120),
        cap_kib in prop_oneof![Just(48u64), Just(96u64), Just(160u64)],
        dense in proptest::bool::weighted(0.25),
        reserve_kib in prop_oneof![3 => Just(0u64), 1 => Just(8u64)],
    ) {
        let policy = if dense { Policy::Dense } else { Policy::SwaAware };
        run(&ops, cap_kib << 10, policy, reserve_kib << 10)?;
    }
}

/// Admits requests 0, 1, ... with distinct `len`-token prompts until one is refused; returns
/// how many are running.
fn fill(m: &mut KVCacheManager, len: u16) -> u64 {
    let mut id = 0;
    while m
        .admit(id, Prompt::Tokens(&prompt(1, len, id as u16)), None, None)
        .unwrap()
        .is_some()
    {
        id += 1;
    }
    id
}

/// A retry while nothing changed is refused (and counted) again, and admitted as soon as memory
/// comes back.
#[test]
fn retry_refused_until_memory_comes_back() {
    let mut m = KVCacheManager::new(spec(), 96 << 10, ManagerConfig::default()).unwrap();
    let id = fill(&mut m, 300);
    let head = prompt(2, 390, 100);
    assert_eq!(
        m.admit(id + 1, Prompt::Tokens(&head), None, None).unwrap(),
        None
    );
    let refused = m.stats().admissions_refused;
    assert_eq!(
        m.admit(id + 1, Prompt::Tokens(&head), None, None).unwrap(),
        None
    );
    assert_eq!(m.stats().admissions_refused, refused + 1);
    for r in 0..id {
        m.finish(r).unwrap();
    }
    assert!(m
        .admit(id + 1, Prompt::Tokens(&head), None, None)
        .unwrap()
        .is_some());
    m.validate().unwrap();
}

/// An admission reserve refuses an admission that would leave less than the reserve free or
/// evictable, even though it fits; extensions may use the reserve.
#[test]
fn admission_reserve_is_left_for_extensions() {
    let cap = 96 << 10;
    let config = |reserve| ManagerConfig {
        admission_reserve_bytes: reserve,
        ..ManagerConfig::default()
    };
    let mut plain = KVCacheManager::new(spec(), cap, config(0)).unwrap();
    let mut reserved = KVCacheManager::new(spec(), cap, config(cap / 4)).unwrap();
    let (n_plain, n_reserved) = (fill(&mut plain, 120), fill(&mut reserved, 120));
    assert!(
        n_reserved < n_plain,
        "{n_reserved} admitted with a reserve, {n_plain} without"
    );
    // The reserve is there for decoding: where the plain manager has no room left for its
    // running requests' next blocks, the reserved one grows them by the reserve's worth.
    let grow = |m: &mut KVCacheManager, n: u64| {
        let toks: Vec<i64> = (0..16).map(|t| 70_000_000 + t).collect();
        let grown = (0..n)
            .filter(|&id| m.extend(id, Extension::Tokens(&toks)).unwrap())
            .count();
        m.validate().unwrap();
        grown
    };
    let (g_plain, g_reserved) = (grow(&mut plain, n_plain), grow(&mut reserved, n_reserved));
    assert!(
        g_reserved > g_plain,
        "{g_reserved} grown with a reserve, {g_plain} without"
    );
}

/// A retry whose matched path was extended by another request (the next block of its prompt
/// now cached) needs less than before: it must be evaluated again even though no node of its
/// old path changed. Request 1 prefills the shared prefix S in a chunk; request 2 (S + T + U)
/// is refused; request 1's next chunk links T; request 3, which held memory elsewhere, is
/// aborted. Over a range of sizes, both managers must answer alike, and some retries must get
/// in only thanks to T.
#[test]
fn retry_reevaluated_when_its_path_grows() {
    let s: Vec<i64> = (0..64).collect();
    let t: Vec<i64> = (1_000..1_000 + 16 * 6).collect();
    let u: Vec<i64> = (2_000..2_000 + 16 * 5).collect();
    let r1: Vec<i64> = [&s[..], &t[..], &[7]].concat();
    let p: Vec<i64> = [&s[..], &t[..], &u[..]].concat();
    let mut admitted_thanks_to_t = 0;
    for cap_kib in [24u64, 32, 40, 48, 56, 64] {
        for r3_len in (16..=512).step_by(16) {
            let r3: Vec<i64> = (5_000..5_000 + r3_len).collect();
            let config = ManagerConfig {
                policy: Policy::Dense,
                ..ManagerConfig::default()
            };
            let mut fast = KVCacheManager::new(spec(), cap_kib << 10, config.clone()).unwrap();
            let mut full = KVCacheManager::new(spec(), cap_kib << 10, config).unwrap();
            let mut refused_first = true;
            let mut answers = Vec::new();
            for (is_full, m) in [(false, &mut fast), (true, &mut full)] {
                if m.admit(3, Prompt::Tokens(&r3), None, None)
                    .unwrap()
                    .is_none()
                    || m.admit(1, Prompt::Tokens(&r1), None, Some(64))
                        .unwrap()
                        .is_none()
                {
                    refused_first = false;
                    break;
                }
                if m.admit(2, Prompt::Tokens(&p), None, None)
                    .unwrap()
                    .is_some()
                {
                    refused_first = false;
                    break;
                }
                if !m.extend(1, Extension::Count(t.len() as u64)).unwrap() {
                    refused_first = false;
                    break;
                }
                m.abort(3).unwrap();
                if is_full {
                    m.forget_refusal();
                }
                answers.push(m.admit(2, Prompt::Tokens(&p), None, None).unwrap());
                m.validate().unwrap();
            }
            if !refused_first || answers.len() < 2 {
                continue;
            }
            assert_eq!(
                answers[0], answers[1],
                "cap {cap_kib} KiB, request 3 of {r3_len} tokens"
            );
            assert_eq!(fast.stats(), full.stats());
            if answers[1] == Some((s.len() + t.len()) as u64) {
                admitted_thanks_to_t += 1;
            }
        }
    }
    assert!(admitted_thanks_to_t > 0, "no size exercised the grown path");
}
