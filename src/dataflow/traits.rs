//! Windowed traits: count and sum per profile.
//!
//! A trait is declared in the dataflow file (`[traits.NAME]`) over one
//! stream (web or transactions), with an optional filter, an aggregate
//! (`count` or `sum` of a field) and an optional sliding window.
//!
//! Traits are abelian, so they are computed as *differences* rather than by
//! reducing over all events of a key:
//!
//! 1. [`contributions`]: each matching event becomes the record
//!    `(identifier, (trait, value))` with diff `+1` at its tick, where the
//!    identifier is the event's highest-priority identifier and `value` is 1
//!    for a count or the field's value in thousandths for a sum. For a
//!    window of length `w` ([`window_of`]), the diff `-1` follows at
//!    [`crate::time::window_end`]`(tick, w)`, so the event leaves the window
//!    exactly `w` after it entered; [`crate::time::window`] releases these
//!    retractions when their time comes.
//! 2. [`per_profile`]: the contributions are re-keyed by profile through the
//!    shared `(identifier, profile)` arrangement, each becomes the 128-bit
//!    difference `value × diff`; [`crate::dataflow::segments::evaluate`]
//!    totals them per `(profile, trait)`.
//!    When two profiles merge, the join moves every contribution to the
//!    merged profile and the totals follow.
//!
//! Totals never overflow and are never rounded: a summed value must lie
//! within ±[`MAX_SUM_VALUE`] (so its thousandths are exact; records outside
//! are dead-lettered when decoded, see [`crate::model::limits`]), and totals
//! are 128-bit, which more than 2^87 such values cannot overflow.

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::AsCollection;
use timely::dataflow::operators::vec::Map;

use super::{Coll, Time};
use crate::model::{Id, Ident, Record, ScalarRef};
use crate::spec::{Aggregate, StreamKind, TraitSpec};

/// Sum traits are kept as integers in thousandths of the summed field.
pub const SUM_SCALE: f64 = 1000.0;

pub use crate::model::limits::MAX_SUM_VALUE;

/// A trait total: a count, or a sum in thousandths.
pub type Total = i128;

/// The `(identifier, profile)` arrangement shared by every consumer.
pub type IdProfileArrangement<'s> = Arranged<'s, TraceAgent<ValSpine<Id, Id, Time, isize>>>;

/// Evaluates one trait on one record: `Some(value)` if the record counts
/// towards the trait (value 1 for counts, thousandths for sums). A summed
/// field that is missing, not a number, zero or outside ±[`MAX_SUM_VALUE`]
/// (which decoding already rejects) contributes nothing.
pub fn trait_value(spec: &TraitSpec, record: &Record) -> Option<i64> {
    let mut lookup = |path: &[String]| -> ScalarRef<'_> {
        match record {
            Record::Web(e) => e.field_ref(path),
            Record::Txn(t) => t.field_ref(path),
            Record::Crm(_) => ScalarRef::Null,
        }
    };
    let stream_matches = matches!(
        (spec.stream, record),
        (StreamKind::Web, Record::Web(_)) | (StreamKind::Transactions, Record::Txn(_))
    );
    if !stream_matches {
        return None;
    }
    if let Some(filter) = &spec.filter {
        if !filter.eval_bool(&mut lookup) {
            return None;
        }
    }
    match spec.aggregate {
        Aggregate::Count => Some(1),
        Aggregate::Sum => {
            let path = spec.of.as_deref().unwrap_or(&[]);
            let v = lookup(path).as_f64()?;
            if !v.is_finite() || v.abs() > MAX_SUM_VALUE {
                return None;
            }
            // Exact: for |v| ≤ MAX_SUM_VALUE the rounding only removes the
            // binary error of a decimal with three places.
            let scaled = (v * SUM_SCALE).round();
            (scaled != 0.0).then_some(scaled as i64)
        }
    }
}

/// One contribution: `(key identifier, (trait index, value))`.
pub type Contribution = (Id, (u32, i64));

/// The contributions of one record at `tick`, each
/// `((identifier, (trait, value)), tick, +1)`; the retractions of windowed
/// traits are added by [`crate::time::window::retract_at_window_end`] with
/// [`window_of`].
pub fn contributions(
    record: &Record,
    tick: Time,
    traits: &[TraitSpec],
) -> Vec<(Contribution, Time, isize)> {
    let mut out = Vec::new();
    let Some(key) = record.ids().first().map(Ident::id) else {
        return out;
    };
    for (index, spec) in traits.iter().enumerate() {
        if let Some(value) = trait_value(spec, record) {
            out.push(((key, (index as u32, value)), tick, 1));
        }
    }
    out
}

/// The window length (ms) of a contribution's trait; `None` for lifetime.
pub fn window_of(traits: &[TraitSpec], contribution: &Contribution) -> Option<u64> {
    let (_, (index, _)) = contribution;
    traits.get(*index as usize).and_then(|t| t.window_ms)
}

/// The changes of the totals per `(profile, trait)`: the data is
/// `(profile, trait)` and the difference the change, a count or a sum in
/// thousandths (totalled by [`crate::dataflow::segments::evaluate`]).
pub fn per_profile<'s>(
    contributions: Coll<'s, Contribution>,
    id_profile: IdProfileArrangement<'s>,
) -> Coll<'s, (Id, u32), Total> {
    contributions
        .join_core(id_profile, |_id, (trait_index, value), profile| {
            Some(((*profile, *trait_index), *value))
        })
        .inner
        .map(|((key, value), time, diff)| (key, time, Total::from(value) * diff as Total))
        .as_collection()
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

    #[test]
    fn filters_and_windows_give_an_entry_and_a_retraction() {
        let view = record(
            RecordKind::Web,
            r#"{"event":"view_item","ts":1,"anonymous_id":"a","user_id":"u","item":{"price":120}}"#,
        );
        let out = contributions(&view, 1000, &specs());
        // Keyed by the highest-priority identifier; leaves the window 30 min later.
        let key = view.ids()[0].clone();
        assert_eq!(key.value, "user:u");
        assert_eq!(out, vec![((key.id(), (0, 1)), 1000, 1)]);
        assert_eq!(window_of(&specs(), &out[0].0), Some(30 * 60 * 1000));
        let cheap = record(
            RecordKind::Web,
            r#"{"event":"view_item","ts":1,"anonymous_id":"a","item":{"price":99.99}}"#,
        );
        assert!(contributions(&cheap, 1000, &specs()).is_empty());
    }

    #[test]
    fn sums_are_exact_thousandths_and_lifetime_traits_never_expire() {
        let txn = record(
            RecordKind::Transactions,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":19.999}"#,
        );
        let out = contributions(&txn, 1000, &specs());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0 .1, (1, 19_999));
        assert_eq!(out[0].2, 1);
        assert_eq!(window_of(&specs(), &out[0].0), None);
        assert_eq!(trait_value(&specs()[1], &txn), Some(19_999));
        assert_eq!(
            trait_value(&specs()[0], &txn),
            None,
            "web trait on a transaction"
        );
    }
}
