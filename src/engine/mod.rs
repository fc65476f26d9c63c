//! The embeddable engine: a dataflow definition plus inputs and outputs,
//! run on a timely configuration (threads, processes).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dataflow::build::build;
use crate::dataflow::retain::Restored;
use crate::io::sinks::{
    DiffCallback, Layout, OutputLabels, Outputs, ProcessShared, ProcessState, RunSummary,
    SegmentSink,
};
use crate::io::sources::{Input, Progress, ReadParams, Resume, SourceDef};
use crate::io::{Abort, Stop};
use crate::model::limits::SummedField;
use crate::model::{IdentityRules, RecordKind};
use crate::spec::{Aggregate, Spec, SpecError, StreamKind};
use crate::store::{StateLock, Store, StoreError};

mod cluster;
mod operator_time;
pub mod resume;
mod watch;

/// Where segment diffs go.
#[derive(Clone)]
pub enum Output {
    /// Nowhere.
    Discard,
    /// A file (created or truncated).
    Path(PathBuf),
    /// Standard output.
    Stdout,
    /// A TCP peer to connect to (`host:port`).
    Tcp(String),
    /// A webhook: diffs POSTed as JSON batches to this `http://` or
    /// `https://` URL (see [`crate::io::sinks::webhook`]; the delivery
    /// settings are the definition's `[output.webhook]`).
    Webhook(String),
    /// A Kafka topic: each diff a record keyed by its profile (see
    /// [`crate::io::sinks::kafka`]).
    Kafka {
        /// `host:port[,host:port]`.
        brokers: String,
        /// The topic (it must exist).
        topic: String,
    },
    /// A function called for every committed diff, in order.
    Callback(DiffCallback),
}

impl Output {
    /// Parses a command-line location: `-`, `tcp://ADDR`, an `http://` or
    /// `https://` URL, or a path.
    pub fn parse(location: &str) -> Output {
        if location == "-" {
            Output::Stdout
        } else if let Some(addr) = location.strip_prefix("tcp://") {
            Output::Tcp(addr.to_string())
        } else if ["http://", "https://"].iter().any(|s| {
            location
                .get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s))
        }) {
            Output::Webhook(location.to_string())
        } else if let Some(rest) = location.strip_prefix("kafka://") {
            let (brokers, topic) = rest.split_once('/').unwrap_or((rest, ""));
            Output::Kafka {
                brokers: brokers.to_string(),
                topic: topic.trim_end_matches('/').to_string(),
            }
        } else {
            Output::Path(PathBuf::from(location))
        }
    }
}

/// Why a run could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The dataflow definition is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// `--input NAME=..` names a source the definition does not declare.
    #[error("unknown source `{name}`; the dataflow declares: {known}")]
    UnknownSource {
        /// The name given.
        name: String,
        /// Declared names.
        known: String,
    },
    /// A source's settings do not fit its input (`until` on a file,
    /// `follow` on a TCP listener).
    #[error("{0}")]
    SourceSetting(String),
    /// The segment output cannot be used as given (a URL of an unknown
    /// kind, a webhook URL without a host, a Kafka location without a
    /// topic).
    #[error("{0}")]
    OutputSetting(String),
    /// A source has no location.
    #[error("source `{0}` has no input: give `--input {0}=PATH` (or tcp://ADDR), or set `path` in [sources.{0}]")]
    MissingInput(String),
    /// A file cannot be opened or created.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is for.
        what: &'static str,
        /// Its path or address.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A worker failed, e.g. an output could not be written; the message
    /// is the original reason (`segment output out/segments.jsonl: No space
    /// left on device (os error 28)`).
    #[error("{0}")]
    Worker(String),
    /// The processes of a cluster could not connect in time.
    #[error("{0}")]
    Cluster(String),
    /// The reader of standard output went away (`segflow run .. | head`).
    #[error("standard output was closed")]
    OutputClosed,
    /// The checkpoint in the state directory cannot be resumed (see
    /// [`resume::plan`]); the message says what was found and what to do.
    #[error("{0}")]
    Resume(String),
    /// Two outputs, or an output and an input, are the same file, or an
    /// output is inside the state directory.
    #[error("{0}")]
    SameFile(String),
}

/// An output file opened but not yet emptied (or cut back to where a
/// resumed checkpoint says it stood).
struct ToEmpty {
    path: PathBuf,
    file: std::fs::File,
    /// Whether it is the segment output (else the dead letters).
    segments: bool,
}

/// What every checkpoint of a run says about it (see
/// [`crate::store::Checkpoint`]).
struct Origin {
    run: String,
    fingerprint: String,
    fingerprint_parts: BTreeMap<String, String>,
    inputs: BTreeMap<String, crate::store::InputMark>,
}

/// Adds `nice` to the calling thread's nice value (Linux: a thread's own,
/// inherited by the threads it starts); logs a failure.
fn lower_this_thread(nice: i32) {
    // SAFETY: `gettid` and `getpriority`/`setpriority` on the calling
    // thread's id take no pointers.
    let failed = unsafe {
        let tid = libc::gettid() as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19)) != 0
    };
    if failed {
        tracing::warn!(
            "cannot lower the engine's CPU priority: {}; it runs at the API's",
            std::io::Error::last_os_error()
        );
    }
}

/// The outputs and state a run starts with: its outputs (process 0),
/// its part of the state directory, and the retained input it restores
/// (if it resumes a single process's checkpoint).
type Started = (Option<Outputs>, Option<ProcessState>, Option<Restored>);

/// Empties what the previous run left, once this run is sure to start
/// (alone, or with every process of its cluster agreed): the output files
/// opened by [`Engine::open_outputs`], and this process's part of the state
/// (kept locked since before the cluster connected). A run that resumes
/// (`resume`) cuts the output files back to where its checkpoint says
/// they stood instead, and one that restores reads the retained input.
fn start(
    outputs: Option<(Outputs, Vec<ToEmpty>)>,
    state: Option<(PathBuf, StateLock)>,
    resume: Option<resume::ResumePlan>,
    origin: Origin,
    workers: usize,
    processes: usize,
    progress: Option<Arc<Progress>>,
) -> Result<Started, EngineError> {
    use std::io::{Seek, SeekFrom};
    let restore = resume.as_ref().and_then(|r| r.restore.clone());
    // Where the outputs are cut back to (a restored run's at its cut).
    let sinks = resume.as_ref().and_then(|r| r.sinks.clone());
    // The state first. A single process's checkpoint with a cut is
    // restored: its state and retained input are kept, and read back.
    // Otherwise the state is rebuilt from the inputs (a resumed run reads
    // them from their start), so it starts empty; a resumed run's
    // checkpoint keeps where the outputs stood, written again at once, so
    // that a run killed from here on resumes the same way (killed before,
    // it finds no checkpoint and starts over, which writes the same
    // outputs). Only then are the outputs cut back.
    let mut restored = None;
    let state = match state {
        Some((part, lock)) => {
            let label = part.display().to_string();
            let store = match &restore {
                Some(checkpoint) => {
                    let store = Store::open(&part)?;
                    let cut = checkpoint.retained.as_ref().map_or(0, |r| r.cut);
                    let reading = Instant::now();
                    restored = Some(store.restored(cut).map_err(|e| {
                        EngineError::Resume(format!(
                            "cannot read the checkpoint in {label}: {e}. The state directory is damaged: run with --reset to start over (the state and outputs are replaced), or give another state directory"
                        ))
                    })?);
                    tracing::info!(
                        entries = restored.as_ref().map_or(0, Restored::entries),
                        secs = reading.elapsed().as_secs_f64(),
                        "read the checkpoint's retained input"
                    );
                    store
                }
                None => Store::create_fresh(&part, &lock)?,
            };
            let mut state = ProcessState::new(store, lock, label, workers, processes);
            if let Some(progress) = progress {
                state.retain_input(progress, restore.as_ref());
            }
            state.set_origin(
                &origin.run,
                (&origin.fingerprint, origin.fingerprint_parts),
                origin.inputs,
            );
            if let (Some(sinks), None) = (&sinks, &restore) {
                state.set_sinks(sinks, sinks);
                state.write_checkpoint().map_err(|e| {
                    EngineError::Worker(format!("state directory {}: {e}", state.label))
                })?;
            }
            Some(state)
        }
        None => None,
    };
    let outputs = match outputs {
        Some((mut outputs, files)) => {
            for mut f in files {
                // Only a regular file has contents to empty (not /dev/full,
                // a FIFO or a terminal).
                let regular = f.file.metadata().is_ok_and(|m| m.is_file());
                if regular {
                    let keep = match &sinks {
                        Some(s) if f.segments => s.segments_len,
                        Some(s) => s.dead_len,
                        None => 0,
                    };
                    f.file
                        .set_len(keep)
                        .and_then(|_| f.file.seek(SeekFrom::Start(keep)))
                        .map_err(|e| io_err("cannot empty output", &f.path, e))?;
                }
            }
            // A restored run keeps the checkpoint's clamped positions for
            // a later resume on grown inputs.
            outputs.resume_clamped = restore.as_ref().and_then(|c| c.sinks.clone());
            outputs.resume = sinks;
            Some(outputs)
        }
        None => None,
    };
    Ok((outputs, state, restored))
}

/// Tells, when a run restores a checkpoint at `cut`, what the clients of
/// its socket sources (if any) must send again, and by when: the
/// checkpoint holds the lines with event times before the cut (lines sent
/// again at such times are late: dead letters), not those read after it. A
/// restored socket's clock waits `wait_ms` (the allowed lateness) from now
/// for its first line; lines sent again after that, or after newer lines,
/// are late (see `SourceClock::wait_for_first_line`).
fn tell_socket_clients(inputs: &BTreeMap<String, Input>, cut: crate::time::Time, wait_ms: u64) {
    let sockets: Vec<&str> = inputs
        .iter()
        .filter(|(_, input)| input.is_socket())
        .map(|(name, _)| name.as_str())
        .collect();
    if sockets.is_empty() {
        return;
    }
    let utc = |ms: u64| {
        chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default()
    };
    let deadline = crate::time::wall_clock_ms().saturating_add(wait_ms);
    tracing::warn!(
        "restored the checkpoint: it holds the lines of socket source(s) {} with event times before {} ({cut} ms); clients must send again what they sent from that time on, oldest first and before any new line, within {} s of this start (by {}): the socket's clock waits that long for them; later, or after newer lines, they are late. Lines at earlier times are late too (dead letters; the checkpoint holds those it had read)",
        sockets.join(", "),
        utc(cut),
        wait_ms as f64 / 1000.0,
        utc(deadline),
    );
}

/// `path` made absolute, with its longest existing ancestor resolved
/// (symbolic links, `..`) and the rest appended as written: where it is,
/// or would be once created.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::env::current_dir()
        .map(|d| d.join(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut at = absolute.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return absolute,
        }
    }
}

/// A file's identity: its device and inode if it exists, else where it
/// would be ([`resolved`]: so `out/../out/x` and `out/x` are the same file
/// before either exists). `None` for a character device (`/dev/null`,
/// a terminal): several outputs may share one, as nothing written there
/// is kept to be overwritten.
fn file_identity(path: &Path) -> Option<(u64, u64, PathBuf)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.file_type().is_char_device() {
            return None;
        }
        return Some((meta.dev(), meta.ino(), PathBuf::new()));
    }
    Some((0, 0, resolved(path)))
}

fn io_err(what: &'static str, path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The cluster runs of this process whose stop switch a broken peer
/// connection sets (see [`watch_cluster_panics`]).
static CLUSTER_RUNS: std::sync::Mutex<Vec<std::sync::Weak<Abort>>> =
    std::sync::Mutex::new(Vec::new());

/// Makes a panic of timely's network threads ("timely communication error",
/// a peer process that went away) stop `abort`'s run with a reason, and
/// keeps the panics that follow from it (poisoned queues) quiet. The panic
/// hook is installed once per process and forwards every other panic to the
/// hook that was there before.
fn watch_cluster_panics(abort: &Arc<Abort>) {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let mut runs = CLUSTER_RUNS.lock().unwrap_or_else(|e| e.into_inner());
    runs.retain(|w| w.strong_count() > 0);
    runs.push(Arc::downgrade(abort));
    drop(runs);
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
            let runs: Vec<Arc<Abort>> = CLUSTER_RUNS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(|w| w.upgrade())
                .collect();
            if let Some(m) = message.filter(|m| m.starts_with("timely communication error")) {
                if !runs.is_empty() {
                    let reason = format!(
                        "lost the connection to another process of the cluster ({m}); it has probably failed: see its error"
                    );
                    for run in &runs {
                        run.fail(reason.clone());
                    }
                    // The process ends here, with the reason: its workers,
                    // unwinding with queues to the lost peer, would
                    // otherwise panic again in a destructor and abort the
                    // process without one. State batches are in the
                    // write-ahead log; the next run resumes.
                    eprintln!("error: {reason}");
                    // SAFETY: _exit(2) ends the process at once; nothing
                    // of this process is used after it.
                    unsafe { libc::_exit(1) };
                }
            }
            if runs.iter().any(|r| r.is_stopped()) {
                // A consequence of the failure already reported.
                return;
            }
            previous(info);
        }));
    });
}

/// Spreads a graceful shutdown across a cluster: a small dataflow beside
/// the main one, in which a worker whose process got the signal sends a
/// token to every worker of every process, which sets its own process's
/// shutdown flag. Without it, SIGTERM to a process whose workers read no
/// live source would change nothing.
struct ClusterShutdown {
    flag: Arc<std::sync::atomic::AtomicBool>,
    /// `None` once sent or closed.
    input: Option<timely::dataflow::operators::vec::input::Handle<u64, ()>>,
}

impl ClusterShutdown {
    fn install(
        worker: &mut timely::worker::Worker,
        flag: &Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        use timely::dataflow::operators::vec::{Broadcast, Input};
        use timely::dataflow::operators::Inspect;
        let seen = Arc::clone(flag);
        let input = worker.dataflow_named::<u64, _, _>("shutdown", |scope| {
            let (input, stream) = scope.new_input::<()>();
            stream.broadcast().inspect(move |_| {
                // Said once per process, by the worker that learns it first.
                if !seen.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    eprintln!(
                        "segflow: another process of the cluster was asked to stop; stopping; finishing what was read"
                    );
                }
            });
            input
        });
        ClusterShutdown {
            flag: Arc::clone(flag),
            input: Some(input),
        }
    }

    /// Sends the token once this process's flag is set; closes the input
    /// (so this dataflow can end) once it is sent or the main dataflow has
    /// `finished`.
    fn step(&mut self, finished: bool) {
        let Some(input) = self.input.as_mut() else {
            return;
        };
        if self.flag.load(std::sync::atomic::Ordering::SeqCst) {
            input.send(());
            self.input = None;
        } else if finished {
            self.input = None;
        }
    }
}

/// How long the processes of a cluster may take to connect: one minute.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a parked worker may take to notice that the run was stopped.
const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The message of a panic payload (`&str` or `String`), for the error a
/// failed run returns.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("a worker failed: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("a worker failed: {s}")
    } else {
        "a worker failed (no message)".to_string()
    }
}

/// The record kind a stream carries.
fn record_kind(stream: StreamKind) -> RecordKind {
    match stream {
        StreamKind::Web => RecordKind::Web,
        StreamKind::Crm => RecordKind::Crm,
        StreamKind::Transactions => RecordKind::Transactions,
    }
}

/// A configured run of a dataflow definition.
///
/// ```no_run
/// use segflow::{Engine, Output, spec::parse_spec};
/// let spec = parse_spec(&std::fs::read_to_string("dataflows/ecommerce.toml")?, "ecommerce.toml")?;
/// let summary = Engine::new(spec)
///     .output(Output::Path("out/segments.jsonl".into()))
///     .run(timely::Config::process(2))?;
/// println!("{} profiles", summary.profiles);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Engine {
    spec: Spec,
    inputs: BTreeMap<String, Input>,
    output: Option<Output>,
    dead_letter: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    shutdown: Option<Arc<std::sync::atomic::AtomicBool>>,
    connect_timeout: std::time::Duration,
    reset: bool,
    definition_file: Option<PathBuf>,
    live: Option<Arc<crate::serve::Live>>,
    nice: i32,
}

impl Engine {
    /// An engine for `spec`, with the inputs and outputs the file names.
    pub fn new(spec: Spec) -> Engine {
        let mut inputs = BTreeMap::new();
        for s in &spec.sources {
            if let Some(location) = &s.location {
                inputs.insert(
                    s.name.clone(),
                    Input::parse(location, s.follow, s.until_disconnect, s.write_key.clone()),
                );
            }
        }
        let output = spec.output.segments.as_deref().map(Output::parse);
        let dead_letter = spec.output.dead_letter.as_ref().map(PathBuf::from);
        let state_dir = spec.output.state_dir.as_ref().map(PathBuf::from);
        Engine {
            spec,
            inputs,
            output,
            dead_letter,
            state_dir,
            shutdown: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reset: false,
            definition_file: None,
            live: None,
            nice: 0,
        }
    }

    /// The definition being run.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Sets (or overrides) the input of source `name`.
    pub fn input(mut self, name: &str, input: Input) -> Result<Engine, EngineError> {
        if self.spec.source(name).is_none() {
            let known = self
                .spec
                .sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            let known = if known.is_empty() {
                format!(
                    "none (add a [sources.{name}] table with `kind = \"web\"`, \"crm\" or \"transactions\")"
                )
            } else {
                known
            };
            return Err(EngineError::UnknownSource {
                name: name.to_string(),
                known,
            });
        }
        self.inputs.insert(name.to_string(), input);
        Ok(self)
    }

    /// Sets the input of source `name` from a command-line location, keeping
    /// the file's `follow`/`until` settings.
    pub fn input_location(self, name: &str, location: &str) -> Result<Engine, EngineError> {
        let (follow, until, key) = self
            .spec
            .source(name)
            .map(|s| (s.follow, s.until_disconnect, s.write_key.clone()))
            .unwrap_or((false, false, None));
        self.input(name, Input::parse(location, follow, until, key))
    }

    /// The bytes a replay reads: the sizes of its inputs, if every input
    /// is read to its end (files not followed, in-memory lines); `None` for
    /// a run with a live input (a followed file, a socket, a topic), or an
    /// input that cannot be looked at.
    pub fn replay_bytes(&self) -> Option<u64> {
        let mut total = 0;
        for input in self.inputs.values() {
            total += match input {
                Input::File {
                    path,
                    follow: false,
                } => std::fs::metadata(path).ok()?.len(),
                Input::Memory(lines) => lines.iter().map(|l| l.len() as u64 + 1).sum(),
                _ => return None,
            };
        }
        Some(total)
    }

    /// Sets where segment diffs go.
    pub fn output(mut self, output: Output) -> Engine {
        self.output = Some(output);
        self
    }

    /// Sets the dead-letter file.
    pub fn dead_letter(mut self, path: impl Into<PathBuf>) -> Engine {
        self.dead_letter = Some(path.into());
        self
    }

    /// Graceful shutdown: once `flag` is set (e.g. by a SIGTERM handler),
    /// every source ends its input where it is; the run completes and
    /// writes what was read, flushes its outputs and returns its summary.
    /// A live source notices within its next scheduling (at most about one
    /// tick or `idle_advance`).
    pub fn shutdown_on(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Engine {
        self.shutdown = Some(flag);
        self
    }

    /// Runs the engine's threads at CPU priority `nice` (0 to 19, added to
    /// the calling thread's; see `setpriority(2)`): the thread that calls
    /// [`Engine::run`], and every thread the run starts after it (the
    /// workers, the readers, the state writer, RocksDB's background
    /// threads) inherits it. Threads started before, such as an API
    /// server's, keep theirs: on a machine short of cores they are
    /// scheduled first, and the engine takes the delay (its commit lag
    /// grows) rather than the answers. The calling thread keeps the lower
    /// priority after the run (an unprivileged process cannot raise it
    /// back). A priority that cannot be set is logged and the run goes on.
    pub fn nice(mut self, nice: i32) -> Engine {
        self.nice = nice.clamp(0, 19);
        self
    }

    /// How long the processes of a cluster may take to connect to each
    /// other before the run fails, naming the peers that did not answer
    /// (default [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: std::time::Duration) -> Engine {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the RocksDB state directory. A run on a directory that holds
    /// a checkpoint of the same dataflow resumes from it (see
    /// [`resume`]), unless [`Engine::reset`] says to start over.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Engine {
        self.state_dir = Some(dir.into());
        self
    }

    /// Watches `path`, the file the definition was read from: while the
    /// run goes on, an edit that changes only segments (new, removed, or
    /// with another condition or `min_dwell`) is applied at an event time
    /// without a restart; any other edit, or a file that does not
    /// validate, is refused with its reason and the run goes on (see
    /// [`crate::dataflow::reload`]). A cluster of several processes does
    /// not watch: its processes would apply an edit at different times.
    pub fn definition_file(mut self, path: impl Into<PathBuf>) -> Engine {
        self.definition_file = Some(path.into());
        self
    }

    /// Feeds `live` for serving (see [`crate::serve`]): the committed
    /// segment diffs, the clocks and counters, and the state for profile
    /// lookups. In a cluster, give it to process 0 only (another process
    /// is refused at [`Engine::run`]): process 0 receives every worker's
    /// diffs and follows the other processes' parts of the state
    /// ([`crate::store::FollowedPart`]), which must be on its machine
    /// (a lookup that needs a part that is not answers 503 with the
    /// reason).
    pub fn serve(mut self, live: Arc<crate::serve::Live>) -> Engine {
        self.live = Some(live);
        self
    }

    /// With `true`, the run starts over: the state directory's contents and
    /// the outputs are replaced instead of resumed from the checkpoint.
    pub fn reset(mut self, reset: bool) -> Engine {
        self.reset = reset;
        self
    }

    /// How this process resumes from the checkpoint in its part of the
    /// state directory `part`: `None` to start over (no checkpoint,
    /// `--reset`, or a process other than 0, whose part is rebuilt from
    /// the inputs either way); an error if process 0's checkpoint cannot
    /// be resumed.
    fn resume_plan(
        &self,
        part: &Path,
        process: usize,
        processes: usize,
        defs: &[SourceDef],
        params: &ReadParams,
        marks: &BTreeMap<String, crate::store::InputMark>,
    ) -> Result<Option<resume::ResumePlan>, EngineError> {
        if self.reset || !Store::is_resumable(part) {
            return Ok(None);
        }
        let damaged = |e: StoreError| {
            EngineError::Resume(format!(
                "cannot read the checkpoint in {}: {e}. The state directory is damaged: run with --reset to start over (the state and outputs are replaced), or give another state directory",
                part.display()
            ))
        };
        let checkpoint = match Store::open_read_only(part) {
            Ok(store) => store.checkpoint().map_err(damaged)?,
            Err(StoreError::NoState { .. }) => return Ok(None),
            Err(e @ StoreError::Rocks { .. }) | Err(e @ StoreError::Corrupt(_)) => {
                return Err(damaged(e))
            }
            Err(e) => return Err(e.into()),
        };
        let Some(checkpoint) = checkpoint else {
            return Ok(None);
        };
        let ours = resume::fingerprint(&self.spec);
        let ours_parts = resume::fingerprint_parts(&self.spec);
        if process != 0 {
            // Its part is rebuilt from the inputs either way; only process
            // 0's checkpoint says where the outputs stood. Its inputs (read
            // here, perhaps from other paths than process 0's) must still
            // be those it read then.
            if checkpoint.fingerprint == ours {
                resume::check_replayed_inputs(part, &checkpoint, &self.inputs, marks)?;
            }
            return Ok(None);
        }
        let (segments, dead) = self.output_identities();
        let files = (
            matches!(self.output, Some(Output::Path(_))),
            self.dead_letter.is_some(),
        );
        let plan = resume::plan(
            part,
            &checkpoint,
            (&ours, &ours_parts),
            processes,
            &self.inputs,
            marks,
            (&segments, &dead),
            files,
        )?;
        resume::check_new_ranges(part, &checkpoint, &plan, defs, params)?;
        Ok(Some(plan))
    }

    /// What the processes of a cluster must agree on (see
    /// [`cluster::Agreement`]).
    fn agreement(&self, threads: usize, processes: usize) -> cluster::Agreement {
        use std::hash::{Hash, Hasher};
        // What the definition computes, not its text or where it was read
        // from (`Spec::semantics`). `DefaultHasher::new()` has fixed keys,
        // and the version is compared too.
        let semantics = self.spec.semantics();
        let mut h = std::hash::DefaultHasher::new();
        semantics.hash(&mut h);
        let inputs = self
            .spec
            .sources
            .iter()
            .map(|s| {
                let kind = match self.inputs.get(&s.name) {
                    Some(Input::File { follow: false, .. }) => "file",
                    Some(Input::File { follow: true, .. }) => "followed file",
                    Some(Input::Tcp {
                        until_disconnect: false,
                        ..
                    }) => "tcp",
                    Some(Input::Tcp {
                        until_disconnect: true,
                        ..
                    }) => "tcp until disconnect",
                    Some(Input::Http { .. }) => "http",
                    Some(Input::Kafka(_)) => "kafka",
                    Some(Input::Memory(_)) => "memory",
                    None => "none",
                };
                format!("{}={kind}", s.name)
            })
            .collect();
        cluster::Agreement {
            version: env!("CARGO_PKG_VERSION").to_string(),
            processes,
            threads,
            definition: format!("{:016x}", h.finish()),
            semantics,
            inputs,
            state: self.state_dir.is_some(),
        }
    }

    fn source_defs(&self) -> Result<Vec<SourceDef>, EngineError> {
        let mut defs = Vec::new();
        for (index, s) in self.spec.sources.iter().enumerate() {
            let input = self
                .inputs
                .get(&s.name)
                .cloned()
                .ok_or_else(|| EngineError::MissingInput(s.name.clone()))?;
            // `follow` and `until` are set in the definition, the input may
            // come from the command line: they must fit each other.
            match &input {
                Input::File { path, .. } if s.until_disconnect => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` sets `until = \"disconnect\"`, which applies to tcp:// inputs only, but its input is the file {}: remove `until` or give a tcp:// input",
                        s.name,
                        path.display()
                    )))
                }
                Input::Tcp { .. } | Input::Http { .. } | Input::Kafka(_) if s.follow => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` sets `follow = true`, which applies to file inputs only, but its input is {}: remove `follow` or give a file",
                        s.name,
                        input.describe()
                    )))
                }
                Input::Http { addr, .. } if s.until_disconnect => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` sets `until = \"disconnect\"`, which applies to tcp:// inputs only, but its input is http://{addr} (an HTTP endpoint runs until the process is stopped): remove `until`",
                        s.name
                    )))
                }
                Input::Kafka(k) if k.problem.is_some() => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` reads {}, which is not a Kafka input segflow can read: {}",
                        s.name,
                        k.describe(),
                        k.problem.as_deref().unwrap_or_default()
                    )))
                }
                Input::Kafka(k) if s.until_disconnect => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` sets `until = \"disconnect\"`, which applies to tcp:// inputs only, but its input is {}: remove `until` (a Kafka source ends with `?until=end` in its location, or runs until the process is stopped)",
                        s.name,
                        k.describe()
                    )))
                }
                Input::Kafka(k) if s.format == crate::spec::Format::Csv => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` is CSV, and its input is the Kafka topic {}: a record of a topic is not a CSV row with a header; send JSON lines (format = \"jsonl\") to the topic",
                        s.name,
                        k.describe()
                    )))
                }
                Input::Http { addr, .. } if s.format != crate::spec::Format::Segment => {
                    return Err(EngineError::SourceSetting(format!(
                        "source `{}` reads http://{addr}, a Segment HTTP API endpoint, so its messages are in the Segment format: set `format = \"segment\"` in [sources.{}]",
                        s.name, s.name
                    )))
                }
                _ => {}
            }
            if let Input::File { path, .. } = &input {
                let file =
                    std::fs::File::open(path).map_err(|e| io_err("cannot open input", path, e))?;
                if file.metadata().is_ok_and(|m| m.is_dir()) {
                    return Err(io_err(
                        "cannot read input",
                        path,
                        std::io::Error::other("it is a directory"),
                    ));
                }
            }
            // A replayed file of lines (not CSV) is cut into ranges here, once
            // per process (one scan of the file), and read by all workers.
            let ranges = match &input {
                Input::File {
                    path,
                    follow: false,
                } if s.format != crate::spec::Format::Csv => Some(Arc::new(
                    crate::io::sources::lines::file_ranges(path, self.spec.engine.file_range_bytes)
                        .map_err(|e| io_err("cannot read input", path, e))?,
                )),
                _ => None,
            };
            let kind = record_kind(s.kind);
            defs.push(SourceDef {
                index: index as u32,
                name: s.name.clone(),
                kind,
                format: s.format,
                time_unit: s.time_unit,
                input,
                ranges,
            });
        }
        Ok(defs)
    }

    /// Refuses outputs that are the same file as each other or as an input
    /// (a segment output given the path of the web input would truncate
    /// it; segment diffs and dead letters in one file would overwrite each
    /// other). Checked before anything is created or truncated.
    fn check_distinct_files(&self) -> Result<(), EngineError> {
        let mut files: Vec<(String, &Path)> = Vec::new();
        for (name, input) in &self.inputs {
            if let Input::File { path, .. } = input {
                files.push((format!("the input of source `{name}`"), path));
            }
            // A topic that is both read and written would read its own
            // diffs back. Broker addresses have many spellings (localhost,
            // 127.0.0.1, a list), so a topic name shared by the input and
            // the output is refused whatever the brokers.
            if let (Input::Kafka(k), Some(Output::Kafka { brokers, topic })) = (input, &self.output)
            {
                if k.topic == *topic {
                    return Err(EngineError::OutputSetting(format!(
                        "the segment output kafka://{brokers}/{topic} has the name of the topic source `{name}` reads ({}): if it is the same topic, the run would read its own diffs back; give the output another topic",
                        k.describe()
                    )));
                }
            }
        }
        let mut outputs: Vec<(String, &Path)> = Vec::new();
        if let Some(Output::Path(p)) = &self.output {
            outputs.push(("the segment output".to_string(), p));
        }
        if let Some(p) = &self.dead_letter {
            outputs.push(("the dead-letter output".to_string(), p));
        }
        if let Some(Output::Webhook(_)) = &self.output {
            outputs.push((
                "the webhook's failed-batch file".to_string(),
                Path::new(&self.spec.output.webhook.failed),
            ));
        }
        if let Some(state) = &self.state_dir {
            let state_at = resolved(state);
            for (what, path) in &outputs {
                if resolved(path).starts_with(&state_at) {
                    return Err(EngineError::SameFile(format!(
                        "{what} {} is inside the state directory {}: give it a path outside (the state directory holds segflow's state only, and a run refuses one with other files in it)",
                        path.display(),
                        state.display()
                    )));
                }
            }
        }
        for (what, path) in outputs {
            let Some(id) = file_identity(path) else {
                files.push((what, path));
                continue;
            };
            if let Some((other, _)) = files
                .iter()
                .find(|(_, p)| file_identity(p).as_ref() == Some(&id))
            {
                return Err(EngineError::SameFile(format!(
                    "{what} {} is also {other}: give each output its own file (segflow would overwrite it)",
                    path.display()
                )));
            }
            files.push((what, path));
        }
        Ok(())
    }

    /// How messages (and checkpoints) name the outputs.
    fn output_labels(&self) -> OutputLabels {
        OutputLabels {
            segments: match self.output.as_ref().unwrap_or(&Output::Discard) {
                Output::Discard => "(none)".to_string(),
                Output::Path(p) => p.display().to_string(),
                Output::Stdout => "standard output".to_string(),
                Output::Tcp(addr) => format!("tcp://{addr}"),
                Output::Webhook(url) => url.clone(),
                Output::Kafka { brokers, topic } => format!("kafka://{brokers}/{topic}"),
                Output::Callback(_) => "callback".to_string(),
            },
            segments_is_stdout: matches!(self.output, Some(Output::Stdout)),
            dead_letters: self
                .dead_letter
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            state: self
                .state_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// How checkpoints name the segment and dead-letter outputs (see
    /// [`Outputs::identities`]), and which of them are files.
    fn output_identities(&self) -> (String, String) {
        let absolute = |p: &Path| {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let labels = self.output_labels();
        let segments = match &self.output {
            Some(Output::Path(p)) => absolute(p),
            _ => labels.segments,
        };
        let dead = self
            .dead_letter
            .as_deref()
            .map(absolute)
            .unwrap_or_default();
        (segments, dead)
    }

    /// Opens the outputs, creating files but not yet emptying them: each
    /// file is also returned, to be truncated (see [`start`]) once the run
    /// is sure to start, so a cluster that fails to start leaves the
    /// previous run's outputs as they were.
    fn open_outputs(&self) -> Result<(Outputs, Vec<ToEmpty>), EngineError> {
        let mut to_empty = Vec::new();
        let mut create = |what: &'static str, path: &Path| -> Result<std::fs::File, EngineError> {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    // create_dir_all meets a file where a directory goes.
                    let e = match e.kind() {
                        std::io::ErrorKind::AlreadyExists => {
                            std::io::Error::other("a part of this path is a file, not a directory")
                        }
                        _ => e,
                    };
                    io_err(what, parent, e)
                })?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(path)
                .map_err(|e| io_err(what, path, e))?;
            // One writer per output file: a second run writing the same
            // file (with another state directory) is refused.
            if file.metadata().is_ok_and(|m| m.is_file()) {
                match file.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(io_err(
                            what,
                            path,
                            std::io::Error::other(
                                "another segflow run is writing it; wait for it to end or choose another output",
                            ),
                        ))
                    }
                    Err(std::fs::TryLockError::Error(e)) => return Err(io_err(what, path, e)),
                }
            }
            to_empty.push(ToEmpty {
                path: path.to_path_buf(),
                file: file.try_clone().map_err(|e| io_err(what, path, e))?,
                segments: what == "cannot create output",
            });
            Ok(file)
        };
        let output = self.output.clone().unwrap_or(Output::Discard);
        let labels = self.output_labels();
        let mut webhook_failures = None;
        let segments = match output {
            Output::Discard => SegmentSink::Discard,
            Output::Stdout => {
                SegmentSink::Writer(Box::new(std::io::BufWriter::new(std::io::stdout())))
            }
            Output::Path(p) => {
                // `ftp://…`, `http:/host` (a slash short), `HTTPS:x`: not a
                // file the user meant.
                let text = p.to_string_lossy();
                if let Some((scheme, _)) = text.split_once(':') {
                    let looks_like_url = !scheme.is_empty()
                        && scheme
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
                        && text[scheme.len() + 1..].starts_with('/');
                    if looks_like_url {
                        return Err(EngineError::OutputSetting(format!(
                            "the segment output {text} looks like a URL of an unknown kind: give a file path, -, tcp://HOST:PORT, or an http:// or https:// URL (a webhook)"
                        )));
                    }
                }
                SegmentSink::Writer(Box::new(std::io::BufWriter::with_capacity(
                    1 << 20,
                    create("cannot create output", &p)?,
                )))
            }
            Output::Tcp(addr) => {
                let stream = std::net::TcpStream::connect(&addr)
                    .map_err(|e| io_err("cannot connect output to", Path::new(&addr), e))?;
                stream.set_nodelay(true).ok();
                SegmentSink::Writer(Box::new(std::io::BufWriter::new(stream)))
            }
            Output::Webhook(url) => {
                let uri: Result<ureq::http::Uri, _> = url.parse();
                let valid = uri.as_ref().ok().filter(|u| {
                    u.host().is_some_and(|h| !h.is_empty())
                        // (`Uri` drops a port out of range: read it here.)
                        && u.authority()
                            .and_then(|a| a.as_str().rsplit_once(':'))
                            .map(|(_, p)| p)
                            .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
                            .is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
                        && u.scheme_str().is_some_and(|s| {
                            s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")
                        })
                });
                if valid.is_none() {
                    let why = match &uri {
                        Err(e) => e.to_string(),
                        Ok(u) if u.host().is_none_or(str::is_empty) => "no host".to_string(),
                        Ok(_) => "the port must be from 1 to 65535".to_string(),
                    };
                    return Err(EngineError::OutputSetting(format!(
                        "the segment output {url} is not a valid webhook URL ({why}): give http(s)://HOST[:PORT]/PATH"
                    )));
                }
                let spec = &self.spec.output.webhook;
                let path = Path::new(&spec.failed);
                let failed = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| io_err("cannot open the webhook's failed-batch file", path, e))?;
                let hook = crate::io::sinks::webhook::Webhook::new(
                    &url,
                    spec,
                    failed,
                    self.shutdown.clone(),
                );
                webhook_failures = Some((Arc::clone(&hook.failures), spec.failed.clone()));
                SegmentSink::Writer(Box::new(hook))
            }
            Output::Kafka { brokers, topic } => {
                if topic.is_empty() {
                    return Err(EngineError::OutputSetting(format!(
                        "the segment output kafka://{brokers} names no topic: give kafka://HOST:PORT/TOPIC"
                    )));
                }
                let sink =
                    crate::io::sinks::kafka::KafkaSink::connect(&brokers, &topic).map_err(|e| {
                        io_err(
                            "cannot open the Kafka output",
                            Path::new(&format!("kafka://{brokers}/{topic}")),
                            e,
                        )
                    })?;
                SegmentSink::Writer(Box::new(sink))
            }
            Output::Callback(f) => SegmentSink::Callback(f),
        };
        let dead_letters = match &self.dead_letter {
            Some(p) => Some(Box::new(std::io::BufWriter::new(create(
                "cannot create dead-letter output",
                p,
            )?)) as Box<dyn Write + Send>),
            None => None,
        };

        Ok((
            Outputs {
                segments,
                dead_letters,
                labels,
                resume: None,
                resume_clamped: None,
                identities: self.output_identities(),
                webhook_failures,
                live: None,
            },
            to_empty,
        ))
    }

    /// Takes the lock of this process's part of the state directory (see
    /// [`crate::store::part_dir`]), after checking that it holds nothing
    /// segflow did not create; `None` without a state directory. Nothing
    /// is emptied yet (see [`start`]).
    fn lock_state_part(&self, process: usize) -> Result<Option<(PathBuf, StateLock)>, EngineError> {
        let Some(dir) = &self.state_dir else {
            return Ok(None);
        };
        let part = crate::store::part_dir(dir, process);
        let lock = match self.reset {
            true => StateLock::take_to_reset(&part)?,
            false => StateLock::take(&part)?,
        };
        Ok(Some((part, lock)))
    }

    /// Runs the dataflow on `config` until every input has ended; returns
    /// worker 0's summary (on other processes of a cluster, an empty one).
    pub fn run(self, mut config: timely::Config) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        if self.nice > 0 {
            lower_this_thread(self.nice);
        }
        crate::model::normalize::load_phone_metadata_in_background();
        let peers = match &config.communication {
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                ..
            } => Some((*threads, *process, addresses.clone())),
            _ => None,
        };
        let (process, processes, workers) = match &config.communication {
            timely::CommunicationConfig::Cluster {
                threads,
                process,
                addresses,
                ..
            } => (*process, addresses.len(), *threads),
            timely::CommunicationConfig::Process(threads) => (0, 1, *threads),
            _ => (0, 1, 1),
        };
        // Process 0 serves the whole cluster (every worker's diffs come to
        // it, and it follows the other processes' parts of the state).
        if self.live.is_some() && process > 0 {
            return Err(EngineError::OutputSetting(format!(
                "process {process} of the cluster is given an API to serve, but process 0 serves the whole cluster's run: give Engine::serve to process 0 only"
            )));
        }
        // Inputs are checked, this process's part of the state directory
        // locked and emptied (first: a second run on the same directory
        // destroys nothing) and, on process 0, the outputs opened, all
        // before the cluster connects: a process that cannot start tells
        // its peers why, and they stop too.
        let e = &self.spec.engine;
        let params = Arc::new(ReadParams {
            time: e.time_config(),
            max_line_bytes: e.max_line_bytes,
            file_range_bytes: e.file_range_bytes,
            rules: IdentityRules::new(
                self.spec.identity.priority.clone(),
                e.default_region.clone(),
            ),
            summed: self
                .spec
                .traits
                .iter()
                .filter(|t| t.aggregate == Aggregate::Sum)
                .map(|t| SummedField {
                    kind: record_kind(t.stream),
                    path: t.of.clone().unwrap_or_default(),
                })
                .collect(),
            // Decoding keeps the fields the traits read (their filters,
            // parts, sequence steps and aggregated fields); nothing else
            // reads record fields.
            projection: crate::model::Projection::reading(self.spec.traits.iter().flat_map(|t| {
                t.filter
                    .iter()
                    .chain(t.part.iter())
                    .chain(
                        t.sequence
                            .iter()
                            .flat_map(|s| s.steps.iter().filter_map(|(_, f)| f.as_ref())),
                    )
                    .flat_map(|f| f.paths().into_iter().map(|(p, _)| p))
                    .chain(t.of.as_deref())
            })),
            shutdown: self.shutdown.clone(),
            resume: None,
            progress: None,
        });
        let prepared = self.source_defs().and_then(|defs| {
            self.check_distinct_files()?;
            let state = self.lock_state_part(process)?;
            // The inputs as they are, hashed once: checked against the
            // checkpoint, and recorded in the new ones.
            let marks = match &state {
                Some(_) => resume::input_marks(&self.inputs)?,
                None => BTreeMap::new(),
            };
            let resume = match &state {
                Some((part, _)) => {
                    self.resume_plan(part, process, processes, &defs, &params, &marks)?
                }
                None => None,
            };
            let outputs = if process == 0 {
                Some(self.open_outputs()?)
            } else {
                None
            };
            Ok((defs, outputs, state, resume, marks))
        });
        let (sockets, prepared) = match &peers {
            None => (None, prepared),
            Some((threads, process, addresses)) => {
                let connected = cluster::connect(
                    *process,
                    addresses,
                    &self.agreement(*threads, addresses.len()),
                    prepared.as_ref().err().map(|e| e.to_string()),
                    self.connect_timeout,
                    self.shutdown.as_deref(),
                );
                let prepared = prepared?;
                (
                    Some((connected.map_err(EngineError::Cluster)?, *process, *threads)),
                    Ok(prepared),
                )
            }
        };
        let (defs, outputs, state, resume, marks) = prepared?;
        // A single process with state retains its input in its checkpoints
        // (a cluster resumes by reading its inputs again); a resumed one
        // starts its readers where the checkpoint says.
        let resume_points = resume.as_ref().and_then(|r| r.restore.as_ref()).map(|c| {
            let mut retained = c.retained.clone().unwrap_or_default();
            for (name, what) in resume.iter().flat_map(|r| &r.followed_from_start) {
                tracing::warn!(
                    "{what}; it is followed, so it is read again from its start (as when it is rotated during a run), and its records before the checkpoint's cut are dropped"
                );
                retained.points.remove(name);
            }
            Resume {
                before: retained.cut,
                dead_bound: retained.sinks.as_ref().map_or(0, |s| s.dead_bound),
                points: retained.points,
            }
        });
        let progress = (state.is_some() && processes == 1).then(|| {
            let names = defs.iter().map(|d| d.name.clone()).collect();
            Arc::new(Progress::new(names, resume_points.as_ref()))
        });
        let params = Arc::new(ReadParams {
            resume: resume_points.map(Arc::new),
            progress: progress.clone(),
            ..(*params).clone()
        });
        let origin = Origin {
            run: match &sockets {
                Some((connected, ..)) => connected.run.clone(),
                None => crate::store::new_run_id(),
            },
            fingerprint: resume::fingerprint(&self.spec),
            fingerprint_parts: resume::fingerprint_parts(&self.spec),
            inputs: marks,
        };
        let run = origin.run.clone();
        let (mut outputs, state, restored) =
            start(outputs, state, resume, origin, workers, processes, progress)?;
        if let (Some(live), Some(outputs)) = (&self.live, outputs.as_mut()) {
            // Process 0 serves: its outputs' diffs (every worker's), its
            // part of the state (the whole state of a single process) and,
            // in a cluster, the other processes' parts, followed.
            match (&state, &self.state_dir) {
                (Some(state), Some(dir)) => {
                    let (store, readable, lock) = state.readable();
                    let peers = (1..processes)
                        .map(|p| crate::store::FollowedPart::new(dir, p, &run))
                        .collect();
                    live.attach_state(store, readable, lock, peers);
                }
                _ => live.without_state(),
            }
            outputs.live = Some(Arc::clone(live));
        }
        if let Some(r) = &restored {
            tell_socket_clients(&self.inputs, r.cut, params.time.restored_socket_wait_ms());
        }
        let defs = Arc::new(defs);
        let restored_before = restored.as_ref().map_or(0, |r| r.cut);
        let restoration = restored.as_ref().map(|r| (r.cut, r.entries()));
        // The restored names go to the sinks directly: nothing in the
        // dataflow reads them.
        let mut restored = restored;
        let names: crate::model::IdMap<String> = restored
            .as_mut()
            .map(|r| std::mem::take(&mut r.names).into_iter().collect())
            .unwrap_or_default();
        // One share per worker, taken by it (and dropped once injected).
        let restored: Arc<Vec<Mutex<Option<Restored>>>> = Arc::new(
            restored
                .map(|r| r.into_shares(workers))
                .unwrap_or_default()
                .into_iter()
                .map(|share| Mutex::new(Some(share)))
                .collect(),
        );
        let shared = Arc::new(ProcessShared::new(state, restored_before, names));
        let layout = Layout { workers, processes };
        let worker_shared = Arc::clone(&shared);
        let outputs = Arc::new(Mutex::new(outputs));
        let e = &self.spec.engine;
        // Idle merge effort makes every arrangement reschedule itself while
        // it is not fully merged: memory of a quiet run shrinks sooner, but
        // under a live load it costs CPU and latency, so it is opt-in.
        differential_dataflow::configure(
            &mut config.worker,
            &differential_dataflow::Config::default().idle_merge_effort(
                e.idle_merge_effort
                    .map(|n| n.min(isize::MAX as u64) as isize),
            ),
        );
        // Hot reload of segment definitions, for a single process.
        let reload = match (&self.definition_file, processes) {
            (Some(path), 1) => match std::fs::read_to_string(path) {
                Ok(text) => Some(watch::watch(
                    path.clone(),
                    self.spec.clone(),
                    text,
                    std::time::Duration::from_millis(500),
                    self.live.clone(),
                )),
                Err(e) => {
                    tracing::warn!(
                        "cannot read {} to watch it for changes ({e}): edits of its segments will not be applied while the run goes on",
                        path.display()
                    );
                    None
                }
            },
            _ => None,
        };
        let spec = Arc::new(self.spec);
        // The first failure of any worker stops every worker of the process.
        let abort = Arc::new(Abort::default());
        if let Some(state) = &shared.state {
            state.stop_on_write_failure(Arc::clone(&abort));
        }
        let worker_abort = Arc::clone(&abort);
        let in_cluster = peers.is_some();
        if in_cluster {
            // A broken connection to a peer panics timely's network thread;
            // that ends this run too, with the reason.
            watch_cluster_panics(&abort);
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // A signal to any process of a cluster stops the whole cluster.
        let cluster_shutdown = self.shutdown.clone().filter(|_| in_cluster);
        let execute = move || {
            let work = move |worker: &mut timely::worker::Worker| {
                let abort = Arc::clone(&worker_abort);
                let outputs = if worker.index() == 0 {
                    outputs.lock().ok().and_then(|mut o| o.take())
                } else {
                    None
                };
                let result = Rc::new(RefCell::new(None));
                let operator_time = operator_time::OperatorTime::install(worker);
                let main_dataflow = worker.next_dataflow_index();
                let mut share = restored
                    .get(worker.index() % workers.max(1))
                    .and_then(|share| share.lock().ok()?.take());
                worker.dataflow_named::<crate::time::Time, _, _>("segflow", |scope| {
                    build(
                        scope,
                        &spec,
                        &defs,
                        Arc::clone(&params),
                        layout,
                        outputs,
                        Arc::clone(&worker_shared),
                        share.take(),
                        reload.clone(),
                        Rc::clone(&result),
                        Arc::clone(&abort),
                    );
                });
                // Park until there is work: sources wake their worker when input
                // arrives, and schedule themselves when their watermark moves.
                // The time-out only bounds how long a parked worker takes to
                // notice that another one stopped the run.
                let mut shutdown = cluster_shutdown
                    .as_ref()
                    .map(|flag| ClusterShutdown::install(worker, flag));
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while !abort.is_stopped() && worker.step_or_park(Some(STOP_CHECK)) {
                        if let Some(s) = shutdown.as_mut() {
                            let finished = !worker.installed_dataflows().contains(&main_dataflow);
                            s.step(finished);
                        }
                    }
                }));
                if let Err(payload) = stepped {
                    abort.fail(panic_message(payload.as_ref()));
                }
                if abort.is_stopped() {
                    if in_cluster {
                        // Never shut down cleanly: the peer processes would
                        // take a clean shutdown for a finished run. This
                        // process exits with the reason (see below), its
                        // connections break, and the peers stop with an
                        // error too.
                        loop {
                            std::thread::park();
                        }
                    }
                    // Leave without finishing the dataflow: timely would
                    // otherwise step it until it completes.
                    for id in worker.installed_dataflows() {
                        worker.drop_dataflow(id);
                    }
                    return None;
                }
                if let Some(profile) = &operator_time {
                    profile.report(worker.index(), 60);
                }
                let summary = result.borrow_mut().take();
                summary
            };
            let guards = match sockets {
                None => timely::execute(config, work),
                Some((connected, process, threads)) => cluster::execute(
                    connected.sockets,
                    process,
                    threads,
                    config.worker.clone(),
                    work,
                ),
            }
            .map(|guards| guards.join());
            let _ = done_tx.send(guards);
        };
        let results = match peers {
            None => {
                execute();
                done_rx
                    .recv()
                    .map_err(|_| EngineError::Worker("the workers did not report".into()))?
            }
            Some(_) => {
                std::thread::Builder::new()
                    .name("segflow-cluster".into())
                    .spawn(execute)
                    .map_err(|e| EngineError::Worker(format!("cannot start the workers: {e}")))?;
                loop {
                    match done_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                        Ok(results) => break results,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                            break Err("the workers did not report".to_string())
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    }
                    if abort.is_stopped() {
                        // Do not wait for the workers (they do not shut
                        // down cleanly, see above).
                        break Ok(Vec::new());
                    }
                }
            }
        };
        // The workers have ended (or, in a cluster, stopped): a stop
        // reason, if any, says why the run failed.
        match abort.reason() {
            Some(Stop::Failed(reason)) => return Err(EngineError::Worker(reason)),
            Some(Stop::OutputClosed) => return Err(EngineError::OutputClosed),
            None => {}
        }
        let mut summary = None;
        let mut worker_error = None;
        for r in results.map_err(EngineError::Worker)? {
            match r {
                Ok(Some(s)) => summary = Some(s),
                Ok(None) => {}
                Err(e) => worker_error = Some(e),
            }
        }
        if let Some(e) = worker_error {
            return Err(EngineError::Worker(e));
        }
        let mut summary = summary.unwrap_or_default();
        // The last state batch may be written by any worker of the process,
        // after worker 0 made its summary.
        if let Some(state) = &shared.state {
            summary.state_batches = state.batches();
        }
        summary.elapsed_secs = started.elapsed().as_secs_f64();
        if process == 0 {
            summary.restored = restoration;
        }
        Ok(summary)
    }
}
