//! Memory of a long live run: a followed file with state.
//!
//! The `segflow` binary follows a file (`follow = true`, one worker, tick
//! 100 ms, lateness 0) with a RocksDB state directory and an output file.
//! A writer appends events stamped with the current wall clock at a fixed
//! rate, round-robin over a fixed pool of returning visitors (views of
//! priced items in categories, add-to-carts, purchases, page views, from
//! several devices), so the number of profiles is bounded while every
//! window keeps sliding. The definition uses every construct of the
//! language with short windows: sliding counts, averages, maxima, distinct
//! counts, most frequent values and shares; a tumbling minute; sessions;
//! a `not_followed_by` sequence; the latest device; recencies; segments of
//! segments and a dwell time. Each expires within two minutes, so a memory
//! that grows here grows with the length of the stream, not with the
//! state.
//!
//! The resident set size (`VmRSS` of `/proc/PID/status`) is sampled every
//! `--sample` seconds. `cargo bench --bench soak` prints one JSON line per
//! sample and a summary:
//! `{"summary":true,"secs":..,"rate":..,"visitors":..,"rss_start_mb":..,"rss_end_mb":..,"rss_max_mb":..,"slope_mb_per_min":..}`,
//! where the slope is the least-squares slope of the samples after the first
//! third of the run (warm-up: every visitor's profile is created, RocksDB's
//! memtables fill). Arguments (after `--`): `--secs N` (default 300),
//! `--rate N` events per second (default 2000), `--visitors N` (default
//! 20000), `--sample N` seconds (default 10).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_segflow");

const SPEC: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "0s"
idle_advance = "200ms"
time_zone = "UTC"

[sources.web]
follow = true

[traits.views_10s]
stream = "web"
filter = 'event == "view_item"'
window = "10s"

[traits.views]
stream = "web"
filter = 'event == "view_item"'

[traits.avg_price_30s]
stream = "web"
filter = 'event == "view_item"'
aggregate = "avg"
of = "item.price"
window = "30s"

[traits.max_price_30s]
stream = "web"
filter = 'event == "view_item"'
aggregate = "max"
of = "item.price"
window = "30s"

[traits.categories_1m]
stream = "web"
aggregate = "distinct"
of = "item.category"
window = "1m"

[traits.top_category_1m]
stream = "web"
filter = 'event == "view_item"'
aggregate = "most_frequent"
of = "item.category"
window = "1m"

[traits.outdoor_share_1m]
stream = "web"
filter = 'event == "view_item"'
aggregate = "share"
part = 'item.category == "outdoor"'
window = "1m"

[traits.views_this_minute]
stream = "web"
filter = 'event == "view_item"'
tumbling = "1m"

[traits.session_views]
stream = "web"
filter = 'event == "view_item"'
session_gap = "5s"
session_max = "2m"

[traits.abandoned_10s]
stream = "web"
filter = 'event == "add_to_cart"'
window = "10s"
not_followed_by = [{ stream = "web", filter = 'event == "purchase"' }]
within = "3s"

[traits.last_device]
stream = "web"
aggregate = "last"
of = "context.device"

[traits.since_first]
stream = "web"
aggregate = "since_first"

[traits.since_last_purchase]
stream = "web"
filter = 'event == "purchase"'
aggregate = "since_last"

[segments.recent]
when = "views_10s >= 2"

[segments.browsing]
when = "session_views >= 3"

[segments.abandoner]
when = "abandoned_10s >= 1"

[segments.mobile]
when = 'last_device == "mobile"'

[segments.lapsed]
when = "since_last_purchase >= 20s"

[segments.loyal]
when = "recent and since_first >= 1m"

[segments.premium]
when = "max_price_30s >= 100 and avg_price_30s >= 50 and categories_1m >= 2"
min_dwell = "5s"

[segments.outdoor]
when = 'outdoor_share_1m >= 0.5 and top_category_1m == "outdoor" and views_this_minute >= 1'
"#;

/// The `n`th event of the soak, stamped `now_ms`: mostly item views, some
/// add-to-carts, purchases and page views, over `visitors` visitors.
fn event(n: u64, visitors: u64, now_ms: u128) -> String {
    const CATEGORIES: [&str; 4] = ["outdoor", "books", "home", "toys"];
    const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
    // A fixed scramble of the counter, so kinds and values do not follow
    // the visitor round-robin.
    let h = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let kind = match h % 20 {
        0..=13 => "view_item",
        14..=16 => "add_to_cart",
        17 => "purchase",
        _ => "page_view",
    };
    let price = 5 + (h / 20) % 200;
    let category = CATEGORIES[((h / 4000) % 4) as usize];
    let device = DEVICES[((h / 16_000) % 3) as usize];
    format!(
        "{{\"event\":\"{kind}\",\"ts\":{now_ms},\"anonymous_id\":\"v{}\",\"item\":{{\"price\":{price},\"category\":\"{category}\"}},\"context\":{{\"device\":\"{device}\"}}}}\n",
        n % visitors
    )
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Least-squares slope of `(x, y)` points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

struct Soak {
    secs: u64,
    rate: u64,
    visitors: u64,
    sample: u64,
}

/// Runs the soak; returns the samples `(seconds, RSS MB)`, the number of
/// events written and the run's summary (its standard output).
fn run(soak: &Soak) -> (Vec<(f64, f64)>, u64, String) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("soak.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let web = dir.path().join("web.jsonl");
    let mut file = std::fs::File::create(&web).unwrap();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg(&spec)
        .arg("--input")
        .arg(format!("web={}", web.display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .args(["-w", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let mut written = 0u64;
    let mut samples = Vec::new();
    let mut next_sample = soak.sample;
    let mut buf = String::new();
    while start.elapsed() < Duration::from_secs(soak.secs) {
        let due = (start.elapsed().as_secs_f64() * soak.rate as f64) as u64;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        buf.clear();
        while written < due {
            buf.push_str(&event(written, soak.visitors, now_ms));
            written += 1;
        }
        file.write_all(buf.as_bytes()).unwrap();
        if start.elapsed().as_secs() >= next_sample {
            let t = start.elapsed().as_secs_f64();
            let rss = rss_mb(pid).expect("segflow is running");
            println!("{{\"t_s\":{t:.0},\"events\":{written},\"rss_mb\":{rss:.1}}}");
            samples.push((t, rss));
            next_sample += soak.sample;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "segflow ended during the soak"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the last lines be read, then stop the run as an operator would.
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "segflow failed: {err}");
    (
        samples,
        written,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn main() {
    let mut soak = Soak {
        secs: 300,
        rate: 2000,
        visitors: 20_000,
        sample: 10,
    };
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |name: &str| -> u64 {
            args.next()
                .and_then(|s| s.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| panic!("{name} N (N >= 1)"))
        };
        match a.as_str() {
            "--secs" => soak.secs = number("--secs"),
            "--rate" => soak.rate = number("--rate"),
            "--visitors" => soak.visitors = number("--visitors"),
            "--sample" => soak.sample = number("--sample"),
            "--bench" => bench = true,
            _ => {}
        }
    }
    if !bench {
        // `cargo test --all-targets` runs this without `--bench`: a short
        // smoke run that fails if the followed file's lines are not all
        // read or the run does not end cleanly on SIGTERM.
        soak = Soak {
            secs: 3,
            rate: 500,
            visitors: 100,
            sample: 1,
        };
    }
    let (samples, written, summary) = run(&soak);
    assert!(
        summary.contains(&format!("records read      {written}\n")),
        "every written event is read ({written}): {summary}"
    );
    let after_warmup: Vec<(f64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= soak.secs as f64 / 3.0)
        .collect();
    let max = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    println!(
        "{{\"summary\":true,\"secs\":{},\"rate\":{},\"visitors\":{},\"events\":{written},\"rss_start_mb\":{:.1},\"rss_end_mb\":{:.1},\"rss_max_mb\":{max:.1},\"slope_mb_per_min\":{:.2}}}",
        soak.secs,
        soak.rate,
        soak.visitors,
        after_warmup.first().map_or(f64::NAN, |s| s.1),
        samples.last().map_or(f64::NAN, |s| s.1),
        slope(&after_warmup) * 60.0
    );
}
