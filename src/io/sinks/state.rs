//! Sharded state writes: every worker writes the state of the keys it owns,
//! and the workers of a process commit together.
//!
//! The links of an identifier, the totals of a `(profile, trait)` and the
//! attributes of a profile come out of the operators that own those keys,
//! on whichever worker owns them; the commit stage of that worker turns
//! them into state changes (staged in a [`StateBatch`]), without sending
//! them anywhere.
//! Segment memberships, which worker 0 receives for the diff output anyway,
//! are staged by worker 0.
//!
//! The workers of one process share one RocksDB part ([`ProcessState`]).
//! State and checkpoint must always agree on one completed time, while
//! workers complete times at slightly different moments, so each worker
//! *deposits* its changes per completed time, with the time below which it
//! has deposited everything (its horizon). Whichever worker moves the least
//! horizon of the process writes every deposit below it, oldest first, as
//! one `WriteBatch` with the checkpoint of the last of those times: a group
//! commit. Keys are disjoint between workers (each has one owner), so only
//! the order of times matters. The names of identifier keys, needed to
//! write them as text, reach the first worker of every process
//! ([`ProcessShared::names`]) before any update that uses them completes.
//!
//! In a cluster each process writes its own part: process 0 the state
//! directory itself, process `p` the sibling `<dir>-process<p>`
//! ([`crate::store::part_dir`]); `segflow query` merges the parts.
//!
//! The writes themselves run on a thread of their own per process (the
//! [`StateWriter`]), in the order the group commit forms them, so the
//! workers go on with the next times while RocksDB writes: a state batch
//! costs the workers only its forming. At most [`WRITES_QUEUED`] batches
//! wait; a worker that forms one more waits for the writer (back-pressure,
//! so memory stays bounded). The checkpoint a batch carries is only ever
//! older than the outputs it describes (they are written first), which is
//! what a restart needs; the run ends only once every batch is written,
//! and the first failed write fails the run.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::io::sources::Progress;
use crate::io::Abort;
use crate::model::{Id, IdMap};
use crate::store::{
    Checkpoint, InputMark, RetainedBatch, RetainedCut, SinkPositions, StateBatch, StateLock, Store,
    StoreError,
};
use crate::time::{Completion, Time};

use super::STATE_FLUSH_INTERVAL;

/// What the workers of one process share in the commit stage: identifier
/// names, the commit rule's end of data, and the part of the state they
/// write (if the run writes state).
pub struct ProcessShared {
    /// The name (`kind:value`) of every identifier key named so far;
    /// filled by the process's first worker as names arrive, which is
    /// before any update at a later or equal time can complete.
    pub names: RwLock<IdMap<String>>,
    /// The commit rule, fed by the source clocks (which reach the first
    /// worker of every process).
    pub completion: Mutex<Completion>,
    /// This process's part of the state.
    pub state: Option<ProcessState>,
    /// A run resumed from a checkpoint's retained input: its state holds
    /// every change of a time before this (the checkpoint's cut), which is
    /// not written again (0 otherwise).
    pub restored_before: Time,
    /// The names of segments added while the run goes on (see
    /// [`crate::dataflow::reload`]), by index: the definition's segments,
    /// then the added ones; empty until a reload adds one.
    pub segment_names: Mutex<Vec<String>>,
}

impl ProcessShared {
    /// The shared commit-stage state of a process whose part of the state
    /// (if any) is `state`, knowing `names` (a restored checkpoint's).
    pub fn new(
        state: Option<ProcessState>,
        restored_before: Time,
        names: IdMap<String>,
    ) -> ProcessShared {
        ProcessShared {
            names: RwLock::new(names),
            completion: Mutex::new(Completion::restored(restored_before)),
            state,
            restored_before,
            segment_names: Mutex::new(Vec::new()),
        }
    }

    /// The name of an identifier key, or an internal error.
    pub fn name(names: &IdMap<String>, key: &Id) -> Result<String, String> {
        names
            .get(key)
            .cloned()
            .ok_or_else(|| format!("internal error: no name for identifier key {:032x}", key.0))
    }
}

/// State batches formed but not yet written that may wait for the
/// writer thread before the worker forming the next one waits too.
pub const WRITES_QUEUED: usize = 4;

/// How long one state write (a batch, a flush) may take before the run
/// fails with "the store is stuck" instead of waiting for it for good.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(60);

/// What the writer thread of a process does, in order.
enum Job {
    /// Writes a state batch, the retained updates (absorbed in order) and
    /// the checkpoint, atomically ([`Store::write_retained`]).
    Write {
        batch: StateBatch,
        retained: Vec<RetainedBatch>,
        checkpoint: Box<Checkpoint>,
        /// Every change of a time before this is in the store once this
        /// job is done (see [`StateWriter::readable`]).
        through: Time,
    },
    /// Flushes the memtables ([`Store::flush`]).
    Flush,
    /// Answers once every earlier job is done.
    Sync(mpsc::Sender<()>),
}

/// The thread that writes one process's state batches, in the order they
/// are queued. A write that fails stops it: the error is kept for the
/// next [`StateWriter::check`] and stops the run at once (see
/// [`ProcessState::stop_on_write_failure`]), and later jobs are dropped (a
/// checkpoint never skips a failed batch).
pub struct StateWriter {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Failure>>,
    /// Since when the writer has been in its current job, if it is in one.
    busy_since: Arc<Mutex<Option<Instant>>>,
    /// How long one job may take ([`WRITE_STALL_LIMIT`]).
    stall_limit: Duration,
    /// Asked once a job has taken [`STOPPED_STORE_PROBE_AFTER`]: why the
    /// store no longer takes writes, if it has stopped
    /// ([`Store::stopped_by_background_error`]).
    stopped_store: Option<StoppedStoreProbe>,
    /// Every change of a time before this is in the store, readable by
    /// lookups (the API's profiles): raised by the writer thread after
    /// each write, and by [`ProcessState::deposit`] when time moves with
    /// nothing to write and no write is queued.
    readable: Arc<AtomicU64>,
    /// Jobs queued and not yet done.
    queued: Arc<AtomicU64>,
}

/// See [`StateWriter::stopped_store`].
type StoppedStoreProbe = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// How long a job runs before the waits for it ask whether the store has
/// stopped taking writes: a full disk then ends the run within about this
/// long, not after [`WRITE_STALL_LIMIT`].
pub const STOPPED_STORE_PROBE_AFTER: Duration = Duration::from_secs(1);

/// A failed write, and the run it stops.
#[derive(Default)]
struct Failure {
    /// The first failed write's error.
    error: Option<String>,
    /// The run to stop when a write fails.
    abort: Option<Arc<Abort>>,
}

impl StateWriter {
    /// Starts the thread writing `store` (named `label` in errors).
    fn start(store: Arc<Store>, label: String) -> StateWriter {
        let probed = Arc::clone(&store);
        let probe: StoppedStoreProbe = Box::new(move || probed.stopped_by_background_error());
        let readable: Arc<AtomicU64> = Arc::default();
        let raised = Arc::clone(&readable);
        let mut writer = StateWriter::start_with(label, WRITE_STALL_LIMIT, move |job| match job {
            Job::Write {
                batch,
                retained,
                checkpoint,
                through,
            } => {
                let mut all = RetainedBatch::default();
                for part in retained {
                    all.absorb(part);
                }
                store.write_retained(batch, all, &checkpoint)?;
                raised.fetch_max(through, Ordering::SeqCst);
                Ok(())
            }
            Job::Flush => store.flush(),
            Job::Sync(_) => Ok(()),
        });
        writer.stopped_store = Some(probe);
        writer.readable = readable;
        writer
    }

    /// Starts the thread doing each job with `work` (a write or a flush;
    /// named `label` in errors), a job that takes longer than
    /// `stall_limit` failing the waits for it.
    fn start_with(
        label: String,
        stall_limit: Duration,
        mut work: impl FnMut(Job) -> Result<(), StoreError> + Send + 'static,
    ) -> StateWriter {
        let (jobs, queue) = mpsc::sync_channel::<Job>(WRITES_QUEUED);
        let failure: Arc<Mutex<Failure>> = Arc::default();
        let failed = Arc::clone(&failure);
        let busy_since: Arc<Mutex<Option<Instant>>> = Arc::default();
        let busy = Arc::clone(&busy_since);
        let queued: Arc<AtomicU64> = Arc::default();
        let in_queue = Arc::clone(&queued);
        let part = label.clone();
        let thread = std::thread::Builder::new()
            .name("segflow-state-writer".into())
            .spawn(move || {
                for job in queue {
                    let stopped = failed.lock().map_or(true, |f| f.error.is_some());
                    let job = match job {
                        Job::Sync(done) => {
                            in_queue.fetch_sub(1, Ordering::SeqCst);
                            let _ = done.send(());
                            continue;
                        }
                        _ if stopped => {
                            in_queue.fetch_sub(1, Ordering::SeqCst);
                            continue;
                        }
                        job => job,
                    };
                    if let Ok(mut b) = busy.lock() {
                        *b = Some(Instant::now());
                    }
                    let result = work(job);
                    in_queue.fetch_sub(1, Ordering::SeqCst);
                    if let Ok(mut b) = busy.lock() {
                        *b = None;
                    }
                    if let (Err(e), Ok(mut f)) = (result, failed.lock()) {
                        if let Some(abort) = &f.abort {
                            abort.fail(format!("state directory {part}: {e}"));
                        }
                        f.error.get_or_insert(e.to_string());
                    }
                }
            });
        match thread {
            Ok(thread) => StateWriter {
                jobs: Some(jobs),
                thread: Some(thread),
                failure,
                busy_since,
                stall_limit,
                stopped_store: None,
                readable: Arc::default(),
                queued,
            },
            Err(e) => StateWriter {
                // No thread: every write fails with the reason (for `label`).
                jobs: None,
                thread: None,
                failure: Arc::new(Mutex::new(Failure {
                    error: Some(format!("cannot start the writer thread of {label}: {e}")),
                    abort: None,
                })),
                busy_since,
                stall_limit,
                stopped_store: None,
                readable: Arc::default(),
                queued,
            },
        }
    }

    /// The first failed write's error, if one failed.
    fn check(&self) -> Result<(), StoreError> {
        match self.failure.lock().ok().and_then(|f| f.error.clone()) {
            Some(e) => Err(StoreError::Write(e)),
            None => Ok(()),
        }
    }

    /// While waiting for the writer: an error if a write failed, if the
    /// run is failing anyway, or if one write has taken longer than
    /// [`WRITE_STALL_LIMIT`] (RocksDB can block for good, e.g. in a flush
    /// after a full disk: the run must end with the reason, not hang).
    fn still_waiting(&self) -> Result<(), StoreError> {
        self.check()?;
        let stopped = self
            .failure
            .lock()
            .map_or(true, |f| f.abort.as_ref().is_some_and(|a| a.is_stopped()));
        if stopped {
            return Err(StoreError::Write(
                "the run stopped before the state writer finished".into(),
            ));
        }
        let busy = self
            .busy_since
            .lock()
            .ok()
            .and_then(|b| *b)
            .map(|since| since.elapsed());
        if busy.is_some_and(|b| b > STOPPED_STORE_PROBE_AFTER) {
            if let Some(reason) = self.stopped_store.as_ref().and_then(|probe| probe()) {
                return Err(StoreError::Write(reason));
            }
        }
        if busy.is_some_and(|b| b > self.stall_limit) {
            return Err(StoreError::Write(format!(
                "a state write has not finished in {} s: the store is stuck (is its disk full?)",
                self.stall_limit.as_secs()
            )));
        }
        Ok(())
    }

    /// Queues `job` (waiting while [`WRITES_QUEUED`] jobs wait, but never
    /// past [`StateWriter::still_waiting`]), then reports an earlier
    /// failure, if any.
    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.check()?;
        let ended = || StoreError::Write("the state writer thread ended".into());
        let Some(jobs) = self.jobs.as_ref() else {
            return Err(ended());
        };
        let mut job = job;
        loop {
            // Counted before it is sent: the writer may be done with it
            // before `try_send` returns.
            self.queued.fetch_add(1, Ordering::SeqCst);
            match jobs.try_send(job) {
                Ok(()) => return self.check(),
                Err(mpsc::TrySendError::Full(back)) => {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    job = back;
                    self.still_waiting()?;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {
                    self.queued.fetch_sub(1, Ordering::SeqCst);
                    self.check()?;
                    return Err(ended());
                }
            }
        }
    }

    /// Waits until every job queued so far is done (but never past
    /// [`StateWriter::still_waiting`]); the first failed write's error, if
    /// one failed.
    fn sync(&self) -> Result<(), StoreError> {
        let (done, wait) = mpsc::channel();
        self.send(Job::Sync(done))?;
        loop {
            match wait.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return self.check(),
                Err(mpsc::RecvTimeoutError::Timeout) => self.still_waiting()?,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.check()?;
                    return Err(StoreError::Write("the state writer thread ended".into()));
                }
            }
        }
    }
}

impl Drop for StateWriter {
    /// Lets the queued jobs finish, then joins the thread (before the
    /// state directory's lock is released); a thread stuck in a write
    /// (see [`StateWriter::still_waiting`]) is left behind after the
    /// stall limit, or as soon as the store says it has stopped taking
    /// writes, so the run still ends.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + self.stall_limit;
            let stopped = || self.stopped_store.as_ref().is_some_and(|p| p().is_some());
            while !thread.is_finished() && Instant::now() < deadline && !stopped() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("the state writer thread is stuck in a write; leaving it behind");
            }
        }
    }
}

/// One process's part of the state and its group commit.
pub struct ProcessState {
    /// The store, for lookups (the writer thread writes it).
    store: Arc<Store>,
    /// Declared before the lock: dropped (joined) first.
    writer: StateWriter,
    lock: Arc<StateLock>,
    /// How messages name the part (its directory).
    pub label: String,
    group: Mutex<Group>,
    batches: AtomicU64,
    /// Where the readers of ranges are, for the checkpoints' resume points.
    progress: Option<Arc<Progress>>,
}

struct Group {
    /// Per local worker: every change of a time before this is deposited
    /// (`Time::MAX` once the worker has finished).
    horizons: Vec<Time>,
    /// Deposited changes by time, not yet written.
    deposits: BTreeMap<Time, Vec<StateBatch>>,
    /// Deposited retained updates by time, not yet written (they are
    /// written once their time is before the cut, see [`Group::cut`]).
    retained: BTreeMap<Time, Vec<RetainedBatch>>,
    /// The cut a resumed run started from: the retained input holds
    /// everything before it.
    cut_floor: Time,
    /// Where the outputs stand at the horizon (see
    /// [`ProcessState::set_sinks`]).
    written_sinks: Option<SinkPositions>,
    /// Everything before this is written.
    written: Time,
    checkpoint: Checkpoint,
    unflushed: bool,
    last_flush: Instant,
    /// Definitions reloaded while the run goes on: from the time each
    /// applies, its fingerprint and parts (see
    /// [`ProcessState::reloaded`]).
    reloaded: BTreeMap<Time, (String, BTreeMap<String, String>)>,
}

impl ProcessState {
    /// The part `store` (whose lock is `lock`, named `label` in messages)
    /// written by `workers` local workers of a run of `processes`
    /// processes.
    pub fn new(
        store: Store,
        lock: StateLock,
        label: String,
        workers: usize,
        processes: usize,
    ) -> ProcessState {
        let store = Arc::new(store);
        ProcessState {
            writer: StateWriter::start(Arc::clone(&store), label.clone()),
            store,
            lock: Arc::new(lock),
            label,
            group: Mutex::new(Group {
                horizons: vec![0; workers],
                deposits: BTreeMap::new(),
                retained: BTreeMap::new(),
                cut_floor: 0,
                written_sinks: None,
                written: 0,
                checkpoint: Checkpoint {
                    processes,
                    ..Checkpoint::default()
                },
                unflushed: false,
                last_flush: Instant::now(),
                reloaded: BTreeMap::new(),
            }),
            batches: AtomicU64::new(0),
            progress: None,
        }
    }

    /// Makes the checkpoints retain the input (see
    /// [`crate::dataflow::retain`]), with the resume points the readers
    /// record in `progress`, on the process that writes the outputs (the
    /// cut follows their bounds). A run resumed from a checkpoint
    /// continues it (`resumed`: its checkpoint, whose cut and output
    /// positions stand until new ones are written).
    pub fn retain_input(&mut self, progress: Arc<Progress>, resumed: Option<&Checkpoint>) {
        self.progress = Some(progress);
        if let (Some(c), Ok(g)) = (resumed, self.group.get_mut()) {
            g.cut_floor = c.retained.as_ref().map_or(0, |r| r.cut);
            g.checkpoint.retained = c.retained.clone();
            g.written_sinks = c.retained.as_ref().and_then(|r| r.sinks.clone());
            g.checkpoint.sinks = c.sinks.clone();
            g.checkpoint.offsets = c.offsets.clone();
            g.checkpoint.time = c.time;
        }
    }

    /// State batches written so far (each holds the times one advance of
    /// the process's horizon completed).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Records in the checkpoint the run's identity (every part of a
    /// cluster's state gets process 0's), its definition's fingerprint
    /// (with the hash of each part, see
    /// [`crate::engine::resume::fingerprint_parts`])
    /// and its inputs' marks (see [`crate::engine::resume`]).
    pub fn set_origin(
        &self,
        run: &str,
        fingerprint: (&str, BTreeMap<String, String>),
        inputs: BTreeMap<String, InputMark>,
    ) {
        if let Ok(mut g) = self.group.lock() {
            g.checkpoint.run = run.to_string();
            g.checkpoint.fingerprint = fingerprint.0.to_string();
            g.checkpoint.fingerprint_parts = fingerprint.1;
            g.checkpoint.inputs = inputs;
        }
    }

    /// A definition reloaded while the run goes on applies from `time`:
    /// a checkpoint whose retained input reaches past it (a restart from it
    /// recomputes memberships under the new definition) carries the new
    /// `fingerprint`, so that a restart must give the edited file.
    pub fn reloaded(&self, time: Time, fingerprint: (String, BTreeMap<String, String>)) {
        if let Ok(mut g) = self.group.lock() {
            g.reloaded.insert(time, fingerprint);
        }
    }

    /// Writes the checkpoint as it is now, with no state changes (a resumed
    /// run's first: where the outputs stood; a run's last), and waits until
    /// it and every batch before it are written.
    pub fn write_checkpoint(&self) -> Result<(), StoreError> {
        {
            let Ok(mut g) = self.group.lock() else {
                return Ok(());
            };
            self.write(&mut g, StateBatch::default())?;
        }
        self.sync()
    }

    /// Makes a failed write stop `abort`'s run at once, with the reason
    /// (otherwise the next deposit reports it).
    pub fn stop_on_write_failure(&self, abort: Arc<Abort>) {
        if let Ok(mut f) = self.writer.failure.lock() {
            if let Some(error) = &f.error {
                abort.fail(format!("state directory {}: {error}", self.label));
            }
            f.abort = Some(abort);
        }
    }

    /// The store this part is written to, for lookups while the run goes
    /// on (the API's profiles), and the time before which every change is
    /// in it (see [`StateWriter::readable`]).
    /// The directory's lock comes along: whoever still reads the store
    /// after the run (a replay that goes on serving) keeps it locked.
    pub fn readable(&self) -> (Arc<Store>, Arc<AtomicU64>, Arc<StateLock>) {
        (
            Arc::clone(&self.store),
            Arc::clone(&self.writer.readable),
            Arc::clone(&self.lock),
        )
    }

    /// Waits until every state batch formed so far is written; the first
    /// failed write's error, if one failed.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.writer.sync()
    }

    /// Queues `batch`, the retained updates before the new cut and the
    /// checkpoint for the writer thread, to be written at once. The cut is the least of the times written
    /// (every worker's changes before it are in) and of the segment
    /// output's bound at the horizon (a restored run writes the diffs from
    /// its cut on); it never moves back, and does not move before the
    /// outputs' positions are known.
    fn write(&self, g: &mut Group, batch: StateBatch) -> Result<(), StoreError> {
        let mut retained = Vec::new();
        if let Some(progress) = &self.progress {
            let bound = g
                .written_sinks
                .as_ref()
                .map(|s| (s.segments_bound, s.dead_bound));
            if let Some((segments_bound, dead_bound)) = bound {
                let previous = g.checkpoint.retained.as_ref().map_or(0, |r| r.cut);
                let cut = g.written.min(segments_bound).max(g.cut_floor).max(previous);
                let later = g.retained.split_off(&cut);
                for (_, parts) in std::mem::replace(&mut g.retained, later) {
                    retained.extend(parts);
                }
                g.checkpoint.retained = Some(RetainedCut {
                    cut,
                    points: progress.choose(cut, dead_bound),
                    sinks: g.written_sinks.clone(),
                });
                // The restore time is `cut - 1`: the definitions that
                // applied then are those a restart must be given.
                let later = g.reloaded.split_off(&cut);
                let applied = std::mem::replace(&mut g.reloaded, later);
                if let Some((_, (fingerprint, parts))) = applied.into_iter().next_back() {
                    g.checkpoint.fingerprint = fingerprint;
                    g.checkpoint.fingerprint_parts = parts;
                }
            }
        }
        self.writer.send(Job::Write {
            batch,
            retained,
            checkpoint: Box::new(g.checkpoint.clone()),
            through: g.written,
        })
    }

    /// Records where the outputs stand, for the next checkpoint (process
    /// 0's worker 0, which writes them, says so): `positions` with bounds
    /// clamped where files ended, `written` at the horizon (see
    /// [`RetainedCut::sinks`]).
    pub fn set_sinks(&self, positions: &SinkPositions, written: &SinkPositions) {
        if let Ok(mut g) = self.group.lock() {
            if g.checkpoint.sinks.as_ref() != Some(positions) {
                g.checkpoint.sinks = Some(positions.clone());
            }
            if g.written_sinks.as_ref() != Some(written) {
                g.written_sinks = Some(written.clone());
            }
        }
    }

    /// Records the source offsets of the checkpoint (process 0's worker 0
    /// reads them).
    pub fn set_offsets(&self, offsets: &BTreeMap<String, u64>) {
        if let Ok(mut g) = self.group.lock() {
            g.checkpoint.offsets.clone_from(offsets);
        }
    }

    /// Deposits local worker `worker`'s changes of completed times (in
    /// order), with its new horizon, and writes what every local worker
    /// has deposited below the least horizon, its trait values named by
    /// `names` (identifier keys) and `traits` (trait names by index). The
    /// write itself is queued for the writer thread; once every local
    /// worker has finished (`horizon` is `Time::MAX` for all), this waits
    /// until everything is written. Errors are the store's (of this write
    /// or an earlier one, as [`StoreError::Write`]), or internal ones as
    /// [`StoreError::Corrupt`].
    pub fn deposit(
        &self,
        worker: usize,
        times: Vec<(Time, StateBatch)>,
        retained: Vec<(Time, RetainedBatch)>,
        horizon: Time,
        names: &IdMap<String>,
        traits: &[String],
    ) -> Result<(), StoreError> {
        let Ok(mut g) = self.group.lock() else {
            return Ok(()); // another worker panicked; the run is failing
        };
        for (time, batch) in times {
            g.deposits.entry(time).or_default().push(batch);
        }
        if self.progress.is_some() {
            for (time, batch) in retained {
                g.retained.entry(time).or_default().push(batch);
            }
        }
        g.horizons[worker] = g.horizons[worker].max(horizon);
        let least = g.horizons.iter().copied().min().unwrap_or(Time::MAX);
        if least > g.written {
            let later = match least {
                Time::MAX => BTreeMap::new(),
                h => g.deposits.split_off(&h),
            };
            let ready = std::mem::replace(&mut g.deposits, later);
            g.written = least;
            let retained_due = g
                .retained
                .first_key_value()
                .is_some_and(|(t, _)| *t < least);
            if let Some((&last, _)) = ready.last_key_value() {
                g.checkpoint.time = last;
            }
            // A live input's clock moves without new records: its times
            // complete, and the outputs' bounds with them, while the state
            // has nothing to write. The checkpoint follows anyway (about
            // once per flush interval), so that a restart resumes from
            // where reading stood, not from the last state change.
            let cut_moves = self.progress.is_some()
                && g.last_flush.elapsed() >= STATE_FLUSH_INTERVAL
                && g.written_sinks.as_ref().is_some_and(|s| {
                    let previous = g.checkpoint.retained.as_ref().map_or(0, |r| r.cut);
                    g.written.min(s.segments_bound).max(g.cut_floor) > previous
                });
            if !ready.is_empty() || retained_due || cut_moves {
                let mut batch = StateBatch::default();
                for (_, parts) in ready {
                    for part in parts {
                        batch.absorb(part);
                    }
                }
                batch
                    .name_traits(names, traits)
                    .map_err(StoreError::Corrupt)?;
                self.write(&mut g, batch)?;
                self.batches.fetch_add(1, Ordering::Relaxed);
                g.unflushed = true;
            } else if self.writer.queued.load(Ordering::SeqCst) == 0 {
                // Nothing to write and nothing queued: the store holds
                // every change before the new horizon already.
                self.writer.readable.fetch_max(least, Ordering::SeqCst);
            }
        }
        let finished = least == Time::MAX;
        if g.unflushed && (finished || g.last_flush.elapsed() >= STATE_FLUSH_INTERVAL) {
            self.writer.send(Job::Flush)?;
            g.unflushed = false;
            g.last_flush = Instant::now();
        }
        drop(g);
        if finished {
            // The run ends only with every batch on disk.
            self.sync()
        } else {
            self.writer.check()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOp;

    fn trait_batch(value: f64, old: Option<f64>) -> StateBatch {
        let op = |value| StoreOp::Trait {
            profile: "user:p".into(),
            name: "views".into(),
            value: crate::model::Scalar::Num(value),
        };
        let mut ops = vec![(op(value), 1)];
        if let Some(old) = old {
            ops.push((op(old), -1));
        }
        let mut batch = StateBatch::default();
        batch.stage(&ops);
        batch
    }

    /// Nothing is written until every local worker has deposited a time;
    /// each write holds exactly the times below the least horizon, so the
    /// state on disk is always that of one completed time.
    #[test]
    fn a_group_commit_writes_only_times_every_worker_has_completed() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::take(dir.path()).unwrap();
        let store = Store::create_fresh(dir.path(), &lock).unwrap();
        let part = ProcessState::new(store, lock, "part".into(), 2, 1);
        // Worker 0 owns the trait and has completed times 1 and 2.
        part.deposit(
            0,
            vec![
                (1, trait_batch(1.0, None)),
                (2, trait_batch(2.0, Some(1.0))),
            ],
            Vec::new(),
            3,
            &IdMap::default(),
            &[],
        )
        .unwrap();
        assert_eq!(part.batches(), 0, "worker 1 has completed nothing yet");
        // Worker 1 owns the link and has completed time 1 only.
        let mut link = StateBatch::default();
        link.stage(&[(
            StoreOp::Link {
                id: "user:p".into(),
                profile: "user:p".into(),
            },
            1,
        )]);
        part.deposit(1, vec![(1, link)], Vec::new(), 2, &IdMap::default(), &[])
            .unwrap();
        assert_eq!(part.batches(), 1);
        part.sync().unwrap();
        let view = part.store.view("user:p").unwrap();
        assert_eq!(view.identifiers, vec!["user:p".to_string()]);
        assert_eq!(
            view.traits.get("views"),
            Some(&serde_json::json!(1)),
            "time 1, not 2"
        );
        assert_eq!(view.as_of.unwrap().time, 1);
        // Worker 1 finishes: time 2 is written.
        part.deposit(1, Vec::new(), Vec::new(), Time::MAX, &IdMap::default(), &[])
            .unwrap();
        assert_eq!(part.batches(), 2);
        part.sync().unwrap();
        let view = part.store.view("user:p").unwrap();
        assert_eq!(view.traits.get("views"), Some(&serde_json::json!(2)));
        assert_eq!(view.as_of.unwrap().time, 2);
    }

    /// A store that never finishes a write (RocksDB can block for good
    /// after a full disk) fails the waits for it after the stall limit,
    /// and dropping the writer does not wait for it either: the run ends
    /// with the reason instead of hanging.
    #[test]
    fn a_stuck_store_fails_the_run_instead_of_hanging() {
        let (_release, stuck) = mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let writer =
            StateWriter::start_with("part".into(), Duration::from_millis(300), move |_| {
                // Blocks until the test ends.
                let _ = stuck.lock().map(|s| s.recv());
                Ok(())
            });
        let started = Instant::now();
        // The first job blocks the thread; the queue fills; then the
        // sender gives up once the job has taken longer than the limit.
        let mut result = Ok(());
        for _ in 0..=WRITES_QUEUED + 1 {
            result = writer.send(Job::Flush);
            if result.is_err() {
                break;
            }
        }
        let err = result.expect_err("a send into a stuck writer fails");
        assert!(
            err.to_string().contains("has not finished in 0 s")
                || err.to_string().contains("the store is stuck"),
            "{err}"
        );
        let err = writer.sync().expect_err("a sync with a stuck writer fails");
        assert!(err.to_string().contains("the store is stuck"), "{err}");
        drop(writer);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited {:?}",
            started.elapsed()
        );
    }

    /// A store that says it has stopped taking writes (RocksDB after a
    /// failed flush on a full disk) fails the waits for a stuck write with
    /// its reason once the write has taken a second, long before the stall
    /// limit, and the writer is left behind at once.
    #[test]
    fn a_store_stopped_by_a_background_error_fails_the_run_within_seconds() {
        let (_release, stuck) = mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let mut writer = StateWriter::start_with("part".into(), WRITE_STALL_LIMIT, move |_| {
            let _ = stuck.lock().map(|s| s.recv());
            Ok(())
        });
        writer.stopped_store = Some(Box::new(|| Some("stopped: disk full".into())));
        let started = Instant::now();
        writer.send(Job::Flush).unwrap();
        let err = writer
            .sync()
            .expect_err("a sync with a stopped store fails");
        assert!(err.to_string().contains("stopped: disk full"), "{err}");
        assert!(started.elapsed() >= STOPPED_STORE_PROBE_AFTER);
        drop(writer);
        assert!(
            started.elapsed() < WRITE_STALL_LIMIT / 2,
            "waited {:?}",
            started.elapsed()
        );
    }

    /// A store that takes writes is not asked to stop: a slow write that
    /// ends within the limit is waited for.
    #[test]
    fn a_slow_write_of_a_store_that_takes_writes_is_waited_for() {
        let mut writer = StateWriter::start_with("part".into(), WRITE_STALL_LIMIT, move |_| {
            std::thread::sleep(STOPPED_STORE_PROBE_AFTER * 2);
            Ok(())
        });
        writer.stopped_store = Some(Box::new(|| None));
        writer.send(Job::Flush).unwrap();
        writer.sync().expect("a slow write is waited for");
    }

    /// A failed write is reported by the next send and by a sync, and the
    /// jobs after it are not done.
    #[test]
    fn a_failed_write_is_reported_and_stops_the_writer() {
        let done = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&done);
        let writer = StateWriter::start_with("part".into(), WRITE_STALL_LIMIT, move |_| {
            count.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Corrupt("disk on fire".into()))
        });
        let abort = Arc::new(Abort::default());
        if let Ok(mut f) = writer.failure.lock() {
            f.abort = Some(Arc::clone(&abort));
        }
        // The writer may have failed the job before `send` returns, which
        // then reports it already.
        if let Err(e) = writer.send(Job::Flush) {
            assert!(e.to_string().contains("disk on fire"), "{e}");
        }
        let err = writer.sync().expect_err("the failed write is reported");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(abort.is_stopped(), "the run is stopped at once");
        assert!(writer.send(Job::Flush).is_err());
        drop(writer);
        assert_eq!(done.load(Ordering::SeqCst), 1, "nothing after the failure");
    }
}
