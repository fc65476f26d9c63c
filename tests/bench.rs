//! `segflow bench` end to end on a small data set: every job reports the
//! same records and profiles for every worker count, stateful jobs report
//! their state size, and a wrong job name is an error.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

#[test]
fn bench_runs_every_job_and_reports_per_worker_figures() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--events",
            "3000",
            "--repeat",
            "1",
            "--jobs",
            "ecommerce,visitor_high_intent,query,memory,resume",
            "--query-profiles",
            "3000",
            "--workers",
            "1,2",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["web_events"], 3000);
    for job in ["ecommerce", "visitor_high_intent"] {
        let results: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["job"] == job && l.get("records").is_some())
            .collect();
        assert_eq!(results.len(), 2, "{stdout}");
        assert_eq!(results[0]["records"], results[1]["records"], "{stdout}");
        assert_eq!(results[0]["profiles"], results[1]["profiles"], "{stdout}");
        for r in &results {
            assert!(r["profiles"].as_i64().unwrap() > 0, "{r}");
            assert!(
                r["records_per_sec_per_worker"].as_f64().unwrap() > 0.0,
                "{r}"
            );
            assert!(r["peak_rss_mb"].as_f64().unwrap() > 1.0, "{r}");
            let state = r["state_bytes"].as_u64().unwrap();
            assert_eq!(state > 0, job == "ecommerce", "{r}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l["job"] == job && l["speedup"].as_f64().is_some()),
            "{stdout}"
        );
    }
    let query = lines
        .iter()
        .find(|l| l["job"] == "query")
        .expect("a query result");
    assert_eq!(query["profiles"], 3000, "{query}");
    assert_eq!(query["lookups"], 21, "{query}");
    assert!(query["median_ms"].as_f64().unwrap() > 0.0, "{query}");
    assert!(query["state_bytes"].as_u64().unwrap() > 0, "{query}");
    // The memory job: each dataflow job on an eighth of the data and on
    // all of it, and the RSS per additional profile between the two.
    for job in ["ecommerce", "visitor_high_intent"] {
        let m = lines
            .iter()
            .find(|l| l["job"] == "memory" && l["of"] == job)
            .unwrap_or_else(|| panic!("a memory result for {job}: {stdout}"));
        let (few, many) = (
            m["small"]["profiles"].as_i64().unwrap(),
            m["large"]["profiles"].as_i64().unwrap(),
        );
        assert!(0 < few && few < many, "{m}");
        let full = lines
            .iter()
            .find(|l| l["job"] == job && l["workers"] == 1 && l.get("records").is_some())
            .unwrap();
        assert_eq!(m["large"]["profiles"], full["profiles"], "{m}");
        let slope = (m["large"]["peak_rss_mb"].as_f64().unwrap()
            - m["small"]["peak_rss_mb"].as_f64().unwrap())
            * 1048576.0
            / (many - few) as f64;
        let reported = m["rss_bytes_per_added_profile"].as_f64().unwrap();
        assert!(
            (reported - slope).abs() < 1e-6 * slope.abs().max(1.0),
            "{m}"
        );
    }
    // The resume job: a run killed half-way and resumed ends with the
    // reference's outputs, at each worker count.
    let resumed: Vec<_> = lines.iter().filter(|l| l["job"] == "resume").collect();
    assert_eq!(resumed.len(), 2, "{stdout}");
    for r in resumed {
        assert_eq!(r["identical"], true, "{r}");
        assert!(r["restart_secs"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["diffs_of_the_run"].as_u64().unwrap() > 0, "{r}");
    }
    let bad = Command::new(BIN)
        .args([
            "bench",
            "--jobs",
            "nope",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown job `nope`"));
}

/// `segflow bench` destroys nothing it did not create: a state directory
/// with someone else's file is refused and left as it was.
#[test]
fn bench_refuses_state_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    // A directory with someone else's files is refused as a whole.
    let checkout = tempfile::tempdir().unwrap();
    std::fs::write(checkout.path().join("web.jsonl"), "mine").unwrap();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--events",
            "500",
            "--dir",
            checkout.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("holds files segflow bench did not write (found web.jsonl)"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(checkout.path().join("web.jsonl")).unwrap(),
        "mine"
    );
    // In the bench's own directory, a state directory with someone else's
    // file is refused and left as it was.
    std::fs::write(dir.path().join("segflow-bench.lock"), "").unwrap();
    let theirs = dir.path().join("out/ecommerce-w1.state");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("precious.txt"), "keep me").unwrap();
    let out = Command::new(BIN)
        .args([
            "bench",
            "--events",
            "500",
            "--repeat",
            "1",
            "--jobs",
            "ecommerce",
        ])
        .args(["--workers", "1", "--dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("has no SEGFLOW_STATE marker"), "{err}");
    assert_eq!(
        std::fs::read_to_string(theirs.join("precious.txt")).unwrap(),
        "keep me"
    );
    let zero = Command::new(BIN)
        .args([
            "bench",
            "--latency-secs",
            "0",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--latency-secs must be at least 1"));
}

/// SIGTERM stops the bench and the run it started: no run is left behind,
/// and the exit status says it was interrupted.
#[test]
fn sigterm_stops_the_bench_and_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "bench",
            "--events",
            "300000",
            "--repeat",
            "5",
            "--jobs",
            "visitor_high_intent",
        ])
        .args(["--workers", "1", "--dir", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first run has started.
    let marker = dir.path().join("out");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !marker.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the bench did not stop"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    // No `segflow run` of this bench is left.
    let path = dir.path().to_str().unwrap().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(
                !(cmd.contains(" run ") && cmd.contains(&path)),
                "left behind: {cmd}"
            );
        }
    }
}
