//! Sinks and the commit stage.
//!
//! All results are routed to worker 0, which buffers them by timestamp and
//! *commits* a timestamp once [`Completion`] allows it: it is complete (no
//! worker can still produce updates at or before it) and not later than
//! the end of the data seen (see [`crate::time::completion`]):
//!
//! 1. the segment diffs of that time are consolidated (no `+1`/`-1` pairs),
//!    sorted by segment and profile, and written as JSON lines
//!    (`{"time":..,"segment":..,"profile":..,"diff":1}`) to the segment sink;
//! 2. the state changes of that time and the checkpoint go to RocksDB in one
//!    `WriteBatch`.
//!
//! Timestamps are committed in increasing order, so the output is in time
//! order and identical for any number of workers or processes.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::rc::Rc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::Stream;

use crate::dataflow::profiles::Attributes;
use crate::dataflow::retain::Retained;
use crate::io::{Abort, Control, DeadLetter, Stop};
use crate::model::{Id, IdMap, Scalar};
use crate::spec::{SegmentSpec, TraitSpec};
use crate::store::{attributes_json, RetainedBatch, SinkPositions, StateBatch, StoreOp};

pub mod kafka;
mod state;
pub mod webhook;
use crate::time::{Completion, Time};
pub use state::{ProcessShared, ProcessState};

/// One segment entry (`diff = 1`) or exit (`diff = -1`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentDiff {
    /// Event time of the change, in milliseconds (a multiple of the tick).
    pub time: u64,
    /// Segment name.
    pub segment: String,
    /// Profile id.
    pub profile: String,
    /// `1` on entry, `-1` on exit.
    pub diff: i64,
}

impl SegmentDiff {
    /// The JSON line of the output contract (without newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("segment diff serializes")
    }
}

/// The lines written to an output that sends them on at each flush (the
/// webhook and Kafka outputs).
#[derive(Default)]
pub(crate) struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    /// Appends what a `write` got.
    pub(crate) fn push(&mut self, buf: &[u8]) {
        self.pending.extend_from_slice(buf);
    }

    /// Takes out the complete lines written so far (a partial last line
    /// stays): their bytes, each line ending in `\n`.
    pub(crate) fn take_complete(&mut self) -> Vec<u8> {
        match self.pending.iter().rposition(|&b| b == b'\n') {
            Some(end) => self.pending.drain(..=end).collect(),
            None => Vec::new(),
        }
    }
}

/// The non-empty lines of `bytes`, without their `\n`.
pub(crate) fn lines_of(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty())
}

/// A callback receiving every committed segment diff.
pub type DiffCallback = Arc<dyn Fn(&SegmentDiff) + Send + Sync>;

/// Where segment diffs go.
pub enum SegmentSink {
    /// Nowhere (state only).
    Discard,
    /// A writer: file, stdout or TCP peer.
    Writer(Box<dyn Write + Send>),
    /// A function.
    Callback(DiffCallback),
}

impl SegmentSink {
    /// Writes one diff; returns the bytes written.
    fn write(&mut self, diff: &SegmentDiff) -> std::io::Result<u64> {
        match self {
            SegmentSink::Discard => Ok(0),
            SegmentSink::Writer(w) => {
                let line = diff.to_line();
                if crate::fault::due("segments-half-line") {
                    w.write_all(&line.as_bytes()[..line.len() / 2])?;
                    w.flush()?;
                    crate::fault::kill();
                }
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")?;
                Ok(line.len() as u64 + 1)
            }
            SegmentSink::Callback(f) => {
                f(diff);
                Ok(0)
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SegmentSink::Writer(w) => w.flush(),
            _ => Ok(()),
        }
    }
}

/// Everything the commit stage writes to; only worker 0 has one.
pub struct Outputs {
    /// Segment diffs.
    pub segments: SegmentSink,
    /// Dead letters, one JSON object per line.
    pub dead_letters: Option<Box<dyn Write + Send>>,
    /// How messages name each output (a path, `standard output`,
    /// `tcp://..`), and whether the segment sink is standard output (whose
    /// reader going away ends the run quietly).
    pub labels: OutputLabels,
    /// A resumed run's outputs: where its checkpoint says they stood. The
    /// diffs and dead letters of times before its bounds are in them
    /// already and are not written again.
    pub resume: Option<SinkPositions>,
    /// A run that restores a retained input resumes its outputs from where
    /// they stood at the cut (`resume`); these are the checkpoint's
    /// positions clamped where files ended (see
    /// [`Committer::positions`]), kept for a later resume on grown inputs.
    pub resume_clamped: Option<SinkPositions>,
    /// How checkpoints name the segment and dead-letter outputs: an
    /// absolute path for a file (so a run from another directory is not
    /// taken for the same output), else as messages do.
    pub identities: (String, String),
    /// A webhook output's count of batches that failed for good, and its
    /// failed-batch file, for the summary.
    pub webhook_failures: Option<(Arc<std::sync::atomic::AtomicU64>, String)>,
    /// The API's shared state, fed with every committed time's diffs,
    /// the clocks and the counters (see [`crate::serve`]).
    pub live: Option<Arc<crate::serve::Live>>,
}

/// How messages name the outputs of [`Outputs`].
#[derive(Clone, Debug, Default)]
pub struct OutputLabels {
    /// The segment sink, e.g. `out/segments.jsonl`.
    pub segments: String,
    /// Whether the segment sink is standard output.
    pub segments_is_stdout: bool,
    /// The dead-letter file.
    pub dead_letters: String,
    /// The state directory.
    pub state: String,
}

/// A change of state, keyed so that it can be routed and consolidated.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StateUpdate {
    /// The name (`kind:value`) of an identifier key; insert-only, at or
    /// before the first time the key appears in any other update.
    Name(Id, String),
    /// Segment membership `(segment index, profile)`.
    Segment(u32, Id),
    /// A profile exists.
    Profile(Id),
    /// Identifier belongs to profile.
    Link(Id, Id),
    /// Trait `index` of a profile has this value from the update's time
    /// on (null: none); always with difference `+1`.
    Trait(Id, u32, Scalar),
    /// A profile's merged attributes.
    Attrs(Id, Attributes),
}

/// Per-source counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSummary {
    /// Source name.
    pub name: String,
    /// Lines read.
    pub lines: u64,
    /// Records admitted into the dataflow.
    pub records: u64,
    /// Lines dead-lettered (including late records).
    pub dead_letters: u64,
    /// Late records.
    pub late: u64,
    /// Records dropped as held by the checkpoint the run restored (their
    /// times are before its cut).
    #[serde(default)]
    pub held: u64,
    /// Final offset.
    pub offset: u64,
    /// Bytes of input consumed (files; lines for sockets), by all readers
    /// together.
    #[serde(default)]
    pub bytes: u64,
    /// A graceful shutdown ended this source before its input ended (see
    /// [`RunSummary::stopped`]).
    #[serde(default)]
    pub stopped: bool,
}

/// What a run did, as seen by worker 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Per source.
    pub sources: Vec<SourceSummary>,
    /// Profiles at the end.
    pub profiles: i64,
    /// Members per segment at the end, in definition order.
    pub segments: Vec<(String, i64)>,
    /// Segment diff lines written.
    pub diffs_written: u64,
    /// Timestamps at which segment diffs were written.
    pub times_committed: u64,
    /// Number of state batches written (each holds the times one frontier
    /// advance completed).
    pub state_batches: u64,
    /// Last committed time (ms), if any.
    pub last_time: Option<u64>,
    /// Wall-clock seconds of the run (set by the engine).
    pub elapsed_secs: f64,
    /// A resumed run: the time (ms) before which the checkpoint's outputs
    /// held every diff, which were not written again.
    #[serde(default)]
    pub resumed_before: Option<u64>,
    /// A run that restored its checkpoint's retained input: the cut (ms)
    /// before which no record was read again, and the entries restored
    /// (see [`crate::dataflow::retain`]).
    #[serde(default)]
    pub restored: Option<(u64, u64)>,
    /// A graceful shutdown (SIGTERM, Ctrl-C, or a stop of another process
    /// of the cluster) ended some source before its input ended (each is
    /// marked [`SourceSummary::stopped`]): the outputs hold the diffs of
    /// the times before where reading stopped, a prefix of those of a run
    /// that reads everything; a run with the same state directory goes on
    /// from there. `false` for a run whose inputs all ended.
    #[serde(default)]
    pub stopped: bool,
    /// A webhook output: the batches that failed for good (their diffs are
    /// in the failed-batch file, not at the receiver), and that file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_failed: Option<(u64, String)>,
}

impl RunSummary {
    /// Total records admitted across sources.
    pub fn records(&self) -> u64 {
        self.sources.iter().map(|s| s.records).sum()
    }
    /// Total dead letters.
    pub fn dead_letters(&self) -> u64 {
        self.sources.iter().map(|s| s.dead_letters).sum()
    }
    /// Total late records.
    pub fn late(&self) -> u64 {
        self.sources.iter().map(|s| s.late).sum()
    }
}

/// Worker 0's part of the commit stage: segment diffs, dead letters and
/// the run's summary.
struct Committer {
    outputs: Outputs,
    segments: Rc<[SegmentSpec]>,
    /// The process's shared state: the names of segments a reload added.
    process: Arc<ProcessShared>,
    pending: BTreeMap<Time, Vec<(StateUpdate, isize)>>,
    dead_pending: BTreeMap<Time, Vec<DeadLetter>>,
    summary: RunSummary,
    /// Source name -> offset read, for the checkpoint.
    offsets: BTreeMap<String, u64>,
    members: Vec<i64>,
    abort: Arc<Abort>,
    /// Whether memberships are staged as state changes too.
    stateful: bool,
    /// Bytes written to the segment and dead-letter outputs so far
    /// (starting from a resumed run's lengths).
    written: (u64, u64),
    /// For each time written since the positions' bounds, the output's
    /// length after it (segment diffs, dead letters): the length at any
    /// later bound.
    marks: (Marks, Marks),
    /// Where the outputs stood the last time their bounds were known, for
    /// the checkpoint: lengths and bounds are taken together. These bounds
    /// never pass where a file ended (lines appended later may change what
    /// follows): a resume on grown inputs starts from them.
    positions: SinkPositions,
    /// In a run that restored a retained input, the clamped bounds move
    /// only from the bounds it restored at on (segments, dead letters):
    /// what lies between the old clamped bounds and those was written by
    /// the run before, whose lengths there are not known.
    clamp_floor: (Time, Time),
    /// [`Committer::marks`] for [`Committer::written_positions`].
    written_marks: (Marks, Marks),
    /// Where the outputs stood at the horizon, whatever the inputs' ends:
    /// with the same inputs, everything before these bounds is final, and
    /// a restored run resumes its outputs from them.
    written_positions: SinkPositions,
    /// The least watermark at which a replayed source read its input's end
    /// ([`Control::Ended`]): lines appended later are at or after it, so
    /// the outputs' bounds never pass it.
    ended: Option<Time>,
    /// The sources that read their input to its end ([`Control::Ended`];
    /// a file's last range, each partition of a bounded Kafka topic).
    sources_ended: std::collections::BTreeSet<u32>,
    /// Whether a replayed source was cut short ([`Control::Cut`]): its
    /// dead letters from the cut on are written again by the next run.
    replay_cut: bool,
    /// The latest time of a dead letter written.
    last_dead: Option<Time>,
    /// The cut of a restored checkpoint: the state holds every time
    /// before it (see [`ProcessShared::restored_before`]).
    restored_before: Time,
}

/// The length of an output after each time written to it, from the
/// output's recorded bound on (see [`Committer::marks`]).
#[derive(Default)]
struct Marks(std::collections::VecDeque<(Time, u64)>);

impl Marks {
    /// The output is `len` bytes long after writing time `time`.
    fn note(&mut self, time: Time, len: u64) {
        match self.0.back_mut() {
            Some((t, l)) if *t == time => *l = len,
            _ => self.0.push_back((time, len)),
        }
    }

    /// The output's length once every time before `bound` is written,
    /// given its length `before` at the previous bound; forgets the times
    /// before `bound`.
    fn advance(&mut self, bound: Time, before: u64) -> u64 {
        let mut len = before;
        while let Some(&(time, l)) = self.0.front() {
            if time >= bound {
                break;
            }
            len = l;
            self.0.pop_front();
        }
        len
    }
}

/// Moves the segment output's bound in `p` to `bound` (if later), with its
/// length (from `marks`) and tail hash there.
fn advance_segments(p: &mut SinkPositions, marks: &mut Marks, bound: Time) {
    if bound > p.segments_bound {
        p.segments_len = marks.advance(bound, p.segments_len);
        p.segments_bound = bound;
        p.segments_tail = crate::store::tail_hash(&p.segments, p.segments_len);
    }
}

/// [`advance_segments`] for the dead-letter output.
fn advance_dead_letters(p: &mut SinkPositions, marks: &mut Marks, bound: Time) {
    if bound > p.dead_bound {
        p.dead_len = marks.advance(bound, p.dead_len);
        p.dead_bound = bound;
        p.dead_tail = crate::store::tail_hash(&p.dead_letters, p.dead_len);
    }
}

/// How often the state of a long run is flushed to disk: what `segflow
/// query` sees lags the run by at most this, plus one batch. (A finite run
/// flushes at its end.)
pub const STATE_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

impl Committer {
    /// Stops the run because writing to the segment sink failed: quietly if
    /// standard output's reader went away, else with the reason.
    fn segments_failed(&self, e: &std::io::Error) {
        let labels = &self.outputs.labels;
        if labels.segments_is_stdout && e.kind() == std::io::ErrorKind::BrokenPipe {
            self.abort.stop(Stop::OutputClosed);
        } else {
            self.abort
                .fail(format!("segment output {}: {e}", labels.segments));
        }
    }

    fn dead_letters_failed(&self, e: &std::io::Error) {
        self.abort.fail(format!(
            "dead-letter output {}: {e}",
            self.outputs.labels.dead_letters
        ));
    }

    /// Writes a dead letter of `time`, unless a resumed run's outputs
    /// hold it already.
    fn dead(&mut self, letter: &DeadLetter, time: Time) {
        if self
            .outputs
            .resume
            .as_ref()
            .is_some_and(|r| time < r.dead_bound)
        {
            return;
        }
        if let Some(w) = self.outputs.dead_letters.as_mut() {
            let line = serde_json::to_string(letter).expect("dead letter serializes");
            if crate::fault::due("dead-half-line") {
                let _ = w
                    .write_all(&line.as_bytes()[..line.len() / 2])
                    .and_then(|_| w.flush());
                crate::fault::kill();
            }
            match w
                .write_all(line.as_bytes())
                .and_then(|_| w.write_all(b"\n"))
            {
                Ok(()) => {
                    self.last_dead = self.last_dead.max(Some(time));
                    self.written.1 += line.len() as u64 + 1;
                    self.marks.1.note(time, self.written.1);
                    self.written_marks.1.note(time, self.written.1);
                }
                Err(e) => self.dead_letters_failed(&e),
            }
        }
    }

    /// Moves the segment output's recorded bound to `bound` (if later),
    /// with its length and tail hash there.
    fn advance_segments(&mut self, bound: Time) {
        if bound >= self.clamp_floor.0 {
            advance_segments(&mut self.positions, &mut self.marks.0, bound);
        }
    }

    /// Moves the dead-letter output's recorded bound to `bound` (if later),
    /// with its length and tail hash there.
    fn advance_dead_letters(&mut self, bound: Time) {
        if bound >= self.clamp_floor.1 {
            advance_dead_letters(&mut self.positions, &mut self.marks.1, bound);
        }
    }

    /// [`Committer::advance_segments`] and
    /// [`Committer::advance_dead_letters`] for the written positions.
    fn advance_written(&mut self, segments: Time, dead: Time) {
        advance_segments(
            &mut self.written_positions,
            &mut self.written_marks.0,
            segments,
        );
        advance_dead_letters(&mut self.written_positions, &mut self.written_marks.1, dead);
    }

    fn flush_segments(&mut self) {
        if let Err(e) = self.outputs.segments.flush() {
            self.segments_failed(&e);
        }
    }

    fn flush_dead_letters(&mut self) {
        if let Some(w) = self.outputs.dead_letters.as_mut() {
            if let Err(e) = w.flush() {
                self.dead_letters_failed(&e);
            }
        }
    }

    fn control(&mut self, c: &Control) {
        match c {
            // Source clocks and cuts reach the shared commit rule (see
            // `commit`).
            Control::Clock { .. } | Control::Cut { .. } => {}
            Control::Ended { watermark, source } => {
                self.ended = Some(self.ended.map_or(*watermark, |e| e.min(*watermark)));
                self.sources_ended.insert(*source);
            }
            Control::Offset { source, offset } => {
                let s = &mut self.summary.sources[*source as usize];
                s.offset = s.offset.max(*offset);
                self.offsets.insert(s.name.clone(), s.offset);
            }
            Control::Stats {
                source,
                lines,
                records,
                dead,
                late,
                held,
                bytes,
            } => {
                let s = &mut self.summary.sources[*source as usize];
                s.bytes += bytes;
                s.held += held;
                s.lines += lines;
                s.records += records;
                s.dead_letters += dead;
                s.late += late;
            }
            Control::Dead(letter, at) => self.dead(letter, *at),
            Control::Stopped { source } => {
                self.summary.sources[*source as usize].stopped = true;
                self.summary.stopped = true;
            }
        }
    }

    /// Writes one complete time's segment diffs and returns its segment
    /// memberships as state changes (none without state); a failed write stops the run (see
    /// [`Abort`]) and is returned.
    fn commit(
        &mut self,
        time: Time,
        mut updates: Vec<(StateUpdate, isize)>,
        names: &IdMap<String>,
    ) -> Result<Vec<(StoreOp, isize)>, ()> {
        // A resumed run's outputs hold the diffs of the times before the
        // checkpoint's bound: they are counted, not written again (nor
        // formatted, nor consolidated first: counts are sums, and a
        // restored time holds every membership and profile).
        let written = self
            .outputs
            .resume
            .as_ref()
            .is_none_or(|r| time >= r.segments_bound);
        if !written && time < self.restored_before {
            if let Some(live) = self.outputs.live.clone() {
                // The API's memberships are rebuilt from these too.
                let mut restored = Vec::new();
                for (update, diff) in &updates {
                    if let StateUpdate::Segment(seg, profile) = update {
                        let profile = match ProcessShared::name(names, profile) {
                            Ok(p) => p,
                            Err(e) => {
                                self.abort.fail(e);
                                return Err(());
                            }
                        };
                        restored.push(SegmentDiff {
                            time,
                            segment: self.segment_name(*seg),
                            profile,
                            diff: *diff as i64,
                        });
                    }
                }
                live.apply(restored, false);
            }
            for (update, diff) in &updates {
                match update {
                    StateUpdate::Segment(seg, _) => {
                        if self.members.len() <= *seg as usize {
                            self.members.resize(*seg as usize + 1, 0);
                        }
                        self.members[*seg as usize] += *diff as i64
                    }
                    StateUpdate::Profile(_) => self.summary.profiles += *diff as i64,
                    _ => {}
                }
            }
            return Ok(Vec::new());
        }
        differential_dataflow::consolidation::consolidate(&mut updates);
        let mut diffs = Vec::new();
        let mut ops = Vec::new();
        for (update, diff) in &updates {
            match update {
                StateUpdate::Segment(seg, profile) => {
                    let profile = match ProcessShared::name(names, profile) {
                        Ok(p) => p,
                        Err(e) => {
                            self.abort.fail(e);
                            return Err(());
                        }
                    };
                    let name = self.segment_name(*seg);
                    if self.members.len() <= *seg as usize {
                        self.members.resize(*seg as usize + 1, 0);
                    }
                    self.members[*seg as usize] += *diff as i64;
                    diffs.push(SegmentDiff {
                        time,
                        segment: name.clone(),
                        profile: profile.clone(),
                        diff: *diff as i64,
                    });
                    if self.stateful {
                        ops.push((StoreOp::Segment { profile, name }, *diff));
                    }
                }
                StateUpdate::Profile(_) => self.summary.profiles += *diff as i64,
                _ => {}
            }
        }
        if written {
            diffs.sort();
            for d in &diffs {
                match self.outputs.segments.write(d) {
                    Ok(n) => self.written.0 += n,
                    Err(e) => {
                        self.segments_failed(&e);
                        return Err(());
                    }
                }
            }
            self.marks.0.note(time, self.written.0);
            self.written_marks.0.note(time, self.written.0);
            self.summary.diffs_written += diffs.len() as u64;
            if !diffs.is_empty() {
                self.summary.times_committed += 1;
            }
            self.summary.last_time = Some(time);
        }
        if let Some(live) = &self.outputs.live {
            live.apply(diffs, written);
        }
        Ok(ops)
    }

    /// The name of segment `index`: the definition's, or one a reload
    /// added (see [`crate::dataflow::reload`]).
    fn segment_name(&self, index: u32) -> String {
        match self.segments.get(index as usize) {
            Some(s) => s.name.clone(),
            None => self
                .process
                .segment_names
                .lock()
                .ok()
                .and_then(|n| n.get(index as usize).cloned())
                .unwrap_or_else(|| format!("segment {index}")),
        }
    }

    fn finish(&mut self) -> RunSummary {
        self.flush_segments();
        self.flush_dead_letters();
        let mut summary = self.summary.clone();
        summary.webhook_failed = self
            .outputs
            .webhook_failures
            .as_ref()
            .map(|(n, file)| (n.load(std::sync::atomic::Ordering::SeqCst), file.clone()));
        let count = self.members.len().max(self.segments.len());
        summary.segments = (0..count)
            .map(|i| {
                (
                    self.segment_name(i as u32),
                    self.members.get(i).copied().unwrap_or(0),
                )
            })
            .collect();
        summary
    }
}

/// How the workers of a run are laid out: `workers` per process (timely's
/// worker `i` is in process `i / workers`).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Worker threads per process (`-w`).
    pub workers: usize,
    /// Processes (`-n`).
    pub processes: usize,
}

impl Layout {
    /// The first worker of every process.
    fn first_workers(self) -> impl Iterator<Item = u64> {
        (0..self.processes).map(move |p| (p * self.workers) as u64)
    }
}

/// Builds the commit stage.
///
/// - `local`: the state changes of the keys this worker owns (links,
///   trait totals, attributes), written by this worker's process.
/// - `global`: segment memberships and profiles, for worker 0's diffs.
/// - `names`: identifier names, for the first worker of every process
///   that writes state (else worker 0).
/// - `retained`: what the checkpoint retains of this worker's records
///   (see [`crate::dataflow::retain`]), written by its process with the
///   state.
/// - `control`: source clocks for the first worker of every process,
///   everything else for worker 0.
///
/// `outputs` is `Some` on worker 0 only; `shared` is this worker's
/// process's. The final summary is left in `result` when the inputs are
/// exhausted.
#[allow(clippy::too_many_arguments)]
pub fn commit<'s>(
    local: Stream<'s, Time, Vec<(StateUpdate, Time, isize)>>,
    global: Stream<'s, Time, Vec<(StateUpdate, Time, isize)>>,
    names: Stream<'s, Time, Vec<(StateUpdate, Time, isize)>>,
    retained: Stream<'s, Time, Vec<(Retained, Time, isize)>>,
    control: Stream<'s, Time, Vec<Control>>,
    layout: Layout,
    outputs: Option<Outputs>,
    shared: Arc<ProcessShared>,
    source_names: Vec<String>,
    traits: Rc<[TraitSpec]>,
    segments: Rc<[SegmentSpec]>,
    result: Rc<RefCell<Option<RunSummary>>>,
    abort: Arc<Abort>,
) {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::vec::Map;

    let scope = local.scope();
    let worker = scope.index();
    let local_index = worker % layout.workers.max(1);
    let stateful = shared.state.is_some();
    // Names and clocks reach the first worker of every process that
    // writes state; without state only worker 0 needs them.
    let everywhere: Rc<[u64]> = if stateful {
        layout.first_workers().collect()
    } else {
        Rc::from([0u64])
    };
    let to = Rc::clone(&everywhere);
    let names = names.flat_map(move |update| copies_to(&to, update));
    let control = control.flat_map(move |c| match c {
        Control::Clock { .. } | Control::Cut { .. } => copies_to(&everywhere, c),
        other => vec![(0, other)],
    });
    let mut builder = OperatorBuilder::new("Commit".to_string(), scope);
    let mut local_in = builder.new_input(local, Pipeline);
    let mut global_in =
        builder.new_input(global, Exchange::new(|_: &(StateUpdate, Time, isize)| 0u64));
    let mut names_in = builder.new_input(
        names,
        Exchange::new(|(target, _): &(u64, (StateUpdate, Time, isize))| *target),
    );
    let mut control_in = builder.new_input(
        control,
        Exchange::new(|(target, _): &(u64, Control)| *target),
    );
    let mut retained_in = builder.new_input(retained, Pipeline);
    let mut retained_pending: BTreeMap<Time, Vec<(Retained, isize)>> = BTreeMap::new();
    // A resumed run's state holds every change before its checkpoint's
    // cut: the restored input's changes are not written again.
    let restored_before = shared.restored_before;
    let members = vec![0; segments.len()];
    let mut committer = outputs.map(|outputs| Committer {
        summary: RunSummary {
            sources: source_names
                .iter()
                .map(|n| SourceSummary {
                    name: n.clone(),
                    ..Default::default()
                })
                .collect(),
            resumed_before: outputs.resume.as_ref().map(|r| r.segments_bound),
            ..Default::default()
        },
        ended: None,
        sources_ended: Default::default(),
        replay_cut: false,
        last_dead: None,
        restored_before: shared.restored_before,
        written: outputs
            .resume
            .as_ref()
            .map_or((0, 0), |r| (r.segments_len, r.dead_len)),
        written_marks: Default::default(),
        written_positions: outputs.resume.clone().unwrap_or_else(|| SinkPositions {
            segments: outputs.identities.0.clone(),
            dead_letters: outputs.identities.1.clone(),
            ..SinkPositions::default()
        }),
        // A restored run's clamped positions continue the checkpoint's,
        // from where it resumes its outputs on: its first marks are the
        // lengths there.
        marks: match (&outputs.resume_clamped, &outputs.resume) {
            (Some(_), Some(r)) => {
                let mut marks = (Marks::default(), Marks::default());
                marks
                    .0
                    .note(r.segments_bound.saturating_sub(1), r.segments_len);
                marks.1.note(r.dead_bound.saturating_sub(1), r.dead_len);
                marks
            }
            _ => Default::default(),
        },
        clamp_floor: match (&outputs.resume_clamped, &outputs.resume) {
            (Some(_), Some(r)) => (r.segments_bound, r.dead_bound),
            _ => (0, 0),
        },
        positions: outputs
            .resume_clamped
            .clone()
            .or_else(|| outputs.resume.clone())
            .unwrap_or_else(|| SinkPositions {
                segments: outputs.identities.0.clone(),
                dead_letters: outputs.identities.1.clone(),
                ..SinkPositions::default()
            }),
        outputs,
        segments,
        process: Arc::clone(&shared),
        pending: BTreeMap::new(),
        dead_pending: BTreeMap::new(),
        offsets: BTreeMap::new(),
        members,
        abort: Arc::clone(&abort),
        stateful,
    });
    let mut local_pending: BTreeMap<Time, Vec<(StateUpdate, isize)>> = BTreeMap::new();
    let trait_names: Vec<String> = traits.iter().map(|t| t.name.clone()).collect();
    let mut finished = false;
    builder.build(move |_caps| {
        move |frontiers| {
            if abort.is_stopped() || finished {
                local_in.for_each(|_, _| {});
                global_in.for_each(|_, _| {});
                names_in.for_each(|_, _| {});
                control_in.for_each(|_, _| {});
                retained_in.for_each(|_, _| {});
                return;
            }
            // Names as they arrive: an update that uses one completes no
            // earlier than the name's time.
            let mut collision = None;
            names_in.for_each(|_, data| {
                let Ok(mut known) = shared.names.write() else {
                    return;
                };
                for (_, (update, _, diff)) in data.drain(..) {
                    if let (StateUpdate::Name(key, name), 1..) = (update, diff) {
                        match known.get(&key) {
                            Some(seen) if *seen != name => {
                                collision.get_or_insert(format!(
                                    "identifiers `{seen}` and `{name}` have the same 120-bit key; please report this at once"
                                ));
                            }
                            Some(_) => {}
                            None => {
                                known.insert(key, name);
                            }
                        }
                    }
                }
            });
            if let Some(e) = collision {
                abort.fail(e);
                return;
            }
            let mut offsets_moved = false;
            control_in.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                for (_, item) in data.drain(..) {
                    offsets_moved |= matches!(item, Control::Offset { .. });
                    match (item, committer.as_mut()) {
                        (
                            Control::Clock {
                                source,
                                tick,
                                admitted,
                            },
                            c,
                        ) => {
                            if let Ok(mut c) = shared.completion.lock() {
                                c.observe(tick);
                            }
                            if let Some(live) = c.and_then(|c| c.outputs.live.as_ref()) {
                                live.observe_clock(source, tick, admitted);
                            }
                        }
                        (Control::Cut { watermark, live, .. }, c) => {
                            if let Ok(mut c) = shared.completion.lock() {
                                c.observe_cut(watermark);
                            }
                            if let (false, Some(c)) = (live, c) {
                                c.replay_cut = true;
                            }
                        }
                        // Dead letters wait for their time to complete, then
                        // are written sorted: the same input gives the same
                        // dead-letter file for any number of workers.
                        (Control::Dead(letter, at), Some(c)) => {
                            c.dead_pending.entry(at.max(time)).or_default().push(letter)
                        }
                        (other, Some(c)) => c.control(&other),
                        (_, None) => {}
                    }
                }
            });
            global_in.for_each(|_cap, data| {
                if let Some(c) = committer.as_mut() {
                    for (update, time, diff) in data.drain(..) {
                        c.pending.entry(time).or_default().push((update, diff));
                    }
                }
            });
            local_in.for_each(|_cap, data| {
                for (update, time, diff) in data.drain(..) {
                    local_pending.entry(time).or_default().push((update, diff));
                }
            });
            retained_in.for_each(|_cap, data| {
                for (update, time, diff) in data.drain(..) {
                    retained_pending.entry(time).or_default().push((update, diff));
                }
            });
            // The earliest time some worker may still produce.
            let frontier = frontiers
                .iter()
                .filter_map(|f| f.frontier().iter().min().copied())
                .min();
            let completion = shared.completion.lock().map(|c| *c).unwrap_or_default();
            let Ok(names) = shared.names.read() else {
                return;
            };
            // Every time whose changes this worker stages, with its changes.
            let mut staged: BTreeMap<Time, StateBatch> = BTreeMap::new();
            if let Some(c) = committer.as_mut() {
                let mut wrote = false;
                while let Some((&time, _)) = c.pending.first_key_value() {
                    if !completion.committable(time, frontier) {
                        break;
                    }
                    let updates = c.pending.pop_first().map(|(_, u)| u).unwrap_or_default();
                    if time + 1 == restored_before {
                        tracing::info!(updates = updates.len(), "rebuilt the restored state");
                    }
                    let Ok(ops) = c.commit(time, updates, &names) else {
                        return;
                    };
                    if stateful && time >= restored_before {
                        staged.entry(time).or_default().stage(&ops);
                    }
                    wrote = true;
                }
                if wrote {
                    c.flush_segments();
                }
                // Every diff of a time before the horizon is written (and
                // flushed): that is where the segment output stands. Not
                // at the end of the input, which completes every time: a
                // run resumed on a longer input has more to write there.
                // Nor past where a source read its input's end.
                if frontier.is_some() {
                    let horizon = completion.horizon(frontier);
                    c.advance_segments(horizon.min(c.ended.unwrap_or(Time::MAX)));
                    let dead = c.written_positions.dead_bound;
                    c.advance_written(horizon, dead);
                }
                if let Some(live) = &c.outputs.live {
                    live.advance(
                        completion.horizon(frontier),
                        c.summary.profiles,
                        &c.summary.sources,
                    );
                }
            }
            while let Some((&time, _)) = local_pending.first_key_value() {
                if !completion.committable(time, frontier) {
                    break;
                }
                let mut updates = local_pending.pop_first().map(|(_, u)| u).unwrap_or_default();
                if time < restored_before {
                    continue;
                }
                differential_dataflow::consolidation::consolidate(&mut updates);
                let replaced = replaced_values(&updates);
                let batch = staged.entry(time).or_default();
                if let Err(e) = stage_local(batch, &updates, &replaced, &names) {
                    abort.fail(e);
                    return;
                }
            }
            let mut retained_staged: BTreeMap<Time, RetainedBatch> = BTreeMap::new();
            while let Some((&time, _)) = retained_pending.first_key_value() {
                if !completion.committable(time, frontier) {
                    break;
                }
                let updates = retained_pending.pop_first().map(|(_, u)| u).unwrap_or_default();
                let batch = retained_staged.entry(time).or_default();
                for (update, diff) in updates {
                    batch.stage(update, time, diff);
                }
            }
            // Every change of a time before the horizon is staged: times
            // before the frontier, up to the end of the data. At the end,
            // times after the data (window expiries) are not part of a
            // finite replay's result.
            if frontier.is_none() {
                local_pending.clear();
                retained_pending.clear();
                if let Some(c) = committer.as_mut() {
                    c.pending.clear();
                }
            }
            let horizon = completion.horizon(frontier);
            if let Some(state) = &shared.state {
                if let Some(c) = committer.as_ref().filter(|_| offsets_moved) {
                    state.set_offsets(&c.offsets);
                }
                if let Some(c) = committer.as_ref() {
                    state.set_sinks(&c.positions, &c.written_positions);
                }
                let retained = retained_staged.into_iter().collect();
                let staged = staged.into_iter().collect();
                if let Err(e) =
                    state.deposit(local_index, staged, retained, horizon, &names, &trait_names)
                {
                    abort.fail(format!("state directory {}: {e}", state.label));
                    return;
                }
            }
            drop(names);
            if let Some(c) = committer.as_mut() {
                let mut wrote_dead = false;
                while let Some((&time, _)) = c.dead_pending.first_key_value() {
                    if !Completion::is_complete(time, frontier) {
                        break;
                    }
                    let mut letters = c
                        .dead_pending
                        .pop_first()
                        .map(|(_, l)| l)
                        .unwrap_or_default();
                    letters.sort_by(|a, b| {
                        (&a.source, &a.input, a.line).cmp(&(&b.source, &b.input, b.line))
                    });
                    for letter in &letters {
                        c.dead(letter, time);
                    }
                    wrote_dead = true;
                }
                // Like the diffs, dead letters are on disk as soon as their
                // time is complete, not when the run ends.
                if wrote_dead {
                    c.flush_dead_letters();
                }
                // Nor past where a source cut short by a signal stopped (the
                // lines it did not read come back in the next run).
                if let Some(f) = frontier {
                    let bound = f.min(completion.cut().unwrap_or(Time::MAX));
                    c.advance_dead_letters(bound.min(c.ended.unwrap_or(Time::MAX)));
                    let segments = c.written_positions.segments_bound;
                    c.advance_written(segments, bound);
                }
            }
            if frontier.is_none() {
                finished = true;
                if let Some(c) = committer.as_mut() {
                    // Every input was read to its end (none cut short by a
                    // signal, none live): everything before the least
                    // watermark at which one ended is final, even for
                    // inputs that grow later. The last checkpoint says so,
                    // and a run over longer inputs writes only what follows.
                    let every = c.sources_ended.len() == c.summary.sources.len();
                    if let (true, None, Some(bound)) = (every, completion.cut(), c.ended) {
                        c.advance_segments(bound);
                        c.advance_dead_letters(bound);
                    }
                    // Every time up to the end of the data (and before a
                    // cut) is written, every dead letter before a cut:
                    // with the same inputs, that is final.
                    let cut = completion.cut().unwrap_or(Time::MAX);
                    // Every dead letter read was written (all times are
                    // complete now). Those of a replay cut short from its
                    // cut on are written again by the next run, which reads
                    // on from before them (so the output is a prefix of the
                    // uninterrupted run's). A live source's are not: its
                    // lines are not judged again the same way (the wall
                    // clock has moved), so its letters stay, and the bound
                    // passes them.
                    let dead = match (completion.cut(), c.replay_cut, c.last_dead) {
                        (Some(cut), false, Some(last)) => cut.max(last.saturating_add(1)),
                        _ => cut,
                    };
                    if let Some(end) = completion.end_of_data() {
                        c.advance_written(end.saturating_add(1).min(cut), dead);
                    }
                    if let Some(state) = &shared.state {
                        state.set_sinks(&c.positions, &c.written_positions);
                        if let Err(e) = state.write_checkpoint() {
                            abort.fail(format!("state directory {}: {e}", state.label));
                            return;
                        }
                    }
                    *result.borrow_mut() = Some(c.finish());
                    if let Some(live) = &c.outputs.live {
                        live.advance(Time::MAX, c.summary.profiles, &c.summary.sources);
                        live.finish();
                    }
                }
            }
        }
    });
}

/// For each of a time's consolidated (hence sorted) local updates, whether
/// it is the removal of attributes that other attributes of the same
/// profile replace at the same time. The state stages removals before
/// insertions and keeps a key's last change, so such a removal changes
/// nothing, and it is skipped before its names and text are built. Links
/// are never skipped: the removal of a link also removes the old profile's
/// entry, under another key. (Trait values come as the value at each time
/// they change, with no removal.)
fn replaced_values(updates: &[(StateUpdate, isize)]) -> Vec<bool> {
    // The key an attributes update is stored under.
    let key = |u: &StateUpdate| match u {
        StateUpdate::Attrs(p, _) => Some(*p),
        _ => None,
    };
    let mut replaced = vec![false; updates.len()];
    let mut start = 0;
    while start < updates.len() {
        let k = key(&updates[start].0);
        let mut end = start + 1;
        while end < updates.len() && k.is_some() && key(&updates[end].0) == k {
            end += 1;
        }
        if k.is_some() && updates[start..end].iter().any(|(_, d)| *d > 0) {
            for (i, (_, d)) in updates[start..end].iter().enumerate() {
                replaced[start + i] = *d < 0;
            }
        }
        start = end;
    }
    replaced
}

/// `item` paired with each of `targets` (cloned for all but one).
fn copies_to<T: Clone>(targets: &[u64], item: T) -> Vec<(u64, T)> {
    let mut out: Vec<(u64, T)> = targets[1..].iter().map(|t| (*t, item.clone())).collect();
    out.push((targets[0], item));
    out
}

/// Stages one time's consolidated local updates (links, trait totals,
/// attributes) into `batch`, removals before insertions, skipping the
/// `replaced` removals ([`replaced_values`]); names come from `names` and
/// are borrowed, and a removal's value is never formatted. The error is an
/// internal one (an identifier key without a name).
fn stage_local(
    batch: &mut StateBatch,
    updates: &[(StateUpdate, isize)],
    replaced: &[bool],
    names: &IdMap<String>,
) -> Result<(), String> {
    let name = |key: &Id| -> Result<&str, String> {
        names
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("internal error: no name for identifier key {:032x}", key.0))
    };
    for insert in [false, true] {
        for ((update, diff), replaced) in updates.iter().zip(replaced) {
            if *replaced || (*diff > 0) != insert {
                continue;
            }
            match update {
                StateUpdate::Link(id, profile) => batch.link(name(id)?, name(profile)?, insert),
                // A trait's value as of this time (null: none), named when
                // the batch is written.
                StateUpdate::Trait(profile, index, value) => {
                    batch.set_trait(*profile, *index, value.clone())
                }
                StateUpdate::Attrs(profile, attrs) => {
                    let json = if insert {
                        attributes_json(attrs)
                    } else {
                        String::new()
                    };
                    batch.attributes(name(profile)?, &json, insert)
                }
                StateUpdate::Name(..) | StateUpdate::Segment(..) | StateUpdate::Profile(_) => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scalar;

    /// A removal is skipped only where an insertion under the same key
    /// replaces it at the same time: new attributes; never attributes
    /// that are removed, never a link.
    #[test]
    fn only_replaced_removals_are_skipped() {
        let id = |n: u8| Id::of(0, &format!("anon:{n}"));
        let tier = |t: &str| vec![("tier".to_string(), Scalar::Str(t.into()))];
        let mut updates = vec![
            (StateUpdate::Trait(id(1), 0, Scalar::Num(4.0)), 1),
            (StateUpdate::Trait(id(1), 1, Scalar::Null), 1),
            (StateUpdate::Attrs(id(1), tier("gold")), -1),
            (StateUpdate::Attrs(id(1), tier("silver")), 1),
            (StateUpdate::Attrs(id(2), tier("gold")), -1),
            (StateUpdate::Link(id(3), id(1)), -1),
            (StateUpdate::Link(id(3), id(2)), 1),
        ];
        differential_dataflow::consolidation::consolidate(&mut updates);
        let skipped: Vec<(StateUpdate, isize)> = updates
            .iter()
            .zip(replaced_values(&updates))
            .filter(|(_, r)| *r)
            .map(|(u, _)| u.clone())
            .collect();
        assert_eq!(skipped, vec![(StateUpdate::Attrs(id(1), tier("gold")), -1)]);
    }
}
