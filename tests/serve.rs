//! The HTTP API of a running engine (`segflow run … --http`), used the way
//! pages and tools use it: a real HTTP client against the binary.
//!
//! Every answer is checked against an independent sequential model: the
//! memberships are the sum of the diffs the run wrote (the output
//! contract), the profiles are what `segflow query` reads from the same
//! state, and a decision is the first variant whose condition holds over
//! those memberships. Runs with `-w 1` and `-w 2` must answer alike.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "test-token-0123";

/// The content slots the tests add to the shipped definition; their
/// conditions read segments only, so the model decides from memberships.
const CONTENT: &str = r#"
[content.hero]
description = "Home page banner"
[[content.hero.variants]]
name = "vip_offer"
when = 'vip'
content = { headline = "Welcome back" }
[[content.hero.variants]]
name = "outdoor"
when = 'outdoor_enthusiast or outdoor_affinity'
content = { headline = "New tents", image = "/img/tents.jpg" }
[content.hero.default]
name = "generic"
content = { headline = "Sale" }

[content.strip]
[[content.strip.variants]]
name = "comeback"
when = 'lapsed_customer and not vip'
content = "We miss you"
[content.strip.default]
content = "Bestsellers"
"#;

/// A `segflow run` child whose stderr lines are collected as they come.
struct Served {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    base: String,
}

impl Served {
    /// Starts `segflow run ARGS --http 127.0.0.1:0` in `dir` with the test
    /// token, and waits for the address it serves on.
    fn start(dir: &Path, args: &[&str]) -> Served {
        Served::start_with(dir, args, &[])
    }

    /// [`Served::start`] with environment variables `env`.
    fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segflow"));
        cmd.current_dir(dir)
            .arg("run")
            .args(args)
            .args(["--http", "127.0.0.1:0"])
            .envs(env.iter().copied());
        Served::spawn(cmd)
    }

    /// Runs `cmd` (a `segflow run … --http 127.0.0.1:0`, perhaps through
    /// a shell) with the test token; see [`Served::start`].
    fn spawn(mut cmd: Command) -> Served {
        let mut child = cmd
            .env("SEGFLOW_API_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
        let mut served = Served {
            child: Some(child),
            lines,
            seen: Vec::new(),
            base: String::new(),
        };
        let line = served.wait_line("serving the API on http://", 60);
        let addr = line
            .split("http://")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        served.base = format!("http://{addr}");
        served
    }

    /// Waits for a stderr line containing `text`.
    fn wait_line(&mut self, text: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        if let Some(l) = self.seen.iter().find(|l| l.contains(text)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?} within {secs} s; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child().id() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

use common::http_agent as agent;

/// GET `path` with `token` (none: no header): status, headers' `WWW-Authenticate`, body as JSON (or text as a JSON string).
fn get_as(base: &str, path: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = agent().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = req.call().unwrap();
    let status = resp.status().as_u16();
    let auth = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.body_mut().read_to_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, auth, body)
}

fn get(base: &str, path: &str) -> (u16, Value) {
    let (s, _, b) = get_as(base, path, Some(TOKEN));
    (s, b)
}

/// The model: memberships at the end, the sum of the written diffs.
fn memberships(diffs: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut sum: BTreeMap<(String, String), i64> = BTreeMap::new();
    for line in diffs.lines() {
        let d: Value = serde_json::from_str(line).unwrap();
        *sum.entry((
            d["segment"].as_str().unwrap().to_string(),
            d["profile"].as_str().unwrap().to_string(),
        ))
        .or_default() += d["diff"].as_i64().unwrap();
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((segment, profile), n) in sum {
        assert!(n == 0 || n == 1, "{segment} {profile}: sum {n}");
        if n == 1 {
            out.entry(segment).or_default().insert(profile);
        }
    }
    out
}

/// The model's decision for a profile in `segments`.
fn expected_hero(segments: &BTreeSet<&str>) -> &'static str {
    if segments.contains("vip") {
        "vip_offer"
    } else if segments.contains("outdoor_enthusiast") || segments.contains("outdoor_affinity") {
        "outdoor"
    } else {
        "generic"
    }
}

fn expected_strip(segments: &BTreeSet<&str>) -> &'static str {
    if segments.contains("lapsed_customer") && !segments.contains("vip") {
        "comeback"
    } else {
        "default"
    }
}

/// Writes generated data and the shipped definition with [`CONTENT`] into
/// `dir`.
fn replay_dir(dir: &Path) {
    let g = common::generated(3000, 7, None);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/web.jsonl"), g.web.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("data/crm.jsonl"), g.crm.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("data/transactions.jsonl"), g.txn.join("\n") + "\n").unwrap();
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    ))
    .unwrap();
    std::fs::write(dir.join("ecommerce.toml"), shipped + CONTENT).unwrap();
}

/// Everything a replay serves, read through the API: sizes, members
/// (paged), each member's profile and decisions. `workers` as `-w`; with
/// `processes: 2` a cluster of two processes on this machine, process 0
/// serving.
fn served_answers(dir: &Path, workers: &str, processes: usize) -> BTreeMap<String, Value> {
    let args = ["ecommerce.toml", "-w", workers, "--reset"];
    let (mut run, peer) = if processes == 2 {
        // Process 1 runs the same command (its --http is process 0's).
        let (run, peer) = start_cluster(dir, &args, &["--http", "127.0.0.1:0"], Stdio::piped());
        (run, Some(peer))
    } else {
        (Served::start(dir, &args), None)
    };
    run.wait_line("serving its final state", 120);
    if let Some(peer) = peer {
        // Process 1 ends with the run (process 0 goes on serving).
        let out = peer.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "process 1: {stderr}");
        assert!(
            stderr.contains("process 1 does not serve"),
            "process 1: {stderr}"
        );
    }
    let base = run.base.clone();
    let diffs = std::fs::read_to_string(dir.join("out/segments.jsonl")).unwrap();
    let model = memberships(&diffs);
    assert!(
        model.len() >= 5,
        "the data set should fill several segments"
    );
    let mut answers = BTreeMap::new();

    // Sizes and members, page by page, equal the model.
    let (status, segments) = get(&base, "/v1/segments");
    assert_eq!(status, 200, "{segments}");
    assert_eq!(segments["as_of"]["complete"], true);
    assert_eq!(segments["as_of"]["ended"], true);
    let mut profiles: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for s in segments["segments"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let want = model.get(name).cloned().unwrap_or_default();
        assert_eq!(s["size"].as_u64().unwrap() as usize, want.len(), "{name}");
        let mut got = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/segments/{name}/members?limit=7");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={}", urlencode(c)));
            }
            let (status, page) = get(&base, &path);
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["size"].as_u64().unwrap() as usize, want.len());
            got.extend(
                page["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap().to_string()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(
            got,
            want.iter().cloned().collect::<Vec<_>>(),
            "members of {name}"
        );
        for p in &want {
            profiles.entry(p.clone()).or_default();
        }
        answers.insert(format!("segment {name}"), s.clone());
    }
    for (segment, members) in &model {
        for p in members {
            profiles.get_mut(p).unwrap().insert(segment.as_str());
        }
    }
    // Profiles: each member's, by its profile id and by another of its
    // identifiers, equals `segflow query` on the same state, and its
    // segments the model's; decisions follow the model.
    for (i, (p, segs)) in profiles.iter().enumerate().filter(|(i, _)| i % 5 == 0) {
        let (status, view) = get(&base, &format!("/v1/profiles/{}", urlencode(p)));
        assert_eq!(status, 200, "{p}: {view}");
        assert_eq!(view["profile"], p.as_str());
        let got: BTreeSet<&str> = view["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(&got, segs, "segments of {p}");
        let query = Command::new(env!("CARGO_BIN_EXE_segflow"))
            .current_dir(dir)
            .args(["query", "--state-dir", "out/state", p])
            .output()
            .unwrap();
        assert!(
            query.status.success(),
            "{}",
            String::from_utf8_lossy(&query.stderr)
        );
        let queried: Value = serde_json::from_slice(&query.stdout).unwrap();
        for field in ["identifiers", "attributes", "segments"] {
            assert_eq!(view[field], queried[field], "{field} of {p}");
        }
        // Another identifier finds the same profile.
        let other = view["identifiers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .find(|id| *id != p.as_str());
        if let Some(other) = other {
            let (status, again) = get(&base, &format!("/v1/profiles/{}", urlencode(other)));
            assert_eq!(status, 200);
            assert_eq!(again["profile"], p.as_str(), "{other} belongs to {p}");
        }
        let (status, hero) = get(&base, &format!("/v1/decide/hero?id={}", urlencode(p)));
        assert_eq!(status, 200, "{hero}");
        assert_eq!(
            hero["variant"],
            expected_hero(segs),
            "hero for {p} in {segs:?}: {hero}"
        );
        assert_eq!(hero["profile"], p.as_str());
        let (status, both) = get(
            &base,
            &format!("/v1/decide?slots=hero,strip&id={}", urlencode(p)),
        );
        assert_eq!(status, 200, "{both}");
        assert_eq!(both["decisions"]["hero"]["variant"], expected_hero(segs));
        assert_eq!(
            both["decisions"]["strip"]["variant"],
            expected_strip(segs),
            "{both}"
        );
        // The wall clock's lag is not part of the answer's content.
        let mut view = view;
        view["as_of"]["lag_ms"] = Value::Null;
        answers.insert(format!("profile {p}"), view);
        answers.insert(format!("decide {p}"), both["decisions"].clone());
        let _ = i;
    }
    assert!(
        answers.keys().filter(|k| k.starts_with("profile")).count() >= 10,
        "too few profiles checked"
    );
    let status = run.stop();
    assert!(status.success(), "exit after SIGTERM: {status}");
    answers
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A finished replay serves its final state: sizes, members, profiles and
/// decisions equal the model, alike for one and two workers and for a
/// cluster of two processes (process 0 serves every process's profiles).
#[test]
fn a_replay_serves_what_its_diffs_say_for_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let one = served_answers(dir.path(), "1", 1);
    for (workers, processes) in [("2", 1), ("1", 2)] {
        let other = served_answers(dir.path(), workers, processes);
        assert_eq!(one.len(), other.len());
        for ((k1, a), (k2, b)) in one.iter().zip(&other) {
            assert_eq!(k1, k2);
            assert_eq!(
                a, b,
                "{k1}: -w 1 and -w {workers} with {processes} processes differ"
            );
        }
    }
}

/// Every failure a client can cause gets its status and a reason.
#[test]
fn requests_without_the_token_or_with_bad_parameters_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let mut run = Served::start(dir.path(), &["ecommerce.toml", "--reset"]);
    run.wait_line("serving its final state", 120);
    let base = run.base.clone();
    // /healthz needs no token; everything else does.
    let (status, _, body) = get_as(&base, "/healthz", None);
    assert_eq!((status, body), (200, Value::String("ok\n".into())));
    for path in [
        "/v1/segments",
        "/v1/segments/vip/members",
        "/v1/profiles/crm:C000001",
        "/v1/decide/hero?id=anon:x",
        "/v1/decide?slots=hero&id=anon:x",
        "/v1/diffs/stream",
        "/metrics",
    ] {
        let (status, auth, body) = get_as(&base, path, None);
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(auth.as_deref(), Some("Bearer realm=\"segflow\""), "{path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("Authorization: Bearer"),
            "{body}"
        );
        let (status, _, body) = get_as(&base, path, Some("wrong-token-0123"));
        assert_eq!(status, 401, "{path}");
        assert!(body["error"].as_str().unwrap().contains("wrong"), "{body}");
    }
    let cases: [(&str, u16, &str); 16] = [
        (
            "/v1/segments/vip/export?since=99999999999999",
            400,
            "is after the time the API is as of",
        ),
        ("/v1/segments/vipp/members", 404, "did you mean `vip`?"),
        ("/v1/segments/vip/members?limit=0", 400, "`limit` must be"),
        ("/v1/segments/vip/members?limit=x", 400, "`limit` must be"),
        (
            "/v1/profiles/anon:nobody-at-all",
            404,
            "no profile has the identifier",
        ),
        (
            "/v1/profiles/email:not-an-email",
            400,
            "is not a valid email identifier",
        ),
        ("/v1/profiles/email:", 400, "has no value after `email:`"),
        (
            "/v1/segments/vip/members?limit=1&limit=2",
            400,
            "duplicate field",
        ),
        ("/v1/profiles/user:%FF", 400, "UTF-8"),
        ("/v1/decide/heroo?id=anon:x", 404, "did you mean `hero`?"),
        ("/v1/decide/hero", 400, "give the visitor's identifier"),
        ("/v1/decide?id=anon:x", 400, "name the slots"),
        ("/v1/diffs/stream?segment=", 400, "names no segment"),
        ("/v1/diffs/stream?segment=,", 400, "names no segment"),
        ("/v1/diffs/stream?profile=", 400, "names no profile"),
        ("/v2/nothing", 404, "no such endpoint"),
    ];
    for (path, want, text) in cases {
        let (status, body) = get(&base, path);
        assert_eq!(status, want, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains(text),
            "{path}: {body}"
        );
    }
    let mut r = agent()
        .post(format!("{base}/v1/segments"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send("")
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("the API answers GET only"));
    // An unknown visitor gets what an empty profile gets.
    let (status, body) = get(&base, "/v1/decide?slots=hero,strip&id=anon:first-visit");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["profile"], Value::Null);
    assert_eq!(body["decisions"]["hero"]["variant"], "generic");
    assert_eq!(body["decisions"]["hero"]["content"]["headline"], "Sale");
    assert_eq!(body["decisions"]["strip"]["variant"], "default");
    assert_eq!(body["decisions"]["hero"]["why"]["rule"], "default");
    let status = run.stop();
    assert!(status.success());
}

/// The API cannot start: the run fails at once with the reason, before
/// reading anything.
#[test]
fn a_port_in_use_or_a_bad_token_file_fail_the_run_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").unwrap();
    let empty = empty.to_str().unwrap().to_string();
    let cases: [(Vec<&str>, &str); 2] = [
        (vec!["--http", &addr], "cannot listen"),
        (
            vec!["--http", "127.0.0.1:0", "--http-token-file", &empty],
            "the file is empty",
        ),
    ];
    for (args, text) in cases {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_segflow"))
            .current_dir(dir.path())
            .args(["run", "ecommerce.toml", "--reset"])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(text), "{args:?}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{args:?} took long"
        );
        assert!(!dir.path().join("out/segments.jsonl").exists() || text != "cannot listen");
    }
}

/// Tick 100 ms, lateness 200 ms: a live web source on TCP.
const LIVE: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "200ms"
idle_advance = "200ms"

[sources.web]
kind = "web"

[traits.views]
stream = "web"
filter = 'event == "view_item"'

[segments.viewer]
when = "views >= 2"

[content.banner]
[[content.banner.variants]]
name = "fan"
when = 'viewer'
content = "for fans"
[content.banner.default]
content = "hello"

[output]
state_dir = "state"
"#;

/// Opens the diff stream at `url` (on a thread of its own) and gives each
/// of its messages as (event type, data); the channel closes when the
/// stream does.
fn open_stream(url: String) -> mpsc::Receiver<(String, Value)> {
    let (events_tx, events) = mpsc::channel::<(String, Value)>();
    std::thread::spawn(move || {
        let resp = agent().get(&url).call().unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let reader = BufReader::new(resp.into_body().into_reader());
        let mut kind = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_string();
            } else if let Some(data) = line.strip_prefix("data:") {
                let data = serde_json::from_str(data.trim()).unwrap();
                if events_tx.send((kind.clone(), data)).is_err() {
                    break;
                }
            }
        }
    });
    events
}

/// The messages of a stream until it closes (within `secs`).
fn until_closed(events: &mpsc::Receiver<(String, Value)>, secs: u64) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(e) => got.push(e),
            Err(mpsc::RecvTimeoutError::Disconnected) => return got,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the stream did not close within {secs} s; got {got:?}")
            }
        }
    }
}

/// A run that fails (here a scheduled export with a file in its way) or is
/// stopped ends its open diff streams with `event: end` and the reason,
/// rather than cutting them without a word.
#[test]
fn open_streams_end_with_the_reason_when_the_run_fails_or_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.toml"), LIVE).unwrap();
    std::fs::create_dir_all(dir.path().join("exports")).unwrap();
    std::fs::write(dir.path().join("exports/viewer"), "in the way").unwrap();
    let input = format!("web=tcp://127.0.0.1:{}", common::free_port());
    // The first scheduled export comes 4 s after the start: the stream is
    // open by then.
    let mut run = Served::start(
        dir.path(),
        &[
            "live.toml",
            "--input",
            &input,
            "--export",
            "exports",
            "--export-every",
            "4s",
            "--export-segments",
            "viewer",
        ],
    );
    // An `?id=` stream says at once that it is open (`event: profile`),
    // once the state can be read.
    poll(&run.base, "/v1/profiles/anon:nobody", 30, |s, _| s != 503);
    let events = open_stream(format!(
        "{}/v1/diffs/stream?id=anon:nobody&access_token={TOKEN}",
        run.base
    ));
    let (kind, _) = events
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream's first event");
    assert_eq!(kind, "profile");
    let got = until_closed(&events, 60);
    let (kind, end) = got.last().expect("an event before the stream closed");
    assert_eq!(kind, "end", "{got:?}");
    assert_eq!(end["failed"], true, "{end}");
    let reason = end["reason"].as_str().unwrap();
    assert!(
        reason.contains("the run failed")
            && reason.contains("audience export")
            && reason.contains("is a file, not a directory"),
        "{reason}"
    );
    let status = run.child().wait().unwrap();
    assert!(!status.success(), "exit 0 after a failed export");

    // Stopped: SIGTERM while a stream is open.
    let (_dir, run, _) = start_live(LIVE, &[]);
    // An `?id=` stream says at once that it is open (`event: profile`),
    // once the state can be read.
    poll(&run.base, "/v1/profiles/anon:nobody", 30, |s, _| s != 503);
    let events = open_stream(format!(
        "{}/v1/diffs/stream?id=anon:nobody&access_token={TOKEN}",
        run.base
    ));
    let (kind, _) = events
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream's first event");
    assert_eq!(kind, "profile");
    assert!(run.stop().success());
    let got = until_closed(&events, 30);
    let (kind, end) = got.last().expect("an event before the stream closed");
    assert_eq!(kind, "end", "{got:?}");
    assert_eq!(end["failed"], false, "{end}");
    assert!(
        end["reason"].as_str().unwrap().contains("SIGTERM"),
        "{end}"
    );
}

fn wall_ms() -> u64 {
    segflow::time::wall_clock_ms()
}

/// Polls `path` until `ok` holds for the answer; the answer and how long
/// it took.
fn poll(base: &str, path: &str, secs: u64, ok: impl Fn(u16, &Value) -> bool) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (status, body) = get(base, path);
        if ok(status, &body) {
            return (body, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "{path}: still {status} {body} after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A cluster whose process 1 keeps its part of the state where process 0
/// cannot read it (another state directory, as on another machine): the
/// run and its segment answers go on; what needs a profile (lookups,
/// decisions, exports with identifiers, a stream following an identifier)
/// answers 503 with the reason, never a wrong 404 or a silent stream.
#[test]
fn a_cluster_part_process_0_cannot_read_is_a_503_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let (mut run, peer) = start_cluster(
        dir.path(),
        &["ecommerce.toml", "--reset"],
        &["--state-dir", "elsewhere"],
        Stdio::piped(),
    );
    run.wait_line("serving its final state", 120);
    let out = peer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = run.base.clone();
    let diffs = std::fs::read_to_string(dir.path().join("out/segments.jsonl")).unwrap();
    let model = memberships(&diffs);
    let (segment, members) = model.iter().find(|(_, m)| !m.is_empty()).unwrap();
    let member = members.iter().next().unwrap();
    // Segments come from the diffs, which every process sends to 0.
    let (status, body) = get(&base, "/v1/segments");
    assert_eq!(status, 200, "{body}");
    for path in [
        format!("/v1/profiles/{}", urlencode(member)),
        "/v1/profiles/anon:never-seen".to_string(),
        format!("/v1/decide/hero?id={}", urlencode(member)),
        format!("/v1/segments/{segment}/export"),
        format!("/v1/segments/{segment}/export?since=0&format=jsonl"),
        format!("/v1/diffs/stream?id={}", urlencode(member)),
    ] {
        let (status, _, body) = get_as(&base, &path, Some(TOKEN));
        assert_eq!(status, 503, "{path}: {body}");
        let reason = body["error"].as_str().unwrap_or_default();
        assert!(
            reason.contains("state-process1") && reason.contains("not on this machine"),
            "{path}: {reason}"
        );
    }
    run.wait_line("the API cannot read every profile", 5);
    assert!(run.stop().success());
}

/// A live cluster of two processes on this machine reads a followed file
/// that a client appends to with wall-clock timestamps, pausing between
/// rounds: process 0's API finds every visitor's profile as soon as its
/// time is complete, those process 1 owns (in its part of the state) as
/// well as its own, and the decision follows.
#[test]
fn a_live_cluster_serves_every_process_s_profiles_from_process_0() {
    let dir = tempfile::tempdir().unwrap();
    let spec = LIVE.replace(
        "[sources.web]\nkind = \"web\"\n",
        "[sources.web]\nkind = \"web\"\npath = \"web.jsonl\"\nfollow = true\n",
    );
    assert!(spec.contains("follow = true"));
    std::fs::write(dir.path().join("live.toml"), spec).unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, "").unwrap();
    let (run, mut peer) = start_cluster(dir.path(), &["live.toml", "--reset"], &[], Stdio::null());
    let base = run.base.clone();
    let visitors: Vec<String> = (0..12).map(|v| format!("cv{v}")).collect();
    let append = |round: usize| {
        let ts = wall_ms();
        let mut f = std::fs::OpenOptions::new().append(true).open(&web).unwrap();
        for v in &visitors {
            writeln!(
                f,
                r#"{{"event":"view_item","ts":{ts},"anonymous_id":"{v}","n":{round}}}"#
            )
            .unwrap();
        }
    };
    for round in 1..=2u64 {
        append(round as usize);
        for v in &visitors {
            let (view, _) = poll(&base, &format!("/v1/profiles/anon:{v}"), 30, |s, b| {
                s == 200 && b["traits"]["views"] == round
            });
            assert_eq!(view["profile"], format!("anon:{v}"));
            let (d, _) = poll(
                &base,
                &format!("/v1/decide/banner?id=anon:{v}"),
                5,
                |s, _| s == 200,
            );
            let want = if round == 2 { "fan" } else { "default" };
            assert_eq!(d["variant"], want, "{v} after {round} views: {d}");
        }
        // A pause longer than idle_advance between the rounds.
        std::thread::sleep(Duration::from_millis(600));
    }
    let status = run.stop();
    assert!(status.success(), "process 0: {status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while peer.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "process 1 did not stop with process 0"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Both parts hold some of the visitors' traits: the lookups above
    // read process 1's part as well as process 0's.
    let owned = |part: &str| -> usize {
        let store = segflow::store::Store::open_read_only(&dir.path().join(part)).unwrap();
        visitors
            .iter()
            .filter(|v| {
                store
                    .view(&format!("anon:{v}"))
                    .is_ok_and(|view| !view.traits.is_empty())
            })
            .count()
    };
    let (mine, theirs) = (owned("state"), owned("state-process1"));
    assert_eq!(mine + theirs, visitors.len(), "{mine} + {theirs}");
    assert!(mine > 0 && theirs > 0, "{mine} and {theirs}");
}

/// A client sends events stamped with the wall clock, pausing between
/// them: a lookup sees each one as soon as its time is complete, the
/// decision changes with the segment, and the diff stream (opened before,
/// filtered to the visitor) carries the entry.
#[test]
fn a_live_lookup_sees_a_just_sent_event_and_the_stream_carries_the_entry() {
    let (_dir, run, web) = start_live(LIVE, &["--output", "diffs.jsonl"]);
    let base = run.base.clone();
    // Before any event: unknown visitor, default content.
    // (503 while the run opens its state.)
    let (body, _) = poll(&base, "/v1/profiles/anon:v1", 30, |s, _| s != 503);
    assert_eq!(body["error"], "no profile has the identifier \"anon:v1\"");
    // The stream, filtered to the visitor's identifier, opened first
    // (with the token as a query parameter, as a browser's EventSource).
    let stream_url = format!("{base}/v1/diffs/stream?id=anon:v1&access_token={TOKEN}");
    let events = open_stream(stream_url);
    let next = |what: &str| -> (String, Value) {
        events.recv_timeout(Duration::from_secs(20)).expect(what)
    };
    // No profile has the identifier yet: the stream says so at once (and
    // is open from then on), rather than staying silent.
    let (kind, none) = next("the announcement of no profile");
    assert_eq!(kind, "profile", "{none}");
    assert_eq!(none["profile"], Value::Null, "{none}");
    assert_eq!(none["segments"], serde_json::json!([]), "{none}");
    let note = none["note"].as_str().unwrap();
    assert!(
        note.contains("no profile has the identifier \"anon:v1\" yet"),
        "{note}"
    );
    // A prefix that is not a kind: the note says how it was read.
    let other = agent()
        .get(&format!(
            "{base}/v1/diffs/stream?id=nokind:x&access_token={TOKEN}"
        ))
        .call()
        .unwrap();
    let data = BufReader::new(other.into_body().into_reader())
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("data:").map(str::to_string))
        .unwrap();
    let none: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!(none["profile"], Value::Null, "{none}");
    let note = none["note"].as_str().unwrap();
    assert!(
        note.contains("\"nokind\" is not an identifier kind") && note.contains("anon:nokind:x"),
        "{note}"
    );
    // Another visitor's diffs must not reach this stream.
    let mut client = loop {
        match std::net::TcpStream::connect(("127.0.0.1", web)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let send = |client: &mut std::net::TcpStream, anon: &str| -> u64 {
        let ts = wall_ms();
        writeln!(
            client,
            r#"{{"event":"view_item","ts":{ts},"anonymous_id":"{anon}"}}"#
        )
        .unwrap();
        client.flush().unwrap();
        ts
    };
    let first = send(&mut client, "v1");
    let (view, _) = poll(&base, "/v1/profiles/anon:v1", 20, |s, _| s == 200);
    assert_eq!(view["traits"]["views"], 1, "{view}");
    assert!(view["as_of"]["time"].as_u64().unwrap() >= first, "{view}");
    // The first view makes v1's profile and no diff: the stream announces
    // the profile anyway (in no segment yet), with no other event.
    let (kind, profile) = next("the profile event");
    assert_eq!(kind, "profile", "{profile}");
    assert_eq!(profile["profile"], "anon:v1");
    assert_eq!(profile["segments"], serde_json::json!([]));
    let (d, _) = poll(&base, "/v1/decide/banner?id=anon:v1", 5, |s, _| s == 200);
    assert_eq!(d["variant"], "default", "{d}");
    // A pause longer than idle_advance, then the second view and
    // another visitor's three.
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..3 {
        send(&mut client, "v2");
    }
    let second = send(&mut client, "v1");
    let (view, took) = poll(&base, "/v1/profiles/anon:v1", 20, |s, b| {
        s == 200 && b["traits"]["views"] == 2
    });
    assert!(
        view["segments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "viewer"),
        "{view}"
    );
    assert!(view["as_of"]["time"].as_u64().unwrap() >= second);
    eprintln!(
        "the second view was served {} ms after it was sent",
        took.as_millis()
    );
    let (d, _) = poll(&base, "/v1/decide/banner?id=anon:v1", 5, |s, _| s == 200);
    assert_eq!(d["variant"], "fan", "{d}");
    assert_eq!(d["content"], "for fans");
    // Then the stream carried v1's entry, and nothing of v2's.
    let (kind, entry) = next("the entry on the stream");
    assert_eq!(kind, "diff");
    assert_eq!(entry["profile"], "anon:v1");
    assert_eq!(entry["segment"], "viewer");
    assert_eq!(entry["diff"], 1);
    assert!(
        profile["time"].as_u64().unwrap() < entry["time"].as_u64().unwrap(),
        "the announcement is as of before the entry: {profile} {entry}"
    );
    assert!(
        events.recv_timeout(Duration::from_millis(500)).is_err(),
        "only v1's diffs"
    );
    // user:u2 already exists, in `viewer`; v1 logs in as u2: anon:v1
    // merges into user:u2. The stream carries the old profile's exit,
    // then announces the identifier's new profile with all of its
    // segments (those it had before the merge too).
    let ts = wall_ms();
    for _ in 0..2 {
        writeln!(
            client,
            r#"{{"event":"view_item","ts":{ts},"user_id":"u2"}}"#
        )
        .unwrap();
    }
    client.flush().unwrap();
    poll(&base, "/v1/profiles/user:u2", 10, |_, b| {
        b["segments"] == serde_json::json!(["viewer"])
    });
    let ts = wall_ms();
    writeln!(
        client,
        r#"{{"event":"login","ts":{ts},"anonymous_id":"v1","user_id":"u2"}}"#
    )
    .unwrap();
    client.flush().unwrap();
    let (kind, exit) = next("the old profile's exit");
    assert_eq!(
        (kind.as_str(), &exit["profile"], &exit["diff"]),
        (
            "diff",
            &serde_json::json!("anon:v1"),
            &serde_json::json!(-1)
        )
    );
    let (kind, moved) = next("the new profile");
    assert_eq!(kind, "profile", "{moved}");
    assert_eq!(moved["profile"], "user:u2");
    assert_eq!(moved["segments"], serde_json::json!(["viewer"]));
    let (view, _) = poll(&base, "/v1/profiles/anon:v1", 10, |_, b| {
        b["profile"] == "user:u2"
    });
    assert!(view["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i == "anon:v1"));
    assert_eq!(view["segments"], moved["segments"]);
    // Idle: the answer becomes complete (every event read is in it).
    let (segments, _) = poll(&base, "/v1/segments", 20, |_, b| {
        b["as_of"]["complete"] == true
    });
    assert_eq!(segments["segments"][0]["size"], 2, "{segments}");
    assert_eq!(segments["as_of"]["ended"], false);
    // The metrics say what happened, in the Prometheus text format.
    let (status, metrics) = get(&base, "/metrics");
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap().to_string();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value(r#"segflow_source_records_total{source="web"}"#), 8.0);
    assert_eq!(value(r#"segflow_source_lines_total{source="web"}"#), 8.0);
    assert_eq!(
        value(r#"segflow_source_dead_letters_total{source="web"}"#),
        0.0
    );
    assert_eq!(value(r#"segflow_segment_members{segment="viewer"}"#), 2.0);
    assert_eq!(
        value("segflow_diffs_total"),
        4.0,
        "v1 and v2 enter, u2 enters, v1 merges away"
    );
    assert_eq!(value("segflow_profiles"), 2.0);
    assert!(value("segflow_commit_lag_seconds") < 60.0, "{metrics}");
    assert!(
        value("segflow_commit_delay_seconds_count") >= 1.0,
        "{metrics}"
    );
    assert!(
        value(
            r#"segflow_api_request_duration_seconds_count{endpoint="/v1/profiles/{identifier}"}"#
        ) >= 3.0,
        "{metrics}"
    );
    drop(client);
    let status = run.stop();
    assert!(status.success(), "{status}");
    // The stream ends with the run.
}

/// Headless Chromium from Debian (`.ci/test` installs it): `SEGFLOW_CHROMIUM`
/// or `chromium` on the path.
fn chromium() -> String {
    let bin = std::env::var("SEGFLOW_CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let found = Command::new(&bin).arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "no headless browser: install Debian's chromium (`apt-get install chromium`; .ci/test does) or set SEGFLOW_CHROMIUM"
    );
    bin
}

/// Chromium, headless, on `url` with `args` (flags as the machine's
/// closed network needs them), its standard output.
fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            "--virtual-time-budget=3000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The colours of the dashboard's charts (its `COLORS`), and how many
/// of them cover at least 50 pixels of the screenshot at `path`.
fn chart_colours(path: &Path) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 1000), "screenshot size");
    let channels = info.color_type.samples();
    let palette: Vec<[u8; 3]> = [
        0x2563eb, 0xdc2626, 0x16a34a, 0xd97706, 0x7c3aed, 0x0891b2, 0xdb2777, 0x65a30d, 0xea580c,
        0x4f46e5, 0x0d9488, 0x9333ea, 0x1e3a8a, 0x7f1d1d, 0x14532d, 0x78350f, 0x4c1d95, 0x164e63,
        0x831843, 0x365314,
    ]
    .iter()
    .map(|c: &u32| [(c >> 16) as u8, (c >> 8) as u8, *c as u8])
    .collect();
    let mut counts = vec![0usize; palette.len()];
    for px in buf[..info.buffer_size()].chunks(channels) {
        if let Some(i) = palette.iter().position(|p| p[..] == px[..3]) {
            counts[i] += 1;
        }
    }
    counts.iter().filter(|&&n| n >= 50).count()
}

/// The dashboard in a real headless browser: with the token it shows
/// every segment's size as the API gives it, draws the charts (a
/// screenshot holds the charts' colours), and loads nothing from
/// elsewhere; with a wrong token it asks for one.
#[test]
fn the_dashboard_renders_the_run_in_a_headless_browser() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let mut run = Served::start(dir.path(), &["ecommerce.toml", "--reset"]);
    run.wait_line("serving its final state", 120);
    let base = run.base.clone();
    let (_, segments) = get(&base, "/v1/segments");
    let sizes: BTreeMap<String, u64> = segments["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(sizes.values().filter(|&&n| n > 0).count() >= 5);
    // The page itself needs no token, and loads nothing from elsewhere.
    let (status, _, page) = get_as(&base, "/", None);
    assert_eq!(status, 200);
    let page = page.as_str().unwrap();
    assert!(page.contains("<title>segflow</title>"));
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!page.contains(external), "the page loads {external}");
    }

    let url = format!("{base}/#token={TOKEN}&stream=off");
    let dom = browse(&url, &["--dump-dom"]);
    let shown: BTreeMap<String, u64> = dom
        .split("data-segment=\"")
        .skip(1)
        .map(|rest| {
            let name = rest.split('"').next().unwrap().to_string();
            let size = rest
                .split("data-size=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            (name, size.parse().unwrap())
        })
        .collect();
    assert_eq!(shown, sizes, "the dashboard's segment table");
    assert!(
        dom.contains("id=\"login\" hidden"),
        "the login form is hidden"
    );
    assert!(dom.contains("· complete · run ended"), "the status line");

    let shot = std::env::temp_dir().join(format!("segflow-dashboard-{}.png", std::process::id()));
    browse(&url, &[&format!("--screenshot={}", shot.display())]);
    let colours = chart_colours(&shot);
    assert!(
        colours >= 8,
        "{} shows {colours} chart colours; expected the segment lines",
        shot.display()
    );
    let _ = std::fs::remove_file(&shot);

    // A wrong token: the page asks for one, and draws no chart.
    let wrong = format!("{base}/#token=wrong-token&stream=off");
    let dom = browse(&wrong, &["--dump-dom"]);
    assert!(dom.contains("That token was refused."), "{dom}");
    assert!(dom.contains("id=\"board\" hidden"), "the board is hidden");
    browse(&wrong, &[&format!("--screenshot={}", shot.display())]);
    assert!(chart_colours(&shot) <= 1, "charts drawn without the token");
    let _ = std::fs::remove_file(&shot);
    assert!(run.stop().success());
}

/// `examples/shop`: a page rendered on each request from segflow's
/// decisions for the visitor's cookie; the block changes once the
/// visitor's events make them a `viewer`; `/events` passes the visitor's
/// diffs on; the page still renders when segflow is gone.
#[test]
fn the_shop_example_personalizes_its_page_from_the_running_engine() {
    // Built by `cargo test --all-targets` (as .ci/test runs it).
    let exe = std::env::current_exe().unwrap();
    let shop_bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/shop");
    assert!(
        shop_bin.exists(),
        "{} is missing: build it with `cargo build --example shop` (cargo test --all-targets does)",
        shop_bin.display()
    );
    let (_dir, run, web) = start_live(LIVE, &["--output", "diffs.jsonl"]);
    let base = run.base.clone();
    poll(&base, "/v1/profiles/anon:shopper", 30, |s, _| s != 503);
    let mut shop = Command::new(&shop_bin)
        .args([
            "--segflow",
            &base,
            "--listen",
            "127.0.0.1:0",
            "--slots",
            "banner",
        ])
        .env("SEGFLOW_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(shop.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let shop_url = first
        .trim()
        .strip_prefix("shop on ")
        .expect("the shop's address")
        .to_string();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _shop = Kill(shop);
    let page = |cookie: Option<&str>| -> (u16, Option<String>, String) {
        let mut req = agent().get(&shop_url);
        if let Some(c) = cookie {
            req = req.header("Cookie", c);
        }
        let mut r = req.call().unwrap();
        let cookie = r
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        (
            r.status().as_u16(),
            cookie,
            r.body_mut().read_to_string().unwrap(),
        )
    };
    // A new visitor gets a cookie and the default block.
    let (status, set, html) = page(None);
    assert_eq!(status, 200);
    assert!(set.unwrap().starts_with("visitor="));
    assert!(
        html.contains(r#"data-segflow-slot="banner" data-variant="default""#),
        "{html}"
    );
    assert!(html.contains("hello"));
    // The visitor's diff stream, through the shop (no token in the browser).
    let events_url = format!("{shop_url}/events");
    let (tx, events) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let resp = agent()
            .get(&events_url)
            .header("Cookie", "visitor=shopper")
            .call()
            .unwrap();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data:") {
                let _ = tx.send(data.trim().to_string());
            }
        }
    });
    // The stream opens saying that no profile has the visitor yet.
    let opened: Value =
        serde_json::from_str(&events.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap();
    assert_eq!(opened["profile"], Value::Null, "{opened}");
    let mut client = connect(web);
    for _ in 0..2 {
        let ts = wall_ms();
        writeln!(
            client,
            r#"{{"event":"view_item","ts":{ts},"anonymous_id":"shopper"}}"#
        )
        .unwrap();
    }
    client.flush().unwrap();
    let started = Instant::now();
    loop {
        let (_, _, html) = page(Some("visitor=shopper"));
        if html.contains(r#"data-variant="fan""#) {
            assert!(html.contains("for fans"), "{html}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the block never changed: {html}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The visitor's profile, announced when it first had one (no
    // segments before its first event), then its entry.
    let next = || -> Value {
        serde_json::from_str(&events.recv_timeout(Duration::from_secs(20)).unwrap()).unwrap()
    };
    let announced = next();
    assert_eq!(announced["profile"], "anon:shopper", "{announced}");
    assert_eq!(announced["segments"], serde_json::json!([]), "{announced}");
    let entry = next();
    assert_eq!(
        (entry["profile"].as_str(), entry["segment"].as_str()),
        (Some("anon:shopper"), Some("viewer"))
    );
    // The snippet is served; the blocks endpoint gives the decisions.
    let mut r = agent()
        .get(format!("{shop_url}/live-block.js"))
        .call()
        .unwrap();
    assert!(r
        .body_mut()
        .read_to_string()
        .unwrap()
        .contains("EventSource"));
    let mut r = agent()
        .get(format!("{shop_url}/blocks?slots=banner"))
        .header("Cookie", "visitor=shopper")
        .call()
        .unwrap();
    let blocks: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(blocks["decisions"]["banner"]["variant"], "fan");
    // segflow gone: the page still renders, with the fallback.
    drop(client);
    assert!(run.stop().success());
    let (status, _, html) = page(Some("visitor=shopper"));
    assert_eq!(status, 200);
    assert!(html.contains(r#"data-variant="fallback""#), "{html}");
    assert!(
        html.contains("Welcome to the shop"),
        "the fallback has content: {html}"
    );
    let r = agent()
        .get(format!("{shop_url}/events"))
        .header("Cookie", "visitor=shopper")
        .call()
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        503,
        "no stream from segflow: the page tries again later"
    );
}

/// Reads an export answer: status, the `X-Segflow-As-Of` header, body.
fn get_text(base: &str, path: &str) -> (u16, Option<u64>, String) {
    let mut r = agent()
        .get(format!("{base}{path}"))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    let as_of = r
        .headers()
        .get("x-segflow-as-of")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (
        r.status().as_u16(),
        as_of,
        r.body_mut().read_to_string().unwrap(),
    )
}

/// CSV export rows: `profile` -> the other columns.
fn csv_rows(text: &str) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| {
            let rec = rec.unwrap();
            (
                rec[0].to_string(),
                rec.iter().skip(1).map(String::from).collect(),
            )
        })
        .collect();
    (header, rows)
}

/// Audience exports of a finished replay: on request (members as CSV and
/// JSON lines with their identifiers, changes since a time) and to files
/// when the run ends, all equal to the model over the diffs.
#[test]
fn audience_exports_list_the_members_with_their_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let mut run = Served::start(
        dir.path(),
        &[
            "ecommerce.toml",
            "--reset",
            "--export",
            "exports",
            "--export-segments",
            "vip,frequent_visitor",
        ],
    );
    run.wait_line("serving its final state", 120);
    let base = run.base.clone();
    let model =
        memberships(&std::fs::read_to_string(dir.path().join("out/segments.jsonl")).unwrap());
    for segment in ["vip", "frequent_visitor"] {
        let want: Vec<String> = model[segment].iter().cloned().collect();
        let (status, as_of, text) = get_text(&base, &format!("/v1/segments/{segment}/export"));
        assert_eq!(status, 200, "{text}");
        let (header, rows) = csv_rows(&text);
        assert_eq!(header, ["profile", "crm", "user", "email", "phone", "anon"]);
        assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), want, "{segment}");
        // Each row's identifiers are the profile's.
        for (profile, columns) in rows.iter().take(5) {
            let (_, view) = get(&base, &format!("/v1/profiles/{}", urlencode(profile)));
            let mut ids: Vec<String> = ["crm", "user", "email", "phone", "anon"]
                .iter()
                .zip(columns)
                .flat_map(|(kind, values)| {
                    values
                        .split('|')
                        .filter(|v| !v.is_empty())
                        .map(move |v| format!("{kind}:{v}"))
                })
                .collect();
            ids.sort();
            let mut theirs: Vec<String> = view["identifiers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            theirs.sort();
            assert_eq!(ids, theirs, "{profile}");
        }
        let (_, _, jsonl) = get_text(
            &base,
            &format!("/v1/segments/{segment}/export?format=jsonl"),
        );
        let profiles: Vec<String> = jsonl
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["profile"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(profiles, want);
        // A fresh run keeps every change: since 0, every member entered;
        // since the export's time, nothing.
        let (status, _, changes) =
            get_text(&base, &format!("/v1/segments/{segment}/export?since=0"));
        assert_eq!(status, 200);
        let (header, rows) = csv_rows(&changes);
        assert_eq!(&header[..2], ["profile", "change"]);
        assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), want);
        assert!(rows.values().all(|c| c[0] == "entered"));
        let (_, _, none) = get_text(
            &base,
            &format!("/v1/segments/{segment}/export?since={}", as_of.unwrap()),
        );
        assert_eq!(csv_rows(&none).1.len(), 0, "{none}");
        // The files written when the run ended.
        let seg_dir = dir.path().join("exports").join(segment);
        let members = std::fs::read_dir(&seg_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("members-"))
            .expect("a members file");
        assert_eq!(members, format!("members-{}.csv", as_of.unwrap()));
        let (_, rows) = csv_rows(&std::fs::read_to_string(seg_dir.join(&members)).unwrap());
        assert_eq!(rows.keys().cloned().collect::<Vec<_>>(), want);
        let changes =
            std::fs::read_to_string(seg_dir.join(members.replace("members-", "changes-"))).unwrap();
        assert_eq!(csv_rows(&changes).1.len(), want.len());
    }
    assert!(
        !dir.path().join("exports/high_intent").exists(),
        "only the segments asked for"
    );
    for (path, want, text) in [
        (
            "/v1/segments/vip/export?format=xml",
            400,
            "expected csv or jsonl",
        ),
        (
            "/v1/segments/vip/export?since=yesterday",
            400,
            "`since` must be",
        ),
        ("/v1/segments/nope/export", 404, "no segment `nope`"),
    ] {
        let (status, body) = get(&base, path);
        assert_eq!(status, want, "{path}");
        assert!(
            body["error"].as_str().unwrap().contains(text),
            "{path}: {body}"
        );
    }
    assert!(run.stop().success());
}

/// Scheduled exports of a live run: a visitor enters, then leaves when
/// its window ends; each export's changes say so. A directory that cannot
/// be written stops the run, non-zero, with the reason.
#[test]
fn scheduled_exports_carry_the_entries_and_exits_since_the_one_before() {
    let spec = LIVE.replace(
        "[traits.views]\nstream = \"web\"",
        "[traits.views]\nwindow = \"2s\"\nstream = \"web\"",
    );
    let (dir, run, web) = start_live(
        &spec,
        &[
            "--output",
            "diffs.jsonl",
            "--export",
            "exports",
            "--export-every",
            "1s",
            "--export-format",
            "jsonl",
        ],
    );
    let base = run.base.clone();
    poll(&base, "/v1/profiles/anon:x", 30, |s, _| s != 503);
    let mut client = connect(web);
    for _ in 0..2 {
        let ts = wall_ms();
        writeln!(
            client,
            r#"{{"event":"view_item","ts":{ts},"anonymous_id":"leaver"}}"#
        )
        .unwrap();
    }
    client.flush().unwrap();
    let seg_dir = dir.path().join("exports/viewer");
    // Every changes file, in time order: "entered" then, once the window
    // has passed, "exited".
    let changes = |dir: &Path| -> Vec<(String, String)> {
        let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let t = name
                            .strip_prefix("changes-")?
                            .strip_suffix(".jsonl")?
                            .parse()
                            .ok()?;
                        Some((t, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .flat_map(|(_, p)| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        let v: Value = serde_json::from_str(l).unwrap();
                        (
                            v["profile"].as_str().unwrap().to_string(),
                            v["change"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let started = Instant::now();
    loop {
        let seen = changes(&seg_dir);
        if seen.len() >= 2 {
            assert_eq!(
                seen,
                [
                    ("anon:leaver".to_string(), "entered".to_string()),
                    ("anon:leaver".to_string(), "exited".to_string())
                ]
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "changes so far: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unchanged audiences write nothing more, though time moves on.
    // Counted once the export that wrote the exit is complete (its
    // changes file comes before its members file; temporary files are
    // not counted).
    let files = || -> (usize, usize) {
        let names: Vec<String> = std::fs::read_dir(&seg_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".jsonl"))
            .collect();
        let members = names.iter().filter(|n| n.starts_with("members-")).count();
        (members, names.len() - members)
    };
    let settled = Instant::now();
    let before = loop {
        let (members, changes) = files();
        if members == changes {
            break members + changes;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(10),
            "{members} members files for {changes} changes files"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        before <= 6,
        "{before} files for at most 3 different audiences"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let (members, changes) = files();
    assert_eq!(
        members + changes,
        before,
        "new files for an unchanged audience"
    );
    drop(client);
    assert!(run.stop().success());

    // A segment directory that is a file: the first export fails the run.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.toml"), &spec).unwrap();
    std::fs::create_dir_all(dir.path().join("exports")).unwrap();
    std::fs::write(dir.path().join("exports/viewer"), "in the way").unwrap();
    let web = common::free_port();
    let mut run = Served::start(
        dir.path(),
        &[
            "live.toml",
            "--input",
            &format!("web=tcp://127.0.0.1:{web}"),
            "--export",
            "exports",
            "--export-every",
            "1s",
        ],
    );
    let mut client = connect(web);
    writeln!(
        client,
        r#"{{"event":"view_item","ts":{},"anonymous_id":"a"}}"#,
        wall_ms()
    )
    .unwrap();
    let line = run.wait_line("audience export", 60);
    assert!(line.contains("exports/viewer"), "{line}");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = run.child().try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the run did not end"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "a failed export must fail the run");
}

/// A replay's final export that fails fails the run, with the reason and
/// no summary saying the run finished (a newcomer saw "finished in", then
/// the error).
#[test]
fn a_failed_final_export_fails_a_replay_without_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    std::fs::create_dir_all(dir.path().join("exports")).unwrap();
    std::fs::write(dir.path().join("exports/vip"), "in the way").unwrap();
    for json in [false, true] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segflow"));
        cmd.current_dir(dir.path())
            .args(["run", "ecommerce.toml", "--reset", "--export", "exports"])
            .args(["--export-every", "1h", "--export-segments", "vip"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd.spawn().unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the run did not end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            !out.status.success(),
            "exit 0 after a failed export: {stderr}"
        );
        assert!(
            stderr.contains("audience export") && stderr.contains("exports/vip"),
            "the reason names the export and its path: {stderr}"
        );
        assert!(
            stderr.contains("is a file, not a directory"),
            "the reason says what is in the way: {stderr}"
        );
        assert!(
            !stdout.contains("elapsed_secs")
                && !stderr.contains("finished in")
                && !stdout.contains("finished in"),
            "a summary of a run that failed: {stdout} {stderr}"
        );
    }
    // A directory where the members file goes is in the way too (it was
    // taken for the file of an export before, and skipped).
    let run = |exports: &str| {
        Command::new(env!("CARGO_BIN_EXE_segflow"))
            .current_dir(dir.path())
            .args(["run", "ecommerce.toml", "--reset", "--export", exports])
            .args(["--export-every", "1h"])
            .args(["--export-segments", "big_spender,vip"])
            .output()
            .unwrap()
    };
    assert!(run("good").status.success());
    let name = std::fs::read_dir(dir.path().join("good/vip"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("members-"))
        .expect("a members file");
    std::fs::create_dir_all(dir.path().join("blocked/vip").join(&name).join("x")).unwrap();
    let out = run("blocked");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit 0 with a directory in the way");
    assert!(
        stderr.contains(&name) && stderr.contains("in the way"),
        "{stderr}"
    );
    // All or nothing: the segment exported before the one that failed
    // keeps no file of that export (the error says which were removed).
    let left: Vec<String> = std::fs::read_dir(dir.path().join("blocked/big_spender"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?} left by a failed export");
    // Nor a temporary file where the write failed.
    let tmp: Vec<String> = std::fs::read_dir(dir.path().join("blocked/vip"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?} left by a failed export");
    assert!(
        stderr.contains("removed") && stderr.contains("big_spender"),
        "{stderr}"
    );
}

/// A connection to the TCP source on `port`, once it listens (within 30 s).
fn connect(port: u16) -> std::net::TcpStream {
    let started = Instant::now();
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "port {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The access log (`SEGFLOW_LOG=segflow::api=debug`) names each request's
/// route, status and time, and the visitor only by a pseudonym: the same
/// one for the same identifier, never the identifier itself.
#[test]
fn the_access_log_pseudonymizes_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let mut run = Served::start_with(
        dir.path(),
        &["ecommerce.toml", "--reset"],
        &[("SEGFLOW_LOG", "segflow::api=debug")],
    );
    run.wait_line("serving its final state", 120);
    let base = run.base.clone();
    let (_, members) = get(&base, "/v1/segments/vip/members?limit=1");
    let profile = members["members"][0].as_str().unwrap().to_string();
    get(&base, &format!("/v1/profiles/{}", urlencode(&profile)));
    get(
        &base,
        &format!("/v1/decide/home_hero?id={}", urlencode(&profile)),
    );
    let first = run.wait_line("endpoint=\"/v1/profiles/{identifier}\"", 20);
    let second = run.wait_line("endpoint=\"/v1/decide/{slot}\"", 20);
    let pseudonym = |line: &str| {
        line.split("visitor=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .trim_matches('"')
            .to_string()
    };
    assert!(pseudonym(&first).starts_with("id#"), "{first}");
    assert_eq!(
        pseudonym(&first),
        pseudonym(&second),
        "one visitor, one pseudonym"
    );
    assert!(first.contains("status=200"), "{first}");
    let value = profile.split_once(':').unwrap().1;
    for line in &run.seen {
        assert!(!line.contains(value), "an identifier in the log: {line}");
    }
    assert!(run.stop().success());
}

/// A replay on a terminal shows a progress bar (bytes, records/s, ETA)
/// and then the summary; piped, it shows none (its stderr is for logs).
#[test]
fn a_replay_on_a_terminal_shows_its_progress_then_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let bin = env!("CARGO_BIN_EXE_segflow");
    // `script` (util-linux) runs the command on a pseudo-terminal.
    let typed = Command::new("script")
        .current_dir(dir.path())
        .args([
            "-qec",
            &format!("{bin} run ecommerce.toml --reset"),
            "/dev/null",
        ])
        .output()
        .expect("script (util-linux) runs a command on a terminal");
    let text = String::from_utf8_lossy(&typed.stdout);
    assert!(typed.status.success(), "{text}");
    assert!(
        text.contains("records/s ETA"),
        "no progress bar on a terminal:\n{text}"
    );
    assert!(text.contains("/"), "{text}");
    assert!(
        text.contains("throughput"),
        "no summary after the bar:\n{text}"
    );
    let piped = Command::new(bin)
        .current_dir(dir.path())
        .args(["run", "ecommerce.toml", "--reset"])
        .output()
        .unwrap();
    assert!(piped.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&piped.stdout),
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(
        !all.contains("ETA"),
        "a progress bar without a terminal:\n{all}"
    );
    assert!(all.contains("throughput"));
}

/// A content slot edited in the definition file of a running engine: the
/// next decision uses it (no restart); a file that does not validate is
/// refused and the old slots stay.
#[test]
fn an_edited_content_slot_applies_to_the_running_api() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("live.toml");
    std::fs::write(&file, LIVE).unwrap();
    let web = common::free_port();
    let mut run = Served::start(
        dir.path(),
        &[
            "live.toml",
            "--input",
            &format!("web=tcp://127.0.0.1:{web}"),
            "--output",
            "diffs.jsonl",
        ],
    );
    let base = run.base.clone();
    let _client = connect(web);
    let (d, _) = poll(&base, "/v1/decide/banner?id=anon:someone", 30, |s, _| {
        s == 200
    });
    assert_eq!(d["content"], "hello");
    // A new default and a new slot.
    let edited = LIVE.replace(
        "[content.banner.default]\ncontent = \"hello\"",
        "[content.banner.default]\ncontent = \"welcome back\"",
    ) + "\n[content.footer]\n[content.footer.default]\ncontent = \"bye\"\n";
    assert_ne!(edited, LIVE);
    std::fs::write(&file, &edited).unwrap();
    let (d, _) = poll(&base, "/v1/decide/banner?id=anon:someone", 20, |_, b| {
        b["content"] == "welcome back"
    });
    assert_eq!(d["variant"], "default");
    let (status, footer) = get(&base, "/v1/decide/footer?id=anon:someone");
    assert_eq!((status, footer["content"].as_str()), (200, Some("bye")));
    run.wait_line("changed its content slots", 10);
    // A broken file: refused, the slots stay.
    std::fs::write(&file, edited.replace("when = 'viewer'", "when = 'viewerr'")).unwrap();
    run.wait_line("the new definition is refused", 20);
    let (_, d) = get(&base, "/v1/decide/banner?id=anon:someone");
    assert_eq!(d["content"], "welcome back");
    assert!(run.stop().success());
}

/// A client that sends half its headers and stops (slowloris) has its
/// connection closed after the header timeout; others are answered
/// meanwhile.
#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use std::io::Read;
    let (_dir, run, _) = start_live(LIVE, &[]);
    let addr = run.base.strip_prefix("http://").unwrap().to_string();
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(25)))
        .unwrap();
    let started = Instant::now();
    // Meanwhile the API answers.
    let (status, _, _) = get_as(&run.base, "/healthz", None);
    assert_eq!(status, 200);
    let mut buf = [0u8; 256];
    let n = slow
        .read(&mut buf)
        .expect("the connection is closed, not left open");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(20),
        "closed after {took:?}"
    );
    assert!(run.stop().success());
}

/// Clients that open many connections and never finish a request cannot
/// starve a live run of file descriptors (its state writes need them): the
/// API takes at most half of what the open-file limit leaves above a
/// reserve, and cuts idle ones off; the run goes on and answers afterwards.
#[test]
fn idle_connections_do_not_starve_the_engine_of_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.toml"), LIVE).unwrap();
    let web = common::free_port();
    let mut cmd = Command::new("bash");
    cmd.current_dir(dir.path()).args([
        "-c",
        &format!(
            "ulimit -n 700 && exec {} run live.toml --input web=tcp://127.0.0.1:{web} --http 127.0.0.1:0",
            env!("CARGO_BIN_EXE_segflow")
        ),
    ]);
    let mut run = Served::spawn(cmd);
    let addr = run.base.strip_prefix("http://").unwrap().to_string();
    let mut client = connect(web);
    let mut idle = Vec::new();
    for _ in 0..600 {
        match std::net::TcpStream::connect(&addr) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n");
                idle.push(s);
            }
            Err(_) => break,
        }
    }
    // Events keep the state writer busy meanwhile.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        writeln!(
            client,
            r#"{{"event":"view_item","ts":{},"anonymous_id":"busy"}}"#,
            wall_ms()
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            run.child().try_wait().unwrap().is_none(),
            "the run ended: {:?}",
            run.seen
        );
    }
    let (view, _) = poll(&run.base, "/v1/profiles/anon:busy", 20, |s, _| s == 200);
    assert!(view["traits"]["views"].as_u64().unwrap() > 100, "{view}");
    drop(idle);
    drop(client);
    assert!(run.stop().success());
}

/// A finished replay that goes on serving takes content edits too (its
/// results cannot change any more, so edits of anything else are refused
/// with the reason).
#[test]
fn content_edits_apply_after_a_replay_has_ended() {
    let dir = tempfile::tempdir().unwrap();
    replay_dir(dir.path());
    let mut run = Served::start(dir.path(), &["ecommerce.toml", "--reset"]);
    run.wait_line("serving its final state", 120);
    let base = run.base.clone();
    let (_, d) = get(&base, "/v1/decide/home_hero?id=anon:first-visit");
    assert_eq!(d["content"]["headline"], "Welcome to the shop");
    let file = dir.path().join("ecommerce.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        text.replace("Welcome to the shop", "Welcome, edited"),
    )
    .unwrap();
    poll(
        &base,
        "/v1/decide/home_hero?id=anon:first-visit",
        20,
        |_, b| b["content"]["headline"] == "Welcome, edited",
    );
    run.wait_line("changed its content slots or descriptions", 10);
    // A trait edit cannot apply to a finished run.
    std::fs::write(&file, text.replace("window = \"30m\"", "window = \"31m\"")).unwrap();
    let refused = run.wait_line("the edit is refused", 20);
    assert!(refused.contains("traits"), "{refused}");
    let (_, d) = get(&base, "/v1/decide/home_hero?id=anon:first-visit");
    assert_eq!(d["content"]["headline"], "Welcome, edited");
    assert!(run.stop().success());
}

/// Starts a two-process cluster on this machine, each process running
/// `segflow run ARGS`: process 1 with `peer_args` added (its stdout
/// discarded, its stderr to `peer_stderr`), and process 0, which serves
/// (see [`Served::start`]).
fn start_cluster(
    dir: &Path,
    args: &[&str],
    peer_args: &[&str],
    peer_stderr: Stdio,
) -> (Served, std::process::Child) {
    let hostfile = common::hostfile(dir);
    let peer = Command::new(env!("CARGO_BIN_EXE_segflow"))
        .current_dir(dir)
        .arg("run")
        .args(args)
        .args(common::cluster_args(1, &hostfile))
        .args(peer_args)
        .stdout(Stdio::null())
        .stderr(peer_stderr)
        .spawn()
        .unwrap();
    let mut own: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    own.extend(common::cluster_args(0, &hostfile));
    let own: Vec<&str> = own.iter().map(String::as_str).collect();
    (Served::start(dir, &own), peer)
}

/// A live run of `spec` (written as live.toml into a new directory) with
/// its web source on TCP and the arguments `extra`: the directory, the
/// run, the web source's port.
fn start_live(spec: &str, extra: &[&str]) -> (tempfile::TempDir, Served, u16) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.toml"), spec).unwrap();
    let web = common::free_port();
    let input = format!("web=tcp://127.0.0.1:{web}");
    let mut args = vec!["live.toml", "--input", &input];
    args.extend_from_slice(extra);
    let run = Served::start(dir.path(), &args);
    (dir, run, web)
}
