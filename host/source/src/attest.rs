//! Replica attestations: how a replica that folds the log differently from the others is
//! detected, and stops being served.
//!
//! Every server keeps, per partition, a digest of what became of each record it folded:
//! `digest = blake3(digest ‖ offset ‖ what ‖ 0 ‖ seq ‖ version)` ([`statefold_core::model::Mark`]): an
//! applied diff's seq and the version that applied it, a rejection's code, a deploy's
//! version. Not the model's hash: the log's records and the seqs determine it, except where
//! a replay rebased a chain, which is not a divergence.
//! The digest is committed with the partition's position, so it survives restarts. Replicas
//! that fold the same records the same way have the same digest at every offset.
//!
//! Each time a partition's offsets cross a multiple of `attest_interval_records` (the same
//! points on every replica), the server publishes `{server, topic, partition, offset,
//! digest}` to the attestation topic and reads the others'. A point both sides have is
//! compared; the latest verdict per peer is kept. A server that disagrees with at least as
//! many peers as agree with it (itself counted as agreeing) reports itself diverged:
//! `/readyz` answers 503, so a load balancer stops sending it clients, and
//! `statefold verify` tells which models differ. With three replicas and one wrong, only
//! the wrong one goes unready; with two, both do (no majority says which is right).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::kafka::{Role, client_config, kafka_settings, partition_count};
use crate::settings::{KafkaConfig, SourceLimits};
use statefold_core::chain::Hash;
use statefold_core::model::Mark;
use statefold_store::{Position, Store, StoreError};

/// A partition's digest at an attestation point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub digest: String,
}

/// The running digest of every partition this server folds.
pub struct Digests {
    interval: u64,
    /// (last folded offset, digest); `None` digest: the store kept none for this
    /// partition (folded before digests existed), so it is not attested.
    partitions: HashMap<(String, u32), (Option<u64>, Option<Hash>)>,
}

impl Digests {
    pub fn new(interval: u64) -> Digests {
        Digests { interval: interval.max(1), partitions: HashMap::new() }
    }

    /// Folds a batch's marks into the digests, sets each position's digest, and returns
    /// the attestation points the batch crossed.
    pub fn advance(
        &mut self,
        store: &Store,
        source: &str,
        marks: &[Mark],
        positions: &mut [(String, Position)],
    ) -> Result<Vec<Point>, StoreError> {
        let mut by_partition: BTreeMap<(&str, u32), Vec<&Mark>> = BTreeMap::new();
        for mark in marks {
            by_partition.entry((&mark.topic, mark.partition)).or_default().push(mark);
        }
        let mut points = Vec::new();
        for ((topic, partition), mut marks) in by_partition {
            marks.sort_by_key(|m| m.offset);
            let key = (topic.to_owned(), partition);
            if !self.partitions.contains_key(&key) {
                let stored = store.progress(source, topic, partition)?;
                let state = match stored {
                    None => (None, Some(Hash::from_bytes([0; 32]))),
                    Some(position) => (position.next_offset.checked_sub(1), position.digest),
                };
                self.partitions.insert(key.clone(), state);
            }
            let (last, digest) = self.partitions.get_mut(&key).expect("inserted above");
            for mark in marks {
                if let Some(current) = digest {
                    let mut hasher = blake3::Hasher::new();
                    hasher.update(current.as_bytes()).update(&mark.offset.to_be_bytes());
                    hasher.update(mark.what.as_str().as_bytes()).update(&[0]).update(&mark.seq.to_be_bytes());
                    hasher.update(&mark.by.map_or([0; 32], |by| by.0));
                    *current = Hash::from_bytes(*hasher.finalize().as_bytes());
                    if last.is_none_or(|l| l / self.interval < mark.offset / self.interval) {
                        points.push(Point {
                            topic: topic.to_owned(),
                            partition,
                            offset: mark.offset,
                            digest: current.to_string(),
                        });
                    }
                }
                *last = Some(mark.offset);
            }
        }
        for (_, position) in positions.iter_mut() {
            if let Some((_, digest)) = self.partitions.get(&(position.topic.clone(), position.partition)) {
                position.digest = *digest;
            }
        }
        Ok(points)
    }
}

/// The latest comparison with one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub server: String,
    pub agrees: bool,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub ours: String,
    pub theirs: String,
}

/// What this server knows of the other replicas.
#[derive(Debug, Clone, Serialize)]
pub struct Replicas {
    pub server: String,
    pub peers: Vec<Verdict>,
    /// Why this server must not be served (it disagrees with the majority).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Attestation {
    server: String,
    #[serde(flatten)]
    point: Point,
}

/// (peer server, its digest).
type Peer = (String, String);

#[derive(Default)]
struct Inner {
    /// This server's recent points, per partition: offset → digest.
    own: HashMap<(String, u32), BTreeMap<u64, String>>,
    /// Peers' points this server has not reached yet: offset → (peer, digest).
    pending: HashMap<(String, u32), BTreeMap<u64, Vec<Peer>>>,
    peers: BTreeMap<String, Verdict>,
}

/// Publishes this server's points and compares them with the other replicas'.
pub struct Attestor {
    server: String,
    topic: String,
    kept: usize,
    producer: ThreadedProducer<DefaultProducerContext>,
    inner: Mutex<Inner>,
    /// Points compared with the other replicas' (`statefold_replica_digests_compared_total`).
    compared: Counter,
}

impl Attestor {
    /// Starts attesting through `config.attest_topic` (`None` if it is turned off), with a
    /// thread that reads the other replicas' points until `stop`.
    pub fn start(
        config: &KafkaConfig,
        limits: &SourceLimits,
        data_dir: &Path,
        stop: CancellationToken,
        compared: Counter,
    ) -> anyhow::Result<Option<(Arc<Attestor>, std::thread::JoinHandle<()>)>> {
        if config.attest_topic.is_empty() {
            return Ok(None);
        }
        let server = server_id(data_dir)?;
        let producer: ThreadedProducer<DefaultProducerContext> =
            client_config(&kafka_settings(config, limits, Role::Producer)).create()?;
        let mut consumer_config = config.clone();
        consumer_config.group_id = format!("{}.attest.{server}", config.group_id);
        let consumer: BaseConsumer =
            client_config(&kafka_settings(&consumer_config, limits, Role::Consumer)).create()?;
        let attestor = Arc::new(Attestor {
            server,
            topic: config.attest_topic.clone(),
            kept: limits.attest_points_kept.max(1),
            producer,
            inner: Mutex::new(Inner::default()),
            compared,
        });
        tracing::info!(server = %attestor.server, topic = %attestor.topic, "attesting partition digests to the other replicas");
        let reader = attestor.clone();
        let thread = std::thread::Builder::new().name("attest".into()).spawn(move || reader.read(&consumer, &stop))?;
        Ok(Some((attestor, thread)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This server's new points (committed): kept, compared with peers' that were
    /// waiting for them, and published.
    pub fn own(&self, points: Vec<Point>) {
        for point in points {
            {
                let mut inner = self.lock();
                let key = (point.topic.clone(), point.partition);
                let waiting = inner.pending.get_mut(&key).and_then(|p| p.remove(&point.offset)).unwrap_or_default();
                for (server, digest) in waiting {
                    self.judge(&mut inner, &server, &point, &digest);
                }
                let own = inner.own.entry(key).or_default();
                own.insert(point.offset, point.digest.clone());
                while own.len() > self.kept {
                    own.pop_first();
                }
            }
            let body = serde_json::to_vec(&Attestation { server: self.server.clone(), point }).expect("serializable");
            let record = BaseRecord::<[u8], [u8]>::to(&self.topic).key(self.server.as_bytes()).payload(&body);
            if let Err((e, _)) = self.producer.send(record) {
                tracing::debug!(error = %e, "attestation not published");
            }
        }
    }

    /// A peer's point: compared now if this server has it, kept if it has not got there.
    fn foreign(&self, server: String, point: Point) {
        let mut inner = self.lock();
        let key = (point.topic.clone(), point.partition);
        let own = inner.own.get(&key).and_then(|own| own.get(&point.offset)).cloned();
        if let Some(ours) = own {
            let ours = Point { digest: ours, ..point.clone() };
            return self.judge(&mut inner, &server, &ours, &point.digest);
        }
        let behind =
            inner.own.get(&key).and_then(|own| own.last_key_value()).is_none_or(|(last, _)| *last < point.offset);
        if behind {
            let pending = inner.pending.entry(key).or_default();
            pending.entry(point.offset).or_default().push((server, point.digest));
            while pending.len() > self.kept {
                pending.pop_first();
            }
        }
    }

    fn judge(&self, inner: &mut Inner, server: &str, ours: &Point, theirs: &str) {
        self.compared.inc();
        let agrees = ours.digest == theirs;
        if !agrees {
            tracing::error!(peer = server, topic = %ours.topic, partition = ours.partition, offset = ours.offset, ours = %ours.digest, theirs, "a replica folded this partition differently");
        }
        // The latest comparison stands: digests chain, so a replica that diverged keeps
        // disagreeing at every later point.
        {
            let verdict = Verdict {
                server: server.to_owned(),
                agrees,
                topic: ours.topic.clone(),
                partition: ours.partition,
                offset: ours.offset,
                ours: ours.digest.clone(),
                theirs: theirs.to_owned(),
            };
            inner.peers.insert(server.to_owned(), verdict);
        }
    }

    /// The peers' latest verdicts, and whether this server is the one that diverged.
    pub fn replicas(&self) -> Replicas {
        let peers: Vec<Verdict> = self.lock().peers.values().cloned().collect();
        let disagreeing: Vec<&Verdict> = peers.iter().filter(|v| !v.agrees).collect();
        let agreeing = peers.len() - disagreeing.len();
        let diverged = (!disagreeing.is_empty() && disagreeing.len() > agreeing).then(|| {
            let v = disagreeing[0];
            format!(
                "this replica folded {}/{} differently from {} of {} other replicas (at offset {}: digest {} here, {} there); run `statefold verify`",
                v.topic,
                v.partition,
                disagreeing.len(),
                peers.len(),
                v.offset,
                v.ours,
                v.theirs
            )
        });
        Replicas { server: self.server.clone(), peers, diverged }
    }

    /// Reads the attestation topic (every partition, from its recent end) until `stop`.
    fn read(&self, consumer: &BaseConsumer, stop: &CancellationToken) {
        let mut assigned = false;
        while !stop.is_cancelled() {
            if !assigned {
                match partition_count(consumer.client(), &self.topic, Duration::from_secs(5)) {
                    Ok(count) => {
                        let mut list = TopicPartitionList::new();
                        for partition in 0..count as i32 {
                            let tail = Offset::OffsetTail(self.kept as i64);
                            if let Err(e) = list.add_partition_offset(&self.topic, partition, tail) {
                                tracing::warn!(error = %e, "cannot assign the attestation topic");
                            }
                        }
                        assigned = consumer.assign(&list).is_ok();
                    }
                    Err(e) => tracing::debug!(error = %e, "attestation topic not readable yet"),
                }
                if !assigned {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    let parsed = message.payload().and_then(|p| serde_json::from_slice::<Attestation>(p).ok());
                    match parsed {
                        Some(a) if a.server != self.server => self.foreign(a.server, a.point),
                        Some(_) => {}
                        None => tracing::debug!(offset = message.offset(), "not an attestation; skipped"),
                    }
                }
                Some(Err(e)) => tracing::debug!(error = %e, "reading attestations"),
                None => {}
            }
        }
        self.producer.flush(Duration::from_secs(1)).ok();
    }
}

/// This server's name among the replicas: made once and kept in its data dir.
pub fn server_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("server-id");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let seed = format!("{:?} {} {}", std::time::SystemTime::now(), std::process::id(), data_dir.display());
    let id = blake3::hash(seed.as_bytes()).to_hex()[..16].to_owned();
    std::fs::write(&path, &id)?;
    Ok(id)
}
