//! The shared vocabulary: what every part of Statefold speaks of. Records as a source
//! delivers them, models and their heads, what a batch changed ([`Folded`]: applied
//! diffs, rejections, checkpoints, prunes, deploys, digest marks), which version folds
//! each partition ([`KindVersions`]), reducer versions ([`ModuleHash`],
//! [`VersionRecord`]). Plain data: the fold engine produces it, the store commits it,
//! sources deliver [`Record`]s, the API and the hub read it. It imports no adapter, so no
//! two adapters need to import each other.

mod versions;

pub use versions::*;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::chain::Hash;
use crate::code::Code;

/// A record whose header has this name creates its model (and carries no diff).
pub const CREATE_HEADER: &str = "statefold-create";
/// A record whose header has this name (its value: the reducer's name) deploys the module
/// it carries to its partition: the partition's later records fold with that version. A
/// deploy writes one to every partition of each of the reducer's topics, so every replica
/// switches each partition at the same offset.
pub const DEPLOY_HEADER: &str = "statefold-deploy";
/// A record whose header has this name (its value: the kind) replays its partition: every
/// model of the partition is rebuilt from its oldest retained version with the partition's
/// version at that record, at its next diff or between batches, whichever comes first (see
/// `fold::Engine::replay_model`). A replay writes one to every partition of the kind's topic.
pub const REPLAY_HEADER: &str = "statefold-replay";
/// On a deploy record: how the version arrived (`http`, `directory`).
pub const DEPLOY_ORIGIN_HEADER: &str = "statefold-origin";
/// On a deploy or replay record: the subject of the token that asked for it (with `[auth]`).
pub const SUBJECT_HEADER: &str = "statefold-subject";
/// On a deploy record: the number of partitions the deploy wrote to.
pub const DEPLOY_PARTITIONS_HEADER: &str = "statefold-partitions";
/// On a deploy record that carries one chunk of a module larger than a record (a deploy
/// record's value is the module otherwise): `HASH INDEX COUNT`, the module's blake3 in hex,
/// the chunk's index and how many there are. A partition's chunks come before the deploy
/// record that names their module; every replica stores them with the position they are
/// folded at, so a module assembles the same wherever the partition is folded from.
pub const DEPLOY_CHUNK_HEADER: &str = "statefold-deploy-chunk";
/// On a deploy record without the module in its value: `HASH COUNT`, the module it deploys,
/// assembled from the chunks before it in its partition (see [`DEPLOY_CHUNK_HEADER`]) and
/// checked against the hash.
pub const DEPLOY_MODULE_HEADER: &str = "statefold-deploy-module";
/// Longest model id, in bytes.
pub const ID_BYTES_MAX: usize = 256;

/// One record as a source delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub value: Bytes,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn is_create(&self) -> bool {
        self.header(CREATE_HEADER).is_some()
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// The last record folded from a partition, as stored with the partition's position: a
/// restart reads that offset again and compares, so a topic deleted and recreated under
/// the stored position (other records at the same offsets) is found, not folded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Witness {
    pub offset: u64,
    /// blake3 of the record's key, value, timestamp and headers (first 16 bytes).
    pub fingerprint: [u8; 16],
}

impl Witness {
    pub fn of(record: &Record) -> Witness {
        let mut hasher = blake3::Hasher::new();
        let mut field = |bytes: &[u8]| {
            hasher.update(&(bytes.len() as u64).to_be_bytes()).update(bytes);
        };
        field(record.key.as_deref().unwrap_or_default());
        field(&record.value);
        field(&record.timestamp_ms.unwrap_or(i64::MIN).to_be_bytes());
        for (name, value) in &record.headers {
            field(name.as_bytes());
            field(value);
        }
        let mut fingerprint = [0; 16];
        fingerprint.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        Witness { offset: record.offset, fingerprint }
    }
}

/// A model: its kind and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub kind: Arc<str>,
    pub id: Arc<str>,
}

impl ModelKey {
    pub fn new(kind: &str, id: &str) -> ModelKey {
        ModelKey { kind: kind.into(), id: id.into() }
    }

    /// The hash of this model before its first diff.
    pub fn genesis(&self) -> Hash {
        Hash::genesis(&self.kind, &self.id)
    }
}

/// The partition of a topic with `partitions` partitions that a model's records belong to:
/// the Java client's default partitioner of the key (murmur2, seed `0x9747b28c`, sign bit
/// cleared, modulo the count), which librdkafka calls `murmur2_random`. Every replica and
/// every conforming producer computes the same one.
pub fn partition_of(key: &[u8], partitions: u32) -> u32 {
    (murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff) % partitions.max(1)
}

/// Checks a topic name by Kafka's rules: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.`
/// or `..`.
pub fn validate_topic(topic: &str) -> Result<(), InvalidTopic> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(InvalidTopic::Length(topic.len()));
    }
    if topic == "." || topic == ".." {
        return Err(InvalidTopic::Dots);
    }
    match topic.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        Some(c) => Err(InvalidTopic::Char(c)),
        None => Ok(()),
    }
}

/// Why a name is not a Kafka topic's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopic {
    #[error("a topic name has 1 to 249 characters, not {0}")]
    Length(usize),
    #[error("a topic may not be named `.` or `..`")]
    Dots,
    #[error("{0:?} is not allowed in a topic name (only [a-zA-Z0-9._-])")]
    Char(char),
}

/// Why bytes are not a model id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("model id is not UTF-8")]
    NotUtf8,
    #[error("model id must be 1 to {ID_BYTES_MAX} bytes, not {0}")]
    Length(usize),
    #[error("model id contains control characters")]
    Control,
}

/// Checks a model id: UTF-8, 1 to [`ID_BYTES_MAX`] bytes, no control characters (the
/// store separates kind, id and offset with NUL).
pub fn validate_id(id: &[u8]) -> Result<&str, InvalidId> {
    let id = std::str::from_utf8(id).map_err(|_| InvalidId::NotUtf8)?;
    if id.is_empty() || id.len() > ID_BYTES_MAX {
        return Err(InvalidId::Length(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(InvalidId::Control);
    }
    Ok(id)
}

/// Where a model stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Diffs applied.
    pub seq: u64,
    /// Offset of the last applied diff; `None` before the first.
    pub offset: Option<u64>,
    pub hash: Hash,
    /// The reducer version that applied the last diff (or that the model was created under).
    pub reducer: ModuleHash,
    /// Retained checkpoints, oldest first, as (seq, offset). Diffs at or before the oldest
    /// one's offset are pruned once there are more than the retention allows.
    pub checkpoints: Vec<(u64, u64)>,
    /// Every diff after this offset is retained; `None`: every diff since the model began.
    pub pruned_through: Option<u64>,
    /// The partition its records are in (`None` for a head stored before it was recorded).
    pub partition: Option<u32>,
    /// The replay generation of its partition its history was rebuilt for (see
    /// [`REPLAY_HEADER`]).
    pub replayed: u64,
    /// Size of the latest checkpoint's snapshot, in bytes (0: none, or not recorded).
    pub checkpoint_bytes: u64,
    /// Bytes of the diffs applied since the latest checkpoint.
    pub tail_bytes: u64,
    /// The seq of the first diff of the run that `reducer` applied up to the head: every
    /// diff from it on is that version's. So a catch-up knows whether the diffs a client
    /// missed span a deploy without reading them. `None`: not known (a head stored before it
    /// was recorded; the diffs are read instead).
    pub run_since: Option<u64>,
}

impl Head {
    /// A model's head before its first diff.
    pub fn new(model: &ModelKey, reducer: ModuleHash, partition: u32, replayed: u64) -> Head {
        Head {
            seq: 0,
            offset: None,
            hash: model.genesis(),
            reducer,
            checkpoints: Vec::new(),
            pruned_through: None,
            partition: Some(partition),
            replayed,
            checkpoint_bytes: 0,
            tail_bytes: 0,
            run_since: Some(1),
        }
    }

    /// The latest checkpoint, as (seq, offset).
    pub fn checkpoint(&self) -> Option<(u64, u64)> {
        self.checkpoints.last().copied()
    }

    /// Whether this head is `before` with diffs applied and nothing else changed: only its
    /// seq, offset, hash and tail bytes differ, which its last diff records.
    pub fn advanced_from(&self, before: &Head) -> bool {
        self.seq > before.seq
            && *before
                == Head {
                    seq: before.seq,
                    offset: before.offset,
                    hash: before.hash,
                    tail_bytes: before.tail_bytes,
                    ..self.clone()
                }
    }
}

/// A diff that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub model: ModelKey,
    pub offset: u64,
    pub seq: u64,
    pub prev: Hash,
    pub hash: Hash,
    pub reducer: ModuleHash,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Bytes,
    /// Bytes of the model's diffs since its latest checkpoint before this diff, this one's
    /// included: its head's `tail_bytes` after it (0 where not recorded).
    pub tail_bytes: u64,
}

/// A record a reducer emitted while applying a diff (WIT `reactions.emit`), for another
/// topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaction {
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A reaction in the outbox: committed with the diff that emitted it, relayed after. Its
/// identity, the same on every replica and after every restart, is (model, seq, index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where the diff was read: the outbox is relayed per source partition, in offset order
    /// (which keeps each model's order).
    pub source: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub model: ModelKey,
    pub seq: u64,
    /// Its place among the diff's reactions.
    pub index: u32,
    pub reaction: Reaction,
}

/// A diff's idempotency key: a second diff with the same key for the same model is not
/// applied (rejection `duplicate`); request/reply's `idempotencyKey`.
pub const IDEMPOTENCY_KEY_HEADER: &str = "statefold-idempotency-key";
/// The hash (hex) a diff expects its model at; elsewhere it is not applied (rejection
/// `hash_mismatch`); request/reply's `expectedHash`.
pub const EXPECTED_HASH_HEADER: &str = "statefold-expected-hash";

/// A diff applied under an idempotency key: what answers the key's later uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed {
    pub model: ModelKey,
    pub key: String,
    pub seq: u64,
    pub offset: u64,
    pub hash: Hash,
}

/// Record headers the relay adds to a reaction: its identity, for consumers that de-duplicate.
pub const HEADER_REACTION_ID: &str = "statefold-reaction-id";
pub const HEADER_REACTION_KIND: &str = "statefold-kind";
pub const HEADER_REACTION_MODEL: &str = "statefold-model";
/// Where a reaction comes from: `TOPIC/PARTITION/OFFSET/INDEX` (the source record and the
/// reaction's place among its diff's). A relay reads it back after a crash to find how far
/// it got in each output partition (Kafka topic names hold no `/`).
pub const HEADER_REACTION_SOURCE: &str = "statefold-reaction-source";

impl Outgoing {
    /// `KIND/SEQ/INDEX/ID`: unique per reaction (the id last, so any id fits).
    pub fn id(&self) -> String {
        format!("{}/{}/{}/{}", self.model.kind, self.seq, self.index, self.model.id)
    }

    /// `TOPIC/PARTITION/OFFSET/INDEX`: the [`HEADER_REACTION_SOURCE`] value.
    pub fn source_place(&self) -> String {
        format!("{}/{}/{}/{}", self.source, self.partition, self.offset, self.index)
    }

    /// The reaction's headers followed by its identity's.
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut headers = self.reaction.headers.clone();
        headers.push((HEADER_REACTION_ID.into(), self.id().into_bytes()));
        headers.push((HEADER_REACTION_KIND.into(), self.model.kind.as_bytes().to_vec()));
        headers.push((HEADER_REACTION_MODEL.into(), self.model.id.as_bytes().to_vec()));
        headers.push((HEADER_REACTION_SOURCE.into(), self.source_place().into_bytes()));
        headers
    }
}

/// One diff as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRecord {
    pub offset: u64,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl From<&Applied> for DiffRecord {
    fn from(applied: &Applied) -> DiffRecord {
        DiffRecord {
            offset: applied.offset,
            timestamp_ms: applied.timestamp_ms,
            headers: applied.headers.clone(),
            payload: applied.payload.to_vec(),
        }
    }
}

impl From<&Record> for DiffRecord {
    fn from(record: &Record) -> DiffRecord {
        DiffRecord {
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            headers: record.headers.clone(),
            payload: record.value.to_vec(),
        }
    }
}

impl DiffRecord {
    /// A record with only an offset and a payload.
    pub fn new(offset: u64, payload: impl Into<Vec<u8>>) -> DiffRecord {
        DiffRecord { offset, timestamp_ms: None, headers: Vec::new(), payload: payload.into() }
    }
}

/// A model's latest saved state and the diffs applied after it, each with the hash the
/// model had before it.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// `None`: the model's empty state (a new model).
    pub snapshot: Option<Vec<u8>>,
    pub tail: Vec<(Hash, DiffRecord)>,
}

/// Why a record was not applied. It is kept (with its offset) and skipped; its partition
/// goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The record key is missing or not a valid model id.
    InvalidKey(String),
    /// A create record for a model that exists.
    Exists,
    /// The reducer refused the diff; the model is as before it.
    Refused(String),
    /// The reducer failed on this diff alone (trap, CPU or memory limit).
    Failed(String),
    /// The record's offset is not after the model's last one: the topic was repartitioned
    /// or rewritten under the model. Never folded out of order.
    OffsetRegressed { head_offset: u64 },
    /// The record's topic feeds no kind.
    UnknownTopic,
    /// The record's value is larger than `diff_bytes_max` (its size).
    TooLarge { bytes: u64 },
    /// A deploy record whose module cannot fold here (not a loadable reducer).
    InvalidDeploy(String),
    /// The record is not on its model's partition ([`partition_of`] its key): a producer
    /// with another partitioner. Folding it would order the model's diffs by fetch timing.
    WrongPartition { expected: u32, partitions: u32 },
    /// The record expected the model at another hash ([`EXPECTED_HASH_HEADER`]): another
    /// diff came first (optimistic concurrency). The message says which hash it is at.
    HashMismatch(String),
    /// A diff with the same idempotency key ([`IDEMPOTENCY_KEY_HEADER`]) was applied to the
    /// model already, at this seq.
    Duplicate { seq: u64 },
}

impl Rejection {
    /// A stable machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Rejection::InvalidKey(_) => Code::InvalidKey,
            Rejection::Exists => Code::ModelExists,
            Rejection::Refused(_) => Code::Refused,
            Rejection::Failed(_) => Code::ReducerFailed,
            Rejection::OffsetRegressed { .. } => Code::OffsetRegressed,
            Rejection::UnknownTopic => Code::UnknownTopic,
            Rejection::TooLarge { .. } => Code::TooLarge,
            Rejection::InvalidDeploy(_) => Code::InvalidDeploy,
            Rejection::WrongPartition { .. } => Code::WrongPartition,
            Rejection::HashMismatch(_) => Code::HashMismatch,
            Rejection::Duplicate { .. } => Code::Duplicate,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Rejection::InvalidKey(reason) => reason.clone(),
            Rejection::Exists => "the model already exists".into(),
            Rejection::Refused(reason) => reason.clone(),
            Rejection::Failed(reason) => reason.clone(),
            Rejection::OffsetRegressed { head_offset } => {
                format!("offset is not after the model's last applied offset {head_offset}")
            }
            Rejection::UnknownTopic => "no kind reads this topic".into(),
            Rejection::TooLarge { bytes } => format!("the diff is {bytes} bytes, more than diff_bytes_max"),
            Rejection::InvalidDeploy(reason) => reason.clone(),
            Rejection::WrongPartition { expected, partitions } => format!(
                "the model belongs to partition {expected} of {partitions} (the Java client's murmur2 partitioner of its key); produce with that partitioner"
            ),
            Rejection::HashMismatch(reason) => reason.clone(),
            Rejection::Duplicate { seq } => {
                format!("a diff with the same idempotency key was applied to the model at seq {seq}")
            }
        }
    }

    /// The number a rejection carries, if any (stored beside the code).
    pub fn detail(&self) -> Option<u64> {
        match self {
            Rejection::OffsetRegressed { head_offset } => Some(*head_offset),
            Rejection::TooLarge { bytes } => Some(*bytes),
            Rejection::WrongPartition { expected, partitions } => {
                Some(u64::from(*partitions) << 32 | u64::from(*expected))
            }
            Rejection::Duplicate { seq } => Some(*seq),
            _ => None,
        }
    }

    /// The inverse of (`code`, `message`, `detail`); `None` for an unknown code.
    pub fn from_parts(code: &str, message: String, detail: Option<u64>) -> Option<Rejection> {
        Some(match Code::from_name(code)? {
            Code::InvalidKey => Rejection::InvalidKey(message),
            Code::ModelExists => Rejection::Exists,
            Code::Refused => Rejection::Refused(message),
            Code::ReducerFailed => Rejection::Failed(message),
            Code::OffsetRegressed => Rejection::OffsetRegressed { head_offset: detail? },
            Code::UnknownTopic => Rejection::UnknownTopic,
            Code::TooLarge => Rejection::TooLarge { bytes: detail? },
            Code::InvalidDeploy => Rejection::InvalidDeploy(message),
            Code::WrongPartition => {
                let detail = detail?;
                Rejection::WrongPartition { expected: detail as u32, partitions: (detail >> 32) as u32 }
            }
            Code::HashMismatch => Rejection::HashMismatch(message),
            Code::Duplicate => Rejection::Duplicate { seq: detail? },
            _ => return None,
        })
    }
}

/// A record that was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub model: Option<ModelKey>,
    /// The record's key, cut to [`REJECTED_KEY_BYTES_MAX`] (it may be what was wrong).
    pub key: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub reason: Rejection,
}

/// Bytes of a rejected record's key that are kept.
pub const REJECTED_KEY_BYTES_MAX: usize = 1024;

impl Rejected {
    pub fn new(record: &Record, model: Option<ModelKey>, reason: Rejection) -> Rejected {
        Rejected {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            model,
            key: record.key.as_ref().map(|k| k[..k.len().min(REJECTED_KEY_BYTES_MAX)].to_vec()),
            timestamp_ms: record.timestamp_ms,
            reason,
        }
    }
}

/// A model's state saved at one of its versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointWrite {
    pub model: ModelKey,
    pub seq: u64,
    pub offset: u64,
    pub hash: Hash,
    pub reducer: ModuleHash,
    pub snapshot: Vec<u8>,
}

/// Old diffs and checkpoints of a model that retention lets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    pub model: ModelKey,
    /// Diffs at or before this offset go.
    pub diffs_through: u64,
    /// Checkpoints before this offset go.
    pub checkpoints_before: u64,
}

/// Everything one batch changes, for the store to commit atomically.
#[derive(Debug, Default)]
pub struct Folded {
    /// Applied diffs, in record order.
    pub applied: Vec<Applied>,
    /// Models created by this batch (by a create record or their first diff).
    pub created: Vec<ModelKey>,
    pub rejected: Vec<Rejected>,
    pub checkpoints: Vec<CheckpointWrite>,
    pub prunes: Vec<Prune>,
    /// The final head of every model the batch touched whose stored head it changes beyond
    /// what its diffs say: created, checkpointed, pruned, switched versions, rebuilt.
    pub heads: Vec<(ModelKey, Head)>,
    /// The final head of every other model the batch applied diffs to: it differs from the
    /// stored head only in seq, offset, hash and tail bytes, which its last diff (in this
    /// batch) records. The store does not write it; a read advances the stored head by the
    /// model's last diff (`Reader::head`). One put per diff fewer.
    pub advanced: Vec<(ModelKey, Head)>,
    /// Models whose stored history a replay rewrote: their old diffs, checkpoints and
    /// hashes go before this batch's writes for them.
    pub replaced: Vec<ModelKey>,
    /// The progress of a replay, committed with the models it rebuilt.
    pub replay: Option<ReplayJob>,
    /// Deploy records folded, in record order.
    pub deploys: Vec<DeployFolded>,
    /// The versions of every kind a deploy record changed, as they stand after the batch.
    pub kind_versions: Vec<(Arc<str>, KindVersions)>,
    /// What became of each record of the batch, for the partitions' digests (see
    /// the source's attestations); in no particular order.
    pub marks: Vec<Mark>,
    /// Records of the batch folded: all, or up to and including the first replay record
    /// (the caller commits, then folds the rest).
    pub consumed: usize,
    /// Replay records this batch folded: the kind, and the version it rebuilds with.
    /// Replay records folded: (kind, the version that rebuilds, who asked for it).
    pub replays: Vec<(Arc<str>, ModuleHash, Option<String>)>,
    /// Reactions the applied diffs emitted, in record order: the outbox's new entries.
    pub outbox: Vec<Outgoing>,
    /// Diffs applied under an idempotency key.
    pub keyed: Vec<Keyed>,
    /// Chunks of modules deploy records carry in parts, kept until their deploy record.
    pub chunks: Vec<DeployChunk>,
    /// Modules whose deploy record was folded: their chunks are deleted (after this
    /// batch's own chunks are written).
    pub chunks_done: Vec<ModuleHash>,
}

/// What became of one record, the same on every replica that folds it the same way:
/// what happened, the model's seq after it (a replay's generation), and the version that
/// made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub topic: Arc<str>,
    pub partition: u32,
    pub offset: u64,
    pub what: Became,
    pub seq: u64,
    pub by: Option<ModuleHash>,
}

/// What became of a record (see [`Mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Became {
    Applied,
    Created,
    Deployed,
    /// A chunk of a module (see [`DEPLOY_CHUNK_HEADER`]): kept for its deploy record.
    DeployChunk,
    Replay,
    /// Not applied: the rejection's code.
    Rejected(&'static str),
}

impl Became {
    /// The stable name, as digests hash it: `applied`, `created`, `deployed`, `replay`,
    /// or the rejection's code.
    pub fn as_str(self) -> &'static str {
        match self {
            Became::Applied => "applied",
            Became::Created => "created",
            Became::Deployed => "deployed",
            Became::DeployChunk => "deploy_chunk",
            Became::Replay => "replay",
            Became::Rejected(code) => code,
        }
    }
}

impl Folded {
    /// Records that `record` was not applied.
    pub fn reject(&mut self, rejected: Rejected) {
        let (topic, partition, offset) = (rejected.topic.clone(), rejected.partition, rejected.offset);
        self.marks.push(Mark {
            topic,
            partition,
            offset,
            what: Became::Rejected(rejected.reason.code().as_str()),
            seq: 0,
            by: None,
        });
        self.rejected.push(rejected);
    }

    /// Records an outcome of `record` (`what` happened, the model's seq after it) and the
    /// version that made it. Not the model's hash: the record (in the digest by its
    /// offset) and the seq determine it, except where a replay rebased the chain, which a
    /// replica does on its own and must not count as diverging.
    pub fn mark(&mut self, record: &Record, what: Became, seq: u64, by: ModuleHash) {
        let (topic, partition, offset) = (record.topic.clone(), record.partition, record.offset);
        self.marks.push(Mark { topic, partition, offset, what, seq, by: Some(by) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_the_java_clients_partitioner() {
        // Utils.murmur2 of the keys' UTF-8 bytes, as the Java client computes them.
        let java = [
            ("0", 971027396),
            ("1", -1993445489),
            ("128", -326012175),
            ("2187", -1508407203),
            ("16384", -325739742),
            ("78125", -1654490814),
        ];
        for (key, hash) in java {
            let positive = (hash as u32) & 0x7fff_ffff;
            for partitions in [1, 3, 7, 12] {
                assert_eq!(partition_of(key.as_bytes(), partitions), positive % partitions, "{key}");
            }
        }
    }
}
