//! Sources and sinks: how records enter the dataflow and results leave it.
//!
//! Besides records, every source sends *control* messages ([`Control`]) to the
//! commit stage on worker 0: its event-time clock (the largest tick seen,
//! which bounds what may be written), its byte offset, counters, and the dead
//! letters of records it could not use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub mod kafka;
pub mod sinks;
pub mod sources;

/// A record that could not be used, with the reason and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The source name from the dataflow file (e.g. `web`).
    pub source: String,
    /// Where the source reads from: a file path, or `tcp://` and the peer.
    pub input: String,
    /// 1-based line number within the file or TCP connection.
    pub line: u64,
    /// Byte offset of the line's first byte within the file or connection.
    pub offset: u64,
    /// What is wrong, e.g. `missing field \`ts\``.
    pub reason: String,
    /// The line, lossily decoded and truncated to 1000 bytes.
    pub raw: String,
}

impl DeadLetter {
    /// Longest prefix of the line kept in [`DeadLetter::raw`].
    pub const RAW_LIMIT: usize = 1000;

    /// A dead letter for a line of `input` (a TCP `peer`, if any, is named
    /// after the listening address); keeps at most [`Self::RAW_LIMIT`] bytes
    /// of the line, decoded lossily.
    pub fn new(
        source: &str,
        input: &str,
        peer: Option<&str>,
        line: u64,
        offset: u64,
        reason: String,
        raw: &[u8],
    ) -> Self {
        let input = match peer {
            Some(p) => format!("{input} (peer {p})"),
            None => input.to_string(),
        };
        let raw = String::from_utf8_lossy(&raw[..raw.len().min(Self::RAW_LIMIT)]).into_owned();
        DeadLetter {
            source: source.to_string(),
            input,
            line,
            offset,
            reason,
            raw,
        }
    }
}

/// Messages from sources to the commit stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// The source's clock ([`crate::time::SourceClock::clock`]): the largest
    /// tick it has admitted, or an idle live source's watermark. Nothing
    /// later than the largest clock is committed
    /// ([`crate::time::Completion`]).
    Clock {
        /// Source index.
        source: u32,
        /// Tick in milliseconds.
        tick: u64,
        /// The largest tick of a record the source admitted (not moved by
        /// an idle live source's watermark), ms; what the API calls
        /// `read_until` (see [`crate::serve`]).
        admitted: Option<u64>,
    },
    /// A graceful shutdown ended a source before its input ended, at this
    /// watermark: only earlier times are committed. For a replayed source
    /// (a file that is not followed) it is the source's capability: every
    /// record it would still have admitted is at or after it, and the
    /// output is a prefix of that of an uninterrupted run. For a live
    /// source of a run with state it is the start of the tick in progress
    /// (the wall clock's, or the newest line's if earlier), whose lines
    /// clients may still be sending: the next run reads them (a followed
    /// file's from its resume point, a socket's from the clients, who send
    /// again from the cut).
    Cut {
        /// Source index.
        source: u32,
        /// The least time not committed, ms.
        watermark: u64,
        /// A live source's: its dead letters of later times are written
        /// all the same, and the next run does not read its lines again
        /// to write them (see the commit stage's end).
        live: bool,
    },
    /// A replayed source read its input to the end, where its clock's
    /// watermark was this: lines appended to it later are at or after it
    /// (or late), so a run resumed on the longer input writes every diff
    /// from there on (see [`crate::store::SinkPositions`]).
    Ended {
        /// Source index.
        source: u32,
        /// The watermark of the clock that read the input's end, ms.
        watermark: u64,
    },
    /// Bytes consumed so far (files) or lines read (sockets).
    Offset {
        /// Source index.
        source: u32,
        /// The offset.
        offset: u64,
    },
    /// Counter increments since the last report.
    Stats {
        /// Source index.
        source: u32,
        /// Lines read.
        lines: u64,
        /// Records decoded and admitted into the dataflow.
        records: u64,
        /// Lines sent to the dead-letter output (including late ones).
        dead: u64,
        /// Records older than the watermark.
        late: u64,
        /// Bytes of input consumed (files; lines for sockets).
        bytes: u64,
        /// Records dropped as held by the checkpoint a run restored (times
        /// before its cut).
        held: u64,
    },
    /// A dead letter to write, and the time it is written at (with the
    /// others of that time, sorted): the reading clock's watermark when it
    /// was found, never less than the message's own time. It depends on the
    /// input alone (a file range's own clock), not on which worker read it,
    /// so the dead-letter file is the same for any number of workers.
    Dead(DeadLetter, u64),
    /// A graceful shutdown (SIGTERM, Ctrl-C, or a stop of another process
    /// of the cluster) ended the source before its input ended: a replayed
    /// file before its end, or a live input. Reported in the run's summary
    /// ([`crate::io::sinks::SourceSummary::stopped`]).
    Stopped {
        /// Source index.
        source: u32,
    },
}

/// Why a run stopped before its inputs ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A failure of the engine itself (an output that cannot be written, a
    /// port in use, a worker that panicked), with its reason.
    Failed(String),
    /// The reader of standard output went away (`segflow run .. | head`):
    /// the run ends quietly.
    OutputClosed,
}

/// A run's stop switch, shared by every worker of a process: the first
/// failure is kept, and every worker leaves its loop when it is set.
#[derive(Debug, Default)]
pub struct Abort {
    stopped: AtomicBool,
    reason: Mutex<Option<Stop>>,
}

impl Abort {
    /// Stops the run with `stop`, unless it has already stopped (the first
    /// reason wins).
    pub fn stop(&self, stop: Stop) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            tracing::debug!(?stop, "run stopping");
            *reason = Some(stop);
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Stops the run with a failure.
    pub fn fail(&self, reason: impl Into<String>) {
        self.stop(Stop::Failed(reason.into()));
    }

    /// Whether the run has been stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Why the run stopped, if it did.
    pub fn reason(&self) -> Option<Stop> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
