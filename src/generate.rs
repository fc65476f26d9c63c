//! Synthetic, seeded, reproducible e-commerce data for segflow.
//!
//! [`generate_to`] (or [`generate_dir`]) writes three newline-delimited JSON
//! streams that together look like the raw feeds of a small online shop. The
//! same [`GenConfig`] (same seed) always produces byte-identical output.
//!
//! # Population and catalog
//!
//! * `max(50, events / 40)` people. Each has one or two anonymous cookies
//!   (`"a-<16 hex digits>"`). About 40 % are registered and have a user id
//!   (`"u<n>"`) and an email (`first.last<n>@example.com`); about 60 % of the
//!   registered people also have a CRM record (`"C<6 digits>"`), of which
//!   about 70 % have a (valid, non-555) US phone number. Activity follows a
//!   power law: a few people have many sessions.
//! * 2000 items `"SKU-<n>"` in 8 categories (`outdoor`, `electronics`,
//!   `fashion`, `home`, `books`, `beauty`, `toys`, `sports`) with a brand and
//!   a log-normal price between 3 and 1500 (about 15 % priced at 100 or more,
//!   "premium"). Item popularity is Zipf-like (s = 1.1).
//!
//! # `web.jsonl` — clickstream, exactly `events` lines
//!
//! Sessions (3–30 events, 5–120 s apart) start at increasing times over about
//! `events * 2` seconds (at most 30 days; `span_days` sets it) from `start_ms`; events of
//! concurrently open sessions are interleaved so that the stream is in time
//! order apart from the injected noise. One line per event:
//!
//! ```json
//! {"event":"view_item","ts":1772409600123,"anonymous_id":"a-0f1e2d3c4b5a6978",
//!  "user_id":"u12","item":{"id":"SKU-1","price":129.99,"category":"outdoor","brand":"Trailco"},
//!  "context":{"session_id":"s1","device":"mobile","country":"US","referrer":"google","page":"/p/SKU-1"}}
//! ```
//!
//! * `event` is one of `page_view`, `view_item` (most common), `add_to_cart`
//!   (adds `"qty"`), `begin_checkout` (adds `"cart":{"items":n,"value":x}`),
//!   `purchase` (adds `"order_id"`, `"value"`, `"currency"`, `"items":[..]`)
//!   and `login`. A `login` carries both `anonymous_id` and `user_id` (and
//!   sometimes a messy `email`): it links the cookie to the person. Every
//!   later event of that session carries `user_id` too; some sessions of
//!   registered people are authenticated from their first event.
//! * Categories are sticky within a session and people have a favourite
//!   category; some sessions prefer premium items.
//! * `ts` is usually epoch milliseconds (number), about 5 % an RFC 3339 string
//!   in the person's local offset (`"2026-03-02T01:02:03.123+01:00"`) and about
//!   3 % whole epoch seconds (number).
//! * Noise: about 1 % of events are out of order (`ts` 1–60 s too early),
//!   about 0.05 % are late (`ts` 2–6 h too early), and about one line per
//!   `malformed_every` is malformed, rotating between truncated JSON, a missing
//!   `ts`, `"ts":"yesterday"` and `"event":42`.
//!
//! # `crm.jsonl` — CRM snapshots, in time order
//!
//! ```json
//! {"crm_id":"C000123","email":"  John.Doe42@Example.COM ","phone":"(415) 234-0132",
//!  "updated_at":1772409600000,"attributes":{"tier":"gold","first_name":"John","country":"US","opt_in":true}}
//! ```
//!
//! Emails are messy (random case, leading/trailing spaces); phones use several
//! formats for the same number (`"+1 415 234 0132"`, `"(415) 234-0132"`,
//! `"415.234.0132"`, `"+14152340132"`, `"415-234-0132"`); `phone` is absent
//! for people without one. About 10 % are gold. About 20 % of people get a
//! later second record (tier change) and about 2 % a later
//! `{"crm_id":..,"deleted":true,"updated_at":..}`. `updated_at` is epoch
//! milliseconds or an RFC 3339 string.
//!
//! # `transactions.jsonl` — orders from the shop backend
//!
//! ```json
//! {"order_id":"o7","ts":1772409612345,"crm_id":"C000123","amount":259.98,"currency":"USD",
//!  "items":[{"id":"SKU-1","qty":2,"price":129.99,"category":"outdoor"}]}
//! ```
//!
//! One per web `purchase` of an identified buyer (same `order_id`, a few
//! seconds after it). The buyer is named by exactly one of `crm_id` (half of
//! the CRM people's orders), a messy `email` (when the email is known from CRM
//! or an earlier login) or `user_id`. Anonymous purchases have no transaction.
//! `amount` is the sum of `qty * price`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Default start of the generated data: 2026-03-02T00:00:00Z in epoch milliseconds.
pub const DEFAULT_START_MS: i64 = 1_772_409_600_000;

/// Number of catalog items.
pub const CATALOG_SIZE: usize = 2000;

/// Item categories of the catalog.
pub const CATEGORIES: [&str; 8] = [
    "outdoor",
    "electronics",
    "fashion",
    "home",
    "books",
    "beauty",
    "toys",
    "sports",
];

/// Price (in cents) from which an item counts as premium.
pub const PREMIUM_CENTS: u64 = 10_000;

/// Share of catalog items per category (same order as [`CATEGORIES`]).
const CAT_WEIGHTS: [f64; 8] = [0.14, 0.14, 0.18, 0.14, 0.12, 0.10, 0.08, 0.10];
/// Per-category shift of the log-price.
const CAT_PRICE_MU: [f64; 8] = [0.3, 0.8, 0.0, 0.2, -0.9, -0.4, -0.3, 0.1];
const BRANDS: [&str; 16] = [
    "Trailco",
    "Northpeak",
    "Voltix",
    "Lumen",
    "Threadly",
    "Marlowe",
    "Casa",
    "Hearthly",
    "Pageturn",
    "Inkwell",
    "Glowup",
    "Velvia",
    "Playroo",
    "Brickly",
    "Stride",
    "Apexa",
];
const DEVICES: [&str; 3] = ["mobile", "desktop", "tablet"];
const DEVICE_CDF: [f64; 3] = [0.55, 0.93, 1.0];
const REFERRERS: [&str; 8] = [
    "direct",
    "google",
    "facebook",
    "instagram",
    "newsletter",
    "bing",
    "tiktok",
    "affiliate",
];
const REFERRER_CDF: [f64; 8] = [0.30, 0.62, 0.72, 0.80, 0.88, 0.92, 0.97, 1.0];
/// (country code, UTC offset in minutes used for local RFC 3339 timestamps, cumulative weight)
const COUNTRIES: [(&str, i32, f64); 10] = [
    ("US", -300, 0.45),
    ("CA", -300, 0.52),
    ("GB", 0, 0.62),
    ("DE", 60, 0.70),
    ("FR", 60, 0.76),
    ("AU", 660, 0.81),
    ("IN", 330, 0.88),
    ("BR", -180, 0.93),
    ("JP", 540, 0.97),
    ("MX", -360, 1.0),
];
const FIRST_NAMES: [&str; 24] = [
    "John", "Mary", "James", "Linda", "Robert", "Sofia", "Michael", "Emma", "David", "Olivia",
    "Daniel", "Ava", "Lucas", "Mia", "Noah", "Chloe", "Ethan", "Grace", "Liam", "Hannah", "Omar",
    "Priya", "Kenji", "Elena",
];
const LAST_NAMES: [&str; 24] = [
    "Smith", "Johnson", "Garcia", "Miller", "Davis", "Lopez", "Wilson", "Anderson", "Thomas",
    "Moore", "Martin", "Lee", "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright",
    "Scott", "Green", "Baker", "Nguyen", "Patel",
];
const EMAIL_DOMAINS: [&str; 3] = ["example.com", "example.org", "example.net"];
const AREA_CODES: [u16; 12] = [415, 212, 646, 303, 312, 617, 206, 512, 305, 213, 718, 404];
const TIERS: [&str; 3] = ["gold", "silver", "bronze"];

const MAX_SPAN_MS: i64 = 30 * 86_400_000;
const FLUSH_AT: usize = 1 << 16;

/// Configuration of one generation run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenConfig {
    /// Number of web events (lines of `web.jsonl`, malformed ones included).
    pub events: u64,
    /// Seed of the ChaCha8 random generator; same seed, same bytes.
    pub seed: u64,
    /// Start of the data set in epoch milliseconds (default [`DEFAULT_START_MS`]).
    pub start_ms: i64,
    /// About one malformed web line per this many events (default 5000; 0 = none).
    pub malformed_every: u64,
    /// Number of people to draw visitors from (`None`: one per 40 events).
    /// Their popularity is skewed (Zipf-like), so not all of them visit;
    /// more people per event gives more profiles (a large state from a
    /// small stream).
    pub people: Option<u64>,
    /// How many days the sessions are spread over (`None`: `events × 2`
    /// seconds, at least a minute and at most 30 days). A longer span
    /// gives data for long windows (365-day spend, 60 days without an
    /// order) from few events.
    pub span_days: Option<u64>,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 100_000,
            seed: 42,
            start_ms: DEFAULT_START_MS,
            malformed_every: 5000,
            people: None,
            span_days: None,
        }
    }
}

/// Counts of what a generation run wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Lines written to the web stream (equals `GenConfig::events`).
    pub web_events: u64,
    /// Lines written to the CRM stream.
    pub crm_records: u64,
    /// Lines written to the transactions stream.
    pub transactions: u64,
    /// Malformed web lines (included in `web_events`).
    pub malformed: u64,
    /// Web events whose `ts` was moved 2–6 hours back.
    pub late: u64,
    /// Web events whose `ts` was moved 1–60 seconds back.
    pub out_of_order: u64,
    /// Total bytes written over all three streams.
    pub bytes: u64,
}

// ---------------------------------------------------------------------------
// small writers

#[inline]
fn put_u64(buf: &mut Vec<u8>, v: u64) {
    let mut b = itoa::Buffer::new();
    buf.extend_from_slice(b.format(v).as_bytes());
}

#[inline]
fn put_i64(buf: &mut Vec<u8>, v: i64) {
    if v < 0 {
        buf.push(b'-');
    }
    put_u64(buf, v.unsigned_abs());
}

#[inline]
fn put_2(buf: &mut Vec<u8>, v: u32) {
    buf.push(b'0' + (v / 10 % 10) as u8);
    buf.push(b'0' + (v % 10) as u8);
}

/// Writes cents as a decimal number with two fractional digits (`12999` -> `129.99`).
#[inline]
fn put_cents(buf: &mut Vec<u8>, cents: u64) {
    put_u64(buf, cents / 100);
    buf.push(b'.');
    put_2(buf, (cents % 100) as u32);
}

/// Civil date (year, month 1-12, day 1-31) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends `ms` (epoch milliseconds) as an RFC 3339 string body (no quotes)
/// in local time at `off_min` minutes from UTC, e.g. `2026-03-02T02:02:03.123+01:00`.
/// An offset of 0 is written as `+00:00`.
pub fn write_rfc3339(buf: &mut Vec<u8>, ms: i64, off_min: i32) {
    let local = ms + off_min as i64 * 60_000;
    let days = local.div_euclid(86_400_000);
    let rem = local.rem_euclid(86_400_000) as u32;
    let (y, mo, d) = civil_from_days(days);
    let y = y.clamp(0, 9999) as u32;
    put_2(buf, y / 100);
    put_2(buf, y % 100);
    buf.push(b'-');
    put_2(buf, mo);
    buf.push(b'-');
    put_2(buf, d);
    buf.push(b'T');
    put_2(buf, rem / 3_600_000);
    buf.push(b':');
    put_2(buf, rem / 60_000 % 60);
    buf.push(b':');
    put_2(buf, rem / 1000 % 60);
    buf.push(b'.');
    let milli = rem % 1000;
    buf.push(b'0' + (milli / 100) as u8);
    put_2(buf, milli % 100);
    buf.push(if off_min < 0 { b'-' } else { b'+' });
    let a = off_min.unsigned_abs();
    put_2(buf, a / 60);
    buf.push(b':');
    put_2(buf, a % 60);
}

fn put_hex16(buf: &mut Vec<u8>, v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..16).rev() {
        buf.push(HEX[((v >> (i * 4)) & 0xf) as usize]);
    }
}

/// Writes a messy variant of a clean lower-case email (random case style,
/// optional leading/trailing spaces); no quotes.
fn put_messy_email(buf: &mut Vec<u8>, email: &[u8], rng: &mut ChaCha8Rng) {
    let style = rng.random_range(0..5u32);
    let r: u32 = rng.random();
    let lead = r & 7;
    let trail = (r >> 3) & 7;
    if lead == 0 {
        buf.extend_from_slice(b"  ");
    } else if lead == 1 {
        buf.push(b' ');
    }
    match style {
        0 => buf.extend_from_slice(email),
        1 => {
            // Title case of alpha runs, upper-case top-level domain.
            let tld = email
                .iter()
                .rposition(|&c| c == b'.')
                .unwrap_or(email.len());
            let mut prev_alpha = false;
            for (i, &c) in email.iter().enumerate() {
                let alpha = c.is_ascii_alphabetic();
                if i > tld || (alpha && !prev_alpha) {
                    buf.push(c.to_ascii_uppercase());
                } else {
                    buf.push(c);
                }
                prev_alpha = alpha;
            }
        }
        2 => buf.extend(email.iter().map(|c| c.to_ascii_uppercase())),
        3 => {
            let mut bits: u64 = rng.random();
            for &c in email {
                buf.push(if bits & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                });
                bits = bits.rotate_right(1);
            }
        }
        _ => {
            // Upper-case local part only.
            let at = email.iter().position(|&c| c == b'@').unwrap_or(email.len());
            buf.extend(email[..at].iter().map(|c| c.to_ascii_uppercase()));
            buf.extend_from_slice(&email[at..]);
        }
    }
    if trail == 0 {
        buf.push(b' ');
    } else if trail == 1 {
        buf.extend_from_slice(b"   ");
    }
}

fn put_phone(buf: &mut Vec<u8>, (area, exch, line): (u16, u16, u16), style: u32) {
    let mut a = [0u8; 3];
    let mut e = [0u8; 3];
    let mut l = [0u8; 4];
    for (i, d) in a.iter_mut().enumerate() {
        *d = b'0' + (area / 10u16.pow(2 - i as u32) % 10) as u8;
    }
    for (i, d) in e.iter_mut().enumerate() {
        *d = b'0' + (exch / 10u16.pow(2 - i as u32) % 10) as u8;
    }
    for (i, d) in l.iter_mut().enumerate() {
        *d = b'0' + (line / 10u16.pow(3 - i as u32) % 10) as u8;
    }
    let parts: [&[u8]; 7] = match style {
        0 => [b"+1 ", &a, b" ", &e, b" ", &l, b""],
        1 => [b"(", &a, b") ", &e, b"-", &l, b""],
        2 => [b"", &a, b".", &e, b".", &l, b""],
        3 => [b"+1", &a, b"", &e, b"", &l, b""],
        _ => [b"", &a, b"-", &e, b"-", &l, b""],
    };
    for p in parts {
        buf.extend_from_slice(p);
    }
}

// ---------------------------------------------------------------------------
// world

struct Item {
    cat: u8,
    price_cents: u64,
    /// `,"item":{"id":..,"price":..,"category":..,"brand":..}`
    view_frag: Box<[u8]>,
    /// `/p/SKU-n`
    page: Box<[u8]>,
    /// `{"id":"SKU-n","qty":`
    line_a: Box<[u8]>,
    /// `,"price":..,"category":..}`
    line_b: Box<[u8]>,
}

/// Items with a cumulative popularity distribution.
struct Picker {
    items: Vec<u32>,
    cdf: Vec<f64>,
}

impl Picker {
    fn new(items: Vec<u32>, weight: impl Fn(u32) -> f64) -> Picker {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(items.len());
        for &i in &items {
            acc += weight(i);
            cdf.push(acc);
        }
        Picker { items, cdf }
    }
    #[inline]
    fn pick(&self, rng: &mut ChaCha8Rng) -> u32 {
        let total = *self.cdf.last().expect("non-empty picker");
        let x = rng.random::<f64>() * total;
        let i = self
            .cdf
            .partition_point(|&c| c <= x)
            .min(self.items.len() - 1);
        self.items[i]
    }
}

struct User {
    cookies: [Box<[u8]>; 2],
    n_cookies: u8,
    uid: Option<Box<[u8]>>,
    email: Option<Box<[u8]>>,
    crm: Option<u32>,
    first: u8,
    country: u8,
    device: u8,
    fav_cat: u8,
}

struct CrmPerson {
    user: u32,
    id: Box<[u8]>,
    phone: Option<(u16, u16, u16)>,
    tier: u8,
    opt_in: bool,
}

struct World {
    items: Vec<Item>,
    all: Picker,
    by_cat: Vec<Picker>,
    premium_by_cat: Vec<Picker>,
    users: Vec<User>,
    user_cdf: Vec<f64>,
    crm: Vec<CrmPerson>,
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn pick_cdf(cdf: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let x = rng.random::<f64>() * cdf[cdf.len() - 1];
    cdf.partition_point(|&c| c <= x).min(cdf.len() - 1)
}

fn build_world(cfg: &GenConfig, rng: &mut ChaCha8Rng) -> World {
    // Catalog: popularity rank r has weight 1/(r+1)^1.1; SKU numbers shuffled.
    let mut sku: Vec<u32> = (1..=CATALOG_SIZE as u32).collect();
    sku.shuffle(rng);
    let cat_cdf: Vec<f64> = CAT_WEIGHTS
        .iter()
        .scan(0.0, |a, w| {
            *a += w;
            Some(*a)
        })
        .collect();
    let mut items = Vec::with_capacity(CATALOG_SIZE);
    for &n in &sku {
        let cat = pick_cdf(&cat_cdf, rng);
        let x = (3.45 + CAT_PRICE_MU[cat] + 1.1 * normal(rng))
            .exp()
            .clamp(3.0, 1500.0);
        let mut cents = if x < 20.0 {
            (x * 100.0).round() as u64
        } else {
            let endings = [99u64, 99, 95, 0, 49];
            x.floor() as u64 * 100 + endings[rng.random_range(0..endings.len())]
        };
        cents = cents.clamp(300, 150_000);
        let brand = BRANDS[cat * 2 + rng.random_range(0..2usize)];
        let id = format!("SKU-{n}");
        let mut price = Vec::new();
        put_cents(&mut price, cents);
        let price = String::from_utf8(price).expect("ascii");
        let c = CATEGORIES[cat];
        items.push(Item {
            cat: cat as u8,
            price_cents: cents,
            view_frag: format!(
                ",\"item\":{{\"id\":\"{id}\",\"price\":{price},\"category\":\"{c}\",\"brand\":\"{brand}\"}}"
            )
            .into_bytes()
            .into(),
            page: format!("/p/{id}").into_bytes().into(),
            line_a: format!("{{\"id\":\"{id}\",\"qty\":").into_bytes().into(),
            line_b: format!(",\"price\":{price},\"category\":\"{c}\"}}").into_bytes().into(),
        });
    }
    let pop = |i: u32| 1.0 / ((i + 1) as f64).powf(1.1);
    let all = Picker::new((0..CATALOG_SIZE as u32).collect(), pop);
    let mut by_cat = Vec::new();
    let mut premium_by_cat = Vec::new();
    for c in 0..CATEGORIES.len() as u8 {
        let list: Vec<u32> = (0..CATALOG_SIZE as u32)
            .filter(|&i| items[i as usize].cat == c)
            .collect();
        let mut prem: Vec<u32> = list
            .iter()
            .copied()
            .filter(|&i| items[i as usize].price_cents >= PREMIUM_CENTS)
            .collect();
        if prem.is_empty() {
            prem = list.clone();
        }
        by_cat.push(Picker::new(list, pop));
        premium_by_cat.push(Picker::new(prem, pop));
    }

    // People.
    let n_users = cfg.people.unwrap_or(cfg.events / 40).max(50) as usize;
    let mut users = Vec::with_capacity(n_users);
    let mut crm = Vec::new();
    let mut user_cdf = Vec::with_capacity(n_users);
    let mut acc = 0.0;
    for i in 0..n_users {
        acc += 1.0 / ((i + 1) as f64).powf(0.8);
        user_cdf.push(acc);
        let mut cookies: [Box<[u8]>; 2] = [Box::default(), Box::default()];
        for c in cookies.iter_mut() {
            let mut b = Vec::with_capacity(18);
            b.extend_from_slice(b"a-");
            put_hex16(&mut b, rng.random());
            *c = b.into();
        }
        let n_cookies = if rng.random_bool(0.35) { 2 } else { 1 };
        let first = rng.random_range(0..FIRST_NAMES.len()) as u8;
        let last = rng.random_range(0..LAST_NAMES.len());
        let country = pick_cdf(&COUNTRIES.map(|c| c.2), rng) as u8;
        let device = pick_cdf(&DEVICE_CDF, rng) as u8;
        let fav_cat = items[all.pick(rng) as usize].cat;
        let registered = rng.random_bool(0.4);
        let (uid, email, crm_idx) = if registered {
            let uid = format!("u{}", i + 1).into_bytes().into();
            let email = format!(
                "{}.{}{}@{}",
                FIRST_NAMES[first as usize],
                LAST_NAMES[last],
                i + 1,
                EMAIL_DOMAINS[rng.random_range(0..EMAIL_DOMAINS.len())]
            )
            .to_ascii_lowercase()
            .into_bytes()
            .into();
            let crm_idx = if rng.random_bool(0.6) {
                let k = crm.len() as u32;
                let phone = if rng.random_bool(0.7) {
                    let area = AREA_CODES[rng.random_range(0..AREA_CODES.len())];
                    let exch = loop {
                        let e: u16 = rng.random_range(200..1000);
                        if e != 555 && e % 100 != 11 {
                            break e;
                        }
                    };
                    Some((area, exch, rng.random_range(0..10_000u16)))
                } else {
                    None
                };
                let t = rng.random::<f64>();
                let tier = if t < 0.10 {
                    0
                } else if t < 0.40 {
                    1
                } else {
                    2
                };
                crm.push(CrmPerson {
                    user: i as u32,
                    id: format!("C{:06}", k + 1).into_bytes().into(),
                    phone,
                    tier,
                    opt_in: rng.random_bool(0.8),
                });
                Some(k)
            } else {
                None
            };
            (Some(uid), Some(email), crm_idx)
        } else {
            (None, None, None)
        };
        users.push(User {
            cookies,
            n_cookies,
            uid,
            email,
            crm: crm_idx,
            first,
            country,
            device,
            fav_cat,
        });
    }
    World {
        items,
        all,
        by_cat,
        premium_by_cat,
        users,
        user_cdf,
        crm,
    }
}

fn span_ms(cfg: &GenConfig) -> i64 {
    match cfg.span_days {
        Some(days) => (days.clamp(1, 100 * 365) * 86_400_000) as i64,
        None => (cfg.events.min(i64::MAX as u64 / 2000) as i64 * 2000).clamp(60_000, MAX_SPAN_MS),
    }
}

/// Writes the time either as epoch ms (number) or RFC 3339 string.
fn put_time(buf: &mut Vec<u8>, ms: i64, off_min: i32, rfc: bool) {
    if rfc {
        buf.push(b'"');
        write_rfc3339(buf, ms, off_min);
        buf.push(b'"');
    } else {
        put_i64(buf, ms);
    }
}

fn write_crm<W: Write>(
    cfg: &GenConfig,
    world: &mut World,
    rng: &mut ChaCha8Rng,
    out: &mut W,
    stats: &mut GenStats,
) -> io::Result<()> {
    let span = span_ms(cfg);
    let end = cfg.start_ms + span;
    // (time, person, kind: 0 first record, 1 update, 2 deletion)
    let mut recs: Vec<(i64, u32, u8)> = Vec::with_capacity(world.crm.len() * 5 / 4);
    for k in 0..world.crm.len() as u32 {
        let t0 = cfg.start_ms + rng.random_range(0..span);
        recs.push((t0, k, 0));
        let mut last = t0;
        if rng.random_bool(0.2) {
            last = t0 + rng.random_range(1..=(end - t0).max(1));
            recs.push((last, k, 1));
        }
        if rng.random_bool(0.02) {
            let t = last + rng.random_range(60_000..=(end - last).max(120_000));
            recs.push((t, k, 2));
        }
    }
    recs.sort_unstable();
    let mut buf = Vec::with_capacity(FLUSH_AT + 1024);
    for (t, k, kind) in recs {
        let rfc = rng.random_bool(0.4);
        let p = &mut world.crm[k as usize];
        let u = &world.users[p.user as usize];
        buf.extend_from_slice(b"{\"crm_id\":\"");
        buf.extend_from_slice(&p.id);
        if kind == 2 {
            buf.extend_from_slice(b"\",\"deleted\":true,\"updated_at\":");
            put_time(&mut buf, t, COUNTRIES[u.country as usize].1, rfc);
            buf.extend_from_slice(b"}\n");
        } else {
            if kind == 1 {
                p.tier = (p.tier + rng.random_range(1..3u8)) % 3;
            }
            buf.extend_from_slice(b"\",\"email\":\"");
            put_messy_email(&mut buf, u.email.as_deref().unwrap_or_default(), rng);
            buf.push(b'"');
            if let Some(ph) = p.phone {
                buf.extend_from_slice(b",\"phone\":\"");
                put_phone(&mut buf, ph, rng.random_range(0..5));
                buf.push(b'"');
            }
            buf.extend_from_slice(b",\"updated_at\":");
            put_time(&mut buf, t, COUNTRIES[u.country as usize].1, rfc);
            buf.extend_from_slice(b",\"attributes\":{\"tier\":\"");
            buf.extend_from_slice(TIERS[p.tier as usize].as_bytes());
            buf.extend_from_slice(b"\",\"first_name\":\"");
            buf.extend_from_slice(FIRST_NAMES[u.first as usize].as_bytes());
            buf.extend_from_slice(b"\",\"country\":\"");
            buf.extend_from_slice(COUNTRIES[u.country as usize].0.as_bytes());
            buf.extend_from_slice(if p.opt_in {
                b"\",\"opt_in\":true}}\n" as &[u8]
            } else {
                b"\",\"opt_in\":false}}\n"
            });
        }
        stats.crm_records += 1;
        if buf.len() >= FLUSH_AT {
            out.write_all(&buf)?;
            stats.bytes += buf.len() as u64;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    stats.bytes += buf.len() as u64;
    out.flush()
}

// ---------------------------------------------------------------------------
// sessions

#[derive(Default)]
struct Session {
    user: u32,
    cookie: u8,
    /// `,"context":{"session_id":..,"device":..,"country":..,"referrer":..,"page":"`
    ctx: Vec<u8>,
    remaining: u32,
    idx: u32,
    login_at: u32,
    logged_in: bool,
    cat: u8,
    premium: bool,
    last_item: Option<u32>,
    cart: Vec<(u32, u8)>,
    checkout: bool,
    ts: i64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ev {
    PageView,
    ViewItem,
    AddToCart,
    BeginCheckout,
    Purchase,
    Login,
}

impl Ev {
    fn name(self) -> &'static [u8] {
        match self {
            Ev::PageView => b"page_view",
            Ev::ViewItem => b"view_item",
            Ev::AddToCart => b"add_to_cart",
            Ev::BeginCheckout => b"begin_checkout",
            Ev::Purchase => b"purchase",
            Ev::Login => b"login",
        }
    }
}

struct State {
    rng: ChaCha8Rng,
    web: Vec<u8>,
    txn: Vec<u8>,
    stats: GenStats,
    orders: u64,
    emitted: u64,
    next_malformed: u64,
    malformed_kind: u32,
    /// Whether the person's email has been seen in a web login.
    email_seen: Vec<bool>,
}

fn malformed_gap(every: u64, rng: &mut ChaCha8Rng) -> u64 {
    if every == 0 {
        u64::MAX
    } else {
        (every / 2 + rng.random_range(0..=every)).max(1)
    }
}

fn start_session(world: &World, st: &mut State, s: &mut Session, n: u32, ts: i64, sid: u64) {
    let rng = &mut st.rng;
    let user = pick_cdf(&world.user_cdf, rng) as u32;
    let u = &world.users[user as usize];
    s.user = user;
    s.cookie = rng.random_range(0..u.n_cookies);
    let device = if rng.random_bool(0.8) {
        u.device as usize
    } else {
        pick_cdf(&DEVICE_CDF, rng)
    };
    let referrer = pick_cdf(&REFERRER_CDF, rng);
    s.cat = if rng.random_bool(0.6) {
        u.fav_cat
    } else {
        world.items[world.all.pick(rng) as usize].cat
    };
    s.premium = rng.random_bool(0.15);
    s.logged_in = u.uid.is_some() && rng.random_bool(0.3);
    s.login_at = if u.uid.is_some() && !s.logged_in && n > 1 && rng.random_bool(0.4) {
        rng.random_range(1..n)
    } else {
        u32::MAX
    };
    s.remaining = n;
    s.idx = 0;
    s.last_item = None;
    s.cart.clear();
    s.checkout = false;
    s.ts = ts;
    s.ctx.clear();
    s.ctx.extend_from_slice(b",\"context\":{\"session_id\":\"s");
    put_u64(&mut s.ctx, sid);
    s.ctx.extend_from_slice(b"\",\"device\":\"");
    s.ctx.extend_from_slice(DEVICES[device].as_bytes());
    s.ctx.extend_from_slice(b"\",\"country\":\"");
    s.ctx
        .extend_from_slice(COUNTRIES[u.country as usize].0.as_bytes());
    s.ctx.extend_from_slice(b"\",\"referrer\":\"");
    s.ctx.extend_from_slice(REFERRERS[referrer].as_bytes());
    s.ctx.extend_from_slice(b"\",\"page\":\"");
}

fn cart_value(world: &World, cart: &[(u32, u8)]) -> u64 {
    cart.iter()
        .map(|&(i, q)| world.items[i as usize].price_cents * q as u64)
        .sum()
}

fn put_cart_items(buf: &mut Vec<u8>, world: &World, cart: &[(u32, u8)]) {
    buf.push(b'[');
    for (k, &(i, q)) in cart.iter().enumerate() {
        if k > 0 {
            buf.push(b',');
        }
        let it = &world.items[i as usize];
        buf.extend_from_slice(&it.line_a);
        put_u64(buf, q as u64);
        buf.extend_from_slice(&it.line_b);
    }
    buf.push(b']');
}

/// Emits the next event of session `s` into the web (and maybe txn) buffer.
fn emit_event(cfg: &GenConfig, world: &World, st: &mut State, s: &mut Session) {
    let u = &world.users[s.user as usize];
    let rng = &mut st.rng;
    // Choose the event type and update the session state.
    let ev = if s.idx == 0 {
        Ev::PageView
    } else if s.idx == s.login_at && !s.logged_in {
        Ev::Login
    } else if s.checkout && !s.cart.is_empty() && rng.random_bool(0.5) {
        if u.uid.is_some() && !s.logged_in && rng.random_bool(0.7) {
            Ev::Login
        } else {
            Ev::Purchase
        }
    } else {
        let r: f64 = rng.random();
        if !s.cart.is_empty() && !s.checkout && r < 0.10 {
            Ev::BeginCheckout
        } else if r < 0.64 {
            Ev::ViewItem
        } else if r < 0.80 && s.last_item.is_some() {
            Ev::AddToCart
        } else {
            Ev::PageView
        }
    };
    let mut item = None;
    match ev {
        Ev::ViewItem => {
            let i = if rng.random_bool(0.75) {
                let c = s.cat as usize;
                if s.premium && rng.random_bool(0.8) {
                    world.premium_by_cat[c].pick(rng)
                } else {
                    world.by_cat[c].pick(rng)
                }
            } else {
                world.all.pick(rng)
            };
            s.cat = world.items[i as usize].cat;
            s.last_item = Some(i);
            item = Some(i);
        }
        Ev::AddToCart => {
            let i = s.last_item.expect("add_to_cart after a view");
            let r: u32 = rng.random_range(0..100);
            let q = if r < 85 {
                1
            } else if r < 97 {
                2
            } else {
                3
            };
            if let Some(e) = s.cart.iter_mut().find(|e| e.0 == i) {
                e.1 = e.1.saturating_add(q).min(9);
            } else if s.cart.len() < 10 {
                s.cart.push((i, q));
            }
            item = Some(i);
        }
        Ev::BeginCheckout => s.checkout = true,
        Ev::Login => s.logged_in = true,
        Ev::PageView | Ev::Purchase => {}
    }

    // Malformed line? Never for login/purchase, whose links matter downstream.
    let malformed = if st.emitted >= st.next_malformed && ev != Ev::Login && ev != Ev::Purchase {
        st.next_malformed = st.emitted + malformed_gap(cfg.malformed_every, rng);
        let k = st.malformed_kind;
        st.malformed_kind = (k + 1) % 4;
        st.stats.malformed += 1;
        Some(k)
    } else {
        None
    };

    // Timestamp noise and format.
    let mut ts = s.ts;
    if malformed.is_none() {
        let r: f64 = rng.random();
        if r < 0.0005 {
            ts -= rng.random_range(2 * 3_600_000..=6 * 3_600_000);
            st.stats.late += 1;
        } else if r < 0.0105 {
            ts -= rng.random_range(1_000..=60_000);
            st.stats.out_of_order += 1;
        }
    }
    let fmt: f64 = rng.random();

    let buf = &mut st.web;
    let line_start = buf.len();
    if malformed == Some(3) {
        buf.extend_from_slice(b"{\"event\":42");
    } else {
        buf.extend_from_slice(b"{\"event\":\"");
        buf.extend_from_slice(ev.name());
        buf.push(b'"');
    }
    match malformed {
        Some(1) => {}
        Some(2) => buf.extend_from_slice(b",\"ts\":\"yesterday\""),
        _ => {
            buf.extend_from_slice(b",\"ts\":");
            if fmt < 0.05 {
                buf.push(b'"');
                write_rfc3339(buf, ts, COUNTRIES[u.country as usize].1);
                buf.push(b'"');
            } else if fmt < 0.08 {
                put_i64(buf, ts.div_euclid(1000));
            } else {
                put_i64(buf, ts);
            }
        }
    }
    buf.extend_from_slice(b",\"anonymous_id\":\"");
    buf.extend_from_slice(&u.cookies[s.cookie as usize]);
    buf.push(b'"');
    if s.logged_in {
        if let Some(uid) = &u.uid {
            buf.extend_from_slice(b",\"user_id\":\"");
            buf.extend_from_slice(uid);
            buf.push(b'"');
        }
    }
    match ev {
        Ev::Login => {
            if let Some(email) = &u.email {
                if rng.random_bool(0.5) {
                    buf.extend_from_slice(b",\"email\":\"");
                    put_messy_email(buf, email, rng);
                    buf.push(b'"');
                    st.email_seen[s.user as usize] = true;
                }
            }
        }
        Ev::ViewItem | Ev::AddToCart => {
            let i = item.expect("item event");
            buf.extend_from_slice(&world.items[i as usize].view_frag);
            if ev == Ev::AddToCart {
                let q = s.cart.iter().find(|e| e.0 == i).map_or(1, |e| e.1);
                buf.extend_from_slice(b",\"qty\":");
                put_u64(buf, q as u64);
            }
        }
        Ev::BeginCheckout => {
            buf.extend_from_slice(b",\"cart\":{\"items\":");
            put_u64(buf, s.cart.len() as u64);
            buf.extend_from_slice(b",\"value\":");
            put_cents(buf, cart_value(world, &s.cart));
            buf.push(b'}');
        }
        Ev::Purchase => {
            st.orders += 1;
            buf.extend_from_slice(b",\"order_id\":\"o");
            put_u64(buf, st.orders);
            buf.extend_from_slice(b"\",\"value\":");
            let amount = cart_value(world, &s.cart);
            put_cents(buf, amount);
            buf.extend_from_slice(b",\"currency\":\"USD\",\"items\":");
            put_cart_items(buf, world, &s.cart);
        }
        Ev::PageView => {}
    }
    buf.extend_from_slice(&s.ctx);
    match ev {
        Ev::ViewItem | Ev::AddToCart => {
            buf.extend_from_slice(&world.items[item.unwrap_or(0) as usize].page)
        }
        Ev::Login => buf.extend_from_slice(b"/login"),
        Ev::BeginCheckout => buf.extend_from_slice(b"/checkout"),
        Ev::Purchase => buf.extend_from_slice(b"/checkout/confirm"),
        Ev::PageView => {
            if s.idx == 0 && rng.random_bool(0.4) {
                buf.push(b'/');
            } else {
                buf.extend_from_slice(b"/c/");
                buf.extend_from_slice(CATEGORIES[s.cat as usize].as_bytes());
            }
        }
    }
    buf.extend_from_slice(b"\"}}");
    if malformed == Some(0) {
        let len = buf.len() - line_start;
        let keep = rng.random_range(len / 4..len * 3 / 4).max(1);
        buf.truncate(line_start + keep);
    }
    buf.push(b'\n');
    st.emitted += 1;

    if ev == Ev::Purchase {
        write_transaction(world, st, s);
        s.cart.clear();
        s.checkout = false;
    }
    s.idx += 1;
    s.remaining -= 1;
}

fn write_transaction(world: &World, st: &mut State, s: &Session) {
    let u = &world.users[s.user as usize];
    let Some(uid) = u.uid.as_deref().filter(|_| s.logged_in) else {
        return; // anonymous buyer: the backend cannot attribute it
    };
    let rng = &mut st.rng;
    let buf = &mut st.txn;
    buf.extend_from_slice(b"{\"order_id\":\"o");
    put_u64(buf, st.orders);
    buf.extend_from_slice(b"\",\"ts\":");
    put_i64(buf, s.ts + rng.random_range(200..5000));
    let email_known = u.crm.is_some() || st.email_seen[s.user as usize];
    match (u.crm, &u.email) {
        (Some(c), _) if rng.random_bool(0.5) => {
            buf.extend_from_slice(b",\"crm_id\":\"");
            buf.extend_from_slice(&world.crm[c as usize].id);
        }
        (_, Some(email)) if email_known => {
            buf.extend_from_slice(b",\"email\":\"");
            put_messy_email(buf, email, rng);
        }
        _ => {
            buf.extend_from_slice(b",\"user_id\":\"");
            buf.extend_from_slice(uid);
        }
    }
    buf.extend_from_slice(b"\",\"amount\":");
    put_cents(buf, cart_value(world, &s.cart));
    buf.extend_from_slice(b",\"currency\":\"USD\",\"items\":");
    put_cart_items(buf, world, &s.cart);
    buf.extend_from_slice(b"}\n");
    st.stats.transactions += 1;
}

/// Session length: 3..=30, skewed towards short sessions (mean about 12).
fn session_len(rng: &mut ChaCha8Rng) -> u32 {
    let u: f64 = rng.random();
    3 + (u * u * 28.0) as u32
}

fn flush_buf<W: Write>(buf: &mut Vec<u8>, out: &mut W, bytes: &mut u64) -> io::Result<()> {
    out.write_all(buf)?;
    *bytes += buf.len() as u64;
    buf.clear();
    Ok(())
}

/// Generates the three streams into the given writers (each is flushed at the end).
///
/// `web` receives exactly `cfg.events` lines; see the module docs for the
/// shape of every stream. The output depends only on `cfg`.
pub fn generate_to<W1: Write, W2: Write, W3: Write>(
    cfg: &GenConfig,
    web: &mut W1,
    crm: &mut W2,
    txn: &mut W3,
) -> io::Result<GenStats> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut world = build_world(cfg, &mut rng);
    let mut stats = GenStats::default();
    write_crm(cfg, &mut world, &mut rng, crm, &mut stats)?;
    let world = world;

    let mut st = State {
        next_malformed: malformed_gap(cfg.malformed_every, &mut rng).saturating_sub(1),
        rng,
        web: Vec::with_capacity(FLUSH_AT + 4096),
        txn: Vec::with_capacity(FLUSH_AT + 4096),
        stats,
        orders: 0,
        emitted: 0,
        malformed_kind: 0,
        email_seen: vec![false; world.users.len()],
    };

    let total = cfg.events;
    let span = span_ms(cfg) as u128;
    let mut assigned: u64 = 0;
    let mut sessions: Vec<Session> = Vec::new();
    let mut free: Vec<u32> = Vec::new();
    let mut heap: BinaryHeap<Reverse<(i64, u64, u32)>> = BinaryHeap::new();
    let mut seq: u64 = 0;
    let mut sid: u64 = 0;

    // The next session to open: (events, start time).
    let pending = |rng: &mut ChaCha8Rng, assigned: u64| -> Option<(u32, i64)> {
        if assigned >= total {
            return None;
        }
        let n = (session_len(rng) as u64).min(total - assigned) as u32;
        let base = (span * assigned as u128 / total as u128) as i64;
        let slot = ((span * n as u128 / total as u128) as i64).max(1);
        Some((n, cfg.start_ms + base + rng.random_range(0..slot)))
    };
    let mut next = pending(&mut st.rng, assigned);
    if let Some((n, _)) = next {
        assigned += n as u64;
    }

    loop {
        let open_new = match (next, heap.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((_, t)), Some(Reverse((top, _, _)))) => t < *top,
        };
        if open_new {
            let (n, t) = next.expect("pending session");
            let slot = match free.pop() {
                Some(i) => i,
                None => {
                    sessions.push(Session::default());
                    (sessions.len() - 1) as u32
                }
            };
            sid += 1;
            start_session(&world, &mut st, &mut sessions[slot as usize], n, t, sid);
            heap.push(Reverse((t, seq, slot)));
            seq += 1;
            next = pending(&mut st.rng, assigned);
            if let Some((n, _)) = next {
                assigned += n as u64;
            }
        } else {
            let Reverse((_, _, slot)) = heap.pop().expect("non-empty heap");
            let s = &mut sessions[slot as usize];
            emit_event(cfg, &world, &mut st, s);
            if s.remaining > 0 {
                s.ts += st.rng.random_range(5_000..=120_000);
                heap.push(Reverse((s.ts, seq, slot)));
                seq += 1;
            } else {
                free.push(slot);
            }
            if st.web.len() >= FLUSH_AT {
                flush_buf(&mut st.web, web, &mut st.stats.bytes)?;
            }
            if st.txn.len() >= FLUSH_AT {
                flush_buf(&mut st.txn, txn, &mut st.stats.bytes)?;
            }
        }
    }
    flush_buf(&mut st.web, web, &mut st.stats.bytes)?;
    flush_buf(&mut st.txn, txn, &mut st.stats.bytes)?;
    web.flush()?;
    txn.flush()?;
    st.stats.web_events = st.emitted;
    Ok(st.stats)
}

/// Creates `dir` (and parents) and writes `web.jsonl`, `crm.jsonl` and
/// `transactions.jsonl` into it through 1 MiB buffered writers.
pub fn generate_dir(cfg: &GenConfig, dir: &Path) -> io::Result<GenStats> {
    if dir.exists() && !dir.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    fs::create_dir_all(dir)?;
    let open = |name: &str| -> io::Result<BufWriter<File>> {
        Ok(BufWriter::with_capacity(
            1 << 20,
            File::create(dir.join(name))?,
        ))
    };
    let mut web = open("web.jsonl")?;
    let mut crm = open("crm.jsonl")?;
    let mut txn = open("transactions.jsonl")?;
    let stats = generate_to(cfg, &mut web, &mut crm, &mut txn)?;
    web.into_inner().map_err(|e| e.into_error())?;
    crm.into_inner().map_err(|e| e.into_error())?;
    txn.into_inner().map_err(|e| e.into_error())?;
    Ok(stats)
}

/// The Segment message of a generated web event (`None` for a line that
/// is not one: the generator's malformed lines).
pub fn segment_message(line: &str) -> Option<serde_json::Value> {
    use serde_json::{json, Map, Value};
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) else {
        return None;
    };
    let event = o.get("event")?.as_str()?;
    let mut m = Map::new();
    m.insert("timestamp".into(), o.get("ts")?.clone());
    if let Some(u) = o.get("user_id") {
        m.insert("userId".into(), u.clone());
    }
    m.insert("anonymousId".into(), o.get("anonymous_id")?.clone());
    let c = o.get("context").and_then(Value::as_object)?;
    let mut context = json!({
        "device": {"type": c.get("device")},
        "location": {"country": c.get("country")},
        "page": {"path": c.get("page"), "referrer": c.get("referrer")},
        "sessionId": c.get("session_id"),
    });
    if let Some(email) = o.get("email") {
        context["traits"] = json!({ "email": email });
    }
    m.insert("context".into(), context);
    let product = |i: &Value| -> Value {
        let mut p = Map::new();
        for (k, v) in i.as_object().into_iter().flatten() {
            let k = match k.as_str() {
                "id" => "product_id",
                "qty" => "quantity",
                other => other,
            };
            p.insert(k.to_string(), v.clone());
        }
        Value::Object(p)
    };
    let (kind, name, properties) = match event {
        "page_view" => ("page", None, json!({})),
        "purchase" => {
            let items = o.get("items").and_then(Value::as_array)?;
            (
                "track",
                Some("Order Completed"),
                json!({
                    "order_id": o.get("order_id"),
                    "total": o.get("value"),
                    "currency": o.get("currency"),
                    "products": items.iter().map(product).collect::<Vec<_>>(),
                }),
            )
        }
        other => {
            let mut props = o.get("item").map(product).unwrap_or_else(|| json!({}));
            if let Some(q) = o.get("qty") {
                props["quantity"] = q.clone();
            }
            let name = match other {
                "view_item" => "Product Viewed",
                "add_to_cart" => "Product Added",
                "begin_checkout" => "Checkout Started",
                "login" => "Signed In",
                n => n,
            };
            ("track", Some(name), props)
        }
    };
    m.insert("type".into(), kind.into());
    if let Some(n) = name {
        m.insert("event".into(), n.into());
    }
    m.insert("properties".into(), properties);
    Some(Value::Object(m))
}

/// Writes `dir/web.segment.jsonl`: the web events of `dir/web.jsonl` as
/// Segment messages ([`segment_message`]; its malformed lines left out).
/// Orders are `Order Completed` messages, so the file stands for
/// `web.jsonl` and the orders of its purchases: read it without
/// `transactions.jsonl`. Returns the number of messages.
pub fn write_segment_web(data: &Path) -> std::io::Result<u64> {
    let web = std::fs::read_to_string(data.join("web.jsonl"))?;
    let mut out = String::with_capacity(web.len() * 3 / 2);
    let mut n = 0;
    for m in web.lines().filter_map(segment_message) {
        out.push_str(&m.to_string());
        out.push('\n');
        n += 1;
    }
    std::fs::write(data.join("web.segment.jsonl"), out)?;
    Ok(n)
}
