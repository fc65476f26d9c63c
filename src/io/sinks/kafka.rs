//! A Kafka segment output (`--output kafka://HOST:PORT/TOPIC`): every diff
//! line is one record of the topic, keyed by its profile, so that a
//! profile's diffs land in one partition, in time order.
//!
//! The commit stage writes lines to it as to a file and flushes once per
//! round of committed times; a flush produces the lines written since the
//! last one and waits until the broker has acknowledged every record
//! (`acks=all`; librdkafka retries on its own for up to
//! [`DELIVERY_TIMEOUT`]). A record that cannot be delivered in that time
//! stops the run, non-zero, with the reason: the checkpoint is written
//! after the flush, so nothing the checkpoint counts as written is missing
//! from the topic.
//!
//! **Guarantee: at least once.** After a crash the restarted engine
//! produces again the diffs after its last checkpoint; each record's value
//! is the diff line with its `time`, so a consumer that keeps, per profile
//! and segment, the latest time it applied drops what is sent again.
//! (Kafka transactions would make this exactly once for transactional
//! consumers; they are not used yet.)
//!
//! The broker and the topic are checked when the run starts: a broker that
//! does not answer within [`CONNECT_TIMEOUT`], or a topic that does not
//! exist, stops the run before anything is read.

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::SegmentDiff;

/// How long a record may take to be acknowledged, retries included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker has to answer when the run starts.
pub use crate::io::kafka::CONNECT_TIMEOUT;

/// Notes the first record that could not be delivered.
#[derive(Default)]
struct Deliveries {
    failed: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if let Ok(mut failed) = self.failed.lock() {
                failed.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// The Kafka output (a [`Write`]: lines in, records out at each flush).
pub struct KafkaSink {
    producer: BaseProducer<Deliveries>,
    topic: String,
    label: String,
    /// Lines written since the last flush.
    pending: super::LineBuffer,
}

impl KafkaSink {
    /// Connects to `brokers` (`host:port[,host:port]`) and checks that
    /// `topic` exists.
    pub fn connect(brokers: &str, topic: &str) -> io::Result<KafkaSink> {
        let label = format!("kafka://{brokers}/{topic}");
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            // Retries keep each partition's order, and do not duplicate.
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .set("linger.ms", "5")
            .create_with_context(Deliveries::default())
            .map_err(|e| io::Error::other(format!("{label}: {e}")))?;
        crate::io::kafka::topic_partitions(producer.client(), brokers, topic)?;
        Ok(KafkaSink {
            producer,
            topic: topic.to_string(),
            label,
            pending: Default::default(),
        })
    }

    /// Produces one line, keyed by its profile; waits while librdkafka's
    /// queue is full.
    fn produce(&self, line: &[u8]) -> io::Result<()> {
        let diff: SegmentDiff = serde_json::from_slice(line).map_err(|e| {
            io::Error::other(format!("{}: not a segment diff line: {e}", self.label))
        })?;
        let mut record = BaseRecord::to(&self.topic)
            .key(diff.profile.as_bytes())
            .payload(line);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(io::Error::other(format!("{}: {e}", self.label))),
            }
        }
    }
}

impl Write for KafkaSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.push(buf);
        Ok(buf.len())
    }

    /// Produces every complete line written since the last flush and waits
    /// for the broker's acknowledgements.
    fn flush(&mut self) -> io::Result<()> {
        let pending = self.pending.take_complete();
        if pending.is_empty() {
            return Ok(());
        }
        for line in super::lines_of(&pending) {
            self.produce(line)?;
        }
        self.producer
            .flush(DELIVERY_TIMEOUT + Duration::from_secs(5))
            .map_err(|e| {
                io::Error::other(format!(
                    "{}: records not acknowledged within {} s: {e}",
                    self.label,
                    DELIVERY_TIMEOUT.as_secs()
                ))
            })?;
        let failed = self
            .producer
            .context()
            .failed
            .lock()
            .ok()
            .and_then(|mut f| f.take());
        match failed {
            Some(reason) => Err(io::Error::other(format!(
                "{}: a record was not delivered: {reason}",
                self.label
            ))),
            None => Ok(()),
        }
    }
}
