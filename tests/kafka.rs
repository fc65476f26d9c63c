//! Kafka in and out, against a real Kafka-API broker on loopback (tansu,
//! with memory storage; `.ci/test` installs it and sets `SEGFLOW_TANSU`,
//! each test starts its own on a free port).
//!
//! Output: every diff of the shipped dataflow is a record keyed by its
//! profile, each profile's diffs in time order in its partition, with one
//! worker and with two; a broker that is not there, or a topic that does
//! not exist, stops the run at start.
//!
//! Input: the generated data set produced to topics of several partitions
//! gives the diffs of its files, byte for byte, with one worker, two, and
//! two processes; a live run killed mid-topic and started again writes
//! every diff once; an idle partition does not hold the others back; a
//! broker that goes away stops the run with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segflow::spec::load_spec;
use segflow::{Engine, Input, Output};
use serde_json::Value;

mod common;
use common::broker::broker;
use common::{generated, Generated as Data};

fn data() -> Data {
    generated(3_000, 9, None)
}

fn engine(d: &Data, dir: &Path) -> Engine {
    let mut spec = load_spec(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    spec.output = Default::default();
    let mem = |v: &Vec<String>| Input::Memory(Arc::new(v.clone()));
    Engine::new(spec)
        .input("web", mem(&d.web))
        .unwrap()
        .input("crm", mem(&d.crm))
        .unwrap()
        .input("transactions", mem(&d.txn))
        .unwrap()
        .dead_letter(dir.join("dead.jsonl"))
}

/// Diff lines grouped by profile, each profile's in order.
fn per_profile(lines: impl Iterator<Item = String>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        let v: Value = serde_json::from_str(&l).unwrap();
        m.entry(v["profile"].as_str().unwrap().to_string())
            .or_default()
            .push(l);
    }
    m
}

#[test]
fn every_diff_is_a_record_keyed_by_its_profile_in_order() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let expected = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&expected);
    engine(&d, dir.path())
        .output(Output::Callback(Arc::new(move |x| {
            sink.lock().unwrap().push(x.to_line())
        })))
        .run(timely::Config::process(1))
        .unwrap();
    let expected = expected.lock().unwrap().clone();
    assert!(expected.len() > 50, "{}", expected.len());
    let b = broker();
    for workers in [1, 2] {
        let topic = format!("segments-w{workers}");
        b.create_topic(&topic, 3);
        engine(&d, dir.path())
            .output(Output::parse(&format!("kafka://{}/{topic}", b.addr)))
            .run(timely::Config::process(workers))
            .unwrap();
        let records = b.consume(&topic, 3, expected.len());
        assert_eq!(records.len(), expected.len(), "-w {workers}");
        for (_, key, value) in &records {
            let v: Value = serde_json::from_str(value).unwrap();
            assert_eq!(v["profile"], key.as_str(), "keyed by profile");
        }
        // A profile's records are in one partition, in the engine's order.
        let mut partition_of = BTreeMap::new();
        for (p, key, _) in &records {
            assert_eq!(*partition_of.entry(key.clone()).or_insert(*p), *p, "{key}");
        }
        assert!(
            partition_of
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1,
            "the profiles are spread over the partitions"
        );
        assert_eq!(
            per_profile(records.into_iter().map(|r| r.2)),
            per_profile(expected.iter().cloned()),
            "-w {workers}"
        );
    }
}

#[test]
fn a_broker_that_is_not_there_or_a_missing_topic_stops_the_run_at_start() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let started = Instant::now();
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{closed}/segments")))
        .run(timely::Config::process(1))
        .expect_err("no broker");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let b = broker();
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{}/no-such-topic", b.addr)))
        .run(timely::Config::process(1))
        .expect_err("no topic");
    assert!(err.to_string().contains("no-such-topic"), "{err}");
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{}", b.addr)))
        .run(timely::Config::process(1))
        .expect_err("no topic named");
    assert!(err.to_string().contains("names no topic"), "{err}");
}

/// The broker goes away in the middle of a run: the records it no longer
/// acknowledges stop the run with the reason, never an exit 0 with diffs
/// missing from the topic.
#[test]
fn a_broker_that_goes_away_mid_run_stops_the_run_with_the_reason() {
    let d = generated(40_000, 4, None);
    let dir = tempfile::tempdir().unwrap();
    let mut b = broker();
    b.create_topic("segments", 3);
    let output = Output::parse(&format!("kafka://{}/segments", b.addr));
    let run = std::thread::spawn({
        let engine = engine(&d, dir.path()).output(output);
        move || engine.run(timely::Config::process(1))
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !run.is_finished(),
        "the run ended before the broker was stopped"
    );
    let _ = b.child.kill();
    let _ = b.child.wait();
    let started = Instant::now();
    let result = run.join().unwrap();
    let err = result.expect_err("the run succeeded without its broker");
    let text = err.to_string();
    assert!(
        text.contains("kafka://")
            && (text.contains("not acknowledged") || text.contains("not delivered")),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The Kafka source

const BIN: &str = env!("CARGO_BIN_EXE_segflow");
const ECOMMERCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml");

/// The sources of the shipped dataflow, their files, and the partitions of
/// their topics.
const STREAMS: [(&str, &str, i32); 3] = [
    ("web", "web.jsonl", 3),
    ("crm", "crm.jsonl", 2),
    ("transactions", "transactions.jsonl", 1),
];

/// Writes `d` to files in `dir`, and produces it to topics `{prefix}-web`,
/// `{prefix}-crm`, `{prefix}-transactions`: line `i` of a file to
/// partition `i mod n`, in file order. Returns the end offsets.
fn files_and_topics(
    b: &common::broker::Broker,
    d: &Data,
    dir: &Path,
    prefix: &str,
) -> Vec<Vec<i64>> {
    files_and_topics_batched(b, d, dir, prefix, true)
}

/// As [`files_and_topics`]; `batched: false` produces one record per batch
/// (see [`common::broker::Broker::produce_one_per_batch`]: for a run killed
/// at any offset and resumed there).
fn files_and_topics_batched(
    b: &common::broker::Broker,
    d: &Data,
    dir: &Path,
    prefix: &str,
    batched: bool,
) -> Vec<Vec<i64>> {
    let mut ends = Vec::new();
    for ((name, file, partitions), lines) in STREAMS.iter().zip([&d.web, &d.crm, &d.txn]) {
        std::fs::write(
            dir.join(file),
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        let topic = format!("{prefix}-{name}");
        b.create_topic(&topic, *partitions as u32);
        let records: Vec<(i32, String)> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| ((i as i32) % partitions, l.clone()))
            .collect();
        if batched {
            b.produce(&topic, &records);
        } else {
            b.produce_one_per_batch(&topic, &records);
        }
        // The end offsets (offsets count from 0 in a new topic).
        ends.push(
            (0..*partitions)
                .map(|p| records.iter().filter(|r| r.0 == p).count() as i64)
                .collect(),
        );
    }
    ends
}

/// `--input` arguments for the files in `dir`, or for the topics
/// `{prefix}-*` at `addr` (with `query`).
fn inputs(dir: &Path, kafka: Option<(&str, &str, &str)>) -> Vec<String> {
    STREAMS
        .iter()
        .flat_map(|(name, file, _)| {
            let location = match kafka {
                Some((addr, prefix, query)) => format!("kafka://{addr}/{prefix}-{name}{query}"),
                None => dir.join(file).display().to_string(),
            };
            ["--input".to_string(), format!("{name}={location}")]
        })
        .collect()
}

/// Runs the shipped dataflow with `args` to its end; its diffs, its dead
/// letters' raw lines (sorted) and its standard output.
fn run_to_end(dir: &Path, name: &str, args: &[String]) -> (String, Vec<String>, String) {
    let (out, dead) = (
        dir.join(format!("{name}.jsonl")),
        dir.join(format!("{name}.dead.jsonl")),
    );
    // In `dir`: the definition's state directory (out/state) is relative.
    let ran = Command::new(BIN)
        .current_dir(dir)
        .arg("run")
        .arg(ECOMMERCE)
        .args(args)
        .arg("--output")
        .arg(&out)
        .arg("--dead-letter")
        .arg(&dead)
        .arg("--state-dir")
        .arg(dir.join(format!("{name}.state")))
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    (
        std::fs::read_to_string(&out).unwrap(),
        raw_dead(&dead),
        String::from_utf8_lossy(&ran.stdout).into_owned(),
    )
}

/// The raw lines of a dead-letter file, sorted (a topic's dead letters
/// name their partition and offset, a file's its path and line).
fn raw_dead(path: &Path) -> Vec<String> {
    let mut raw: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["raw"].as_str().unwrap().to_string()
        })
        .collect();
    raw.sort();
    raw
}

/// The generated data set in topics of 3, 2 and 1 partitions, read to the
/// end offsets they had at the start (`until=end`), gives the diffs of its
/// files, byte for byte, and the same dead letters: with one worker, two,
/// and two processes (each partition is read by one worker, with its own
/// clock, whatever the cluster's shape).
#[test]
fn a_bounded_topic_gives_the_diffs_of_its_files() {
    // Enough events for a few malformed lines (dead letters).
    let d = generated(12_000, 9, None);
    let dir = tempfile::tempdir().unwrap();
    let b = broker();
    files_and_topics(&b, &d, dir.path(), "t");
    let (want, want_dead, _) = run_to_end(dir.path(), "files", &inputs(dir.path(), None));
    assert!(want.lines().count() > 50, "{want}");
    assert!(!want_dead.is_empty(), "the generated data has bad lines");
    let kafka = inputs(dir.path(), Some((&b.addr, "t", "?until=end")));
    for workers in ["1", "2"] {
        let mut args = kafka.clone();
        args.extend(["-w".to_string(), workers.to_string()]);
        let (got, dead, summary) = run_to_end(dir.path(), &format!("kafka-w{workers}"), &args);
        assert!(
            got == want,
            "-w {workers}: the diffs differ from the files'"
        );
        assert_eq!(dead, want_dead, "-w {workers}: dead letters");
        assert!(summary.contains("records read"), "{summary}");
    }
    // Two processes, each reading its workers' partitions.
    let hostfile = common::hostfile(dir.path());
    let children: Vec<_> = (0..2)
        .map(|p| {
            let out = dir.path().join(format!("cluster{p}.jsonl"));
            let mut cmd = Command::new(BIN);
            cmd.current_dir(dir.path())
                .arg("run")
                .arg(ECOMMERCE)
                .args(&kafka)
                .args(common::cluster_args(p, &hostfile));
            cmd.arg("--state-dir")
                .arg(dir.path().join(format!("cluster{p}.state")));
            if p == 0 {
                cmd.arg("--output")
                    .arg(&out)
                    .arg("--dead-letter")
                    .arg(dir.path().join("cluster.dead.jsonl"));
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let got = std::fs::read_to_string(dir.path().join("cluster0.jsonl")).unwrap();
    assert!(
        got == want,
        "two processes: the diffs differ from the files'"
    );
    assert_eq!(
        raw_dead(&dir.path().join("cluster.dead.jsonl")),
        want_dead,
        "two processes: dead letters"
    );
}

/// A bounded topic run to its end with a state directory, then run again
/// after more records were produced to it: the second run ends with the
/// diffs of one run over the whole topic (as a grown file's does), not
/// with the new records dead-lettered as late.
#[test]
fn a_bounded_topic_that_grew_is_read_again_as_one_run_over_it() {
    let d = generated(12_000, 5, None);
    let dir = tempfile::tempdir().unwrap();
    let b = broker();
    files_and_topics(
        &b,
        &Data {
            web: Vec::new(),
            ..d.clone()
        },
        dir.path(),
        "g",
    );
    let (want, want_dead, _) = run_to_end(dir.path(), "whole", &{
        std::fs::write(
            dir.path().join("web.jsonl"),
            d.web.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        inputs(dir.path(), None)
    });
    let half = d.web.len() / 2;
    let web = |lines: &[String], from: usize| -> Vec<(i32, String)> {
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| (((i + from) % 3) as i32, l.clone()))
            .collect()
    };
    b.produce("g-web", &web(&d.web[..half], 0));
    let kafka = inputs(dir.path(), Some((&b.addr, "g", "?until=end")));
    // Both runs write grown.jsonl, with the state directory grown.state.
    run_to_end(dir.path(), "grown", &kafka);
    b.produce("g-web", &web(&d.web[half..], half));
    let (got, dead, _) = run_to_end(dir.path(), "grown", &kafka);
    assert!(
        got == want,
        "the diffs differ from one run over the whole data ({} and {} lines)",
        got.lines().count(),
        want.lines().count()
    );
    assert_eq!(dead, want_dead, "dead letters");
}

/// A child `segflow run`, killed if the test ends (or fails) while it runs.
/// Its stdout and stderr go to files in its directory, not to pipes: a run
/// that writes more than a pipe holds while nobody reads would block on
/// the write and look like a stalled engine.
struct Running {
    child: Option<Child>,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Running {
    /// `segflow run ARGS` in `dir` (a definition's relative paths are
    /// there).
    fn start(dir: &Path, args: &[String]) -> Running {
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stdout = dir.join(format!("run-{n}.stdout"));
        let stderr = dir.join(format!("run-{n}.stderr"));
        let child = Command::new(BIN)
            .current_dir(dir)
            .arg("run")
            .args(args)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Running {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops it with SIGTERM; its exit status and output (30 s at most).
    fn terminate(self) -> std::process::Output {
        let pid = self.child.as_ref().unwrap().id();
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        self.wait(30)
    }

    /// Waits up to `secs` for it to exit; its status and output.
    fn wait(mut self, secs: u64) -> std::process::Output {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the run did not end in {secs} s: {}", self.stderr_so_far());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        std::process::Output {
            status,
            stdout: std::fs::read(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read(&self.stderr).unwrap_or_default(),
        }
    }

    /// What it wrote to stderr so far (for a failure's message).
    fn stderr_so_far(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_some()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The checkpoint's resume offsets, per source and partition.
fn checkpointed(state: &Path) -> BTreeMap<String, BTreeMap<u64, u64>> {
    segflow::store::StateParts::open_read_only(state)
        .ok()
        .and_then(|p| p.checkpoint().ok().flatten())
        .and_then(|c| c.retained)
        .map(|r| {
            r.points
                .into_iter()
                .map(|(name, points)| {
                    (
                        name,
                        points.into_iter().map(|p| (p.start, p.offset)).collect(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A live run over topics that hold the generated data set is killed
/// (SIGKILL) in the middle of the web topic and started again: it resumes
/// each partition at its checkpoint's offset, and its diff file ends with
/// every diff of the files once (up to the data's last time; a live run
/// then goes on with the wall clock), and nothing twice, though the broker
/// froze for 3 s while it caught up.
#[test]
fn a_live_topic_killed_mid_way_and_restarted_writes_every_diff_once() {
    let d = generated(150_000, 11, None);
    let dir = tempfile::tempdir().unwrap();
    let b = broker();
    let ends = files_and_topics_batched(&b, &d, dir.path(), "live", false);
    let (want, _, _) = run_to_end(dir.path(), "files", &inputs(dir.path(), None));
    let last_time = want
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["time"]
                .as_u64()
                .unwrap()
        })
        .max()
        .unwrap();
    let state = dir.path().join("state");
    let out = dir.path().join("live.jsonl");
    // The shipped dataflow with a 10 ms idle advance: a partition taken
    // for idle while it still had records to read (its watermark then
    // follows the wall clock) would lose them as late at once, not only
    // when a fetch happens to take a second.
    let spec = dir.path().join("ecommerce.toml");
    let text = std::fs::read_to_string(ECOMMERCE).unwrap();
    assert!(text.contains("idle_advance = \"1s\""));
    std::fs::write(
        &spec,
        text.replace("idle_advance = \"1s\"", "idle_advance = \"10ms\""),
    )
    .unwrap();
    let mut args = vec![spec.display().to_string()];
    args.extend(inputs(
        dir.path(),
        Some((&b.addr, "live", "?group=segflow-test")),
    ));
    args.extend(
        [
            "--output",
            out.to_str().unwrap(),
            "--dead-letter",
            dir.path().join("live.dead.jsonl").to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let web_total: u64 = ends[0].iter().sum::<i64>() as u64;
    let first = Running::start(dir.path(), &args);
    // A checkpoint in the middle of the web topic.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = checkpointed(&state);
        let read: u64 = now.get("web").map_or(0, |p| p.values().sum());
        if read > 0 {
            assert!(
                read < web_total,
                "the whole topic was read before the kill: use more data"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint with web offsets in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill();
    let killed_at = checkpointed(&state);
    let mut second = Running::start(dir.path(), &args);
    // The broker freezes for 3 s while the restarted run catches up: the
    // run waits for it (a partition behind its end does not go idle, its
    // watermark would pass the records still to come) and loses nothing.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpointed(&state) == killed_at && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let broker = b.child.id() as i32;
    unsafe { libc::kill(broker, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(3));
    unsafe { libc::kill(broker, libc::SIGCONT) };
    // Every partition of every topic read and checkpointed.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = checkpointed(&state);
        let done = STREAMS.iter().zip(&ends).all(|((name, _, _), end)| {
            now.get(*name).is_some_and(|points| {
                end.iter()
                    .enumerate()
                    .all(|(p, e)| points.get(&(p as u64)) == Some(&(*e as u64)))
            })
        });
        if done {
            break;
        }
        assert!(
            !second.exited(),
            "the restarted run ended: {}",
            second.stderr_so_far()
        );
        assert!(
            Instant::now() < deadline,
            "not every offset checkpointed in 180 s: {now:?} of {ends:?}; the run's stderr:\n{}",
            second.stderr_so_far()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The group's offsets follow the checkpoint within a second or so.
    std::thread::sleep(Duration::from_secs(3));
    let ended = second.terminate();
    let stdout = String::from_utf8_lossy(&ended.stdout);
    assert!(
        ended.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ended.stderr)
    );
    assert!(stdout.contains("restored"), "{stdout}");
    let got = std::fs::read_to_string(&out).unwrap();
    let mut seen = std::collections::HashSet::new();
    for line in got.lines() {
        assert!(seen.insert(line), "written twice: {line}");
    }
    let upto: String = got
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l).unwrap()["time"]
                .as_u64()
                .unwrap()
                <= last_time
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if upto != want {
        // What a rare failure under load needs to be understood: the
        // dead letters by reason (late records?), and the first diff the
        // files have that the live run does not.
        let dead = std::fs::read_to_string(dir.path().join("live.dead.jsonl")).unwrap_or_default();
        let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
        for l in dead.lines() {
            let v: Value = serde_json::from_str(l).unwrap_or_default();
            let r = v["reason"]
                .as_str()
                .unwrap_or("?")
                .split(':')
                .next()
                .unwrap_or("?")
                .to_string();
            *reasons.entry(r).or_default() += 1;
        }
        let theirs: std::collections::HashSet<&str> = upto.lines().collect();
        let first_missing = want.lines().find(|l| !theirs.contains(l));
        panic!(
            "the diffs up to {last_time} differ from the files' ({} and {} lines); dead letters by reason: {reasons:?}; killed at {killed_at:?}; first missing: {first_missing:?}",
            upto.lines().count(),
            want.lines().count()
        );
    }
    // The group holds the checkpoint's offsets, for lag tools.
    assert_eq!(
        b.committed("segflow-test", "live-web", 3),
        ends[0],
        "offsets committed to the group"
    );
}

/// A live definition that counts views: a profile is `seen` at its first.
const LIVE_COUNTS: &str = r#"
[engine]
tick = "100ms"
# A record is stamped before a new producer connects and sends it, which
# takes seconds on a loaded test machine.
allowed_lateness = "5s"
idle_advance = "200ms"

[sources.web]
kind = "web"
path = "LOCATION"

[traits.views_total]
stream = "web"
filter = 'event == "view_item"'

[segments.seen]
when = "views_total >= 1"
"#;

fn view(anon: &str) -> String {
    format!(
        "{{\"event\":\"view_item\",\"ts\":{},\"anonymous_id\":\"{anon}\"}}",
        segflow::time::wall_clock_ms()
    )
}

/// Waits up to `secs` for `path` to hold a line that contains `what`.
fn wait_for_line(path: &Path, what: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(what)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn live_definition(dir: &Path, location: &str) -> PathBuf {
    let spec = dir.join("live.toml");
    std::fs::write(&spec, LIVE_COUNTS.replace("LOCATION", location)).unwrap();
    spec
}

/// Events stamped with the wall clock go to one partition of three; the
/// others stay empty. The empty partitions are idle (their watermarks
/// follow the wall clock), so they do not hold the diffs back: each
/// visitor's entry is written within seconds, at -w 1 and -w 2. A pause,
/// then a second partition: the same.
#[test]
fn an_idle_partition_does_not_hold_the_others_back() {
    let b = broker();
    for workers in ["1", "2"] {
        let dir = tempfile::tempdir().unwrap();
        let topic = format!("idle-w{workers}");
        b.create_topic(&topic, 3);
        let spec = live_definition(dir.path(), &format!("kafka://{}/{topic}", b.addr));
        let out = dir.path().join("out.jsonl");
        let dead = dir.path().join("dead.jsonl");
        let run = Running::start(
            dir.path(),
            &[
                spec.display().to_string(),
                "--output".into(),
                out.display().to_string(),
                "--dead-letter".into(),
                dead.display().to_string(),
                "-w".into(),
                workers.into(),
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        b.produce(&topic, &[(1, view("v1"))]);
        assert!(
            wait_for_line(&out, "anon:v1", 15),
            "-w {workers}: v1's entry not written in 15 s; dead letters: {}",
            std::fs::read_to_string(&dead).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(2));
        b.produce(&topic, &[(2, view("v2")), (1, view("v3"))]);
        assert!(
            wait_for_line(&out, "anon:v2", 15),
            "-w {workers}: v2's entry not written in 15 s; dead letters: {}",
            std::fs::read_to_string(&dead).unwrap_or_default()
        );
        assert!(
            wait_for_line(&out, "anon:v3", 15),
            "-w {workers}: v3's entry not written in 15 s; dead letters: {}",
            std::fs::read_to_string(&dead).unwrap_or_default()
        );
        let ended = run.terminate();
        assert!(
            ended.status.success(),
            "{}",
            String::from_utf8_lossy(&ended.stderr)
        );
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), 3, "one entry each: {text}");
    }
}

/// The broker goes away while a live topic is read: the run ends non-zero
/// with the reason within the broker timeout (30 s) and a little, never
/// hangs, never exits 0.
#[test]
fn a_broker_that_goes_away_stops_a_reading_run() {
    let mut b = broker();
    b.create_topic("gone", 2);
    let dir = tempfile::tempdir().unwrap();
    let spec = live_definition(dir.path(), &format!("kafka://{}/gone", b.addr));
    let run = Running::start(
        dir.path(),
        &[
            spec.display().to_string(),
            "--output".into(),
            dir.path().join("out.jsonl").display().to_string(),
        ],
    );
    b.produce("gone", &[(0, view("v1"))]);
    assert!(wait_for_line(&dir.path().join("out.jsonl"), "anon:v1", 15));
    let _ = b.child.kill();
    let _ = b.child.wait();
    let started = Instant::now();
    let ended = run.wait(120);
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(
        !ended.status.success(),
        "exit 0 without its broker: {stderr}"
    );
    assert!(stderr.contains("has not answered"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
}

/// What cannot be read is refused when the run starts, with the reason:
/// no broker, no topic, a location with an unknown parameter, a CSV
/// source on a topic.
#[test]
fn unreadable_topics_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let b = broker();
    let run = |location: &str, extra: &[&str]| {
        let spec = live_definition(dir.path(), location);
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .arg("run")
            .arg(&spec)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{location}: exit 0");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let closed = format!("127.0.0.1:{}", common::free_port());
    let started = Instant::now();
    let err = run(&format!("kafka://{closed}/web"), &[]);
    assert!(err.contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let err = run(&format!("kafka://{}/no-such-topic", b.addr), &[]);
    assert!(
        err.contains("no-such-topic") && err.contains("create it"),
        "{err}"
    );
    let err = run(&format!("kafka://{}/web?from=latest", b.addr), &[]);
    assert!(err.contains("unknown parameter `from=latest`"), "{err}");
    // `segflow check` says so too, with where.
    let out = Command::new(BIN)
        .arg("check")
        .arg(dir.path().join("live.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("unknown parameter `from=latest`")
            && err.contains("live.toml:"),
        "{err}"
    );
    // Reading and writing one topic, under the same address and under
    // another spelling of it.
    let spec = live_definition(dir.path(), &format!("kafka://{}/loop", b.addr));
    let port = b.addr.rsplit_once(':').unwrap().1;
    for output in [b.addr.clone(), format!("localhost:{port}")] {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .arg("run")
            .arg(&spec)
            .args(["--output", &format!("kafka://{output}/loop")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("read its own diffs back"),
            "{output}: {err}"
        );
    }
    // A CSV source (CRM) on a topic.
    let spec = live_definition(dir.path(), &format!("kafka://{}/web", b.addr));
    let text = std::fs::read_to_string(&spec).unwrap()
        + &format!(
            "\n[sources.crm]\nkind = \"crm\"\nformat = \"csv\"\npath = \"kafka://{}/crm\"\n",
            b.addr
        );
    std::fs::write(&spec, text).unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .arg("run")
        .arg(&spec)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a CSV row"),
        "{err}"
    );
    // `segflow check` says so too, with where.
    let out = Command::new(BIN).arg("check").arg(&spec).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a CSV row") && err.contains("live.toml:"),
        "{err}"
    );
}
