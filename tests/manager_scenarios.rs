//! Scenario tests of the KV cache manager: the worked example of CONTEXT.md, in-flight sharing,
//! aborts, bounded SWA while decoding, and the dense policy on the same code path.

use kvalloc::{Extension, KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt, NULL_PAGE};

/// One full layer and three sliding layers (window 128), small heads: cheap blocks.
fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// Checkpoints only where the manager places them for certain (the worked example of
/// CONTEXT.md): no speculative ones.
fn manager(policy: Policy, capacity: u64) -> KVCacheManager {
    let config = ManagerConfig {
        policy,
        speculative_checkpoints: false,
        ..ManagerConfig::default()
    };
    KVCacheManager::new(small_spec(), capacity, config).unwrap()
}

fn seq(start: i64, n: usize) -> Vec<i64> {
    (start..start + n as i64).collect()
}

/// Runs a request to completion: admit, decode `gen` tokens (the last one's KV is never
/// computed), finish. Returns the hit.
fn run(m: &mut KVCacheManager, id: u64, prompt: &[i64], gen: &[i64]) -> u64 {
    let hit = m
        .admit(id, Prompt::Tokens(prompt), None, None)
        .unwrap()
        .expect("fits");
    m.validate().unwrap();
    for t in gen.iter().take(gen.len().saturating_sub(1)) {
        assert!(m
            .extend(id, Extension::Tokens(std::slice::from_ref(t)))
            .unwrap());
    }
    m.validate().unwrap();
    m.finish(id).unwrap();
    m.validate().unwrap();
    hit
}

fn hit(m: &KVCacheManager, prompt: &[i64]) -> u64 {
    m.match_prefix(Prompt::Tokens(prompt), None).unwrap()
}

#[test]
fn worked_example_from_context() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    let a_prompt = seq(0, 1024);
    let a_out = seq(50_000, 100);
    assert_eq!(run(&mut m, 1, &a_prompt, &a_out), 0);
    // 1,123 computed tokens: 70 whole blocks cached.
    assert_eq!(m.stats().cached_blocks, 70);

    let mut follow = a_prompt.clone();
    follow.extend(&a_out);
    follow.extend(seq(90_000, 50));
    assert_eq!(hit(&m, &follow), 1120, "prompt + output + new text");

    let mut shares_prompt = a_prompt.clone();
    shares_prompt.extend(seq(70_000, 40));
    assert_eq!(hit(&m, &shares_prompt), 1024, "shares the whole prompt");

    let mut diverges_in_last_block = a_prompt[..1020].to_vec();
    diverges_in_last_block.extend(seq(80_000, 40));
    assert_eq!(
        hit(&m, &diverges_in_last_block),
        1008,
        "diverges inside the last block"
    );

    assert_eq!(
        hit(&m, &a_prompt),
        1008,
        "identical prompt: at least one token computed"
    );

    let mut early = a_prompt[..700].to_vec();
    early.extend(seq(60_000, 300));
    assert_eq!(hit(&m, &early), 0, "no window ends at or below 700");
    // Its branch point (688) becomes a checkpoint for the next request on that path.
    assert_eq!(run(&mut m, 2, &early, &seq(61_000, 5)), 0);
    let mut next = a_prompt[..700].to_vec();
    next.extend(seq(62_000, 100));
    assert_eq!(hit(&m, &next), 688);
    m.validate().unwrap();
}

#[test]
fn shared_system_prompt_reused_from_the_third_request() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    assert_eq!(run(&mut m, 1, &with_system(10_000), &seq(1, 3)), 0);
    assert_eq!(run(&mut m, 2, &with_system(20_000), &seq(2, 3)), 0);
    assert_eq!(run(&mut m, 3, &with_system(30_000), &seq(3, 3)), 288);
    assert_eq!(run(&mut m, 4, &with_system(40_000), &seq(4, 3)), 288);
}

/// A 300-token system prompt every request shares, then 200 tokens of its own from `user` on.
fn with_system(user: i64) -> Vec<i64> {
    let mut p = seq(0, 300);
    p.extend(seq(user, 200));
    p
}

/// With memory to spare, a prompt keeps its sliding-window KV at every block boundary it
/// computes (speculative checkpoints): the second request sharing a system prompt hits it.
#[test]
fn shared_system_prompt_reused_from_the_second_request_while_memory_is_plentiful() {
    let config = ManagerConfig {
        speculative_checkpoints: true,
        ..ManagerConfig::default()
    };
    let mut m = KVCacheManager::new(small_spec(), 256 << 20, config).unwrap();
    assert_eq!(run(&mut m, 1, &with_system(10_000), &seq(1, 3)), 0);
    assert_eq!(run(&mut m, 2, &with_system(20_000), &seq(2, 3)), 288);
    assert_eq!(run(&mut m, 3, &with_system(30_000), &seq(3, 3)), 288);
    // A prompt that leaves request 1's path anywhere resumes at the block before.
    let mut early = with_system(10_000)[..450].to_vec();
    early.extend(seq(70_000, 40));
    assert_eq!(hit(&m, &early), 448);
    m.validate().unwrap();
}

/// Speculative checkpoints never cost an eviction: with too little free memory a prompt
/// keeps only its planned checkpoints, and the second request misses as before.
#[test]
fn no_speculative_checkpoints_without_memory_to_spare() {
    let spec = small_spec();
    // Room for a few prompts' full KV at every layer, not twice one more.
    let per_token: u64 = spec.block_bytes(16).iter().sum::<u64>() / 16;
    let config = ManagerConfig {
        speculative_checkpoints: true,
        ..ManagerConfig::default()
    };
    let mut m = KVCacheManager::new(spec, per_token * 900, config).unwrap();
    assert_eq!(run(&mut m, 1, &with_system(10_000), &seq(1, 3)), 0);
    assert_eq!(run(&mut m, 2, &with_system(20_000), &seq(2, 3)), 0);
    assert_eq!(run(&mut m, 3, &with_system(30_000), &seq(3, 3)), 288);
    m.validate().unwrap();
}

#[test]
fn in_flight_prompt_blocks_are_shared_in_the_same_step() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    let p = seq(0, 500);
    assert_eq!(m.admit(1, Prompt::Tokens(&p), None, None).unwrap(), Some(0));
    let mut q = p.clone();
    q.extend(seq(9_000, 10));
    // Request 2 is admitted while request 1 is still running: 31 whole blocks are cached.
    assert_eq!(
        m.admit(2, Prompt::Tokens(&q), None, None).unwrap(),
        Some(496)
    );
    m.validate().unwrap();
    // Its table reads request 1's blocks for the hit.
    let t1 = m.block_table(1, 0).unwrap();
    let t2 = m.block_table(2, 0).unwrap();
    assert_eq!(&t1[..31], &t2[..31]);
    m.finish(1).unwrap();
    m.finish(2).unwrap();
    m.validate().unwrap();
}

#[test]
fn abort_leaves_nothing() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    run(&mut m, 1, &seq(0, 400), &seq(1, 10));
    let before = m.stats();
    let mut p = seq(0, 400);
    p.extend(seq(5_000, 300));
    assert_eq!(
        m.admit(2, Prompt::Tokens(&p), None, None).unwrap(),
        Some(400)
    );
    m.abort(2).unwrap();
    m.validate().unwrap();
    let after = m.stats();
    assert_eq!(after.cached_blocks, before.cached_blocks);
    assert_eq!(after.bytes_in_use, before.bytes_in_use);
    assert_eq!(after.checkpoints, before.checkpoints);
    assert!(m.abort(2).is_err(), "unknown request");
}

#[test]
fn long_decode_holds_bounded_swa_blocks() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    m.admit(1, Prompt::Tokens(&seq(0, 100)), None, None)
        .unwrap()
        .unwrap();
    for t in 0..2000 {
        assert!(m.extend(1, Extension::Tokens(&[t])).unwrap());
        let st = m.stats();
        assert!(
            st.groups[1].running <= 128 / 16 + 1,
            "{} SWA blocks",
            st.groups[1].running
        );
    }
    m.validate().unwrap();
    let table = m.block_table(1, 1).unwrap();
    let live = table.iter().filter(|&&p| p != NULL_PAGE).count();
    assert!(live <= 9);
    assert!(table[0] == NULL_PAGE && table[table.len() - 1] != NULL_PAGE);
    assert!(m.block_table(1, 0).unwrap().iter().all(|&p| p != NULL_PAGE));
    m.finish(1).unwrap();
    m.validate().unwrap();
}

#[test]
fn dense_keeps_every_sliding_block_and_matches_longest_prefix() {
    let mut m = manager(Policy::Dense, 256 << 20);
    let p = seq(0, 1024);
    run(&mut m, 1, &p, &seq(5, 4));
    let mut early = p[..700].to_vec();
    early.extend(seq(60_000, 300));
    assert_eq!(hit(&m, &early), 688, "dense: every block keeps its SWA KV");
    let st = m.stats();
    assert_eq!(st.groups[1].cached, st.groups[0].cached);
    assert_eq!(st.groups[1].tombstones, 0);
}

#[test]
fn no_room_is_none_and_changes_nothing() {
    let mut m = manager(Policy::SwaAware, 8 << 20);
    let st = m.stats();
    let per_token = small_spec().bytes_per_token_dense();
    let too_long = (st.capacity_bytes / per_token * 4) as usize;
    assert_eq!(
        m.admit(1, Prompt::Tokens(&seq(0, too_long)), None, None)
            .unwrap(),
        None
    );
    assert_eq!(m.stats().bytes_in_use, 0);
    assert!(!m.is_running(1));
    m.validate().unwrap();
}

#[test]
fn salts_never_share() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    let p = seq(0, 600);
    m.admit(1, Prompt::Tokens(&p), Some(b"tenant-a"), None)
        .unwrap();
    m.finish(1).unwrap();
    assert!(
        m.match_prefix(Prompt::Tokens(&p), Some(b"tenant-a"))
            .unwrap()
            > 0
    );
    assert_eq!(
        m.match_prefix(Prompt::Tokens(&p), Some(b"tenant-b"))
            .unwrap(),
        0
    );
    assert_eq!(m.match_prefix(Prompt::Tokens(&p), None).unwrap(), 0);
}

#[test]
fn chunked_prefill_matches_one_shot() {
    let mut a = manager(Policy::SwaAware, 256 << 20);
    let mut b = manager(Policy::SwaAware, 256 << 20);
    let p = seq(0, 1000);
    a.admit(1, Prompt::Tokens(&p), None, None).unwrap();
    b.admit(1, Prompt::Tokens(&p), None, Some(256)).unwrap();
    while b.num_tokens(1).unwrap() < 1000 {
        let left = 1000 - b.num_tokens(1).unwrap();
        assert!(b.extend(1, Extension::Count(left.min(256))).unwrap());
        b.validate().unwrap();
        // The chunk's own window plus the window before it, which the step computing the
        // chunk still reads: at most 2 * (ceil(128 / 16) + 1).
        assert!(b.stats().groups[1].running <= 18);
    }
    for m in [&mut a, &mut b] {
        m.extend(1, Extension::Tokens(&[7, 8, 9])).unwrap();
        m.finish(1).unwrap();
        m.validate().unwrap();
    }
    let mut q = p.clone();
    q.extend(seq(77_000, 20));
    assert_eq!(hit(&a, &q), hit(&b, &q));
    assert_eq!(hit(&a, &q), 992);
}

/// The first decode token after a chunk, taken by a batched step, releases what the chunk kept
/// of the window before it, though it crosses no block boundary (the step's plain-append path
/// must not take it).
#[test]
fn a_decode_step_after_a_chunk_releases_the_chunks_window() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    m.admit(1, Prompt::Tokens(&seq(0, 1000)), None, None)
        .unwrap();
    // Output in two chunks (speculative tokens, say): the second, [1300, 1400), keeps the
    // window before it, blocks of output no checkpoint holds.
    assert!(m.extend(1, Extension::Tokens(&seq(5000, 300))).unwrap());
    assert!(m.extend(1, Extension::Tokens(&seq(6000, 100))).unwrap());
    m.validate().unwrap();
    assert!(
        m.stats().groups[1].running > 9,
        "the chunk keeps the window before it"
    );
    // 1400 is 8 tokens into a block: the decode token neither starts nor completes one.
    let out = m
        .step(&kvalloc::Step {
            decode: kvalloc::Decode {
                ids: &[1],
                tokens: &[5],
            },
            ..kvalloc::Step::default()
        })
        .unwrap();
    assert_eq!((out.extensions, out.refused.len()), (1, 0));
    m.validate().unwrap();
    // ceil(128 / 16) + 1: the running window only.
    assert!(m.stats().groups[1].running <= 9);
}

#[test]
fn block_hash_prompts() {
    let mut m = manager(Policy::SwaAware, 256 << 20);
    let ids: Vec<u64> = (100..164).collect(); // 64 blocks of 16 = 1024 tokens
    let h = m
        .admit(
            1,
            Prompt::BlockHashes {
                hashes: &ids,
                num_tokens: 1024,
            },
            None,
            None,
        )
        .unwrap();
    assert_eq!(h, Some(0));
    assert!(m.extend(1, Extension::Count(40)).unwrap());
    m.finish(1).unwrap();
    m.validate().unwrap();
    let mut longer = ids.clone();
    longer.extend([1, 2, 3]);
    let p = Prompt::BlockHashes {
        hashes: &longer,
        num_tokens: 67 * 16,
    };
    assert_eq!(m.match_prefix(p, None).unwrap(), 1024);
    assert!(m
        .match_prefix(
            Prompt::BlockHashes {
                hashes: &ids[..3],
                num_tokens: 1024
            },
            None
        )
        .is_err());
}

#[test]
fn absurd_counts_are_refused_not_looped_over() {
    let mut m = manager(Policy::SwaAware, 64 << 20);
    let ids: Vec<u64> = (0..4).collect();
    m.admit(
        1,
        Prompt::BlockHashes {
            hashes: &ids,
            num_tokens: 64,
        },
        None,
        None,
    )
    .unwrap()
    .unwrap();
    let before = m.stats();
    assert!(m.extend(1, Extension::Count(u64::MAX)).is_err());
    assert!(m.extend(1, Extension::Count(1 << 40)).is_err());
    assert_eq!(m.stats(), before);
    assert!(m
        .match_prefix(
            Prompt::BlockHashes {
                hashes: &ids,
                num_tokens: u64::MAX
            },
            None
        )
        .is_err());
    m.validate().unwrap();
}

/// A batched step in Rust: checks every id before changing anything, serves finishes,
/// extensions and admissions in order, stops admitting at the first refusal with `fcfs`, and
/// admits nothing when an extension did not fit with `admit_if_extended`.
#[test]
fn batched_step_checks_then_serves_in_order() {
    use kvalloc::{Admission, Step};
    fn admit(req: u64, p: &[i64]) -> Admission<'_> {
        Admission::new(req, Prompt::Tokens(p))
    }
    let mut m = manager(Policy::SwaAware, 1 << 20);
    let (p1, p2, big) = (seq(0, 100), seq(10_000, 60), seq(20_000, 1_000_000));
    let (p1, p2, big) = (&p1[..], &p2[..], &big[..]);
    let out = m
        .step(&Step {
            admit: vec![admit(1, p1), admit(3, big), admit(2, p2)],
            fcfs: true,
            ..Step::default()
        })
        .unwrap();
    assert_eq!(out.admitted, vec![Some(0), None]); // request 2 is not attempted
    assert!(m.is_running(1) && !m.is_running(2) && !m.is_running(3));
    // An unknown id anywhere fails the whole step before anything changes.
    let before = m.stats();
    let tok = [7i64];
    let bad = Step {
        finish: vec![1],
        extend: vec![(99, Extension::Tokens(&tok))],
        ..Step::default()
    };
    assert!(m.step(&bad).is_err());
    assert_eq!(m.stats(), before);
    assert!(m.is_running(1));
    m.validate().unwrap();
    // Grow request 1 until memory runs out, then: with `admit_if_extended` nothing is admitted.
    let mut t = 0;
    while m.extend(1, Extension::Tokens(&[t])).unwrap() {
        t += 1;
    }
    let step = |flag| Step {
        extend: vec![(1, Extension::Tokens(&tok))],
        admit: vec![admit(2, p2)],
        admit_if_extended: flag,
        ..Step::default()
    };
    // `step_into` writes over whatever the outcome held.
    let mut out = kvalloc::StepOutcome {
        extensions: 5,
        refused: vec![3],
        admitted: vec![Some(9)],
        ..kvalloc::StepOutcome::default()
    };
    m.step_into(&step(true), &mut out).unwrap();
    assert_eq!(
        (out.extended(), out.admitted.clone()),
        (vec![false], vec![])
    );
    assert!(!m.is_running(2));
    let out = m.step(&step(false)).unwrap();
    assert_eq!((out.extensions, out.admitted.len()), (1, 1));
    m.validate().unwrap();
}

/// A step hashes its admissions' prompts before its extensions run; with `fcfs`, those after a
/// refusal are hashed but not attempted. Steps that leave the same admission unattempted again
/// and again, then admit it, serve it as plain `admit` calls do: the same hit and accounting.
#[test]
fn admissions_left_unattempted_are_served_right_later() {
    use kvalloc::{Admission, Step};
    fn admission(req: u64, p: &[i64]) -> Admission<'_> {
        Admission::new(req, Prompt::Tokens(p))
    }
    let (shared, own) = (seq(0, 64), seq(50_000, 64));
    let follower: Vec<i64> = shared.iter().chain(&own).copied().collect();
    let (hog, head) = (seq(100_000, 4_000), seq(200_000, 14_000));
    let mut stepped = manager(Policy::SwaAware, 1 << 20);
    let mut plain = manager(Policy::SwaAware, 1 << 20);
    for m in [&mut stepped, &mut plain] {
        run(m, 1, &shared, &[]);
        assert!(m
            .admit(2, Prompt::Tokens(&hog), None, None)
            .unwrap()
            .is_some());
    }
    let queue = Step {
        admit: vec![admission(3, &head), admission(4, &follower)],
        fcfs: true,
        ..Step::default()
    };
    for _ in 0..3 {
        assert_eq!(stepped.step(&queue).unwrap().admitted, vec![None]);
        assert_eq!(
            plain.admit(3, Prompt::Tokens(&head), None, None).unwrap(),
            None
        );
        assert_eq!(stepped.stats(), plain.stats());
        stepped.validate().unwrap();
    }
    let expected = hit(&plain, &follower);
    assert!(expected > 0, "the follower shares a cached prefix");
    for m in [&mut stepped, &mut plain] {
        m.abort(2).unwrap();
    }
    let out = stepped.step(&queue).unwrap();
    let head_hit = plain.admit(3, Prompt::Tokens(&head), None, None).unwrap();
    let follower_hit = plain
        .admit(4, Prompt::Tokens(&follower), None, None)
        .unwrap();
    assert!(head_hit.is_some());
    assert_eq!(follower_hit, Some(expected));
    assert_eq!(out.admitted, vec![head_hit, follower_hit]);
    assert_eq!(stepped.stats(), plain.stats());
    stepped.validate().unwrap();
    // Its output blocks chain on from its prompt's hashes and are cached under them.
    let output = seq(300_000, 41);
    let whole: Vec<i64> = follower.iter().chain(&output).copied().collect();
    for m in [&mut stepped, &mut plain] {
        for t in &output[..40] {
            assert!(m
                .extend(4, Extension::Tokens(std::slice::from_ref(t)))
                .unwrap());
        }
        m.finish(4).unwrap();
        m.validate().unwrap();
    }
    assert_eq!(hit(&stepped, &whole), hit(&plain, &whole));
    assert!(hit(&plain, &whole) > follower.len() as u64);
}

/// A step's `decode` columns are the same as one-token `extend` tuples: two managers, one fed
/// each form (some requests through `extend` with several tokens in the same steps), give the
/// same outcomes, accounting and block tables, until memory runs out and extensions are
/// refused, and cache the same output blocks when the requests finish. Every tenth step a bad
/// step (lengths that differ, an unknown id, an id named twice or also in `extend`, a bad
/// admission) goes to the columns manager first: it fails whole and changes nothing.
#[test]
fn decode_columns_are_one_token_extensions() {
    use kvalloc::{Admission, Decode, Error, Step};
    let mut tuples = manager(Policy::SwaAware, 256 << 10);
    let mut columns = manager(Policy::SwaAware, 256 << 10);
    let ids: Vec<u64> = (0..12).collect();
    let mut history: Vec<Vec<i64>> = Vec::new();
    for &id in &ids {
        let p = seq(id as i64 * 1_000, 40 + id as usize);
        for m in [&mut tuples, &mut columns] {
            assert!(m
                .admit(id, Prompt::Tokens(&p), None, None)
                .unwrap()
                .is_some());
        }
        history.push(p);
    }
    let same = |a: &KVCacheManager, b: &KVCacheManager| {
        assert_eq!(a.stats(), b.stats());
        for &id in ids
            .iter()
            .filter(|&&id| a.is_running(id) || b.is_running(id))
        {
            assert_eq!(a.num_tokens(id).unwrap(), b.num_tokens(id).unwrap());
            for g in 0..2 {
                assert_eq!(a.block_table(id, g).unwrap(), b.block_table(id, g).unwrap());
            }
        }
        a.validate().unwrap();
        b.validate().unwrap();
    };
    let empty: [i64; 0] = [];
    let mut refused = 0;
    for step in 0..200i64 {
        // Requests 0 and 1 take three tokens through `extend`; the rest one each.
        let three = [step, step + 1, step + 2];
        let multi = vec![
            (0, Extension::Tokens(&three)),
            (1, Extension::Tokens(&three)),
        ];
        let tokens: Vec<i64> = ids[2..].iter().map(|&id| step * 100 + id as i64).collect();
        if step % 10 == 5 {
            let before = columns.stats();
            let lengths: Vec<u64> = ids
                .iter()
                .map(|&id| columns.num_tokens(id).unwrap())
                .collect();
            let bad_steps = [
                (
                    Decode {
                        ids: &ids[2..],
                        tokens: &tokens[1..],
                    },
                    Vec::new(),
                    Vec::new(),
                ),
                (
                    Decode {
                        ids: &[5, 6, 99],
                        tokens: &tokens[..3],
                    },
                    Vec::new(),
                    Vec::new(),
                ),
                (
                    Decode {
                        ids: &[5, 6, 5],
                        tokens: &tokens[..3],
                    },
                    Vec::new(),
                    Vec::new(),
                ),
                (
                    Decode {
                        ids: &ids[2..],
                        tokens: &tokens,
                    },
                    vec![multi[0], (6, Extension::Tokens(&three))],
                    Vec::new(),
                ),
                (
                    Decode {
                        ids: &ids[2..],
                        tokens: &tokens,
                    },
                    multi.clone(),
                    vec![Admission::new(50, Prompt::Tokens(&empty))],
                ),
            ];
            for (decode, extend, admit) in bad_steps {
                let err = columns
                    .step(&Step {
                        finish: vec![7],
                        extend,
                        decode,
                        admit,
                        ..Step::default()
                    })
                    .unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument { .. } | Error::Request { .. }),
                    "{err}"
                );
                assert_eq!(columns.stats(), before);
                let now: Vec<u64> = ids
                    .iter()
                    .map(|&id| columns.num_tokens(id).unwrap())
                    .collect();
                assert_eq!(now, lengths);
                assert!(columns.is_running(7) && !columns.is_running(50));
            }
        }
        let mut as_tuples = multi.clone();
        as_tuples.extend(
            ids[2..]
                .iter()
                .zip(&tokens)
                .map(|(&id, t)| (id, Extension::Tokens(std::slice::from_ref(t)))),
        );
        let a = tuples
            .step(&Step {
                extend: as_tuples.clone(),
                ..Step::default()
            })
            .unwrap();
        let b = columns
            .step(&Step {
                extend: multi,
                decode: Decode {
                    ids: &ids[2..],
                    tokens: &tokens,
                },
                ..Step::default()
            })
            .unwrap();
        assert_eq!(a, b);
        for (&(id, ext), ok) in as_tuples.iter().zip(a.extended()) {
            if let (Extension::Tokens(t), true) = (ext, ok) {
                history[id as usize].extend_from_slice(t);
            }
        }
        refused += a.refused.len();
        same(&tuples, &columns);
    }
    assert!(refused > 0, "the test should run out of memory");
    // Both cached the same output blocks: every finished sequence matches as far in both (a
    // token taken back wrongly would have changed a block's hash).
    for &id in &ids {
        tuples.finish(id).unwrap();
        columns.finish(id).unwrap();
    }
    same(&tuples, &columns);
    for h in &history {
        let probe: Vec<i64> = h.iter().copied().chain([-1]).collect();
        let (a, b) = (
            tuples.match_prefix(Prompt::Tokens(&probe), None).unwrap(),
            columns.match_prefix(Prompt::Tokens(&probe), None).unwrap(),
        );
        assert_eq!(a, b);
    }
}

/// Committing bookkeeping memory up front (`prefault_bytes`) is invisible: with none, with a
/// budget smaller than the cache grows to, and with the default, the same operations give the
/// same answers, accounting and block tables, and every invariant holds after each.
#[test]
fn prefault_budget_changes_no_outcome() {
    let mut ms: Vec<KVCacheManager> = [0, 4 << 10, ManagerConfig::default().prefault_bytes]
        .into_iter()
        .map(|prefault_bytes| {
            let config = ManagerConfig {
                prefault_bytes,
                ..ManagerConfig::default()
            };
            // Small enough that the workload below evicts.
            KVCacheManager::new(small_spec(), 3 << 20, config).unwrap()
        })
        .collect();
    let mut state = 7u64;
    let mut rand = move |n: u64| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) % n
    };
    let mut running: Vec<u64> = Vec::new();
    for id in 0..400u64 {
        // Prompts share one of four system prompts, then diverge.
        let shared = seq(rand(4) as i64 * 10_000, 64 + 16 * rand(8) as usize);
        let mut prompt = shared;
        prompt.extend(seq(1_000_000 + id as i64 * 1_000, 1 + rand(100) as usize));
        let op = rand(4);
        let outcomes: Vec<String> = ms
            .iter_mut()
            .map(|m| {
                let out = match op {
                    0 | 1 => format!("{:?}", m.admit(id, Prompt::Tokens(&prompt), None, None)),
                    2 => running
                        .iter()
                        .map(|&r| m.extend(r, Extension::Tokens(&[id as i64])).unwrap())
                        .fold(String::new(), |s, ok| s + if ok { "+" } else { "-" }),
                    _ => format!("{:?}", running.first().map(|&r| m.finish(r))),
                };
                m.validate().unwrap();
                out
            })
            .collect();
        assert!(
            outcomes.iter().all(|o| *o == outcomes[0]),
            "op {id}: {outcomes:?}"
        );
        match op {
            0 | 1 if ms[0].is_running(id) => running.push(id),
            3 if !running.is_empty() => {
                running.remove(0);
            }
            _ => {}
        }
        let stats: Vec<_> = ms.iter().map(|m| m.stats()).collect();
        assert!(
            stats.iter().all(|s| *s == stats[0]),
            "op {id}: stats differ"
        );
        for &r in &running {
            let tables: Vec<_> = ms.iter().map(|m| m.block_table(r, 1).unwrap()).collect();
            assert!(
                tables.iter().all(|t| *t == tables[0]),
                "op {id}: tables differ"
            );
        }
    }
    let st = ms[0].stats();
    assert!(
        st.evicted_leaves + st.evicted_checkpoints > 0,
        "the workload never evicted"
    );
}

/// A chunked prefill whose later chunk finds its prompt's blocks already linked by another
/// request (in-flight sharing) still gives its prompt-end checkpoint its SWA blocks: the shared
/// nodes lack them (the other request's checkpoints lie elsewhere), so they are attached to
/// those nodes, and a third request resumes at the end of the prompt.
#[test]
fn a_later_chunk_attaches_its_checkpoint_to_nodes_another_request_linked() {
    let mut m = manager(Policy::SwaAware, 1 << 30);
    // X: 20 blocks. B: the first block only.
    let x = seq(0, 320);
    assert_eq!(
        m.admit(2, Prompt::Tokens(&x), None, Some(16)).unwrap(),
        Some(0)
    );
    // A: X then more; it links blocks 1..40, keeping SWA only at its branch point and its end.
    let a: Vec<i64> = x.iter().copied().chain(seq(90_000, 320)).collect();
    assert!(m
        .admit(1, Prompt::Tokens(&a), None, None)
        .unwrap()
        .is_some());
    // B's next chunk: blocks 1..20 are A's nodes now, without SWA where B's checkpoint goes.
    assert!(m.extend(2, Extension::Count(304)).unwrap());
    m.validate().unwrap();
    // C: X then something else resumes at the end of X, window-safe thanks to B's checkpoint.
    let c: Vec<i64> = x.iter().copied().chain(seq(70_000, 80)).collect();
    assert_eq!(
        m.admit(3, Prompt::Tokens(&c), None, None).unwrap(),
        Some(320)
    );
    m.validate().unwrap();
}

/// `small_spec` with window `window` and 16-token blocks (a window of a few blocks).
fn sixteen_token_blocks(window: u32) -> (ModelSpec, ManagerConfig) {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": window, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    let config = ManagerConfig {
        block_tokens: 16,
        speculative_checkpoints: false,
        ..ManagerConfig::default()
    };
    (ModelSpec::from_hf_config(&cfg, None).unwrap(), config)
}

/// Issue 21's reproducer: a request preempted one token into a branch window's block must not
/// publish that page. Request 10 matches request 5's first two nodes but no window (hit 0), so
/// it computes the window of its branch point; preempted after one token of block 1, it had
/// already attached that partly written page to request 5's node 1, and request 20 was served
/// it as cached KV (the tracking in `validate` now catches such a page too).
#[test]
fn a_preempted_chunk_never_publishes_a_partly_computed_page() {
    let (spec, config) = sixteen_token_blocks(32);
    for preempt_by_abort in [false, true] {
        let mut m = KVCacheManager::new(spec.clone(), 96 << 10, config.clone()).unwrap();
        let shared = seq(1000, 48);
        let prompt = |others: i64, n: usize| [shared.clone(), seq(others, n)].concat();
        let p5 = prompt(5000, 57);
        let p10 = prompt(6000, 23);
        let p20 = prompt(7000, 17);
        m.admit(5, Prompt::Tokens(&p5), None, Some(33))
            .unwrap()
            .unwrap();
        m.validate().unwrap();
        assert_eq!(
            m.admit(10, Prompt::Tokens(&p10), None, Some(16)).unwrap(),
            Some(0)
        );
        m.validate().unwrap();
        assert!(m.extend(10, Extension::Count(1)).unwrap());
        m.validate().unwrap();
        let partial = m.block_table(10, 1).unwrap()[1];
        if preempt_by_abort {
            m.abort(10).unwrap();
        } else {
            m.finish(10).unwrap();
        }
        m.validate().unwrap();
        assert!(m.extend(5, Extension::Count(16)).unwrap());
        m.validate().unwrap();
        let own = m.block_table(5, 1).unwrap()[1];
        m.finish(5).unwrap();
        m.validate().unwrap();
        assert_eq!(
            m.admit(20, Prompt::Tokens(&p20), None, None).unwrap(),
            Some(48)
        );
        m.validate().unwrap();
        let served = m.block_table(20, 1).unwrap()[1];
        assert_ne!(
            served, partial,
            "served the page request 10 wrote one token of"
        );
        assert_eq!(
            served, own,
            "block 1's window page is the one request 5 computed"
        );
    }
}

/// Several tokens decoded in one call (speculative decoding) are computed in one step, which
/// reads the window before the first of them: those blocks stay in the table until the next
/// call, as for a prefill chunk (the decode path used to release them at once).
#[test]
fn a_multi_token_decode_keeps_the_window_its_step_reads() {
    let (spec, config) = sixteen_token_blocks(24);
    let mut m = KVCacheManager::new(spec, 1 << 20, config).unwrap();
    m.admit(1, Prompt::Tokens(&seq(0, 48)), None, None)
        .unwrap()
        .unwrap();
    // The step computing positions 48..64 reads keys from 48 + 1 - 24 = 25 on: block 1.
    assert!(m.extend(1, Extension::Tokens(&seq(100, 16))).unwrap());
    m.validate().unwrap();
    assert_ne!(m.block_table(1, 1).unwrap()[1], NULL_PAGE);
    // The next call releases it.
    assert!(m.extend(1, Extension::Tokens(&[7])).unwrap());
    m.validate().unwrap();
    assert_eq!(m.block_table(1, 1).unwrap()[1], NULL_PAGE);
}

/// An engine whose prefill attention reads the chunk's own keys from the cache (vLLM's paged
/// kernels) needs every sliding block of a scheduled range: token 20 of a 96-token chunk reads
/// keys 0..20 from blocks 0 and 1. With `prefill_reads_cache` the range's blocks are all held
/// until the next call, which releases those below its window; without it, only the range's
/// last window is allocated (the vLLM plug-in's outputs changed until this held).
#[test]
fn prefill_reads_cache_holds_every_sliding_block_of_the_range_until_the_next_call() {
    let (spec, mut config) = sixteen_token_blocks(24);
    for reads_cache in [false, true] {
        config.prefill_reads_cache = reads_cache;
        let mut m = KVCacheManager::new(spec.clone(), 1 << 20, config.clone()).unwrap();
        m.admit(1, Prompt::Tokens(&seq(0, 96)), None, None)
            .unwrap()
            .unwrap();
        m.validate().unwrap();
        let sliding = m.block_table(1, 1).unwrap();
        assert_eq!(sliding.len(), 6);
        let held = sliding.iter().filter(|&&p| p != NULL_PAGE).count();
        if reads_cache {
            assert_eq!(held, 6, "every block of the chunk: {sliding:?}");
        } else {
            assert!(held < 6, "only the last window: {sliding:?}");
        }
        // The next call keeps the window of token 96 (keys from 73 on: blocks 4 and 5, and
        // block 3 for the checkpoint at 96 - 24 = 72) and releases the rest.
        assert!(m.extend(1, Extension::Tokens(&[7])).unwrap());
        m.validate().unwrap();
        let after = m.block_table(1, 1).unwrap();
        assert!(after[..3].iter().all(|&p| p == NULL_PAGE), "{after:?}");
        assert!(after[4..].iter().all(|&p| p != NULL_PAGE), "{after:?}");
    }
}
