//! Standard event formats that tracking SDKs send: [`segment`] (the Segment
//! spec, also RudderStack and Jitsu) and [`ga4`] (Google Analytics 4
//! Measurement Protocol payloads and BigQuery export rows).
//!
//! Each maps a line to one or more *messages* ([`Message`]), and each
//! message to segflow [`Record`]s at one event time, so that a dataflow
//! written for segflow's own records runs unchanged on either format. What
//! the formats share lives here:
//!
//! * nested objects are flattened into dotted names ([`flatten`]), so that
//!   every field is reachable by its path (`context.device.type`);
//! * identifiers come from the format's id fields and from properties named
//!   like an identifier field of `[identity] priority` ([`make_ids`]);
//! * traits and user properties become *profile records*
//!   ([`profile_records`]): CRM records keyed by the message's identifiers
//!   and the attribute's name, so that a profile's attribute is the latest
//!   value set, and the identifiers stay linked;
//! * a completed order becomes a [`Transaction`] ([`order`]).

use serde_json::Value;

use super::ident::{Ident, IdentityRules};
use super::normalize::normalize_id;
use super::record::{
    add_qty, amount_str, amount_value, expected, id_number, missing, qty_number, qty_str,
    to_scalar, CrmRecord, DecodeError, Fields, Keep, Obj, Record, Transaction,
};
use super::scalar::Scalar;

pub mod ga4;
pub mod segment;

/// One message of a line (a line may hold several: a Segment batch, the
/// events of a GA4 Measurement Protocol payload).
#[derive(Debug)]
pub struct Message {
    /// Where in the line, for reasons: `batch[2]`, `events[0]`; `None` for
    /// a line that is one message.
    pub label: Option<String>,
    /// The message's own JSON text, for its dead letter, when it is part
    /// of a line.
    pub raw: Option<String>,
    /// What it becomes, or why it does not map (the reason names the
    /// format's field, e.g. `properties.order_id`, and starts with the
    /// label).
    pub decoded: Result<Decoded, DecodeError>,
}

/// The records of one message.
#[derive(Debug)]
pub struct Decoded {
    /// The message's event time, epoch milliseconds: the time it is
    /// admitted at (a record may carry another, e.g. when a user property
    /// was set).
    pub ts_ms: i64,
    /// Its records.
    pub records: Vec<Record>,
}

impl Message {
    /// A message at `label` in its line: its reason is prefixed with the
    /// label.
    pub(crate) fn part(label: String, raw: String, decoded: Result<Decoded, DecodeError>) -> Self {
        let decoded = decoded.map_err(|e| DecodeError::new(format!("{label}: {e}")));
        Message {
            label: Some(label),
            raw: Some(raw),
            decoded,
        }
    }

    /// A line that is one message.
    pub(crate) fn whole(decoded: Result<Decoded, DecodeError>) -> Self {
        Message {
            label: None,
            raw: None,
            decoded,
        }
    }
}

/// Adds the fields of `o` to `out` with nested objects flattened into
/// dotted names (`{"a":{"b":1}}` → `a.b`), each under `key_prefix` and kept
/// if `keep` says so; `shown` prefixes names in errors. Arrays are kept as
/// their JSON text.
pub(crate) fn flatten(
    shown: &str,
    o: &Obj,
    key_prefix: &str,
    keep: &Keep,
    out: &mut Fields,
) -> Result<(), DecodeError> {
    flatten_except(shown, o, key_prefix, &[], keep, out)
}

/// [`flatten`] without the top-level fields named in `except` (those a
/// format maps on its own).
pub(crate) fn flatten_except(
    shown: &str,
    o: &Obj,
    key_prefix: &str,
    except: &[&str],
    keep: &Keep,
    out: &mut Fields,
) -> Result<(), DecodeError> {
    for (k, v) in o.iter().filter(|(k, _)| !except.contains(&k.as_str())) {
        let key = format!("{key_prefix}{k}");
        match v {
            Value::Object(inner) => flatten(shown, inner, &format!("{key}."), keep, out)?,
            v if keep.keeps(&key) => {
                out.insert(key.clone(), to_scalar(shown, &key, v)?);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Adds `short` names for fields present under a longer name, when `short`
/// is absent: `(short, [long, ...])`, the first present long name wins.
pub(crate) fn add_short_names(fields: &mut Fields, names: &[(&str, &[&str])]) {
    for (short, longs) in names {
        if fields.contains_key(*short) {
            continue;
        }
        let found = longs
            .iter()
            .find_map(|l| fields.get(*l).filter(|v| !matches!(v, Scalar::Null)));
        if let Some(v) = found.cloned() {
            fields.insert(short.to_string(), v);
        }
    }
}

/// A candidate identifier: the field as the format names it (for
/// messages), the identifier field it is, and its text.
pub(crate) type IdField<'a> = (String, &'a str, String);

/// Identifiers from candidates; fields not in `[identity] priority` and
/// values that do not normalize are skipped (and named in the error if no
/// identifier remains). `expected` says which fields the format reads,
/// e.g. "`userId` or `anonymousId`".
pub(crate) fn make_ids(
    found: &[IdField<'_>],
    rules: &IdentityRules,
    expected: &str,
) -> Result<Vec<Ident>, DecodeError> {
    let mut ids = Vec::new();
    let mut ignored = Vec::new();
    for (name, field, text) in found {
        if !rules.priority.iter().any(|p| p == field) {
            ignored.push(format!("{name} ({field} is not in [identity] priority)"));
            continue;
        }
        match rules.make(field, text) {
            Some(id) => ids.push(id),
            None => ignored.push(format!("{name} {text:?} does not normalize")),
        }
    }
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        let mut reason = format!("no identifier: expected {expected} (or a trait or user property named like an identifier field of [identity] priority)");
        if !ignored.is_empty() {
            reason.push_str(&format!("; ignored: {}", ignored.join(", ")));
        }
        return Err(DecodeError::new(reason));
    }
    Ok(ids)
}

/// The value itself (for [`ids_named_in`] over plain values).
pub(crate) fn present(v: &Value) -> Option<&Value> {
    Some(v)
}

/// Candidates from the fields of `o` named like identifier fields (traits,
/// user properties), each value read by `value_of`; `shown` prefixes their
/// names.
pub(crate) fn ids_named_in<'r>(
    shown: &str,
    o: &Obj,
    rules: &'r IdentityRules,
    value_of: fn(&Value) -> Option<&Value>,
    out: &mut Vec<IdField<'r>>,
) -> Result<(), DecodeError> {
    for field in &rules.priority {
        if let Some(v) = o.get(field).and_then(value_of).filter(|v| !v.is_null()) {
            let name = format!("{shown}{field}");
            let text = candidate_text(&name, v)?;
            out.push((name, field.as_str(), text));
        }
    }
    Ok(())
}

/// A required id field's text.
pub(crate) fn id_text(o: &Obj, key: &str) -> Result<String, DecodeError> {
    match o.get(key).filter(|v| !v.is_null()) {
        None => Err(missing(key)),
        Some(v) => id_text_of(key, v),
    }
}

/// A candidate identifier's text: as [`id_text_of`], but an empty string
/// is kept (as `""`) for [`make_ids`] to skip as a value that does not
/// normalize, as segflow's own records skip `"anonymous_id": ""`.
pub(crate) fn candidate_text(name: &str, v: &Value) -> Result<String, DecodeError> {
    match v {
        Value::String(s) if s.trim().is_empty() => Ok(String::new()),
        v => id_text_of(name, v),
    }
}

/// An id's text: a string (trimmed, non-empty) or an integer's digits.
pub(crate) fn id_text_of(name: &str, v: &Value) -> Result<String, DecodeError> {
    match v {
        Value::String(s) => normalize_id(s).ok_or_else(|| {
            DecodeError::new(format!(
                "field `{name}`: expected a non-empty string, found an empty string"
            ))
        }),
        Value::Number(n) => id_number(n)
            .map(str::to_string)
            .map_err(|e| DecodeError::new(format!("field `{name}`: {e}"))),
        v => Err(expected(name, "a string", v)),
    }
}

/// An amount (a number or a numeric string) within the engine's range.
pub(crate) fn amount_of(name: &str, v: &Value) -> Result<f64, DecodeError> {
    match v {
        Value::Number(n) => amount_value(n.as_str()),
        Value::String(s) => amount_str(s),
        v => return Err(expected(name, "a number", v)),
    }
    .map_err(|e| DecodeError::new(format!("field `{name}`: {e}")))
}

/// A quantity (a whole number or a string of one); 1 when absent.
pub(crate) fn qty_of(name: &str, v: Option<&Value>) -> Result<u64, DecodeError> {
    match v {
        None => Ok(1),
        Some(Value::Number(n)) => qty_number(n.as_str()),
        Some(Value::String(s)) => qty_str(s),
        Some(v) => return Err(expected(name, "a number", v)),
    }
    .map_err(|e| DecodeError::new(format!("field `{name}`: {e}")))
}

/// A currency code, trimmed and upper-cased.
pub(crate) fn currency_of(name: &str, v: Option<&Value>) -> Result<Option<String>, DecodeError> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_ascii_uppercase()).filter(|c| !c.is_empty())),
        Some(v) => Err(expected(name, "a string", v)),
    }
}

/// An order's items: each product's fields (all of them if `keep_all`,
/// else none, as a projection that reads no item field), with the
/// `quantity` read by `qty_key` as `qty`, and the order's `item_count`.
/// `fields` gives a product's fields (with its short names).
pub(crate) fn order_items(
    shown: &str,
    list: &[Value],
    qty_key: &str,
    keep_all: bool,
    fields: impl Fn(&Obj, &str, &Keep) -> Result<Fields, DecodeError>,
) -> Result<(Vec<Fields>, u64), DecodeError> {
    let keep = if keep_all {
        Keep::All
    } else {
        Keep::Only(Vec::new())
    };
    let mut items = Vec::with_capacity(list.len());
    let mut count = 0u64;
    for (i, p) in list.iter().enumerate() {
        let at = format!("{shown}[{i}]");
        let Value::Object(p) = p else {
            return Err(expected(&at, "an object", p));
        };
        let qty = qty_of(
            &format!("{at}.{qty_key}"),
            p.get(qty_key).filter(|v| !v.is_null()),
        )?;
        count =
            add_qty(count, qty).map_err(|e| DecodeError::new(format!("field `{shown}`: {e}")))?;
        let mut f = fields(p, &format!("{at}."), &keep)?;
        f.insert("qty".to_string(), Scalar::Num(qty as f64));
        items.push(f);
    }
    Ok((items, count))
}

/// A transaction of a completed order.
pub(crate) fn order(
    ts_ms: i64,
    ids: &[Ident],
    order_id: String,
    amount: f64,
    currency: Option<String>,
    (items, item_count): (Vec<Fields>, u64),
    properties: Fields,
) -> Transaction {
    Transaction {
        ts_ms,
        order_id,
        ids: ids.to_vec(),
        amount,
        currency,
        item_count,
        items,
        properties,
    }
}

/// The profile records of traits or user properties (`(name, value, set
/// at)`): one CRM record per attribute, keyed by the identifiers and the
/// attribute's name (so that a later value of the same attribute for the
/// same identifiers replaces it, and values set through other identifiers
/// of the profile merge by time), or one record that only links the
/// identifiers when there are no attributes.
pub(crate) fn profile_records(
    ts_ms: i64,
    ids: &[Ident],
    attrs: Vec<(String, Scalar, i64)>,
) -> Vec<Record> {
    // Identifiers hold no control characters (`check_identifiers`), so the
    // separators make the key unambiguous.
    let base = format!(
        "profile\u{1e}{}\u{1e}",
        ids.iter()
            .map(|i| i.value.as_str())
            .collect::<Vec<_>>()
            .join("\u{1f}")
    );
    let record = |crm_id: String, updated_ms: i64, attributes: Vec<(String, Scalar)>| {
        Record::Crm(CrmRecord {
            crm_id,
            updated_ms,
            deleted: false,
            ids: ids.to_vec(),
            attributes,
        })
    };
    if attrs.is_empty() {
        return vec![record(base, ts_ms, Vec::new())];
    }
    attrs
        .into_iter()
        .map(|(name, value, at)| record(format!("{base}{name}"), at, vec![(name, value)]))
        .collect()
}

/// Helpers of the formats' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::model::ident::IdentityRules;
    use crate::model::record::{Record, WebEvent};

    /// The default identity rules (`crm_id`, `user_id`, `email`, `phone`,
    /// `anonymous_id`; US phone numbers).
    pub fn rules() -> IdentityRules {
        IdentityRules::new(
            ["crm_id", "user_id", "email", "phone", "anonymous_id"]
                .map(String::from)
                .to_vec(),
            "US".into(),
        )
    }

    /// The web event a record is (else a panic).
    pub fn web(r: &Record) -> &WebEvent {
        match r {
            Record::Web(w) => w,
            other => panic!("expected a web event, got {other:?}"),
        }
    }

    /// A record's identifiers as text.
    pub fn ids(r: &Record) -> Vec<&str> {
        r.ids().iter().map(|i| i.value.as_str()).collect()
    }
}
