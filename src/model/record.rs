//! Input records and their decoders.
//!
//! Three kinds of input feed the engine, one record per line:
//!
//! * **web events** ([`WebEvent`]) — behavioural events from a site or app:
//!   `{"event":"view_item","ts":..,"anonymous_id":..,"item":{..},"context":{..}}`;
//! * **CRM records** ([`CrmRecord`]) — the latest known state of a customer,
//!   as JSON ([`decode_json`]) or as CSV rows ([`decode_csv`]);
//! * **transactions** ([`Transaction`]) — orders with an amount and items.
//!
//! Decoding validates once, at the edge: required fields must be present
//! with the right type, timestamps are parsed with
//! [`crate::time::parse`], and identifiers are normalized into
//! ranked [`Ident`]s according to [`IdentityRules`]. Errors ([`DecodeError`])
//! name the field and say what was expected and what was found, so a bad
//! input line can be fixed without reading code. A JSON `null` counts as a
//! missing field.
//!
//! Identifier policy: every field listed in [`IdentityRules::priority`] that
//! is present becomes an identifier (strings, or numbers using their JSON
//! text). An e-mail address or phone number that does **not** normalize
//! (e.g. `"email":"n/a"`) is simply not used as an identifier — the record is
//! kept as long as some other identifier remains. Web events and transactions
//! need at least one identifier; CRM records always have their `crm_id`.
//!
//! ## Numbers
//!
//! JSON numbers are read from their exact text (serde_json's
//! `arbitrary_precision`), never through a float first, and no value is
//! silently rounded into another value or wrapped; a value the engine cannot
//! hold is rejected with a reason that says so:
//!
//! * **Identifiers** (`crm_id`, `order_id` and every identifier field,
//!   top-level or in `context`): a number must be an integer written with
//!   digits only (an optional `-`); it is used with its exact digits, of any
//!   length, and is the same identifier as the string of those digits:
//!   `"user_id": 18446744073709551616` ≡ `"user_id": "18446744073709551616"`.
//!   A number with a fraction or an exponent (`1.5`, `1.0`, `1e3`) is
//!   rejected (`field `user_id`: numeric identifier 1e+3 must be written as an
//!   integer (digits only) or as a string`): it has no single digit spelling.
//!   Numbers in messages are spelled as serde_json reads them: the digits as
//!   written, an exponent as `e+N`/`e-N` (`1E3` shows as `1e+3`).
//! * **`amount`** (a number, or a string holding one): at most
//!   [`MAX_AMOUNT`] = 999999999999.999 in magnitude (compared exactly, on
//!   the digits written), so that its thousandths, in which sums are kept,
//!   are exact; beyond that it is rejected: `field `amount`: 1e+400 is out of
//!   range (amounts must be within ±999999999999.999)`. A non-zero amount
//!   too small for a float (`1e-400`) is rejected too (`… is too close to
//!   zero for a 64-bit float (it would become 0)`).
//! * **`items[].qty`** (a number, or a string holding one): a whole number
//!   from 0 to [`MAX_QTY`] = 2^53 − 1 (`2`, `2.0` and `"2"` are the same);
//!   negative, fractional or larger quantities are rejected, and so is an
//!   order whose total `item_count` exceeds [`MAX_QTY`].
//! * **`deleted`** as a number: exactly 0 or 1 (`1.0` counts as 1).
//! * **Other fields** (`item`, `context`, `attributes`, items' fields,
//!   unknown top-level fields) become [`Scalar`]s by
//!   [`Scalar::from_number`]: integers that a 64-bit float cannot hold
//!   exactly are kept as strings of their exact digits; a number outside the
//!   float range (`1e400`) is rejected (`field `item.price`: 1e+400 is out of
//!   range for a 64-bit float`). Arrays and objects kept as JSON text keep
//!   their numbers' digits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ident::{prefix_for, Ident, IdentityRules};
use super::normalize::normalize_id;
use super::scalar::{float, is_integer_literal, Decimal, Scalar, ScalarRef, Whole};
use crate::time::parse::{json_type, parse_time_as, parse_time_str_as, TimeUnit};

/// Named scalar fields (item properties, context, free-form properties).
pub type Fields = BTreeMap<String, Scalar>;

/// Which keys of an object a dataflow reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Every key.
    All,
    /// Only these keys.
    Only(Vec<String>),
}

impl Keep {
    /// Whether `key` is kept.
    pub fn keeps(&self, key: &str) -> bool {
        match self {
            Keep::All => true,
            Keep::Only(keys) => keys.iter().any(|k| k == key),
        }
    }
}

/// Which fields of web events and transactions decoding keeps: those a
/// dataflow reads (see [`WebEvent::field`], [`Transaction::field`]); the
/// others are skipped without being stored, which spares an allocation per
/// field and event. What is kept is read exactly as without a projection,
/// and records are accepted or rejected the same way (identifier and
/// required fields are always read). CRM records are always kept whole:
/// their attributes are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projection {
    /// Keys of the web `item` object.
    pub item: Keep,
    /// Keys of the web `context` object (identifier fields in it are read
    /// whatever this says).
    pub context: Keep,
    /// Other top-level fields (`properties`) of web events and transactions.
    pub properties: Keep,
    /// Whether the fields of each transaction item are kept (their `qty` is
    /// always read and kept, for `item_count`).
    pub items: bool,
}

impl Projection {
    /// Everything: records as decoded without a projection.
    pub const ALL: Projection = Projection {
        item: Keep::All,
        context: Keep::All,
        properties: Keep::All,
        items: true,
    };

    /// What reading the field paths `paths` (as [`WebEvent::field`] and
    /// [`Transaction::field`] take them) needs.
    pub fn reading<'p>(paths: impl IntoIterator<Item = &'p [String]>) -> Projection {
        let (mut item, mut context, mut properties) = (Vec::new(), Vec::new(), Vec::new());
        for path in paths {
            match path {
                [one] => properties.push(one.clone()),
                [group, key] => match group.as_str() {
                    "item" => item.push(key.clone()),
                    "context" => context.push(key.clone()),
                    "properties" => properties.push(key.clone()),
                    _ => {}
                },
                _ => {}
            }
        }
        Projection {
            item: Keep::Only(item),
            context: Keep::Only(context),
            properties: Keep::Only(properties),
            items: false,
        }
    }

    /// Removes from a parsed web event or transaction what is not kept
    /// (identifier fields stay), so that the value-based decoder builds the
    /// same record as the fast one.
    fn prune(&self, kind: RecordKind, o: &mut Obj, rules: &IdentityRules) {
        let is_id = |k: &str| rules.priority.iter().any(|f| f == k);
        match kind {
            RecordKind::Crm => {}
            RecordKind::Web => {
                o.retain(|k, _| {
                    matches!(k.as_str(), "event" | "ts" | "item" | "context")
                        || is_id(k)
                        || self.properties.keeps(k)
                });
                if let Some(Value::Object(item)) = o.get_mut("item") {
                    item.retain(|k, _| self.item.keeps(k));
                }
                if let Some(Value::Object(ctx)) = o.get_mut("context") {
                    ctx.retain(|k, _| is_id(k) || self.context.keeps(k));
                }
            }
            RecordKind::Transactions => {
                o.retain(|k, _| {
                    matches!(
                        k.as_str(),
                        "order_id" | "ts" | "amount" | "currency" | "items"
                    ) || is_id(k)
                        || self.properties.keeps(k)
                });
                if !self.items {
                    if let Some(Value::Array(items)) = o.get_mut("items") {
                        for item in items {
                            if let Value::Object(fields) = item {
                                fields.retain(|k, _| k == "qty");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A behavioural event (page view, add to cart, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WebEvent {
    /// Event time, epoch milliseconds.
    pub ts_ms: i64,
    /// Event name, e.g. `"view_item"` (trimmed).
    pub event: String,
    /// The event's identifiers: sorted, deduplicated, never empty.
    pub ids: Vec<Ident>,
    /// The `"item"` object (id, price, category, brand, ...).
    pub item: Fields,
    /// The `"context"` object (session_id, device, country, referrer, page, ...).
    pub context: Fields,
    /// Top-level fields that are neither known fields nor identifier fields.
    pub properties: Fields,
}

/// The latest state of a CRM customer record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CrmRecord {
    /// The normalized CRM id.
    pub crm_id: String,
    /// When the record was last updated, epoch milliseconds.
    pub updated_ms: i64,
    /// Whether the record is a deletion (tombstone).
    pub deleted: bool,
    /// Identifiers, including the `crm` identifier: sorted, deduplicated.
    pub ids: Vec<Ident>,
    /// Attributes sorted by key: the `"attributes"` object plus unknown
    /// top-level fields (the `"attributes"` object wins on a name clash).
    pub attributes: Vec<(String, Scalar)>,
}

/// A purchase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// Order time, epoch milliseconds.
    pub ts_ms: i64,
    /// The normalized order id.
    pub order_id: String,
    /// The buyer's identifiers: sorted, deduplicated, never empty.
    pub ids: Vec<Ident>,
    /// Order total, at most [`MAX_AMOUNT`] in magnitude.
    pub amount: f64,
    /// ISO currency code, trimmed and upper-cased, if given.
    pub currency: Option<String>,
    /// Sum of the items' `qty` (1 for an item without `qty`), at most
    /// [`MAX_QTY`].
    pub item_count: u64,
    /// The `"items"` array, one field map per item.
    pub items: Vec<Fields>,
    /// Top-level fields that are neither known fields nor identifier fields.
    pub properties: Fields,
}

/// One decoded input record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// A web event.
    Web(WebEvent),
    /// A CRM record.
    Crm(CrmRecord),
    /// A transaction.
    Txn(Transaction),
}

impl Record {
    /// The record's time in epoch milliseconds (`updated_ms` for CRM records).
    pub fn ts_ms(&self) -> i64 {
        match self {
            Record::Web(w) => w.ts_ms,
            Record::Crm(c) => c.updated_ms,
            Record::Txn(t) => t.ts_ms,
        }
    }

    /// Overwrites the record's time (`updated_ms` for CRM records).
    pub fn set_ts_ms(&mut self, ms: i64) {
        match self {
            Record::Web(w) => w.ts_ms = ms,
            Record::Crm(c) => c.updated_ms = ms,
            Record::Txn(t) => t.ts_ms = ms,
        }
    }

    /// The record's identifiers (sorted, deduplicated).
    pub fn ids(&self) -> &[Ident] {
        match self {
            Record::Web(w) => &w.ids,
            Record::Crm(c) => &c.ids,
            Record::Txn(t) => &t.ids,
        }
    }
}

/// The normalized value (without prefix) of the identifier named by a field
/// name (`email`, `crm_id`) or a prefix (`crm`, `anon`).
fn ident_value<'a>(ids: &'a [Ident], name: &str) -> Option<ScalarRef<'a>> {
    let prefix = prefix_for(name);
    ids.iter()
        .find(|i| i.kind() == prefix || i.kind() == name)
        .map(|i| ScalarRef::Str(i.raw_value()))
}

fn lookup<'a>(fields: &'a Fields, key: &str) -> ScalarRef<'a> {
    fields.get(key).map_or(ScalarRef::Null, Scalar::borrowed)
}

impl WebEvent {
    /// Looks up a field by path; anything missing is [`Scalar::Null`].
    ///
    /// * `["event"]`, `["ts"]` (epoch ms);
    /// * `["item", k]`, `["context", k]`, `["properties", k]`;
    /// * `[id]` where `id` is an identifier field name or prefix (`"email"`,
    ///   `"user_id"`, `"anon"`): the normalized value without prefix;
    /// * any other single name: the top-level property of that name.
    pub fn field(&self, path: &[String]) -> Scalar {
        self.field_ref(path).to_scalar()
    }

    /// [`WebEvent::field`], borrowed from the event.
    pub fn field_ref(&self, path: &[String]) -> ScalarRef<'_> {
        match path {
            [one] => match one.as_str() {
                "event" => ScalarRef::Str(&self.event),
                "ts" => ScalarRef::Num(self.ts_ms as f64),
                name => {
                    ident_value(&self.ids, name).unwrap_or_else(|| lookup(&self.properties, name))
                }
            },
            [group, key] => match group.as_str() {
                "item" => lookup(&self.item, key),
                "context" => lookup(&self.context, key),
                "properties" => lookup(&self.properties, key),
                _ => ScalarRef::Null,
            },
            _ => ScalarRef::Null,
        }
    }
}

impl Transaction {
    /// Looks up a field by path; anything missing is [`Scalar::Null`].
    ///
    /// * `["amount"]`, `["currency"]`, `["order_id"]`, `["item_count"]`,
    ///   `["ts"]` (epoch ms);
    /// * `["properties", k]`;
    /// * `[id]` where `id` is an identifier field name or prefix (`"crm_id"`,
    ///   `"user_id"`, `"email"`): the normalized value without prefix;
    /// * any other single name: the top-level property of that name.
    pub fn field(&self, path: &[String]) -> Scalar {
        self.field_ref(path).to_scalar()
    }

    /// [`Transaction::field`], borrowed from the transaction.
    pub fn field_ref(&self, path: &[String]) -> ScalarRef<'_> {
        match path {
            [one] => match one.as_str() {
                "amount" => ScalarRef::Num(self.amount),
                "currency" => self
                    .currency
                    .as_deref()
                    .map_or(ScalarRef::Null, ScalarRef::Str),
                "order_id" => ScalarRef::Str(&self.order_id),
                "item_count" => ScalarRef::Num(self.item_count as f64),
                "ts" => ScalarRef::Num(self.ts_ms as f64),
                name => {
                    ident_value(&self.ids, name).unwrap_or_else(|| lookup(&self.properties, name))
                }
            },
            [group, key] if group == "properties" => lookup(&self.properties, key),
            _ => ScalarRef::Null,
        }
    }
}

/// Which decoder to use for a JSON line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Web events.
    Web,
    /// CRM records.
    Crm,
    /// Transactions.
    Transactions,
}

/// Why an input line could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// Human-readable reason naming the field and what was expected.
    pub reason: String,
    /// Where in the line: the 1-based character column for invalid JSON, the
    /// 1-based column (field) number for CSV; `None` otherwise.
    pub column: Option<usize>,
}

impl DecodeError {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
            column: None,
        }
    }

    fn at(reason: impl Into<String>, column: usize) -> Self {
        DecodeError {
            reason: reason.into(),
            column: Some(column),
        }
    }
}

pub(crate) fn missing(field: &str) -> DecodeError {
    DecodeError::new(format!("missing field `{field}`"))
}

pub(crate) fn expected(field: &str, what: &str, found: &Value) -> DecodeError {
    DecodeError::new(format!(
        "field `{field}`: expected {what}, found {}",
        json_type(found)
    ))
}

/// The largest amount magnitude, 999999999999.999 (just under 10^12).
///
/// Sums are kept in integer thousandths (`round(amount × 1000)`). Below
/// 10^12 the 64-bit float nearest to an amount is within 2^-14 of it and
/// the product by 1000 is below 2^50, so the thousandths come out exactly
/// as written. Larger bounds are not safe: near 2^53 thousandths
/// (9007199254740.991) a float's spacing is about 0.002, and
/// `9007199254740.991` already reads as `9007199254740.990`.
pub const MAX_AMOUNT: f64 = 999_999_999_999.999;

/// [`MAX_AMOUNT`] in thousandths.
const MAX_AMOUNT_THOUSANDTHS: u128 = 999_999_999_999_999;

/// The largest item quantity and `item_count`: 2^53 − 1, so that counts
/// stay exact as numbers in expressions.
pub const MAX_QTY: u64 = (1 << 53) - 1;

/// A numeric identifier's text: an integer written with digits only.
pub(crate) fn id_number(n: &serde_json::Number) -> Result<&str, String> {
    let text = n.as_str();
    if is_integer_literal(text) {
        Ok(text)
    } else {
        Err(format!(
            "numeric identifier {text} must be written as an integer (digits only) or as a string"
        ))
    }
}

/// An amount from its numeral: its value, compared exactly, is at most
/// [`MAX_AMOUNT`] in magnitude.
pub(crate) fn amount_value(text: &str) -> Result<f64, String> {
    let in_range =
        Decimal::parse(text)
            .and_then(|d| d.scaled(3))
            .is_some_and(|(thousandths, fraction)| {
                thousandths < MAX_AMOUNT_THOUSANDTHS
                    || (thousandths == MAX_AMOUNT_THOUSANDTHS && !fraction)
            });
    match float(text) {
        Ok(f) if in_range => Ok(f),
        Err(_) if in_range => Err(format!(
            "{text} is too close to zero for a 64-bit float (it would become 0)"
        )),
        _ => Err(format!(
            "{text} is out of range (amounts must be within ±999999999999.999)"
        )),
    }
}

/// An amount given as a string: a numeral (trimmed), else an error.
pub(crate) fn amount_str(s: &str) -> Result<f64, String> {
    let t = s.trim();
    match Decimal::parse(t) {
        Some(_) => amount_value(t),
        None => Err(format!("expected a number, found string {s:?}")),
    }
}

/// A quantity from an exactly read numeral; `shown` is how the error shows
/// the value.
fn qty_value(d: Decimal, shown: impl FnOnce() -> String) -> Result<u64, String> {
    match d.whole() {
        Whole::Int {
            negative: false,
            magnitude,
        } if magnitude <= u128::from(MAX_QTY) => Ok(magnitude as u64),
        _ => Err(format!(
            "expected a whole number from 0 to {MAX_QTY}, found {}",
            shown()
        )),
    }
}

/// A quantity given as a JSON number (its literal text).
pub(crate) fn qty_number(text: &str) -> Result<u64, String> {
    let d = Decimal::parse(text).ok_or_else(|| format!("{text} is not a number"))?;
    qty_value(d, || text.to_string())
}

/// A quantity given as a string: a numeral (trimmed), else an error.
pub(crate) fn qty_str(s: &str) -> Result<u64, String> {
    match Decimal::parse(s.trim()) {
        Some(d) => qty_value(d, || format!("string {s:?}")),
        None => Err(format!("expected a number, found string {s:?}")),
    }
}

/// Adds an item's quantity to the order's count, up to [`MAX_QTY`].
pub(crate) fn add_qty(count: u64, qty: u64) -> Result<u64, String> {
    count
        .checked_add(qty)
        .filter(|&c| c <= MAX_QTY)
        .ok_or_else(|| format!("the total quantity of the items exceeds {MAX_QTY}"))
}

/// `deleted` given as a number (its literal text): exactly 0 or 1.
fn deleted_number(text: &str) -> Option<bool> {
    match Decimal::parse(text)?.whole() {
        Whole::Int {
            negative: false,
            magnitude: 0,
        } => Some(false),
        Whole::Int {
            negative: false,
            magnitude: 1,
        } => Some(true),
        _ => None,
    }
}

pub(crate) type Obj = Map<String, Value>;

/// A present, non-null value.
pub(crate) fn get<'a>(o: &'a Obj, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn parse_object(line: &str) -> Result<Obj, DecodeError> {
    match parse_json(line)? {
        Value::Object(o) => Ok(o),
        other => Err(DecodeError::new(format!(
            "expected a JSON object, found {}",
            json_type(&other)
        ))),
    }
}

/// Parses a line of JSON; the error gives the 1-based character column.
pub(crate) fn parse_json(line: &str) -> Result<Value, DecodeError> {
    match serde_json::from_str::<Value>(line) {
        Ok(v) => Ok(v),
        Err(e) => {
            let text = e.to_string();
            let msg = text
                .rfind(" at line ")
                .map_or(text.as_str(), |i| &text[..i]);
            Err(DecodeError::at(
                format!("invalid JSON at column {}: {msg}", e.column()),
                e.column(),
            ))
        }
    }
}

pub(crate) fn req_string(o: &Obj, key: &str) -> Result<String, DecodeError> {
    match get(o, key) {
        None => Err(missing(key)),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Value::String(_)) => Err(DecodeError::new(format!(
            "field `{key}`: expected a non-empty string, found an empty string"
        ))),
        Some(v) => Err(expected(key, "a string", v)),
    }
}

/// A required id: a string (normalized) or an integer number (its exact
/// digits).
fn req_id(o: &Obj, key: &str) -> Result<String, DecodeError> {
    match get(o, key) {
        None => Err(missing(key)),
        Some(Value::String(s)) => normalize_id(s).ok_or_else(|| {
            DecodeError::new(format!(
                "field `{key}`: expected a non-empty string, found an empty string"
            ))
        }),
        Some(Value::Number(n)) => id_number(n)
            .map(str::to_string)
            .map_err(|e| DecodeError::new(format!("field `{key}`: {e}"))),
        Some(v) => Err(expected(key, "a string", v)),
    }
}

fn req_time(o: &Obj, key: &str, unit: TimeUnit) -> Result<i64, DecodeError> {
    let v = get(o, key).ok_or_else(|| missing(key))?;
    parse_time_as(v, unit).map_err(|e| DecodeError::new(format!("field `{key}`: {e}")))
}

fn opt_fields(o: &Obj, key: &str) -> Result<Fields, DecodeError> {
    match get(o, key) {
        None => Ok(Fields::new()),
        Some(Value::Object(m)) => to_fields(m, &format!("{key}.")),
        Some(v) => Err(expected(key, "an object", v)),
    }
}

/// The scalar of a field named `name` (for errors: `prefix` + key).
pub(crate) fn to_scalar(prefix: &str, key: &str, v: &Value) -> Result<Scalar, DecodeError> {
    Scalar::from_json(v).map_err(|e| DecodeError::new(format!("field `{prefix}{key}`: {e}")))
}

/// An object's fields as scalars; `prefix` (`"item."`) names them in errors.
fn to_fields(m: &Obj, prefix: &str) -> Result<Fields, DecodeError> {
    m.iter()
        .map(|(k, v)| Ok((k.clone(), to_scalar(prefix, k, v)?)))
        .collect()
}

/// Collects identifiers from the priority fields of `o` (falling back to
/// `ctx`, the web `context` object). Values that do not normalize are
/// recorded in `dropped` for the "no identifier" message.
fn collect_ids(
    o: &Obj,
    ctx: Option<&Obj>,
    rules: &IdentityRules,
    ids: &mut Vec<Ident>,
    dropped: &mut Vec<String>,
) -> Result<(), DecodeError> {
    for field in &rules.priority {
        let (value, name) = match (get(o, field), ctx.and_then(|c| get(c, field))) {
            (Some(v), _) => (v, field.clone()),
            (None, Some(v)) => (v, format!("context.{field}")),
            (None, None) => continue,
        };
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => id_number(n)
                .map_err(|e| DecodeError::new(format!("field `{name}`: {e}")))?
                .to_string(),
            v => return Err(expected(&name, "a string", v)),
        };
        match rules.make(field, &text) {
            Some(id) => ids.push(id),
            None => dropped.push(format!("{name} {text:?}")),
        }
    }
    ids.sort();
    ids.dedup();
    Ok(())
}

fn no_identifier(rules: &IdentityRules, dropped: &[String]) -> DecodeError {
    let mut reason = format!(
        "no identifier: expected one of {}",
        rules.priority.join(", ")
    );
    if !dropped.is_empty() {
        reason.push_str(&format!(
            " (ignored values that do not normalize: {})",
            dropped.join(", ")
        ));
    }
    DecodeError::new(reason)
}

/// Top-level fields that are neither in `known` nor identifier fields.
fn unknown_fields(o: &Obj, known: &[&str], rules: &IdentityRules) -> Result<Fields, DecodeError> {
    o.iter()
        .filter(|(k, _)| !known.contains(&k.as_str()) && !rules.priority.iter().any(|p| p == *k))
        .map(|(k, v)| Ok((k.clone(), to_scalar("", k, v)?)))
        .collect()
}

/// Decodes one JSON line of the given kind.
///
/// See the [module documentation](self) for the identifier policy; the
/// required fields are `event` and `ts` (web), `crm_id` and `updated_at`
/// (CRM), `order_id`, `ts` and `amount` (transactions).
pub fn decode_json(
    kind: RecordKind,
    line: &str,
    rules: &IdentityRules,
) -> Result<Record, DecodeError> {
    decode_json_as(kind, line, rules, TimeUnit::Auto)
}

/// [`decode_json`] with numeric timestamps in `unit` (a source's
/// `time_unit`).
pub fn decode_json_as(
    kind: RecordKind,
    line: &str,
    rules: &IdentityRules,
    unit: TimeUnit,
) -> Result<Record, DecodeError> {
    decode_json_projected(kind, line, rules, unit, &Projection::ALL)
}

/// [`decode_json_as`], keeping only the fields `projection` names.
pub fn decode_json_projected(
    kind: RecordKind,
    line: &str,
    rules: &IdentityRules,
    unit: TimeUnit,
    projection: &Projection,
) -> Result<Record, DecodeError> {
    let record = match fast::decode(kind, line, rules, unit, projection) {
        Some(record) => record,
        None => decode_json_value(kind, line, rules, unit, projection)?,
    };
    check_identifiers(&record)?;
    Ok(record)
}

/// Identifiers are keys of profiles and of the state: one that holds a
/// control character (`"victim\u0000x"`) is rejected rather than stored.
pub(crate) fn check_identifiers(record: &Record) -> Result<(), DecodeError> {
    for id in record.ids() {
        if let Some((at, c)) = id.value.char_indices().find(|(_, c)| c.is_control()) {
            return Err(DecodeError::new(format!(
                "identifier {:?} contains the control character U+{:04X} at byte {at}",
                id.value, c as u32
            )));
        }
    }
    Ok(())
}

/// [`decode_json`] through a `serde_json::Value`: the reference decoder, and
/// the one that reports every error.
fn decode_json_value(
    kind: RecordKind,
    line: &str,
    rules: &IdentityRules,
    unit: TimeUnit,
    projection: &Projection,
) -> Result<Record, DecodeError> {
    let mut o = parse_object(line)?;
    if *projection != Projection::ALL {
        projection.prune(kind, &mut o, rules);
    }
    match kind {
        RecordKind::Web => decode_web(&o, rules, unit).map(|mut e| {
            // The context's identifier fields were needed until now.
            e.context.retain(|k, _| projection.context.keeps(k));
            Record::Web(e)
        }),
        RecordKind::Crm => decode_crm(&o, rules, unit).map(Record::Crm),
        RecordKind::Transactions => decode_txn(&o, rules, unit).map(Record::Txn),
    }
}

fn decode_web(o: &Obj, rules: &IdentityRules, unit: TimeUnit) -> Result<WebEvent, DecodeError> {
    let event = req_string(o, "event")?;
    let ts_ms = req_time(o, "ts", unit)?;
    let item = opt_fields(o, "item")?;
    let context = opt_fields(o, "context")?;
    let ctx = match get(o, "context") {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    let (mut ids, mut dropped) = (Vec::new(), Vec::new());
    collect_ids(o, ctx, rules, &mut ids, &mut dropped)?;
    if ids.is_empty() {
        return Err(no_identifier(rules, &dropped));
    }
    let properties = unknown_fields(o, &["event", "ts", "item", "context"], rules)?;
    Ok(WebEvent {
        ts_ms,
        event,
        ids,
        item,
        context,
        properties,
    })
}

/// The CRM identifier; when `crm_id` is not in the priority list it ranks
/// after every listed field.
fn crm_ident(rules: &IdentityRules, crm_id: &str) -> Ident {
    rules.make("crm_id", crm_id).unwrap_or_else(|| Ident {
        rank: rules.priority.len().min(u8::MAX as usize) as u8,
        value: format!("crm:{crm_id}"),
    })
}

fn decode_crm(o: &Obj, rules: &IdentityRules, unit: TimeUnit) -> Result<CrmRecord, DecodeError> {
    let crm_id = req_id(o, "crm_id")?;
    let updated_ms = req_time(o, "updated_at", unit)?;
    let deleted = match get(o, "deleted") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v @ Value::Number(n)) => {
            deleted_number(n.as_str()).ok_or_else(|| expected("deleted", "a boolean", v))?
        }
        Some(Value::String(s)) => parse_bool(s).ok_or_else(|| {
            DecodeError::new(format!(
                "field `deleted`: expected true/false, 1/0 or yes/no, found {s:?}"
            ))
        })?,
        Some(v) => return Err(expected("deleted", "a boolean", v)),
    };
    let mut ids = vec![crm_ident(rules, &crm_id)];
    let mut dropped = Vec::new();
    let others: Obj = o
        .iter()
        .filter(|(k, _)| *k != "crm_id")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    collect_ids(&others, None, rules, &mut ids, &mut dropped)?;
    let mut attrs = unknown_fields(o, &["crm_id", "updated_at", "deleted", "attributes"], rules)?;
    attrs.extend(opt_fields(o, "attributes")?);
    Ok(CrmRecord {
        crm_id,
        updated_ms,
        deleted,
        ids,
        attributes: attrs.into_iter().collect(),
    })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" | "" => Some(false),
        _ => None,
    }
}

fn decode_txn(o: &Obj, rules: &IdentityRules, unit: TimeUnit) -> Result<Transaction, DecodeError> {
    let order_id = req_id(o, "order_id")?;
    let ts_ms = req_time(o, "ts", unit)?;
    let amount = match get(o, "amount") {
        None => return Err(missing("amount")),
        Some(Value::Number(n)) => amount_value(n.as_str()),
        Some(Value::String(s)) => amount_str(s),
        Some(v) => return Err(expected("amount", "a number", v)),
    }
    .map_err(|e| DecodeError::new(format!("field `amount`: {e}")))?;
    let currency = match get(o, "currency") {
        None => None,
        Some(Value::String(s)) => Some(s.trim().to_ascii_uppercase()).filter(|c| !c.is_empty()),
        Some(v) => return Err(expected("currency", "a string", v)),
    };
    let mut items = Vec::new();
    let mut count = 0u64;
    match get(o, "items") {
        None => {}
        Some(Value::Array(arr)) => {
            for (i, it) in arr.iter().enumerate() {
                let m = match it {
                    Value::Object(m) => m,
                    v => return Err(expected(&format!("items[{i}]"), "an object", v)),
                };
                let qty = match get(m, "qty") {
                    None => Ok(1),
                    Some(Value::Number(n)) => qty_number(n.as_str()),
                    Some(Value::String(s)) => qty_str(s),
                    Some(v) => return Err(expected(&format!("items[{i}].qty"), "a number", v)),
                }
                .map_err(|e| DecodeError::new(format!("field `items[{i}].qty`: {e}")))?;
                count = add_qty(count, qty)
                    .map_err(|e| DecodeError::new(format!("field `items`: {e}")))?;
                items.push(to_fields(m, &format!("items[{i}]."))?);
            }
        }
        Some(v) => return Err(expected("items", "an array", v)),
    }
    let (mut ids, mut dropped) = (Vec::new(), Vec::new());
    collect_ids(o, None, rules, &mut ids, &mut dropped)?;
    if ids.is_empty() {
        return Err(no_identifier(rules, &dropped));
    }
    let properties = unknown_fields(o, &["order_id", "ts", "amount", "currency", "items"], rules)?;
    Ok(Transaction {
        ts_ms,
        order_id,
        ids,
        amount,
        currency,
        item_count: count,
        items,
        properties,
    })
}

fn read_csv_record(line: &str) -> Result<Option<csv::StringRecord>, DecodeError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(line.as_bytes());
    let mut rec = csv::StringRecord::new();
    match rdr.read_record(&mut rec) {
        Ok(true) => Ok(Some(rec)),
        Ok(false) => Ok(None),
        Err(e) => Err(DecodeError::new(format!("invalid CSV: {e}"))),
    }
}

/// Parses a CSV header record into trimmed column names (a leading UTF-8
/// BOM is dropped, for inputs not framed by
/// [`crate::io::sources::lines::Framer`], which drops it itself). Empty and
/// duplicate names are errors.
pub fn parse_csv_header(line: &str) -> Result<Vec<String>, DecodeError> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    let rec = read_csv_record(line)?
        .ok_or_else(|| DecodeError::new("empty CSV header: expected column names"))?;
    let mut names: Vec<String> = Vec::with_capacity(rec.len());
    for (i, name) in rec.iter().enumerate() {
        if name.is_empty() {
            return Err(DecodeError::at(
                format!("empty column name at column {}", i + 1),
                i + 1,
            ));
        }
        if let Some(j) = names.iter().position(|n| n == name) {
            return Err(DecodeError::at(
                format!(
                    "duplicate column name `{name}` at columns {} and {}",
                    j + 1,
                    i + 1
                ),
                i + 1,
            ));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Decodes one CSV record of CRM data, given the header from
/// [`parse_csv_header`]. The record is the raw text of exactly one record
/// as framed by [`crate::io::sources::lines::Framer`] (`Framing::Csv`): a
/// quoted field in it may hold commas, doubled quotes and line breaks.
///
/// Columns `crm_id` (required), `email`, `phone`, `updated_at` (required; any
/// [`crate::time::parse`] string form) and `deleted`
/// (`true`/`1`/`yes` → deleted; `false`/`0`/`no`/empty → not; anything else
/// is an error) are fields; every other non-empty column becomes a string
/// attribute. Values are trimmed; quoting follows RFC 4180. `email` and
/// `phone` values that do not normalize are not used as identifiers. Errors
/// about a value carry its 1-based column number.
pub fn decode_csv(
    header: &[String],
    line: &str,
    rules: &IdentityRules,
) -> Result<Record, DecodeError> {
    decode_csv_as(header, line, rules, TimeUnit::Auto)
}

/// [`decode_csv`] with numeric `updated_at` values in `unit` (a source's
/// `time_unit`).
pub fn decode_csv_as(
    header: &[String],
    line: &str,
    rules: &IdentityRules,
    unit: TimeUnit,
) -> Result<Record, DecodeError> {
    let rec = read_csv_record(line)?.ok_or_else(|| DecodeError::new("empty CSV line"))?;
    if rec.len() != header.len() {
        return Err(DecodeError::new(format!(
            "expected {} columns (from the header), found {}",
            header.len(),
            rec.len()
        )));
    }
    let col = |name: &str| header.iter().position(|h| h == name);
    let ci = col("crm_id").ok_or_else(|| missing("crm_id"))?;
    let crm_id = normalize_id(&rec[ci]).ok_or_else(|| {
        DecodeError::at(
            format!(
                "field `crm_id` (column {}): expected a non-empty value",
                ci + 1
            ),
            ci + 1,
        )
    })?;
    let ti = col("updated_at").ok_or_else(|| missing("updated_at"))?;
    let updated_ms = parse_time_str_as(&rec[ti], unit).map_err(|e| {
        DecodeError::at(
            format!("field `updated_at` (column {}): {e}", ti + 1),
            ti + 1,
        )
    })?;
    let deleted = match col("deleted") {
        None => false,
        Some(di) => parse_bool(&rec[di]).ok_or_else(|| {
            DecodeError::at(
                format!(
                    "field `deleted` (column {}): expected true/false, 1/0 or yes/no, found {:?}",
                    di + 1,
                    &rec[di]
                ),
                di + 1,
            )
        })?,
    };
    let mut ids = vec![crm_ident(rules, &crm_id)];
    let mut attributes = Vec::new();
    for (name, value) in header.iter().zip(rec.iter()) {
        match name.as_str() {
            "crm_id" | "updated_at" | "deleted" => {}
            "email" | "phone" => ids.extend(rules.make(name, value)),
            _ if !value.is_empty() => {
                attributes.push((name.clone(), Scalar::Str(value.to_string())))
            }
            _ => {}
        }
    }
    ids.sort();
    ids.dedup();
    attributes.sort();
    let record = Record::Crm(CrmRecord {
        crm_id,
        updated_ms,
        deleted,
        ids,
        attributes,
    });
    check_identifiers(&record)?;
    Ok(record)
}

// ---------------------------------------------------------------------------
// Fast path
//
// `decode_json` first tries a decoder that reads the line straight into the
// record: strings are borrowed from the line until they are stored, nested
// arrays and objects that end up as JSON text are built as `Value`s by the
// same deserializer (so their text, duplicate-key handling and nesting limit
// are those of the Value-based decoder), and no intermediate `Value` tree of
// the whole line is built. It gives up (returns `None`) on anything unusual:
// invalid JSON, a wrong type, a missing field, a value that does not parse,
// no identifier, an identity rule naming a known field. The Value-based
// decoder above then decides, so errors and their messages are exactly its
// own. When the fast path succeeds, its record is the one the Value-based
// decoder would build: every rule above is mirrored here, including "a
// duplicate key keeps its last value" and "null counts as missing".
// ---------------------------------------------------------------------------

mod fast {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::value::SeqAccessDeserializer;
    use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::{Number, Value};

    use super::{
        add_qty, amount_str, amount_value, crm_ident, deleted_number, is_integer_literal,
        normalize_id, parse_bool, qty_number, qty_str, CrmRecord, Fields, Ident, IdentityRules,
        Keep, Projection, Record, RecordKind, Scalar, Transaction, WebEvent,
    };
    use crate::time::parse::{parse_time_number_text_as, parse_time_str_as, TimeUnit};

    // `NUMBER_TOKEN`: the key under which serde_json's `arbitrary_precision`
    // (and `Line`) hand a number to `visit_map` (its `Value` visitor
    // recognizes the same key; a JSON object with this key is read as a
    // number by both, and the fast path gives up on it anywhere else).
    use crate::model::json::{Line, NUMBER_TOKEN};

    /// Identifier fields handled by the fast path (longer priority lists use
    /// the Value-based decoder).
    const MAX_IDS: usize = 16;

    /// The error that makes the fast path give up; its text is never shown.
    fn give_up<E: de::Error>() -> E {
        E::custom("fast path: fall back")
    }

    /// A JSON value whose strings borrow from the line where possible.
    /// A number is its literal text (serde_json has checked its grammar),
    /// as `Number::as_str` would give it (serde_json hands it over as its
    /// own `String`). Arrays and objects are only ever
    /// needed as JSON text, via `Value`.
    enum Val<'a> {
        Null,
        Bool(bool),
        Num(Cow<'a, str>),
        Str(Cow<'a, str>),
        Tree(Value),
    }

    impl Val<'_> {
        /// Same as `Scalar::from_json` of the corresponding `Value`; gives
        /// up where it fails.
        fn into_scalar<E: de::Error>(self) -> Result<Scalar, E> {
            Ok(match self {
                Val::Null => Scalar::Null,
                Val::Bool(b) => Scalar::Bool(b),
                Val::Num(n) => Scalar::from_number_text(&n).map_err(|_| give_up())?,
                Val::Str(s) => Scalar::Str(s.into_owned()),
                Val::Tree(v) => Scalar::Str(v.to_string()),
            })
        }
    }

    struct ValVisitor;

    impl<'de> Visitor<'de> for ValVisitor {
        type Value = Val<'de>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Val<'de>, E> {
            Ok(Val::Null)
        }
        fn visit_none<E: de::Error>(self) -> Result<Val<'de>, E> {
            Ok(Val::Null)
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<Val<'de>, E> {
            Ok(Val::Bool(b))
        }
        // The conversions of serde_json's `Value` visitor.
        fn visit_i64<E: de::Error>(self, i: i64) -> Result<Val<'de>, E> {
            Ok(Val::Num(Cow::Owned(i.to_string())))
        }
        fn visit_u64<E: de::Error>(self, u: u64) -> Result<Val<'de>, E> {
            Ok(Val::Num(Cow::Owned(u.to_string())))
        }
        fn visit_f64<E: de::Error>(self, f: f64) -> Result<Val<'de>, E> {
            Ok(Number::from_f64(f).map_or(Val::Null, |n| Val::Num(Cow::Owned(n.to_string()))))
        }
        fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Val<'de>, E> {
            Ok(Val::Str(Cow::Borrowed(s)))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Val<'de>, E> {
            Ok(Val::Str(Cow::Owned(s.to_owned())))
        }
        fn visit_string<E: de::Error>(self, s: String) -> Result<Val<'de>, E> {
            Ok(Val::Str(Cow::Owned(s)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Val<'de>, A::Error> {
            Value::deserialize(SeqAccessDeserializer::new(seq)).map(Val::Tree)
        }
        /// An object, or a number (`arbitrary_precision`): what
        /// serde_json's `Value` visitor does, with the first key read here.
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val<'de>, A::Error> {
            let Some(Key(first)) = map.next_key::<Key<'de>>()? else {
                return Ok(Val::Tree(Value::Object(Default::default())));
            };
            if first == NUMBER_TOKEN {
                // serde_json hands over the literal as it read (and checked)
                // it; keeping the text spares parsing it into a `Number`
                // again (and a second allocation).
                return Ok(Val::Num(map.next_value::<Key<'de>>()?.0));
            }
            let mut object = serde_json::Map::new();
            object.insert(first.into_owned(), map.next_value::<Value>()?);
            while let Some((k, v)) = map.next_entry::<String, Value>()? {
                object.insert(k, v);
            }
            Ok(Val::Tree(Value::Object(object)))
        }
    }

    impl<'de> Deserialize<'de> for Val<'de> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ValVisitor)
        }
    }

    /// An object key, borrowed unless it has escapes.
    struct Key<'a>(Cow<'a, str>);

    struct KeyVisitor;

    impl<'de> Visitor<'de> for KeyVisitor {
        type Value = Key<'de>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string key")
        }
        fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Borrowed(s)))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Owned(s.to_owned())))
        }
        fn visit_string<E: de::Error>(self, s: String) -> Result<Key<'de>, E> {
            Ok(Key(Cow::Owned(s)))
        }
    }

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(KeyVisitor)
        }
    }

    /// A present (non-null) identifier value: a string without escapes or
    /// a number (nothing to drop). Any other value makes the fast path give
    /// up.
    enum IdVal<'a> {
        Str(&'a str),
        /// An integer literal's text.
        Num(String),
    }

    impl IdVal<'_> {
        /// The identifier for `field` (`IdentityRules::make` of the value's
        /// text: the string as is, a number's exact digits), given its rank.
        fn ident(&self, rules: &IdentityRules, rank: u8, field: &str) -> Option<Ident> {
            match self {
                IdVal::Str(s) => rules.make_ranked(rank, field, s),
                IdVal::Num(n) => rules.make_ranked(rank, field, n),
            }
        }
    }

    /// `Some` for a string or an integer number, `None` for null, give up
    /// otherwise.
    fn id_val<'a, E: de::Error>(v: &Val<'a>) -> Result<Option<IdVal<'a>>, E> {
        match v {
            Val::Null => Ok(None),
            Val::Str(Cow::Borrowed(s)) => Ok(Some(IdVal::Str(s))),
            Val::Num(n) if is_integer_literal(n) => Ok(Some(IdVal::Num(n.to_string()))),
            Val::Num(_) | Val::Str(Cow::Owned(_)) | Val::Bool(_) | Val::Tree(_) => Err(give_up()),
        }
    }

    /// Identifier values by position in `IdentityRules::priority` (the
    /// first position of a field listed twice).
    type IdSlots<'a> = [Option<IdVal<'a>>; MAX_IDS];

    /// `a == b`, mostly decided without a call to `memcmp`.
    #[inline]
    fn same(a: &str, b: &str) -> bool {
        a.len() == b.len() && a.as_bytes().first() == b.as_bytes().first() && a == b
    }

    fn id_slot(rules: &IdentityRules, key: &str) -> Option<usize> {
        rules.priority.iter().position(|f| same(f, key))
    }

    /// How a known top-level field is read.
    #[derive(Clone, Copy)]
    enum Shape {
        /// Any value.
        Plain,
        /// An object of fields (`item`, `attributes`).
        Obj,
        /// The web `context` object: fields, and identifier values.
        Ctx,
        /// The transaction `items` array of objects.
        Items,
    }

    /// A known top-level field's (non-null) value.
    enum Slot<'a> {
        Val(Val<'a>),
        Fields(Fields),
        /// The items and their total quantity.
        Items(Vec<Fields>, u64),
    }

    /// Reads an object into fields; for the context object, also keeps the
    /// identifier fields' values in `ids` (which start empty). Null is
    /// `None`; other types give up.
    struct ObjSeed<'r, 'a> {
        rules: &'r IdentityRules,
        ids: Option<&'r mut IdSlots<'a>>,
        /// The keys stored (identifier values are read whatever it says).
        keep: &'r Keep,
    }

    impl<'de> DeserializeSeed<'de> for ObjSeed<'_, 'de> {
        type Value = Option<Slot<'de>>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for ObjSeed<'_, 'de> {
        type Value = Option<Slot<'de>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Fields::new();
            let keep = self.keep;
            let Some(ids) = self.ids else {
                while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                    if k == NUMBER_TOKEN {
                        return Err(give_up());
                    }
                    if !keep.keeps(&k) {
                        map.next_value::<de::IgnoredAny>()?;
                        continue;
                    }
                    let v: Val<'de> = map.next_value()?;
                    fields.insert(k.into_owned(), v.into_scalar::<A::Error>()?);
                }
                return Ok(Some(Slot::Fields(fields)));
            };
            while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                if k == NUMBER_TOKEN {
                    return Err(give_up());
                }
                let slot = id_slot(self.rules, &k);
                if slot.is_none() && !keep.keeps(&k) {
                    map.next_value::<de::IgnoredAny>()?;
                    continue;
                }
                let v: Val<'de> = map.next_value()?;
                if let Some(i) = slot {
                    ids[i] = id_val(&v)?;
                }
                if keep.keeps(&k) {
                    fields.insert(k.into_owned(), v.into_scalar::<A::Error>()?);
                }
            }
            Ok(Some(Slot::Fields(fields)))
        }
    }

    /// Reads the transaction `items` array: each item's fields, and the sum
    /// of the items' `qty`. Null is `None`; anything unusual gives up.
    struct ItemsSeed {
        /// Whether the items' fields are stored (their `qty` is always read).
        keep: bool,
    }

    impl<'de> DeserializeSeed<'de> for ItemsSeed {
        type Value = Option<Slot<'de>>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for ItemsSeed {
        type Value = Option<Slot<'de>>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array or null")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            let mut count = 0u64;
            while let Some((fields, qty)) = seq.next_element_seed(ItemSeed { keep: self.keep })? {
                count = add_qty(count, qty).map_err(|_| give_up::<A::Error>())?;
                items.push(fields);
            }
            Ok(Some(Slot::Items(items, count)))
        }
    }

    /// One transaction item: its fields and its quantity (1 without `qty`).
    struct ItemSeed {
        keep: bool,
    }

    impl<'de> DeserializeSeed<'de> for ItemSeed {
        type Value = (Fields, u64);
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for ItemSeed {
        type Value = (Fields, u64);

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = Fields::new();
            // The last `qty` counts; `Err` when it is not a valid quantity.
            let mut qty: Result<u64, ()> = Ok(1);
            while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                if k == NUMBER_TOKEN {
                    return Err(give_up());
                }
                let v: Val<'de> = map.next_value()?;
                if k == "qty" {
                    qty = match &v {
                        Val::Null => Ok(1),
                        Val::Num(n) => qty_number(n).map_err(drop),
                        Val::Str(s) => qty_str(s).map_err(drop),
                        Val::Bool(_) | Val::Tree(_) => Err(()),
                    };
                }
                if self.keep || k == "qty" {
                    fields.insert(k.into_owned(), v.into_scalar::<A::Error>()?);
                }
            }
            let qty = qty.map_err(|()| give_up::<A::Error>())?;
            Ok((fields, qty))
        }
    }

    /// The top-level object: known fields by position in `known`,
    /// identifier fields by priority position, everything else as fields.
    struct Top<'a> {
        known: [Option<Slot<'a>>; 5],
        ids: IdSlots<'a>,
        /// The identifier values of the (last) `Shape::Ctx` object.
        ctx_ids: IdSlots<'a>,
        properties: Fields,
    }

    /// Reads the top-level object into `top` (which starts empty).
    struct TopVisitor<'r, 'a> {
        kind: RecordKind,
        rules: &'r IdentityRules,
        top: &'r mut Top<'a>,
        projection: &'r Projection,
    }

    impl<'de> Visitor<'de> for TopVisitor<'_, 'de> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let (rules, top, projection) = (self.rules, self.top, self.projection);
            // CRM records are kept whole (their attributes are stored).
            let crm = self.kind == RecordKind::Crm;
            while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                if k == NUMBER_TOKEN {
                    return Err(give_up());
                }
                if let Some((i, shape)) = known(self.kind, &k) {
                    top.known[i] = match shape {
                        Shape::Plain => match map.next_value::<Val<'de>>()? {
                            Val::Null => None,
                            v => Some(Slot::Val(v)),
                        },
                        Shape::Obj => map.next_value_seed(ObjSeed {
                            rules,
                            ids: None,
                            keep: if crm { &Keep::All } else { &projection.item },
                        })?,
                        Shape::Ctx => {
                            // The last `context` counts, even a null one.
                            top.ctx_ids = Default::default();
                            let ids = Some(&mut top.ctx_ids);
                            map.next_value_seed(ObjSeed {
                                rules,
                                ids,
                                keep: &projection.context,
                            })?
                        }
                        Shape::Items => map.next_value_seed(ItemsSeed {
                            keep: projection.items,
                        })?,
                    };
                } else if let Some(i) = id_slot(rules, &k) {
                    top.ids[i] = id_val(&map.next_value::<Val<'de>>()?)?;
                } else if !crm && !projection.properties.keeps(&k) {
                    map.next_value::<de::IgnoredAny>()?;
                } else {
                    let v: Val<'de> = map.next_value()?;
                    top.properties
                        .insert(k.into_owned(), v.into_scalar::<A::Error>()?);
                }
            }
            Ok(())
        }
    }

    /// The known top-level fields of each kind: their index in
    /// `Top::known` and how they are read.
    fn known(kind: RecordKind, key: &str) -> Option<(usize, Shape)> {
        use Shape::*;
        Some(match kind {
            RecordKind::Web => match key {
                "event" => (0, Plain),
                "ts" => (1, Plain),
                "item" => (2, Obj),
                "context" => (3, Ctx),
                _ => return None,
            },
            RecordKind::Crm => match key {
                "crm_id" => (0, Plain),
                "updated_at" => (1, Plain),
                "deleted" => (2, Plain),
                "attributes" => (3, Obj),
                _ => return None,
            },
            RecordKind::Transactions => match key {
                "order_id" => (0, Plain),
                "ts" => (1, Plain),
                "amount" => (2, Plain),
                "currency" => (3, Plain),
                "items" => (4, Items),
                _ => return None,
            },
        })
    }

    /// Decodes `line`, or `None` to let the Value-based decoder decide.
    pub(super) fn decode(
        kind: RecordKind,
        line: &str,
        rules: &IdentityRules,
        unit: TimeUnit,
        projection: &Projection,
    ) -> Option<Record> {
        // A known field that is also an identifier field is read both ways by
        // the Value-based decoder (except the CRM `crm_id`, which it leaves
        // out of the identifier fields); leave such rules to it.
        if rules.priority.len() > MAX_IDS
            || rules
                .priority
                .iter()
                .any(|f| known(kind, f).is_some() && !(kind == RecordKind::Crm && f == "crm_id"))
        {
            return None;
        }
        let new_top = || Top {
            known: Default::default(),
            ids: Default::default(),
            ctx_ids: Default::default(),
            properties: Fields::new(),
        };
        // First the allocation-free reader, then serde_json for what it
        // leaves (escapes, errors): the same visitors, so the same record.
        let mut top = new_top();
        let mut reader = Line::new(line);
        let read = (&mut reader)
            .deserialize_map(TopVisitor {
                kind,
                rules,
                top: &mut top,
                projection,
            })
            .is_ok()
            && reader.end().is_ok();
        if !read {
            top = new_top();
            let mut de = serde_json::Deserializer::from_str(line);
            (&mut de)
                .deserialize_map(TopVisitor {
                    kind,
                    rules,
                    top: &mut top,
                    projection,
                })
                .ok()?;
            de.end().ok()?;
        }
        match kind {
            RecordKind::Web => web(&mut top, rules, unit).map(Record::Web),
            RecordKind::Crm => crm(&mut top, rules, unit).map(Record::Crm),
            RecordKind::Transactions => txn(&mut top, rules, unit).map(Record::Txn),
        }
    }

    /// `req_string`: a non-empty string after trimming, trimmed.
    fn string(slot: Option<Slot>) -> Option<String> {
        match slot? {
            Slot::Val(Val::Str(s)) => {
                let t = s.trim();
                (!t.is_empty()).then(|| t.to_string())
            }
            _ => None,
        }
    }

    /// `req_id`: a string (normalized) or an integer number (its digits).
    fn id(slot: Option<Slot>) -> Option<String> {
        match slot? {
            Slot::Val(Val::Str(s)) => normalize_id(&s),
            Slot::Val(Val::Num(n)) if is_integer_literal(&n) => Some(n.into_owned()),
            _ => None,
        }
    }

    /// `req_time`.
    fn time(slot: Option<Slot>, unit: TimeUnit) -> Option<i64> {
        match slot? {
            Slot::Val(Val::Num(n)) => parse_time_number_text_as(&n, unit).ok(),
            Slot::Val(Val::Str(s)) => parse_time_str_as(&s, unit).ok(),
            _ => None,
        }
    }

    /// `opt_fields` of an object read with `ObjSeed { ctx: false }`.
    fn fields(slot: Option<Slot>) -> Fields {
        match slot {
            Some(Slot::Fields(f)) => f,
            _ => Fields::new(),
        }
    }

    /// `collect_ids`: a field's top-level value, else its context value;
    /// values that do not normalize are left out.
    fn collect_ids(
        rules: &IdentityRules,
        top: &IdSlots,
        ctx: Option<&IdSlots>,
        ids: &mut Vec<Ident>,
    ) {
        // A field's values are in the slot of its first position, which is
        // its rank (`MAX_IDS` < 255); the position of a field listed twice
        // would only add the same identifier again.
        for (i, field) in rules.priority.iter().enumerate() {
            let value = match (&top[i], ctx.and_then(|c| c[i].as_ref())) {
                (Some(v), _) => v,
                (None, Some(v)) => v,
                (None, None) => continue,
            };
            ids.extend(value.ident(rules, i as u8, field));
        }
        ids.sort();
        ids.dedup();
    }

    fn web(top: &mut Top, rules: &IdentityRules, unit: TimeUnit) -> Option<WebEvent> {
        let event = string(top.known[0].take())?;
        let ts_ms = time(top.known[1].take(), unit)?;
        let item = fields(top.known[2].take());
        let (context, ctx_ids) = match top.known[3].take() {
            Some(Slot::Fields(f)) => (f, Some(&top.ctx_ids)),
            _ => (Fields::new(), None),
        };
        let mut ids = Vec::new();
        collect_ids(rules, &top.ids, ctx_ids, &mut ids);
        if ids.is_empty() {
            return None;
        }
        Some(WebEvent {
            ts_ms,
            event,
            ids,
            item,
            context,
            properties: std::mem::take(&mut top.properties),
        })
    }

    fn crm(top: &mut Top, rules: &IdentityRules, unit: TimeUnit) -> Option<CrmRecord> {
        let crm_id = id(top.known[0].take())?;
        let updated_ms = time(top.known[1].take(), unit)?;
        let deleted = match top.known[2].take() {
            None => false,
            Some(Slot::Val(Val::Bool(b))) => b,
            Some(Slot::Val(Val::Num(n))) => deleted_number(&n)?,
            Some(Slot::Val(Val::Str(s))) => parse_bool(&s)?,
            Some(_) => return None,
        };
        let mut ids = vec![crm_ident(rules, &crm_id)];
        collect_ids(rules, &top.ids, None, &mut ids);
        let mut attrs = std::mem::take(&mut top.properties);
        attrs.extend(fields(top.known[3].take()));
        Some(CrmRecord {
            crm_id,
            updated_ms,
            deleted,
            ids,
            attributes: attrs.into_iter().collect(),
        })
    }

    fn txn(top: &mut Top, rules: &IdentityRules, unit: TimeUnit) -> Option<Transaction> {
        let order_id = id(top.known[0].take())?;
        let ts_ms = time(top.known[1].take(), unit)?;
        let amount = match top.known[2].take()? {
            Slot::Val(Val::Num(n)) => amount_value(&n).ok()?,
            Slot::Val(Val::Str(s)) => amount_str(&s).ok()?,
            _ => return None,
        };
        let currency = match top.known[3].take() {
            None => None,
            Some(Slot::Val(Val::Str(s))) => {
                Some(s.trim().to_ascii_uppercase()).filter(|c| !c.is_empty())
            }
            Some(_) => return None,
        };
        let (items, count) = match top.known[4].take() {
            None => (Vec::new(), 0),
            Some(Slot::Items(items, count)) => (items, count),
            Some(_) => return None,
        };
        let mut ids = Vec::new();
        collect_ids(rules, &top.ids, None, &mut ids);
        if ids.is_empty() {
            return None;
        }
        Some(Transaction {
            ts_ms,
            order_id,
            ids,
            amount,
            currency,
            item_count: count,
            items,
            properties: std::mem::take(&mut top.properties),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: i64 = 1_772_366_400_000; // 2026-03-01T12:00:00Z

    fn rules() -> IdentityRules {
        IdentityRules::new(
            [
                "crm_id",
                "user_id",
                "email",
                "phone",
                "anonymous_id",
                "device_id",
            ]
            .map(String::from)
            .to_vec(),
            "US".into(),
        )
    }

    fn p(path: &str) -> Vec<String> {
        path.split('.').map(String::from).collect()
    }

    fn values(ids: &[Ident]) -> Vec<&str> {
        ids.iter().map(|i| i.as_str()).collect()
    }

    fn web(line: &str) -> Result<WebEvent, DecodeError> {
        match decode_json(RecordKind::Web, line, &rules())? {
            Record::Web(w) => Ok(w),
            other => panic!("not web: {other:?}"),
        }
    }

    fn crm(line: &str) -> Result<CrmRecord, DecodeError> {
        match decode_json(RecordKind::Crm, line, &rules())? {
            Record::Crm(c) => Ok(c),
            other => panic!("not crm: {other:?}"),
        }
    }

    fn txn(line: &str) -> Result<Transaction, DecodeError> {
        match decode_json(RecordKind::Transactions, line, &rules())? {
            Record::Txn(t) => Ok(t),
            other => panic!("not txn: {other:?}"),
        }
    }

    fn reason<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn web_event_decodes() {
        let w = web(r#"{"event":"view_item","ts":"2026-03-01T12:00:00Z","anonymous_id":"a-1","user_id":42,
            "email":"  Bob@Example.COM ","phone":"(415) 555-2671",
            "item":{"id":"sku-1","price":19.99,"category":"shoes","brand":"acme"},
            "context":{"session_id":"s1","device":"mobile","country":"US","referrer":null,"page":"/p/1","device_id":"d-9"},
            "campaign":"spring","ab":{"x":1}}"#)
        .unwrap();
        assert_eq!(w.ts_ms, NOON);
        assert_eq!(w.event, "view_item");
        assert_eq!(
            values(&w.ids),
            [
                "user:42",
                "email:bob@example.com",
                "phone:+14155552671",
                "anon:a-1",
                "device_id:d-9"
            ]
        );
        assert_eq!(
            w.ids.iter().map(|i| i.rank).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(w.item["price"], Scalar::Num(19.99));
        assert_eq!(w.context["device"], Scalar::Str("mobile".into()));
        assert_eq!(w.context["referrer"], Scalar::Null);
        assert_eq!(w.properties.keys().collect::<Vec<_>>(), ["ab", "campaign"]);
        assert_eq!(w.properties["ab"], Scalar::Str(r#"{"x":1}"#.into()));

        let rec = Record::Web(w.clone());
        assert_eq!(rec.ts_ms(), NOON);
        assert_eq!(rec.ids(), &w.ids[..]);
    }

    #[test]
    fn web_field_lookup() {
        let w = web(
            r#"{"event":"add_to_cart","ts":1772366400,"email":"Bob@X.com","anonymous_id":"a1",
            "item":{"price":5,"category":"hats"},"context":{"device":"desktop"},"coupon":"X1"}"#,
        )
        .unwrap();
        assert_eq!(w.field(&p("event")), Scalar::Str("add_to_cart".into()));
        assert_eq!(w.field(&p("ts")), Scalar::Num(NOON as f64));
        assert_eq!(w.field(&p("item.price")), Scalar::Num(5.0));
        assert_eq!(w.field(&p("item.category")), Scalar::Str("hats".into()));
        assert_eq!(w.field(&p("context.device")), Scalar::Str("desktop".into()));
        assert_eq!(w.field(&p("properties.coupon")), Scalar::Str("X1".into()));
        assert_eq!(w.field(&p("coupon")), Scalar::Str("X1".into()));
        assert_eq!(w.field(&p("email")), Scalar::Str("bob@x.com".into()));
        assert_eq!(w.field(&p("anonymous_id")), Scalar::Str("a1".into()));
        assert_eq!(w.field(&p("anon")), Scalar::Str("a1".into()));
        assert_eq!(w.field(&p("user_id")), Scalar::Null);
        assert_eq!(w.field(&p("item.brand")), Scalar::Null);
        assert_eq!(w.field(&p("nope.x")), Scalar::Null);
        assert_eq!(w.field(&p("item.a.b")), Scalar::Null);
        assert_eq!(w.field(&[]), Scalar::Null);
    }

    #[test]
    fn invalid_email_is_not_an_identifier() {
        let w = web(r#"{"event":"e","ts":1,"email":"n/a","anonymous_id":"a1"}"#).unwrap();
        assert_eq!(values(&w.ids), ["anon:a1"]);
        assert!(w.properties.is_empty());
        let e = reason(web(
            r#"{"event":"e","ts":1,"email":"n/a","phone":"call me"}"#,
        ));
        assert_eq!(
            e,
            "no identifier: expected one of crm_id, user_id, email, phone, anonymous_id, device_id \
             (ignored values that do not normalize: email \"n/a\", phone \"call me\")"
        );
    }

    /// An identifier with a control character would be a key that reaches
    /// into another profile's state; it is rejected, whichever decoder
    /// reads it and whatever field carries it.
    #[test]
    fn identifiers_with_control_characters_are_rejected() {
        let rules = rules();
        let web = decode_json(
            RecordKind::Web,
            r#"{"event":"v","ts":1,"user_id":"victim\u0000x","anonymous_id":"a"}"#,
            &rules,
        );
        assert_eq!(
            reason(web),
            r#"identifier "user:victim\0x" contains the control character U+0000 at byte 11"#
        );
        let crm = decode_json(
            RecordKind::Crm,
            r#"{"crm_id":"C\u001f1","updated_at":1}"#,
            &rules,
        );
        assert_eq!(
            reason(crm),
            r#"identifier "crm:C\u{1f}1" contains the control character U+001F at byte 5"#
        );
        let header: Vec<String> = ["crm_id", "updated_at"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let csv = decode_csv(&header, "C\u{7}2,1772366400", &rules);
        assert_eq!(
            reason(csv),
            r#"identifier "crm:C\u{7}2" contains the control character U+0007 at byte 5"#
        );
        // Tabs and newlines inside the value are control characters too;
        // surrounding whitespace is trimmed before.
        assert!(decode_json(
            RecordKind::Web,
            r#"{"event":"v","ts":1,"anonymous_id":" a\tb "}"#,
            &rules
        )
        .is_err());
        assert!(decode_json(
            RecordKind::Web,
            r#"{"event":"v","ts":1,"anonymous_id":" ab\t"}"#,
            &rules
        )
        .is_ok());
    }

    #[test]
    fn web_errors() {
        let e = web(r#"{"event":"x" "ts":1}"#).unwrap_err();
        assert_eq!(e.reason, "invalid JSON at column 14: expected `,` or `}`");
        assert_eq!(e.column, Some(14));
        let e = web(r#"{"event":"view","ts":1,"#).unwrap_err();
        assert!(
            e.reason.starts_with("invalid JSON at column"),
            "{}",
            e.reason
        );
        assert_eq!(reason(web("[1,2]")), "expected a JSON object, found array");
        assert_eq!(reason(web("\"x\"")), "expected a JSON object, found string");
        assert_eq!(
            reason(web(r#"{"event":"v","anonymous_id":"a"}"#)),
            "missing field `ts`"
        );
        assert_eq!(
            reason(web(r#"{"ts":1,"anonymous_id":"a"}"#)),
            "missing field `event`"
        );
        assert_eq!(
            reason(web(r#"{"event":null,"ts":1,"anonymous_id":"a"}"#)),
            "missing field `event`"
        );
        assert_eq!(
            reason(web(r#"{"event":5,"ts":1,"anonymous_id":"a"}"#)),
            "field `event`: expected a string, found number"
        );
        assert_eq!(
            reason(web(r#"{"event":" ","ts":1,"anonymous_id":"a"}"#)),
            "field `event`: expected a non-empty string, found an empty string"
        );
        assert_eq!(
            reason(web(r#"{"event":"v","ts":"yesterday","anonymous_id":"a"}"#)),
            "field `ts`: unparsable timestamp \"yesterday\": expected RFC 3339 with offset, or epoch seconds, milliseconds, microseconds or nanoseconds"
        );
        let e = reason(web(
            r#"{"event":"v","ts":"2026-03-01T12:00:00","anonymous_id":"a"}"#,
        ));
        assert!(
            e.starts_with("field `ts`: timestamp \"2026-03-01T12:00:00\" has no UTC offset"),
            "{e}"
        );
        assert_eq!(
            reason(web(r#"{"event":"v","ts":1}"#)),
            "no identifier: expected one of crm_id, user_id, email, phone, anonymous_id, device_id"
        );
        assert_eq!(
            reason(web(r#"{"event":"v","ts":1,"user_id":true}"#)),
            "field `user_id`: expected a string, found boolean"
        );
        assert_eq!(
            reason(web(r#"{"event":"v","ts":1,"context":{"device_id":[1]}}"#)),
            "field `context.device_id`: expected a string, found array"
        );
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","item":"sku"}"#
            )),
            "field `item`: expected an object, found string"
        );
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","context":3}"#
            )),
            "field `context`: expected an object, found number"
        );
    }

    #[test]
    fn crm_decodes() {
        let c = crm(r#"{"crm_id":" C1 ","email":"  Bob@Example.COM ","phone":"+44 20 7946 0958",
            "updated_at":"2026-03-01T14:00:00+02:00","attributes":{"tier":"gold","ltv":120.5,"vip":true},
            "city":"Berlin","tier":"silver"}"#)
        .unwrap();
        assert_eq!(c.crm_id, "C1");
        assert_eq!(c.updated_ms, NOON);
        assert!(!c.deleted);
        assert_eq!(
            values(&c.ids),
            ["crm:C1", "email:bob@example.com", "phone:+442079460958"]
        );
        assert_eq!(
            c.attributes,
            vec![
                ("city".to_string(), Scalar::Str("Berlin".into())),
                ("ltv".to_string(), Scalar::Num(120.5)),
                ("tier".to_string(), Scalar::Str("gold".into())),
                ("vip".to_string(), Scalar::Bool(true)),
            ]
        );
        let mut rec = Record::Crm(c);
        assert_eq!(rec.ts_ms(), NOON);
        rec.set_ts_ms(5);
        assert_eq!(rec.ts_ms(), 5);

        let c = crm(r#"{"crm_id":17,"updated_at":1772366400000,"deleted":true,"email":"bad"}"#)
            .unwrap();
        assert_eq!(c.crm_id, "17");
        assert!(c.deleted);
        assert_eq!(values(&c.ids), ["crm:17"]);
        assert!(c.attributes.is_empty());
        assert!(
            crm(r#"{"crm_id":"C","updated_at":1,"deleted":"yes"}"#)
                .unwrap()
                .deleted
        );
    }

    #[test]
    fn crm_without_crm_in_priority_still_has_crm_ident() {
        let r = IdentityRules::new(vec!["email".into()], "US".into());
        let Record::Crm(c) = decode_json(
            RecordKind::Crm,
            r#"{"crm_id":"C1","updated_at":1,"email":"a@b.c"}"#,
            &r,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.ids,
            vec![
                Ident {
                    rank: 0,
                    value: "email:a@b.c".into()
                },
                Ident {
                    rank: 1,
                    value: "crm:C1".into()
                },
            ]
        );
    }

    #[test]
    fn crm_errors() {
        assert_eq!(reason(crm(r#"{"updated_at":1}"#)), "missing field `crm_id`");
        assert_eq!(
            reason(crm(r#"{"crm_id":"C1"}"#)),
            "missing field `updated_at`"
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":"","updated_at":1}"#)),
            "field `crm_id`: expected a non-empty string, found an empty string"
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":[],"updated_at":1}"#)),
            "field `crm_id`: expected a string, found array"
        );
        assert!(reason(crm(r#"{"crm_id":"C","updated_at":"soon"}"#))
            .starts_with("field `updated_at`: unparsable timestamp \"soon\""));
        assert_eq!(
            reason(crm(r#"{"crm_id":"C","updated_at":1,"deleted":"maybe"}"#)),
            "field `deleted`: expected true/false, 1/0 or yes/no, found \"maybe\""
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":"C","updated_at":1,"deleted":{}}"#)),
            "field `deleted`: expected a boolean, found object"
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":"C","updated_at":1,"attributes":[1]}"#)),
            "field `attributes`: expected an object, found array"
        );
    }

    #[test]
    fn transaction_decodes() {
        let t = txn(r#"{"order_id":"O-1","ts":"2026-03-01T12:00:00.5Z","crm_id":"C1","email":"Bob@X.com ",
            "amount":"59.90","currency":" eur ","items":[{"id":"a","qty":2,"price":10,"category":"shoes"},
            {"id":"b","price":39.9},{"id":"c","qty":"3"}],"channel":"web"}"#)
        .unwrap();
        assert_eq!(t.ts_ms, NOON + 500);
        assert_eq!(t.order_id, "O-1");
        assert_eq!(values(&t.ids), ["crm:C1", "email:bob@x.com"]);
        assert_eq!(t.amount, 59.9);
        assert_eq!(t.currency.as_deref(), Some("EUR"));
        assert_eq!(t.item_count, 6);
        assert_eq!(t.items.len(), 3);
        assert_eq!(t.items[0]["category"], Scalar::Str("shoes".into()));
        assert_eq!(t.properties["channel"], Scalar::Str("web".into()));

        assert_eq!(t.field(&p("amount")), Scalar::Num(59.9));
        assert_eq!(t.field(&p("currency")), Scalar::Str("EUR".into()));
        assert_eq!(t.field(&p("order_id")), Scalar::Str("O-1".into()));
        assert_eq!(t.field(&p("item_count")), Scalar::Num(6.0));
        assert_eq!(t.field(&p("properties.channel")), Scalar::Str("web".into()));
        assert_eq!(t.field(&p("channel")), Scalar::Str("web".into()));
        assert_eq!(t.field(&p("crm_id")), Scalar::Str("C1".into()));
        assert_eq!(t.field(&p("email")), Scalar::Str("bob@x.com".into()));
        assert_eq!(t.field(&p("user_id")), Scalar::Null);
        assert_eq!(t.field(&p("properties.nope")), Scalar::Null);

        let t = txn(r#"{"order_id":99,"ts":1772366400,"user_id":"u1","amount":10}"#).unwrap();
        assert_eq!(
            (
                t.order_id.as_str(),
                t.amount,
                t.item_count,
                t.currency.clone()
            ),
            ("99", 10.0, 0, None)
        );
        assert_eq!(t.field(&p("currency")), Scalar::Null);
    }

    #[test]
    fn transaction_errors() {
        assert_eq!(
            reason(txn(r#"{"ts":1,"user_id":"u","amount":1}"#)),
            "missing field `order_id`"
        );
        assert_eq!(
            reason(txn(r#"{"order_id":"o","user_id":"u","amount":1}"#)),
            "missing field `ts`"
        );
        assert_eq!(
            reason(txn(r#"{"order_id":"o","ts":1,"user_id":"u"}"#)),
            "missing field `amount`"
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":"ten"}"#
            )),
            "field `amount`: expected a number, found string \"ten\""
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":true}"#
            )),
            "field `amount`: expected a number, found boolean"
        );
        assert_eq!(
            reason(txn(r#"{"order_id":"o","ts":1,"amount":1}"#)),
            "no identifier: expected one of crm_id, user_id, email, phone, anonymous_id, device_id"
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":{}}"#
            )),
            "field `items`: expected an array, found object"
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{},5]}"#
            )),
            "field `items[1]`: expected an object, found number"
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":"x"}]}"#
            )),
            "field `items[0].qty`: expected a number, found string \"x\""
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"currency":5}"#
            )),
            "field `currency`: expected a string, found number"
        );
    }

    #[test]
    fn csv_header() {
        let h =
            parse_csv_header("\u{feff}crm_id, email ,phone,updated_at,deleted,\"first name\",tier")
                .unwrap();
        assert_eq!(
            h,
            [
                "crm_id",
                "email",
                "phone",
                "updated_at",
                "deleted",
                "first name",
                "tier"
            ]
        );
        let e = parse_csv_header("crm_id,email,,tier").unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.column),
            ("empty column name at column 3", Some(3))
        );
        let e = parse_csv_header("crm_id,email,tier, email").unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.column),
            ("duplicate column name `email` at columns 2 and 4", Some(4))
        );
        assert_eq!(
            parse_csv_header("").unwrap_err().reason,
            "empty CSV header: expected column names"
        );
    }

    #[test]
    fn csv_rows() {
        let r = rules();
        let h =
            parse_csv_header("crm_id,email,phone,updated_at,deleted,first name,tier,note").unwrap();
        let rec = decode_csv(
            &h,
            r#" C7 ,"  Bob@Example.COM ","(415) 555-2671",2026-03-01T12:00:00Z,no,"Smith, Bob",gold,"said ""hi""""#,
            &r,
        )
        .unwrap();
        let Record::Crm(c) = rec else { panic!() };
        assert_eq!(c.crm_id, "C7");
        assert_eq!(c.updated_ms, NOON);
        assert!(!c.deleted);
        assert_eq!(
            values(&c.ids),
            ["crm:C7", "email:bob@example.com", "phone:+14155552671"]
        );
        assert_eq!(
            c.attributes,
            vec![
                ("first name".to_string(), Scalar::Str("Smith, Bob".into())),
                ("note".to_string(), Scalar::Str("said \"hi\"".into())),
                ("tier".to_string(), Scalar::Str("gold".into())),
            ]
        );

        // empty optional columns, epoch-seconds time, deleted flag, bad email dropped
        let Record::Crm(c) = decode_csv(&h, "C8,not-an-email,,1772366400,YES,,,", &r).unwrap()
        else {
            panic!()
        };
        assert!(c.deleted);
        assert_eq!(c.updated_ms, NOON);
        assert_eq!(values(&c.ids), ["crm:C8"]);
        assert!(c.attributes.is_empty());
        let Record::Crm(c) = decode_csv(&h, "C9,,,1772366400000,1,,,", &r).unwrap() else {
            panic!()
        };
        assert!(c.deleted);
    }

    #[test]
    fn csv_errors() {
        let r = rules();
        let h = parse_csv_header("crm_id,email,updated_at,deleted").unwrap();
        assert_eq!(
            decode_csv(&h, "C1,a@b.c,2026-03-01T12:00:00Z", &r)
                .unwrap_err()
                .reason,
            "expected 4 columns (from the header), found 3"
        );
        let e = decode_csv(&h, " ,a@b.c,2026-03-01T12:00:00Z,", &r).unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.column),
            (
                "field `crm_id` (column 1): expected a non-empty value",
                Some(1)
            )
        );
        let e = decode_csv(&h, "C1,a@b.c,last week,", &r).unwrap_err();
        assert_eq!(e.column, Some(3));
        assert!(
            e.reason
                .starts_with("field `updated_at` (column 3): unparsable timestamp \"last week\""),
            "{}",
            e.reason
        );
        let e = decode_csv(&h, "C1,a@b.c,2026-03-01T12:00:00,", &r).unwrap_err();
        assert!(e.reason.contains("no UTC offset"), "{}", e.reason);
        let e = decode_csv(&h, "C1,a@b.c,1,maybe", &r).unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.column),
            (
                "field `deleted` (column 4): expected true/false, 1/0 or yes/no, found \"maybe\"",
                Some(4)
            )
        );
        let no_crm = parse_csv_header("email,updated_at").unwrap();
        assert_eq!(
            decode_csv(&no_crm, "a@b.c,1", &r).unwrap_err().reason,
            "missing field `crm_id`"
        );
        let no_time = parse_csv_header("crm_id,email").unwrap();
        assert_eq!(
            decode_csv(&no_time, "C1,a@b.c", &r).unwrap_err().reason,
            "missing field `updated_at`"
        );
        assert_eq!(decode_csv(&h, "", &r).unwrap_err().reason, "empty CSV line");
    }

    /// The fast path agrees with the Value-based decoder: same record when
    /// it decodes, and it never accepts a line the reference rejects.
    fn assert_fast_agrees(kind: RecordKind, line: &str, rules: &IdentityRules) -> bool {
        let slow = decode_json_value(kind, line, rules, TimeUnit::Auto, &Projection::ALL);
        match fast::decode(kind, line, rules, TimeUnit::Auto, &Projection::ALL) {
            Some(rec) => {
                assert_eq!(Ok(&rec), slow.as_ref(), "{kind:?} {line}");
                // Scalar::Num compares with total_cmp; compare the text too.
                assert_eq!(format!("{rec:?}"), format!("{:?}", slow.unwrap()), "{line}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn fast_path_matches_value_decoder() {
        let r = rules();
        let dup_rules = IdentityRules::new(
            ["email", "anonymous_id", "email", "device_id", "crm_id"]
                .map(String::from)
                .to_vec(),
            "US".into(),
        );
        let odd_rules = IdentityRules::new(
            ["ts", "anonymous_id", "amount", "deleted"]
                .map(String::from)
                .to_vec(),
            "US".into(),
        );
        let no_crm = IdentityRules::new(vec!["email".into(), "phone".into()], "DE".into());
        let lines = [
            r#"{"event":"a","event":"b","ts":1,"anonymous_id":"x"}"#,
            r#"{"event":"a","event":null,"ts":1,"anonymous_id":"x"}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","context":{"device_id":"d"},"context":null}"#,
            r#"{"event":"v","ts":1,"context":{"anonymous_id":"c","device_id":"d"},"user_id":null}"#,
            r#"{"event":"v","ts":1,"context":{"anonymous_id":"c"},"context":{"x":1}}"#,
            r#"{"event":"v","ts":1,"context":{"anonymous_id":"c","anonymous_id":null},"email":"a@b"}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","context":{"user_id":true}}"#,
            r#"{"event":"v","ts":1,"user_id":"u","context":{"user_id":true}}"#,
            r#"{"event":"v","ts":1,"user_id":true,"user_id":"u"}"#,
            r#"{"event":"v\u0041","ts":1,"anonymous_id":"a\"b","item":{"k\n":"\u00e9","k\n":2}}"#,
            r#"{"event":" v ","ts":1,"anonymous_id":"a","ab":{"z":[1,2.50,{"b":1,"a":null}],"a":"x"},"item":{"arr":[1e2,-0,"\u00e9"]},"n":null}"#,
            r#"{"event":"v","ts":1,"user_id":1.0,"anonymous_id":-5,"device_id":1e3}"#,
            r#"{"event":"v","ts":1,"user_id":18446744073709551615,"anonymous_id":18446744073709551616}"#,
            r#"{"event":"v","ts":1772366400.5,"anonymous_id":" a "}"#,
            r#"{"event":"v","ts":"1772366400","anonymous_id":"a"}"#,
            r#"{"event":"v","ts":" 2026-03-01T14:00:00.250+02:00 ","anonymous_id":"a"}"#,
            r#"{"event":"v","ts":-1e300,"anonymous_id":"a"}"#,
            r#"{"event":"v","ts":1,"email":"  BÖB@Example.COM ","phone":"+44 20 7946 0958"}"#,
            r#"{"event":"v","ts":1,"email":"ΑΣ@Χ.ΓΡ","anonymous_id":"\u0041"}"#,
            r#"{"event":"v","ts":1,"email":"n/a","anonymous_id":"a","item":null,"context":null}"#,
            r#"{"event":"v","ts":1,"email":"@x","phone":"nope"}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":"sku"}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a"} x"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a",}"#,
            r#" {"event":"v","ts":1,"anonymous_id":"a"} "#,
            r#"{"event":"v","ts":1,"anonymous_id":"\ud800"}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","deep":[[[[[[[[[[{"a":[]}]]]]]]]]]]}"#,
            r#"[1]"#,
            r#"{}"#,
            r#"{"crm_id":" C1 ","email":" Bob@X.com","phone":"(415) 555-2671","updated_at":"2026-03-01T14:00:00+02:00","attributes":{"tier":"gold","city":null},"city":"Berlin","tier":"silver","user_id":null}"#,
            r#"{"crm_id":17,"updated_at":1772366400000,"deleted":1,"email":"bad"}"#,
            r#"{"crm_id":17.5,"updated_at":1,"deleted":0.0,"crm_id":"C2"}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":" YES "}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":2}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":null,"attributes":null,"attributes":{"a":[1]}}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":false,"phone":"030 1234567"}"#,
            r#"{"order_id":"O-1","ts":"2026-03-01T12:00:00.5Z","crm_id":"C1","email":"Bob@X.com ","amount":"59.90","currency":" eur ","items":[{"id":"a","qty":2,"price":10},{"id":"b","price":39.9},{"id":"c","qty":"3","qty":null}],"channel":"web"}"#,
            r#"{"order_id":99,"ts":1772366400,"user_id":"u1","amount":10,"currency":"  ","items":null}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1e400}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":" inf "}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":"x","qty":1.5},{"qty":-7}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":"x"}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":[1]}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[5]}"#,
            r#"{"order_id":"o","ts":1,"amount":1}"#,
            // Numbers read exactly (see "## Numbers" in the module docs).
            r#"{"event":"v","ts":1,"user_id":18446744073709551616,"anonymous_id":18446744073709551617}"#,
            r#"{"event":"v","ts":1,"user_id":"18446744073709551616","phone":-0}"#,
            r#"{"event":"v","ts":1,"user_id":1.5,"anonymous_id":"a"}"#,
            r#"{"event":"v","ts":1,"user_id":1e3}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","context":{"user_id":1.0}}"#,
            r#"{"event":"v","ts":1,"user_id":"u","context":{"user_id":1.5,"n":12345678901234567890}}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":{"id":18446744073709551617,"price":1e400}}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":{"id":18446744073709551617,"id2":18446744073709551616,"price":19.990},"big":-9007199254740993}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","tiny":1e-400}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","ab":{"x":[1.50,1e400,-0]},"z":0e-999}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":5}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":{"$serde_json::private::Number":"5"}}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","x":{"$serde_json::private::Number":"5"}}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","x":{"$serde_json::private::Number":"zz"}}"#,
            r#"{"event":"v","ts":1,"anonymous_id":"a","x":{"$serde_json::private::Number":"5","y":1}}"#,
            r#"{"$serde_json::private::Number":"5"}"#,
            r#"{"event":"v","ts":1e400,"anonymous_id":"a"}"#,
            r#"{"event":"v","ts":17723664000000000000000,"anonymous_id":"a"}"#,
            r#"{"crm_id":18446744073709551617,"updated_at":1,"deleted":1.0}"#,
            r#"{"crm_id":1e3,"updated_at":1}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":1.0000000000000000001}"#,
            r#"{"crm_id":"C","updated_at":1,"deleted":-0}"#,
            r#"{"crm_id":"C","updated_at":1,"attributes":{"ltv":1e400}}"#,
            r#"{"crm_id":"C","updated_at":1,"attributes":{"n":12345678901234567890123,"m":0.1}}"#,
            r#"{"order_id":18446744073709551617,"ts":1,"user_id":"u","amount":999999999999.999}"#,
            r#"{"order_id":1.5,"ts":1,"user_id":"u","amount":1}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":-999999999999.9990}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":999999999999.9991}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1000000000000}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":"1e400"}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":" 1e2 "}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1e-400}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":2.0},{"qty":"3"},{"qty":1e1}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":1.5}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":-1}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":9007199254740992}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":"9007199254740991"},{}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"qty":9007199254740991,"price":1e400}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{"$serde_json::private::Number":"1"}]}"#,
            r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[1]}"#,
        ];
        // Nesting at serde_json's limit (127 levels) and one past it, in
        // fields that are kept: the line is read, then rejected.
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let deep: Vec<String> = [125, 126]
            .into_iter()
            .flat_map(|n| {
                [
                    format!(
                        r#"{{"event":"v","ts":1,"anonymous_id":"a","item":{{"c":{}}}}}"#,
                        nested(n)
                    ),
                    format!(
                        r#"{{"crm_id":"C1","updated_at":1,"tier":"gold","x":{}}}"#,
                        nested(n + 1)
                    ),
                ]
            })
            .collect();
        for (line, reads) in deep.iter().zip([true, true, false, false]) {
            let kind = if line.contains("crm_id") {
                RecordKind::Crm
            } else {
                RecordKind::Web
            };
            assert_eq!(decode_json(kind, line, &r).is_ok(), reads, "{line}");
            assert_eq!(assert_fast_agrees(kind, line, &r), reads, "{line}");
        }
        let mut fast_ok = 0;
        for line in lines {
            for rules in [&r, &dup_rules, &odd_rules, &no_crm] {
                for kind in [RecordKind::Web, RecordKind::Crm, RecordKind::Transactions] {
                    fast_ok += assert_fast_agrees(kind, line, rules) as usize;
                }
            }
        }
        assert!(fast_ok > 40, "{fast_ok}");

        // Generated data, malformed lines included.
        let (mut w, mut c, mut t) = (Vec::new(), Vec::new(), Vec::new());
        let cfg = crate::generate::GenConfig {
            events: 3_000,
            seed: 7,
            malformed_every: 100,
            ..Default::default()
        };
        crate::generate::generate_to(&cfg, &mut w, &mut c, &mut t).unwrap();
        for (kind, bytes) in [
            (RecordKind::Web, &w),
            (RecordKind::Crm, &c),
            (RecordKind::Transactions, &t),
        ] {
            let (mut n, mut fast_ok) = (0, 0);
            for line in std::str::from_utf8(bytes).unwrap().lines() {
                n += 1;
                fast_ok += assert_fast_agrees(kind, line, &r) as usize;
            }
            assert!(n > 0 && fast_ok * 10 >= n * 9, "{kind:?}: {fast_ok} of {n}");
        }
    }

    fn web_ok(line: &str) -> WebEvent {
        web(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn numeric_identifiers_keep_their_exact_digits() {
        let a = web_ok(r#"{"event":"v","ts":1,"user_id":18446744073709551616}"#);
        let b = web_ok(r#"{"event":"v","ts":1,"user_id":18446744073709551617}"#);
        let c = web_ok(r#"{"event":"v","ts":1,"user_id":"18446744073709551616"}"#);
        let d = web_ok(r#"{"event":"v","ts":1,"user_id":" 18446744073709551616 "}"#);
        assert_eq!(values(&a.ids), ["user:18446744073709551616"]);
        assert_eq!(values(&b.ids), ["user:18446744073709551617"]);
        assert_eq!(a.ids, c.ids);
        assert_eq!(a.ids, d.ids);
        let long = "1".repeat(60);
        let e = web_ok(&format!(
            r#"{{"event":"v","ts":1,"anonymous_id":-{long},"context":{{"user_id":{long}}}}}"#
        ));
        assert_eq!(
            values(&e.ids),
            [format!("user:{long}"), format!("anon:-{long}")]
        );
        // The context keeps the same value as a scalar: its exact digits.
        assert_eq!(e.context["user_id"], Scalar::Str(long.clone()));

        let c = crm(r#"{"crm_id":18446744073709551617,"updated_at":1}"#).unwrap();
        assert_eq!(c.crm_id, "18446744073709551617");
        assert_eq!(values(&c.ids), ["crm:18446744073709551617"]);
        let t =
            txn(r#"{"order_id":9007199254740993,"ts":1,"user_id":9007199254740993,"amount":1}"#)
                .unwrap();
        assert_eq!(t.order_id, "9007199254740993");
        assert_eq!(values(&t.ids), ["user:9007199254740993"]);

        let must = |field: &str, n: &str| {
            format!(
                "field `{field}`: numeric identifier {n} must be written as an integer \
                 (digits only) or as a string"
            )
        };
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"user_id":1.5,"anonymous_id":"a"}"#
            )),
            must("user_id", "1.5")
        );
        assert_eq!(
            reason(web(r#"{"event":"v","ts":1,"anonymous_id":1.0}"#)),
            must("anonymous_id", "1.0")
        );
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","context":{"user_id":1e3}}"#
            )),
            must("context.user_id", "1e+3")
        );
        // A top-level value wins over the context's, which is then only a
        // field.
        let w = web_ok(r#"{"event":"v","ts":1,"user_id":"u","context":{"user_id":1e3}}"#);
        assert_eq!(values(&w.ids), ["user:u"]);
        assert_eq!(w.context["user_id"], Scalar::Num(1000.0));
        assert_eq!(
            reason(crm(r#"{"crm_id":17.5,"updated_at":1}"#)),
            must("crm_id", "17.5")
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":"C1","updated_at":1,"user_id":-2E+2}"#)),
            must("user_id", "-2e+2")
        );
        assert_eq!(
            reason(txn(r#"{"order_id":1e3,"ts":1,"user_id":"u","amount":1}"#)),
            must("order_id", "1e+3")
        );
    }

    #[test]
    fn fields_never_round_one_number_into_another() {
        let w = web_ok(
            r#"{"event":"v","ts":1,"anonymous_id":"a",
            "item":{"id":18446744073709551617,"id2":18446744073709551616,"price":19.990,"n":-9007199254740993},
            "ab":{"x":[1.50,1e400,-0,18446744073709551617]},"z":0e-999}"#,
        );
        assert_eq!(w.item["id"], Scalar::Str("18446744073709551617".into()));
        assert_eq!(w.item["id2"], Scalar::Num(18446744073709551616.0));
        assert_eq!(w.item["price"], Scalar::Num(19.99));
        assert_eq!(w.item["n"], Scalar::Str("-9007199254740993".into()));
        assert_eq!(
            w.properties["ab"],
            Scalar::Str(r#"{"x":[1.50,1e+400,-0,18446744073709551617]}"#.into())
        );
        assert_eq!(w.properties["z"], Scalar::Num(0.0));

        let out = |field: &str, n: &str| {
            format!("field `{field}`: {n} is out of range for a 64-bit float")
        };
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","item":{"price":1e400}}"#
            )),
            out("item.price", "1e+400")
        );
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","context":{"x":-1e400}}"#
            )),
            out("context.x", "-1e+400")
        );
        assert_eq!(
            reason(web(
                r#"{"event":"v","ts":1,"anonymous_id":"a","tiny":1e-400}"#
            )),
            out("tiny", "1e-400")
        );
        assert_eq!(
            reason(crm(
                r#"{"crm_id":"C","updated_at":1,"attributes":{"ltv":1e400}}"#
            )),
            out("attributes.ltv", "1e+400")
        );
        assert_eq!(
            reason(crm(r#"{"crm_id":"C","updated_at":1,"ltv":1e400}"#)),
            out("ltv", "1e+400")
        );
        assert_eq!(
            reason(txn(
                r#"{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":[{},{"price":1e400}]}"#
            )),
            out("items[1].price", "1e+400")
        );
    }

    #[test]
    fn amounts_are_bounded_so_thousandths_stay_exact() {
        let amount = |a: &str| {
            txn(&format!(
                r#"{{"order_id":"o","ts":1,"user_id":"u","amount":{a}}}"#
            ))
            .map(|t| t.amount)
        };
        assert_eq!(amount("999999999999.999"), Ok(999_999_999_999.999));
        assert_eq!(amount("-999999999999.9990"), Ok(-999_999_999_999.999));
        assert_eq!(amount(r#"" 1e2 ""#), Ok(100.0));
        assert_eq!(amount("0.0001"), Ok(0.0001));
        let out = |a: &str| {
            format!(
                "field `amount`: {a} is out of range (amounts must be within ±999999999999.999)"
            )
        };
        for (a, shown) in [
            ("999999999999.9991", "999999999999.9991"),
            ("1000000000000", "1000000000000"),
            ("-1E12", "-1e+12"),
            ("1e400", "1e+400"),
            ("18446744073709551617", "18446744073709551617"),
        ] {
            assert_eq!(reason(amount(a)), out(shown), "{a}");
        }
        assert_eq!(
            reason(amount("1e-400")),
            "field `amount`: 1e-400 is too close to zero for a 64-bit float (it would become 0)"
        );
        // A string is shown as written (trimmed).
        assert_eq!(reason(amount(r#""1e400""#)), out("1e400"));
        assert_eq!(reason(amount(r#"" 1000000000000 ""#)), out("1000000000000"));
        assert_eq!(
            reason(amount(r#""inf""#)),
            "field `amount`: expected a number, found string \"inf\""
        );
    }

    proptest::proptest! {
        /// Every amount in range with at most three decimals becomes
        /// exactly its thousandths the way sum traits compute them.
        #[test]
        fn amounts_in_range_have_exact_thousandths(
            thousandths in 0u64..=999_999_999_999_999,
            negative in proptest::bool::ANY,
        ) {
            let sign = if negative { "-" } else { "" };
            let text = format!("{sign}{}.{:03}", thousandths / 1000, thousandths % 1000);
            let a = amount_value(&text).unwrap();
            let scaled = (a * crate::dataflow::traits::SUM_SCALE).round();
            let expected = if negative { -(thousandths as f64) } else { thousandths as f64 };
            proptest::prop_assert_eq!(scaled, expected, "{}", text);
        }
    }

    #[test]
    fn quantities_are_whole_numbers_in_range() {
        let count = |items: &str| {
            txn(&format!(
                r#"{{"order_id":"o","ts":1,"user_id":"u","amount":1,"items":{items}}}"#
            ))
            .map(|t| t.item_count)
        };
        assert_eq!(
            count(r#"[{"qty":2.0},{"qty":"3"},{"qty":1e1},{},{"qty":null},{"qty":0}]"#),
            Ok(17)
        );
        assert_eq!(
            count(r#"[{"qty":9007199254740991}]"#),
            Ok(9_007_199_254_740_991)
        );
        let bad = |i: usize, shown: &str| {
            format!(
                "field `items[{i}].qty`: expected a whole number from 0 to 9007199254740991, found {shown}"
            )
        };
        assert_eq!(reason(count(r#"[{"qty":1.5}]"#)), bad(0, "1.5"));
        assert_eq!(reason(count(r#"[{},{"qty":-1}]"#)), bad(1, "-1"));
        assert_eq!(
            reason(count(r#"[{"qty":"2.5"}]"#)),
            bad(0, "string \"2.5\"")
        );
        assert_eq!(
            reason(count(r#"[{"qty":9007199254740992}]"#)),
            bad(0, "9007199254740992")
        );
        assert_eq!(reason(count(r#"[{"qty":1e400}]"#)), bad(0, "1e+400"));
        assert_eq!(
            reason(count(r#"[{"qty":1.0000000000000000001}]"#)),
            bad(0, "1.0000000000000000001")
        );
        assert_eq!(
            reason(count(r#"[{"qty":"9007199254740991"},{}]"#)),
            "field `items`: the total quantity of the items exceeds 9007199254740991"
        );
    }

    #[test]
    fn deleted_as_a_number_is_exactly_0_or_1() {
        let deleted = |d: &str| {
            crm(&format!(r#"{{"crm_id":"C","updated_at":1,"deleted":{d}}}"#)).map(|c| c.deleted)
        };
        assert_eq!(deleted("1"), Ok(true));
        assert_eq!(deleted("1.0"), Ok(true));
        assert_eq!(deleted("0"), Ok(false));
        assert_eq!(deleted("-0.0"), Ok(false));
        for d in ["2", "1.0000000000000000001", "-1", "0.5"] {
            assert_eq!(
                reason(deleted(d)),
                "field `deleted`: expected a boolean, found number",
                "{d}"
            );
        }
    }

    #[test]
    fn records_round_trip_through_serde() {
        let rec = decode_json(
            RecordKind::Web,
            r#"{"event":"v","ts":1,"anonymous_id":"a","item":{"p":1.5}}"#,
            &rules(),
        )
        .unwrap();
        let text = serde_json::to_string(&rec).unwrap();
        let back: Record = serde_json::from_str(&text).unwrap();
        assert_eq!(back, rec);
    }

    /// A projection keeps exactly the fields it names, the same way on the
    /// fast path and on the value-based one (an escaped identifier sends a
    /// line to the latter), and what it keeps reads as without projection.
    #[test]
    fn a_projection_keeps_what_is_read_on_both_decoders() {
        let projection = Projection::reading([
            &["item".to_string(), "price".to_string()][..],
            &["context".to_string(), "device".to_string()][..],
            &["campaign".to_string()][..],
            &["event".to_string()][..],
        ]);
        let web = |anon: &str| {
            format!(
                r#"{{"event":"view_item","ts":{NOON},"anonymous_id":"{anon}","item":{{"id":"i1","price":120.5,"brand":"x","tags":[1,2]}},"context":{{"device":"mobile","page":"/p","user_id":"u1"}},"campaign":"spring","other":{{"deep":1}}}}"#
            )
        };
        let full = decode_json(RecordKind::Web, &web("a1"), &rules()).unwrap();
        for line in [web("a1"), web("a\\u0031")] {
            let r = decode_json_projected(
                RecordKind::Web,
                &line,
                &rules(),
                TimeUnit::Auto,
                &projection,
            )
            .unwrap();
            let Record::Web(e) = &r else { panic!() };
            assert_eq!(e.item.keys().collect::<Vec<_>>(), vec!["price"], "{line}");
            assert_eq!(
                e.context.keys().collect::<Vec<_>>(),
                vec!["device"],
                "{line}"
            );
            assert_eq!(
                e.properties.keys().collect::<Vec<_>>(),
                vec!["campaign"],
                "{line}"
            );
            // The context's identifier is read although `user_id` is not kept.
            assert_eq!(r.ids(), full.ids(), "{line}");
            let Record::Web(f) = &full else { panic!() };
            for path in [["item", "price"], ["context", "device"]] {
                let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                assert_eq!(e.field(&path), f.field(&path));
            }
        }
        let txn = format!(
            r#"{{"order_id":"o1","ts":{NOON},"amount":10,"user_id":"u1","items":[{{"sku":"a","qty":2}},{{"sku":"b"}}],"note":"x"}}"#
        );
        let r = decode_json_projected(
            RecordKind::Transactions,
            &txn,
            &rules(),
            TimeUnit::Auto,
            &projection,
        )
        .unwrap();
        let Record::Txn(t) = r else { panic!() };
        assert_eq!(t.item_count, 3);
        assert!(t.properties.is_empty());
        assert!(t.items.iter().all(|i| i.keys().all(|k| k == "qty")));
    }
}
