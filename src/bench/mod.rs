//! `segflow bench`: named jobs over generated data, measured end to end.
//!
//! The data is generated first (not timed) with [`crate::generate`]. Each
//! job is then run as a child `segflow run` process, `repeat` times per
//! worker count, and reported as one JSON object per job and worker count
//! with the median of each figure:
//!
//! - `records_per_sec_per_worker`: records admitted ÷ the run's own elapsed
//!   time (reading, decoding, the dataflow, diffs written and state
//!   committed and flushed) ÷ workers;
//! - `peak_rss_mb`: the child's peak resident set size in MiB (`ru_maxrss` from
//!   `wait4(2)`), and `rss_bytes_per_profile` (peak RSS ÷ profiles);
//! - `state_bytes` (the state directory's size after the run) and
//!   `state_bytes_per_profile`.
//!
//! Then one object per job with `speedup` (median time at the smallest
//! worker count ÷ median time at the largest). The `latency` job measures
//! event-to-diff latency on a live TCP source ([`latency`]); the `query`
//! job writes the state of `--query-profiles` synthetic profiles (five
//! identifiers, two attributes, three traits and a segment each) and times
//! `segflow query` processes looking up random identifiers. The `memory`
//! job (not run by default) runs each dataflow job at `-w 1` on the data
//! and on a data set an eighth of its size, and reports the peak RSS each
//! additional profile costs: the slope, without the fixed memory of any
//! run. The `resume` job (not run by default) kills the shipped dataflow's
//! run half-way with SIGKILL and times the run that resumes it, checking
//! that its outputs equal an uninterrupted run's.

pub mod api;
pub mod http;
pub mod kafka;
pub mod latency;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::io::sinks::RunSummary;

/// A loopback address (`127.0.0.1:PORT`) that was free a moment ago, for
/// an input of an engine run in this process.
fn loopback_addr() -> Result<String, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .map_err(|e| e.to_string())
}

/// An engine run in a thread of this process.
type Running = std::thread::JoinHandle<Result<RunSummary, crate::EngineError>>;

/// A connection to `addr`, which the engine run `running` listens on once
/// its dataflow is built, within 30 s. Otherwise the run is stopped
/// (`stop`) and the error is the run's, or that `addr` (`what`) did not
/// start.
fn connect_to_run(
    addr: &str,
    what: &str,
    running: Running,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(std::net::TcpStream, Running), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => return Ok((s, running)),
            Err(_) if std::time::Instant::now() < deadline && !running.is_finished() => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(match running.join() {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("{what} {addr} did not start within 30 s: {e}"),
                });
            }
        }
    }
}

/// A job: a dataflow definition run over some of the generated files.
pub struct Job {
    /// The job's name, as given to `--jobs`.
    pub name: &'static str,
    /// The dataflow definition (TOML text).
    pub dataflow: &'static str,
    /// What it measures.
    pub about: &'static str,
    /// The sources it reads: `(source name, generated file)`.
    pub inputs: &'static [(&'static str, &'static str)],
}

/// The jobs `segflow bench` knows, besides `latency`.
pub const JOBS: [Job; 2] = [
    Job {
        name: "ecommerce",
        dataflow: include_str!("../../dataflows/ecommerce.toml"),
        about: "the shipped dataflow: three streams, identity resolution, twenty traits (sliding, tumbling and session windows, sequences, recencies), seventeen segments, RocksDB state",
        inputs: &[
            ("web", "web.jsonl"),
            ("crm", "crm.jsonl"),
            ("transactions", "transactions.jsonl"),
        ],
    },
    Job {
        name: "visitor_high_intent",
        dataflow: include_str!("../../dataflows/visitor_high_intent.toml"),
        about: "per anonymous visitor, a 30-minute sliding count of views priced >= 100, segment at >= 3 (no identity, no state)",
        inputs: &[("web", "web.jsonl")],
    },
];

/// What `segflow bench` runs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Web events to generate.
    pub events: u64,
    /// Generator seed.
    pub seed: u64,
    /// Where the data, outputs and state go (kept afterwards).
    pub dir: PathBuf,
    /// Job names (from [`JOBS`], or `latency`).
    pub jobs: Vec<String>,
    /// Worker counts to run each job with.
    pub workers: Vec<usize>,
    /// Runs per job and worker count.
    pub repeat: usize,
    /// Measured seconds per latency run.
    pub latency_secs: u64,
    /// Profiles in the state the `query` job looks up.
    pub query_profiles: u64,
    /// The data sets of the `restart` job: web events of each, with five
    /// people to draw visitors from per three events (about a third of
    /// the events' count in profiles).
    pub restart_events: Vec<u64>,
    /// A running Kafka-API broker (`host:port`) for the `kafka` job.
    pub kafka: Option<String>,
    /// The `api` job's events per second fed to the engine, and requests
    /// per second sent to its API.
    pub api_rates: (u64, u64),
    /// Set (by SIGTERM or Ctrl-C) to stop: the running child is stopped
    /// and the bench ends with [`BenchError::Interrupted`].
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// The medians of one job at one worker count.
#[derive(Clone, Debug, Serialize)]
pub struct JobResult {
    /// The job.
    pub job: String,
    /// Worker threads.
    pub workers: usize,
    /// Runs the medians are taken over.
    pub runs: usize,
    /// Records admitted (all sources).
    pub records: u64,
    /// Profiles at the end.
    pub profiles: i64,
    /// Median elapsed seconds of a run.
    pub seconds: f64,
    /// Records per second, per worker.
    pub records_per_sec_per_worker: f64,
    /// Median peak resident set size, MiB.
    pub peak_rss_mb: f64,
    /// Peak RSS ÷ profiles, bytes.
    pub rss_bytes_per_profile: f64,
    /// Size of the state directory after the run, bytes (0 without state).
    pub state_bytes: u64,
    /// State bytes ÷ profiles.
    pub state_bytes_per_profile: f64,
}

/// Errors of `segflow bench`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A job name that does not exist.
    #[error(
        "unknown job `{0}`; the jobs are: ecommerce, visitor_high_intent, segment, http, kafka, latency, query, memory, resume, restart"
    )]
    UnknownJob(String),
    /// Generating data, writing a file or starting a run failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Another `segflow bench` uses the directory.
    #[error("{0} is in use by another segflow bench; wait for it or give another --dir")]
    Busy(String),
    /// The directory holds files the bench did not write.
    #[error(
        "{dir} holds files segflow bench did not write (found {found}); give a new or empty --dir"
    )]
    NotOurs {
        /// The directory.
        dir: String,
        /// What is in it.
        found: String,
    },
    /// Stopped by a signal.
    #[error(
        "interrupted (SIGTERM or Ctrl-C); the results above are complete, the rest was not run"
    )]
    Interrupted,
    /// The query job failed.
    #[error("job query: {0}")]
    Query(String),
    /// A run failed.
    #[error("job {job} with -w {workers} failed: {reason}")]
    Run {
        /// The job.
        job: String,
        /// Worker threads.
        workers: usize,
        /// Its standard error, or why its summary could not be read.
        reason: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// Total size in bytes of the files under `dir` (0 if it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Runs `segflow` (the running executable) with `args`; returns its
/// standard output and peak RSS in KiB. When `stop` is set meanwhile, the
/// child is stopped (SIGTERM) and `Err(None)` returned.
fn run_child(
    args: &[String],
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<(std::process::Output, u64), Option<String>> {
    use std::os::unix::process::ExitStatusExt;
    let exe =
        std::env::current_exe().map_err(|e| Some(format!("cannot find segflow itself: {e}")))?;
    let child = Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Some(format!("cannot start segflow: {e}")))?;
    let pid = child.id() as libc::pid_t;
    // Read the pipes on threads while waiting with wait4 for the rusage.
    let mut child = child;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let mut status = 0;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut stopping = false;
    loop {
        // SAFETY: `pid` is our child, not yet reaped; both pointers are to
        // live locals.
        let waited = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if waited == pid {
            break;
        }
        if waited != 0 {
            return Err(Some(format!(
                "waiting for segflow failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        if !stopping && stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            stopping = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Ctrl-C reaches the child too (one process group): a run that ended
    // because of it is no measurement.
    if stopping || stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
        return Err(None);
    }
    let output = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    };
    // `ru_maxrss` is in KiB on Linux.
    Ok((output, usage.ru_maxrss.max(0) as u64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes `job`'s definition into `dir`; returns its path.
fn write_flow(job: &Job, dir: &Path) -> Result<PathBuf, BenchError> {
    let flow = dir.join(format!("{}.toml", job.name));
    std::fs::write(&flow, job.dataflow).map_err(io_err(format!("write {}", flow.display())))?;
    Ok(flow)
}

/// The arguments of one `segflow run --json` of `flow` over `job`'s files
/// in `data`, writing `out/<stem>.jsonl`, `out/<stem>.dead.jsonl` and, with
/// `state`, the state directory `out/<stem>.state`, started over if
/// `reset`.
fn run_args(
    job: &Job,
    flow: &Path,
    workers: usize,
    data: &Path,
    out: &Path,
    stem: &str,
    state: bool,
    reset: bool,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        flow.display().to_string(),
        "-w".into(),
        workers.to_string(),
        "--json".into(),
    ];
    let mut files = vec![("--output", "jsonl"), ("--dead-letter", "dead.jsonl")];
    if state {
        files.push(("--state-dir", "state"));
    }
    for (flag, suffix) in files {
        args.push(flag.into());
        args.push(out.join(format!("{stem}.{suffix}")).display().to_string());
    }
    if state && reset {
        args.push("--reset".into());
    }
    for (source, file) in job.inputs {
        args.push("--input".into());
        if file.starts_with("kafka://") {
            args.push(format!("{source}={file}"));
        } else {
            args.push(format!("{source}={}", data.join(file).display()));
        }
    }
    args
}

/// Runs `args` as a child `segflow run --json`: its summary and peak RSS
/// (KiB); a failed run is `failed(its reason)`.
fn run_summary(
    args: &[String],
    stop: Option<&std::sync::atomic::AtomicBool>,
    failed: &dyn Fn(String) -> BenchError,
) -> Result<(RunSummary, u64), BenchError> {
    let (output, rss_kb) = match run_child(args, stop) {
        Ok(r) => r,
        Err(None) => return Err(BenchError::Interrupted),
        Err(Some(reason)) => return Err(failed(reason)),
    };
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let err = err.trim();
        return Err(failed(
            err.strip_prefix("error: ").unwrap_or(err).to_string(),
        ));
    }
    let summary = serde_json::from_slice(&output.stdout)
        .map_err(|e| failed(format!("unreadable summary: {e}")))?;
    Ok((summary, rss_kb))
}

/// Runs `job` on `workers` workers `repeat` times over the data in
/// `dir/data`.
fn run_job(
    job: &Job,
    workers: usize,
    repeat: usize,
    dir: &Path,
    data: &Path,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<JobResult, BenchError> {
    let flow = write_flow(job, dir)?;
    let failed = |reason: String| BenchError::Run {
        job: job.name.to_string(),
        workers,
        reason,
    };
    let mut runs = Vec::new();
    for _ in 0..repeat {
        let out = dir.join("out");
        // Each run starts over (`--reset`): the state directory of an
        // earlier run is replaced by `segflow run` itself, which refuses
        // anything it did not create.
        let stem = format!("{}-w{workers}", job.name);
        let state = out.join(format!("{stem}.state"));
        let stateful = job.dataflow.contains("state_dir");
        let args = run_args(job, &flow, workers, data, &out, &stem, stateful, true);
        let (summary, rss_kb) = run_summary(&args, stop, &failed)?;
        let state_bytes = if stateful { dir_bytes(&state) } else { 0 };
        runs.push((summary, rss_kb, state_bytes));
    }
    let (summary, _, _) = &runs[0];
    let records = summary.records();
    let profiles = summary.profiles;
    let seconds = median(runs.iter().map(|r| r.0.elapsed_secs).collect());
    let rss_bytes = median(runs.iter().map(|r| r.1 as f64 * 1024.0).collect());
    let state_bytes = median(runs.iter().map(|r| r.2 as f64).collect()) as u64;
    let per_profile = |bytes: f64| {
        if profiles > 0 {
            bytes / profiles as f64
        } else {
            0.0
        }
    };
    Ok(JobResult {
        job: job.name.to_string(),
        workers,
        runs: repeat,
        records,
        profiles,
        seconds,
        records_per_sec_per_worker: records as f64 / seconds / workers as f64,
        peak_rss_mb: rss_bytes / (1 << 20) as f64,
        rss_bytes_per_profile: per_profile(rss_bytes),
        state_bytes,
        state_bytes_per_profile: per_profile(state_bytes as f64),
    })
}

/// The `memory` job's line for `job`: its runs on the small (`few`) and
/// the full (`many`) data set at `-w 1`, and the peak RSS each additional
/// profile costs, `(rss_many - rss_few) / (profiles_many - profiles_few)`
/// in bytes (null when the profile counts are equal).
fn memory_line(job: &str, few: &JobResult, many: &JobResult) -> String {
    let added = many.profiles - few.profiles;
    let per_profile =
        (added > 0).then(|| (many.peak_rss_mb - few.peak_rss_mb) * (1 << 20) as f64 / added as f64);
    serde_json::json!({
        "job": "memory",
        "of": job,
        "workers": 1,
        "small": {"profiles": few.profiles, "peak_rss_mb": few.peak_rss_mb},
        "large": {"profiles": many.profiles, "peak_rss_mb": many.peak_rss_mb},
        "rss_bytes_per_added_profile": per_profile,
    })
    .to_string()
}

/// The `resume` job: `job` run to its end once (the reference), then, `repeat`
/// times, started afresh, killed with SIGKILL half-way through (by the
/// reference's time) and run again, which resumes from its checkpoint.
/// Reports the median time of the resumed run (the restart: it reads the
/// inputs again from their start), the diffs it wrote, and whether every
/// resumed run's segment and dead-letter files were byte-identical to the
/// reference's.
fn resume_job(
    job: &Job,
    workers: usize,
    repeat: usize,
    dir: &Path,
    data: &Path,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<String, BenchError> {
    let flow = write_flow(job, dir)?;
    let failed = |reason: String| BenchError::Run {
        job: "resume".to_string(),
        workers,
        reason,
    };
    let out = dir.join("out");
    let args = |name: &str, reset: bool| {
        let stem = format!("resume-{name}-w{workers}");
        run_args(job, &flow, workers, data, &out, &stem, true, reset)
    };
    let (reference, _) = run_summary(&args("reference", true), stop, &failed)?;
    let run_secs = reference.elapsed_secs;
    let kill_after = std::time::Duration::from_secs_f64(run_secs / 2.0);
    let exe = std::env::current_exe().map_err(io_err("find segflow itself"))?;
    let (mut restarts, mut rewritten, mut identical) = (Vec::new(), Vec::new(), true);
    for _ in 0..repeat {
        let mut child = Command::new(&exe)
            .args(args("crashed", true))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(io_err("start segflow"))?;
        std::thread::sleep(kill_after);
        let _ = child.kill();
        let _ = child.wait();
        let (s, _) = run_summary(&args("crashed", false), stop, &failed)?;
        restarts.push(s.elapsed_secs);
        rewritten.push(s.diffs_written as f64);
        for suffix in ["jsonl", "dead.jsonl"] {
            let read =
                |name: &str| std::fs::read(out.join(format!("resume-{name}-w{workers}.{suffix}")));
            identical &= matches!((read("reference"), read("crashed")), (Ok(a), Ok(b)) if a == b);
        }
    }
    Ok(serde_json::json!({
        "job": "resume",
        "of": job.name,
        "workers": workers,
        "runs": repeat,
        "run_secs": run_secs,
        "killed_after_secs": kill_after.as_secs_f64(),
        "restart_secs": median(restarts),
        "diffs_written_after_restart": median(rewritten),
        "diffs_of_the_run": reference.diffs_written,
        "identical": identical,
    })
    .to_string())
}

/// The `restart` job: `job` run to its end over `data` (`events` web
/// events) from an empty state (`run_secs`: what a restart that reads the
/// inputs again costs), then `repeat` times run again on the same inputs,
/// which restores the checkpoint's retained input and reads only what
/// follows its points (`restart_secs`, median). Reports the profiles, the
/// retained entries restored, the state's size and whether the outputs
/// stayed byte-identical.
fn restart_job(
    job: &Job,
    workers: usize,
    repeat: usize,
    dir: &Path,
    data: &Path,
    events: u64,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<String, BenchError> {
    let flow = write_flow(job, dir)?;
    let failed = |reason: String| BenchError::Run {
        job: "restart".to_string(),
        workers,
        reason,
    };
    let out = dir.join("out");
    let stem = format!("restart-{events}-w{workers}");
    let args = |reset: bool| run_args(job, &flow, workers, data, &out, &stem, true, reset);
    let (first, first_rss) = run_summary(&args(true), stop, &failed)?;
    let read = |suffix: &str| std::fs::read(out.join(format!("{stem}.{suffix}"))).ok();
    let before = (read("jsonl"), read("dead.jsonl"));
    let (mut restarts, mut rss, mut restored, mut identical) = (Vec::new(), Vec::new(), 0, true);
    for _ in 0..repeat {
        let (s, kb) = run_summary(&args(false), stop, &failed)?;
        restarts.push(s.elapsed_secs);
        rss.push(kb as f64 / 1024.0);
        restored = s.restored.map_or(0, |(_, entries)| entries);
        identical &= (read("jsonl"), read("dead.jsonl")) == before && s.diffs_written == 0;
    }
    let state_bytes = dir_bytes(&out.join(format!("{stem}.state")));
    Ok(serde_json::json!({
        "job": "restart",
        "of": job.name,
        "workers": workers,
        "runs": repeat,
        "events": events,
        "profiles": first.profiles,
        "run_secs": first.elapsed_secs,
        "run_peak_rss_mb": first_rss as f64 / 1024.0,
        "restart_secs": median(restarts),
        "restart_peak_rss_mb": median(rss),
        "restored_entries": restored,
        "state_bytes": state_bytes,
        "identical": identical,
    })
    .to_string())
}

/// Writes the state of `profiles` synthetic profiles under `dir/query.state`
/// and times `segflow query` on random identifiers of them (`21 × repeat`
/// lookups, each a new process, as an operator runs it); returns the
/// result as a JSON line.
fn query_job(
    dir: &Path,
    profiles: u64,
    repeat: usize,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<String, BenchError> {
    use crate::store::{Checkpoint, StateBatch, StateLock, Store, StoreOp};
    // Replaced if segflow wrote it, refused otherwise.
    let state = dir.join("query.state");
    let store_err = |e: crate::store::StoreError| BenchError::Query(e.to_string());
    let started = std::time::Instant::now();
    {
        let lock = StateLock::take(&state).map_err(store_err)?;
        let store = Store::create_fresh(&state, &lock).map_err(store_err)?;
        let mut batch = StateBatch::default();
        for p in 0..profiles {
            let profile = format!("crm:C{p:08}");
            let mut ops = Vec::with_capacity(12);
            for id in [
                profile.clone(),
                format!("user:u{p}"),
                format!("email:person{p}@example.com"),
                format!("phone:+1555{p:07}"),
                format!("anon:a-{p:016x}"),
            ] {
                ops.push((
                    StoreOp::Link {
                        id,
                        profile: profile.clone(),
                    },
                    1,
                ));
            }
            for (name, value) in [("views_30m", 3.0), ("spend_30d", 120.5), ("orders", 2.0)] {
                ops.push((
                    StoreOp::Trait {
                        profile: profile.clone(),
                        name: name.into(),
                        value: crate::model::Scalar::Num(value),
                    },
                    1,
                ));
            }
            ops.push((
                StoreOp::Attributes {
                    profile: profile.clone(),
                    json: r#"{"country":"US","tier":"gold"}"#.into(),
                },
                1,
            ));
            ops.push((
                StoreOp::Segment {
                    profile,
                    name: "vip".into(),
                },
                1,
            ));
            batch.stage(&ops);
            if (p + 1) % 50_000 == 0 {
                if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                    return Err(BenchError::Interrupted);
                }
                store
                    .write(std::mem::take(&mut batch), &Checkpoint::default())
                    .map_err(store_err)?;
            }
        }
        store
            .write(batch, &Checkpoint::default())
            .map_err(store_err)?;
        store.flush().map_err(store_err)?;
    }
    let write_seconds = started.elapsed().as_secs_f64();
    let state_bytes = dir_bytes(&state);
    let mut times = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..21 * repeat.max(1) {
        // xorshift: a different profile each time, the same across runs.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let p = seed % profiles.max(1);
        let args = vec![
            "query".to_string(),
            "--state-dir".to_string(),
            state.display().to_string(),
            format!("email:person{p}@example.com"),
        ];
        let at = std::time::Instant::now();
        let (output, _) = match run_child(&args, stop) {
            Ok(r) => r,
            Err(None) => return Err(BenchError::Interrupted),
            Err(Some(reason)) => return Err(BenchError::Query(reason)),
        };
        let ms = at.elapsed().as_secs_f64() * 1000.0;
        let text = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !text.contains(&format!("crm:C{p:08}")) {
            return Err(BenchError::Query(format!(
                "looking up profile {p} gave: {}{}",
                text.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        times.push(ms);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(serde_json::json!({
        "job": "query",
        "profiles": profiles,
        "state_bytes": state_bytes,
        "state_bytes_per_profile": state_bytes as f64 / profiles.max(1) as f64,
        "write_seconds": write_seconds,
        "lookups": times.len(),
        "median_ms": times[times.len() / 2],
        "max_ms": times[times.len() - 1],
    })
    .to_string())
}

/// Runs the benchmark: generates the data, then every job, printing one
/// JSON line per result through `print` as it comes.
///
/// # Errors
///
/// An unknown job, data that cannot be generated, a run that fails.
pub fn run(config: &BenchConfig, print: &mut dyn FnMut(String)) -> Result<(), BenchError> {
    for name in &config.jobs {
        if ![
            "latency", "query", "memory", "resume", "restart", "segment", "http", "kafka", "api",
        ]
        .contains(&name.as_str())
            && !JOBS.iter().any(|j| j.name == name)
        {
            return Err(BenchError::UnknownJob(name.clone()));
        }
    }
    let stop = config.stop.as_deref();
    let lock_path = config.dir.join("segflow-bench.lock");
    // The bench writes data, definitions and outputs in its directory: one
    // that holds anything else (`--dir .` in a checkout) is refused. The
    // lock file marks a directory as the bench's.
    if let Ok(entries) = std::fs::read_dir(&config.dir) {
        let others: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !others.is_empty() && !lock_path.exists() {
            return Err(BenchError::NotOurs {
                dir: config.dir.display().to_string(),
                found: others.join(", "),
            });
        }
    }
    if config.dir.exists() && !config.dir.is_dir() {
        return Err(BenchError::Io {
            what: format!("--dir {}", config.dir.display()),
            source: std::io::Error::other("it is not a directory"),
        });
    }
    std::fs::create_dir_all(&config.dir)
        .map_err(io_err(format!("create {}", config.dir.display())))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(format!("open {}", lock_path.display())))?;
    if lock.try_lock().is_err() {
        return Err(BenchError::Busy(config.dir.display().to_string()));
    }
    let data = config.dir.join("data");
    let gen = crate::generate::GenConfig {
        events: config.events,
        seed: config.seed,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let stats = crate::generate::generate_dir(&gen, &data)
        .map_err(io_err(format!("generate data into {}", data.display())))?;
    print(
        serde_json::json!({
            "data": data.display().to_string(),
            "web_events": stats.web_events,
            "crm_records": stats.crm_records,
            "transactions": stats.transactions,
            "generate_seconds": started.elapsed().as_secs_f64(),
        })
        .to_string(),
    );
    std::fs::create_dir_all(config.dir.join("out")).map_err(io_err(format!(
        "create {}",
        config.dir.join("out").display()
    )))?;
    if config.jobs.iter().any(|j| j == "segment" || j == "http") {
        let n = http::write_segment_data(&data).map_err(io_err(format!(
            "write Segment messages into {}",
            data.display()
        )))?;
        print(serde_json::json!({"data": data.join("web.segment.jsonl").display().to_string(), "segment_messages": n}).to_string());
    }
    for name in &config.jobs {
        if name == "http" {
            for &workers in &config.workers {
                let mut runs = Vec::new();
                for _ in 0..config.repeat {
                    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                        return Err(BenchError::Interrupted);
                    }
                    let r =
                        http::run(&data, workers, 4, 100).map_err(|reason| BenchError::Run {
                            job: "http".into(),
                            workers,
                            reason,
                        })?;
                    runs.push(r);
                }
                // The run with the median rate.
                runs.sort_by(|a, b| a.messages_per_sec.total_cmp(&b.messages_per_sec));
                let mid = runs.swap_remove(runs.len() / 2);
                print(serde_json::to_string(&mid).expect("serializes"));
            }
            continue;
        }
        if name == "query" {
            print(query_job(
                &config.dir,
                config.query_profiles,
                config.repeat,
                stop,
            )?);
            continue;
        }
        if name == "memory" {
            // A data set an eighth of the size: the slope between the two
            // is the memory each additional profile costs, without the
            // fixed part (code, allocator, RocksDB) that any run has.
            let small = config.dir.join("data-small");
            let gen_small = crate::generate::GenConfig {
                events: (config.events / 8).max(1),
                ..gen.clone()
            };
            crate::generate::generate_dir(&gen_small, &small)
                .map_err(io_err(format!("generate data into {}", small.display())))?;
            for job in &JOBS {
                let few = run_job(job, 1, config.repeat, &config.dir, &small, stop)?;
                let many = run_job(job, 1, config.repeat, &config.dir, &data, stop)?;
                print(memory_line(job.name, &few, &many));
            }
            continue;
        }
        if name == "restart" {
            for &events in &config.restart_events {
                let sized = config.dir.join(format!("data-restart-{events}"));
                let gen_sized = crate::generate::GenConfig {
                    events,
                    people: Some(events * 5 / 3),
                    ..gen.clone()
                };
                crate::generate::generate_dir(&gen_sized, &sized)
                    .map_err(io_err(format!("generate data into {}", sized.display())))?;
                for &workers in &config.workers {
                    print(restart_job(
                        &JOBS[0],
                        workers,
                        config.repeat,
                        &config.dir,
                        &sized,
                        events,
                        stop,
                    )?);
                }
            }
            continue;
        }
        if name == "resume" {
            for &workers in &config.workers {
                print(resume_job(
                    &JOBS[0],
                    workers,
                    config.repeat,
                    &config.dir,
                    &data,
                    stop,
                )?);
            }
            continue;
        }
        if name == "api" {
            for &workers in &config.workers {
                let mut runs = Vec::new();
                for _ in 0..config.repeat {
                    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                        return Err(BenchError::Interrupted);
                    }
                    let (ingest, requests) = config.api_rates;
                    let state = config.dir.join("out").join("api.state");
                    let r = api::run(&state, workers, ingest, requests, config.latency_secs, 3)
                        .map_err(|reason| BenchError::Run {
                            job: "api".into(),
                            workers,
                            reason,
                        })?;
                    print(serde_json::to_string(&r).expect("serializes"));
                    runs.push(r);
                }
                // The run with the median p99 of profile lookups.
                runs.sort_by(|a, b| a.profiles_p99_ms.total_cmp(&b.profiles_p99_ms));
                let mid = runs.swap_remove(runs.len() / 2);
                let mut line = serde_json::to_value(&mid).expect("serializes");
                line["median_of"] = config.repeat.into();
                print(line.to_string());
            }
            continue;
        }
        if name == "latency" {
            for rate in [1_000, 10_000] {
                let mut runs = Vec::new();
                for _ in 0..config.repeat {
                    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                        return Err(BenchError::Interrupted);
                    }
                    runs.push(latency::run(rate, config.latency_secs, 2, false, "0s"));
                }
                let line = latency::median(&runs).json("latency");
                print(format!("{{\"job\":\"latency\",{}", &line[1..]));
            }
            continue;
        }
        let (segment_job, kafka_job);
        let job = if name == "kafka" {
            let brokers = config.kafka.as_deref().ok_or_else(|| BenchError::Run {
                job: "kafka".into(),
                workers: 0,
                reason: "the kafka job reads a running Kafka-API broker: give --kafka HOST:PORT (for instance tansu: tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 --storage-engine memory://tansu/)".into(),
            })?;
            let failed = |reason: String| BenchError::Run {
                job: "kafka".into(),
                workers: 0,
                reason,
            };
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let prefix = format!("segflow-bench-{stamp}");
            let (locations, rate) = kafka::produce(brokers, &data, &prefix).map_err(failed)?;
            print(serde_json::json!({"job": "kafka", "produced_records_per_sec": rate, "topics": locations.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>()}).to_string());
            let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
            let inputs: Vec<(&'static str, &'static str)> = locations
                .into_iter()
                .map(|(s, l)| (leak(s), leak(l)))
                .collect();
            kafka_job = Job {
                name: "kafka",
                dataflow: JOBS[0].dataflow,
                about: "the shipped dataflow reading the generated data from Kafka topics (4, 2 and 1 partitions) to their end offsets",
                inputs: Box::leak(inputs.into_boxed_slice()),
            };
            &kafka_job
        } else if name == "segment" {
            segment_job = Job {
                name: "segment",
                // One definition per bench run: leaked for the `'static`
                // the job table holds.
                dataflow: Box::leak(http::segment_dataflow().into_boxed_str()),
                about: "the shipped dataflow on the web events as Segment messages (format = \"segment\"; orders from Order Completed)",
                inputs: &[
                    ("web", "web.segment.jsonl"),
                    ("crm", "crm.jsonl"),
                    ("transactions", "transactions.none.jsonl"),
                ],
            };
            &segment_job
        } else {
            JOBS.iter().find(|j| j.name == name).expect("checked above")
        };
        let mut results = Vec::new();
        for &workers in &config.workers {
            let result = run_job(job, workers, config.repeat, &config.dir, &data, stop)?;
            print(serde_json::to_string(&result).expect("serializes"));
            results.push(result);
        }
        let fewest = results.iter().min_by_key(|r| r.workers);
        let most = results.iter().max_by_key(|r| r.workers);
        if let (Some(first), Some(last)) = (fewest, most) {
            if first.workers != last.workers {
                print(
                    serde_json::json!({
                        "job": job.name,
                        "speedup": first.seconds / last.seconds,
                        "workers": [first.workers, last.workers],
                    })
                    .to_string(),
                );
            }
        }
    }
    Ok(())
}
