//! Audience exports: a segment's members, with their identifiers, as CSV
//! or JSON lines, for the tools that take audience lists (ad platforms,
//! e-mail tools), on request (`GET /v1/segments/{name}/export`) and on a
//! schedule to files (`--export DIR --export-every 1h`), each with the
//! entries and exits since the export before.
//!
//! **Members** (CSV): a header `profile,KIND,KIND,...` with the identifier
//! kinds of the definition in priority order (`crm,user,email,phone,anon`
//! for the shipped one), then one row per member in profile-id order;
//! several identifiers of one kind are joined with `|`. JSON lines:
//! `{"profile":"user:u4","identifiers":["email:..","user:u4"]}`.
//!
//! **Changes**: one row per profile whose membership differs from the
//! export before, `profile,change,KIND,...` with `change` = `entered` or
//! `exited` (an exited profile's identifiers are those it has now; a
//! profile that merged away has none). JSON lines:
//! `{"profile":..,"change":"entered","identifiers":[..]}`.
//!
//! Scheduled exports write, per segment, `DIR/SEGMENT/members-T.csv`
//! and `DIR/SEGMENT/changes-T.csv` (`T`: the `as_of` time in ms; `.jsonl`
//! for JSON lines), each written to a temporary file, synced, then
//! renamed: a reader never sees half a file. The changes are against the
//! newest members file already in the directory, so they span restarts; the
//! first export's changes are every member entering. Every segment of
//! one export is as of one time; a segment whose members are those of the
//! export before gets no new files. A failed write (a full disk) stops the
//! run with the reason.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::live::{AsOf, Live, LookupError};

/// How an export is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl ExportFormat {
    /// `csv` or `jsonl` (also `json`, `ndjson`); an error names the two.
    pub fn parse(s: &str) -> Result<ExportFormat, String> {
        match s {
            "csv" => Ok(ExportFormat::Csv),
            "jsonl" | "json" | "ndjson" => Ok(ExportFormat::Jsonl),
            other => Err(format!(
                "unknown export format `{other}`: expected csv or jsonl"
            )),
        }
    }

    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Csv => "csv",
            ExportFormat::Jsonl => "jsonl",
        }
    }

    /// The media type of an answer.
    pub fn media_type(self) -> &'static str {
        match self {
            ExportFormat::Csv => "text/csv; charset=utf-8",
            ExportFormat::Jsonl => "application/x-ndjson",
        }
    }
}

/// A profile in an export: its id, its identifiers, and for a change
/// whether it entered (`Some(true)`) or exited (`Some(false)`).
pub struct Row {
    /// The profile id.
    pub profile: String,
    /// Its identifiers (`kind:value`), sorted.
    pub identifiers: Vec<String>,
    /// For a change: entered or exited.
    pub entered: Option<bool>,
}

/// Writes `rows` as `format`, with identifier columns for `kinds` (CSV).
pub fn write_rows(
    out: &mut dyn Write,
    format: ExportFormat,
    kinds: &[&str],
    rows: &[Row],
    changes: bool,
) -> std::io::Result<()> {
    match format {
        ExportFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            let mut header = vec!["profile"];
            if changes {
                header.push("change");
            }
            header.extend(kinds.iter().copied());
            w.write_record(&header)?;
            for r in rows {
                let mut record = vec![r.profile.clone()];
                if let Some(entered) = r.entered {
                    record.push(if entered { "entered" } else { "exited" }.to_string());
                }
                for kind in kinds {
                    let prefix = format!("{kind}:");
                    let values: Vec<String> = r
                        .identifiers
                        .iter()
                        .filter_map(|i| i.strip_prefix(&prefix))
                        .map(escape_value)
                        .collect();
                    record.push(spreadsheet_safe(values.join("|")));
                }
                w.write_record(&record)?;
            }
            w.flush()
        }
        ExportFormat::Jsonl => {
            for r in rows {
                let mut v = serde_json::json!({"profile": r.profile, "identifiers": r.identifiers});
                if let Some(entered) = r.entered {
                    v["change"] = if entered { "entered" } else { "exited" }.into();
                }
                writeln!(out, "{v}")?;
            }
            Ok(())
        }
    }
}

/// An identifier's value in a CSV cell of several: `\` and `|` escaped
/// with a `\` (so `x|y` is one value, `x\|y`, not two).
fn escape_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('|', "\\|")
}

/// A cell that a spreadsheet would take for a formula (it starts with
/// `=`, `+`, `-`, `@`, a tab or a carriage return) gets a leading `'`, as
/// OWASP's advice on CSV injection says: identifiers come from the data,
/// and exports go to spreadsheets and ad tools. A signed number (an E.164
/// phone number, `+13125712327`) is no formula and stays as it is.
fn spreadsheet_safe(cell: String) -> String {
    let number = |rest: &str| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit());
    match cell.chars().next() {
        Some('+' | '-') if number(&cell[1..]) => cell,
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{cell}"),
        _ => cell,
    }
}

/// The members of `segment` now with their identifiers, and how fresh
/// they are; `None` for an unknown segment.
pub fn members(live: &Live, segment: &str) -> Result<Option<(Vec<Row>, AsOf)>, LookupError> {
    let Ok((mut all, as_of)) = live.members_at_once(&[segment.to_string()]) else {
        return Ok(None);
    };
    let rows = rows(live, all.pop().unwrap_or_default(), None)?;
    Ok(Some((rows, as_of)))
}

/// Rows for `profiles`, with their identifiers from the state (none for a
/// run without state).
fn rows(
    live: &Live,
    profiles: Vec<String>,
    entered: Option<bool>,
) -> Result<Vec<Row>, LookupError> {
    profiles
        .into_iter()
        .map(|profile| {
            let identifiers = with_own_id(live.identifiers_of(&profile)?, &profile);
            Ok(Row {
                profile,
                identifiers,
                entered,
            })
        })
        .collect()
}

/// The entries and exits of `segment` after `since` (ms) up to now: each
/// profile whose membership changed, once; `Err` with the oldest time that
/// may be asked if the changes since then are not kept.
pub fn changes_since(
    live: &Live,
    segment: &str,
    since: u64,
) -> Result<Option<(Vec<Row>, AsOf)>, ChangesError> {
    let as_of = live.segments_as_of();
    let Some(changed) = live
        .changes_since(segment, since)
        .map_err(ChangesError::NotKept)?
    else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (profile, entered) in changed {
        let identifiers = with_own_id(
            live.identifiers_of(&profile).map_err(ChangesError::State)?,
            &profile,
        );
        out.push(Row {
            profile,
            identifiers,
            entered: Some(entered),
        });
    }
    Ok(Some((out, as_of)))
}

/// A profile's identifiers, or, for one that merged into another (it has
/// none left), its id, which is its canonical identifier: an exit row
/// still says which cookie or e-mail left.
fn with_own_id(identifiers: Vec<String>, profile: &str) -> Vec<String> {
    if identifiers.is_empty() {
        vec![profile.to_string()]
    } else {
        identifiers
    }
}

/// Why the changes since a time cannot be given.
#[derive(Debug)]
pub enum ChangesError {
    /// They are not kept: the earliest `since` that may be asked.
    NotKept(u64),
    /// Reading the state failed.
    State(LookupError),
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory, synced before it is renamed. A failed write leaves no
/// temporary file behind.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Creates `dir` (and its parents), saying so plainly when a file is
/// where it or one of its parents goes.
///
/// # Errors
///
/// The directory cannot be created: the reason, with the path.
pub fn create_export_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let blocked = dir
            .ancestors()
            .find(|a| a.exists() && !a.is_dir())
            .map(Path::to_path_buf);
        match blocked {
            Some(file) => format!(
                "export directory {}: {} is a file, not a directory; move it",
                dir.display(),
                file.display()
            ),
            None => format!("export directory {}: {e}", dir.display()),
        }
    })
}

/// The newest `members-T.EXT` in `dir` and its profiles.
fn previous_members(dir: &Path, format: ExportFormat) -> std::io::Result<Option<BTreeSet<String>>> {
    let ext = format!(".{}", format.extension());
    let newest = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let t: u64 = name
                    .strip_prefix("members-")?
                    .strip_suffix(&ext)?
                    .parse()
                    .ok()?;
                Some((t, e.path()))
            })
            .max(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let Some((_, path)) = newest else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)?;
    let profiles = match format {
        ExportFormat::Csv => {
            let mut r = csv::Reader::from_reader(text.as_bytes());
            r.records()
                .filter_map(|r| r.ok())
                .filter_map(|r| r.get(0).map(String::from))
                .collect()
        }
        ExportFormat::Jsonl => text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["profile"].as_str().map(String::from))
            .collect(),
    };
    Ok(Some(profiles))
}

/// What one scheduled export wrote for one segment.
#[derive(Debug)]
pub struct Exported {
    /// The segment.
    pub segment: String,
    /// The members file.
    pub members_file: PathBuf,
    /// Members.
    pub members: usize,
    /// Profiles that entered and exited since the export before.
    pub entered: usize,
    /// See [`Exported::entered`].
    pub exited: usize,
}

/// Exports `segments` (all if empty) into `dir` now (see the module
/// documentation); nothing is written before any time is committed.
pub fn export_once(
    live: &Live,
    dir: &Path,
    segments: &[String],
    format: ExportFormat,
) -> Result<Vec<Exported>, String> {
    let spec = live.spec();
    let names: Vec<String> = if segments.is_empty() {
        spec.segments.iter().map(|s| s.name.clone()).collect()
    } else {
        segments.to_vec()
    };
    let kinds_owned: Vec<String> = live.rules().kinds().into_iter().map(String::from).collect();
    let kinds: Vec<&str> = kinds_owned.iter().map(String::as_str).collect();
    let mut done = Vec::new();
    // Every segment as of one time.
    let (all, as_of) = live
        .members_at_once(&names)
        .map_err(|name| format!("--export-segments: no segment `{name}`"))?;
    let Some(time) = as_of.time else {
        return Ok(done);
    };
    // All or nothing: when a segment fails, the files this export wrote
    // for the segments before it are removed, so that the newest complete
    // export stays the one the next is compared with, and no changes file
    // is left without its members file.
    let mut written: Vec<PathBuf> = Vec::new();
    let segment = Segment {
        live,
        format,
        kinds: &kinds,
        time,
    };
    for (name, profiles) in names.into_iter().zip(all) {
        let seg_dir = dir.join(&name);
        match segment.export(&seg_dir, name, profiles, &mut written) {
            Ok(Some(exported)) => done.push(exported),
            Ok(None) => {}
            Err(e) => {
                let removed: Vec<String> = written
                    .iter()
                    .filter(|path| std::fs::remove_file(path).is_ok())
                    .map(|path| path.display().to_string())
                    .collect();
                return Err(match removed.is_empty() {
                    true => e,
                    false => format!(
                        "{e} (the files this export had written are removed: {})",
                        removed.join(", ")
                    ),
                });
            }
        }
    }
    Ok(done)
}

/// What one export of one segment needs besides the segment.
struct Segment<'a> {
    live: &'a Live,
    format: ExportFormat,
    /// The identifier kinds, the columns of the rows.
    kinds: &'a [&'a str],
    /// The export's `as_of` time (ms), in the file names.
    time: u64,
}

impl Segment<'_> {
    /// Exports segment `name` (its members `profiles`) into `seg_dir`: its
    /// changes file, then its members file, each added to `written` once
    /// it is. `None` when nothing is written (no time committed since the
    /// export before, or the same members).
    fn export(
        &self,
        seg_dir: &Path,
        name: String,
        profiles: Vec<String>,
        written: &mut Vec<PathBuf>,
    ) -> Result<Option<Exported>, String> {
        let Segment {
            live,
            format,
            kinds,
            time,
        } = *self;
        create_export_dir(seg_dir)?;
        let ext = format.extension();
        let members_file = seg_dir.join(format!("members-{time}.{ext}"));
        if members_file.is_file() {
            return Ok(None); // nothing was committed since the export before
        }
        let changes_file = seg_dir.join(format!("changes-{time}.{ext}"));
        for file in [&members_file, &changes_file] {
            if file.exists() && !file.is_file() {
                return Err(format!(
                    "export {}: something other than a file is in the way; move it",
                    file.display()
                ));
            }
        }
        let previous = previous_members(seg_dir, format)
            .map_err(|e| format!("export directory {}: {e}", seg_dir.display()))?;
        let before = previous.clone().unwrap_or_default();
        let now: BTreeSet<&str> = profiles.iter().map(String::as_str).collect();
        let exited: Vec<String> = before
            .iter()
            .filter(|p| !now.contains(p.as_str()))
            .cloned()
            .collect();
        let entered = profiles.iter().filter(|p| !before.contains(*p)).count();
        if entered == 0 && exited.is_empty() && previous.is_some() {
            return Ok(None); // the same members as the export before
        }
        // Only now the identifiers are read (for members and changes).
        let listed = rows(live, profiles, None).map_err(|e| e.to_string())?;
        let mut changes: Vec<Row> = listed
            .iter()
            .filter(|r| !before.contains(&r.profile))
            .map(|r| Row {
                profile: r.profile.clone(),
                identifiers: r.identifiers.clone(),
                entered: Some(true),
            })
            .collect();
        let exits = exited.len();
        changes.extend(rows(live, exited, Some(false)).map_err(|e| e.to_string())?);
        changes.sort_by(|a, b| a.profile.cmp(&b.profile));
        let mut bytes = Vec::new();
        write_rows(&mut bytes, format, kinds, &listed, false).map_err(|e| e.to_string())?;
        let mut change_bytes = Vec::new();
        write_rows(&mut change_bytes, format, kinds, &changes, true).map_err(|e| e.to_string())?;
        // The changes first: a members file always has its changes.
        write_atomically(&changes_file, &change_bytes)
            .map_err(|e| format!("export {}: {e}", changes_file.display()))?;
        written.push(changes_file);
        write_atomically(&members_file, &bytes)
            .map_err(|e| format!("export {}: {e}", members_file.display()))?;
        written.push(members_file.clone());
        Ok(Some(Exported {
            segment: name,
            members_file,
            members: listed.len(),
            entered,
            exited: exits,
        }))
    }
}

/// Scheduled exports (`--export DIR --export-every D`): a thread that
/// exports every `every` while the run goes on, once more when it ends
/// ([`Schedule::finish`]), and stops the run through `shutdown` with the
/// reason kept in [`Schedule::failure`] when a write fails.
pub struct Schedule {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Why an export failed, if one did.
    pub failure: Arc<Mutex<Option<String>>>,
    live: Arc<Live>,
    dir: PathBuf,
    segments: Vec<String>,
    format: ExportFormat,
}

impl Schedule {
    /// Starts exporting `segments` of `live` (all if empty) into `dir`
    /// every `every`.
    pub fn start(
        live: Arc<Live>,
        dir: PathBuf,
        every: Duration,
        segments: Vec<String>,
        format: ExportFormat,
        shutdown: Arc<AtomicBool>,
    ) -> std::io::Result<Schedule> {
        let stop = Arc::new(AtomicBool::new(false));
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let thread = {
            let (stop, failure, live, dir, segments) = (
                Arc::clone(&stop),
                Arc::clone(&failure),
                Arc::clone(&live),
                dir.clone(),
                segments.clone(),
            );
            std::thread::Builder::new()
                .name("segflow-export".into())
                .spawn(move || {
                    let mut next = Instant::now() + every;
                    while !stop.load(Ordering::SeqCst) {
                        if Instant::now() < next {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                        next += every;
                        if let Err(e) = export_once(&live, &dir, &segments, format).map(log) {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            shutdown.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                })?
        };
        Ok(Schedule {
            stop,
            thread: Some(thread),
            failure,
            live,
            dir,
            segments,
            format,
        })
    }

    /// Stops the schedule and exports once more (the run's final state);
    /// the first failure, if any.
    pub fn finish(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = self.failure.lock().ok().and_then(|f| f.clone()) {
            return Err(e);
        }
        export_once(&self.live, &self.dir, &self.segments, self.format).map(log)
    }
}

fn log(done: Vec<Exported>) {
    for e in done {
        tracing::info!(
            segment = e.segment,
            members = e.members,
            entered = e.entered,
            exited = e.exited,
            file = %e.members_file.display(),
            "exported"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails (here: a directory where the file goes) leaves
    /// no temporary file behind; one that succeeds leaves only the file.
    #[test]
    fn a_failed_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("changes-1.csv");
        std::fs::create_dir(&blocked).unwrap();
        assert!(write_atomically(&blocked, b"rows\n").is_err());
        let ok = dir.path().join("members-1.csv");
        write_atomically(&ok, b"rows\n").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["changes-1.csv", "members-1.csv"]);
        assert_eq!(std::fs::read(&ok).unwrap(), b"rows\n");
    }

    /// A file where the export directory (or one of its parents) goes is
    /// named as such.
    #[test]
    fn a_file_in_the_way_of_an_export_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vip"), "x").unwrap();
        let e = create_export_dir(&dir.path().join("vip")).unwrap_err();
        assert!(e.contains("vip is a file, not a directory"), "{e}");
        let e = create_export_dir(&dir.path().join("vip/below")).unwrap_err();
        assert!(e.contains("vip is a file, not a directory"), "{e}");
        create_export_dir(&dir.path().join("a/b")).unwrap();
        assert!(dir.path().join("a/b").is_dir());
    }

    /// Identifiers from the data cannot become spreadsheet formulas, nor
    /// be split or merged by the `|` between values.
    #[test]
    fn csv_cells_are_safe_and_unambiguous() {
        let rows = [Row {
            profile: "user:=HYPERLINK(\"http://evil\",\"a,b\")".into(),
            identifiers: vec![
                "user:=HYPERLINK(\"http://evil\",\"a,b\")".into(),
                "anon:w".into(),
                "anon:x|y".into(),
                "anon:back\\slash".into(),
                "phone:+13125712327".into(),
                "email:@home@example.com".into(),
            ],
            entered: None,
        }];
        let mut out = Vec::new();
        write_rows(
            &mut out,
            ExportFormat::Csv,
            &["user", "email", "phone", "anon"],
            &rows,
            false,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut r = csv::Reader::from_reader(text.as_bytes());
        let row = r.records().next().unwrap().unwrap();
        assert_eq!(&row[1], "'=HYPERLINK(\"http://evil\",\"a,b\")");
        assert_eq!(&row[2], "'@home@example.com");
        assert_eq!(&row[3], "+13125712327");
        assert_eq!(&row[4], "w|x\\|y|back\\\\slash");
    }
}
