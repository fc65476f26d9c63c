//! Google Analytics 4 (`format = "ga4"` on a web source).
//!
//! A line is one of:
//!
//! * a [Measurement Protocol] payload: `{"client_id", "user_id",
//!   "timestamp_micros", "user_properties": {NAME: {"value": V}}, "device",
//!   "user_location", "events": [{"name", "params", "timestamp_micros"}]}`;
//!   each event is a message of its own (`events[2]` in reasons), and so
//!   are the payload's user properties;
//! * a row of the [BigQuery export]: `{"event_name", "event_timestamp",
//!   "event_params": [{"key", "value": {"string_value" | "int_value" |
//!   "double_value" | "float_value"}}], "user_pseudo_id", "user_id",
//!   "user_properties": [...], "items": [...], "device": {"category"},
//!   "geo": {"country"}, "traffic_source", "ecommerce"}`.
//!
//! GA4's event names are segflow's (`view_item`, `add_to_cart`,
//! `purchase`), so they are kept; a `purchase` is also a [`Transaction`].
//! Times are epoch **microseconds** (`timestamp_micros`, `event_timestamp`,
//! as numbers or strings of digits) whatever the source's `time_unit`.
//!
//! | GA4 | segflow |
//! |---|---|
//! | `user_id` | identifier `user_id` |
//! | `client_id`, `app_instance_id`, `user_pseudo_id` | identifier `anonymous_id` |
//! | a user property named like an identifier field | that identifier |
//! | `params.P`, `event_params[].key` P | `properties.P` |
//! | `items[0]` (params or row) | `item`; `id`, `name`, `brand`, `category` from `item_id`, `item_name`, `item_brand`, `item_category` when absent |
//! | `device.X`, `user_location.X`, `geo.X`, `traffic_source.X`, any other field of a payload or row | `context.device.X`, …, `context.NAME` |
//! | `device.category`; `user_location.country_id`, `geo.country`; `city`; `region_id`, `geo.region` | also `context.device`; `context.country`; `context.city`; `context.region` |
//! | `page_location`, `page_referrer`, `page_title`, `session_id`/`ga_session_id` params | also `context.url` (and its path as `context.page`), `context.referrer`, `context.title`, `context.session_id` |
//! | purchase: `transaction_id` (params, or the row's `ecommerce`) | transaction `order_id` |
//! | purchase: `value` (params), else the row's `ecommerce.purchase_revenue` | transaction `amount` |
//! | purchase: `currency`, `items[]` (`quantity` as `qty`) | transaction `currency`, `items` |
//! | user properties | attributes, each the latest value set (a row's `set_timestamp_micros`) |
//!
//! [Measurement Protocol]: https://developers.google.com/analytics/devguides/collection/protocol/ga4/reference
//! [BigQuery export]: https://support.google.com/analytics/answer/7029846
//! [`Transaction`]: crate::model::Transaction

use serde_json::Value;

use super::{
    add_short_names, amount_of, candidate_text, currency_of, flatten, flatten_except, id_text_of,
    ids_named_in, make_ids, order, order_items, present, profile_records, Decoded, IdField,
    Message,
};
use crate::model::ident::{Ident, IdentityRules};
use crate::model::record::{
    check_identifiers, expected, get, parse_json, req_string, to_scalar, DecodeError, Fields, Keep,
    Obj, Projection, Record, Transaction, WebEvent,
};
use crate::model::scalar::Scalar;
use crate::time::parse::{json_type, parse_time_as, TimeUnit};

/// The identifier fields of a line, for the "no identifier" reason.
const ID_FIELDS: &str = "`user_id`, `client_id`, `app_instance_id` or `user_pseudo_id`";

/// A product's short names.
const ITEM_SHORT: [(&str, &[&str]); 4] = [
    ("id", &["item_id"]),
    ("name", &["item_name"]),
    ("brand", &["item_brand"]),
    ("category", &["item_category"]),
];

/// Context keys added under their short names when absent.
const CONTEXT_SHORT: [(&str, &[&str]); 4] = [
    ("device", &["device.category"]),
    ("country", &["user_location.country_id", "geo.country"]),
    ("city", &["user_location.city", "geo.city"]),
    ("region", &["user_location.region_id", "geo.region"]),
];

/// Decodes a line of the GA4 format into its messages.
///
/// The error is for a line that is neither a Measurement Protocol payload
/// nor an export row (invalid JSON, no `events` and no `event_name`,
/// `events` not an array, no usable identifier for the whole payload); a
/// bad event of a payload is reported in its own [`Message::decoded`]
/// (`events[1]: …`) and the other events are kept.
pub fn decode(
    line: &str,
    rules: &IdentityRules,
    projection: &Projection,
) -> Result<Vec<Message>, DecodeError> {
    let o = match parse_json(line)? {
        Value::Object(o) => o,
        v => {
            return Err(DecodeError::new(format!(
                "expected a GA4 Measurement Protocol payload or BigQuery export row (a JSON object), found {}",
                json_type(&v)
            )))
        }
    };
    if get(&o, "events").is_some() {
        payload(&o, rules, projection)
    } else if get(&o, "event_name").is_some() {
        Ok(vec![Message::whole(export_row(&o, rules, projection))])
    } else {
        Err(DecodeError::new(
            "expected a Measurement Protocol payload (with `events`) or a BigQuery export row (with `event_name`)",
        ))
    }
}

/// A time in epoch microseconds (a number or a string of digits).
fn micros(name: &str, v: &Value) -> Result<i64, DecodeError> {
    parse_time_as(v, TimeUnit::Microseconds)
        .map_err(|e| DecodeError::new(format!("field `{name}`: {e}")))
}

/// A Measurement Protocol payload: one message per event, and one for the
/// user properties.
fn payload(
    o: &Obj,
    rules: &IdentityRules,
    projection: &Projection,
) -> Result<Vec<Message>, DecodeError> {
    let Some(Value::Array(events)) = get(o, "events") else {
        return Err(expected("events", "an array of events", &o["events"]));
    };
    let user_properties = match get(o, "user_properties") {
        None => None,
        Some(Value::Object(p)) => Some(p),
        Some(v) => return Err(expected("user_properties", "an object", v)),
    };
    let mut found: Vec<IdField<'_>> = Vec::new();
    for (name, field) in [
        ("user_id", "user_id"),
        ("client_id", "anonymous_id"),
        ("app_instance_id", "anonymous_id"),
    ] {
        if let Some(v) = get(o, name) {
            found.push((name.to_string(), field, candidate_text(name, v)?));
        }
    }
    if let Some(p) = user_properties {
        ids_named_in("user_properties.", p, rules, property_value, &mut found)?;
    }
    let ids = make_ids(&found, rules, ID_FIELDS)?;
    let payload_time = get(o, "timestamp_micros")
        .map(|v| micros("timestamp_micros", v))
        .transpose()?;
    // What every event shares: the payload's device and location, and its
    // other fields (consent, ip_override, ...), as context.
    let mut shared = Fields::new();
    for key in ["device", "user_location"] {
        match get(o, key) {
            None => {}
            Some(Value::Object(d)) => flatten("", d, &format!("{key}."), &Keep::All, &mut shared)?,
            Some(v) => return Err(expected(key, "an object", v)),
        }
    }
    flatten_except(
        "",
        o,
        "",
        &[
            "events",
            "user_properties",
            "device",
            "user_location",
            "timestamp_micros",
            "client_id",
            "app_instance_id",
            "user_id",
        ],
        &Keep::All,
        &mut shared,
    )?;
    let mut messages: Vec<Message> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let decoded = match e {
                Value::Object(e) => mp_event(e, payload_time, &ids, &shared, projection),
                v => Err(DecodeError::new(format!(
                    "expected an event (a JSON object), found {}",
                    json_type(v)
                ))),
            };
            Message::part(format!("events[{i}]"), e.to_string(), decoded)
        })
        .collect();
    if let Some(p) = user_properties.filter(|p| !p.is_empty()) {
        let decoded = (|| {
            // The payload's time, else its first event's.
            let ts_ms = match payload_time {
                Some(t) => t,
                None => events
                    .iter()
                    .find_map(|e| e.get("timestamp_micros").filter(|v| !v.is_null()))
                    .map(|v| micros("events[].timestamp_micros", v))
                    .transpose()?
                    .ok_or_else(|| {
                        DecodeError::new(
                            "no time for the user properties: expected `timestamp_micros` on the payload or an event",
                        )
                    })?,
            };
            let mut attrs = Vec::with_capacity(p.len());
            for (name, v) in p {
                let value = property_value(v).unwrap_or(&Value::Null);
                attrs.push((
                    name.clone(),
                    to_scalar("user_properties.", name, value)?,
                    ts_ms,
                ));
            }
            let records = profile_records(ts_ms, &ids, attrs);
            for r in &records {
                check_identifiers(r)?;
            }
            Ok(Decoded { ts_ms, records })
        })();
        messages.push(Message::part(
            "user_properties".to_string(),
            Value::Object(p.clone()).to_string(),
            decoded,
        ));
    }
    Ok(messages)
}

/// A Measurement Protocol user property's value: `{"value": V}` (or `V`).
fn property_value(v: &Value) -> Option<&Value> {
    match v {
        Value::Object(o) => o.get("value"),
        v => Some(v),
    }
}

/// One event of a Measurement Protocol payload.
fn mp_event(
    e: &Obj,
    payload_time: Option<i64>,
    ids: &[Ident],
    shared: &Fields,
    projection: &Projection,
) -> Result<Decoded, DecodeError> {
    let name = req_string(e, "name")?;
    let ts_ms = match get(e, "timestamp_micros") {
        Some(v) => micros("timestamp_micros", v)?,
        None => payload_time.ok_or_else(|| {
            DecodeError::new(
                "no event time: expected `timestamp_micros` on the event or the payload",
            )
        })?,
    };
    let params = match get(e, "params") {
        None => Obj::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(v) => return Err(expected("params", "an object", v)),
    };
    let items = match get(&params, "items") {
        None => None,
        Some(Value::Array(list)) => Some(list.as_slice()),
        Some(v) => return Err(expected("params.items", "an array", v)),
    };
    event_records(
        name,
        ts_ms,
        ids,
        &params,
        "params.",
        shared.clone(),
        items,
        "params.items",
        None,
        projection,
    )
}

/// A BigQuery export row: one event.
fn export_row(
    o: &Obj,
    rules: &IdentityRules,
    projection: &Projection,
) -> Result<Decoded, DecodeError> {
    let name = req_string(o, "event_name")?;
    let ts_ms = match get(o, "event_timestamp") {
        None => return Err(DecodeError::new("missing field `event_timestamp`")),
        Some(v) => micros("event_timestamp", v)?,
    };
    let params = key_values("event_params", get(o, "event_params"))?;
    let properties_list = key_values("user_properties", get(o, "user_properties"))?;
    let mut found: Vec<IdField<'_>> = Vec::new();
    for (name, field) in [("user_id", "user_id"), ("user_pseudo_id", "anonymous_id")] {
        if let Some(v) = get(o, name) {
            found.push((name.to_string(), field, candidate_text(name, v)?));
        }
    }
    let user_props: Obj = properties_list
        .iter()
        .map(|(k, v, _)| (k.clone(), v.clone()))
        .collect();
    ids_named_in("user_properties.", &user_props, rules, present, &mut found)?;
    let ids = make_ids(&found, rules, ID_FIELDS)?;
    let params_obj: Obj = params.into_iter().map(|(k, v, _)| (k, v)).collect();
    // The row's other fields are its context: device, geo, traffic
    // source, platform, stream, app and privacy information.
    let mut context = Fields::new();
    flatten_except(
        "",
        o,
        "",
        &[
            "event_name",
            "event_timestamp",
            "event_params",
            "user_properties",
            "user_id",
            "user_pseudo_id",
            "items",
            "ecommerce",
        ],
        &Keep::All,
        &mut context,
    )?;
    let ecommerce = match get(o, "ecommerce") {
        None => None,
        Some(Value::Object(e)) => Some(e),
        Some(v) => return Err(expected("ecommerce", "an object", v)),
    };
    let items = match get(o, "items") {
        None => None,
        Some(Value::Array(list)) => Some(list.as_slice()),
        Some(v) => return Err(expected("items", "an array", v)),
    };
    let mut decoded = event_records(
        name,
        ts_ms,
        &ids,
        &params_obj,
        "event_params.",
        context,
        items,
        "items",
        ecommerce,
        projection,
    )?;
    if !properties_list.is_empty() {
        let attrs = properties_list
            .into_iter()
            .map(|(k, v, set_at)| {
                let value = to_scalar("user_properties.", &k, &v)?;
                Ok((k, value, set_at.unwrap_or(ts_ms)))
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        decoded.records.extend(profile_records(ts_ms, &ids, attrs));
    }
    for r in &decoded.records {
        check_identifiers(r)?;
    }
    Ok(decoded)
}

/// An export row's `[{"key", "value": {"string_value" | "int_value" |
/// "double_value" | "float_value", "set_timestamp_micros"}}]` as `(key,
/// value, set at)`: the first value present (an `int_value` given as a
/// string of digits is a number), null if none.
fn key_values(
    name: &str,
    v: Option<&Value>,
) -> Result<Vec<(String, Value, Option<i64>)>, DecodeError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(v) => return Err(expected(name, "an array of {key, value}", v)),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, kv) in list.iter().enumerate() {
        let at = format!("{name}[{i}]");
        let Value::Object(kv) = kv else {
            return Err(expected(&at, "an object", kv));
        };
        let key = req_string(kv, "key").map_err(|e| DecodeError::new(format!("{at}: {e}")))?;
        let (value, set_at) = match get(kv, "value") {
            None => (Value::Null, None),
            Some(Value::Object(val)) => {
                let mut found = Value::Null;
                for k in ["string_value", "int_value", "double_value", "float_value"] {
                    if let Some(v) = get(val, k) {
                        found = match (k, v) {
                            ("int_value", Value::String(s)) => {
                                let t = s.trim();
                                match serde_json::from_str::<Value>(t) {
                                    Ok(n @ Value::Number(_)) => n,
                                    _ => {
                                        return Err(DecodeError::new(format!(
                                            "field `{at}.value.int_value`: expected an integer, found string {s:?}"
                                        )))
                                    }
                                }
                            }
                            (_, v) => v.clone(),
                        };
                        break;
                    }
                }
                let set_at = get(val, "set_timestamp_micros")
                    .map(|v| micros(&format!("{at}.value.set_timestamp_micros"), v))
                    .transpose()?;
                (found, set_at)
            }
            Some(v) => return Err(expected(&format!("{at}.value"), "an object", v)),
        };
        out.push((key, value, set_at));
    }
    Ok(out)
}

/// The web event of a GA4 event and, for a `purchase`, its transaction.
#[allow(clippy::too_many_arguments)]
fn event_records(
    event: String,
    ts_ms: i64,
    ids: &[Ident],
    params: &Obj,
    params_shown: &str,
    mut context: Fields,
    items: Option<&[Value]>,
    items_shown: &str,
    ecommerce: Option<&Obj>,
    projection: &Projection,
) -> Result<Decoded, DecodeError> {
    let mut properties = Fields::new();
    flatten(
        params_shown,
        params,
        "",
        &projection.properties,
        &mut properties,
    )?;
    if let Some(e) = ecommerce {
        flatten(
            "ecommerce.",
            e,
            "ecommerce.",
            &projection.properties,
            &mut properties,
        )?;
    }
    add_short_names(&mut context, &CONTEXT_SHORT);
    for (short, param) in [
        ("url", "page_location"),
        ("referrer", "page_referrer"),
        ("title", "page_title"),
        ("session_id", "session_id"),
        ("session_id", "ga_session_id"),
    ] {
        if let (false, Some(v)) = (context.contains_key(short), get(params, param)) {
            context.insert(short.to_string(), to_scalar(params_shown, param, v)?);
        }
    }
    if !context.contains_key("page") {
        if let Some(Scalar::Str(url)) = context.get("url") {
            let path = url_path(url).to_string();
            context.insert("page".to_string(), Scalar::Str(path));
        }
    }
    context.retain(|k, _| projection.context.keeps(k));
    let item = match items.and_then(|l| l.first()) {
        None => Fields::new(),
        Some(Value::Object(p)) => item_fields(p, &format!("{items_shown}[0]."), &projection.item)?,
        Some(v) => return Err(expected(&format!("{items_shown}[0]"), "an object", v)),
    };
    let mut records = Vec::with_capacity(2);
    let txn = if event == "purchase" {
        Some(purchase(
            ts_ms,
            ids,
            params,
            params_shown,
            items,
            items_shown,
            ecommerce,
            projection,
        )?)
    } else {
        None
    };
    records.push(Record::Web(WebEvent {
        ts_ms,
        event,
        ids: ids.to_vec(),
        item,
        context,
        properties,
    }));
    records.extend(txn.map(Record::Txn));
    for r in &records {
        check_identifiers(r)?;
    }
    Ok(Decoded { ts_ms, records })
}

/// The path of a URL (`https://shop.example/p/1?x=2` → `/p/1`); a text
/// that is not an absolute URL is its own path.
fn url_path(url: &str) -> &str {
    let Some((_, rest)) = url.split_once("://") else {
        return url;
    };
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let end = path.find(['?', '#']).unwrap_or(path.len());
    &path[..end]
}

/// A GA4 item's fields, with segflow's short names added.
fn item_fields(p: &Obj, shown: &str, keep: &Keep) -> Result<Fields, DecodeError> {
    let mut all = Fields::new();
    flatten(shown, p, "", &Keep::All, &mut all)?;
    add_short_names(&mut all, &ITEM_SHORT);
    all.retain(|k, _| keep.keeps(k));
    Ok(all)
}

/// The transaction of a `purchase`.
#[allow(clippy::too_many_arguments)]
fn purchase(
    ts_ms: i64,
    ids: &[Ident],
    params: &Obj,
    params_shown: &str,
    items: Option<&[Value]>,
    items_shown: &str,
    ecommerce: Option<&Obj>,
    projection: &Projection,
) -> Result<Transaction, DecodeError> {
    let from_ecommerce = |k: &str| {
        ecommerce
            .and_then(|e| get(e, k))
            .map(|v| (format!("ecommerce.{k}"), v))
    };
    let from_params = |k: &str| get(params, k).map(|v| (format!("{params_shown}{k}"), v));
    let Some((shown, v)) =
        from_params("transaction_id").or_else(|| from_ecommerce("transaction_id"))
    else {
        return Err(DecodeError::new(format!(
            "missing field `{params_shown}transaction_id` (a purchase is a transaction and needs its id)"
        )));
    };
    let order_id = id_text_of(&shown, v)?;
    let Some((shown, v)) = from_params("value").or_else(|| from_ecommerce("purchase_revenue"))
    else {
        return Err(DecodeError::new(format!(
            "missing field `{params_shown}value` (the purchase's amount)"
        )));
    };
    let amount = amount_of(&shown, v)?;
    let currency = currency_of(&format!("{params_shown}currency"), get(params, "currency"))?;
    let items = match items {
        None => (Vec::new(), 0),
        Some(list) => order_items(items_shown, list, "quantity", projection.items, item_fields)?,
    };
    let mut properties = Fields::new();
    flatten_except(
        params_shown,
        params,
        "",
        &["transaction_id", "value", "currency", "items"],
        &projection.properties,
        &mut properties,
    )?;
    Ok(order(
        ts_ms, ids, order_id, amount, currency, items, properties,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{ids, rules, web};
    use super::*;

    fn decode_all(line: &str) -> Vec<Result<Decoded, String>> {
        decode(line, &rules(), &Projection::ALL)
            .unwrap()
            .into_iter()
            .map(|m| m.decoded.map_err(|e| e.reason))
            .collect()
    }

    const NOON_US: i64 = 1_772_366_400_000_000;

    #[test]
    fn a_measurement_protocol_payload_is_one_message_per_event() {
        let line = format!(
            r#"{{"client_id":"123.456","user_id":"u1","timestamp_micros":"{NOON_US}",
            "user_properties":{{"tier":{{"value":"gold"}}}},
            "device":{{"category":"mobile"}},"user_location":{{"country_id":"NO","city":"Oslo"}},
            "consent":{{"ad_user_data":"GRANTED"}},"ip_override":"1.2.3.4",
            "events":[
              {{"name":"view_item","params":{{"currency":"USD","value":120,"session_id":"s1",
                "page_location":"https://shop.example/p/SKU-1?utm=x","page_referrer":"https://g.co/",
                "items":[{{"item_id":"SKU-1","item_name":"Tent","item_category":"outdoor","price":120}}]}}}},
              {{"name":"purchase","timestamp_micros":{},"params":{{"transaction_id":"T1","value":"150.5","currency":"usd",
                "items":[{{"item_id":"A","price":100,"quantity":1}},{{"item_id":"B","price":25.25,"quantity":2}}],"coupon":"C"}}}},
              {{"name":"purchase","params":{{"value":1}}}},
              "oops"
            ]}}"#,
            NOON_US + 2_000_000
        );
        let all = decode_all(&line);
        assert_eq!(all.len(), 5);
        let view = all[0].as_ref().unwrap();
        assert_eq!(view.ts_ms, 1_772_366_400_000);
        let w = web(&view.records[0]);
        assert_eq!(w.event, "view_item");
        assert_eq!(ids(&view.records[0]), ["user:u1", "anon:123.456"]);
        assert_eq!(w.item.get("id"), Some(&Scalar::Str("SKU-1".into())));
        assert_eq!(w.item.get("category"), Some(&Scalar::Str("outdoor".into())));
        assert_eq!(w.item.get("price"), Some(&Scalar::Num(120.0)));
        let ctx = |k: &str| w.context.get(k).cloned();
        assert_eq!(ctx("device"), Some(Scalar::Str("mobile".into())));
        assert_eq!(ctx("country"), Some(Scalar::Str("NO".into())));
        assert_eq!(ctx("city"), Some(Scalar::Str("Oslo".into())));
        assert_eq!(ctx("page"), Some(Scalar::Str("/p/SKU-1".into())));
        assert_eq!(ctx("referrer"), Some(Scalar::Str("https://g.co/".into())));
        assert_eq!(ctx("session_id"), Some(Scalar::Str("s1".into())));
        assert_eq!(
            ctx("consent.ad_user_data"),
            Some(Scalar::Str("GRANTED".into()))
        );
        assert_eq!(ctx("ip_override"), Some(Scalar::Str("1.2.3.4".into())));
        assert_eq!(
            w.properties.get("currency"),
            Some(&Scalar::Str("USD".into()))
        );
        let buy = all[1].as_ref().unwrap();
        assert_eq!(buy.ts_ms, 1_772_366_402_000);
        assert_eq!(web(&buy.records[0]).event, "purchase");
        let Record::Txn(t) = &buy.records[1] else {
            panic!("{buy:?}")
        };
        assert_eq!(
            (t.order_id.as_str(), t.amount, t.item_count),
            ("T1", 150.5, 3)
        );
        assert_eq!(t.currency.as_deref(), Some("USD"));
        assert_eq!(t.items[1].get("id"), Some(&Scalar::Str("B".into())));
        assert_eq!(t.properties.get("coupon"), Some(&Scalar::Str("C".into())));
        assert_eq!(
            all[2].as_ref().unwrap_err(),
            "events[2]: missing field `params.transaction_id` (a purchase is a transaction and needs its id)"
        );
        assert_eq!(
            all[3].as_ref().unwrap_err(),
            "events[3]: expected an event (a JSON object), found string"
        );
        let props = all[4].as_ref().unwrap();
        let Record::Crm(c) = &props.records[0] else {
            panic!("{props:?}")
        };
        assert_eq!(
            c.attributes,
            [("tier".to_string(), Scalar::Str("gold".into()))]
        );
        assert_eq!(c.updated_ms, 1_772_366_400_000);
    }

    #[test]
    fn a_bigquery_export_row_is_one_event() {
        let line = format!(
            r#"{{"event_date":"20260301","event_timestamp":"{NOON_US}","event_name":"purchase",
            "event_params":[
              {{"key":"ga_session_id","value":{{"int_value":"1772366000"}}}},
              {{"key":"page_location","value":{{"string_value":"https://shop.example/checkout"}}}},
              {{"key":"engagement_time_msec","value":{{"int_value":1200}}}},
              {{"key":"ratio","value":{{"double_value":0.5}}}},
              {{"key":"empty","value":{{}}}}],
            "user_pseudo_id":"p1","user_id":null,
            "user_properties":[{{"key":"tier","value":{{"string_value":"gold","set_timestamp_micros":"{}"}}}}],
            "device":{{"category":"desktop","web_info":{{"browser":"Firefox"}}}},
            "geo":{{"country":"Norway","city":"Oslo"}},
            "traffic_source":{{"source":"google","medium":"organic"}},
            "platform":"WEB",
            "ecommerce":{{"transaction_id":"T9","purchase_revenue":99.5}},
            "items":[{{"item_id":"A","item_category":"outdoor","price":99.5,"quantity":"1"}}]}}"#,
            NOON_US - 60_000_000
        );
        let all = decode_all(&line);
        let d = all[0].as_ref().unwrap();
        assert_eq!(d.ts_ms, 1_772_366_400_000);
        let w = web(&d.records[0]);
        assert_eq!(ids(&d.records[0]), ["anon:p1"]);
        assert_eq!(w.event, "purchase");
        let p = |k: &str| w.properties.get(k).cloned();
        assert_eq!(p("ga_session_id"), Some(Scalar::Num(1_772_366_000.0)));
        assert_eq!(p("engagement_time_msec"), Some(Scalar::Num(1200.0)));
        assert_eq!(p("ratio"), Some(Scalar::Num(0.5)));
        assert_eq!(p("empty"), Some(Scalar::Null));
        assert_eq!(p("ecommerce.purchase_revenue"), Some(Scalar::Num(99.5)));
        let c = |k: &str| w.context.get(k).cloned();
        assert_eq!(c("device"), Some(Scalar::Str("desktop".into())));
        assert_eq!(
            c("device.web_info.browser"),
            Some(Scalar::Str("Firefox".into()))
        );
        assert_eq!(c("country"), Some(Scalar::Str("Norway".into())));
        assert_eq!(
            c("traffic_source.medium"),
            Some(Scalar::Str("organic".into()))
        );
        assert_eq!(c("platform"), Some(Scalar::Str("WEB".into())));
        assert_eq!(c("page"), Some(Scalar::Str("/checkout".into())));
        assert_eq!(c("session_id"), Some(Scalar::Num(1_772_366_000.0)));
        assert_eq!(w.item.get("category"), Some(&Scalar::Str("outdoor".into())));
        let Record::Txn(t) = &d.records[1] else {
            panic!("{d:?}")
        };
        assert_eq!(
            (t.order_id.as_str(), t.amount, t.item_count),
            ("T9", 99.5, 1)
        );
        let Record::Crm(crm) = &d.records[2] else {
            panic!("{d:?}")
        };
        // The attribute carries the time the property was set.
        assert_eq!(crm.updated_ms, 1_772_366_340_000);
        assert_eq!(
            crm.attributes,
            [("tier".to_string(), Scalar::Str("gold".into()))]
        );
    }

    #[test]
    fn bad_lines_and_rows_say_which_field_and_why() {
        let line_err = |l: &str| decode(l, &rules(), &Projection::ALL).unwrap_err().reason;
        assert!(line_err("[1]").starts_with("expected a GA4 Measurement Protocol payload"));
        assert!(line_err(r#"{"foo":1}"#).starts_with("expected a Measurement Protocol payload"));
        assert!(line_err(r#"{"events":{}}"#).starts_with("field `events`: expected an array"));
        assert!(line_err(r#"{"events":[]}"#).starts_with("no identifier"));
        let row_err = |l: &str| decode_all(l).remove(0).unwrap_err();
        assert_eq!(
            row_err(r#"{"event_name":"page_view","user_pseudo_id":"p"}"#),
            "missing field `event_timestamp`"
        );
        assert!(row_err(
            r#"{"event_name":"page_view","event_timestamp":"soon","user_pseudo_id":"p"}"#
        )
        .starts_with("field `event_timestamp`: "));
        assert!(row_err(r#"{"event_name":"x","event_timestamp":1772366400000000,"user_pseudo_id":"p","event_params":[{"key":"n","value":{"int_value":"x1"}}]}"#)
            .starts_with("field `event_params[0].value.int_value`: expected an integer"));
        assert!(
            row_err(r#"{"event_name":"x","event_timestamp":1772366400000000}"#)
                .starts_with("no identifier")
        );
        let ev_err = |l: &str| decode_all(l).remove(0).unwrap_err();
        assert_eq!(
            ev_err(r#"{"client_id":"c","events":[{"name":"x"}]}"#),
            "events[0]: no event time: expected `timestamp_micros` on the event or the payload"
        );
        assert_eq!(
            ev_err(
                r#"{"client_id":"c","timestamp_micros":1772366400000000,"events":[{"params":{}}]}"#
            ),
            "events[0]: missing field `name`"
        );
    }

    #[test]
    fn url_paths() {
        assert_eq!(url_path("https://a.example/p/1?x=2#h"), "/p/1");
        assert_eq!(url_path("https://a.example"), "/");
        assert_eq!(url_path("/already/a/path"), "/already/a/path");
    }
}
