//! Durable, queryable state in RocksDB.
//!
//! One column family per kind of fact, keyed so that every fact of a profile
//! is one prefix scan away:
//!
//! | column family | key                      | value                         |
//! |---------------|--------------------------|-------------------------------|
//! | `id_profile`  | identifier               | profile id                    |
//! | `profile_ids` | ⟨profile⟩ identifier     | empty                         |
//! | `attributes`  | profile                  | JSON object                   |
//! | `traits`      | ⟨profile⟩ trait name     | JSON value (number or string) |
//! | `segments`    | ⟨profile⟩ segment        | empty                         |
//!
//! `⟨profile⟩` is the profile id prefixed with its length (4 bytes,
//! big-endian), so no identifier, whatever bytes it holds, can make one
//! profile's keys look like another's.
//! | `checkpoint`  | `checkpoint`             | JSON `{time, offsets}`        |
//!
//! Beside the facts, the *retained input* of `dataflow::retain` (what a
//! restart injects instead of reading the inputs again), in the same
//! atomic batches, at the checkpoint's cut:
//!
//! | column family     | key                                   | value (merge)                    |
//! |-------------------|---------------------------------------|----------------------------------|
//! | `retained_crm`    | `crm_id`                              | JSON CRM record (latest wins)    |
//! | `retained_sets`   | identifier keys, 16 bytes each        | empty                            |
//! | `retained_names`  | identifier key                        | `kind:value`                     |
//! | `retained_totals` | identifier key, slot (u32 BE)         | i128 LE (added)                  |
//! | `retained_events` | last window end (u64 BE), tick (u64 BE), identifier key | the event's windowed trait items, bincode with variable-length integers, one after another (appended) |
//! | `retained_points` | identifier key, trait (u32 BE), tick (u64 BE), value (bincode) | i64 LE count (added; zero ones dropped by compactions) |
//! | `retained_held`   | identifier key, trait (u32 BE)        | the point held: tick (u64 BE), value (bincode) (replaced) |
//! | `retained_dwell`  | profile key, segment name (UTF-8)     | when it entered the segment (u64 BE; removed when it leaves) |
//!
//! The commit stage writes all the timestamps that one frontier advance
//! completes as one `WriteBatch` (per time, removals first, then
//! insertions, so a changed value ends up new), with the checkpoint of the
//! last of them in the same batch: state and checkpoint always agree.
//! Batches go through the write-ahead log (not synced: a killed process
//! loses none); memtables are flushed atomically across column families
//! (when their memory budget fills, every few seconds of a live run, and at
//! the end of a run), so the state on disk is always that of one completed
//! time.
//!
//! A run's state may have several *parts*, one per process of a cluster
//! ([`part_dir`]): each holds the facts its process's workers own (see
//! `io::sinks::state`), and [`StateParts`] reads them as one.

use std::collections::BTreeMap;
use std::path::Path;

pub mod explain;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::dataflow::retain::{decode_items, encode_item_into, Restored, Retained};
use crate::dataflow::traits::{PointContribution, COUNT_OF};
use crate::io::sources::ResumePoint;
use crate::model::{CrmRecord, Id, IdMap, Ident, Scalar};
use crate::time::Time;

const CFS: [&str; 6] = [
    "id_profile",
    "profile_ids",
    "attributes",
    "traits",
    "segments",
    "checkpoint",
];

/// The column families of the retained input (see the module
/// documentation), in the order of [`RetainedBatch`]'s indexes.
const RETAINED_CFS: [&str; 8] = [
    "retained_crm",
    "retained_sets",
    "retained_names",
    "retained_totals",
    "retained_events",
    "retained_points",
    "retained_held",
    "retained_dwell",
];
const R_CRM: usize = 0;
const R_SETS: usize = 1;
const R_NAMES: usize = 2;
const R_TOTALS: usize = 3;
const R_EVENTS: usize = 4;
const R_POINTS: usize = 5;
const R_HELD: usize = 6;
const R_DWELL: usize = 7;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("state store {dir}: {source}")]
    Rocks {
        /// The state directory.
        dir: String,
        /// The RocksDB error.
        source: rocksdb::Error,
    },
    /// A stored value could not be decoded.
    #[error("state store: corrupt value in `{0}`")]
    Corrupt(String),
    /// A state batch could not be written by the writer thread (the
    /// error as it reported it).
    #[error("{0}")]
    Write(String),
    /// Another run holds the state directory.
    #[error("state directory {dir} is in use by another segflow run (it holds {dir}/{LOCK_FILE}); wait for it to end or choose another directory")]
    Locked {
        /// The state directory.
        dir: String,
    },
    /// The directory holds something segflow did not create, or state of a
    /// format this version does not know; nothing was changed.
    #[error("state directory {dir}: {what}; segflow does not touch it: choose another directory, or remove it yourself if it is not needed")]
    NotOurs {
        /// The state directory.
        dir: String,
        /// What was found.
        what: String,
    },
    /// State written by an earlier segflow version, in a format this one
    /// does not read: a run with `--reset` replaces it.
    #[error("state directory {dir} holds state of an earlier segflow version (format {version}; this version reads format {STATE_FORMAT}): run with --reset to rebuild it from the inputs (the state and outputs are replaced), or give another state directory")]
    OlderFormat {
        /// The state directory.
        dir: String,
        /// The format it holds.
        version: u32,
    },
    /// Another process's part of a running cluster's state cannot be read
    /// here (see [`FollowedPart`]).
    #[error("state directory {dir}: {what}")]
    PartUnavailable {
        /// The part's directory.
        dir: String,
        /// Why, and what to do.
        what: String,
    },
    /// `segflow query` on a directory without state.
    #[error("no segflow state in {dir} (it does not exist or is empty): give the --state-dir of a segflow run")]
    NoState {
        /// The directory.
        dir: String,
    },
    /// The lock or marker file could not be read or written.
    #[error("state directory {dir}: {source}")]
    Io {
        /// The state directory.
        dir: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The second line of a [`MARKER_FILE`] while its state is being replaced.
const RESETTING: &str = "resetting";

/// Writes the [`MARKER_FILE`] of `dir` (saying "resetting" if `resetting`),
/// aside and renamed: a reader (`segflow query`) never sees it half
/// written.
fn write_marker(dir: &Path, resetting: bool) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        dir: dir.display().to_string(),
        source,
    };
    let marker = dir.join(MARKER_FILE);
    let fresh = dir.join(format!("{MARKER_FILE}.new"));
    let text = match resetting {
        true => format!("segflow-state {STATE_FORMAT}\n{RESETTING}\n"),
        false => format!("segflow-state {STATE_FORMAT}\n"),
    };
    std::fs::write(&fresh, text).map_err(io)?;
    std::fs::rename(&fresh, &marker).map_err(io)
}

impl StoreError {
    /// Whether a reader may meet this error only because a run is
    /// rewriting the state under it (RocksDB replaces its files as it
    /// flushes and compacts): trying again shortly succeeds.
    pub fn may_be_transient(&self) -> bool {
        matches!(self, StoreError::Rocks { .. })
    }
}

/// The file that marks a directory as segflow state, with its format
/// version (`segflow-state 1`).
pub const MARKER_FILE: &str = "SEGFLOW_STATE";
/// The state format this version writes and reads.
pub const STATE_FORMAT: u32 = 3;
/// The file whose exclusive lock a run holds for its whole length.
pub const LOCK_FILE: &str = "segflow.lock";

/// An exclusive lock on a state directory, held while it lives.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// What a state directory holds.
enum Found {
    /// Nothing yet: it does not exist, or is empty (but for a lock file).
    Nothing,
    /// segflow state of this format.
    Ours,
    /// segflow state of an earlier format (only a reset may replace it).
    Older(u32),
}

/// Looks at `dir` without changing anything: refuses what segflow did not
/// create (not a directory, files without the [`MARKER_FILE`] marker, a
/// marker of another format).
fn inspect(dir: &Path) -> Result<Found, StoreError> {
    let name = dir.display().to_string();
    let io = |source| StoreError::Io {
        dir: name.clone(),
        source,
    };
    let not_ours = |what: String| StoreError::NotOurs {
        dir: name.clone(),
        what,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(not_ours("it is not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(dir).is_ok() {
                return Err(not_ours(
                    "it is a symbolic link to a path that does not exist".into(),
                ));
            }
            return Ok(Found::Nothing);
        }
        Err(e) => return Err(io(e)),
    }
    match std::fs::read_to_string(dir.join(MARKER_FILE)) {
        Ok(text) => {
            let version = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .strip_prefix("segflow-state ")
                .and_then(|v| v.parse::<u32>().ok());
            match version {
                Some(STATE_FORMAT) => {}
                Some(v) if v < STATE_FORMAT => return Ok(Found::Older(v)),
                _ => {
                    return Err(not_ours(format!(
                        "its {MARKER_FILE} says {:?}, not segflow state format {STATE_FORMAT}",
                        text.trim()
                    )))
                }
            }
            Ok(Found::Ours)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let others: Vec<String> = std::fs::read_dir(dir)
                .map_err(io)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // A marker being written (see `write_marker`) by a run that
                // was killed before it could rename it.
                .filter(|n| n != LOCK_FILE && *n != format!("{MARKER_FILE}.new"))
                .collect();
            if others.is_empty() {
                Ok(Found::Nothing)
            } else {
                let mut found = others
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if others.len() > 5 {
                    found += &format!(" and {} more", others.len() - 5);
                }
                Err(not_ours(format!(
                    "it is not empty and has no {MARKER_FILE} marker (found {found})"
                )))
            }
        }
        Err(e) => Err(io(e)),
    }
}

impl StateLock {
    /// Creates `dir` if needed and takes its lock, or says who holds it. A
    /// directory that holds something segflow did not create, or state of
    /// an earlier format ([`StoreError::OlderFormat`]), is refused first,
    /// untouched (no lock file is left in it).
    pub fn take(dir: &Path) -> Result<StateLock, StoreError> {
        Self::take_inner(dir, false)
    }

    /// As [`StateLock::take`], for a run that replaces the state (a
    /// reset): state of an earlier format is taken too.
    pub fn take_to_reset(dir: &Path) -> Result<StateLock, StoreError> {
        Self::take_inner(dir, true)
    }

    fn take_inner(dir: &Path, reset: bool) -> Result<StateLock, StoreError> {
        let io = |source| StoreError::Io {
            dir: dir.display().to_string(),
            source,
        };
        if let (Found::Older(version), false) = (inspect(dir)?, reset) {
            return Err(StoreError::OlderFormat {
                dir: dir.display().to_string(),
                version,
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                StoreError::NotOurs {
                    dir: dir.display().to_string(),
                    what:
                        "a part of its path is a file or a dangling symbolic link, not a directory"
                            .into(),
                }
            } else {
                io(e)
            }
        })?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
                dir: dir.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

/// The last completed timestamp and the source positions at that point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Last completed (and written) timestamp, in milliseconds.
    pub time: u64,
    /// Source name -> offset (bytes for files, lines for sockets).
    pub offsets: BTreeMap<String, u64>,
    /// How many processes wrote the state: process 0's part is the state
    /// directory itself, process `p`'s is [`part_dir`]`(dir, p)`.
    #[serde(default = "one_process")]
    pub processes: usize,
    /// The run that wrote the state ([`new_run_id`]); the same in every
    /// part of a cluster's state.
    #[serde(default)]
    pub run: String,
    /// The fingerprint of the dataflow definition that wrote the state
    /// ([`crate::Engine`] computes it from everything that shapes the
    /// results: engine settings, identity rules, sources, traits,
    /// segments); a run resumes only from a checkpoint of the same one.
    /// Empty in state written before checkpoints could be resumed.
    #[serde(default)]
    pub fingerprint: String,
    /// The hash of each part of the fingerprint, by what a refusal calls
    /// it (`traits`, `segments`, ...): a refusal names those that differ.
    #[serde(default)]
    pub fingerprint_parts: BTreeMap<String, String>,
    /// Per file source: what the run had of it when it started, to tell at
    /// a resume that the input is the same (or has grown).
    #[serde(default)]
    pub inputs: BTreeMap<String, InputMark>,
    /// Where the outputs stood (process 0's part only).
    #[serde(default)]
    pub sinks: Option<SinkPositions>,
    /// The cut of the retained input written with this checkpoint and
    /// where the readers resume (`None`: no retained input, a restart
    /// reads the inputs from their beginning).
    #[serde(default)]
    pub retained: Option<RetainedCut>,
}

/// What a checkpoint's retained input covers (see `dataflow::retain`):
/// every record admitted at a tick before `cut`, and the points at which
/// the readers of replayed files resume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetainedCut {
    /// Every update of a time before this is in the retained input.
    pub cut: u64,
    /// Per source, a point of each range read so far.
    pub points: BTreeMap<String, Vec<ResumePoint>>,
    /// Where the outputs stood at bounds at or after the cut (not clamped
    /// where files ended, see [`Checkpoint::sinks`]): a restore from the
    /// same inputs resumes them from here.
    #[serde(default)]
    pub sinks: Option<SinkPositions>,
}

/// What a run had of one input when it started: its path, its length and a
/// hash of its whole content, so that a resume can tell that the input is
/// the same or has only grown (lines appended).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputMark {
    /// The file's path as the run was given it, which its dead letters
    /// name (`(memory)` for lines held in memory).
    pub path: String,
    /// Its length in bytes.
    pub len: u64,
    /// xxh3-64 of its first `len` bytes, in hex.
    pub head: String,
    /// Whether its last byte was a line break (or it was empty).
    #[serde(default)]
    pub ends_line: bool,
}

impl InputMark {
    /// The mark of the file at `path`, with the hash of its first `min(len,
    /// limit)` bytes (read in 1 MiB blocks; about 0.1 s per 250 MB from the
    /// page cache).
    pub fn of(path: &Path, limit: u64) -> std::io::Result<InputMark> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut left = len.min(limit);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut block = vec![0u8; 1 << 20];
        let mut last = b'\n';
        while left > 0 {
            let want = block.len().min(left as usize);
            let n = file.read(&mut block[..want])?;
            if n == 0 {
                break;
            }
            hasher.update(&block[..n]);
            last = block[n - 1];
            left -= n as u64;
        }
        Ok(InputMark {
            path: path.display().to_string(),
            len,
            head: format!("{:016x}", hasher.digest()),
            ends_line: last == b'\n',
        })
    }

    /// The mark of lines held in memory, hashing the first `min(len,
    /// limit)` bytes of their text (lines joined by newlines).
    pub fn of_lines(lines: &[String], limit: u64) -> InputMark {
        let text = lines.join("\n");
        let end = text.len().min(limit.min(usize::MAX as u64) as usize);
        InputMark {
            path: "(memory)".into(),
            len: text.len() as u64,
            head: format!(
                "{:016x}",
                xxhash_rust::xxh3::xxh3_64(&text.as_bytes()[..end])
            ),
            // Lines held in memory are whole lines.
            ends_line: true,
        }
    }
}

/// How far the outputs had been written when a checkpoint was taken: every
/// segment diff of a time before `segments_bound` and every dead letter of
/// a time before `dead_bound`, and nothing else, were in the outputs, whose
/// files (if they are files) were then `segments_len` and `dead_len` bytes
/// long. A resumed run cuts the files back to these lengths and writes
/// only what comes after the bounds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkPositions {
    /// The segment output, as messages name it (a path, `standard output`,
    /// `tcp://..`).
    pub segments: String,
    /// Every diff of a time before this was written.
    pub segments_bound: u64,
    /// Bytes written to the segment output.
    pub segments_len: u64,
    /// The dead-letter output (a path, or empty for none).
    pub dead_letters: String,
    /// Every dead letter of a time before this was written.
    pub dead_bound: u64,
    /// Bytes written to the dead-letter output.
    pub dead_len: u64,
    /// [`tail_hash`] of the segment output at `segments_len` (empty if it
    /// is not a file).
    #[serde(default)]
    pub segments_tail: String,
    /// [`tail_hash`] of the dead-letter output at `dead_len`.
    #[serde(default)]
    pub dead_tail: String,
}

/// How many bytes before an output's checkpointed length [`tail_hash`]
/// covers.
pub const TAIL_BYTES: u64 = 4096;

/// xxh3-64, in hex, of the [`TAIL_BYTES`] of the file at `path` that end
/// at byte `len` (fewer if `len` is smaller); empty if `path` is not a
/// regular file or cannot be read that far. A resume compares it, so that
/// an output rewritten by something else to at least the same length is
/// not taken for its own.
pub fn tail_hash(path: &str, len: u64) -> String {
    use std::os::unix::fs::FileExt;
    let Ok(file) = std::fs::File::open(path) else {
        return String::new();
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = vec![0u8; (len - start) as usize];
    match file.read_exact_at(&mut buf, start) {
        Ok(()) => format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&buf)),
        Err(_) => String::new(),
    }
}

/// A new run identity: the wall-clock time in nanoseconds and the process
/// id, in hex.
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

fn one_process() -> usize {
    1
}

impl Default for Checkpoint {
    fn default() -> Checkpoint {
        Checkpoint {
            time: 0,
            offsets: BTreeMap::new(),
            processes: 1,
            run: String::new(),
            fingerprint: String::new(),
            fingerprint_parts: BTreeMap::new(),
            inputs: BTreeMap::new(),
            sinks: None,
            retained: None,
        }
    }
}

/// The directory of process `process`'s part of the state in `dir`: `dir`
/// itself for process 0, the sibling `<dir>-process<p>` for the others (so
/// that processes on one machine given the same `state_dir` do not meet).
pub fn part_dir(dir: &Path, process: usize) -> std::path::PathBuf {
    if process == 0 {
        return dir.to_path_buf();
    }
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-process{process}"));
    dir.with_file_name(name)
}

/// The changes of one or more completed times, to be written at once
/// ([`StateBatch::stage`], [`Store::write`]): the last value (or removal) of
/// each key, since only the state after the last time is ever visible. A
/// trait value that changed at a thousand times of one batch is written
/// once, and trait values staged by key ([`StateBatch::set_trait`]) are
/// turned into text only then ([`StateBatch::name_traits`]).
#[derive(Default)]
pub struct StateBatch {
    bytes:
        std::collections::HashMap<(usize, Vec<u8>), Option<Vec<u8>>, foldhash::fast::RandomState>,
    /// Trait values by `(profile key, trait index)`; null: removed.
    values: std::collections::HashMap<(Id, u32), Scalar, foldhash::fast::RandomState>,
}

impl StateBatch {
    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.values.is_empty()
    }

    fn put(&mut self, cf: usize, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.bytes.insert((cf, key.into()), Some(value.into()));
    }

    fn delete(&mut self, cf: usize, key: impl Into<Vec<u8>>) {
        self.bytes.insert((cf, key.into()), None);
    }

    /// Adds the changes of `later` (of later times) after those staged:
    /// where both change a key, `later`'s change stays.
    pub fn absorb(&mut self, later: StateBatch) {
        // The first batch absorbed is taken as it is, not rehashed.
        if self.bytes.is_empty() {
            self.bytes = later.bytes;
        } else {
            self.bytes.extend(later.bytes);
        }
        if self.values.is_empty() {
            self.values = later.values;
        } else {
            self.values.extend(later.values);
        }
    }

    /// Stages the value of trait `index` of the profile with key
    /// `profile` (null: it has none), by key: named when the batch is
    /// written ([`StateBatch::name_traits`]), so that a value replaced
    /// later in the batch is never turned into text.
    pub fn set_trait(&mut self, profile: Id, index: u32, value: Scalar) {
        self.values.insert((profile, index), value);
    }

    /// Turns the trait values staged by key into keys and text, with the
    /// profiles' `names` and the `traits`' names (by index; an index with
    /// [`COUNT_OF`] set is the count of a most frequent value, kept as
    /// `NAME.count`). The error is an internal one (a key without a name).
    pub fn name_traits(&mut self, names: &IdMap<String>, traits: &[String]) -> Result<(), String> {
        let values = std::mem::take(&mut self.values);
        self.bytes.reserve(values.len());
        let mut count_name = String::new();
        for ((profile, index), value) in values {
            let profile = names.get(&profile).ok_or_else(|| {
                format!(
                    "internal error: no name for identifier key {:032x}",
                    profile.0
                )
            })?;
            let name = traits
                .get((index & !COUNT_OF) as usize)
                .ok_or_else(|| format!("internal error: no trait {index}"))?;
            let insert = value != Scalar::Null;
            if index & COUNT_OF != 0 {
                count_name.clear();
                count_name.push_str(name);
                count_name.push_str(".count");
                self.trait_value(profile, &count_name, &value, insert);
            } else {
                self.trait_value(profile, name, &value, insert);
            }
        }
        Ok(())
    }

    /// Adds one completed timestamp's changes, after the times already
    /// staged.
    pub fn stage(&mut self, ops: &[(StoreOp, isize)]) {
        // Removals first, then insertions: a value that changed at this time
        // appears as (old, -1) and (new, +1) on the same key.
        for pass_insert in [false, true] {
            for (op, diff) in ops {
                if (*diff > 0) != pass_insert {
                    continue;
                }
                match op {
                    StoreOp::Link { id, profile } => self.link(id, profile, pass_insert),
                    StoreOp::Trait {
                        profile,
                        name,
                        value,
                    } => self.trait_value(profile, name, value, pass_insert),
                    StoreOp::Segment { profile, name } => self.segment(profile, name, pass_insert),
                    StoreOp::Attributes { profile, json } => {
                        self.attributes(profile, json, pass_insert)
                    }
                }
            }
        }
    }

    /// Stages that identifier `id` belongs (`insert`) or no longer belongs
    /// to `profile`. Within one time, stage removals before insertions.
    pub fn link(&mut self, id: &str, profile: &str, insert: bool) {
        if insert {
            self.put(ID_PROFILE, id.as_bytes(), profile.as_bytes());
            self.put(PROFILE_IDS, key2(profile, id), Vec::new());
        } else {
            self.delete(ID_PROFILE, id.as_bytes());
            self.delete(PROFILE_IDS, key2(profile, id));
        }
    }

    /// Stages a trait's value of a profile (`insert`), or its removal (the
    /// value is then not read).
    pub fn trait_value(&mut self, profile: &str, name: &str, value: &Scalar, insert: bool) {
        let key = key2(profile, name);
        if insert {
            // JSON text, without building a `serde_json::Value` (numbers
            // as Rust writes them: the shortest text that reads back the
            // same, never an exponent).
            let text = match value {
                Scalar::Num(n) if n.is_finite() => number_text(*n),
                Scalar::Bool(b) => b.to_string(),
                Scalar::Str(s) => serde_json::to_string(s).expect("a string serializes"),
                _ => "null".to_string(),
            };
            self.put(TRAITS, key, text);
        } else {
            self.delete(TRAITS, key);
        }
    }

    /// Stages a segment membership (`insert`) or its end.
    pub fn segment(&mut self, profile: &str, name: &str, insert: bool) {
        let key = key2(profile, name);
        if insert {
            self.put(SEGMENTS, key, Vec::new());
        } else {
            self.delete(SEGMENTS, key);
        }
    }

    /// Stages a profile's merged attributes as a JSON object (`insert`), or
    /// their removal (`json` is then not read).
    pub fn attributes(&mut self, profile: &str, json: &str, insert: bool) {
        if insert {
            self.put(ATTRIBUTES, profile.as_bytes(), json.as_bytes());
        } else {
            self.delete(ATTRIBUTES, profile.as_bytes());
        }
    }
}

/// Retained updates of completed times (see `dataflow::retain`), written
/// with a checkpoint ([`Store::write_retained`]): CRM versions (the latest
/// is kept by a merge), identifier sets and names (puts), lifetime totals
/// and point counts (added up here first and then by merges), and the
/// windowed items of events (appended).
#[derive(Default)]
pub struct RetainedBatch {
    crm: Vec<(String, std::sync::Arc<CrmRecord>)>,
    sets: Vec<Vec<Id>>,
    names: Vec<(Id, String)>,
    totals: std::collections::HashMap<(Id, u32), i128, foldhash::fast::RandomState>,
    /// By `(last window end, tick, identifier)`.
    /// The items encoded ([`crate::dataflow::retain::encode_item_into`]).
    events: std::collections::HashMap<(Time, Time, Id), Vec<u8>, foldhash::fast::RandomState>,
    points: std::collections::HashMap<PointContribution, i64, foldhash::fast::RandomState>,
    /// The point held per `(identifier, trait)`, the last one staged.
    held: std::collections::HashMap<(Id, u32), (Time, Scalar), foldhash::fast::RandomState>,
    /// When a profile entered a segment with a dwell time (`None`: it
    /// left), per `(profile, segment)`, the last one staged.
    dwell: std::collections::HashMap<(Id, String), Option<Time>, foldhash::fast::RandomState>,
}

/// The key of a lifetime point: identifier key, trait index, tick (all
/// big-endian), then the value in bincode.
fn point_key((id, (index, (tick, value))): &PointContribution) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    k.extend_from_slice(&id.0.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k.extend_from_slice(&tick.to_be_bytes());
    k.extend(bincode::serialize(value).expect("a scalar serializes"));
    k
}

/// [`point_key`] read back.
fn point_from_key(k: &[u8]) -> Option<PointContribution> {
    let id = Id(u128::from_be_bytes(k.get(..16)?.try_into().ok()?));
    let index = u32::from_be_bytes(k.get(16..20)?.try_into().ok()?);
    let tick = u64::from_be_bytes(k.get(20..28)?.try_into().ok()?);
    let value = bincode::deserialize(k.get(28..)?).ok()?;
    Some((id, (index, (tick, value))))
}

/// The key of a lifetime total: identifier key (16 bytes, big-endian),
/// slot (4 bytes, big-endian).
fn total_key(id: Id, index: u32) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&id.0.to_be_bytes());
    k[16..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The key of an event's windowed items: the last of their window ends
/// first (so that the events whose windows all ended are one range), then
/// its tick and identifier key.
fn event_key(last_end: Time, tick: Time, id: Id) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&last_end.to_be_bytes());
    k[8..16].copy_from_slice(&tick.to_be_bytes());
    k[16..].copy_from_slice(&id.0.to_be_bytes());
    k
}

/// A merge that appends values (of `retained_events`).
fn append(_key: &[u8], existing: Option<&[u8]>, ops: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut out = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in ops {
        out.extend_from_slice(op);
    }
    Some(out)
}

impl RetainedBatch {
    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.crm.is_empty()
            && self.sets.is_empty()
            && self.names.is_empty()
            && self.totals.is_empty()
            && self.events.is_empty()
            && self.points.is_empty()
            && self.held.is_empty()
            && self.dwell.is_empty()
    }

    /// Adds the updates of `later` after those staged.
    pub fn absorb(&mut self, later: RetainedBatch) {
        self.crm.extend(later.crm);
        self.sets.extend(later.sets);
        self.names.extend(later.names);
        for (k, v) in later.totals {
            *self.totals.entry(k).or_default() += v;
        }
        for (k, items) in later.events {
            self.events.entry(k).or_default().extend_from_slice(&items);
        }
        for (k, v) in later.points {
            *self.points.entry(k).or_default() += v;
        }
        self.held.extend(later.held);
        self.dwell.extend(later.dwell);
    }

    /// Stages one retained update at `time` with `diff`. Only insertions
    /// of CRM versions, sets and names are retained: they are
    /// insert-only.
    pub fn stage(&mut self, update: Retained, time: Time, diff: isize) {
        match update {
            Retained::Total(id, slot, value) => {
                *self.totals.entry((id, slot)).or_default() += value * diff as i128;
            }
            Retained::Point(p) => *self.points.entry(p).or_default() += diff as i64,
            Retained::Held((id, (index, point))) => {
                self.held.insert((id, index), point);
            }
            Retained::DwellEntry(profile, segment, entered) => {
                let key = (profile, segment);
                // An exit removes the entry it closes, not a later one.
                if diff > 0 {
                    self.dwell.insert(key, Some(entered));
                } else if self.dwell.get(&key).is_none_or(|e| *e == Some(entered)) {
                    self.dwell.insert(key, None);
                }
            }
            Retained::Event(id, items, last_end) => {
                let held = self.events.entry((last_end, time, id)).or_default();
                if diff == 1 {
                    held.extend_from_slice(&items);
                } else {
                    for item in decode_items(&items).into_iter().flatten() {
                        encode_item_into(&item.scaled(diff), held);
                    }
                }
            }
            _ if diff <= 0 => {}
            Retained::Crm(crm_id, record) => self.crm.push((crm_id, record)),
            Retained::Set(ids) => self.sets.push(ids),
            Retained::Name(id, name) => self.names.push((id, name)),
        }
    }

    /// Adds the staged updates to `batch`, in the retained column
    /// families `cfs` (in [`RETAINED_CFS`] order); events whose windows
    /// all end before `cut` are left out.
    fn write_into(self, batch: &mut WriteBatch, cfs: &[&rocksdb::ColumnFamily], cut: Time) {
        for (crm_id, record) in &self.crm {
            batch.merge_cf(cfs[R_CRM], crm_id.as_bytes(), encode_crm(record));
        }
        for ids in &self.sets {
            let key: Vec<u8> = ids.iter().flat_map(|id| id.0.to_be_bytes()).collect();
            batch.put_cf(cfs[R_SETS], key, []);
        }
        for (id, name) in &self.names {
            batch.put_cf(cfs[R_NAMES], id.0.to_be_bytes(), name.as_bytes());
        }
        for ((id, index), total) in self.totals {
            if total != 0 {
                batch.merge_cf(cfs[R_TOTALS], total_key(id, index), total.to_le_bytes());
            }
        }
        for ((last_end, tick, id), items) in self.events {
            if last_end >= cut && !items.is_empty() {
                let key = event_key(last_end, tick, id);
                batch.merge_cf(cfs[R_EVENTS], key, items);
            }
        }
        for (p, count) in self.points {
            if count != 0 {
                batch.merge_cf(cfs[R_POINTS], point_key(&p), count.to_le_bytes());
            }
        }
        for ((id, index), (tick, value)) in self.held {
            let mut v = tick.to_be_bytes().to_vec();
            v.extend(bincode::serialize(&value).expect("a scalar serializes"));
            batch.put_cf(cfs[R_HELD], total_key(id, index), v);
        }
        for ((profile, segment), entered) in self.dwell {
            let mut key = profile.0.to_be_bytes().to_vec();
            key.extend_from_slice(segment.as_bytes());
            match entered {
                Some(at) => batch.put_cf(cfs[R_DWELL], key, at.to_be_bytes()),
                None => batch.delete_cf(cfs[R_DWELL], key),
            }
        }
    }
}

/// An adding merge of little-endian integers of `N` bytes (`i64` counts
/// of `retained_points`, `i128` totals of `retained_totals`), saturating.
fn add_le<const N: usize>(
    _key: &[u8],
    existing: Option<&[u8]>,
    ops: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let total = existing.into_iter().chain(ops.iter()).fold(0i128, |t, b| {
        let v = match N {
            8 => b.try_into().map(i64::from_le_bytes).map_or(0, i128::from),
            _ => b.try_into().map(i128::from_le_bytes).unwrap_or(0),
        };
        t.saturating_add(v)
    });
    Some(match N {
        8 => (total.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
            .to_le_bytes()
            .to_vec(),
        _ => total.to_le_bytes().to_vec(),
    })
}

/// The tag byte of a retained CRM record in bincode; a record without it
/// (its first byte is `{`) is JSON, as checkpoints written before the
/// binary encoding hold them (they restore as they are).
const CRM_BINCODE: u8 = 0;

/// A retained CRM record's bytes: [`CRM_BINCODE`], then the record in
/// bincode 1 (its serde fields in order, fixed-width integers).
fn encode_crm(record: &CrmRecord) -> Vec<u8> {
    let mut bytes = vec![CRM_BINCODE];
    bincode::serialize_into(&mut bytes, record).expect("a CRM record encodes");
    bytes
}

/// Reads [`encode_crm`]'s bytes, or a record's JSON; `None` if they are
/// neither.
fn decode_crm(bytes: &[u8]) -> Option<CrmRecord> {
    match bytes.split_first() {
        Some((&CRM_BINCODE, rest)) => bincode::deserialize(rest).ok(),
        _ => serde_json::from_slice(bytes).ok(),
    }
}

/// The `updated_ms` of a record in [`encode_crm`]'s bytes, read without
/// decoding the rest: bincode 1 writes the `crm_id` as a little-endian
/// u64 length and its bytes, then `updated_ms` as a little-endian i64.
fn crm_updated_ms(bytes: &[u8]) -> Option<i64> {
    let (&CRM_BINCODE, rest) = bytes.split_first()? else {
        return None;
    };
    let len = usize::try_from(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)).ok()?;
    let at = 8usize.checked_add(len)?;
    Some(i64::from_le_bytes(rest.get(at..at + 8)?.try_into().ok()?))
}

/// The merge of `retained_crm`: keeps the latest version, as the upsert
/// does ([`CrmRecord`]'s order, the `crm_id` being the key's: `updated_ms`,
/// then content). Binary records are compared by their `updated_ms` alone
/// when it differs; undecodable operands are dropped.
fn latest_crm(
    _key: &[u8],
    existing: Option<&[u8]>,
    ops: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    let mut best: Option<&[u8]> = None;
    for bytes in existing.into_iter().chain(ops.iter()) {
        let later = match best {
            None => decode_crm(bytes).is_some(),
            Some(b) => match (crm_updated_ms(bytes), crm_updated_ms(b)) {
                (Some(new), Some(old)) if new != old => new > old,
                _ => match (decode_crm(bytes), decode_crm(b)) {
                    (Some(new), Some(old)) => new > old,
                    _ => false,
                },
            },
        };
        if later {
            best = Some(bytes);
        }
    }
    best.map(<[u8]>::to_vec)
}

/// Column family indexes in [`CFS`], for [`StateBatch`].
const ID_PROFILE: usize = 0;
const PROFILE_IDS: usize = 1;
const ATTRIBUTES: usize = 2;
const TRAITS: usize = 3;
const SEGMENTS: usize = 4;

/// One change to apply: `+1` inserts, `-1` removes.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    /// Identifier belongs to profile.
    Link {
        /// The identifier.
        id: String,
        /// Its profile.
        profile: String,
    },
    /// A trait value (as users see it).
    Trait {
        /// The profile.
        profile: String,
        /// Trait name.
        name: String,
        /// Value.
        value: Scalar,
    },
    /// Segment membership.
    Segment {
        /// The profile.
        profile: String,
        /// Segment name.
        name: String,
    },
    /// Merged CRM attributes.
    Attributes {
        /// The profile.
        profile: String,
        /// Attributes as a JSON object.
        json: String,
    },
}

/// Everything known about one profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileView {
    /// The profile id (its canonical identifier).
    pub profile: String,
    /// All identifiers of the profile.
    pub identifiers: Vec<String>,
    /// Merged CRM attributes.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Current trait values by name (traits at zero are absent).
    pub traits: BTreeMap<String, serde_json::Value>,
    /// Segments the profile is in.
    pub segments: Vec<String>,
    /// The checkpoint the state is as of.
    pub as_of: Option<Checkpoint>,
}

/// The RocksDB state store.
pub struct Store {
    db: DB,
    dir: String,
    /// A secondary instance ([`FollowedPart`]): it has no snapshots, and
    /// changes only when it catches up.
    secondary: bool,
}

/// What one lookup reads a part at: a snapshot of a part being written,
/// or a secondary instance as it is (it changes only when it catches up,
/// which [`FollowedPart`] keeps from happening during a read).
enum ReadAt<'a> {
    Snapshot(rocksdb::Snapshot<'a>),
    Current(&'a DB),
}

impl ReadAt<'_> {
    fn get_cf(
        &self,
        cf: &rocksdb::ColumnFamily,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, rocksdb::Error> {
        match self {
            ReadAt::Snapshot(s) => s.get_cf(cf, key),
            ReadAt::Current(db) => db.get_cf(cf, key),
        }
    }

    fn iterator_cf_opt<'b>(
        &'b self,
        cf: &rocksdb::ColumnFamily,
        read: rocksdb::ReadOptions,
        mode: IteratorMode<'_>,
    ) -> rocksdb::DBIteratorWithThreadMode<'b, DB> {
        match self {
            ReadAt::Snapshot(s) => s.iterator_cf_opt(cf, read, mode),
            ReadAt::Current(db) => db.iterator_cf_opt(cf, read, mode),
        }
    }
}

/// The bytes an unprivileged process may still write on the file system
/// of `dir` (`statvfs`), if it can be asked.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// The key of `(a, b)`: the length of `a` (4 bytes, big-endian), `a`, then
/// `b`. The length makes the key unambiguous whatever bytes `a` holds (a
/// separator byte could appear inside an identifier and let one profile's
/// prefix scan reach another's keys), and every key of `a` still shares
/// the prefix `key2(a, "")`.
fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + a.len() + b.len());
    k.extend_from_slice(&u32::try_from(a.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(a.as_bytes());
    k.extend_from_slice(b.as_bytes());
    k
}

/// A finite number as JSON text, as Rust's `Display` writes it (the
/// shortest text that reads back the same, never an exponent): a whole
/// number below 2^53 through the integer formatter, which gives the same
/// digits several times faster (counts and most sums are whole), the
/// rest, and `-0`, through `Display`.
fn number_text(n: f64) -> String {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if n.fract() == 0.0 && n.abs() < EXACT && !(n == 0.0 && n.is_sign_negative()) {
        (n as i64).to_string()
    } else {
        n.to_string()
    }
}

/// The length of the `key2(a, "")` prefix that starts `key`: 4 bytes of
/// length, then `a`.
fn owner_prefix_len(key: &[u8]) -> Option<usize> {
    let len: [u8; 4] = key.get(..4)?.try_into().ok()?;
    let end = 4 + u32::from_be_bytes(len) as usize;
    (end <= key.len()).then_some(end)
}

/// The prefix extractor of the column families keyed by profile
/// (`key2(profile, ..)`): the profile's part of the key, so that RocksDB
/// keeps a Bloom filter of profiles per table and a profile's scan skips
/// every table without it (a live run's state has many small tables).
fn owner_prefix(key: &[u8]) -> &[u8] {
    match owner_prefix_len(key) {
        Some(end) => &key[..end],
        None => key,
    }
}

fn has_owner_prefix(key: &[u8]) -> bool {
    owner_prefix_len(key).is_some()
}

/// The column families whose keys are `key2(profile, ..)`, scanned by
/// profile.
const BY_PROFILE: [&str; 3] = ["profile_ids", "traits", "segments"];

/// The most memory all column families' memtables (RocksDB's write
/// buffers) may take together: 16 MiB. When the total reaches it, RocksDB
/// flushes the largest memtable to disk. Without a total, each of the
/// column families would buffer up to 64 MiB (RocksDB's default) and a long
/// run's memory would grow by hundreds of MiB before the first flush.
pub const MEMTABLE_BUDGET_BYTES: usize = 16 << 20;

/// One column family's memtable size: 4 MiB.
const MEMTABLE_BYTES: usize = 4 << 20;

/// The block cache shared by all column families (uncompressed blocks,
/// indexes and Bloom filters read by lookups): 8 MiB.
pub const BLOCK_CACHE_BYTES: usize = 8 << 20;

/// The size of a table block (RocksDB's unit of compression and of reads).
const BLOCK_BYTES: usize = 16 << 10;

/// How many tables a column family's level 0 holds before RocksDB
/// compacts them into the level below (writes slow down at twice as many
/// and stop at three times).
const L0_COMPACTION_TRIGGER: i32 = 16;

/// RocksDB options for the state: memory bounded by
/// [`MEMTABLE_BUDGET_BYTES`] plus [`BLOCK_CACHE_BYTES`] (indexes and
/// filters are held in that cache, not beside it), LZ4-compressed tables
/// below the first level, blocks of [`BLOCK_BYTES`],
/// and a 10-bit Bloom filter per key for the point lookups of `segflow
/// query`. Returns the database options and each column family's.
fn rocks_options() -> (Options, Vec<ColumnFamilyDescriptor>) {
    let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_bloom_filter(10.0, false);
    // 16 KiB blocks, not 4 KiB: RocksDB's LZ4 sets up (zeroes) a 16 KiB
    // stream state for every block it compresses, and with 4 KiB blocks
    // that took 2% of a replay's instructions (the compression itself
    // 3.6%); point lookups read one block either way.
    table.set_block_size(BLOCK_BYTES);
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    // Flushing every column family together keeps what is on disk one
    // completed time (and lets the write-ahead log be dropped).
    opts.set_atomic_flush(true);
    opts.set_max_background_jobs(2);
    let cfs = CFS
        .iter()
        .chain(RETAINED_CFS.iter())
        .map(|n| {
            let mut cf = Options::default();
            cf.set_write_buffer_size(MEMTABLE_BYTES);
            cf.set_max_write_buffer_number(2);
            // Tables just flushed are merged into the next level soon:
            // compressing them is work thrown away. The levels below
            // keep what stays, LZ4-compressed.
            cf.set_compression_per_level(&[
                rocksdb::DBCompressionType::None,
                rocksdb::DBCompressionType::Lz4,
            ]);
            cf.set_block_based_table_factory(&table);
            if BY_PROFILE.contains(n) {
                cf.set_prefix_extractor(rocksdb::SliceTransform::create(
                    "segflow_profile_prefix",
                    owner_prefix,
                    Some(has_owner_prefix),
                ));
            }
            // Sixteen tables at level 0 before they are compacted, not
            // RocksDB's four: the state is written at every batch and read
            // only by point lookups (a Bloom filter per table) and at a
            // restore, and the retained input is deleted as its windows
            // close. Compacting a quarter as often saves 13% of the
            // instructions of a 200k-event replay (compaction was 14% of
            // them); a lookup checks the Bloom filters of more tables.
            cf.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_TRIGGER);
            cf.set_level_zero_slowdown_writes_trigger(2 * L0_COMPACTION_TRIGGER);
            cf.set_level_zero_stop_writes_trigger(3 * L0_COMPACTION_TRIGGER);
            match *n {
                "retained_crm" => {
                    cf.set_merge_operator_associative("segflow_latest_crm", latest_crm)
                }
                "retained_totals" => {
                    cf.set_merge_operator_associative("segflow_add_i128", add_le::<16>)
                }
                "retained_events" => cf.set_merge_operator_associative("segflow_append", append),
                "retained_points" => {
                    cf.set_merge_operator_associative("segflow_add_i64", add_le::<8>);
                    // A point whose count adds up to zero: compactions
                    // drop it.
                    cf.set_compaction_filter("segflow_drop_zero", |_level, _key, value| {
                        if value == 0i64.to_le_bytes() {
                            rocksdb::compaction_filter::Decision::Remove
                        } else {
                            rocksdb::compaction_filter::Decision::Keep
                        }
                    });
                }
                _ => {}
            }
            ColumnFamilyDescriptor::new(*n, cf)
        })
        .collect();
    (opts, cfs)
}

/// [`rocks_options`] for a store that exists (read-only or secondary):
/// nothing is created, and the retained input's families only if it has
/// them (state written before the retained input has none).
fn existing_store_options(dir: &Path) -> (Options, Vec<ColumnFamilyDescriptor>) {
    let (mut opts, mut cfs) = rocks_options();
    opts.create_if_missing(false);
    opts.create_missing_column_families(false);
    if let Ok(existing) = DB::list_cf(&opts, dir) {
        cfs.retain(|cf| {
            !RETAINED_CFS.contains(&cf.name()) || existing.iter().any(|e| e == cf.name())
        });
    }
    (opts, cfs)
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, with the memory
    /// bounds of [`MEMTABLE_BUDGET_BYTES`] and [`BLOCK_CACHE_BYTES`].
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let (opts, cfs) = rocks_options();
        let name = dir.display().to_string();
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StoreError::Rocks {
            dir: name.clone(),
            source,
        })?;
        Ok(Store {
            db,
            dir: name,
            secondary: false,
        })
    }

    /// Opens an empty store in `dir`, whose [`StateLock`] the caller holds,
    /// removing the state a previous run left there: a run's state is always
    /// exactly its own result. (Resuming from the checkpoint after a crash
    /// will open the existing state instead.)
    ///
    /// Only state that segflow created is removed: a directory that holds
    /// anything but segflow state of this format (a marker file,
    /// [`MARKER_FILE`], says so) is refused with [`StoreError::NotOurs`].
    pub fn create_fresh(dir: &Path, _lock: &StateLock) -> Result<Store, StoreError> {
        let name = dir.display().to_string();
        // Refuses anything segflow did not create, untouched.
        inspect(dir)?;
        // The marker says "resetting" until the new store exists: a run
        // killed in between leaves a directory that the next run starts
        // afresh (see [`Store::is_resumable`]), never half a store.
        write_marker(dir, true)?;
        DB::destroy(&Options::default(), dir).map_err(|source| StoreError::Rocks {
            dir: name.clone(),
            source,
        })?;
        let store = Store::open(dir)?;
        write_marker(dir, false)?;
        Ok(store)
    }

    /// Whether `dir` holds a store that a run may resume: one that a reset
    /// finished creating (its marker does not say "resetting") and that
    /// RocksDB finished creating (it has its `CURRENT` file).
    pub fn is_resumable(dir: &Path) -> bool {
        let marker = std::fs::read_to_string(dir.join(MARKER_FILE)).unwrap_or_default();
        marker.lines().nth(1).map(str::trim) != Some(RESETTING) && dir.join("CURRENT").is_file()
    }

    /// Opens an existing store for reading (works while a run holds it).
    /// Creates nothing; a directory that does not hold segflow state is
    /// refused ([`StoreError::NoState`], [`StoreError::NotOurs`]).
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        let name = dir.display().to_string();
        match inspect(dir)? {
            Found::Nothing => return Err(StoreError::NoState { dir: name }),
            Found::Older(version) => return Err(StoreError::OlderFormat { dir: name, version }),
            Found::Ours => {}
        }
        let (opts, cfs) = existing_store_options(dir);
        let db = DB::open_cf_descriptors_read_only(&opts, dir, cfs, false).map_err(|source| {
            StoreError::Rocks {
                dir: name.clone(),
                source,
            }
        })?;
        Ok(Store {
            db,
            dir: name,
            secondary: false,
        })
    }

    /// What a read of several keys looks at (see [`ReadAt`]).
    fn read_at(&self) -> ReadAt<'_> {
        match self.secondary {
            true => ReadAt::Current(&self.db),
            false => ReadAt::Snapshot(self.db.snapshot()),
        }
    }

    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            dir: self.dir.clone(),
            source,
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Applies one completed timestamp's changes and its checkpoint in one
    /// atomic write (a [`StateBatch`] of one time).
    pub fn commit(
        &self,
        ops: &[(StoreOp, isize)],
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let mut batch = StateBatch::default();
        batch.stage(ops);
        self.write(batch, checkpoint)
    }

    /// Writes `batch` (every time staged in it, in order) and `checkpoint`
    /// (the last of those times) in one atomic write, so what is on disk is
    /// always the state of one completed time with its checkpoint. The
    /// write goes through the write-ahead log without waiting for it to
    /// reach the disk: a killed process loses nothing written, while a
    /// machine that loses power may lose the last batches (a restart then
    /// resumes from an earlier checkpoint). Batches are few (one per
    /// advance of the frontier), so the log costs little; a flush
    /// ([`Store::flush`]) writes every column family at once
    /// (`atomic_flush`) and lets the log be dropped.
    pub fn write(&self, batch: StateBatch, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        self.write_retained(batch, RetainedBatch::default(), checkpoint)
    }

    /// [`Store::write`], with `retained` updates in the same atomic
    /// write; the events whose windows all end before the checkpoint's
    /// cut ([`Checkpoint::retained`]) are removed.
    pub fn write_retained(
        &self,
        batch: StateBatch,
        retained: RetainedBatch,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        debug_assert!(
            batch.values.is_empty(),
            "trait values are named before writing"
        );
        let mut staged: Vec<((usize, Vec<u8>), Option<Vec<u8>>)> =
            batch.bytes.into_iter().collect();
        // Sorted: the same batch for the same changes, and RocksDB inserts
        // sorted keys faster.
        staged.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let cfs: Vec<&rocksdb::ColumnFamily> = CFS.iter().map(|n| self.cf(n)).collect();
        let mut batch = WriteBatch::default();
        for ((cf, key), value) in staged {
            match value {
                Some(v) => batch.put_cf(cfs[cf], key, v),
                None => batch.delete_cf(cfs[cf], key),
            }
        }
        if !retained.is_empty() || checkpoint.retained.is_some() {
            let rcfs: Vec<&rocksdb::ColumnFamily> =
                RETAINED_CFS.iter().map(|n| self.cf(n)).collect();
            let cut = checkpoint.retained.as_ref().map_or(0, |r| r.cut);
            retained.write_into(&mut batch, &rcfs, cut);
            if cut > 0 {
                batch.delete_range_cf(rcfs[R_EVENTS], 0u64.to_be_bytes(), cut.to_be_bytes());
            }
        }
        let cp = serde_json::to_vec(checkpoint).expect("checkpoint serializes");
        batch.put_cf(self.cf("checkpoint"), b"checkpoint", cp);
        crate::fault::point("state-write-before");
        self.db.write(batch).map_err(|e| self.err(e))?;
        crate::fault::point("state-write-after");
        Ok(())
    }

    /// Why the store no longer takes writes, if it has stopped after a
    /// background error (a flush or compaction that failed): RocksDB then
    /// blocks writes until its error recovery succeeds, which on a full
    /// disk it polls for without end (`SstFileManagerImpl::ClearError`).
    /// Read from RocksDB's properties `rocksdb.background-errors` and
    /// `rocksdb.is-write-stopped`, with the free space of the directory's
    /// file system. `None` while it takes writes, or has had no error.
    pub fn stopped_by_background_error(&self) -> Option<String> {
        let errors = self
            .db
            .property_int_value("rocksdb.background-errors")
            .ok()
            .flatten()
            .unwrap_or(0);
        let stopped = self
            .db
            .property_int_value("rocksdb.is-write-stopped")
            .ok()
            .flatten()
            .unwrap_or(0);
        if errors == 0 || stopped == 0 {
            return None;
        }
        let free = free_bytes(Path::new(&self.dir))
            .map(|b| format!(", {b} bytes free on its file system"))
            .unwrap_or_default();
        Some(format!(
            "the store stopped taking writes after {errors} background error(s) in a flush or compaction{free}: is its disk full?"
        ))
    }

    /// Flushes every column family's memtable to disk, atomically: readers
    /// (`segflow query`, [`Store::open_read_only`]) and a restart see the
    /// state up to the last batch written.
    pub fn flush(&self) -> Result<(), StoreError> {
        let cfs: Vec<&rocksdb::ColumnFamily> = CFS
            .iter()
            .chain(RETAINED_CFS.iter())
            .filter_map(|n| self.db.cf_handle(n))
            .collect();
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| self.err(e))
    }

    /// The retained input at `cut` (see `dataflow::retain`), for a restart.
    pub fn restored(&self, cut: Time) -> Result<Restored, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("retained {what}"));
        let id_at = |b: &[u8]| -> Option<Id> { Some(Id(u128::from_be_bytes(b.try_into().ok()?))) };
        // Every entry of column family `name`, through `f`.
        let each = |name: &str,
                    f: &mut dyn FnMut(&[u8], &[u8]) -> Result<(), StoreError>|
         -> Result<(), StoreError> {
            let started = std::time::Instant::now();
            let mut entries = 0u64;
            for item in self.db.iterator_cf(self.cf(name), IteratorMode::Start) {
                let (k, v) = item.map_err(|e| self.err(e))?;
                f(&k, &v)?;
                entries += 1;
            }
            let secs = started.elapsed().as_secs_f64();
            tracing::debug!(column_family = name, entries, secs, "read retained input");
            Ok(())
        };
        let crm = || {
            let mut out = Vec::new();
            each("retained_crm", &mut |k, v| {
                let crm_id = String::from_utf8(k.to_vec()).map_err(|_| corrupt("CRM id"))?;
                let record = decode_crm(v).ok_or_else(|| corrupt("CRM record"))?;
                out.push((crm_id, record));
                Ok(())
            })
            .map(|_| out)
        };
        let sets = || {
            let mut out: Vec<Vec<Id>> = Vec::new();
            each("retained_sets", &mut |k, _| {
                if k.len() % 16 != 0 {
                    return Err(corrupt("identifier set"));
                }
                out.push(k.chunks(16).filter_map(id_at).collect());
                Ok(())
            })
            .map(|_| out)
        };
        let names = || {
            let mut out = Vec::new();
            each("retained_names", &mut |k, v| {
                let id = id_at(k).ok_or_else(|| corrupt("name key"))?;
                let name = String::from_utf8(v.to_vec()).map_err(|_| corrupt("name"))?;
                out.push((id, name));
                Ok(())
            })
            .map(|_| out)
        };
        let totals = || {
            let mut out = Vec::new();
            each("retained_totals", &mut |k, v| {
                let (Some(id), Ok(index), Ok(total)) = (
                    k.get(..16).and_then(id_at),
                    k[16.min(k.len())..].try_into().map(u32::from_be_bytes),
                    v.try_into().map(i128::from_le_bytes),
                ) else {
                    return Err(corrupt("total"));
                };
                if total != 0 {
                    out.push((id, index, total));
                }
                Ok(())
            })
            .map(|_| out)
        };
        let events = || {
            let mut out = Vec::new();
            each("retained_events", &mut |k, v| {
                if k.len() != 32 {
                    return Err(corrupt("event key"));
                }
                let last_end = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                let tick = u64::from_be_bytes(k[8..16].try_into().expect("8 bytes"));
                let id = id_at(&k[16..]).ok_or_else(|| corrupt("event key"))?;
                let items = decode_items(v).ok_or_else(|| corrupt("event items"))?;
                if last_end >= cut && !items.is_empty() {
                    out.push((tick, id, items));
                }
                Ok(())
            })
            .map(|_| out)
        };
        let points = || {
            let mut out = Vec::new();
            each("retained_points", &mut |k, v| {
                let p = point_from_key(k).ok_or_else(|| corrupt("point"))?;
                let count = v
                    .try_into()
                    .map(i64::from_le_bytes)
                    .map_err(|_| corrupt("point count"))?;
                if count != 0 {
                    out.push((p, count as isize));
                }
                Ok(())
            })
            .map(|_| out)
        };
        let held = || {
            let mut out = Vec::new();
            each("retained_held", &mut |k, v| {
                let (Some(id), Ok(index), Some(tick), Some(value)) = (
                    k.get(..16).and_then(id_at),
                    k[16.min(k.len())..].try_into().map(u32::from_be_bytes),
                    v.get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_be_bytes),
                    v.get(8..)
                        .and_then(|b| bincode::deserialize::<Scalar>(b).ok()),
                ) else {
                    return Err(corrupt("held point"));
                };
                out.push(((id, (index, (tick, value))), 1));
                Ok(())
            })
            .map(|_| out)
        };
        let dwell = || {
            let mut out = Vec::new();
            each("retained_dwell", &mut |k, v| {
                let (Some(profile), Ok(segment), Ok(entered)) = (
                    k.get(..16).and_then(id_at),
                    std::str::from_utf8(&k[16.min(k.len())..]),
                    v.try_into().map(u64::from_be_bytes),
                ) else {
                    return Err(corrupt("dwell entry"));
                };
                out.push((profile, segment.to_string(), entered));
                Ok(())
            })
            .map(|_| out)
        };
        // The column families are read at once, one thread each.
        std::thread::scope(|scope| {
            let crm = scope.spawn(crm);
            let points = scope.spawn(points);
            let sets = scope.spawn(sets);
            let names = scope.spawn(names);
            let totals = scope.spawn(totals);
            let events = events()?;
            fn join<T>(
                h: std::thread::ScopedJoinHandle<'_, Result<T, StoreError>>,
            ) -> Result<T, StoreError> {
                h.join().unwrap_or_else(|_| {
                    Err(StoreError::Corrupt(
                        "retained input (a reader panicked)".into(),
                    ))
                })
            }
            Ok(Restored {
                cut,
                crm: join(crm)?,
                sets: join(sets)?,
                names: join(names)?,
                totals: join(totals)?,
                events,
                points: {
                    let mut points = join(points)?;
                    points.extend(held()?);
                    points
                },
                dwell_entries: dwell()?,
            })
        })
    }

    /// The last checkpoint, if any run completed a timestamp.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        match self
            .db
            .get_cf(self.cf("checkpoint"), b"checkpoint")
            .map_err(|e| self.err(e))?
        {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("checkpoint".into())),
        }
    }

    /// The profile of an identifier (`kind:value`, normalized).
    pub fn profile_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let v = self
            .db
            .get_cf(self.cf("id_profile"), id)
            .map_err(|e| self.err(e))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn scan(
        &self,
        snap: &ReadAt<'_>,
        cf: &str,
        profile: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = key2(profile, "");
        let mut out = Vec::new();
        // Only tables whose prefix filter may hold the profile are read.
        let mut read = rocksdb::ReadOptions::default();
        read.set_prefix_same_as_start(true);
        let iter = snap.iterator_cf_opt(
            self.cf(cf),
            read,
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                v.to_vec(),
            ));
        }
        Ok(out)
    }

    /// Everything about the profile of the first of `ids` that is known.
    pub fn lookup(&self, ids: &[Ident]) -> Result<Option<ProfileView>, StoreError> {
        for id in ids {
            if let Some(profile) = self.profile_of(id.as_str())? {
                return self.view(&profile).map(Some);
            }
        }
        Ok(None)
    }

    /// Everything about the profile of the first of `ids` that is known,
    /// read in one snapshot (the identifier's link and the profile's facts
    /// agree even while a run writes), without the checkpoint (`as_of` is
    /// `None`): the API's lookup, which says how fresh it is itself.
    pub fn lookup_current(&self, ids: &[Ident]) -> Result<Option<ProfileView>, StoreError> {
        lookup_current_in(&[self], ids)
    }

    /// The identifiers of one profile (`kind:value`, sorted; none for a
    /// profile that merged into another).
    pub fn identifiers(&self, profile: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .scan(&self.read_at(), "profile_ids", profile)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// Everything about one profile id.
    /// The reads see one snapshot: a run writing meanwhile changes none of
    /// the view's parts (each write is one completed frontier advance).
    pub fn view(&self, profile: &str) -> Result<ProfileView, StoreError> {
        self.view_in(&self.read_at(), profile, true)
    }

    /// [`Store::view`] in `snap`, with the checkpoint if `checkpoint`.
    fn view_in(
        &self,
        snap: &ReadAt<'_>,
        profile: &str,
        checkpoint: bool,
    ) -> Result<ProfileView, StoreError> {
        let identifiers = self
            .scan(snap, "profile_ids", profile)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut traits = BTreeMap::new();
        for (name, v) in self.scan(snap, "traits", profile)? {
            let value =
                serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt("traits".into()))?;
            traits.insert(name, value);
        }
        let segments = self
            .scan(snap, "segments", profile)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let attributes = match snap
            .get_cf(self.cf("attributes"), profile)
            .map_err(|e| self.err(e))?
        {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| StoreError::Corrupt("attributes".into()))?,
            None => Default::default(),
        };
        let stored = match checkpoint {
            true => snap
                .get_cf(self.cf("checkpoint"), b"checkpoint")
                .map_err(|e| self.err(e))?,
            false => None,
        };
        let as_of = match stored {
            None => None,
            Some(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .map_err(|_| StoreError::Corrupt("checkpoint".into()))?,
            ),
        };
        Ok(ProfileView {
            profile: profile.to_string(),
            identifiers,
            attributes,
            traits,
            segments,
            as_of,
        })
    }
}

/// The state of a run, read-only: every process's part (one for a run of
/// one process). Each part holds what its process's workers own (the
/// links of some identifiers, the traits, attributes and memberships of
/// some profiles), so a profile's facts may lie in several parts; a view
/// merges them.
pub struct StateParts {
    parts: Vec<Store>,
    /// Parts the checkpoint names but that are not on this machine (a
    /// cluster of several machines keeps each process's part where it ran),
    /// or that another run wrote.
    pub missing: Vec<std::path::PathBuf>,
}

impl StateParts {
    /// Opens process 0's part in `dir` and the parts of the other
    /// processes its checkpoint counts ([`part_dir`]); works while a run
    /// holds them. Creates nothing; errors as [`Store::open_read_only`].
    pub fn open_read_only(dir: &Path) -> Result<StateParts, StoreError> {
        let first = Store::open_read_only(dir)?;
        let checkpoint = first.checkpoint()?;
        let processes = checkpoint.as_ref().map_or(1, |c| c.processes.max(1));
        let run = checkpoint.map(|c| c.run).unwrap_or_default();
        let mut parts = vec![first];
        let mut missing = Vec::new();
        for p in 1..processes {
            let part = part_dir(dir, p);
            if let Found::Nothing = inspect(&part)? {
                missing.push(part);
                continue;
            }
            let store = Store::open_read_only(&part)?;
            // A part left by another run (or not yet written by this one)
            // is not this run's.
            match store.checkpoint()? {
                Some(c) if c.run == run => parts.push(store),
                _ => missing.push(part),
            }
        }
        Ok(StateParts { parts, missing })
    }

    /// Process 0's checkpoint: `None` until the run has written a
    /// completed time.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.parts[0].checkpoint()
    }

    /// Every stored fact but the checkpoints, `(column family, key,
    /// value)`, sorted: the same for a run of any number of workers or
    /// processes over the same input.
    pub fn entries(&self) -> Result<Vec<(String, Vec<u8>, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for part in &self.parts {
            for cf in CFS.iter().filter(|cf| **cf != "checkpoint") {
                for item in part.db.iterator_cf(part.cf(cf), IteratorMode::Start) {
                    let (k, v) = item.map_err(|e| part.err(e))?;
                    out.push((cf.to_string(), k.to_vec(), v.to_vec()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Everything about the profile of the first of `ids` that is known.
    pub fn lookup(&self, ids: &[Ident]) -> Result<Option<ProfileView>, StoreError> {
        match self.profiles_of(ids)?.first() {
            Some((_, profile)) => self.view(profile).map(Some),
            None => Ok(None),
        }
    }

    /// Every profile that one of `ids` belongs to, as `(identifier,
    /// profile)`, in the order of `ids`, each profile once.
    pub fn profiles_of(&self, ids: &[Ident]) -> Result<Vec<(String, String)>, StoreError> {
        let mut found: Vec<(String, String)> = Vec::new();
        for id in ids {
            for part in &self.parts {
                if let Some(profile) = part.profile_of(id.as_str())? {
                    if !found.iter().any(|(_, p)| *p == profile) {
                        found.push((id.as_str().to_string(), profile));
                    }
                    break;
                }
            }
        }
        Ok(found)
    }

    /// Everything about one profile id, merged over the parts; `as_of` is
    /// process 0's checkpoint at the latest time any part has written.
    pub fn view(&self, profile: &str) -> Result<ProfileView, StoreError> {
        let views = self
            .parts
            .iter()
            .map(|part| part.view(profile))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(merge_views(profile, views))
    }
}

/// One profile's views from several parts of a cluster's state, merged:
/// identifiers, traits and memberships are each in the part of the process
/// that owns them; `as_of` is the first part's checkpoint at the latest
/// time any part has written.
fn merge_views(profile: &str, views: Vec<ProfileView>) -> ProfileView {
    let mut merged = ProfileView {
        profile: profile.to_string(),
        ..Default::default()
    };
    for view in views {
        merged.identifiers.extend(view.identifiers);
        merged.traits.extend(view.traits);
        merged.segments.extend(view.segments);
        if merged.attributes.is_empty() {
            merged.attributes = view.attributes;
        }
        merged.as_of = match (merged.as_of.take(), view.as_of) {
            (Some(mut first), Some(other)) => {
                first.time = first.time.max(other.time);
                Some(first)
            }
            (first, other) => first.or(other),
        };
    }
    merged.identifiers.sort();
    merged.identifiers.dedup();
    merged.segments.sort();
    merged.segments.dedup();
    merged
}

/// The profile of the first of `ids` that one of `parts` knows, merged
/// over the parts (see [`merge_views`]), each part read in one snapshot
/// taken before any read, without the checkpoint (`as_of` is `None`): the
/// API's lookup, in a single process's state (one part) or a cluster's.
pub fn lookup_current_in(
    parts: &[&Store],
    ids: &[Ident],
) -> Result<Option<ProfileView>, StoreError> {
    let snaps: Vec<_> = parts.iter().map(|p| p.read_at()).collect();
    for id in ids {
        for (part, snap) in parts.iter().zip(&snaps) {
            let linked = snap
                .get_cf(part.cf("id_profile"), id.as_str())
                .map_err(|e| part.err(e))?;
            if let Some(profile) = linked {
                let profile = String::from_utf8_lossy(&profile).into_owned();
                let views = parts
                    .iter()
                    .zip(&snaps)
                    .map(|(part, snap)| part.view_in(snap, &profile, false))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Some(merge_views(&profile, views)));
            }
        }
    }
    Ok(None)
}

/// The identifiers of one profile (`kind:value`, sorted) over `parts`.
pub fn identifiers_in(parts: &[&Store], profile: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for part in parts {
        out.extend(part.identifiers(profile)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Another process's part of a running cluster's state, followed by
/// process 0 for its API: opened as a RocksDB secondary instance of the
/// part's directory (on this machine: the processes share a state
/// directory's location, see [`part_dir`]) and caught up with what its
/// process has written (its write-ahead log) when asked and the last
/// catch-up is older than the freshness asked for.
///
/// Every process completes the same times together (the cluster's
/// frontier), and each writes its changes of a completed time within
/// milliseconds: a part caught up now holds what process 0's part holds,
/// but for the changes of the last completed time that its process may
/// still be writing.
pub struct FollowedPart {
    primary: std::path::PathBuf,
    process: usize,
    run: String,
    /// The secondary instance's own directory (its log), removed on drop.
    secondary: std::path::PathBuf,
    open: std::sync::RwLock<Option<(std::sync::Arc<Store>, std::time::Instant)>>,
    /// Whether an unreadable part was logged.
    warned: std::sync::atomic::AtomicBool,
}

/// A read of a [`FollowedPart`]: the part does not catch up while it is
/// held.
pub struct FollowedRead<'a>(
    std::sync::RwLockReadGuard<'a, Option<(std::sync::Arc<Store>, std::time::Instant)>>,
);

impl std::ops::Deref for FollowedRead<'_> {
    type Target = Store;

    fn deref(&self) -> &Store {
        // `FollowedPart::current` returns only an opened part.
        &self.0.as_ref().expect("an opened part").0
    }
}

impl FollowedPart {
    /// Process `process`'s part of the state in `dir` ([`part_dir`]) of
    /// run `run` (opened at the first [`FollowedPart::current`]).
    pub fn new(dir: &Path, process: usize, run: &str) -> FollowedPart {
        let secondary = std::env::temp_dir().join(format!(
            "segflow-{}-part{process}-{}",
            std::process::id(),
            new_run_id()
        ));
        FollowedPart {
            primary: part_dir(dir, process),
            process,
            run: run.to_string(),
            secondary,
            open: std::sync::RwLock::new(None),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The part's store, caught up with its process's writes if the last
    /// catch-up is older than `fresh`; it does not catch up again while
    /// the returned read is held (a lookup's reads agree).
    ///
    /// # Errors
    ///
    /// [`StoreError::PartUnavailable`]: the part is not on this machine (a
    /// cluster of several machines keeps each part where its process
    /// runs), or still holds another run's state (its process has not
    /// replaced it yet); or RocksDB fails. The next call tries again.
    pub fn current(&self, fresh: std::time::Duration) -> Result<FollowedRead<'_>, StoreError> {
        let poisoned = || StoreError::Write("a followed part's lock is poisoned".into());
        {
            let read = self.open.read().map_err(|_| poisoned())?;
            if read.as_ref().is_some_and(|(_, at)| at.elapsed() < fresh) {
                return Ok(FollowedRead(read));
            }
        }
        {
            let mut open = self.open.write().map_err(|_| poisoned())?;
            let stale = open.as_ref().is_none_or(|(_, at)| at.elapsed() >= fresh);
            if let (Some((store, at)), true) = (open.as_mut(), stale) {
                match store.db.try_catch_up_with_primary() {
                    Ok(()) => *at = std::time::Instant::now(),
                    // Its process replaced the part (a reset): open it
                    // again.
                    Err(_) => *open = None,
                }
            }
            if open.is_none() {
                let store = std::sync::Arc::new(self.open_secondary()?);
                *open = Some((store, std::time::Instant::now()));
            }
            if let Some((store, _)) = open.as_ref() {
                self.check_run(store)?;
            }
        }
        let read = self.open.read().map_err(|_| poisoned())?;
        match read.is_some() {
            true => Ok(FollowedRead(read)),
            false => Err(self.unavailable("process {p}'s part of the state was closed")),
        }
    }

    /// A part without a checkpoint is this run's, new (a cluster's run
    /// replaces every part at its start); one with another run's
    /// checkpoint is not replaced yet.
    fn check_run(&self, store: &Store) -> Result<(), StoreError> {
        match store.checkpoint()? {
            Some(c) if c.run != self.run => Err(self.unavailable(
                "holds the state of another run: process {p} has not replaced it yet (at its start), or writes this run's part elsewhere (another state directory or machine)",
            )),
            _ => Ok(()),
        }
    }

    /// The error for a part that cannot be read; logged as a warning the
    /// first time (the run goes on, its lookups answer 503).
    fn unavailable(&self, what: &str) -> StoreError {
        let e = StoreError::PartUnavailable {
            dir: self.primary.display().to_string(),
            what: format!(
                "{} (process 0 serves the whole cluster's profiles by reading every process's part of the state, which must be on its machine: run the processes with the same state directory on one machine, or on a shared file system)",
                what.replace("{p}", &self.process.to_string())
            ),
        };
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!("the API cannot read every profile: {e}");
        }
        e
    }

    fn open_secondary(&self) -> Result<Store, StoreError> {
        let name = self.primary.display().to_string();
        if !matches!(inspect(&self.primary)?, Found::Ours) {
            return Err(self.unavailable(
                "process {p}'s part of the state is not on this machine, or not created yet",
            ));
        }
        std::fs::create_dir_all(&self.secondary).map_err(|source| StoreError::Io {
            dir: self.secondary.display().to_string(),
            source,
        })?;
        let (mut opts, cfs) = existing_store_options(&self.primary);
        // A secondary instance keeps every table file open.
        opts.set_max_open_files(-1);
        let db = DB::open_cf_descriptors_as_secondary(&opts, &self.primary, &self.secondary, cfs)
            .map_err(|source| StoreError::Rocks {
            dir: name.clone(),
            source,
        })?;
        Ok(Store {
            db,
            dir: name,
            secondary: true,
        })
    }
}

impl Drop for FollowedPart {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.write() {
            *open = None;
        }
        let _ = std::fs::remove_dir_all(&self.secondary);
    }
}

/// Attributes as the JSON object stored and shown to users.
pub fn attributes_json(attrs: &[(String, Scalar)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = attrs
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::traits::Item;

    /// What is written as retained comes back compacted: the latest CRM
    /// version whatever the order it came in, lifetime totals added up
    /// across batches, an event's windowed items once (dropped once its
    /// windows all ended before the cut), sets and names once.
    #[test]
    fn the_retained_input_comes_back_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::take(dir.path()).unwrap();
        let store = Store::create_fresh(dir.path(), &lock).unwrap();
        let crm = |updated_ms: i64, tier: &str| CrmRecord {
            crm_id: "C1".into(),
            updated_ms,
            deleted: false,
            ids: Vec::new(),
            attributes: vec![("tier".into(), Scalar::Str(tier.into()))],
        };
        let (a, b) = (Id(1), Id(2));
        let checkpoint = |cut| Checkpoint {
            retained: Some(RetainedCut {
                cut,
                ..RetainedCut::default()
            }),
            ..Checkpoint::default()
        };
        let mut first = RetainedBatch::default();
        first.stage(Retained::Crm("C1".into(), crm(5, "gold").into()), 1_000, 1);
        first.stage(Retained::Set(vec![a, b]), 1_000, 1);
        first.stage(Retained::Name(a, "user:a".into()), 1_000, 1);
        // A lifetime sum; the windowed items of three events: two of `a`
        // at the same tick (one entry), one of `b` whose window ends before
        // the cut.
        first.stage(Retained::Total(a, 0, 19_999), 1_000, 1);
        let count = Item::Amount(1, 1);
        let view = |v: &str| Item::Point(3, (0, Scalar::Str(v.into())), 1);
        let enc = |items: &[Item]| {
            let mut out = Vec::new();
            items.iter().for_each(|i| encode_item_into(i, &mut out));
            out
        };
        first.stage(Retained::Event(a, enc(&[count.clone()]), 11_000), 1_000, 1);
        first.stage(
            Retained::Event(a, enc(&[count.clone(), view("x")]), 11_000),
            1_000,
            1,
        );
        first.stage(Retained::Event(b, enc(&[count.clone()]), 3_000), 2_000, 1);
        // Lifetime points: a held one (later replaced), a counted one.
        let point = |id, tick, v: &str| (id, (2, (tick, Scalar::Str(v.into()))));
        first.stage(Retained::Held(point(a, 1_000, "x")), 1_000, 1);
        first.stage(Retained::Point(point(b, 0, "d")), 1_000, 1);
        // Dwell entries: `a` enters two segments; `b` enters and leaves
        // one in the same batch, then enters it again.
        let dwell = |id, name: &str, at| Retained::DwellEntry(id, name.into(), at);
        first.stage(dwell(a, "champion", 1_000), 1_000, 1);
        first.stage(dwell(a, "vip", 1_000), 1_000, 1);
        first.stage(dwell(b, "vip", 1_000), 1_000, 1);
        first.stage(dwell(b, "vip", 1_000), 1_500, -1);
        first.stage(dwell(b, "vip", 1_800), 1_800, 1);
        store
            .write_retained(StateBatch::default(), first, &checkpoint(2_000))
            .unwrap();
        let mut second = RetainedBatch::default();
        // An older version, later: the latest stays.
        second.stage(
            Retained::Crm("C1".into(), crm(3, "silver").into()),
            4_000,
            1,
        );
        second.stage(Retained::Total(a, 0, 1), 4_000, 1);
        second.stage(Retained::Held(point(a, 4_000, "w")), 4_000, 1);
        second.stage(Retained::Event(b, enc(&[view("y")]), 9_000), 4_000, 1);
        // `a` leaves vip.
        second.stage(dwell(a, "vip", 1_000), 4_000, -1);
        store
            .write_retained(StateBatch::default(), second, &checkpoint(5_000))
            .unwrap();
        let r = store.restored(5_000).unwrap();
        assert_eq!(r.cut, 5_000);
        assert_eq!(r.crm, vec![("C1".to_string(), crm(5, "gold"))]);
        assert_eq!(r.sets, vec![vec![a, b]]);
        assert_eq!(r.names, vec![(a, "user:a".to_string())]);
        assert_eq!(r.totals, vec![(a, 0, 20_000)]);
        // b's first window ended at 3 000, before the cut.
        let mut events = r.events.clone();
        events.sort();
        assert_eq!(
            events,
            vec![
                (1_000, a, vec![count.clone(), count, view("x")]),
                (4_000, b, vec![view("y")]),
            ]
        );
        let mut points = r.points.clone();
        points.sort();
        assert_eq!(
            points,
            vec![(point(a, 4_000, "w"), 1), (point(b, 0, "d"), 1)],
            "the held point replaced the one before"
        );
        let mut entries = r.dwell_entries.clone();
        entries.sort();
        assert_eq!(
            entries,
            vec![
                (a, "champion".to_string(), 1_000),
                (b, "vip".to_string(), 1_800)
            ]
        );
    }

    /// CRM records a checkpoint holds in JSON (written before the binary
    /// encoding) restore, and merge with binary ones by their order: the
    /// latest version wins whichever encoding it has.
    #[test]
    fn json_and_binary_crm_records_merge() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::take(dir.path()).unwrap();
        let store = Store::create_fresh(dir.path(), &lock).unwrap();
        let crm = |id: &str, updated_ms: i64, tier: &str| CrmRecord {
            crm_id: id.into(),
            updated_ms,
            deleted: false,
            ids: vec![Ident {
                rank: 0,
                value: format!("crm:{id}"),
            }],
            attributes: vec![
                ("tier".into(), Scalar::Str(tier.into())),
                ("ltv".into(), Scalar::Num(12.5)),
                ("vip".into(), Scalar::Bool(true)),
                ("note".into(), Scalar::Null),
            ],
        };
        let cf = store.cf(RETAINED_CFS[R_CRM]);
        let json = |r: &CrmRecord| serde_json::to_vec(r).unwrap();
        // C1: JSON (newer) then binary (older); C2: binary (newer) over
        // JSON (older); C3: JSON only.
        let mut batch = WriteBatch::default();
        batch.merge_cf(cf, b"C1", json(&crm("C1", 9, "gold")));
        batch.merge_cf(cf, b"C2", json(&crm("C2", 1, "bronze")));
        batch.merge_cf(cf, b"C3", json(&crm("C3", 4, "silver")));
        store.db.write(batch).unwrap();
        let mut batch = WriteBatch::default();
        batch.merge_cf(cf, b"C1", encode_crm(&crm("C1", 2, "silver")));
        batch.merge_cf(cf, b"C2", encode_crm(&crm("C2", 8, "gold")));
        store.db.write(batch).unwrap();
        assert_eq!(
            store.restored(1).unwrap().crm,
            vec![
                ("C1".to_string(), crm("C1", 9, "gold")),
                ("C2".to_string(), crm("C2", 8, "gold")),
                ("C3".to_string(), crm("C3", 4, "silver")),
            ]
        );
        assert_eq!(decode_crm(b"not a record"), None);
        assert_eq!(decode_crm(&[CRM_BINCODE, 1, 2]), None);
    }

    /// A profile id that is another's followed by a separator byte and more
    /// cannot see the other's traits or segments: keys are length-prefixed.
    #[test]
    fn one_profile_never_reads_anothers_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let trait_of = |profile: &str, value: f64| {
            (
                StoreOp::Trait {
                    profile: profile.into(),
                    name: "views".into(),
                    value: Scalar::Num(value),
                },
                1,
            )
        };
        let ops = vec![
            trait_of("user:victim\u{0}x", 7.0),
            trait_of("user:victim", 1.0),
            (
                StoreOp::Segment {
                    profile: "user:victim\u{0}x".into(),
                    name: "vip".into(),
                },
                1,
            ),
        ];
        store.commit(&ops, &Checkpoint::default()).unwrap();
        let victim = store.view("user:victim").unwrap();
        assert_eq!(
            victim.traits,
            BTreeMap::from([("views".to_string(), serde_json::json!(1))])
        );
        assert!(victim.segments.is_empty(), "{:?}", victim.segments);
        let other = store.view("user:victim\u{0}x").unwrap();
        assert_eq!(
            other.traits,
            BTreeMap::from([("views".to_string(), serde_json::json!(7))])
        );
        assert_eq!(other.segments, vec!["vip".to_string()]);
    }

    /// Several times staged in one batch leave the state of the last: a
    /// value changed at every time, a link added then removed, a segment
    /// left then entered again.
    #[test]
    fn a_batch_of_several_times_leaves_the_state_of_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = "user:u1".to_string();
        let link = |id: &str| StoreOp::Link {
            id: id.into(),
            profile: p.clone(),
        };
        let views = |v: f64| StoreOp::Trait {
            profile: p.clone(),
            name: "views".into(),
            value: Scalar::Num(v),
        };
        let seg = StoreOp::Segment {
            profile: p.clone(),
            name: "fan".into(),
        };
        let mut batch = StateBatch::default();
        let times = vec![
            vec![
                (link("user:u1"), 1),
                (link("anon:a"), 1),
                (views(1.0), 1),
                (seg.clone(), 1),
            ],
            vec![
                (views(1.0), -1),
                (views(2.0), 1),
                (link("anon:a"), -1),
                (seg.clone(), -1),
            ],
            vec![(views(2.0), -1), (views(3.0), 1), (seg.clone(), 1)],
        ];
        for ops in &times {
            batch.stage(ops);
        }
        store.write(batch, &Checkpoint::default()).unwrap();
        let view = store.view(&p).unwrap();
        assert_eq!(view.identifiers, vec!["user:u1".to_string()]);
        assert_eq!(store.profile_of("anon:a").unwrap(), None);
        assert_eq!(view.segments, vec!["fan".to_string()]);
        assert_eq!(
            view.traits,
            BTreeMap::from([("views".to_string(), serde_json::json!(3))])
        );
    }

    #[test]
    fn commit_then_lookup_by_any_identifier() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = "crm:C1".to_string();
        let ops = vec![
            (
                StoreOp::Link {
                    id: "crm:C1".into(),
                    profile: p.clone(),
                },
                1,
            ),
            (
                StoreOp::Link {
                    id: "email:a@b.c".into(),
                    profile: p.clone(),
                },
                1,
            ),
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: Scalar::Num(3.0),
                },
                1,
            ),
            (
                StoreOp::Segment {
                    profile: p.clone(),
                    name: "vip".into(),
                },
                1,
            ),
            (
                StoreOp::Attributes {
                    profile: p.clone(),
                    json: r#"{"tier":"gold"}"#.into(),
                },
                1,
            ),
        ];
        store
            .commit(
                &ops,
                &Checkpoint {
                    time: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
        // The trait changes from 3 to 4 at the next time.
        let ops2 = vec![
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: Scalar::Num(4.0),
                },
                1,
            ),
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: Scalar::Num(3.0),
                },
                -1,
            ),
        ];
        store
            .commit(
                &ops2,
                &Checkpoint {
                    time: 2000,
                    ..Default::default()
                },
            )
            .unwrap();
        let view = store
            .lookup(&[Ident {
                rank: 2,
                value: "email:a@b.c".into(),
            }])
            .unwrap()
            .unwrap();
        assert_eq!(view.profile, "crm:C1");
        assert_eq!(view.identifiers, vec!["crm:C1", "email:a@b.c"]);
        assert_eq!(view.traits.get("views"), Some(&serde_json::json!(4)));
        assert_eq!(view.segments, vec!["vip"]);
        assert_eq!(view.attributes["tier"], "gold");
        assert_eq!(view.as_of.unwrap().time, 2000);
        assert!(store
            .lookup(&[Ident {
                rank: 0,
                value: "crm:nope".into()
            }])
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_fresh_store_forgets_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        {
            let lock = StateLock::take(dir.path()).unwrap();
            let store = Store::create_fresh(dir.path(), &lock).unwrap();
            let ops = vec![(
                StoreOp::Link {
                    id: "anon:a".into(),
                    profile: "anon:a".into(),
                },
                1,
            )];
            store.commit(&ops, &Checkpoint::default()).unwrap();
        }
        let lock = StateLock::take(dir.path()).unwrap();
        let store = Store::create_fresh(dir.path(), &lock).unwrap();
        assert_eq!(store.profile_of("anon:a").unwrap(), None);
        assert_eq!(store.checkpoint().unwrap(), None);
    }

    /// A second run on a held directory is refused; a directory holding
    /// another program's data (a RocksDB database without segflow's marker,
    /// or any other file) or state of an unknown format is never touched.
    #[test]
    fn numbers_are_written_as_display_writes_them() {
        let cases = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            3.0,
            12.5,
            -7.25,
            0.1,
            1e15,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            -9_007_199_254_740_993.0,
            1e21,
            123_456_789.0,
            f64::MAX,
            f64::MIN_POSITIVE,
        ];
        for n in cases {
            assert_eq!(number_text(n), n.to_string(), "{n:?}");
        }
        // Whole numbers are the integer formatter's digits.
        assert_eq!(number_text(42.0), "42");
        assert_eq!(number_text(-0.0), "-0");
    }

    #[test]
    fn segflow_destroys_nothing_it_did_not_create() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::take(dir.path()).unwrap();
        let second = StateLock::take(dir.path()).unwrap_err().to_string();
        assert!(
            second.contains("is in use by another segflow run"),
            "{second}"
        );
        drop(lock);

        // Another program's RocksDB database.
        let theirs = tempfile::tempdir().unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let db = DB::open(&opts, theirs.path()).unwrap();
            db.put(b"precious", b"data").unwrap();
        }
        // Refused before anything is written in it, by `run` (the lock)
        // and by `query`; the database is intact and no lock file is left.
        for e in [
            StateLock::take(theirs.path()).unwrap_err().to_string(),
            Store::open_read_only(theirs.path())
                .err()
                .unwrap()
                .to_string(),
        ] {
            assert!(
                e.contains("is not empty and has no SEGFLOW_STATE marker"),
                "{e}"
            );
            assert!(e.contains("CURRENT"), "{e}");
        }
        assert!(!theirs.path().join(LOCK_FILE).exists());
        let db = DB::open_default(theirs.path()).unwrap();
        assert_eq!(db.get(b"precious").unwrap().as_deref(), Some(&b"data"[..]));
        drop(db);

        // State of a format this version does not know.
        let newer = tempfile::tempdir().unwrap();
        std::fs::write(newer.path().join(MARKER_FILE), "segflow-state 99\n").unwrap();
        let e = StateLock::take(newer.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                r#"says "segflow-state 99", not segflow state format {STATE_FORMAT}"#
            )),
            "{e}"
        );

        // State of every earlier format: refused with the way out, and
        // replaced by a reset (it is segflow's own).
        for version in 1..STATE_FORMAT {
            let older = tempfile::tempdir().unwrap();
            std::fs::write(
                older.path().join(MARKER_FILE),
                format!("segflow-state {version}\n"),
            )
            .unwrap();
            std::fs::write(older.path().join("CURRENT"), "MANIFEST-000001\n").unwrap();
            let e = Store::open_read_only(older.path())
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains(&format!("earlier segflow version (format {version}"))
                    && e.contains("--reset"),
                "{e}"
            );
            let e = StateLock::take(older.path()).err().unwrap().to_string();
            assert!(e.contains("--reset"), "{e}");
            assert!(!older.path().join(LOCK_FILE).exists(), "refused untouched");
            let lock = StateLock::take_to_reset(older.path()).unwrap();
            drop(Store::create_fresh(older.path(), &lock).unwrap());
            drop(lock);
            assert!(
                Store::open_read_only(older.path()).is_ok(),
                "replaced by a reset"
            );
        }

        // A file, a dangling symbolic link.
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let e = StateLock::take(&file).unwrap_err().to_string();
        assert!(e.contains("it is not a directory"), "{e}");
        let link = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        let e = StateLock::take(&link.join("below"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a part of its path is a file or a dangling symbolic link"),
            "{e}"
        );
        let e = StateLock::take(&link).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link to a path that does not exist"),
            "{e}"
        );

        // `query` on a path that does not exist creates nothing.
        let missing = dir.path().join("a/b/c");
        let e = Store::open_read_only(&missing).err().unwrap().to_string();
        assert!(e.contains("no segflow state in"), "{e}");
        assert!(!dir.path().join("a").exists());
    }
}
