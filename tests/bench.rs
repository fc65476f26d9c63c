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
            "ecommerce,visitor_high_intent,query",
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
