//! Resuming a run from the checkpoint in its state directory.
//!
//! A run with a state directory that holds a checkpoint of the same
//! dataflow *resumes* (unless told to `--reset`). A single process
//! restores the checkpoint's retained input (the compacted records before
//! its cut, see [`crate::dataflow::retain`]) into the dataflow, keeps its
//! state, and reads its replayed files again from the checkpoint's points
//! on (see [`crate::io::sources::progress`]); a cluster reads its inputs
//! again from their beginning into an empty state. Either way the outputs
//! are cut back to where the checkpoint says they stood
//! ([`SinkPositions`]) and only what comes after is written. Results are
//! deterministic, so the outputs end byte-identical to those of a run that
//! never stopped, whatever was killed where (exactly-once for file inputs;
//! a socket cannot be read again, so a run with one does not resume).
//!
//! The checkpoint says which dataflow wrote it ([`fingerprint`]) and what
//! the inputs were ([`InputMark`]); anything else is refused with what was
//! found and what to do, never resumed into wrong output.

use std::collections::BTreeMap;
use std::path::Path;

use super::{EngineError, Input};
use crate::io::sources::{earliest_time_from, ReadParams, SourceDef};
use crate::spec::Spec;
use crate::store::{Checkpoint, InputMark, SinkPositions};

/// The fingerprint of everything in a definition that shapes its results:
/// engine settings (not the worker count), identity rules, the sources (names, kinds, formats;
/// not their locations), traits (in file order) and segments (by name, in
/// any order; not their descriptions), and this segflow version (whose
/// semantics might differ). An xxh3-128 hash, in hex.
pub fn fingerprint(spec: &Spec) -> String {
    let (text, _) = fingerprint_text(spec);
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// The hash of each part of [`fingerprint`], by what a message calls it
/// (`engine settings`, `identity rules`, `sources`, `traits`, `segments`,
/// `segflow version`): a refusal names the parts that differ.
pub fn fingerprint_parts(spec: &Spec) -> BTreeMap<String, String> {
    let (_, parts) = fingerprint_text(spec);
    parts
        .into_iter()
        .map(|(what, text)| {
            let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
            (what.to_string(), format!("{hash:016x}"))
        })
        .collect()
}

/// The parts of [`fingerprint_parts`] `ours` whose hash differs from that
/// of the same part in `theirs`; a part `theirs` lacks (a checkpoint
/// written before parts were recorded) is not counted.
pub fn differing_parts<'a>(
    ours: &'a BTreeMap<String, String>,
    theirs: &BTreeMap<String, String>,
) -> Vec<&'a str> {
    ours.iter()
        .filter(|(part, hash)| theirs.get(*part).is_some_and(|then| then != *hash))
        .map(|(part, _)| part.as_str())
        .collect()
}

/// The text [`fingerprint`] hashes, and its parts.
fn fingerprint_text(spec: &Spec) -> (String, Vec<(&'static str, String)>) {
    // Descriptions and the order of segments do not change results:
    // segments are taken by name, without descriptions. The order of
    // traits does: the retained input keys contributions by a trait's
    // position, so a reordered file is another definition.
    let traits = spec.traits.clone();
    let mut segments: Vec<_> = spec
        .segments
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                format!("{:?} dwell={:?}", s.when, s.min_dwell_ms),
            )
        })
        .collect();
    segments.sort();
    let sources: Vec<_> = spec
        .sources
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.location = None;
            s
        })
        .collect();
    // The worker count shapes the run, not its results (`-w` overrides
    // it, and a checkpoint resumes with any).
    let mut engine = spec.engine.clone();
    engine.workers = None;
    let text = format!(
        "segflow {} state {}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        env!("CARGO_PKG_VERSION"),
        crate::store::STATE_FORMAT,
        engine,
        spec.identity,
        sources,
        traits,
        segments
    );
    let parts = vec![
        (
            "segflow version",
            format!(
                "{} state {}",
                env!("CARGO_PKG_VERSION"),
                crate::store::STATE_FORMAT
            ),
        ),
        ("engine settings", format!("{engine:?}")),
        ("identity rules", format!("{:?}", spec.identity)),
        ("sources", format!("{sources:?}")),
        ("traits", format!("{traits:?}")),
        ("segments", format!("{segments:?}")),
    ];
    (text, parts)
}

/// The marks of the run's inputs as they are now: files and in-memory
/// lines (a socket has none).
pub fn input_marks(
    inputs: &BTreeMap<String, Input>,
) -> Result<BTreeMap<String, InputMark>, EngineError> {
    let mut marks = BTreeMap::new();
    for (name, input) in inputs {
        let mark = match input {
            Input::File { path, .. } => {
                InputMark::of(path, u64::MAX).map_err(|source| EngineError::Io {
                    what: "cannot read input",
                    path: path.display().to_string(),
                    source,
                })?
            }
            Input::Memory(lines) => InputMark::of_lines(lines, u64::MAX),
            // A topic is not marked: each partition's records are where the
            // checkpoint's points say (see `io::sources::kafka`).
            Input::Tcp { .. } | Input::Http { .. } | Input::Kafka(_) => continue,
        };
        marks.insert(name.clone(), mark);
    }
    Ok(marks)
}

/// Why a checkpoint cannot be resumed, as a message that says what was
/// found and what to do.
fn refuse(dir: &Path, what: String) -> EngineError {
    EngineError::Resume(format!(
        "cannot resume from the checkpoint in {}: {what}. Run with --reset to start over (the state and outputs are replaced), or give another state directory",
        dir.display()
    ))
}

/// What a run on a state directory with a checkpoint does.
#[derive(Clone, Debug, Default)]
pub struct ResumePlan {
    /// Where the outputs are cut back to, and from which times on they are
    /// written again (at the cut if the run restores, else clamped where
    /// files ended); `None`: they are emptied (nothing was written yet).
    pub sinks: Option<SinkPositions>,
    /// The checkpoint, if the run restores its retained input (see
    /// [`crate::dataflow::retain`]) and keeps its state, instead of
    /// reading the inputs from their beginning into an empty state: a
    /// single process whose checkpoint has a cut.
    pub restore: Option<Checkpoint>,
    /// Followed files that are no longer what the checkpoint read
    /// (truncated, or rotated), with what was found: a restoring run reads
    /// them again from their start, without their resume points, and drops
    /// their records before the cut.
    pub followed_from_start: Vec<(String, String)>,
}

/// Checks that `checkpoint`, found in `dir`, can be resumed by this run
/// (definition fingerprint and its parts `ours`, `processes` processes, `inputs` whose
/// marks are `now` ([`input_marks`]), outputs
/// named `outputs` (segments, dead letters; see
/// [`crate::io::sinks::Outputs::identities`]), of which `files` are
/// files), and says how.
pub fn plan(
    dir: &Path,
    checkpoint: &Checkpoint,
    ours: (&str, &BTreeMap<String, String>),
    processes: usize,
    inputs: &BTreeMap<String, Input>,
    now: &BTreeMap<String, InputMark>,
    outputs: (&str, &str),
    files: (bool, bool),
) -> Result<ResumePlan, EngineError> {
    let (segments, dead_letters) = outputs;
    if checkpoint.fingerprint.is_empty() {
        return Err(refuse(
            dir,
            "it was written by an older segflow, whose checkpoints cannot be resumed".into(),
        ));
    }
    if checkpoint.fingerprint != ours.0 {
        let differ = differing_parts(&ours.1, &checkpoint.fingerprint_parts);
        return Err(refuse(
            dir,
            match differ.is_empty() {
                true => "it was written by a different dataflow definition (or other engine settings, or another segflow version)".into(),
                false if differ == ["segments"] => "it was written by a different dataflow definition: its segments differ (if you edited segments, start with the file the checkpoint was written with and save the edit while the run goes on: a running engine applies segment changes)".into(),
                false => format!(
                    "it was written by a different dataflow definition: its {} differ",
                    differ.join(", ")
                ),
            },
        ));
    }
    if checkpoint.processes != processes {
        return Err(refuse(
            dir,
            format!(
                "it was written by {} process(es), and this run has {processes}",
                checkpoint.processes
            ),
        ));
    }
    let replaced = check_inputs(dir, checkpoint, inputs, now)?;
    let Some(sinks) = &checkpoint.sinks else {
        return Ok(ResumePlan::default());
    };
    if !same_output(&sinks.segments, segments) {
        return Err(refuse(
            dir,
            format!(
                "its segment diffs went to {}, and this run writes them to {segments}",
                sinks.segments
            ),
        ));
    }
    if !same_output(&sinks.dead_letters, dead_letters) {
        return Err(refuse(
            dir,
            format!(
                "its dead letters went to {}, and this run writes them to {}",
                if sinks.dead_letters.is_empty() {
                    "nowhere"
                } else {
                    &sinks.dead_letters
                },
                if dead_letters.is_empty() {
                    "nowhere"
                } else {
                    dead_letters
                }
            ),
        ));
    }
    // The positions the outputs are cut back to: at the cut if the run
    // restores the retained input, else clamped where files ended.
    let restore = restorable(checkpoint, processes, inputs, now);
    if restore.is_none() {
        // A run that does not restore reads its inputs again from their
        // beginning, as they were; a socket's lines cannot be.
        if let Some((_, what)) = replaced.first() {
            return Err(refuse(dir, what.clone()));
        }
        for (name, input) in inputs {
            if input.is_socket() {
                return Err(refuse(
                    dir,
                    format!(
                        "source `{name}` reads a socket ({}), whose lines cannot be read again, and {}",
                        input.describe(),
                        match processes {
                            1 => "the checkpoint cannot be restored (its inputs grew, or it holds no retained input)",
                            _ => "a cluster reads its inputs again instead of restoring its checkpoint",
                        }
                    ),
                ));
            }
        }
    }
    let at = restore
        .as_ref()
        .and_then(|c| c.retained.as_ref()?.sinks.as_ref())
        .unwrap_or(sinks);
    for (label, len, tail, file, also) in [
        (
            segments,
            at.segments_len,
            &at.segments_tail,
            files.0,
            (sinks.segments_len, &sinks.segments_tail),
        ),
        (
            dead_letters,
            at.dead_len,
            &at.dead_tail,
            files.1,
            (sinks.dead_len, &sinks.dead_tail),
        ),
    ] {
        if !file || len == 0 {
            continue;
        }
        // The end of what is kept, and the checkpoint's own position
        // (where a finished run's final bound put it, before the end):
        // the bytes before each must be those written.
        for (len, tail) in [(len, tail), also] {
            let longer = std::fs::metadata(label).is_ok_and(|m| m.is_file() && m.len() >= len);
            if len > 0 && longer && !tail.is_empty() && crate::store::tail_hash(label, len) != *tail
            {
                return Err(refuse(
                    dir,
                    format!(
                        "the output {label} does not hold, before byte {len}, what this run's checkpoint says was written there: something else changed it"
                    ),
                ));
            }
        }
        match std::fs::metadata(label) {
            Ok(meta) if meta.is_file() && meta.len() < len => {
                return Err(refuse(
                    dir,
                    format!(
                        "the output {label} is {} bytes long, and the checkpoint says {len} bytes were written to it: something else changed it",
                        meta.len()
                    ),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(refuse(
                    dir,
                    format!(
                        "the output {label} does not exist, and the checkpoint says {len} bytes were written to it: it was moved or deleted"
                    ),
                ))
            }
            Err(e) => {
                return Err(refuse(dir, format!("the output {label} cannot be read: {e}")))
            }
        }
    }
    Ok(ResumePlan {
        sinks: Some(at.clone()),
        restore,
        followed_from_start: replaced,
    })
}

/// The checkpoint, if a run of `processes` processes over `inputs` whose
/// marks are `now` restores its retained input: a single process, a cut
/// with output positions, and replayed inputs that have not grown. Lines
/// appended since may change times after the cut that the outputs and the
/// state already hold (a file's last range continues with them, after a
/// run that read it to its end closed every time), which a restore would
/// not undo; such a resume reads the inputs from their beginning into an
/// empty state, from the outputs' positions clamped where files ended. A
/// followed file grows by design and never ends: it continues from its
/// resume point, with its clock as it was there. A socket starts afresh.
fn restorable(
    checkpoint: &Checkpoint,
    processes: usize,
    inputs: &BTreeMap<String, Input>,
    now: &BTreeMap<String, InputMark>,
) -> Option<Checkpoint> {
    let retained = checkpoint.retained.as_ref()?;
    let followed = |name: &str| matches!(inputs.get(name), Some(Input::File { follow: true, .. }));
    let grown = checkpoint
        .inputs
        .iter()
        .any(|(name, then)| !followed(name) && now.get(name).is_some_and(|m| m.len > then.len));
    // A bounded Kafka topic is replayed as a file is, and may have grown
    // since as a file may; whether it did cannot be told reliably (some
    // brokers list a stale end offset), so it is always read again from
    // its start, as a grown file is: the outputs are kept up to where its
    // partitions ended, and records appended since count as they would in
    // one run over the whole topic.
    let bounded_topic = inputs
        .values()
        .any(|i| matches!(i, Input::Kafka(k) if k.bounded));
    (processes == 1 && retained.cut > 0 && retained.sinks.is_some() && !grown && !bounded_topic)
        .then(|| checkpoint.clone())
}

/// Whether two output labels name the same output: the same text, or
/// paths of the same existing file (`out/x` and `./out/x`).
fn same_output(then: &str, now: &str) -> bool {
    then == now
        || matches!(
            (std::fs::canonicalize(then), std::fs::canonicalize(now)),
            (Ok(a), Ok(b)) if a == b
        )
}

/// Checks that no input grew, since the checkpoint, into new ranges of its
/// file whose lines start before the outputs' bounds. A new range has a
/// clock of its own, so its first lines are never late, whatever their
/// time; a run over the whole input writes their diffs, which a resumed
/// run, that writes only from the bounds on, cannot. Such a resume is
/// refused. (Lines appended within the file's last range meet that range's
/// clock, which the checkpoint's bounds never pass.)
pub fn check_new_ranges(
    dir: &Path,
    checkpoint: &Checkpoint,
    plan: &ResumePlan,
    defs: &[SourceDef],
    params: &ReadParams,
) -> Result<(), EngineError> {
    let Some(sinks) = &plan.sinks else {
        return Ok(());
    };
    let bound = sinks.segments_bound.min(sinks.dead_bound);
    for def in defs {
        let Some(then) = checkpoint.inputs.get(&def.name) else {
            continue;
        };
        let earliest =
            earliest_time_from(def, params, then.len).map_err(|source| EngineError::Io {
                what: "cannot read input",
                path: then.path.clone(),
                source,
            })?;
        if let Some(time) = earliest.filter(|t| *t < bound) {
            return Err(refuse(
                dir,
                format!(
                    "input `{}` grew past the ranges it had, and its new lines begin at time {time}, before {bound}, up to which the outputs were written (in a new range they are not late)",
                    def.name
                ),
            ));
        }
    }
    Ok(())
}

/// [`check_inputs`] for a run that reads its inputs again from their
/// start (a cluster's process): a followed file that was replaced is
/// refused too.
pub fn check_replayed_inputs(
    dir: &Path,
    checkpoint: &Checkpoint,
    inputs: &BTreeMap<String, Input>,
    now: &BTreeMap<String, InputMark>,
) -> Result<(), EngineError> {
    match check_inputs(dir, checkpoint, inputs, now)?
        .into_iter()
        .next()
    {
        Some((_, what)) => Err(refuse(dir, what)),
        None => Ok(()),
    }
}

/// Checks that this run's `inputs` are those of `checkpoint` (found in
/// `dir`), or have only grown by whole lines: every input at the same path
/// (dead letters name it), at least as long, and beginning with the same
/// bytes (`now`: their marks, [`input_marks`]); an input whose last line
/// had no line break then may not have grown (the line would have
/// changed). Every process of a cluster checks its own inputs against its
/// own part. A followed file that fails these checks (it was truncated or
/// rotated, as logs are) is not refused here: it is returned, with what
/// was found, for the caller to decide (a restore reads it again from its
/// start; a replay cannot).
pub fn check_inputs(
    dir: &Path,
    checkpoint: &Checkpoint,
    inputs: &BTreeMap<String, Input>,
    now: &BTreeMap<String, InputMark>,
) -> Result<Vec<(String, String)>, EngineError> {
    let mut replaced = Vec::new();
    // A followed file's resume point is at a line's start, and a line
    // being written when the checkpoint was taken is read once it ends.
    let followed = |name: &str| matches!(inputs.get(name), Some(Input::File { follow: true, .. }));
    for (name, then) in &checkpoint.inputs {
        let Some(mark) = now.get(name) else {
            return Err(refuse(
                dir,
                match inputs.get(name) {
                    Some(input @ Input::Kafka(_)) => format!(
                        "source `{name}` read {} when the checkpoint was taken, and reads the Kafka topic {} now",
                        then.path,
                        input.describe()
                    ),
                    Some(input) if input.is_socket() => format!(
                        "source `{name}` read {} when the checkpoint was taken, and reads a socket ({}) now",
                        then.path,
                        input.describe()
                    ),
                    _ => format!("source `{name}` has no input in this run"),
                },
            ));
        };
        let differs = if mark.len < then.len {
            Some(format!(
                "input `{name}` ({}) is {} bytes long, shorter than the {} bytes of {} when the checkpoint was taken: it is not the same input",
                mark.path, mark.len, then.len, then.path
            ))
        } else {
            // The same length: the whole-content hash already says it.
            let head =
                match &inputs[name] {
                    _ if mark.len == then.len => mark.head.clone(),
                    Input::File { path, .. } => InputMark::of(path, then.len)
                        .map(|m| m.head)
                        .map_err(|source| EngineError::Io {
                            what: "cannot read input",
                            path: path.display().to_string(),
                            source,
                        })?,
                    Input::Memory(lines) => InputMark::of_lines(lines, then.len).head,
                    Input::Tcp { .. } | Input::Http { .. } | Input::Kafka(_) => String::new(),
                };
            if head != then.head {
                Some(format!(
                    "input `{name}` ({}) does not begin with the {} bytes it had when the checkpoint was taken: it is not the same input",
                    mark.path, then.len
                ))
            } else if !then.ends_line && mark.len > then.len && !followed(name) {
                Some(format!(
                    "input `{name}` ({}) ended in the middle of a line (its {} bytes had no line break at their end) when the checkpoint was taken, and has grown since: that line may have changed",
                    mark.path, then.len
                ))
            } else {
                None
            }
        };
        if let (Some(what), false) = (&differs, followed(name)) {
            return Err(refuse(dir, what.clone()));
        }
        if mark.path != then.path {
            return Err(refuse(
                dir,
                format!(
                    "input `{name}` was read from {} when the checkpoint was taken, and is {} now (dead letters name their input)",
                    then.path, mark.path
                ),
            ));
        }
        if let Some(what) = differs {
            replaced.push((name.clone(), what));
        }
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_spec;

    fn spec(engine: &str, window: &str) -> Spec {
        parse_spec(
            &format!(
                r#"
                [engine]
                {engine}
                [traits.views]
                stream = "web"
                window = "{window}"
                [segments.s]
                description = "{}"
                when = "views >= 1"
                "#,
                engine.len()
            ),
            "t.toml",
        )
        .unwrap()
    }

    /// The worker count and descriptions shape a run, not its results: a
    /// checkpoint resumes across them; a window does not.
    #[test]
    fn the_fingerprint_ignores_the_worker_count_only() {
        let base = fingerprint(&spec("", "30m"));
        assert_eq!(fingerprint(&spec("workers = 2", "30m")), base);
        assert_ne!(fingerprint(&spec("", "20m")), base);
        assert_ne!(fingerprint(&spec("tick = \"2s\"", "30m")), base);
    }
}
