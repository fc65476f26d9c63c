//! Live inputs the way real clients use them: events stamped with the
//! current wall clock, pauses longer than `idle_advance`, slow clients,
//! clients that connect late, a device clock far ahead, several clients,
//! a followed file, a TCP sink. Expected diffs are computed from the
//! timestamps the clients actually sent by a plain sequential model
//! ([`expected_active`]); nothing on time may be lost, and no diff may be
//! written before the wall clock has passed its time.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use segflow::spec::parse_spec;
use segflow::{Engine, Input, Output, RunSummary};

/// Tick 100 ms, no allowed lateness, idle after 200 ms; `active` = two
/// views within two seconds.
const SPEC: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "0s"
idle_advance = "200ms"

[sources.web]

[traits.views_2s]
stream = "web"
filter = 'event == "view_item"'
window = "2s"

[segments.active]
when = "views_2s >= 2"
"#;

const TICK: u64 = 100;
const WINDOW: u64 = 2_000;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The current wall clock, taken early in a tick (2–12 ms into it), so
/// that a record's transit (up to 88 ms on a loaded test machine) never
/// crosses a tick boundary: with `allowed_lateness = "0s"` a record that
/// does is late by definition, and that is not what these tests are about.
fn stamp() -> u64 {
    loop {
        let now = wall_ms();
        let into = now % TICK;
        if (2..12).contains(&into) {
            return now;
        }
        let wait = if into < 2 { 2 - into } else { TICK - into + 2 };
        std::thread::sleep(Duration::from_millis(wait));
    }
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    }
}

/// The segment-diff line of the `active` segment.
fn active(profile: &str, time: u64, diff: i64) -> String {
    format!(r#"{{"time":{time},"segment":"active","profile":"{profile}","diff":{diff}}}"#)
}

fn view(ts: u64, anon: &str) -> String {
    format!("{{\"event\":\"view_item\",\"ts\":{ts},\"anonymous_id\":\"{anon}\"}}\n")
}

/// The sequential model: the `active` diffs of views `(visitor, event
/// time)` with [`TICK`] and a [`WINDOW`] sliding window, for every time up
/// to `until`, in output order (time, then profile).
fn expected_active(views: &[(&str, u64)], until: u64) -> Vec<String> {
    let mut visitors: Vec<&str> = views.iter().map(|(v, _)| *v).collect();
    visitors.sort();
    visitors.dedup();
    let mut times: Vec<u64> = views
        .iter()
        .flat_map(|(_, ts)| {
            let t = ts / TICK * TICK;
            [t, t + WINDOW]
        })
        .filter(|t| *t <= until)
        .collect();
    times.sort();
    times.dedup();
    let mut out = Vec::new();
    let mut member: std::collections::BTreeMap<&str, bool> = Default::default();
    for t in times {
        for v in &visitors {
            let count = views
                .iter()
                .filter(|(w, ts)| w == v && ts / TICK * TICK <= t && t < ts / TICK * TICK + WINDOW)
                .count();
            let now = count >= 2;
            let was = member.insert(v, now).unwrap_or(false);
            if now != was {
                out.push(active(&format!("anon:{v}"), t, if now { 1 } else { -1 }));
            }
        }
    }
    out
}

/// Diffs as they arrive: the instant, the wall clock, the line.
type Seen = Arc<Mutex<Vec<(Instant, u64, String)>>>;

/// Runs `spec` with its `web` source on TCP at `addr`; see [`start_source`].
fn start(
    spec: &str,
    addr: &str,
    dead: &Path,
    workers: usize,
) -> (Seen, std::thread::JoinHandle<RunSummary>) {
    start_source(spec, "web", addr, dead, workers)
}

/// Runs `spec` with source `source` on TCP at `addr` (ending when its
/// clients have disconnected), diffs to a callback, dead letters to `dead`.
fn start_source(
    spec: &str,
    source: &'static str,
    addr: &str,
    dead: &Path,
    workers: usize,
) -> (Seen, std::thread::JoinHandle<RunSummary>) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let spec = parse_spec(spec, "live.toml").unwrap();
    let (addr, dead) = (addr.to_string(), dead.to_path_buf());
    let engine = std::thread::spawn(move || {
        Engine::new(spec)
            .input(
                source,
                Input::Tcp {
                    addr,
                    until_disconnect: true,
                },
            )
            .unwrap()
            .output(Output::Callback(Arc::new(move |d| {
                sink.lock()
                    .unwrap()
                    .push((Instant::now(), wall_ms(), d.to_line()))
            })))
            .dead_letter(dead)
            .run(timely::Config::process(workers))
            .unwrap()
    });
    (seen, engine)
}

fn lines_of(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, _, l)| l.clone())
        .collect()
}

fn wait_for(seen: &Seen, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while seen.lock().unwrap().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// No diff is written before the wall clock has passed its time: the
/// watermark never runs ahead of the wall clock.
fn assert_behind_wall_clock(seen: &Seen) {
    for (_, wall, line) in seen.lock().unwrap().iter() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let time = v["time"].as_u64().unwrap();
        assert!(
            time < *wall,
            "{line} written at wall clock {wall}, before its time"
        );
    }
}

fn dead_letters(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The scenario that lost 9 of 10 events: one view every 300 ms, a pause
/// of one second, five more views 50 ms apart, all stamped with the wall
/// clock. Nothing is late, the diffs are exactly the model's, and the exit
/// comes from the idle watermark while the client is still connected.
#[test]
fn wall_clock_client_with_pauses_loses_nothing() {
    for workers in [1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join("dead.jsonl");
        let addr = free_addr();
        let (seen, engine) = start(SPEC, &addr, &dead, workers);
        let mut client = connect(&addr);
        let mut sent = Vec::new();
        for i in 0..10 {
            if i > 0 {
                let pause = match i {
                    1..=4 => 300,
                    5 => 1_000,
                    _ => 50,
                };
                std::thread::sleep(Duration::from_millis(pause));
            }
            let ts = stamp();
            client.write_all(view(ts, "a1").as_bytes()).unwrap();
            sent.push(("a1", ts));
        }
        let last = sent.last().unwrap().1;
        let expected = expected_active(&sent, u64::MAX);
        // The window expires while nothing arrives: wait for the exit.
        wait_for(&seen, expected.len(), 30);
        let connected_until = Instant::now();
        assert!(wall_ms() > last / TICK * TICK + WINDOW);
        drop(client);
        let summary = engine.join().unwrap();
        assert_eq!(lines_of(&seen), expected, "-w {workers}");
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .all(|(at, _, _)| *at <= connected_until),
            "every diff, the exit too, is written while the client is connected"
        );
        assert_behind_wall_clock(&seen);
        assert_eq!(summary.sources[0].records, 10);
        assert_eq!(summary.late(), 0);
        assert_eq!(dead_letters(&dead), Vec::<serde_json::Value>::new());
    }
}

/// The first event arrives long after `idle_advance`: it is on time and
/// its diff is written while the client is connected.
#[test]
fn a_client_that_connects_late_is_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start(SPEC, &addr, &dead, 2);
    std::thread::sleep(Duration::from_millis(1_500));
    let mut client = connect(&addr);
    std::thread::sleep(Duration::from_millis(500));
    let t1 = stamp();
    client.write_all(view(t1, "late").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let t2 = stamp();
    client.write_all(view(t2, "late").as_bytes()).unwrap();
    wait_for(&seen, 1, 30);
    let entered = lines_of(&seen);
    drop(client);
    let summary = engine.join().unwrap();
    assert_eq!(entered, vec![active("anon:late", t2 / TICK * TICK, 1)]);
    // The replay of the live run ends at its end of data: the window's end
    // (two seconds later) is not reached, so nothing else is written.
    assert_eq!(lines_of(&seen), entered);
    assert_eq!(summary.sources[0].records, 2);
    assert_eq!(summary.late(), 0);
    assert_behind_wall_clock(&seen);
}

/// Each line takes 300 ms to arrive (longer than `idle_advance`); with an
/// allowed lateness of one second none is late.
#[test]
fn a_slow_client_within_the_allowed_lateness_loses_nothing() {
    let spec = SPEC.replace(r#"allowed_lateness = "0s""#, r#"allowed_lateness = "1s""#);
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start(&spec, &addr, &dead, 2);
    let mut client = connect(&addr);
    let mut sent = Vec::new();
    for visitor in ["s1", "s1", "s2", "s2"] {
        let ts = stamp();
        let line = view(ts, visitor);
        let (head, tail) = line.split_at(line.len() / 2);
        client.write_all(head.as_bytes()).unwrap();
        client.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        client.write_all(tail.as_bytes()).unwrap();
        sent.push((visitor, ts));
    }
    let expected = expected_active(&sent, sent.last().unwrap().1);
    wait_for(&seen, expected.len(), 30);
    drop(client);
    let summary = engine.join().unwrap();
    assert_eq!(lines_of(&seen)[..expected.len()], expected[..]);
    assert_eq!(summary.sources[0].records, 4);
    assert_eq!(summary.late(), 0);
    assert_eq!(dead_letters(&dead), Vec::<serde_json::Value>::new());
}

/// A device whose clock is an hour ahead sends one event: it is
/// dead-lettered as `future` and does not make the honest events late.
#[test]
fn a_device_clock_far_ahead_does_not_make_honest_records_late() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start(SPEC, &addr, &dead, 2);
    let mut client = connect(&addr);
    let t1 = stamp();
    client.write_all(view(t1, "h1").as_bytes()).unwrap();
    let bogus = t1 + 3_600_000;
    client.write_all(view(bogus, "h1").as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(120));
    let t2 = stamp();
    client.write_all(view(t2, "h1").as_bytes()).unwrap();
    wait_for(&seen, 1, 30);
    // The dead letter is on disk while the run goes on, not only at its end.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&dead)
        .unwrap_or_default()
        .is_empty()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        dead_letters(&dead).len(),
        1,
        "written while the client is connected"
    );
    drop(client);
    let summary = engine.join().unwrap();
    assert_eq!(
        lines_of(&seen),
        vec![active("anon:h1", t2 / TICK * TICK, 1)]
    );
    assert_eq!(summary.sources[0].records, 2);
    assert_eq!(summary.late(), 0);
    let dead = dead_letters(&dead);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["line"], 2);
    let reason = dead[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!(
            "future: event time {bogus} ms is more than max_future_skew = 60000 ms ahead of the wall clock "
        )),
        "{reason}"
    );
}

#[test]
fn tcp_source_with_several_clients_and_tcp_sink() {
    let source_addr = free_addr();
    let sink_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_addr = sink_listener.local_addr().unwrap().to_string();
    let collector = std::thread::spawn(move || {
        let (stream, _) = sink_listener.accept().unwrap();
        BufReader::new(stream)
            .lines()
            .map(|l| l.unwrap())
            .collect::<Vec<String>>()
    });
    let engine_addr = source_addr.clone();
    let engine = std::thread::spawn(move || {
        Engine::new(parse_spec(SPEC, "live.toml").unwrap())
            .input(
                "web",
                Input::Tcp {
                    addr: engine_addr,
                    until_disconnect: true,
                },
            )
            .unwrap()
            .output(Output::Tcp(sink_addr))
            .run(timely::Config::process(2))
            .unwrap()
    });
    let mut a = connect(&source_addr);
    let mut b = connect(&source_addr);
    // Both clients use the same event time, so neither can be late
    // whatever order their lines arrive in.
    let ts = stamp();
    a.write_all((view(ts, "a1") + &view(ts, "a1")).as_bytes())
        .unwrap();
    b.write_all((view(ts, "b1") + "not json\n" + &view(ts, "b1")).as_bytes())
        .unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    drop(b);
    let summary = engine.join().unwrap();
    let lines = collector.join().unwrap();
    let t = ts / TICK * TICK;
    assert_eq!(
        lines,
        vec![active("anon:a1", t, 1), active("anon:b1", t, 1)]
    );
    assert_eq!(summary.sources[0].records, 4);
    assert_eq!(summary.sources[0].dead_letters, 1);
}

#[test]
fn followed_file_is_read_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.jsonl");
    let out = dir.path().join("out.jsonl");
    let mut sent = vec![("f1", stamp())];
    std::thread::sleep(Duration::from_millis(100));
    sent.push(("f1", stamp()));
    std::fs::write(&web, view(sent[0].1, "f1") + &view(sent[1].1, "f1")).unwrap();
    let spec = dir.path().join("follow.toml");
    // The writer below flushes a line in two pieces 100 ms apart: the
    // allowed lateness covers that.
    std::fs::write(
        &spec,
        SPEC.replace(
            "[sources.web]",
            &format!(
                "[sources.web]\npath = {:?}\nfollow = true",
                web.display().to_string()
            ),
        )
        .replace(r#"allowed_lateness = "0s""#, r#"allowed_lateness = "1s""#),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_segflow"))
        .args([
            "run",
            spec.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Append two views of another visitor, stamped now, the first in two
    // pieces.
    let t = stamp();
    sent.push(("f2", t));
    sent.push(("f2", t));
    let lines = view(t, "f2") + &view(t, "f2");
    let (head, tail) = lines.split_at(10);
    let mut f = std::fs::OpenOptions::new().append(true).open(&web).unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    f.write_all(tail.as_bytes()).unwrap();
    f.flush().unwrap();
    // Wait for both entries and the exit of f1 two seconds later.
    let expected = expected_active(&sent, sent[0].1 / TICK * TICK + WINDOW);
    assert_eq!(expected.len(), 3, "{expected:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.lines().count() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(text.lines().take(3).collect::<Vec<_>>(), expected);
}

/// A record dated a second and a half ahead (within `max_future_skew`) is
/// admitted at its own time; when the client leaves at once, the run waits
/// for the wall clock to reach that time before it writes the diff and
/// ends.
#[test]
fn a_record_dated_ahead_is_written_when_its_time_comes() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start(SPEC, &addr, &dead, 2);
    let mut client = connect(&addr);
    let ahead = stamp() + 1_500;
    client
        .write_all((view(ahead, "f1") + &view(ahead, "f1")).as_bytes())
        .unwrap();
    drop(client);
    let summary = engine.join().unwrap();
    assert_eq!(
        lines_of(&seen),
        vec![active("anon:f1", ahead / TICK * TICK, 1)]
    );
    assert_behind_wall_clock(&seen);
    assert_eq!(summary.sources[0].records, 2);
}

/// CRM records as CSV over TCP: each connection starts with its own header
/// (here in another column order); a row is read with its own
/// connection's header.
#[test]
fn each_tcp_connection_has_its_own_csv_header() {
    const CSV_SPEC: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "5s"

[sources.crm]
format = "csv"

[segments.gold]
when = 'attributes.tier == "gold"'
"#;
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start_source(CSV_SPEC, "crm", &addr, &dead, 2);
    let t = stamp();
    let mut a = connect(&addr);
    let mut b = connect(&addr);
    a.write_all(format!("crm_id,email,updated_at,tier\nK1,k1@example.com,{t},gold\n").as_bytes())
        .unwrap();
    b.write_all(format!("email,crm_id,updated_at,tier\nk9@example.com,K9,{t},gold\n").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    drop(b);
    let summary = engine.join().unwrap();
    let tick = t / TICK * TICK;
    assert_eq!(
        lines_of(&seen),
        vec![
            format!(r#"{{"time":{tick},"segment":"gold","profile":"crm:K1","diff":1}}"#),
            format!(r#"{{"time":{tick},"segment":"gold","profile":"crm:K9","diff":1}}"#),
        ]
    );
    assert_eq!(summary.sources[0].records, 2);
    assert_eq!(dead_letters(&dead), Vec::<serde_json::Value>::new());
}

/// With `until = "disconnect"`, a client that connects a few milliseconds
/// after the previous one left is still read: a batch load sent over
/// several connections in turn loses nothing.
#[test]
fn sequential_clients_of_an_until_disconnect_source_are_all_read() {
    let spec = SPEC.replace(r#"allowed_lateness = "0s""#, r#"allowed_lateness = "5s""#);
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    let addr = free_addr();
    let (seen, engine) = start(&spec, &addr, &dead, 2);
    let ts = stamp();
    for client in 0..10 {
        let mut c = connect(&addr);
        let mut lines = String::new();
        for _ in 0..5 {
            lines.push_str(&view(ts, &format!("c{client}")));
        }
        c.write_all(lines.as_bytes()).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(20));
    }
    let summary = engine.join().unwrap();
    assert_eq!(summary.sources[0].lines, 50);
    assert_eq!(summary.sources[0].records, 50);
    let t = ts / TICK * TICK;
    let expected: Vec<String> = (0..10)
        .map(|c| active(&format!("anon:c{c}"), t, 1))
        .collect();
    assert_eq!(lines_of(&seen), expected);
}

/// With `until = "disconnect"`, a client that connects after the last one
/// left, at any moment around the source's end, is either read in full or
/// refused: never accepted and then ignored. The client learns which: a
/// read client sees the engine close the connection after its lines, a
/// refused one cannot connect or sees a reset.
#[test]
fn a_late_client_of_an_until_disconnect_source_is_read_or_refused() {
    use std::io::Read;
    // A one-second tick: after its last client, the source waits up to a
    // second for the wall clock to pass its last tick.
    let spec = SPEC.replace(r#"tick = "100ms""#, r#"tick = "1s""#);
    let dir = tempfile::tempdir().unwrap();
    let mut outcomes = Vec::new();
    for gap_ms in [0u64, 150, 240, 260, 400, 700, 1000, 1300, 2500] {
        let dead = dir.path().join(format!("dead{gap_ms}.jsonl"));
        let addr = free_addr();
        let (_seen, engine) = start(&spec, &addr, &dead, 1);
        let ts = stamp();
        let mut first = connect(&addr);
        first
            .write_all(
                (0..5)
                    .map(|_| view(ts, "first"))
                    .collect::<String>()
                    .as_bytes(),
            )
            .unwrap();
        drop(first);
        std::thread::sleep(Duration::from_millis(gap_ms));
        // Five lines, then end of writing; the engine closes the
        // connection once it has read them all.
        let delivered = TcpStream::connect(&addr).is_ok_and(|mut late| {
            let lines: String = (0..5).map(|_| view(ts, "late")).collect();
            late.set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            late.write_all(lines.as_bytes()).is_ok()
                && late.shutdown(std::net::Shutdown::Write).is_ok()
                && matches!(late.read(&mut [0u8; 16]), Ok(0))
        });
        let summary = engine.join().unwrap();
        let expected = if delivered { 10 } else { 5 };
        assert_eq!(
            summary.sources[0].lines,
            expected,
            "gap {gap_ms} ms: the late client was {} but the source read {} lines",
            if delivered { "read" } else { "refused" },
            summary.sources[0].lines
        );
        outcomes.push((gap_ms, delivered));
    }
    // Right after the first client, the late one is read; long after, it
    // is refused.
    assert!(outcomes[0].1, "{outcomes:?}");
    assert!(!outcomes.last().unwrap().1, "{outcomes:?}");
}

/// A followed file that is truncated (`: > web.jsonl`) or rotated (moved
/// away and created anew) is read again from its start: the lines written
/// after it are not lost, and reading never resumes mid-line. SIGTERM-style
/// shutdown ends the run with everything read.
#[test]
fn a_followed_file_that_is_truncated_or_rotated_is_read_from_its_start() {
    let spec = SPEC.replace(r#"allowed_lateness = "0s""#, r#"allowed_lateness = "1s""#);
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.jsonl");
    let ts = stamp();
    std::fs::write(&web, view(ts, "r1") + &view(ts, "r1")).unwrap();
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let engine = {
        let (spec, web, shutdown) = (spec.clone(), web.clone(), Arc::clone(&shutdown));
        std::thread::spawn(move || {
            Engine::new(parse_spec(&spec, "follow.toml").unwrap())
                .input(
                    "web",
                    Input::File {
                        path: web,
                        follow: true,
                    },
                )
                .unwrap()
                .output(Output::Callback(Arc::new(move |d| {
                    sink.lock()
                        .unwrap()
                        .push((Instant::now(), wall_ms(), d.to_line()))
                })))
                .shutdown_on(shutdown)
                .run(timely::Config::process(2))
                .unwrap()
        })
    };
    let entered = |who: &str, ts: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lines_of(&seen).contains(&active(who, ts / TICK * TICK, 1))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    entered("anon:r1", ts);
    // Truncated, then written again as long as before.
    let t2 = stamp();
    std::fs::write(&web, view(t2, "r2") + &view(t2, "r2")).unwrap();
    entered("anon:r2", t2);
    // Rotated: moved away, a new file in its place.
    std::fs::rename(&web, dir.path().join("web.jsonl.1")).unwrap();
    let t3 = stamp();
    std::fs::write(&web, view(t3, "r3") + &view(t3, "r3")).unwrap();
    entered("anon:r3", t3);
    shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
    let summary = engine.join().unwrap();
    let lines: Vec<String> = lines_of(&seen)
        .into_iter()
        .filter(|l| l.ends_with(r#""diff":1}"#))
        .collect();
    assert_eq!(
        lines,
        vec![
            active("anon:r1", ts / TICK * TICK, 1),
            active("anon:r2", t2 / TICK * TICK, 1),
            active("anon:r3", t3 / TICK * TICK, 1),
        ]
    );
    assert_eq!(summary.sources[0].records, 6);
    assert_eq!(summary.dead_letters(), 0);
}

/// The state of a live run follows the wall clock on every worker: views
/// of many visitors (their keys owned by both workers) stamped with the
/// wall clock, in bursts with pauses; while the run goes on, the state
/// (read as `segflow query` reads it) reaches each visitor's count within
/// the flush interval and never shows more than was sent; after the
/// client leaves, the run ends within seconds and the final state is
/// exact.
#[test]
fn live_state_written_by_every_worker_keeps_up_with_the_wall_clock() {
    // No allowed lateness: every record is read on time or not at all.
    let counts = LIVE_COUNTS
        .replace("SOURCE", "")
        .replace(r#"allowed_lateness = "1s""#, r#"allowed_lateness = "0s""#);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let addr = free_addr();
    let spec = parse_spec(&counts, "counts.toml").unwrap();
    let (engine_addr, engine_state) = (addr.clone(), state.clone());
    let engine = std::thread::spawn(move || {
        Engine::new(spec)
            .input(
                "web",
                Input::Tcp {
                    addr: engine_addr,
                    until_disconnect: true,
                },
            )
            .unwrap()
            .output(Output::Discard)
            .state_dir(engine_state)
            .run(timely::Config::process(2))
            .unwrap()
    });
    let mut client = connect(&addr);
    let visitors = 40;
    let mut sent = vec![0.0; visitors];
    for burst in 1..=3 {
        for round in 0..burst {
            let ts = stamp();
            for (v, n) in sent.iter_mut().enumerate() {
                if (v + round) % 3 != 0 {
                    client
                        .write_all(view(ts, &format!("v{v}")).as_bytes())
                        .unwrap();
                    *n += 1.0;
                }
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        // A pause: the state catches up within the flush interval (5 s)
        // plus a few ticks, on both workers' keys.
        wait_for_counts(&state, &sent, 20, &format!("burst {burst}"));
    }
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !engine.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the run did not end after the client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = engine.join().unwrap();
    assert_eq!(
        state_counts(&state, visitors),
        sent.iter().map(|n| Some(*n)).collect::<Vec<_>>()
    );
    assert_eq!(summary.late(), 0);
    assert!(summary.state_batches > 1, "{summary:?}");
}

/// A live run with state, on the wall clock: lifetime view counts per
/// visitor and a segment of every visitor seen.
const LIVE_COUNTS: &str = r#"
[engine]
tick = "100ms"
allowed_lateness = "1s"
idle_advance = "200ms"

[sources.web]
SOURCE

[traits.views_total]
stream = "web"
filter = 'event == "view_item"'

[segments.seen]
when = "views_total >= 1"
"#;

/// The `views_total` of visitors `v0..v{n}` in the state at `state`
/// (read-only, while a run may hold it); `None` for a visitor it does not
/// have (or while it cannot be opened).
fn state_counts(state: &Path, n: usize) -> Vec<Option<f64>> {
    let Ok(parts) = segflow::store::StateParts::open_read_only(state) else {
        return vec![None; n];
    };
    (0..n)
        .map(|v| {
            let id = segflow::model::Ident {
                rank: 0,
                value: format!("anon:v{v}"),
            };
            parts.lookup(&[id]).ok().flatten().and_then(|view| {
                view.traits
                    .get("views_total")
                    .and_then(serde_json::Value::as_f64)
            })
        })
        .collect()
}

/// Waits up to `secs` for the state to hold exactly `want` (never more).
fn wait_for_counts(state: &Path, want: &[f64], secs: u64, what: &str) {
    let want: Vec<Option<f64>> = want.iter().map(|n| (*n > 0.0).then_some(*n)).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let now = state_counts(state, want.len());
        for (have, want) in now.iter().zip(&want) {
            assert!(
                have.unwrap_or(0.0) <= want.unwrap_or(0.0),
                "{what}: a count above what was sent: {now:?} against {want:?}"
            );
        }
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the state did not reach what was sent in {secs} s: {now:?} against {want:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A child `segflow run`, killed if the test ends (or fails) while it
/// runs.
struct Running(Option<std::process::Child>);

impl Running {
    /// `segflow run SPEC ARGS.. --output OUT --dead-letter DEAD
    /// --state-dir STATE`, its stdout and stderr kept.
    fn start(spec: &Path, args: &[String], (out, dead, state): (&Path, &Path, &Path)) -> Running {
        Running(Some(
            std::process::Command::new(env!("CARGO_BIN_EXE_segflow"))
                .arg("run")
                .arg(spec)
                .args(args)
                .arg("--output")
                .arg(out)
                .arg("--dead-letter")
                .arg(dead)
                .arg("--state-dir")
                .arg(state)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("running")
    }

    /// Kills it with SIGKILL.
    fn kill(mut self) {
        let mut child = self.0.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops it with SIGTERM; its exit status and output.
    fn terminate(mut self) -> std::process::Output {
        unsafe { libc::kill(self.child().id() as i32, libc::SIGTERM) };
        wait_exit(self.0.take().expect("running"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits up to 30 s for a checkpoint whose resume point of source `web`
/// is past its first `lines` lines (it follows the state by at most a
/// flush).
fn wait_for_point(state: &Path, lines: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = segflow::store::StateParts::open_read_only(state)
            .ok()
            .and_then(|p| p.checkpoint().ok().flatten())
            .and_then(|c| c.retained)
            .and_then(|r| r.points.get("web")?.first().map(|p| p.line));
        if line.is_some_and(|l| l > lines as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint past line {lines} in 30 s: {line:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Appends `text` to the file at `path` (created if missing) in one write
/// with O_APPEND, as a log writer does.
fn append_to(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Waits up to 30 s for `child` to exit; its status and output.
fn wait_exit(mut child: std::process::Child) -> std::process::Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run did not end in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The `seen` diffs of an output file: each visitor enters once and never
/// leaves (lifetime counts only grow).
fn assert_each_seen_once(out: &Path, visitors: usize) {
    let text = std::fs::read_to_string(out).unwrap();
    let mut entered: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["diff"], 1, "an exit in a run of lifetime counts: {l}");
            v["profile"].as_str().unwrap().to_string()
        })
        .collect();
    entered.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..visitors).map(|v| format!("anon:v{v}")).collect();
        w.sort();
        w
    };
    assert_eq!(entered, want, "each visitor enters once:\n{text}");
}

/// The files of a run of [`LIVE_COUNTS`] on a followed file in `dir`.
struct Followed {
    web: std::path::PathBuf,
    out: std::path::PathBuf,
    dead: std::path::PathBuf,
    state: std::path::PathBuf,
    spec: std::path::PathBuf,
}

impl Followed {
    fn new(dir: &Path) -> Followed {
        let web = dir.join("web.jsonl");
        let spec = dir.join("follow.toml");
        std::fs::write(
            &spec,
            LIVE_COUNTS.replace(
                "SOURCE",
                &format!("path = {:?}\nfollow = true", web.display().to_string()),
            ),
        )
        .unwrap();
        Followed {
            web,
            out: dir.join("out.jsonl"),
            dead: dir.join("dead.jsonl"),
            state: dir.join("state"),
            spec,
        }
    }
}

/// A followed file, its engine killed with SIGKILL mid-stream and started
/// again while lines keep being appended (stamped with the wall clock,
/// with pauses, some while the engine is down): the restarted run restores
/// the checkpoint and continues the file from its resume point, so every
/// line is counted exactly once and every visitor enters its segment once.
#[test]
fn a_followed_file_killed_and_restarted_counts_every_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let Followed {
        web,
        out,
        dead,
        state,
        spec,
    } = Followed::new(dir.path());
    let visitors = 12;
    let mut sent = vec![0.0; visitors];
    // Appending (O_APPEND), as a log writer does: another writer's bytes
    // are never overwritten.
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&web)
        .unwrap();
    // Appends a round of views of every other visitor (by round), stamped
    // now, in two writes (a line may be read half-written).
    let mut append = |round: usize, sent: &mut Vec<f64>| {
        let ts = stamp();
        let mut text = String::new();
        for (v, n) in sent.iter_mut().enumerate() {
            if (v + round) % 2 == 0 {
                text += &view(ts, &format!("v{v}"));
                *n += 1.0;
            }
        }
        let (a, b) = text.split_at(text.len() / 2);
        file.write_all(a.as_bytes()).unwrap();
        file.flush().unwrap();
        file.write_all(b.as_bytes()).unwrap();
        file.flush().unwrap();
    };
    let start = || Running::start(&spec, &[], (&out, &dead, &state));
    append(0, &mut sent);
    let first = start();
    for round in 1..8 {
        std::thread::sleep(Duration::from_millis(300));
        append(round, &mut sent);
    }
    // Every line so far in the state (its checkpoint written with it),
    // then more lines that may or may not be, then the kill.
    wait_for_counts(&state, &sent, 30, "before the kill");
    let checkpointed = sent.iter().sum::<f64>() as usize;
    wait_for_point(&state, checkpointed);
    for round in 8..12 {
        append(round, &mut sent);
        std::thread::sleep(Duration::from_millis(150));
    }
    first.kill();
    // Lines appended while no engine runs, the last of them half-written
    // when the engine starts again (a writer in the middle of a line).
    for round in 12..15 {
        append(round, &mut sent);
        std::thread::sleep(Duration::from_millis(200));
    }
    let half = view(stamp(), "v0");
    let mut writer = std::fs::OpenOptions::new().append(true).open(&web).unwrap();
    writer.write_all(&half.as_bytes()[..10]).unwrap();
    let second = start();
    std::thread::sleep(Duration::from_millis(300));
    writer.write_all(&half.as_bytes()[10..]).unwrap();
    sent[0] += 1.0;
    for round in 15..20 {
        std::thread::sleep(Duration::from_millis(250));
        append(round, &mut sent);
    }
    wait_for_counts(&state, &sent, 30, "after the restart");
    // A graceful stop: exit status 0, and the summary says it restored.
    let ended = second.terminate();
    let stdout = String::from_utf8_lossy(&ended.stdout);
    assert!(
        ended.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ended.stderr)
    );
    assert!(stdout.contains("restored"), "{stdout}");
    // It read on from its resume point, not the file from its start: the
    // lines in the state before the kill were not read again.
    let read: usize = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("records read"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no records read in {stdout}"));
    let lines = std::fs::read_to_string(&web).unwrap().lines().count();
    assert!(
        read <= lines - checkpointed,
        "read {read} of {lines} lines again, {checkpointed} of which were checkpointed"
    );
    // Started again on the file that had ended in the middle of a line
    // when the second run started: the line was read once it ended.
    for round in 20..22 {
        append(round, &mut sent);
    }
    let third = start();
    wait_for_counts(&state, &sent, 30, "after the third start");
    let ended = third.terminate();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{stderr}");
    assert!(
        !stderr.contains("read again from its start"),
        "a line being written is no reason to read the file again: {stderr}"
    );
    assert_eq!(
        state_counts(&state, visitors),
        sent.iter().map(|n| Some(*n)).collect::<Vec<_>>()
    );
    assert_each_seen_once(&out, visitors);
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), "", "nothing late");
}

/// A socket input with state, its engine killed with SIGKILL while a
/// client sends, and started again after a downtime longer than the
/// allowed lateness: the restarted run restores what the checkpoint holds
/// (the lines before its cut), which `segflow query --checkpoint` and the
/// restart's warning both give; the client sends again, oldest first and
/// after a pause longer than `idle_advance`, every line it sent from that
/// time on, and every line is counted exactly once (the restored socket's
/// clock waits for its first line). A line sent again from before the cut
/// is late: a dead letter with the reason, not counted again.
#[test]
fn a_socket_run_killed_and_restarted_keeps_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (out, dead, state) = (
        dir.path().join("out.jsonl"),
        dir.path().join("dead.jsonl"),
        dir.path().join("state"),
    );
    let spec = dir.path().join("tcp.toml");
    std::fs::write(
        &spec,
        LIVE_COUNTS
            .replace("SOURCE", "until = \"disconnect\"")
            .replace(r#"allowed_lateness = "1s""#, r#"allowed_lateness = "2s""#),
    )
    .unwrap();
    let addr = free_addr();
    let input = ["--input".to_string(), format!("web=tcp://{addr}")];
    let start = || Running::start(&spec, &input, (&out, &dead, &state));
    let visitors = 8;
    // Every line sent, as the client keeps it: (event time, line).
    let mut log: Vec<(u64, String)> = Vec::new();
    let send = |client: &mut TcpStream, round: usize, log: &mut Vec<(u64, String)>| -> u64 {
        let ts = stamp();
        for v in 0..visitors {
            if (v + round) % 2 == 0 {
                let line = view(ts, &format!("v{v}"));
                client.write_all(line.as_bytes()).unwrap();
                log.push((ts, line));
            }
        }
        ts
    };
    let counts_of = |log: &[(u64, String)]| -> Vec<f64> {
        (0..visitors)
            .map(|v| {
                let tag = format!("\"v{v}\"");
                log.iter().filter(|(_, l)| l.contains(&tag)).count() as f64
            })
            .collect()
    };
    let first = start();
    let mut client = connect(&addr);
    let old = send(&mut client, 0, &mut log);
    for round in 1..6 {
        std::thread::sleep(Duration::from_millis(250));
        send(&mut client, round, &mut log);
    }
    wait_for_counts(&state, &counts_of(&log), 30, "before the kill");
    // Two more rounds, killed right after: read or not, not checkpointed.
    for round in 6..8 {
        std::thread::sleep(Duration::from_millis(150));
        send(&mut client, round, &mut log);
    }
    first.kill();
    drop(client);
    // Where the checkpoint stands, as a client asks before sending again.
    let asked = std::process::Command::new(env!("CARGO_BIN_EXE_segflow"))
        .args(["query", "--checkpoint", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(asked.status.success(), "{asked:?}");
    let asked: serde_json::Value = serde_json::from_slice(&asked.stdout).unwrap();
    let holds_before = asked["holds_before"].as_u64().unwrap();
    assert!(
        holds_before > old,
        "the checkpoint holds the first lines: {asked}"
    );
    // Down for longer than the allowed lateness.
    std::thread::sleep(Duration::from_millis(2500));
    let mut second = start();
    let mut client = connect(&addr);
    // A pause longer than idle_advance, then the lines from the cut on,
    // oldest first, and a line from before it (late: a dead letter, not
    // counted again).
    std::thread::sleep(Duration::from_millis(600));
    client.write_all(view(old, "v0").as_bytes()).unwrap();
    for (ts, line) in &log {
        if *ts >= holds_before {
            client.write_all(line.as_bytes()).unwrap();
        }
    }
    for round in 8..11 {
        std::thread::sleep(Duration::from_millis(250));
        send(&mut client, round, &mut log);
    }
    // The old line once more, after new ones: late again.
    client.write_all(view(old, "v0").as_bytes()).unwrap();
    wait_for_counts(&state, &counts_of(&log), 30, "after the restart");
    drop(client);
    let ended = wait_exit(second.0.take().expect("running"));
    let stdout = String::from_utf8_lossy(&ended.stdout);
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("restored"), "{stdout}");
    // The old line, sent twice, is late twice, with the reason.
    let letters = dead_letters(&dead);
    assert_eq!(letters.len(), 2, "{letters:?}");
    for letter in &letters {
        let reason = letter["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("late:") && reason.contains("cut of the checkpoint"),
            "{letters:?}"
        );
    }
    assert!(
        stderr.contains("send again") && stderr.contains(&format!("({holds_before} ms)")),
        "the cut is told, as `query --checkpoint` said ({holds_before}): {stderr}"
    );
    assert_eq!(
        state_counts(&state, visitors),
        counts_of(&log).into_iter().map(Some).collect::<Vec<_>>()
    );
    assert_each_seen_once(&out, visitors);
}

/// A followed file rotated while its engine is down (renamed, a new empty
/// file at its path, as logrotate does), that was empty when the engine
/// first started (so the input's marks say nothing of it): the restarted
/// run notices from its resume point's bytes, says so, restores the
/// checkpoint and reads the new file from its start. Every line the
/// checkpoint held and every line of the new file is counted once.
#[test]
fn a_followed_file_rotated_while_its_engine_is_down_is_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let Followed {
        web,
        out,
        dead,
        state,
        spec,
    } = Followed::new(dir.path());
    let visitors = 6;
    let mut sent = vec![0.0; visitors];
    let append = |path: &Path, sent: &mut Vec<f64>| {
        let ts = stamp();
        let mut text = String::new();
        for (v, n) in sent.iter_mut().enumerate() {
            text += &view(ts, &format!("v{v}"));
            *n += 1.0;
        }
        append_to(path, &text);
    };
    std::fs::write(&web, "").unwrap();
    let first = Running::start(&spec, &[], (&out, &dead, &state));
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        append(&web, &mut sent);
    }
    wait_for_counts(&state, &sent, 30, "before the kill");
    wait_for_point(&state, sent.iter().sum::<f64>() as usize);
    first.kill();
    std::fs::rename(&web, dir.path().join("web.jsonl.1")).unwrap();
    // The new file, by the time the engine starts again, is longer than
    // what was read of the old one: only its bytes tell them apart.
    std::fs::write(&web, "").unwrap();
    for _ in 0..8 {
        append(&web, &mut sent);
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Running::start(&spec, &[], (&out, &dead, &state));
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(250));
        append(&web, &mut sent);
    }
    wait_for_counts(&state, &sent, 30, "after the restart");
    let ended = second.terminate();
    let stdout = String::from_utf8_lossy(&ended.stdout);
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("restored"), "{stdout}");
    assert!(
        stderr.contains("is not the file the checkpoint read"),
        "the rotation is told: {stderr}"
    );
    assert_each_seen_once(&out, visitors);
    assert_eq!(std::fs::read_to_string(&dead).unwrap(), "", "nothing late");
}

/// A line half-written when a followed file's engine is killed, with an
/// event time that the checkpoint's cut passes while it waits (the source
/// idles), and finished after the restart: a run that never stopped would
/// have read it late, and so does the restored one (a dead letter), rather
/// than dropping it as one the checkpoint holds.
#[test]
fn a_line_finished_after_a_restart_behind_the_cut_is_late_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let Followed {
        web,
        out,
        dead,
        state,
        spec,
    } = Followed::new(dir.path());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&web)
        .unwrap();
    let first = Running::start(&spec, &[], (&out, &dead, &state));
    std::thread::sleep(Duration::from_millis(300));
    let mut sent = vec![0.0; 4];
    let round = |file: &mut std::fs::File, sent: &mut Vec<f64>| {
        let ts = stamp();
        for (v, n) in sent.iter_mut().enumerate() {
            file.write_all(view(ts, &format!("v{v}")).as_bytes())
                .unwrap();
            *n += 1.0;
        }
    };
    round(&mut file, &mut sent);
    let ts = stamp();
    let half = view(ts, "v9");
    file.write_all(&half.as_bytes()[..12]).unwrap();
    wait_for_counts(&state, &sent, 30, "before the kill");
    // The source idles: its watermark, and a checkpoint's cut, pass the
    // half-written line's time.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cut = segflow::store::StateParts::open_read_only(&state)
            .ok()
            .and_then(|p| p.checkpoint().ok().flatten())
            .and_then(|c| c.retained)
            .map(|r| r.cut);
        if cut.is_some_and(|c| c > ts) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cut past {ts} in 30 s: {cut:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    first.kill();
    file.write_all(&half.as_bytes()[12..]).unwrap();
    let second = Running::start(&spec, &[], (&out, &dead, &state));
    std::thread::sleep(Duration::from_millis(300));
    round(&mut file, &mut sent);
    wait_for_counts(&state, &sent, 30, "after the restart");
    let ended = second.terminate();
    assert!(ended.status.success(), "{ended:?}");
    let letters = dead_letters(&dead);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]["reason"].as_str().unwrap().starts_with("late:"),
        "{letters:?}"
    );
    assert!(
        letters[0]["raw"]
            .as_str()
            .unwrap_or_default()
            .contains("v9")
            || letters[0].to_string().contains("v9"),
        "{letters:?}"
    );
    let nine = state_counts(&state, 10)[9];
    assert_eq!(nine, None, "the late line is not counted");
}

/// [`Followed::new`] with a tick of one second (as the shipped
/// definition's), for tests about what happens within a wall-clock tick.
fn followed_with_1s_ticks(dir: &Path) -> Followed {
    let followed = Followed::new(dir);
    let text = std::fs::read_to_string(&followed.spec).unwrap();
    std::fs::write(
        &followed.spec,
        text.replace(r#"tick = "100ms""#, r#"tick = "1s""#),
    )
    .unwrap();
    followed
}

/// The wall clock, 20-60 ms into a second (waiting for it).
fn early_in_a_second() -> u64 {
    loop {
        let now = wall_ms();
        if (20..60).contains(&(now % 1_000)) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Appends to `web` one view of every visitor `v0..` stamped `ts`, and
/// counts them in `sent`.
fn append_round(web: &Path, ts: u64, sent: &mut [f64]) {
    let mut text = String::new();
    for (v, n) in sent.iter_mut().enumerate() {
        text += &view(ts, &format!("v{v}"));
        *n += 1.0;
    }
    append_to(web, &text);
}

/// The `cut` of the checkpoint in `state` (read-only), if it has one.
fn checkpoint_cut(state: &Path) -> Option<u64> {
    segflow::store::StateParts::open_read_only(state)
        .ok()
        .and_then(|p| p.checkpoint().ok().flatten())
        .and_then(|c| c.retained)
        .map(|r| r.cut)
}

/// A followed file stopped with SIGTERM in the middle of a wall-clock
/// tick (1 s) and started again: the stop writes every time before that
/// tick, not the tick itself, which clients that stamp the wall clock may
/// still be appending to. Lines of that tick appended after the stop are
/// counted (the next run reads the tick's lines from its resume point); a
/// line appended after the stop with a time before the checkpoint's cut
/// is late, a dead letter with the reason, never dropped, and a broken
/// line appended then is a dead letter too; every other line is counted
/// exactly once, every visitor enters once, and a run stopped before it
/// read a line changes none of this.
#[test]
fn a_followed_file_stopped_mid_tick_and_restarted_loses_no_line() {
    let dir = tempfile::tempdir().unwrap();
    let Followed {
        web,
        out,
        dead,
        state,
        spec,
    } = followed_with_1s_ticks(dir.path());
    let visitors = 6;
    let mut sent = vec![0.0; visitors];
    let round = |ts: u64, sent: &mut Vec<f64>| append_round(&web, ts, sent);
    let start = || Running::start(&spec, &[], (&out, &dead, &state));
    for stop in 0..2 {
        let run = start();
        for _ in 0..3 {
            round(wall_ms(), &mut sent);
            std::thread::sleep(Duration::from_millis(400));
        }
        wait_for_counts(&state, &sent, 30, &format!("run {stop}"));
        // Lines of the tick in progress, read, then the stop, in that
        // tick.
        let now = early_in_a_second();
        let tick = now - now % 1_000;
        round(now, &mut sent);
        std::thread::sleep(Duration::from_millis(100));
        let ended = run.terminate();
        assert!(ended.status.success(), "{ended:?}");
        assert_eq!(
            checkpoint_cut(&state),
            Some(tick),
            "the stop writes the times before the tick in progress"
        );
        // Appended after the stop: the rest of that tick's lines (on
        // time), and one of visitor `v0` from before the tick (late).
        round(tick + 900, &mut sent);
        append_to(&web, &view(tick - 500, "v0"));
        append_to(&web, "{\"event\": \"view_item\", \"ts\": \n");
    }
    // A run stopped before it has read a line: the next one still knows
    // what the earlier runs read (nothing is dead-lettered twice).
    let quick = start();
    std::thread::sleep(Duration::from_millis(50));
    let ended = quick.terminate();
    assert!(ended.status.success(), "{ended:?}");
    // Its summary gives the profiles it restored.
    let summary = String::from_utf8_lossy(&ended.stdout);
    assert!(
        summary.contains(&format!("  profiles          {visitors}\n")),
        "{summary}"
    );
    // A slow client's line from before the cut, appended just after a
    // start, and a stop soon after: its dead letter is written once, and
    // stays (the next run does not cut it off as unwritten).
    let slow = start();
    std::thread::sleep(Duration::from_millis(100));
    let cut = checkpoint_cut(&state).expect("a checkpoint");
    append_to(&web, &view(cut - 700, "v1"));
    std::thread::sleep(Duration::from_millis(400));
    let ended = slow.terminate();
    assert!(ended.status.success(), "{ended:?}");
    let last = start();
    round(wall_ms(), &mut sent);
    wait_for_counts(&state, &sent, 30, "after the last start");
    let ended = last.terminate();
    assert!(ended.status.success(), "{ended:?}");
    let letters = dead_letters(&dead);
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        letters.len(),
        5,
        "three late lines, two broken: {reasons:?}"
    );
    let late = reasons
        .iter()
        .filter(|r| r.starts_with("late:") && r.contains("cut of the checkpoint"))
        .count();
    assert_eq!(late, 3, "{reasons:?}");
    let lines = std::fs::read_to_string(&web).unwrap().lines().count();
    assert_eq!(
        lines,
        sent.iter().sum::<f64>() as usize + letters.len(),
        "every line is counted or a dead letter"
    );
    assert_each_seen_once(&out, visitors);
}

/// A followed file whose first run is stopped before its checkpoint has a
/// resume point (within its first tick): lines appended while no engine
/// runs, stamped before the checkpoint's cut, are late (dead letters), not
/// dropped as held; the lines the first run read are counted once.
#[test]
fn a_first_run_stopped_before_it_has_a_resume_point_loses_no_line() {
    let dir = tempfile::tempdir().unwrap();
    let Followed {
        web,
        out,
        dead,
        state,
        spec,
    } = followed_with_1s_ticks(dir.path());
    let visitors = 3;
    let mut sent = vec![0.0; visitors];
    // Lines early in a second, then the first run, stopped in that second
    // once it has read them: the checkpoint's cut is that second, and no
    // point is before it (the first point is after the lines).
    let now = early_in_a_second();
    append_round(&web, now, &mut sent);
    let first = Running::start(&spec, &[], (&out, &dead, &state));
    std::thread::sleep(Duration::from_millis(400));
    let ended = first.terminate();
    assert!(ended.status.success(), "{ended:?}");
    let cut = checkpoint_cut(&state).unwrap_or(now - now % 1_000);
    // Appended while no engine runs: two slow lines from before the cut.
    append_to(&web, &(view(cut - 600, "v0") + &view(cut - 300, "v1")));
    let second = Running::start(&spec, &[], (&out, &dead, &state));
    append_to(&web, &view(wall_ms(), "v2"));
    sent[2] += 1.0;
    wait_for_counts(&state, &sent, 30, "the second run");
    let ended = second.terminate();
    assert!(ended.status.success(), "{ended:?}");
    let letters = dead_letters(&dead);
    assert_eq!(letters.len(), 2, "the two slow lines: {letters:?}");
    assert_each_seen_once(&out, visitors);
}

/// Hot reload: a run that follows a file picks up an edited definition
/// without a restart. A removed segment's members leave, a changed one's
/// membership changes by the difference, a new one's members enter, all
/// at one event time; a file that does not validate, and an edit of a
/// trait, are refused with their reasons while the run goes on; the
/// checkpoint then carries the edited definition, so a restart with it
/// resumes.
#[test]
fn an_edited_definition_applies_its_segment_changes_without_a_restart() {
    const BIN: &str = env!("CARGO_BIN_EXE_segflow");
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("flow.toml");
    let head = r#"
[engine]
tick = "100ms"
allowed_lateness = "0s"
idle_advance = "200ms"

[sources.web]
follow = true

[traits.views_60s]
stream = "web"
filter = 'event == "view_item"'
window = "60s"
"#;
    std::fs::write(
        &def,
        format!("{head}\n[segments.one]\nwhen = \"views_60s >= 1\"\n[segments.two]\nwhen = \"views_60s >= 2\"\n"),
    )
    .unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, "").unwrap();
    let out = dir.path().join("out.jsonl");
    let err_path = dir.path().join("stderr.txt");
    let child = std::process::Command::new(BIN)
        .arg("run")
        .arg(&def)
        .arg("--input")
        .arg(format!("web={}", web.display()))
        .arg("--output")
        .arg(&out)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["-w", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let running = Running(Some(child));
    let append = |lines: &[String]| append_to(&web, &lines.concat());
    let diffs = || diffs_in(&out);
    let wait_diffs = |n: usize, what: &str| wait_for_diffs(&out, n, what);
    let stderr = || std::fs::read_to_string(&err_path).unwrap_or_default();
    let wait_stderr = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stderr: {}",
                stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // a views once, b twice: a in one; b in one and two.
    let t = stamp();
    append(&[view(t, "a"), view(t, "b"), view(t, "b")]);
    wait_diffs(3, "the first entries");
    let before = diffs();
    let edit = |text: String| {
        // Written whole at once: a reader never sees half a file.
        let tmp = dir.path().join("flow.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &def).unwrap();
    };
    // two removed, one changed to 2+ views, three added (1+ view).
    edit(format!("{head}\n[segments.one]\nwhen = \"views_60s >= 2\"\n[segments.three]\nwhen = \"views_60s >= 1\"\n"));
    wait_diffs(7, "the reload's diffs");
    let reload: Vec<_> = diffs()[before.len()..].to_vec();
    let at = reload[0].0;
    assert!(
        reload.iter().all(|d| d.0 == at),
        "one event time: {reload:?}"
    );
    let mut got: Vec<(String, String, i64)> = reload
        .iter()
        .map(|d| (d.1.clone(), d.2.clone(), d.3))
        .collect();
    got.sort();
    let want = |s: &str, p: &str, d: i64| (s.to_string(), format!("anon:{p}"), d);
    assert_eq!(
        got,
        vec![
            want("one", "a", -1),
            want("three", "a", 1),
            want("three", "b", 1),
            want("two", "b", -1),
        ]
    );
    assert!(at >= before.iter().map(|d| d.0).max().unwrap());
    wait_stderr("segments added [three], removed [two], changed [one]");
    // A file that does not validate: refused with its position; the run
    // goes on under the definitions it has.
    edit(format!(
        "{head}\n[segments.one]\nwhen = \"views_60s >>= 2\"\n"
    ));
    wait_stderr("flow.toml:16:");
    // A trait edit: refused with the reason.
    edit(
        format!("{head}\n[segments.one]\nwhen = \"views_60s >= 2\"\n[segments.three]\nwhen = \"views_60s >= 1\"\n")
            .replace("window = \"60s\"", "window = \"30s\""),
    );
    wait_stderr("changed its traits");
    let t = stamp();
    append(&[view(t, "c")]);
    wait_diffs(8, "c enters three under the reloaded definition");
    assert_eq!(
        diffs().last().map(|d| (d.1.clone(), d.2.clone(), d.3)),
        Some(("three".to_string(), "anon:c".to_string(), 1))
    );
    // The checkpoint follows the edited definition: a restart with the
    // file as it was last applied resumes.
    edit(format!("{head}\n[segments.one]\nwhen = \"views_60s >= 2\"\n[segments.three]\nwhen = \"views_60s >= 1\"\n"));
    wait_for_point(&dir.path().join("state"), 3);
    wait_for_definition(&dir.path().join("state"), &def);
    let output = running.terminate();
    assert!(output.status.success(), "{}", stderr());
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("segment three"), "{summary}");
}

/// Waits up to 30 s for `out` to hold at least `n` diffs.
fn wait_for_diffs(out: &Path, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while diffs_in(out).len() < n {
        assert!(Instant::now() < deadline, "{what}: {:?}", diffs_in(out));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to 30 s for the checkpoint in `state` to carry the definition
/// in `def` (a reload's checkpoint does once its cut passes the reload).
fn wait_for_definition(state: &Path, def: &Path) {
    let edited = segflow::engine::resume::fingerprint(&segflow::spec::load_spec(def).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fingerprint = segflow::store::StateParts::open_read_only(state)
            .ok()
            .and_then(|p| p.checkpoint().ok().flatten())
            .map(|c| c.fingerprint);
        if fingerprint.as_deref() == Some(edited.as_str()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the checkpoint keeps the old definition"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The segment diffs of an output file, as `(time, segment, profile, diff)`.
fn diffs_in(out: &Path) -> Vec<(u64, String, String, i64)> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["time"].as_u64().unwrap(),
                v["segment"].as_str().unwrap().to_string(),
                v["profile"].as_str().unwrap().to_string(),
                v["diff"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A dwell time survives a hot reload followed by a restart with the
/// edited file: the reload puts a new segment before the dwell segment in
/// the file (so the dwell segment's position differs between the running
/// engine, which appends new segments, and the restarted one, which reads
/// the file in order), the run is stopped while a member is held by its
/// dwell time alone, and the restarted run lets it leave exactly when the
/// dwell time from its real entry ends: not at the restart, not in
/// another segment.
#[test]
fn a_dwell_time_runs_on_after_a_reload_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let def = dir.path().join("flow.toml");
    let head = r#"
[engine]
tick = "100ms"
allowed_lateness = "0s"
idle_advance = "100ms"

[sources.web]
follow = true

[traits.views_2s]
stream = "web"
filter = 'event == "view_item"'
window = "2s"
"#;
    let held = "[segments.held]\nwhen = \"views_2s >= 2\"\nmin_dwell = \"9s\"\n";
    let first = "[segments.first]\nwhen = \"views_2s >= 1\"\n";
    std::fs::write(&def, format!("{head}\n{held}")).unwrap();
    let web = dir.path().join("web.jsonl");
    std::fs::write(&web, "").unwrap();
    let (out, dead, state) = (
        dir.path().join("out.jsonl"),
        dir.path().join("dead.jsonl"),
        dir.path().join("state"),
    );
    let paths = (out.as_path(), dead.as_path(), state.as_path());
    let args = vec![
        "--input".to_string(),
        format!("web={}", web.display()),
        "-w".into(),
        "2".into(),
    ];
    let wait_diffs = |n: usize, what: &str| wait_for_diffs(&out, n, what);
    let running = Running::start(&def, &args, paths);
    let t0 = stamp();
    let entered = t0 - t0 % TICK;
    append_to(&web, &[view(t0, "b"), view(t0, "b")].concat());
    wait_diffs(1, "b enters held");
    // The reload: `first` comes before `held` in the file.
    let tmp = dir.path().join("flow.toml.new");
    std::fs::write(&tmp, format!("{head}\n{first}\n{held}")).unwrap();
    std::fs::rename(&tmp, &def).unwrap();
    // The checkpoint carries the edited definition once its cut passes
    // the reload.
    wait_for_definition(&state, &def);
    // b's views have left their window (2 s); only the dwell time holds it.
    let now = wall_ms();
    std::thread::sleep(Duration::from_millis((entered + 3_000).saturating_sub(now)));
    let output = running.terminate();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        wall_ms() < entered + 8_000,
        "the test was too slow to stop the run within the dwell time"
    );
    let before = diffs_in(&out);
    assert!(
        !before.iter().any(|d| d.1 == "held" && d.3 == -1),
        "b left held before the dwell time ran out: {before:?}"
    );
    // The restart, with the edited file; b leaves held 9 s after it
    // entered.
    let running = Running::start(&def, &args, paths);
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        let found = diffs_in(&out)
            .into_iter()
            .find(|d| d.1 == "held" && d.3 == -1);
        if let Some(d) = found {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "b never left held: {:?}",
            diffs_in(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        exit,
        (
            entered + 9_000,
            "held".to_string(),
            "anon:b".to_string(),
            -1
        ),
        "{:?}",
        diffs_in(&out)
    );
    let output = running.terminate();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // b entered held once, `first` at the reload, and left `first` when
    // its views left the window; nothing else.
    let mut got: Vec<(String, i64)> = diffs_in(&out).into_iter().map(|d| (d.1, d.3)).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("first".to_string(), -1),
            ("first".to_string(), 1),
            ("held".to_string(), -1),
            ("held".to_string(), 1),
        ]
    );
}
