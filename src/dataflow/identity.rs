//! Deterministic identity resolution.
//!
//! Every record carries one or more identifiers (anonymous id, user id,
//! email, phone, CRM id, configured extras). Identifiers that appear on the
//! same record are *linked*; the connected components of the link graph are
//! the profiles. A component is named by its *canonical* identifier: the
//! smallest one by `(priority rank, value)` ([`Ident`]'s order), so the profile
//! id depends neither on arrival order nor on the number of workers.
//!
//! The components are maintained incrementally by min-label propagation
//! (`differential_dataflow::algorithms::graphs::propagate`): a new link that
//! joins two profiles moves every identifier of the losing one to the merged
//! profile, and a retracted link (a CRM record whose email changed) splits
//! them again.

use differential_dataflow::algorithms::graphs::propagate::propagate;

use super::{Coll, Time};
use crate::model::Ident;

/// The identifier set of each record, deduplicated: records with the same
/// identifiers add nothing to the link graph.
pub fn identifier_sets<'s>(sets: Coll<'s, Vec<Ident>>) -> Coll<'s, Vec<Ident>> {
    sets.filter(|ids| !ids.is_empty())
        .threshold_named(
            "Distinct: identifier sets",
            |_, c| if *c > 0 { 1isize } else { 0 },
        )
}

/// Keeps only the first occurrence (in event time) of each identifier set of
/// an insert-only stream of sets, such as the sets carried by web events and
/// transactions: a later occurrence of a set already seen changes nothing in
/// the link graph. An occurrence *earlier* than every one passed on so far is
/// passed on too, so the distinct sets at every time are exactly those of
/// the unfiltered input, whatever the arrival order. Retractions (negative
/// diffs) pass through unchanged.
///
/// This spares the identity arrangements one update per event: most events
/// repeat the identifiers of earlier events of the same visitor.
pub fn first_occurrences<'s>(sets: Coll<'s, Vec<Ident>>) -> Coll<'s, Vec<Ident>> {
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;

    use differential_dataflow::AsCollection;
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::generic::operator::Operator;

    sets.inner
        .unary(Pipeline, "Dedup: identifier sets", |_, _| {
            let mut earliest: HashMap<Vec<Ident>, Time> = HashMap::new();
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (set, time, diff) in data.drain(..) {
                        if diff > 0 {
                            match earliest.entry(set) {
                                Entry::Occupied(mut seen) => {
                                    if *seen.get() <= time {
                                        continue;
                                    }
                                    seen.insert(time);
                                    session.give((seen.key().clone(), time, diff));
                                }
                                Entry::Vacant(new) => {
                                    session.give((new.key().clone(), time, diff));
                                    new.insert(time);
                                }
                            }
                        } else {
                            session.give((set, time, diff));
                        }
                    }
                });
            }
        })
        .as_collection()
}

/// Resolves identifier sets into `(identifier, profile)` pairs, where the
/// profile is the canonical identifier of the identifier's component.
///
/// Each set is linked as a star around its first (highest-priority)
/// identifier; edges are symmetric as label propagation requires.
pub fn resolve<'s>(sets: Coll<'s, Vec<Ident>>) -> Coll<'s, (Ident, Ident)> {
    let sets = identifier_sets(sets);
    let nodes = sets
        .clone()
        .flat_map(|ids| ids.into_iter())
        .threshold_named(
            "Distinct: identifiers",
            |_, c| if *c > 0 { 1isize } else { 0 },
        );
    let edges = sets
        .flat_map(|ids| {
            let mut out = Vec::with_capacity(2 * ids.len());
            let first = &ids[0];
            for other in &ids[1..] {
                out.push((first.clone(), other.clone()));
                out.push((other.clone(), first.clone()));
            }
            out
        })
        .threshold_named("Distinct: links", |_, c| if *c > 0 { 1isize } else { 0 });
    let labels = nodes.map(|id| (id.clone(), id));
    propagate(edges, labels)
}

/// The distinct profiles: canonical identifiers of all components.
pub fn profiles<'s>(id_profile: Coll<'s, (Ident, Ident)>) -> Coll<'s, Ident> {
    id_profile
        .map(|(_, profile)| profile)
        .threshold_named("Distinct: profiles", |_, c| if *c > 0 { 1isize } else { 0 })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use proptest::prelude::*;

    use super::*;

    fn ident(n: u8) -> Ident {
        // Ranks 0..3 so that priority matters, values so that ties break.
        Ident {
            rank: n % 3,
            value: format!("k{}:{}", n % 3, n),
        }
    }

    /// Plain sequential components: repeatedly merge overlapping sets.
    fn oracle(sets: &[Vec<Ident>]) -> BTreeMap<Ident, Ident> {
        let mut comps: Vec<BTreeSet<Ident>> = Vec::new();
        for set in sets {
            let mut merged: BTreeSet<Ident> = set.iter().cloned().collect();
            comps.retain(|c| {
                if c.is_disjoint(&merged) {
                    true
                } else {
                    merged.extend(c.iter().cloned());
                    false
                }
            });
            comps.push(merged);
        }
        let mut out = BTreeMap::new();
        for c in comps {
            let canonical = c.iter().min().unwrap().clone();
            for id in c {
                out.insert(id, canonical.clone());
            }
        }
        out
    }

    /// Feeds `rounds` of identifier-set changes and returns the final
    /// (identifier, profile) map as seen by the dataflow.
    fn run(rounds: Vec<Vec<(Vec<Ident>, isize)>>, workers: usize) -> BTreeMap<Ident, Ident> {
        let result = Arc::new(Mutex::new(BTreeMap::<(Ident, Ident), isize>::new()));
        let shared = Arc::clone(&result);
        timely::execute(timely::Config::process(workers), move |worker| {
            let shared = Arc::clone(&shared);
            let index = worker.index();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, sets) = scope.new_collection::<Vec<Ident>, isize>();
                let probe = resolve(sets)
                    .inspect(move |((id, p), _, diff)| {
                        *shared
                            .lock()
                            .unwrap()
                            .entry((id.clone(), p.clone()))
                            .or_default() += diff
                    })
                    .probe();
                (input, probe.0)
            });
            for (round, changes) in rounds.iter().enumerate() {
                if index == 0 {
                    for (set, diff) in changes {
                        input.update(set.clone(), *diff);
                    }
                }
                input.advance_to(round as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
            }
        })
        .unwrap();
        let totals = result.lock().unwrap();
        totals
            .iter()
            .filter(|(_, d)| **d != 0)
            .map(|((id, p), d)| {
                assert_eq!(*d, 1, "{id:?} -> {p:?} has multiplicity {d}");
                (id.clone(), p.clone())
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Components match the sequential oracle after inserts and after
        /// retracting some sets (splits), for one and two workers.
        #[test]
        fn components_match_oracle(
            sets in prop::collection::vec(prop::collection::btree_set(0u8..24, 1..4), 1..20),
            retract in prop::collection::vec(any::<bool>(), 20),
        ) {
            let sets: Vec<Vec<Ident>> = sets.into_iter().map(|s| {
                let mut v: Vec<Ident> = s.into_iter().map(ident).collect();
                v.sort();
                v
            }).collect();
            let removed: Vec<Vec<Ident>> = sets.iter().zip(&retract).filter(|(_, r)| **r).map(|(s, _)| s.clone()).collect();
            let kept: Vec<Vec<Ident>> = sets.iter().zip(retract.iter().chain(std::iter::repeat(&false))).filter(|(_, r)| !**r).map(|(s, _)| s.clone()).collect();
            let rounds = vec![
                sets.iter().map(|s| (s.clone(), 1)).collect(),
                removed.iter().map(|s| (s.clone(), -1)).collect(),
            ];
            for workers in [1, 2] {
                prop_assert_eq!(run(rounds.clone(), workers), oracle(&kept));
            }
        }
    }

    /// The distinct sets, with the times they appear, of a collection.
    fn distinct_history(
        updates: Vec<(Vec<Ident>, u64)>,
        dedup: bool,
    ) -> Vec<(Vec<Ident>, u64, isize)> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&out);
        timely::execute_directly(move |worker| {
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, sets) = scope.new_collection::<Vec<Ident>, isize>();
                let sets = if dedup { first_occurrences(sets) } else { sets };
                let probe = identifier_sets(sets)
                    .inspect(move |(d, t, r)| shared.lock().unwrap().push((d.clone(), *t, *r)))
                    .probe();
                (input, probe.0)
            });
            // All updates arrive in one batch, in the given (unordered) times.
            for (set, time) in &updates {
                input.update_at(set.clone(), *time + 1, 1);
            }
            input.advance_to(1_000);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
        });
        let mut v = out.lock().unwrap().clone();
        differential_dataflow::consolidation::consolidate_updates(&mut v);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Dropping repeated occurrences does not change the distinct sets
        /// at any time, whatever the order of event times.
        #[test]
        fn first_occurrences_preserve_distinct_sets(
            updates in prop::collection::vec((prop::collection::btree_set(0u8..6, 1..3), 0u64..50), 0..40),
        ) {
            let updates: Vec<(Vec<Ident>, u64)> = updates.into_iter().map(|(s, t)| {
                let mut v: Vec<Ident> = s.into_iter().map(ident).collect();
                v.sort();
                (v, t)
            }).collect();
            prop_assert_eq!(distinct_history(updates.clone(), true), distinct_history(updates, false));
        }
    }
}
