//! segflow as a library: a dataflow defined in Rust source, fed from memory,
//! with segment diffs delivered to a callback.
//!
//! Run with `cargo run --example embedded`.

use std::sync::{Arc, Mutex};

use segflow::spec::parse_spec;
use segflow::{Engine, Input, Output, SegmentDiff};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = parse_spec(
        r#"
        [engine]
        tick = "1s"

        [sources.web]
        [sources.crm]

        [traits.premium_views_30m]
        stream = "web"
        filter = 'event == "view_item" and item.price >= 100'
        window = "30m"

        [segments.high_intent]
        when = "premium_views_30m >= 3"

        [segments.vip]
        when = 'attributes.tier == "gold"'
        "#,
        "embedded.toml",
    )?;

    // An anonymous visitor views three premium items, then logs in with an
    // email that the CRM knows as a gold customer.
    let web: Vec<String> = [
        r#"{"event":"view_item","ts":"2026-03-02T10:00:00Z","anonymous_id":"a-42","item":{"id":"SKU-1","price":249.0}}"#,
        r#"{"event":"view_item","ts":"2026-03-02T10:05:00Z","anonymous_id":"a-42","item":{"id":"SKU-2","price":129.0}}"#,
        r#"{"event":"view_item","ts":"2026-03-02T10:09:00Z","anonymous_id":"a-42","item":{"id":"SKU-3","price":310.0}}"#,
        r#"{"event":"login","ts":"2026-03-02T10:10:00Z","anonymous_id":"a-42","email":" Ann@Example.com"}"#,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let crm = vec![r#"{"crm_id":"C-7","email":"ann@example.com","updated_at":"2026-03-01T08:00:00Z","attributes":{"tier":"gold"}}"#.to_string()];

    let diffs: Arc<Mutex<Vec<SegmentDiff>>> = Arc::default();
    let sink = Arc::clone(&diffs);
    let summary = Engine::new(spec)
        .input("web", Input::Memory(Arc::new(web)))?
        .input("crm", Input::Memory(Arc::new(crm)))?
        .output(Output::Callback(Arc::new(move |d: &SegmentDiff| {
            sink.lock().unwrap().push(d.clone())
        })))
        .run(timely::Config::process(2))?;

    for d in diffs.lock().unwrap().iter() {
        println!("{}", d.to_line());
    }
    println!(
        "{} profiles, {} diffs",
        summary.profiles, summary.diffs_written
    );
    Ok(())
}
