//! Live inputs: TCP sources with several clients, a TCP sink, and the
//! wall-clock watermark that expires windows while no events arrive.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segflow::spec::parse_spec;
use segflow::{Engine, Input, Output};

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

const T: u64 = 1_772_409_600_000;

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

#[test]
fn idle_sources_expire_windows_without_new_events() {
    let addr = free_addr();
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let engine_addr = addr.clone();
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
            .output(Output::Callback(Arc::new(move |d| {
                sink.lock().unwrap().push((Instant::now(), d.to_line()))
            })))
            .run(timely::Config::process(2))
            .unwrap()
    });
    let mut client = connect(&addr);
    client
        .write_all((view(T, "a1") + &view(T + 100, "a1")).as_bytes())
        .unwrap();
    client.flush().unwrap();
    // No more events: the exit at T + 2 s must come from the idle clock.
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let disconnected = Instant::now();
    drop(client);
    let summary = engine.join().unwrap();
    let seen = seen.lock().unwrap();
    let lines: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(
        lines,
        vec![
            active("anon:a1", T + 100, 1),
            active("anon:a1", T + 2000, -1),
        ]
    );
    assert!(
        seen[1].0 <= disconnected,
        "the exit was emitted while the client was still connected"
    );
    assert_eq!(summary.sources[0].records, 2);
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
    // Both clients use the same event times, so neither can be late
    // whatever order their lines arrive in.
    a.write_all((view(T + 100, "a1") + &view(T + 100, "a1")).as_bytes())
        .unwrap();
    b.write_all((view(T + 100, "b1") + "not json\n" + &view(T + 100, "b1")).as_bytes())
        .unwrap();
    a.flush().unwrap();
    b.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(a);
    drop(b);
    let summary = engine.join().unwrap();
    let lines = collector.join().unwrap();
    let enters: Vec<&String> = lines.iter().filter(|l| l.contains(r#""diff":1"#)).collect();
    assert_eq!(
        enters,
        vec![
            &active("anon:a1", T + 100, 1),
            &active("anon:b1", T + 100, 1),
        ]
    );
    assert_eq!(summary.sources[0].records, 4);
    assert_eq!(summary.sources[0].dead_letters, 1);
}

#[test]
fn followed_file_is_read_as_it_grows() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.jsonl");
    let out = dir.path().join("out.jsonl");
    std::fs::write(&web, view(T, "f1") + &view(T + 100, "f1")).unwrap();
    let spec = dir.path().join("follow.toml");
    std::fs::write(
        &spec,
        SPEC.replace(
            "[sources.web]",
            &format!(
                "[sources.web]\npath = {:?}\nfollow = true",
                web.display().to_string()
            ),
        ),
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
    // Append two views of another visitor 10 s of event time later (well
    // ahead of the idle clock), the first in two pieces.
    let lines = view(T + 10_000, "f2") + &view(T + 10_000, "f2");
    let (head, tail) = lines.split_at(10);
    let mut f = std::fs::OpenOptions::new().append(true).open(&web).unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    f.write_all(tail.as_bytes()).unwrap();
    f.flush().unwrap();
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
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec![
            active("anon:f1", T + 100, 1),
            active("anon:f1", T + 2000, -1),
            active("anon:f2", T + 10_000, 1),
        ]
    );
}
