//! The HTTP collection endpoint as an analytics SDK uses it: the `segflow`
//! binary listens on `--input web=http://ADDR`, a real HTTP client sends
//! Segment-shaped requests (identify, batch, track) stamped with the wall
//! clock, with pauses, and the diffs, dead letters and answers are checked;
//! SIGTERM ends the run with exit 0. With one worker and with two.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

const SPEC: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "1s"
idle_advance = "200ms"
max_line_bytes = 8192

[sources.web]
kind = "web"
format = "segment"
write_key = "wk-test"

[traits.views_10s]
stream = "web"
filter = 'event == "view_item" and item.category == "outdoor"'
window = "10s"

[traits.spend]
stream = "transactions"
aggregate = "sum"
of = "amount"

[segments.viewer]
when = "views_10s >= 2"

[segments.gold]
when = 'attributes.tier == "gold"'

[segments.buyer]
when = "spend >= 100"
"#;

use common::http_agent as agent;

/// POSTs `body` to `path` as a Segment library does (basic auth with the
/// write key as user name); `(status, body)`.
fn post(addr: &str, path: &str, key: Option<&str>, body: &Value) -> (u16, String) {
    let mut req = agent()
        .post(format!("http://{addr}{path}"))
        .content_type("application/json");
    if let Some(k) = key {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{k}:"));
        req = req.header("Authorization", format!("Basic {auth}"));
    }
    let mut resp = req.send(body.to_string()).unwrap();
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

/// The wall clock now, as an SDK stamps it, and in epoch milliseconds.
fn now() -> (String, u64) {
    let t = chrono::Utc::now();
    (
        t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        t.timestamp_millis() as u64,
    )
}

fn diff(time_ms: u64, segment: &str, profile: &str, diff: i64) -> String {
    let time = time_ms / 100 * 100;
    format!(r#"{{"time":{time},"segment":"{segment}","profile":"{profile}","diff":{diff}}}"#)
}

fn start(dir: &Path, addr: &str, workers: usize) -> Child {
    let spec = dir.join("flow.toml");
    std::fs::write(&spec, SPEC).unwrap();
    Command::new(BIN)
        .args([
            "run",
            spec.to_str().unwrap(),
            "--input",
            &format!("web=http://{addr}"),
            "--output",
            dir.join("out.jsonl").to_str().unwrap(),
            "--dead-letter",
            dir.join("dead.jsonl").to_str().unwrap(),
            "-w",
            &workers.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the endpoint accepts connections.
fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Ends the run with SIGTERM: `(exit code, stderr)`.
fn stop(mut child: Child) -> (i32, String) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("segflow did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sdk_requests_stamped_with_the_wall_clock_become_diffs() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let child = start(dir.path(), &addr, workers);
        wait_listening(&addr);
        let key = Some("wk-test");
        let ok = (200, r#"{"success":true}"#.to_string());

        // A visitor signs up: identify with traits.
        let (t0, ms0) = now();
        let identify = json!({"userId":"u1","anonymousId":"a1","timestamp":t0,
            "traits":{"tier":"gold","email":"Ann@Example.com"}});
        assert_eq!(post(&addr, "/v1/identify", key, &identify), ok);
        // A pause longer than idle_advance, then two views in one batch.
        std::thread::sleep(Duration::from_millis(400));
        let (t1, ms1) = now();
        let view = json!({"type":"track","event":"Product Viewed","anonymousId":"a1",
            "timestamp":t1,"properties":{"product_id":"P1","category":"outdoor","price":80},
            "context":{"device":{"type":"mobile"}}});
        let batch = json!({"batch":[view, view], "sentAt": t1});
        assert_eq!(post(&addr, "/v1/batch", key, &batch), ok);
        // An order, by the user id alone.
        std::thread::sleep(Duration::from_millis(250));
        let (t2, ms2) = now();
        let order = json!({"event":"Order Completed","userId":"u1","timestamp":t2,
            "properties":{"order_id":"o1","total":150,"currency":"EUR",
                          "products":[{"product_id":"P1","quantity":1}]}});
        assert_eq!(post(&addr, "/v1/track", key, &order), ok);
        // A message that does not map is taken (and dead-lettered), as by
        // Segment's API; requests without the key are refused.
        let (t3, _) = now();
        let no_event = json!({"userId":"u1","timestamp":t3});
        assert_eq!(post(&addr, "/v1/track", key, &no_event), ok);
        // A message without a time is at the time it arrived (receivedAt).
        let (_, before) = now();
        let no_time = json!({"userId":"u2","traits":{"tier":"gold"}});
        assert_eq!(post(&addr, "/v1/identify", key, &no_time), ok);
        let (_, after) = now();
        assert_eq!(post(&addr, "/v1/track", None, &order).0, 401);
        assert_eq!(post(&addr, "/v1/track", Some("nope"), &order).0, 401);

        // The diffs come while the client is idle (the idle watermark).
        let out = dir.path().join("out.jsonl");
        let expected = vec![
            diff(ms0, "gold", "user:u1", 1),
            diff(ms1, "viewer", "user:u1", 1),
            diff(ms2, "buyer", "user:u1", 1),
        ];
        let u2 = |l: &String| l.contains("\"profile\":\"user:u2\"");
        let deadline = Instant::now() + Duration::from_secs(20);
        while lines(&out).len() < expected.len() + 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, err) = stop(child);
        assert_eq!(code, 0, "-w {workers}: {err}");
        let (theirs, rest): (Vec<String>, Vec<String>) = lines(&out).into_iter().partition(u2);
        assert_eq!(rest, expected, "-w {workers}");
        assert_eq!(theirs.len(), 1, "{theirs:?}");
        let v: Value = serde_json::from_str(&theirs[0]).unwrap();
        let t = v["time"].as_u64().unwrap();
        assert!(
            v["segment"] == "gold" && before / 100 * 100 <= t && t <= after,
            "{v}"
        );
        let dead: Vec<Value> = lines(&dir.path().join("dead.jsonl"))
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0]["reason"], "missing field `event`");
        assert_eq!(dead[0]["line"], 4, "the fourth request taken");
        let input = dead[0]["input"].as_str().unwrap();
        assert!(
            input.starts_with(&format!("http://{addr} (peer 127.0.0.1:")),
            "{input}"
        );
    }
}

#[test]
fn an_http_input_needs_the_segment_format_and_a_free_port() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("flow.toml");
    std::fs::write(&spec, SPEC.replace("format = \"segment\"\n", "")).unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let run = |spec: &Path| {
        Command::new(BIN)
            .args([
                "run",
                spec.to_str().unwrap(),
                "--input",
                &format!("web=http://{addr}"),
                "--output",
                dir.path().join("out.jsonl").to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    let out = run(&spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("set `format = \"segment\"` in [sources.web]"),
        "{err}"
    );
    // `segflow check` says so too when the definition names the endpoint.
    let with_path = dir.path().join("check.toml");
    std::fs::write(
        &with_path,
        SPEC.replace(
            "format = \"segment\"\n",
            "path = \"http://127.0.0.1:8088\"\n",
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", with_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("takes Segment messages: set `format = \"segment\"`"),
        "{err}"
    );
    // The port is in use: the run stops with the reason, non-zero.
    std::fs::write(&spec, SPEC).unwrap();
    let out = run(&spec);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&addr) && err.to_lowercase().contains("in use"),
        "{err}"
    );
}

/// A live endpoint whose idle advance is long (an hour) still stops at
/// once on SIGTERM: an idle source looks at the stop request on its own.
#[test]
fn sigterm_stops_an_idle_endpoint_at_once_whatever_its_idle_advance() {
    let dir = tempfile::tempdir().unwrap();
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let spec = dir.path().join("flow.toml");
    std::fs::write(
        &spec,
        SPEC.replace("idle_advance = \"200ms\"", "idle_advance = \"1h\""),
    )
    .unwrap();
    let child = Command::new(BIN)
        .args([
            "run",
            spec.to_str().unwrap(),
            "--input",
            &format!("web=http://{addr}"),
            "--output",
            dir.path().join("out.jsonl").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&addr);
    let (t, _) = now();
    let view = json!({"anonymousId":"a1","event":"Product Viewed","timestamp":t});
    assert_eq!(post(&addr, "/v1/track", Some("wk-test"), &view).0, 200);
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    let (code, err) = stop(child);
    assert_eq!(code, 0, "{err}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "took {:?}",
        asked.elapsed()
    );
}
