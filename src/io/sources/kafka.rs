//! A Kafka topic as a source: `kafka://HOST:PORT[,HOST:PORT]/TOPIC`, with
//! the optional parameters `group=NAME` and `until=end`.
//!
//! # Partitions, workers and clocks
//!
//! The topic's partitions (as many as it has when the run starts) are read
//! by all workers, partition `p` by worker `(source index + p) mod
//! workers`, each partition with its own [`crate::time::SourceClock`], as
//! the ranges of a file are: every record is decoded where it is read, and
//! "late" is judged against its partition's own watermark, so the records
//! admitted, and the results, do not depend on the number of workers or
//! processes. A worker reads all its partitions at once (one consumer per
//! worker and source, one queue per partition), and holds its capability
//! at the least watermark of its partitions. A live partition that has
//! nothing to read for `idle_advance` is idle: its watermark follows the
//! wall clock (see [`crate::time`]), so an idle partition does not hold the
//! others back (Flink's `withIdleness`).
//!
//! # Live or bounded
//!
//! By default the source is **live**: it never ends (a signal stops it),
//! and its clocks run on the wall clock as a followed file's do. With
//! `until=end` it is **bounded**: each partition is read until the reader
//! reaches its end (librdkafka's end-of-partition event: the fetch position
//! is at the partition's high watermark), with a replay's clock, and the
//! source ends there; a topic that nothing writes to meanwhile gives the
//! records of a file holding them, partition by partition. (The end is
//! where reading catches up, not the high watermark listed at the start:
//! some Kafka-API brokers list a stale one, tansu 0.6 for instance, whose
//! listed end is one past the first offset of the last batch.)
//!
//! # Offsets and checkpoints (exactly once)
//!
//! Each partition records resume points as a range of a file does (see
//! [`super::progress`]): the offset of its next record, with its clock. A
//! checkpoint holds, per partition, the latest point before which every
//! record is in its state and every dead letter written; a restarted run
//! assigns each partition at its point (the start of the partition if it
//! has none) and drops what it reads again before the checkpoint's cut.
//! Records that the checkpointed run read with its watermark past the cut,
//! or did not read at all, with times before the cut, are late in the
//! resumed run as they were (or would have been) in the first. The state
//! and the diff file therefore end exactly as those of a run that never
//! stopped, whatever was killed where. A point whose records the broker no
//! longer has (its retention deleted them) stops the run with the reason.
//!
//! `group=NAME` is the consumer group the source commits its offsets to,
//! for the lag tools that read them (`kafka-consumer-groups.sh`): with a
//! state directory, the offsets of the latest checkpoint (what a restart
//! resumes from), else the offsets read. The group never decides where
//! reading starts: the checkpoint does, and without one a run reads every
//! partition from its start (segments need the history). Default group:
//! `segflow`.
//!
//! # Records
//!
//! A record's value is one line of the source's format (JSON, Segment, GA4
//! messages; CSV is refused: its rows need a header); a record without a
//! value (a tombstone) is skipped, as an empty line is. Dead letters name
//! the input as `kafka://HOST:PORT/TOPIC (partition P)`, with the record's
//! offset as `offset` and `offset + 1` as `line`.
//!
//! # Failures
//!
//! A broker that does not answer when the run starts ([`CONNECT_TIMEOUT`]),
//! a topic that does not exist, and a broker that stops answering for
//! [`BROKER_TIMEOUT`] during the run stop the run with the reason.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use timely::scheduling::SyncActivator;

use super::lines::{LineSource, Next};
use super::progress::{Progress, Resume};

pub use crate::io::kafka::CONNECT_TIMEOUT;
/// How long the broker may fail to answer during a run before the run
/// stops.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often, at most, offsets are committed to the group.
const COMMIT_EVERY: Duration = Duration::from_secs(1);
pub use crate::spec::location::{KafkaInput, DEFAULT_GROUP};

/// The consumer's context: librdkafka's own log lines and error events
/// (reconnects, "all brokers down", end-of-partition notices) are debug
/// output; the source judges the broker's health itself and ends the run
/// with one clear reason ([`BROKER_TIMEOUT`]).
pub struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!("librdkafka {level:?} {fac}: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for Quiet {}

/// One worker's consumer of a topic, shared by its partitions' readers.
struct Shared {
    consumer: Arc<BaseConsumer<Quiet>>,
    input: KafkaInput,
    /// Messages that reached the consumer's main queue before their
    /// partition's queue was split off (read before that queue's).
    strays: HashMap<i32, VecDeque<(i64, Option<Vec<u8>>)>>,
    /// Since when the broker has reported errors and delivered nothing,
    /// with the last error.
    failing: Option<(Instant, String)>,
    /// Per partition, the offset to commit to the group, and the offset
    /// last committed.
    wanted: HashMap<i32, i64>,
    committed: HashMap<i32, i64>,
    last_commit: Instant,
    /// Whether a failed commit was reported (once).
    commit_warned: bool,
}

impl Shared {
    fn healthy(&mut self) {
        self.failing = None;
    }

    fn trouble(&mut self, e: &KafkaError) {
        let text = e.to_string();
        match &mut self.failing {
            Some((_, last)) => *last = text,
            None => self.failing = Some((Instant::now(), text)),
        }
    }

    /// Serves the main queue: errors, and messages that reached it before
    /// their partition's queue was split off.
    fn serve(&mut self) {
        while let Some(event) = self.consumer.poll(Duration::ZERO) {
            match event {
                Ok(m) => {
                    let payload = m.payload().map(<[u8]>::to_vec);
                    self.strays
                        .entry(m.partition())
                        .or_default()
                        .push_back((m.offset(), payload));
                }
                // The end of a partition: the broker answers.
                Err(KafkaError::PartitionEOF(_)) => self.healthy(),
                Err(e) => {
                    tracing::debug!("{}: {e}", self.input.describe());
                    self.trouble(&e);
                }
            }
        }
    }

    /// Fails once the broker has not answered for [`BROKER_TIMEOUT`] (and
    /// does not answer a metadata request now).
    fn check(&mut self) -> io::Result<()> {
        let Some((since, last)) = &self.failing else {
            return Ok(());
        };
        if since.elapsed() < BROKER_TIMEOUT {
            return Ok(());
        }
        let (since, last) = (*since, last.clone());
        match self
            .consumer
            .fetch_metadata(Some(&self.input.topic), Duration::from_secs(5))
        {
            Ok(_) => {
                self.failing = None;
                Ok(())
            }
            Err(e) => Err(io::Error::other(format!(
                "the Kafka broker at {} has not answered for {} s ({last}; now: {e}): is it running?",
                self.input.brokers,
                since.elapsed().as_secs()
            ))),
        }
    }

    /// Notes that partition `p`'s offset for the group is `offset`, and
    /// commits the offsets that moved, at most every [`COMMIT_EVERY`]
    /// (asynchronously: a commit never holds the reader up).
    fn commit(&mut self, p: i32, offset: i64) {
        self.wanted.insert(p, offset);
        if self.last_commit.elapsed() < COMMIT_EVERY {
            return;
        }
        self.last_commit = Instant::now();
        let mut tpl = TopicPartitionList::new();
        for (&p, &offset) in &self.wanted {
            if self.committed.get(&p) != Some(&offset) {
                let _ = tpl.add_partition_offset(&self.input.topic, p, Offset::Offset(offset));
                self.committed.insert(p, offset);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            if !std::mem::replace(&mut self.commit_warned, true) {
                tracing::warn!(
                    "{}: cannot commit offsets to group {} ({e}); reading goes on (the checkpoint holds the offsets a restart resumes from)",
                    self.input.describe(),
                    self.input.group
                );
            }
        }
    }
}

/// The records of one partition, as lines.
pub struct PartitionLines {
    shared: Rc<RefCell<Shared>>,
    queue: PartitionQueue<Quiet>,
    partition: i32,
    /// The offset of the next record.
    next: i64,
    /// A bounded source's partition: it ends where reading reaches the
    /// partition's end.
    bounded: bool,
    ended: bool,
    /// Whether messages of this partition may wait in the shared strays.
    strays: bool,
    /// Whether the reader is at the partition's end (see
    /// [`LineSource::may_idle`]).
    caught_up: bool,
    max_line_bytes: usize,
    /// For commits to the group: the checkpoints' points (with state).
    progress: Option<(Arc<Progress>, u32)>,
    reads: u32,
}

impl PartitionLines {
    /// The partition read.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    fn line(&mut self, offset: i64, payload: Option<Vec<u8>>) -> Next {
        self.next = offset + 1;
        self.caught_up = false;
        let bytes = payload.unwrap_or_default();
        let (line, offset) = (offset as u64 + 1, offset as u64);
        if bytes.len() > self.max_line_bytes {
            return Next::TooLong {
                line,
                offset,
                len: bytes.len() as u64,
                peer: None,
            };
        }
        Next::Line {
            bytes,
            line,
            offset,
            peer: None,
        }
    }

    /// Commits this partition's offset to the group: the latest
    /// checkpoint's (with state), else the next to read.
    fn commit(&mut self) {
        let offset = match &self.progress {
            Some((progress, source)) => progress.checkpointed(*source, self.partition as u64),
            None => Some(self.next as u64),
        };
        if let Some(offset) = offset {
            let p = self.partition;
            self.shared.borrow_mut().commit(p, offset as i64);
        }
    }

    fn fail(&self, e: &KafkaError) -> io::Error {
        let shared = self.shared.borrow();
        let (topic, brokers) = (&shared.input.topic, &shared.input.brokers);
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::OffsetOutOfRange) => io::Error::other(format!(
                "offset {} of partition {} of topic {topic} is no longer on the broker at {brokers} (its retention deleted it): the checkpoint resumes there, and its records are gone; run with --reset to start over from what the topic holds",
                self.next, self.partition
            )),
            _ => io::Error::other(format!(
                "partition {} of topic {topic} at {brokers}: {e}",
                self.partition
            )),
        }
    }
}

impl LineSource for PartitionLines {
    fn next_line(&mut self) -> io::Result<Next> {
        if self.ended {
            return Ok(Next::End);
        }
        self.reads = self.reads.wrapping_add(1);
        if self.reads % 4096 == 0 {
            self.commit();
        }
        if self.strays {
            let stray = {
                let mut shared = self.shared.borrow_mut();
                shared
                    .strays
                    .get_mut(&self.partition)
                    .and_then(VecDeque::pop_front)
            };
            match stray {
                Some((offset, payload)) => return Ok(self.line(offset, payload)),
                None => self.strays = false,
            }
        }
        let polled: Option<Result<BorrowedMessage<'_>, KafkaError>> =
            self.queue.poll(Duration::ZERO);
        match polled {
            Some(Ok(m)) => {
                let offset = m.offset();
                let payload = m.payload().map(<[u8]>::to_vec);
                drop(m);
                self.shared.borrow_mut().healthy();
                Ok(self.line(offset, payload))
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                self.shared.borrow_mut().healthy();
                self.caught_up = true;
                if self.bounded {
                    // Caught up with the partition's end.
                    self.ended = true;
                    return Ok(Next::End);
                }
                Ok(Next::Pending)
            }
            Some(Err(e)) => match e.rdkafka_error_code() {
                Some(
                    RDKafkaErrorCode::OffsetOutOfRange
                    | RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed,
                ) => Err(self.fail(&e)),
                _ => {
                    self.shared.borrow_mut().trouble(&e);
                    Ok(Next::Pending)
                }
            },
            None => {
                self.commit();
                let mut shared = self.shared.borrow_mut();
                shared.serve();
                shared.check()?;
                drop(shared);
                if self
                    .shared
                    .borrow()
                    .strays
                    .get(&self.partition)
                    .is_some_and(|s| !s.is_empty())
                {
                    self.strays = true;
                    return self.next_line();
                }
                Ok(Next::Pending)
            }
        }
    }

    fn position(&self) -> u64 {
        self.next.max(0) as u64
    }

    fn is_live(&self) -> bool {
        !self.bounded
    }

    fn wakes_on_input(&self) -> bool {
        true
    }

    /// Only once the partition has caught up with its end (the broker's
    /// end-of-partition notice since the last record): a partition with a
    /// backlog whose next records are still being fetched is not idle.
    fn may_idle(&self) -> bool {
        self.caught_up
    }

    fn resume_at(&self) -> Option<(u64, u64)> {
        let next = self.next.max(0) as u64;
        Some((next, next + 1))
    }

    fn grows(&self) -> bool {
        true
    }
}

/// The partitions of `input` that worker `index` of `peers` reads for
/// source `name` (index `source`): each assigned at its point in `resume`
/// (else at its start), with one consumer for all; `waker` wakes the
/// source when one of them has records. Empty if the worker reads none.
#[allow(clippy::too_many_arguments)]
pub fn open_partitions(
    input: &KafkaInput,
    name: &str,
    source: u32,
    index: usize,
    peers: usize,
    resume: Option<&Resume>,
    progress: Option<&Arc<Progress>>,
    max_line_bytes: usize,
    waker: SyncActivator,
) -> io::Result<Vec<PartitionLines>> {
    if let Some(problem) = &input.problem {
        return Err(io::Error::other(problem.clone()));
    }
    let label = input.describe();
    let consumer: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", &input.brokers)
        .set("group.id", &input.group)
        .set("client.id", format!("segflow-{name}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A point the broker no longer has is an error, never a silent
        // jump (records the checkpoint does not hold would be lost).
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // Per partition (each has its own queue): the prefetch held in
        // memory.
        .set("queued.max.messages.kbytes", "16384")
        // A broker that hangs (accepts, never answers) is reported after
        // this, not librdkafka's default minute.
        .set("socket.timeout.ms", "10000")
        .create_with_context(Quiet)
        .map_err(|e| io::Error::other(format!("{label}: {e}")))?;
    let partitions =
        crate::io::kafka::topic_partitions(consumer.client(), &input.brokers, &input.topic)?;
    // A checkpoint that read partitions the topic no longer has was taken
    // on another topic (deleted and created again, with fewer partitions):
    // its points mean nothing here.
    if let Some(missing) = resume.and_then(|r| r.points.get(name)).and_then(|points| {
        points
            .iter()
            .map(|p| p.start)
            .find(|&p| p >= partitions as u64)
    }) {
        return Err(io::Error::other(format!(
            "the checkpoint read partition {missing} of topic {}, which has {partitions} partition(s) now at {}: it is not the topic the checkpoint was taken on (deleted and created again?); run with --reset to start over",
            input.topic, input.brokers
        )));
    }
    let owner = source as usize % peers;
    let mine: Vec<i32> = (0..partitions)
        .filter(|p| (owner + p) % peers == index)
        .map(|p| p as i32)
        .collect();
    if mine.is_empty() {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    let mut plan = Vec::new();
    for &p in &mine {
        let point = resume.and_then(|r| r.point(name, p as u64));
        let (low, high) = consumer
            .fetch_watermarks(&input.topic, p, CONNECT_TIMEOUT)
            .map_err(|e| {
                io::Error::other(format!(
                    "{label}: cannot read the offsets of partition {p}: {e}"
                ))
            })?;
        if let Some(point) = point.filter(|pt| (pt.offset as i64) < low) {
            return Err(io::Error::other(format!(
                "the checkpoint resumes partition {p} of topic {} at offset {}, and the broker at {} holds it from offset {low} on only (its retention deleted the rest): those records are in neither; run with --reset to start over from what the topic holds",
                input.topic, point.offset, input.brokers
            )));
        }
        let next = point.map_or(low, |pt| pt.offset as i64);
        tpl.add_partition_offset(&input.topic, p, Offset::Offset(next))
            .map_err(|e| io::Error::other(format!("{label}: {e}")))?;
        // At the end the broker lists (an empty partition, or a resumed
        // one read to it): nothing to read, unless more comes.
        plan.push((p, next, high <= next, high <= low));
    }
    consumer
        .assign(&tpl)
        .map_err(|e| io::Error::other(format!("{label}: cannot assign partitions: {e}")))?;
    let consumer = Arc::new(consumer);
    let waker = Arc::new(Mutex::new(waker));
    let mut queues = Vec::new();
    for &(p, ..) in &plan {
        let mut queue = consumer
            .split_partition_queue(&input.topic, p)
            .ok_or_else(|| io::Error::other(format!("{label}: no queue for partition {p}")))?;
        let waker = Arc::clone(&waker);
        queue.set_nonempty_callback(move || {
            if let Ok(w) = waker.lock() {
                let _ = w.activate();
            }
        });
        queues.push(queue);
    }
    let shared = Rc::new(RefCell::new(Shared {
        consumer,
        input: input.clone(),
        strays: HashMap::new(),
        failing: None,
        wanted: HashMap::new(),
        committed: HashMap::new(),
        last_commit: Instant::now(),
        commit_warned: false,
    }));
    // What reached the main queue before the split is read first.
    shared.borrow_mut().serve();
    Ok(plan
        .into_iter()
        .zip(queues)
        .map(|((partition, next, at_end, empty), queue)| PartitionLines {
            shared: Rc::clone(&shared),
            queue,
            partition,
            next,
            bounded: input.bounded,
            // An empty partition of a bounded source has nothing to read.
            ended: input.bounded && empty,
            strays: true,
            caught_up: at_end,
            max_line_bytes,
            progress: progress.map(|p| (Arc::clone(p), source)),
            reads: 0,
        })
        .collect())
}
