//! The cluster binary: the same inputs with `-w 1`, `-w 2` and two
//! processes on localhost give byte-identical segment-diff files; the state
//! is queryable from the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{cluster_args, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

fn segflow(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("segflow runs")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "segflow failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_args<'a>(data: &'a str, out: &'a str, dead: &'a str, state: &'a str) -> Vec<String> {
    let dataflow = concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml");
    vec![
        "run".into(),
        dataflow.into(),
        "--input".into(),
        format!("web={data}/web.jsonl"),
        "--input".into(),
        format!("crm={data}/crm.jsonl"),
        "--input".into(),
        format!("transactions={data}/transactions.jsonl"),
        "--output".into(),
        out.into(),
        "--dead-letter".into(),
        dead.into(),
        "--state-dir".into(),
        state.into(),
    ]
}

/// Generates `events` web events (and their CRM records and transactions)
/// into `dir/data`; returns the folder and `segflow generate`'s output.
fn generate(dir: &Path, events: u64, seed: u64) -> (PathBuf, Output) {
    let data = dir.join("data");
    let out = ok(segflow(&[
        "generate",
        "--out",
        data.to_str().unwrap(),
        "--events",
        &events.to_string(),
        "--seed",
        &seed.to_string(),
    ]));
    (data, out)
}

fn run(dir: &Path, data: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.jsonl"));
    let dead = dir.join(format!("{name}.dead.jsonl"));
    let state = dir.join(format!("{name}.state"));
    let mut args = run_args(
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        dead.to_str().unwrap(),
        state.to_str().unwrap(),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    ok(Command::new(BIN).args(&args).output().unwrap());
    out
}

/// Waits for every child, at most `secs` seconds in all (a hang fails the
/// test); returns each one's exit status and standard error.
fn wait_all(
    children: Vec<std::process::Child>,
    secs: u64,
) -> Vec<(std::process::ExitStatus, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    children
        .into_iter()
        .map(|mut child| {
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    child.kill().unwrap();
                    panic!("a process of the cluster hung");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            (status, err)
        })
        .collect()
}

/// Starts a two-process cluster on `hostfile`; `args(p)` gives process
/// `p`'s arguments before `-n 2 -p p -h hostfile`.
fn start_pair(
    dir: &Path,
    hostfile: &Path,
    args: impl Fn(usize) -> Vec<String>,
) -> Vec<std::process::Child> {
    (0..2)
        .map(|p| {
            let mut a = args(p);
            a.extend(cluster_args(p, hostfile));
            Command::new(BIN)
                .args(&a)
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Writes `dir/name`: the shipped definition with its first `from`
/// replaced by `to`.
fn shipped_with(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    ))
    .unwrap();
    let edited = text.replacen(from, to, 1);
    assert_ne!(
        edited, text,
        "the shipped definition has a `{from}` to change"
    );
    let path = dir.join(name);
    std::fs::write(&path, edited).unwrap();
    path
}

#[test]
fn worker_and_process_counts_give_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (data, gen) = generate(dir.path(), 6000, 3);
    let stats: serde_json::Value = serde_json::from_slice(&gen.stdout).unwrap();
    assert_eq!(stats["web_events"], 6000);

    let one = std::fs::read(run(dir.path(), &data, "w1", &["-w", "1"])).unwrap();
    let two = std::fs::read(run(dir.path(), &data, "w2", &["-w", "2"])).unwrap();
    assert!(
        one.len() > 1000,
        "the run produced few diffs: {} bytes",
        one.len()
    );
    assert!(one == two, "-w 1 and -w 2 differ");

    // Two processes on localhost.
    let hostfile = common::hostfile(dir.path());
    let out = dir.path().join("n2.jsonl");
    let mut children = Vec::new();
    for p in ["0", "1"] {
        let mut args = run_args(
            data.to_str().unwrap(),
            out.to_str().unwrap(),
            dir.path().join("n2.dead.jsonl").to_str().unwrap(),
            dir.path().join("n2.state").to_str().unwrap(),
        );
        args.extend(
            [
                "-w",
                "1",
                "-n",
                "2",
                "-p",
                p,
                "-h",
                hostfile.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        children.push(
            Command::new(BIN)
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    for child in children {
        ok(child.wait_with_output().unwrap());
    }
    let n2 = std::fs::read(&out).unwrap();
    assert!(one == n2, "-w 1 and -n 2 differ");

    // Dead letters too are identical (sorted within each completed time).
    let dead = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.dead.jsonl"))).unwrap()
    };
    assert!(
        dead("w1").lines().count() > 0,
        "the generated data has malformed lines"
    );
    assert_eq!(dead("w1"), dead("w2"));
    assert_eq!(dead("w1"), dead("n2"));

    // Every line is a diff in the contract's shape, in time order.
    let mut last = 0;
    for line in String::from_utf8(one).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let t = v["time"].as_u64().unwrap();
        assert!(t >= last);
        last = t;
        assert!(v["diff"] == 1 || v["diff"] == -1);
        assert!(v["segment"].is_string() && v["profile"].is_string());
    }
}

/// Queries while a run writes the state (it flushes and compacts, replacing
/// files under the reader) each answer, or say that the state has no
/// completed time or no such profile yet: never a RocksDB error or a claim
/// that the directory is not segflow state.
#[test]
fn queries_during_a_run_answer_or_say_why_not() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 300_000, 5);
    let state = dir.path().join("live.state");
    let args = run_args(
        data.to_str().unwrap(),
        dir.path().join("live.jsonl").to_str().unwrap(),
        dir.path().join("live.dead.jsonl").to_str().unwrap(),
        state.to_str().unwrap(),
    );
    let mut child = Command::new(BIN)
        .args(&args)
        .args(["-w", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    let (mut answered, mut asked) = (0, 0);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the run hung");
        let out = segflow(&[
            "query",
            "--state-dir",
            state.to_str().unwrap(),
            "crm:C000001",
        ]);
        asked += 1;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            answered += 1;
        } else {
            assert!(
                err.contains("no completed time yet")
                    || err.contains("no profile has identifier")
                    || err.contains("no segflow state in"),
                "query {asked} during the run failed: {err}"
            );
        }
    }
    let (status, err) = wait_all(vec![child], 10).pop().unwrap();
    assert!(status.success(), "{err}");
    assert!(asked > 3, "the run ended before it could be queried");
    assert!(answered > 0, "no query during the run found the profile");
    ok(segflow(&[
        "query",
        "--state-dir",
        state.to_str().unwrap(),
        "crm:C000001",
    ]));
}

#[test]
fn query_prints_a_profile_for_any_of_its_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("crm.jsonl"),
        "{\"crm_id\":\"C9\",\"email\":\" Zoe@Example.com\",\"phone\":\"(303) 555-0100\",\"updated_at\":\"2026-03-02T10:00:00+01:00\",\"attributes\":{\"tier\":\"gold\"}}\n",
    )
    .unwrap();
    std::fs::write(data.join("web.jsonl"), "{\"event\":\"login\",\"ts\":1772445600000,\"anonymous_id\":\"a-1\",\"email\":\"zoe@example.com\"}\n").unwrap();
    std::fs::write(data.join("transactions.jsonl"), "").unwrap();
    let out = run(dir.path(), &data, "q", &[]);
    let diffs = std::fs::read_to_string(out).unwrap();
    assert!(
        diffs.contains(r#""segment":"vip","profile":"crm:C9","diff":1"#),
        "{diffs}"
    );
    let state = dir.path().join("q.state");
    for id in [
        "anon:a-1",
        "email:zoe@EXAMPLE.com",
        "EMAIL:Zoe@example.com",
        "crm:C9",
        "zoe@example.com",
    ] {
        let out = ok(segflow(&[
            "query",
            "--state-dir",
            state.to_str().unwrap(),
            id,
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["profile"], "crm:C9", "{id}");
        assert_eq!(v["attributes"]["tier"], "gold");
        let segments = v["segments"].as_array().unwrap();
        assert!(segments.iter().any(|s| s == "vip"), "{segments:?}");
    }
    let missing = segflow(&[
        "query",
        "--state-dir",
        state.to_str().unwrap(),
        "email:nobody@example.com",
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no profile"));
    // Values that do not normalize, and kinds segflow does not know, say so.
    for (id, says) in [
        ("phone:abc", "is not a valid phone identifier"),
        ("email:", "has no value after `email:`"),
        ("nosuchkind:x", "`nosuchkind` is not a kind of identifier"),
    ] {
        let out = segflow(&["query", "--state-dir", state.to_str().unwrap(), id]);
        assert!(!out.status.success(), "{id}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{id}: {err}");
    }

    // A bare value that is the identifier of two profiles: the answer
    // says so.
    std::fs::write(
        data.join("web.jsonl"),
        "{\"event\":\"login\",\"ts\":1772445600000,\"anonymous_id\":\"same\"}\n{\"event\":\"login\",\"ts\":1772445600000,\"user_id\":\"same\"}\n",
    )
    .unwrap();
    run(dir.path(), &data, "two", &[]);
    let both = ok(segflow(&[
        "query",
        "--state-dir",
        dir.path().join("two.state").to_str().unwrap(),
        "same",
    ]));
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("matches 2 profiles"), "{err}");

    // State that a run has created but not yet written a time to.
    let fresh = dir.path().join("fresh.state");
    let lock = segflow::store::StateLock::take(&fresh).unwrap();
    let store = segflow::store::Store::create_fresh(&fresh, &lock).unwrap();
    drop(store);
    let early = segflow(&["query", "--state-dir", fresh.to_str().unwrap(), "crm:C9"]);
    assert!(!early.status.success());
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(err.contains("has no completed time yet"), "{err}");
    drop(lock);
}

#[test]
fn definition_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[sources.web]\n\n[segments.s]\nwhen = \"views >= 3\"\n",
    )
    .unwrap();
    let out = segflow(&["check", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:4:9"), "{err}");
    assert!(err.contains("unknown trait or segment `views`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");

    let shipped = ok(segflow(&[
        "check",
        concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml"),
    ]));
    assert!(String::from_utf8_lossy(&shipped.stdout).contains("ok"));
}

#[test]
fn usage_errors_and_help() {
    for cmd in [
        &["--help"][..],
        &["run", "--help"],
        &["generate", "--help"],
        &["query", "--help"],
        &["check", "--help"],
    ] {
        let out = ok(segflow(cmd));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{cmd:?}"
        );
    }
    let out = segflow(&[
        "run",
        concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml"),
        "--input",
        "clicks=x.jsonl",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown source `clicks`"));
    let out = segflow(&[
        "run",
        concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml"),
        "--input",
        "web=/nonexistent/web.jsonl",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/web.jsonl"));
    assert!(!segflow(&["frobnicate"]).status.success());
    // Zero workers or processes are usage errors, not a silent 1.
    for flag in ["-w", "-n"] {
        let out = segflow(&[
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml"),
            flag,
            "0",
        ]);
        assert_eq!(out.status.code(), Some(2), "{flag} 0");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid value '0'"), "{flag} 0: {err}");
    }
}

#[test]
fn stdout_output_keeps_the_summary_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 2000, 5);
    let mut args = run_args(
        data.to_str().unwrap(),
        "-",
        dir.path().join("d.jsonl").to_str().unwrap(),
        dir.path().join("s").to_str().unwrap(),
    );
    args.push("--json".into());
    let out = ok(Command::new(BIN).args(&args).output().unwrap());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.lines().count() > 0);
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["segment"].is_string(), "{line}");
    }
    let summary: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stderr)
            .unwrap()
            .trim()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(summary["sources"][0]["name"], "web");
    assert_eq!(summary["sources"][0]["lines"], 2000);
    assert_eq!(
        summary["diffs_written"].as_u64().unwrap() as usize,
        stdout.lines().count()
    );
}

/// `-n 2` with only process 0 started: the run fails after
/// `--connect-timeout`, naming the peer that did not answer, instead of
/// waiting forever.
#[test]
fn a_missing_cluster_peer_is_named_after_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts");
    let (p0, p1) = (free_port(), free_port());
    std::fs::write(&hostfile, format!("127.0.0.1:{p0}\n127.0.0.1:{p1}\n")).unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(
        &web,
        "{\"event\":\"view_item\",\"ts\":1772366400,\"anonymous_id\":\"a\"}\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let out = segflow(&[
        "run",
        concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml"),
        "--input",
        &format!("web={}", web.display()),
        "--input",
        &format!("crm={}", web.display()),
        "--input",
        &format!("transactions={}", web.display()),
        "-n",
        "2",
        "-p",
        "0",
        "-h",
        hostfile.to_str().unwrap(),
        "--connect-timeout",
        "2s",
        "--reset",
        "--output",
        dir.path().join("out.jsonl").to_str().unwrap(),
        "--dead-letter",
        dir.path().join("dead.jsonl").to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "process 0 could not connect to the cluster within 2 s: no answer from process 1 at 127.0.0.1:{p1}"
        )),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// Two processes; process 0 cannot write its output. Both end, non-zero,
/// each with a reason: process 0 its own, process 1 that it lost process 0.
/// Neither hangs, and neither exits 0.
#[test]
fn a_failure_in_one_process_ends_the_whole_cluster_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 6000, 5);
    let hostfile = common::hostfile(dir.path());
    let mut children = Vec::new();
    for p in ["0", "1"] {
        let mut args = run_args(
            data.to_str().unwrap(),
            if p == "0" {
                "/dev/full"
            } else {
                "unused.jsonl"
            },
            dir.path().join(format!("dead{p}.jsonl")).to_str().unwrap(),
            dir.path().join(format!("state{p}")).to_str().unwrap(),
        );
        args.extend(
            ["-n", "2", "-p", p, "-h", hostfile.to_str().unwrap()]
                .iter()
                .map(|s| s.to_string()),
        );
        children.push(
            Command::new(BIN)
                .args(&args)
                .current_dir(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let errors: Vec<String> = wait_all(children, 120)
        .into_iter()
        .map(|(status, err)| {
            assert!(!status.success(), "{err}");
            err
        })
        .collect();
    assert!(
        errors[0].contains("error: segment output /dev/full: No space left on device"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("error: lost the connection to another process of the cluster"),
        "{}",
        errors[1]
    );
    assert!(!errors[1].contains("panicked"), "{}", errors[1]);
}

/// Processes that disagree on what they run (worker count, dataflow
/// definition) refuse to start, each naming what differs; none waits and
/// none exits 0.
#[test]
fn processes_that_disagree_on_their_configuration_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 200, 3);
    let data = data.to_str().unwrap().to_string();
    let base = |p: usize| {
        run_args(
            &data,
            dir.path().join(format!("out{p}.jsonl")).to_str().unwrap(),
            dir.path().join(format!("dead{p}.jsonl")).to_str().unwrap(),
            dir.path().join(format!("state{p}")).to_str().unwrap(),
        )
    };
    // Different -w.
    let hosts = common::hostfile(dir.path());
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = base(p);
        a.extend(["-w".to_string(), (p + 1).to_string()]);
        a
    });
    let results = wait_all(children, 60);
    for (status, err) in &results {
        assert!(!status.success(), "{err}");
    }
    assert!(
        results[0].1.contains("process 1 at 127.0.0.1:")
            && results[0].1.contains("runs with -w 2 there, -w 1 here"),
        "{}",
        results[0].1
    );
    assert!(
        results[1].1.contains("runs with -w 1 there, -w 2 here"),
        "{}",
        results[1].1
    );
    // A different definition (one threshold changed).
    let changed = shipped_with(dir.path(), "changed.toml", ">= 3", ">= 4");
    let hosts = common::hostfile(dir.path());
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = base(p);
        if p == 1 {
            a[1] = changed.to_str().unwrap().to_string();
        }
        a
    });
    for (status, err) in wait_all(children, 60) {
        assert!(!status.success(), "{err}");
        assert!(err.contains("a different dataflow definition ("), "{err}");
        // It says what differs: the changed segment, as each side has it.
        assert!(
            err.contains("segment high_intent when=premium_views_30m >= 4")
                && err.contains("segment high_intent when=premium_views_30m >= 3"),
            "{err}"
        );
        assert!(err.contains("start every process with the same"), "{err}");
    }
    // State in one process only: every process writes its own part.
    let stateless = shipped_with(
        dir.path(),
        "stateless.toml",
        "state_dir = \"out/state\"",
        "",
    );
    let hosts = common::hostfile(dir.path());
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = base(p);
        if p == 1 {
            let at = a.iter().position(|x| x == "--state-dir").unwrap();
            a.drain(at..at + 2);
            a[1] = stateless.to_str().unwrap().to_string();
        }
        a
    });
    for (status, err) in wait_all(children, 60) {
        assert!(!status.success(), "{err}");
        assert!(
            err.contains("a state directory there, no state directory here")
                || err.contains("no state directory there, a state directory here"),
            "{err}"
        );
        assert!(err.contains("give all or none a --state-dir"), "{err}");
    }
}

/// A process that cannot open an input tells the others, which stop at once
/// with its reason instead of waiting for it.
#[test]
fn a_process_that_cannot_start_stops_its_peers_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 200, 3);
    let data = data.to_str().unwrap().to_string();
    let hosts = common::hostfile(dir.path());
    let started = std::time::Instant::now();
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = run_args(
            &data,
            dir.path().join(format!("out{p}.jsonl")).to_str().unwrap(),
            dir.path().join(format!("dead{p}.jsonl")).to_str().unwrap(),
            dir.path().join(format!("state{p}")).to_str().unwrap(),
        );
        if p == 1 {
            a[3] = "web=/nonexistent/web.jsonl".to_string();
        }
        a
    });
    let results = wait_all(children, 60);
    for (status, err) in &results {
        assert!(!status.success(), "{err}");
    }
    assert!(
        results[1]
            .1
            .contains("error: cannot open input /nonexistent/web.jsonl"),
        "{}",
        results[1].1
    );
    assert!(
        results[0]
            .1
            .contains("process 1 cannot start: cannot open input /nonexistent/web.jsonl"),
        "{}",
        results[0].1
    );
    // Well within the default 60 s connect time-out.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// SIGTERM to any one process of a cluster ends the whole cluster
/// gracefully: here process 1, whose workers read no live source, while
/// process 0 follows a file. Both exit 0, and the diffs are those of a
/// replay of the same lines, followed by what time alone changes (window
/// ends, deadlines) as a live run's watermark follows the wall clock (the
/// data is in the past).
#[test]
fn sigterm_to_any_process_ends_the_whole_cluster_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 2000, 11);
    let replay = run(dir.path(), &data, "replay", &["-w", "1"]);
    let follow = shipped_with(
        dir.path(),
        "follow.toml",
        "[sources.web]",
        "[sources.web]\nfollow = true",
    );
    let hosts = common::hostfile(dir.path());
    let data_s = data.to_str().unwrap().to_string();
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = run_args(
            &data_s,
            dir.path().join(format!("live{p}.jsonl")).to_str().unwrap(),
            dir.path()
                .join(format!("live{p}.dead.jsonl"))
                .to_str()
                .unwrap(),
            dir.path().join(format!("live{p}.state")).to_str().unwrap(),
        );
        a[1] = follow.to_str().unwrap().to_string();
        a.extend(["-w".to_string(), "2".to_string()]);
        a
    });
    // Let the cluster connect and process 0 read the file (its first diffs
    // are written), then signal process 1 only. A fixed sleep raced with a
    // slow start on a loaded machine: process 1 was stopped before it had
    // joined, and process 0 waited for it in vain.
    let first_diffs = dir.path().join("live0.jsonl");
    let started = std::time::Instant::now();
    while std::fs::metadata(&first_diffs).map_or(0, |m| m.len()) == 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the cluster wrote no diff within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    let status = Command::new("kill")
        .args(["-TERM", &children[1].id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let results = wait_all(children, 60);
    for (status, err) in &results {
        assert!(status.success(), "{err}");
    }
    // Process 0 says why it stopped.
    assert!(
        results[0]
            .1
            .contains("another process of the cluster was asked to stop"),
        "{}",
        results[0].1
    );
    let live = std::fs::read_to_string(dir.path().join("live0.jsonl")).unwrap();
    let replay = std::fs::read_to_string(replay).unwrap();
    assert!(!replay.is_empty());
    let rest = live
        .strip_prefix(&replay)
        .unwrap_or_else(|| panic!("live:\n{live}\nreplay:\n{replay}"));
    // What follows is what time alone changes (windows that end, carts
    // that become abandoned, orders that age), after the last event.
    let time = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line).unwrap()["time"]
            .as_u64()
            .unwrap()
    };
    let last = replay.lines().map(time).max().unwrap();
    let mut members: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for line in live.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (v["segment"].to_string(), v["profile"].to_string());
        *members.entry(key).or_default() += v["diff"].as_i64().unwrap();
    }
    for line in rest.lines() {
        assert!(
            time(line) > last,
            "{line} is not after the last event at {last}"
        );
    }
    assert!(members.values().all(|m| *m == 0 || *m == 1), "{members:?}");
}

/// Files read in many ranges by all workers (a small `file_range_bytes`):
/// the segment diffs and the dead letters are byte-identical for one
/// worker, three workers and two processes of two workers.
#[test]
fn files_read_in_ranges_give_identical_outputs_for_any_cluster_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 6000, 21);
    let web_bytes = std::fs::metadata(data.join("web.jsonl")).unwrap().len();
    assert!(web_bytes > 20 * 50_000, "{web_bytes}");
    let ranged = shipped_with(
        dir.path(),
        "ranged.toml",
        "[engine]",
        "[engine]\nfile_range_bytes = 50000",
    );
    let data_s = data.to_str().unwrap().to_string();
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let args = |name: &str| {
        let mut a = run_args(
            &data_s,
            dir.path().join(format!("{name}.jsonl")).to_str().unwrap(),
            dir.path()
                .join(format!("{name}.dead.jsonl"))
                .to_str()
                .unwrap(),
            dir.path().join(format!("{name}.state")).to_str().unwrap(),
        );
        a[1] = ranged.to_str().unwrap().to_string();
        a
    };
    for (name, workers) in [("r1", "1"), ("r3", "3")] {
        let mut a = args(name);
        a.extend(["-w".to_string(), workers.to_string()]);
        ok(Command::new(BIN).args(&a).output().unwrap());
    }
    let hosts = common::hostfile(dir.path());
    // Both processes are given the same state directory: process 0 writes
    // its part there, process 1 beside it (`n2p0.state-process1`).
    let children = start_pair(dir.path(), &hosts, |p| {
        let mut a = args(&format!("n2p{p}"));
        let at = a.iter().position(|x| x == "--state-dir").unwrap();
        a[at + 1] = dir.path().join("n2p0.state").to_str().unwrap().to_string();
        a.extend(["-w".to_string(), "2".to_string()]);
        a
    });
    for (status, err) in wait_all(children, 120) {
        assert!(status.success(), "{err}");
    }
    // The state of the cluster answers as that of one worker.
    let first = String::from_utf8(read("r1.jsonl")).unwrap();
    let profile = first
        .lines()
        .last()
        .and_then(|l| l.split("\"profile\":\"").nth(1))
        .and_then(|p| p.split('"').next())
        .unwrap()
        .to_string();
    let query = |state: &str| {
        let out = ok(segflow(&[
            "query",
            "--state-dir",
            dir.path().join(state).to_str().unwrap(),
            &profile,
        ]));
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // The checkpoint's offsets are where each reader stopped.
        v.as_object_mut().unwrap().remove("as_of");
        v
    };
    assert_eq!(query("r1.state"), query("n2p0.state"));
    // Every worker wrote the state it owns; merged over the processes'
    // parts, every fact is the same for every shape.
    let entries = |state: &str| {
        segflow::store::StateParts::open_read_only(&dir.path().join(state))
            .unwrap()
            .entries()
            .unwrap()
    };
    let one = entries("r1.state");
    assert!(one.len() > 500, "little state: {} facts", one.len());
    assert!(one == entries("r3.state"), "state of -w 1 and -w 3 differs");
    assert!(
        dir.path().join("n2p0.state-process1").is_dir(),
        "process 1 wrote no part"
    );
    let cluster =
        segflow::store::StateParts::open_read_only(&dir.path().join("n2p0.state")).unwrap();
    assert!(cluster.missing.is_empty(), "{:?}", cluster.missing);
    assert!(
        one == cluster.entries().unwrap(),
        "state of -w 1 and -n 2 -w 2 differs"
    );
    drop(cluster);
    // A part left by another run is never merged in: each part records
    // the run (process 0's identity).
    let part = dir.path().join("n2p0.state-process1");
    std::fs::remove_dir_all(&part).unwrap();
    let copied = Command::new("cp")
        .arg("-r")
        .arg(dir.path().join("r3.state"))
        .arg(&part)
        .status()
        .unwrap();
    assert!(copied.success());
    let mixed = segflow::store::StateParts::open_read_only(&dir.path().join("n2p0.state")).unwrap();
    assert_eq!(mixed.missing, vec![part]);
    let out = segflow(&[
        "query",
        "--state-dir",
        dir.path().join("n2p0.state").to_str().unwrap(),
        &profile,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("or was written by another run"), "{err}");
    let diffs = read("r1.jsonl");
    assert!(diffs.len() > 1000, "few diffs: {} bytes", diffs.len());
    let dead = read("r1.dead.jsonl");
    assert!(!dead.is_empty(), "the generated data has bad lines");
    assert!(diffs == read("r3.jsonl"), "-w 1 and -w 3 differ");
    assert!(diffs == read("n2p0.jsonl"), "-w 1 and -n 2 -w 2 differ");
    assert!(
        dead == read("r3.dead.jsonl"),
        "dead letters of -w 1 and -w 3 differ"
    );
    assert!(
        dead == read("n2p0.dead.jsonl"),
        "dead letters of -w 1 and -n 2 differ"
    );
}

/// SIGTERM to a process still waiting for its peers ends it at once, with
/// the reason, instead of after the connect time-out.
#[test]
fn sigterm_while_waiting_for_the_cluster_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 100, 2);
    let hosts = common::hostfile(dir.path());
    let mut a = run_args(
        data.to_str().unwrap(),
        dir.path().join("o.jsonl").to_str().unwrap(),
        dir.path().join("d.jsonl").to_str().unwrap(),
        dir.path().join("s").to_str().unwrap(),
    );
    a.extend(cluster_args(0, &hosts));
    a.extend(["--connect-timeout".to_string(), "60s".to_string()]);
    let child = Command::new(BIN)
        .args(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let started = std::time::Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let (status, err) = wait_all(vec![child], 30).pop().unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("was stopped (SIGTERM or Ctrl-C) while it waited for the cluster"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// Dead letters of a file read in many ranges (4 KiB, the least: about 16
/// lines each; a bad line every 97 lines): the dead-letter file is
/// byte-identical for one, two and three workers, whatever range each
/// worker reads.
#[test]
fn dead_letters_of_ranges_are_the_same_for_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 3000, 13);
    let web = data.join("web.jsonl");
    let text = std::fs::read_to_string(&web).unwrap();
    let mut spoiled = String::new();
    for (i, line) in text.lines().enumerate() {
        if i % 97 == 50 {
            spoiled += &format!("{{\"event\":\"view_item\",\"ts\":\"not a time {i}\"}}\n");
        }
        spoiled += line;
        spoiled += "\n";
    }
    std::fs::write(&web, spoiled).unwrap();
    let ranged = shipped_with(
        dir.path(),
        "ranged.toml",
        "[engine]",
        "[engine]\nfile_range_bytes = 4096",
    );
    let mut files = Vec::new();
    for workers in ["1", "2", "3"] {
        let name = format!("w{workers}");
        let mut a = run_args(
            data.to_str().unwrap(),
            dir.path().join(format!("{name}.jsonl")).to_str().unwrap(),
            dir.path()
                .join(format!("{name}.dead.jsonl"))
                .to_str()
                .unwrap(),
            dir.path().join(format!("{name}.state")).to_str().unwrap(),
        );
        a[1] = ranged.to_str().unwrap().to_string();
        a.extend(["-w".to_string(), workers.to_string()]);
        ok(Command::new(BIN).args(&a).output().unwrap());
        files.push((
            std::fs::read(dir.path().join(format!("{name}.jsonl"))).unwrap(),
            std::fs::read(dir.path().join(format!("{name}.dead.jsonl"))).unwrap(),
        ));
    }
    assert!(files[0].1.iter().filter(|b| **b == b'\n').count() >= 30);
    for (i, (diffs, dead)) in files.iter().enumerate().skip(1) {
        assert!(*diffs == files[0].0, "diffs of run {i} differ");
        assert!(*dead == files[0].1, "dead letters of run {i} differ");
    }
}

/// SIGTERM on a replay cuts the inputs where they are, and only the times
/// that every cut input had completed are written: the diffs are a prefix of
/// an uninterrupted run's, for one and two workers. (Before, the small CRM
/// and transaction files, read to their end, carried the commits past the
/// web file's cut, and windows closed on views that were merely not read:
/// exits no full run writes.)
#[test]
fn sigterm_on_a_replay_writes_a_prefix_of_the_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 200_000, 17);
    let data_s = data.to_str().unwrap();
    for workers in ["1", "2"] {
        let started = std::time::Instant::now();
        let full_run = run(
            dir.path(),
            &data,
            &format!("full{workers}"),
            &["-w", workers],
        );
        let took = started.elapsed();
        let full = std::fs::read(full_run).unwrap();
        let out = dir.path().join(format!("cut{workers}.jsonl"));
        let mut args = run_args(
            data_s,
            out.to_str().unwrap(),
            dir.path()
                .join(format!("cut{workers}.dead.jsonl"))
                .to_str()
                .unwrap(),
            dir.path()
                .join(format!("cut{workers}.state"))
                .to_str()
                .unwrap(),
        );
        args.extend(["-w".to_string(), workers.to_string()]);
        let child = Command::new(BIN)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Signal once the first diffs are out, and no later than a
        // twentieth of the way through (as long as the full run took): the
        // sources read ahead of the stages (reading the whole input takes
        // about a tenth of the run), and a signal after the last line is
        // read finishes the run.
        let deadline = std::time::Instant::now() + took / 20;
        while std::fs::metadata(&out).map_or(true, |m| m.len() == 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let (status, err) = wait_all(vec![child], 120).pop().unwrap();
        assert!(status.success(), "{err}");
        let cut = std::fs::read(&out).unwrap();
        assert!(
            cut.len() < full.len(),
            "-w {workers}: the run ended before the signal"
        );
        assert!(
            full.starts_with(&cut),
            "-w {workers}: the interrupted run wrote diffs the full run does not:\n{}",
            String::from_utf8_lossy(&cut[cut.len().saturating_sub(2000)..])
        );
    }
}

/// A cluster that fails to start (here a peer that never comes) destroys
/// nothing: the previous run's segment diffs, dead letters and state are as
/// they were, and the state still answers queries. Outputs are emptied, and
/// the state part replaced, only once every process has agreed to start.
#[test]
fn a_cluster_that_fails_to_start_keeps_the_previous_outputs_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = generate(dir.path(), 6000, 23);
    let out = run(dir.path(), &data, "prev", &["-w", "1"]);
    let dead = dir.path().join("prev.dead.jsonl");
    let state = dir.path().join("prev.state");
    let (diffs, letters) = (std::fs::read(&out).unwrap(), std::fs::read(&dead).unwrap());
    assert!(!diffs.is_empty() && !letters.is_empty());
    let profile = String::from_utf8_lossy(&diffs)
        .lines()
        .last()
        .and_then(|l| l.split("\"profile\":\"").nth(1))
        .and_then(|p| p.split('"').next())
        .unwrap()
        .to_string();
    let query = || {
        ok(segflow(&[
            "query",
            "--state-dir",
            state.to_str().unwrap(),
            &profile,
        ]))
        .stdout
    };
    let before = query();

    let hosts = common::hostfile(dir.path());
    let mut args = run_args(
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        dead.to_str().unwrap(),
        state.to_str().unwrap(),
    );
    args.extend(cluster_args(0, &hosts));
    // Even a run that would start over leaves them as they were.
    args.extend([
        "--connect-timeout".to_string(),
        "1s".to_string(),
        "--reset".to_string(),
    ]);
    let failed = Command::new(BIN).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{err}");
    assert!(err.contains("could not connect to the cluster"), "{err}");
    assert!(
        std::fs::read(&out).unwrap() == diffs,
        "the segment diffs were touched"
    );
    assert!(
        std::fs::read(&dead).unwrap() == letters,
        "the dead letters were touched"
    );
    assert_eq!(query(), before, "the state was touched");
}
