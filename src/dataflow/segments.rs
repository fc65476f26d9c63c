//! Segment membership.
//!
//! A segment is a boolean condition over a profile's traits (by name, a
//! missing trait is 0) and CRM attributes (`attributes.NAME`, missing is
//! null). For every profile the facts — that it exists, its trait values and
//! its merged attributes — are gathered by profile and every condition is
//! evaluated; the output is the set of `(segment, profile)` memberships, whose
//! changes over time are the entry (+1) and exit (-1) diffs.

use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::AsCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::{Capability, InputCapability};

use super::profiles::Attributes;
use super::traits::{Total, SUM_SCALE};
use super::{Coll, Time};
use crate::model::{Id, IdMap, Scalar, ScalarRef};
use crate::spec::{Aggregate, SegmentSpec, TraitSpec};

/// One fact about a profile, the input of segment evaluation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Fact {
    /// The profile exists (it has at least one identifier).
    Exists,
    /// The current value of trait `index` (sums in thousandths).
    Trait(u32, Total),
    /// The merged CRM attributes.
    Attrs(Attributes),
}

/// A trait's total as the number users wrote conditions against (an
/// `f64`: totals beyond 2^53 compare with the precision of a double).
pub fn trait_scalar(spec: &TraitSpec, raw: Total) -> Scalar {
    match spec.aggregate {
        Aggregate::Count => Scalar::Num(raw as f64),
        Aggregate::Sum => Scalar::Num(raw as f64 / SUM_SCALE),
    }
}

/// Evaluates every segment for one profile's facts; returns the indices of
/// the segments it belongs to.
pub fn memberships(facts: &[&Fact], traits: &[TraitSpec], segments: &[SegmentSpec]) -> Vec<u32> {
    let mut values: Vec<Total> = vec![0; traits.len()];
    let mut attrs: Option<&Attributes> = None;
    for fact in facts {
        match fact {
            Fact::Exists => {}
            Fact::Trait(index, value) => values[*index as usize] = *value,
            Fact::Attrs(a) => attrs = Some(a),
        }
    }
    memberships_of(&values, attrs, traits, segments)
}

/// [`memberships`] of trait totals by index (`values`, missing ones 0) and
/// the attributes, if any.
fn memberships_of(
    values: &[Total],
    attrs: Option<&Attributes>,
    traits: &[TraitSpec],
    segments: &[SegmentSpec],
) -> Vec<u32> {
    let mut lookup = |path: &[String]| -> ScalarRef<'_> {
        match path {
            // Trait values are numbers.
            [name] => traits
                .iter()
                .position(|t| &t.name == name)
                .and_then(|i| trait_scalar(&traits[i], values[i]).as_f64())
                .map_or(ScalarRef::Null, ScalarRef::Num),
            [first, field] if first == "attributes" => attrs
                .and_then(|a| {
                    a.iter()
                        .find(|(k, _)| k == field)
                        .map(|(_, v)| v.borrowed())
                })
                .unwrap_or(ScalarRef::Null),
            _ => ScalarRef::Null,
        }
    };
    segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.when.eval_bool(&mut lookup))
        .map(|(i, _)| i as u32)
        .collect()
}

/// What [`evaluate`] maintains: trait totals and segment memberships.
pub struct Evaluated<'s> {
    /// `((profile, trait), total)`: a count, or a sum in thousandths; a
    /// total of zero is absent.
    pub trait_values: Coll<'s, ((Id, u32), Total)>,
    /// `(segment index, profile)`.
    pub memberships: Coll<'s, (u32, Id)>,
}

/// Trait totals and segment memberships per profile.
///
/// `trait_deltas` are the changes of trait totals, `((profile, trait),
/// change)` with the change as the update's difference (a count, or
/// thousandths of a sum; [`crate::dataflow::traits::per_profile`]). A
/// profile's facts are whether it exists (`profiles`), its trait totals
/// and its merged CRM attributes; whenever they change, every segment
/// condition is evaluated again ([`memberships`]) and the memberships
/// change by the difference.
///
/// This is keyed state in event-time order, as a Flink keyed process
/// function keeps it: each profile's facts live on one worker (exchanged
/// by profile), the changes of a time are applied once the inputs'
/// frontier has passed it, in time order (event time is totally ordered),
/// and only the profiles a time touches are evaluated. It computes what
/// `count_total` of the deltas followed by a `reduce` over the facts
/// computes (the test below compares them), without their four
/// arrangements: the state is one entry per profile with any fact, and a
/// profile without facts is forgotten.
pub fn evaluate<'s>(
    profiles: Coll<'s, Id>,
    trait_deltas: Coll<'s, (Id, u32), Total>,
    attributes: Coll<'s, (Id, Attributes)>,
    trait_specs: Rc<[TraitSpec]>,
    segment_specs: Rc<[SegmentSpec]>,
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
    let mut deltas_in = builder.new_input(
        trait_deltas.inner,
        Exchange::new(|((p, _), _, _): &((Id, u32), Time, Total)| p.hashed()),
    );
    let mut attrs_in = builder.new_input(
        attributes.inner,
        Exchange::new(|((p, _), _, _): &((Id, Attributes), Time, isize)| p.hashed()),
    );
    let (totals_out, trait_values) = builder.new_output();
    let (members_out, memberships) = builder.new_output();
    let mut totals_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(totals_out);
    let mut members_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(members_out);
    builder.build(move |_initial| {
        let mut pending: BTreeMap<Time, Vec<(Id, Change)>> = BTreeMap::new();
        // Capabilities (totals, memberships) at the earliest pending time.
        let mut held: Option<[Capability<Time>; 2]> = None;
        let mut state: IdMap<ProfileFacts> = IdMap::default();
        move |frontiers| {
            let mut note = |cap: &InputCapability<Time>, time: Time| {
                if held.as_ref().is_none_or(|h| time < *h[0].time()) {
                    held = Some([cap.delayed(&time, 0), cap.delayed(&time, 1)]);
                }
            };
            exists_in.for_each_stamp(|cap, data| {
                for (p, t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending.entry(t).or_default().push((p, Change::Exists(r)));
                }
            });
            deltas_in.for_each_stamp(|cap, data| {
                for ((p, index), t, change) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending
                        .entry(t)
                        .or_default()
                        .push((p, Change::Total(index, change)));
                }
            });
            attrs_in.for_each_stamp(|cap, data| {
                for ((p, a), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending.entry(t).or_default().push((p, Change::Attrs(a, r)));
                }
            });
            let Some([hold_totals, hold_members]) = held.as_mut() else {
                return;
            };
            // A time is complete once no input can still carry it.
            let complete = |t: &Time| frontiers.iter().all(|f| !f.less_equal(t));
            let mut totals_out = totals_out.activate();
            let mut members_out = members_out.activate();
            // One session for all the times completed now, at the held
            // capabilities (no later than any of them): a session per time
            // would start a fresh container for every time.
            let mut totals = totals_out.session(&*hold_totals);
            let mut members = members_out.session(&*hold_members);
            while let Some(entry) = pending.first_entry() {
                if !complete(entry.key()) {
                    break;
                }
                let (time, mut changes) = entry.remove_entry();
                // By profile (stable: a profile's changes keep their order).
                changes.sort_by_key(|(p, _)| *p);
                for group in changes.chunk_by_mut(|a, b| a.0 == b.0) {
                    let p = group[0].0;
                    let facts = state.entry(p).or_default();
                    let before = facts.totals.clone();
                    for (_, change) in group.iter_mut() {
                        facts.apply(std::mem::replace(change, Change::Exists(0)));
                    }
                    if facts.totals.iter().any(|&(_, total)| total == 0) {
                        let mut totals = std::mem::take(&mut facts.totals).into_vec();
                        totals.retain(|&(_, total)| total != 0);
                        facts.totals = totals.into();
                    }
                    if facts.attrs.iter().any(|(_, count)| *count == 0) {
                        let mut attrs = std::mem::take(&mut facts.attrs).into_vec();
                        attrs.retain(|(_, count)| *count != 0);
                        facts.attrs = attrs.into();
                    }
                    // Totals that changed: the old one leaves, the new one
                    // enters (a zero total is absent).
                    let mut old_totals = before.iter().peekable();
                    let mut new_totals = facts.totals.iter().peekable();
                    loop {
                        let (index, old, new) = match (old_totals.peek(), new_totals.peek()) {
                            (None, None) => break,
                            (Some(&&(i, o)), Some(&&(j, n))) if i == j => {
                                old_totals.next();
                                new_totals.next();
                                (i, o, n)
                            }
                            (Some(&&(i, o)), Some(&&(j, _))) if i < j => {
                                old_totals.next();
                                (i, o, 0)
                            }
                            (Some(&&(i, o)), None) => {
                                old_totals.next();
                                (i, o, 0)
                            }
                            (_, Some(&&(j, n))) => {
                                new_totals.next();
                                (j, 0, n)
                            }
                        };
                        if old != new {
                            if old != 0 {
                                totals.give((((p, index), old), time, -1));
                            }
                            if new != 0 {
                                totals.give((((p, index), new), time, 1));
                            }
                        }
                    }
                    let now: Box<[u32]> = if facts.is_empty() {
                        Box::default()
                    } else {
                        facts.memberships(&trait_specs, &segment_specs).into()
                    };
                    for &s in facts.members.iter().filter(|s| !now.contains(s)) {
                        members.give(((s, p), time, -1));
                    }
                    for &s in now.iter().filter(|s| !facts.members.contains(s)) {
                        members.give(((s, p), time, 1));
                    }
                    facts.members = now;
                    if facts.is_empty() {
                        state.remove(&p);
                    }
                }
            }
            drop((totals, members));
            match pending.first_key_value() {
                Some((&next, _)) => {
                    hold_totals.downgrade(&next);
                    hold_members.downgrade(&next);
                }
                None => held = None,
            }
        }
    });
    Evaluated {
        trait_values: trait_values.as_collection(),
        memberships: memberships.as_collection(),
    }
}

/// One change to a profile's facts.
enum Change {
    /// The profile's existence changes by this count.
    Exists(isize),
    /// Trait `index`'s total changes by this amount.
    Total(u32, Total),
    /// These attributes' count changes.
    Attrs(Attributes, isize),
}

/// The facts of one profile, as [`evaluate`] keeps them (boxed slices:
/// one of these per profile, and most change rarely).
#[derive(Default)]
struct ProfileFacts {
    /// How many times the profile exists (0 or 1 in a consistent input).
    exists: isize,
    /// Totals by trait index, sorted by index (zero ones removed after
    /// each time).
    totals: Box<[(u32, Total)]>,
    /// Attribute versions and their counts (normally one, count 1).
    attrs: Box<[(Attributes, isize)]>,
    /// The segments it belongs to, as last emitted.
    members: Box<[u32]>,
}

impl ProfileFacts {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Exists(r) => self.exists += r,
            Change::Total(index, change) => {
                match self.totals.binary_search_by_key(&index, |(i, _)| *i) {
                    Ok(at) => self.totals[at].1 += change,
                    Err(at) => {
                        let mut totals = std::mem::take(&mut self.totals).into_vec();
                        totals.insert(at, (index, change));
                        self.totals = totals.into();
                    }
                }
            }
            Change::Attrs(a, r) => match self.attrs.iter_mut().find(|(x, _)| *x == a) {
                Some((_, count)) => *count += r,
                None => {
                    let mut attrs = std::mem::take(&mut self.attrs).into_vec();
                    attrs.push((a, r));
                    self.attrs = attrs.into();
                }
            },
        }
    }

    /// No fact at all (once zero totals and attribute counts are removed).
    fn is_empty(&self) -> bool {
        self.exists == 0 && self.totals.is_empty() && self.attrs.is_empty()
    }

    /// [`memberships`] of the present facts as a `reduce` presents them
    /// (sorted, so the greatest of several present attribute versions
    /// counts), without copying them.
    fn memberships(&self, traits: &[TraitSpec], segments: &[SegmentSpec]) -> Vec<u32> {
        let mut values: Vec<Total> = vec![0; traits.len()];
        for &(index, total) in self.totals.iter() {
            values[index as usize] = total;
        }
        let attrs = self
            .attrs
            .iter()
            .filter(|(_, c)| *c > 0)
            .map(|(a, _)| a)
            .max();
        memberships_of(&values, attrs, traits, segments)
    }
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;

    use super::*;
    use crate::spec::parse_spec;

    /// Two traits (a count and a sum) and four segments over traits that
    /// may be zero, sums and attributes.
    fn spec() -> crate::spec::Spec {
        parse_spec(
            r#"
        [traits.views]
        stream = "web"
        [traits.spend]
        stream = "transactions"
        aggregate = "sum"
        of = "amount"
        [segments.active]
        when = "views >= 2"
        [segments.idle]
        when = "views == 0 and not attributes.tier == \"gold\""
        [segments.big]
        when = "spend >= 500"
        [segments.gold]
        when = 'attributes.tier == "gold"'
        "#,
            "s.toml",
        )
        .unwrap()
    }

    /// The reference: totals by `count_total`, memberships by a `reduce`
    /// over the facts (what [`evaluate`] computed before it kept state).
    fn reference<'s>(
        profiles: Coll<'s, Id>,
        deltas: Coll<'s, (Id, u32), Total>,
        attributes: Coll<'s, (Id, Attributes)>,
        traits: Rc<[TraitSpec]>,
        segments: Rc<[SegmentSpec]>,
    ) -> (Coll<'s, ((Id, u32), Total)>, Coll<'s, (u32, Id)>) {
        use differential_dataflow::operators::CountTotal;
        let totals = deltas.count_total();
        let facts = profiles
            .map(|p| (p, Fact::Exists))
            .concat(totals.clone().map(|((p, t), v)| (p, Fact::Trait(t, v))))
            .concat(attributes.map(|(p, a)| (p, Fact::Attrs(a))));
        let members = facts
            .reduce(move |_profile, input, output| {
                let present: Vec<&Fact> = input
                    .iter()
                    .filter(|(_, c)| *c > 0)
                    .map(|(f, _)| *f)
                    .collect();
                for segment in memberships(&present, &traits, &segments) {
                    output.push((segment, 1isize));
                }
            })
            .map(|(profile, segment)| (segment, profile));
        (totals, members)
    }

    /// One input change at a time step: a profile appears or disappears,
    /// a trait total changes, or the attributes get a new version.
    #[derive(Clone, Debug)]
    enum Op {
        Toggle(u8),
        Delta(u8, u32, i64),
        Tier(u8, u8),
    }

    type Updates<D> = Vec<(D, u64, isize)>;

    /// Runs `ops` (a list of time steps) through [`evaluate`] (`ours`) or
    /// the reference on `workers` workers: the consolidated totals and
    /// memberships with their times.
    fn run_ops(
        steps: Vec<Vec<Op>>,
        workers: usize,
        ours: bool,
    ) -> (Updates<((Id, u32), Total)>, Updates<(u32, Id)>) {
        use differential_dataflow::input::Input;
        use std::sync::{Arc, Mutex};
        let spec = spec();
        let traits: Rc<[TraitSpec]> = spec.traits.into();
        let segments: Rc<[SegmentSpec]> = spec.segments.into();
        let (traits, segments) = (traits.to_vec(), segments.to_vec());
        let totals_out = Arc::new(Mutex::new(Vec::new()));
        let members_out = Arc::new(Mutex::new(Vec::new()));
        let (t_out, m_out) = (Arc::clone(&totals_out), Arc::clone(&members_out));
        let config = timely::Config::process(workers);
        timely::execute(config, move |worker| {
            let (t_out, m_out) = (Arc::clone(&t_out), Arc::clone(&m_out));
            let (traits, segments): (Rc<[TraitSpec]>, Rc<[SegmentSpec]>) =
                (traits.clone().into(), segments.clone().into());
            let (mut inputs, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (p_in, profiles) = scope.new_collection::<Id, isize>();
                let (d_in, deltas) = scope.new_collection::<(Id, u32), Total>();
                let (a_in, attrs) = scope.new_collection::<(Id, Attributes), isize>();
                let (totals, members) = if ours {
                    let e = evaluate(profiles, deltas, attrs, traits, segments);
                    (e.trait_values, e.memberships)
                } else {
                    reference(profiles, deltas, attrs, traits, segments)
                };
                totals.inspect(move |(d, t, r)| t_out.lock().unwrap().push((*d, *t, *r)));
                let probe = members
                    .inspect(move |(d, t, r)| m_out.lock().unwrap().push((*d, *t, *r)))
                    .probe();
                ((p_in, d_in, a_in), probe.0)
            });
            let id = |p: u8| crate::model::Id::of(0, &format!("anon:{p}"));
            let tier = |t: u8| -> Attributes {
                vec![(
                    "tier".into(),
                    Scalar::Str(["gold", "silver", "bronze"][t as usize % 3].into()),
                )]
            };
            let mut exists = std::collections::BTreeSet::new();
            let mut tiers = std::collections::BTreeMap::new();
            if worker.index() == 0 {
                for (step, ops) in steps.iter().enumerate() {
                    let time = step as u64 + 1;
                    for op in ops {
                        match *op {
                            Op::Toggle(p) => {
                                let r = if exists.insert(p) {
                                    1
                                } else {
                                    exists.remove(&p);
                                    -1
                                };
                                inputs.0.update_at(id(p), time, r);
                            }
                            Op::Delta(p, t, v) => {
                                inputs.1.update_at((id(p), t), time, Total::from(v))
                            }
                            Op::Tier(p, t) => {
                                if let Some(old) = tiers.insert(p, t) {
                                    inputs.2.update_at((id(p), tier(old)), time, -1);
                                }
                                inputs.2.update_at((id(p), tier(t)), time, 1);
                            }
                        }
                    }
                }
            }
            let end = steps.len() as u64 + 2;
            inputs.0.advance_to(end);
            inputs.1.advance_to(end);
            inputs.2.advance_to(end);
            inputs.0.flush();
            inputs.1.flush();
            inputs.2.flush();
            worker.step_while(|| probe.less_than(&end));
        })
        .unwrap();
        let mut totals = totals_out.lock().unwrap().clone();
        let mut members = members_out.lock().unwrap().clone();
        differential_dataflow::consolidation::consolidate_updates(&mut totals);
        differential_dataflow::consolidation::consolidate_updates(&mut members);
        (totals, members)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The keyed state gives exactly the totals and memberships, at
        /// exactly the times, of `count_total` and `reduce`, on one and
        /// two workers: profiles that come and go, totals that return to
        /// zero, attribute versions, several changes of a profile in one
        /// time.
        #[test]
        fn keyed_state_matches_count_total_and_reduce(
            steps in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![
                        (0u8..4).prop_map(Op::Toggle),
                        (0u8..4, 0u32..2, -3i64..4).prop_map(|(p, t, v)| Op::Delta(p, t, v)),
                        (0u8..4, 0u8..3).prop_map(|(p, t)| Op::Tier(p, t)),
                    ],
                    0..5,
                ),
                1..12,
            ),
        ) {
            let expected = run_ops(steps.clone(), 1, false);
            proptest::prop_assert_eq!(&run_ops(steps.clone(), 1, true), &expected);
            proptest::prop_assert_eq!(&run_ops(steps, 2, true), &expected);
        }
    }

    #[test]
    fn conditions_see_traits_defaulting_to_zero_and_attributes() {
        let spec = spec();
        let eval = |facts: &[Fact]| {
            memberships(
                &facts.iter().collect::<Vec<_>>(),
                &spec.traits,
                &spec.segments,
            )
        };
        assert_eq!(eval(&[Fact::Exists]), vec![1]);
        assert_eq!(
            eval(&[Fact::Exists, Fact::Trait(0, 2), Fact::Trait(1, 500_000)]),
            vec![0, 2]
        );
        assert_eq!(eval(&[Fact::Exists, Fact::Trait(1, 499_999)]), vec![1]);
        let gold = Fact::Attrs(vec![("tier".into(), Scalar::Str("gold".into()))]);
        assert_eq!(eval(&[Fact::Exists, gold]), vec![3]);
    }
}
