//! The `segflow` command: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgAction, Args, Parser, Subcommand};

use segflow::generate::{generate_dir, GenConfig};
use segflow::model::IdentityRules;
use segflow::spec::load_spec;
use segflow::store::StateParts;
use segflow::{Engine, Output, RunSummary};

// The dataflow allocates many small strings and vectors; mimalloc is
// markedly faster than the system allocator for that pattern. The
// `system-allocator` feature leaves it out, so that heap profilers that
// intercept malloc (heaptrack, valgrind's massif) see every allocation.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its index in mimalloc v2's
/// `mi_option_e`, `include/mimalloc.h`): how many milliseconds freed
/// memory stays with the process before it goes back to the system.
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// How long freed memory stays with the process (ms). mimalloc's default,
/// 10 ms, hands pages back between two ticks of a replay and faults them
/// in again, zeroed, in the next: about a tenth of a worker's time went
/// to the kernel zeroing pages (`clear_page_erms`). A second keeps the
/// pages a steady stream reuses, and still returns what a burst left.
#[cfg(not(feature = "system-allocator"))]
const PURGE_DELAY_MS: std::ffi::c_long = 1000;

#[cfg(not(feature = "system-allocator"))]
extern "C" {
    /// mimalloc's `mi_option_set` (linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Sets the allocator's purge delay ([`PURGE_DELAY_MS`]) unless the
/// environment chose one (`MIMALLOC_PURGE_DELAY`), and turns transparent
/// huge pages off for the process unless the environment says whether
/// mimalloc may use them (`MIMALLOC_ALLOW_THP`).
///
/// mimalloc asks for huge pages (`madvise(MADV_HUGEPAGE)`) on the memory
/// it maps, and on a kernel whose THP setting is `madvise` (Debian's) each
/// first touch of such memory faults in and zeroes a whole 2 MiB page. On
/// the 2-core development VM that zeroing (`clear_page_erms` under
/// `do_huge_pmd_anonymous_page`) was 17% of a 200k-event replay's samples,
/// against 0.6% with 4 KiB pages for the same peak memory
/// (docs/performance.md). `prctl(PR_SET_THP_DISABLE)` is checked at every
/// page fault, so it covers what was mapped before `main` too, and
/// RocksDB's allocations; child processes inherit it.
fn tune_allocator() {
    #[cfg(not(feature = "system-allocator"))]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in `main`, before any other thread
        // exists (mimalloc's options are not synchronized); the option
        // index and value are those mimalloc documents.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: a prctl with integer arguments only; failure (an old
        // kernel) leaves huge pages as they were, which is harmless.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// segflow: identity-resolved profiles, windowed traits and segment diffs
/// from web events, CRM records and transactions.
#[derive(Parser)]
#[command(name = "segflow", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a dataflow definition over its sources until they end.
    Run(RunArgs),
    /// Write a seeded, realistic e-commerce data set (web.jsonl, crm.jsonl, transactions.jsonl).
    Generate(GenerateArgs),
    /// Print everything known about the profile of an identifier, as JSON.
    Query(QueryArgs),
    /// Generate data, then run named jobs and print one JSON line per result
    /// (records/s per worker, peak RSS, state bytes per profile; latency).
    Bench(BenchArgs),
    /// Check a dataflow definition and print what it declares.
    Check {
        /// The dataflow definition file (TOML).
        dataflow: PathBuf,
    },
}

#[derive(Args)]
#[command(disable_help_flag = true)]
struct RunArgs {
    /// The dataflow definition file (TOML), e.g. dataflows/ecommerce.toml.
    dataflow: PathBuf,
    /// Input of a declared source: NAME=PATH, NAME=tcp://HOST:PORT,
    /// NAME=http://HOST:PORT (a Segment HTTP API endpoint) or
    /// NAME=kafka://HOST:PORT/TOPIC[?group=NAME&until=end] (its partitions
    /// read by all workers; live unless until=end) (repeatable).
    #[arg(long = "input", value_name = "NAME=LOCATION")]
    inputs: Vec<String>,
    /// The record format of a declared source, over its `format`:
    /// NAME=jsonl|csv|segment|ga4 (repeatable), e.g. --format web=segment
    /// to run a definition unchanged on a Segment export.
    #[arg(long = "format", value_name = "NAME=FORMAT")]
    formats: Vec<String>,
    /// Segment diffs: a file, `-` for stdout, tcp://HOST:PORT,
    /// kafka://HOST:PORT/TOPIC, or an http(s):// URL (a webhook: signed
    /// JSON batches, see [output.webhook]).
    #[arg(long, value_name = "PATH|-|tcp://ADDR|kafka://ADDR/TOPIC|URL")]
    output: Option<String>,
    /// Dead-letter file (JSON lines).
    #[arg(long, value_name = "PATH")]
    dead_letter: Option<PathBuf>,
    /// RocksDB state directory. A run on a state directory that holds a
    /// checkpoint of the same dataflow resumes from it.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Start over: replace the state directory's contents and the outputs
    /// instead of resuming from the checkpoint.
    #[arg(long)]
    reset: bool,
    /// Worker threads per process (1 to 1024; at most the number of cores
    /// is useful).
    #[arg(short = 'w', long = "workers", value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_WORKERS as u64))]
    workers: Option<usize>,
    /// Number of processes in the cluster.
    #[arg(short = 'n', long = "processes", value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    processes: usize,
    /// Index of this process (0-based).
    #[arg(short = 'p', long = "process", value_name = "I", default_value_t = 0)]
    process: usize,
    /// Host file: one host:port per line, line i is process i (default localhost:2101+i).
    #[arg(short = 'h', long = "hostfile", value_name = "HOSTFILE")]
    hostfile: Option<PathBuf>,
    /// Print the summary as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// How long the processes of a cluster may take to connect to each
    /// other (e.g. "30s", "2m") before the run fails naming the silent peers.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    connect_timeout: String,
    /// Serve the HTTP API while the run goes on (profiles, segments and
    /// members, content decisions, the diff stream), on HOST:PORT
    /// (127.0.0.1:8080 if no address is given). A replay keeps serving its
    /// final state after its inputs end, until SIGTERM or Ctrl-C. Every
    /// endpoint but /healthz needs the bearer token: SEGFLOW_API_TOKEN,
    /// --http-token-file, or one generated and printed at start. In a
    /// cluster, process 0 serves the whole run (the other processes'
    /// parts of the state must be on its machine).
    #[arg(long, value_name = "HOST:PORT", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    http: Option<String>,
    /// The API's bearer token: the first line of FILE.
    #[arg(long, value_name = "FILE", requires = "http")]
    http_token_file: Option<PathBuf>,
    /// The CPU priority (nice, 0-19) of the engine's threads relative to
    /// the API's: on a machine short of cores, page requests are answered
    /// first and ingestion takes the delay (the commit lag in /metrics and
    /// in every answer's as_of shows it). Default: 10 with --http, else 0.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=19))]
    engine_nice: Option<i32>,
    /// Audience exports: every --export-every, and once when the run ends,
    /// write each segment's members (with their identifiers) and the
    /// entries and exits since the export before to DIR/SEGMENT/.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    /// How often to export (e.g. "15m", "1h", "1d").
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        requires = "export"
    )]
    export_every: String,
    /// The segments to export, comma-separated (default: all).
    #[arg(long, value_name = "NAMES", value_delimiter = ',', requires = "export")]
    export_segments: Vec<String>,
    /// The exports' format: csv or jsonl.
    #[arg(
        long,
        value_name = "FORMAT",
        default_value = "csv",
        requires = "export"
    )]
    export_format: String,
    /// Print help.
    #[arg(long = "help", action = ArgAction::Help)]
    help: Option<bool>,
}

#[derive(Args)]
struct GenerateArgs {
    /// Output directory (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of web events.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Random seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of people visitors are drawn from [default: events / 40;
    /// at least 50]: more people per event, more profiles.
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    people: Option<u64>,
    /// Days the sessions are spread over [default: events × 2 s, at most
    /// 30 days]: a long span exercises long windows (60 days without an
    /// order, 365-day spend).
    #[arg(long, value_name = "DAYS",
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..=36_500))]
    days: Option<u64>,
    /// Also write web.segment.jsonl: the web events as Segment messages
    /// (orders as Order Completed, so read it without transactions.jsonl),
    /// for `segflow run ... --format web=segment`.
    #[arg(long)]
    segment: bool,
}

#[derive(Args)]
struct BenchArgs {
    /// Web events to generate (CRM records and transactions follow).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Random seed of the data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Directory for the data, outputs and state (kept afterwards).
    #[arg(long, value_name = "DIR", default_value = "bench")]
    dir: PathBuf,
    /// Jobs to run, comma-separated: ecommerce, visitor_high_intent, segment, http, kafka, api, latency, query, memory, resume, restart (api (not in the default list) feeds the shipped dataflow live events over TCP at the first of --api-rates and sends its API profile lookups and content decisions at the second, for --latency-secs, and reports their latency percentiles; segment runs the shipped dataflow on the web events written as Segment messages; http sends those messages to the shipped dataflow's HTTP collection endpoint from 4 clients, 100 per request, and reports messages/s and request latency; kafka (not in the default list; needs --kafka) produces the generated data to topics of a running broker and runs the shipped dataflow on them to their end offsets; memory, resume and restart are not in the default list: memory runs both dataflow jobs again on a data set an eighth of the size, and reports the RSS each additional profile costs; resume kills the ecommerce run half-way with SIGKILL and times the run that resumes it; restart times the ecommerce run started again on its finished checkpoint, for data sets of --restart-events).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ecommerce,visitor_high_intent,latency,query"
    )]
    jobs: Vec<String>,
    /// A running Kafka-API broker (HOST:PORT) for the kafka job, which
    /// produces the generated data to new topics there and runs the
    /// shipped dataflow on them.
    #[arg(long, value_name = "HOST:PORT")]
    kafka: Option<String>,
    /// The api job's load: events per second fed to the engine (live,
    /// stamped with the wall clock) and requests per second to its API
    /// (profile lookups and content decisions, half each).
    #[arg(
        long,
        value_name = "EVENTS,REQUESTS",
        value_delimiter = ',',
        default_value = "100000,5000"
    )]
    api_rates: Vec<u64>,
    /// Worker counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Runs per job and worker count (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Measured seconds of each latency run.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Profiles in the state the query job looks up.
    #[arg(long, default_value_t = 1_000_000)]
    query_profiles: u64,
    /// The restart job's data sets, comma-separated web event counts (each
    /// with about a third as many profiles).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "375000,750000,1500000,3000000"
    )]
    restart_events: Vec<u64>,
}

#[derive(Args)]
struct QueryArgs {
    /// RocksDB state directory written by `segflow run`.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Dataflow definition, for its identifier priority and phone region (defaults otherwise).
    #[arg(long, value_name = "FILE")]
    dataflow: Option<PathBuf>,
    /// An identifier: KIND:VALUE (crm:C1, email:a@b.com, user:u1, anon:a-1, phone:+1...) or a bare value.
    #[arg(required_unless_present = "checkpoint")]
    identifier: Option<String>,
    /// Print the checkpoint a restart resumes from instead of a profile,
    /// as JSON: `holds_before` (ms) is the event time before which the
    /// state holds every record read (socket clients send again from it),
    /// with the resume points and where the outputs stood.
    #[arg(long, conflicts_with = "identifier")]
    checkpoint: bool,
    /// Explain why the profile is, or is not, in SEGMENT: each condition
    /// with the values that made it true or false, and the windows behind
    /// each trait (needs --dataflow, the definition the state was written
    /// with).
    #[arg(long, value_name = "SEGMENT", requires = "dataflow")]
    explain: Option<String>,
}

/// Opens the state in `dir` read-only and reads it with `read`. A run may
/// be replacing the files of the state meanwhile (a flush, a compaction, a
/// new write-ahead log): such a failure is tried again, for up to 30
/// seconds. A directory that is not segflow state but holds some (its
/// parent, given by mistake) is named in the error.
fn read_state<T>(
    dir: &std::path::Path,
    read: impl Fn(&StateParts) -> Result<T, segflow::store::StoreError>,
) -> anyhow::Result<(StateParts, T)> {
    let started = std::time::Instant::now();
    loop {
        let attempt = StateParts::open_read_only(dir).and_then(|state| {
            let value = read(&state)?;
            Ok((state, value))
        });
        match attempt {
            Err(e)
                if e.may_be_transient()
                    && started.elapsed() < std::time::Duration::from_secs(30) =>
            {
                // A run that writes much flushes often: an open that lost
                // the race with a flush is tried again at once, then less
                // often.
                let pause = (started.elapsed().as_millis() as u64 / 20).clamp(5, 200);
                std::thread::sleep(std::time::Duration::from_millis(pause));
            }
            Err(e @ segflow::store::StoreError::NotOurs { .. }) => {
                let inside: Vec<String> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.join(segflow::store::MARKER_FILE).is_file())
                    .map(|p| p.display().to_string())
                    .collect();
                return match inside.first() {
                    Some(inner) => Err(anyhow::anyhow!(
                        "{e}\n(it holds segflow state in {inner}: did you mean --state-dir {inner}?)"
                    )),
                    None => Err(e.into()),
                };
            }
            other => return Ok(other?),
        }
    }
}

/// `segflow query --checkpoint`: the checkpoint of the state in `dir`.
fn print_checkpoint(dir: &std::path::Path) -> anyhow::Result<()> {
    let (_, checkpoint) = read_state(dir, |state| state.checkpoint())?;
    let Some(checkpoint) = checkpoint else {
        anyhow::bail!(
            "{} holds no checkpoint yet: no run on it has completed a time",
            dir.display()
        );
    };
    let holds_before = checkpoint.retained.as_ref().map(|r| r.cut);
    let utc = holds_before.and_then(|ms| {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    });
    print_out(&serde_json::to_string_pretty(&serde_json::json!({
        "holds_before": holds_before,
        "holds_before_utc": utc,
        "checkpoint": checkpoint,
    }))?);
    Ok(())
}

fn timely_config(args: &RunArgs, workers: usize) -> anyhow::Result<timely::Config> {
    let mut config = timely::Config::process(workers);
    if args.processes > 1 || args.hostfile.is_some() {
        anyhow::ensure!(
            args.process < args.processes,
            "-p {} is out of range for -n {}",
            args.process,
            args.processes
        );
        let addresses = match &args.hostfile {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("cannot read hostfile {}: {e}", path.display()))?;
                let hosts: Vec<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                anyhow::ensure!(
                    hosts.len() >= args.processes,
                    "hostfile {} lists {} hosts but -n is {}",
                    path.display(),
                    hosts.len(),
                    args.processes
                );
                hosts[..args.processes].to_vec()
            }
            None => (0..args.processes)
                .map(|i| format!("localhost:{}", 2101 + i))
                .collect(),
        };
        config.communication = timely::CommunicationConfig::Cluster {
            threads: workers,
            process: args.process,
            addresses,
            report: false,
            zerocopy: false,
        };
    }
    Ok(config)
}

fn print_summary(s: &RunSummary, to_stderr: bool, json: bool) {
    let text = if json {
        serde_json::to_string(s).unwrap_or_default()
    } else {
        let mut t = String::new();
        let records = s.records();
        let ended = if s.stopped {
            "was stopped after"
        } else {
            "finished in"
        };
        t += &format!("segflow run {ended} {:.2} s\n", s.elapsed_secs);
        for src in &s.sources {
            t += &format!(
                "  source {:<14} lines {:>10}  records {:>10}  dead letters {:>6}  late {:>6}",
                src.name, src.lines, src.records, src.dead_letters, src.late
            );
            if src.held > 0 {
                t += &format!("  held {:>6}", src.held);
            }
            t += "\n";
        }
        if s.stopped {
            let cut: Vec<&str> = s
                .sources
                .iter()
                .filter(|src| src.stopped)
                .map(|src| src.name.as_str())
                .collect();
            t += &format!(
                "  stopped           by a signal before the end of source {}: the outputs hold the times before where reading stopped (a run with the same state directory goes on from there)\n",
                cut.join(", ")
            );
        }
        t += &format!("  records read      {records}\n");
        // Late records are dead-lettered, or clamped to the watermark and
        // kept (late_policy = "clamp"), when they are not dead letters.
        t += &format!(
            "  dead letters      {}\n  late              {} (dead-lettered, or clamped to the watermark with late_policy = \"clamp\")\n",
            s.dead_letters(),
            s.late()
        );
        if let Some(before) = s.resumed_before.filter(|b| *b > 0) {
            t += &format!(
                "  resumed           from the checkpoint: the diffs of times before {before} were in the outputs already\n"
            );
        }
        if let Some((cut, entries)) = s.restored {
            t += &format!(
                "  restored          {entries} retained entries of the checkpoint: the records before {cut} come from it (replayed files were read from its points on)\n"
            );
        }
        t += &format!("  profiles          {}\n", s.profiles);
        t += &format!(
            "  segment diffs     {} over {} timestamps\n",
            s.diffs_written, s.times_committed
        );
        for (name, members) in &s.segments {
            t += &format!("  segment {:<20} {members} members\n", name);
        }
        if s.state_batches > 0 {
            t += &format!("  state batches     {}\n", s.state_batches);
        }
        if let Some((failed, file)) = &s.webhook_failed {
            t += &format!(
                "  webhook           {failed} batches failed for good (their diffs are in {file}, not at the receiver)\n"
            );
        }
        let rate = if s.elapsed_secs > 0.0 {
            records as f64 / s.elapsed_secs
        } else {
            0.0
        };
        t += &format!("  throughput        {:.0} records/s\n", rate);
        t
    };
    if to_stderr {
        eprintln!("{}", text.trim_end());
    } else {
        println!("{}", text.trim_end());
    }
}

/// The most worker threads a process may run.
const MAX_WORKERS: usize = 1024;

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut spec = load_spec(&args.dataflow)?;
    for item in &args.formats {
        let (name, format) = item.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--format {item:?}: expected NAME=FORMAT, e.g. web=segment")
        })?;
        let known: Vec<&str> = spec.sources.iter().map(|s| s.name.as_str()).collect();
        let known = known.join(", ");
        let source = spec
            .sources
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--format {item:?}: no source `{name}` in {}; the sources are: {known}",
                    args.dataflow.display()
                )
            })?;
        source.format = segflow::spec::Format::for_source(format, source.kind, name)
            .map_err(|e| anyhow::anyhow!("--format {item:?}: {e}"))?;
    }
    for w in spec.warnings() {
        tracing::warn!("{}: {w}", args.dataflow.display());
    }
    let workers = args.workers.or(spec.engine.workers).unwrap_or(1).max(1);
    anyhow::ensure!(
        workers <= MAX_WORKERS,
        "{workers} workers per process is more than the {MAX_WORKERS} segflow allows (each is a thread with its own buffers); use at most the number of cores"
    );
    let config = timely_config(&args, workers)?;
    let live = match (&args.http, &args.export) {
        (None, None) => None,
        // Process 0 serves and exports the whole cluster's run (every
        // worker's diffs come to it, and it follows the other processes'
        // parts of the state); the others run the same command.
        _ if args.process > 0 => {
            eprintln!(
                "segflow: process {} does not serve: process 0 serves the cluster's API and exports",
                args.process
            );
            None
        }
        _ => Some(segflow::serve::Live::new(Arc::new(spec.clone()))),
    };
    let export_plan = match &args.export {
        None => None,
        Some(dir) => {
            let every = segflow::spec::parse_duration_ms(&args.export_every)
                .map_err(|e| anyhow::anyhow!("--export-every: {e}"))?;
            anyhow::ensure!(every >= 1000, "--export-every: at least 1s");
            let format = segflow::serve::export::ExportFormat::parse(&args.export_format)
                .map_err(|e| anyhow::anyhow!("--export-format: {e}"))?;
            for name in &args.export_segments {
                if !spec.segments.iter().any(|s| &s.name == name) {
                    let known: Vec<&str> = spec.segments.iter().map(|s| s.name.as_str()).collect();
                    anyhow::bail!(
                        "--export-segments: no segment `{name}` in {}{}; the segments are: {}",
                        args.dataflow.display(),
                        segflow::spec::did_you_mean(name, known.iter().copied()),
                        known.join(", ")
                    );
                }
            }
            segflow::serve::export::create_export_dir(dir)
                .map_err(|e| anyhow::anyhow!("--export {}: {e}", dir.display()))?;
            Some((dir.clone(), std::time::Duration::from_millis(every), format))
        }
    };
    let served = match (&args.http, &live) {
        (Some(addr), Some(live)) => {
            let (token, origin) = segflow::serve::api_token(args.http_token_file.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?;
            if origin == segflow::serve::TokenOrigin::Generated
                && std::env::var("SEGFLOW_API_TOKEN").is_ok_and(|t| t.trim().is_empty())
            {
                eprintln!("segflow: warning: SEGFLOW_API_TOKEN is set but empty; a token is generated instead");
            }
            let config = segflow::serve::ServeConfig {
                addr: addr.clone(),
                token: token.clone(),
            };
            let server = segflow::serve::Server::start(&config, Arc::clone(&live))?;
            let at = server.local_addr();
            if !at.ip().is_loopback() {
                tracing::warn!(
                    "the API listens on {at}, which is not a loopback address: anyone who can reach it and holds the token can read profiles"
                );
            }
            match origin {
                segflow::serve::TokenOrigin::Generated => eprintln!(
                    "segflow: serving the API on http://{at} (bearer token, generated for this run: {token}; set SEGFLOW_API_TOKEN or --http-token-file to choose it)"
                ),
                _ => eprintln!("segflow: serving the API on http://{at}"),
            }
            Some(server)
        }
        _ => None,
    };
    // Once the API serves, a run that fails ends the open diff streams
    // with its error as their last event (`event: end`).
    let failed = {
        let live = served.as_ref().and(live.clone());
        move |e: anyhow::Error| {
            if let Some(live) = &live {
                live.end_streams(segflow::serve::StreamEnd {
                    failed: true,
                    reason: format!("the run failed: {e:#}"),
                });
            }
            e
        }
    };
    let mut engine =
        // Every process of a cluster alike (they may share cores).
        Engine::new(spec.clone()).nice(args.engine_nice.unwrap_or(if args.http.is_some() {
            10
        } else {
            0
        }));
    let mut live = live;
    for item in &args.inputs {
        let (name, location) = item.split_once('=').ok_or_else(|| {
            failed(anyhow::anyhow!(
                "--input {item:?}: expected NAME=PATH, NAME=tcp://ADDR, NAME=http://ADDR or NAME=kafka://ADDR/TOPIC"
            ))
        })?;
        engine = engine
            .input_location(name, location)
            .map_err(|e| failed(e.into()))?;
    }
    let mut to_stderr = false;
    if let Some(o) = &args.output {
        let output = Output::parse(o);
        to_stderr = matches!(output, Output::Stdout);
        engine = engine.output(output);
    } else if engine.spec().output.segments.as_deref() == Some("-") {
        to_stderr = true;
    }
    if let Some(d) = &args.dead_letter {
        engine = engine.dead_letter(d);
    }
    if let Some(d) = &args.state_dir {
        engine = engine.state_dir(d);
    }
    // A replay on a terminal shows its progress (not with --json, nor on
    // processes other than 0, nor when stderr is not a terminal).
    use std::io::IsTerminal;
    let progress_total = engine
        .replay_bytes()
        .filter(|_| args.process == 0 && !args.json && std::io::stderr().is_terminal());
    if progress_total.is_some() && live.is_none() {
        live = Some(segflow::serve::Live::counters_only(Arc::new(spec)));
    }
    if let Some(live) = &live {
        engine = engine.serve(Arc::clone(live));
    }
    engine = engine.reset(args.reset).definition_file(&args.dataflow);
    let shutdown = watch_signals().map_err(&failed)?;
    let connect_timeout = segflow::spec::parse_duration_ms(&args.connect_timeout)
        .map_err(|e| failed(anyhow::anyhow!("--connect-timeout: {e}")))?;
    let engine = engine
        .shutdown_on(Arc::clone(&shutdown))
        .connect_timeout(std::time::Duration::from_millis(connect_timeout));
    let schedule = match (&export_plan, &live) {
        (Some((dir, every, format)), Some(live)) => Some(segflow::serve::export::Schedule::start(
            Arc::clone(live),
            dir.clone(),
            *every,
            args.export_segments.clone(),
            *format,
            Arc::clone(&shutdown),
        )
        .map_err(|e| failed(e.into()))?),
        _ => None,
    };
    let bar = match (progress_total, &live) {
        (Some(total), Some(live)) => Some(progress_bar(total, Arc::clone(live))),
        _ => None,
    };
    let result = engine.run(config);
    if let Some((bar, stop, thread)) = bar {
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = thread.join();
        bar.finish_and_clear();
    }
    let summary = match result {
        Ok(summary) => summary,
        // `segflow run .. --output - | head`: the reader has what it wanted.
        Err(segflow::EngineError::OutputClosed) => return Ok(()),
        Err(e) => return Err(failed(e.into())),
    };
    if let Some(schedule) = schedule {
        // The final state, exported once more; a failed export fails the
        // run (it may have stopped it), with no summary that says it
        // finished.
        schedule
            .finish()
            .map_err(|e| failed(anyhow::anyhow!("audience export: {e}")))?;
    }
    if args.process == 0 {
        print_summary(&summary, to_stderr, args.json);
    }
    if let Some(server) = served {
        if !shutdown.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!(
                "segflow: the run has ended; serving its final state on http://{} until SIGTERM or Ctrl-C",
                server.local_addr()
            );
            // Content slots edited from now on still apply.
            let label = args.dataflow.display().to_string();
            let mut seen = std::fs::read_to_string(&args.dataflow).ok();
            let mut looked = std::time::Instant::now();
            while !shutdown.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if looked.elapsed() < std::time::Duration::from_millis(500) {
                    continue;
                }
                looked = std::time::Instant::now();
                let now = std::fs::read_to_string(&args.dataflow).ok();
                if now.is_none() || now == seen {
                    continue;
                }
                seen = now;
                let text = seen.as_deref().unwrap_or_default();
                match live.as_ref().map(|l| l.apply_edit_after_end(text, &label)) {
                    Some(Ok(true)) => tracing::warn!(
                        "{label} changed its content slots or descriptions: the API answers with them from now on"
                    ),
                    Some(Err(e)) => tracing::warn!("{label} changed, but the edit is refused: {e}"),
                    _ => {}
                }
            }
        }
        if let Some(live) = &live {
            live.end_streams(segflow::serve::StreamEnd {
                failed: false,
                reason: "the engine was stopped (SIGTERM or Ctrl-C)".into(),
            });
        }
        drop(server);
    }
    Ok(())
}

/// A progress bar of a replay of `total` bytes, fed from `live`'s
/// counters every 100 ms until the returned flag is set: bytes read, the
/// records admitted per second, the ETA.
fn progress_bar(
    total: u64,
    live: Arc<segflow::serve::Live>,
) -> (
    indicatif::ProgressBar,
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (shown, stopped) = (bar.clone(), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            let (_, sources) = live.counters_with_clocks();
            let bytes: u64 = sources.iter().map(|(s, _)| s.bytes).sum();
            let records: u64 = sources.iter().map(|(s, _)| s.records).sum();
            shown.set_position(bytes.min(total));
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            shown.set_message(format!("{:.0} records/s", records as f64 / secs));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    (bar, stop, thread)
}

/// SIGTERM or Ctrl-C: the returned flag is set, so the run ends its inputs,
/// writes what was read, prints the summary and exits 0. A second signal
/// exits at once with status 1, saying so; one that follows the first within
/// [`SIGNAL_DEBOUNCE`] is taken for the same request (`timeout`, for one,
/// signals both the process and its group).
fn watch_signals() -> anyhow::Result<Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let flag = Arc::clone(&shutdown);
    std::thread::Builder::new()
        .name("segflow-signals".into())
        .spawn(move || {
            let mut first: Option<std::time::Instant> = None;
            for signal in signals.forever() {
                let name = if signal == SIGINT { "interrupt" } else { "SIGTERM" };
                match first {
                    None => {
                        first = Some(std::time::Instant::now());
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        eprintln!(
                            "segflow: {name}: stopping; finishing what was read (signal again to stop at once)"
                        );
                    }
                    Some(at) if at.elapsed() < SIGNAL_DEBOUNCE => {}
                    Some(_) => {
                        eprintln!(
                            "segflow: second {name}: stopped at once; outputs end at the last completed time written"
                        );
                        std::process::exit(1);
                    }
                }
            }
        })?;
    Ok(shutdown)
}

/// Signals this close after the first count as the same request.
const SIGNAL_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Prints to stdout; a closed pipe (`segflow query .. | head`) is not an error.
fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|_| out.flush());
}

fn main() -> ExitCode {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEGFLOW_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Generate(args) => (|| {
            let cfg = GenConfig {
                events: args.events,
                seed: args.seed,
                people: args.people,
                span_days: args.days,
                ..GenConfig::default()
            };
            let started = std::time::Instant::now();
            let stats = generate_dir(&cfg, &args.out).map_err(|e| {
                anyhow::anyhow!("cannot write data set to {}: {e}", args.out.display())
            })?;
            let segment = match args.segment {
                true => Some(
                    segflow::generate::write_segment_web(&args.out).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot write {}: {e}",
                            args.out.join("web.segment.jsonl").display()
                        )
                    })?,
                ),
                false => None,
            };
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({
                    "segment_messages": segment,
                    "out": args.out.display().to_string(),
                    "web_events": stats.web_events,
                    "crm_records": stats.crm_records,
                    "transactions": stats.transactions,
                    "malformed": stats.malformed,
                    "late": stats.late,
                    "out_of_order": stats.out_of_order,
                    "bytes": stats.bytes,
                    "seconds": secs,
                    "web_events_per_sec": stats.web_events as f64 / secs.max(1e-9),
                })
            );
            Ok(())
        })(),
        Command::Query(args) => (|| {
            if args.checkpoint {
                return print_checkpoint(&args.state_dir);
            }
            let identifier = args.identifier.as_deref().unwrap_or_default();
            let spec = args.dataflow.as_deref().map(load_spec).transpose()?;
            if let (Some(spec), Some(segment)) = (&spec, &args.explain) {
                // An unknown segment is refused before the state is read.
                if !spec.segments.iter().any(|s| &s.name == segment) {
                    let empty = segflow::store::ProfileView::default();
                    let unknown = segflow::store::explain::explain(spec, &empty, segment)
                        .err()
                        .unwrap_or_default();
                    // The state may have been written with another file.
                    let written = StateParts::open_read_only(&args.state_dir)
                        .ok()
                        .and_then(|state| state.checkpoint().ok().flatten());
                    let other = written.is_some_and(|cp| {
                        let ours = segflow::engine::resume::fingerprint_parts(spec);
                        segflow::engine::resume::differing_parts(&ours, &cp.fingerprint_parts)
                            .contains(&"segments")
                    });
                    if other {
                        anyhow::bail!(
                            "{unknown}\nthe state in {} was written with other segments than {}'s: give the definition file the run used",
                            args.state_dir.display(),
                            spec.file
                        );
                    }
                    anyhow::bail!("{unknown}");
                }
            }
            let rules = match &spec {
                Some(spec) => IdentityRules::new(
                    spec.identity.priority.clone(),
                    spec.engine.default_region.clone(),
                ),
                None => {
                    let spec = segflow::spec::parse_spec(
                        "[segments.none]\nwhen = \"false\"\n",
                        "<defaults>",
                    )?;
                    IdentityRules::new(spec.identity.priority, spec.engine.default_region)
                }
            };
            let ids = rules.parse_query(identifier);
            let kinds = rules.kinds().join(", ");
            // `KIND:` with a kind segflow knows.
            let known_kind = identifier
                .split_once(':')
                .filter(|(kind, _)| rules.is_kind(kind.trim()))
                .map(|(kind, value)| (kind.trim().to_string(), value.trim().to_string()));
            if ids.is_empty() {
                match &known_kind {
                    Some((kind, value)) if value.is_empty() => {
                        anyhow::bail!("{:?} has no value after `{kind}:`", identifier)
                    }
                    Some((kind, value)) => anyhow::bail!(
                        "{value:?} is not a valid {kind} identifier (it does not normalize: an e-mail needs an @, a phone number must parse for the region)"
                    ),
                    None => anyhow::bail!(
                        "{:?} is not an identifier: use KIND:VALUE with a kind among {kinds}, e.g. email:ann@example.com",
                        identifier
                    ),
                }
            }
            let (state, (matches, found)) = read_state(&args.state_dir, |state| {
                let matches = state.profiles_of(&ids)?;
                let found = match matches.first() {
                    Some((_, profile)) => Some(state.view(profile)?),
                    None => None,
                };
                Ok((matches, found))
            })?;
            for part in &state.missing {
                eprintln!(
                    "warning: the part of the state written by another process of the cluster is not here, or was written by another run ({}): the answer leaves out what that process owns",
                    part.display()
                );
            }
            if matches.len() > 1 {
                let all: Vec<String> = matches
                    .iter()
                    .map(|(id, profile)| format!("{profile} (as {id})"))
                    .collect();
                eprintln!(
                    "warning: {:?} matches {} profiles: {}; showing the first. Give KIND:VALUE to choose",
                    identifier,
                    matches.len(),
                    all.join(", ")
                );
            }
            if let (Some(spec), Some(_), Some(cp)) = (&spec, &args.explain, state.checkpoint()?) {
                // The explanation re-evaluates the file's conditions on the
                // stored values: they must be the ones that wrote them.
                let ours = segflow::engine::resume::fingerprint_parts(spec);
                let differ: Vec<&str> =
                    segflow::engine::resume::differing_parts(&ours, &cp.fingerprint_parts)
                        .into_iter()
                        .filter(|part| ["engine settings", "traits", "segments"].contains(part))
                        .collect();
                anyhow::ensure!(
                    differ.is_empty(),
                    "{} is not the definition the state in {} was written with (its {} differ): --explain evaluates the definition's conditions on the stored values, so give the file the run used",
                    spec.file,
                    args.state_dir.display(),
                    differ.join(" and ")
                );
            }
            match found {
                Some(view) => {
                    match (&spec, &args.explain) {
                        (Some(spec), Some(segment)) => print_out(
                            segflow::store::explain::explain(spec, &view, segment)
                                .map_err(anyhow::Error::msg)?
                                .trim_end(),
                        ),
                        _ => print_out(&serde_json::to_string_pretty(&view)?),
                    }
                    Ok(())
                }
                None if state.checkpoint()?.is_none() => anyhow::bail!(
                    "the state in {} has no completed time yet: a run that has just started writes its first state within seconds; try again",
                    args.state_dir.display()
                ),
                None => {
                    let hint = match identifier.split_once(':') {
                        Some((kind, _)) if known_kind.is_none() && !kind.trim().is_empty() => {
                            format!(
                                " (`{}` is not a kind of identifier, so it was read as a bare value; the kinds are {kinds})",
                                kind.trim()
                            )
                        }
                        _ => String::new(),
                    };
                    anyhow::bail!(
                        "no profile has identifier {:?} in {}{hint}",
                        identifier,
                        args.state_dir.display()
                    )
                }
            }
        })(),
        Command::Bench(args) => (|| {
            anyhow::ensure!(args.repeat > 0, "--repeat must be at least 1");
            anyhow::ensure!(args.latency_secs > 0, "--latency-secs must be at least 1");
            anyhow::ensure!(
                args.query_profiles > 0,
                "--query-profiles must be at least 1"
            );
            anyhow::ensure!(args.events > 0, "--events must be at least 1");
            anyhow::ensure!(
                !args.workers.is_empty()
                    && args.workers.iter().all(|&w| (1..=MAX_WORKERS).contains(&w)),
                "--workers takes worker counts from 1 to {MAX_WORKERS}, e.g. 1,2"
            );
            let mut workers = args.workers.clone();
            workers.sort_unstable();
            workers.dedup();
            let config = segflow::bench::BenchConfig {
                events: args.events,
                seed: args.seed,
                dir: args.dir,
                jobs: args.jobs,
                workers,
                repeat: args.repeat,
                latency_secs: args.latency_secs,
                query_profiles: args.query_profiles,
                restart_events: args.restart_events.clone(),
                kafka: args.kafka.clone(),
                api_rates: match args.api_rates[..] {
                    [ingest, requests] if ingest > 0 && requests > 0 => (ingest, requests),
                    _ => anyhow::bail!("--api-rates: expected EVENTS,REQUESTS per second, both above 0, e.g. 100000,5000"),
                },
                stop: Some(watch_signals()?),
            };
            segflow::bench::run(&config, &mut |line| print_out(&line))?;
            Ok(())
        })(),
        Command::Check { dataflow } => (|| {
            let spec = load_spec(&dataflow)?;
            for w in spec.warnings() {
                eprintln!("warning: {}: {w}", dataflow.display());
            }
            let slots = match spec.content.len() {
                0 => String::new(),
                1 => ", 1 content slot".to_string(),
                n => format!(", {n} content slots"),
            };
            println!(
                "{}: ok: {} sources, {} traits, {} segments{slots}",
                dataflow.display(),
                spec.sources.len(),
                spec.traits.len(),
                spec.segments.len()
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
