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
//! ## Event time and the watermark
//!
//! A record's time is its event time rounded down to the tick. The source's
//! watermark is the largest tick seen so far minus the allowed lateness
//! (rounded down to a tick); the source holds its capability at the
//! watermark, so downstream times below it are complete. A record whose tick
//! is below the watermark *at the moment it is read* is late: it is counted
//! and dead-lettered, or clamped to the watermark (`late_policy = "clamp"`).
//! A finite input drops its capability at the end. A live input (followed
//! file, TCP) that has been idle for `idle_advance` moves its clock on by the
//! wall-clock time elapsed, so windows expire without new events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Concat;
use timely::dataflow::{Scope, Stream};

use crate::dataflow::Time;
use crate::io::{Control, DeadLetter};
use crate::model::{
    decode_csv, decode_json, parse_csv_header, to_tick, IdentityRules, Record, RecordKind,
};
use crate::spec::{Format, LatePolicy};

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
    /// Where it reads from.
    pub input: Input,
}

/// Reading parameters shared by all sources.
#[derive(Clone, Debug)]
pub struct ReadParams {
    /// Tick in milliseconds.
    pub tick_ms: u64,
    /// Allowed lateness in milliseconds.
    pub lateness_ms: u64,
    /// Idle time after which a live source's clock follows the wall clock.
    pub idle_advance_ms: u64,
    /// What happens to late records.
    pub late_policy: LatePolicy,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// Identifier normalization.
    pub rules: IdentityRules,
}

/// Lines decoded per activation before yielding to other operators.
const BATCH: usize = 8192;

enum Status {
    More,
    Idle,
    Finished,
}

struct Reader {
    def: SourceDef,
    params: Arc<ReadParams>,
    lines: Box<dyn LineSource>,
    input_name: String,
    header: Option<Vec<String>>,
    max_tick: Option<u64>,
    reported_tick: Option<u64>,
    last_activity: Instant,
    stats: (u64, u64, u64, u64),
}

impl Reader {
    fn open(def: SourceDef, params: Arc<ReadParams>) -> std::io::Result<Reader> {
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
            )?),
            Input::Memory(lines) => Box::new(MemoryLines::new(Arc::clone(lines), limit)),
        };
        let input_name = def.input.describe();
        Ok(Reader {
            def,
            params,
            lines,
            input_name,
            header: None,
            max_tick: None,
            reported_tick: None,
            last_activity: Instant::now(),
            stats: (0, 0, 0, 0),
        })
    }

    /// The watermark: largest tick seen minus the allowed lateness.
    fn watermark(&self) -> u64 {
        let tick = self.params.tick_ms.max(1);
        let wm = self
            .max_tick
            .unwrap_or(0)
            .saturating_sub(self.params.lateness_ms);
        wm / tick * tick
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
            if let Some(ms) = peek_time(self.def.kind, text) {
                let Some(tick) = self.admit(ms, line, offset, &peer, &bytes, ctl) else {
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
            Format::Csv => {
                if self.header.is_none() {
                    match parse_csv_header(text) {
                        Ok(h) => self.header = Some(h),
                        Err(e) => {
                            let reason = format!("CSV header: {e}");
                            self.dead(ctl, line, offset, peer, reason, &bytes);
                        }
                    }
                    return;
                }
                decode_csv(
                    self.header.as_deref().unwrap_or(&[]),
                    text,
                    &self.params.rules,
                )
            }
            Format::Jsonl => decode_json(self.def.kind, text, &self.params.rules),
        };
        let record = match decoded {
            Ok(r) => r,
            Err(e) => return self.dead(ctl, line, offset, peer, e.to_string(), &bytes),
        };
        let Some(tick) = self.admit(record.ts_ms(), line, offset, &peer, &bytes, ctl) else {
            return;
        };
        self.stats.1 += 1;
        out.push((record, tick, 1));
    }

    /// Checks an event time against the watermark: the tick to use, or
    /// `None` if the record is late and dead-lettered.
    fn admit(
        &mut self,
        ms: i64,
        line: u64,
        offset: u64,
        peer: &Option<String>,
        bytes: &[u8],
        ctl: &mut Vec<Control>,
    ) -> Option<u64> {
        let mut tick = to_tick(ms, self.params.tick_ms.max(1));
        let watermark = self.watermark();
        if self.max_tick.is_some() && tick < watermark {
            self.stats.3 += 1;
            match self.params.late_policy {
                LatePolicy::DeadLetter => {
                    let reason =
                        format!("late: event time {ms} ms is before the watermark {watermark} ms");
                    self.dead(ctl, line, offset, peer.clone(), reason, bytes);
                    return None;
                }
                LatePolicy::Clamp => tick = watermark,
            }
        }
        self.max_tick = Some(self.max_tick.map_or(tick, |m| m.max(tick)));
        Some(tick)
    }

    fn step(
        &mut self,
        out: &mut Vec<(Record, Time, isize)>,
        raw: &mut Vec<RawLine>,
        ctl: &mut Vec<Control>,
    ) -> Status {
        let mut status = Status::More;
        for _ in 0..BATCH {
            match self.lines.next_line() {
                Ok(Next::Line {
                    bytes,
                    line,
                    offset,
                    peer,
                }) => {
                    self.last_activity = Instant::now();
                    self.handle_line(bytes, line, offset, peer, out, raw, ctl);
                }
                Ok(Next::TooLong {
                    line,
                    offset,
                    len,
                    peer,
                }) => {
                    self.last_activity = Instant::now();
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
        if matches!(status, Status::Idle) && self.lines.is_live() {
            let idle = self.last_activity.elapsed();
            if idle >= Duration::from_millis(self.params.idle_advance_ms) {
                let tick = self.params.tick_ms.max(1);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                // Before any event the clock is the wall clock; after, it moves
                // on from the last event by the idle time.
                let clock = match self.max_tick {
                    None => now,
                    Some(m) => m.saturating_add(idle.as_millis() as u64),
                };
                let clock = clock / tick * tick;
                if self.max_tick.is_none_or(|m| clock > m) {
                    self.max_tick = Some(clock);
                }
            }
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
        if self.max_tick != self.reported_tick {
            if let Some(tick) = self.max_tick {
                ctl.push(Control::Clock {
                    source: self.def.index,
                    tick,
                });
            }
            self.reported_tick = self.max_tick;
        }
        status
    }
}

/// The records of one source (at their ticks) and its control messages.
pub type SourceStreams<'s> = (
    Stream<'s, Time, Vec<(Record, Time, isize)>>,
    Stream<'s, Time, Vec<Control>>,
);

/// Builds the source operator. Only the owner worker reads; the others
/// release their capabilities at once.
///
/// # Panics
///
/// If the owner cannot open its input; [`crate::Engine::run`] checks files
/// beforehand so this only happens when a file vanishes or a port is taken.
pub fn source<'s>(
    scope: Scope<'s, Time>,
    def: SourceDef,
    params: Arc<ReadParams>,
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
    let decode_def = def.clone();
    let decode_params = Arc::clone(&params);

    builder.build(move |caps| {
        // One capability per output: records, raw lines, control.
        let mut caps: Option<Vec<_>> = Some(caps);
        let mut reader = None;
        if is_owner {
            let name = def.name.clone();
            let described = def.input.describe();
            match Reader::open(def, params) {
                Ok(r) => reader = Some(r),
                Err(e) => panic!("source `{name}`: cannot open {described}: {e}"),
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
                    let watermark = reader.watermark();
                    if watermark > *held[0].time() {
                        for cap in held.iter_mut() {
                            cap.downgrade(&watermark);
                        }
                    }
                    match status {
                        Status::More => activator.activate(),
                        _ => activator.activate_after(Duration::from_millis(
                            reader.params.idle_advance_ms.clamp(1, 50),
                        )),
                    }
                }
            }
        }
    });
    let (decoded, decode_control) = decode_stage(raw, &decode_def, decode_params);
    (records.concat(decoded), control.concat(decode_control))
}
