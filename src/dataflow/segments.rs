//! Trait values and segment membership, per profile, in event-time order.
//!
//! A segment is a boolean condition over a profile's traits (by name),
//! CRM attributes (`attributes.NAME`, missing is null) and other segments
//! (by name). [`evaluate`] gathers every fact of a profile — that it
//! exists, its trait totals and points, its merged attributes — and, at
//! each time something changes for the profile or a time it asked to be
//! woken at comes, computes its trait values and evaluates every segment;
//! the changes of the `(segment, profile)` memberships are the entry (+1)
//! and exit (-1) diffs.
//!
//! Some values change with time alone, and the profile is woken when they
//! can: a session ends `gap` after its last event, an event of a
//! `not_followed_by` count becomes countable `within` after it, a recency
//! crosses a constant it is compared with, and a dwell time runs out.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::AsCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::Stream;

use super::profiles::Attributes;
use super::traits::{Item, Total, COUNT_OF, SECOND, SUM_SCALE};
use super::{Coll, Time};
use crate::model::{Id, IdMap, Scalar, ScalarRef};
use crate::spec::expr::Expr;
use crate::spec::{Aggregate, SegmentSpec, Spec, TraitSpec, Window};

/// The traits and segments of a definition, prepared for evaluation.
pub struct Rules {
    /// Traits by index.
    pub traits: Rc<[TraitSpec]>,
    /// Segments by index.
    pub segments: Rc<[SegmentSpec]>,
    /// Segment indices in an order where every segment comes after those
    /// it reads.
    order: Vec<usize>,
    /// Per trait: the constants (ms) a recency trait is compared with.
    thresholds: Vec<Vec<f64>>,
    /// The engine tick (ms): wake-ups are at multiples of it.
    tick_ms: u64,
    /// Trait and segment names, to their indices.
    names: foldhash::HashMap<String, Name>,
    /// Per trait: the segments whose condition reads it.
    trait_readers: Vec<Vec<usize>>,
    /// Per segment: the segments whose condition reads it.
    segment_readers: Vec<Vec<usize>>,
    /// Per segment: the traits its condition reads.
    reads: Vec<Vec<usize>>,
    /// The segments whose condition reads attributes.
    attribute_readers: Vec<usize>,
    /// The segments a wake-up evaluates again besides those reading a
    /// time-dependent value that changed: those that read a recency
    /// (its value moves with the clock) and those with a dwell time.
    wake_readers: Vec<usize>,
    /// The traits whose value, or whose comparisons, change with time
    /// alone: sessions, `not_followed_by` sequences, recencies.
    timed: Vec<usize>,
    /// Per trait: the comparisons through which conditions read it, if
    /// every read is one (`NAME OP constant`, `constant OP NAME`, `NAME in
    /// [..]`); `None` if a condition reads it otherwise (in arithmetic, a
    /// string test, against another value, as `NAME.count`). A change of
    /// its value that turns none of them changes no condition.
    tests: Vec<Option<Vec<Test>>>,
}

/// A comparison of one trait's value with constants, as a condition
/// reads it (see [`Rules::tests`]).
#[derive(Clone, Debug)]
enum Test {
    /// `NAME OP constant` (`true`), or `constant OP NAME` (`false`).
    Cmp(crate::spec::expr::CmpOp, Scalar, bool),
    /// `NAME in [..]`.
    In(Vec<Scalar>),
}

impl Test {
    /// The comparison from expression `e` that reads its trait as `name`
    /// (`Expr::Cmp` with one side a constant, or `Expr::In`).
    fn of(e: &Expr, name: &Expr) -> Option<Test> {
        let constant = |c: &Expr| c.eval(&mut |_| ScalarRef::Null).to_scalar();
        match e {
            Expr::Cmp(op, a, b) if **a == *name => Some(Test::Cmp(*op, constant(b), true)),
            Expr::Cmp(op, a, b) if **b == *name => Some(Test::Cmp(*op, constant(a), false)),
            Expr::In(_, list) => Some(Test::In(list.clone())),
            _ => None,
        }
    }

    /// Whether the comparison holds for value `v`, as
    /// [`Expr::eval_bool`] decides it.
    fn holds(&self, v: ScalarRef<'_>) -> bool {
        use crate::spec::expr::{compare_ref, CmpOp};
        match self {
            Test::Cmp(op, c, true) => compare_ref(*op, v, c.borrowed()),
            Test::Cmp(op, c, false) => compare_ref(*op, c.borrowed(), v),
            Test::In(list) => list.iter().any(|l| compare_ref(CmpOp::Eq, v, l.borrowed())),
        }
    }
}

/// Adds to `tests` (see [`Rules::tests`]) the comparisons of expression
/// `e` that read one trait (`index` of a name) against constants, and
/// marks the traits `e` reads in any other way as read otherwise (`None`).
fn collect_tests(e: &Expr, index: &dyn Fn(&str) -> Option<usize>, tests: &mut [Option<Vec<Test>>]) {
    let lone = |x: &Expr| match x {
        Expr::Path(p, _) if p.len() == 1 => index(&p[0]),
        _ => None,
    };
    let tested = match e {
        Expr::Cmp(_, a, b) => match (lone(a), lone(b)) {
            (Some(i), None) if b.is_constant() => Some((i, &**a)),
            (None, Some(i)) if a.is_constant() => Some((i, &**b)),
            _ => None,
        },
        Expr::In(a, _) => lone(a).map(|i| (i, &**a)),
        _ => None,
    };
    match (tested, e) {
        (Some((i, name)), _) => match (&mut tests[i], Test::of(e, name)) {
            (Some(list), Some(test)) => list.push(test),
            (slot, None) => *slot = None,
            (None, Some(_)) => {}
        },
        (None, Expr::Not(a)) => collect_tests(a, index, tests),
        (None, Expr::And(es) | Expr::Or(es)) => {
            es.iter().for_each(|e| collect_tests(e, index, tests))
        }
        (None, Expr::Cmp(_, a, b)) => {
            collect_tests(a, index, tests);
            collect_tests(b, index, tests);
        }
        (None, other) => {
            for (p, _) in other.paths() {
                if let Some(i) = index(&p[0]) {
                    tests[i] = None;
                }
            }
        }
    }
}

/// What a name in a condition is.
#[derive(Clone, Copy)]
enum Name {
    /// Trait `i` (`NAME`, or `NAME.count` of a most frequent value).
    Trait(usize),
    /// Segment `i`.
    Segment(usize),
}

impl Rules {
    /// Prepares `traits` and `segments` (as validated by
    /// [`crate::spec::parse_spec`]: names resolve, segments read each
    /// other without cycles, recencies are compared with constants).
    /// `tick_ms` is the engine tick: a value that changes with time alone
    /// is looked at from the first tick at or after the time it changes.
    pub fn new(traits: Rc<[TraitSpec]>, segments: Rc<[SegmentSpec]>, tick_ms: u64) -> Rules {
        let index_of = |name: &str| segments.iter().position(|s| s.name == name);
        let mut order = Vec::new();
        let mut placed = vec![false; segments.len()];
        fn place(
            s: usize,
            segments: &[SegmentSpec],
            index_of: &dyn Fn(&str) -> Option<usize>,
            placed: &mut [bool],
            order: &mut Vec<usize>,
        ) {
            if placed[s] {
                return;
            }
            placed[s] = true;
            for (p, _) in segments[s].when.paths() {
                if let Some(t) = index_of(&p[0]) {
                    place(t, segments, index_of, placed, order);
                }
            }
            order.push(s);
        }
        for s in 0..segments.len() {
            place(s, &segments, &index_of, &mut placed, &mut order);
        }
        let mut thresholds = vec![Vec::new(); traits.len()];
        fn collect(e: &Expr, traits: &[TraitSpec], out: &mut [Vec<f64>]) {
            match e {
                Expr::Cmp(_, a, b) => {
                    for (x, other) in [(a, b), (b, a)] {
                        if let (Expr::Path(p, _), true) = (&**x, other.is_constant()) {
                            if let Some(i) = traits.iter().position(|t| t.name == p[0]) {
                                let c = other.eval(&mut |_| ScalarRef::Null).as_f64();
                                if let Some(c) = c.filter(|c| c.is_finite()) {
                                    out[i].push(c);
                                }
                            }
                        }
                    }
                }
                Expr::Not(a) => collect(a, traits, out),
                Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| collect(e, traits, out)),
                _ => {}
            }
        }
        for s in segments.iter() {
            collect(&s.when, &traits, &mut thresholds);
        }
        let mut names = foldhash::HashMap::default();
        for (i, t) in traits.iter().enumerate() {
            names.insert(t.name.clone(), Name::Trait(i));
        }
        for (i, s) in segments.iter().enumerate() {
            names.insert(s.name.clone(), Name::Segment(i));
        }
        let mut trait_readers = vec![Vec::new(); traits.len()];
        let mut segment_readers = vec![Vec::new(); segments.len()];
        let mut reads = vec![Vec::new(); segments.len()];
        let mut attribute_readers = Vec::new();
        for (s, seg) in segments.iter().enumerate() {
            for (p, _) in seg.when.paths() {
                match names.get(p[0].as_str()) {
                    Some(Name::Trait(i)) => {
                        trait_readers[*i].push(s);
                        reads[s].push(*i);
                    }
                    Some(Name::Segment(x)) => segment_readers[*x].push(s),
                    None => attribute_readers.push(s),
                }
            }
        }
        let mut wake_readers: Vec<usize> = segments
            .iter()
            .enumerate()
            .filter(|(s, seg)| {
                seg.min_dwell_ms.is_some()
                    || reads[*s].iter().any(|&i| traits[i].aggregate.is_recency())
            })
            .map(|(s, _)| s)
            .collect();
        wake_readers.sort_unstable();
        let timed = (0..traits.len())
            .filter(|&i| time_dependent(&traits[i]) || traits[i].aggregate.is_recency())
            .collect();
        let trait_index = |name: &str| match names.get(name) {
            Some(Name::Trait(i)) => Some(*i),
            _ => None,
        };
        let mut tests = vec![Some(Vec::new()); traits.len()];
        for seg in segments.iter() {
            collect_tests(&seg.when, &trait_index, &mut tests);
        }
        for list in trait_readers
            .iter_mut()
            .chain(segment_readers.iter_mut())
            .chain(reads.iter_mut())
            .chain(std::iter::once(&mut attribute_readers))
        {
            list.sort_unstable();
            list.dedup();
        }
        Rules {
            traits,
            segments,
            order,
            thresholds,
            tick_ms: tick_ms.max(1),
            names,
            trait_readers,
            segment_readers,
            reads,
            attribute_readers,
            wake_readers,
            timed,
            tests,
        }
    }
}

impl Rules {
    /// Whether trait `i` changing from `old` to `new` (as conditions see
    /// them) can change a condition: not if every condition reads it in
    /// comparisons with constants, and each comes out the same for both
    /// values. (On the shipped definition most changes of a count or an
    /// average cross no threshold, and evaluate no segment.)
    fn may_turn(&self, i: u32, old: &Scalar, new: &Scalar) -> bool {
        match &self.tests[i as usize] {
            None => true,
            Some(tests) => tests
                .iter()
                .any(|t| t.holds(old.borrowed()) != t.holds(new.borrowed())),
        }
    }

    /// The segments to evaluate again when the traits `touched` (sorted)
    /// changed, and the attributes if `attributes`, and the profile was
    /// `woken` ([`Rules::wake_readers`]): those that read them, and those
    /// that read those segments, and so on; into `dirty` (its buffer
    /// reused), by segment index.
    fn dirty_into(&self, touched: &[u32], attributes: bool, woken: bool, dirty: &mut Vec<bool>) {
        dirty.clear();
        dirty.resize(self.segments.len(), false);
        let mut stack: Vec<usize> = Vec::new();
        for &i in touched {
            stack.extend(&self.trait_readers[i as usize]);
        }
        if attributes {
            stack.extend(&self.attribute_readers);
        }
        if woken {
            stack.extend(&self.wake_readers);
        }
        while let Some(s) = stack.pop() {
            if !dirty[s] {
                dirty[s] = true;
                stack.extend(&self.segment_readers[s]);
            }
        }
    }
}

/// Buffers reused from one profile evaluation to the next: the profile
/// stage evaluates about 100 000 profiles per second of a replay (340 000
/// for 200 000 events of the shipped definition), and each of these was
/// allocated anew for every one.
#[derive(Default)]
struct Scratch {
    /// The traits a change touched (sorted, deduplicated once complete).
    touched: Vec<u32>,
    /// The abelian touched traits' values before the changes, as
    /// conditions see them.
    old_abelian: Vec<(u32, Scalar)>,
    /// See [`ProfileFacts::memberships`].
    known: Vec<(u32, Scalar, Option<f64>)>,
    /// The touched traits whose value changed.
    changed: Vec<u32>,
    /// The values to emit: `(trait index, maybe with COUNT_OF, value)`.
    shown: Vec<(u32, Scalar)>,
    /// See [`ProfileFacts::memberships`].
    needed: Vec<bool>,
    values: Vec<Scalar>,
    counts: Vec<Option<f64>>,
    member: Vec<bool>,
    /// The memberships computed, sorted by segment.
    out: Vec<(u32, Time)>,
    /// The profile's current sessions at the time it is evaluated.
    sessions: SessionStarts,
}

/// Where each session trait's current session starts (the index of its
/// first point, see [`session_start`]) in the points of the profile being
/// evaluated, at the time it is evaluated: found once for the trait's
/// value and its wake-up (the walk back through a long session was a
/// fifth of the profile stage's point values). Cleared before each
/// profile's evaluation, after its changes are applied.
#[derive(Default)]
struct SessionStarts(Vec<(u32, usize)>);

impl SessionStarts {
    /// The start of trait `i`'s current session in `points` at `now`.
    fn of(&mut self, i: u32, points: &Points, gap: u64, max: u64, now: Time) -> usize {
        if let Some(&(_, start)) = self.0.iter().find(|(t, _)| *t == i) {
            return start;
        }
        let start = session_start(points, gap, max, now);
        self.0.push((i, start));
        start
    }
}

/// The segments after a reload: `old` in their order (a changed one takes
/// its new condition and dwell time; a removed one is kept, retired, with
/// the condition `false`, so that its members leave and its index names
/// it still), then the segments of `new` that `old` lacks, in file order.
/// The same on every worker and in the sinks, so indices agree.
pub fn merged_segments(old: &[SegmentSpec], new: &[SegmentSpec]) -> Vec<SegmentSpec> {
    let mut out: Vec<SegmentSpec> = old
        .iter()
        .map(|o| match new.iter().find(|n| n.name == o.name) {
            Some(n) => n.clone(),
            None => SegmentSpec {
                when: Expr::Lit(Scalar::Bool(false)),
                min_dwell_ms: None,
                ..o.clone()
            },
        })
        .collect();
    out.extend(
        new.iter()
            .filter(|n| !old.iter().any(|o| o.name == n.name))
            .cloned(),
    );
    out
}

/// What [`evaluate`] maintains: trait values and segment memberships.
pub struct Evaluated<'s> {
    /// `((profile, trait), value)` at each time the value changes, with
    /// difference `+1` (a log of values, not a collection), as written to
    /// the state: counts, sums and distinct counts of zero, and null values,
    /// are null (absent from the state); a recency's value is the time of
    /// its event (epoch ms); the count of a most frequent value is under
    /// the trait's index with [`COUNT_OF`] set.
    pub trait_values: Coll<'s, ((Id, u32), Scalar)>,
    /// `(segment index, profile)`.
    pub memberships: Coll<'s, (u32, Id)>,
    /// When each profile entered each segment with a dwell time
    /// (`min_dwell`): `((profile, segment name, entered), time, ±1)`, `+1`
    /// at the entry (or when a reload gives a segment it is in a dwell
    /// time), `-1` at the exit, for the checkpoint's retained input (a
    /// restart needs the entry times to run the dwell times on).
    pub dwell_entries: Stream<'s, Time, Vec<((Id, String, Time), Time, isize)>>,
}

/// Trait values and segment memberships per profile.
///
/// `trait_items` are the changes of the profiles' trait inputs,
/// `(profile, items)` ([`crate::dataflow::route`]): amount totals and the
/// points of the other traits.
///
/// `clocks` are the sources' clocks and cuts, on every worker: once every
/// input has ended, the times that will never be committed
/// ([`crate::time::Completion::never_committed`]) are dropped unprocessed.
///
/// This is keyed state in event-time order, as a Flink keyed process
/// function keeps it: each profile's facts live on one worker (exchanged
/// by profile), the changes of a time are applied once the inputs'
/// frontier has passed it, in time order (event time is totally ordered),
/// and only the profiles a time touches, or that asked to be woken then,
/// are evaluated. The state is one entry per profile with any fact; a
/// profile without facts is forgotten.
pub fn evaluate<'s>(
    profiles: Coll<'s, Id>,
    trait_items: Stream<'s, Time, Vec<((Id, Vec<Item>), Time, isize)>>,
    clocks: Stream<'s, Time, Vec<crate::time::ClockReport>>,
    restored_entries: Stream<'s, Time, Vec<((Id, String, Time), Time, isize)>>,
    attributes: Coll<'s, (Id, Attributes)>,
    rules: Rc<Rules>,
    reloads: Option<(
        Stream<'s, Time, Vec<String>>,
        Box<dyn Fn(Time, &Spec, &[SegmentSpec])>,
    )>,
) -> Evaluated<'s> {
    use differential_dataflow::hashable::Hashable;
    use timely::container::CapacityContainerBuilder;
    use timely::dataflow::channels::pact::Exchange;
    use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
    use timely::dataflow::operators::generic::OutputBuilder;

    let scope = profiles.inner.scope();
    let mut builder = OperatorBuilder::new("Evaluate: profiles".to_owned(), scope);
    let mut exists_in = builder.new_input(
        profiles.inner,
        Exchange::new(|(p, _, _): &(Id, Time, isize)| p.hashed()),
    );
    let mut items_in = builder.new_input(
        trait_items,
        Exchange::new(|((p, _), _, _): &((Id, Vec<Item>), Time, isize)| p.hashed()),
    );
    let mut attrs_in = builder.new_input(
        attributes.inner,
        Exchange::new(|((p, _), _, _): &((Id, Attributes), Time, isize)| p.hashed()),
    );
    // Definitions accepted while the run goes on (see `reload`): the
    // stream, and what to tell the rest of the process when one applies.
    let (reload_stream, on_reload) = match reloads {
        Some((stream, on)) => (stream, Some(on)),
        None => (
            timely::dataflow::operators::generic::operator::empty(scope),
            None,
        ),
    };
    let mut reload_in = builder.new_input(reload_stream, Pipeline);
    let mut clocks_in = builder.new_input(clocks, Pipeline);
    let mut entries_in = builder.new_input(
        restored_entries,
        Exchange::new(|((p, _, _), _, _): &((Id, String, Time), Time, isize)| p.hashed()),
    );
    let (values_out, trait_values) = builder.new_output();
    let (members_out, memberships) = builder.new_output();
    let (entries_out, dwell_entries) = builder.new_output();
    let mut values_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(values_out);
    let mut members_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(members_out);
    let mut entries_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(entries_out);
    let mut rules = rules;
    builder.build(move |_initial| {
        let mut pending: BTreeMap<Time, Vec<(Id, Change)>> = BTreeMap::new();
        // Definition texts to apply, by the time they apply from.
        let mut reload_at: BTreeMap<Time, Vec<String>> = BTreeMap::new();
        // Capabilities (values, memberships, dwell entries) at the
        // earliest pending time.
        let mut held: Option<[Capability<Time>; 3]> = None;
        let mut state: IdMap<ProfileFacts> = IdMap::default();
        let mut scratch = Scratch::default();
        // The trait values changed in this activation: the last value of
        // each (profile, trait) and its time, in the order first changed,
        // and where each is in that list.
        let mut changed_values: Vec<((Id, u32), Time, Scalar)> = Vec::new();
        let mut changed_at: std::collections::HashMap<
            (Id, u32),
            usize,
            foldhash::fast::RandomState,
        > = Default::default();
        // The segments to evaluate again (a buffer reused).
        let mut dirty: Vec<bool> = Vec::new();
        let mut completion = crate::time::Completion::default();
        // Per segment: whether an entry of it may be in the retained
        // input (it has, or had in this run, a dwell time), so that an
        // exit removes it.
        let mut recorded: Vec<bool> = rules
            .segments
            .iter()
            .map(|s| s.min_dwell_ms.is_some())
            .collect();
        move |frontiers| {
            clocks_in.for_each(|_, data| data.drain(..).for_each(|r| completion.note(r)));
            let mut note = |cap: &InputCapability<Time>, time: Time| {
                if held.as_ref().is_none_or(|h| time < *h[0].time()) {
                    held = Some([
                        cap.delayed(&time, 0),
                        cap.delayed(&time, 1),
                        cap.delayed(&time, 2),
                    ]);
                }
            };
            exists_in.for_each_stamp(|cap, data| {
                for (p, t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending.entry(t).or_default().push((p, Change::Exists(r)));
                }
            });
            items_in.for_each_stamp(|cap, data| {
                for ((p, items), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending
                        .entry(t)
                        .or_default()
                        .push((p, Change::Items(items, r)));
                }
            });
            entries_in.for_each_stamp(|cap, data| {
                for ((p, name, entered), t, r) in data.flat_map(|d| d.drain(..)) {
                    // A segment the definition no longer has is dropped.
                    let Some(segment) = rules.segments.iter().position(|s| s.name == name) else {
                        continue;
                    };
                    recorded[segment] = true;
                    if r > 0 {
                        let segment = segment as u32;
                        note(&cap, t);
                        pending
                            .entry(t)
                            .or_default()
                            .push((p, Change::Entered(segment, entered)));
                    }
                }
            });
            attrs_in.for_each_stamp(|cap, data| {
                for ((p, a), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending.entry(t).or_default().push((p, Change::Attrs(a, r)));
                }
            });
            reload_in.for_each(|cap, data| {
                // A message without a time makes no claim: nothing to apply.
                let Some(&t) = cap.least() else {
                    data.clear();
                    return;
                };
                note(&cap, t);
                pending.entry(t).or_default();
                reload_at.entry(t).or_default().extend(data.drain(..));
            });
            let Some([hold_values, hold_members, hold_entries]) = held.as_mut() else {
                return;
            };
            // A time is complete once no input can still carry it.
            let complete = |t: &Time| frontiers.iter().all(|f| !f.less_equal(t));
            let ended = frontiers.iter().all(|f| f.is_empty());
            let mut values_out = values_out.activate();
            let mut members_out = members_out.activate();
            // One session for all the times completed now, at the held
            // capabilities (no later than any of them).
            let mut values = values_out.session(&*hold_values);
            let mut members = members_out.session(&*hold_members);
            let mut entries_out = entries_out.activate();
            let mut entries = entries_out.session(&*hold_entries);
            while let Some(entry) = pending.first_entry() {
                if !complete(entry.key()) {
                    break;
                }
                if ended && completion.never_committed(*entry.key()) {
                    // The inputs ended: wake-ups and window ends after the
                    // end of the data are no part of the result.
                    pending.clear();
                    break;
                }
                let (time, mut changes) = entry.remove_entry();
                let mut newly_dwelling: Vec<u32> = Vec::new();
                // A new definition applies from this time: every profile
                // held is evaluated again under it.
                if let Some(texts) = reload_at.remove(&time) {
                    for text in texts {
                        let Ok(spec) = crate::spec::parse_spec(&text, "reloaded definition") else {
                            continue;
                        };
                        let merged = merged_segments(&rules.segments, &spec.segments);
                        if let Some(on) = &on_reload {
                            on(time, &spec, &merged);
                        }
                        // Members of a segment that gains a dwell time
                        // have their entries recorded now.
                        // (Again after a reload dropped it: an entry is a put.)
                        newly_dwelling = merged
                            .iter()
                            .zip(rules.segments.iter())
                            .enumerate()
                            .filter(|(_, (m, o))| {
                                m.min_dwell_ms.is_some() && o.min_dwell_ms.is_none()
                            })
                            .map(|(s, _)| s as u32)
                            .collect();
                        recorded.resize(merged.len(), false);
                        for (s, m) in merged.iter().enumerate() {
                            recorded[s] |= m.min_dwell_ms.is_some();
                        }
                        rules = Rc::new(Rules::new(
                            Rc::clone(&rules.traits),
                            merged.into(),
                            rules.tick_ms,
                        ));
                    }
                    changes.extend(state.keys().map(|p| (*p, Change::Reload)));
                }
                let rules = &*Rc::clone(&rules);
                // By profile (stable: a profile's changes keep their order).
                changes.sort_by_key(|(p, _)| *p);
                let mut wakes: Vec<(Time, Id)> = Vec::new();
                for group in changes.chunk_by_mut(|a, b| a.0 == b.0) {
                    let p = group[0].0;
                    let facts = state.entry(p).or_default();
                    let Scratch {
                        touched,
                        old_abelian,
                        known,
                        changed,
                        shown,
                        sessions,
                        ..
                    } = &mut scratch;
                    touched.clear();
                    let mut woken = false;
                    // Existence changed: every segment is evaluated again.
                    let mut everything = false;
                    let mut attributes_changed = false;
                    // The abelian values before the changes, of the traits
                    // they touch.
                    for (_, change) in group.iter() {
                        if let Change::Items(items, _) = change {
                            touched.extend(items.iter().map(Item::trait_index));
                        }
                    }
                    touched.sort_unstable();
                    touched.dedup();
                    old_abelian.clear();
                    for &i in touched.iter() {
                        let spec = &rules.traits[i as usize];
                        if spec.is_abelian() {
                            old_abelian.push((i, abelian_value(spec, i, &facts.totals)));
                        }
                    }
                    for (_, change) in group.iter_mut() {
                        match change {
                            Change::Items(..) => {}
                            Change::Wake => woken |= facts.wake == Some(time),
                            Change::Exists(_) | Change::Reload => everything = true,
                            Change::Attrs(..) => attributes_changed = true,
                            // Restored with the state: every segment is
                            // evaluated at the restore time anyway.
                            Change::Entered(..) => everything = true,
                        }
                        facts.apply(std::mem::replace(change, Change::Exists(0)));
                    }
                    if woken {
                        // A value that changes with time alone, or a dwell
                        // time, is due: the time-dependent values are
                        // computed again (the segments reading those that
                        // changed are evaluated), and the segments reading
                        // a recency or with a dwell time are evaluated.
                        facts.wake = None;
                        for (i, t) in rules.traits.iter().enumerate() {
                            if time_dependent(t) {
                                touched.push(i as u32);
                            }
                        }
                    }
                    facts.tidy();
                    sessions.0.clear();
                    touched.sort_unstable();
                    touched.dedup();
                    // The touched traits' values now, as conditions see
                    // them; those whose value changed make the segments that
                    // read them dirty (a window end that changes no value
                    // evaluates no segment).
                    let has_facts = facts.has_facts();
                    known.clear();
                    changed.clear();
                    shown.clear();
                    for &i in touched.iter() {
                        let spec = &rules.traits[i as usize];
                        let (value, count) = if !has_facts {
                            (Scalar::Null, None)
                        } else if spec.is_abelian() {
                            (abelian_value(spec, i, &facts.totals), None)
                        } else {
                            facts.point_value(spec, i, time, sessions)
                        };
                        let new = if !has_facts {
                            Scalar::Null
                        } else if spec.aggregate.is_recency() {
                            stored(facts.state_value(spec, i, time, sessions))
                        } else {
                            stored(value.clone())
                        };
                        if spec.is_abelian() {
                            // As conditions see it (0 and null differ
                            // there, not in the state).
                            let old = old_abelian
                                .iter()
                                .find(|(t, _)| *t == i)
                                .map_or(Scalar::Null, |(_, v)| v.clone());
                            if old != value && rules.may_turn(i, &old, &value) {
                                changed.push(i);
                            }
                            if stored(old) != new {
                                shown.push((i, new));
                            }
                        } else {
                            let old = facts.shown(i).cloned().unwrap_or(Scalar::Null);
                            if old != new {
                                changed.push(i);
                                shown.push((i, new));
                            }
                        }
                        // A most frequent value's count, shown as the trait
                        // `NAME.count` (under `i | COUNT_OF`).
                        if spec.aggregate == Aggregate::MostFrequent {
                            let new = stored(count.map_or(Scalar::Null, Scalar::Num));
                            let old = facts.shown(i | COUNT_OF).cloned().unwrap_or(Scalar::Null);
                            if old != new {
                                changed.push(i);
                                shown.push((i | COUNT_OF, new));
                            }
                        }
                        known.push((i, value, count));
                    }
                    if !everything {
                        rules.dirty_into(changed, attributes_changed, woken, &mut dirty);
                    }
                    // Nothing to evaluate: no segment reads a changed
                    // value, and no value that changes with time alone
                    // was touched (its wake-up stands). The memberships
                    // and the wake-up stay as they were (most window ends
                    // of counts and sums).
                    let quiet = !everything
                        && !dirty.iter().any(|d| *d)
                        && !touched.iter().any(|i| rules.timed.contains(&(*i as usize)))
                        && facts.restored_entries.is_empty();
                    let dirty = (!everything).then_some(dirty.as_slice());
                    let wake = if !has_facts {
                        scratch.out.clear();
                        None
                    } else if quiet {
                        scratch.out.clear();
                        scratch.out.extend_from_slice(&facts.members);
                        None
                    } else {
                        facts.memberships(rules, time, dirty, &mut scratch)
                    };
                    let now = &scratch.out;
                    for (i, new) in scratch.shown.drain(..) {
                        if !rules.traits[(i & !COUNT_OF) as usize].is_abelian() {
                            facts.show(i, new.clone());
                        }
                        match changed_at.entry((p, i)) {
                            std::collections::hash_map::Entry::Occupied(at) => {
                                changed_values[*at.get()] = ((p, i), time, new);
                            }
                            std::collections::hash_map::Entry::Vacant(at) => {
                                at.insert(changed_values.len());
                                changed_values.push(((p, i), time, new));
                            }
                        }
                    }
                    let name = |s: u32| rules.segments[s as usize].name.clone();
                    for &(s, at) in facts.members.iter() {
                        if !now.iter().any(|&(x, _)| x == s) {
                            members.give(((s, p), time, -1));
                            if recorded[s as usize] {
                                entries.give(((p, name(s), at), time, -1));
                            }
                        }
                    }
                    for &(s, at) in now.iter() {
                        let was = facts.members.iter().any(|&(x, _)| x == s);
                        if !was {
                            members.give(((s, p), time, 1));
                        }
                        let dwells = rules.segments[s as usize].min_dwell_ms.is_some();
                        if dwells && (!was || newly_dwelling.contains(&s)) {
                            entries.give(((p, name(s), at), time, 1));
                        }
                    }
                    if *facts.members != **now {
                        facts.members = now.as_slice().into();
                    }
                    if !facts.restored_entries.is_empty() {
                        facts.restored_entries = Box::default();
                    }
                    if let Some(w) = wake {
                        if facts.wake.is_none_or(|old| w < old || old <= time) {
                            facts.wake = Some(w);
                            wakes.push((w, p));
                        }
                    }
                    if facts.is_empty() {
                        state.remove(&p);
                    }
                }
                for (w, p) in wakes {
                    pending.entry(w).or_default().push((p, Change::Wake));
                }
            }
            // A trait's values go to the state once per activation, the
            // last one at its time: the capabilities held since before
            // the first of these times are downgraded only below, so the
            // commit stage's frontier passes all of them at once and no
            // state batch can end between them (the earlier values would
            // be overwritten in the same batch anyway).
            changed_at.clear();
            for (key, time, value) in changed_values.drain(..) {
                values.give(((key, value), time, 1));
            }
            drop((values, members, entries));
            match pending.first_key_value() {
                Some((&next, _)) => {
                    hold_values.downgrade(&next);
                    hold_members.downgrade(&next);
                    hold_entries.downgrade(&next);
                }
                None => held = None,
            }
        }
    });
    Evaluated {
        trait_values: trait_values.as_collection(),
        memberships: memberships.as_collection(),
        dwell_entries,
    }
}

/// Whether a trait's value can change with time alone (so it is looked
/// at whenever its profile is evaluated).
fn time_dependent(t: &TraitSpec) -> bool {
    matches!(t.window, Window::Session { .. }) || t.sequence.as_ref().is_some_and(|s| !s.followed)
}

/// A value as the state holds it: zero counts, sums and distinct counts
/// are absent (null).
fn stored(v: Scalar) -> Scalar {
    match v {
        Scalar::Num(n) if n == 0.0 => Scalar::Null,
        v => v,
    }
}

/// The value of abelian trait `i` from `totals` (by slot, sorted).
fn abelian_value(spec: &TraitSpec, i: u32, totals: &[(u32, Total)]) -> Scalar {
    let get = |slot: u32| {
        totals
            .binary_search_by_key(&slot, |(s, _)| *s)
            .map_or(0, |at| totals[at].1)
    };
    let (a, b) = (get(i), get(i | SECOND));
    match spec.aggregate {
        Aggregate::Count => Scalar::Num(a as f64),
        Aggregate::Sum => Scalar::Num(a as f64 / SUM_SCALE),
        Aggregate::Avg if b != 0 => Scalar::Num(a as f64 / SUM_SCALE / b as f64),
        Aggregate::Share if b != 0 => Scalar::Num(a as f64 / b as f64),
        _ => Scalar::Null,
    }
}

/// One change to a profile's facts.
enum Change {
    /// The profile's existence changes by this count.
    Exists(isize),
    /// Trait inputs change, `diff` times these items.
    Items(Vec<Item>, isize),
    /// These attributes' count changes.
    Attrs(Attributes, isize),
    /// The profile asked to be evaluated at this time.
    Wake,
    /// New segment definitions apply from this time.
    Reload,
    /// Restored from a checkpoint: the profile entered this segment (one
    /// with a dwell time) at this time.
    Entered(u32, Time),
}

/// A multiset of `(tick, value)` points, in order, with their counts
/// (none zero).
///
/// A sorted double-ended queue rather than a tree: points arrive mostly
/// in time order (appended) and leave oldest first (popped at the front),
/// a trait holds few of them per profile (a session's events, the values
/// of a window), and the values are read by scanning them in order, which
/// a contiguous buffer does several times faster than a tree's nodes.
#[derive(Clone, Debug, Default, PartialEq)]
struct Points(std::collections::VecDeque<((Time, Scalar), isize)>);

impl Points {
    fn new() -> Points {
        Points::default()
    }

    /// Adds `c` to the count of `point` (removed at zero).
    fn add(&mut self, point: (Time, Scalar), c: isize) {
        if c == 0 {
            return;
        }
        let q = &mut self.0;
        if q.back().is_none_or(|(k, _)| *k < point) {
            q.push_back((point, c));
            return;
        }
        if q.front().is_some_and(|(k, _)| point < *k) {
            q.push_front((point, c));
            return;
        }
        // Points leave their windows oldest first: a retraction is
        // usually of the front one.
        if let Some(front) = q.front_mut().filter(|(k, _)| *k == point) {
            front.1 += c;
            if front.1 == 0 {
                q.pop_front();
            }
            return;
        }
        match q.binary_search_by(|(k, _)| k.cmp(&point)) {
            Ok(at) => {
                q[at].1 += c;
                if q[at].1 == 0 {
                    q.remove(at);
                }
            }
            Err(at) => q.insert(at, (point, c)),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many distinct points.
    fn len(&self) -> usize {
        self.0.len()
    }

    /// The points and their counts, in order.
    fn iter(&self) -> impl DoubleEndedIterator<Item = (&(Time, Scalar), &isize)> {
        self.0.iter().map(|(k, c)| (k, c))
    }

    /// The points, in order.
    fn keys(&self) -> impl DoubleEndedIterator<Item = &(Time, Scalar)> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl FromIterator<((Time, Scalar), isize)> for Points {
    fn from_iter<I: IntoIterator<Item = ((Time, Scalar), isize)>>(iter: I) -> Points {
        let mut points = Points::new();
        for (p, c) in iter {
            points.add(p, c);
        }
        points
    }
}

/// The facts of one profile, as [`evaluate`] keeps them (boxed slices:
/// one of these per profile, and most change rarely).
#[derive(Default)]
struct ProfileFacts {
    /// How many times the profile exists (0 or 1 in a consistent input).
    exists: isize,
    /// Totals by slot, sorted by slot (zero ones removed after each time).
    totals: Box<[(u32, Total)]>,
    /// Points by trait index, sorted (empty ones removed).
    points: Box<[(u32, Points)]>,
    /// Attribute versions and their counts (normally one, count 1).
    attrs: Box<[(Attributes, isize)]>,
    /// The segments it belongs to, as last emitted, with when it entered.
    members: Box<[(u32, Time)]>,
    /// Restored from a checkpoint, until the profile is evaluated at the
    /// restore time: when it entered the segments with a dwell time it
    /// was in (so that their dwell times run from the real entry).
    restored_entries: Box<[(u32, Time)]>,
    /// The values of point traits as last emitted, by trait index (with
    /// [`COUNT_OF`]: a most frequent value's count), non-null only.
    shown: Box<[(u32, Scalar)]>,
    /// When it asked to be evaluated next.
    wake: Option<Time>,
}

/// Inserts or updates `key`'s entry of a sorted boxed slice.
fn upsert<V>(slice: &mut Box<[(u32, V)]>, key: u32, new: impl FnOnce() -> V) -> &mut V {
    let at = match slice.binary_search_by_key(&key, |(k, _)| *k) {
        Ok(at) => at,
        Err(at) => {
            let mut v = std::mem::take(slice).into_vec();
            v.insert(at, (key, new()));
            *slice = v.into();
            at
        }
    };
    &mut slice[at].1
}

/// [`upsert`] on a sorted vector (several insertions, then one boxed
/// slice of the right size).
fn upsert_vec<V>(v: &mut Vec<(u32, V)>, key: u32, new: impl FnOnce() -> V) -> &mut V {
    let at = match v.binary_search_by_key(&key, |(k, _)| *k) {
        Ok(at) => at,
        Err(at) => {
            v.insert(at, (key, new()));
            at
        }
    };
    &mut v[at].1
}

/// Removes the entries of a boxed slice that `keep` rejects.
fn retain<T>(slice: &mut Box<[T]>, keep: impl FnMut(&T) -> bool) {
    let mut v = std::mem::take(slice).into_vec();
    v.retain(keep);
    *slice = v.into();
}

impl ProfileFacts {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Exists(r) => self.exists += r,
            Change::Items(items, r) => {
                // As vectors while the items apply: a new profile gains
                // many slots at once, each of which would reallocate the
                // boxed slice.
                let mut totals = std::mem::take(&mut self.totals).into_vec();
                let mut points = std::mem::take(&mut self.points).into_vec();
                for item in items {
                    match item {
                        Item::Amount(slot, change) => {
                            *upsert_vec(&mut totals, slot, || 0) += change * r as Total
                        }
                        Item::Point(index, point, c) => {
                            upsert_vec(&mut points, index, Points::new).add(point, c * r);
                        }
                    }
                }
                self.totals = totals.into_boxed_slice();
                self.points = points.into_boxed_slice();
            }
            Change::Attrs(a, r) => match self.attrs.iter_mut().find(|(x, _)| *x == a) {
                Some((_, count)) => *count += r,
                None => {
                    let mut attrs = std::mem::take(&mut self.attrs).into_vec();
                    attrs.push((a, r));
                    self.attrs = attrs.into();
                }
            },
            Change::Entered(segment, at) => {
                let mut v = std::mem::take(&mut self.restored_entries).into_vec();
                v.push((segment, at));
                self.restored_entries = v.into();
            }
            Change::Wake | Change::Reload => {}
        }
    }

    /// Removes zero totals, emptied point sets and zero attribute counts
    /// (a point is removed as soon as its count is zero).
    fn tidy(&mut self) {
        if self.totals.iter().any(|&(_, total)| total == 0) {
            retain(&mut self.totals, |&(_, total)| total != 0);
        }
        if self.points.iter().any(|(_, p)| p.is_empty()) {
            retain(&mut self.points, |(_, p)| !p.is_empty());
        }
        if self.attrs.iter().any(|(_, count)| *count == 0) {
            retain(&mut self.attrs, |(_, count)| *count != 0);
        }
    }

    /// Whether the profile has any fact (once tidied): one that has none
    /// (it was merged into another, or never existed) is in no segment.
    fn has_facts(&self) -> bool {
        self.exists != 0
            || !self.totals.is_empty()
            || !self.points.is_empty()
            || !self.attrs.is_empty()
    }

    /// Nothing to keep: no fact, no membership, no shown value.
    fn is_empty(&self) -> bool {
        !self.has_facts() && self.members.is_empty() && self.shown.is_empty()
    }

    fn points(&self, i: u32) -> Option<&Points> {
        self.points
            .binary_search_by_key(&i, |(k, _)| *k)
            .ok()
            .map(|at| &self.points[at].1)
    }

    fn shown(&self, i: u32) -> Option<&Scalar> {
        self.shown
            .binary_search_by_key(&i, |(k, _)| *k)
            .ok()
            .map(|at| &self.shown[at].1)
    }

    fn show(&mut self, i: u32, v: Scalar) {
        if v == Scalar::Null {
            retain(&mut self.shown, |(k, _)| *k != i);
        } else {
            *upsert(&mut self.shown, i, || Scalar::Null) = v;
        }
    }

    /// The value of point trait `i` at `now` as conditions see it, and the
    /// count of a most frequent value.
    fn point_value(
        &self,
        spec: &TraitSpec,
        i: u32,
        now: Time,
        sessions: &mut SessionStarts,
    ) -> (Scalar, Option<f64>) {
        let Some(points) = self.points(i) else {
            return (empty_value(spec.aggregate), None);
        };
        if let Some(seq) = &spec.sequence {
            return (
                Scalar::Num(sequence_count(points, seq.followed, seq.within_ms, now) as f64),
                None,
            );
        }
        if let Window::Session { gap, max } = spec.window {
            let start = sessions.of(i, points, gap, max, now);
            let session = session_from(points, start);
            return fold(spec.aggregate, session.map(|((t, v), c)| (*t, v, *c)), now);
        }
        match spec.aggregate {
            Aggregate::Min => (
                points
                    .keys()
                    .next()
                    .map_or(Scalar::Null, |(_, v)| v.clone()),
                None,
            ),
            Aggregate::Max => (
                points
                    .keys()
                    .next_back()
                    .map_or(Scalar::Null, |(_, v)| v.clone()),
                None,
            ),
            Aggregate::First => (
                points
                    .keys()
                    .next()
                    .map_or(Scalar::Null, |(_, v)| v.clone()),
                None,
            ),
            Aggregate::Last => (
                points
                    .keys()
                    .next_back()
                    .map_or(Scalar::Null, |(_, v)| v.clone()),
                None,
            ),
            Aggregate::SinceFirst => (
                points.keys().next().map_or(Scalar::Null, |(t, _)| {
                    Scalar::Num(now.saturating_sub(*t) as f64)
                }),
                None,
            ),
            Aggregate::SinceLast => (
                points.keys().next_back().map_or(Scalar::Null, |(t, _)| {
                    Scalar::Num(now.saturating_sub(*t) as f64)
                }),
                None,
            ),
            // Windowed points of distinct and most frequent values are
            // keyed by value alone (tick 0): one entry per value.
            Aggregate::Distinct => (Scalar::Num(points.len() as f64), None),
            Aggregate::MostFrequent => {
                let best = points.iter().max_by_key(|((_, v), c)| (**c, Reverse(v)));
                match best {
                    Some(((_, v), c)) => (v.clone(), Some(*c as f64)),
                    None => (Scalar::Null, None),
                }
            }
            _ => fold(
                spec.aggregate,
                points.iter().map(|((t, v), c)| (*t, v, *c)),
                now,
            ),
        }
    }

    /// The value of point trait `i` as the state holds it: that of
    /// conditions, but a recency's is the time of its event.
    fn state_value(
        &self,
        spec: &TraitSpec,
        i: u32,
        now: Time,
        sessions: &mut SessionStarts,
    ) -> Scalar {
        let keys = || self.points(i).map(|p| p.keys());
        match spec.aggregate {
            Aggregate::SinceFirst => keys()
                .and_then(|mut k| k.next().map(|(t, _)| Scalar::Num(*t as f64)))
                .unwrap_or(Scalar::Null),
            Aggregate::SinceLast => keys()
                .and_then(|mut k| k.next_back().map(|(t, _)| Scalar::Num(*t as f64)))
                .unwrap_or(Scalar::Null),
            _ => self.point_value(spec, i, now, sessions).0,
        }
    }

    /// The segments the profile belongs to at `now` (with when it entered
    /// each), and when it must be evaluated again without a new fact.
    /// `dirty`: the segments to evaluate (`None`: all; the others stay as
    /// they were); `known`: trait values already computed at `now`, as
    /// conditions see them, with the count of a most frequent value.
    fn memberships(
        &self,
        rules: &Rules,
        now: Time,
        dirty: Option<&[bool]>,
        scratch: &mut Scratch,
    ) -> Option<Time> {
        let traits = &rules.traits;
        let Scratch {
            known,
            needed,
            values,
            counts,
            member,
            out,
            sessions,
            ..
        } = scratch;
        // The values the segments evaluated again read (the others stay
        // null, unread).
        needed.clear();
        needed.resize(traits.len(), dirty.is_none());
        if let Some(dirty) = dirty {
            for (s, d) in dirty.iter().enumerate() {
                if *d {
                    for &i in &rules.reads[s] {
                        needed[i] = true;
                    }
                }
            }
        }
        values.clear();
        values.resize(traits.len(), Scalar::Null);
        counts.clear();
        counts.resize(traits.len(), None);
        for (i, v, c) in known.drain(..) {
            needed[i as usize] = false;
            values[i as usize] = v;
            counts[i as usize] = c;
        }
        for (i, spec) in traits.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let (v, c) = if spec.is_abelian() {
                (abelian_value(spec, i as u32, &self.totals), None)
            } else {
                self.point_value(spec, i as u32, now, sessions)
            };
            values[i] = v;
            counts[i] = c;
        }
        // The greatest of several present attribute versions counts.
        let attrs = self
            .attrs
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(a, _)| a)
            .max();
        let segments = &rules.segments;
        member.clear();
        member.resize(segments.len(), false);
        out.clear();
        let mut wake: Option<Time> = None;
        let tick = rules.tick_ms;
        let mut soon = |t: Time| {
            // The first tick at or after `t`.
            let t = crate::time::ceil_to_tick(t, tick);
            if t > now && wake.is_none_or(|w| t < w) {
                wake = Some(t);
            }
        };
        for &s in &rules.order {
            let spec = &segments[s];
            let entered = self
                .members
                .iter()
                .chain(self.restored_entries.iter())
                .find(|&&(x, _)| x as usize == s)
                .map(|&(_, at)| at);
            if dirty.is_some_and(|d| !d[s]) {
                // Nothing it reads changed: it stays as it was, and a
                // dwell time that runs keeps its wake-up.
                if let Some(at) = entered {
                    member[s] = true;
                    out.push((s as u32, at));
                    if let Some(dwell) = spec.min_dwell_ms {
                        soon(at.saturating_add(dwell));
                    }
                }
                continue;
            }
            let holds = {
                let mut lookup = |path: &[String]| -> ScalarRef<'_> {
                    match (rules.names.get(path[0].as_str()), path) {
                        (Some(Name::Trait(i)), [_]) => values[*i].borrowed(),
                        (Some(Name::Trait(i)), [_, _]) => {
                            counts[*i].map_or(ScalarRef::Null, ScalarRef::Num)
                        }
                        (Some(Name::Segment(x)), _) => ScalarRef::Bool(member[*x]),
                        (None, [first, field]) if first == "attributes" => attrs
                            .and_then(|a| {
                                a.iter()
                                    .find(|(k, _)| k == field)
                                    .map(|(_, v)| v.borrowed())
                            })
                            .unwrap_or(ScalarRef::Null),
                        _ => ScalarRef::Null,
                    }
                };
                spec.when.eval_bool(&mut lookup)
            };
            let is_member = match (holds, entered, spec.min_dwell_ms) {
                (true, Some(at), _) => Some(at),
                (true, None, _) => Some(now),
                (false, Some(at), Some(dwell)) if now < at.saturating_add(dwell) => {
                    soon(at.saturating_add(dwell));
                    Some(at)
                }
                (false, _, _) => None,
            };
            if let Some(at) = is_member {
                member[s] = true;
                out.push((s as u32, at));
            }
        }
        out.sort_unstable();
        // When a value that changes with time alone can next change a
        // condition.
        for &i in &rules.timed {
            let spec = &traits[i];
            let Some(points) = self.points(i as u32) else {
                continue;
            };
            if let Some(seq) = &spec.sequence {
                if !seq.followed {
                    // The earliest first step still within `within` (the
                    // points are in time order; `now` is a tick, so the
                    // first tick at or after `t + within` is after `now`
                    // exactly when `t + within` is).
                    let next = points.keys().find(|(t, is_b)| {
                        *is_b == Scalar::Bool(false) && t.saturating_add(seq.within_ms) > now
                    });
                    if let Some((t, _)) = next {
                        soon(t.saturating_add(seq.within_ms));
                    }
                }
            } else if let Window::Session { gap, max } = spec.window {
                if let Some(((last, _), _)) = points.iter().next_back() {
                    soon(last.saturating_add(gap));
                }
                // The session's oldest counted point leaves the window.
                let start = sessions.of(i as u32, points, gap, max, now);
                if let Some(((first, _), _)) = session_from(points, start).next() {
                    soon(first.saturating_add(max));
                }
            } else if matches!(spec.aggregate, Aggregate::SinceFirst | Aggregate::SinceLast) {
                let t = if spec.aggregate == Aggregate::SinceFirst {
                    points.keys().next()
                } else {
                    points.keys().next_back()
                };
                if let Some((t, _)) = t {
                    for &c in &rules.thresholds[i] {
                        if c >= 0.0 {
                            let at = t.saturating_add(c.ceil() as u64);
                            soon(at);
                            soon(at.saturating_add(1));
                        }
                    }
                }
            }
        }
        wake
    }
}

/// The value of an aggregate over no events.
fn empty_value(aggregate: Aggregate) -> Scalar {
    match aggregate {
        Aggregate::Count | Aggregate::Sum | Aggregate::Distinct => Scalar::Num(0.0),
        _ => Scalar::Null,
    }
}

/// The points of the current session at `now` whose value is not null
/// (see [`session_start`]).
#[cfg(test)]
fn current_session(
    points: &Points,
    gap: u64,
    max: u64,
    now: Time,
) -> impl Iterator<Item = (&(Time, Scalar), &isize)> {
    session_from(points, session_start(points, gap, max, now))
}

/// The index in `points` of the first point of the current session at
/// `now` (`points.len()`: no session): the latest run of points in the
/// window (`tick + max > now`) whose successive ticks are less than `gap`
/// apart, if its last is less than `gap` before `now`. (Points that left
/// the window may still be held: the route releases them later, see
/// [`crate::dataflow::traits::hold_end`].) Its points that count are
/// those [`session_from`] gives.
fn session_start(points: &Points, gap: u64, max: u64, now: Time) -> usize {
    let q = &points.0;
    let mut start = q.len();
    if let Some(((last, _), _)) = q.back() {
        if now.saturating_sub(*last) < gap && last.saturating_add(max) > now {
            let mut next = *last;
            for (back, ((t, _), _)) in q.iter().rev().enumerate() {
                if next - t >= gap || t.saturating_add(max) <= now {
                    break;
                }
                start = q.len() - 1 - back;
                next = *t;
            }
        }
    }
    start
}

/// The points from index `start` on whose value is not null.
fn session_from(points: &Points, start: usize) -> impl Iterator<Item = (&(Time, Scalar), &isize)> {
    points
        .0
        .range(start..)
        .map(|(k, c)| (k, c))
        .filter(|((_, v), _)| *v != Scalar::Null)
}

/// The count of a sequence trait at `now`: each first event (`false`) at
/// `t` counts if a next event (`true`) comes in `(t, t + within]`
/// (`followed`, looking no further than `now`), or if `t + within <= now`
/// and none does (not followed).
fn sequence_count(points: &Points, followed: bool, within: u64, now: Time) -> isize {
    let q = &points.0;
    let is_next = |at: usize| q[at].0 .1 == Scalar::Bool(true);
    let mut count = 0;
    // The first next event after the current first event's tick: first
    // events come in time order, so it only moves forward.
    let mut next_at = 0;
    for ((t, v), c) in q.iter() {
        if *v != Scalar::Bool(false) {
            continue;
        }
        while next_at < q.len() && (q[next_at].0 .0 <= *t || !is_next(next_at)) {
            next_at += 1;
        }
        let end = t.saturating_add(within);
        let next = next_at < q.len() && q[next_at].0 .0 <= end.min(now);
        let counts = if followed { next } else { end <= now && !next };
        if counts {
            count += c;
        }
    }
    count
}

/// An aggregate over `(tick, value, count)` points in time order, and the
/// count of a most frequent value (ties go to the least value).
fn fold<'a>(
    aggregate: Aggregate,
    points: impl Iterator<Item = (Time, &'a Scalar, isize)>,
    now: Time,
) -> (Scalar, Option<f64>) {
    let num = |v: &Scalar| v.as_f64().unwrap_or(0.0);
    let mut n = 0isize;
    let mut sum = 0.0;
    let mut first: Option<(Time, &Scalar)> = None;
    let mut last: Option<(Time, &Scalar)> = None;
    let mut least: Option<&Scalar> = None;
    let mut greatest: Option<&Scalar> = None;
    // Only what the aggregate reads is computed (a session's count scans
    // every point of the session at each evaluation): the sum for sums
    // and averages, the extremes for min and max, the values apart for
    // distinct and most frequent values.
    let sum_needed = matches!(aggregate, Aggregate::Sum | Aggregate::Avg);
    let extremes_needed = matches!(aggregate, Aggregate::Min | Aggregate::Max);
    let by_value_needed = matches!(aggregate, Aggregate::Distinct | Aggregate::MostFrequent);
    let mut by_value: BTreeMap<&Scalar, isize> = BTreeMap::new();
    for (t, v, c) in points {
        if c <= 0 {
            continue;
        }
        n += c;
        if sum_needed {
            sum += num(v) * c as f64;
        }
        if first.is_none() {
            first = Some((t, v));
        }
        last = Some((t, v));
        if extremes_needed {
            if least.is_none_or(|l| v < l) {
                least = Some(v);
            }
            if greatest.is_none_or(|g| v > g) {
                greatest = Some(v);
            }
        }
        if by_value_needed {
            *by_value.entry(v).or_default() += c;
        }
    }
    let v = match aggregate {
        Aggregate::Count => Scalar::Num(n as f64),
        Aggregate::Sum => Scalar::Num((sum * SUM_SCALE).round() / SUM_SCALE),
        Aggregate::Avg if n > 0 => Scalar::Num(sum / n as f64),
        Aggregate::Min => least.map_or(Scalar::Null, Scalar::clone),
        Aggregate::Max => greatest.map_or(Scalar::Null, Scalar::clone),
        Aggregate::Distinct => Scalar::Num(by_value.len() as f64),
        Aggregate::First => first.map_or(Scalar::Null, |(_, v)| v.clone()),
        Aggregate::Last => last.map_or(Scalar::Null, |(_, v)| v.clone()),
        Aggregate::SinceFirst => first.map_or(Scalar::Null, |(t, _)| {
            Scalar::Num(now.saturating_sub(t) as f64)
        }),
        Aggregate::SinceLast => last.map_or(Scalar::Null, |(t, _)| {
            Scalar::Num(now.saturating_sub(t) as f64)
        }),
        Aggregate::MostFrequent => {
            let best = by_value.iter().max_by_key(|(v, c)| (**c, Reverse(**v)));
            return match best {
                Some((v, c)) => ((*v).clone(), Some(*c as f64)),
                None => (Scalar::Null, None),
            };
        }
        _ => Scalar::Null,
    };
    (v, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(list: &[(Time, Scalar, isize)]) -> Points {
        list.iter().map(|(t, v, c)| ((*t, v.clone()), *c)).collect()
    }

    #[test]
    fn points_keep_their_order_and_counts_whichever_end_changes() {
        let n = |x: f64| Scalar::Num(x);
        let mut p = pts(&[(5, n(1.0), 2), (7, n(1.0), 1), (9, n(2.0), 1)]);
        // The front point, partly then wholly retracted.
        p.add((5, n(1.0)), -1);
        assert_eq!(p, pts(&[(5, n(1.0), 1), (7, n(1.0), 1), (9, n(2.0), 1)]));
        p.add((5, n(1.0)), -1);
        assert_eq!(p, pts(&[(7, n(1.0), 1), (9, n(2.0), 1)]));
        // Same tick, other value: before the front, then in the middle.
        p.add((7, n(0.5)), 1);
        p.add((8, n(3.0)), 1);
        p.add((9, n(2.0)), -1);
        let keys: Vec<_> = p.keys().cloned().collect();
        assert_eq!(keys, vec![(7, n(0.5)), (7, n(1.0)), (8, n(3.0))]);
    }

    #[test]
    fn a_session_start_is_found_once_per_trait_and_cleared_with_the_profile() {
        let p = pts(&[(10, Scalar::Null, 1), (30, Scalar::Null, 1), (32, Scalar::Num(1.0), 1)]);
        let mut starts = SessionStarts::default();
        assert_eq!(starts.of(3, &p, 10, 1_000, 35), 1);
        // Another profile's points under the same trait: the memo answers
        // until it is cleared.
        let other = pts(&[(34, Scalar::Num(1.0), 1)]);
        assert_eq!(starts.of(3, &other, 10, 1_000, 35), 1);
        starts.0.clear();
        assert_eq!(starts.of(3, &other, 10, 1_000, 35), 0);
        assert_eq!(session_from(&other, 0).count(), 1);
    }

    #[test]
    fn sessions_end_at_a_gap_of_exactly_the_threshold() {
        let v = |n: f64| Scalar::Num(n);
        // Events at 0, 10, 20 (gap 10 ends a session), then 25, 30.
        let p = pts(&[
            (0, v(1.0), 1),
            (10, v(2.0), 1),
            (20, v(3.0), 1),
            (25, v(4.0), 1),
            (30, Scalar::Null, 1),
        ]);
        let session: Vec<_> = current_session(&p, 10, 1_000, 35)
            .map(|((t, _), _)| *t)
            .collect();
        assert_eq!(
            session,
            vec![20, 25],
            "the null point marks the session but is not counted"
        );
        assert_eq!(
            current_session(&p, 10, 1_000, 40).count(),
            0,
            "the last event is exactly the gap before now"
        );
        assert_eq!(
            current_session(&p, 11, 1_000, 35).count(),
            4,
            "gaps of 10 are under 11"
        );
        // A session longer than its cap: points that left the window
        // (tick + max <= now) no longer count, though still held.
        assert_eq!(
            current_session(&p, 11, 20, 35)
                .map(|((t, _), _)| *t)
                .collect::<Vec<_>>(),
            vec![20, 25],
            "0 and 10 left the 20 ms window at 20 and 30"
        );
        assert_eq!(
            current_session(&p, 11, 10, 35).count(),
            0,
            "30 + 10 > 35, but null"
        );
    }

    #[test]
    fn sequences_count_followed_and_not_followed_events() {
        let (a, b) = (Scalar::Bool(false), Scalar::Bool(true));
        // A at 0 followed by B at 5; A at 10 not followed (B at 21 is too late).
        let p = pts(&[
            (0, a.clone(), 1),
            (5, b.clone(), 1),
            (10, a.clone(), 2),
            (21, b.clone(), 1),
        ]);
        assert_eq!(sequence_count(&p, true, 10, 4), 0, "B has not come yet");
        assert_eq!(sequence_count(&p, true, 10, 5), 1);
        assert_eq!(
            sequence_count(&p, false, 10, 19),
            0,
            "A at 10 may still be followed"
        );
        assert_eq!(
            sequence_count(&p, false, 10, 20),
            2,
            "within is inclusive: (t, t + within]"
        );
        assert_eq!(sequence_count(&p, true, 11, 30), 3);
    }

    #[test]
    fn folds_of_every_aggregate() {
        let s = |x: &str| Scalar::Str(x.into());
        let p = [(1, s("b"), 2), (2, s("a"), 2), (3, s("c"), 1)];
        let it = || p.iter().map(|(t, v, c)| (*t, v, *c));
        assert_eq!(
            fold(Aggregate::MostFrequent, it(), 9),
            (s("a"), Some(2.0)),
            "a tie goes to the least value"
        );
        assert_eq!(fold(Aggregate::Distinct, it(), 9).0, Scalar::Num(3.0));
        assert_eq!(fold(Aggregate::First, it(), 9).0, s("b"));
        assert_eq!(fold(Aggregate::Last, it(), 9).0, s("c"));
        assert_eq!(fold(Aggregate::Count, it(), 9).0, Scalar::Num(5.0));
        assert_eq!(fold(Aggregate::SinceFirst, it(), 9).0, Scalar::Num(8.0));
        let n = [(1, Scalar::Num(2.5), 1), (2, Scalar::Num(4.0), 3)];
        let it = || n.iter().map(|(t, v, c)| (*t, v, *c));
        assert_eq!(fold(Aggregate::Avg, it(), 9).0, Scalar::Num(14.5 / 4.0));
        assert_eq!(fold(Aggregate::Sum, it(), 9).0, Scalar::Num(14.5));
        assert_eq!(fold(Aggregate::Min, it(), 9).0, Scalar::Num(2.5));
        assert_eq!(fold(Aggregate::Avg, std::iter::empty(), 9).0, Scalar::Null);
    }
}
