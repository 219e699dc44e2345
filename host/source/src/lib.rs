//! Sources of records: the embedded log and Kafka. The fold loop reads a source through
//! [`Source`] only; the engine never sees it. Appends go through [`Writer`], to the same
//! log the source reads. [`attest`]: replicas comparing their partition digests through
//! a Kafka topic (it builds its clients as the source does, inside this module).

pub mod attest;
pub mod cluster;
mod embedded;
mod kafka;
pub mod relay;
pub mod settings;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use embedded::{EmbeddedLog, EmbeddedSource};
pub use kafka::{KafkaSource, KafkaWriter, SOURCE_NAME as KAFKA_SOURCE_NAME, kafka_settings, request_clients};

use statefold_core::model::{Record, Witness};
use statefold_store::Position;

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Store(#[from] statefold_store::StoreError),
    /// Records the store has not folded are gone from the log (retention, a deleted
    /// topic): folding on would skip them.
    #[error("{topic}/{partition}: {detail}")]
    Lost { topic: String, partition: u32, detail: String },
    /// The brokers did not answer, or a client could not be made.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// A call to the brokers that failed, or a topic they cannot serve: what the Kafka clients
/// of the source, the writer, the cluster, the relay and request/reply report.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// librdkafka could not do `doing` (e.g. "create the Kafka consumer").
    #[error("cannot {doing}: {source}")]
    Call {
        doing: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// A topic the brokers do not have or cannot serve.
    #[error("topic {topic:?} {reason}; create it")]
    Topic { topic: String, reason: String },
    /// A read of a partition that found none of the records its end promised.
    #[error("reading {output} back from offset {from}: nothing past {next} of {end} for {waited:?}")]
    Stalled { output: String, from: u64, next: u64, end: u64, waited: Duration },
    /// A position outside the log that no partition's offsets explain.
    #[error("a position is outside the log ({0}), and no partition's offsets say which: refusing to skip records")]
    OutOfRange(rdkafka::error::KafkaError),
    /// The relay's producer cannot use transactions there.
    #[error("{0} (a broker without transactions: set [reactions] transactional = false)")]
    NoTransactions(Box<BrokerError>),
    /// Records produced and not acknowledged in time.
    #[error("records not acknowledged within {0:?}")]
    Unacknowledged(Duration),
    /// The server is stopping: the call was given up.
    #[error("stopping")]
    Stopping,
    #[error(transparent)]
    Store(#[from] statefold_store::StoreError),
    /// A thread could not be started.
    #[error("cannot start {doing}: {source}")]
    Thread { doing: &'static str, source: std::io::Error },
}

impl BrokerError {
    /// `map_err` of a librdkafka call: `doing` says what it was ("create the Kafka consumer").
    pub fn call(doing: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> BrokerError {
        let doing = doing.into();
        move |source| BrokerError::Call { doing, source }
    }

    /// This error, saying what to do where the brokers answered that they do not
    /// implement transactions.
    pub fn hint_transactions(self) -> BrokerError {
        match &self {
            BrokerError::NoTransactions(_) => self,
            _ if self.to_string().contains("not supported by broker") => BrokerError::NoTransactions(Box::new(self)),
            _ => self,
        }
    }
}

/// A log that the fold loop consumes. It starts each partition at the position stored with
/// the state (never at a position kept elsewhere), and delivers each partition's records in
/// offset order.
pub trait Source: Send {
    /// The name positions are stored under.
    fn name(&self) -> &'static str;
    /// At most `max` records, waiting up to `timeout` when none are there.
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, SourceError>;
    /// Whether every partition has been read up to the end it had when the source started.
    fn caught_up(&self) -> bool;
    /// The number of partitions of each topic it reads (once known): the fold rejects a
    /// record that is not on its model's partition among them (`wrong_partition`).
    fn partitions(&self) -> Vec<(Arc<str>, u32)>;
    /// The positions of a batch are committed to the store: tell the log (for monitoring).
    fn committed(&mut self, _positions: &[(String, Position)]) {}
}

/// Where the source stands, shared with the HTTP side: readiness, lag, and the last
/// problem talking to the log.
#[derive(Debug, Default)]
pub struct SourceStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    partitions: BTreeMap<(String, u32), PartitionStatus>,
    problem: Option<String>,
    /// Topics the source stopped reading, and why (see [`SourceStatus::stop_topic`]).
    stopped: BTreeMap<String, String>,
}

/// One partition: the next offset to fold, and the log's end when last seen.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStatus {
    pub next: u64,
    pub end: Option<u64>,
    /// The source reads it (in sharded mode, only some partitions are).
    pub folding: bool,
    /// It has been folded up to the end the log had when the source started reading it.
    pub ready: bool,
}

impl PartitionStatus {
    /// Records in the log not folded yet (as of the last look at the log's end).
    pub fn lag(&self) -> Option<u64> {
        self.end.map(|end| end.saturating_sub(self.next))
    }
}

impl SourceStatus {
    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_next(&self, topic: &str, partition: u32, next: u64) {
        let mut inner = self.lock();
        let slot = inner.partitions.entry((topic.to_owned(), partition)).or_default();
        slot.next = slot.next.max(next);
    }

    /// The source starts (`true`) or stops reading a partition; either way it is not ready
    /// until it has caught up again.
    pub fn set_folding(&self, topic: &str, partition: u32, folding: bool) {
        let mut inner = self.lock();
        let slot = inner.partitions.entry((topic.to_owned(), partition)).or_default();
        slot.folding = folding;
        slot.ready = false;
    }

    /// A partition read has been folded up to where the log ended when its reading started.
    pub fn set_ready(&self, topic: &str, partition: u32) {
        let mut inner = self.lock();
        let slot = inner.partitions.entry((topic.to_owned(), partition)).or_default();
        if slot.folding && !slot.ready {
            slot.ready = true;
            tracing::info!(%topic, partition, next = slot.next, "partition caught up: served from here");
        }
    }

    /// Whether the partition is one of the source's.
    pub fn knows(&self, topic: &str, partition: u32) -> bool {
        self.lock().partitions.contains_key(&(topic.to_owned(), partition))
    }

    /// Whether the source reads the partition now.
    pub fn is_folding(&self, topic: &str, partition: u32) -> bool {
        self.lock().partitions.get(&(topic.to_owned(), partition)).is_some_and(|p| p.folding)
    }

    /// Whether the source reads the partition now and has caught up on it.
    pub fn is_ready(&self, topic: &str, partition: u32) -> bool {
        self.lock().partitions.get(&(topic.to_owned(), partition)).is_some_and(|p| p.folding && p.ready)
    }

    pub fn set_end(&self, topic: &str, partition: u32, end: u64) {
        self.lock().partitions.entry((topic.to_owned(), partition)).or_default().end = Some(end);
    }

    /// Something keeps the source from reading (`None`: all is well).
    pub fn set_problem(&self, problem: Option<String>) {
        let mut inner = self.lock();
        if inner.problem != problem {
            match &problem {
                Some(problem) => tracing::warn!(%problem, "source unavailable"),
                None => tracing::info!("source available again"),
            }
            inner.problem = problem;
        }
    }

    pub fn problem(&self) -> Option<String> {
        self.lock().problem.clone()
    }

    /// The source stopped reading `topic`: what it would fold next is not the log this
    /// store folded (a topic deleted and recreated, partitions added, records deleted
    /// before they were folded). Only an operator decides what becomes of the kind
    /// (`statefold reset`); the other topics go on.
    pub fn stop_topic(&self, topic: &str, reason: String) {
        tracing::error!(%topic, %reason, "stopped folding the topic; `statefold reset KIND` refolds its kind from the log");
        self.lock().stopped.entry(topic.to_owned()).or_insert(reason);
    }

    /// Topics stopped, and why.
    pub fn stopped(&self) -> BTreeMap<String, String> {
        self.lock().stopped.clone()
    }

    /// Why `topic` is stopped, if it is.
    pub fn stopped_reason(&self, topic: &str) -> Option<String> {
        self.lock().stopped.get(topic).cloned()
    }

    /// Every partition, in (topic, partition) order.
    pub fn partitions(&self) -> Vec<((String, u32), PartitionStatus)> {
        self.lock().partitions.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Why an append failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] statefold_store::StoreError),
    /// The log did not take the record (broker unreachable, queue full, timeout). Nothing
    /// was appended, or it will be folded anyway: retrying may append it twice.
    #[error("the log did not take the record: {0}")]
    Unavailable(String),
}

/// The writing side of the log the source reads: the embedded log, or a Kafka producer.
#[derive(Clone)]
pub enum Writer {
    Embedded(Arc<EmbeddedLog>),
    Kafka(Arc<KafkaWriter>),
}

impl Writer {
    /// Appends one record to the key's partition; returns its (partition, offset) once the
    /// log has it durably.
    pub async fn append(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), WriteError> {
        self.append_to(topic, None, key, value, headers).await
    }

    /// The number of partitions of `topic`.
    pub async fn partitions(&self, topic: &str) -> Result<u32, WriteError> {
        match self {
            Writer::Embedded(_) => Ok(1),
            Writer::Kafka(producer) => producer.partitions(topic, Duration::from_secs(10)).await,
        }
    }

    /// Where (`topic`, `partition`) ends, where this server knows it for certain: the
    /// embedded log (this process is its only writer). `None` with Kafka, where another
    /// producer may have appended since this server last looked.
    pub fn known_end(&self, topic: &str, partition: u32) -> Result<Option<u64>, statefold_store::StoreError> {
        match self {
            Writer::Embedded(log) => log.end(topic, partition).map(Some),
            Writer::Kafka(_) => Ok(None),
        }
    }

    /// Appends one record to `partition` (`None`: the key's partition).
    pub async fn append_to(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: &[u8],
        value: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), WriteError> {
        match self {
            Writer::Embedded(log) => {
                let (log, topic, key, value, headers) =
                    (log.clone(), topic.to_owned(), key.to_vec(), value.to_vec(), headers.to_vec());
                tokio::task::spawn_blocking(move || log.append(&topic, &key, &value, now_ms(), &headers))
                    .await
                    .map_err(|e| WriteError::Unavailable(e.to_string()))?
                    .map_err(WriteError::from)
            }
            Writer::Kafka(producer) => producer.append(topic, partition, key, value, headers).await,
        }
    }
}

/// The next offset of every partition a batch read from, as positions of `source`, each
/// with its last record's witness.
pub fn positions(source: &str, records: &[Record]) -> Vec<(String, Position)> {
    let mut last: std::collections::HashMap<(&str, u32), &Record> = std::collections::HashMap::new();
    for record in records {
        let slot = last.entry((&*record.topic, record.partition)).or_insert(record);
        if record.offset > slot.offset {
            *slot = record;
        }
    }
    last.into_iter()
        .map(|((topic, partition), record)| {
            let position = Position {
                topic: topic.to_owned(),
                partition,
                next_offset: record.offset + 1,
                digest: None,
                witness: Some(Witness::of(record)),
            };
            (source.to_owned(), position)
        })
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
