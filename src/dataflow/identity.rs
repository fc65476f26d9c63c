//! Deterministic identity resolution.
//!
//! Every record carries one or more identifiers (anonymous id, user id,
//! email, phone, CRM id, configured extras). Identifiers that appear on the
//! same record are *linked*; the connected components of the link graph are
//! the profiles. A component is named by its *canonical* identifier: the
//! smallest key by `(priority rank, hash)` ([`Id`]'s order), so the profile
//! id depends neither on arrival order nor on the number of workers.
//! Identifiers are fixed-size keys here ([`Id`]); their text is attached
//! only at the sinks.
//!
//! The components are maintained incrementally by min-label propagation
//! (`differential_dataflow::algorithms::graphs::propagate`): a new link that
//! joins two profiles moves every identifier of the losing one to the merged
//! profile, and a retracted link (a CRM record whose email changed) splits
//! them again.

use differential_dataflow::algorithms::graphs::propagate::propagate_at;

use super::{Coll, Time};
use crate::model::Id;

/// The earliest event time passed on per key, for the first-occurrence
/// filters. Bounded: past [`Earliest::MAX_KEYS`] keys it starts afresh,
/// which only lets repeated occurrences through again (every consumer of
/// these filters is idempotent: a distinct, or a dictionary).
struct Earliest<K>(std::collections::HashMap<K, Time, foldhash::fast::RandomState>);

impl<K: std::hash::Hash + Eq + Clone> Earliest<K> {
    /// Keys remembered per worker before the filter starts afresh.
    const MAX_KEYS: usize = 1 << 18;

    fn new() -> Self {
        Earliest(std::collections::HashMap::default())
    }

    /// Whether an occurrence of `key` at `time` is passed on: the first one
    /// remembered, or one earlier than every one passed on so far.
    fn admit(&mut self, key: &K, time: Time) -> bool {
        match self.0.get_mut(key) {
            Some(seen) if *seen <= time => false,
            Some(seen) => {
                *seen = time;
                true
            }
            None => {
                if self.0.len() >= Self::MAX_KEYS {
                    self.0.clear();
                }
                self.0.insert(key.clone(), time);
                true
            }
        }
    }
}

/// Passes on the insertions that `admit(data, time)` accepts, and every
/// retraction (negative diff).
fn pass_admitted<'s, D: differential_dataflow::Data>(
    coll: Coll<'s, D>,
    name: &str,
    mut admit: impl FnMut(&D, Time) -> bool + 'static,
) -> Coll<'s, D> {
    use differential_dataflow::AsCollection;
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::generic::operator::Operator;

    coll.inner
        .unary(Pipeline, name, move |_, _| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (d, time, diff) in data.drain(..) {
                        if diff <= 0 || admit(&d, time) {
                            session.give((d, time, diff));
                        }
                    }
                });
            }
        })
        .as_collection()
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
pub fn first_occurrences<'s>(sets: Coll<'s, Vec<Id>>) -> Coll<'s, Vec<Id>> {
    let mut earliest = Earliest::new();
    pass_admitted(sets, "Dedup: identifier sets", move |set, time| {
        earliest.admit(set, time)
    })
}

/// The names (`kind:value` texts) of identifiers, `(key, name)`, each passed
/// on at its earliest event time seen (as [`first_occurrences`] does for
/// sets): every update that mentions a key is at or after a time at which
/// its name was passed on.
pub fn first_names<'s>(names: Coll<'s, (Id, String)>) -> Coll<'s, (Id, String)> {
    let mut earliest = Earliest::new();
    pass_admitted(names, "Dedup: identifier names", move |(id, _), time| {
        earliest.admit(id, time)
    })
}

/// The `(identifier, profile)` arrangement shared by every consumer.
pub type IdProfileArrangement<'s> = differential_dataflow::operators::arrange::Arranged<
    's,
    differential_dataflow::operators::arrange::TraceAgent<
        differential_dataflow::trace::implementations::ValSpine<Id, Id, super::Time, isize>,
    >,
>;

/// Resolves identifier sets into `(identifier, profile)` pairs, where the
/// profile is the canonical identifier of the identifier's component.
///
/// Each set is linked as a star around its first (highest-priority)
/// identifier; edges are symmetric as label propagation requires. Only
/// the least key of a set proposes its own label: a component's canonical
/// identifier is the least key of every set that contains it, so it
/// proposes, and every other identifier is linked to its set's first and
/// is labelled through it. (The first is the highest-priority identifier
/// by its text; with two of the same priority it need not be the least
/// key, which orders by hash.)
///
/// Sets, identifiers and links are not made distinct first: an identifier
/// (or link) in `k` sets is a node (edge) of multiplicity `k`, and label
/// propagation takes the least label among those with a positive count,
/// whatever the count, so the result is the same `(identifier, profile)`
/// set, each with multiplicity 1. Three arrangements (one per distinct)
/// are spared; a repeated set costs the propagation a look at the labels
/// of its identifiers, which do not change.
pub fn resolve<'s>(sets: Coll<'s, Vec<Id>>) -> Coll<'s, (Id, Id)> {
    let sets = sets.filter(|ids| !ids.is_empty());
    let labels = sets.clone().map(|ids| {
        let least = ids.iter().min().copied().unwrap_or(ids[0]);
        (least, least)
    });
    let edges = sets.flat_map(|ids| {
        let mut out = Vec::with_capacity(2 * ids.len());
        let first = &ids[0];
        for other in &ids[1..] {
            out.push((first.clone(), other.clone()));
            out.push((other.clone(), first.clone()));
        }
        out
    });
    // A label enters the propagation later the lower its identifier's
    // priority (rank r at iteration 256 · ⌈log2(r + 1)⌉): the canonical
    // (highest-priority) label of a component has reached its identifiers
    // by then, so most never hold their own label first, and the churn of
    // labels replaced by smaller ones (an update to every neighbour each
    // time) is spared. The fixed point is the same.
    propagate_at(edges, labels, |label: &Id| u64::from(label.rank()))
}

/// The distinct profiles: canonical identifiers of all components.
pub fn profiles<'s>(id_profile: Coll<'s, (Id, Id)>) -> Coll<'s, Id> {
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

    fn ident(n: u8) -> Id {
        // Ranks 0..3 so that priority matters, values so that ties break.
        crate::model::Ident {
            rank: n % 3,
            value: format!("k{}:{}", n % 3, n),
        }
        .id()
    }

    /// Plain sequential components: repeatedly merge overlapping sets.
    fn oracle(sets: &[Vec<Id>]) -> BTreeMap<Id, Id> {
        let mut comps: Vec<BTreeSet<Id>> = Vec::new();
        for set in sets {
            let mut merged: BTreeSet<Id> = set.iter().cloned().collect();
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
    fn run(rounds: Vec<Vec<(Vec<Id>, isize)>>, workers: usize) -> BTreeMap<Id, Id> {
        let result = Arc::new(Mutex::new(BTreeMap::<(Id, Id), isize>::new()));
        let shared = Arc::clone(&result);
        timely::execute(timely::Config::process(workers), move |worker| {
            let shared = Arc::clone(&shared);
            let index = worker.index();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, sets) = scope.new_collection::<Vec<Id>, isize>();
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
            let sets: Vec<Vec<Id>> = sets.into_iter().map(|s| {
                // In the order records carry them: by priority, then text
                // (not by key), as the dataflow sees them.
                let mut v: Vec<u8> = s.into_iter().collect();
                v.sort_by_key(|n| (n % 3, format!("k{}:{}", n % 3, n)));
                v.into_iter().map(ident).collect::<Vec<Id>>()
            }).collect();
            let removed: Vec<Vec<Id>> = sets.iter().zip(&retract).filter(|(_, r)| **r).map(|(s, _)| s.clone()).collect();
            let kept: Vec<Vec<Id>> = sets.iter().zip(retract.iter().chain(std::iter::repeat(&false))).filter(|(_, r)| !**r).map(|(s, _)| s.clone()).collect();
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
    fn distinct_history(updates: Vec<(Vec<Id>, u64)>, dedup: bool) -> Vec<(Vec<Id>, u64, isize)> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&out);
        timely::execute_directly(move |worker| {
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, sets) = scope.new_collection::<Vec<Id>, isize>();
                let sets = if dedup { first_occurrences(sets) } else { sets };
                let probe = sets
                    .threshold(|_, c| if *c > 0 { 1isize } else { 0 })
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
            let updates: Vec<(Vec<Id>, u64)> = updates.into_iter().map(|(s, t)| {
                let mut v: Vec<Id> = s.into_iter().map(ident).collect();
                v.sort();
                (v, t)
            }).collect();
            prop_assert_eq!(distinct_history(updates.clone(), true), distinct_history(updates, false));
        }
    }
}
