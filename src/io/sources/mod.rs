//! Sources: files (JSON lines, Segment messages, CSV for CRM, optionally
//! followed), TCP listeners, the HTTP collection endpoint, Kafka topics and
//! in-memory lines.
//!
//! A Kafka topic's partitions are spread over all workers as a file's
//! ranges are, each with its own clock, but a worker reads all of its
//! partitions at once (they may be live) and holds its capability at their
//! least watermark (see [`kafka`]).
//!
//! A file of lines (JSON or Segment; not followed) is cut into [`FileRange`]s at line
//! boundaries (`[engine] file_range_bytes`; the cut depends on the file and
//! that size only) and read by all workers, range `i` by worker `(source
//! index + i) mod workers`, each range with its own clock; every line is
//! decoded once, where it is read. Any other source is read by one worker,
//! its *owner* (source index modulo the number of workers), which peeks at
//! each line's time and checks it against the source's watermark in input
//! order, and sends the line to be decoded on a worker chosen by line
//! number (Segment messages and CSV rows are decoded where they are read:
//! a line may be several records). Either way "late" is a property of the input, not of the
//! cluster's shape: `-w 1`, `-w 4` and `-n 2` admit the same records. The
//! records are then exchanged by key to all workers for the rest of the
//! flow.
//!
//! ## Event time
//!
//! The reader (owner, or range) offers each record's event time, in input
//! order, to its [`SourceClock`] (the rule, its glossary and a worked example are
//! in [`crate::time`]): it says whether the record is on time, late or
//! future, and where the source's watermark is. The source holds its timely
//! capability at the watermark, so downstream times below it are complete.
//! A finite input drops its capability at the end. A TCP source wakes its
//! worker as soon as a line arrives; a followed file is polled every few
//! milliseconds; while nothing arrives, a live source is scheduled again
//! when its idle watermark would next move.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::probe::Handle;
use timely::dataflow::operators::Concat;
use timely::dataflow::{Scope, Stream};

use timely::scheduling::SyncActivator;

use crate::io::{Abort, Control, DeadLetter};
use crate::model::formats::{self, ga4, segment};
use crate::model::limits::{check_summed_fields, SummedField};
use crate::model::{
    decode_csv_as, decode_json_projected, parse_csv_header, DecodeError, IdentityRules, Projection,
    Record, RecordKind,
};
use crate::spec::{Format, TimeUnit};
use crate::time::{wall_clock_ms, SourceClock, Time, TimeConfig};

pub mod decode;
pub mod http;
pub mod kafka;
pub mod lines;
pub mod progress;
pub mod tcp;

pub use progress::{Progress, Resume, ResumePoint};

use decode::{decode_stage, peek_time, RawLine};
use lines::{FileLines, FileRange, LineSource, MemoryLines, Next, RangeLines};

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
    /// An HTTP collection endpoint compatible with the Segment HTTP API
    /// (`http://host:port`; see [`http`]).
    Http {
        /// Address to listen on.
        addr: String,
        /// The write key requests must carry, if any.
        write_key: Option<String>,
    },
    /// A Kafka topic (`kafka://HOST:PORT/TOPIC[?group=NAME&until=end]`;
    /// see [`kafka`]): its partitions read by all workers.
    Kafka(kafka::KafkaInput),
    /// Lines held in memory.
    Memory(Arc<Vec<String>>),
}

impl Input {
    /// Parses a command-line location: `tcp://ADDR`, `http://ADDR`,
    /// `kafka://HOST:PORT/TOPIC[?..]` or a file path; `write_key` is for an
    /// `http://` input. (What is wrong with a Kafka location is said when
    /// the run starts: [`kafka::KafkaInput::problem`].)
    pub fn parse(
        location: &str,
        follow: bool,
        until_disconnect: bool,
        write_key: Option<String>,
    ) -> Input {
        if let Some(addr) = location.strip_prefix("tcp://") {
            Input::Tcp {
                addr: addr.to_string(),
                until_disconnect,
            }
        } else if let Some(rest) = location.strip_prefix("kafka://") {
            Input::Kafka(kafka::KafkaInput::parse(rest))
        } else if let Some(addr) = location.strip_prefix("http://") {
            Input::Http {
                addr: addr.trim_end_matches('/').to_string(),
                write_key,
            }
        } else {
            Input::File {
                path: PathBuf::from(location),
                follow,
            }
        }
    }

    /// How the input is named in dead letters and messages.
    pub fn describe(&self) -> String {
        match self {
            Input::File { path, .. } => path.display().to_string(),
            Input::Tcp { addr, .. } => format!("tcp://{addr}"),
            Input::Http { addr, .. } => format!("http://{addr}"),
            Input::Kafka(k) => k.describe(),
            Input::Memory(_) => "memory".to_string(),
        }
    }

    /// Whether the input is a socket (TCP or HTTP): its lines cannot be
    /// read again; after a restart its clients send again.
    pub fn is_socket(&self) -> bool {
        matches!(self, Input::Tcp { .. } | Input::Http { .. })
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
    /// For a (not followed) file of JSON lines: its ranges
    /// ([`lines::file_ranges`]), cut once per process before the run, read
    /// by all workers.
    pub ranges: Option<Arc<Vec<FileRange>>>,
}

/// Reading parameters shared by all sources.
#[derive(Clone, Debug)]
pub struct ReadParams {
    /// Tick, lateness, idleness, future skew, late policy.
    pub time: TimeConfig,
    /// Longest accepted line in bytes.
    pub max_line_bytes: usize,
    /// Size of the ranges a file of JSON lines is read in by all workers.
    pub file_range_bytes: u64,
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
    /// A run resumed from a checkpoint's retained input: where the ranges
    /// of replayed files start again, and the cut before which admitted
    /// records are dropped (see [`progress`]).
    pub resume: Option<Arc<Resume>>,
    /// Where the readers of ranges record their points, for the
    /// checkpoints of a run with state.
    pub progress: Option<Arc<Progress>>,
}

impl ReadParams {
    /// Records admitted at a tick before this are in the checkpoint the
    /// run resumed from, and are dropped (0 without one).
    fn restored_before(&self) -> Time {
        self.resume.as_ref().map_or(0, |r| r.before)
    }

    /// Every dead letter of an earlier time is in the outputs of the run
    /// the checkpoint is from (0 without one): see [`Resume::dead_bound`].
    fn restored_dead_bound(&self) -> Time {
        self.resume.as_ref().map_or(0, |r| r.dead_bound)
    }
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
    /// A graceful shutdown ended the input before its end.
    Cut,
    /// Reading failed (an input that opened but cannot be read): the run
    /// stops with this reason.
    Failed(String),
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
    reported_clock: (Option<Time>, Option<Time>),
    /// The input's position at the last [`Control::Stats`]: the bytes
    /// consumed since are reported with the next.
    reported_position: u64,
    stats: (u64, u64, u64, u64, u64),
    /// Decode every line here, in one pass (a [`FileRange`] of a file read
    /// by several workers), instead of peeking at its time and sending it to
    /// be decoded on another worker.
    local_decode: bool,
    /// No record of this reader is earlier (a range's bound): the least time
    /// its dead letters are written at.
    floor: Time,
    /// The first byte of the range read (which names it for
    /// [`Progress`]); `None` for other inputs.
    range_start: Option<u64>,
    /// The largest tick admitted and the latest dead-letter time so far in
    /// the range (see [`ResumePoint`]).
    max_tick: Option<Time>,
    max_dead: Option<Time>,
    /// A restored followed file: from this offset on, a line with a time
    /// before the checkpoint's cut was read, in the runs that took it, with
    /// the watermark past the cut, or never read: it is late, not held
    /// ([`ResumePoint::late_from`]).
    late_from: Option<u64>,
    /// A restored followed file: from this offset on, the run that took the
    /// checkpoint read nothing ([`ResumePoint::read_to`]), so the dead
    /// letters of these lines are written at the outputs' dead-letter bound
    /// or later (earlier ones a resumed run leaves out, as already written).
    read_to: Option<u64>,
    /// A socket of a restored run: its lines before the cut are late.
    socket_restored: bool,
    /// Where the message being admitted is in its line (`batch[2]`), for
    /// the reasons of its dead letters (late, future).
    message_label: Option<String>,
}

impl Reader {
    /// A reader of one range of a (not followed) file of JSON lines.
    /// Starts at `point` (a resumed run's) with the clock it had there,
    /// else at the range's start.
    fn open_range(
        def: SourceDef,
        params: Arc<ReadParams>,
        path: &std::path::Path,
        range: FileRange,
        floor: Time,
        point: Option<ResumePoint>,
    ) -> std::io::Result<Reader> {
        let from = match point {
            Some(p) => FileRange {
                start: p.offset,
                end: range.end.max(p.offset),
                first_line: p.line,
            },
            None => range,
        };
        // A read buffer no larger than the range (at most 1 MiB).
        let buffer = (from.end - from.start).clamp(4096, 1 << 20) as usize;
        let lines = Box::new(RangeLines::with_buffer(
            path,
            from,
            params.max_line_bytes,
            buffer,
        )?);
        let mut reader = Reader::new(def, params, lines, true, floor);
        reader.range_start = Some(range.start);
        if let Some(p) = point {
            reader.continue_from(&p);
        }
        Ok(reader)
    }

    /// A reader of one partition of a Kafka topic (opened at `point` if
    /// the run resumed with one): its records are decoded here, and its
    /// points are recorded under the partition's number, the first one at
    /// once (where a restart may resume before any record is read).
    fn open_kafka(def: SourceDef, params: Arc<ReadParams>, lines: kafka::PartitionLines) -> Reader {
        let partition = lines.partition();
        let point = params
            .resume
            .as_ref()
            .and_then(|r| r.point(&def.name, partition as u64));
        let mut reader = Reader::new(def, params, Box::new(lines), true, Time::default());
        reader.input_name = format!("{} (partition {partition})", reader.input_name);
        reader.range_start = Some(partition as u64);
        if let Some(p) = point {
            reader.continue_from(&p);
        }
        reader.record_progress();
        reader
    }

    /// Continues from `point` (its lines are opened there): the clock and
    /// the range's latest times as they were.
    fn continue_from(&mut self, point: &ResumePoint) {
        let live = self.lines.is_live();
        self.clock = SourceClock::restored(self.params.time, point.clock, live, wall_clock_ms());
        self.max_tick = point.max_tick;
        self.max_dead = point.max_dead;
        // Only an input that grows (a followed file, a Kafka partition; a
        // replayed range is read as it was).
        let grows = self.lines.grows();
        self.late_from = point.late_from.filter(|_| grows);
        self.read_to = point.read_to.filter(|_| grows);
    }

    /// Notes that the line at `offset` is read next: once it is past what
    /// the run that took the checkpoint read, dead letters are written at
    /// the checkpoint's dead-letter bound or later ([`Reader::read_to`]).
    fn reached(&mut self, offset: u64) {
        if self.read_to.is_some_and(|to| offset >= to) {
            self.read_to = None;
            self.floor = self.floor.max(self.params.restored_dead_bound());
        }
    }

    /// Records in [`ReadParams::progress`] that every line before the
    /// next one has been read (a range's reader only).
    fn record_progress(&self) {
        let (Some(progress), Some(start)) = (&self.params.progress, self.range_start) else {
            return;
        };
        let Some((offset, line)) = self.lines.resume_at() else {
            return;
        };
        progress.record(
            self.def.index,
            ResumePoint {
                start,
                offset,
                line,
                clock: self.clock.state(),
                max_tick: self.max_tick,
                max_dead: self.max_dead,
                bytes: self.lines.resume_check(offset),
                late_from: None,
                read_to: None,
            },
        );
    }

    /// Whether a record admitted at `tick` goes into the dataflow: not if
    /// the checkpoint the run resumed from holds it (counted as held).
    fn keeps(&mut self, tick: Time) -> bool {
        let keep = tick >= self.params.restored_before();
        self.stats.4 += u64::from(!keep);
        keep
    }

    /// A reader of `lines`, with a fresh clock (live if the lines are).
    fn new(
        def: SourceDef,
        params: Arc<ReadParams>,
        lines: Box<dyn LineSource>,
        local_decode: bool,
        floor: Time,
    ) -> Reader {
        let input_name = def.input.describe();
        let clock = SourceClock::new(params.time, lines.is_live(), wall_clock_ms());
        let reported_position = lines.position();
        Reader {
            def,
            params,
            lines,
            input_name,
            headers: Default::default(),
            clock,
            reported_clock: (None, None),
            reported_position,
            stats: (0, 0, 0, 0, 0),
            local_decode,
            floor,
            range_start: None,
            max_tick: None,
            max_dead: None,
            late_from: None,
            read_to: None,
            socket_restored: false,
            message_label: None,
        }
    }

    fn open(
        def: SourceDef,
        params: Arc<ReadParams>,
        waker: Option<SyncActivator>,
    ) -> std::io::Result<Reader> {
        let limit = params.max_line_bytes;
        // A followed file of lines (not CSV) is one range, from byte 0, with
        // resume points as a replayed file's ranges have (see `progress`).
        let followed =
            matches!(def.input, Input::File { follow: true, .. }) && def.format != Format::Csv;
        let mut point = followed
            .then(|| params.resume.as_ref()?.point(&def.name, 0))
            .flatten();
        let lines: Box<dyn LineSource> = match &def.input {
            Input::File { path, follow } => {
                let resumed = match point {
                    Some(p) => FileLines::follow_from(path, limit, p.offset, p.line, p.bytes)?,
                    None => None,
                };
                // A followed file replaced since its point was taken
                // (rotated or truncated while no engine ran) is read from
                // its start, as when that happens during a run.
                if let (Some(p), None) = (point, &resumed) {
                    tracing::warn!(
                        "followed file {} is not the file the checkpoint read {} bytes of (it was rotated or truncated since): reading it from its start; its records before the checkpoint's cut are dropped. Lines of the old file after its byte {} are not read (they were not in the checkpoint): they are missing from this run's results",
                        path.display(),
                        p.offset,
                        p.offset
                    );
                    point = None;
                }
                match resumed {
                    Some(lines) => Box::new(lines),
                    None => Box::new(FileLines::open(path, *follow, limit, def.format.into())?),
                }
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
            Input::Http { addr, write_key } => Box::new(http::HttpLines::listen(
                addr,
                write_key.clone(),
                limit,
                waker,
            )?),
            Input::Memory(lines) => Box::new(MemoryLines::new(Arc::clone(lines), limit)),
            Input::Kafka(_) => unreachable!("a Kafka topic is read by partitions (open_parts)"),
        };
        let socket = def.input.is_socket();
        let mut reader = Reader::new(def, params, lines, false, Time::default());
        if followed {
            reader.range_start = Some(0);
        }
        if socket && reader.params.resume.is_some() {
            reader.socket_restored = true;
            // The run that took the checkpoint read none of these lines:
            // their dead letters are written at the outputs' dead-letter
            // bound or later (earlier ones count as written already).
            reader.floor = reader.params.restored_dead_bound();
            // Its clients send again what the checkpoint does not hold:
            // their lines are on time if they come, oldest first, within
            // the allowed lateness of this start (see `SourceClock`).
            let wait = reader.params.time.restored_socket_wait_ms();
            reader
                .clock
                .wait_for_first_line(wall_clock_ms().saturating_add(wait));
        }
        if let Some(p) = point {
            reader.continue_from(&p);
        }
        Ok(reader)
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
        let reason = match &self.message_label {
            Some(label) => format!("{label}: {reason}"),
            None => reason,
        };
        let letter = DeadLetter::new(
            &self.def.name,
            &self.input_name,
            peer.as_deref(),
            line,
            offset,
            reason,
            raw,
        );
        let at = self.clock.watermark().max(self.floor);
        self.max_dead = self.max_dead.max(Some(at));
        ctl.push(Control::Dead(letter, at));
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
        if matches!(self.def.format, Format::Segment | Format::Ga4) {
            return self.decode_messages(text, &bytes, line, offset, peer, now_ms, out, ctl);
        }
        if self.local_decode {
            return self.decode_here(text, &bytes, line, offset, now_ms, out, ctl);
        }
        // JSON lines: peek at the time here, decode in full on some worker.
        if self.def.format == Format::Jsonl {
            if let Some(ms) = peek_time(self.def.kind, text, self.def.time_unit) {
                let Some(tick) = self.admit(ms, now_ms, line, offset, &peer, &bytes, ctl) else {
                    return;
                };
                if !self.keeps(tick) {
                    return;
                }
                let text = text.to_string();
                let read_at = self.clock.watermark().max(self.floor);
                // If it does not decode, the decoding worker dead-letters
                // it at `read_at`: a resume point after it waits for that.
                self.max_dead = self.max_dead.max(Some(read_at));
                raw.push(RawLine {
                    line,
                    offset,
                    tick,
                    read_at,
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
            Format::Segment | Format::Ga4 => unreachable!("decoded by decode_messages above"),
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
        if self.keeps(tick) {
            self.stats.1 += 1;
            out.push((record, tick, 1));
        }
    }

    /// Decodes a line of a standard event format (Segment, GA4) where it is
    /// read: each message (a line may hold several: a batch, a payload's
    /// events) is offered to the clock at its event time and yields its
    /// records, or is a dead letter of its own, with the message's text and
    /// where it is in the line in the reason.
    #[allow(clippy::too_many_arguments)]
    fn decode_messages(
        &mut self,
        text: &str,
        bytes: &[u8],
        line: u64,
        offset: u64,
        peer: Option<String>,
        now_ms: u64,
        out: &mut Vec<(Record, Time, isize)>,
        ctl: &mut Vec<Control>,
    ) {
        let messages = match format_messages(&self.def, &self.params, text) {
            Ok(m) => m,
            Err(e) => return self.dead(ctl, line, offset, peer, e.to_string(), bytes),
        };
        for m in messages {
            let raw = m.raw.as_ref().map_or(bytes, |r| r.as_bytes());
            let decoded = match m.decoded {
                Ok(d) => d,
                Err(e) => {
                    self.dead(ctl, line, offset, peer.clone(), e.to_string(), raw);
                    continue;
                }
            };
            self.message_label = m.label;
            let admitted = self.admit(decoded.ts_ms, now_ms, line, offset, &peer, raw, ctl);
            self.message_label = None;
            let Some(tick) = admitted else {
                continue;
            };
            if self.keeps(tick) {
                self.stats.1 += decoded.records.len() as u64;
                out.extend(decoded.records.into_iter().map(|r| (r, tick, 1)));
            }
        }
    }

    /// Decodes a JSON line in one pass and offers its time to the clock,
    /// with the outcomes of peeking first: a line whose time can be read
    /// moves the clock (and is late if behind it) whether or not the rest
    /// decodes; only a line that fails to decode is peeked at.
    #[allow(clippy::too_many_arguments)]
    fn decode_here(
        &mut self,
        text: &str,
        bytes: &[u8],
        line: u64,
        offset: u64,
        now_ms: u64,
        out: &mut Vec<(Record, Time, isize)>,
        ctl: &mut Vec<Control>,
    ) {
        let decoded = decode_json_projected(
            self.def.kind,
            text,
            &self.params.rules,
            self.def.time_unit,
            &self.params.projection,
        );
        match decoded {
            Ok(record) => {
                let Some(tick) =
                    self.admit(record.ts_ms(), now_ms, line, offset, &None, bytes, ctl)
                else {
                    return;
                };
                if let Err(reason) = check_summed_fields(&record, &self.params.summed) {
                    return self.dead(ctl, line, offset, None, reason, bytes);
                }
                if self.keeps(tick) {
                    self.stats.1 += 1;
                    out.push((record, tick, 1));
                }
            }
            Err(e) => {
                if let Some(ms) = peek_time(self.def.kind, text, self.def.time_unit) {
                    if self
                        .admit(ms, now_ms, line, offset, &None, bytes, ctl)
                        .is_none()
                    {
                        return;
                    }
                }
                self.dead(ctl, line, offset, None, e.to_string(), bytes);
            }
        }
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
        let before = self.params.restored_before();
        // A socket's line from before the cut of the checkpoint its run
        // restored: the run that wrote the checkpoint committed every time
        // before the cut, so the line is late, whatever the clock says of
        // it now; a dead letter, never dropped unseen. (Clients send again
        // from the cut on: a line sent again from before it is in the
        // checkpoint already, and its dead letter says so.)
        if self.socket_restored && self.params.time.floor(u64::try_from(ms).unwrap_or(0)) < before {
            self.stats.3 += 1;
            let reason = format!(
                "late: event time {ms} ms is before {before} ms, the cut of the checkpoint this run resumed from: every time before it was written when the checkpoint was taken (a line sent again from before the cut is in it already; send again from the cut on)"
            );
            self.dead(ctl, line, offset, peer.clone(), reason, bytes);
            return None;
        }
        let admission = self.clock.admit(ms, now_ms);
        if let (Some(tick), Some(from)) = (admission.time(), self.late_from) {
            if tick < before && offset >= from {
                // Read after the cut was decided, in the run the checkpoint
                // is from: late there (see `late_from`).
                self.stats.3 += 1;
                let reason = format!(
                    "late: event time {ms} ms is before {before} ms, the cut of the checkpoint this run resumed from: every time before it was written when the checkpoint was taken, and this line was not in it"
                );
                self.dead(ctl, line, offset, peer.clone(), reason, bytes);
                return None;
            }
        }
        self.max_tick = self.max_tick.max(admission.time());
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
                return Status::Cut;
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
                    self.reached(offset);
                    self.handle_line(bytes, line, offset, peer, now_ms, out, raw, ctl);
                }
                Ok(Next::TooLong {
                    line,
                    offset,
                    len,
                    peer,
                }) => {
                    self.clock.activity(now_ms);
                    self.reached(offset);
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
                    status = Status::Failed(e.to_string());
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
        if matches!(status, Status::Idle) && self.lines.may_idle() {
            self.clock.idle(now_ms);
        }
        let (lines, records, dead, late, held) = std::mem::take(&mut self.stats);
        if lines + records + dead + late + held > 0 {
            let position = self.lines.position();
            ctl.push(Control::Stats {
                source: self.def.index,
                lines,
                records,
                dead,
                late,
                held,
                bytes: position.saturating_sub(self.reported_position),
            });
            self.reported_position = position;
            ctl.push(Control::Offset {
                source: self.def.index,
                offset: self.lines.position(),
            });
        }
        self.record_progress();
        let clock = (self.clock.clock(), self.clock.admitted());
        if clock != self.reported_clock {
            if let Some(tick) = clock.0 {
                ctl.push(Control::Clock {
                    source: self.def.index,
                    tick,
                    admitted: clock.1,
                });
            }
            self.reported_clock = clock;
        }
        status
    }

    /// The control messages of this reader, stopped by a graceful
    /// shutdown while its part's capability is at `capability`: that it
    /// stopped, and where it is cut ([`Reader::cut_at`]).
    fn stopped(&self, capability: Time, ctl: &mut Vec<Control>) {
        ctl.push(Control::Stopped {
            source: self.def.index,
        });
        if let Some(watermark) = self.cut_at(capability) {
            ctl.push(Control::Cut {
                source: self.def.index,
                watermark,
                live: self.lines.is_live(),
            });
        }
    }

    /// Where a graceful shutdown cuts this reader, whose part's capability
    /// is at `capability`: the least time not committed (see
    /// [`Control::Cut`]), or `None` (a live input of a run without state:
    /// everything read is committed).
    ///
    /// A replay cut short: what it would still have produced starts at its
    /// capability, so times before it are final and later ones are not
    /// committed (see `Completion::observe_cut`). A live input of a run
    /// with state (which a restart resumes): clients may still be sending
    /// lines of the tick in progress (the wall clock's, or the newest
    /// line's if earlier), so that tick is not committed. The next run
    /// reads a followed file's lines (a Kafka partition's records) of it
    /// again from the resume point, with those appended meanwhile; a
    /// socket's clients send again from the cut on, and the lines of that
    /// tick still unread in the socket when the run stopped are among them.
    /// Without state, what was read is all there is, and all of it is
    /// committed.
    fn cut_at(&self, capability: Time) -> Option<Time> {
        if !self.lines.is_live() {
            Some(capability)
        } else if self.params.progress.is_some() {
            // Never before the cut of the checkpoint the run resumed
            // from: that one holds every earlier time.
            let now = self.params.time.floor(wall_clock_ms());
            let cut = self.max_tick.map_or(now, |newest| newest.min(now));
            Some(cut.max(self.params.restored_before()))
        } else {
            None
        }
    }

    /// When to look at the source again while it has nothing to read.
    fn idle_wakeup(&self) -> Duration {
        let now = wall_clock_ms();
        let mut wait = self.clock.next_idle_move_in(now).unwrap_or(FILE_POLL_MS);
        if !self.lines.wakes_on_input() {
            wait = wait.min(FILE_POLL_MS);
        }
        if self.params.shutdown.is_some() {
            // A stop request is noticed here, however long the idle
            // advance: a live source that nothing wakes would otherwise
            // sleep through it.
            wait = wait.min(SHUTDOWN_CHECK_MS);
        }
        Duration::from_millis(wait.max(1))
    }
}

/// How often, at the least, an idle live source looks at the shutdown
/// flag, milliseconds.
const SHUTDOWN_CHECK_MS: u64 = 200;

/// Sends `data`, if any, at `cap`, and leaves it empty.
fn give<D: Clone + 'static>(
    out: &mut OutputBuilder<Time, CapacityContainerBuilder<Vec<D>>>,
    cap: &timely::dataflow::operators::Capability<Time>,
    data: &mut Vec<D>,
) {
    if !data.is_empty() {
        // In containers of the builder's size: handing over `data` itself
        // would leave it without capacity, and growing it back to a batch
        // of records at every step faulted in fresh (huge) pages.
        out.activate().session(cap).give_iterator(data.drain(..));
    }
}

/// How many records a worker's reader of a replayed input may have read
/// that the stages downstream could take but have not finished: beyond
/// it, the reader waits. Without a bound a replay reads its whole input
/// long before the stages get to it (in a tenth of the run), and holds it
/// all in memory, in flight.
const READ_AHEAD_RECORDS: usize = 65_536;

/// What a source's reader has read that the stages downstream have not
/// finished: per read step, the latest time of its records and how many
/// there were. Records at or after the source's own capability are not
/// counted: they cannot finish before the source reads further (waiting
/// for them would never end), so the source that holds the stages back
/// always reads on.
#[derive(Default)]
struct ReadAhead {
    steps: VecDeque<(Time, usize)>,
}

impl ReadAhead {
    /// Notes the times of the records of one read step.
    fn read(&mut self, times: impl Iterator<Item = Time>) {
        let (mut latest, mut n) = (0, 0);
        for t in times {
            latest = latest.max(t);
            n += 1;
        }
        if n > 0 {
            self.steps.push_back((latest, n));
        }
    }

    /// Whether the records read before `capability` that the stages
    /// behind `downstream` have not finished reach [`READ_AHEAD_RECORDS`].
    fn full(&mut self, downstream: &Handle<Time>, capability: Time) -> bool {
        self.full_at(downstream.with_frontier(|f| f.first().copied()), capability)
    }

    /// As [`ReadAhead::full`], for the stages' frontier `frontier` (`None`:
    /// they have finished).
    fn full_at(&mut self, frontier: Option<Time>, capability: Time) -> bool {
        let Some(frontier) = frontier else {
            self.steps.clear();
            return false;
        };
        self.steps.retain(|&(latest, _)| latest >= frontier);
        let waiting: usize = self
            .steps
            .iter()
            .filter(|&&(latest, _)| latest < capability)
            .map(|&(_, n)| n)
            .sum();
        waiting >= READ_AHEAD_RECORDS
    }
}

/// Ranges of a file a worker may finish in one activation.
const RANGES_PER_ACTIVATION: usize = 64;

/// What one worker reads of a source: one reader, or one range of a file
/// (opened when its turn comes).
struct Part {
    reader: Option<Reader>,
    range: Option<FileRange>,
    /// No record of this part is ever earlier: the watermark its clock has
    /// after its first admitted record (the tick of the first line whose
    /// time reads, minus the allowed lateness).
    bound: Time,
    /// The least bound of this part and every part after it.
    rest: Time,
    /// Whether the part reads to the end of its input (the last range of a
    /// file, or a whole input).
    last: bool,
}

/// The parts of source `def` that worker `index` of `peers` reads. A (not
/// followed) file of JSON lines is cut into [`FileRange`]s read by all
/// workers, range `i` by worker `(source index + i) % peers`, each with its
/// own clock: every line is decoded where it is read, once, and the late
/// records of a range are those behind that range's own clock, so the
/// result does not depend on the number of workers. Any other input is
/// read by one worker (source index modulo workers).
fn open_parts(
    def: &SourceDef,
    params: &Arc<ReadParams>,
    index: usize,
    peers: usize,
    waker: SyncActivator,
) -> std::io::Result<VecDeque<Part>> {
    let owner = def.index as usize % peers;
    if let (Some(ranges), Input::File { path, .. }) = (&def.ranges, &def.input) {
        let mut parts = VecDeque::new();
        for (i, &range) in ranges.iter().enumerate() {
            if (owner + i) % peers != index {
                continue;
            }
            let bound = range_bound(def, params, path, range)?;
            parts.push_back(Part {
                reader: None,
                range: Some(range),
                bound,
                rest: bound,
                last: i + 1 == ranges.len(),
            });
        }
        let mut least = Time::MAX;
        for part in parts.iter_mut().rev() {
            least = least.min(part.bound);
            part.rest = least;
        }
        return Ok(parts);
    }
    if let Input::Kafka(input) = &def.input {
        let partitions = kafka::open_partitions(
            input,
            &def.name,
            def.index,
            index,
            peers,
            params.resume.as_deref(),
            params.progress.as_ref(),
            params.max_line_bytes,
            waker,
        )?;
        return Ok(partitions
            .into_iter()
            .map(|lines| Part {
                reader: Some(Reader::open_kafka(def.clone(), Arc::clone(params), lines)),
                range: None,
                bound: Time::default(),
                rest: Time::default(),
                last: false,
            })
            .collect());
    }
    if index != owner {
        return Ok(VecDeque::new());
    }
    let reader = Reader::open(def.clone(), Arc::clone(params), Some(waker))?;
    Ok(VecDeque::from([Part {
        reader: Some(reader),
        range: None,
        bound: Time::default(),
        rest: Time::default(),
        last: true,
    }]))
}

/// The least time the ranges of `def`'s file that start at or after byte
/// `from` can produce (`None` if there are none, or the input is not read
/// in ranges): how early lines appended to the file since it was `from`
/// bytes long may reach the dataflow.
pub fn earliest_time_from(
    def: &SourceDef,
    params: &ReadParams,
    from: u64,
) -> std::io::Result<Option<Time>> {
    let (Some(ranges), Input::File { path, .. }) = (&def.ranges, &def.input) else {
        return Ok(None);
    };
    let mut least: Option<Time> = None;
    for range in ranges.iter().filter(|r| r.start >= from && r.end > r.start) {
        let bound = range_bound(def, params, path, *range)?;
        least = Some(least.map_or(bound, |l| l.min(bound)));
    }
    Ok(least)
}

/// The messages of a line of a standard event format (Segment, GA4), each
/// decoded and its summed fields checked, as the reader takes them.
fn format_messages(
    def: &SourceDef,
    params: &ReadParams,
    text: &str,
) -> Result<Vec<formats::Message>, DecodeError> {
    let (rules, projection) = (&params.rules, &params.projection);
    let mut messages = match def.format {
        Format::Ga4 => ga4::decode(text, rules, projection)?,
        _ => segment::decode(text, rules, def.time_unit, projection)?,
    };
    for m in &mut messages {
        let label = &m.label;
        if let Ok(d) = &m.decoded {
            let failed = d.records.iter().find_map(|r| {
                check_summed_fields(r, &params.summed).err().map(|reason| {
                    let at = label.as_ref().map(|l| format!("{l}: ")).unwrap_or_default();
                    DecodeError::new(format!("{at}{reason}"))
                })
            });
            if let Some(e) = failed {
                m.decoded = Err(e);
            }
        }
    }
    Ok(messages)
}

/// The event times a reader offers its clock for a line, in order: a JSON
/// line's decoded time, else its peeked one (as `Reader::decode_here`
/// reads it); each decoded message of a standard format's line.
fn line_times(def: &SourceDef, params: &ReadParams, text: &str) -> Vec<i64> {
    match def.format {
        Format::Segment | Format::Ga4 => format_messages(def, params, text)
            .map(|ms| {
                ms.into_iter()
                    .filter_map(|m| m.decoded.ok().map(|d| d.ts_ms))
                    .collect()
            })
            .unwrap_or_default(),
        _ => {
            let decoded = decode_json_projected(
                def.kind,
                text,
                &params.rules,
                def.time_unit,
                &params.projection,
            );
            match decoded {
                Ok(record) => vec![record.ts_ms()],
                Err(_) => peek_time(def.kind, text, def.time_unit)
                    .into_iter()
                    .collect(),
            }
        }
    }
}

/// The least time a range can produce: the watermark of its clock after
/// the first line it admits (or the largest time if it admits none).
fn range_bound(
    def: &SourceDef,
    params: &ReadParams,
    path: &std::path::Path,
    range: FileRange,
) -> std::io::Result<Time> {
    let mut lines = RangeLines::with_buffer(path, range, params.max_line_bytes, 64 << 10)?;
    let mut clock = SourceClock::new(params.time, false, wall_clock_ms());
    loop {
        match lines.next_line()? {
            Next::Line { bytes, .. } => {
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    continue;
                };
                for ms in line_times(def, params, text) {
                    if clock.admit(ms, wall_clock_ms()).time().is_some() {
                        return Ok(clock.watermark());
                    }
                }
            }
            Next::TooLong { .. } => {}
            Next::Pending | Next::End => return Ok(Time::MAX),
        }
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
    downstream: Handle<Time>,
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
    let (scope_index, peers) = (scope.index(), scope.peers());
    let waker = scope.worker().sync_activator_for(info.address.to_vec());
    let decode_def = def.clone();
    let decode_params = Arc::clone(&params);

    builder.build(move |caps| {
        // One capability per output: records, raw lines, control.
        let mut caps: Option<Vec<_>> = Some(caps);
        let name = def.name.clone();
        let described = def.input.describe();
        let opened = open_parts(&def, &params, scope_index, peers, waker);
        let mut parts = match opened {
            Ok(parts) => parts,
            Err(e) => {
                abort.fail(format!("source `{name}`: cannot open {described}: {e}"));
                VecDeque::new()
            }
        };
        if parts.is_empty() {
            caps = None;
        } else {
            activator.activate();
        }
        let mut batch = Vec::new();
        let mut raw_batch = Vec::new();
        let mut ctl = Vec::new();
        let mut read_ahead = ReadAhead::default();
        let concurrent = matches!(def.input, Input::Kafka(_));
        let batch_interval = live_batch_interval(params.time.tick_ms);
        // When the last read of a live input ended with nothing left to
        // read (`None` while it drains a backlog).
        let mut caught_up_at: Option<Instant> = None;
        move |_frontiers| {
            let Some(held) = caps.as_mut() else { return };
            // A live input caught up is read again at most every batch
            // interval: its reader thread wakes the source for every
            // write a client makes, and each read that passes a few
            // records on costs a round of progress tracking through every
            // stage of the dataflow.
            if let Some(at) = caught_up_at {
                let since = at.elapsed();
                if since < batch_interval {
                    activator.activate_after(batch_interval - since);
                    return;
                }
            }

            // Graceful shutdown: the ranges not read yet are not read.
            let stopping = params
                .shutdown
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst));
            if stopping && parts.len() > 1 && !concurrent {
                parts.truncate(1);
            }
            if parts.is_empty() {
                return;
            }
            // A replay reads no further while the stages downstream lag
            // (see `ReadAhead`), nor does a Kafka topic (the broker keeps
            // what is not read yet); a live input is read as it arrives,
            // and a stop is not held up.
            let replay = concurrent
                || parts
                    .front()
                    .and_then(|p| p.reader.as_ref())
                    .is_none_or(|r| !r.lines.is_live());
            if replay && !stopping && read_ahead.full(&downstream, *held[0].time()) {
                // Looked at again soon; meanwhile the worker runs the
                // stages, or parks until a peer's progress arrives.
                activator.activate_after(Duration::from_millis(1));
                return;
            }
            if concurrent {
                // Every part (a Kafka partition) is read in each
                // activation, each with its own clock; the capability is
                // the least of their watermarks.
                let (mut more, mut wake) = (false, Duration::MAX);
                let mut i = 0;
                while i < parts.len() {
                    let reader = parts[i].reader.as_mut().expect("partitions are open");
                    let status = reader.step(&mut batch, &mut raw_batch, &mut ctl);
                    read_ahead.read(batch.iter().map(|(_, t, _)| *t));
                    give(&mut records_out, &held[0], &mut batch);
                    give(&mut raw_out, &held[1], &mut raw_batch);
                    match status {
                        Status::Failed(reason) => {
                            give(&mut control_out, &held[2], &mut ctl);
                            abort.fail(format!(
                                "source `{name}`: reading {}: {reason}",
                                reader.input_name
                            ));
                            caps = None;
                            return;
                        }
                        Status::Cut => {
                            reader.stopped(*held[0].time(), &mut ctl);
                            give(&mut control_out, &held[2], &mut ctl);
                            parts.remove(i);
                            continue;
                        }
                        Status::Finished => {
                            // A bounded topic's partition read to its end:
                            // records appended later are at or after its
                            // watermark (or late).
                            ctl.push(Control::Ended {
                                source: def.index,
                                watermark: reader.clock.watermark(),
                            });
                            give(&mut control_out, &held[2], &mut ctl);
                            parts.remove(i);
                            continue;
                        }
                        Status::More => more = true,
                        Status::Draining(wait) => wake = wake.min(wait),
                        Status::Idle => wake = wake.min(reader.idle_wakeup()),
                    }
                    give(&mut control_out, &held[2], &mut ctl);
                    i += 1;
                }
                if parts.is_empty() {
                    caps = None;
                    return;
                }
                let least = parts
                    .iter()
                    .filter_map(|p| p.reader.as_ref())
                    .map(|r| r.clock.watermark())
                    .min()
                    .unwrap_or_default();
                if least > *held[0].time() {
                    for cap in held.iter_mut() {
                        cap.downgrade(&least);
                    }
                }
                if more {
                    activator.activate();
                } else {
                    activator.activate_after(wake.min(Duration::from_secs(1)));
                }
                return;
            }
            // Several small ranges may be read in one activation (each
            // activation costs a round of progress tracking).
            let mut ranges_left = RANGES_PER_ACTIVATION;
            let status = loop {
                let part = parts.front_mut().expect("not empty");
                if part.reader.is_none() {
                    let range = part.range.expect("a part without a reader has a range");
                    let path = match &def.input {
                        Input::File { path, .. } => path.clone(),
                        _ => unreachable!("only files are read in ranges"),
                    };
                    let point = params
                        .resume
                        .as_ref()
                        .and_then(|r| r.point(&def.name, range.start));
                    match Reader::open_range(
                        def.clone(),
                        Arc::clone(&params),
                        &path,
                        range,
                        part.bound,
                        point,
                    ) {
                        Ok(r) => part.reader = Some(r),
                        Err(e) => {
                            abort.fail(format!("source `{name}`: cannot open {described}: {e}"));
                            caps = None;
                            return;
                        }
                    }
                }
                let reader = part.reader.as_mut().expect("opened above");
                let status = reader.step(&mut batch, &mut raw_batch, &mut ctl);
                read_ahead.read(
                    batch
                        .iter()
                        .map(|(_, t, _)| *t)
                        .chain(raw_batch.iter().map(|r| r.tick)),
                );
                give(&mut records_out, &held[0], &mut batch);
                give(&mut raw_out, &held[1], &mut raw_batch);
                give(&mut control_out, &held[2], &mut ctl);
                if let Status::Failed(reason) = &status {
                    abort.fail(format!("source `{name}`: reading {described}: {reason}"));
                    caps = None;
                    return;
                }
                if let Status::Cut = status {
                    reader.stopped(*held[0].time(), &mut ctl);
                    give(&mut control_out, &held[2], &mut ctl);
                    caps = None;
                    return;
                }
                if !matches!(status, Status::Finished) {
                    break status;
                }
                if part.last && !reader.lines.is_live() {
                    ctl.push(Control::Ended {
                        source: def.index,
                        watermark: reader.clock.watermark(),
                    });
                    give(&mut control_out, &held[2], &mut ctl);
                }
                parts.pop_front();
                if parts.is_empty() {
                    caps = None;
                    return;
                }
                ranges_left -= 1;
                if ranges_left == 0 {
                    break status;
                }
            };
            // The capability: the least time any part still to read may
            // produce (a part's bound until its clock has moved past it):
            // the part being read, and the least bound of those after it.
            let front = parts.front().expect("not empty");
            let current = front
                .reader
                .as_ref()
                .map_or(front.bound, |r| r.clock.watermark().max(front.bound));
            let least = current.min(parts.get(1).map_or(Time::MAX, |p| p.rest));
            if least > *held[0].time() {
                for cap in held.iter_mut() {
                    cap.downgrade(&least);
                }
            }
            let live = parts
                .front()
                .and_then(|p| p.reader.as_ref())
                .is_some_and(|r| r.lines.is_live());
            caught_up_at = match status {
                Status::More | Status::Finished => None,
                _ if live && !stopping => Some(Instant::now()),
                _ => None,
            };
            match status {
                Status::More | Status::Finished => activator.activate(),
                Status::Draining(wait) => activator.activate_after(wait),
                _ => {
                    let wait = parts
                        .front()
                        .and_then(|p| p.reader.as_ref())
                        .map_or(Duration::from_millis(1), |r| r.idle_wakeup());
                    activator.activate_after(wait)
                }
            }
        }
    });
    let (decoded, decode_control) = decode_stage(raw, &decode_def, decode_params);
    (records.concat(decoded), control.concat(decode_control))
}

/// How long a live input that has caught up waits before it is read
/// again (Flink's buffer timeout, `execution.buffer-timeout`, plays the
/// same part): a tenth of the tick, at most [`LIVE_BATCH_MAX`], none for a
/// tick under 10 ms. Records wait at most this long more before they
/// enter the dataflow; a backlog is read without waiting.
pub fn live_batch_interval(tick_ms: u64) -> Duration {
    Duration::from_millis(tick_ms / 10).min(LIVE_BATCH_MAX)
}

/// The longest [`live_batch_interval`].
pub const LIVE_BATCH_MAX: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::{ReadAhead, READ_AHEAD_RECORDS};

    /// A reader waits while the stages have not finished enough of what it
    /// read before its capability, and reads on as they finish it; what
    /// only the source itself can let finish (at or after its capability)
    /// never makes it wait.
    #[test]
    fn a_reader_waits_for_the_stages_only_on_what_they_can_finish() {
        let half = READ_AHEAD_RECORDS / 2;
        let mut ahead = ReadAhead::default();
        ahead.read((0..half).map(|i| 100 + (i % 10) as u64)); // latest 109
        ahead.read((0..half).map(|_| 200)); // latest 200
                                            // Both steps are before the capability and unfinished.
        assert!(ahead.full_at(Some(50), 300));
        // The capability is at 200: the second step cannot finish yet.
        assert!(!ahead.full_at(Some(50), 200));
        // The stages finished the first step (their frontier passed 109).
        assert!(!ahead.full_at(Some(110), 300));
        ahead.read((0..half).map(|_| 250));
        assert!(ahead.full_at(Some(110), 300));
        // The stages passed 200: only the third step is left.
        assert!(!ahead.full_at(Some(201), 300));
        // Finished stages: nothing waits.
        ahead.read((0..READ_AHEAD_RECORDS).map(|_| 260));
        assert!(!ahead.full_at(None, 300));
        assert!(ahead.steps.is_empty());
    }
}
