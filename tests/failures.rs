//! Failures of the engine itself end the run, on every worker, with a
//! non-zero exit and the original reason; they never hang and never exit 0.
//! A closed standard output ends the run quietly. Each run here is the real
//! binary, stopped by force (and the test failed) if it outlives a deadline.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

const SPEC: &str = r#"
[engine]
tick = "1s"

[sources.web]

[traits.views]
stream = "web"
filter = 'event == "view_item"'

[segments.viewer]
when = "views >= 1"
"#;

/// Web events for `n` visitors, one view each: `n` segment entries.
fn views(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"event\":\"view_item\",\"ts\":{},\"anonymous_id\":\"v{i}\"}}\n",
                1_772_366_400 + i
            )
        })
        .collect()
}

fn write_spec(dir: &Path) -> String {
    let path = dir.join("flow.toml");
    std::fs::write(&path, SPEC).unwrap();
    path.display().to_string()
}

/// Whether this machine lets an unprivileged process mount a tmpfs at
/// `disk` in a private mount namespace (`unshare -rm`); the tests that
/// fill a small disk say they are skipped where it does not.
fn can_mount_tmpfs(disk: &Path) -> bool {
    let mount = format!("mount -t tmpfs -o size=1m tmpfs {}", disk.display());
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c", &mount])
        .output();
    let ok = probe.is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: this machine cannot mount a tmpfs in a private mount namespace");
    }
    ok
}

/// `segflow ARGS` (a shell word list) on a tmpfs of `size` mounted at
/// `disk` in a private mount namespace, its stderr piped.
fn segflow_on_tmpfs(disk: &Path, size: &str, args: &str) -> Child {
    let mount = format!("mount -t tmpfs -o size={size} tmpfs {}", disk.display());
    Command::new("unshare")
        .args(["-rm", "sh", "-c", &format!("{mount} && exec {BIN} {args}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` at most `secs`; a run that outlives it has hung.
fn finish(mut child: Child, secs: u64) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
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
            child.kill().unwrap();
            panic!("segflow hung for {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `segflow run SPEC --input web=WEB -w WORKERS EXTRA..`.
fn run_web(spec: &str, web: &str, workers: &str, extra: &[&str]) -> Child {
    let input = format!("web={web}");
    let mut args = vec!["run", spec, "-w", workers, "--input", &input];
    args.extend_from_slice(extra);
    spawn(&args)
}

fn spawn(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_full_segment_output_is_an_error_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    for n in [2, 20_000] {
        std::fs::write(&web, views(n)).unwrap();
        for workers in ["1", "2"] {
            let child = run_web(
                &spec,
                &web.display().to_string(),
                workers,
                &["--output", "/dev/full"],
            );
            let (code, err) = finish(child, 120);
            assert_ne!(code, 0, "{n} events, -w {workers}: {err}");
            assert!(
                err.contains("error: segment output /dev/full: No space left on device"),
                "{n} events, -w {workers}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

/// A full disk under the state directory (a 192 KiB tmpfs, mounted in a
/// private mount namespace by `unshare -rm`, so the test needs no root) ends
/// the run, on every worker, with RocksDB's reason. Where the machine allows
/// no mount namespace, the test says so and checks nothing else.
#[test]
fn a_full_disk_under_the_state_directory_is_an_error_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(20_000)).unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    if !can_mount_tmpfs(&disk) {
        return;
    }
    for workers in ["1", "2"] {
        let state = disk.join("state");
        let child = segflow_on_tmpfs(
            &disk,
            "384k",
            &format!(
                "run {spec} -w {workers} --input web={} --state-dir {}",
                web.display(),
                state.display()
            ),
        );
        let (code, err) = finish(child, 120);
        assert_ne!(code, 0, "-w {workers}: {err}");
        assert!(
            err.contains(&format!("error: state directory {}", state.display()))
                && err.contains("No space left on device"),
            "-w {workers}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// The disk under the state directory fills at any stage of a run of the
/// shipped dataflow: a write-ahead log append, a memtable flush, a
/// compaction (after which RocksDB stops taking writes and waits for free
/// space without end). Tmpfs sizes of 8 to 15 MB (the store peaks at
/// about 20 MB at 40 000 events; from 12 MB on, the disk fills in
/// flushes and compactions rather than in the log), `-w 1` and `-w 2`:
/// every run ends within the deadline, either complete (exit 0) or with
/// exit status 1 and the state directory's reason, never by a hang or a
/// panic. Where the machine allows no mount namespace, the test says so.
#[test]
fn a_disk_that_fills_at_any_stage_of_a_run_ends_it_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let generated = Command::new(BIN)
        .args(["generate", "--events", "40000", "--seed", "7", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{generated:?}");
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    if !can_mount_tmpfs(&disk) {
        return;
    }
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/dataflows/ecommerce.toml");
    let inputs: Vec<String> = ["web", "crm", "transactions"]
        .iter()
        .map(|s| format!("--input {s}={}", data.join(format!("{s}.jsonl")).display()))
        .collect();
    let mut failed = 0;
    let runs = [
        ("8m", "2"),
        ("12m", "1"),
        ("13m", "2"),
        ("14m", "1"),
        ("15m", "2"),
    ];
    for (size, workers) in runs {
        let state = disk.join("state");
        let out = dir.path().join(format!("out-{size}.jsonl"));
        let child = segflow_on_tmpfs(
            &disk,
            size,
            &format!(
                "run {spec} -w {workers} {} --output {} --state-dir {}",
                inputs.join(" "),
                out.display(),
                state.display()
            ),
        );
        let (code, err) = finish(child, 240);
        eprintln!("{size} -w {workers}: exit {code}: {}", err.trim());
        assert!(!err.contains("panicked"), "{size} -w {workers}: {err}");
        if code == 0 {
            assert!(!err.contains("error"), "{size} -w {workers}: {err}");
            continue;
        }
        failed += 1;
        assert_eq!(code, 1, "{size} -w {workers}: {err}");
        assert!(
            err.contains(&format!("error: state directory {}", state.display()))
                && (err.contains("No space left on device")
                    || err.contains("stopped taking writes")
                    || err.contains("the store is stuck")),
            "{size} -w {workers}: {err}"
        );
    }
    assert!(failed > 0, "no size was small enough to fill");
}

#[test]
fn a_full_dead_letter_output_is_an_error_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(3) + "not json\n").unwrap();
    let child = run_web(
        &spec,
        &web.display().to_string(),
        "2",
        &["--dead-letter", "/dev/full"],
    );
    let (code, err) = finish(child, 120);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("error: dead-letter output /dev/full: No space left on device"),
        "{err}"
    );
}

#[test]
fn a_tcp_source_port_in_use_ends_every_worker_with_the_reason() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    for workers in ["1", "2"] {
        let child = run_web(&spec, &format!("tcp://{addr}"), workers, &[]);
        let (code, err) = finish(child, 60);
        assert_ne!(code, 0, "-w {workers}: {err}");
        assert!(
            err.contains(&format!("error: source `web`: cannot open tcp://{addr}:")),
            "-w {workers}: {err}"
        );
        assert!(err.contains("in use"), "-w {workers}: {err}");
    }
}

/// `follow` and `until` are checked against the input the run really has:
/// `--input` keeps the definition's `until` for a tcp:// input even when the
/// definition's `path` is a file, and `until` on a file input is refused
/// with the source's name, not silently ignored.
#[test]
fn source_settings_are_checked_against_the_input_given() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("until.toml");
    std::fs::write(
        &spec,
        SPEC.replace(
            "[sources.web]",
            "[sources.web]\npath = \"web.jsonl\"\nuntil = \"disconnect\"",
        ),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut child = Command::new(BIN)
        .args(["run", &spec, "--input", &format!("web=tcp://{addr}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("the tcp source never listened: {e}"),
        }
    };
    client.write_all(views(3).as_bytes()).unwrap();
    drop(client);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let (code, err) = finish(child, 60);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lines          3"), "{out}");

    // `until` on a file input.
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(1)).unwrap();
    let child = run_web(&spec, &web.display().to_string(), "1", &[]);
    let (code, err) = finish(child, 60);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("source `web` sets `until = \"disconnect\"`, which applies to tcp:// inputs only, but its input is the file"),
        "{err}"
    );
}

/// An input that opens but cannot be read (a directory) stops the run
/// before it starts, with the reason; it is not read as an empty input.
#[test]
fn an_input_that_cannot_be_read_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    for workers in ["1", "2"] {
        let child = run_web(&spec, &dir.path().display().to_string(), workers, &[]);
        let (code, err) = finish(child, 60);
        assert_ne!(code, 0, "-w {workers}: {err}");
        assert!(
            err.contains("cannot read input") && err.contains("it is a directory"),
            "-w {workers}: {err}"
        );
    }
}

#[test]
fn a_tcp_sink_that_closes_mid_run_ends_every_worker_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(50_000)).unwrap();
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = sink.local_addr().unwrap().to_string();
    // Accept, read one line, then close.
    let closer = std::thread::spawn(move || {
        let (stream, _) = sink.accept().unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    });
    let child = run_web(
        &spec,
        &web.display().to_string(),
        "2",
        &["--output", &format!("tcp://{addr}")],
    );
    let first = closer.join().unwrap();
    assert!(first.contains("\"segment\":\"viewer\""), "{first}");
    let (code, err) = finish(child, 120);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&format!("error: segment output tcp://{addr}:")),
        "{err}"
    );
}

#[test]
fn standard_output_closed_by_its_reader_ends_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(50_000)).unwrap();
    let mut child = Command::new(BIN)
        .args([
            "run",
            &spec,
            "-w",
            "2",
            "--input",
            &format!("web={}", web.display()),
            "--output",
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -1`
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"segment\":\"viewer\""), "{first}");
    let (code, err) = finish(child, 120);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
}

/// SIGTERM on a live run: the inputs end where they are, everything read is
/// written (diffs and dead letters), the summary is printed, exit 0. Two
/// signals at once (as `timeout` sends them, to the process and its group)
/// are one request.
#[test]
fn sigterm_on_a_live_run_writes_what_was_read_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("live.toml");
    std::fs::write(
        &spec,
        SPEC.replace(
            "tick = \"1s\"",
            "tick = \"100ms\"\nallowed_lateness = \"1s\"",
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    let dead = dir.path().join("dead.jsonl");
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut child = Command::new(BIN)
        .args([
            "run",
            spec.to_str().unwrap(),
            "--input",
            &format!("web=tcp://{addr}"),
            "--output",
            out.to_str().unwrap(),
            "--dead-letter",
            dead.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        match std::net::TcpStream::connect(&addr) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut lines = String::new();
    for i in 0..3 {
        lines.push_str(&format!(
            "{{\"event\":\"view_item\",\"ts\":{now},\"anonymous_id\":\"s{i}\"}}\n"
        ));
    }
    for _ in 0..20 {
        lines.push_str("not json\n");
    }
    std::io::Write::write_all(&mut client, lines.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let (code, err) = finish(child, 30);
    drop(client);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("segflow: SIGTERM: stopping; finishing what was read"),
        "{err}"
    );
    let mut summary = String::new();
    stdout.read_to_string(&mut summary).unwrap();
    assert!(
        summary.contains("segflow run was stopped after"),
        "{summary}"
    );
    assert!(
        summary.contains("stopped           by a signal before the end of source web"),
        "{summary}"
    );
    assert_eq!(std::fs::read_to_string(&dead).unwrap().lines().count(), 20);
    let tick = now / 100 * 100;
    let expected: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"time":{tick},"segment":"viewer","profile":"anon:s{i}","diff":1}}"#))
        .collect();
    assert_eq!(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        expected
    );
}

/// A second run on the same state directory is refused before it opens any
/// output: the first run's output file is not truncated. A directory with
/// another program's files is refused too, and left as it was.
#[test]
fn a_second_run_on_a_held_state_directory_destroys_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let out = dir.path().join("out.jsonl");
    let state = dir.path().join("state");
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let outputs = [
        "--output",
        out.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let first = run_web(&spec, &format!("tcp://{addr}"), "1", &outputs);
    // Wait until the first run has opened its outputs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&out, "written by the first run\n").unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, views(3)).unwrap();
    let second = run_web(&spec, &web.display().to_string(), "1", &outputs);
    let (code, err) = finish(second, 60);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("is in use by another segflow run"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "written by the first run\n"
    );
    let status = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, err) = finish(first, 30);
    assert_eq!(code, 0, "{err}");

    // Another program's directory.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("important.db"), "keep me").unwrap();
    let third = run_web(
        &spec,
        &web.display().to_string(),
        "1",
        &["--state-dir", theirs.to_str().unwrap()],
    );
    let (code, err) = finish(third, 60);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("is not empty and has no SEGFLOW_STATE marker (found important.db)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(theirs.join("important.db")).unwrap(),
        "keep me"
    );
}

/// An output given the path of an input, or the same file for diffs and
/// dead letters (directly, or through another spelling of the path or a
/// link), is refused before anything is created or truncated: the input
/// keeps every byte.
#[test]
fn outputs_that_are_the_same_file_as_an_input_or_each_other_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path());
    let web = dir.path().join("web.jsonl");
    let data = views(20);
    std::fs::write(&web, &data).unwrap();
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&web, &link).unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let web_s = web.display().to_string();
    let other_spelling = format!("{}/../web.jsonl", sub.display());
    let link_s = link.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--output", &web_s], "the segment output"),
        (vec!["--output", &other_spelling], "the segment output"),
        (vec!["--dead-letter", &link_s], "the dead-letter output"),
    ];
    for (args, what) in cases {
        let (code, err) = finish(run_web(&spec, &web_s, "2", &args), 30);
        assert_ne!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains(what) && err.contains("is also the input of source `web`"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_to_string(&web).unwrap(), data, "{args:?}");
    }
    let same = dir.path().join("out.jsonl");
    let same_s = same.display().to_string();
    let (code, err) = finish(
        run_web(
            &spec,
            &web_s,
            "1",
            &["--output", &same_s, "--dead-letter", &same_s],
        ),
        30,
    );
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("the dead-letter output") && err.contains("is also the segment output"),
        "{err}"
    );
    assert!(!same.exists(), "nothing is created");
    // A device that keeps nothing may take several outputs: the usual way
    // to throw them away.
    let (code, err) = finish(
        run_web(
            &spec,
            &web_s,
            "1",
            &["--output", "/dev/null", "--dead-letter", "/dev/null"],
        ),
        30,
    );
    assert_eq!(code, 0, "{err}");

    // An output inside the state directory (which does not exist yet, or
    // is reached through `..`): refused before anything is created.
    let state = dir.path().join("state");
    let state_s = state.display().to_string();
    let inside = format!("{state_s}/diffs.jsonl");
    let inside_dead = format!("{}/../state/dead.jsonl", sub.display());
    for args in [
        vec!["--state-dir", &state_s, "--output", &inside],
        vec!["--state-dir", &state_s, "--dead-letter", &inside_dead],
    ] {
        let (code, err) = finish(run_web(&spec, &web_s, "1", &args), 30);
        assert_ne!(code, 0, "{args:?}: {err}");
        assert!(
            err.contains("is inside the state directory"),
            "{args:?}: {err}"
        );
        assert!(!state.exists(), "{args:?}: nothing is created");
    }

    // An output below a file: the message says so.
    let below = format!("{}/diffs.jsonl", web.display());
    let (code, err) = finish(run_web(&spec, &web_s, "1", &["--output", &below]), 30);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("a part of this path is a file, not a directory"),
        "{err}"
    );
}
