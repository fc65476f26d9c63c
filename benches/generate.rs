//! Throughput of the synthetic data generator (web events per second).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segflow::generate::{generate_to, GenConfig};
use std::hint::black_box;

const N: u64 = 200_000;

fn bench_generate(c: &mut Criterion) {
    let cfg = GenConfig {
        events: N,
        seed: 1,
        ..GenConfig::default()
    };
    let mut group = c.benchmark_group("generate");
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    // Reuse the in-memory writers so the measurement is the generator, not Vec growth.
    let (mut web, mut crm, mut txn) = (
        Vec::with_capacity(64 << 20),
        Vec::with_capacity(1 << 20),
        Vec::with_capacity(4 << 20),
    );
    group.bench_function("web_events_200k", |b| {
        b.iter(|| {
            web.clear();
            crm.clear();
            txn.clear();
            let stats = generate_to(black_box(&cfg), &mut web, &mut crm, &mut txn).unwrap();
            black_box(stats)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_generate);
criterion_main!(benches);
