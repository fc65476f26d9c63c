//! The segmentation language at its edges, with hand-written events and
//! hand-written expected diffs, each with one worker and with two: an
//! event exactly at a window boundary, an out-of-order event inside the
//! allowed lateness, a session gap of exactly the threshold, midnight in a
//! configured time zone, a recency crossing its constant, sequences at
//! their deadline, dwell time, segments of segments and the aggregates
//! that are not counts.

use std::sync::{Arc, Mutex};

use segflow::spec::parse_spec;
use segflow::{Engine, Input, Output};

/// The diffs of `spec` (a definition with sources `web` and
/// `transactions`) on the given lines, as `(time, segment, profile,
/// diff)` sorted, the same for one and two workers.
fn diffs(spec: &str, web: &[&str], txn: &[&str]) -> Vec<(u64, String, String, i64)> {
    let mut first: Option<Vec<_>> = None;
    for workers in [1, 2] {
        let spec = parse_spec(spec, "language.toml").unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&out);
        let dir = tempfile::tempdir().unwrap();
        let lines = |l: &[&str]| Input::Memory(Arc::new(l.iter().map(|s| s.to_string()).collect()));
        Engine::new(spec)
            .input("web", lines(web))
            .unwrap()
            .input("transactions", lines(txn))
            .unwrap()
            .output(Output::Callback(Arc::new(move |d| {
                sink.lock()
                    .unwrap()
                    .push((d.time, d.segment.clone(), d.profile.clone(), d.diff))
            })))
            .dead_letter(dir.path().join("dead.jsonl"))
            .run(timely::Config::process(workers))
            .unwrap();
        let mut got = out.lock().unwrap().clone();
        got.sort();
        match &first {
            None => first = Some(got),
            Some(f) => assert_eq!(&got, f, "-w 2 differs from -w 1"),
        }
    }
    first.unwrap()
}

fn d(time: u64, segment: &str, profile: &str, diff: i64) -> (u64, String, String, i64) {
    (time, segment.into(), profile.into(), diff)
}

fn view(ts: &str, who: &str) -> String {
    format!(r#"{{"event":"view_item","ts":{ts},"anonymous_id":"{who}"}}"#)
}

const HEAD: &str = r#"
[engine]
tick = "1s"
allowed_lateness = "5s"
[sources.web]
[sources.transactions]
"#;

/// A sliding window is open at its old end: an event leaves exactly `w`
/// after its tick. An out-of-order event within the allowed lateness
/// counts at its own time, so it also leaves at its own window end.
#[test]
fn sliding_window_boundaries_and_an_out_of_order_event() {
    let spec = format!(
        "{HEAD}[traits.views_10s]\nstream = \"web\"\nwindow = \"10s\"\n[segments.two]\nwhen = \"views_10s >= 2\"\n"
    );
    let web = [view("10", "a"), view("7", "a"), view("40", "z")];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            // Both count from 10 s; the one at 7 s leaves at exactly 17 s.
            d(10_000, "two", "anon:a", 1),
            d(17_000, "two", "anon:a", -1),
        ]
    );
}

/// Two events exactly `session_gap` apart are in different sessions, and
/// a session whose last event is exactly the gap before `T` has ended.
#[test]
fn a_session_gap_of_exactly_the_threshold_ends_the_session() {
    let spec = format!(
        "{HEAD}[traits.session_views]\nstream = \"web\"\nfilter = 'event == \"view_item\"'\nsession_gap = \"30s\"\n[segments.binge]\nwhen = \"session_views >= 3\"\n"
    );
    let page = r#"{"event":"page_view","ts":69,"anonymous_id":"b"}"#;
    // In time order (the allowed lateness is 5 s).
    // a: 0, 10, 40 — the gap of 30 s starts a new session at 40.
    // b: 1, 11, 40 — one session of three views, ended at 40 + 30 = 70 …
    // … unless a page view (any event of the stream) continues it: 69.
    let web = [
        view("0", "a"),
        view("1", "b"),
        view("10", "a"),
        view("11", "b"),
        view("40", "a"),
        view("40", "b"),
        page.to_string(),
        view("200", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            d(40_000, "binge", "anon:b", 1),
            d(99_000, "binge", "anon:b", -1),
        ]
    );
}

/// A session longer than its cap (`session_max`): its oldest events leave
/// the window one by one, with no new event, and the value falls when they
/// do (points are released by the hour, but no longer count from their
/// window end on).
#[test]
fn a_session_longer_than_its_cap_loses_its_oldest_events() {
    let spec = format!(
        "{HEAD}[traits.session_views]\nstream = \"web\"\nfilter = 'event == \"view_item\"'\nsession_gap = \"30s\"\nsession_max = \"60s\"\n[segments.binge]\nwhen = \"session_views >= 3\"\n"
    );
    // One session of views 20 s apart: at 60 the view at 0 leaves the
    // 60 s window (20, 40, 60 remain), at 100 the one at 40 does (60, 80
    // remain): the session ends by its gap only at 110.
    let web = [
        view("0", "a"),
        view("20", "a"),
        view("40", "a"),
        view("60", "a"),
        view("80", "a"),
        view("300", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            d(40_000, "binge", "anon:a", 1),
            d(100_000, "binge", "anon:a", -1),
        ]
    );
}

/// "Today" in Europe/Paris ends at local midnight, 23:00 UTC in winter.
#[test]
fn a_tumbling_day_ends_at_midnight_in_the_configured_time_zone() {
    let spec = format!(
        "{HEAD}[traits.views_today]\nstream = \"web\"\ntumbling = \"1d\"\n[segments.busy_today]\nwhen = \"views_today >= 2\"\n",
    )
    .replace("[engine]\n", "[engine]\ntime_zone = \"Europe/Paris\"\n");
    // 22:30Z and 22:59:59Z are 23:30 and 23:59:59 in Paris; 23:30Z is
    // already the next day there.
    let web = [
        view("1768084200", "a"),
        view("1768085999", "a"),
        view("1768087800", "a"),
        view("1768089599", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            d(1_768_085_999_000, "busy_today", "anon:a", 1),
            d(1_768_086_000_000, "busy_today", "anon:a", -1),
        ]
    );
    // In UTC all three are on one day.
    let utc = spec.replace("time_zone = \"Europe/Paris\"\n", "");
    assert_eq!(
        diffs(&utc, &web, &[]),
        vec![d(1_768_085_999_000, "busy_today", "anon:a", 1)]
    );
}

/// A recency crosses its constant with no new event: `>=` at exactly the
/// constant, `>` at the first tick after it; a new order resets it.
#[test]
fn recency_moves_with_the_watermark() {
    let spec = format!(
        "{HEAD}[traits.since_order]\nstream = \"transactions\"\naggregate = \"since_last\"\n[segments.lapsed]\nwhen = \"since_order >= 10s\"\n[segments.long_lapsed]\nwhen = \"since_order > 20s\"\n[segments.at_risk]\nwhen = \"lapsed and not long_lapsed\"\n"
    );
    let order =
        |ts: &str, id: &str| format!(r#"{{"order_id":"{id}","ts":{ts},"user_id":"u","amount":5}}"#);
    let txn = [order("1", "o1"), order("40", "o2")];
    let txn: Vec<&str> = txn.iter().map(String::as_str).collect();
    let web = [view("60", "z")];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &txn),
        vec![
            d(11_000, "at_risk", "user:u", 1),
            d(11_000, "lapsed", "user:u", 1),
            d(22_000, "at_risk", "user:u", -1),
            d(22_000, "long_lapsed", "user:u", 1),
            d(40_000, "lapsed", "user:u", -1),
            d(40_000, "long_lapsed", "user:u", -1),
            d(50_000, "at_risk", "user:u", 1),
            d(50_000, "lapsed", "user:u", 1),
        ]
    );
}

/// "Not followed within d" is known at exactly `t + d`; a follower at
/// exactly `t + d` still counts (the interval is `(t, t + d]`).
#[test]
fn sequences_at_their_deadline() {
    let spec = format!(
        "{HEAD}[traits.abandoned]\nstream = \"web\"\nfilter = 'event == \"add_to_cart\"'\nwindow = \"100s\"\nnot_followed_by = [{{ stream = \"transactions\" }}]\nwithin = \"10s\"\n[traits.converted]\nstream = \"web\"\nfilter = 'event == \"add_to_cart\"'\nwindow = \"100s\"\nfollowed_by = [{{ stream = \"web\", filter = 'event == \"purchase\"' }}, {{ stream = \"transactions\" }}]\nwithin = \"10s\"\n[segments.abandoner]\nwhen = \"abandoned >= 1\"\n[segments.converter]\nwhen = \"converted >= 1\"\n"
    );
    let add =
        |ts: &str, who: &str| format!(r#"{{"event":"add_to_cart","ts":{ts},"user_id":"{who}"}}"#);
    let order = |ts: &str, who: &str| {
        format!(r#"{{"order_id":"o{who}","ts":{ts},"user_id":"{who}","amount":5}}"#)
    };
    // a: ordered exactly 10 s later (followed); b: 11 s later (too late).
    let web = [add("1", "a"), add("1", "b"), view("300", "z")];
    let txn = [order("11", "a"), order("12", "b")];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    let txn: Vec<&str> = txn.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &txn),
        vec![
            d(11_000, "abandoner", "user:b", 1),
            d(11_000, "converter", "user:a", 1),
            // The add-to-cart leaves its 100 s window at 101 s.
            d(101_000, "abandoner", "user:b", -1),
            d(101_000, "converter", "user:a", -1),
        ]
    );
}

/// With `min_dwell`, a profile stays at least that long; a condition that
/// holds again within the dwell time writes nothing.
#[test]
fn dwell_time_delays_exits_and_hides_flapping() {
    let spec = format!(
        "{HEAD}[traits.views_10s]\nstream = \"web\"\nwindow = \"10s\"\n[segments.active]\nwhen = \"views_10s >= 1\"\nmin_dwell = \"25s\"\n"
    );
    let web = [
        view("1", "a"),
        // b flaps: out from 11 s to 15 s, in again at 15 s.
        view("1", "b"),
        view("15", "b"),
        view("100", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            d(1_000, "active", "anon:a", 1),
            d(1_000, "active", "anon:b", 1),
            // a would leave at 11 s; it stays until 1 + 25 = 26 s.
            d(26_000, "active", "anon:a", -1),
            // b's condition holds again from 15 s to 25 s; it leaves at 26 s.
            d(26_000, "active", "anon:b", -1),
            d(100_000, "active", "anon:z", 1),
        ]
    );
}

/// min, max, avg, distinct, first, last, most frequent with its count,
/// share, and a regular expression, on one profile.
#[test]
fn aggregates_that_are_not_counts() {
    let spec = format!(
        r#"{HEAD}
[traits.cheapest]
stream = "web"
aggregate = "min"
of = "item.price"
[traits.dearest]
stream = "web"
aggregate = "max"
of = "item.price"
window = "20s"
[traits.mean]
stream = "web"
aggregate = "avg"
of = "item.price"
[traits.kinds]
stream = "web"
aggregate = "distinct"
of = "item.category"
[traits.first_page]
stream = "web"
aggregate = "first"
of = "context.page"
[traits.last_page]
stream = "web"
aggregate = "last"
of = "context.page"
[traits.fav]
stream = "web"
aggregate = "most_frequent"
of = "item.category"
[traits.shoe_share]
stream = "web"
aggregate = "share"
part = 'item.category == "shoes"'
[segments.bargain]
when = "cheapest < 10"
[segments.splurge]
when = "dearest >= 100"
[segments.mid]
when = "mean >= 30 and mean < 60"
[segments.varied]
when = "kinds >= 3"
[segments.came_from_blog]
when = 'matches(first_page, "^/blog/")'
[segments.on_checkout]
when = 'ends_with(last_page, "/checkout")'
[segments.shoe_fan]
when = 'fav == "shoes" and fav.count >= 2 and shoe_share > 0.5'
"#
    );
    let ev = |ts: u64, price: f64, cat: &str, page: &str| {
        format!(
            r#"{{"event":"view_item","ts":{ts},"anonymous_id":"a","item":{{"price":{price},"category":"{cat}"}},"context":{{"page":"{page}"}}}}"#
        )
    };
    let web = [
        ev(1, 120.0, "shoes", "/blog/boots"),
        ev(2, 20.0, "shoes", "/p/2"),
        ev(3, 8.0, "hats", "/p/3"),
        ev(4, 50.0, "bags", "/cart/checkout"),
        view("40", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![
            d(1_000, "came_from_blog", "anon:a", 1),
            d(1_000, "splurge", "anon:a", 1),
            // Two shoe views: the favourite, twice, all of the views.
            d(2_000, "shoe_fan", "anon:a", 1),
            // 120, 20, 8: the mean is 49.33.
            d(3_000, "bargain", "anon:a", 1),
            d(3_000, "mid", "anon:a", 1),
            d(4_000, "on_checkout", "anon:a", 1),
            // Shoes are 2 of 4 views now: 0.5 is not more than 0.5.
            d(4_000, "shoe_fan", "anon:a", -1),
            d(4_000, "varied", "anon:a", 1),
            // The 120 leaves the 20 s window of `dearest` at 21 s.
            d(21_000, "splurge", "anon:a", -1),
        ]
    );
}

/// An average of zero is a number to a condition, not null (the state
/// holds neither, as it holds no zero counts): a profile that already
/// existed, whose first view is of a free item, enters `mean_price < 50`
/// at that view (it was left unevaluated when only the state's form of
/// the value was compared).
#[test]
fn a_zero_average_is_a_number_to_conditions() {
    let spec = format!(
        r#"{HEAD}
[traits.mean_price]
stream = "web"
aggregate = "avg"
of = "item.price"
filter = 'event == "view_item"'
[segments.cheap]
when = "mean_price < 50"
"#
    );
    let web = [
        r#"{"event":"page_view","ts":1,"anonymous_id":"a"}"#.to_string(),
        r#"{"event":"view_item","ts":5,"anonymous_id":"a","item":{"price":0}}"#.to_string(),
        view("40", "z"),
    ];
    let web: Vec<&str> = web.iter().map(String::as_str).collect();
    assert_eq!(
        diffs(&spec, &web, &[]),
        vec![d(5_000, "cheap", "anon:a", 1)]
    );
}
