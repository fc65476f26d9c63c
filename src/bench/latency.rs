//! Event-to-diff latency on a live TCP source (`segflow bench`'s `latency`
//! job and `cargo bench --bench latency`).
//!
//! The engine runs with a TCP source and a TCP sink (`tick = "10ms"`,
//! `allowed_lateness = "0s"`, two workers) and the segment `recent`: a
//! `view_item` in the last second. A client sends `view_item` events
//! stamped with the current wall clock at a fixed rate, round-robin over a
//! pool of returning visitors, each of whom comes back every two seconds:
//! so every event makes its visitor enter `recent` (and leave it a second
//! later). A collector reads the diffs from the sink. The latency of an
//! event is the time from just before its line is written to the socket
//! until its entry line is read from the sink. The first round of visitors
//! (two seconds) is warm-up and not counted.
//!
//! `cargo bench --bench latency` prints, per rate, one JSON line per run and
//! one with the median of each figure over the runs:
//! `{"median":true,"rate":1000,"workers":2,"new_profiles":false,"events":..,"missing":0,"late":0,"p50_ms":..,"p99_ms":..,"p999_ms":..,"max_ms":..}`.
//! Arguments (after `--`): the rates (default `1000 10000`), `--secs N`
//! (default 10) for the measured duration of each run, `--repeat N`
//! (default 3) runs per rate, `--workers N` (default 2), and
//! `--new-profiles` to make every event a new visitor (a new profile, the
//! identity stage's worst case) instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::spec::parse_spec;
use crate::{Engine, Input, Output};

const SPEC: &str = r#"
[engine]
tick = "10ms"
allowed_lateness = "LATENESS"
idle_advance = "100ms"

[sources.web]

[traits.views_1s]
stream = "web"
filter = 'event == "view_item"'
window = "1s"

[segments.recent]
when = "views_1s >= 1"
"#;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One run: `rate` events per second for `secs` measured seconds (after the
/// warm-up) on `workers` workers, with `allowed_lateness = lateness`; every
/// event a new visitor if `new_profiles`.
///
/// # Panics
///
/// If the engine or a socket fails: this is a benchmark.
pub fn run(rate: u64, secs: u64, workers: usize, new_profiles: bool, lateness: &str) -> Stats {
    let spec = SPEC.replace("LATENESS", lateness);
    // Each visitor comes back every two seconds, after leaving `recent`.
    let visitors = (2 * rate).max(1);
    let visitor = move |i: u64| if new_profiles { i } else { i % visitors };
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap().to_string();
    drop(source);
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap().to_string();
    // Entries by (visitor, time).
    let received: Arc<Mutex<HashMap<(u64, u64), Instant>>> = Arc::default();
    let recv = Arc::clone(&received);
    let collector = std::thread::spawn(move || {
        let (stream, _) = sink.accept().unwrap();
        for line in BufReader::new(stream).lines() {
            let line = line.unwrap();
            let at = Instant::now();
            if !line.ends_with("\"diff\":1}") {
                continue;
            }
            let time = line
                .split("\"time\":")
                .nth(1)
                .and_then(|t| t.split(',').next())
                .and_then(|t| t.parse::<u64>().ok());
            let visitor = line
                .split("\"profile\":\"anon:v")
                .nth(1)
                .and_then(|p| p.split('"').next())
                .and_then(|v| v.parse::<u64>().ok());
            if let (Some(t), Some(v)) = (time, visitor) {
                recv.lock().unwrap().insert((v, t), at);
            }
        }
    });
    let engine_addr = source_addr.clone();
    let engine = std::thread::spawn(move || {
        Engine::new(parse_spec(&spec, "latency.toml").unwrap())
            .input(
                "web",
                Input::Tcp {
                    addr: engine_addr,
                    until_disconnect: true,
                },
            )
            .unwrap()
            .output(Output::Tcp(sink_addr))
            .run(timely::Config::process(workers))
            .unwrap()
    });
    let mut client = loop {
        match TcpStream::connect(&source_addr) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    client.set_nodelay(true).unwrap();
    // Send in batches every millisecond (or every event, below 1000/s).
    // Warm-up: one second, or the first round of visitors (whose events
    // create their profiles).
    let warmup = if new_profiles { rate } else { visitors };
    let measured = warmup..warmup + rate * secs;
    // A tail of 200 ms more events, not measured: the last events of a
    // stream wait for the idle watermark (`idle_advance`), which is not the
    // latency of a continuous stream.
    let total = measured.end + rate / 5;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    // (event number, visitor, tick, send instant)
    let mut sent: Vec<(u64, u64, u64, Instant)> = Vec::with_capacity(total as usize);
    let mut buf = String::new();
    let mut i = 0u64;
    while i < total {
        let due = start + interval.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        buf.clear();
        let ts = wall_ms();
        let at = Instant::now();
        // Every event whose due time has passed goes out now.
        while i < total && start + interval.mul_f64(i as f64) <= at {
            let v = visitor(i);
            buf.push_str(&format!(
                "{{\"event\":\"view_item\",\"ts\":{ts},\"anonymous_id\":\"v{v}\"}}\n"
            ));
            sent.push((i, v, ts / 10 * 10, at));
            i += 1;
        }
        client.write_all(buf.as_bytes()).unwrap();
    }
    // Let the last diffs arrive, then end the source.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(client);
    let summary = engine.join().unwrap();
    collector.join().unwrap();
    let received = received.lock().unwrap();
    let mut lat: Vec<f64> = sent
        .iter()
        .filter(|(i, ..)| measured.contains(i))
        .filter_map(|(_, v, tick, at)| {
            received
                .get(&(*v, *tick))
                .map(|r| r.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    let missing = (measured.end - measured.start) as usize - lat.len();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        rate,
        workers,
        new_profiles,
        events: lat.len(),
        missing,
        late: summary.late(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        max: lat.last().copied().unwrap_or(f64::NAN),
    }
}

/// One run's figures (latencies in milliseconds).
#[derive(Clone, Debug)]
pub struct Stats {
    /// Events per second sent.
    pub rate: u64,
    /// Worker threads.
    pub workers: usize,
    /// Whether every event was a new visitor.
    pub new_profiles: bool,
    /// Measured events whose entry diff arrived.
    pub events: usize,
    /// Measured events whose entry diff never arrived.
    pub missing: usize,
    /// Records the engine found late.
    pub late: u64,
    /// Median latency (ms).
    pub p50: f64,
    /// 99th percentile (ms).
    pub p99: f64,
    /// 99.9th percentile (ms).
    pub p999: f64,
    /// Largest latency (ms).
    pub max: f64,
}

impl Stats {
    /// The figures as one JSON object, with `label: true` first.
    pub fn json(&self, label: &str) -> String {
        format!(
            "{{\"{label}\":true,\"rate\":{},\"workers\":{},\"new_profiles\":{},\"events\":{},\"missing\":{},\"late\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2},\"max_ms\":{:.2}}}",
            self.rate, self.workers, self.new_profiles, self.events, self.missing, self.late,
            self.p50, self.p99, self.p999, self.max
        )
    }
}

/// The median of each figure over several runs (counts are summed).
pub fn median(runs: &[Stats]) -> Stats {
    let med = |f: &dyn Fn(&Stats) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    Stats {
        rate: runs[0].rate,
        workers: runs[0].workers,
        new_profiles: runs[0].new_profiles,
        events: runs.iter().map(|r| r.events).sum(),
        missing: runs.iter().map(|r| r.missing).sum(),
        late: runs.iter().map(|r| r.late).sum(),
        p50: med(&|r| r.p50),
        p99: med(&|r| r.p99),
        p999: med(&|r| r.p999),
        max: med(&|r| r.max),
    }
}
