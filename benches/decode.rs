//! Decoding and normalization: generated web, CRM and transaction lines per
//! second (`cargo bench --bench decode`), and the web lines through other
//! JSON parsers (`cargo bench --bench decode -- parsers`): serde_json into
//! a `Value`, and sonic-rs (SIMD) into its `Value` and through serde, the
//! bounds of what a decoder on either could reach.

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

    // The same web lines, parsed (and validated) in full by other parsers.
    let web: Vec<&str> = std::str::from_utf8(&w).unwrap().lines().collect();
    let mut group = c.benchmark_group("parsers");
    group.throughput(Throughput::Elements(web.len() as u64));
    group.bench_function("segflow_decode_projected", |b| {
        let projection =
            segflow::model::Projection::reading([
                ["item".to_string(), "price".to_string()].as_slice()
            ]);
        b.iter(|| {
            web.iter()
                .filter(|l| {
                    segflow::model::decode_json_projected(
                        RecordKind::Web,
                        l,
                        &rules,
                        segflow::time::parse::TimeUnit::Auto,
                        &projection,
                    )
                    .is_ok()
                })
                .count()
        })
    });
    group.bench_function("serde_json_value", |b| {
        b.iter(|| {
            web.iter()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                .count()
        })
    });
    group.bench_function("sonic_rs_value", |b| {
        b.iter(|| {
            web.iter()
                .filter(|l| sonic_rs::from_str::<sonic_rs::Value>(l).is_ok())
                .count()
        })
    });
    group.bench_function("sonic_rs_serde_ignored", |b| {
        b.iter(|| {
            web.iter()
                .filter(|l| sonic_rs::from_str::<serde::de::IgnoredAny>(l).is_ok())
                .count()
        })
    });
    // What a decoder on sonic-rs's lazy object iterator could reach: every
    // top-level key, the nested `item` and `context` objects walked, each
    // scalar's text borrowed.
    group.bench_function("sonic_rs_lazy_walk", |b| {
        use sonic_rs::JsonValueTrait;
        b.iter(|| {
            let mut n = 0usize;
            for l in &web {
                let mut ok = true;
                for kv in sonic_rs::to_object_iter(*l) {
                    let Ok((k, v)) = kv else {
                        ok = false;
                        break;
                    };
                    if k == "item" || k == "context" {
                        for kv2 in sonic_rs::to_object_iter(v.as_raw_str()) {
                            match kv2 {
                                Ok((_, v2)) => n += v2.as_raw_str().len(),
                                Err(_) => ok = false,
                            }
                        }
                    } else if let Some(s) = v.as_str() {
                        n += s.len();
                    } else {
                        n += v.as_raw_str().len();
                    }
                }
                n += ok as usize;
            }
            n
        })
    });
    group.bench_function("serde_json_serde_ignored", |b| {
        b.iter(|| {
            web.iter()
                .filter(|l| serde_json::from_str::<serde::de::IgnoredAny>(l).is_ok())
                .count()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
