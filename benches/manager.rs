//! KV cache manager operations in Rust (`cargo bench --bench manager`): match, admit, extend,
//! finish and evict, on mimo-v2.5-pro with 16-token blocks.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvalloc::{Extension, KVCacheManager, ManagerConfig, ModelSpec, Prompt};

const SHARED: i64 = 768;
const PROMPT: i64 = 1024;

fn prompt(id: u64) -> Vec<i64> {
    let own = 1_000_000 + id as i64 * PROMPT;
    (0..SHARED).chain(own..own + PROMPT - SHARED).collect()
}

/// A manager with `n` finished requests cached (all sharing the system prompt).
fn warm(capacity: u64, n: u64) -> KVCacheManager {
    let spec = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    let mut m = KVCacheManager::new(spec, capacity, ManagerConfig::default()).unwrap();
    for id in 0..n {
        m.admit(id, Prompt::Tokens(&prompt(id)), None, None)
            .unwrap();
        m.finish(id).unwrap();
    }
    m
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("manager");
    g.throughput(Throughput::Elements(1));

    let m = warm(512 << 30, 200);
    let p = prompt(7);
    g.bench_function("match_prefix_1024_tokens", |b| {
        b.iter(|| black_box(m.match_prefix(Prompt::Tokens(&p), None).unwrap()))
    });

    // admit + finish of a new request that hits the shared prefix (room available).
    let mut m = warm(512 << 30, 200);
    let mut id = 10_000;
    g.bench_function("admit_finish_1024_tokens_hit_768", |b| {
        b.iter(|| {
            id += 1;
            let p = prompt(id);
            black_box(m.admit(id, Prompt::Tokens(&p), None, None).unwrap());
            m.finish(id).unwrap();
        })
    });

    // Admission alone (no finish, ample memory): 512-token prompts sharing 384 tokens.
    let mut m = warm(4 << 40, 10);
    let mut id = 50_000_000u64;
    g.bench_function("admit_512_tokens_hit_384", |b| {
        b.iter_batched(
            || {
                id += 1;
                let own = id as i64 * 512;
                let p: Vec<i64> = (0..384).chain(own..own + 128).collect();
                (id, p)
            },
            |(id, p)| black_box(m.admit(id, Prompt::Tokens(&p), None, None).unwrap()),
            BatchSize::SmallInput,
        )
    });

    // Admission then abort (no growth): the per-admission cost without memory effects.
    let mut m = warm(4 << 40, 10);
    let p512: Vec<i64> = (0..384).chain(7_000_000..7_000_128).collect();
    g.bench_function("admit_abort_512_tokens_hit_384", |b| {
        b.iter(|| {
            black_box(m.admit(1, Prompt::Tokens(&p512), None, None).unwrap());
            m.abort(1).unwrap();
        })
    });

    // One decode token for a running request (mostly the no-allocation fast path). Every 4,096
    // tokens the request is finished and a fresh one admitted, so memory stays bounded.
    let mut m = warm(512 << 30, 10);
    let mut t = 0i64;
    let mut rid = 1_000_000u64;
    m.admit(rid, Prompt::Tokens(&prompt(rid)), None, None)
        .unwrap();
    g.bench_function("extend_one_token", |b| {
        b.iter(|| {
            t += 1;
            if t % 4096 == 0 {
                m.abort(rid).unwrap();
                rid += 1;
                m.admit(rid, Prompt::Tokens(&prompt(rid)), None, None)
                    .unwrap();
            }
            assert!(m.extend(rid, Extension::Tokens(&[t])).unwrap());
        })
    });

    // Admission into a full cache: every admit evicts about one cached request's blocks.
    let per_req = 64 * (819_200 + 4_915_200 / 6);
    let mut m = warm(400 * per_req, 2_000);
    let mut id = 100_000;
    g.bench_function("admit_finish_with_eviction", |b| {
        b.iter_batched(
            || {
                id += 1;
                (id, prompt(id))
            },
            |(id, p)| {
                assert!(m
                    .admit(id, Prompt::Tokens(&p), None, None)
                    .unwrap()
                    .is_some());
                m.finish(id).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
    // The scheduler step, from Rust: 256 running requests each decode one token, then
    // 16 admissions of 512-token prompts sharing 384 tokens. Between steps, untimed, the 16
    // oldest requests finish so that 256 stay running.
    let spec = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    let mut m = KVCacheManager::new(spec, 1 << 40, ManagerConfig::default()).unwrap();
    let p512 = |id: u64| -> Vec<i64> {
        let own = 3_000_000_000 + id as i64 * 512;
        (0..384).chain(own..own + 128).collect()
    };
    let mut running: std::collections::VecDeque<u64> = (0..256).collect();
    for &r in &running {
        m.admit(r, Prompt::Tokens(&p512(r)), None, None).unwrap();
    }
    let mut next = 256u64;
    let mut tok = 0i64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("step_decode256_admit16_512_tokens", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let prompts: Vec<Vec<i64>> = (next..next + 16).map(p512).collect();
                tok += 1;
                let t = std::time::Instant::now();
                for &r in &running {
                    assert!(m.extend(r, Extension::Tokens(&[tok])).unwrap());
                }
                for (k, p) in prompts.iter().enumerate() {
                    let hit = m.admit(next + k as u64, Prompt::Tokens(p), None, None);
                    assert_eq!(hit.unwrap(), Some(384));
                }
                total += t.elapsed();
                running.extend(next..next + 16);
                next += 16;
                for _ in 0..16 {
                    m.finish(running.pop_front().unwrap()).unwrap();
                }
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
