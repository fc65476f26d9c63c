//! What the API serves from: the state the commit stage writes, and the
//! segment memberships it commits.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::io::sinks::{SegmentDiff, SourceSummary};
use crate::model::{Ident, IdentityRules};
use crate::spec::Spec;
use crate::store::{FollowedPart, ProfileView, StateLock, Store, StoreError};
use crate::time::Time;

use super::metrics::Metrics;

/// How stale the other processes' parts of a cluster's state may be when
/// a profile is read: older, they catch up with their processes' writes
/// first (a few file reads). Within the answer's 10 ms freshness budget.
pub const PEER_FRESHNESS: std::time::Duration = std::time::Duration::from_millis(5);

/// How many committed times of diffs the stream buffers for a slow
/// subscriber before it skips some (and says so, `event: lagged`).
pub const STREAM_BUFFER: usize = 4096;

/// How fresh an answer is (see the [module documentation](super)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AsOf {
    /// Every event at or before this time (ms since the epoch) is in the
    /// answer; `None` before the run has completed any time.
    pub time: Option<u64>,
    /// The end (ms) of the latest tick the sources have admitted.
    pub read_until: Option<u64>,
    /// Whether `time` has reached `read_until`: the answer holds every
    /// event read so far.
    pub complete: bool,
    /// The wall clock minus `time`, in ms.
    pub lag_ms: Option<i64>,
    /// Whether the run has ended (a finished replay keeps serving its
    /// final state).
    pub ended: bool,
}

/// Where profiles are read from.
enum StateLink {
    /// The run has not opened its state yet.
    Starting,
    /// The run writes no state.
    Without,
    /// The run's store (process 0's part), the time before which every
    /// change is in it, the directory's lock (held while the API reads the
    /// store), and in a cluster the other processes' parts.
    Open {
        store: Arc<Store>,
        readable: Arc<AtomicU64>,
        _lock: Arc<StateLock>,
        peers: Arc<Vec<FollowedPart>>,
    },
}

/// Why a profile cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The run has not opened its state yet (try again shortly).
    #[error("the run is opening its state; try again in a moment")]
    Starting,
    /// The run writes no state.
    #[error("this run writes no state, so profiles cannot be looked up: run it with --state-dir (or [output] state_dir)")]
    NoState,
    /// Reading the store failed (in a cluster, perhaps because another
    /// process's part is not readable here:
    /// [`StoreError::PartUnavailable`]).
    #[error("reading the state: {0}")]
    Store(StoreError),
}

/// The run's committed memberships and clocks.
#[derive(Default)]
struct Index {
    /// Segment -> its members' profile ids.
    members: BTreeMap<String, BTreeSet<String>>,
    /// Every time before this is committed (`None`: none yet).
    committed_before: Option<Time>,
    /// The largest tick a source has admitted.
    read_until: Option<Time>,
    /// Profiles at the committed time.
    profiles: i64,
    /// Per-source counters.
    sources: Vec<SourceSummary>,
    /// Per source (by index), its clock (see [`crate::io::Control::Clock`]).
    clocks: Vec<Option<Time>>,
    /// Per segment, the committed diffs `(time, profile, diff)` of the
    /// times after `changes_after`, for exports of the changes since a
    /// time (at most [`CHANGES_KEPT`] per segment).
    changes: BTreeMap<String, std::collections::VecDeque<(Time, String, i64)>>,
    /// Per segment, the changes of every time after this are kept.
    changes_after: BTreeMap<String, Time>,
    /// Diffs of times up to this were not seen as they were committed (a
    /// resumed run's): their changes are not kept.
    unlogged_until: Time,
    /// The latest time whose diffs are in `members`.
    applied_through: Option<Time>,
}

/// Why the diff streams end: the data of their last event, `event: end`
/// (`{"failed": bool, "reason": "..."}`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StreamEnd {
    /// Whether the run failed (its exit is not 0); `false` when it was
    /// stopped (SIGTERM, Ctrl-C) or the process ends otherwise.
    pub failed: bool,
    /// What happened, for people: the run's error when it failed.
    pub reason: String,
}

/// The most changes kept per segment for exports of the changes since a
/// time; older ones are dropped (asking for them is answered 410).
pub const CHANGES_KEPT: usize = 1_000_000;

/// The state a running engine shares with its API: fed by the commit
/// stage (worker 0's committed diffs and clocks, process 0's RocksDB
/// part), read by the HTTP handlers. Create one with [`Live::new`], give it
/// to [`crate::Engine::serve`], and serve it with [`super::Server::start`].
pub struct Live {
    spec: RwLock<Arc<Spec>>,
    rules: IdentityRules,
    state: RwLock<StateLink>,
    index: RwLock<Index>,
    diffs: broadcast::Sender<Arc<Vec<SegmentDiff>>>,
    ended: AtomicBool,
    /// Why the diff streams end, once the engine stops serving.
    streams_end: tokio::sync::watch::Sender<Option<StreamEnd>>,
    metrics: Metrics,
    /// Whether memberships and changes are kept (serving, exports), or
    /// only counters (a progress bar).
    members_kept: bool,
}

impl Live {
    /// Shared state for serving a run of `spec`.
    pub fn new(spec: Arc<Spec>) -> Arc<Live> {
        let rules = IdentityRules::new(
            spec.identity.priority.clone(),
            spec.engine.default_region.clone(),
        );
        let (diffs, _) = broadcast::channel(STREAM_BUFFER);
        Arc::new(Live {
            spec: RwLock::new(spec),
            rules,
            state: RwLock::new(StateLink::Starting),
            index: RwLock::new(Index::default()),
            diffs,
            ended: AtomicBool::new(false),
            streams_end: tokio::sync::watch::channel(None).0,
            metrics: Metrics::new(),
            members_kept: true,
        })
    }

    /// Shared state that keeps only the counters and clocks (for a
    /// progress bar): no memberships, no changes, no stream.
    pub fn counters_only(spec: Arc<Spec>) -> Arc<Live> {
        let mut live = Live::new(spec);
        if let Some(l) = Arc::get_mut(&mut live) {
            l.members_kept = false;
        }
        live
    }

    /// The definition served (its segments' descriptions, its content
    /// slots).
    pub fn spec(&self) -> Arc<Spec> {
        self.spec
            .read()
            .map(|s| Arc::clone(&s))
            .unwrap_or_else(|e| Arc::clone(&e.into_inner()))
    }

    /// Replaces the definition served (a reloaded file: new content slots
    /// and segment descriptions apply to the next request).
    pub fn set_spec(&self, spec: Arc<Spec>) {
        if let Ok(mut s) = self.spec.write() {
            *s = spec;
        }
    }

    /// A definition file edited after the run has ended (a finished
    /// replay that goes on serving): its content slots and segment
    /// descriptions apply at once if nothing else changed; `Ok(false)` if
    /// they are the same; an error (for the log) if the file does not
    /// validate or changes what the run computed (that needs a new run).
    pub fn apply_edit_after_end(&self, text: &str, label: &str) -> Result<bool, String> {
        let new = crate::spec::parse_spec(text, label).map_err(|e| e.to_string())?;
        let old = self.spec();
        let ours = crate::engine::resume::fingerprint_parts(&old);
        let theirs = crate::engine::resume::fingerprint_parts(&new);
        let differ = crate::engine::resume::differing_parts(&ours, &theirs);
        if !differ.is_empty() {
            return Err(format!(
                "it changes the {} of the ended run: only content slots and segment descriptions apply to its final state (run again to apply the rest)",
                differ.join(" and ")
            ));
        }
        let described = |s: &Spec| -> Vec<(String, Option<String>)> {
            s.segments
                .iter()
                .map(|x| (x.name.clone(), x.description.clone()))
                .collect()
        };
        if new.content == old.content && described(&new) == described(&old) {
            return Ok(false);
        }
        self.set_spec(Arc::new(new));
        Ok(true)
    }

    /// The identity rules identifiers are read with.
    pub fn rules(&self) -> &IdentityRules {
        &self.rules
    }

    /// Attaches the run's state (process 0's part), the time before
    /// which every change is in it and the directory's lock (see
    /// [`crate::io::sinks::ProcessState::readable`]), and in a cluster the
    /// other processes' parts (followed; none for a single process).
    pub fn attach_state(
        &self,
        store: Arc<Store>,
        readable: Arc<AtomicU64>,
        lock: Arc<StateLock>,
        peers: Vec<FollowedPart>,
    ) {
        if let Ok(mut s) = self.state.write() {
            *s = StateLink::Open {
                store,
                readable,
                _lock: lock,
                peers: Arc::new(peers),
            };
        }
    }

    /// Calls `read` with the parts of the state (process 0's first, then
    /// the other processes', caught up within [`PEER_FRESHNESS`] and not
    /// catching up while `read` runs) and the time before which every
    /// change is in process 0's part (the others' hold the same times but
    /// for the last one's changes their processes may still be writing,
    /// see [`FollowedPart`]). The bound is read before the parts: what is
    /// read holds at least what it says.
    fn with_parts<R>(
        &self,
        read: impl FnOnce(&[&Store], Time) -> Result<R, StoreError>,
    ) -> Result<R, LookupError> {
        let (store, readable, peers) = match self.state.read().as_deref() {
            Ok(StateLink::Open {
                store,
                readable,
                peers,
                ..
            }) => (Arc::clone(store), Arc::clone(readable), Arc::clone(peers)),
            Ok(StateLink::Starting) => return Err(LookupError::Starting),
            _ => return Err(LookupError::NoState),
        };
        let before = readable.load(Ordering::SeqCst);
        let followed = peers
            .iter()
            .map(|peer| peer.current(PEER_FRESHNESS))
            .collect::<Result<Vec<_>, _>>()
            .map_err(LookupError::Store)?;
        let mut parts: Vec<&Store> = vec![&store];
        parts.extend(followed.iter().map(|f| &**f));
        read(&parts, before).map_err(LookupError::Store)
    }

    /// The run has started without state: profiles cannot be looked up.
    pub fn without_state(&self) {
        if let Ok(mut s) = self.state.write() {
            *s = StateLink::Without;
        }
    }

    /// Source `source`'s clock is `tick`, and the largest tick of a
    /// record it admitted `admitted` (see [`crate::io::Control::Clock`]).
    pub fn observe_clock(&self, source: u32, tick: Time, admitted: Option<Time>) {
        if let Ok(mut i) = self.index.write() {
            if let Some(admitted) = admitted {
                i.read_until = Some(i.read_until.map_or(admitted, |r| r.max(admitted)));
            }
            let s = source as usize;
            if i.clocks.len() <= s {
                i.clocks.resize(s + 1, None);
            }
            i.clocks[s] = Some(i.clocks[s].map_or(tick, |c| c.max(tick)));
        }
    }

    /// The run's metrics, for the API's own.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics in the Prometheus text format, as of now.
    pub fn render_metrics(&self) -> String {
        let sizes: Vec<(String, usize)> = self
            .segment_sizes()
            .into_iter()
            .map(|(name, _, size)| (name, size))
            .collect();
        let committed = self.segments_as_of().time.map(|t| t + 1);
        let (profiles, sources) = self.counters_with_clocks();
        self.metrics.render(
            crate::time::wall_clock_ms(),
            &sources,
            committed,
            profiles,
            &sizes,
        )
    }

    /// The consolidated diffs of one committed time: memberships change;
    /// `fresh` diffs (not those a resumed run recomputes for times its
    /// outputs hold already) go to the stream's subscribers.
    pub fn apply(&self, diffs: Vec<SegmentDiff>, fresh: bool) {
        if diffs.is_empty() {
            return;
        }
        if !self.members_kept {
            if fresh {
                self.metrics.diffs(diffs.len() as u64);
            }
            return;
        }
        if let Ok(mut i) = self.index.write() {
            i.applied_through = i.applied_through.max(diffs.iter().map(|d| d.time).max());
            for d in &diffs {
                let members = i.members.entry(d.segment.clone()).or_default();
                if d.diff > 0 {
                    members.insert(d.profile.clone());
                } else {
                    members.remove(&d.profile);
                }
                if fresh {
                    let log = i.changes.entry(d.segment.clone()).or_default();
                    log.push_back((d.time, d.profile.clone(), d.diff));
                    if log.len() > CHANGES_KEPT {
                        if let Some((t, _, _)) = log.pop_front() {
                            // Changes at `t` are no longer all kept.
                            let after = i.changes_after.entry(d.segment.clone()).or_default();
                            *after = (*after).max(t);
                        }
                    }
                } else {
                    i.unlogged_until = i.unlogged_until.max(d.time);
                }
            }
        }
        if fresh {
            self.metrics.diffs(diffs.len() as u64);
            let tick = self.spec().engine.tick_ms;
            let end = diffs[0].time.saturating_add(tick);
            let delay_ms = crate::time::wall_clock_ms() as i64 - end as i64;
            if delay_ms < 86_400_000 {
                self.metrics.commit_delay(delay_ms.max(0) as f64 / 1000.0);
            }
            // No subscriber is not an error.
            let _ = self.diffs.send(Arc::new(diffs));
        }
    }

    /// Every time before `horizon` is committed; the run has `profiles`
    /// profiles and these per-source counters.
    pub fn advance(&self, horizon: Time, profiles: i64, sources: &[SourceSummary]) {
        if let Ok(mut i) = self.index.write() {
            i.committed_before = Some(i.committed_before.map_or(horizon, |c| c.max(horizon)));
            i.profiles = profiles;
            if i.sources.as_slice() != sources {
                i.sources = sources.to_vec();
            }
        }
    }

    /// The run has ended: what is served is final.
    pub fn finish(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Ends every open diff stream with `event: end` and `end` (why):
    /// the engine stops serving. The first call's reason stands.
    pub fn end_streams(&self, end: StreamEnd) {
        self.streams_end.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            *now = Some(end);
            true
        });
    }

    /// Why the diff streams end (`None` while they go on): watched by each
    /// stream.
    pub fn streams_end(&self) -> tokio::sync::watch::Receiver<Option<StreamEnd>> {
        self.streams_end.subscribe()
    }

    /// A receiver of the diffs committed from now on, one message per
    /// committed time.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<SegmentDiff>>> {
        self.diffs.subscribe()
    }

    /// The freshness of answers read from what is complete before
    /// `before` (a time bound, `Time::MAX` once everything is).
    fn as_of(&self, before: Option<Time>) -> AsOf {
        let (read_until, committed) = self
            .index
            .read()
            .map(|i| (i.read_until, i.committed_before))
            .unwrap_or_default();
        self.as_of_at(read_until, committed, before)
    }

    /// [`Live::as_of`] from the index's clocks (`read_until`,
    /// `committed_before`).
    fn as_of_at(
        &self,
        read_until: Option<Time>,
        committed: Option<Time>,
        before: Option<Time>,
    ) -> AsOf {
        let tick = self.spec().engine.tick_ms.max(1);
        // The end of the latest admitted tick.
        let read_end = read_until.map(|t| t.saturating_add(tick - 1));
        let before = match (before, committed) {
            (Some(b), Some(c)) => Some(b.min(c)),
            (b, c) => b.or(c),
        };
        // A finished run has completed every time: it is as of the end of
        // its data. A live run's committed time moves on with the wall
        // clock (window ends) past the newest record's tick.
        let time = match (before, read_end) {
            (None | Some(0), _) => None,
            (Some(Time::MAX), end) => end,
            (Some(b), _) => Some(b - 1),
        };
        AsOf {
            time,
            read_until: read_end,
            complete: match (time, read_end) {
                (Some(t), Some(end)) => t >= end,
                (_, None) => true,
                (None, Some(_)) => false,
            },
            lag_ms: time.map(|t| crate::time::wall_clock_ms() as i64 - t as i64),
            ended: self.ended.load(Ordering::SeqCst),
        }
    }

    /// The freshness of the segment sizes and members.
    pub fn segments_as_of(&self) -> AsOf {
        self.as_of(None)
    }

    /// The identifiers `query` may mean (`KIND:VALUE`, normalized, or
    /// every reading of a bare value), see [`IdentityRules::parse_query`].
    pub fn identifiers(&self, query: &str) -> Vec<Ident> {
        self.rules.parse_query(query)
    }

    /// The profile of the first of `ids` the state knows, with the
    /// freshness of what was read; `Ok(None)` for an unknown identifier.
    pub fn profile(&self, ids: &[Ident]) -> Result<Option<(ProfileView, AsOf)>, LookupError> {
        // One snapshot per part: the link and the profile agree.
        let (found, before) = self.with_parts(|parts, before| {
            crate::store::lookup_current_in(parts, ids).map(|found| (found, before))
        })?;
        Ok(found.map(|view| (view, self.as_of(Some(before)))))
    }

    /// Whether the state holds every change of `time` (the profile
    /// lookups see it); `true` for a run without state.
    pub fn state_holds(&self, time: Time) -> bool {
        match self.with_parts(|_, before| Ok(before)) {
            Ok(before) => before > time,
            Err(LookupError::NoState) => true,
            Err(_) => false,
        }
    }

    /// Each segment of the definition (then any a reload added) with its
    /// size.
    pub fn segment_sizes(&self) -> Vec<(String, Option<String>, usize)> {
        let spec = self.spec();
        let Ok(i) = self.index.read() else {
            return Vec::new();
        };
        let mut out: Vec<(String, Option<String>, usize)> = spec
            .segments
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.description.clone(),
                    i.members.get(&s.name).map_or(0, BTreeSet::len),
                )
            })
            .collect();
        for (name, members) in &i.members {
            if !out.iter().any(|(n, _, _)| n == name) && !members.is_empty() {
                out.push((name.clone(), None, members.len()));
            }
        }
        out
    }

    /// Up to `limit` members of `segment` after `cursor` (a profile id),
    /// in profile-id order, and the segment's size; `None` for a segment
    /// neither the definition nor the diffs know.
    pub fn members(
        &self,
        segment: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Option<(Vec<String>, usize)> {
        let known = self.spec().segments.iter().any(|s| s.name == segment);
        let i = self.index.read().ok()?;
        let Some(members) = i.members.get(segment) else {
            return known.then(|| (Vec::new(), 0));
        };
        let page = match cursor {
            Some(c) => members
                .range::<str, _>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                .take(limit)
                .cloned()
                .collect(),
            None => members.iter().take(limit).cloned().collect(),
        };
        Some((page, members.len()))
    }

    /// The identifiers of `profile` (`kind:value`), from the state; none
    /// for a run without state.
    pub fn identifiers_of(&self, profile: &str) -> Result<Vec<String>, LookupError> {
        match self.with_parts(|parts, _| crate::store::identifiers_in(parts, profile)) {
            Err(LookupError::NoState) => Ok(Vec::new()),
            other => other,
        }
    }

    /// The profiles whose membership of `segment` changed at a time after
    /// `since` (ms): `true` entered, `false` exited (one that entered and
    /// left again is not listed), in profile-id order. `Ok(None)` for an
    /// unknown segment; `Err(t)` if the changes after `since` are not all
    /// kept, `t` being the earliest `since` that may be asked.
    pub fn changes_since(
        &self,
        segment: &str,
        since: Time,
    ) -> Result<Option<Vec<(String, bool)>>, Time> {
        let known = self.spec().segments.iter().any(|s| s.name == segment);
        let Ok(i) = self.index.read() else {
            return Ok(None);
        };
        if !known && !i.members.contains_key(segment) {
            return Ok(None);
        }
        let after = i
            .changes_after
            .get(segment)
            .copied()
            .unwrap_or(0)
            .max(i.unlogged_until);
        if since < after {
            return Err(after);
        }
        let mut net: BTreeMap<&str, i64> = BTreeMap::new();
        if let Some(log) = i.changes.get(segment) {
            for (t, profile, diff) in log.iter().rev() {
                if *t <= since {
                    break;
                }
                *net.entry(profile.as_str()).or_default() += diff;
            }
        }
        Ok(Some(
            net.into_iter()
                .filter(|(_, n)| *n != 0)
                .map(|(p, n)| (p.to_string(), n > 0))
                .collect(),
        ))
    }

    /// The segments `profile` is in, and the time they are as of: the
    /// latest time whose diffs they hold or the last committed time,
    /// whichever is later (`None`: nothing committed yet). A stream that
    /// subscribed before asking skips the diffs of that time and before.
    pub fn segments_of(&self, profile: &str) -> (Vec<String>, Option<Time>) {
        let Ok(i) = self.index.read() else {
            return (Vec::new(), None);
        };
        let segments = i
            .members
            .iter()
            .filter(|(_, m)| m.contains(profile))
            .map(|(s, _)| s.clone())
            .collect();
        let committed = i.committed_before.and_then(|c| c.checked_sub(1));
        (segments, i.applied_through.max(committed))
    }

    /// The segments `profile` was in just before `time`: its segments
    /// now, less the logged changes of `time` and later. Where those are
    /// no longer all kept, less the diffs of `time` alone (`at_time`, the
    /// diffs committed at `time`), which is exact unless later times
    /// changed the profile too.
    pub fn segments_before(
        &self,
        profile: &str,
        time: Time,
        at_time: &[SegmentDiff],
    ) -> Vec<String> {
        let Ok(i) = self.index.read() else {
            return Vec::new();
        };
        let kept = i.unlogged_until < time && !i.changes_after.values().any(|a| *a >= time);
        let mut out = Vec::new();
        let names: BTreeSet<&String> = i.members.keys().chain(i.changes.keys()).collect();
        for name in names {
            let now = i.members.get(name).is_some_and(|m| m.contains(profile));
            let since: i64 = if kept {
                i.changes.get(name).map_or(0, |log| {
                    log.iter()
                        .rev()
                        .take_while(|(t, _, _)| *t >= time)
                        .filter(|(_, p, _)| p == profile)
                        .map(|(_, _, d)| d)
                        .sum()
                })
            } else {
                at_time
                    .iter()
                    .filter(|d| d.profile == profile && d.segment == **name)
                    .map(|d| d.diff)
                    .sum()
            };
            // A member now that entered since was not one before; one that
            // left since was.
            if (now && since <= 0) || (!now && since < 0) {
                out.push(name.clone());
            }
        }
        out
    }

    /// The members of each of `segments` (in profile-id order) read at one
    /// moment, with that moment's freshness: an export of several
    /// segments is of one time. `None` if a segment is unknown (its name).
    pub fn members_at_once(&self, segments: &[String]) -> Result<(Vec<Vec<String>>, AsOf), String> {
        let spec = self.spec();
        let i = self
            .index
            .read()
            .map_err(|_| "the index is poisoned".to_string())?;
        let mut out = Vec::new();
        for name in segments {
            match i.members.get(name) {
                Some(m) => out.push(m.iter().cloned().collect()),
                None if spec.segments.iter().any(|s| &s.name == name) => out.push(Vec::new()),
                None => return Err(name.clone()),
            }
        }
        let as_of = self.as_of_at(i.read_until, i.committed_before, None);
        Ok((out, as_of))
    }

    /// Profiles, and each source's counters with its clock (see
    /// [`Live::observe_clock`]).
    pub fn counters_with_clocks(&self) -> (i64, Vec<(SourceSummary, Option<Time>)>) {
        self.index
            .read()
            .map(|i| {
                let sources = i
                    .sources
                    .iter()
                    .enumerate()
                    .map(|(n, s)| (s.clone(), i.clocks.get(n).copied().flatten()))
                    .collect();
                (i.profiles, sources)
            })
            .unwrap_or_default()
    }
}
