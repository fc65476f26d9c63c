//! End-to-end engine throughput: the shipped e-commerce dataflow over a
//! generated data set held in memory, one and two workers.
//!
//! `cargo bench --bench engine` prints criterion's report; the throughput
//! is in web events per second.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segflow::generate::{generate_to, GenConfig};
use segflow::spec::load_spec;
use segflow::{Engine, Input, Output};

fn lines(bytes: Vec<u8>) -> Arc<Vec<String>> {
    Arc::new(
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(String::from)
            .collect(),
    )
}

fn bench(c: &mut Criterion) {
    let events = 50_000;
    let (mut w, mut cr, mut t) = (Vec::new(), Vec::new(), Vec::new());
    generate_to(
        &GenConfig {
            events,
            seed: 1,
            ..GenConfig::default()
        },
        &mut w,
        &mut cr,
        &mut t,
    )
    .unwrap();
    let (web, crm, txn) = (lines(w), lines(cr), lines(t));
    let mut spec = load_spec(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    spec.output = Default::default();
    let state = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.throughput(Throughput::Elements(events));
    for workers in [1usize, 2] {
        group.bench_function(format!("ecommerce_{events}_events_w{workers}"), |b| {
            b.iter(|| {
                Engine::new(spec.clone())
                    .input("web", Input::Memory(Arc::clone(&web)))
                    .unwrap()
                    .input("crm", Input::Memory(Arc::clone(&crm)))
                    .unwrap()
                    .input("transactions", Input::Memory(Arc::clone(&txn)))
                    .unwrap()
                    .output(Output::Discard)
                    .state_dir(state.path().join(format!("w{workers}")))
                    .reset(true)
                    .run(timely::Config::process(workers))
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
