//! Exactly-once after `kill -9`: a run killed with SIGKILL at random
//! moments and restarted each time (it resumes from its checkpoint) ends
//! with the same segment diffs and dead letters, byte for byte, and the
//! same state as a run that was never killed: with `-w 1`, `-w 2` and two
//! processes.
//!
//! The number of kills per case is `SEGFLOW_RECOVERY_KILLS` (default 8, the
//! CI size; the long run is e.g. `SEGFLOW_RECOVERY_KILLS=40 cargo test
//! --test recovery`); the kill moments come from `SEGFLOW_RECOVERY_SEED`
//! (default: the clock), printed so a failure can be replayed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

/// The shipped definition as `edit` changes it, written to `dir/name`.
fn edited_definition(dir: &Path, name: &str, edit: impl FnOnce(&str) -> String) -> PathBuf {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    ))
    .unwrap();
    let flow = dir.join(name);
    std::fs::write(&flow, edit(&shipped)).unwrap();
    flow
}

fn generate(dir: &Path, events: u64) -> PathBuf {
    let data = dir.join("data");
    let out = Command::new(BIN)
        .args(["generate", "--out", data.to_str().unwrap(), "--events"])
        .arg(events.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

/// The arguments of run `name` in `dir` on `data`.
fn run_args(dir: &Path, data: &Path, name: &str) -> Vec<String> {
    let dataflow = concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml");
    let d = data.display();
    let o = dir.display();
    vec![
        "run".into(),
        dataflow.into(),
        "--input".into(),
        format!("web={d}/web.jsonl"),
        "--input".into(),
        format!("crm={d}/crm.jsonl"),
        "--input".into(),
        format!("transactions={d}/transactions.jsonl"),
        "--output".into(),
        format!("{o}/{name}.jsonl"),
        "--dead-letter".into(),
        format!("{o}/{name}.dead.jsonl"),
        "--state-dir".into(),
        format!("{o}/{name}.state"),
    ]
}

/// How a case runs: one process with `-w N`, or two processes.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Workers(usize),
    TwoProcesses,
}

/// Starts the run (every process of it).
fn start(dir: &Path, args: &[String], layout: Layout, hostfile: &Path) -> Vec<Child> {
    let spawn = |extra: Vec<String>| {
        Command::new(BIN)
            .args(args)
            .args(extra)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    match layout {
        Layout::Workers(w) => vec![spawn(vec!["-w".into(), w.to_string()])],
        Layout::TwoProcesses => (0..2)
            .map(|p| {
                let mut args = common::cluster_args(p, hostfile);
                args.extend(["-w".to_string(), "2".to_string()]);
                spawn(args)
            })
            .collect(),
    }
}

/// Waits for `child`, at most until `deadline` (a hang fails the test).
fn wait(child: &mut Child, deadline: Instant) -> (std::process::ExitStatus, String) {
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("a run hung");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // What it printed: the summary (standard output), then its errors.
    let mut err = String::new();
    for out in [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn std::io::Read>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut out = out;
        out.read_to_string(&mut err).unwrap();
    }
    (status, err)
}

/// Runs to the end; returns how long it took.
fn run_to_end(dir: &Path, args: &[String], layout: Layout, hostfile: &Path) -> Duration {
    run_to_end_saying(dir, args, layout, hostfile).0
}

/// [`run_to_end`], with what the first process printed on its standard
/// error (its summary).
fn run_to_end_saying(
    dir: &Path,
    args: &[String],
    layout: Layout,
    hostfile: &Path,
) -> (Duration, String) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut said = None;
    for mut child in start(dir, args, layout, hostfile) {
        let (status, err) = wait(&mut child, deadline);
        assert!(status.success(), "run failed: {status}\n{err}");
        said.get_or_insert(err);
    }
    (started.elapsed(), said.unwrap_or_default())
}

/// Every entry of the state in `dir` but the checkpoint (whose run
/// identity and positions differ between runs), sorted.
fn state_entries(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    raw_state_entries(dir)
}

/// Asserts that two states hold the same entries, naming (up to ten of)
/// those that differ.
fn assert_same_state(want: &Path, got: &Path, what: &str) {
    let (want, got) = (state_entries(want), state_entries(got));
    if want == got {
        return;
    }
    let show = |e: &(String, Vec<u8>, Vec<u8>)| {
        format!(
            "{} {} = {}",
            e.0,
            String::from_utf8_lossy(&e.1),
            String::from_utf8_lossy(&e.2)
        )
    };
    let missing: Vec<String> = want
        .iter()
        .filter(|e| !got.contains(e))
        .take(10)
        .map(show)
        .collect();
    let extra: Vec<String> = got
        .iter()
        .filter(|e| !want.contains(e))
        .take(10)
        .map(show)
        .collect();
    panic!(
        "{what}: the state differs ({} entries expected, {} found)\nexpected, not found:\n  {}\nfound, not expected:\n  {}",
        want.len(),
        got.len(),
        missing.join("\n  "),
        extra.join("\n  ")
    );
}

fn raw_state_entries(dir: &Path) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let parts = segflow::store::StateParts::open_read_only(dir).unwrap();
    let mut entries: Vec<_> = parts
        .entries()
        .unwrap()
        .into_iter()
        .filter(|(cf, _, _)| cf != "checkpoint")
        .collect();
    entries.sort();
    entries
}

/// The segment output's length in the checkpoint of the state in `dir`
/// (which must have output positions past the start).
fn checkpointed_segments_len(dir: &Path) -> usize {
    let written = segflow::store::StateParts::open_read_only(dir)
        .unwrap()
        .checkpoint()
        .unwrap()
        .and_then(|c| c.sinks)
        .map_or(0, |s| s.segments_len as usize);
    assert!(written > 0, "the checkpoint has no output positions");
    written
}

/// Whether the state in `dir` holds a checkpoint with output positions
/// past the start (a restart from it cuts the outputs back and skips):
/// those clamped where files ended, or those at the retained input's cut
/// (which a restore resumes from).
fn checkpoint_has_positions(dir: &Path) -> bool {
    segflow::store::StateParts::open_read_only(dir)
        .ok()
        .and_then(|p| p.checkpoint().ok().flatten())
        .is_some_and(|c| {
            let at_cut = c.retained.and_then(|r| r.sinks);
            [c.sinks, at_cut]
                .iter()
                .flatten()
                .any(|s| s.segments_len > 0)
        })
}

/// The cut of the retained input in the checkpoint of the state in `dir`
/// (0 if none): a single process's restart from it restores instead of
/// reading its inputs again.
fn checkpoint_cut(dir: &Path) -> u64 {
    segflow::store::StateParts::open_read_only(dir)
        .ok()
        .and_then(|p| p.checkpoint().ok().flatten())
        .and_then(|c| c.retained)
        .map_or(0, |r| r.cut)
}

fn kills() -> usize {
    std::env::var("SEGFLOW_RECOVERY_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn seed() -> u64 {
    std::env::var("SEGFLOW_RECOVERY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The case: a reference run, then a run killed `kills()` times at random
/// moments within the reference's duration, restarted each time, and run
/// to its end; outputs and state must be equal.
fn killed_runs_end_as_an_uninterrupted_run(layout: Layout) {
    let dir = tempfile::tempdir().unwrap();
    let data = generate(dir.path(), 30_000);
    let hostfile = dir.path().join("hosts");
    let ports = [common::free_port(), common::free_port()];
    std::fs::write(
        &hostfile,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1]),
    )
    .unwrap();
    let reference = run_args(dir.path(), &data, "reference");
    let took = run_to_end(dir.path(), &reference, layout, &hostfile);

    let seed = seed();
    eprintln!("{layout:?}: reference run {took:?}; kill moments from SEGFLOW_RECOVERY_SEED={seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let crashed = run_args(dir.path(), &data, "crashed");
    let state = dir.path().join("crashed.state");
    let (mut killed, mut completed, mut resumed_with_positions) = (0, 0, 0);
    // Restarts of a single process that restored a checkpoint's retained
    // input (a cluster reads its inputs again).
    let single = matches!(layout, Layout::Workers(_));
    let mut restored = 0;
    // How long a restart runs: a restored one reads only what follows its
    // checkpoint, and is shorter than the reference. The kills fall within
    // it (it shrinks each time a restart ends before its kill).
    let mut span = took;
    // Until enough kills have landed, and enough restarts began from a
    // checkpoint with output positions (a kill may come before the first
    // checkpoint) and, in a single process, from a retained input, within
    // a bound.
    for _ in 0..6 * kills() {
        if killed >= kills() && resumed_with_positions >= 2 && (!single || restored >= 2) {
            break;
        }
        if checkpoint_has_positions(&state) {
            resumed_with_positions += 1;
        }
        if single && checkpoint_cut(&state) > 0 {
            restored += 1;
        }
        let mut children = start(dir.path(), &crashed, layout, &hostfile);
        // A cluster takes a while to connect and write its first diffs:
        // its kills come later in the run.
        let earliest = match layout {
            Layout::TwoProcesses => 0.3,
            Layout::Workers(_) => 0.02,
        };
        let started = Instant::now();
        let delay = span.mul_f64(rng.random_range(earliest..0.95));
        std::thread::sleep(delay);
        // Kill one process (in a cluster, the other must then stop on its
        // own, with an error).
        let victim = rng.random_range(0..children.len());
        let finished = children[victim].try_wait().unwrap().is_some();
        if !finished {
            children[victim].kill().unwrap();
            killed += 1;
        } else {
            completed += 1;
            // A cluster reads its inputs again: its restarts take as long
            // as the reference.
            if single {
                span = span.min(started.elapsed());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        for (i, child) in children.iter_mut().enumerate() {
            let (status, err) = wait(child, deadline);
            if finished && i == victim {
                assert!(status.success(), "an unkilled run failed: {status}\n{err}");
            }
            // A process whose peer was killed stops by itself, with exit
            // status 1 and the reason (never a crash of its own).
            if !finished && i != victim && !status.success() {
                assert!(
                    status.code() == Some(1)
                        && err.contains("error: ")
                        && !err.contains("panic")
                        && !err.contains("abort"),
                    "the peer of a killed process ended with {status}: {err}"
                );
            }
        }
    }
    if checkpoint_has_positions(&state) {
        resumed_with_positions += 1;
    }
    let last_cut = checkpoint_cut(&state);
    let (_, said) = run_to_end_saying(dir.path(), &crashed, layout, &hostfile);
    if single && last_cut > 0 {
        restored += 1;
        assert!(
            said.contains(&format!("the records before {last_cut} come from it")),
            "the last restart did not restore the checkpoint's retained input at {last_cut}: {said}"
        );
    }
    eprintln!(
        "{layout:?}: {killed} kills, {completed} runs ended before their kill, {resumed_with_positions} restarts from a checkpoint with output positions, {restored} restored a retained input"
    );
    assert!(killed >= kills(), "only {killed} runs were killed");
    assert!(
        resumed_with_positions >= 2,
        "no restart began from a checkpoint with output positions: the harness did not test resuming"
    );
    assert!(
        !single || restored >= 2,
        "fewer than two restarts restored a retained input: the harness did not test restoring"
    );
    assert_same_run(
        dir.path(),
        "reference",
        "crashed",
        None,
        &format!("{layout:?}, seed {seed}"),
    );
}

#[test]
fn one_worker_killed_at_random_moments() {
    killed_runs_end_as_an_uninterrupted_run(Layout::Workers(1));
}

#[test]
fn two_workers_killed_at_random_moments() {
    killed_runs_end_as_an_uninterrupted_run(Layout::Workers(2));
}

#[test]
fn two_processes_one_killed_at_random_moments() {
    killed_runs_end_as_an_uninterrupted_run(Layout::TwoProcesses);
}

/// Asserts that run `got` in `dir` ended with the outputs (diffs, dead
/// letters) and state of run `want`, where `got` read its inputs from
/// `moved` instead of `data` (dead letters name their input), if given.
fn assert_same_run(dir: &Path, want: &str, got: &str, moved: Option<(&Path, &Path)>, what: &str) {
    for file in ["jsonl", "dead.jsonl"] {
        let wanted = std::fs::read_to_string(dir.join(format!("{want}.{file}"))).unwrap();
        let mut found = std::fs::read_to_string(dir.join(format!("{got}.{file}"))).unwrap();
        if let Some((data, moved)) = moved {
            found = found.replace(&moved.display().to_string(), &data.display().to_string());
        }
        assert!(
            !wanted.is_empty() || file != "jsonl",
            "{want}.{file} is empty"
        );
        assert!(
            wanted == found,
            "{what}: {got}.{file} ({} bytes) differs from {want}.{file} ({} bytes)",
            found.len(),
            wanted.len()
        );
    }
    assert_same_state(
        &dir.join(format!("{want}.state")),
        &dir.join(format!("{got}.state")),
        what,
    );
}

/// Generates `events` web events into `dir/data` and runs `name` over them
/// to its end (`-w 2`); returns the data folder.
fn generate_and_run(dir: &Path, events: u64, name: &str) -> PathBuf {
    let data = generate(dir, events);
    let (status, err) = run_once(dir, &run_args(dir, &data, name));
    assert!(status.success(), "{err}");
    data
}

/// Runs `args` (with `-w 2`) to its end and returns its exit status and
/// standard error.
fn run_once(dir: &Path, args: &[String]) -> (std::process::ExitStatus, String) {
    run_with_workers(dir, args, 2)
}

/// Runs `args` with `-w workers` to its end and returns its exit status
/// and standard error.
fn run_with_workers(
    dir: &Path,
    args: &[String],
    workers: usize,
) -> (std::process::ExitStatus, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["-w", &workers.to_string()])
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A run resumed on inputs that have grown since (lines appended) ends
/// with the outputs and state of one run over the whole inputs.
#[test]
fn a_run_resumed_on_grown_inputs_equals_one_run_over_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate_and_run(dir.path(), 30_000, "whole");
    let files = ["web.jsonl", "crm.jsonl", "transactions.jsonl"];
    // (files cut, share of their lines kept, bytes of the next line kept):
    // a run over the cut inputs, then over the whole ones, resumed.
    let cases: &[(&[&str], f64, usize)] = &[
        (&files, 0.5, 0),
        (&["web.jsonl"], 0.85, 0),
        (&["web.jsonl"], 0.97, 0),
        (&files, 0.85, 0),
        (&["web.jsonl"], 0.9, 5),
    ];
    for (i, (cut, share, partial)) in cases.iter().enumerate() {
        let part = dir.path().join(format!("part{i}"));
        std::fs::create_dir_all(&part).unwrap();
        for f in files {
            let text = std::fs::read_to_string(data.join(f)).unwrap();
            if !cut.contains(&f) {
                std::fs::write(part.join(f), &text).unwrap();
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let keep = (lines.len() as f64 * share) as usize;
            let mut head: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
            head.push_str(&lines[keep][..*partial]);
            std::fs::write(part.join(f), head).unwrap();
        }
        let name = format!("grown{i}");
        let grown = run_args(dir.path(), &part, &name);
        let (status, err) = run_once(dir.path(), &grown);
        assert!(status.success(), "{err}");
        for f in files {
            std::fs::copy(data.join(f), part.join(f)).unwrap();
        }
        let (status, err) = run_once(dir.path(), &grown);
        let what = format!("{cut:?} cut at {share} (+{partial} bytes)");
        if *partial > 0 {
            // The last line was continued: refused (see
            // `an_input_that_ended_mid_line_and_grew_is_refused`).
            assert!(
                !status.success() && err.contains("middle of a line"),
                "{what}: {err}"
            );
            continue;
        }
        assert!(status.success(), "{err}");
        assert_same_run(dir.path(), "whole", &name, Some((&data, &part)), &what);
    }
}

/// A finished run over a web file that ends earlier (in event time) than
/// the other inputs, resumed once the rest of the web file is appended:
/// the other sources carried the frontier past the web file's end, but the
/// checkpoint's bounds stay at the web file's last watermark, so nothing
/// appended is left unwritten. (A newcomer found this with 200 000 events
/// cut at 85%: 63 exits without entries.)
#[test]
fn a_finished_run_resumed_on_a_longer_web_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate_and_run(dir.path(), 200_000, "whole");
    let part = dir.path().join("part");
    std::fs::create_dir_all(&part).unwrap();
    for f in ["crm.jsonl", "transactions.jsonl"] {
        std::fs::copy(data.join(f), part.join(f)).unwrap();
    }
    let web = std::fs::read_to_string(data.join("web.jsonl")).unwrap();
    let lines: Vec<&str> = web.lines().collect();
    let keep = lines.len() * 85 / 100;
    let head: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(part.join("web.jsonl"), head).unwrap();
    let grown = run_args(dir.path(), &part, "grown");
    for _ in 0..2 {
        let (status, err) = run_with_workers(dir.path(), &grown, 1);
        assert!(status.success(), "{err}");
        std::fs::copy(data.join("web.jsonl"), part.join("web.jsonl")).unwrap();
    }
    assert_same_run(
        dir.path(),
        "whole",
        "grown",
        Some((&data, &part)),
        "web at 85%",
    );
}

/// What cannot be resumed is refused with what was found and what to do,
/// and the outputs and state are left as they were; `--reset` starts over.
#[test]
fn checkpoints_that_do_not_fit_the_run_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate(dir.path(), 30_000);
    let args = run_args(dir.path(), &data, "r");
    // A run records where its outputs stand as its frontier advances
    // (not at the end of the input); one that wrote everything at its end
    // has only the start recorded. Run again until a checkpoint has
    // positions past the start.
    let mut reset = args.clone();
    reset.push("--reset".into());
    for _ in 0..5 {
        let (status, err) = run_once(dir.path(), &reset);
        assert!(status.success(), "{err}");
        if checkpoint_has_positions(&dir.path().join("r.state")) {
            break;
        }
    }
    let out = dir.path().join("r.jsonl");
    let diffs = std::fs::read(&out).unwrap();
    assert!(!diffs.is_empty());
    let refused = |args: &[String], why: &str| {
        let (status, err) = run_once(dir.path(), args);
        assert!(!status.success(), "resumed although {why}");
        assert!(
            err.contains("cannot resume from the checkpoint in") && err.contains("--reset"),
            "{why}: {err}"
        );
        assert!(err.contains(why), "expected {why:?} in: {err}");
        assert!(
            std::fs::read(&out).unwrap() == diffs,
            "{why}: the outputs were touched"
        );
    };
    // Another definition: a trait's window changed.
    let changed = dir.path().join("changed.toml");
    let shipped = std::fs::read_to_string(&args[1]).unwrap();
    std::fs::write(
        &changed,
        shipped.replace("window = \"30m\"", "window = \"31m\""),
    )
    .unwrap();
    let mut other = args.clone();
    other[1] = changed.display().to_string();
    refused(&other, "a different dataflow definition: its traits differ");
    // Other inputs: the web events regenerated with another seed.
    let data2 = dir.path().join("data2");
    let gen = Command::new(BIN)
        .args([
            "generate",
            "--out",
            data2.to_str().unwrap(),
            "--events",
            "5000",
            "--seed",
            "7",
        ])
        .output()
        .unwrap();
    assert!(gen.status.success());
    let mut other = args.clone();
    other[3] = format!("web={}/web.jsonl", data2.display());
    refused(&other, "it is not the same input");
    // The segment diffs to another file.
    let mut other = args.clone();
    other[9] = dir.path().join("elsewhere.jsonl").display().to_string();
    refused(&other, "and this run writes them to");
    // The segment output changed by something else: cut shorter than
    // the checkpoint says it was.
    let written = checkpointed_segments_len(&dir.path().join("r.state"));
    std::fs::write(&out, &diffs[..written - 1]).unwrap();
    let (status, err) = run_once(dir.path(), &args);
    assert!(
        !status.success() && err.contains("something else changed it"),
        "status {status}, written {written} of {}: {err}",
        diffs.len()
    );
    // --reset starts over and writes the full output again.
    let (status, err) = run_once(dir.path(), &reset);
    assert!(status.success(), "{err}");
    assert!(std::fs::read(&out).unwrap() == diffs);
    // The segment output rewritten by something else to the same length:
    // the bytes before the checkpoint's length are not what was written.
    let written = checkpointed_segments_len(&dir.path().join("r.state"));
    let mut changed = diffs.clone();
    changed[written - 2] = if changed[written - 2] == b'0' {
        b'1'
    } else {
        b'0'
    };
    std::fs::write(&out, &changed).unwrap();
    let (status, err) = run_once(dir.path(), &args);
    assert!(
        !status.success() && err.contains("something else changed it"),
        "status {status}, written {written} of {}: {err}",
        diffs.len()
    );
    assert!(
        std::fs::read(&out).unwrap() == changed,
        "the outputs were touched"
    );
    std::fs::write(&out, &diffs).unwrap();
    // A state directory written by an older segflow (no fingerprint in
    // its checkpoint) is refused too: covered by the store's unit tests
    // of the checkpoint format. A file source that became a socket.
    let mut live = args.clone();
    live[3] = "web=tcp://127.0.0.1:1".into();
    refused(&live, "and reads a socket (tcp://127.0.0.1:1) now");
}

/// Kills at chosen points (`SEGFLOW_FAULT`, see `segflow::fault`): just
/// before and after a state batch is written, and in the middle of a
/// segment diff's or a dead letter's line (half of it on disk). Each
/// restart resumes and the outputs and state end as an uninterrupted run's;
/// several faults in a row too.
#[test]
fn kills_at_chosen_points_during_writes() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let data = generate_and_run(dir.path(), 30_000, "reference");
    let cases: &[&[&str]] = &[
        &["state-write-before:1"],
        &["state-write-after:1", "state-write-after:2"],
        &["segments-half-line:1"],
        &[
            "segments-half-line:700",
            "dead-half-line:5",
            "state-write-before:2",
        ],
        &["dead-half-line:1", "segments-half-line:300"],
    ];
    for (i, faults) in cases.iter().enumerate() {
        let name = format!("fault{i}");
        let args = run_args(dir.path(), &data, &name);
        for (k, fault) in faults.iter().enumerate() {
            let out = Command::new(BIN)
                .args(&args)
                .args(["-w", "2"])
                .env(segflow::fault::FAULT_VAR, fault)
                .output()
                .unwrap();
            // The first fault of a chain always comes; a resumed run may
            // write too little to reach a later one, and then ends.
            let killed = out.status.signal() == Some(9);
            assert!(
                killed || (k > 0 && out.status.success()),
                "{fault}: the run was not killed at the fault ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (status, err) = run_once(dir.path(), &args);
        assert!(status.success(), "{faults:?}: {err}");
        assert_same_run(dir.path(), "reference", &name, None, &format!("{faults:?}"));
    }
}

/// Lines appended after a finished run, with times older than where its
/// outputs stood: within the file's last range they are late, and the
/// resumed run ends as one run over the whole file; once they fill a new
/// range (which has a clock of its own, so they are not late there), a
/// resume could not write their diffs and is refused.
#[test]
fn old_lines_appended_in_a_new_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate(dir.path(), 30_000);
    // Ranges of 64 KiB, so that appended lines soon fill a new one.
    let flow = edited_definition(dir.path(), "ranges.toml", |shipped| {
        shipped.replace("[engine]\n", "[engine]\nfile_range_bytes = 65536\n")
    });
    let web = std::fs::read_to_string(data.join("web.jsonl")).unwrap();
    // Early lines again, as other visitors: old times.
    let old: Vec<String> = web
        .lines()
        .take(400)
        .map(|l| l.replace("\"a-", "\"z-"))
        .collect();
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let args = |name: &str| {
        let mut a = run_args(dir.path(), &data, name);
        a[1] = flow.display().to_string();
        a[3] = format!("web={}", inputs.join(format!("{name}.web.jsonl")).display());
        a
    };
    let write = |name: &str, text: &str| {
        std::fs::write(inputs.join(format!("{name}.web.jsonl")), text).unwrap()
    };
    // A few old lines: late in the last range, in both runs.
    write("few", &web);
    let (status, err) = run_once(dir.path(), &args("few"));
    assert!(status.success(), "{err}");
    let grown = format!("{web}{}\n", old[..3].join("\n"));
    write("few", &grown);
    let (status, err) = run_once(dir.path(), &args("few"));
    assert!(status.success(), "{err}");
    write("whole", &grown);
    let (status, err) = run_once(dir.path(), &args("whole"));
    assert!(status.success(), "{err}");
    let (whole_input, few_input) = (inputs.join("whole.web.jsonl"), inputs.join("few.web.jsonl"));
    assert_same_run(
        dir.path(),
        "whole",
        "few",
        Some((&whole_input, &few_input)),
        "3 old lines",
    );
    // Many old lines: a new range of them. Refused, outputs untouched.
    write("many", &web);
    let (status, err) = run_once(dir.path(), &args("many"));
    assert!(status.success(), "{err}");
    let diffs = std::fs::read(dir.path().join("many.jsonl")).unwrap();
    write("many", &format!("{web}{}\n", old.join("\n")));
    let (status, err) = run_once(dir.path(), &args("many"));
    assert!(!status.success(), "resumed over a new range of old lines");
    assert!(err.contains("grew past the ranges it had"), "{err}");
    assert!(std::fs::read(dir.path().join("many.jsonl")).unwrap() == diffs);
}

/// A run stopped by SIGTERM (which ends every input where it is, its unread
/// ranges unread) and run again ends with an uninterrupted run's outputs
/// and state: dead letters of lines it never read are not taken as
/// written.
#[test]
fn a_run_stopped_by_sigterm_and_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let data = generate_and_run(dir.path(), 30_000, "reference");
    let took = started.elapsed();
    let all_lines: u64 = ["web", "crm", "transactions"]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(data.join(format!("{f}.jsonl"))).unwrap();
            text.lines().count() as u64
        })
        .sum();
    for i in 0..3 {
        let name = format!("term{i}");
        let args = run_args(dir.path(), &data, &name);
        let mut child = Command::new(BIN)
            .args(&args)
            .args(["-w", "2", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Once the first diffs are out, at a different moment each time.
        let out = dir.path().join(format!("{name}.jsonl"));
        let deadline = Instant::now() + took;
        while std::fs::metadata(&out).map_or(true, |m| m.len() == 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(40 * i as u64));
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let (status, err) = wait(&mut child, Instant::now() + Duration::from_secs(120));
        assert!(status.success(), "{err}");
        // The summary says whether the run was cut short, and which
        // sources were: a script can tell it from a complete run.
        let summary: serde_json::Value = serde_json::from_str(err.lines().next().unwrap())
            .unwrap_or_else(|e| panic!("summary: {e}: {err}"));
        let sources = summary["sources"].as_array().unwrap();
        let cut = sources.iter().any(|s| s["stopped"] == true);
        assert_eq!(summary["stopped"] == true, cut, "{summary}");
        if cut {
            let read: u64 = sources.iter().map(|s| s["lines"].as_u64().unwrap()).sum();
            assert!(
                read < all_lines,
                "stopped, yet read all {all_lines} lines: {summary}"
            );
        }
        let (status, err) = run_once(dir.path(), &args);
        assert!(status.success(), "{err}");
        assert_same_run(
            dir.path(),
            "reference",
            &name,
            None,
            &format!("SIGTERM {i}"),
        );
    }
}

/// An input whose last line had no line break when the run ended may have
/// had that line continued since (its meaning, and the watermark it moved,
/// can change): growing it is refused, outputs untouched.
#[test]
fn an_input_that_ended_mid_line_and_grew_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = generate(dir.path(), 5_000);
    let web = std::fs::read_to_string(data.join("web.jsonl")).unwrap();
    let cut = dir.path().join("inputs");
    std::fs::create_dir_all(&cut).unwrap();
    let path = cut.join("web.jsonl");
    std::fs::write(&path, web.trim_end_matches('\n')).unwrap();
    let mut args = run_args(dir.path(), &data, "midline");
    args[3] = format!("web={}", path.display());
    let (status, err) = run_once(dir.path(), &args);
    assert!(status.success(), "{err}");
    let diffs = std::fs::read(dir.path().join("midline.jsonl")).unwrap();
    // Run again on the same input: it resumes.
    let (status, err) = run_once(dir.path(), &args);
    assert!(status.success(), "{err}");
    // Continue the last line, then more lines: refused.
    let line = web.lines().next().unwrap();
    std::fs::write(
        &path,
        format!("{}{line}\n{line}\n", web.trim_end_matches('\n')),
    )
    .unwrap();
    let (status, err) = run_once(dir.path(), &args);
    assert!(!status.success(), "resumed over a continued last line");
    assert!(err.contains("ended in the middle of a line"), "{err}");
    assert!(std::fs::read(dir.path().join("midline.jsonl")).unwrap() == diffs);
}

/// A dwell time (`min_dwell`) runs from the real entry after a restart:
/// a run killed while profiles are held in a segment by their dwell time
/// alone, and resumed, writes the same exits at the same times as a run
/// that never stopped (the checkpoint keeps the entry times).
#[test]
fn dwell_times_run_from_the_real_entry_after_a_restart() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let data = generate(dir.path(), 30_000);
    let flow = edited_definition(dir.path(), "dwell.toml", |shipped| {
        format!(
            "{shipped}\n[traits.views_10m]\nstream = \"web\"\nfilter = 'event == \"view_item\"'\nwindow = \"10m\"\n\n[segments.held_viewer]\nwhen = \"views_10m >= 2\"\nmin_dwell = \"7m\"\n"
        )
    });
    let args = |name: &str| {
        let mut args = run_args(dir.path(), &data, name);
        args[1] = flow.display().to_string();
        args
    };
    let (status, err) = run_once(dir.path(), &args("reference"));
    assert!(status.success(), "{err}");
    let reference = std::fs::read_to_string(dir.path().join("reference.jsonl")).unwrap();
    assert!(
        reference
            .lines()
            .filter(|l| l.contains("\"held_viewer\"") && l.ends_with("\"diff\":-1}"))
            .count()
            > 10,
        "the data gives exits held back by the dwell time"
    );
    for (i, fault) in ["state-write-after:3", "state-write-after:6"]
        .iter()
        .enumerate()
    {
        let name = format!("dwell{i}");
        let out = Command::new(BIN)
            .args(args(&name))
            .args(["-w", "2"])
            .env(segflow::fault::FAULT_VAR, fault)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{fault}: the run was not killed at the fault: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (status, err) = run_once(dir.path(), &args(&name));
        assert!(status.success(), "{fault}: {err}");
        assert_same_run(dir.path(), "reference", &name, None, fault);
    }
}
