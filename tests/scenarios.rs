//! Hand-written inputs with hand-written expected diffs: a merge, a window
//! expiry, a late record, a CRM update and delete, segments entered and
//! left. Each scenario runs with one worker and with two.

use std::sync::{Arc, Mutex};

use segflow::spec::parse_spec;
use segflow::store::Store;
use segflow::{Engine, Input, Output, RunSummary};

const SPEC: &str = r#"
[engine]
tick = "1s"
allowed_lateness = "5s"

[sources.web]
[sources.crm]
[sources.transactions]

[traits.views_10s]
stream = "web"
filter = 'event == "view_item"'
window = "10s"

[traits.spend]
stream = "transactions"
aggregate = "sum"
of = "amount"

[segments.active]
when = "views_10s >= 2"

[segments.buyer]
when = "spend >= 100"

[segments.vip]
when = 'attributes.tier == "gold"'
"#;

struct Run {
    diffs: Vec<String>,
    dead: Vec<serde_json::Value>,
    summary: RunSummary,
}

fn run_with(
    web: &[&str],
    crm: &[&str],
    txn: &[&str],
    workers: usize,
    state: Option<&std::path::Path>,
) -> Run {
    let spec = parse_spec(SPEC, "scenarios.toml").unwrap();
    run_spec(
        spec,
        &[("web", web), ("crm", crm), ("transactions", txn)],
        workers,
        state,
    )
}

/// Runs `spec` over in-memory lines per source, collecting diffs, dead
/// letters and the summary.
fn run_spec(
    spec: segflow::spec::Spec,
    inputs: &[(&str, &[&str])],
    workers: usize,
    state: Option<&std::path::Path>,
) -> Run {
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    let dir = tempfile::tempdir().unwrap();
    let dead_path = dir.path().join("dead.jsonl");
    let mut engine = Engine::new(spec)
        .output(Output::Callback(Arc::new(move |d| {
            sink.lock().unwrap().push(d.to_line())
        })))
        .dead_letter(&dead_path);
    for (name, lines) in inputs {
        let lines = Input::Memory(Arc::new(lines.iter().map(|s| s.to_string()).collect()));
        engine = engine.input(name, lines).unwrap();
    }
    if let Some(state) = state {
        engine = engine.state_dir(state);
    }
    let summary = engine.run(timely::Config::process(workers)).unwrap();
    let dead = std::fs::read_to_string(&dead_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let diffs = diffs.lock().unwrap().clone();
    Run {
        diffs,
        dead,
        summary,
    }
}

fn check(web: &[&str], crm: &[&str], txn: &[&str], expected: &[&str]) -> Run {
    let mut first = None;
    for workers in [1, 2] {
        let run = run_with(web, crm, txn, workers, None);
        assert_eq!(run.diffs, expected, "diffs with -w {workers}");
        first.get_or_insert(run);
    }
    first.unwrap()
}

#[test]
fn window_expiry_enters_and_leaves() {
    let web = [
        r#"{"event":"view_item","ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":2.5,"anonymous_id":"a1"}"#,
        r#"{"event":"page_view","ts":20,"anonymous_id":"a2"}"#,
    ];
    check(
        &web,
        &[],
        &[],
        &[
            r#"{"time":2000,"segment":"active","profile":"anon:a1","diff":1}"#,
            r#"{"time":11000,"segment":"active","profile":"anon:a1","diff":-1}"#,
        ],
    );
}

#[test]
fn finite_replay_ends_at_the_last_event() {
    // The window would expire at 11 s, but the input ends at 2 s: the final
    // state is as of the last event, so no exit is written.
    let web = [
        r#"{"event":"view_item","ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":2,"anonymous_id":"a1"}"#,
    ];
    let run = check(
        &web,
        &[],
        &[],
        &[r#"{"time":2000,"segment":"active","profile":"anon:a1","diff":1}"#],
    );
    assert_eq!(run.summary.segments[0], ("active".to_string(), 1));
    assert_eq!(run.summary.last_time, Some(2000));
}

#[test]
fn login_merges_profiles_and_moves_memberships() {
    let web = [
        r#"{"event":"view_item","ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":2,"anonymous_id":"a1"}"#,
        r#"{"event":"login","ts":3,"anonymous_id":"a1","user_id":" u1 "}"#,
        r#"{"event":"view_item","ts":4,"user_id":"u2"}"#,
        r#"{"event":"view_item","ts":4,"anonymous_id":"a9"}"#,
        r#"{"event":"login","ts":5,"anonymous_id":"a9","user_id":"u2"}"#,
    ];
    let run = check(
        &web,
        &[],
        &[],
        &[
            r#"{"time":2000,"segment":"active","profile":"anon:a1","diff":1}"#,
            r#"{"time":3000,"segment":"active","profile":"anon:a1","diff":-1}"#,
            r#"{"time":3000,"segment":"active","profile":"user:u1","diff":1}"#,
            // u2 and a9 each had one view; merged they have two.
            r#"{"time":5000,"segment":"active","profile":"user:u2","diff":1}"#,
        ],
    );
    assert_eq!(run.summary.profiles, 2);
}

#[test]
fn late_records_are_dead_lettered_and_ignored() {
    let web = [
        r#"{"event":"view_item","ts":10,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":20,"anonymous_id":"a2"}"#,
        // Watermark is now 20 s - 5 s = 15 s: 12 s is late, 16 s is not.
        r#"{"event":"view_item","ts":12,"anonymous_id":"a2"}"#,
        r#"{"event":"view_item","ts":16,"anonymous_id":"a1"}"#,
    ];
    // a1 viewed at 10 s and 16 s: two views within 10 s; the first leaves
    // the window at 20 s, which is still within the input (a2 at 20 s).
    let run = check(
        &web,
        &[],
        &[],
        &[
            r#"{"time":16000,"segment":"active","profile":"anon:a1","diff":1}"#,
            r#"{"time":20000,"segment":"active","profile":"anon:a1","diff":-1}"#,
        ],
    );
    assert_eq!(run.summary.late(), 1);
    assert_eq!(run.dead.len(), 1);
    assert_eq!(run.dead[0]["line"], 3);
    assert_eq!(run.dead[0]["source"], "web");
    assert!(
        run.dead[0]["reason"].as_str().unwrap().starts_with("late"),
        "{}",
        run.dead[0]
    );
}

#[test]
fn crm_update_and_delete() {
    let crm = [
        r#"{"crm_id":"C1","email":"ann@example.com","updated_at":1,"attributes":{"tier":"gold"}}"#,
        r#"{"crm_id":"C2","email":"bob@example.com","updated_at":2,"attributes":{"tier":"gold"}}"#,
        r#"{"crm_id":"C1","email":"ann@example.com","updated_at":5,"attributes":{"tier":"silver"}}"#,
        r#"{"crm_id":"C2","updated_at":8,"deleted":true}"#,
    ];
    let web = [r#"{"event":"page_view","ts":9,"anonymous_id":"a1"}"#];
    check(
        &web,
        &crm,
        &[],
        &[
            r#"{"time":1000,"segment":"vip","profile":"crm:C1","diff":1}"#,
            r#"{"time":2000,"segment":"vip","profile":"crm:C2","diff":1}"#,
            r#"{"time":5000,"segment":"vip","profile":"crm:C1","diff":-1}"#,
            r#"{"time":8000,"segment":"vip","profile":"crm:C2","diff":-1}"#,
        ],
    );
}

#[test]
fn transactions_join_crm_profiles_through_normalized_emails() {
    let crm = [
        r#"{"crm_id":"C1","email":"  Bob@Example.COM ","phone":"(415) 234-5678","updated_at":1,"attributes":{"tier":"bronze"}}"#,
    ];
    let txn = [
        r#"{"order_id":"o1","ts":2,"email":"bob@example.com","amount":60.5,"currency":"USD"}"#,
        r#"{"order_id":"o2","ts":3,"email":" BOB@example.com","amount":"39.5","currency":"USD"}"#,
        r#"{"order_id":"o3","ts":4,"user_id":"u7","amount":500,"currency":"USD"}"#,
    ];
    check(
        &[],
        &crm,
        &txn,
        &[
            r#"{"time":3000,"segment":"buyer","profile":"crm:C1","diff":1}"#,
            r#"{"time":4000,"segment":"buyer","profile":"user:u7","diff":1}"#,
        ],
    );
}

#[test]
fn bad_lines_go_to_dead_letters_with_reasons_and_the_run_goes_on() {
    let web = [
        r#"{"event":"view_item","ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":1,"anonymous_id":"#,
        r#"{"ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":42,"ts":1,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":"yesterday","anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":1}"#,
        r#"[1,2,3]"#,
        r#"{"event":"view_item","ts":2,"anonymous_id":"a1"}"#,
    ];
    let run = check(
        &web,
        &[],
        &[],
        &[r#"{"time":2000,"segment":"active","profile":"anon:a1","diff":1}"#],
    );
    let lines: Vec<u64> = run
        .dead
        .iter()
        .map(|d| d["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![2, 3, 4, 5, 6, 7]);
    let reasons: Vec<&str> = run
        .dead
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].contains("invalid JSON"), "{reasons:?}");
    assert!(
        reasons[1].contains("ts") || reasons[1].contains("event"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("event"), "{reasons:?}");
    assert!(reasons[3].contains("timestamp"), "{reasons:?}");
    assert!(reasons[4].contains("identifier"), "{reasons:?}");
    assert_eq!(run.summary.dead_letters(), 6);
    assert_eq!(run.summary.sources[0].records, 2);
}

#[test]
fn state_is_queryable_by_any_identifier() {
    let crm = [
        r#"{"crm_id":"C1","email":"ann@example.com","phone":"+1 415 234 5678","updated_at":1,"attributes":{"tier":"gold","first_name":"Ann"}}"#,
    ];
    let web = [
        r#"{"event":"login","ts":2,"anonymous_id":"a1","email":"ANN@example.com"}"#,
        r#"{"event":"view_item","ts":3,"anonymous_id":"a1"}"#,
        r#"{"event":"view_item","ts":4,"anonymous_id":"a1"}"#,
    ];
    let dir = tempfile::tempdir().unwrap();
    let run = run_with(&web, &crm, &[], 2, Some(dir.path()));
    assert!(run
        .diffs
        .contains(&r#"{"time":4000,"segment":"active","profile":"crm:C1","diff":1}"#.to_string()));
    let store = Store::open_read_only(dir.path()).unwrap();
    let rules = segflow::model::IdentityRules::new(
        ["crm_id", "user_id", "email", "phone", "anonymous_id"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "US".into(),
    );
    for query in [
        "anon:a1",
        "email:Ann@Example.com",
        "phone:(415) 234-5678",
        "crm:C1",
    ] {
        let view = store
            .lookup(&rules.parse_query(query))
            .unwrap()
            .unwrap_or_else(|| panic!("{query} not found"));
        assert_eq!(view.profile, "crm:C1");
        assert_eq!(
            view.identifiers,
            vec![
                "anon:a1",
                "crm:C1",
                "email:ann@example.com",
                "phone:+14152345678"
            ]
        );
        assert_eq!(view.traits.get("views_10s"), Some(&serde_json::json!(2)));
        assert_eq!(view.segments, vec!["active", "vip"]);
        assert_eq!(view.attributes["tier"], "gold");
        assert_eq!(view.as_of.as_ref().unwrap().time, 4000);
    }
}

/// `segflow query --explain` on the state a run wrote: each comparison
/// with the values it read and each trait's window; an unknown segment
/// names the known ones and, when the state was written with other
/// segments, says to give the file the run used.
#[test]
fn explain_shows_the_values_behind_a_membership() {
    const BIN: &str = env!("CARGO_BIN_EXE_segflow");
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("flow.toml");
    std::fs::write(&flow, SPEC).unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(
        &web,
        [1, 2, 3]
            .map(|ts| format!("{{\"event\":\"view_item\",\"ts\":{ts},\"anonymous_id\":\"x\"}}\n"))
            .concat(),
    )
    .unwrap();
    let state = dir.path().join("state");
    let run = std::process::Command::new(BIN)
        .arg("run")
        .arg(&flow)
        .arg("--input")
        .arg(format!("web={}", web.display()))
        .args([
            "--input",
            "crm=/dev/null",
            "--input",
            "transactions=/dev/null",
        ])
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let query = |flow: &std::path::Path, segment: &str| {
        std::process::Command::new(BIN)
            .arg("query")
            .arg("--state-dir")
            .arg(&state)
            .arg("--dataflow")
            .arg(flow)
            .args(["anon:x", "--explain", segment])
            .output()
            .unwrap()
    };
    let out = query(&flow, "active");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("profile anon:x is a member"), "{text}");
    assert!(
        text.contains("true   views_10s >= 2    [views_10s = 3]"),
        "{text}"
    );
    assert!(
        text.contains("views_10s = 3: count of web events with event == \"view_item\"; sliding window of 10s: events in (T-10s, T]"),
        "{text}"
    );
    let out = query(&flow, "buyer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("profile anon:x is not a member"), "{text}");
    assert!(
        text.contains("false  spend >= 100    [spend = 0]"),
        "{text}"
    );
    // A segment the file lacks: the known ones, and no word of another
    // definition while the file is the one the run used.
    let out = query(&flow, "activ");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did you mean `active`"), "{err}");
    assert!(!err.contains("written with other segments"), "{err}");
    // Another file, without the segment: the state was written with other
    // segments.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, SPEC.replace("[segments.active]", "[segments.busy]")).unwrap();
    let out = query(&other, "active");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no segment `active`")
            && err.contains("was written with other segments than")
            && err.contains("give the definition file the run used"),
        "{err}"
    );
}

#[test]
fn crm_as_csv_with_header() {
    let spec = parse_spec(
        r#"
        [sources.crm]
        format = "csv"
        [segments.vip]
        when = 'attributes.tier == "gold"'
        "#,
        "csv.toml",
    )
    .unwrap();
    let csv = [
        "crm_id,email,phone,updated_at,tier,first_name",
        r#"C1, Ann@Example.com ,+1 415 234 5678,2026-03-02T10:00:00Z,gold,"Ann, Jr""#,
        "C2,bob@example.com,,1772445600,silver,Bob",
        "C3,only,three",
        "C1,ann@example.com,,1772449200,silver,Ann",
    ];
    for workers in [1, 2] {
        let run = run_spec(spec.clone(), &[("crm", &csv)], workers, None);
        let summary = run.summary;
        assert_eq!(
            run.diffs,
            vec![
                r#"{"time":1772445600000,"segment":"vip","profile":"crm:C1","diff":1}"#,
                r#"{"time":1772449200000,"segment":"vip","profile":"crm:C1","diff":-1}"#,
            ]
        );
        assert_eq!(summary.sources[0].records, 3);
        assert_eq!(summary.sources[0].dead_letters, 1);
    }
}

#[test]
fn invalid_utf8_and_over_long_lines_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.jsonl");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"a1\"}\n");
    bytes.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"a\xff\xfe\"}\n");
    bytes.extend_from_slice(
        format!(
            "{{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"{}\"}}\n",
            "x".repeat(5000)
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":2,\"anonymous_id\":\"a1\"}");
    std::fs::write(&web, &bytes).unwrap();
    let mut spec = parse_spec(SPEC, "scenarios.toml").unwrap();
    spec.engine.max_line_bytes = 1024;
    spec.sources.retain(|s| s.name == "web");
    let dead_path = dir.path().join("dead.jsonl");
    let out = dir.path().join("out.jsonl");
    let summary = Engine::new(spec)
        .input(
            "web",
            Input::File {
                path: web.clone(),
                follow: false,
            },
        )
        .unwrap()
        .output(Output::Path(out.clone()))
        .dead_letter(&dead_path)
        .run(timely::Config::process(2))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "{\"time\":2000,\"segment\":\"active\",\"profile\":\"anon:a1\",\"diff\":1}\n"
    );
    let dead: Vec<serde_json::Value> = std::fs::read_to_string(&dead_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["line"], 2);
    assert_eq!(dead[0]["offset"], 49);
    assert_eq!(dead[0]["input"], web.display().to_string());
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap()
            .contains("invalid UTF-8 at byte 45 of the line (input offset 94)"),
        "{}",
        dead[0]
    );
    assert_eq!(dead[1]["line"], 3);
    assert!(
        dead[1]["reason"]
            .as_str()
            .unwrap()
            .contains("exceeds max_line_bytes = 1024"),
        "{}",
        dead[1]
    );
    assert_eq!(summary.sources[0].lines, 4);
    assert_eq!(summary.sources[0].records, 2);
}

#[test]
fn configured_extra_identifiers_link_profiles() {
    let spec = parse_spec(
        &SPEC.replace(
            "[sources.web]",
            "[identity]\nextra = [\"device_id\"]\n\n[sources.web]",
        ),
        "extra.toml",
    )
    .unwrap();
    assert_eq!(
        spec.identity.priority.last().map(String::as_str),
        Some("device_id")
    );
    // Two cookies on the same device: one profile, named by an anonymous id
    // (device_id comes last in the priority); between the two anonymous ids
    // (one rank), the one with the smaller key (hash of its text).
    let canonical = ["anon:c1", "anon:c2"]
        .into_iter()
        .min_by_key(|v| segflow::model::Id::of(0, v))
        .unwrap();
    let web = [
        r#"{"event":"view_item","ts":1,"anonymous_id":"c1","context":{"device_id":"d-9"}}"#,
        r#"{"event":"view_item","ts":2,"anonymous_id":"c2","context":{"device_id":"d-9"}}"#,
    ];
    for workers in [1, 2] {
        let inputs: [(&str, &[&str]); 3] = [("web", &web), ("crm", &[]), ("transactions", &[])];
        let run = run_spec(spec.clone(), &inputs, workers, None);
        let summary = run.summary;
        assert_eq!(
            run.diffs,
            vec![format!(
                r#"{{"time":2000,"segment":"active","profile":"{canonical}","diff":1}}"#
            )]
        );
        assert_eq!(summary.profiles, 1);
    }
}

/// Timestamps in every unit a real export uses, one far in the future, and
/// two outside the supported range: the units are read right, the future
/// one is dead-lettered without moving the watermark (so the next record
/// is not late), and nothing is silently moved into range.
#[test]
fn timestamp_units_future_skew_and_range() {
    const NOON: u64 = 1_772_366_400_000; // 2026-03-01T12:00:00Z
    let text = SPEC.replace(
        "allowed_lateness = \"5s\"",
        "allowed_lateness = \"5s\"\nmax_future_skew = \"1h\"",
    );
    let web = [
        // seconds
        r#"{"event":"view_item","ts":1772366400,"anonymous_id":"g1"}"#,
        // GA4 microseconds
        r#"{"event":"view_item","ts":1772366401000000,"anonymous_id":"g1"}"#,
        // nanoseconds, as a digit string
        r#"{"event":"view_item","ts":"1772366402000000000","anonymous_id":"g2"}"#,
        // a year ahead
        r#"{"event":"view_item","ts":1803902400,"anonymous_id":"g2"}"#,
        // milliseconds
        r#"{"event":"view_item","ts":1772366403000,"anonymous_id":"g2"}"#,
        r#"{"event":"view_item","ts":-5,"anonymous_id":"g3"}"#,
        r#"{"event":"view_item","ts":"2200-01-01T00:00:00Z","anonymous_id":"g3"}"#,
    ];
    for workers in [1, 2] {
        let spec = parse_spec(&text, "units.toml").unwrap();
        let run = run_spec(
            spec,
            &[("web", &web), ("crm", &[]), ("transactions", &[])],
            workers,
            None,
        );
        assert_eq!(
            run.diffs,
            vec![
                format!(
                    r#"{{"time":{},"segment":"active","profile":"anon:g1","diff":1}}"#,
                    NOON + 1000
                ),
                format!(
                    r#"{{"time":{},"segment":"active","profile":"anon:g2","diff":1}}"#,
                    NOON + 3000
                ),
            ],
            "-w {workers}"
        );
        let reasons: Vec<(u64, &str)> = run
            .dead
            .iter()
            .map(|d| (d["line"].as_u64().unwrap(), d["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (4, "future: event time 1803902400000 ms is more than max_future_skew = 3600000 ms ahead of the source's latest event time 1772366402000 ms"),
                (6, "field `ts`: timestamp -5 (read as epoch seconds) is outside the supported range 1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z"),
                (7, "field `ts`: timestamp \"2200-01-01T00:00:00Z\" is outside the supported range 1970-01-01T00:00:00Z to 2199-12-31T23:59:59.999Z"),
            ],
            "-w {workers}"
        );
        assert_eq!(run.summary.late(), 0);
        assert_eq!(run.summary.records(), 4);
    }
}

/// `time_unit = "ms"` reads millisecond times from before March 1973,
/// which by magnitude would be seconds (and out of range).
#[test]
fn time_unit_fixes_the_unit_of_numeric_timestamps() {
    let web = [
        r#"{"event":"view_item","ts":50000000000,"anonymous_id":"u1"}"#,
        r#"{"event":"view_item","ts":"50000001000","anonymous_id":"u1"}"#,
    ];
    for (unit, expected, dead) in [
        (
            "ms",
            vec![
                r#"{"time":50000001000,"segment":"active","profile":"anon:u1","diff":1}"#
                    .to_string(),
            ],
            0,
        ),
        ("auto", vec![], 2),
    ] {
        let text = SPEC.replace(
            "[sources.web]",
            &format!("[sources.web]\ntime_unit = \"{unit}\""),
        );
        let spec = parse_spec(&text, "unit.toml").unwrap();
        let run = run_spec(
            spec,
            &[("web", &web), ("crm", &[]), ("transactions", &[])],
            2,
            None,
        );
        assert_eq!(run.diffs, expected, "time_unit = {unit}");
        assert_eq!(run.dead.len(), dead, "time_unit = {unit}: {:?}", run.dead);
    }
}

/// A CSV header that is invalid (a duplicate column, or a required column
/// missing) is dead-lettered, and so is every row after it, with the
/// header's reason: no row is read against the wrong columns, none is lost.
#[test]
fn rows_after_an_invalid_csv_header_are_dead_lettered_with_its_reason() {
    let spec = parse_spec(
        r#"
        [sources.crm]
        format = "csv"
        [segments.vip]
        when = 'attributes.tier == "gold"'
        "#,
        "csv.toml",
    )
    .unwrap();
    for (header, why) in [
        (
            "crm_id,updated_at,tier,tier",
            "duplicate column name `tier` at columns 3 and 4",
        ),
        ("updated_at,tier,crm", "required column `crm_id` is missing"),
    ] {
        let csv = [header, "X1,1772445600,gold,x", "X2,1772445600,gold,y"];
        for workers in [1, 2] {
            let run = run_spec(spec.clone(), &[("crm", &csv)], workers, None);
            let reasons: Vec<(u64, &str)> = run
                .dead
                .iter()
                .map(|d| (d["line"].as_u64().unwrap(), d["reason"].as_str().unwrap()))
                .collect();
            let invalid = format!("its CSV header (line 1) is invalid: {why}");
            assert_eq!(
                reasons,
                vec![
                    (1, format!("CSV header: {why}").as_str()),
                    (2, invalid.as_str()),
                    (3, invalid.as_str()),
                ],
                "{header} -w {workers}"
            );
            assert!(run.diffs.is_empty());
            assert_eq!(run.summary.sources[0].records, 0);
            assert_eq!(run.summary.sources[0].lines, 3);
        }
    }
}
