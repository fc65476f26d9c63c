//! The Segment event format (`format = "segment"` on a web source).
//!
//! Messages of the [Segment tracking spec] — also sent by RudderStack and
//! Jitsu — become segflow records, so that a dataflow written for segflow's
//! own JSON lines (`dataflows/ecommerce.toml`) runs unchanged on them. A
//! line holds one message, a `{"batch": [...]}` envelope (the HTTP tracking
//! API's `/v1/batch` body: its `context`, `sentAt` and `receivedAt` apply to
//! every member that lacks them), or a JSON array of messages.
//!
//! | message | records |
//! |---|---|
//! | `track` | a web event named by [`track_event_name`] (`Product Viewed` → `view_item`); `Order Completed` also a [`Transaction`] |
//! | `page`, `screen` | a web event `page_view`, `screen_view` |
//! | `identify` | its ids linked into one profile; each trait an attribute |
//! | `alias` | `previousId` linked to `userId` |
//! | `group` | attributes `group_id` and `group.<trait>` |
//!
//! **Time**: the first of `timestamp`, `originalTimestamp`, `sentAt`,
//! `receivedAt` (the envelope's `sentAt`/`receivedAt` for batch members),
//! parsed as every timestamp is ([`crate::time::parse`]); numbers are in
//! the source's `time_unit`.
//!
//! **Identifiers**: `userId` is `user_id`, `anonymousId` is `anonymous_id`;
//! a trait (`identify`'s `traits`, any message's `context.traits`) named
//! like an identifier field of `[identity] priority` (`email`, `phone`) is
//! that identifier. Fields that are not in the priority list are not
//! identifiers, as for every input.
//!
//! **Fields**: nested objects are flattened into dotted names, so that every
//! field is reachable by its path: `properties.address.city` reads the key
//! `address.city`, `context.device.type` the context key `device.type`.
//! Arrays are kept as their JSON text. The web event's `properties` are the
//! message's `properties` (plus a page's `name` and `category`); its
//! `context` is the message's `context` flattened, with the short names
//! segflow's dataflows use added when absent: `device` (`device.type`),
//! `country`, `city`, `region` (`location.*`), `page` (`page.path`), `url`,
//! `referrer`, `title` (`page.*`, or a page message's properties),
//! `session_id` (`sessionId`). The `item` is the product: the properties of
//! a product event, or the first of `properties.products`, with `id` set
//! from `product_id` (else `sku`) when it has none.
//!
//! **Profiles**: `identify`, `alias` and `group` carry no behaviour and are
//! not web events; they become CRM-like records (one per trait, keyed by the
//! message's identifiers and the trait's name) so that a profile's
//! attributes are the latest value of each trait, as in Segment's profiles,
//! and the links they make stay.
//!
//! [Segment tracking spec]: https://segment.com/docs/connections/spec/

use serde_json::Value;

use super::{
    add_short_names, amount_of, candidate_text, currency_of, flatten, flatten_except, id_text,
    id_text_of, ids_named_in, make_ids, order, order_items, present, profile_records, Decoded,
    IdField, Message,
};
use crate::model::ident::{Ident, IdentityRules};
use crate::model::record::{
    check_identifiers, expected, get, parse_json, req_string, to_scalar, DecodeError, Fields, Keep,
    Obj, Projection, Record, WebEvent,
};
use crate::model::scalar::Scalar;
use crate::time::parse::{json_type, parse_time_as, TimeUnit};

/// The message types this format reads.
const TYPES: &str = "track, page, screen, identify, alias, group";

/// The identifier fields of a message, for the "no identifier" reason.
const ID_FIELDS: &str = "`userId` or `anonymousId`";

/// Decodes a line of the Segment format into its messages.
///
/// The error is for a line that is not a message at all (invalid JSON, a
/// `batch` that is not an array, a value that is neither an object nor an
/// array); a bad member of a batch is reported in its own
/// [`Message::decoded`] (`batch[1]: …`) and the other members are kept.
pub fn decode(
    line: &str,
    rules: &IdentityRules,
    unit: TimeUnit,
    projection: &Projection,
) -> Result<Vec<Message>, DecodeError> {
    let value = parse_json(line)?;
    let decode = |m: &Value, env: Option<&Obj>| match m {
        Value::Object(o) => message(o, env, rules, unit, projection),
        v => Err(DecodeError::new(format!(
            "expected a message (a JSON object), found {}",
            json_type(v)
        ))),
    };
    let members = |arr: &[Value], env: Option<&Obj>| {
        arr.iter()
            .enumerate()
            .map(|(i, m)| Message::part(format!("batch[{i}]"), m.to_string(), decode(m, env)))
            .collect()
    };
    match &value {
        Value::Array(arr) => Ok(members(arr, None)),
        Value::Object(o) => match get(o, "batch") {
            Some(Value::Array(arr)) => Ok(members(arr, Some(o))),
            Some(v) => Err(expected("batch", "an array of messages", v)),
            None => Ok(vec![Message::whole(decode(&value, None))]),
        },
        v => Err(DecodeError::new(format!(
            "expected a Segment message or batch (a JSON object or array), found {}",
            json_type(v)
        ))),
    }
}

/// The segflow event name of a Segment `track` event: the [e-commerce
/// spec]'s names become the GA4 recommended event names segflow's
/// dataflows use (compared ignoring ASCII case); any other name is kept as
/// it is (trimmed).
///
/// | Segment | segflow |
/// |---|---|
/// | Products Searched | search |
/// | Product List Viewed | view_item_list |
/// | Product Clicked | select_item |
/// | Product Viewed | view_item |
/// | Product Added | add_to_cart |
/// | Product Removed | remove_from_cart |
/// | Product Added to Wishlist | add_to_wishlist |
/// | Product Shared | share |
/// | Cart Viewed | view_cart |
/// | Checkout Started | begin_checkout |
/// | Payment Info Entered | add_payment_info |
/// | Order Completed | purchase |
/// | Order Refunded | refund |
/// | Promotion Viewed | view_promotion |
/// | Promotion Clicked | select_promotion |
/// | Signed Up | sign_up |
/// | Signed In | login |
///
/// [e-commerce spec]: https://segment.com/docs/connections/spec/ecommerce/v2/
pub fn track_event_name(name: &str) -> &str {
    TRACK_NAMES
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case(name))
        .map_or(name, |(_, n)| n)
}

const TRACK_NAMES: [(&str, &str); 17] = [
    ("Products Searched", "search"),
    ("Product List Viewed", "view_item_list"),
    ("Product Clicked", "select_item"),
    ("Product Viewed", "view_item"),
    ("Product Added", "add_to_cart"),
    ("Product Removed", "remove_from_cart"),
    ("Product Added to Wishlist", "add_to_wishlist"),
    ("Product Shared", "share"),
    ("Cart Viewed", "view_cart"),
    ("Checkout Started", "begin_checkout"),
    ("Payment Info Entered", "add_payment_info"),
    ("Order Completed", "purchase"),
    ("Order Refunded", "refund"),
    ("Promotion Viewed", "view_promotion"),
    ("Promotion Clicked", "select_promotion"),
    ("Signed Up", "sign_up"),
    ("Signed In", "login"),
];

/// Context keys added under their short names when absent.
const CONTEXT_SHORT: [(&str, &[&str]); 9] = [
    ("device", &["device.type"]),
    ("country", &["location.country"]),
    ("city", &["location.city"]),
    ("region", &["location.region"]),
    ("page", &["page.path"]),
    ("url", &["page.url"]),
    ("referrer", &["page.referrer"]),
    ("title", &["page.title"]),
    ("session_id", &["sessionId"]),
];

/// The fields of a message this format maps; any other is context.
const MESSAGE_FIELDS: [&str; 16] = [
    "type",
    "event",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "timestamp",
    "originalTimestamp",
    "sentAt",
    "receivedAt",
    "properties",
    "context",
    "traits",
    "name",
    "category",
    "writeKey",
];

/// A product's short names.
const PRODUCT_SHORT: [(&str, &[&str]); 1] = [("id", &["product_id", "sku"])];

fn message(
    m: &Obj,
    env: Option<&Obj>,
    rules: &IdentityRules,
    unit: TimeUnit,
    projection: &Projection,
) -> Result<Decoded, DecodeError> {
    let kind = match get(m, "type") {
        None => {
            return Err(DecodeError::new(format!(
                "missing field `type` (one of {TYPES})"
            )))
        }
        Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(v) => return Err(expected("type", "a string", v)),
    };
    let ts_ms = event_time(m, env, unit)?;
    let context = merged_context(m, env)?;
    let records = match kind.as_str() {
        "track" | "page" | "screen" => {
            let ids = message_ids(m, &context, None, rules)?;
            let (event, order_completed) = match kind.as_str() {
                "track" => {
                    let name = req_string(m, "event")?;
                    let mapped = track_event_name(&name);
                    let order_completed =
                        mapped == "purchase" && !name.eq_ignore_ascii_case("purchase");
                    (mapped.to_string(), order_completed)
                }
                "page" => ("page_view".to_string(), false),
                _ => ("screen_view".to_string(), false),
            };
            let props = match get(m, "properties") {
                None => Obj::new(),
                Some(Value::Object(p)) => p.clone(),
                Some(v) => return Err(expected("properties", "an object", v)),
            };
            let txn = if order_completed {
                Some(Record::Txn(transaction(ts_ms, &ids, &props, projection)?))
            } else {
                None
            };
            let web = web_event(m, &kind, event, ts_ms, ids, &props, &context, projection)?;
            std::iter::once(Record::Web(web)).chain(txn).collect()
        }
        "identify" => {
            let traits = match get(m, "traits") {
                None => None,
                Some(Value::Object(t)) => Some(t),
                Some(v) => return Err(expected("traits", "an object", v)),
            };
            let ids = message_ids(m, &context, traits, rules)?;
            let mut attrs = Fields::new();
            if let Some(t) = traits {
                flatten("traits.", t, "", &Keep::All, &mut attrs)?;
            }
            profile_records(ts_ms, &ids, at_time(attrs, ts_ms))
        }
        "alias" => {
            let previous = id_text(m, "previousId")?;
            let user = id_text(m, "userId")?;
            let anonymous = match get(m, "anonymousId") {
                Some(v) => Some(id_text_of("anonymousId", v)?),
                None => None,
            };
            // `previousId` is the anonymous id when it is this message's
            // anonymous id, else an earlier user id.
            let prev_field = if anonymous.as_deref() == Some(previous.as_str()) {
                "anonymous_id"
            } else {
                "user_id"
            };
            let ids = make_ids(
                &[
                    ("previousId".to_string(), prev_field, previous),
                    ("userId".to_string(), "user_id", user),
                ],
                rules,
                "`previousId` and `userId`",
            )?;
            profile_records(ts_ms, &ids, Vec::new())
        }
        "group" => {
            let group = id_text(m, "groupId")?;
            let ids = message_ids(m, &context, None, rules)?;
            let mut attrs = Fields::new();
            attrs.insert("group_id".to_string(), Scalar::Str(group));
            match get(m, "traits") {
                None => {}
                Some(Value::Object(t)) => flatten("traits.", t, "group.", &Keep::All, &mut attrs)?,
                Some(v) => return Err(expected("traits", "an object", v)),
            }
            profile_records(ts_ms, &ids, at_time(attrs, ts_ms))
        }
        other => {
            return Err(DecodeError::new(format!(
                "field `type`: unknown message type {other:?}; expected one of {TYPES}"
            )))
        }
    };
    for r in &records {
        check_identifiers(r)?;
    }
    Ok(Decoded { ts_ms, records })
}

/// Attributes all set at `ts_ms`.
fn at_time(attrs: Fields, ts_ms: i64) -> Vec<(String, Scalar, i64)> {
    attrs.into_iter().map(|(k, v)| (k, v, ts_ms)).collect()
}

/// The message's event time (see the module documentation).
fn event_time(m: &Obj, env: Option<&Obj>, unit: TimeUnit) -> Result<i64, DecodeError> {
    const OWN: [&str; 4] = ["timestamp", "originalTimestamp", "sentAt", "receivedAt"];
    let found = OWN
        .iter()
        .find_map(|k| get(m, k).map(|v| (v, k.to_string())))
        .or_else(|| {
            let env = env?;
            ["sentAt", "receivedAt"]
                .iter()
                .find_map(|k| get(env, k).map(|v| (v, format!("batch.{k}"))))
        });
    let Some((v, name)) = found else {
        return Err(DecodeError::new(
            "no event time: expected `timestamp`, `originalTimestamp`, `sentAt` or `receivedAt`",
        ));
    };
    parse_time_as(v, unit).map_err(|e| DecodeError::new(format!("field `{name}`: {e}")))
}

/// The message's `context` over the batch's (the message's keys win).
fn merged_context(m: &Obj, env: Option<&Obj>) -> Result<Obj, DecodeError> {
    let own = |o: &Obj, name: &str| match get(o, "context") {
        None => Ok(None),
        Some(Value::Object(c)) => Ok(Some(c.clone())),
        Some(v) => Err(expected(name, "an object", v)),
    };
    let mut context = match env {
        Some(e) => own(e, "batch.context")?.unwrap_or_default(),
        None => Obj::new(),
    };
    if let Some(c) = own(m, "context")? {
        context.extend(c);
    }
    Ok(context)
}

/// The identifiers of a message: `userId`, `anonymousId`, and traits
/// (`traits` of an identify, `context.traits`) named like identifier fields.
fn message_ids(
    m: &Obj,
    context: &Obj,
    traits: Option<&Obj>,
    rules: &IdentityRules,
) -> Result<Vec<Ident>, DecodeError> {
    let mut found: Vec<IdField<'_>> = Vec::new();
    for (name, field) in [("userId", "user_id"), ("anonymousId", "anonymous_id")] {
        if let Some(v) = get(m, name) {
            found.push((name.to_string(), field, candidate_text(name, v)?));
        }
    }
    if let Some(t) = traits {
        ids_named_in("traits.", t, rules, present, &mut found)?;
    }
    if let Some(Value::Object(t)) = get(context, "traits") {
        ids_named_in("context.traits.", t, rules, present, &mut found)?;
    }
    make_ids(&found, rules, ID_FIELDS)
}

/// The web event of a track, page or screen message.
#[allow(clippy::too_many_arguments)]
fn web_event(
    m: &Obj,
    kind: &str,
    event: String,
    ts_ms: i64,
    ids: Vec<Ident>,
    props: &Obj,
    context: &Obj,
    projection: &Projection,
) -> Result<WebEvent, DecodeError> {
    let mut properties = Fields::new();
    flatten(
        "properties.",
        props,
        "",
        &projection.properties,
        &mut properties,
    )?;
    if kind != "track" {
        // A page's or screen's own name and category.
        for key in ["name", "category"] {
            if let (Some(v), false) = (get(m, key), props.contains_key(key)) {
                if projection.properties.keeps(key) {
                    properties.insert(key.to_string(), to_scalar("", key, v)?);
                }
            }
        }
    }
    let mut ctx = Fields::new();
    flatten("context.", context, "", &Keep::All, &mut ctx)?;
    add_short_names(&mut ctx, &CONTEXT_SHORT);
    // The message's other fields (messageId, integrations, ...) are context
    // too, unless the context has the name.
    let mut other = Fields::new();
    for (k, v) in m {
        if MESSAGE_FIELDS.contains(&k.as_str()) || ctx.contains_key(k) {
            continue;
        }
        match v {
            Value::Object(inner) => flatten("", inner, &format!("{k}."), &Keep::All, &mut other)?,
            v => {
                other.insert(k.clone(), to_scalar("", k, v)?);
            }
        }
    }
    for (k, v) in other {
        ctx.entry(k).or_insert(v);
    }
    if kind == "page" {
        // Server-side libraries send the page only in its properties.
        for (short, prop) in [
            ("page", "path"),
            ("url", "url"),
            ("referrer", "referrer"),
            ("title", "title"),
        ] {
            if let (false, Some(v)) = (ctx.contains_key(short), get(props, prop)) {
                ctx.insert(short.to_string(), to_scalar("properties.", prop, v)?);
            }
        }
    }
    ctx.retain(|k, _| projection.context.keeps(k));
    let item = match product(props)? {
        Some((p, shown)) => product_fields(p, &shown, &projection.item)?,
        None => Fields::new(),
    };
    Ok(WebEvent {
        ts_ms,
        event,
        ids,
        item,
        context: ctx,
        properties,
    })
}

/// The product of an event: the first of `products`, else the properties
/// themselves if they name a product (`product_id` or `sku`).
fn product(props: &Obj) -> Result<Option<(&Obj, String)>, DecodeError> {
    match get(props, "products") {
        Some(Value::Array(list)) => match list.first() {
            None => Ok(None),
            Some(Value::Object(p)) => Ok(Some((p, "properties.products[0].".to_string()))),
            Some(v) => Err(expected("properties.products[0]", "an object", v)),
        },
        Some(v) => Err(expected("properties.products", "an array", v)),
        None if get(props, "product_id").is_some() || get(props, "sku").is_some() => {
            Ok(Some((props, "properties.".to_string())))
        }
        None => Ok(None),
    }
}

/// A product's fields, with `id` from `product_id` (else `sku`) when it has
/// none.
fn product_fields(p: &Obj, shown: &str, keep: &Keep) -> Result<Fields, DecodeError> {
    let mut all = Fields::new();
    flatten(shown, p, "", &Keep::All, &mut all)?;
    add_short_names(&mut all, &PRODUCT_SHORT);
    all.retain(|k, _| keep.keeps(k));
    Ok(all)
}

/// The transaction of an `Order Completed`: `order_id`, `total` (else
/// `revenue`) as the amount, `currency`, `products` as items (`quantity` as
/// `qty`); the other properties are the transaction's properties.
fn transaction(
    ts_ms: i64,
    ids: &[Ident],
    props: &Obj,
    projection: &Projection,
) -> Result<crate::model::record::Transaction, DecodeError> {
    let order_id = match get(props, "order_id") {
        None => {
            return Err(DecodeError::new(
                "missing field `properties.order_id` (an Order Completed is a transaction and needs its order id)",
            ))
        }
        Some(v) => id_text_of("properties.order_id", v)?,
    };
    let Some((key, v)) = ["total", "revenue"]
        .iter()
        .find_map(|k| get(props, k).map(|v| (*k, v)))
    else {
        return Err(DecodeError::new(
            "missing field `properties.total` (or `properties.revenue`): the order's amount",
        ));
    };
    let amount = amount_of(&format!("properties.{key}"), v)?;
    let currency = currency_of("properties.currency", get(props, "currency"))?;
    let items = match get(props, "products") {
        None => (Vec::new(), 0),
        Some(Value::Array(list)) => order_items(
            "properties.products",
            list,
            "quantity",
            projection.items,
            product_fields,
        )?,
        Some(v) => return Err(expected("properties.products", "an array", v)),
    };
    let mut properties = Fields::new();
    flatten_except(
        "properties.",
        props,
        "",
        &["order_id", "total", "revenue", "currency", "products"],
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

    fn decode_all(line: &str) -> Vec<Result<Vec<Record>, String>> {
        decode(line, &rules(), TimeUnit::Auto, &Projection::ALL)
            .unwrap()
            .into_iter()
            .map(|m| m.decoded.map(|d| d.records).map_err(|e| e.reason))
            .collect()
    }

    fn one(line: &str) -> Vec<Record> {
        let mut all = decode_all(line);
        assert_eq!(all.len(), 1);
        all.remove(0).unwrap()
    }

    #[test]
    fn product_viewed_is_view_item_with_the_product_as_item() {
        let r = one(
            r#"{"type":"track","event":"Product Viewed","userId":"u1","anonymousId":"a1",
            "timestamp":"2026-03-02T10:00:00.250Z",
            "properties":{"product_id":"SKU-1","price":120.5,"category":"outdoor","brand":"Acme","dims":{"w":2}},
            "context":{"device":{"type":"mobile"},"location":{"country":"US"},"page":{"path":"/p/SKU-1","referrer":"https://g.co/"},"sessionId":"s9","ip":"1.2.3.4"},
            "messageId":"m-1","integrations":{"All":true}}"#,
        );
        assert_eq!(r.len(), 1);
        let w = web(&r[0]);
        assert_eq!(w.event, "view_item");
        assert_eq!(w.ts_ms, 1_772_445_600_250);
        assert_eq!(ids(&r[0]), ["user:u1", "anon:a1"]);
        let path = |p: &[&str]| w.field(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(path(&["item", "id"]), Scalar::Str("SKU-1".into()));
        assert_eq!(path(&["item", "price"]), Scalar::Num(120.5));
        assert_eq!(path(&["item", "category"]), Scalar::Str("outdoor".into()));
        assert_eq!(path(&["item", "dims.w"]), Scalar::Num(2.0));
        assert_eq!(path(&["properties", "brand"]), Scalar::Str("Acme".into()));
        assert_eq!(path(&["context", "device"]), Scalar::Str("mobile".into()));
        assert_eq!(
            path(&["context", "device.type"]),
            Scalar::Str("mobile".into())
        );
        assert_eq!(path(&["context", "country"]), Scalar::Str("US".into()));
        assert_eq!(path(&["context", "page"]), Scalar::Str("/p/SKU-1".into()));
        assert_eq!(
            path(&["context", "referrer"]),
            Scalar::Str("https://g.co/".into())
        );
        assert_eq!(path(&["context", "session_id"]), Scalar::Str("s9".into()));
        assert_eq!(path(&["context", "ip"]), Scalar::Str("1.2.3.4".into()));
        assert_eq!(path(&["context", "messageId"]), Scalar::Str("m-1".into()));
        assert_eq!(path(&["context", "integrations.All"]), Scalar::Bool(true));
    }

    #[test]
    fn order_completed_is_a_purchase_and_a_transaction() {
        let r = one(
            r#"{"type":"track","event":"Order Completed","userId":"u1","timestamp":1772445600000,
            "properties":{"order_id":"o-7","total":"150.25","revenue":140,"currency":"usd","coupon":"X",
            "products":[{"product_id":"A","price":100,"quantity":1,"category":"outdoor"},{"sku":"B","price":25.125,"quantity":2}]}}"#,
        );
        assert_eq!(r.len(), 2);
        let w = web(&r[0]);
        assert_eq!(w.event, "purchase");
        assert_eq!(w.item.get("id"), Some(&Scalar::Str("A".into())));
        let Record::Txn(t) = &r[1] else {
            panic!("{r:?}")
        };
        assert_eq!(t.order_id, "o-7");
        assert_eq!(t.amount, 150.25);
        assert_eq!(t.currency.as_deref(), Some("USD"));
        assert_eq!(t.item_count, 3);
        assert_eq!(t.items[1].get("id"), Some(&Scalar::Str("B".into())));
        assert_eq!(t.items[1].get("qty"), Some(&Scalar::Num(2.0)));
        assert_eq!(t.properties.get("coupon"), Some(&Scalar::Str("X".into())));
        assert!(!t.properties.contains_key("total"));
        assert_eq!(t.ts_ms, w.ts_ms);
        assert_eq!(t.ids, w.ids);
        // Without `total`, `revenue` is the amount.
        let r = one(
            r#"{"type":"track","event":"order completed","anonymousId":"a","timestamp":1,"properties":{"order_id":9,"revenue":5}}"#,
        );
        let Record::Txn(t) = &r[1] else {
            panic!("{r:?}")
        };
        assert_eq!((t.order_id.as_str(), t.amount, t.item_count), ("9", 5.0, 0));
    }

    #[test]
    fn page_screen_and_unmapped_track_names() {
        let r = one(
            r#"{"type":"page","name":"Home","anonymousId":"a","timestamp":1,"properties":{"path":"/","url":"https://x/","referrer":"r"}}"#,
        );
        let w = web(&r[0]);
        assert_eq!(w.event, "page_view");
        assert_eq!(w.context.get("page"), Some(&Scalar::Str("/".into())));
        assert_eq!(w.context.get("referrer"), Some(&Scalar::Str("r".into())));
        assert_eq!(w.properties.get("name"), Some(&Scalar::Str("Home".into())));
        let r = one(r#"{"type":"screen","name":"Cart","userId":"u","timestamp":1}"#);
        assert_eq!(web(&r[0]).event, "screen_view");
        let r = one(r#"{"type":"track","event":" Video Played ","userId":"u","timestamp":1}"#);
        assert_eq!(web(&r[0]).event, "Video Played");
        assert_eq!(track_event_name("PRODUCT ADDED"), "add_to_cart");
    }

    #[test]
    fn identify_links_ids_and_makes_one_attribute_per_trait() {
        let r = one(
            r#"{"type":"identify","userId":"u1","anonymousId":"a1","timestamp":"2026-03-02T10:00:00Z",
            "traits":{"email":" Ann@Example.com ","tier":"gold","address":{"city":"Oslo"}}}"#,
        );
        assert_eq!(r.len(), 3, "{r:?}");
        let mut names = Vec::new();
        for rec in &r {
            let Record::Crm(c) = rec else {
                panic!("{rec:?}")
            };
            assert_eq!(ids(rec), ["user:u1", "email:ann@example.com", "anon:a1"]);
            assert_eq!(c.attributes.len(), 1);
            assert!(c.crm_id.ends_with(&c.attributes[0].0));
            names.push(c.attributes[0].clone());
        }
        assert_eq!(
            names,
            [
                ("address.city".to_string(), Scalar::Str("Oslo".into())),
                ("email".to_string(), Scalar::Str(" Ann@Example.com ".into())),
                ("tier".to_string(), Scalar::Str("gold".into())),
            ]
        );
        // Without traits: one link.
        let r = one(r#"{"type":"identify","userId":"u1","anonymousId":"a1","timestamp":1}"#);
        let Record::Crm(c) = &r[0] else { panic!() };
        assert!(c.attributes.is_empty());
        assert_eq!(ids(&r[0]), ["user:u1", "anon:a1"]);
    }

    #[test]
    fn an_empty_id_is_skipped_when_another_remains() {
        let r = one(r#"{"type":"page","userId":"u1","anonymousId":"","timestamp":1}"#);
        assert_eq!(ids(&r[0]), ["user:u1"]);
        let err = decode_all(r#"{"type":"page","anonymousId":"  ","timestamp":1}"#)
            .remove(0)
            .unwrap_err();
        assert!(
            err.starts_with("no identifier") && err.contains("anonymousId \"\" does not normalize"),
            "{err}"
        );
    }

    #[test]
    fn alias_links_the_previous_id() {
        let r = one(
            r#"{"type":"alias","previousId":"a1","anonymousId":"a1","userId":"u1","timestamp":1}"#,
        );
        assert_eq!(ids(&r[0]), ["user:u1", "anon:a1"]);
        let r = one(r#"{"type":"alias","previousId":"old","userId":"u1","timestamp":1}"#);
        assert_eq!(ids(&r[0]), ["user:old", "user:u1"]);
    }

    #[test]
    fn group_sets_group_attributes() {
        let r = one(
            r#"{"type":"group","groupId":"acme","userId":"u1","timestamp":1,"traits":{"plan":"pro"}}"#,
        );
        let attrs: Vec<_> = r
            .iter()
            .map(|rec| match rec {
                Record::Crm(c) => c.attributes[0].0.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(attrs, ["group.plan", "group_id"]);
    }

    #[test]
    fn a_batch_shares_its_context_and_time_and_keeps_good_members() {
        let all = decode_all(
            r#"{"batch":[
              {"type":"track","event":"Product Added","anonymousId":"a","properties":{"sku":"S"}},
              {"type":"track","anonymousId":"a","timestamp":5},
              42,
              {"type":"page","anonymousId":"b","context":{"device":{"type":"tablet"}},"timestamp":7}
            ],"sentAt":"2026-03-02T10:00:00Z","context":{"device":{"type":"desktop"},"library":{"name":"analytics-node"}}}"#,
        );
        assert_eq!(all.len(), 4);
        let first = all[0].as_ref().unwrap();
        let w = web(&first[0]);
        assert_eq!(
            (w.event.as_str(), w.ts_ms),
            ("add_to_cart", 1_772_445_600_000)
        );
        assert_eq!(w.item.get("id"), Some(&Scalar::Str("S".into())));
        assert_eq!(
            w.context.get("device"),
            Some(&Scalar::Str("desktop".into()))
        );
        assert_eq!(
            all[1].as_ref().unwrap_err(),
            "batch[1]: missing field `event`"
        );
        assert_eq!(
            all[2].as_ref().unwrap_err(),
            "batch[2]: expected a message (a JSON object), found number"
        );
        let w = web(&all[3].as_ref().unwrap()[0]);
        assert_eq!(w.context.get("device"), Some(&Scalar::Str("tablet".into())));
        // An array of messages is a batch too.
        assert_eq!(
            decode_all(r#"[{"type":"page","userId":"u","timestamp":1}]"#).len(),
            1
        );
    }

    #[test]
    fn bad_messages_say_which_field_and_why() {
        let err = |line: &str| decode_all(line).remove(0).unwrap_err();
        assert_eq!(
            err(r#"{"event":"x","userId":"u","timestamp":1}"#),
            format!("missing field `type` (one of {TYPES})")
        );
        assert!(err(r#"{"type":"click","userId":"u","timestamp":1}"#)
            .starts_with("field `type`: unknown message type \"click\""));
        assert!(err(r#"{"type":"page","userId":"u"}"#).starts_with("no event time"));
        assert!(
            err(r#"{"type":"page","userId":"u","timestamp":"yesterday"}"#)
                .starts_with("field `timestamp`: ")
        );
        assert!(err(r#"{"type":"page","timestamp":1}"#).starts_with("no identifier"));
        assert!(err(r#"{"type":"page","userId":{"a":1},"timestamp":1}"#)
            .starts_with("field `userId`: expected a string"));
        assert_eq!(
            err(r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":1,"properties":{"total":3}}"#),
            "missing field `properties.order_id` (an Order Completed is a transaction and needs its order id)"
        );
        assert!(err(r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":1,"properties":{"order_id":"o","total":"lots"}}"#)
            .starts_with("field `properties.total`: expected a number"));
        assert!(err(r#"{"type":"track","event":"Order Completed","userId":"u","timestamp":1,"properties":{"order_id":"o","total":1,"products":[{"quantity":-1}]}}"#)
            .starts_with("field `properties.products[0].quantity`"));
        assert!(err(r#"{"type":"alias","userId":"u","timestamp":1}"#).contains("previousId"));
        assert!(err(r#"{"type":"group","userId":"u","timestamp":1}"#).contains("groupId"));
        assert!(
            err(r#"{"type":"track","event":"x","userId":"u\u0000v","timestamp":1}"#)
                .contains("control character")
        );
        let line = decode("{\"type\":", &rules(), TimeUnit::Auto, &Projection::ALL);
        assert!(line
            .unwrap_err()
            .reason
            .starts_with("invalid JSON at column"));
        let line = decode(
            r#"{"batch":{}}"#,
            &rules(),
            TimeUnit::Auto,
            &Projection::ALL,
        );
        assert!(line
            .unwrap_err()
            .reason
            .starts_with("field `batch`: expected an array"));
    }

    #[test]
    fn a_projection_keeps_only_what_is_read() {
        let p = Projection::reading([
            &["item".to_string(), "price".to_string()][..],
            &["context".to_string(), "device".to_string()][..],
        ]);
        let r = decode(
            r#"{"type":"track","event":"Product Viewed","userId":"u","timestamp":1,
            "properties":{"product_id":"A","price":3,"category":"c"},"context":{"device":{"type":"mobile"},"ip":"x"}}"#,
            &rules(),
            TimeUnit::Auto,
            &p,
        )
        .unwrap();
        let records = &r[0].decoded.as_ref().unwrap().records;
        let w = web(&records[0]);
        assert_eq!(w.item.keys().collect::<Vec<_>>(), ["price"]);
        assert_eq!(w.context.keys().collect::<Vec<_>>(), ["device"]);
        assert!(w.properties.is_empty());
    }
}
