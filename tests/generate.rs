use std::collections::{HashMap, HashSet};

use segflow::generate::{
    civil_from_days, generate_dir, generate_to, write_rfc3339, GenConfig, GenStats, CATALOG_SIZE,
    DEFAULT_START_MS,
};
use serde_json::Value;

struct Out {
    web: Vec<u8>,
    crm: Vec<u8>,
    txn: Vec<u8>,
    stats: GenStats,
}

fn run(cfg: &GenConfig) -> Out {
    let (mut web, mut crm, mut txn) = (Vec::new(), Vec::new(), Vec::new());
    let stats = generate_to(cfg, &mut web, &mut crm, &mut txn).unwrap();
    Out {
        web,
        crm,
        txn,
        stats,
    }
}

fn cfg(events: u64, seed: u64) -> GenConfig {
    GenConfig {
        events,
        seed,
        ..GenConfig::default()
    }
}

fn lines(b: &[u8]) -> Vec<&str> {
    std::str::from_utf8(b).unwrap().lines().collect()
}

/// Parses an RFC 3339 timestamp with milliseconds and offset to epoch ms.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 29 || b[10] != b'T' || b[19] != b'.' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (h, mi, se, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    let sign = match b[23] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let off = sign * (n(24..26)? * 60 + n(27..29)?);
    // days_from_civil (Hinnant)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + se * 1000 + ms - off * 60_000)
}

/// Epoch ms of a web `ts` value, or None when it is not a valid timestamp.
fn ts_ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => {
            let x = n.as_i64()?;
            Some(if x < 100_000_000_000 { x * 1000 } else { x })
        }
        Value::String(s) => parse_rfc3339(s),
        _ => None,
    }
}

const EVENTS: [&str; 6] = [
    "page_view",
    "view_item",
    "add_to_cart",
    "begin_checkout",
    "purchase",
    "login",
];

/// The web line if it is well formed (parses and has the required fields).
fn valid_web(line: &str) -> Option<Value> {
    let v: Value = serde_json::from_str(line).ok()?;
    let ev = v.get("event")?.as_str()?;
    if !EVENTS.contains(&ev) {
        return None;
    }
    ts_ms(v.get("ts")?)?;
    if !v.get("anonymous_id")?.as_str()?.starts_with("a-") {
        return None;
    }
    let ctx = v.get("context")?;
    for k in ["session_id", "device", "country", "referrer", "page"] {
        ctx.get(k)?.as_str()?;
    }
    if ev == "view_item" || ev == "add_to_cart" {
        let it = v.get("item")?;
        it.get("id")?.as_str()?;
        it.get("price")?.as_f64()?;
        it.get("category")?.as_str()?;
        it.get("brand")?.as_str()?;
    }
    Some(v)
}

fn norm_email(s: &str) -> String {
    s.trim().to_ascii_lowercase()
}

#[test]
fn rfc3339_formatting_and_civil_dates() {
    let mut b = Vec::new();
    write_rfc3339(&mut b, DEFAULT_START_MS + 3_723_123, 60);
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        "2026-03-02T02:02:03.123+01:00"
    );
    b.clear();
    write_rfc3339(&mut b, DEFAULT_START_MS + 3_723_123, -300);
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        "2026-03-01T20:02:03.123-05:00"
    );
    b.clear();
    write_rfc3339(&mut b, DEFAULT_START_MS, 330);
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        "2026-03-02T05:30:00.000+05:30"
    );
    b.clear();
    write_rfc3339(&mut b, 951_782_400_000, 0); // leap day 2000
    assert_eq!(
        std::str::from_utf8(&b).unwrap(),
        "2000-02-29T00:00:00.000+00:00"
    );
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(-1), (1969, 12, 31));
    // Round trip over ~40 years at odd offsets.
    for d in (0..15_000i64).step_by(7) {
        for off in [-480, -300, 0, 60, 330, 540, 660] {
            let ms = d * 86_400_000 + (d * 7_919_123) % 86_400_000;
            b.clear();
            write_rfc3339(&mut b, ms, off);
            assert_eq!(parse_rfc3339(std::str::from_utf8(&b).unwrap()), Some(ms));
        }
    }
}

#[test]
fn deterministic_for_a_seed() {
    let a = run(&cfg(20_000, 7));
    let b = run(&cfg(20_000, 7));
    assert_eq!(a.web, b.web);
    assert_eq!(a.crm, b.crm);
    assert_eq!(a.txn, b.txn);
    assert_eq!(a.stats, b.stats);
    let c = run(&cfg(20_000, 8));
    assert_ne!(a.web, c.web);
    assert_ne!(a.crm, c.crm);
}

#[test]
fn web_lines_parse_and_malformed_count_matches() {
    let c = GenConfig {
        events: 60_000,
        seed: 3,
        malformed_every: 1000,
        ..GenConfig::default()
    };
    let o = run(&c);
    let ls = lines(&o.web);
    assert_eq!(ls.len() as u64, c.events);
    assert_eq!(o.stats.web_events, c.events);
    assert_eq!(
        o.stats.bytes,
        (o.web.len() + o.crm.len() + o.txn.len()) as u64
    );
    let mut bad = 0u64;
    let mut kinds = [0u32; 4]; // truncated, missing ts, ts yesterday, event 42
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut fmt = [0u64; 3]; // ms, seconds, rfc3339
    for l in &ls {
        match valid_web(l) {
            Some(v) => {
                *counts
                    .entry(v["event"].as_str().unwrap().to_string())
                    .or_default() += 1;
                match &v["ts"] {
                    Value::String(_) => fmt[2] += 1,
                    Value::Number(n) if n.as_i64().unwrap() < 100_000_000_000 => fmt[1] += 1,
                    _ => fmt[0] += 1,
                }
            }
            None => {
                bad += 1;
                match serde_json::from_str::<Value>(l) {
                    Err(_) => kinds[0] += 1,
                    Ok(v) if v.get("ts").is_none() => kinds[1] += 1,
                    Ok(v) if v["ts"] == "yesterday" => kinds[2] += 1,
                    Ok(v) if v["event"] == 42 => kinds[3] += 1,
                    Ok(_) => panic!("unexpected invalid line {l}"),
                }
            }
        }
    }
    assert_eq!(bad, o.stats.malformed);
    assert!((40..=80).contains(&bad), "malformed {bad}");
    assert!(kinds.iter().all(|&k| k >= 10), "{kinds:?}");
    let n = (c.events - bad) as f64;
    let share = |x: u64| x as f64 / n;
    assert!((0.035..0.065).contains(&share(fmt[2])), "rfc3339 {fmt:?}");
    assert!((0.02..0.04).contains(&share(fmt[1])), "seconds {fmt:?}");
    let vi = counts["view_item"];
    assert!(counts.values().all(|&x| x <= vi), "{counts:?}");
    for e in EVENTS {
        assert!(counts.get(e).copied().unwrap_or(0) > 50, "{e}: {counts:?}");
    }
    assert!(
        (200..=1000).contains(&o.stats.out_of_order),
        "{:?}",
        o.stats
    );
    assert!(o.stats.late <= 100, "{:?}", o.stats);

    // With malformed_every = 0 nothing is malformed.
    let o = run(&GenConfig {
        events: 5_000,
        malformed_every: 0,
        ..GenConfig::default()
    });
    assert_eq!(o.stats.malformed, 0);
    assert!(lines(&o.web).iter().all(|l| valid_web(l).is_some()));
}

#[test]
fn logins_link_cookie_and_user_and_session_stays_identified() {
    let o = run(&cfg(50_000, 11));
    let mut logins = 0;
    let mut logged_sessions: HashMap<String, String> = HashMap::new();
    let mut login_emails = 0;
    for l in lines(&o.web) {
        let Some(v) = valid_web(l) else { continue };
        let sid = v["context"]["session_id"].as_str().unwrap().to_string();
        if v["event"] == "login" {
            logins += 1;
            assert!(v["anonymous_id"].as_str().unwrap().starts_with("a-"));
            let uid = v["user_id"].as_str().expect("login has user_id");
            assert!(uid.starts_with('u'));
            if v.get("email").is_some() {
                login_emails += 1;
            }
            logged_sessions.insert(sid, uid.to_string());
        } else if let Some(uid) = logged_sessions.get(&sid) {
            assert_eq!(
                v["user_id"].as_str(),
                Some(uid.as_str()),
                "after login: {l}"
            );
        }
    }
    assert!(logins > 100, "logins {logins}");
    assert!(login_emails > 20);
}

#[test]
fn crm_is_messy_and_ordered() {
    let o = run(&cfg(100_000, 5));
    let ls = lines(&o.crm);
    assert_eq!(ls.len() as u64, o.stats.crm_records);
    let mut last = i64::MIN;
    let (mut spaced, mut mixed, mut lower) = (0, 0, 0);
    let mut phone_styles = HashSet::new();
    let mut tiers: HashMap<String, u64> = HashMap::new();
    let mut per_id: HashMap<String, u32> = HashMap::new();
    let mut deleted = 0;
    let mut phones = 0;
    let mut formats_per_number: HashMap<String, HashSet<String>> = HashMap::new();
    for l in &ls {
        let v: Value = serde_json::from_str(l).unwrap();
        let id = v["crm_id"].as_str().unwrap();
        assert!(id.starts_with('C') && id.len() == 7, "{id}");
        let t = ts_ms(&v["updated_at"]).unwrap();
        assert!(t >= last, "crm out of order");
        last = t;
        *per_id.entry(id.to_string()).or_default() += 1;
        if v.get("deleted").is_some() {
            assert_eq!(v["deleted"], true);
            deleted += 1;
            continue;
        }
        if per_id[id] == 1 {
            *tiers
                .entry(v["attributes"]["tier"].as_str().unwrap().into())
                .or_default() += 1;
        }
        let e = v["email"].as_str().unwrap();
        if e != e.trim() {
            spaced += 1;
        }
        if e.chars().any(|c| c.is_ascii_uppercase()) {
            mixed += 1;
        } else {
            lower += 1;
        }
        let n = norm_email(e);
        assert!(n.contains('@') && n.contains('.'), "{e}");
        if let Some(p) = v.get("phone") {
            phones += 1;
            let p = p.as_str().unwrap();
            let digits: String = p.chars().filter(|c| c.is_ascii_digit()).collect();
            let digits = digits
                .strip_prefix('1')
                .filter(|d| d.len() == 10)
                .unwrap_or(&digits)
                .to_string();
            assert_eq!(digits.len(), 10, "{p}");
            assert_ne!(&digits[3..6], "555", "{p}");
            assert!(digits.as_bytes()[3] >= b'2', "{p}");
            let style = p
                .chars()
                .map(|c| if c.is_ascii_digit() { '9' } else { c })
                .collect::<String>();
            phone_styles.insert(style.clone());
            formats_per_number.entry(digits).or_default().insert(style);
        }
        assert!(v["attributes"]["opt_in"].is_boolean());
    }
    let people = per_id.len() as f64;
    assert!(
        spaced > 10 && mixed > 10 && lower > 10,
        "{spaced} {mixed} {lower}"
    );
    assert!(phone_styles.len() >= 4, "{phone_styles:?}");
    assert!(formats_per_number.values().any(|s| s.len() >= 2));
    let gold = *tiers.get("gold").unwrap_or(&0) as f64 / people;
    assert!((0.05..0.16).contains(&gold), "gold {gold}");
    let updated = per_id.values().filter(|&&c| c >= 2).count() as f64 / people;
    assert!((0.12..0.30).contains(&updated), "updated {updated}");
    assert!(deleted > 0);
    let phone_share = phones as f64 / (ls.len() - deleted) as f64;
    assert!((0.6..0.8).contains(&phone_share), "phones {phone_share}");
}

#[test]
fn time_span_is_sane() {
    let c = cfg(100_000, 9);
    let o = run(&c);
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    let mut backwards = 0u64;
    let mut prev = i64::MIN;
    for l in lines(&o.web) {
        let Some(v) = valid_web(l) else { continue };
        let t = ts_ms(&v["ts"]).unwrap();
        lo = lo.min(t);
        hi = hi.max(t);
        // epoch seconds lose up to 999 ms; only count real regressions
        if t + 1000 < prev {
            backwards += 1;
        }
        prev = prev.max(t);
    }
    let span = 100_000 * 2000;
    assert!(lo >= c.start_ms - 6 * 3_600_000, "lo {lo}");
    assert!(lo < c.start_ms + 3_600_000);
    assert!(hi <= c.start_ms + span + 3 * 3_600_000, "hi {hi}");
    assert!(hi >= c.start_ms + span * 9 / 10, "hi {hi}");
    // Apart from the injected noise the stream is in time order.
    assert!(
        backwards <= o.stats.out_of_order + o.stats.late,
        "{backwards} {:?}",
        o.stats
    );
}

#[test]
fn transactions_reference_known_people_and_purchases() {
    let o = run(&cfg(100_000, 21));
    let mut user_ids = HashSet::new();
    let mut emails = HashSet::new();
    let mut crm_ids = HashSet::new();
    let mut orders: HashMap<String, f64> = HashMap::new();
    let mut premium_items = 0u64;
    let mut items = HashSet::new();
    for l in lines(&o.web) {
        let Some(v) = valid_web(l) else { continue };
        if let Some(u) = v.get("user_id") {
            user_ids.insert(u.as_str().unwrap().to_string());
        }
        if let Some(e) = v.get("email") {
            emails.insert(norm_email(e.as_str().unwrap()));
        }
        if v["event"] == "purchase" {
            orders.insert(
                v["order_id"].as_str().unwrap().into(),
                v["value"].as_f64().unwrap(),
            );
        }
        if v["event"] == "view_item" {
            let p = v["item"]["price"].as_f64().unwrap();
            assert!((3.0..=1500.0).contains(&p));
            premium_items += (p >= 100.0) as u64;
            items.insert(v["item"]["id"].as_str().unwrap().to_string());
        }
    }
    assert!(premium_items > 0 && items.len() <= CATALOG_SIZE);
    for l in lines(&o.crm) {
        let v: Value = serde_json::from_str(l).unwrap();
        crm_ids.insert(v["crm_id"].as_str().unwrap().to_string());
        if let Some(e) = v.get("email") {
            emails.insert(norm_email(e.as_str().unwrap()));
        }
    }
    let ls = lines(&o.txn);
    assert_eq!(ls.len() as u64, o.stats.transactions);
    assert!(ls.len() > 100, "transactions {}", ls.len());
    assert!(ls.len() < orders.len(), "anonymous purchases are skipped");
    let mut by = [0u32; 3];
    for l in ls {
        let v: Value = serde_json::from_str(l).unwrap();
        let keys = ["user_id", "crm_id", "email"]
            .iter()
            .filter(|k| v.get(**k).is_some())
            .count();
        assert_eq!(keys, 1, "{l}");
        if let Some(u) = v.get("user_id") {
            by[0] += 1;
            assert!(user_ids.contains(u.as_str().unwrap()), "{l}");
        } else if let Some(c) = v.get("crm_id") {
            by[1] += 1;
            assert!(crm_ids.contains(c.as_str().unwrap()), "{l}");
        } else {
            by[2] += 1;
            assert!(
                emails.contains(&norm_email(v["email"].as_str().unwrap())),
                "{l}"
            );
        }
        let id = v["order_id"].as_str().unwrap();
        let amount = v["amount"].as_f64().unwrap();
        assert_eq!(orders.get(id), Some(&amount), "{l}");
        let sum: f64 = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["qty"].as_f64().unwrap() * i["price"].as_f64().unwrap())
            .sum();
        assert!((sum - amount).abs() < 0.005, "{l}");
        assert_eq!(v["currency"], "USD");
        assert!(v["ts"].as_i64().unwrap() >= DEFAULT_START_MS);
    }
    assert!(by.iter().all(|&b| b > 5), "{by:?}");
}

#[test]
fn catalog_prices_and_sticky_interest() {
    let o = run(&cfg(200_000, 2));
    let mut prices: HashMap<String, f64> = HashMap::new();
    // (anonymous_id, category) -> view timestamps
    let mut views: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut prem: HashMap<String, Vec<i64>> = HashMap::new();
    let mut pop: HashMap<String, u64> = HashMap::new();
    for l in lines(&o.web) {
        let Some(v) = valid_web(l) else { continue };
        if v["event"] != "view_item" {
            continue;
        }
        let id = v["item"]["id"].as_str().unwrap().to_string();
        let p = v["item"]["price"].as_f64().unwrap();
        let a = v["anonymous_id"].as_str().unwrap().to_string();
        let t = ts_ms(&v["ts"]).unwrap();
        *pop.entry(id.clone()).or_default() += 1;
        prices.insert(id, p);
        views
            .entry((a.clone(), v["item"]["category"].as_str().unwrap().into()))
            .or_default()
            .push(t);
        if p >= 100.0 {
            prem.entry(a).or_default().push(t);
        }
    }
    let premium = prices.values().filter(|&&p| p >= 100.0).count() as f64 / prices.len() as f64;
    assert!(
        (0.08..0.25).contains(&premium),
        "premium share of seen items {premium}"
    );
    let mut counts: Vec<u64> = pop.values().copied().collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    assert!(
        counts[0] > 50 * counts[counts.len() / 2],
        "power law: {} vs {}",
        counts[0],
        counts[counts.len() / 2]
    );
    views.values_mut().for_each(|t| t.sort_unstable());
    prem.values_mut().for_each(|t| t.sort_unstable());
    let within = |ts: &[i64], n: usize, w: i64| ts.windows(n).any(|x| x[n - 1] - x[0] <= w);
    let week = 7 * 86_400_000;
    let outdoor5 = views
        .iter()
        .filter(|((_, c), t)| c == "outdoor" && within(t, 5, week))
        .count();
    assert!(outdoor5 > 10, "outdoor5 {outdoor5}");
    let prem3 = prem.values().filter(|t| within(t, 3, 30 * 60_000)).count();
    assert!(prem3 > 10, "prem3 {prem3}");
}

#[test]
fn generate_dir_writes_three_files() {
    let dir = std::env::temp_dir().join(format!("segflow-gen-test-{}", std::process::id()));
    let c = cfg(10_000, 4);
    let s = generate_dir(&c, &dir.join("nested")).unwrap();
    let o = run(&c);
    assert_eq!(s, o.stats);
    assert_eq!(std::fs::read(dir.join("nested/web.jsonl")).unwrap(), o.web);
    assert_eq!(std::fs::read(dir.join("nested/crm.jsonl")).unwrap(), o.crm);
    assert_eq!(
        std::fs::read(dir.join("nested/transactions.jsonl")).unwrap(),
        o.txn
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
