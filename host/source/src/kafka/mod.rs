//! Kafka (rdkafka): the production source and writer.
//!
//! The consumer is assigned every partition of the kinds' topics by hand (each server folds
//! the whole log into its own store) and starts each partition at the position stored in
//! RocksDB with the state, never at the group's committed offset: that one is written after
//! each store commit, for lag monitoring only. A checker thread looks at the broker every
//! `kafka_check_interval_ms`: partitions (new ones are assigned from their stored position),
//! high watermarks (lag), reachability (readiness).
//!
//! Backpressure: librdkafka prefetches into one bounded queue
//! (`kafka_fetch_queue_bytes_max`); when folding falls behind, the fold loop polls less and
//! fetching pauses.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::cluster::{Cluster, Partition};
use super::{BrokerError, Source, SourceError, SourceStatus, WriteError};
use crate::settings::{KafkaConfig, SourceLimits};
use statefold_core::model::{Record, Witness};
use statefold_store::{Position, Store};

mod clients;
mod writer;

use clients::{Context, printable};
pub use clients::{Role, kafka_settings, request_clients};
pub(crate) use clients::{client_config, partition_count};
pub use writer::KafkaWriter;

pub const SOURCE_NAME: &str = "kafka";

type KafkaConsumer = BaseConsumer<Context>;

/// How many looks, `kafka_check_interval_ms` apart, a partition must end before what this
/// server folded before its topic is stopped: a new leader's high watermark can lag the
/// old one's for a moment.
const SHRUNK_LOOKS: u32 = 3;

/// What the checker thread learned about the topics.
#[derive(Default)]
struct Seen {
    partitions: std::sync::Mutex<HashMap<String, u32>>,
    changed: AtomicBool,
    /// Topics whose log now ends before what this server has folded (deleted and
    /// recreated, or truncated, under it), and why: the fold thread stops them.
    shrunk: std::sync::Mutex<Vec<(String, String)>>,
    /// Consecutive looks each partition ended before what was folded.
    short: std::sync::Mutex<HashMap<(String, u32), u32>>,
}

struct PartitionState {
    next: u64,
    /// The log's end when the partition was assigned: caught up once `next` reaches it.
    target: u64,
    /// The last record folded, read again first: it must be the same record.
    check: Option<Witness>,
}

/// The Kafka source.
pub struct KafkaSource {
    consumer: Arc<KafkaConsumer>,
    store: Arc<Store>,
    status: Arc<SourceStatus>,
    topics: Vec<Arc<str>>,
    partitions: HashMap<(Arc<str>, u32), PartitionState>,
    seen: Arc<Seen>,
    batch_bytes_max: usize,
    commit_interval: Duration,
    check_interval: Duration,
    last_commit: Instant,
    to_commit: BTreeMap<(String, u32), u64>,
    stop: Arc<AtomicBool>,
    checker: Option<std::thread::JoinHandle<()>>,
    /// Sharded mode: the cluster says which partitions to fold.
    cluster: Option<Arc<Cluster>>,
    /// The cluster's wanted partitions as last read (`None`: not yet), and its generation.
    wanted: Option<std::collections::BTreeSet<Partition>>,
    wanted_seen: u64,
}

impl KafkaSource {
    /// Creates the consumer and starts the checker. It does not wait for the broker:
    /// partitions are assigned once the checker has seen them.
    pub fn start(
        config: &KafkaConfig,
        limits: &SourceLimits,
        store: Arc<Store>,
        topics: Vec<String>,
        status: Arc<SourceStatus>,
    ) -> Result<KafkaSource, SourceError> {
        let settings = kafka_settings(config, limits, Role::Consumer);
        tracing::info!(settings = %printable(&settings), "kafka consumer");
        let consumer: KafkaConsumer = client_config(&settings)
            .create_with_context(Context { role: Role::Consumer, status: status.clone() })
            .map_err(BrokerError::call("create the Kafka consumer"))?;
        let consumer = Arc::new(consumer);
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        status.set_problem(Some("connecting to the brokers".into()));
        let checker = {
            let (consumer, seen, stop, status) = (consumer.clone(), seen.clone(), stop.clone(), status.clone());
            let topics = topics.clone();
            let interval = Duration::from_millis(limits.kafka_check_interval_ms);
            std::thread::Builder::new()
                .name("kafka-check".into())
                .spawn(move || check_loop(&consumer, &topics, &seen, &status, &stop, interval))
                .map_err(|source| BrokerError::Thread { doing: "the Kafka checker", source })?
        };
        Ok(KafkaSource {
            consumer,
            store,
            status,
            topics: topics.into_iter().map(Arc::from).collect(),
            partitions: HashMap::new(),
            seen,
            batch_bytes_max: limits.batch_bytes_max,
            commit_interval: Duration::from_millis(limits.kafka_commit_interval_ms),
            check_interval: Duration::from_millis(limits.kafka_check_interval_ms),
            last_commit: Instant::now(),
            to_commit: BTreeMap::new(),
            stop,
            checker: Some(checker),
            cluster: None,
            wanted: None,
            wanted_seen: 0,
        })
    }

    /// Sharded mode: folds only the partitions `cluster` wants, and leaves the group's
    /// offsets to it.
    pub fn sharded(mut self, cluster: Arc<Cluster>) -> KafkaSource {
        self.cluster = Some(cluster);
        self
    }

    /// Whether this server folds (`topic`, `partition`): all of them, unless sharded.
    fn wants(&self, topic: &str, partition: u32) -> bool {
        match (&self.cluster, &self.wanted) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(_), Some(wanted)) => wanted.contains(&(topic.to_owned(), partition)),
        }
    }

    /// Sharded mode: takes the cluster's latest wanted set, and stops reading the partitions
    /// no longer in it (what was folded of them stays in the store: a later assignment
    /// resumes from there).
    fn follow_cluster(&mut self) -> bool {
        let Some(cluster) = &self.cluster else { return false };
        let Some(wanted) = cluster.wanted_since(&mut self.wanted_seen) else { return false };
        let dropped: Vec<(Arc<str>, u32)> =
            self.partitions.keys().filter(|(t, p)| !wanted.contains(&(t.to_string(), *p))).cloned().collect();
        self.wanted = Some(wanted);
        if !dropped.is_empty() {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in &dropped {
                let _ = list.add_partition(topic, *partition as i32);
                self.partitions.remove(&(topic.clone(), *partition));
                self.status.set_folding(topic, *partition, false);
                tracing::info!(%topic, partition, "partition no longer folded here");
            }
            if let Err(e) = self.consumer.incremental_unassign(&list) {
                // Their records are dropped all the same (no partition state left).
                tracing::warn!(error = %e, "cannot unassign partitions no longer folded");
            }
        }
        true
    }

    /// Assigns the topics the checker has seen and the consumer does not read yet, each
    /// partition from its stored position, once the topic is the one this store folded:
    /// the same partition count, each stored position within the log, and the last record
    /// folded still there (read again first, see [`PartitionState::check`]). Otherwise the
    /// topic is stopped ([`SourceStatus::stop_topic`]).
    fn assign_new(&mut self) -> Result<(), SourceError> {
        let shrunk = std::mem::take(&mut *self.seen.shrunk.lock().unwrap_or_else(|p| p.into_inner()));
        for (topic, reason) in shrunk {
            self.stop_topic(&topic, reason);
        }
        let moved = self.follow_cluster();
        if !self.seen.changed.swap(false, Ordering::AcqRel) && !moved {
            return Ok(());
        }
        let counts = self.seen.partitions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let stopped = self.status.stopped();
        let mut list = TopicPartitionList::new();
        let mut added = Vec::new();
        for topic in self.topics.clone() {
            let Some(&count) = counts.get(&*topic) else { continue };
            if stopped.contains_key(&*topic) {
                continue;
            }
            let missing = (0..count)
                .filter(|p| !self.partitions.contains_key(&(topic.clone(), *p)) && self.wants(&topic, *p))
                .count();
            if missing == 0 {
                continue;
            }
            match self.store.topic_partitions(SOURCE_NAME, &topic)? {
                None => self.store.put_topic_partitions(SOURCE_NAME, &topic, count)?,
                Some(folded) if folded != count => {
                    self.stop_topic(&topic, format!(
                        "the topic has {count} partitions; this store folded it with {folded}: models' keys now map to other partitions (partitions added, or the topic deleted and recreated)"
                    ));
                    continue;
                }
                Some(_) => {}
            }
            let mut partitions = Vec::new();
            let new: Vec<u32> = (0..count)
                .filter(|p| !self.partitions.contains_key(&(topic.clone(), *p)) && self.wants(&topic, *p))
                .collect();
            for partition in new {
                match self.start_of(&topic, partition) {
                    Ok(Ok(start)) => partitions.push((partition, start)),
                    Ok(Err(reason)) => {
                        partitions.clear();
                        self.stop_topic(&topic, reason);
                        break;
                    }
                    // The broker did not answer (a timeout, a leader moving): folding goes
                    // on with what is assigned; the rest is tried again at the next poll.
                    Err(SourceError::Broker(problem)) => {
                        tracing::warn!(%topic, partition, %problem, "cannot assign the partition yet; trying again");
                        self.status.set_problem(Some(problem.to_string()));
                        self.seen.changed.store(true, Ordering::Release);
                    }
                    Err(other) => return Err(other),
                }
            }
            for (partition, (from, state)) in partitions {
                list.add_partition_offset(&topic, partition as i32, Offset::Offset(from as i64))
                    .map_err(BrokerError::call(format!("assign {topic}/{partition}")))?;
                added.push((topic.clone(), partition, state));
            }
        }
        if added.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.consumer.incremental_assign(&list) {
            tracing::warn!(error = %e, "cannot assign partitions yet; trying again");
            self.seen.changed.store(true, Ordering::Release);
            return Ok(());
        }
        for (topic, partition, state) in added {
            let (next, checked) = (state.next, state.check.map(|w| w.offset));
            tracing::info!(%topic, partition, next, ?checked, target = state.target, "partition assigned from its stored position");
            self.status.set_next(&topic, partition, state.next);
            self.status.set_folding(&topic, partition, true);
            if state.next >= state.target {
                self.status.set_ready(&topic, partition);
            }
            self.partitions.insert((topic, partition), state);
        }
        Ok(())
    }

    /// Where to read (`topic`, `partition`) from, and its state; why it cannot be read
    /// on, otherwise (the log no longer holds what the stored position stands on).
    fn start_of(&self, topic: &str, partition: u32) -> Result<Result<(u64, PartitionState), String>, SourceError> {
        let stored = self.store.progress(SOURCE_NAME, topic, partition)?;
        let (next, witness) = stored.map_or((0, None), |p| (p.next_offset, p.witness));
        // A log that ends before the stored position may be a leader change whose new
        // leader has not caught up its high watermark yet: look again before deciding.
        let mut looks = 0;
        let (low, high) = loop {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, partition as i32, Duration::from_secs(10))
                .map_err(BrokerError::call(format!("read the offsets of {topic}/{partition}")))?;
            let (low, high) = (low.max(0) as u64, high.max(0) as u64);
            looks += 1;
            if high >= next || looks == SHRUNK_LOOKS {
                break (low, high);
            }
            std::thread::sleep(self.check_interval);
        };
        self.status.set_end(topic, partition, high);
        let state = |check| PartitionState { next, target: high, check };
        if high < next {
            return Ok(Err(format!(
                "partition {partition} ends at offset {high}, before the stored position {next}: the topic was deleted and recreated, or truncated"
            )));
        }
        if low > next {
            return Ok(Err(format!(
                "offsets {next} to {} of partition {partition} were deleted before they were folded (retention, or the topic deleted and recreated)",
                low - 1
            )));
        }
        Ok(Ok(match witness {
            Some(witness) if witness.offset >= low && witness.offset < next => (witness.offset, state(Some(witness))),
            Some(witness) => {
                tracing::warn!(%topic, partition, offset = witness.offset, low, "the last record folded is gone (retention): the topic's identity is not checked");
                (next, state(None))
            }
            None => (next, state(None)),
        }))
    }

    /// Stops reading `topic` (see [`SourceStatus::stop_topic`]); records of it already
    /// fetched are dropped.
    fn stop_topic(&mut self, topic: &str, reason: String) {
        let mut list = TopicPartitionList::new();
        let mine: Vec<(Arc<str>, u32)> = self.partitions.keys().filter(|(t, _)| **t == *topic).cloned().collect();
        for (t, partition) in &mine {
            let _ = list.add_partition(t, *partition as i32);
            self.partitions.remove(&(t.clone(), *partition));
            self.status.set_folding(t, *partition, false);
        }
        if !mine.is_empty()
            && let Err(e) = self.consumer.incremental_unassign(&list)
        {
            // Its records are dropped all the same (no partition state left).
            tracing::warn!(%topic, error = %e, "cannot unassign the stopped topic's partitions");
        }
        self.status.stop_topic(topic, reason);
    }

    fn record(&mut self, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Record> {
        let topic = self.topics.iter().find(|t| ***t == *message.topic())?.clone();
        let partition = u32::try_from(message.partition()).ok()?;
        let offset = u64::try_from(message.offset()).ok()?;
        let state = self.partitions.get_mut(&(topic.clone(), partition))?;
        if let Some(witness) = state.check.take() {
            // The first record read again: the last one this store folded, unless the
            // topic under the stored position is another one.
            if offset == witness.offset {
                let record = to_record(&topic, partition, message);
                if Witness::of(&record) != witness {
                    let reason = format!(
                        "the record at offset {offset} of partition {partition} is not the one this store folded there: the topic was deleted and recreated"
                    );
                    self.stop_topic(&topic, reason);
                }
                return None;
            }
            tracing::warn!(%topic, partition, offset, expected = witness.offset, "the last record folded was not read again (compacted away?): the topic's identity is not checked");
        }
        if offset < state.next {
            // Already folded (the store's position is past it): never twice.
            tracing::warn!(%topic, partition, offset, next = state.next, "record before the stored position skipped");
            return None;
        }
        state.next = offset + 1;
        Some(to_record(&topic, partition, message))
    }

    /// An error the consumer reported. A position outside the log stops the topics whose
    /// stored positions the log no longer holds (never skipped to another offset); other
    /// errors are logged (the consumer retries by itself; the checker reports reachability).
    fn consumer_error(&mut self, error: KafkaError) -> Result<(), SourceError> {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) => {
                // The error does not say which partition: look at each one's offsets.
                let mut stopped = false;
                for (topic, partition) in self.partitions.keys().cloned().collect::<Vec<_>>() {
                    // (A topic stopped earlier in this loop has no partitions left.)
                    if !self.partitions.contains_key(&(topic.clone(), partition)) {
                        continue;
                    }
                    if let Err(reason) = self.start_of(&topic, partition)? {
                        self.stop_topic(&topic, reason);
                        stopped = true;
                    }
                }
                if stopped {
                    return Ok(());
                }
                Err(BrokerError::OutOfRange(error).into())
            }
            Some(RDKafkaErrorCode::PartitionEOF) => Ok(()),
            _ => {
                tracing::warn!(%error, "kafka consumer");
                Ok(())
            }
        }
    }
}

/// A fetched message as a record.
fn to_record(topic: &Arc<str>, partition: u32, message: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = message
        .headers()
        .map(|headers| {
            headers.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect()
        })
        .unwrap_or_default();
    Record {
        topic: topic.clone(),
        partition,
        offset: message.offset().max(0) as u64,
        key: message.key().map(<[u8]>::to_vec),
        value: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
        timestamp_ms: message.timestamp().to_millis(),
        headers,
    }
}

impl Source for KafkaSource {
    fn name(&self) -> &'static str {
        SOURCE_NAME
    }

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, SourceError> {
        self.assign_new()?;
        if self.partitions.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_millis(50)));
            return Ok(Vec::new());
        }
        let consumer = self.consumer.clone();
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut wait = timeout;
        while out.len() < max && bytes < self.batch_bytes_max {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(message)) => {
                    if let Some(record) = self.record(&message) {
                        bytes += record.value.len();
                        out.push(record);
                    }
                }
                Some(Err(error)) => self.consumer_error(error)?,
            }
            wait = Duration::ZERO;
        }
        // A topic stopped while this batch was read: none of its records are folded.
        out.retain(|r| self.partitions.contains_key(&(r.topic.clone(), r.partition)));
        Ok(out)
    }

    fn caught_up(&self) -> bool {
        // Sharded: once the cluster has said what to fold (a server may fold nothing).
        let started = if self.cluster.is_some() { self.wanted.is_some() } else { !self.partitions.is_empty() };
        started && self.partitions.values().all(|state| state.next >= state.target)
    }

    fn partitions(&self) -> Vec<(Arc<str>, u32)> {
        // The topic's partition count (as the checker saw it, and as the store folded it:
        // a topic whose count changed is stopped), for every topic read.
        let counts = self.seen.partitions.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out: BTreeMap<Arc<str>, u32> = BTreeMap::new();
        for (topic, partition) in self.partitions.keys() {
            let count = counts.get(&**topic).copied().unwrap_or(0).max(partition + 1);
            out.insert(topic.clone(), count);
        }
        out.into_iter().collect()
    }

    fn committed(&mut self, positions: &[(String, Position)]) {
        for (_, position) in positions {
            if let Some(state) = self.partitions.get(&(Arc::from(position.topic.as_str()), position.partition))
                && position.next_offset >= state.target
            {
                self.status.set_ready(&position.topic, position.partition);
            }
        }
        if self.cluster.is_some() {
            return; // the cluster commits the owned partitions' positions to the group
        }
        for (_, position) in positions {
            self.to_commit.insert((position.topic.clone(), position.partition), position.next_offset);
        }
        if self.last_commit.elapsed() < self.commit_interval || self.to_commit.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in std::mem::take(&mut self.to_commit) {
            let _ = list.add_partition_offset(&topic, partition as i32, Offset::Offset(next as i64));
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Async) {
            tracing::debug!(error = %e, "committing the folded position to the group failed (monitoring only)");
        }
        self.last_commit = Instant::now();
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(checker) = self.checker.take() {
            let _ = checker.join();
        }
    }
}

/// Every `interval`: the topics' partitions and high watermarks. Any failure is the
/// source's problem (the server is unready) until a check succeeds.
fn check_loop(
    consumer: &KafkaConsumer,
    topics: &[String],
    seen: &Seen,
    status: &SourceStatus,
    stop: &AtomicBool,
    interval: Duration,
) {
    let timeout = interval.max(Duration::from_millis(500));
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        match check(consumer, topics, seen, status, timeout) {
            Ok(()) => status.set_problem(None),
            Err(problem) => status.set_problem(Some(problem.to_string())),
        }
        while !stop.load(Ordering::Acquire) && started.elapsed() < interval {
            std::thread::sleep(Duration::from_millis(20).min(interval));
        }
    }
}

fn check(
    consumer: &KafkaConsumer,
    topics: &[String],
    seen: &Seen,
    status: &SourceStatus,
    timeout: Duration,
) -> Result<(), BrokerError> {
    // Where folding stood before the ends are read: a healthy log ends at or after it.
    let folded: HashMap<(String, u32), u64> = status.partitions().into_iter().map(|(k, p)| (k, p.next)).collect();
    for topic in topics {
        let count = partition_count(consumer.client(), topic, timeout)?;
        for partition in 0..count {
            let (_, high) = consumer
                .fetch_watermarks(topic, partition as i32, timeout)
                .map_err(BrokerError::call(format!("read the end of {topic}/{partition}")))?;
            let high = high.max(0) as u64;
            status.set_end(topic, partition, high);
            let next = folded.get(&(topic.clone(), partition)).copied().unwrap_or(0);
            let looks = {
                let mut short = seen.short.lock().unwrap_or_else(|p| p.into_inner());
                let looks = short.entry((topic.clone(), partition)).or_default();
                *looks = if high < next { *looks + 1 } else { 0 };
                *looks
            };
            if looks == SHRUNK_LOOKS {
                let reason = format!(
                    "partition {partition} now ends at offset {high}, before what this server folded ({next}): the topic was deleted and recreated, or truncated"
                );
                seen.shrunk.lock().unwrap_or_else(|p| p.into_inner()).push((topic.clone(), reason));
                seen.changed.store(true, Ordering::Release);
            }
        }
        let mut partitions = seen.partitions.lock().unwrap_or_else(|p| p.into_inner());
        if partitions.get(topic.as_str()) != Some(&count) {
            partitions.insert(topic.clone(), count);
            seen.changed.store(true, Ordering::Release);
        }
    }
    Ok(())
}
