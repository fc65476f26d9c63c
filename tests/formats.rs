//! Standard event formats end to end: the Segment spec (`format =
//! "segment"`) and Google Analytics 4 (`format = "ga4"`).
//!
//! * The shipped e-commerce dataflow on generated data written as Segment
//!   messages (tracks, pages, `Order Completed`, batches), or as GA4
//!   Measurement Protocol payloads and BigQuery export rows, gives exactly
//!   the diffs it gives on the same events as segflow's own records,
//!   converted here by a plain, independent reading of the documented
//!   mapping, with one worker and with two.
//! * `identify`, `alias` and `group` make identifiers, links and
//!   attributes; bad messages, bad batch members and late messages are dead
//!   letters with their reason and their own text, and the run goes on.

use std::path::Path;
use std::sync::{Arc, Mutex};

use segflow::model::{decode_json, IdentityRules, RecordKind};
use segflow::spec::{load_spec, parse_spec, Format};
use segflow::{Engine, Input, Output, RunSummary};
use serde_json::{json, Map, Value};

mod common;

/// Generated native lines: web and CRM (transactions come from the web
/// events' purchases here).
fn generated(events: u64, seed: u64) -> (Vec<String>, Vec<String>) {
    let g = common::generated(events, seed, Some(40));
    (g.web, g.crm)
}

fn rules() -> IdentityRules {
    IdentityRules::new(
        ["crm_id", "user_id", "email", "phone", "anonymous_id"]
            .map(String::from)
            .to_vec(),
        "US".into(),
    )
}

/// The Segment message of a native web event (the inverse of the
/// documented mapping, written out by hand).
fn to_segment(o: &Map<String, Value>, n: usize) -> Value {
    let event = o["event"].as_str().unwrap();
    let mut m = Map::new();
    // Both time fields are read the same way; alternate them.
    let time_key = if n.is_multiple_of(3) {
        "originalTimestamp"
    } else {
        "timestamp"
    };
    m.insert(time_key.into(), o["ts"].clone());
    if let Some(u) = o.get("user_id") {
        m.insert("userId".into(), u.clone());
    }
    if let Some(a) = o.get("anonymous_id") {
        m.insert("anonymousId".into(), a.clone());
    }
    let c = o["context"].as_object().unwrap();
    let mut ctx = json!({
        "device": {"type": c["device"]},
        "location": {"country": c["country"]},
        "page": {"path": c["page"], "referrer": c["referrer"]},
        "sessionId": c["session_id"],
        "library": {"name": "analytics.js", "version": "5.2.0"},
    });
    if let Some(email) = o.get("email") {
        ctx["traits"] = json!({ "email": email });
    }
    m.insert("context".into(), ctx);
    let product = |i: &Value| {
        let i = i.as_object().unwrap();
        let mut p = Map::new();
        for (k, v) in i {
            match k.as_str() {
                "id" => p.insert("product_id".into(), v.clone()),
                "qty" => p.insert("quantity".into(), v.clone()),
                _ => p.insert(k.clone(), v.clone()),
            };
        }
        Value::Object(p)
    };
    let rest: Map<String, Value> = o
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "event" | "ts" | "user_id" | "anonymous_id" | "email" | "context" | "item"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (kind, name, props) = match event {
        "page_view" => ("page", None, Value::Object(rest)),
        "purchase" => {
            let items = o["items"].as_array().unwrap();
            let props = json!({
                "order_id": o["order_id"],
                "total": o["value"],
                "currency": o["currency"],
                "products": items.iter().map(product).collect::<Vec<_>>(),
            });
            ("track", Some("Order Completed"), props)
        }
        other => {
            let mut props = rest;
            if let Some(item) = o.get("item") {
                props.extend(product(item).as_object().unwrap().clone());
            }
            let name = match other {
                "view_item" => "Product Viewed",
                "add_to_cart" => "Product Added",
                "begin_checkout" => "Checkout Started",
                "login" => "Signed In",
                unknown => unknown,
            };
            ("track", Some(name), Value::Object(props))
        }
    };
    m.insert("type".into(), kind.into());
    if let Some(name) = name {
        m.insert("event".into(), name.into());
    }
    m.insert("properties".into(), props);
    Value::Object(m)
}

/// The transaction a native purchase web event is as an `Order Completed`.
fn order_transaction(o: &Map<String, Value>) -> Value {
    let mut t = json!({
        "order_id": o["order_id"],
        "ts": o["ts"],
        "amount": o["value"],
        "currency": o["currency"],
        "items": o["items"],
    });
    for id in ["user_id", "anonymous_id"] {
        if let Some(v) = o.get(id) {
            t[id] = v.clone();
        }
    }
    t
}

/// The shipped dataflow's diffs, sorted, with `web` in `format`.
fn shipped_diffs(
    dir: &Path,
    format: Format,
    web: &[String],
    crm: &[String],
    txn: &[String],
    workers: usize,
) -> (Vec<String>, RunSummary) {
    shipped_diffs_in_ranges(dir, format, web, crm, txn, workers, None)
}

/// [`shipped_diffs`], the web file read in ranges of `range_bytes`.
fn shipped_diffs_in_ranges(
    dir: &Path,
    format: Format,
    web: &[String],
    crm: &[String],
    txn: &[String],
    workers: usize,
    range_bytes: Option<u64>,
) -> (Vec<String>, RunSummary) {
    let mut spec = load_spec(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    spec.output = Default::default();
    if let Some(b) = range_bytes {
        spec.engine.file_range_bytes = b;
    }
    spec.sources
        .iter_mut()
        .find(|s| s.name == "web")
        .unwrap()
        .format = format;
    let web_path = dir.join(format!("web-{format:?}.jsonl"));
    std::fs::write(&web_path, web.join("\n") + "\n").unwrap();
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    let mem = |v: &[String]| Input::Memory(Arc::new(v.to_vec()));
    let summary = Engine::new(spec)
        .input(
            "web",
            Input::File {
                path: web_path,
                follow: false,
            },
        )
        .unwrap()
        .input("crm", mem(crm))
        .unwrap()
        .input("transactions", mem(txn))
        .unwrap()
        .output(Output::Callback(Arc::new(move |d| {
            sink.lock().unwrap().push(d.to_line())
        })))
        .dead_letter(dir.join(format!("dead-{format:?}-{workers}.jsonl")))
        .run(timely::Config::process(workers))
        .unwrap();
    let mut diffs = diffs.lock().unwrap().clone();
    diffs.sort();
    (diffs, summary)
}

/// A native web event as GA4 sends it: its Measurement Protocol event
/// (`(payload fields, event)`) and its BigQuery export row.
fn to_ga4(o: &Map<String, Value>, ts_ms: i64) -> (Value, Value, Value) {
    let micros = ts_ms * 1000;
    let c = o["context"].as_object().unwrap();
    let url = format!("https://shop.example{}", c["page"].as_str().unwrap());
    let item = |i: &Value| {
        let mut g = Map::new();
        for (k, v) in i.as_object().unwrap() {
            let k = match k.as_str() {
                "id" => "item_id",
                "category" => "item_category",
                "brand" => "item_brand",
                "qty" => "quantity",
                other => other,
            };
            g.insert(k.to_string(), v.clone());
        }
        Value::Object(g)
    };
    let items: Vec<Value> = match (o.get("item"), o.get("items")) {
        (Some(i), _) => vec![item(i)],
        (None, Some(Value::Array(list))) => list.iter().map(item).collect(),
        _ => Vec::new(),
    };
    let mut params = json!({
        "page_location": url,
        "page_referrer": c["referrer"],
        "session_id": c["session_id"],
    });
    if !items.is_empty() {
        params["items"] = json!(items);
    }
    if o["event"] == "purchase" {
        params["transaction_id"] = o["order_id"].clone();
        params["value"] = o["value"].clone();
        params["currency"] = o["currency"].clone();
    }
    let mut payload = json!({
        "device": {"category": c["device"]},
        "user_location": {"country_id": c["country"]},
    });
    let mut row = json!({
        "event_date": "20260301",
        "event_timestamp": micros.to_string(),
        "event_name": o["event"],
        "event_params": params.as_object().unwrap().iter().filter(|(k, _)| *k != "items").map(|(k, v)| {
            let value = match v {
                Value::Number(_) => json!({"double_value": v}),
                v => json!({"string_value": v}),
            };
            json!({"key": k, "value": value})
        }).collect::<Vec<_>>(),
        "device": {"category": c["device"], "operating_system": "Linux"},
        "geo": {"country": c["country"]},
        "platform": "WEB",
        "items": items,
    });
    if o["event"] == "purchase" {
        // The export keeps the order in `ecommerce` too; `value` wins.
        row["ecommerce"] = json!({"transaction_id": o["order_id"], "purchase_revenue": o["value"]});
    }
    if let Some(u) = o.get("user_id") {
        payload["user_id"] = u.clone();
        row["user_id"] = u.clone();
    }
    if let Some(a) = o.get("anonymous_id") {
        payload["client_id"] = a.clone();
        row["user_pseudo_id"] = a.clone();
    }
    if let Some(e) = o.get("email") {
        payload["user_properties"] = json!({"email": {"value": e}});
        row["user_properties"] = json!([{"key": "email", "value": {"string_value": e}}]);
    }
    let event = json!({"name": o["event"], "timestamp_micros": micros, "params": params});
    (payload, event, row)
}

/// Native lines the native decoder accepts, parsed, with their times; and
/// the native web events and transactions that their messages in a
/// standard format stand for.
struct Native {
    valid: Vec<(Map<String, Value>, i64)>,
    web: Vec<String>,
    txn: Vec<String>,
    crm: Vec<String>,
}

fn native(events: u64, seed: u64) -> Native {
    let (web, crm) = generated(events, seed);
    let rules = rules();
    // Lines the native decoder rejects are left out of both runs (their
    // dead letters differ by design: each names its own format's fields).
    let valid: Vec<(Map<String, Value>, i64)> = web
        .iter()
        .filter_map(|l| {
            let r = decode_json(RecordKind::Web, l, &rules).ok()?;
            Some((serde_json::from_str(l).unwrap(), r.ts_ms()))
        })
        .collect();
    assert!(valid.len() as u64 > events * 9 / 10, "{}", valid.len());
    let native_web = valid
        .iter()
        .map(|(o, _)| Value::Object(o.clone()).to_string())
        .collect();
    let native_txn: Vec<String> = valid
        .iter()
        .filter(|(o, _)| o["event"] == "purchase")
        .map(|(o, _)| order_transaction(o).to_string())
        .collect();
    assert!(native_txn.len() > 20, "{}", native_txn.len());
    Native {
        valid,
        web: native_web,
        txn: native_txn,
        crm,
    }
}

/// The shipped dataflow's diffs on the native records; checks that they
/// cover behaviour, orders and attributes.
fn expected_diffs(dir: &Path, n: &Native) -> (Vec<String>, RunSummary) {
    let (expected, summary) = shipped_diffs(dir, Format::Jsonl, &n.web, &n.crm, &n.txn, 1);
    let segments: std::collections::BTreeSet<String> = expected
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["segment"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for s in [
        "high_intent",
        "big_spender",
        "vip",
        "cart_abandoner",
        "frequent_visitor",
    ] {
        assert!(segments.contains(s), "{s} missing from {segments:?}");
    }
    (expected, summary)
}

/// The records a native run admitted from web events and transactions (the
/// late ones are dead letters in both runs).
fn native_records(run: &RunSummary) -> u64 {
    let web = &run.sources[0];
    let txn = run
        .sources
        .iter()
        .find(|s| s.name == "transactions")
        .unwrap();
    assert_eq!(web.records + web.dead_letters, web.lines);
    web.records + txn.records
}

fn assert_same_diffs(got: &[String], expected: &[String], what: &str) {
    if let Some(i) = (0..got.len().max(expected.len())).find(|&i| got.get(i) != expected.get(i)) {
        panic!(
            "{what}: the diffs differ first at {i} of {}/{}: got {:?}, expected {:?}",
            got.len(),
            expected.len(),
            got.get(i),
            expected.get(i)
        );
    }
}

#[test]
fn ga4_payloads_and_export_rows_give_the_diffs_of_the_same_events_as_native_records() {
    let n = native(6_000, 12);
    // Measurement Protocol payloads, consecutive events of the same
    // visitor and device in one payload (each with its own time), and
    // every third event a BigQuery export row, in one file.
    let mut lines = Vec::new();
    let mut open: Option<(Value, Vec<Value>)> = None;
    for (i, (o, ts)) in n.valid.iter().enumerate() {
        let (payload, event, row) = to_ga4(o, *ts);
        if i % 3 == 2 {
            if let Some((mut p, events)) = open.take() {
                p["events"] = json!(events);
                lines.push(p.to_string());
            }
            lines.push(row.to_string());
            continue;
        }
        match &mut open {
            Some((p, events)) if *p == payload && events.len() < 4 => events.push(event),
            _ => {
                if let Some((mut p, events)) = open.take() {
                    p["events"] = json!(events);
                    lines.push(p.to_string());
                }
                open = Some((payload, vec![event]));
            }
        }
    }
    if let Some((mut p, events)) = open.take() {
        p["events"] = json!(events);
        lines.push(p.to_string());
    }
    assert!(
        lines.len() < n.valid.len(),
        "some payloads hold several events"
    );
    let dir = tempfile::tempdir().unwrap();
    let (expected, native_run) = expected_diffs(dir.path(), &n);
    // Lines with user properties (a login's e-mail): each payload's or
    // row's are one more record.
    let with_properties = lines
        .iter()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap()
                .get("user_properties")
                .is_some()
        })
        .count();
    for workers in [1, 2] {
        let (got, summary) = shipped_diffs(dir.path(), Format::Ga4, &lines, &n.crm, &[], workers);
        assert_same_diffs(&got, &expected, &format!("ga4 -w {workers}"));
        let s = &summary.sources[0];
        assert_eq!(s.lines, lines.len() as u64);
        // Every event a web event, every purchase also a transaction, and
        // the user properties of a payload or row one record.
        assert_eq!(
            s.records,
            native_records(&native_run) + with_properties as u64
        );
        assert_eq!(s.dead_letters, native_run.sources[0].dead_letters);
    }
}

#[test]
fn segment_messages_give_the_diffs_of_the_same_events_as_native_records() {
    let Native {
        valid,
        web: native_web,
        txn: native_txn,
        crm,
    } = native(6_000, 11);
    let valid: Vec<Map<String, Value>> = valid.into_iter().map(|(o, _)| o).collect();
    // Segment lines: single messages, and every 7th line a batch of three
    // messages with the envelope's sentAt (never read: each member has its
    // own time) and library context.
    let messages: Vec<Value> = valid
        .iter()
        .enumerate()
        .map(|(n, o)| to_segment(o, n))
        .collect();
    let mut segment_web = Vec::new();
    let mut i = 0;
    while i < messages.len() {
        if i % 7 == 0 && i + 3 <= messages.len() {
            let batch = json!({
                "batch": &messages[i..i + 3],
                "sentAt": "2030-01-01T00:00:00Z",
                "context": {"library": {"name": "analytics-node"}},
            });
            segment_web.push(batch.to_string());
            i += 3;
        } else {
            segment_web.push(messages[i].to_string());
            i += 1;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let n = Native {
        valid: Vec::new(),
        web: native_web,
        txn: native_txn,
        crm,
    };
    let (expected, native) = expected_diffs(dir.path(), &n);
    for workers in [1, 2] {
        let (got, summary) = shipped_diffs(
            dir.path(),
            Format::Segment,
            &segment_web,
            &n.crm,
            &[],
            workers,
        );
        assert_same_diffs(&got, &expected, &format!("segment -w {workers}"));
        let s = &summary.sources[0];
        assert_eq!(s.lines, segment_web.len() as u64);
        // Every message a web event, every order also a transaction.
        assert_eq!(s.records, native_records(&native));
        assert_eq!(s.dead_letters, native.sources[0].dead_letters);
    }
}

const SPEC: &str = r#"
[engine]
tick = "1s"
allowed_lateness = "10s"

[sources.web]
format = "segment"

[traits.views]
stream = "web"
filter = 'event == "view_item" and item.category == "outdoor"'

[traits.spend]
stream = "transactions"
aggregate = "sum"
of = "amount"

[traits.last_city]
stream = "web"
aggregate = "last"
of = "context.location.city"

[segments.outdoor_viewer]
when = "views >= 1"

[segments.buyer]
when = "spend >= 100"

[segments.gold]
when = 'attributes.tier == "gold"'

[segments.oslo_gold]
when = 'gold and attributes.address.city == "Oslo" and last_city == "Oslo"'

[segments.acme]
when = 'attributes.group_id == "acme" and attributes.group.plan == "pro"'
"#;

/// 2026-03-01T12:00:00Z in epoch milliseconds.
const NOON: u64 = 1_772_366_400_000;

struct Run {
    diffs: Vec<String>,
    dead: Vec<Value>,
    summary: RunSummary,
}

fn run_segment(dir: &Path, lines: &str, workers: usize) -> Run {
    let spec = parse_spec(SPEC, "formats.toml").unwrap();
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    let path = dir.join("web.segment.jsonl");
    std::fs::write(&path, lines).unwrap();
    let dead_path = dir.join(format!("dead-{workers}.jsonl"));
    let summary = Engine::new(spec)
        .input(
            "web",
            Input::File {
                path,
                follow: false,
            },
        )
        .unwrap()
        .output(Output::Callback(Arc::new(move |d| {
            sink.lock().unwrap().push(d.to_line())
        })))
        .dead_letter(&dead_path)
        .run(timely::Config::process(workers))
        .unwrap();
    let mut dead: Vec<Value> = std::fs::read_to_string(&dead_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    dead.sort_by_key(|d| d["line"].as_u64());
    let mut diffs = diffs.lock().unwrap().clone();
    diffs.sort();
    Run {
        diffs,
        dead,
        summary,
    }
}

fn diff(time: u64, segment: &str, profile: &str, diff: i64) -> String {
    format!(r#"{{"time":{time},"segment":"{segment}","profile":"{profile}","diff":{diff}}}"#)
}

#[test]
fn identify_alias_and_group_make_links_and_attributes_and_bad_messages_are_dead_letters() {
    let t = |s: u64| json!(NOON + s * 1000);
    let lines = [
        // An anonymous visitor in Oslo views an outdoor product.
        json!({"type":"track","event":"Product Viewed","anonymousId":"a1","timestamp":t(0),
               "properties":{"product_id":"P1","category":"outdoor","price":80},
               "context":{"location":{"city":"Oslo"}}}),
        // A batch: the visitor signs up (identify with traits), then a bad
        // member, then a completed order by the user id alone.
        json!({"batch":[
            {"type":"identify","userId":"u1","anonymousId":"a1","timestamp":t(1),
             "traits":{"email":"Ann@Example.com","tier":"gold","address":{"city":"Oslo"}}},
            {"type":"track","userId":"u1","timestamp":t(2)},
            {"type":"track","event":"Order Completed","userId":"u1","timestamp":t(3),
             "properties":{"order_id":"o1","total":120,"products":[{"product_id":"P1","quantity":1}]},
             "context":{"location":{"city":"Oslo"}}}
        ], "sentAt": "2026-03-01T12:00:05Z"}),
        // A second device, aliased to the user later.
        json!({"type":"page","anonymousId":"a2","timestamp":t(4),"context":{"location":{"city":"Bergen"}}}),
        json!({"type":"alias","previousId":"a2","anonymousId":"a2","userId":"u1","timestamp":t(5)}),
        // The user's company.
        json!({"type":"group","groupId":"acme","userId":"u1","timestamp":t(6),"traits":{"plan":"pro"}}),
        // Late by more than the allowed lateness: a dead letter.
        json!({"type":"track","event":"Product Viewed","anonymousId":"a9","timestamp":NOON - 60_000,
               "properties":{"category":"outdoor"}}),
        // Not a Segment message type.
        json!({"type":"click","userId":"u1","timestamp":t(7)}),
        // A later trait value replaces the earlier one: no longer gold.
        json!({"type":"identify","userId":"u1","timestamp":t(8),"traits":{"tier":"silver"}}),
    ];
    let mut text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    text.push_str("{\"type\":\"page\",\n");
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let run = run_segment(dir.path(), &text, workers);
        let s = |x: u64| NOON + x * 1000;
        assert_eq!(
            run.diffs,
            {
                let mut d = vec![
                    diff(s(0), "outdoor_viewer", "anon:a1", 1),
                    // The identify links a1 to u1: the profile is renamed.
                    diff(s(1), "outdoor_viewer", "anon:a1", -1),
                    diff(s(1), "outdoor_viewer", "user:u1", 1),
                    diff(s(1), "gold", "user:u1", 1),
                    diff(s(1), "oslo_gold", "user:u1", 1),
                    diff(s(3), "buyer", "user:u1", 1),
                    // a2's page in Bergen is u1's latest event once aliased.
                    diff(s(5), "oslo_gold", "user:u1", -1),
                    diff(s(6), "acme", "user:u1", 1),
                    diff(s(8), "gold", "user:u1", -1),
                ];
                d.sort();
                d
            },
            "-w {workers}"
        );
        let reasons: Vec<(u64, &str)> = run
            .dead
            .iter()
            .map(|d| (d["line"].as_u64().unwrap(), d["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert_eq!(reasons[0], (2, "batch[1]: missing field `event`"));
        let raw: Value = serde_json::from_str(run.dead[0]["raw"].as_str().unwrap()).unwrap();
        assert_eq!(raw, json!({"type":"track","userId":"u1","timestamp":t(2)}));
        assert_eq!(reasons[1].0, 6);
        assert!(reasons[1].1.starts_with("late: "), "{}", reasons[1].1);
        assert_eq!(reasons[2].0, 7);
        assert!(reasons[2]
            .1
            .starts_with("field `type`: unknown message type \"click\""));
        assert_eq!(reasons[3].0, 9);
        assert!(
            reasons[3].1.starts_with("invalid JSON at column"),
            "{}",
            reasons[3].1
        );
        let src = &run.summary.sources[0];
        // Lines; records: view, identify (3 traits), purchase + its
        // transaction, page, alias link, group (2 attributes), identify.
        assert_eq!(
            (src.lines, src.records, src.dead_letters),
            (9, 1 + 3 + 2 + 1 + 1 + 2 + 1, 4)
        );
    }
}

/// A Segment file cut into many ranges (4 KiB), with identify messages
/// among the tracks (they link identifiers and set the `vip` tier): every
/// range's first time is read as the reader reads it, so the run neither
/// fails nor depends on the number of workers. (Lateness is judged per
/// range, so the diffs are compared between worker counts.)
#[test]
fn a_segment_file_in_many_ranges_with_identifies_is_the_same_for_any_worker_count() {
    let n = native(4_000, 13);
    let mut lines = Vec::new();
    for (i, (o, _)) in n.valid.iter().enumerate() {
        lines.push(to_segment(o, i).to_string());
        if let (true, Some(user)) = (i % 25 == 0, o.get("user_id")) {
            let identify = json!({"type":"identify","userId":user,"anonymousId":o["anonymous_id"],
                "timestamp":o["ts"],"traits":{"tier":"gold"}});
            lines.push(identify.to_string());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |w| {
        shipped_diffs_in_ranges(
            dir.path(),
            Format::Segment,
            &lines,
            &n.crm,
            &[],
            w,
            Some(4096),
        )
    };
    let (one, summary) = run(1);
    assert!(summary.sources[0].offset > 40 * 4096, "many ranges");
    assert!(
        one.iter().any(|d| d.contains("\"segment\":\"vip\"")),
        "identify traits make vip"
    );
    let (two, _) = run(2);
    assert_same_diffs(&two, &one, "segment in ranges, -w 2 against -w 1");
}

/// As a newcomer tries it: `segflow generate --segment` writes the web
/// events as Segment messages, and `segflow run --format web=segment` runs
/// the shipped definition, unchanged, on them.
#[test]
fn the_cli_runs_the_shipped_definition_on_generated_segment_messages() {
    let bin = env!("CARGO_BIN_EXE_segflow");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--out",
            data.to_str().unwrap(),
            "--events",
            "6000",
            "--segment",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["segment_messages"].as_u64().unwrap() > 5_900,
        "{summary}"
    );
    let flow = concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml");
    let run = |format: &str| {
        std::process::Command::new(bin)
            .args(["run", flow, "--format", format, "--json"])
            .args([
                "--input",
                &format!("web={}", data.join("web.segment.jsonl").display()),
            ])
            .args([
                "--input",
                &format!("crm={}", data.join("crm.jsonl").display()),
            ])
            .args(["--input", "transactions=/dev/null"])
            .args(["--output", dir.path().join("out.jsonl").to_str().unwrap()])
            .args([
                "--dead-letter",
                dir.path().join("dead.jsonl").to_str().unwrap(),
            ])
            .args([
                "--state-dir",
                dir.path().join("state").to_str().unwrap(),
                "--reset",
            ])
            .output()
            .unwrap()
    };
    let ok = run("web=segment");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let s: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert!(s["diffs_written"].as_u64().unwrap() > 50, "{s}");
    let diffs = std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap();
    assert!(
        diffs.contains("\"segment\":\"big_spender\"")
            || diffs.contains("\"segment\":\"champion\"")
            || diffs.contains("\"segment\":\"lapsed_customer\""),
        "orders count as transactions"
    );
    let bad = run("web=csv");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && err.contains("format \"csv\" is only supported for crm sources"),
        "{err}"
    );
}

/// A late member of a batch is a dead letter whose reason says which
/// member it is, like its other reasons.
#[test]
fn a_late_batch_member_is_named_in_its_reason() {
    let t = |s: u64| json!(NOON + s * 1000);
    let lines = [
        json!({"type":"page","anonymousId":"a1","timestamp":t(60)}),
        json!({"batch":[
            {"type":"page","anonymousId":"a2","timestamp":t(61)},
            {"type":"page","anonymousId":"a3","timestamp":t(0)}
        ]}),
    ];
    let text: String = lines.iter().map(|l| l.to_string() + "\n").collect();
    let dir = tempfile::tempdir().unwrap();
    let run = run_segment(dir.path(), &text, 1);
    assert_eq!(run.dead.len(), 1, "{:?}", run.dead);
    let reason = run.dead[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("batch[1]: late: "), "{reason}");
    let raw: Value = serde_json::from_str(run.dead[0]["raw"].as_str().unwrap()).unwrap();
    assert_eq!(raw["anonymousId"], "a3");
}
