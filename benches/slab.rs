//! Slab arena alloc/free, single and batched (`cargo bench --bench slab`).
//! Target (issue #2): at most 20 ns per block for a batched alloc + free.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvalloc::{ModelSpec, SlabArena};

fn arena() -> SlabArena {
    // mimo-v2.5-pro blocks of 16 tokens: full 819,200 B, sliding 4,915,200 B; 64 GiB budget.
    let spec = ModelSpec::preset("mimo-v2.5-pro").unwrap();
    SlabArena::new(64 << 30, &spec.block_bytes(16), None).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("slab");
    let mut a = arena();
    g.throughput(Throughput::Elements(1));
    g.bench_function("alloc_free_single", |b| {
        b.iter(|| {
            let h = a.alloc(0, 1).unwrap();
            a.free(black_box(&h)).unwrap();
        })
    });
    for n in [64usize, 1024, 16384] {
        g.throughput(Throughput::Elements(n as u64));
        let mut out = Vec::with_capacity(n);
        g.bench_with_input(BenchmarkId::new("alloc_free_batched", n), &n, |b, &n| {
            b.iter(|| {
                out.clear();
                a.alloc_into(0, n, &mut out).unwrap();
                a.free(black_box(&out)).unwrap();
            })
        });
    }
    // Mixed classes with a resident background, so frees hit partial slabs.
    let background: Vec<_> = (0..2000).map(|i| a.alloc(i % 2, 1).unwrap()[0]).collect();
    let mut out = Vec::with_capacity(1024);
    g.throughput(Throughput::Elements(1024));
    g.bench_function("alloc_free_batched_mixed_1024", |b| {
        b.iter(|| {
            out.clear();
            a.alloc_into(0, 896, &mut out).unwrap();
            a.alloc_into(1, 128, &mut out).unwrap();
            a.free(black_box(&out)).unwrap();
        })
    });
    a.free(&background).unwrap();
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
