//! Standard formats and the HTTP collection endpoint in `segflow bench`.
//!
//! The generated web events are written as Segment messages
//! ([`crate::generate::segment_message`]: `Product Viewed`, `Product Added`, `Order
//! Completed` with its order, `page`, ...). The `segment` job runs the
//! shipped dataflow on that file with `format = "segment"` (the cost of the
//! format against the `ecommerce` job's JSON lines). The `http` job runs
//! the shipped dataflow in this process with its web source on an HTTP
//! endpoint on loopback, and `clients` threads POST the messages to
//! `/v1/batch`, `batch` messages a request, batches dealt round-robin; it
//! reports the messages per second from the first request to the last
//! answer (an answer means the engine has taken the request in), and the
//! requests' latency. The events are the generated ones, from the past, so
//! this job's definition allows an hour of lateness and idleness: it
//! measures throughput, not the live clock.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::{Engine, Input, Output};

/// Writes `data/web.segment.jsonl` (see
/// [`crate::generate::write_segment_web`]) and an empty
/// `data/transactions.none.jsonl` (orders come from `Order Completed`),
/// once; returns the number of messages.
pub fn write_segment_data(data: &Path) -> std::io::Result<u64> {
    let n = crate::generate::write_segment_web(data)?;
    std::fs::write(data.join("transactions.none.jsonl"), "")?;
    Ok(n)
}

/// The shipped dataflow with its web source in the Segment format.
pub fn segment_dataflow() -> String {
    include_str!("../../dataflows/ecommerce.toml").replace(
        "[sources.web]\nkind = \"web\"\n",
        "[sources.web]\nkind = \"web\"\nformat = \"segment\"\n",
    )
}

/// One run of the `http` job.
#[derive(Debug, serde::Serialize)]
pub struct HttpResult {
    /// Always `"http"`.
    pub job: &'static str,
    /// Worker threads of the engine.
    pub workers: usize,
    /// Client threads.
    pub clients: usize,
    /// Messages per request.
    pub batch: usize,
    /// Messages sent (all answered 200).
    pub messages: u64,
    /// Requests sent.
    pub requests: u64,
    /// From the first request to the last answer, seconds.
    pub seconds: f64,
    /// `messages / seconds`.
    pub messages_per_sec: f64,
    /// Median request latency, milliseconds.
    pub request_p50_ms: f64,
    /// 99th percentile request latency, milliseconds.
    pub request_p99_ms: f64,
    /// Records the engine admitted (a message may be several).
    pub records: u64,
    /// Dead letters (late or unmapped messages).
    pub dead_letters: u64,
}

/// Runs the `http` job once over `data/web.segment.jsonl`.
pub fn run(
    data: &Path,
    workers: usize,
    clients: usize,
    batch: usize,
) -> Result<HttpResult, String> {
    let text = segment_dataflow()
        .replace("allowed_lateness = \"5m\"", "allowed_lateness = \"1h\"")
        .replace("idle_advance = \"1s\"", "idle_advance = \"1h\"");
    let mut spec = crate::spec::parse_spec(&text, "bench-http.toml").map_err(|e| e.to_string())?;
    spec.output = Default::default();
    let messages: Vec<String> = std::fs::read_to_string(data.join("web.segment.jsonl"))
        .map_err(|e| format!("read {}: {e}", data.join("web.segment.jsonl").display()))?
        .lines()
        .map(String::from)
        .collect();
    let addr = super::loopback_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let engine = Engine::new(spec)
        .input(
            "web",
            Input::Http {
                addr: addr.clone(),
                write_key: None,
            },
        )
        .and_then(|e| {
            e.input(
                "crm",
                Input::File {
                    path: data.join("crm.jsonl"),
                    follow: false,
                },
            )
        })
        .and_then(|e| e.input("transactions", Input::Memory(Arc::new(Vec::new()))))
        .map_err(|e| e.to_string())?
        .output(Output::Discard)
        .shutdown_on(Arc::clone(&stop));
    let running = std::thread::spawn(move || engine.run(timely::Config::process(workers)));
    let (_, running) = super::connect_to_run(&addr, "the endpoint", running, &stop)?;
    let bodies: Vec<String> = messages
        .chunks(batch.max(1))
        .map(|c| format!("{{\"batch\":[{}]}}", c.join(",")))
        .collect();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(bodies.len())));
    let bodies = Arc::new(bodies);
    let failure = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let senders: Vec<_> = (0..clients.max(1))
        .map(|c| {
            let (bodies, latencies, failure, addr) = (
                Arc::clone(&bodies),
                Arc::clone(&latencies),
                Arc::clone(&failure),
                addr.clone(),
            );
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let url = format!("http://{addr}/v1/batch");
                for body in bodies.iter().skip(c).step_by(clients.max(1)) {
                    let t = Instant::now();
                    let status = agent
                        .post(&url)
                        .content_type("application/json")
                        .send(body.as_str())
                        .map(|r| r.status().as_u16());
                    match status {
                        Ok(200) => latencies
                            .lock()
                            .expect("latencies")
                            .push(t.elapsed().as_secs_f64() * 1e3),
                        other => {
                            *failure.lock().expect("failure") =
                                Some(format!("a request was answered {other:?}"));
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        let _ = s.join();
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    let summary = running
        .join()
        .map_err(|_| "the engine panicked".to_string())?
        .map_err(|e| e.to_string())?;
    if let Some(f) = failure.lock().expect("failure").take() {
        return Err(f);
    }
    let mut lat = latencies.lock().expect("latencies").clone();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let web = &summary.sources[0];
    Ok(HttpResult {
        job: "http",
        workers,
        clients,
        batch,
        messages: messages.len() as u64,
        requests: bodies.len() as u64,
        seconds,
        messages_per_sec: messages.len() as f64 / seconds,
        request_p50_ms: pct(0.5),
        request_p99_ms: pct(0.99),
        records: summary.records(),
        dead_letters: web.dead_letters,
    })
}
