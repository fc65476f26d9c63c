//! Framing of input bytes into records: JSON lines or CSV records, with a
//! length limit.
//!
//! A [`Framer`] cuts a byte stream into records incrementally, however the
//! stream arrives in chunks (files are read in large blocks, TCP delivers
//! whatever the network gives). It is shared by files, followed files and
//! each TCP connection, so all of them frame the same way:
//!
//! * **Byte-order mark.** A UTF-8 BOM (`EF BB BF`) at the very start of the
//!   stream (of a file, or of each TCP connection) is dropped, even when it
//!   arrives split over several chunks. Only the first three bytes of the
//!   stream are checked; a BOM anywhere else is data. The BOM still counts in
//!   byte offsets: the first record of a file that starts with a BOM has
//!   offset 3.
//! * **Lines** ([`Framing::Lines`], JSON lines): a record ends at `\n`; a
//!   `\r` just before it is dropped. A lone `\r` is data.
//! * **CSV** ([`Framing::Csv`]): record boundaries are exactly those of the
//!   `csv` crate (RFC 4180 with its usual leniency), found with its own push
//!   parser, `csv-core`: a quoted field may hold commas, doubled quotes and
//!   line breaks, so one record may span several lines. `\n`, `\r\n` and a
//!   lone `\r` end a record; empty lines between records are skipped. A
//!   record's bytes (without its terminator) are handed on whole, to be
//!   parsed by [`crate::model::decode_csv`]. An unclosed quote runs to the
//!   end of the input, as in the `csv` crate.
//!
//! Every record carries its 1-based line number (1 + the number of `\n`
//! bytes before its first byte) and the byte offset of its first byte, both
//! true positions in the stream, so a dead letter points at the record even
//! after multi-line CSV records.
//!
//! A record longer than the configured limit is not buffered whole: its
//! bytes past the limit are skipped and it is reported as [`Next::TooLong`],
//! so one bad record cannot exhaust memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use crate::spec::Format;

/// The next thing a line source has to offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A complete record (a line, or a CSV record that may span lines)
    /// without its terminator.
    Line {
        /// The bytes (possibly invalid UTF-8).
        bytes: Vec<u8>,
        /// 1-based line number of the record's first byte.
        line: u64,
        /// Byte offset of the record's first byte.
        offset: u64,
        /// The peer for socket sources.
        peer: Option<String>,
    },
    /// A record longer than the limit; its content was skipped.
    TooLong {
        /// 1-based line number of the record's first byte.
        line: u64,
        /// Byte offset of the record's first byte.
        offset: u64,
        /// Its length in bytes (without its terminator).
        len: u64,
        /// The peer for socket sources.
        peer: Option<String>,
    },
    /// Nothing now; a live source may have more later.
    Pending,
    /// The input has ended.
    End,
}

/// Anything that yields lines.
pub trait LineSource {
    /// The next line, or `Pending`/`End`.
    fn next_line(&mut self) -> io::Result<Next>;
    /// Bytes consumed so far (or lines, for sockets).
    fn position(&self) -> u64;
    /// Whether the source is live (its clock follows the wall clock when idle).
    fn is_live(&self) -> bool;
    /// Whether the source wakes its worker when input arrives (otherwise a
    /// live source is polled).
    fn wakes_on_input(&self) -> bool {
        false
    }
    /// Whether nothing to read now means nothing was sent: a live source
    /// whose input is behind (a Kafka partition not yet caught up with its
    /// end, its next records on their way from the broker) must not go
    /// idle, or its watermark would follow the wall clock past records
    /// still to come.
    fn may_idle(&self) -> bool {
        true
    }
    /// Whether records may be appended to what was read (a followed file,
    /// a Kafka partition): a resumed reader judges those appended after
    /// the checkpointed run read as that run would have (see
    /// [`super::progress::ResumePoint::late_from`]).
    fn grows(&self) -> bool {
        self.is_live()
    }
    /// Where the next line starts, `(byte offset, line number)`, for a
    /// source that can be opened there again (a range of a replayed file);
    /// `None` for the others.
    fn resume_at(&self) -> Option<(u64, u64)> {
        None
    }
    /// For a source that resumes at [`LineSource::resume_at`] (`offset`)
    /// on a path that may name another file by then (a followed file): a
    /// hash of what identifies the bytes before that point (see
    /// [`FileLines::follow_from`]).
    fn resume_check(&self, _offset: u64) -> Option<u64> {
        None
    }
    /// The streams (TCP peers) that have ended since the last call; their
    /// per-stream state, such as a CSV header, can be dropped.
    fn take_closed(&mut self) -> Vec<Option<String>> {
        Vec::new()
    }
}

/// How a byte stream is cut into records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Framing {
    /// One record per line (JSON lines).
    #[default]
    Lines,
    /// CSV records as the `csv` crate reads them (quoted fields may span
    /// lines).
    Csv,
}

impl From<Format> for Framing {
    /// CSV sources are framed as CSV, everything else as lines.
    fn from(format: Format) -> Framing {
        match format {
            Format::Csv => Framing::Csv,
            Format::Jsonl | Format::Segment | Format::Ga4 => Framing::Lines,
        }
    }
}

/// The UTF-8 byte-order mark.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Where the framer is with the byte-order mark at the start of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bom {
    /// This many bytes of a possible BOM have been seen (and held back).
    Maybe(usize),
    /// Decided: the BOM was dropped, or the stream does not start with one.
    Done,
}

/// The CSV push parser and its scratch space. Field contents are not kept
/// (the record's raw bytes are); the parser only finds record boundaries.
#[derive(Debug)]
struct CsvState {
    core: csv_core::Reader,
    scratch: Vec<u8>,
    ends: Vec<usize>,
    /// Whether a record has started (its first byte has been seen).
    in_record: bool,
}

impl CsvState {
    fn new() -> Self {
        let mut core = csv_core::Reader::new();
        prime(&mut core);
        CsvState {
            core,
            scratch: vec![0; 16 * 1024],
            ends: vec![0; 256],
            in_record: false,
        }
    }
}

/// Makes `csv-core` skip its own BOM check: it drops a BOM only when the
/// first input it is given holds all three bytes, which would depend on
/// chunking, and it would drop a second BOM after ours. A call with a short,
/// non-empty input and no output space consumes nothing and changes no
/// parser state, but counts as having read.
fn prime(core: &mut csv_core::Reader) {
    let (res, nin, _, _) = core.read_record(b"x", &mut [], &mut [0]);
    debug_assert_eq!((res, nin), (csv_core::ReadRecordResult::OutputFull, 0));
}

/// Incremental framer shared by files and sockets (see the
/// [module documentation](self)).
#[derive(Debug)]
pub struct Framer {
    framing: Framing,
    /// The current record's bytes (up to the limit).
    buf: Vec<u8>,
    /// The current record's length so far.
    len: u64,
    too_long: bool,
    /// Records completed.
    records: u64,
    /// `\n` bytes consumed.
    newlines: u64,
    /// Line number of the current record's first byte.
    start_line: u64,
    consumed: u64,
    /// Offset of the current record's first byte.
    start: u64,
    limit: usize,
    bom: Bom,
    csv: Option<Box<CsvState>>,
}

impl Framer {
    /// A framer for records of at most `limit` bytes, cut as `framing` says.
    pub fn new(limit: usize, framing: Framing) -> Self {
        Framer {
            framing,
            buf: Vec::new(),
            len: 0,
            too_long: false,
            records: 0,
            newlines: 0,
            start_line: 1,
            consumed: 0,
            start: 0,
            limit,
            bom: Bom::Maybe(0),
            csv: (framing == Framing::Csv).then(|| Box::new(CsvState::new())),
        }
    }

    /// A line framer for a stream that starts at byte `offset` and line
    /// `line` of a file (a [`FileRange`]); only a stream at offset 0 may
    /// start with a BOM.
    pub fn starting_at(limit: usize, offset: u64, line: u64) -> Self {
        let mut f = Framer::new(limit, Framing::Lines);
        f.consumed = offset;
        f.start = offset;
        f.newlines = line.saturating_sub(1);
        f.start_line = line;
        if offset > 0 {
            f.bom = Bom::Done;
        }
        f
    }

    /// Feeds bytes; returns how many were used and, if a record ended within
    /// them, the finished record. Call again with the unused rest.
    pub fn feed(&mut self, chunk: &[u8], peer: &Option<String>) -> (usize, Option<Next>) {
        if chunk.is_empty() {
            return (0, None);
        }
        if let Bom::Maybe(held) = self.bom {
            let k = chunk.len().min(BOM.len() - held);
            if chunk[..k] == BOM[held..held + k] {
                self.consumed += k as u64;
                if held + k == BOM.len() {
                    self.bom = Bom::Done;
                    self.start = self.consumed;
                } else {
                    self.bom = Bom::Maybe(held + k);
                }
                return (k, None);
            }
            self.release_bom();
        }
        match self.framing {
            Framing::Lines => self.feed_lines(chunk, peer),
            Framing::Csv => self.feed_csv(chunk, peer),
        }
    }

    /// Decides that the stream does not start with a BOM: the bytes held
    /// back as a possible BOM are data after all.
    fn release_bom(&mut self) {
        if let Bom::Maybe(held) = std::mem::replace(&mut self.bom, Bom::Done) {
            if held > 0 {
                self.consumed -= held as u64;
                // The held bytes (EF or EF BB) end no record.
                let (used, done) = match self.framing {
                    Framing::Lines => self.feed_lines(&BOM[..held], &None),
                    Framing::Csv => self.feed_csv(&BOM[..held], &None),
                };
                debug_assert!(used == held && done.is_none());
            }
        }
    }

    /// Adds bytes of the current record, up to the limit.
    fn push(&mut self, content: &[u8]) {
        self.len += content.len() as u64;
        if !self.too_long {
            if self.buf.len() + content.len() > self.limit {
                self.too_long = true;
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(content);
            }
        }
    }

    fn feed_lines(&mut self, chunk: &[u8], peer: &Option<String>) -> (usize, Option<Next>) {
        let (used, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let content = if done { &chunk[..used - 1] } else { chunk };
        self.push(content);
        self.consumed += used as u64;
        if done {
            self.newlines += 1;
            let mut next = self.take_record(peer);
            if let Next::Line { bytes, .. } = &mut next {
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
            }
            (used, Some(next))
        } else {
            (used, None)
        }
    }

    fn feed_csv(&mut self, chunk: &[u8], peer: &Option<String>) -> (usize, Option<Next>) {
        let mut csv = self.csv.take().expect("CSV framing has a parser");
        let mut used = 0;
        if !csv.in_record {
            // Terminators between records: `csv-core` skips them too (it
            // stays at the start of a record), so skipping them here leaves
            // its boundaries unchanged and puts the record's start on its
            // first byte.
            while used < chunk.len() && matches!(chunk[used], b'\n' | b'\r') {
                self.newlines += (chunk[used] == b'\n') as u64;
                used += 1;
            }
            self.consumed += used as u64;
            if used == chunk.len() {
                self.csv = Some(csv);
                return (used, None);
            }
            csv.in_record = true;
            self.start = self.consumed;
            self.start_line = self.newlines + 1;
        }
        let result = loop {
            if used == chunk.len() {
                break None;
            }
            let input = &chunk[used..];
            let (res, nin, _, _) = csv.core.read_record(input, &mut csv.scratch, &mut csv.ends);
            let taken = &input[..nin];
            self.newlines += memchr::memchr_iter(b'\n', taken).count() as u64;
            self.consumed += nin as u64;
            used += nin;
            match res {
                csv_core::ReadRecordResult::Record => {
                    // The last byte read is the record's terminator.
                    let (term, content) = taken.split_last().expect("a terminator was read");
                    debug_assert!(matches!(term, b'\n' | b'\r'));
                    self.push(content);
                    csv.in_record = false;
                    break Some(self.take_record(peer));
                }
                csv_core::ReadRecordResult::InputEmpty => {
                    self.push(taken);
                    break None;
                }
                // The field contents are not needed: the scratch space is
                // simply reused.
                csv_core::ReadRecordResult::OutputFull
                | csv_core::ReadRecordResult::OutputEndsFull => self.push(taken),
                csv_core::ReadRecordResult::End => unreachable!("End needs empty input"),
            }
        };
        self.csv = Some(csv);
        (used, result)
    }

    /// Hands out the current record and starts the next one.
    fn take_record(&mut self, peer: &Option<String>) -> Next {
        self.records += 1;
        let (line, offset) = (self.start_line, self.start);
        self.start = self.consumed;
        self.start_line = self.newlines + 1;
        let len = std::mem::take(&mut self.len);
        if std::mem::take(&mut self.too_long) {
            Next::TooLong {
                line,
                offset,
                len,
                peer: peer.clone(),
            }
        } else {
            Next::Line {
                bytes: std::mem::take(&mut self.buf),
                line,
                offset,
                peer: peer.clone(),
            }
        }
    }

    /// Ends the input: the unfinished last record, if [`Framer::has_partial`]
    /// (call it only then). A partial BOM is data.
    pub fn finish(&mut self, peer: &Option<String>) -> Next {
        self.release_bom();
        match self.framing {
            Framing::Lines => {
                let mut next = self.take_record(peer);
                if let Next::Line { bytes, .. } = &mut next {
                    if bytes.last() == Some(&b'\r') {
                        bytes.pop();
                    }
                }
                next
            }
            Framing::Csv => {
                let csv = self.csv.as_mut().expect("CSV framing has a parser");
                if csv.in_record {
                    let (res, _, _, _) = csv.core.read_record(&[], &mut csv.scratch, &mut csv.ends);
                    debug_assert_eq!(res, csv_core::ReadRecordResult::Record);
                    csv.in_record = false;
                }
                // Ready for more input, as if nothing had been read.
                csv.core.reset();
                prime(&mut csv.core);
                self.take_record(peer)
            }
        }
    }

    /// Where the unfinished line being framed starts, `(byte offset, line
    /// number)`: JSON lines only, and not while a BOM may still be read.
    pub fn line_start(&self) -> Option<(u64, u64)> {
        let bom = matches!(self.bom, Bom::Maybe(held) if held > 0);
        (self.csv.is_none() && !bom).then_some((self.start, self.start_line))
    }

    /// Whether an unfinished record (or a partial BOM) is buffered.
    pub fn has_partial(&self) -> bool {
        matches!(self.bom, Bom::Maybe(held) if held > 0)
            || match &self.csv {
                None => self.len > 0,
                Some(csv) => csv.in_record,
            }
    }

    /// Bytes consumed.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Records completed.
    pub fn records(&self) -> u64 {
        self.records
    }
}

/// A byte range of a file that starts and ends at line boundaries: the unit
/// in which a large file of JSON lines is read by several workers at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Line number (1-based) of the first byte.
    pub first_line: u64,
}

/// Cuts the file at `path` into ranges of about `chunk` bytes: each range
/// after the first starts just after the first line break at or after a
/// multiple of `chunk`, so the cut depends on the file alone, never on the
/// number of workers. Also counts the lines before each range (one pass over
/// the file with `memchr`). An empty file is one empty range.
pub fn file_ranges(path: &Path, chunk: u64) -> io::Result<Vec<FileRange>> {
    let chunk = chunk.max(1);
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut ranges = Vec::new();
    let mut start = 0u64;
    let mut first_line = 1u64;
    let mut pos = 0u64;
    let mut newlines = 0u64;
    let mut next_cut = chunk;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for i in memchr::memchr_iter(b'\n', &buf[..n]) {
            let at = pos + i as u64;
            newlines += 1;
            // The line break at `at` ends a range when the cut point is
            // within or before its line.
            if at + 1 >= next_cut && at + 1 < size {
                ranges.push(FileRange {
                    start,
                    end: at + 1,
                    first_line,
                });
                start = at + 1;
                first_line = newlines + 1;
                next_cut = (start / chunk + 1) * chunk;
            }
        }
        pos += n as u64;
    }
    ranges.push(FileRange {
        start,
        end: size.max(start),
        first_line,
    });
    Ok(ranges)
}

/// The records of one [`FileRange`] of a file (not followed).
pub struct RangeLines {
    reader: BufReader<std::io::Take<File>>,
    framer: Framer,
    /// Where the range ends: reading stops short of it only if the file
    /// shrank while it was read.
    end: u64,
}

impl RangeLines {
    /// Opens `range` of `path`; lines and offsets are those of the file.
    pub fn open(path: &Path, range: FileRange, limit: usize) -> io::Result<Self> {
        Self::with_buffer(path, range, limit, 1 << 20)
    }

    /// [`RangeLines::open`] with a read buffer of `buffer` bytes (a small
    /// one to look at a range's first lines only).
    pub fn with_buffer(
        path: &Path,
        range: FileRange,
        limit: usize,
        buffer: usize,
    ) -> io::Result<Self> {
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(range.start))?;
        Ok(RangeLines {
            reader: BufReader::with_capacity(buffer, file.take(range.end - range.start)),
            framer: Framer::starting_at(limit, range.start, range.first_line),
            end: range.end,
        })
    }
}

impl LineSource for RangeLines {
    fn next_line(&mut self) -> io::Result<Next> {
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                if self.framer.consumed() < self.end {
                    return Err(io::Error::other(format!(
                        "the file shrank while it was read (it ended at byte {}, it had {} bytes when the run started); do not truncate an input that is being replayed, or read it with follow = true",
                        self.framer.consumed(),
                        self.end
                    )));
                }
                if self.framer.has_partial() {
                    return Ok(self.framer.finish(&None));
                }
                return Ok(Next::End);
            }
            let (used, line) = self.framer.feed(chunk, &None);
            self.reader.consume(used);
            if let Some(line) = line {
                return Ok(line);
            }
        }
    }
    fn position(&self) -> u64 {
        self.framer.consumed()
    }
    fn is_live(&self) -> bool {
        false
    }
    fn resume_at(&self) -> Option<(u64, u64)> {
        (!self.framer.has_partial()).then(|| (self.framer.consumed(), self.framer.newlines + 1))
    }
}

/// What became of a followed file since it was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// Still the file being read.
    Same,
    /// The path now names another file; the one being read (renamed, or
    /// unlinked) still holds what was written to it, to be read to its end.
    Rotated,
    /// The same file was truncated (and maybe written again): what was read
    /// is gone.
    Truncated,
}

/// Records of a file, optionally following it as it grows.
pub struct FileLines {
    reader: BufReader<File>,
    framer: Framer,
    follow: bool,
    path: std::path::PathBuf,
    /// The identity (device, inode) of the open file, to notice rotation.
    identity: (u64, u64),
    /// The first bytes read ([`HEAD_BYTES`] at most): a truncated file that
    /// was written again past the length read shows other first bytes.
    head: Vec<u8>,
    /// The last bytes read ([`HEAD_BYTES`] at most), which must still be
    /// there, just before the read position, in the same file.
    tail: Vec<u8>,
    limit: usize,
    framing: Framing,
    /// The last [`LineSource::resume_check`]: its offset and hash.
    check: std::cell::Cell<Option<(u64, u64)>>,
}

/// How many of a followed file's first bytes are kept to notice that it
/// was truncated and written again.
const HEAD_BYTES: usize = 128;

/// Reads up to `buf.len()` bytes at `offset` without moving the file's
/// position.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }
    #[cfg(not(unix))]
    {
        let _ = (file, buf, offset);
        Ok(0)
    }
}

/// The (device, inode) of a file; (0, 0) where the platform has none.
fn file_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        (0, 0)
    }
}

impl FileLines {
    /// Opens `path`, framed as `framing` says; with `follow`, end of file
    /// means "pending", not "end", and a followed file that is truncated
    /// (`: > web.jsonl`) or replaced (rotated) is read again from its start.
    pub fn open(path: &Path, follow: bool, limit: usize, framing: Framing) -> io::Result<Self> {
        let file = File::open(path)?;
        let identity = file_identity(&file.metadata()?);
        Ok(FileLines {
            reader: BufReader::with_capacity(1 << 20, file),
            framer: Framer::new(limit, framing),
            follow,
            path: path.to_path_buf(),
            identity,
            head: Vec::new(),
            tail: Vec::new(),
            limit,
            framing,
            check: Default::default(),
        })
    }

    /// Opens the followed file of JSON lines `path` at byte `offset`, the
    /// start of line `line` (a resume point of an earlier run, which read
    /// the bytes before it), if it is still that file: at least `offset`
    /// bytes long, and its first bytes and those just before `offset`
    /// hash to `check` (the [`LineSource::resume_check`] the point was
    /// taken with; `None` checks the length only). `Ok(None)` if it is not
    /// (rotated or truncated since): read it from its start. Truncation
    /// and rotation later on are noticed as for a file read from its start.
    pub fn follow_from(
        path: &Path,
        limit: usize,
        offset: u64,
        line: u64,
        check: Option<u64>,
    ) -> io::Result<Option<Self>> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.len() < offset {
            return Ok(None);
        }
        let identity = file_identity(&meta);
        let kept = HEAD_BYTES.min(offset as usize);
        let mut head = vec![0u8; kept];
        let n = read_at(&file, &mut head, 0)?;
        head.truncate(n);
        let mut tail = vec![0u8; kept];
        let n = read_at(&file, &mut tail, offset - kept as u64)?;
        tail.truncate(n);
        if check.is_some_and(|c| c != point_check(&head, &tail)) {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(Some(FileLines {
            reader: BufReader::with_capacity(1 << 20, file),
            framer: Framer::starting_at(limit, offset, line),
            follow: true,
            path: path.to_path_buf(),
            identity,
            head,
            tail,
            limit,
            framing: Framing::Lines,
            check: Default::default(),
        }))
    }

    /// Whether the followed path still holds the file being read, another
    /// file (rotated), or the same file truncated; `Same` while the path is
    /// missing (a rotation that has not created the new file yet).
    fn replaced(&self) -> io::Result<Change> {
        let meta = match std::fs::metadata(&self.path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Change::Same),
            Err(e) => return Err(e),
        };
        if file_identity(&meta) != self.identity {
            return Ok(Change::Rotated);
        }
        if meta.len() < self.framer.consumed() {
            return Ok(Change::Truncated);
        }
        // Same file, at least as long: truncated and written again past
        // what was read shows other first bytes, or other bytes just before
        // the read position.
        let file = self.reader.get_ref();
        let mut now = vec![0u8; self.head.len()];
        let n = read_at(file, &mut now, 0)?;
        if now[..n] != self.head[..] {
            return Ok(Change::Truncated);
        }
        let mut now = vec![0u8; self.tail.len()];
        let start = self.framer.consumed() - self.tail.len() as u64;
        let n = read_at(file, &mut now, start)?;
        Ok(if now[..n] != self.tail[..] {
            Change::Truncated
        } else {
            Change::Same
        })
    }

    /// Starts reading the path again from its first byte.
    fn reopen(&mut self) -> io::Result<()> {
        let file = File::open(&self.path)?;
        self.identity = file_identity(&file.metadata()?);
        tracing::warn!(
            file = %self.path.display(),
            read = self.framer.consumed(),
            "followed file was truncated or replaced; reading it again from its start"
        );
        self.reader = BufReader::with_capacity(1 << 20, file);
        self.framer = Framer::new(self.limit, self.framing);
        self.head.clear();
        self.tail.clear();
        Ok(())
    }
}

impl LineSource for FileLines {
    fn next_line(&mut self) -> io::Result<Next> {
        loop {
            // A followed file may be truncated and written again at any
            // moment: every read from the file is checked, after it is
            // made, against what was read before, so bytes of a new content
            // are never taken for the continuation of the old one.
            let fresh = self.follow && self.reader.buffer().is_empty();
            let chunk = self.reader.fill_buf()?;
            // A rotated file's new bytes are its own (read it to its end
            // first); a truncated one's are the new content's.
            if fresh && !chunk.is_empty() && self.replaced()? == Change::Truncated {
                self.reopen()?;
                continue;
            }
            let chunk = self.reader.buffer();
            if chunk.is_empty() {
                if self.follow {
                    match self.replaced()? {
                        Change::Same => {}
                        Change::Truncated => {
                            self.reopen()?;
                            continue;
                        }
                        Change::Rotated => {
                            // Lines written just before the rotation may
                            // have landed after the end read above.
                            if !self.reader.fill_buf()?.is_empty() {
                                continue;
                            }
                            self.reopen()?;
                            continue;
                        }
                    }
                    // Re-arm the reader so data appended later is seen.
                    let pos = self.framer.consumed();
                    self.reader.seek(SeekFrom::Start(pos))?;
                    return Ok(Next::Pending);
                }
                if self.framer.has_partial() {
                    return Ok(self.framer.finish(&None));
                }
                return Ok(Next::End);
            }
            let (used, line) = self.framer.feed(chunk, &None);
            if self.follow {
                if self.head.len() < HEAD_BYTES {
                    let take = (HEAD_BYTES - self.head.len()).min(used);
                    self.head.extend_from_slice(&chunk[..take]);
                }
                let keep = used.min(HEAD_BYTES);
                let drop = (self.tail.len() + keep).saturating_sub(HEAD_BYTES);
                self.tail.drain(..drop);
                self.tail.extend_from_slice(&chunk[used - keep..used]);
            }
            self.reader.consume(used);
            if let Some(line) = line {
                return Ok(line);
            }
        }
    }
    fn position(&self) -> u64 {
        self.framer.consumed()
    }
    fn is_live(&self) -> bool {
        self.follow
    }
    /// A followed file of JSON lines resumes where its next line starts
    /// ([`FileLines::follow_from`]): at the start of a line its writer has
    /// not finished, if it holds one (every line before it was judged, and
    /// it is judged once it ends, with the clock as it is by then); other
    /// files are read from their start.
    fn resume_at(&self) -> Option<(u64, u64)> {
        if !self.follow || self.framing != Framing::Lines {
            return None;
        }
        if !self.framer.has_partial() {
            return Some((self.framer.consumed(), self.framer.newlines + 1));
        }
        self.framer.line_start()
    }
    fn resume_check(&self, offset: u64) -> Option<u64> {
        if !self.follow {
            return None;
        }
        if let Some((at, check)) = self.check.get() {
            if at == offset {
                return Some(check);
            }
        }
        // What `follow_from` compares: the file's first bytes and those
        // just before the point, as they are now.
        let file = self.reader.get_ref();
        let kept = HEAD_BYTES.min(offset as usize);
        let (mut head, mut tail) = (vec![0u8; kept], vec![0u8; kept]);
        let n = read_at(file, &mut head, 0).ok()?;
        head.truncate(n);
        let n = read_at(file, &mut tail, offset - kept as u64).ok()?;
        tail.truncate(n);
        let check = point_check(&head, &tail);
        self.check.set(Some((offset, check)));
        Some(check)
    }
}

/// What identifies the bytes a followed file's reader has read: a hash of
/// its first bytes and of the last ones before the read position (at most
/// [`HEAD_BYTES`] each).
fn point_check(head: &[u8], tail: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&(head.len() as u64).to_le_bytes());
    h.update(head);
    h.update(tail);
    h.digest()
}

/// Lines held in memory (embedding, tests): each string is one record,
/// already framed (so a CSV record cannot span strings), with offsets as if
/// the strings were joined by `\n`. As for files, a UTF-8 BOM (U+FEFF) at
/// the start of the first string is dropped.
pub struct MemoryLines {
    lines: Arc<Vec<String>>,
    next: usize,
    offset: u64,
    limit: usize,
}

impl MemoryLines {
    /// Serves `lines` in order.
    pub fn new(lines: Arc<Vec<String>>, limit: usize) -> Self {
        MemoryLines {
            lines,
            next: 0,
            offset: 0,
            limit,
        }
    }
}

impl LineSource for MemoryLines {
    fn next_line(&mut self) -> io::Result<Next> {
        let Some(text) = self.lines.get(self.next) else {
            return Ok(Next::End);
        };
        self.next += 1;
        let mut offset = self.offset;
        self.offset += text.len() as u64 + 1;
        let mut text = text.as_str();
        if self.next == 1 {
            if let Some(rest) = text.strip_prefix('\u{feff}') {
                text = rest;
                offset += BOM.len() as u64;
            }
        }
        let line = self.next as u64;
        if text.len() > self.limit {
            return Ok(Next::TooLong {
                line,
                offset,
                len: text.len() as u64,
                peer: None,
            });
        }
        Ok(Next::Line {
            bytes: text.as_bytes().to_vec(),
            line,
            offset,
            peer: None,
        })
    }
    fn position(&self) -> u64 {
        self.offset
    }
    fn is_live(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8], limit: usize, framing: Framing) -> Vec<Next> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let mut f = FileLines::open(&path, false, limit, framing).unwrap();
        let mut out = Vec::new();
        loop {
            match f.next_line().unwrap() {
                Next::End => break,
                n => out.push(n),
            }
        }
        out
    }

    fn lines_of(data: &[u8], limit: usize) -> Vec<Next> {
        read_all(data, limit, Framing::Lines)
    }

    fn line(bytes: &[u8], line: u64, offset: u64) -> Next {
        Next::Line {
            bytes: bytes.to_vec(),
            line,
            offset,
            peer: None,
        }
    }

    /// Frames `data` fed in chunks of the given sizes (cycled), then ends it.
    fn frame_chunked(data: &[u8], cuts: &[usize], limit: usize, framing: Framing) -> Vec<Next> {
        let mut f = Framer::new(limit, framing);
        let mut out = Vec::new();
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].clamp(1, rest.len());
            i += 1;
            let mut chunk = &rest[..n];
            rest = &rest[n..];
            while !chunk.is_empty() {
                let (used, next) = f.feed(chunk, &None);
                chunk = &chunk[used..];
                out.extend(next);
            }
        }
        if f.has_partial() {
            out.push(f.finish(&None));
        }
        assert!(!f.has_partial());
        out
    }

    #[test]
    fn splits_lines_with_offsets_and_crlf() {
        let out = lines_of(b"ab\r\ncd\nlast", 100);
        assert_eq!(
            out,
            vec![line(b"ab", 1, 0), line(b"cd", 2, 4), line(b"last", 3, 7)]
        );
    }

    #[test]
    fn too_long_lines_are_skipped_not_buffered() {
        let out = lines_of(b"short\n0123456789abcdef\nok\n", 8);
        assert_eq!(
            out[1],
            Next::TooLong {
                line: 2,
                offset: 6,
                len: 16,
                peer: None
            }
        );
        assert_eq!(out[2], line(b"ok", 3, 23));
    }

    #[test]
    fn a_leading_bom_is_dropped_and_still_counts_in_offsets() {
        let out = lines_of(b"\xEF\xBB\xBF{\"a\":1}\n{\"b\":2}\n", 100);
        assert_eq!(
            out,
            vec![line(b"{\"a\":1}", 1, 3), line(b"{\"b\":2}", 2, 11)]
        );
        // Split over chunks, one byte at a time.
        let out = frame_chunked(b"\xEF\xBB\xBFx\ny", &[1], 100, Framing::Lines);
        assert_eq!(out, vec![line(b"x", 1, 3), line(b"y", 2, 5)]);
        // A BOM on a line of its own leaves an empty first line.
        assert_eq!(
            lines_of(b"\xEF\xBB\xBF\nx\n", 100),
            vec![line(b"", 1, 3), line(b"x", 2, 4)]
        );
        // Only at the very start: later BOMs are data.
        assert_eq!(
            lines_of(b"\xEF\xBB\xBF\xEF\xBB\xBFx\n\xEF\xBB\xBFy\n", 100),
            vec![line(b"\xEF\xBB\xBFx", 1, 3), line(b"\xEF\xBB\xBFy", 2, 8)]
        );
    }

    #[test]
    fn a_partial_bom_is_data() {
        // EF BB then not BF: the held bytes belong to the first line.
        let out = frame_chunked(b"\xEF\xBBx\ny\n", &[1], 100, Framing::Lines);
        assert_eq!(out, vec![line(b"\xEF\xBBx", 1, 0), line(b"y", 2, 4)]);
        let out = frame_chunked(b"\xEF\n", &[1], 100, Framing::Lines);
        assert_eq!(out, vec![line(b"\xEF", 1, 0)]);
        // The input ends inside a would-be BOM.
        assert_eq!(lines_of(b"\xEF\xBB", 100), vec![line(b"\xEF\xBB", 1, 0)]);
        assert_eq!(
            read_all(b"\xEF\xBB", 100, Framing::Csv),
            vec![line(b"\xEF\xBB", 1, 0)]
        );
        // A held byte counts against the limit like any other.
        let out = frame_chunked(b"\xEFabc\nok\n", &[1], 3, Framing::Lines);
        assert_eq!(
            out,
            vec![
                Next::TooLong {
                    line: 1,
                    offset: 0,
                    len: 4,
                    peer: None
                },
                line(b"ok", 2, 5)
            ]
        );
    }

    #[test]
    fn memory_lines_drop_a_leading_bom() {
        let lines = Arc::new(vec!["\u{feff}{}".to_string(), "\u{feff}x".to_string()]);
        let mut m = MemoryLines::new(lines, 100);
        assert_eq!(m.next_line().unwrap(), line(b"{}", 1, 3));
        assert_eq!(m.next_line().unwrap(), line("\u{feff}x".as_bytes(), 2, 6));
        assert_eq!(m.next_line().unwrap(), Next::End);
    }

    #[test]
    fn csv_records_span_lines_with_true_lines_and_offsets() {
        let data = b"\xEF\xBB\xBFcrm_id,email,note\r\n\
            C1,a@x.com,\"one, \"\"two\"\"\nthree\"\r\n\r\n\
            C2,b@x.com,plain\rC3,c@x.com,\"unclosed\n";
        let expected = vec![
            line(b"crm_id,email,note", 1, 3),
            line(b"C1,a@x.com,\"one, \"\"two\"\"\nthree\"", 2, 22),
            line(b"C2,b@x.com,plain", 5, 57),
            // A lone CR ends a record (as in the csv crate) but lines count
            // `\n` only; an unclosed quote runs to the end of the input.
            line(b"C3,c@x.com,\"unclosed\n", 5, 74),
        ];
        assert_eq!(read_all(data, 100, Framing::Csv), expected);
        for cut in 1..8 {
            assert_eq!(frame_chunked(data, &[cut], 100, Framing::Csv), expected);
        }
        // The same input framed as lines cuts the quoted line break.
        assert_eq!(read_all(data, 100, Framing::Lines).len(), 5);
    }

    #[test]
    fn csv_phantom_row_stays_inside_its_quotes() {
        let data =
            b"crm_id,email,tier\nC1,a@x.com,\"gold\nC2,b@x.com,silver\"\nC3,c@x.com,bronze\n";
        assert_eq!(
            read_all(data, 100, Framing::Csv),
            vec![
                line(b"crm_id,email,tier", 1, 0),
                line(b"C1,a@x.com,\"gold\nC2,b@x.com,silver\"", 2, 18),
                line(b"C3,c@x.com,bronze", 4, 54),
            ]
        );
    }

    #[test]
    fn too_long_csv_records_are_skipped_to_their_true_end() {
        // The second record spans three lines and 23 bytes; the limit is 12.
        let data = b"a,b\n\"0123\n4567\n89ab\",xyz\nc,d\n";
        let expected = vec![
            line(b"a,b", 1, 0),
            Next::TooLong {
                line: 2,
                offset: 4,
                len: 20,
                peer: None,
            },
            line(b"c,d", 5, 25),
        ];
        assert_eq!(read_all(data, 12, Framing::Csv), expected);
        for cut in 1..6 {
            assert_eq!(frame_chunked(data, &[cut], 12, Framing::Csv), expected);
        }
        // The parser's scratch space is small; records far longer than it
        // are framed (and measured) right.
        let long = format!(
            "x,\"{}\n{}\"\ny,z\n",
            "p".repeat(40_000),
            "q".repeat(40_000)
        );
        let out = read_all(long.as_bytes(), 1 << 20, Framing::Csv);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], line(b"y,z", 3, 80_006));
        let Next::Line {
            bytes,
            line: 1,
            offset: 0,
            ..
        } = &out[0]
        else {
            panic!("{:?}", out[0]);
        };
        assert_eq!(bytes.len(), 80_005);
    }

    #[test]
    fn follow_sees_appended_data() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one\ntw").unwrap();
        let mut f = FileLines::open(&path, true, 100, Framing::Lines).unwrap();
        assert!(matches!(f.next_line().unwrap(), Next::Line { .. }));
        assert_eq!(f.next_line().unwrap(), Next::Pending);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"o\n").unwrap();
        assert_eq!(f.next_line().unwrap(), line(b"two", 2, 4));
    }

    /// Reading a file range by range gives exactly the lines, line numbers
    /// and offsets of reading it whole, for any range size, with or without
    /// a final line break, with a BOM, and with empty and long lines.
    #[test]
    fn ranges_read_what_the_whole_file_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut body = String::new();
        for i in 0..300 {
            body += &format!("{{\"n\":{i},\"pad\":\"{}\"}}\r\n", "x".repeat(i % 37));
            if i % 50 == 0 {
                body += "\n";
            }
        }
        for (prefix, suffix) in [("", ""), ("\u{feff}", ""), ("", "{\"last\":true}")] {
            let text = format!("{prefix}{body}{suffix}");
            std::fs::write(&path, &text).unwrap();
            let whole = {
                let mut f = FileLines::open(&path, false, 64, Framing::Lines).unwrap();
                let mut v = Vec::new();
                loop {
                    match f.next_line().unwrap() {
                        Next::End => break,
                        n => v.push(n),
                    }
                }
                v
            };
            for chunk in [1u64, 7, 64, 1000, 4096, 1 << 30] {
                let ranges = file_ranges(&path, chunk).unwrap();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges.last().unwrap().end, text.len() as u64);
                let mut got = Vec::new();
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                for r in &ranges {
                    let mut f = RangeLines::open(&path, *r, 64).unwrap();
                    loop {
                        match f.next_line().unwrap() {
                            Next::End => break,
                            n => got.push(n),
                        }
                    }
                }
                assert_eq!(got, whole, "range size {chunk}, {} ranges", ranges.len());
            }
        }
    }

    /// A replayed file that shrinks while its range is read is an error,
    /// not a short input.
    #[test]
    fn a_range_of_a_file_that_shrinks_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a\nb\nc\nd\n".repeat(2000)).unwrap();
        let ranges = file_ranges(&path, 1 << 20).unwrap();
        let mut f = RangeLines::with_buffer(&path, ranges[0], 100, 4096).unwrap();
        assert!(matches!(f.next_line().unwrap(), Next::Line { .. }));
        std::fs::write(&path, "a\n").unwrap();
        let err = loop {
            match f.next_line() {
                Ok(Next::Line { .. }) => {}
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(err.contains("the file shrank while it was read"), "{err}");
    }

    /// Lines appended just before a rotation (`cat C >> f; mv f f.1; cat B
    /// > f`, with no read in between) are read from the old file, to its
    /// end, before the new file is read from its start.
    #[test]
    fn follow_reads_a_rotated_file_to_its_end_first() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "a1\na2\n").unwrap();
        let mut f = FileLines::open(&path, true, 100, Framing::Lines).unwrap();
        let read = |f: &mut FileLines| {
            let mut v = Vec::new();
            loop {
                match f.next_line().unwrap() {
                    Next::Line { bytes, line, .. } => {
                        v.push((line, String::from_utf8(bytes).unwrap()))
                    }
                    Next::Pending => return v,
                    other => panic!("{other:?}"),
                }
            }
        };
        assert_eq!(read(&mut f).len(), 2);
        let mut old = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        old.write_all(b"c3\nc4\n").unwrap();
        std::fs::rename(&path, dir.path().join("f.1")).unwrap();
        std::fs::write(&path, "b1\nb2\nb3\n").unwrap();
        let got = read(&mut f);
        let expected: Vec<(u64, String)> = [(3, "c3"), (4, "c4"), (1, "b1"), (2, "b2"), (3, "b3")]
            .iter()
            .map(|(n, l)| (*n, l.to_string()))
            .collect();
        assert_eq!(got, expected);
    }

    /// A followed file truncated and at once written again, longer than
    /// what was read, is read from its start, whether its first bytes
    /// changed or not, and none of the new content is taken for the
    /// continuation of the old one.
    #[test]
    fn follow_rereads_a_file_truncated_and_refilled_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let lines = |from: usize, to: usize, tag: &str| -> String {
            (from..to).map(|i| format!("line {i} {tag}\n")).collect()
        };
        for same_start in [false, true] {
            std::fs::write(&path, lines(0, 200, "old")).unwrap();
            let mut f = FileLines::open(&path, true, 1 << 10, Framing::Lines).unwrap();
            let mut read = Vec::new();
            loop {
                match f.next_line().unwrap() {
                    Next::Line { bytes, .. } => read.push(String::from_utf8(bytes).unwrap()),
                    Next::Pending => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(read.len(), 200);
            // Truncated and refilled with 3000 lines before the next read;
            // with `same_start`, the first line is unchanged.
            let mut new = String::new();
            if same_start {
                new += "line 0 old\n";
            }
            new += &lines(1, 3000, "new");
            std::fs::write(&path, &new).unwrap();
            let mut again = Vec::new();
            loop {
                match f.next_line().unwrap() {
                    Next::Line { bytes, line, .. } => {
                        again.push((line, String::from_utf8(bytes).unwrap()))
                    }
                    Next::Pending => break,
                    other => panic!("{other:?}"),
                }
            }
            let expected: Vec<(u64, String)> = new
                .lines()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, l.to_string()))
                .collect();
            assert_eq!(again, expected, "same_start: {same_start}");
        }
    }

    #[test]
    fn follow_completes_a_csv_record_and_a_bom_appended_later() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"\xEF\xBB").unwrap();
        let mut f = FileLines::open(&path, true, 100, Framing::Csv).unwrap();
        assert_eq!(f.next_line().unwrap(), Next::Pending);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"\xBFh\na,\"b").unwrap();
        assert_eq!(f.next_line().unwrap(), line(b"h", 1, 3));
        assert_eq!(f.next_line().unwrap(), Next::Pending);
        file.write_all(b"\nc\"\n").unwrap();
        assert_eq!(f.next_line().unwrap(), line(b"a,\"b\nc\"", 2, 5));
        assert_eq!(f.next_line().unwrap(), Next::Pending);
    }

    /// The fields of each CSV record, as the `csv` crate reads `data`.
    fn csv_fields(data: &[u8]) -> Vec<Vec<Vec<u8>>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(data)
            .byte_records()
            .map(|r| r.unwrap().iter().map(<[u8]>::to_vec).collect())
            .collect()
    }

    fn text_from(alphabet: &'static [u8]) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::strategy::Strategy;
        (
            proptest::bool::ANY,
            proptest::collection::vec(proptest::sample::select(alphabet), 0..200),
        )
            .prop_map(|(bom, text)| {
                let mut data = if bom { BOM.to_vec() } else { Vec::new() };
                data.extend(text);
                data
            })
    }

    proptest::proptest! {
        /// However the input is cut into chunks (as TCP delivers it), the
        /// framer yields the same lines, numbers and offsets.
        #[test]
        fn framing_does_not_depend_on_chunking(
            text in text_from(b"ab\n\r\xEF"),
            cuts in proptest::collection::vec(1usize..17, 1..40),
            csv in proptest::bool::ANY,
        ) {
            let framing = if csv { Framing::Csv } else { Framing::Lines };
            let whole = frame_chunked(&text, &[usize::MAX], 8, framing);
            let out = frame_chunked(&text, &cuts, 8, framing);
            proptest::prop_assert_eq!(out, whole);
        }

        /// CSV framing gives exactly the records of `csv::Reader` over the
        /// whole input, for any chunking; each record's bytes are the input
        /// at its offset, its line is 1 + the `\n`s before it, and only
        /// record terminators (and a leading BOM) lie between records.
        #[test]
        fn csv_framing_matches_the_csv_crate(
            text in text_from(b"a,\"\n\r "),
            cuts in proptest::collection::vec(1usize..17, 1..40),
        ) {
            let out = frame_chunked(&text, &cuts, 1 << 20, Framing::Csv);
            let mut fields = Vec::new();
            let mut end = if text.starts_with(&BOM) { 3 } else { 0 };
            for next in &out {
                let Next::Line { bytes, line, offset, .. } = next else {
                    panic!("{next:?}");
                };
                let offset = *offset as usize;
                proptest::prop_assert_eq!(&text[offset..offset + bytes.len()], &bytes[..]);
                proptest::prop_assert_eq!(
                    *line,
                    1 + text[..offset].iter().filter(|&&b| b == b'\n').count() as u64
                );
                proptest::prop_assert!(text[end..offset].iter().all(|b| matches!(b, b'\n' | b'\r')));
                end = offset + bytes.len();
                let mut one = csv_fields(bytes);
                proptest::prop_assert_eq!(one.len(), 1, "{:?}", bytes);
                fields.push(one.remove(0));
            }
            proptest::prop_assert!(text[end..].iter().all(|b| matches!(b, b'\n' | b'\r')));
            proptest::prop_assert_eq!(fields, csv_fields(&text));
        }
    }
}
