//! Routing trait inputs to profiles: each event's trait items go to the
//! profile of its identifier, and follow the identifier when it moves.
//!
//! An event contributes to its traits under its highest-priority
//! identifier ([`crate::dataflow::traits::contributions`]); the profile
//! of that identifier can change later, when identity resolution merges
//! two profiles, and then everything the identifier contributed that
//! still counts moves with it. This is a join of the events with
//! `(identifier, profile)`, in event-time order, done as keyed state: per
//! identifier, what it holds (lifetime totals, the lifetime points that
//! can still matter, and the windowed items until their window ends) and
//! its profile. The changes of a time are applied once every input has
//! passed it, in time order:
//!
//! 1. the identifier's profile changes: what it held leaves the old
//!    profile and joins the new one;
//! 2. the time's events add their items (to the profile, and to what the
//!    identifier holds while they count);
//! 3. windowed items whose window ends at the time leave it.
//!
//! Each identifier's changes of a time reach its profile as one message
//! (`(profile, items)`), so a profile stage ([`crate::dataflow::segments`])
//! receives one message per event rather than one update per trait.
//! Differential's `join_core` computes the same thing, but holds every
//! contribution in an arrangement by identifier and every window end in a
//! batcher; with twenty traits per event that was most of the run.
//!
//! Lifetime points are insert-only, so per identifier and trait only
//! those that can still change a value are held
//! ([`crate::dataflow::traits::Keep`]): the earliest for `first`, the
//! latest for `last`, one per value for `distinct`, and so on. A point
//! that replaces the held one is sent with the old one's retraction; the
//! held points are reported on the `kept` output for the checkpoint's
//! retained input ([`crate::dataflow::retain`]).

use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::hashable::Hashable;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::Stream;

use super::retain::RestoredItems;
use super::traits::{keep_of, HoldEnds, Item, Keep, PointContribution, Total};
use super::Time;
use crate::model::{Id, IdMap, Scalar};
use crate::spec::TraitSpec;
use crate::time::window::WindowEnds;
use crate::time::{ClockReport, Completion};

/// An update stream of differential shape.
type Updates<'s, D> = Stream<'s, Time, Vec<(D, Time, isize)>>;

/// What [`route`] sends on.
pub struct Routed<'s> {
    /// `((profile, items), time, 1)`: the changes of a profile's trait
    /// inputs at a time, one message per identifier and time.
    pub changes: Updates<'s, (Id, Vec<Item>)>,
    /// The held lifetime points as they change, restored ones excepted:
    /// what a checkpoint retains of them. `((identifier, (trait, point)),
    /// replaces)`, difference `+1`: `replaces` for a trait that holds one
    /// point per identifier (which replaces the one held before), not for
    /// `distinct` (each value once, never removed).
    pub kept: Updates<'s, (PointContribution, bool)>,
}

/// Routes `events` (`((key identifier, items), tick, diff)`, items with
/// count 1) and `restored` items (`((identifier, items), restore time,
/// diff)`, see [`crate::dataflow::retain`]) to the
/// profiles of their identifiers, as `id_profile` (`((identifier,
/// profile), time, diff)`) gives them at each time; windowed items leave
/// at their window end ([`crate::dataflow::traits::trait_hold_end`] of
/// `traits`, in time zone `tz`, ticks of `tick_ms`). `clocks` are the sources' clocks and cuts,
/// on every worker: once every input has ended, the window ends that will
/// never be committed ([`Completion::never_committed`]) are dropped
/// unprocessed. See the [module documentation](self).
pub fn route<'s>(
    events: Updates<'s, (Id, Vec<Item>)>,
    restored: Updates<'s, (Id, RestoredItems)>,
    id_profile: Updates<'s, (Id, Id)>,
    clocks: Stream<'s, Time, Vec<ClockReport>>,
    traits: Rc<[TraitSpec]>,
    tz: chrono_tz::Tz,
    tick_ms: u64,
) -> Routed<'s> {
    let scope = events.scope();
    let mut builder = OperatorBuilder::new("Route: traits to profiles".to_owned(), scope);
    let mut events_in = builder.new_input(
        events,
        Exchange::new(|((id, _), _, _): &((Id, Vec<Item>), Time, isize)| id.hashed()),
    );
    let mut restored_in = builder.new_input(
        restored,
        Exchange::new(|((id, _), _, _): &((Id, RestoredItems), Time, isize)| id.hashed()),
    );
    let mut links_in = builder.new_input(
        id_profile,
        Exchange::new(|((id, _), _, _): &((Id, Id), Time, isize)| id.hashed()),
    );
    let mut clocks_in = builder.new_input(clocks, Pipeline);
    let (changes_out, changes) = builder.new_output();
    let (kept_out, kept) = builder.new_output();
    let mut changes_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(changes_out);
    let mut kept_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(kept_out);
    let keeps: Vec<Option<Keep>> = traits.iter().map(keep_of).collect();
    builder.build(move |_initial| {
        let mut pending: BTreeMap<Time, Vec<(Id, Input)>> = BTreeMap::new();
        let mut ends: WindowEnds<Id> = WindowEnds::default();
        // Capabilities (changes, kept) at the earliest time pending or
        // waited for.
        let mut held: Option<[Capability<Time>; 2]> = None;
        let mut state: IdMap<Held> = IdMap::default();
        let mut completion = Completion::default();
        // An event's windowed items with their ends (a buffer reused).
        let mut windowed: Vec<(Time, Item)> = Vec::new();
        move |frontiers| {
            clocks_in.for_each(|_, data| data.drain(..).for_each(|r| completion.note(r)));
            let mut note = |cap: &InputCapability<Time>, time: Time| {
                if held.as_ref().is_none_or(|h| time < *h[0].time()) {
                    held = Some([cap.delayed(&time, 0), cap.delayed(&time, 1)]);
                }
            };
            links_in.for_each_stamp(|cap, data| {
                for ((id, profile), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending
                        .entry(t)
                        .or_default()
                        .push((id, Input::Profile(profile, r)));
                }
            });
            restored_in.for_each_stamp(|cap, data| {
                for ((id, items), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending
                        .entry(t)
                        .or_default()
                        .push((id, Input::Restored(items, r)));
                }
            });
            events_in.for_each_stamp(|cap, data| {
                for ((id, items), t, r) in data.flat_map(|d| d.drain(..)) {
                    note(&cap, t);
                    pending
                        .entry(t)
                        .or_default()
                        .push((id, Input::Event(items, r)));
                }
            });
            let Some([hold_changes, hold_kept]) = held.as_mut() else {
                return;
            };
            let complete = |t: &Time| frontiers.iter().all(|f| !f.less_equal(t));
            let ended = frontiers.iter().all(|f| f.is_empty());
            let mut changes_out = changes_out.activate();
            let mut kept_out = kept_out.activate();
            let mut changes = changes_out.session(&*hold_changes);
            let mut kept = kept_out.session(&*hold_kept);
            loop {
                // The next time with something to do: inputs, or window ends.
                let time = match (pending.first_key_value(), ends.next()) {
                    (Some((&p, _)), Some(e)) => p.min(e),
                    (Some((&p, _)), None) => p,
                    (None, Some(e)) => e,
                    (None, None) => break,
                };
                if !complete(&time) {
                    break;
                }
                if ended && completion.never_committed(time) {
                    // The inputs ended: window ends after the end of the
                    // data are no part of the result.
                    pending.clear();
                    ends = WindowEnds::default();
                    break;
                }
                let mut inputs = pending.remove(&time).unwrap_or_default();
                while let Some((_, id)) = ends.pop_due(time) {
                    inputs.push((id, Input::Expire));
                }
                // By identifier (stable: an identifier's inputs keep their
                // order; profile changes first).
                inputs.sort_by_key(|(id, input)| (*id, !matches!(input, Input::Profile(..))));
                for group in inputs.chunk_by_mut(|a, b| a.0 == b.0) {
                    let id = group[0].0;
                    let h = state.entry(id).or_default();
                    // Its profiles before this time, if they may change.
                    let relinked = matches!(group[0].1, Input::Profile(..));
                    let before = if relinked {
                        h.profiles.clone()
                    } else {
                        Vec::new()
                    };
                    // What changes for the identifier's profile at this time.
                    let mut delta: Vec<Item> = Vec::new();
                    for (_, input) in group.iter_mut() {
                        match std::mem::replace(input, Input::Expire) {
                            Input::Profile(profile, r) => {
                                match h.profiles.iter_mut().find(|(p, _)| *p == profile) {
                                    Some((_, count)) => *count += r,
                                    None => h.profiles.push((profile, r)),
                                }
                                h.profiles.retain(|(_, count)| *count != 0);
                                h.profiles.sort_unstable();
                            }
                            Input::Restored(RestoredItems::Lifetime(item), r) => {
                                let item = item.scaled(r);
                                delta.push(item.clone());
                                h.add_lifetime(item);
                            }
                            Input::Restored(RestoredItems::Event(tick, items), r) => {
                                let mut hold_ends = HoldEnds::new(&traits, tick, tz, tick_ms);
                                windowed.clear();
                                for item in items {
                                    let item = if r == 1 { item } else { item.scaled(r) };
                                    match hold_ends.of(item.trait_index()) {
                                        // Left its window before this time.
                                        Some(end) if end <= time => {}
                                        Some(end) => {
                                            delta.push(item.clone());
                                            windowed.push((end, item));
                                        }
                                        None => {
                                            delta.push(item.clone());
                                            h.add_lifetime(item);
                                        }
                                    }
                                }
                                h.hold_all(&mut windowed, id, &mut ends);
                            }
                            Input::Event(items, r) => {
                                let mut hold_ends = HoldEnds::new(&traits, time, tz, tick_ms);
                                windowed.clear();
                                for item in items {
                                    let item = if r == 1 { item } else { item.scaled(r) };
                                    match hold_ends.of(item.trait_index()) {
                                        Some(end) => {
                                            delta.push(item.clone());
                                            windowed.push((end, item));
                                        }
                                        None => h.add_event(
                                            item,
                                            &keeps,
                                            id,
                                            time,
                                            &mut delta,
                                            &mut |c, t, r| kept.give((c, t, r)),
                                        ),
                                    }
                                }
                                h.hold_all(&mut windowed, id, &mut ends);
                            }
                            Input::Expire => {
                                if let Some(items) = h.windows.remove(&time) {
                                    delta.extend(items.into_iter().map(Item::retracted));
                                }
                            }
                        }
                    }
                    if relinked && h.profiles != before {
                        // What it held before this time leaves the old
                        // profiles; all it holds now joins the new ones.
                        let all: Vec<Item> = h.items().collect();
                        for &(p, c) in &before {
                            let mut out: Vec<Item> = all.iter().map(|i| i.scaled(-c)).collect();
                            out.extend(delta.iter().map(|i| i.scaled(c)));
                            if !out.is_empty() {
                                changes.give(((p, out), time, 1));
                            }
                        }
                        for &(p, c) in &h.profiles {
                            let out: Vec<Item> = all.iter().map(|i| i.scaled(c)).collect();
                            if !out.is_empty() {
                                changes.give(((p, out), time, 1));
                            }
                        }
                    } else if !delta.is_empty() {
                        match &h.profiles[..] {
                            [] => {}
                            [(p, 1)] => changes.give(((*p, delta), time, 1)),
                            more => {
                                for &(p, c) in more {
                                    let out = delta.iter().map(|i| i.scaled(c)).collect();
                                    changes.give(((p, out), time, 1));
                                }
                            }
                        }
                    }
                    if h.is_empty() {
                        state.remove(&id);
                    }
                }
            }
            drop((changes, kept));
            let next = match (pending.first_key_value(), ends.next()) {
                (Some((&p, _)), Some(e)) => Some(p.min(e)),
                (Some((&p, _)), None) => Some(p),
                (None, e) => e,
            };
            match next {
                Some(next) => {
                    hold_changes.downgrade(&next);
                    hold_kept.downgrade(&next);
                }
                None => held = None,
            }
        }
    });
    Routed { changes, kept }
}

/// One input of an identifier at a time.
enum Input {
    /// The identifier belongs to this profile, with this change of count.
    Profile(Id, isize),
    /// An event's items, `diff` times.
    Event(Vec<Item>, isize),
    /// Items restored from a checkpoint, `diff` times.
    Restored(RestoredItems, isize),
    /// Its windowed items whose window ends at this time leave.
    Expire,
}

/// What one identifier holds: its profile and the items that still count.
#[derive(Default)]
struct Held {
    /// Its profiles with their counts (one, count 1, in a consistent
    /// input), sorted.
    profiles: Vec<(Id, isize)>,
    /// Lifetime totals by slot, sorted (zero ones removed).
    totals: Vec<(u32, Total)>,
    /// Lifetime points with their counts (for traits with a
    /// [`Keep`], only those that can still matter).
    points: Vec<(u32, (Time, Scalar), isize)>,
    /// Windowed items by window end.
    windows: BTreeMap<Time, Vec<Item>>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.profiles.is_empty()
            && self.totals.is_empty()
            && self.points.is_empty()
            && self.windows.is_empty()
    }

    /// Everything held, as items.
    fn items(&self) -> impl Iterator<Item = Item> + '_ {
        let totals = self.totals.iter().map(|&(s, v)| Item::Amount(s, v));
        let points = self
            .points
            .iter()
            .map(|(i, p, c)| Item::Point(*i, p.clone(), *c));
        let windowed = self.windows.values().flatten().cloned();
        totals.chain(points).chain(windowed)
    }

    /// Holds an event's windowed items `(end, item)` (drained), one
    /// lookup per distinct end.
    fn hold_all(&mut self, items: &mut Vec<(Time, Item)>, id: Id, ends: &mut WindowEnds<Id>) {
        // Latest end first (stable: an end's items keep their order), so
        // that each end's run is drained from the back.
        items.sort_by_key(|(end, _)| std::cmp::Reverse(*end));
        while let Some(&(end, _)) = items.last() {
            let start = items.partition_point(|(e, _)| *e > end);
            let group = self.windows.entry(end).or_insert_with(|| {
                ends.push(end, id);
                Vec::new()
            });
            // One allocation for the run (a window end usually holds
            // several traits' items of the same event).
            group.extend(items.drain(start..).map(|(_, item)| item));
        }
    }

    /// Adds a lifetime total or point, counts adding up.
    fn add_lifetime(&mut self, item: Item) {
        match item {
            Item::Amount(slot, v) => match self.totals.binary_search_by_key(&slot, |(s, _)| *s) {
                Ok(at) => {
                    self.totals[at].1 += v;
                    if self.totals[at].1 == 0 {
                        self.totals.remove(at);
                    }
                }
                Err(at) => self.totals.insert(at, (slot, v)),
            },
            Item::Point(index, point, c) => {
                match self
                    .points
                    .iter()
                    .position(|(i, p, _)| *i == index && *p == point)
                {
                    Some(at) => {
                        self.points[at].2 += c;
                        if self.points[at].2 == 0 {
                            self.points.swap_remove(at);
                        }
                    }
                    None => self.points.push((index, point, c)),
                }
            }
        }
    }

    /// Adds an event's lifetime item at `time`: what changes for the
    /// profile goes to `delta`, the held lifetime points that change to
    /// `kept`.
    fn add_event(
        &mut self,
        item: Item,
        keeps: &[Option<Keep>],
        id: Id,
        time: Time,
        delta: &mut Vec<Item>,
        kept: &mut impl FnMut((PointContribution, bool), Time, isize),
    ) {
        let keep = match &item {
            Item::Point(index, _, c) if *c > 0 => keeps.get(*index as usize).copied().flatten(),
            _ => None,
        };
        let (Some(keep), Item::Point(index, point, _)) = (keep, &item) else {
            delta.push(item.clone());
            self.add_lifetime(item);
            return;
        };
        let index = *index;
        if keep == Keep::EachOnce {
            if self
                .points
                .iter()
                .any(|(i, p, _)| *i == index && p == point)
            {
                return;
            }
        } else if let Some(at) = self.points.iter().position(|(i, ..)| *i == index) {
            if !keep.better(point, &self.points[at].1) {
                return;
            }
            let (_, old, _) = self.points.swap_remove(at);
            delta.push(Item::Point(index, old, -1));
        }
        let replaces = keep != Keep::EachOnce;
        kept(((id, (index, point.clone())), replaces), time, 1);
        self.points.push((index, point.clone(), 1));
        delta.push(Item::Point(index, point.clone(), 1));
    }
}
