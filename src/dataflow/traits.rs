//! Traits: per-profile aggregates of events over windows.
//!
//! A trait is declared in the dataflow file (`[traits.NAME]`) over one
//! stream (web or transactions), with an optional filter, an aggregate and
//! a window ([`crate::spec::Window`]). Each event becomes *items*
//! ([`Item`]) keyed by its highest-priority identifier ([`contributions`]);
//! the route ([`crate::dataflow::route`]) sends them to the identifier's
//! profile, where they are aggregated
//! ([`crate::dataflow::segments::evaluate`]). An event enters its window
//! at its tick and leaves it at its window end ([`window_end`]), where
//! the route retracts it (sessions: see [`hold_end`]). When two profiles merge, the route moves
//! every item of the identifier to the merged profile, and every aggregate
//! follows.
//!
//! Two kinds of contribution, by what the aggregate needs:
//!
//! * **Amounts** ([`Item::Amount`], [`Contribution`]), for `count`, `sum`, `avg` and `share`
//!   over lifetime, sliding and tumbling windows: these are abelian, kept
//!   as *differences* of one or two totals per `(profile, trait)` (a
//!   count, or thousandths of a summed field; `avg` and `share` keep a
//!   second total in the slot [`SECOND`]` | trait`). Totals are 128-bit
//!   and exact: a summed value lies within ±[`MAX_SUM_VALUE`].
//! * **Points** ([`Item::Point`], [`PointContribution`]), for every other aggregate and for
//!   sessions and sequences: `(tick, value)`, kept per `(profile, trait)`
//!   as a multiset in the window. The tick is 0 where only the value
//!   matters (`min`, `max`, `distinct`, `most_frequent`), so equal values
//!   are one entry. For lifetime windows, the route keeps only what can
//!   still matter per identifier ([`Keep`]: the earliest, the latest, the
//!   least, the greatest, or each distinct value once), so a profile's
//!   state does not grow with its history.

use super::Time;
use crate::model::{Id, Ident, Record, Scalar, ScalarRef};
use crate::spec::{Aggregate, StreamKind, TraitSpec, Window};

/// Sum traits are kept as integers in thousandths of the summed field.
pub const SUM_SCALE: f64 = 1000.0;

pub use crate::model::limits::MAX_SUM_VALUE;

/// A trait total: a count, or a sum in thousandths.
pub type Total = i128;

/// The bit of an amount's slot that marks a trait's second total (the
/// count of an `avg`, the whole of a `share`).
pub const SECOND: u32 = 1 << 31;

/// The bit of a trait value's index that marks the count of a
/// `most_frequent` trait's value (how often it occurs), which the state
/// keeps as the trait `NAME.count`.
pub const COUNT_OF: u32 = 1 << 30;

/// One amount: `(key identifier, (slot, value))`, where the slot is the
/// trait index, with [`SECOND`] set for a trait's second total.
pub type Contribution = (Id, (u32, i64));

/// One point: `(key identifier, (trait index, (tick, value)))`.
pub type PointContribution = (Id, (u32, (Time, Scalar)));

/// A change of one of a profile's (or an identifier's) trait inputs, as
/// the route ([`crate::dataflow::route`]) sends them to the profiles.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Item {
    /// The total of a slot (see [`SECOND`]) changes by this amount (a
    /// count, or a sum in thousandths).
    Amount(u32, Total),
    /// The count of a point `(tick, value)` of trait `index` changes by
    /// this much.
    Point(u32, (Time, Scalar), isize),
}

impl Item {
    /// The trait the item belongs to.
    pub fn trait_index(&self) -> u32 {
        match self {
            Item::Amount(slot, _) => slot_trait(*slot),
            Item::Point(index, ..) => *index,
        }
    }

    /// The item's retraction (`scaled(-1)`, without a copy).
    pub fn retracted(self) -> Item {
        match self {
            Item::Amount(slot, v) => Item::Amount(slot, -v),
            Item::Point(index, point, c) => Item::Point(index, point, -c),
        }
    }

    /// The item `k` times over (`-1`: its retraction).
    pub fn scaled(&self, k: isize) -> Item {
        match self {
            Item::Amount(slot, v) => Item::Amount(*slot, v * k as Total),
            Item::Point(index, point, c) => Item::Point(*index, point.clone(), c * k),
        }
    }
}

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

/// The distinct filters of a definition's traits and of their sequences'
/// steps, so that each event is tested against each filter once: the
/// shipped definition has twenty traits and five distinct filters
/// (`event == "view_item"` alone is the filter of eight).
pub struct Filters {
    /// The distinct filters.
    exprs: Vec<crate::spec::expr::Expr>,
    /// Per trait: its filter's index in `exprs`.
    of_trait: Vec<Option<usize>>,
    /// Per trait: its sequence steps' filters' indices.
    of_steps: Vec<Vec<Option<usize>>>,
    /// Per filter, for the event being split: not yet tested, or whether
    /// it passed.
    memo: Vec<Option<bool>>,
}

impl Filters {
    /// The filters of `traits`, told apart by their text.
    pub fn new(traits: &[TraitSpec]) -> Filters {
        let mut exprs: Vec<crate::spec::expr::Expr> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut index = |f: Option<&crate::spec::expr::Expr>| {
            let f = f?;
            let text = f.to_string();
            Some(match texts.iter().position(|t| *t == text) {
                Some(at) => at,
                None => {
                    texts.push(text);
                    exprs.push(f.clone());
                    exprs.len() - 1
                }
            })
        };
        let of_trait = traits.iter().map(|t| index(t.filter.as_ref())).collect();
        let of_steps = traits
            .iter()
            .map(|t| match &t.sequence {
                Some(seq) => seq.steps.iter().map(|(_, f)| index(f.as_ref())).collect(),
                None => Vec::new(),
            })
            .collect();
        let memo = vec![None; exprs.len()];
        Filters {
            exprs,
            of_trait,
            of_steps,
            memo,
        }
    }

    /// Whether `record` is an event of `stream` that passes filter `k`
    /// (`None`: no filter), each filter evaluated once per event (see
    /// [`Filters::next_event`]).
    fn passes(
        &mut self,
        stream: StreamKind,
        k: Option<usize>,
        record: &Record,
        tz: chrono_tz::Tz,
        tick: Time,
    ) -> bool {
        let on_stream = matches!(
            (stream, record),
            (StreamKind::Web, Record::Web(_)) | (StreamKind::Transactions, Record::Txn(_))
        );
        let Some(k) = k.filter(|_| on_stream) else {
            return on_stream;
        };
        *self.memo[k]
            .get_or_insert_with(|| self.exprs[k].eval_bool(&mut |p| field(record, p, tz, tick)))
    }

    /// Forgets the results of the event before.
    fn next_event(&mut self) {
        self.memo.iter_mut().for_each(|m| *m = None);
    }
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

/// The contributions of one record at `tick` to every trait, pushed to
/// `items`: amounts `Item::Amount(slot, value)` and points
/// `Item::Point(trait, (tick or 0, value), 1)`; returns the identifier
/// they are keyed by (the record's first, of the highest priority), or
/// `None` for a record without identifiers (which contributes nothing).
/// They leave their windows at [`window_end`], and the route lets go of
/// them at [`trait_hold_end`] ([`crate::dataflow::route`]).
///
/// `filters` are those of `traits` ([`Filters::new`]).
pub fn contributions(
    record: &Record,
    tick: Time,
    traits: &[TraitSpec],
    filters: &mut Filters,
    tz: chrono_tz::Tz,
    items: &mut Vec<Item>,
) -> Option<Id> {
    let key = record.ids().first().map(Ident::id)?;
    filters.next_event();
    for (index, spec) in traits.iter().enumerate() {
        let i = index as u32;
        let matched = filters.passes(spec.stream, filters.of_trait[index], record, tz, tick);
        if let Some(seq) = &spec.sequence {
            if matched {
                items.push(Item::Point(i, (tick, Scalar::Bool(false)), 1));
            }
            let mut step_passes = false;
            for (step, (stream, _)) in seq.steps.iter().enumerate() {
                let k = filters.of_steps[index][step];
                if filters.passes(*stream, k, record, tz, tick) {
                    step_passes = true;
                    break;
                }
            }
            if step_passes {
                items.push(Item::Point(i, (tick, Scalar::Bool(true)), 1));
            }
            continue;
        }
        if let Window::Session { .. } = spec.window {
            // Every event of the stream marks the session; those the filter
            // keeps carry their value.
            if filters.passes(spec.stream, None, record, tz, tick) {
                let value = if matched {
                    point_value(spec, record, tz, tick).unwrap_or(Scalar::Null)
                } else {
                    Scalar::Null
                };
                items.push(Item::Point(i, (tick, value), 1));
            }
            continue;
        }
        if !matched {
            continue;
        }
        let of = || field(record, spec.of.as_deref().unwrap_or(&[]), tz, tick);
        match spec.aggregate {
            Aggregate::Count => items.push(Item::Amount(i, Total::from(1))),
            Aggregate::Sum => {
                if let Some(v) = thousandths(of()).filter(|v| *v != 0) {
                    items.push(Item::Amount(i, Total::from(v)));
                }
            }
            Aggregate::Avg => {
                if let Some(v) = thousandths(of()) {
                    if v != 0 {
                        items.push(Item::Amount(i, Total::from(v)));
                    }
                    items.push(Item::Amount(i | SECOND, Total::from(1)));
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
                        items.push(Item::Amount(i, Total::from(w)));
                    }
                    items.push(Item::Amount(i | SECOND, Total::from(w)));
                }
            }
            Aggregate::Min | Aggregate::Max | Aggregate::Distinct | Aggregate::MostFrequent => {
                if let Some(v) = point_value(spec, record, tz, tick) {
                    items.push(Item::Point(i, (0, v), 1));
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
                    items.push(Item::Point(i, (tick, v), 1));
                }
            }
        }
    }
    Some(key)
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

/// How far a session point's release is rounded up (ms): see
/// [`hold_end`].
pub const SESSION_RELEASE_MS: u64 = 3_600_000;

/// When the route ([`crate::dataflow::route`]) lets go of an item of
/// trait `spec` at `tick` and retracts it from its profile: its
/// [`window_end`], but for a session's points that end rounded up to the
/// next multiple of [`SESSION_RELEASE_MS`]. A session point counts only
/// while it is in the window (`tick + session_max > now`), and the profile
/// stage reads only those ([`crate::dataflow::segments`]), waking when the
/// oldest point of the current session leaves it; releasing the points of
/// an hour together makes one retraction per identifier and hour instead
/// of one per event. `None` for a lifetime trait.
pub fn hold_end(spec: &TraitSpec, tick: Time, tz: chrono_tz::Tz, tick_ms: u64) -> Option<Time> {
    let end = window_end(spec, tick, tz, tick_ms)?;
    Some(match spec.window {
        Window::Session { .. } => end.div_ceil(SESSION_RELEASE_MS) * SESSION_RELEASE_MS,
        _ => end,
    })
}

/// [`hold_end`] of trait `index` of `traits` (an amount's slot's trait,
/// see [`slot_trait`], or a point's trait).
pub fn trait_hold_end(
    traits: &[TraitSpec],
    index: u32,
    tick: Time,
    tz: chrono_tz::Tz,
    tick_ms: u64,
) -> Option<Time> {
    traits
        .get(index as usize)
        .and_then(|t| hold_end(t, tick, tz, tick_ms))
}

/// [`trait_hold_end`] of the items of one event at `tick`, each trait's
/// computed once: an event's items come in trait order
/// ([`contributions`]), and a trait may give several (an `avg` or a
/// `share` gives two).
pub struct HoldEnds<'a> {
    traits: &'a [TraitSpec],
    tick: Time,
    tz: chrono_tz::Tz,
    tick_ms: u64,
    /// The last trait asked about, and its end.
    last: Option<(u32, Option<Time>)>,
}

impl<'a> HoldEnds<'a> {
    /// The ends of the items of an event at `tick` (see
    /// [`trait_hold_end`] for the other arguments).
    pub fn new(traits: &'a [TraitSpec], tick: Time, tz: chrono_tz::Tz, tick_ms: u64) -> Self {
        HoldEnds {
            traits,
            tick,
            tz,
            tick_ms,
            last: None,
        }
    }

    /// The hold end of an item of trait `index` (`None`: lifetime).
    pub fn of(&mut self, index: u32) -> Option<Time> {
        match self.last {
            Some((i, end)) if i == index => end,
            _ => {
                let end = trait_hold_end(self.traits, index, self.tick, self.tz, self.tick_ms);
                self.last = Some((index, end));
                end
            }
        }
    }
}

/// Which point of a lifetime trait can still matter, per identifier.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Keep {
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

impl Keep {
    /// Whether `new` replaces `old` as the kept point (never for
    /// [`Keep::EachOnce`], which keeps every distinct value).
    pub fn better(self, new: &(Time, Scalar), old: &(Time, Scalar)) -> bool {
        match self {
            Keep::Earliest => new < old,
            Keep::Latest => new > old,
            Keep::Least => new.1 < old.1,
            Keep::Greatest => new.1 > old.1,
            Keep::EachOnce => false,
        }
    }
}

/// Which points of trait `spec` can still matter, per identifier: `Some`
/// for the lifetime `first`, `last`, `min`, `max`, `distinct` and
/// recencies, whose points are insert-only (the earliest point so far is
/// the first for good unless an earlier one comes, and so on); `None`
/// for every other trait, whose points all count.
pub fn keep_of(spec: &TraitSpec) -> Option<Keep> {
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

    /// The amounts `(key, (slot, value))` and points `(key, (trait,
    /// point))` of `record`.
    fn run(record: &Record, tick: Time) -> (Vec<Contribution>, Vec<PointContribution>) {
        let mut items = Vec::new();
        let specs = specs();
        let mut filters = Filters::new(&specs);
        let key = contributions(
            record,
            tick,
            &specs,
            &mut filters,
            chrono_tz::UTC,
            &mut items,
        )
        .unwrap();
        let (mut a, mut p) = (Vec::new(), Vec::new());
        for item in items {
            match item {
                Item::Amount(slot, v) => a.push((key, (slot, i64::try_from(v).unwrap()))),
                Item::Point(i, point, c) => {
                    assert_eq!(c, 1);
                    p.push((key, (i, point)));
                }
            }
        }
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
            trait_hold_end(&specs, slot_trait(amounts[0].1 .0), 1000, tz, 1000),
            Some(1000 + 30 * 60_000)
        );
        assert_eq!(
            trait_hold_end(&specs, slot_trait(amounts[1].1 .0), 1000, tz, 1000),
            Some(86_400_000)
        );
        assert_eq!(
            trait_hold_end(&specs, slot_trait(amounts[3].1 .0), 1000, tz, 1000),
            None
        );
        // A window end between two ticks takes effect at the later tick.
        assert_eq!(
            trait_hold_end(&specs, slot_trait(amounts[0].1 .0), 1000, tz, 7 * 60_000),
            Some(35 * 60_000)
        );
        assert_eq!(
            trait_hold_end(&specs, points[0].1 .0, 1000, tz, 1000),
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
