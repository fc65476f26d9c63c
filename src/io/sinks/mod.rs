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
use crate::dataflow::segments::trait_scalar;
use crate::io::{Abort, Control, DeadLetter, Stop};
use crate::model::Id;
use crate::spec::{SegmentSpec, TraitSpec};
use crate::store::{attributes_json, Checkpoint, StateBatch, Store, StoreOp};
use crate::time::{Completion, Time};

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
    fn write(&mut self, diff: &SegmentDiff) -> std::io::Result<()> {
        match self {
            SegmentSink::Discard => Ok(()),
            SegmentSink::Writer(w) => {
                w.write_all(diff.to_line().as_bytes())?;
                w.write_all(b"\n")
            }
            SegmentSink::Callback(f) => {
                f(diff);
                Ok(())
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
    /// RocksDB state.
    pub store: Option<Store>,
    /// The state directory's lock, held until the outputs are dropped.
    pub state_lock: Option<crate::store::StateLock>,
    /// How messages name each output (a path, `standard output`,
    /// `tcp://..`), and whether the segment sink is standard output (whose
    /// reader going away ends the run quietly).
    pub labels: OutputLabels,
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
    /// Trait `index` of a profile has this total (sums in thousandths).
    Trait(Id, u32, i128),
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
    /// Final offset.
    pub offset: u64,
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
    /// Timestamps committed.
    pub times_committed: u64,
    /// Number of state batches written (each holds the times one frontier
    /// advance completed).
    pub state_batches: u64,
    /// Last committed time (ms), if any.
    pub last_time: Option<u64>,
    /// Wall-clock seconds of the run (set by the engine).
    pub elapsed_secs: f64,
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

struct Committer {
    outputs: Outputs,
    traits: Rc<[TraitSpec]>,
    segments: Rc<[SegmentSpec]>,
    pending: BTreeMap<Time, Vec<(StateUpdate, isize)>>,
    dead_pending: BTreeMap<Time, Vec<DeadLetter>>,
    completion: Completion,
    summary: RunSummary,
    checkpoint: Checkpoint,
    members: Vec<i64>,
    abort: Arc<Abort>,
    /// The name of every identifier key seen.
    names: std::collections::HashMap<Id, String>,
    /// The times committed since the last state write.
    batch: StateBatch,
    /// Whether batches were written since the last flush.
    unflushed: bool,
    last_flush: std::time::Instant,
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

    fn dead(&mut self, letter: &DeadLetter) {
        if let Some(w) = self.outputs.dead_letters.as_mut() {
            let line = serde_json::to_string(letter).expect("dead letter serializes");
            if let Err(e) = w
                .write_all(line.as_bytes())
                .and_then(|_| w.write_all(b"\n"))
            {
                self.dead_letters_failed(&e);
            }
        }
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
            Control::Clock { tick, .. } => self.completion.observe(*tick),
            Control::Offset { source, offset } => {
                let s = &mut self.summary.sources[*source as usize];
                s.offset = s.offset.max(*offset);
                self.checkpoint.offsets.insert(s.name.clone(), s.offset);
            }
            Control::Stats {
                source,
                lines,
                records,
                dead,
                late,
            } => {
                let s = &mut self.summary.sources[*source as usize];
                s.lines += lines;
                s.records += records;
                s.dead_letters += dead;
                s.late += late;
            }
            Control::Dead(letter, _) => self.dead(letter),
        }
    }

    /// Writes one complete time; a failed write stops the run (see
    /// [`Abort`]) and is returned.
    fn commit(&mut self, time: Time, mut updates: Vec<(StateUpdate, isize)>) -> Result<(), ()> {
        differential_dataflow::consolidation::consolidate(&mut updates);
        // Names first: the other updates of this time may use them.
        for (update, diff) in &updates {
            if let (StateUpdate::Name(key, name), 1..) = (update, *diff) {
                match self.names.get(key) {
                    Some(known) if known != name => {
                        self.abort.fail(format!(
                            "identifiers `{known}` and `{name}` have the same 120-bit key; please report this at once"
                        ));
                        return Err(());
                    }
                    Some(_) => {}
                    None => {
                        self.names.insert(*key, name.clone());
                    }
                }
            }
        }
        let names = &self.names;
        let name = |key: &Id| -> Result<String, String> {
            names
                .get(key)
                .cloned()
                .ok_or_else(|| format!("internal error: no name for identifier key {:032x}", key.0))
        };
        let mut diffs = Vec::new();
        let mut ops = Vec::new();
        for (update, diff) in &updates {
            let op = match update {
                StateUpdate::Name(..) => continue,
                StateUpdate::Segment(seg, profile) => name(profile).map(|profile| {
                    let name = self.segments[*seg as usize].name.clone();
                    self.members[*seg as usize] += *diff as i64;
                    diffs.push(SegmentDiff {
                        time,
                        segment: name.clone(),
                        profile: profile.clone(),
                        diff: *diff as i64,
                    });
                    Some(StoreOp::Segment { profile, name })
                }),
                StateUpdate::Profile(_) => {
                    self.summary.profiles += *diff as i64;
                    Ok(None)
                }
                StateUpdate::Link(id, profile) => name(id).and_then(|id| {
                    Ok(Some(StoreOp::Link {
                        id,
                        profile: name(profile)?,
                    }))
                }),
                StateUpdate::Trait(profile, index, raw) => name(profile).map(|profile| {
                    let spec = &self.traits[*index as usize];
                    let value = trait_scalar(spec, *raw).as_f64().unwrap_or(0.0);
                    Some(StoreOp::Trait {
                        profile,
                        name: spec.name.clone(),
                        value,
                    })
                }),
                StateUpdate::Attrs(profile, attrs) => name(profile).map(|profile| {
                    Some(StoreOp::Attributes {
                        profile,
                        json: attributes_json(attrs),
                    })
                }),
            };
            match op {
                Ok(Some(op)) => ops.push((op, *diff)),
                Ok(None) => {}
                Err(e) => {
                    self.abort.fail(e);
                    return Err(());
                }
            }
        }
        diffs.sort();
        for d in &diffs {
            if let Err(e) = self.outputs.segments.write(d) {
                self.segments_failed(&e);
                return Err(());
            }
        }
        self.summary.diffs_written += diffs.len() as u64;
        // A time that only named identifiers changed nothing (and which
        // times carry names depends on how records met the workers).
        if updates
            .iter()
            .any(|(u, _)| !matches!(u, StateUpdate::Name(..)))
        {
            self.summary.times_committed += 1;
        }
        self.summary.last_time = Some(time);
        self.checkpoint.time = time;
        if let Some(store) = &self.outputs.store {
            store.stage(&mut self.batch, &ops);
        }
        Ok(())
    }

    /// Stops the run because the state directory failed.
    fn state_failed(&self, e: &crate::store::StoreError) {
        self.abort.fail(format!(
            "state directory {}: {e}",
            self.outputs.labels.state
        ));
    }

    /// Writes the times staged since the last call, with the checkpoint of
    /// the last of them, as one batch; flushes the state to disk when
    /// `force` or every [`STATE_FLUSH_INTERVAL`].
    fn write_state(&mut self, force: bool) -> Result<(), ()> {
        let Some(store) = &self.outputs.store else {
            return Ok(());
        };
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            if let Err(e) = store.write(batch, &self.checkpoint) {
                self.state_failed(&e);
                return Err(());
            }
            self.summary.state_batches += 1;
            self.unflushed = true;
        }
        if self.unflushed && (force || self.last_flush.elapsed() >= STATE_FLUSH_INTERVAL) {
            if let Err(e) = store.flush() {
                self.state_failed(&e);
                return Err(());
            }
            self.unflushed = false;
            self.last_flush = std::time::Instant::now();
        }
        Ok(())
    }

    fn finish(&mut self) -> RunSummary {
        let _ = self.write_state(true);
        self.flush_segments();
        self.flush_dead_letters();
        let mut summary = self.summary.clone();
        summary.segments = self
            .segments
            .iter()
            .zip(&self.members)
            .map(|(s, m)| (s.name.clone(), *m))
            .collect();
        summary
    }
}

/// Builds the commit stage. `outputs` is `Some` on worker 0 only; the final
/// summary is left in `result` when the inputs are exhausted.
pub fn commit<'s>(
    updates: Stream<'s, Time, Vec<(StateUpdate, Time, isize)>>,
    control: Stream<'s, Time, Vec<Control>>,
    outputs: Option<Outputs>,
    source_names: Vec<String>,
    traits: Rc<[TraitSpec]>,
    segments: Rc<[SegmentSpec]>,
    result: Rc<RefCell<Option<RunSummary>>>,
    abort: Arc<Abort>,
) {
    let scope = updates.scope();
    let mut builder = OperatorBuilder::new("Commit".to_string(), scope);
    let mut updates_in = builder.new_input(
        updates,
        Exchange::new(|_: &(StateUpdate, Time, isize)| 0u64),
    );
    let mut control_in = builder.new_input(control, Exchange::new(|_: &Control| 0u64));
    let members = vec![0; segments.len()];
    let mut committer = outputs.map(|outputs| Committer {
        outputs,
        summary: RunSummary {
            sources: source_names
                .iter()
                .map(|n| SourceSummary {
                    name: n.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
        traits,
        segments,
        pending: BTreeMap::new(),
        dead_pending: BTreeMap::new(),
        completion: Completion::default(),
        checkpoint: Checkpoint::default(),
        members,
        abort,
        names: std::collections::HashMap::new(),
        batch: StateBatch::default(),
        unflushed: false,
        last_flush: std::time::Instant::now(),
    });
    let mut finished = false;
    builder.build(move |_caps| {
        move |frontiers| {
            let Some(c) = committer.as_mut().filter(|c| !c.abort.is_stopped()) else {
                updates_in.for_each(|_, _| {});
                control_in.for_each(|_, _| {});
                return;
            };
            control_in.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                for item in data.drain(..) {
                    match item {
                        // Dead letters wait for their time to complete, then
                        // are written sorted: the same input gives the same
                        // dead-letter file for any number of workers.
                        Control::Dead(letter, at) => {
                            c.dead_pending.entry(at.max(time)).or_default().push(letter)
                        }
                        other => c.control(&other),
                    }
                }
            });
            updates_in.for_each(|_cap, data| {
                for (update, time, diff) in data.drain(..) {
                    c.pending.entry(time).or_default().push((update, diff));
                }
            });
            // The earliest time some worker may still produce.
            let frontier = frontiers
                .iter()
                .filter_map(|f| f.frontier().iter().min().copied())
                .min();
            let mut wrote = false;
            while let Some((&time, _)) = c.pending.first_key_value() {
                if !c.completion.committable(time, frontier) {
                    break;
                }
                let updates = c.pending.pop_first().map(|(_, u)| u).unwrap_or_default();
                if c.commit(time, updates).is_err() {
                    return;
                }
                wrote = true;
            }
            if wrote {
                c.flush_segments();
            }
            if c.write_state(false).is_err() {
                return;
            }
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
                    c.dead(letter);
                }
                wrote_dead = true;
            }
            // Like the diffs, dead letters are on disk as soon as their time
            // is complete, not when the run ends.
            if wrote_dead {
                c.flush_dead_letters();
            }
            if frontier.is_none() && !finished {
                finished = true;
                // Times after the last event (window expiries) are not
                // part of a finite replay's result.
                c.pending.clear();
                *result.borrow_mut() = Some(c.finish());
            }
        }
    });
}
