//! The API under load while the engine ingests (`segflow bench`'s `api`
//! job).
//!
//! The shipped dataflow (with a `hero` content slot, a tick of 100 ms and
//! 200 ms of allowed lateness, as a live page wants) runs in this process
//! with state, its web source on TCP and the API on loopback. A feeder
//! sends `view_item` events stamped with the wall clock at `ingest` events
//! per second over one connection (visitors drawn round-robin from a pool
//! of [`VISITORS`], items at random), so traits, windows and segments work
//! as in production. After a warm-up, a load generator (hyper's HTTP/1
//! client, [`CONNECTIONS`] keep-alive connections driven from one thread)
//! sends `GET /v1/profiles/anon:V` and `GET /v1/decide/hero?id=anon:V`,
//! alternately, at `requests` per second in all, on a fixed schedule (open
//! loop): a request's latency runs from the moment it was due, not from
//! when a connection got round to it, so a stall is counted in full (no
//! coordinated omission). They ask for visitors whose events were sent at
//! least a second before (known profiles, not 404s). The job reports each
//! endpoint's latency percentiles, the rates reached (events admitted per
//! second, answers per second) and how far the committed state trailed the
//! wall clock at the end.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::serve::{Live, ServeConfig, Server};
use crate::{Engine, Input, Output};

/// Distinct visitors the feeder draws from.
pub const VISITORS: u64 = 50_000;

/// Connections the requests are sent over (HTTP/1.1 keep-alive, one
/// request at a time each, as a page server's pool).
pub const CONNECTIONS: usize = 32;

/// One run of the `api` job.
#[derive(Debug, serde::Serialize)]
pub struct ApiResult {
    /// Always `"api"`.
    pub job: &'static str,
    /// Worker threads of the engine.
    pub workers: usize,
    /// Events per second the feeder was asked to send.
    pub ingest_target: u64,
    /// Events the engine admitted per second while requests were measured.
    pub ingested_per_sec: f64,
    /// Requests per second asked for.
    pub requests_target: u64,
    /// Answers per second received while measured.
    pub requests_per_sec: f64,
    /// Measured seconds.
    pub seconds: f64,
    /// Answers other than 200 (should be 0: every visitor asked for was
    /// sent a second before).
    pub not_ok: u64,
    /// `GET /v1/profiles/{identifier}` latency percentiles, ms.
    pub profiles_p50_ms: f64,
    /// See [`ApiResult::profiles_p50_ms`].
    pub profiles_p99_ms: f64,
    /// See [`ApiResult::profiles_p50_ms`].
    pub profiles_p999_ms: f64,
    /// `GET /v1/decide/{slot}` latency percentiles, ms.
    pub decide_p50_ms: f64,
    /// See [`ApiResult::decide_p50_ms`].
    pub decide_p99_ms: f64,
    /// See [`ApiResult::decide_p50_ms`].
    pub decide_p999_ms: f64,
    /// The API's own time for the profile requests measured (from its
    /// latency histogram, `segflow_api_request_duration_seconds`: from
    /// taking a request to its answer), median and 99th percentile, ms:
    /// the upper bound of the bucket they fall in (buckets double from
    /// 0.05 ms; infinite past the last). The client's latency beyond this
    /// is waiting: for a free connection, for a core, in the network.
    pub profiles_handler_p50_ms_at_most: f64,
    /// See [`ApiResult::profiles_handler_p50_ms_at_most`].
    pub profiles_handler_p99_ms_at_most: f64,
    /// The same for the decisions.
    pub decide_handler_p50_ms_at_most: f64,
    /// See [`ApiResult::decide_handler_p50_ms_at_most`].
    pub decide_handler_p99_ms_at_most: f64,
    /// The wall clock minus the committed time at the end, seconds.
    pub commit_lag_s: f64,
    /// Whether the load generator and the feeder ran at real-time priority
    /// (`SCHED_FIFO`, when the process may: root or `CAP_SYS_NICE`), as
    /// clients on other machines would be: their own scheduling delays
    /// on the cores the engine uses are then not counted as the API's.
    pub generator_realtime: bool,
}

const HERO: &str = r#"
[content.hero]
[[content.hero.variants]]
name = "vip"
when = 'vip'
content = "Welcome back"
[[content.hero.variants]]
name = "outdoor"
when = 'outdoor_enthusiast or outdoor_affinity'
content = "New tents"
[[content.hero.variants]]
name = "bargains"
when = 'bargain_hunter and not big_spender'
content = "Deals"
[content.hero.default]
content = "Hello"
"#;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One run: `ingest` events/s and `requests` requests/s for `secs`
/// measured seconds, after `warmup` seconds, on `workers` workers, with
/// the state in `state_dir` (replaced).
///
/// # Errors
///
/// The engine or the API fails, a socket fails.
pub fn run(
    state_dir: &std::path::Path,
    workers: usize,
    ingest: u64,
    requests: u64,
    secs: u64,
    warmup: u64,
) -> Result<ApiResult, String> {
    // Live pages want fresh answers: a tick of 100 ms and 200 ms of
    // lateness, not the shipped 1 s and 5 minutes (made for replays).
    let shipped = include_str!("../../dataflows/ecommerce.toml")
        .replace("tick = \"1s\"", "tick = \"100ms\"")
        .replace("allowed_lateness = \"5m\"", "allowed_lateness = \"200ms\"")
        .replace("idle_advance = \"1s\"", "idle_advance = \"200ms\"");
    let text = format!("{shipped}{HERO}");
    let mut spec = crate::spec::parse_spec(&text, "bench-api.toml").map_err(|e| e.to_string())?;
    spec.output = Default::default();
    let live = Live::new(Arc::new(spec.clone()));
    let server = Server::start(
        &ServeConfig {
            addr: "127.0.0.1:0".into(),
            token: "bench".into(),
        },
        Arc::clone(&live),
    )
    .map_err(|e| e.to_string())?;
    let addr = super::loopback_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let engine = Engine::new(spec)
        .input(
            "web",
            Input::Tcp {
                addr: addr.clone(),
                until_disconnect: false,
            },
        )
        .and_then(|e| e.input("crm", Input::Memory(Arc::new(Vec::new()))))
        .and_then(|e| e.input("transactions", Input::Memory(Arc::new(Vec::new()))))
        .map_err(|e| e.to_string())?
        .output(Output::Discard)
        .state_dir(state_dir)
        .reset(true)
        .serve(Arc::clone(&live))
        .nice(10)
        .shutdown_on(Arc::clone(&stop));
    let running = std::thread::spawn(move || engine.run(timely::Config::process(workers)));
    let (mut socket, running) = super::connect_to_run(&addr, "the web source", running, &stop)?;
    // The feeder: `ingest` events a second, in slices of a millisecond.
    let feeding = Arc::new(AtomicBool::new(true));
    // Events sent so far (visitor `i % VISITORS` is the `i`th's).
    let fed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let feeder = {
        let (feeding, fed) = (Arc::clone(&feeding), Arc::clone(&fed));
        std::thread::spawn(move || -> Result<(), String> {
            realtime_this_thread();
            let started = Instant::now();
            let mut sent = 0u64;
            let mut seed = 0x2545_F491_4F6C_DD1Du64;
            let categories = ["outdoor", "books", "fashion", "home", "toys", "beauty"];
            let mut buf = Vec::with_capacity(64 << 10);
            while feeding.load(Ordering::SeqCst) {
                let due = (started.elapsed().as_secs_f64() * ingest as f64) as u64;
                if due <= sent {
                    std::thread::sleep(Duration::from_micros(500));
                    continue;
                }
                let ts = crate::time::wall_clock_ms();
                buf.clear();
                for i in sent..due.min(sent + 10_000) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let visitor = i % VISITORS;
                    let price = 5 + seed % 600;
                    let category = categories[(seed >> 20) as usize % categories.len()];
                    let _ = writeln!(
                        buf,
                        r#"{{"event":"view_item","ts":{ts},"anonymous_id":"v{visitor}","item":{{"id":"i{}","price":{price},"category":"{category}"}},"context":{{"session_id":"s{visitor}","device":"mobile"}}}}"#,
                        seed % 5000
                    );
                }
                sent = due.min(sent + 10_000);
                socket
                    .write_all(&buf)
                    .map_err(|e| format!("feeding the web source: {e}"))?;
                fed.store(sent, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_secs(warmup));
    let records = |live: &Live| -> u64 {
        live.counters_with_clocks()
            .1
            .iter()
            .map(|(s, _)| s.records)
            .sum()
    };
    let before = records(&live);
    let metrics_before = live.render_metrics();
    // The requests ask for visitors whose events were sent a second or
    // more ago (committed by now: tick + lateness are 0.3 s), so that
    // they are answered from a profile, not with a cheap 404.
    let known = fed
        .load(Ordering::SeqCst)
        .saturating_sub(ingest)
        .clamp(1, VISITORS);
    // The clients: request k is due at k / requests seconds.
    let started = Instant::now();
    let (mut profiles, mut decide, not_ok) =
        open_loop(&server.local_addr(), requests, secs, known, started)?;
    let seconds = started.elapsed().as_secs_f64();
    let after = records(&live);
    let metrics_after = live.render_metrics();
    let handler = |endpoint: &str, q: f64| {
        handler_quantile(&metrics_before, &metrics_after, endpoint, q).unwrap_or(f64::NAN)
    };
    let commit_lag_s = live.segments_as_of().lag_ms.unwrap_or(i64::MAX) as f64 / 1000.0;
    feeding.store(false, Ordering::SeqCst);
    let fed = feeder
        .join()
        .map_err(|_| "the feeder panicked".to_string())?;
    stop.store(true, Ordering::SeqCst);
    running
        .join()
        .map_err(|_| "the engine panicked".to_string())?
        .map_err(|e| e.to_string())?;
    fed?;
    drop(server);
    profiles.sort_by(|a, b| a.total_cmp(b));
    decide.sort_by(|a, b| a.total_cmp(b));
    Ok(ApiResult {
        job: "api",
        workers,
        ingest_target: ingest,
        ingested_per_sec: (after - before) as f64 / seconds,
        requests_target: requests,
        requests_per_sec: (profiles.len() + decide.len()) as f64 / seconds,
        seconds,
        not_ok,
        profiles_p50_ms: pct(&profiles, 0.5),
        profiles_p99_ms: pct(&profiles, 0.99),
        profiles_p999_ms: pct(&profiles, 0.999),
        decide_p50_ms: pct(&decide, 0.5),
        decide_p99_ms: pct(&decide, 0.99),
        decide_p999_ms: pct(&decide, 0.999),
        profiles_handler_p50_ms_at_most: handler(PROFILES, 0.5),
        profiles_handler_p99_ms_at_most: handler(PROFILES, 0.99),
        decide_handler_p50_ms_at_most: handler(DECIDE, 0.5),
        decide_handler_p99_ms_at_most: handler(DECIDE, 0.99),
        commit_lag_s,
        generator_realtime: realtime_this_thread_allowed(),
    })
}

/// The endpoints as the API's metrics name them (their routes).
const PROFILES: &str = "/v1/profiles/{identifier}";
/// See [`PROFILES`].
const DECIDE: &str = "/v1/decide/{slot}";

/// The `q` quantile (0..=1) of the API's own time for `endpoint`'s
/// requests between two renderings of the metrics (Prometheus text,
/// [`Live::render_metrics`]), ms: the upper bound (`le`) of the first
/// bucket of `segflow_api_request_duration_seconds` whose count since
/// `before` reaches `q` of the requests, infinite for the `+Inf` bucket;
/// `None` without requests.
fn handler_quantile(before: &str, after: &str, endpoint: &str, q: f64) -> Option<f64> {
    // (le in seconds, cumulative count) of the endpoint's buckets.
    let buckets = |text: &str| -> Vec<(f64, f64)> {
        let mut out: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("segflow_api_request_duration_seconds_bucket{")?;
                let (labels, count) = rest.split_once("} ")?;
                let label = |name: &str| {
                    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
                    let end = labels[start..].find('"')? + start;
                    Some(&labels[start..end])
                };
                if label("endpoint")? != endpoint {
                    return None;
                }
                let le = match label("le")? {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    };
    let (then, now) = (buckets(before), buckets(after));
    let since = |le: f64| {
        let at = |b: &[(f64, f64)]| b.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, c)| *c);
        at(&now) - at(&then)
    };
    let total = since(f64::INFINITY);
    if total <= 0.0 {
        return None;
    }
    now.iter()
        .find(|(le, _)| since(*le) >= q * total)
        .map(|(le, _)| le * 1e3)
}

/// Profile and decision latencies (ms), and the answers other than 200.
type Latencies = (Vec<f64>, Vec<f64>, u64);

/// Sends `requests` a second for `secs` seconds to the API at `addr`, open
/// loop: request `k` is due at `started + k / requests` s and its latency
/// runs from then (a stall counts in full, no coordinated omission). The
/// requests go over [`CONNECTIONS`] keep-alive connections driven from one
/// thread; each takes the next request due when it is free, so a slow
/// answer holds up only what waits for a free connection. A second thread
/// releases each request when it is due (a thread's sleep is precise to
/// about 0.1 ms; tokio's timer to 1 ms, which would count as latency). Even `k` asks
/// for a profile, odd `k` for a decision, for visitor `k * 7919 mod
/// known`. Returns both latency lists (ms) and the answers other than 200.
fn open_loop(
    addr: &std::net::SocketAddr,
    requests: u64,
    secs: u64,
    known: u64,
    started: Instant,
) -> Result<Latencies, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("the load generator's runtime: {e}"))?;
    let total = requests * secs;
    let due_at = move |k: u64| started + Duration::from_secs_f64(k as f64 / requests as f64);
    // The requests due, released on time by the pacer thread.
    let (release, released) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let pacer = std::thread::spawn(move || {
        realtime_this_thread();
        for k in 0..total {
            if let Some(wait) = due_at(k).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if release.send(k).is_err() {
                break;
            }
        }
    });
    let released = Arc::new(tokio::sync::Mutex::new(released));
    let latencies: Arc<Mutex<Latencies>> = Arc::default();
    let addr = *addr;
    let generator = std::thread::spawn({
        let latencies = Arc::clone(&latencies);
        move || {
            realtime_this_thread();
            runtime.block_on(async {
                let mut tasks = Vec::new();
                for _ in 0..CONNECTIONS {
                    let (released, latencies) = (Arc::clone(&released), Arc::clone(&latencies));
                    tasks.push(tokio::spawn(async move {
                        let stream = tokio::net::TcpStream::connect(addr)
                            .await
                            .map_err(|e| format!("connecting to the API: {e}"))?;
                        let _ = stream.set_nodelay(true);
                        let (mut sender, conn) = hyper::client::conn::http1::handshake(
                            hyper_util::rt::TokioIo::new(stream),
                        )
                        .await
                        .map_err(|e| format!("connecting to the API: {e}"))?;
                        tokio::spawn(conn);
                        let (mut profiles, mut decide, mut not_ok) = (Vec::new(), Vec::new(), 0u64);
                        loop {
                            let Some(k) = released.lock().await.recv().await else {
                                break;
                            };
                            let due = due_at(k);
                            let visitor = (k * 7919) % known;
                            let path = if k % 2 == 0 {
                                format!("/v1/profiles/anon:v{visitor}")
                            } else {
                                format!("/v1/decide/hero?id=anon:v{visitor}")
                            };
                            let request = hyper::Request::get(path)
                                .header("host", addr.to_string())
                                .header("authorization", "Bearer bench")
                                .body(Empty::<Bytes>::new())
                                .map_err(|e| e.to_string())?;
                            let answer = sender
                                .send_request(request)
                                .await
                                .map_err(|e| format!("a request to the API: {e}"))?;
                            let ok = answer.status() == 200;
                            answer
                                .into_body()
                                .collect()
                                .await
                                .map_err(|e| format!("an answer of the API: {e}"))?;
                            let ms = due.elapsed().as_secs_f64() * 1e3;
                            not_ok += u64::from(!ok);
                            match k % 2 {
                                0 => profiles.push(ms),
                                _ => decide.push(ms),
                            }
                        }
                        let mut l = latencies.lock().map_err(|_| "latencies".to_string())?;
                        l.0.extend(profiles);
                        l.1.extend(decide);
                        l.2 += not_ok;
                        Ok::<(), String>(())
                    }));
                }
                for t in tasks {
                    t.await.map_err(|e| e.to_string())??;
                }
                Ok::<(), String>(())
            })
        }
    });
    let generated = generator
        .join()
        .map_err(|_| "the load generator panicked".to_string());
    let _ = pacer.join();
    generated??;
    let taken = std::mem::take(&mut *latencies.lock().map_err(|_| "latencies".to_string())?);
    Ok(taken)
}

/// Puts the calling thread at real-time priority (`SCHED_FIFO` 10) if
/// the process may; whether it did.
fn realtime_this_thread() -> bool {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` outlives the call; 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// Whether [`realtime_this_thread`] succeeds here (tried on a short-lived
/// thread).
fn realtime_this_thread_allowed() -> bool {
    std::thread::spawn(realtime_this_thread)
        .join()
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_quantiles_come_from_the_buckets_counted_between_two_renderings() {
        let text = |counts: [u64; 4], other: u64| {
            let les = ["0.0001", "0.0002", "0.0004", "+Inf"];
            let mut t = String::from("# TYPE segflow_api_request_duration_seconds histogram\n");
            for (le, c) in les.iter().zip(counts) {
                t.push_str(&format!(
                    "segflow_api_request_duration_seconds_bucket{{le=\"{le}\",endpoint=\"/v1/profiles/{{identifier}}\"}} {c}\n"
                ));
                t.push_str(&format!(
                    "segflow_api_request_duration_seconds_bucket{{le=\"{le}\",endpoint=\"/v1/decide/{{slot}}\"}} {other}\n"
                ));
            }
            t
        };
        // Before: 10 requests, all under 0.1 ms. Since: 100 more, 50 under
        // 0.1 ms, 45 in (0.1, 0.2], 4 in (0.2, 0.4], 1 beyond.
        let before = text([10, 10, 10, 10], 7);
        let after = text([60, 105, 109, 110], 7);
        let q = |q| handler_quantile(&before, &after, PROFILES, q);
        assert_eq!(q(0.5), Some(0.1));
        assert_eq!(q(0.51), Some(0.2));
        assert_eq!(q(0.99), Some(0.4));
        assert_eq!(q(1.0), Some(f64::INFINITY));
        // No request of the other endpoint since.
        assert_eq!(handler_quantile(&before, &after, DECIDE, 0.5), None);
    }
}
