//! The relay: reactions from the outbox to their topics, exactly once.
//!
//! The fold commits each diff's reactions to the outbox in the batch's WriteBatch (see
//! `store::outbox`); the relay, on its own thread, moves them on, per source partition in
//! offset order (so each model's in the order its diffs emitted them), a diff's reactions
//! never split:
//! - **Kafka, read back** (the default): acknowledged produces of one idempotent producer
//!   shared by the source partitions, each reaction to the partition its key maps to, then the position
//!   committed to the relay group and stored. After a crash or a takeover, before producing,
//!   the relay reads back from each output partition (from its mark, see [`tail`]) the last
//!   reaction it wrote there and skips everything up to it: any reader, even one that does
//!   not de-duplicate, sees each reaction once, with no broker transactions.
//! - **Kafka, transactional** (`[reactions] transactional = true`, for brokers that
//!   implement EndTxn): one producer per source partition with
//!   `transactional.id` `<group_id>.relay.<topic>.<partition>`. Each transaction produces a
//!   run of reactions and commits, in the same transaction, the relay's position as the
//!   consumer-group offset of the source partition (group `<group_id>.relay`): Kafka
//!   Streams' exactly-once (KIP-447) with the outbox as input. A restart, or the next owner
//!   of the partition, starts with `init_transactions` (which fences the previous producer
//!   of that id and aborts its open transaction) and reads the position back from Kafka.
//!   Consumers reading committed records see each reaction once.
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

mod tail;

use self::tail::Tail;
use super::cluster::Cluster;
use super::kafka::{Role, client_config, kafka_settings};
use super::{BrokerError, EmbeddedLog, SourceStatus};
use crate::settings::{KafkaConfig, SourceLimits};
use statefold_core::model::Outgoing;
use statefold_store::{LogAppend, Store};

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
    pub fn new(pending: u64, limits: &SourceLimits, relayed: Counter) -> Arc<Relay> {
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
    limits: SourceLimits,
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
            if stop() {
                return;
            }
            let step = match (&sink, &mut kafka) {
                (Sink::Embedded(log), _) => relay_embedded(&store, log, topic, *partition, &limits),
                (Sink::Kafka { .. }, Some(Ok(kafka))) => kafka.relay(&store, topic, *partition, &limits, &stop),
                // (The reason is below, once per loop.)
                (Sink::Kafka { .. }, _) => continue,
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
            problems.push(format!("the relay's Kafka clients could not be created: {e}"));
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
    limits: &SourceLimits,
) -> Result<(usize, u64), BrokerError> {
    let from = store.relay_position(topic, partition)?.unwrap_or(0);
    let entries = store.outbox(topic, partition, from, limits.relay_batch_records_max)?;
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
    let removed = log.relayed(topic, partition, last.offset + 1, &appends)?;
    Ok((entries.len(), removed))
}

/// The Kafka side: one producer per source partition (transactional), or one for all of
/// them (read back: each source partition's reactions stay in order in every output
/// partition); a consumer that only reads and commits the relay group's offsets (its
/// positions).
struct KafkaRelay {
    settings: BTreeMap<String, String>,
    /// A consumer's, for the read-back clients.
    reader: BTreeMap<String, String>,
    group: String,
    transactional: bool,
    offsets: BaseConsumer,
    metadata: ConsumerGroupMetadata,
    producers: BTreeMap<(String, u32), Partition>,
    /// Read back: the producer every partition shares (its first produce waits for a
    /// producer id, about a second on Tansu: paid once, not per partition).
    shared: Option<Arc<ThreadedProducer<Delivery>>>,
    timeout: Duration,
    mark_lag: u64,
}

/// A source partition's producer and where its relay stands.
struct Partition {
    producer: Arc<ThreadedProducer<Delivery>>,
    next: u64,
    /// Without transactions: where its reactions stand in the output partitions.
    tail: Option<Tail>,
}

impl KafkaRelay {
    fn new(config: &KafkaConfig, limits: &SourceLimits, transactional: bool) -> Result<KafkaRelay, BrokerError> {
        let group = format!("{}.relay", config.group_id);
        let mut consumer = kafka_settings(config, limits, Role::Consumer);
        consumer.insert("group.id".into(), group.clone());
        let offsets: BaseConsumer =
            client_config(&consumer).create().map_err(BrokerError::call("create the relay's consumer"))?;
        let reader = consumer.clone();
        let metadata = offsets.group_metadata().expect("a consumer with a group.id has group metadata");
        let mut settings = kafka_settings(config, limits, Role::Producer);
        match transactional {
            true => settings.insert("transaction.timeout.ms".into(), limits.relay_transaction_timeout_ms.to_string()),
            // A gap in what reaches an output partition would hide reactions behind a later
            // one that a read-back finds: the producer fails instead, and its successor reads
            // back again.
            false => settings.insert("enable.gapless.guarantee".into(), "true".into()),
        };
        let mut relay = KafkaRelay {
            settings,
            reader,
            group,
            transactional,
            offsets,
            metadata,
            producers: BTreeMap::new(),
            shared: None,
            timeout: Duration::from_millis(limits.relay_transaction_timeout_ms),
            mark_lag: limits.relay_mark_lag_records,
        };
        if !transactional {
            // Now, so that it has its producer id by the first run.
            relay.shared_producer()?;
        }
        Ok(relay)
    }

    /// One transaction (or one acknowledged run) of a partition's outbox: (relayed, removed).
    fn relay(
        &mut self,
        store: &Store,
        topic: &str,
        partition: u32,
        limits: &SourceLimits,
        stop: &dyn Fn() -> bool,
    ) -> Result<(usize, u64), BrokerError> {
        let slot = (topic.to_owned(), partition);
        if !self.producers.contains_key(&slot) {
            // Only with something to relay (a transactional producer per partition is a
            // connection each), as far as the store knows: its position is at most Kafka's.
            let from = store.relay_position(topic, partition)?.unwrap_or(0);
            if store.outbox(topic, partition, from, 1)?.is_empty() {
                return Ok((0, 0));
            }
            let started = std::time::Instant::now();
            let producer = self.producer(topic, partition)?;
            let next = self.position(store, topic, partition)?;
            tracing::info!(%topic, partition, next, took = ?started.elapsed(), "relay: producing");
            let tail = match self.transactional {
                true => None,
                false => Some(Tail::new(&self.reader, &self.group, topic, partition, self.timeout, self.mark_lag)?),
            };
            self.producers.insert(slot.clone(), Partition { producer, next, tail });
        }
        let p = self.producers.get_mut(&slot).expect("inserted above");
        let entries = store.outbox(topic, partition, p.next, limits.relay_batch_records_max)?;
        let Some(last) = entries.last() else { return Ok((0, 0)) };
        let next = last.offset + 1;
        let sent = match &mut p.tail {
            None => transaction(&p.producer, &entries, topic, partition, next, &self.metadata, self.timeout)
                .map_err(BrokerError::call("commit the relay's transaction")),
            Some(tail) => match read_back_and_send(&p.producer, tail, &entries, self.timeout, stop) {
                Ok(()) => {
                    // The position, for the servers that follow it and for the next start (a
                    // crash before it: the next relay reads back what this run wrote).
                    let at =
                        position(topic, partition, next).map_err(BrokerError::call("name the relay's position"))?;
                    let committed = self
                        .offsets
                        .commit(&at, CommitMode::Sync)
                        .map_err(BrokerError::call("commit the relay's position"));
                    if committed.is_ok() {
                        tail.committed();
                    }
                    committed
                }
                Err(Failed::Before(e)) => Err(e),
                Err(Failed::Producing(e)) => {
                    // Some of the run may be written, in any output partition the shared
                    // producer wrote to: every partition reads back again, with a new one.
                    self.shared = None;
                    self.producers.clear();
                    return Err(e);
                }
            },
        };
        if let Err(e) = sent {
            // A fenced or failed producer is dropped: the next attempt starts over from the
            // position in Kafka, with a new epoch.
            self.producers.remove(&slot);
            return Err(if self.transactional { e.hint_transactions() } else { e });
        }
        p.next = next;
        let (_, removed) = store.relayed(topic, partition, next, &[])?;
        Ok((entries.len(), removed))
    }

    /// A partition this server folds and another relays: what that one relayed (its
    /// position in Kafka) leaves this server's outbox. Returns how many entries left.
    fn follow(&self, store: &Store, topic: &str, partition: u32) -> Result<u64, BrokerError> {
        let next = self.committed(topic, partition)?;
        let stored = store.relay_position(topic, partition)?;
        if next == 0 || stored.is_some_and(|stored| stored >= next) {
            return Ok(0);
        }
        Ok(store.relayed(topic, partition, next, &[]).map(|(_, removed)| removed)?)
    }

    /// A producer for the partition: transactional, its own, which has fenced the previous
    /// one; otherwise the shared one.
    fn producer(&mut self, topic: &str, partition: u32) -> Result<Arc<ThreadedProducer<Delivery>>, BrokerError> {
        if !self.transactional {
            return self.shared_producer();
        }
        let mut settings = self.settings.clone();
        settings.insert("transactional.id".into(), format!("{}.{topic}.{partition}", self.group));
        let producer = create_producer(&settings)?;
        producer
            .init_transactions(self.timeout)
            .map_err(|e| BrokerError::call("init_transactions")(e).hint_transactions())?;
        Ok(Arc::new(producer))
    }

    /// The producer the partitions share without transactions (made on first use).
    fn shared_producer(&mut self) -> Result<Arc<ThreadedProducer<Delivery>>, BrokerError> {
        if let Some(shared) = &self.shared {
            return Ok(shared.clone());
        }
        let producer = Arc::new(create_producer(&self.settings)?);
        self.shared = Some(producer.clone());
        Ok(producer)
    }

    /// Where the relay of a partition stands: the relay group's committed offset in Kafka
    /// (transactional, read after `init_transactions`: stable), or the store's if ahead.
    fn position(&self, store: &Store, topic: &str, partition: u32) -> Result<u64, BrokerError> {
        let stored = store.relay_position(topic, partition)?;
        let committed = self.committed(topic, partition)?;
        Ok(match self.transactional {
            true => committed,
            false => committed.max(stored.unwrap_or(0)),
        })
    }

    /// The relay group's committed offset of a source partition (0: none).
    fn committed(&self, topic: &str, partition: u32) -> Result<u64, BrokerError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition as i32);
        let committed = self
            .offsets
            .committed_offsets(tpl, self.timeout)
            .map_err(BrokerError::call("read the relay's committed offsets"))?;
        let offset = committed.find_partition(topic, partition as i32).map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(n)) if n >= 0 => n as u64,
            _ => 0,
        })
    }
}

fn create_producer(settings: &BTreeMap<String, String>) -> Result<ThreadedProducer<Delivery>, BrokerError> {
    client_config(settings)
        .create_with_context(Delivery::default())
        .map_err(BrokerError::call("create a relay producer"))
}

/// The relay's position of a source partition, as a consumer-group offset.
fn position(topic: &str, partition: u32, next: u64) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(next as i64))?;
    Ok(tpl)
}

fn record<'a>(o: &'a Outgoing, headers: &'a [(String, Vec<u8>)], to: Option<u32>) -> BaseRecord<'a, str, [u8]> {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        owned = owned.insert(Header { key: name, value: Some(value) });
    }
    let record = BaseRecord::to(&o.reaction.topic)
        .key(o.reaction.key.as_str())
        .payload(o.reaction.value.as_slice())
        .headers(owned);
    match to {
        Some(partition) => record.partition(partition as i32),
        None => record,
    }
}

/// Queues every entry (to its output partition if given), waiting while the producer's
/// queue is full.
fn produce<'a>(
    producer: &ThreadedProducer<Delivery>,
    entries: impl IntoIterator<Item = (&'a Outgoing, Option<u32>)>,
) -> Result<(), KafkaError> {
    for (o, to) in entries {
        let headers = o.headers();
        let mut pending = record(o, &headers, to);
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
    let sent = produce(producer, entries.iter().map(|o| (o, None))).and_then(|()| {
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

/// Without transactions: the entries not already in their output partitions (read back on
/// a producer's first run into each), each to its partition and acknowledged by the broker.
fn read_back_and_send(
    producer: &ThreadedProducer<Delivery>,
    tail: &mut Tail,
    entries: &[Outgoing],
    timeout: Duration,
    stop: &dyn Fn() -> bool,
) -> Result<(), Failed> {
    let partitions = tail.outputs(entries).map_err(Failed::Before)?;
    let outputs: Vec<(String, u32)> =
        entries.iter().zip(partitions).map(|(o, p)| (o.reaction.topic.clone(), p)).collect();
    let mut distinct = outputs.clone();
    distinct.sort();
    distinct.dedup();
    tail.prepare(&distinct, stop).map_err(Failed::Before)?;
    let fresh: Vec<(&Outgoing, Option<u32>)> = entries
        .iter()
        .zip(&outputs)
        .filter(|(o, output)| !tail.written(output, (o.offset, o.index)))
        .map(|(o, output)| (o, Some(output.1)))
        .collect();
    let skipped = entries.len() - fresh.len();
    if skipped > 0 {
        tracing::info!(skipped, "relay recovery: reactions already written, not sent again");
    }
    let context = producer.context();
    context.failed.lock().unwrap_or_else(|p| p.into_inner()).take();
    context.ends.lock().unwrap_or_else(|p| p.into_inner()).clear();
    produce(producer, fresh).map_err(|e| Failed::Producing(BrokerError::call("produce reactions")(e)))?;
    // In slices, so that a stop is not held up by a broker that does not answer.
    let deadline = std::time::Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if stop() {
            return Err(Failed::Producing(BrokerError::Stopping));
        }
        if std::time::Instant::now() > deadline {
            return Err(Failed::Producing(BrokerError::Unacknowledged(timeout)));
        }
        // The producer's own thread serves the delivery reports (a `flush` here would wait
        // out its whole timeout).
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(e) = context.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(Failed::Producing(BrokerError::call("deliver reactions")(e)));
    }
    tail.delivered(std::mem::take(&mut *context.ends.lock().unwrap_or_else(|p| p.into_inner())));
    Ok(())
}

/// Why a run was not relayed: before anything was produced, or after (then some of it may
/// be written).
enum Failed {
    Before(BrokerError),
    Producing(BrokerError),
}

/// Remembers the first failed delivery (a transaction's commit fails on its own then), and
/// the end (last offset + 1) of each output partition a delivery reached.
#[derive(Default)]
struct Delivery {
    failed: Mutex<Option<KafkaError>>,
    ends: Mutex<BTreeMap<(String, u32), u64>>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Err((e, _)) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.clone());
            }
            Ok(m) => {
                use rdkafka::Message;
                let mut ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
                let end = ends.entry((m.topic().to_owned(), m.partition() as u32)).or_insert(0);
                *end = (*end).max(m.offset() as u64 + 1);
            }
        }
    }
}
