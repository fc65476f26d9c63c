//! The Kafka output against a real Kafka-API broker on loopback (tansu,
//! with memory storage; `.ci/test` installs it and sets `SEGFLOW_TANSU`,
//! each test starts its own on a free port): every diff of the shipped
//! dataflow is a record keyed by its profile, each profile's diffs in time
//! order in its partition, with one worker and with two; a broker that is
//! not there, or a topic that does not exist, stops the run at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use segflow::spec::load_spec;
use segflow::{Engine, Input, Output};
use serde_json::Value;

/// A tansu broker on a free loopback port, stopped on drop.
struct Broker {
    child: Child,
    addr: String,
    bin: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker() -> Broker {
    let bin = std::env::var("SEGFLOW_TANSU").unwrap_or_else(|_| {
        format!(
            "{}/.cache/segflow/tools/bin/tansu",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        Path::new(&bin).exists(),
        "the tansu Kafka broker is not installed at {bin}: run the tests with .ci/test, which installs it"
    );
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let url = format!("tcp://{addr}");
    let child = Command::new(&bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "tansu did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker { child, addr, bin }
}

impl Broker {
    fn create_topic(&self, topic: &str, partitions: u32) {
        let status = Command::new(&self.bin)
            .args([
                "topic",
                "create",
                topic,
                "--partitions",
                &partitions.to_string(),
                "--broker",
                &format!("tcp://{}", self.addr),
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {topic}");
    }

    /// Every record of `topic`: `(partition, key, value)`, in offset order
    /// per partition; waits for `expected` records, then checks that no
    /// more come.
    fn consume(&self, topic: &str, partitions: i32, expected: usize) -> Vec<(i32, String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", "segflow-test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.len() < expected && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                out.push((
                    m.partition(),
                    String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                    String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
                ));
            }
        }
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            panic!("an extra record: {:?}", m.map(|m| m.offset()));
        }
        out
    }
}

mod common;
use common::{generated, Generated as Data};

fn data() -> Data {
    generated(3_000, 9, None)
}

fn engine(d: &Data, dir: &Path) -> Engine {
    let mut spec = load_spec(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dataflows/ecommerce.toml"
    )))
    .unwrap();
    spec.output = Default::default();
    let mem = |v: &Vec<String>| Input::Memory(Arc::new(v.clone()));
    Engine::new(spec)
        .input("web", mem(&d.web))
        .unwrap()
        .input("crm", mem(&d.crm))
        .unwrap()
        .input("transactions", mem(&d.txn))
        .unwrap()
        .dead_letter(dir.join("dead.jsonl"))
}

/// Diff lines grouped by profile, each profile's in order.
fn per_profile(lines: impl Iterator<Item = String>) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in lines {
        let v: Value = serde_json::from_str(&l).unwrap();
        m.entry(v["profile"].as_str().unwrap().to_string())
            .or_default()
            .push(l);
    }
    m
}

#[test]
fn every_diff_is_a_record_keyed_by_its_profile_in_order() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let expected = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&expected);
    engine(&d, dir.path())
        .output(Output::Callback(Arc::new(move |x| {
            sink.lock().unwrap().push(x.to_line())
        })))
        .run(timely::Config::process(1))
        .unwrap();
    let expected = expected.lock().unwrap().clone();
    assert!(expected.len() > 50, "{}", expected.len());
    let b = broker();
    for workers in [1, 2] {
        let topic = format!("segments-w{workers}");
        b.create_topic(&topic, 3);
        engine(&d, dir.path())
            .output(Output::parse(&format!("kafka://{}/{topic}", b.addr)))
            .run(timely::Config::process(workers))
            .unwrap();
        let records = b.consume(&topic, 3, expected.len());
        assert_eq!(records.len(), expected.len(), "-w {workers}");
        for (_, key, value) in &records {
            let v: Value = serde_json::from_str(value).unwrap();
            assert_eq!(v["profile"], key.as_str(), "keyed by profile");
        }
        // A profile's records are in one partition, in the engine's order.
        let mut partition_of = BTreeMap::new();
        for (p, key, _) in &records {
            assert_eq!(*partition_of.entry(key.clone()).or_insert(*p), *p, "{key}");
        }
        assert!(
            partition_of
                .values()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1,
            "the profiles are spread over the partitions"
        );
        assert_eq!(
            per_profile(records.into_iter().map(|r| r.2)),
            per_profile(expected.iter().cloned()),
            "-w {workers}"
        );
    }
}

#[test]
fn a_broker_that_is_not_there_or_a_missing_topic_stops_the_run_at_start() {
    let d = data();
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let started = Instant::now();
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{closed}/segments")))
        .run(timely::Config::process(1))
        .expect_err("no broker");
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let b = broker();
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{}/no-such-topic", b.addr)))
        .run(timely::Config::process(1))
        .expect_err("no topic");
    assert!(err.to_string().contains("no-such-topic"), "{err}");
    let err = engine(&d, dir.path())
        .output(Output::parse(&format!("kafka://{}", b.addr)))
        .run(timely::Config::process(1))
        .expect_err("no topic named");
    assert!(err.to_string().contains("names no topic"), "{err}");
}

/// The broker goes away in the middle of a run: the records it no longer
/// acknowledges stop the run with the reason, never an exit 0 with diffs
/// missing from the topic.
#[test]
fn a_broker_that_goes_away_mid_run_stops_the_run_with_the_reason() {
    let d = generated(40_000, 4, None);
    let dir = tempfile::tempdir().unwrap();
    let mut b = broker();
    b.create_topic("segments", 3);
    let output = Output::parse(&format!("kafka://{}/segments", b.addr));
    let run = std::thread::spawn({
        let engine = engine(&d, dir.path()).output(output);
        move || engine.run(timely::Config::process(1))
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !run.is_finished(),
        "the run ended before the broker was stopped"
    );
    let _ = b.child.kill();
    let _ = b.child.wait();
    let started = Instant::now();
    let result = run.join().unwrap();
    let err = result.expect_err("the run succeeded without its broker");
    let text = err.to_string();
    assert!(
        text.contains("kafka://")
            && (text.contains("not acknowledged") || text.contains("not delivered")),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
}
