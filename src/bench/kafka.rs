//! The `kafka` bench job: the generated data set produced to topics of a
//! running Kafka-API broker (`--kafka HOST:PORT`), then the shipped
//! dataflow reading them to their end offsets (`?until=end`), as the
//! `ecommerce` job reads the files: the Kafka source's throughput, to
//! compare with the files'.

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// The topics of the job: `(source, generated file, partitions)`.
pub const TOPICS: [(&str, &str, i32); 3] = [
    ("web", "web.jsonl", 4),
    ("crm", "crm.jsonl", 2),
    ("transactions", "transactions.jsonl", 1),
];

/// Creates the topics `{prefix}-{source}` on `brokers` and produces each
/// generated file of `data` to its topic, line `i` to partition `i mod n`;
/// returns `(source, kafka:// location)` per topic and the records
/// produced per second.
pub fn produce(
    brokers: &str,
    data: &Path,
    prefix: &str,
) -> Result<(Vec<(String, String)>, f64), String> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| format!("kafka://{brokers}: {e}"))?;
    let topics: Vec<(String, i32)> = TOPICS
        .iter()
        .map(|(source, _, n)| (format!("{prefix}-{source}"), *n))
        .collect();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, n)| NewTopic::new(t, *n, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let created = futures_block(admin.create_topics(&new, &options))
        .map_err(|e| format!("cannot create topics on the Kafka broker at {brokers}: {e}"))?;
    for result in created {
        if let Err((topic, code)) = result {
            if code != RDKafkaErrorCode::TopicAlreadyExists {
                return Err(format!("cannot create topic {topic}: {code}"));
            }
        }
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .create()
        .map_err(|e| format!("kafka://{brokers}: {e}"))?;
    let started = std::time::Instant::now();
    let mut produced = 0u64;
    let mut locations = Vec::new();
    for ((source, file, partitions), (topic, _)) in TOPICS.iter().zip(&topics) {
        let path = data.join(file);
        let reader = std::io::BufReader::new(
            std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        for (i, line) in reader.split(b'\n').enumerate() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let mut record = BaseRecord::<(), [u8]>::to(topic)
                .partition(i as i32 % partitions)
                .payload(&line);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(format!("producing to {topic}: {e}")),
                }
            }
            produced += 1;
        }
        locations.push((
            source.to_string(),
            format!("kafka://{brokers}/{topic}?until=end"),
        ));
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| format!("producing to kafka://{brokers}: {e}"))?;
    Ok((locations, produced as f64 / started.elapsed().as_secs_f64()))
}

/// Runs a future to its end on a one-thread runtime (the admin client's
/// calls are async).
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}
