//! The definition file of a running engine, watched for segment changes
//! (see [`crate::dataflow::reload`]): what may be applied while the run
//! goes on, and what is refused, with the reason.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::dataflow::reload::Reload;
use crate::spec::{parse_spec, Spec};
use crate::time::Time;

use super::resume::{differing_parts, fingerprint, fingerprint_parts};

/// The definition as last applied, and the text last looked at.
struct Watched {
    applied: Spec,
    seen: String,
}

/// A [`Reload`] watching `path`, whose definition `running` (read from
/// `text`) the run started with. The file is looked at every `every`. A
/// run that serves its API (`live`) also takes edits of content slots
/// and segment descriptions (they change no result): the API answers with
/// them from the next request.
pub fn watch(
    path: PathBuf,
    running: Spec,
    text: String,
    every: Duration,
    live: Option<Arc<crate::serve::Live>>,
) -> Reload {
    let watched = Mutex::new(Watched {
        applied: running,
        seen: text,
    });
    let label = path.display().to_string();
    let poll = move |at: Time| -> Option<String> {
        // A file being saved may be missing or half written for a moment:
        // it is looked at again on the next poll.
        let text = std::fs::read_to_string(&path).ok()?;
        let mut w = watched.lock().ok()?;
        if text == w.seen {
            return None;
        }
        w.seen = text.clone();
        if text.trim().is_empty() {
            tracing::warn!(
                "{label} is empty (being saved?): refused; the run goes on with the definitions it has"
            );
            return None;
        }
        let new = match parse_spec(&text, &label) {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(
                    "{label} changed, but the new definition is refused: {e}; the run goes on with the definitions it has"
                );
                return None;
            }
        };
        let ours = fingerprint_parts(&w.applied);
        let theirs = fingerprint_parts(&new);
        let differ: Vec<&str> = differing_parts(&ours, &theirs)
            .into_iter()
            .filter(|part| *part != "segments")
            .collect();
        if !differ.is_empty() {
            // Name the traits that changed, if any.
            let traits: Vec<&str> = new
                .traits
                .iter()
                .map(|t| t.name.as_str())
                .chain(w.applied.traits.iter().map(|t| t.name.as_str()))
                .filter(|name| {
                    let find = |spec: &Spec| spec.traits.iter().position(|t| t.name == *name);
                    let (a, b) = (find(&w.applied), find(&new));
                    a != b
                        || a.is_some_and(|i| {
                            format!("{:?}", w.applied.traits[i]) != format!("{:?}", new.traits[i])
                        })
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let which = if traits.is_empty() {
                String::new()
            } else {
                format!(" ({})", traits.join(", "))
            };
            tracing::warn!(
                "{label} changed its {}{which}: a running engine applies changes of segments only (new, removed, or with another condition or min_dwell); the run goes on with the definitions it has (to apply the rest, stop it and start over with --reset)",
                differ.join(" and ")
            );
            return None;
        }
        if let Some(live) = &live {
            let described = |spec: &Spec| -> Vec<(String, Option<String>)> {
                spec.segments
                    .iter()
                    .map(|s| (s.name.clone(), s.description.clone()))
                    .collect()
            };
            if new.content != w.applied.content || described(&new) != described(&w.applied) {
                live.set_spec(Arc::new(new.clone()));
                if new.content != w.applied.content {
                    let names: Vec<&str> = new.content.iter().map(|c| c.name.as_str()).collect();
                    tracing::warn!(
                        "{label} changed its content slots: the API decides with them from now on (slots: {})",
                        names.join(", ")
                    );
                }
            }
        }
        if ours.get("segments") == theirs.get("segments") {
            if live.is_some() {
                w.applied = new;
            }
            return None;
        }
        let names =
            |spec: &Spec| -> Vec<String> { spec.segments.iter().map(|s| s.name.clone()).collect() };
        let (old, now) = (names(&w.applied), names(&new));
        let added: Vec<&String> = now.iter().filter(|n| !old.contains(n)).collect();
        let removed: Vec<&String> = old.iter().filter(|n| !now.contains(n)).collect();
        let changed: Vec<&String> = new
            .segments
            .iter()
            .filter(|n| {
                w.applied.segments.iter().any(|o| {
                    o.name == n.name && (o.when != n.when || o.min_dwell_ms != n.min_dwell_ms)
                })
            })
            .map(|n| &n.name)
            .collect();
        let list = |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
        tracing::warn!(
            "{label} changed: segments added [{}], removed [{}], changed [{}]; they apply from event time {at} ms (definition {})",
            list(&added),
            list(&removed),
            list(&changed),
            &fingerprint(&new)[..8]
        );
        w.applied = new;
        Some(text)
    };
    Reload {
        poll: Arc::new(poll),
        fingerprint: Arc::new(|spec: &Spec| (fingerprint(spec), fingerprint_parts(spec))),
        every,
    }
}
