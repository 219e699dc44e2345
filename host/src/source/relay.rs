//! The relay: reactions from the outbox to their topics, exactly once.
//!
//! The fold commits each diff's reactions to the outbox in the batch's WriteBatch (see
//! `store::outbox`); the relay, on its own thread, moves them on, per source partition in
//! offset order (so each model's in the order its diffs emitted them), a diff's reactions
//! never split:
//! - **Kafka, transactional** (the default): one producer per source partition with
//!   `transactional.id` `<group_id>.relay.<topic>.<partition>`. Each transaction produces a
//!   run of reactions and commits, in the same transaction, the relay's position as the
//!   consumer-group offset of the source partition (group `<group_id>.relay`): Kafka
//!   Streams' exactly-once (KIP-447) with the outbox as input. A restart, or the next owner
//!   of the partition, starts with `init_transactions` (which fences the previous producer
//!   of that id and aborts its open transaction) and reads the position back from Kafka.
//!   Consumers reading committed records see each reaction once.
//! - **Kafka, idempotent** (`[reactions] transactional = false`, for brokers without
//!   transactions): acknowledged produces, then the position stored in RocksDB: at least
//!   once, a crash between the two re-sends; the `statefold-reaction-id` header lets a
//!   consumer de-duplicate.
//! - **The embedded log**: the appends, the position and the removal from the outbox in one
//!   RocksDB WriteBatch: exactly once. A reaction to a kind's topic is folded by that kind.
//!
//! Only the partition's owner relays in sharded mode; otherwise every server with
//! `[reactions] relay = true` (one per deployment of replicas: fencing keeps two from
//! duplicating, not from fighting).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::cluster::Cluster;
use super::kafka::{Role, client_config, kafka_settings};
use super::{EmbeddedLog, SourceStatus};
use crate::config::{KafkaConfig, Limits};
use crate::model::Outgoing;
use crate::store::{LogAppend, Store, StoreError};

/// What the relay shares with the fold loop and the HTTP side.
pub struct Relay {
    /// Outbox entries committed and not relayed yet.
    pending: AtomicU64,
    /// `statefold_reactions_relayed_total`.
    relayed: Counter,
    problem: Mutex<Option<String>>,
    /// Bumped by the fold loop after a commit that added entries.
    wake: (Mutex<u64>, Condvar),
    pending_max: u64,
}

impl Relay {
    /// The shared state, with `pending` entries in the outbox at start; each reaction
    /// relayed counts in `relayed`.
    pub fn new(pending: u64, limits: &Limits, relayed: Counter) -> Arc<Relay> {
        Arc::new(Relay {
            pending: AtomicU64::new(pending),
            relayed,
            problem: Mutex::new(None),
            wake: (Mutex::new(0), Condvar::new()),
            pending_max: limits.outbox_records_max,
        })
    }

    /// The fold loop committed `n` new entries.
    pub fn added(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.pending.fetch_add(n as u64, Ordering::Relaxed);
        let (count, cvar) = &self.wake;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cvar.notify_all();
    }

    /// Entries committed and not relayed yet (on the partitions of every owner).
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether the outbox holds `outbox_records_max` entries: folding waits.
    pub fn full(&self) -> bool {
        self.pending() >= self.pending_max
    }

    /// What keeps the relay from relaying (`None`: nothing).
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        let mut slot = self.problem.lock().unwrap_or_else(|p| p.into_inner());
        if *slot != problem {
            match &problem {
                Some(problem) => tracing::warn!(%problem, "relay of reactions held up"),
                None => tracing::info!("relay of reactions going again"),
            }
            *slot = problem;
        }
    }

    /// `sent` reactions relayed; `removed` entries left the outbox.
    fn done(&self, sent: usize, removed: u64) {
        self.relayed.inc_by(sent as u64);
        let _ = self.pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| Some(p.saturating_sub(removed)));
    }

    /// Waits up to `timeout` for new entries after `seen` wakes.
    fn wait(&self, seen: &mut u64, timeout: Duration) {
        let (count, cvar) = &self.wake;
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        let guard =
            cvar.wait_timeout_while(guard, timeout, |now| *now == *seen).map_or_else(|p| p.into_inner().0, |g| g.0);
        *seen = *guard;
    }
}

/// Where reactions go.
pub enum Sink {
    Embedded(Arc<EmbeddedLog>),
    Kafka { config: KafkaConfig, transactional: bool },
}

/// Runs the relay until `stop` is set. It relays the partitions this server relays: with
/// `relays`, every partition `status` knows of, or when sharded those `cluster` assigned to
/// this server. Of the others it folds (standbys, replicas that do not relay) it follows
/// the relay's position in Kafka, dropping what was relayed from its own outbox.
#[allow(clippy::too_many_arguments)]
pub fn run(
    relay: Arc<Relay>,
    store: Arc<Store>,
    sink: Sink,
    status: Arc<SourceStatus>,
    cluster: Option<Arc<Cluster>>,
    relays: bool,
    limits: Limits,
    stop: impl Fn() -> bool,
) {
    let mut kafka = match &sink {
        Sink::Kafka { config, transactional } => Some(KafkaRelay::new(config, &limits, *transactional)),
        Sink::Embedded(_) => None,
    };
    let follow_interval = Duration::from_millis(limits.kafka_check_interval_ms);
    let mut followed = std::time::Instant::now();
    let mut seen = 0;
    while !stop() {
        let folded: BTreeSet<(String, u32)> =
            status.partitions().into_iter().filter(|(_, p)| cluster.is_none() || p.folding).map(|(k, _)| k).collect();
        let relayed: BTreeSet<(String, u32)> = match (&cluster, relays) {
            (Some(cluster), true) => cluster.owned(),
            (None, true) => folded.clone(),
            (_, false) => BTreeSet::new(),
        };
        let mut problems = Vec::new();
        let mut busy = false;
        for (topic, partition) in &relayed {
            let step = match (&sink, &mut kafka) {
                (Sink::Embedded(log), _) => relay_embedded(&store, log, topic, *partition, &limits),
                (Sink::Kafka { .. }, Some(Ok(kafka))) => kafka.relay(&store, topic, *partition, &limits),
                (Sink::Kafka { .. }, _) => Err("the relay's Kafka clients could not be created".into()),
            };
            match step {
                Ok((sent, removed)) => {
                    busy |= sent > 0;
                    relay.done(sent, removed);
                }
                Err(e) => problems.push(format!("{topic}/{partition}: {e}")),
            }
        }
        if let Some(Ok(kafka)) = &mut kafka {
            kafka.producers.retain(|slot, _| relayed.contains(slot));
            if followed.elapsed() >= follow_interval {
                followed = std::time::Instant::now();
                for (topic, partition) in folded.difference(&relayed) {
                    match kafka.follow(&store, topic, *partition) {
                        Ok(removed) => relay.done(0, removed),
                        Err(e) => problems.push(format!("{topic}/{partition}: {e}")),
                    }
                }
            }
        }
        if let Some(Err(e)) = &kafka {
            problems.push(e.clone());
        }
        relay.set_problem((!problems.is_empty()).then(|| problems.join("; ")));
        if !busy {
            relay.wait(&mut seen, Duration::from_millis(if problems.is_empty() { 200 } else { 1000 }));
        }
    }
}

/// One run of a partition's outbox onto the embedded log: (relayed, removed).
fn relay_embedded(
    store: &Store,
    log: &EmbeddedLog,
    topic: &str,
    partition: u32,
    limits: &Limits,
) -> Result<(usize, u64), String> {
    let from = store.relay_position(topic, partition).map_err(|e| e.to_string())?.unwrap_or(0);
    let entries = store.outbox(topic, partition, from, limits.relay_batch_records_max).map_err(|e| e.to_string())?;
    let Some(last) = entries.last() else { return Ok((0, 0)) };
    let headers: Vec<Vec<(String, Vec<u8>)>> = entries.iter().map(Outgoing::headers).collect();
    let now = super::now_ms();
    let appends: Vec<LogAppend<'_>> = entries
        .iter()
        .zip(&headers)
        .map(|(o, headers)| LogAppend {
            topic: &o.reaction.topic,
            partition: super::embedded::PARTITION,
            key: o.reaction.key.as_bytes(),
            value: &o.reaction.value,
            timestamp_ms: now,
            headers,
        })
        .collect();
    let removed = log.relayed(topic, partition, last.offset + 1, &appends).map_err(|e: StoreError| e.to_string())?;
    Ok((entries.len(), removed))
}

/// The Kafka side: one producer per source partition, and a consumer that only reads and
/// commits the relay group's offsets (its positions).
struct KafkaRelay {
    settings: BTreeMap<String, String>,
    group: String,
    transactional: bool,
    offsets: BaseConsumer,
    metadata: ConsumerGroupMetadata,
    producers: BTreeMap<(String, u32), Partition>,
    timeout: Duration,
}

/// A source partition's producer and where its relay stands.
struct Partition {
    producer: ThreadedProducer<Delivery>,
    next: u64,
}

impl KafkaRelay {
    fn new(config: &KafkaConfig, limits: &Limits, transactional: bool) -> Result<KafkaRelay, String> {
        let group = format!("{}.relay", config.group_id);
        let mut consumer = kafka_settings(config, limits, Role::Consumer);
        consumer.insert("group.id".into(), group.clone());
        let offsets: BaseConsumer =
            client_config(&consumer).create().map_err(|e| format!("cannot create the relay's consumer: {e}"))?;
        let metadata = offsets.group_metadata().ok_or("the relay's consumer has no group metadata")?;
        let mut settings = kafka_settings(config, limits, Role::Producer);
        settings.insert("transaction.timeout.ms".into(), limits.relay_transaction_timeout_ms.to_string());
        Ok(KafkaRelay {
            settings,
            group,
            transactional,
            offsets,
            metadata,
            producers: BTreeMap::new(),
            timeout: Duration::from_millis(limits.relay_transaction_timeout_ms),
        })
    }

    /// One transaction (or one acknowledged run) of a partition's outbox: (relayed, removed).
    fn relay(&mut self, store: &Store, topic: &str, partition: u32, limits: &Limits) -> Result<(usize, u64), String> {
        let slot = (topic.to_owned(), partition);
        if !self.producers.contains_key(&slot) {
            // Only with something to relay (a producer per partition is a connection each),
            // as far as the store knows: its position is at most Kafka's.
            let from = store.relay_position(topic, partition).map_err(|e| e.to_string())?.unwrap_or(0);
            if store.outbox(topic, partition, from, 1).map_err(|e| e.to_string())?.is_empty() {
                return Ok((0, 0));
            }
            let producer = self.producer(topic, partition)?;
            let next = self.position(store, topic, partition)?;
            self.producers.insert(slot.clone(), Partition { producer, next });
        }
        let p = self.producers.get_mut(&slot).expect("inserted above");
        let entries =
            store.outbox(topic, partition, p.next, limits.relay_batch_records_max).map_err(|e| e.to_string())?;
        let Some(last) = entries.last() else { return Ok((0, 0)) };
        let next = last.offset + 1;
        let sent = match self.transactional {
            true => transaction(&p.producer, &entries, topic, partition, next, &self.metadata, self.timeout),
            false => acknowledged(&p.producer, &entries, self.timeout).and_then(|()| {
                // The position, for the servers that follow it (at least once: a crash
                // before this commit re-sends the run).
                self.offsets.commit(&position(topic, partition, next)?, CommitMode::Sync)
            }),
        };
        if let Err(e) = sent {
            // A fenced or failed producer is dropped: the next attempt starts over from the
            // position in Kafka, with a new epoch.
            self.producers.remove(&slot);
            let hint = match self.transactional && e.to_string().contains("not supported by broker") {
                true => {
                    " (a broker without transactions: set [reactions] transactional = false, --relay-at-least-once)"
                }
                false => "",
            };
            return Err(format!("{e}{hint}"));
        }
        p.next = next;
        let (_, removed) = store.relayed(topic, partition, next, &[]).map_err(|e| e.to_string())?;
        Ok((entries.len(), removed))
    }

    /// A partition this server folds and another relays: what that one relayed (its
    /// position in Kafka) leaves this server's outbox. Returns how many entries left.
    fn follow(&self, store: &Store, topic: &str, partition: u32) -> Result<u64, String> {
        let next = self.committed(topic, partition)?;
        let stored = store.relay_position(topic, partition).map_err(|e| e.to_string())?;
        if next == 0 || stored.is_some_and(|stored| stored >= next) {
            return Ok(0);
        }
        store.relayed(topic, partition, next, &[]).map(|(_, removed)| removed).map_err(|e| e.to_string())
    }

    /// A producer for the partition; transactional, it has fenced the previous one.
    fn producer(&self, topic: &str, partition: u32) -> Result<ThreadedProducer<Delivery>, String> {
        let mut settings = self.settings.clone();
        if self.transactional {
            settings.insert("transactional.id".into(), format!("{}.{topic}.{partition}", self.group));
        }
        let producer: ThreadedProducer<Delivery> = client_config(&settings)
            .create_with_context(Delivery::default())
            .map_err(|e| format!("cannot create a relay producer: {e}"))?;
        if self.transactional {
            producer.init_transactions(self.timeout).map_err(|e| {
                let hint = match e.to_string().contains("not supported by broker") {
                    true => {
                        " (a broker without transactions: set [reactions] transactional = false, --relay-at-least-once)"
                    }
                    false => "",
                };
                format!("init_transactions: {e}{hint}")
            })?;
        }
        Ok(producer)
    }

    /// Where the relay of a partition stands: the relay group's committed offset in Kafka
    /// (transactional, read after `init_transactions`: stable), or the store's if ahead.
    fn position(&self, store: &Store, topic: &str, partition: u32) -> Result<u64, String> {
        let stored = store.relay_position(topic, partition).map_err(|e| e.to_string())?;
        let committed = self.committed(topic, partition)?;
        Ok(match self.transactional {
            true => committed,
            false => committed.max(stored.unwrap_or(0)),
        })
    }

    /// The relay group's committed offset of a source partition (0: none).
    fn committed(&self, topic: &str, partition: u32) -> Result<u64, String> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition as i32);
        let committed =
            self.offsets.committed_offsets(tpl, self.timeout).map_err(|e| format!("committed offsets: {e}"))?;
        let offset = committed.find_partition(topic, partition as i32).map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(n)) if n >= 0 => n as u64,
            _ => 0,
        })
    }
}

/// The relay's position of a source partition, as a consumer-group offset.
fn position(topic: &str, partition: u32, next: u64) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(next as i64))?;
    Ok(tpl)
}

fn record<'a>(o: &'a Outgoing, headers: &'a [(String, Vec<u8>)]) -> BaseRecord<'a, str, [u8]> {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        owned = owned.insert(Header { key: name, value: Some(value) });
    }
    BaseRecord::to(&o.reaction.topic).key(o.reaction.key.as_str()).payload(o.reaction.value.as_slice()).headers(owned)
}

/// Queues every entry, waiting while the producer's queue is full.
fn produce(producer: &ThreadedProducer<Delivery>, entries: &[Outgoing]) -> Result<(), KafkaError> {
    for o in entries {
        let headers = o.headers();
        let mut pending = record(o, &headers);
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    pending = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The entries and the position after them in one transaction.
fn transaction(
    producer: &ThreadedProducer<Delivery>,
    entries: &[Outgoing],
    topic: &str,
    partition: u32,
    next: u64,
    metadata: &ConsumerGroupMetadata,
    timeout: Duration,
) -> Result<(), KafkaError> {
    producer.begin_transaction()?;
    let sent = produce(producer, entries).and_then(|()| {
        producer.send_offsets_to_transaction(&position(topic, partition, next)?, metadata, timeout)?;
        producer.commit_transaction(timeout)
    });
    if sent.is_err() {
        // Best effort: a producer that cannot abort is dropped, and the next one's
        // init_transactions aborts the transaction.
        let _ = producer.abort_transaction(timeout);
    }
    sent
}

/// The entries, each acknowledged by the broker (at least once).
fn acknowledged(
    producer: &ThreadedProducer<Delivery>,
    entries: &[Outgoing],
    timeout: Duration,
) -> Result<(), KafkaError> {
    producer.context().failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    produce(producer, entries)?;
    producer.flush(timeout)?;
    match producer.context().failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Remembers the first failed delivery (a transaction's commit fails on its own then).
#[derive(Default)]
struct Delivery {
    failed: Mutex<Option<KafkaError>>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.clone());
        }
    }
}
