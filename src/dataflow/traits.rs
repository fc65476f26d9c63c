//! Traits: per-profile aggregates of events over windows.
//!
//! A trait is declared in the dataflow file (`[traits.NAME]`) over one
//! stream (web or transactions), with an optional filter, an aggregate and
//! a window ([`crate::spec::Window`]). Each event becomes *contributions*
//! keyed by its highest-priority identifier; the stages downstream move
//! them to the identifier's profile and aggregate them there
//! ([`crate::dataflow::segments::evaluate`]). An event enters its window
//! at its tick and leaves it at its window end, where a retraction
//! cancels it ([`crate::time::window::retract_at_window_end`]). When two
//! profiles merge, the join with `(identifier, profile)` moves every
//! contribution to the merged profile, and every aggregate follows.
//!
//! Two kinds of contribution, by what the aggregate needs:
//!
//! * **Amounts** ([`Contribution`]), for `count`, `sum`, `avg` and `share`
//!   over lifetime, sliding and tumbling windows: these are abelian, kept
//!   as *differences* of one or two totals per `(profile, trait)` (a
//!   count, or thousandths of a summed field; `avg` and `share` keep a
//!   second total in the slot [`SECOND`]` | trait`). Totals are 128-bit
//!   and exact: a summed value lies within ±[`MAX_SUM_VALUE`].
//! * **Points** ([`PointContribution`]), for every other aggregate and for
//!   sessions and sequences: `(tick, value)`, kept per `(profile, trait)`
//!   as a multiset in the window. The tick is 0 where only the value
//!   matters (`min`, `max`, `distinct`, `most_frequent`), so equal values
//!   are one entry. For lifetime windows, [`lifetime_extremes`] keeps only
//!   what can still matter per identifier (the earliest, the latest, the
//!   least, the greatest, or each distinct value once), so a profile's
//!   state does not grow with its history.

use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::AsCollection;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::Stream;

use super::{Coll, Time};
use crate::model::{Id, IdMap, Ident, Record, Scalar, ScalarRef};
use crate::spec::{Aggregate, StreamKind, TraitSpec, Window};

/// Sum traits are kept as integers in thousandths of the summed field.
pub const SUM_SCALE: f64 = 1000.0;

pub use crate::model::limits::MAX_SUM_VALUE;

/// A trait total: a count, or a sum in thousandths.
pub type Total = i128;

/// The bit of an amount's slot that marks a trait's second total (the
/// count of an `avg`, the whole of a `share`).
pub const SECOND: u32 = 1 << 31;

/// The `(identifier, profile)` arrangement shared by every consumer.
pub type IdProfileArrangement<'s> = Arranged<'s, TraceAgent<ValSpine<Id, Id, Time, isize>>>;

/// One amount: `(key identifier, (slot, value))`, where the slot is the
/// trait index, with [`SECOND`] set for a trait's second total.
pub type Contribution = (Id, (u32, i64));

/// One point: `(key identifier, (trait index, (tick, value)))`.
pub type PointContribution = (Id, (u32, (Time, Scalar)));

/// The trait index of an amount's slot.
pub fn slot_trait(slot: u32) -> u32 {
    slot & !SECOND
}

/// What traits read of a record beyond its own fields: `hour` and
/// `weekday` of its event time `tick` (the time it is processed at: a
/// clamped record's is the watermark) in the engine's time zone.
fn field<'r>(record: &'r Record, path: &[String], tz: chrono_tz::Tz, tick: Time) -> ScalarRef<'r> {
    if let [one] = path {
        let ms = tick;
        match one.as_str() {
            "hour" => return ScalarRef::Num(f64::from(crate::time::calendar::hour(ms, tz))),
            "weekday" => return ScalarRef::Num(f64::from(crate::time::calendar::weekday(ms, tz))),
            _ => {}
        }
    }
    match record {
        Record::Web(e) => e.field_ref(path),
        Record::Txn(t) => t.field_ref(path),
        Record::Crm(_) => ScalarRef::Null,
    }
}

/// Whether `record` is an event of `stream` that passes `filter`.
fn passes(
    stream: StreamKind,
    filter: Option<&crate::spec::expr::Expr>,
    record: &Record,
    tz: chrono_tz::Tz,
    tick: Time,
) -> bool {
    let on_stream = matches!(
        (stream, record),
        (StreamKind::Web, Record::Web(_)) | (StreamKind::Transactions, Record::Txn(_))
    );
    on_stream && filter.is_none_or(|f| f.eval_bool(&mut |p| field(record, p, tz, tick)))
}

/// A numeric field in thousandths, exact for values within
/// ±[`MAX_SUM_VALUE`] (decoding already rejects summed fields outside);
/// `None` if missing, not a number or out of range.
fn thousandths(v: ScalarRef<'_>) -> Option<i64> {
    let v = v.as_f64()?;
    if !v.is_finite() || v.abs() > MAX_SUM_VALUE {
        return None;
    }
    // Exact: for |v| ≤ MAX_SUM_VALUE the rounding only removes the binary
    // error of a decimal with three places.
    Some((v * SUM_SCALE).round() as i64)
}

/// The value a point carries for trait `spec` on a record that passes its
/// filter: the field's value (a number for numeric aggregates; for
/// `first` and `last`, null when missing), `true` for a count; `None` if
/// the field is missing or not a number where one is needed (the event
/// then does not count).
fn point_value(spec: &TraitSpec, record: &Record, tz: chrono_tz::Tz, tick: Time) -> Option<Scalar> {
    let of = || field(record, spec.of.as_deref().unwrap_or(&[]), tz, tick);
    match spec.aggregate {
        Aggregate::Count | Aggregate::SinceFirst | Aggregate::SinceLast => Some(Scalar::Bool(true)),
        Aggregate::Sum | Aggregate::Avg | Aggregate::Min | Aggregate::Max | Aggregate::Share => {
            thousandths(of()).map(|v| Scalar::Num(v as f64 / SUM_SCALE))
        }
        // The value on the earliest or latest event, null if it has none.
        Aggregate::First | Aggregate::Last => Some(of().to_scalar()),
        Aggregate::Distinct | Aggregate::MostFrequent => match of() {
            ScalarRef::Null => None,
            v => Some(v.to_scalar()),
        },
    }
}

/// The contributions of one record at `tick` to every trait: amounts
/// `((identifier, (slot, value)), tick, +1)` and points
/// `((identifier, (trait, (tick or 0, value))), tick, +1)`. The
/// retractions at window ends are added by
/// [`crate::time::window::retract_at_window_end`] with
/// [`trait_window_end`].
pub fn contributions(
    record: &Record,
    tick: Time,
    traits: &[TraitSpec],
    tz: chrono_tz::Tz,
    amounts: &mut impl FnMut(Contribution),
    points: &mut impl FnMut(PointContribution),
) {
    let Some(key) = record.ids().first().map(Ident::id) else {
        return;
    };
    for (index, spec) in traits.iter().enumerate() {
        let i = index as u32;
        let matched = passes(spec.stream, spec.filter.as_ref(), record, tz, tick);
        if let Some(seq) = &spec.sequence {
            if matched {
                points((key, (i, (tick, Scalar::Bool(false)))));
            }
            if seq
                .steps
                .iter()
                .any(|(stream, filter)| passes(*stream, filter.as_ref(), record, tz, tick))
            {
                points((key, (i, (tick, Scalar::Bool(true)))));
            }
            continue;
        }
        if let Window::Session { .. } = spec.window {
            // Every event of the stream marks the session; those the filter
            // keeps carry their value.
            if passes(spec.stream, None, record, tz, tick) {
                let value = if matched {
                    point_value(spec, record, tz, tick).unwrap_or(Scalar::Null)
                } else {
                    Scalar::Null
                };
                points((key, (i, (tick, value))));
            }
            continue;
        }
        if !matched {
            continue;
        }
        let of = || field(record, spec.of.as_deref().unwrap_or(&[]), tz, tick);
        match spec.aggregate {
            Aggregate::Count => amounts((key, (i, 1))),
            Aggregate::Sum => {
                if let Some(v) = thousandths(of()).filter(|v| *v != 0) {
                    amounts((key, (i, v)));
                }
            }
            Aggregate::Avg => {
                if let Some(v) = thousandths(of()) {
                    if v != 0 {
                        amounts((key, (i, v)));
                    }
                    amounts((key, (i | SECOND, 1)));
                }
            }
            Aggregate::Share => {
                let weight = match &spec.of {
                    None => Some(1),
                    Some(_) => thousandths(of()),
                };
                if let Some(w) = weight.filter(|w| *w != 0) {
                    let part = spec
                        .part
                        .as_ref()
                        .is_some_and(|p| p.eval_bool(&mut |path| field(record, path, tz, tick)));
                    if part {
                        amounts((key, (i, w)));
                    }
                    amounts((key, (i | SECOND, w)));
                }
            }
            Aggregate::Min | Aggregate::Max | Aggregate::Distinct | Aggregate::MostFrequent => {
                if let Some(v) = point_value(spec, record, tz, tick) {
                    points((key, (i, (0, v))));
                }
            }
            Aggregate::First | Aggregate::Last | Aggregate::SinceFirst | Aggregate::SinceLast => {
                if let Some(v) = point_value(spec, record, tz, tick) {
                    let v =
                        if matches!(spec.aggregate, Aggregate::SinceFirst | Aggregate::SinceLast) {
                            Scalar::Null
                        } else {
                            v
                        };
                    points((key, (i, (tick, v))));
                }
            }
        }
    }
}

/// When an event at `tick` leaves trait `spec`'s window, at the first
/// tick (of `tick_ms`) at or after the window's end: time moves in ticks,
/// so a window end between two ticks takes effect at the later one.
/// `None` for a lifetime trait.
pub fn window_end(spec: &TraitSpec, tick: Time, tz: chrono_tz::Tz, tick_ms: u64) -> Option<Time> {
    let end = match spec.window {
        Window::Lifetime => return None,
        Window::Sliding(w) => crate::time::window_end(tick, w),
        Window::Tumbling(w) => crate::time::calendar::tumbling_end(tick, w, tz),
        Window::Session { max, .. } => crate::time::window_end(tick, max),
    };
    Some(crate::time::ceil_to_tick(end, tick_ms))
}

/// [`window_end`] of trait `index` of `traits` (an amount's slot's trait,
/// see [`slot_trait`], or a point's trait).
pub fn trait_window_end(
    traits: &[TraitSpec],
    index: u32,
    tick: Time,
    tz: chrono_tz::Tz,
    tick_ms: u64,
) -> Option<Time> {
    traits
        .get(index as usize)
        .and_then(|t| window_end(t, tick, tz, tick_ms))
}

/// The changes of the totals per `(profile, slot)`: the data is
/// `(profile, slot)` and the difference the change, a count or a sum in
/// thousandths.
pub fn per_profile<'s>(
    contributions: Coll<'s, Contribution>,
    id_profile: IdProfileArrangement<'s>,
) -> Coll<'s, (Id, u32), Total> {
    contributions
        .join_core(id_profile, |_id, (slot, value), profile| {
            Some(((*profile, *slot), *value))
        })
        .inner
        .map(|((key, value), time, diff)| (key, time, Total::from(value) * diff as Total))
        .as_collection()
}

/// The points per profile: `((profile, trait), (tick, value))`.
pub fn points_per_profile<'s>(
    points: Coll<'s, PointContribution>,
    id_profile: IdProfileArrangement<'s>,
) -> Coll<'s, ((Id, u32), (Time, Scalar))> {
    points.join_core(id_profile, |_id, (index, point), profile| {
        Some(((*profile, *index), point.clone()))
    })
}

/// Which point of a lifetime trait can still matter, per identifier.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// The least `(tick, value)`: first, since_first.
    Earliest,
    /// The greatest `(tick, value)`: last, since_last.
    Latest,
    /// The least value: min.
    Least,
    /// The greatest value: max.
    Greatest,
    /// Each value once: distinct.
    EachOnce,
}

fn keep_of(spec: &TraitSpec) -> Option<Keep> {
    if spec.window != Window::Lifetime || spec.sequence.is_some() {
        return None;
    }
    match spec.aggregate {
        Aggregate::First | Aggregate::SinceFirst => Some(Keep::Earliest),
        Aggregate::Last | Aggregate::SinceLast => Some(Keep::Latest),
        Aggregate::Min => Some(Keep::Least),
        Aggregate::Max => Some(Keep::Greatest),
        Aggregate::Distinct => Some(Keep::EachOnce),
        _ => None,
    }
}

/// Keeps, per identifier and lifetime trait, only the points that can
/// still change the trait (see [`Keep`]): the points of a lifetime
/// trait are insert-only, so the earliest point so far is the first for
/// good unless an earlier one comes, and so on. Points are taken in time
/// order (each time once the input's frontier has passed it): a point
/// that replaces the kept one is emitted with the kept one's retraction
/// at its own time. Points of other traits pass through. `seed` is the
/// kept points restored from a checkpoint: they fill the state and are
/// not emitted (they travel on their own).
pub fn lifetime_extremes<'s>(
    points: Stream<'s, Time, Vec<(PointContribution, Time, isize)>>,
    seed: Stream<'s, Time, Vec<(PointContribution, Time, isize)>>,
    traits: Rc<[TraitSpec]>,
) -> Stream<'s, Time, Vec<(PointContribution, Time, isize)>> {
    use differential_dataflow::hashable::Hashable;
    use timely::dataflow::channels::pact::Exchange;
    use timely::dataflow::operators::generic::operator::Operator;
    use timely::dataflow::operators::Capability;

    let keeps: Vec<Option<Keep>> = traits.iter().map(keep_of).collect();
    if keeps.iter().all(Option::is_none) {
        return points;
    }
    let by_id = |((id, _), _, _): &(PointContribution, Time, isize)| id.hashed();
    points.binary_frontier(
        seed,
        Exchange::new(by_id),
        Exchange::new(by_id),
        "Lifetime extremes",
        move |_cap, _info| {
            let mut pending: BTreeMap<Time, Vec<PointContribution>> = BTreeMap::new();
            let mut held: Option<Capability<Time>> = None;
            // Per identifier: (trait, kept points), sorted by trait.
            let mut state: IdMap<Vec<(u32, Vec<(Time, Scalar)>)>> = IdMap::default();
            move |(input, frontier), (seed, seed_frontier), output| {
                seed.for_each(|_cap, data| {
                    for ((id, (index, point)), _, r) in data.drain(..) {
                        if r > 0 {
                            kept(&mut state, id, index).push(point);
                        }
                    }
                });
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (c, t, r) in data.drain(..) {
                        let index = c.1 .0 as usize;
                        if keeps.get(index).copied().flatten().is_none() || r <= 0 {
                            session.give((c, t, r));
                            continue;
                        }
                        if held.as_ref().is_none_or(|h| t < *h.time()) {
                            held = Some(cap.delayed(&t, 0));
                        }
                        pending.entry(t).or_default().push(c);
                    }
                });
                let Some(h) = held.as_mut() else { return };
                let reached = frontier
                    .frontier()
                    .iter()
                    .chain(seed_frontier.frontier().iter())
                    .min()
                    .copied();
                {
                    let mut session = output.session(h);
                    while let Some(entry) = pending.first_entry() {
                        if reached.is_some_and(|f| *entry.key() >= f) {
                            break;
                        }
                        let (time, list) = entry.remove_entry();
                        for (id, (index, point)) in list {
                            let keep = keeps[index as usize].expect("kept trait");
                            let kept = kept(&mut state, id, index);
                            let better = |old: &(Time, Scalar)| match keep {
                                Keep::Earliest => point < *old,
                                Keep::Latest => point > *old,
                                Keep::Least => point.1 < old.1,
                                Keep::Greatest => point.1 > old.1,
                                Keep::EachOnce => false,
                            };
                            match keep {
                                Keep::EachOnce => {
                                    if kept.contains(&point) {
                                        continue;
                                    }
                                }
                                _ => match kept.first() {
                                    None => {}
                                    Some(old) if better(old) => {
                                        let old = kept.remove(0);
                                        session.give(((id, (index, old)), time, -1));
                                    }
                                    Some(_) => continue,
                                },
                            }
                            kept.push(point.clone());
                            session.give(((id, (index, point)), time, 1));
                        }
                    }
                }
                match pending.first_key_value() {
                    Some((&next, _)) => h.downgrade(&next),
                    None => held = None,
                }
            }
        },
    )
}

/// The kept points of `(id, trait)`.
fn kept(
    state: &mut IdMap<Vec<(u32, Vec<(Time, Scalar)>)>>,
    id: Id,
    index: u32,
) -> &mut Vec<(Time, Scalar)> {
    let traits = state.entry(id).or_default();
    let at = match traits.binary_search_by_key(&index, |(i, _)| *i) {
        Ok(at) => at,
        Err(at) => {
            traits.insert(at, (index, Vec::new()));
            at
        }
    };
    &mut traits[at].1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode_json, IdentityRules, RecordKind};
    use crate::spec::parse_spec;

    fn specs() -> Vec<TraitSpec> {
        parse_spec(
            r#"
            [traits.premium_30m]
            stream = "web"
            filter = 'event == "view_item" and item.price >= 100'
            window = "30m"
            [traits.spend]
            stream = "transactions"
            aggregate = "sum"
            of = "amount"
            [traits.avg_price]
            stream = "web"
            aggregate = "avg"
            of = "item.price"
            tumbling = "1d"
            [traits.outdoor_share]
            stream = "web"
            aggregate = "share"
            part = 'item.category == "outdoor"'
            [traits.max_price]
            stream = "web"
            aggregate = "max"
            of = "item.price"
            window = "7d"
            [traits.last_hour]
            stream = "web"
            aggregate = "last"
            of = "hour"
            [segments.s]
            when = "premium_30m >= 1"
            "#,
            "t.toml",
        )
        .unwrap()
        .traits
    }

    fn record(kind: RecordKind, line: &str) -> Record {
        let rules = IdentityRules::new(vec!["user_id".into(), "anonymous_id".into()], "US".into());
        decode_json(kind, line, &rules).unwrap()
    }

    fn run(record: &Record, tick: Time) -> (Vec<Contribution>, Vec<PointContribution>) {
        let (mut a, mut p) = (Vec::new(), Vec::new());
        contributions(
            record,
            tick,
            &specs(),
            chrono_tz::UTC,
            &mut |c| a.push(c),
            &mut |c| p.push(c),
        );
        (a, p)
    }

    #[test]
    fn amounts_and_points_of_one_event() {
        // 1970-01-01T05:00:01Z
        let view = record(
            RecordKind::Web,
            r#"{"event":"view_item","ts":18001,"anonymous_id":"a","user_id":"u","item":{"price":120,"category":"outdoor"}}"#,
        );
        let (amounts, points) = run(&view, 18_001_000);
        let key = view.ids()[0].id();
        assert_eq!(view.ids()[0].value, "user:u");
        assert_eq!(
            amounts,
            vec![
                (key, (0, 1)),
                (key, (2, 120_000)),
                (key, (2 | SECOND, 1)),
                (key, (3, 1)),
                (key, (3 | SECOND, 1)),
            ]
        );
        assert_eq!(
            points,
            vec![
                (key, (4, (0, Scalar::Num(120.0)))),
                (key, (5, (18_001_000, Scalar::Num(5.0)))),
            ]
        );
        let specs = specs();
        let tz = chrono_tz::UTC;
        assert_eq!(
            trait_window_end(&specs, slot_trait(amounts[0].1 .0), 1000, tz, 1000),
            Some(1000 + 30 * 60_000)
        );
        assert_eq!(
            trait_window_end(&specs, slot_trait(amounts[1].1 .0), 1000, tz, 1000),
            Some(86_400_000)
        );
        assert_eq!(
            trait_window_end(&specs, slot_trait(amounts[3].1 .0), 1000, tz, 1000),
            None
        );
        // A window end between two ticks takes effect at the later tick.
        assert_eq!(
            trait_window_end(&specs, slot_trait(amounts[0].1 .0), 1000, tz, 7 * 60_000),
            Some(35 * 60_000)
        );
        assert_eq!(
            trait_window_end(&specs, points[0].1 .0, 1000, tz, 1000),
            Some(1000 + 7 * 86_400_000)
        );
        let cheap = record(
            RecordKind::Web,
            r#"{"event":"view_item","ts":1,"anonymous_id":"a","item":{"price":99.99}}"#,
        );
        let (amounts, _) = run(&cheap, 1000);
        assert!(!amounts.iter().any(|(_, (slot, _))| *slot == 0));
        // Not outdoor: the share's whole grows, its part does not.
        assert!(amounts.contains(&(cheap.ids()[0].id(), (3 | SECOND, 1))));
        assert!(!amounts.contains(&(cheap.ids()[0].id(), (3, 1))));
    }

    #[test]
    fn sums_are_exact_thousandths() {
        let txn = record(
            RecordKind::Transactions,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":19.999}"#,
        );
        let (amounts, points) = run(&txn, 1000);
        assert_eq!(amounts, vec![(txn.ids()[0].id(), (1, 19_999))]);
        assert!(points.is_empty(), "web traits on a transaction");
    }
}
