//! Real-world input bytes, end to end: a UTF-8 byte-order mark at the start
//! of a file or TCP connection, CSV quoting (commas, doubled quotes and line
//! breaks inside quoted fields), and numbers that do not fit in 64 bits.
//! Each case runs the engine on real files (so framing is exercised) with one
//! worker and with two, and checks the exact segment diffs and dead letters.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segflow::spec::parse_spec;
use segflow::store::Store;
use segflow::{Engine, Input, Output, RunSummary};
use serde_json::{json, Value};

const SPEC: &str = r#"
[engine]
tick = "1s"
allowed_lateness = "10s"

[sources.web]

[sources.crm]
format = "csv"

[sources.transactions]

[traits.views]
stream = "web"
filter = 'event == "view_item"'

[traits.spend]
stream = "transactions"
aggregate = "sum"
of = "amount"

[segments.viewer]
when = "views >= 1"

[segments.repeat]
when = "views >= 2"

[segments.buyer]
when = "spend >= 100"

[segments.gold]
when = 'attributes.tier == "gold"'

[segments.silver]
when = 'attributes.tier == "silver"'
"#;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// 2026-03-01T12:00:00Z in epoch milliseconds.
const NOON: u64 = 1_772_366_400_000;

struct Run {
    diffs: Vec<String>,
    /// Dead letters ordered by source and line.
    dead: Vec<Value>,
    summary: RunSummary,
}

/// Writes each `(source, bytes)` to a file in `dir` and runs the engine on
/// those sources only.
fn run_files(dir: &Path, files: &[(&str, &[u8])], workers: usize, state: Option<&Path>) -> Run {
    let mut spec = parse_spec(SPEC, "inputs.toml").unwrap();
    spec.sources
        .retain(|s| files.iter().any(|(name, _)| *name == s.name));
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    let dead_path = dir.join(format!("dead-{workers}.jsonl"));
    let mut engine = Engine::new(spec)
        .output(Output::Callback(Arc::new(move |d| {
            sink.lock().unwrap().push(d.to_line())
        })))
        .dead_letter(&dead_path);
    for (name, bytes) in files {
        let path = input_path(dir, name);
        std::fs::write(&path, bytes).unwrap();
        engine = engine
            .input(
                name,
                Input::File {
                    path,
                    follow: false,
                },
            )
            .unwrap();
    }
    if let Some(state) = state {
        engine = engine.state_dir(state);
    }
    let summary = engine.run(timely::Config::process(workers)).unwrap();
    let mut dead: Vec<Value> = std::fs::read_to_string(&dead_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    dead.sort_by_key(|d| (d["source"].to_string(), d["line"].as_u64().unwrap()));
    let diffs = diffs.lock().unwrap().clone();
    Run {
        diffs,
        dead,
        summary,
    }
}

fn input_path(dir: &Path, source: &str) -> PathBuf {
    dir.join(format!("{source}.input"))
}

fn diff(time: u64, segment: &str, profile: &str, diff: i64) -> String {
    format!(r#"{{"time":{time},"segment":"{segment}","profile":"{profile}","diff":{diff}}}"#)
}

fn dead_letter(dir: &Path, source: &str, line: u64, offset: u64, reason: &str, raw: &str) -> Value {
    json!({
        "source": source,
        "input": input_path(dir, source).display().to_string(),
        "line": line,
        "offset": offset,
        "reason": reason,
        "raw": raw,
    })
}

/// (lines, records, dead letters) of each source, in spec order.
fn counts(summary: &RunSummary) -> Vec<(u64, u64, u64)> {
    summary
        .sources
        .iter()
        .map(|s| (s.lines, s.records, s.dead_letters))
        .collect()
}

#[test]
fn a_bom_at_the_start_of_json_lines_and_csv_files_is_dropped() {
    let mut web = BOM.to_vec();
    web.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"a1\"}\n");
    web.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":2,\"anonymous_id\":\"a2\"}\r\n");
    web.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":3}\n");
    let mut crm = BOM.to_vec();
    crm.extend_from_slice(b"crm_id,email,updated_at,tier\nC1,ann@example.com,1772366400,gold\n");
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let run = run_files(dir.path(), &[("web", &web), ("crm", &crm)], workers, None);
        assert_eq!(
            run.diffs,
            vec![
                diff(1000, "viewer", "anon:a1", 1),
                diff(2000, "viewer", "anon:a2", 1),
                diff(NOON, "gold", "crm:C1", 1),
            ],
            "-w {workers}"
        );
        // The only dead letter is the record without an identifier, at its
        // true offset: 3 (BOM) + 49 + 50 bytes.
        assert_eq!(
            run.dead,
            vec![dead_letter(
                dir.path(),
                "web",
                3,
                102,
                "no identifier: expected one of crm_id, user_id, email, phone, anonymous_id",
                r#"{"event":"view_item","ts":3}"#,
            )],
            "-w {workers}"
        );
        assert_eq!(counts(&run.summary), vec![(3, 2, 1), (2, 1, 0)]);
    }
}

#[test]
fn a_bom_at_the_start_of_each_tcp_connection_is_dropped() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut spec = parse_spec(SPEC, "inputs.toml").unwrap();
    spec.sources.retain(|s| s.name == "web");
    let diffs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&diffs);
    let dir = tempfile::tempdir().unwrap();
    let dead_path = dir.path().join("dead.jsonl");
    let engine_addr = addr.clone();
    let dead = dead_path.clone();
    let engine = std::thread::spawn(move || {
        Engine::new(spec)
            .input(
                "web",
                Input::Tcp {
                    addr: engine_addr,
                    until_disconnect: true,
                },
            )
            .unwrap()
            .output(Output::Callback(Arc::new(move |d| {
                sink.lock().unwrap().push(d.to_line())
            })))
            .dead_letter(&dead)
            .run(timely::Config::process(2))
            .unwrap()
    });
    let connect = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect(&addr) {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to {addr}: {e}"),
            }
        }
    };
    let mut first = connect();
    let mut second = connect();
    // The first client's BOM arrives one byte at a time.
    for byte in BOM {
        first.write_all(&[*byte]).unwrap();
        first.flush().unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    first
        .write_all(b"{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"a1\"}\n")
        .unwrap();
    let mut bytes = BOM.to_vec();
    bytes.extend_from_slice(b"{\"event\":\"view_item\",\"ts\":1,\"anonymous_id\":\"b1\"}\n");
    second.write_all(&bytes).unwrap();
    first.flush().unwrap();
    second.flush().unwrap();
    drop(first);
    drop(second);
    let summary = engine.join().unwrap();
    assert_eq!(
        *diffs.lock().unwrap(),
        vec![
            diff(1000, "viewer", "anon:a1", 1),
            diff(1000, "viewer", "anon:b1", 1),
        ]
    );
    assert_eq!(std::fs::read_to_string(&dead_path).unwrap(), "");
    assert_eq!(counts(&summary), vec![(2, 2, 0)]);
}

/// A CRM CSV whose quoted fields hold commas, doubled quotes and line
/// breaks; one quoted line break is followed by text that looks like a CRM
/// row (`C2`, bob, silver) and must stay inside C1's note.
const CRM_CSV: &[u8] = b"crm_id,email,updated_at,tier,note\r\n\
C1,ann@example.com,2026-03-01T12:00:00Z,gold,\"Smith, Ann said \"\"hi\"\"\n\
C2,bob@example.com,2026-03-01T12:00:00Z,silver,phantom\"\r\n\
C3,cat@example.com,2026-03-01T12:01:00Z,silver,\"line one\nline two\"\n\
C4,dan@example.com,2026-03-01T12:01:30Z,gold\n\
C5,eve@example.com,2026-03-01T12:02:00Z,gold,plain\n";

#[test]
fn csv_quoted_fields_hold_commas_quotes_and_line_breaks_without_phantom_rows() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let run = run_files(dir.path(), &[("crm", CRM_CSV)], workers, Some(&state));
        assert_eq!(
            run.diffs,
            vec![
                diff(NOON, "gold", "crm:C1", 1),
                diff(NOON + 60_000, "silver", "crm:C3", 1),
                diff(NOON + 120_000, "gold", "crm:C5", 1),
            ],
            "-w {workers}"
        );
        // C4 follows two multi-line records: line 6, byte 228.
        assert_eq!(
            run.dead,
            vec![dead_letter(
                dir.path(),
                "crm",
                6,
                228,
                "expected 5 columns (from the header), found 4",
                "C4,dan@example.com,2026-03-01T12:01:30Z,gold",
            )],
            "-w {workers}"
        );
        // Header, C1, C3, C4, C5: five records (lines) read, three used.
        assert_eq!(counts(&run.summary), vec![(5, 3, 1)]);
        assert_eq!(run.summary.profiles, 3);

        let store = Store::open_read_only(&state).unwrap();
        let rules = segflow::model::IdentityRules::new(
            ["crm_id", "email"].iter().map(|s| s.to_string()).collect(),
            "US".into(),
        );
        let c1 = store.lookup(&rules.parse_query("crm:C1")).unwrap().unwrap();
        assert_eq!(c1.identifiers, vec!["crm:C1", "email:ann@example.com"]);
        assert_eq!(
            Value::Object(c1.attributes),
            json!({
                "note": "Smith, Ann said \"hi\"\nC2,bob@example.com,2026-03-01T12:00:00Z,silver,phantom",
                "tier": "gold",
            })
        );
        let c3 = store.lookup(&rules.parse_query("crm:C3")).unwrap().unwrap();
        assert_eq!(
            Value::Object(c3.attributes),
            json!({"note": "line one\nline two", "tier": "silver"})
        );
        // No phantom profile took bob's email or C2's tier.
        assert_eq!(store.lookup(&rules.parse_query("crm:C2")).unwrap(), None);
        assert_eq!(
            store
                .lookup(&rules.parse_query("email:bob@example.com"))
                .unwrap(),
            None
        );
    }
}

#[test]
fn numeric_ids_beyond_64_bits_keep_their_digits() {
    let web = b"{\"event\":\"view_item\",\"ts\":1,\"user_id\":18446744073709551616}\n\
{\"event\":\"view_item\",\"ts\":2,\"user_id\":18446744073709551617}\n\
{\"event\":\"view_item\",\"ts\":3,\"user_id\":\"18446744073709551616\"}\n\
{\"event\":\"view_item\",\"ts\":4,\"user_id\":1.5}\n";
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let run = run_files(dir.path(), &[("web", web)], workers, None);
        // Two people, not one; the number and the string spellings of the
        // first id are one person with two views.
        assert_eq!(
            run.diffs,
            vec![
                diff(1000, "viewer", "user:18446744073709551616", 1),
                diff(2000, "viewer", "user:18446744073709551617", 1),
                diff(3000, "repeat", "user:18446744073709551616", 1),
            ],
            "-w {workers}"
        );
        assert_eq!(run.summary.profiles, 2);
        assert_eq!(
            run.dead,
            vec![dead_letter(
                dir.path(),
                "web",
                4,
                182,
                "field `user_id`: numeric identifier 1.5 must be written as an integer (digits only) or as a string",
                r#"{"event":"view_item","ts":4,"user_id":1.5}"#,
            )],
            "-w {workers}"
        );
        assert_eq!(counts(&run.summary), vec![(4, 3, 1)]);
    }
}

#[test]
fn out_of_range_amounts_and_bad_quantities_are_dead_lettered() {
    let txn = br#"{"order_id":"o1","ts":1,"user_id":"u1","amount":1e400}
{"order_id":"o2","ts":2,"user_id":"u1","amount":999999999999.999}
{"order_id":"o3","ts":3,"user_id":"u2","amount":1000000000000}
{"order_id":"o4","ts":4,"user_id":"u2","amount":60,"items":[{"qty":-1}]}
{"order_id":"o5","ts":5,"user_id":"u2","amount":"150.5","items":[{"qty":2},{"qty":"1"}]}
"#;
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let run = run_files(dir.path(), &[("transactions", txn)], workers, None);
        assert_eq!(
            run.diffs,
            vec![
                diff(2000, "buyer", "user:u1", 1),
                diff(5000, "buyer", "user:u2", 1),
            ],
            "-w {workers}"
        );
        let out_of_range = |a: &str| {
            format!(
                "field `amount`: {a} is out of range (amounts must be within ±999999999999.999)"
            )
        };
        assert_eq!(
            run.dead,
            vec![
                dead_letter(
                    dir.path(),
                    "transactions",
                    1,
                    0,
                    &out_of_range("1e+400"),
                    r#"{"order_id":"o1","ts":1,"user_id":"u1","amount":1e400}"#,
                ),
                dead_letter(
                    dir.path(),
                    "transactions",
                    3,
                    121,
                    &out_of_range("1000000000000"),
                    r#"{"order_id":"o3","ts":3,"user_id":"u2","amount":1000000000000}"#,
                ),
                dead_letter(
                    dir.path(),
                    "transactions",
                    4,
                    184,
                    "field `items[0].qty`: expected a whole number from 0 to 9007199254740991, found -1",
                    r#"{"order_id":"o4","ts":4,"user_id":"u2","amount":60,"items":[{"qty":-1}]}"#,
                ),
            ],
            "-w {workers}"
        );
        assert_eq!(counts(&run.summary), vec![(5, 2, 3)]);
    }
}
