//! The retained input: what a checkpoint keeps of the records read so far,
//! compacted, so that a restart rebuilds every arrangement without reading
//! the inputs again.
//!
//! Every stage downstream of the record splitter is a function of five
//! insert-only collections (CRM versions, the first occurrences of
//! identifier sets, trait amounts, trait points, identifier names). A checkpoint
//! at *cut* `C` holds all of their updates at times before `C`, compacted
//! as differential dataflow compacts a trace at frontier `C` (every time
//! before `C` becomes one time, `C - 1`), and bounded by the number of
//! profiles and the longest window, not by the length of the stream:
//!
//! | collection | what is kept | why it is enough |
//! |---|---|---|
//! | CRM versions | per `crm_id`, the latest version (by `updated_at`, then content) | the upsert keeps only the latest version, and versions are never retracted |
//! | identifier sets | each distinct set once | a set seen again adds no link |
//! | names | each identifier key's `kind:value` text | the sinks name keys by it (a restart hands them to the sinks directly, not through the dataflow) |
//! | lifetime amounts | per `(identifier, slot)`, the total | totals are sums ([`crate::dataflow::traits`]) |
//! | lifetime points | for traits that hold one point per identifier ([`crate::dataflow::traits::Keep`]: `first`, `last`, `min`, `max`, recencies), the point held per `(identifier, trait)`; for the others, per `(identifier, trait, tick, value)` the count (for `distinct`, each value once) | a held point is replaced only by a better one, which the route reports |
//! | dwell entries | per `(profile, segment name)` of a segment with `min_dwell` the profile is in, when it entered | a dwell time runs from the entry, which the items do not say; by name, as segment indices follow the definition |
//! | windowed items | per event (its tick and identifier) whose last window end is at or after `C`, its windowed items | an event still inside a window at `C` leaves it at its window end, computed again from its tick; items that left before `C` add nothing |
//!
//! A restart injects them at time `C - 1` ([`restore`]): the outputs at
//! every time from `C` on are exactly those of a run that never stopped
//! (differential's compaction argument: an accumulation at `t ≥ C` is the
//! same whether the updates before `C` carry their own times or `C - 1`).
//! The diffs and state of `C - 1` are already in the outputs and are not
//! written again. The sources resume from points whose earlier lines are
//! all in the checkpoint (see `io::sources`), and drop every record they
//! admit again at a tick before `C`.

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{Scope, Stream};

use super::traits::{Item, PointContribution, Total};
use super::Time;
use std::sync::Arc;

use crate::model::{CrmRecord, Id};

/// One retained update (its time and diff travel beside it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Retained {
    /// A CRM version, keyed by `crm_id`.
    Crm(String, Arc<CrmRecord>),
    /// The first occurrence of an identifier set of an event.
    Set(Vec<Id>),
    /// The `kind:value` text of an identifier key.
    Name(Id, String),
    /// A lifetime amount `(identifier, slot, value)`.
    Total(Id, u32, Total),
    /// A lifetime point, counted.
    Point(PointContribution),
    /// The point held for `(identifier, trait)` of a lifetime trait that
    /// holds one (`first`, `last`, `min`, `max`, recencies): it replaces
    /// the one held before.
    Held(PointContribution),
    /// The windowed items of an event at the update's time (its tick),
    /// under its identifier, with the last of their window ends; the
    /// items encoded ([`encode_item_into`], one after another).
    Event(Id, Vec<u8>, Time),
    /// A profile entered the segment of this name (one with a dwell
    /// time) at this time (`+1`), or left it (`-1`).
    DwellEntry(Id, String, Time),
}

/// What a checkpoint's retained input holds at its cut, read back for a
/// restart (see the [module documentation](self)).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Restored {
    /// The cut `C`: every update before it is here, injected at `C - 1`.
    pub cut: Time,
    /// The latest version of every CRM record.
    pub crm: Vec<(String, CrmRecord)>,
    /// The distinct identifier sets of events.
    pub sets: Vec<Vec<Id>>,
    /// Identifier names.
    pub names: Vec<(Id, String)>,
    /// Lifetime totals `(identifier, trait, total)` (a count, or a sum in
    /// thousandths).
    pub totals: Vec<(Id, u32, i128)>,
    /// The windowed items of events with a window that ends at or after
    /// the cut: `(tick, identifier, items)`.
    pub events: Vec<(Time, Id, Vec<Item>)>,
    /// Lifetime points with their counts (for traits with a
    /// [`crate::dataflow::traits::Keep`], the held ones).
    pub points: Vec<(PointContribution, isize)>,
    /// When each profile entered each segment with a dwell time that it
    /// was in at the cut: `(profile, segment name, entered)`.
    pub dwell_entries: Vec<(Id, String, Time)>,
}

/// The encoding of retained items: bincode with variable-length integers
/// (bincode 1's `DefaultOptions`: a value under 251 takes one byte, so a
/// count of 1 under a trait index takes three bytes in all, where
/// bincode's fixed-width default took 24). An event's items are most of
/// what a run writes to its state, so their size is the state writer's,
/// the flushes' and the compactions' work.
fn item_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().allow_trailing_bytes()
}

/// Appends the encoding of `item` to `out` ([`item_codec`]), so that two
/// encodings appended are the encoding of both lists (the
/// `retained_events` column family holds an event's items so, see
/// [`crate::store`]).
pub fn encode_item_into(item: &Item, out: &mut Vec<u8>) {
    use bincode::Options;
    item_codec()
        .serialize_into(out, item)
        .expect("an item serializes");
}

/// Items encoded by [`encode_item_into`], read back; `None` if the bytes
/// are not such an encoding.
pub fn decode_items(mut bytes: &[u8]) -> Option<Vec<Item>> {
    use bincode::Options;
    let mut out = Vec::new();
    while !bytes.is_empty() {
        out.push(item_codec().deserialize_from(&mut bytes).ok()?);
    }
    Some(out)
}

impl Restored {
    /// How many entries were restored.
    pub fn entries(&self) -> u64 {
        (self.crm.len()
            + self.sets.len()
            + self.names.len()
            + self.totals.len()
            + self.events.len()
            + self.dwell_entries.len()
            + self.points.len()) as u64
    }

    /// Deals the entries into `n` shares (one per worker), each with the
    /// same cut. The names are not dealt: they go straight to the sinks
    /// (take them first, see `ProcessShared::new`).
    pub fn into_shares(self, n: usize) -> Vec<Restored> {
        let n = n.max(1);
        let mut shares: Vec<Restored> = (0..n)
            .map(|_| Restored {
                cut: self.cut,
                ..Restored::default()
            })
            .collect();
        for (i, c) in self.crm.into_iter().enumerate() {
            shares[i % n].crm.push(c);
        }
        for (i, set) in self.sets.into_iter().enumerate() {
            shares[i % n].sets.push(set);
        }
        for (i, t) in self.totals.into_iter().enumerate() {
            shares[i % n].totals.push(t);
        }
        for (i, e) in self.events.into_iter().enumerate() {
            shares[i % n].events.push(e);
        }
        for (i, e) in self.dwell_entries.into_iter().enumerate() {
            shares[i % n].dwell_entries.push(e);
        }
        for (i, p) in self.points.into_iter().enumerate() {
            shares[i % n].points.push(p);
        }
        shares
    }

    /// The time the restored updates are injected at: `cut - 1`.
    pub fn time(&self) -> Time {
        self.cut.saturating_sub(1)
    }
}

/// An update stream of differential shape.
type Updates<'s, D> = Stream<'s, Time, Vec<(D, Time, isize)>>;

/// The restored input, one stream per collection it goes into.
pub struct RestoredStreams<'s> {
    /// CRM versions.
    pub crm: Updates<'s, (String, Arc<CrmRecord>)>,
    /// Identifier sets.
    pub sets: Updates<'s, Vec<Id>>,
    /// Trait items by identifier, for [`crate::dataflow::route`] to hold
    /// (windowed ones until their window ends).
    pub traits: Updates<'s, (Id, RestoredItems)>,
    /// Dwell entries `(profile, segment name, entered)`, for the profile
    /// stage.
    pub dwell_entries: Updates<'s, (Id, String, Time)>,
}

/// Restored trait items of one identifier.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum RestoredItems {
    /// A lifetime total or point.
    Lifetime(Item),
    /// The windowed items of an event at this tick (those whose window
    /// ended before the restore time no longer count).
    Event(Time, Vec<Item>),
}

/// Injects `restored` (this worker's share, if any; see
/// [`Restored::into_shares`]) into the dataflow at [`Restored::time`], and
/// holds no capability afterwards. Without a restore the streams are
/// empty.
pub fn restore<'s>(scope: Scope<'s, Time>, restored: Option<Restored>) -> RestoredStreams<'s> {
    let mut builder = OperatorBuilder::new("Restore: checkpoint".to_owned(), scope);
    let (crm_out, crm) = builder.new_output();
    let (sets_out, sets) = builder.new_output();
    let (traits_out, traits) = builder.new_output();
    let (entries_out, dwell_entries) = builder.new_output();
    let mut crm_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(crm_out);
    let mut sets_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(sets_out);
    let mut traits_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(traits_out);
    let mut entries_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<_>>>::from(entries_out);
    let activator = scope.activator_for(builder.operator_info().address.clone());
    builder.build(move |caps| {
        // Sent when first scheduled (downstream operators are connected by
        // then), then the share and the capabilities are dropped.
        let mut held = restored.map(|r| (r, caps));
        activator.activate();
        move |_frontiers| {
            let Some((r, mut caps)) = held.take() else {
                return;
            };
            let at = r.time();
            for cap in caps.iter_mut() {
                cap.downgrade(&at);
            }
            crm_out
                .activate()
                .session(&caps[0])
                .give_iterator(r.crm.into_iter().map(|(k, c)| ((k, Arc::new(c)), at, 1)));
            sets_out
                .activate()
                .session(&caps[1])
                .give_iterator(r.sets.into_iter().map(|s| (s, at, 1)));
            let mut out = traits_out.activate();
            let mut session = out.session(&caps[2]);
            for (id, slot, total) in r.totals {
                let item = Item::Amount(slot, total);
                session.give(((id, RestoredItems::Lifetime(item)), at, 1));
            }
            for ((id, (index, point)), n) in r.points {
                let item = Item::Point(index, point, n);
                session.give(((id, RestoredItems::Lifetime(item)), at, 1));
            }
            for (tick, id, items) in r.events {
                session.give(((id, RestoredItems::Event(tick, items)), at, 1));
            }
            entries_out
                .activate()
                .session(&caps[3])
                .give_iterator(r.dwell_entries.into_iter().map(|e| (e, at, 1)));
        }
    });
    RestoredStreams {
        crm,
        sets,
        traits,
        dwell_entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::traits::SECOND;
    use crate::model::Scalar;

    #[test]
    fn items_appended_read_back_as_the_list() {
        let items = vec![
            Item::Amount(0, 1),
            Item::Amount(7 | SECOND, -123_456_789_012_345_678_901_234),
            Item::Amount(3, i128::MAX),
            Item::Point(2, (1_764_000_000_000, Scalar::Str("outdoor".into())), 1),
            Item::Point(5, (0, Scalar::Num(49.99)), -3),
            Item::Point(9, (42, Scalar::Null), 2),
            Item::Point(11, (u64::MAX, Scalar::Bool(true)), isize::MIN),
        ];
        let mut bytes = Vec::new();
        for item in &items {
            encode_item_into(item, &mut bytes);
        }
        assert_eq!(decode_items(&bytes), Some(items));
        // A list cut inside an item is not an encoding.
        assert_eq!(decode_items(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_items(&[]), Some(Vec::new()));
    }

    #[test]
    fn a_count_takes_three_bytes() {
        // The variant, the trait index and the count: one byte each.
        let mut bytes = Vec::new();
        encode_item_into(&Item::Amount(4, 1), &mut bytes);
        assert_eq!(bytes.len(), 3);
        // A point of a value-only trait (tick 0) and its count of 1: the
        // variant, the index, the tick, the scalar's variant and 8 bytes
        // of the number, the count.
        bytes.clear();
        encode_item_into(&Item::Point(4, (0, Scalar::Num(12.5)), 1), &mut bytes);
        assert_eq!(bytes.len(), 13);
    }
}
