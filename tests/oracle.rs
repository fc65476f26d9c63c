//! The engine's final memberships on a generated data set (about 10k web
//! events plus CRM records and transactions) against a plain sequential
//! implementation written here: union-find for identities, loops for traits
//! and windows, the shipped segment conditions written out in Rust.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use segflow::generate::{generate_to, GenConfig};
use segflow::model::{decode_json, CrmRecord, Ident, IdentityRules, Record, RecordKind, Scalar};
use segflow::spec::load_spec;
use segflow::time::parse_time;
use segflow::{Engine, Input, Output};

const TICK: u64 = 1000;
const LATENESS: u64 = 5 * 60 * 1000;
const MIN: u64 = 60 * 1000;
const DAY: u64 = 24 * 60 * MIN;

struct Data {
    web: Vec<String>,
    crm: Vec<String>,
    txn: Vec<String>,
}

fn data(events: u64, seed: u64) -> Data {
    let (mut w, mut c, mut t) = (Vec::new(), Vec::new(), Vec::new());
    generate_to(
        &GenConfig {
            events,
            seed,
            ..GenConfig::default()
        },
        &mut w,
        &mut c,
        &mut t,
    )
    .unwrap();
    let lines = |b: Vec<u8>| {
        String::from_utf8(b)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    Data {
        web: lines(w),
        crm: lines(c),
        txn: lines(t),
    }
}

fn rules() -> IdentityRules {
    IdentityRules::new(
        ["crm_id", "user_id", "email", "phone", "anonymous_id"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        "US".to_string(),
    )
}

/// The event time of a line, if it is a JSON object whose time field
/// (`ts`, or `updated_at` for CRM records) parses.
fn time_of(kind: RecordKind, line: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = if kind == RecordKind::Crm {
        "updated_at"
    } else {
        "ts"
    };
    let t = v.as_object()?.get(field)?;
    if t.is_null() {
        return None;
    }
    parse_time(t).ok()
}

/// Reads a source in order and drops what the engine drops: lines without a
/// valid time, records behind the watermark (largest tick so far minus the
/// allowed lateness; every line with a valid time advances it) and records
/// that do not decode.
fn admitted(lines: &[String], kind: RecordKind) -> Vec<(Record, u64)> {
    let rules = rules();
    let mut max_tick: Option<u64> = None;
    let mut out = Vec::new();
    for line in lines {
        let Some(ms) = time_of(kind, line) else {
            continue;
        };
        let tick = ms as u64 / TICK * TICK;
        if let Some(m) = max_tick {
            let watermark = m.saturating_sub(LATENESS) / TICK * TICK;
            if tick < watermark {
                continue;
            }
        }
        max_tick = Some(max_tick.map_or(tick, |m| m.max(tick)));
        if let Ok(record) = decode_json(kind, line, &rules) {
            out.push((record, tick));
        }
    }
    out
}

struct UnionFind {
    parent: HashMap<Ident, Ident>,
}

impl UnionFind {
    fn find(&mut self, x: &Ident) -> Ident {
        let p = self
            .parent
            .entry(x.clone())
            .or_insert_with(|| x.clone())
            .clone();
        if &p == x {
            return p;
        }
        let root = self.find(&p);
        self.parent.insert(x.clone(), root.clone());
        root
    }
    fn union(&mut self, a: &Ident, b: &Ident) {
        let (ra, rb) = (self.find(a), self.find(b));
        // The identifier with the smaller key, by (rank, 120-bit hash of
        // its text), is the root: the canonical profile id.
        match ra.id().cmp(&rb.id()) {
            std::cmp::Ordering::Less => {
                self.parent.insert(rb, ra);
            }
            std::cmp::Ordering::Greater => {
                self.parent.insert(ra, rb);
            }
            std::cmp::Ordering::Equal => {}
        }
    }
}

/// [`admitted`] for a file of `lines` read in ranges of `range_bytes`: the
/// file is cut after the first line that ends at or past each multiple of
/// `range_bytes` (counted from the previous cut), and each range is judged
/// on its own, as if it were a file of its own.
fn admitted_in_ranges(lines: &[String], kind: RecordKind, range_bytes: u64) -> Vec<(Record, u64)> {
    let size: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
    let mut out = Vec::new();
    let mut range: Vec<String> = Vec::new();
    let mut end = 0u64;
    let mut next_cut = range_bytes;
    for line in lines {
        end += line.len() as u64 + 1;
        range.push(line.clone());
        if end >= next_cut && end < size {
            out.extend(admitted(&range, kind));
            range.clear();
            next_cut = (end / range_bytes + 1) * range_bytes;
        }
    }
    out.extend(admitted(&range, kind));
    out
}

fn oracle(d: &Data) -> BTreeSet<(String, String)> {
    oracle_reading(d, None)
}

/// The oracle for inputs read whole (`None`) or, for the web and
/// transaction files, in ranges of the given size (CRM files are small).
fn oracle_reading(d: &Data, range_bytes: Option<u64>) -> BTreeSet<(String, String)> {
    let read = |lines: &[String], kind| match range_bytes {
        None => admitted(lines, kind),
        Some(r) => admitted_in_ranges(lines, kind, r),
    };
    let web = read(&d.web, RecordKind::Web);
    let crm = read(&d.crm, RecordKind::Crm);
    let txn = read(&d.txn, RecordKind::Transactions);
    let end = web
        .iter()
        .chain(&crm)
        .chain(&txn)
        .map(|(_, t)| *t)
        .max()
        .unwrap();

    // CRM upserts: latest version per crm_id; deletes remove.
    let mut latest: BTreeMap<String, CrmRecord> = BTreeMap::new();
    for (r, _) in &crm {
        let Record::Crm(c) = r else { unreachable!() };
        let slot = latest.entry(c.crm_id.clone()).or_insert_with(|| c.clone());
        if (c.updated_ms, c) > (slot.updated_ms, &*slot) {
            *slot = c.clone();
        }
    }
    let current: Vec<&CrmRecord> = latest.values().filter(|c| !c.deleted).collect();

    let mut uf = UnionFind {
        parent: HashMap::new(),
    };
    let id_lists = web
        .iter()
        .chain(&txn)
        .map(|(r, _)| r.ids().to_vec())
        .chain(current.iter().map(|c| c.ids.clone()));
    for ids in id_lists {
        for id in &ids {
            uf.find(id);
        }
        for pair in ids.windows(2) {
            uf.union(&pair[0], &pair[1]);
        }
    }

    #[derive(Default)]
    struct Traits {
        premium_30m: i64,
        outdoor_7d: i64,
        spend_30d: i64,
        orders: i64,
        cart_1h: i64,
    }
    let in_window = |tick: u64, w: u64| tick + w > end;
    let mut traits: HashMap<Ident, Traits> = HashMap::new();
    for (r, tick) in web.iter().chain(&txn) {
        let profile = uf.find(&r.ids()[0]);
        let t = traits.entry(profile).or_default();
        match r {
            Record::Web(e) => {
                let event = e.event.as_str();
                let price = e.item.get("price").and_then(Scalar::as_f64);
                let category = e.item.get("category");
                if event == "view_item"
                    && price.is_some_and(|p| p >= 100.0)
                    && in_window(*tick, 30 * MIN)
                {
                    t.premium_30m += 1;
                }
                if event == "view_item"
                    && category == Some(&Scalar::Str("outdoor".into()))
                    && in_window(*tick, 7 * DAY)
                {
                    t.outdoor_7d += 1;
                }
                if event == "add_to_cart" && in_window(*tick, 60 * MIN) {
                    t.cart_1h += 1;
                }
            }
            Record::Txn(x) => {
                if in_window(*tick, 30 * DAY) {
                    t.spend_30d += (x.amount * 1000.0).round() as i64;
                }
                t.orders += 1;
            }
            Record::Crm(_) => unreachable!(),
        }
    }

    // Attributes: the most recently updated CRM record wins per name.
    let mut attrs: HashMap<Ident, BTreeMap<String, Scalar>> = HashMap::new();
    let mut by_time: Vec<&&CrmRecord> = current.iter().collect();
    by_time.sort_by(|a, b| (a.updated_ms, &a.crm_id).cmp(&(b.updated_ms, &b.crm_id)));
    for c in by_time {
        let profile = uf.find(&c.ids[0]);
        let entry = attrs.entry(profile).or_default();
        for (k, v) in &c.attributes {
            entry.insert(k.clone(), v.clone());
        }
    }

    let profiles: BTreeSet<Ident> = uf
        .parent
        .keys()
        .cloned()
        .collect::<Vec<_>>()
        .iter()
        .map(|i| uf.find(i))
        .collect();
    let mut out = BTreeSet::new();
    let none = Traits::default();
    for p in profiles {
        let t = traits.get(&p).unwrap_or(&none);
        let gold = attrs.get(&p).and_then(|a| a.get("tier")) == Some(&Scalar::Str("gold".into()));
        let mut add = |s: &str| out.insert((s.to_string(), p.value.clone()));
        if t.premium_30m >= 3 {
            add("high_intent");
        }
        if t.spend_30d >= 500_000 {
            add("big_spender");
        }
        if t.outdoor_7d >= 5 {
            add("outdoor_enthusiast");
        }
        if gold {
            add("vip");
        }
        if gold && t.cart_1h >= 1 && t.orders == 0 {
            add("cart_abandoner_vip");
        }
    }
    out
}

fn engine_memberships(d: &Data, workers: usize) -> BTreeSet<(String, String)> {
    let mut spec = load_spec(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    // Inputs and outputs are set here, not taken from the file.
    spec.output = Default::default();
    assert_eq!(spec.engine.tick_ms, TICK);
    assert_eq!(spec.engine.allowed_lateness_ms, LATENESS);
    let totals = Arc::new(Mutex::new(BTreeMap::<(String, String), i64>::new()));
    let sink = Arc::clone(&totals);
    let mem = |v: &Vec<String>| Input::Memory(Arc::new(v.clone()));
    let mut last_time = 0;
    let summary = Engine::new(spec)
        .input("web", mem(&d.web))
        .unwrap()
        .input("crm", mem(&d.crm))
        .unwrap()
        .input("transactions", mem(&d.txn))
        .unwrap()
        .output(Output::Callback(Arc::new(move |diff| {
            *sink
                .lock()
                .unwrap()
                .entry((diff.segment.clone(), diff.profile.clone()))
                .or_default() += diff.diff;
        })))
        .dead_letter(std::env::temp_dir().join(format!(
            "segflow-oracle-dead-{}-{workers}.jsonl",
            std::process::id()
        )))
        .run(timely::Config::process(workers))
        .unwrap();
    last_time = summary.last_time.unwrap_or(last_time);
    assert!(last_time > 0);
    let totals = totals.lock().unwrap();
    for (key, total) in totals.iter() {
        assert!(*total == 0 || *total == 1, "{key:?} has membership {total}");
    }
    totals
        .iter()
        .filter(|(_, t)| **t == 1)
        .map(|(k, _)| k.clone())
        .collect()
}

/// The engine reading files in many small ranges (every worker reads some)
/// against the oracle judging lateness per range, for one and two workers.
#[test]
fn files_read_in_ranges_match_the_oracle() {
    const RANGE: u64 = 40_000;
    let mut d = data(10_000, 9);
    // The later half of the web events first: read whole, the earlier half
    // would be late; read in ranges, only the records near the switch are.
    let half = d.web.len() / 2;
    d.web.rotate_left(half);
    let expected = oracle_reading(&d, Some(RANGE));
    assert!(expected.iter().any(|(s, _)| s == "high_intent"));
    assert_ne!(
        expected,
        oracle_reading(&d, None),
        "the data must tell reading in ranges from reading whole"
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, lines: &[String]| {
        let path = dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };
    let files = [
        ("web", write("web.jsonl", &d.web)),
        ("crm", write("crm.jsonl", &d.crm)),
        ("transactions", write("txn.jsonl", &d.txn)),
    ];
    assert!(std::fs::metadata(&files[0].1).unwrap().len() > 20 * RANGE);
    for workers in [1, 2] {
        let mut spec = load_spec(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dataflows/ecommerce.toml"
        )))
        .unwrap();
        spec.output = Default::default();
        spec.engine.file_range_bytes = RANGE;
        let totals = Arc::new(Mutex::new(BTreeMap::<(String, String), i64>::new()));
        let sink = Arc::clone(&totals);
        let mut engine = Engine::new(spec);
        for (name, path) in &files {
            engine = engine
                .input(
                    name,
                    Input::File {
                        path: path.clone(),
                        follow: false,
                    },
                )
                .unwrap();
        }
        engine
            .output(Output::Callback(Arc::new(move |diff| {
                *sink
                    .lock()
                    .unwrap()
                    .entry((diff.segment.clone(), diff.profile.clone()))
                    .or_default() += diff.diff;
            })))
            .dead_letter(dir.path().join(format!("dead{workers}.jsonl")))
            .run(timely::Config::process(workers))
            .unwrap();
        let got: BTreeSet<(String, String)> = totals
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| **t == 1)
            .map(|(k, _)| k.clone())
            .collect();
        let missing: Vec<_> = expected.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&expected).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "-w {workers}: missing {missing:?}, extra {extra:?}"
        );
    }
}

#[test]
fn final_memberships_match_a_sequential_oracle() {
    let d = data(10_000, 7);
    let expected = oracle(&d);
    // The generated data must exercise every segment.
    for segment in ["high_intent", "big_spender", "outdoor_enthusiast", "vip"] {
        assert!(
            expected.iter().any(|(s, _)| s == segment),
            "oracle found no member of {segment}"
        );
    }
    for workers in [1, 2] {
        let got = engine_memberships(&d, workers);
        let missing: Vec<_> = expected.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&expected).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "-w {workers}: missing {missing:?}, extra {extra:?}"
        );
    }
}
