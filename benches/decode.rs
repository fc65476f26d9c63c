//! Decoding and normalization: generated web, CRM and transaction lines per
//! second (`cargo bench --bench decode`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segflow::generate::{generate_to, GenConfig};
use segflow::model::{decode_json, IdentityRules, RecordKind};

fn bench(c: &mut Criterion) {
    let (mut w, mut cr, mut t) = (Vec::new(), Vec::new(), Vec::new());
    generate_to(
        &GenConfig {
            events: 20_000,
            seed: 1,
            ..GenConfig::default()
        },
        &mut w,
        &mut cr,
        &mut t,
    )
    .unwrap();
    let rules = IdentityRules::new(
        ["crm_id", "user_id", "email", "phone", "anonymous_id"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "US".into(),
    );
    let mut group = c.benchmark_group("decode");
    for (name, kind, bytes) in [
        ("web", RecordKind::Web, &w),
        ("crm", RecordKind::Crm, &cr),
        ("transactions", RecordKind::Transactions, &t),
    ] {
        let lines: Vec<&str> = std::str::from_utf8(bytes).unwrap().lines().collect();
        group.throughput(Throughput::Elements(lines.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                lines
                    .iter()
                    .filter(|l| decode_json(kind, l, &rules).is_ok())
                    .count()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
