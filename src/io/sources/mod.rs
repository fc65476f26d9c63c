//! Sources: files (JSON lines, CSV for CRM, optionally followed), TCP
//! listeners and in-memory lines.
//!
//! Each source is read by one worker, its *owner* (source index modulo the
//! number of workers, so the three streams land on different workers), which
//! decodes and normalizes every line and checks it against the source's
//! watermark in input order. This makes "late" a property of the input, not
//! of the cluster's shape: `-w 1`, `-w 4` and `-n 2` admit the same records.
//! The records are then exchanged by key to all workers for the rest of the
//! flow.
//!
//! ## Event time
//!
//! The owner offers each record's event time, in input order, to the
//! source's [`SourceClock`] (the rule, its glossary and a worked example are
//! in [`crate::time`]): it says whether the record is on time, late or
//! future, and where the source's watermark is. The source holds its timely
//! capability at the watermark, so downstream times below it are complete.
//! A finite input drops its capability at the end. A TCP source wakes its
//! worker as soon as a line arrives; a followed file is polled every few
//! milliseconds; while nothing arrives, a live source is scheduled again
//! when its idle watermark would next move.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Concat;
use timely::dataflow::{Scope, Stream};

use timely::scheduling::SyncActivator;

use crate::io::{Abort, Control, DeadLetter};
use crate::model::limits::{check_summed_fields, SummedField};
use crate::model::{
    decode_csv_as, decode_json_projected, parse_csv_header, IdentityRules, Projection, Record,
    RecordKind,
};
use crate::spec::{Format, TimeUnit};
use crate::time::{wall_clock_ms, SourceClock, Time, TimeConfig};

pub mod decode;
pub mod lines;
pub mod tcp;

use decode::{decode_stage, peek_time, RawLine};
use lines::{FileLines, LineSource, MemoryLines, Next};

/// Where a source reads from.
#[derive(Clone, Debug)]
pub enum Input {
    /// A file; with `follow`, the file is read as it grows and never ends.
    File {
        /// Path of the file.
        path: PathBuf,
        /// Keep reading as the file grows.
        follow: bool,
    },
    /// A TCP listener (`tcp://host:port`).
    Tcp {
        /// Address to listen on.
        addr: String,
        /// End when every client that connected has disconnected.
        until_disconnect: bool,
    },
    /// Lines held in memory.
    Memory(Arc<Vec<String>>),
}

impl Input {
    /// Parses a command-line location: `tcp://ADDR` or a file path.
    pub fn parse(location: &str, follow: bool, until_disconnect: bool) -> Input {
        match location.strip_prefix("tcp://") {
            Some(addr) => Input::Tcp {
                addr: addr.to_string(),
                until_disconnect,
            },
            None => Input::File {
                path: PathBuf::from(location),
                follow,
            },
        }
    }

    /// How the input is named in dead letters and messages.
    pub fn describe(&self) -> String {
        match self {
            Input::File { path, .. } => path.display().to_string(),
            Input::Tcp { addr, .. } => format!("tcp://{addr}"),
            Input::Memory(_) => "memory".to_string(),
        }
    }
}

/// One source, ready to be read.
#[derive(Clone, Debug)]
pub struct SourceDef {
    /// Position among the dataflow's sources.
    pub index: u32,
    /// Name from the dataflow file.
    pub name: String,
    /// Which record type it carries.
    pub kind: RecordKind,
    /// JSON lines or CSV.
    pub format: Format,
    /// The unit of numeric timestamps.
    pub time_unit: TimeUnit,
    /// Where it reads from.
    pub input: Input,
}

/// Reading parameters shared by all sources.
#[derive(Clone, Debug)]
pub struct ReadParams {
    /// Tick, lateness, idleness, future skew, late policy.
    pub time: TimeConfig,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// Identifier normalization.
    pub rules: IdentityRules,
    /// Fields that sum traits add up; their values are range-checked.
    pub summed: Vec<SummedField>,
    /// The fields of web events and transactions the dataflow reads; the
    /// others are skipped while decoding.
    pub projection: Projection,
    /// Set to end every source now (graceful shutdown: what was read is
    /// completed and written, then the run returns).
    pub shutdown: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Lines decoded per activation before yielding to other operators.
const BATCH: usize = 8192;

/// How often a followed file is polled for new data while it has none
/// (sockets wake the source instead).
const FILE_POLL_MS: u64 = 5;

enum Status {
    More,
    Idle,
    /// The input has ended, but a live source waits this long for the wall
    /// clock to pass its last tick before it finishes.
    Draining(Duration),
    Finished,
}

struct Reader {
    def: SourceDef,
    params: Arc<ReadParams>,
    lines: Box<dyn LineSource>,
    input_name: String,
    /// CSV headers, one per stream: the file, or each TCP connection (by
    /// peer address), starts with its own. An invalid header is kept as its
    /// error (with its line), so that every row after it is dead-lettered
    /// with the reason instead of being read against the wrong columns.
    headers: std::collections::HashMap<Option<String>, Result<Vec<String>, String>>,
    clock: SourceClock,
    reported_clock: Option<Time>,
    stats: (u64, u64, u64, u64),
}

impl Reader {
    fn open(
        def: SourceDef,
        params: Arc<ReadParams>,
        waker: Option<SyncActivator>,
    ) -> std::io::Result<Reader> {
        let limit = params.max_line_bytes;
        let lines: Box<dyn LineSource> = match &def.input {
            Input::File { path, follow } => {
                Box::new(FileLines::open(path, *follow, limit, def.format.into())?)
            }
            Input::Tcp {
                addr,
                until_disconnect,
            } => Box::new(tcp::TcpLines::listen(
                addr,
                *until_disconnect,
                limit,
                def.format.into(),
                waker,
            )?),
            Input::Memory(lines) => Box::new(MemoryLines::new(Arc::clone(lines), limit)),
        };
        let input_name = def.input.describe();
        let clock = SourceClock::new(params.time, lines.is_live(), wall_clock_ms());
        Ok(Reader {
            def,
            params,
            lines,
            input_name,
            headers: Default::default(),
            clock,
            reported_clock: None,
            stats: (0, 0, 0, 0),
        })
    }

    fn dead(
        &mut self,
        ctl: &mut Vec<Control>,
        line: u64,
        offset: u64,
        peer: Option<String>,
        reason: String,
        raw: &[u8],
    ) {
        self.stats.2 += 1;
        let letter = DeadLetter::new(
            &self.def.name,
            &self.input_name,
            peer.as_deref(),
            line,
            offset,
            reason,
            raw,
        );
        ctl.push(Control::Dead(letter));
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_line(
        &mut self,
        bytes: Vec<u8>,
        line: u64,
        offset: u64,
        peer: Option<String>,
        now_ms: u64,
        out: &mut Vec<(Record, Time, isize)>,
        raw: &mut Vec<RawLine>,
        ctl: &mut Vec<Control>,
    ) {
        self.stats.0 += 1;
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let reason = format!(
                    "invalid UTF-8 at byte {} of the line (input offset {})",
                    e.valid_up_to(),
                    offset + e.valid_up_to() as u64
                );
                return self.dead(ctl, line, offset, peer, reason, &bytes);
            }
        };
        if text.trim().is_empty() {
            return;
        }
        // JSON lines: peek at the time here, decode in full on some worker.
        if self.def.format == Format::Jsonl {
            if let Some(ms) = peek_time(self.def.kind, text, self.def.time_unit) {
                let Some(tick) = self.admit(ms, now_ms, line, offset, &peer, &bytes, ctl) else {
                    return;
                };
                let text = text.to_string();
                raw.push(RawLine {
                    line,
                    offset,
                    tick,
                    peer,
                    text,
                });
                return;
            }
        }
        let decoded = match self.def.format {
            Format::Csv => match self.headers.get(&peer) {
                None => {
                    let header = parse_csv_header(text)
                        .map_err(|e| e.to_string())
                        .and_then(|h| {
                            match ["crm_id", "updated_at"]
                                .iter()
                                .find(|c| !h.iter().any(|n| n == *c))
                            {
                                Some(c) => Err(format!("required column `{c}` is missing")),
                                None => Ok(h),
                            }
                        });
                    let failed = header.as_ref().err().map(|e| format!("CSV header: {e}"));
                    self.headers.insert(
                        peer.clone(),
                        header.map_err(|e| format!("its CSV header (line {line}) is invalid: {e}")),
                    );
                    if let Some(reason) = failed {
                        self.dead(ctl, line, offset, peer, reason, &bytes);
                    }
                    return;
                }
                Some(Ok(header)) => {
                    decode_csv_as(header, text, &self.params.rules, self.def.time_unit)
                }
                Some(Err(reason)) => {
                    let reason = reason.clone();
                    return self.dead(ctl, line, offset, peer, reason, &bytes);
                }
            },
            Format::Jsonl => decode_json_projected(
                self.def.kind,
                text,
                &self.params.rules,
                self.def.time_unit,
                &self.params.projection,
            ),
        };
        let record = match decoded {
            Ok(r) => r,
            Err(e) => return self.dead(ctl, line, offset, peer, e.to_string(), &bytes),
        };
        if let Err(reason) = check_summed_fields(&record, &self.params.summed) {
            return self.dead(ctl, line, offset, peer, reason, &bytes);
        }
        let Some(tick) = self.admit(record.ts_ms(), now_ms, line, offset, &peer, &bytes, ctl)
        else {
            return;
        };
        self.stats.1 += 1;
        out.push((record, tick, 1));
    }

    /// Offers an event time to the source's clock: the tick to use, or
    /// `None` if the record is late or future and dead-lettered.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        ms: i64,
        now_ms: u64,
        line: u64,
        offset: u64,
        peer: &Option<String>,
        bytes: &[u8],
        ctl: &mut Vec<Control>,
    ) -> Option<Time> {
        let admission = self.clock.admit(ms, now_ms);
        if admission.is_late() {
            self.stats.3 += 1;
        }
        if let Some(reason) = admission.reason() {
            self.dead(ctl, line, offset, peer.clone(), reason, bytes);
        }
        admission.time()
    }

    fn step(
        &mut self,
        out: &mut Vec<(Record, Time, isize)>,
        raw: &mut Vec<RawLine>,
        ctl: &mut Vec<Control>,
    ) -> Status {
        let now_ms = wall_clock_ms();
        if let Some(flag) = &self.params.shutdown {
            if flag.load(std::sync::atomic::Ordering::SeqCst) {
                // Graceful shutdown: end the input here, without waiting.
                return Status::Finished;
            }
        }
        let mut status = Status::More;
        for _ in 0..BATCH {
            match self.lines.next_line() {
                Ok(Next::Line {
                    bytes,
                    line,
                    offset,
                    peer,
                }) => {
                    self.clock.activity(now_ms);
                    self.handle_line(bytes, line, offset, peer, now_ms, out, raw, ctl);
                }
                Ok(Next::TooLong {
                    line,
                    offset,
                    len,
                    peer,
                }) => {
                    self.clock.activity(now_ms);
                    self.stats.0 += 1;
                    let reason = format!(
                        "line of {len} bytes exceeds max_line_bytes = {}",
                        self.params.max_line_bytes
                    );
                    self.dead(ctl, line, offset, peer, reason, b"");
                }
                Ok(Next::Pending) => {
                    status = Status::Idle;
                    break;
                }
                Ok(Next::End) => {
                    status = Status::Finished;
                    break;
                }
                Err(e) => {
                    tracing::error!(source = %self.def.name, "read error: {e}; the source ends here");
                    status = Status::Finished;
                    break;
                }
            }
        }
        if matches!(status, Status::Finished) {
            if let Some(wait) = self.clock.wait_before_finishing(now_ms) {
                status = Status::Draining(Duration::from_millis(wait));
            }
        }
        for peer in self.lines.take_closed() {
            self.headers.remove(&peer);
        }
        if matches!(status, Status::Idle) {
            self.clock.idle(now_ms);
        }
        let (lines, records, dead, late) = std::mem::take(&mut self.stats);
        if lines + records + dead + late > 0 {
            ctl.push(Control::Stats {
                source: self.def.index,
                lines,
                records,
                dead,
                late,
            });
            ctl.push(Control::Offset {
                source: self.def.index,
                offset: self.lines.position(),
            });
        }
        let clock = self.clock.clock();
        if clock != self.reported_clock {
            if let Some(tick) = clock {
                ctl.push(Control::Clock {
                    source: self.def.index,
                    tick,
                });
            }
            self.reported_clock = clock;
        }
        status
    }

    /// When to look at the source again while it has nothing to read.
    fn idle_wakeup(&self) -> Duration {
        let now = wall_clock_ms();
        let mut wait = self.clock.next_idle_move_in(now).unwrap_or(FILE_POLL_MS);
        if !self.lines.wakes_on_input() {
            wait = wait.min(FILE_POLL_MS);
        }
        Duration::from_millis(wait.max(1))
    }
}

/// The records of one source (at their ticks) and its control messages.
pub type SourceStreams<'s> = (
    Stream<'s, Time, Vec<(Record, Time, isize)>>,
    Stream<'s, Time, Vec<Control>>,
);

/// Builds the source operator. Only the owner worker reads; the others
/// release their capabilities at once. If the owner cannot open its input
/// (a file that vanished, a port in use), it stops the run through `abort`
/// with the reason.
pub fn source<'s>(
    scope: Scope<'s, Time>,
    def: SourceDef,
    params: Arc<ReadParams>,
    abort: Arc<Abort>,
) -> SourceStreams<'s> {
    let mut builder = OperatorBuilder::new(format!("Source: {}", def.name), scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(info.address.clone());
    let (records_out, records) = builder.new_output::<Vec<(Record, Time, isize)>>();
    let (raw_out, raw) = builder.new_output::<Vec<RawLine>>();
    let (control_out, control) = builder.new_output::<Vec<Control>>();
    let mut records_out =
        OutputBuilder::<Time, CapacityContainerBuilder<Vec<(Record, Time, isize)>>>::from(
            records_out,
        );
    let mut raw_out = OutputBuilder::<Time, CapacityContainerBuilder<Vec<RawLine>>>::from(raw_out);
    let mut control_out =
        OutputBuilder::<Time, CapacityContainerBuilder<Vec<Control>>>::from(control_out);
    let owner = def.index as usize % scope.peers();
    let is_owner = scope.index() == owner;
    let waker = scope.worker().sync_activator_for(info.address.to_vec());
    let decode_def = def.clone();
    let decode_params = Arc::clone(&params);

    builder.build(move |caps| {
        // One capability per output: records, raw lines, control.
        let mut caps: Option<Vec<_>> = Some(caps);
        let mut reader = None;
        if is_owner {
            let name = def.name.clone();
            let described = def.input.describe();
            match Reader::open(def, params, Some(waker)) {
                Ok(r) => reader = Some(r),
                Err(e) => {
                    abort.fail(format!("source `{name}`: cannot open {described}: {e}"));
                    caps = None;
                }
            }
            activator.activate();
        } else {
            caps = None;
        }
        let mut batch = Vec::new();
        let mut raw_batch = Vec::new();
        let mut ctl = Vec::new();
        move |_frontiers| {
            let Some(reader) = reader.as_mut() else {
                return;
            };
            let Some(held) = caps.as_mut() else { return };
            let status = reader.step(&mut batch, &mut raw_batch, &mut ctl);
            if !batch.is_empty() {
                records_out
                    .activate()
                    .session(&held[0])
                    .give_container(&mut batch);
                batch.clear();
            }
            if !raw_batch.is_empty() {
                raw_out
                    .activate()
                    .session(&held[1])
                    .give_container(&mut raw_batch);
                raw_batch.clear();
            }
            if !ctl.is_empty() {
                control_out
                    .activate()
                    .session(&held[2])
                    .give_container(&mut ctl);
                ctl.clear();
            }
            match status {
                Status::Finished => caps = None,
                status => {
                    let watermark = reader.clock.watermark();
                    if watermark > *held[0].time() {
                        for cap in held.iter_mut() {
                            cap.downgrade(&watermark);
                        }
                    }
                    match status {
                        Status::More => activator.activate(),
                        Status::Draining(wait) => activator.activate_after(wait),
                        _ => activator.activate_after(reader.idle_wakeup()),
                    }
                }
            }
        }
    });
    let (decoded, decode_control) = decode_stage(raw, &decode_def, decode_params);
    (records.concat(decoded), control.concat(decode_control))
}
