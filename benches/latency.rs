//! Event-to-diff latency on a live TCP source.
//!
//! The engine runs with a TCP source and a TCP sink (`tick = "10ms"`,
//! `allowed_lateness = "0s"`, two workers). A client sends `view_item`
//! events stamped with the current wall clock at a fixed rate, each for a
//! new visitor, so each event makes exactly one segment entry; a collector
//! reads the diffs from the sink. The latency of an event is the time from
//! just before its line is written to the socket until its diff line is
//! read from the sink. The first second of each run is warm-up and not
//! counted.
//!
//! `cargo bench --bench latency` prints, per rate, one JSON line:
//! `{"rate":1000,"events":..,"p50_ms":..,"p99_ms":..,"p999_ms":..,"max_ms":..}`.
//! Arguments (after `--`): the rates (default `1000 10000`) and
//! `--secs N` (default 10) for the measured duration of each rate.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use segflow::spec::parse_spec;
use segflow::{Engine, Input, Output};

const SPEC: &str = r#"
[engine]
tick = "10ms"
allowed_lateness = "0s"
idle_advance = "100ms"

[sources.web]

[traits.views]
stream = "web"
filter = 'event == "view_item"'

[segments.viewer]
when = "views >= 1"
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

fn run(rate: u64, secs: u64, workers: usize) -> String {
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let source_addr = source.local_addr().unwrap().to_string();
    drop(source);
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink.local_addr().unwrap().to_string();
    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let recv = Arc::clone(&received);
    let collector = std::thread::spawn(move || {
        let (stream, _) = sink.accept().unwrap();
        for line in BufReader::new(stream).lines() {
            let line = line.unwrap();
            let at = Instant::now();
            if let Some(p) = line.split("\"profile\":\"anon:v").nth(1) {
                let id = p.split('"').next().unwrap().to_string();
                recv.lock().unwrap().insert(id, at);
            }
        }
    });
    let engine_addr = source_addr.clone();
    let engine = std::thread::spawn(move || {
        Engine::new(parse_spec(SPEC, "latency.toml").unwrap())
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
    let warmup = rate; // one second
    let total = warmup + rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut sent: Vec<(u64, Instant)> = Vec::with_capacity(total as usize);
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
            buf.push_str(&format!(
                "{{\"event\":\"view_item\",\"ts\":{ts},\"anonymous_id\":\"v{i}\"}}\n"
            ));
            sent.push((i, at));
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
        .filter(|(i, _)| *i >= warmup)
        .filter_map(|(i, at)| {
            received
                .get(&i.to_string())
                .map(|r| r.duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    let missing = (total - warmup) as usize - lat.len();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "{{\"rate\":{rate},\"workers\":{workers},\"events\":{},\"missing\":{missing},\"late\":{},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"p999_ms\":{:.2},\"max_ms\":{:.2}}}",
        lat.len(),
        summary.late(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat.last().copied().unwrap_or(f64::NAN),
    )
}

fn main() {
    let mut rates = Vec::new();
    let mut secs = 10;
    let mut workers = 2;
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).expect("--secs N"),
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--workers N")
            }
            "--bench" => bench = true,
            other => match other.parse::<u64>() {
                Ok(r) => rates.push(r),
                Err(_) => {} // cargo's own flags
            },
        }
    }
    if !bench {
        // `cargo test --all-targets` runs this without `--bench`: a short
        // smoke run that fails if any event is lost or late.
        let line = run(1_000, 1, workers);
        println!("{line}");
        assert!(line.contains("\"missing\":0,\"late\":0,"), "{line}");
        return;
    }
    if rates.is_empty() {
        rates = vec![1_000, 10_000];
    }
    for rate in rates {
        println!("{}", run(rate, secs, workers));
    }
}
