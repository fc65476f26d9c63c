//! Line framing with a length limit.
//!
//! Input is line-delimited; a line longer than the configured limit is not
//! buffered whole: its bytes past the limit are skipped and it is reported as
//! [`Next::TooLong`], so one bad line cannot exhaust memory.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

/// The next thing a line source has to offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A complete line without its terminator.
    Line {
        /// The bytes (possibly invalid UTF-8).
        bytes: Vec<u8>,
        /// 1-based line number.
        line: u64,
        /// Byte offset of the first byte.
        offset: u64,
        /// The peer for socket sources.
        peer: Option<String>,
    },
    /// A line longer than the limit; its content was skipped.
    TooLong {
        /// 1-based line number.
        line: u64,
        /// Byte offset of the first byte.
        offset: u64,
        /// Its length in bytes.
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
}

/// Incremental splitter shared by files and sockets.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    len: u64,
    too_long: bool,
    line: u64,
    consumed: u64,
    start: u64,
    limit: usize,
}

impl Framer {
    /// A framer for lines of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Framer {
            limit,
            ..Default::default()
        }
    }

    /// Feeds bytes; returns how many were used and, if a line ended within
    /// them, the finished line.
    pub fn feed(&mut self, chunk: &[u8], peer: &Option<String>) -> (usize, Option<Next>) {
        let (used, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let content = if done { &chunk[..used - 1] } else { chunk };
        self.len += content.len() as u64;
        if !self.too_long {
            if self.buf.len() + content.len() > self.limit {
                self.too_long = true;
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(content);
            }
        }
        self.consumed += used as u64;
        if done {
            (used, Some(self.finish(peer)))
        } else {
            (used, None)
        }
    }

    /// Ends the current line (at a newline or at end of input).
    pub fn finish(&mut self, peer: &Option<String>) -> Next {
        self.line += 1;
        let offset = self.start;
        self.start = self.consumed;
        let len = std::mem::take(&mut self.len);
        if std::mem::take(&mut self.too_long) {
            Next::TooLong {
                line: self.line,
                offset,
                len,
                peer: peer.clone(),
            }
        } else {
            let mut bytes = std::mem::take(&mut self.buf);
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            Next::Line {
                bytes,
                line: self.line,
                offset,
                peer: peer.clone(),
            }
        }
    }

    /// Whether a partial line is buffered.
    pub fn has_partial(&self) -> bool {
        self.len > 0
    }

    /// Bytes consumed.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Lines completed.
    pub fn lines(&self) -> u64 {
        self.line
    }
}

/// Lines of a file, optionally following it as it grows.
pub struct FileLines {
    reader: BufReader<File>,
    framer: Framer,
    follow: bool,
}

impl FileLines {
    /// Opens `path`; with `follow`, end of file means "pending", not "end".
    pub fn open(path: &Path, follow: bool, limit: usize) -> io::Result<Self> {
        let file = File::open(path)?;
        Ok(FileLines {
            reader: BufReader::with_capacity(1 << 20, file),
            framer: Framer::new(limit),
            follow,
        })
    }
}

impl LineSource for FileLines {
    fn next_line(&mut self) -> io::Result<Next> {
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                if self.follow {
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
}

/// Lines held in memory (embedding, tests).
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
        let offset = self.offset;
        self.offset += text.len() as u64 + 1;
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

    fn lines_of(data: &[u8], limit: usize) -> Vec<Next> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let mut f = FileLines::open(&path, false, limit).unwrap();
        let mut out = Vec::new();
        loop {
            match f.next_line().unwrap() {
                Next::End => break,
                n => out.push(n),
            }
        }
        out
    }

    #[test]
    fn splits_lines_with_offsets_and_crlf() {
        let out = lines_of(b"ab\r\ncd\nlast", 100);
        assert_eq!(
            out,
            vec![
                Next::Line {
                    bytes: b"ab".to_vec(),
                    line: 1,
                    offset: 0,
                    peer: None
                },
                Next::Line {
                    bytes: b"cd".to_vec(),
                    line: 2,
                    offset: 4,
                    peer: None
                },
                Next::Line {
                    bytes: b"last".to_vec(),
                    line: 3,
                    offset: 7,
                    peer: None
                },
            ]
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
        assert_eq!(
            out[2],
            Next::Line {
                bytes: b"ok".to_vec(),
                line: 3,
                offset: 23,
                peer: None
            }
        );
    }

    #[test]
    fn follow_sees_appended_data() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one\ntw").unwrap();
        let mut f = FileLines::open(&path, true, 100).unwrap();
        assert!(matches!(f.next_line().unwrap(), Next::Line { .. }));
        assert_eq!(f.next_line().unwrap(), Next::Pending);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"o\n").unwrap();
        assert_eq!(
            f.next_line().unwrap(),
            Next::Line {
                bytes: b"two".to_vec(),
                line: 2,
                offset: 4,
                peer: None
            }
        );
    }

    proptest::proptest! {
        /// However the input is cut into chunks (as TCP delivers it), the
        /// framer yields the same lines, numbers and offsets.
        #[test]
        fn framing_does_not_depend_on_chunking(
            text in proptest::collection::vec(proptest::sample::select(vec![b'a', b'b', b'\n', b'\r']), 0..200),
            cuts in proptest::collection::vec(1usize..17, 1..40),
        ) {
            let whole = {
                let mut f = Framer::new(8);
                let mut out = Vec::new();
                let mut rest = &text[..];
                while !rest.is_empty() {
                    let (used, line) = f.feed(rest, &None);
                    rest = &rest[used..];
                    out.extend(line);
                }
                if f.has_partial() { out.push(f.finish(&None)); }
                out
            };
            let mut f = Framer::new(8);
            let mut out = Vec::new();
            let mut rest = &text[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                let mut chunk = &rest[..n];
                rest = &rest[n..];
                while !chunk.is_empty() {
                    let (used, line) = f.feed(chunk, &None);
                    chunk = &chunk[used..];
                    out.extend(line);
                }
            }
            if f.has_partial() { out.push(f.finish(&None)); }
            proptest::prop_assert_eq!(out, whole);
        }
    }
}
