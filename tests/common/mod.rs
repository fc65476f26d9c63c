//! Helpers shared by the integration tests: clusters, ports, generated
//! data. (Each test crate uses some of them.)
#![allow(dead_code)]

use std::path::Path;

/// A generated data set, as lines.
#[derive(Clone)]
pub struct Generated {
    /// Web events (malformed lines included).
    pub web: Vec<String>,
    /// CRM records.
    pub crm: Vec<String>,
    /// Transactions.
    pub txn: Vec<String>,
}

/// `events` web events of `seed` (with their CRM records and
/// transactions), spread over `days` if given.
pub fn generated(events: u64, seed: u64, days: Option<u64>) -> Generated {
    let (mut w, mut c, mut t) = (Vec::new(), Vec::new(), Vec::new());
    segflow::generate::generate_to(
        &segflow::generate::GenConfig {
            events,
            seed,
            span_days: days,
            ..Default::default()
        },
        &mut w,
        &mut c,
        &mut t,
    )
    .unwrap();
    let lines = |b: Vec<u8>| -> Vec<String> {
        String::from_utf8(b)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    Generated {
        web: lines(w),
        crm: lines(c),
        txn: lines(t),
    }
}

/// A hostfile in `dir` for a two-process cluster on loopback (two free
/// ports); its path.
pub fn hostfile(dir: &Path) -> std::path::PathBuf {
    let hostfile = dir.join("hosts");
    std::fs::write(
        &hostfile,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()),
    )
    .unwrap();
    hostfile
}

/// The arguments that make a run process `p` of a two-process cluster
/// whose hosts are in `hostfile`.
pub fn cluster_args(p: usize, hostfile: &Path) -> Vec<String> {
    [
        "-n",
        "2",
        "-p",
        &p.to_string(),
        "-h",
        hostfile.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// An HTTP client that returns every status as an answer (not an error),
/// with a 30 s limit per request.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into()
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Kafka-API broker on loopback.
pub mod broker {
    //! A real Kafka-API broker for the tests: tansu, with memory storage
    //! (`.ci/test` installs it and sets `SEGFLOW_TANSU`); each test starts its
    //! own on a free loopback port.

    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::{Message, Offset, TopicPartitionList};

    /// A tansu broker on a free loopback port, stopped on drop.
    pub struct Broker {
        /// The broker's process.
        pub child: Child,
        /// `127.0.0.1:PORT`.
        pub addr: String,
        bin: String,
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn broker() -> Broker {
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
        pub fn create_topic(&self, topic: &str, partitions: u32) {
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
        pub fn consume(
            &self,
            topic: &str,
            partitions: i32,
            expected: usize,
        ) -> Vec<(i32, String, String)> {
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

    impl Broker {
        /// Produces `records` (`(partition, value)`) to `topic`, in order, and
        /// waits until the broker has them all.
        pub fn produce(&self, topic: &str, records: &[(i32, String)]) {
            self.produce_with(topic, records, &[("linger.ms", "5")]);
        }

        fn produce_with(&self, topic: &str, records: &[(i32, String)], settings: &[(&str, &str)]) {
            let mut config = ClientConfig::new();
            config
                .set("bootstrap.servers", &self.addr)
                .set("acks", "all")
                .set("enable.idempotence", "true");
            for (key, value) in settings {
                config.set(*key, *value);
            }
            let producer: BaseProducer = config.create().unwrap();
            for (partition, value) in records {
                let mut record = BaseRecord::<(), str>::to(topic)
                    .partition(*partition)
                    .payload(value.as_str());
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, r)) => {
                            record = r;
                            producer.poll(Duration::from_millis(20));
                        }
                    }
                }
            }
            // One record per batch is a round trip each: on two loaded
            // cores (the whole suite beside a freshly built broker) a
            // minute was once not enough for the test's data.
            producer
                .flush(Duration::from_secs(300))
                .unwrap_or_else(|e| {
                    panic!("the broker did not take every record in 5 minutes: {e}")
                });
            assert_eq!(producer.in_flight_count(), 0, "every record produced");
        }

        /// As [`Broker::produce`], one record per batch. tansu 0.6 answers
        /// a fetch from an offset inside a batch with the next batch (real
        /// Kafka sends the batch that holds the offset, and the client skips
        /// what comes before it): a run resumed inside a batch would never
        /// get the rest of that batch. A test that kills a run at any offset
        /// produces this way, so that every offset starts a batch.
        pub fn produce_one_per_batch(&self, topic: &str, records: &[(i32, String)]) {
            self.produce_with(
                topic,
                records,
                &[("linger.ms", "0"), ("batch.num.messages", "1")],
            );
        }

        /// The offsets group `group` committed for each of `partitions`
        /// partitions of `topic` (-1 for none).
        pub fn committed(&self, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &self.addr)
                .set("group.id", group)
                .create()
                .unwrap();
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(topic, p);
            }
            let committed = consumer
                .committed_offsets(tpl, Duration::from_secs(10))
                .unwrap();
            (0..partitions)
                .map(
                    |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => -1,
                    },
                )
                .collect()
        }
    }
}
