//! What the Kafka source and the Kafka output share: finding a topic's
//! partitions on the broker when a run starts, with the errors a user can
//! act on.

use std::io;
use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::error::RDKafkaErrorCode;

/// How long the broker has to answer when the run starts.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The number of partitions of `topic` on the broker `client` talks to
/// (`brokers`, for messages), asked within [`CONNECT_TIMEOUT`].
///
/// # Errors
///
/// The broker does not answer (is it running, is the address right?), the
/// topic does not exist or cannot be used (create it first).
pub fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    brokers: &str,
    topic: &str,
) -> io::Result<usize> {
    let metadata = client
        .fetch_metadata(Some(topic), CONNECT_TIMEOUT)
        .map_err(|e| {
            io::Error::other(format!(
                "the Kafka broker at {brokers} did not answer within {} s ({e}): is it running, and is the address right?",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?;
    match metadata.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len()),
        Some(t) => Err(io::Error::other(format!(
            "topic {topic} is not usable on the Kafka broker at {brokers} ({}): create it first, e.g. kafka-topics.sh --create --topic {topic} --bootstrap-server {brokers}",
            t.error()
                .map(|e| RDKafkaErrorCode::from(e).to_string())
                .unwrap_or_else(|| "it has no partitions".into())
        ))),
        None => Err(io::Error::other(format!(
            "topic {topic} does not exist on the Kafka broker at {brokers}: create it first"
        ))),
    }
}
