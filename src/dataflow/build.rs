//! Assembles the whole dataflow from a definition: sources, the stages of
//! this module, and the commit stage.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::AsCollection;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::probe::Handle;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, Concatenate, Probe};
use timely::dataflow::{Scope, Stream};

use super::retain::{self, Restored, Retained};
use super::traits::Item;
use super::{identity, profiles, route, segments, traits, Coll, Time};
use crate::io::sinks::{commit, Layout, Outputs, ProcessShared, RunSummary, StateUpdate};
use crate::io::sources::{source, ReadParams, SourceDef};
use crate::io::{Abort, Control};
use crate::model::{CrmRecord, Id, Ident, Record};
use crate::spec::{SegmentSpec, Spec, TraitSpec};
use crate::time::ClockReport;

/// Builds the dataflow in `scope`. `reload`, if any, watches the
/// definition for segment changes while the run goes on (see
/// [`super::reload`]). `outputs` is `Some` on worker 0 only;
/// `restored` is this worker's share of the retained input of the
/// checkpoint a run resumes from (see [`retain`]), injected before the
/// inputs are read again;
/// the run's summary appears in `result` when the dataflow has drained.
/// `shared` is the worker's process's commit-stage state; whether it holds
/// a part of the state is the same on every process (the cluster start-up
/// checks it).
pub fn build<'s>(
    scope: Scope<'s, Time>,
    spec: &Spec,
    sources: &[SourceDef],
    params: Arc<ReadParams>,
    layout: Layout,
    outputs: Option<Outputs>,
    shared: Arc<ProcessShared>,
    restored: Option<Restored>,
    reload: Option<super::reload::Reload>,
    result: Rc<RefCell<Option<RunSummary>>>,
    abort: Arc<Abort>,
) {
    let trait_specs: Rc<[TraitSpec]> = spec.traits.clone().into();
    let segment_specs: Rc<[SegmentSpec]> = spec.segments.clone().into();
    let tz = spec.engine.time_zone;
    let tick_ms = spec.engine.tick_ms;

    let mut record_streams = Vec::new();
    let mut control_streams = Vec::new();
    // How far the profile stage's results are: the sources read a replay
    // only so far ahead of it.
    let downstream = Handle::new();
    for def in sources {
        let (records, control) = source(
            scope,
            def.clone(),
            Arc::clone(&params),
            Arc::clone(&abort),
            downstream.clone(),
        );
        record_streams.push(records.as_collection());
        control_streams.push(control);
    }
    // Records stay on the worker that decoded them: one pass splits each
    // into what the stages need (CRM versions, identifier sets, trait
    // contributions, names), the first-occurrence filters drop repeats
    // there, and each stage exchanges only its own compact keys. A record
    // itself never crosses workers.
    let records: Coll<'s, Record> =
        differential_dataflow::collection::concatenate(scope, record_streams);

    let stateful = shared.state.is_some();
    let split = split_records(
        records.inner,
        Rc::clone(&trait_specs),
        tz,
        tick_ms,
        stateful,
    );
    let restore = retain::restore(scope, restored);
    let crm_versions: Coll<'s, (String, Arc<CrmRecord>)> = split
        .crm_versions
        .clone()
        .concat(restore.crm)
        .as_collection();
    let event_sets: Coll<'s, Vec<Id>> = split.identifier_sets.as_collection();
    let names: Coll<'s, (Id, String)> = identity::first_names(split.names.as_collection());
    let first_sets = identity::first_occurrences(event_sets);
    let event_sets = first_sets.clone().concat(restore.sets.as_collection());

    // CRM records are upserts; their current versions link identifiers and
    // carry attributes.
    let crm_current = profiles::crm_current(crm_versions);

    // Identity: identifier sets of events and of current CRM records.
    let crm_sets = crm_current
        .clone()
        .map(|(_, c)| c.ids.iter().map(Ident::id).collect::<Vec<Id>>());
    let id_profile = identity::resolve(event_sets.concat(crm_sets));
    let id_profile_arranged = id_profile
        .clone()
        .arrange_by_key_named("Arrange: identifier -> profile");

    let control = scope.concatenate(control_streams);
    // The sources' clocks and cuts, on every worker: the stages that hold
    // future times stop at the end of the data once the inputs end.
    let clocks = {
        use timely::dataflow::operators::vec::{Broadcast, ToStream};
        let reported = control
            .clone()
            .flat_map(|c| match c {
                Control::Clock { tick, .. } => Some(ClockReport::Clock(tick)),
                Control::Cut { watermark, .. } => Some(ClockReport::Cut(watermark)),
                _ => None,
            })
            .broadcast();
        // A restored checkpoint's state is as of its cut - 1 (see
        // `Completion::restored`), on every worker.
        let restored = shared.restored_before;
        let restored = (restored > 0)
            .then(|| ClockReport::Clock(restored - 1))
            .to_stream(scope);
        reported.concat(restored)
    };
    // Trait items to the profiles of their identifiers, held while they
    // count; then attributes per profile, then segments.
    let routed = route::route(
        split.trait_items.clone(),
        restore.traits,
        id_profile.inner.clone(),
        clocks.clone(),
        Rc::clone(&trait_specs),
        tz,
        tick_ms,
    );
    // What a checkpoint retains of the records (see `retain`): the
    // splitter's collections as this run's records make them, and the
    // lifetime points the route holds, without the restored input (which
    // the checkpoint holds already).
    let retained = if stateful {
        scope.concatenate(vec![
            split
                .crm_versions
                .map(|((k, c), t, r)| (Retained::Crm(k, c), t, r)),
            first_sets.inner.map(|(s, t, r)| (Retained::Set(s), t, r)),
            names
                .inner
                .clone()
                .map(|((k, n), t, r)| (Retained::Name(k, n), t, r)),
            split.retained_items,
            routed.kept.map(|((c, replaces), t, r)| match replaces {
                true => (Retained::Held(c), t, r),
                false => (Retained::Point(c), t, r),
            }),
        ])
    } else {
        timely::dataflow::operators::generic::operator::empty(scope)
    };
    let attributes = profiles::attributes(crm_current, id_profile_arranged);
    let profile_ids = identity::profiles(id_profile.clone());
    // Segment definitions reloaded while the run goes on: each applies at
    // an event time, on every worker; the process learns the names of new
    // segments, and its checkpoints the new fingerprint, from then on.
    let reloads = reload.map(|reload| {
        let texts = super::reload::definitions(control.clone(), Some(reload.clone()));
        let shared = Arc::clone(&shared);
        let fingerprint = Arc::clone(&reload.fingerprint);
        let on: Box<dyn Fn(Time, &Spec, &[SegmentSpec])> = Box::new(move |time, spec, merged| {
            if let Ok(mut names) = shared.segment_names.lock() {
                if names.len() < merged.len() {
                    *names = merged.iter().map(|s| s.name.clone()).collect();
                }
            }
            if let Some(state) = &shared.state {
                state.reloaded(time, fingerprint(spec));
            }
        });
        (texts, on)
    });
    let segments::Evaluated {
        trait_values,
        memberships,
        dwell_entries,
    } = segments::evaluate(
        profile_ids.clone(),
        routed.changes,
        clocks,
        restore.dwell_entries,
        attributes.clone(),
        Rc::new(segments::Rules::new(
            Rc::clone(&trait_specs),
            Rc::clone(&segment_specs),
            spec.engine.tick_ms,
        )),
        reloads,
    );
    // The entry times of dwell memberships, retained too (see `retain`).
    let retained = if stateful {
        retained
            .concat(dwell_entries.map(|((p, s, at), t, r)| (Retained::DwellEntry(p, s, at), t, r)))
    } else {
        retained
    };

    // Segment memberships and profiles go to worker 0 for the diffs and
    // the summary; identifier names to whoever writes text; links, trait
    // totals and attributes (most of the updates) stay on the worker that
    // owns them and are written by its process, and only when the run
    // writes state.
    let global = differential_dataflow::collection::concatenate(
        scope,
        vec![
            memberships.map(|(s, p)| StateUpdate::Segment(s, p)),
            profile_ids.map(StateUpdate::Profile),
        ],
    );
    let global = global.inner.probe_with(&downstream).as_collection();
    // The state of the times a restored run rebuilt is in the store
    // already: their updates are dropped here, before they are made.
    let from = shared.restored_before;
    let local = if stateful {
        differential_dataflow::collection::concatenate(
            scope,
            vec![
                updates_from(id_profile, from).map(|(id, p)| StateUpdate::Link(id, p)),
                updates_from(trait_values, from).map(|((p, t), v)| StateUpdate::Trait(p, t, v)),
                updates_from(attributes, from).map(|(p, a)| StateUpdate::Attrs(p, a)),
            ],
        )
    } else {
        differential_dataflow::collection::concatenate(scope, Vec::new())
    };
    let names = names.map(|(k, n)| StateUpdate::Name(k, n));
    let source_names = sources.iter().map(|s| s.name.clone()).collect();
    commit(
        local.inner,
        global.inner,
        names.inner,
        retained,
        control,
        layout,
        outputs,
        shared,
        source_names,
        trait_specs,
        segment_specs,
        result,
        abort,
    );
}

/// What a checkpoint retains of one event's trait `items` (`diff` times,
/// at `tick`; see [`retain`]), to `out`: its lifetime amounts and points
/// (but not those of lifetime traits that keep only some: the route
/// reports the ones it holds), and its windowed items as one entry,
/// encoded, with the last of the times the route holds them until
/// ([`traits::trait_hold_end`]).
#[allow(clippy::too_many_arguments)]
fn retain_items(
    specs: &[crate::spec::TraitSpec],
    id: Id,
    items: &[Item],
    tick: Time,
    diff: isize,
    tz: chrono_tz::Tz,
    tick_ms: u64,
    out: &mut impl FnMut((Retained, Time, isize)),
) {
    // About 3 bytes for an amount's item, more for a point's value:
    // reserved once, not grown byte by byte as the encoder writes.
    let mut windowed = Vec::with_capacity(8 * items.len());
    let mut last_end = 0;
    let mut hold_ends = traits::HoldEnds::new(specs, tick, tz, tick_ms);
    for item in items {
        match (hold_ends.of(item.trait_index()), item) {
            (Some(end), item) => {
                last_end = last_end.max(end);
                retain::encode_item_into(item, &mut windowed);
            }
            (None, Item::Amount(slot, value)) => {
                out((Retained::Total(id, *slot, *value), tick, diff));
            }
            (None, Item::Point(index, point, count)) => {
                if traits::keep_of(&specs[*index as usize]).is_none() {
                    out((
                        Retained::Point((id, (*index, point.clone()))),
                        tick,
                        diff * count,
                    ));
                }
            }
        }
    }
    if !windowed.is_empty() {
        out((Retained::Event(id, windowed, last_end), tick, diff));
    }
}

/// The updates of `coll` at times from `from` on.
fn updates_from<'s, D: differential_dataflow::Data>(coll: Coll<'s, D>, from: Time) -> Coll<'s, D> {
    use timely::dataflow::operators::vec::Filter;
    coll.inner
        .filter(move |(_, time, _)| *time >= from)
        .as_collection()
}

/// What the records of one worker contribute to the stages, one stream
/// each: CRM versions keyed by `crm_id`, the identifier sets of events and
/// transactions, the trait items of each event `(key identifier, items)`
/// (see [`traits::contributions`]), and identifier names `(key,
/// kind:value)`.
struct Split<'s> {
    crm_versions: Stream<'s, Time, Vec<((String, Arc<CrmRecord>), Time, isize)>>,
    identifier_sets: Stream<'s, Time, Vec<(Vec<Id>, Time, isize)>>,
    trait_items: Stream<'s, Time, Vec<((Id, Vec<Item>), Time, isize)>>,
    names: Stream<'s, Time, Vec<((Id, String), Time, isize)>>,
    /// What a checkpoint retains of the trait items ([`retain_items`];
    /// nothing in a run without state).
    retained_items: Stream<'s, Time, Vec<(Retained, Time, isize)>>,
}

/// Splits each record, where it was decoded, into what the stages need
/// ([`Split`]): one pass over the records, each part sent straight to its
/// output (timely's `partition` would gather each batch in growing vectors
/// first).
fn split_records<'s>(
    records: Stream<'s, Time, Vec<(Record, Time, isize)>>,
    specs: Rc<[TraitSpec]>,
    tz: chrono_tz::Tz,
    tick_ms: u64,
    stateful: bool,
) -> Split<'s> {
    let mut builder = OperatorBuilder::new("Split records".to_owned(), records.scope());
    let mut input = builder.new_input(records, Pipeline);
    let (crm_out, crm_versions) = builder.new_output();
    let (sets_out, identifier_sets) = builder.new_output();
    let (items_out, trait_items) = builder.new_output();
    let (names_out, names) = builder.new_output();
    let (retained_out, retained_items) = builder.new_output();
    let mut crm_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(crm_out);
    let mut sets_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(sets_out);
    let mut items_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(items_out);
    let mut names_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(names_out);
    let mut retained_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(retained_out);
    builder.build(move |_capabilities| {
        // An event's items as they are collected (a buffer reused; each
        // event's are then moved into a vector of their exact size).
        let mut scratch: Vec<Item> = Vec::new();
        let mut filters = traits::Filters::new(&specs);
        move |_frontiers| {
            let (mut crm_out, mut sets_out) = (crm_out.activate(), sets_out.activate());
            let (mut items_out, mut names_out) = (items_out.activate(), names_out.activate());
            let mut retained_out = retained_out.activate();
            input.for_each_stamp(|cap, data| {
                let mut crm = crm_out.session(&cap);
                let mut sets = sets_out.session(&cap);
                let mut trait_items = items_out.session(&cap);
                let mut names = names_out.session(&cap);
                let mut retained = retained_out.session(&cap);
                for (record, tick, diff) in data.flat_map(|d| d.drain(..)) {
                    if !matches!(record, Record::Crm(_)) {
                        scratch.clear();
                        let key = traits::contributions(
                            &record,
                            tick,
                            &specs,
                            &mut filters,
                            tz,
                            &mut scratch,
                        );
                        if let (Some(key), false) = (key, scratch.is_empty()) {
                            if stateful {
                                retain_items(
                                    &specs,
                                    key,
                                    &scratch,
                                    tick,
                                    diff,
                                    tz,
                                    tick_ms,
                                    &mut |r| retained.give(r),
                                );
                            }
                            let items: Vec<Item> = scratch.drain(..).collect();
                            trait_items.give(((key, items), tick, diff));
                        }
                    }
                    // From here on identifiers are keys; their names travel
                    // apart, to the sinks.
                    let mut key_of = |ident: Ident| {
                        let key = ident.id();
                        names.give(((key, ident.value), tick, 1));
                        key
                    };
                    match record {
                        Record::Crm(c) => {
                            for ident in &c.ids {
                                key_of(ident.clone());
                            }
                            crm.give(((c.crm_id.clone(), Arc::new(c)), tick, diff));
                        }
                        Record::Web(e) => {
                            let ids = e.ids.into_iter().map(key_of).collect();
                            sets.give((ids, tick, diff));
                        }
                        Record::Txn(t) => {
                            let ids = t.ids.into_iter().map(key_of).collect();
                            sets.give((ids, tick, diff));
                        }
                    }
                }
            });
        }
    });
    Split {
        crm_versions,
        identifier_sets,
        trait_items,
        names,
        retained_items,
    }
}
