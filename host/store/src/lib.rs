//! The RocksDB store: column families keyed by offset (see ARCHITECTURE.md, "Storage").
//!
//! One [`Store::commit`] per consumed batch writes the diffs, heads, hash index,
//! checkpoints, rejections and the source position in ONE `WriteBatch`, so a crash at any
//! instant neither loses nor repeats a diff. What is written is checked before the batch
//! is built; what is read back is checked after decoding. A value that fails those checks
//! is corruption: [`StoreError::Corrupt`], which stops the process.
//!
//! The embedded log (`log` CF) is a durable append-only log in the same database.
//!
//! Here: opening, the registry of reducer versions and replays, source positions. `commit`
//! (the WriteBatch and its checks), `reader` (consistent reads, the engine's `View`),
//! `log` (the embedded log), `records` (value formats), `codec` (keys, strict decoding).

mod codec;
mod commit;
mod log;
mod outbox;
mod reader;
mod records;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};

use codec::{
    Dec, Enc, FORMAT, HEAD_BASE, Malformed, head_key, key_offset, model_prefix, offset_key, partition_prefix,
    progress_key, progress_prefix,
};
pub use outbox::LogAppend;
pub use reader::Reader;
pub use records::StoredRejection;
use records::*;
use statefold_core::chain::Hash;
use statefold_core::fold::{History, View, ViewError};
use statefold_core::model::{
    Applied, Folded, Head, Keyed, KindVersions, ModelKey, ModuleHash, Record, Rejected, Rejection, ReplayJob,
    VersionRecord, VersionStatus, Witness,
};
use statefold_core::model::{Checkpoint, DiffRecord};

const DIFFS: &str = "diffs";
const STATES: &str = "states";
const HEADS: &str = "heads";
const HASHES: &str = "hashes";
const PROGRESS: &str = "progress";
const REDUCERS: &str = "reducers";
const LOG: &str = "log";
const REJECTS: &str = "rejects";
const OUTBOX: &str = "outbox";
const KEYS: &str = "keys";
const FAMILIES: [&str; 10] = [DIFFS, STATES, HEADS, HASHES, PROGRESS, REDUCERS, LOG, REJECTS, OUTBOX, KEYS];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value failed its checks. Not recoverable by retrying: stop.
    #[error("store corrupted: {what} at key {key}: {detail}")]
    Corrupt { what: &'static str, key: String, detail: String },
    /// A write that would break an invariant (a bug, caught before it is stored).
    #[error("refusing to store an invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}

impl StoreError {
    fn corrupt(what: &'static str, key: &[u8], detail: impl ToString) -> StoreError {
        StoreError::Corrupt {
            what,
            key: String::from_utf8_lossy(key).escape_debug().to_string(),
            detail: detail.to_string(),
        }
    }

    /// Whether the process must stop (corruption or an invariant broken).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, StoreError::Rocks(_))
    }
}

/// Settings of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// fsync the WAL on every commit and append (survives power loss, not only a crash).
    pub fsync: bool,
    /// RocksDB's memtable size per column family (`write_buffer_size`).
    pub write_buffer_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions { fsync: false, write_buffer_bytes: 4 << 20 }
    }
}

/// Where a hash of a model stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAt {
    /// The model's hash before its first diff.
    Genesis,
    /// After the diff with this seq and offset.
    Diff { seq: u64, offset: u64 },
}

/// A run of stored diffs, summed up by [`Reader::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Run {
    pub len: usize,
    /// The last diff's hash (`None`: an empty run).
    pub last: Option<Hash>,
    /// The reducers that applied the diffs, in order of first use.
    pub reducers: Vec<ModuleHash>,
}

/// A source position: the next offset to read from (topic, partition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: u32,
    pub next_offset: u64,
    /// The partition's digest after the records before `next_offset` (see
    /// the source's attestations); `None` where none is kept.
    pub digest: Option<Hash>,
    /// The last record folded from the partition (`None`: not known, e.g. stored before
    /// witnesses were kept).
    pub witness: Option<Witness>,
}

/// The RocksDB store.
pub struct Store {
    db: DB,
    write: WriteOptions,
    /// Next offset of each embedded-log partition; the lock also orders appends.
    log_ends: Mutex<HashMap<(String, u32), u64>>,
}

/// What one commit wrote (for metrics, and for the benchmark that writes the same bytes
/// to RocksDB directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Puts and range deletes.
    pub entries: u64,
    /// RocksDB's size of the write batch.
    pub bytes: u64,
}

impl Store {
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        db_options.increase_parallelism(2);
        let families = FAMILIES.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            // Small memtables: a commit inserts each key into a skip list, a search from its
            // top through memory the caches do not hold; at RocksDB's default 64 MiB that
            // search was over half of the fold thread's time (BENCHMARKS.md).
            cf.set_write_buffer_size(options.write_buffer_bytes);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&db_options, path, families)?;
        let mut write = WriteOptions::default();
        write.set_sync(options.fsync);
        Ok(Store { db, write, log_ends: Mutex::new(HashMap::new()) })
    }

    /// Opens a store for reading only, beside the server that may be writing it (RocksDB
    /// takes no lock for this): what it reads is the store as of this call.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(false);
        let db = DB::open_cf_for_read_only(&db_options, path, FAMILIES, false)?;
        Ok(Store { db, write: WriteOptions::default(), log_ends: Mutex::new(HashMap::new()) })
    }

    /// Every stored position of a source: (topic, partition, next offset).
    pub fn positions(&self, source: &str) -> Result<Vec<Position>, StoreError> {
        let mut prefix = source.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(PROGRESS), IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (key, value) = item?;
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else { break };
            let mut parts = rest.splitn(2, |b| *b == 0);
            let topic = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
            let partition = parts.next().and_then(|p| <[u8; 4]>::try_from(p).ok()).map(u32::from_be_bytes);
            let Some(partition) = partition else {
                return Err(StoreError::corrupt(PROGRESS, &key, "not source ‖ 0 ‖ topic ‖ 0 ‖ partition"));
            };
            let (next_offset, digest, witness) = decode(PROGRESS, &key, &value, decode_progress)?;
            out.push(Position { topic, partition, next_offset, digest, witness });
        }
        Ok(out)
    }

    /// Replaces the stored history and head of `models` with `from`'s (a repair by
    /// `statefold verify`), in one WriteBatch. A model `from` does not have is deleted.
    pub fn replace_models(&self, from: &Store, models: &[ModelKey]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for model in models {
            let prefix = model_prefix(&model.kind, &model.id);
            let end = prefix_end(&prefix);
            for cf in [DIFFS, STATES, HASHES, KEYS] {
                batch.delete_range_cf(self.cf(cf), &prefix, &end);
                let iter = from.db.iterator_cf(from.cf(cf), IteratorMode::From(&prefix, rocksdb::Direction::Forward));
                for item in iter {
                    let (key, value) = item?;
                    if !key.starts_with(&prefix) {
                        break;
                    }
                    batch.put_cf(self.cf(cf), key, value);
                }
            }
            let head = head_key(&model.kind, &model.id);
            match from.db.get_cf(from.cf(HEADS), &head)? {
                Some(value) => batch.put_cf(self.cf(HEADS), head, value),
                None => batch.delete_cf(self.cf(HEADS), head),
            }
        }
        self.db.write_opt(batch, &self.write)?;
        Ok(())
    }

    fn cf(&self, name: &'static str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every column family is created at open")
    }

    /// Writes reducer version records, and a module's bytes, atomically.
    pub fn put_versions(
        &self,
        records: &[VersionRecord],
        module: Option<(ModuleHash, &[u8])>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        if let Some((id, bytes)) = module {
            batch.put_cf(self.cf(REDUCERS), module_key(&id), bytes);
        }
        for record in records {
            batch.put_cf(self.cf(REDUCERS), version_key(&record.name, &record.id), encode_version(record));
        }
        self.db.write_opt(batch, &self.write)?;
        Ok(())
    }

    /// Records a kind's versions (its first start; deploy records change them in commits).
    pub fn put_kind_versions(&self, kind: &str, versions: &KindVersions) -> Result<(), StoreError> {
        let value = encode_kind_versions(versions);
        self.db.put_cf_opt(self.cf(REDUCERS), kind_versions_key(kind), value, &self.write)?;
        Ok(())
    }

    /// Records a replay as it starts (later progress is committed with the models it rebuilds).
    pub fn put_replay(&self, job: &ReplayJob) -> Result<(), StoreError> {
        self.db.put_cf_opt(self.cf(REDUCERS), replay_key(&job.kind), encode_replay(job), &self.write)?;
        Ok(())
    }

    /// Deletes version records (old refusals beyond the limit).
    pub fn delete_versions(&self, name: &str, ids: &[ModuleHash]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.cf(REDUCERS), version_key(name, id));
        }
        self.db.write_opt(batch, &self.write)?;
        Ok(())
    }

    /// A stored module (every version that was ever active is kept).
    pub fn module(&self, id: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(REDUCERS), module_key(id))?)
    }

    /// The stored position of a source's partition: the next offset to read.
    pub fn position(&self, source: &str, topic: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        Ok(self.progress(source, topic, partition)?.map(|p| p.next_offset))
    }

    /// The stored position of a source's partition, with its digest and witness.
    pub fn progress(&self, source: &str, topic: &str, partition: u32) -> Result<Option<Position>, StoreError> {
        let key = progress_key(source, topic, partition);
        let Some(value) = self.db.get_cf(self.cf(PROGRESS), &key)? else { return Ok(None) };
        let (next_offset, digest, witness) = decode(PROGRESS, &key, &value, decode_progress)?;
        Ok(Some(Position { topic: topic.to_owned(), partition, next_offset, digest, witness }))
    }

    /// The number of partitions `topic` had when this store first folded it from `source`.
    pub fn topic_partitions(&self, source: &str, topic: &str) -> Result<Option<u32>, StoreError> {
        let key = topic_key(source, topic);
        let Some(value) = self.db.get_cf(self.cf(REDUCERS), &key)? else { return Ok(None) };
        decode(REDUCERS, &key, &value, |d| d.u32()).map(Some)
    }

    /// Records the partition count of a topic this store starts to fold.
    pub fn put_topic_partitions(&self, source: &str, topic: &str, partitions: u32) -> Result<(), StoreError> {
        let value = Enc::value().u32(partitions).done();
        self.db.put_cf_opt(self.cf(REDUCERS), topic_key(source, topic), value, &self.write)?;
        Ok(())
    }

    /// Forgets everything folded for `kind` (fed by `topic`): its models, the topic's
    /// rejections, positions and partition count, the kind's versions and replay. Its next
    /// start folds the topic from its first record with the configured reducer, as for a
    /// new kind. In one WriteBatch. For an operator (`statefold reset`), with the server
    /// stopped.
    pub fn reset_kind(&self, kind: &str, topic: &str) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let models = [kind.as_bytes(), &[0]].concat();
        for cf in [DIFFS, STATES, HEADS, HASHES, KEYS] {
            batch.delete_range_cf(self.cf(cf), &models, &prefix_end(&models));
        }
        let rejections = [topic.as_bytes(), &[0]].concat();
        batch.delete_range_cf(self.cf(REJECTS), &rejections, &prefix_end(&rejections));
        batch.delete_range_cf(self.cf(OUTBOX), &rejections, &prefix_end(&rejections));
        for source in self.sources()? {
            let positions = progress_prefix(&source, topic);
            batch.delete_range_cf(self.cf(PROGRESS), &positions, &prefix_end(&positions));
            batch.delete_cf(self.cf(REDUCERS), topic_key(&source, topic));
        }
        batch.delete_cf(self.cf(REDUCERS), kind_versions_key(kind));
        batch.delete_cf(self.cf(REDUCERS), replay_key(kind));
        self.db.write_opt(batch, &self.write)?;
        Ok(())
    }

    /// The sources positions are stored for (not the relay's: it reads the outbox, not a
    /// log, and a reset of a kind keeps it, so that refolding emits nothing twice).
    pub fn sources(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for item in self.db.iterator_cf(self.cf(PROGRESS), IteratorMode::Start) {
            let (key, _) = item?;
            let name = key.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).into_owned();
            // Keys are sorted: a source's positions are adjacent.
            if out.last() != Some(&name) && name != outbox::RELAY_SOURCE {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// A consistent view for reads that span several keys.
    pub fn read(&self) -> Reader<'_> {
        Reader { store: self, snapshot: self.db.snapshot() }
    }

    // ---- embedded log ----
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_read_those_stored_before_witnesses() {
        let digest = Hash::genesis("k", "m");
        let witness = Witness { offset: 41, fingerprint: [7; 16] };
        for (digest, witness) in
            [(None, None), (Some(digest), None), (None, Some(witness)), (Some(digest), Some(witness))]
        {
            let position = Position { topic: "t".into(), partition: 1, next_offset: 42, digest, witness };
            let bytes = encode_progress(&position);
            assert_eq!(decode(PROGRESS, b"k", &bytes, decode_progress).unwrap(), (42, digest, witness));
        }
        // The layouts before witnesses: the next offset, then the digest if kept.
        let old = Enc::value().u64(42).done();
        assert_eq!(decode(PROGRESS, b"k", &old, decode_progress).unwrap(), (42, None, None));
        let old = Enc::value().u64(42).hash(&digest).done();
        assert_eq!(decode(PROGRESS, b"k", &old, decode_progress).unwrap(), (42, Some(digest), None));
        let truncated = &encode_progress(&Position {
            topic: "t".into(),
            partition: 1,
            next_offset: 42,
            digest: None,
            witness: Some(witness),
        })[..20];
        assert!(matches!(decode(PROGRESS, b"k", truncated, decode_progress), Err(StoreError::Corrupt { .. })));
    }

    /// A batch that only applies diffs leaves the stored head; a read brings it to the last
    /// diff, checked.
    #[test]
    fn a_head_left_unwritten_reads_back_from_its_last_diff() {
        let dir = std::env::temp_dir().join(format!("statefold-advanced-{}", std::process::id()));
        let store = Store::open(&dir, &StoreOptions::default()).unwrap();
        let model = ModelKey::new("counter", "m1");
        let reducer = ModuleHash([7; 32]);
        let mut head = Head::new(&model, reducer, 0, 0);
        let diffs = |head: &mut Head, offsets: std::ops::Range<u64>| {
            let mut applied = Vec::new();
            for offset in offsets {
                let payload = Bytes::from(format!("{{\"add\":{offset}}}"));
                let tail_bytes = head.tail_bytes + payload.len() as u64;
                let hash = head.hash.next(&payload);
                applied.push(Applied {
                    model: model.clone(),
                    offset,
                    seq: head.seq + 1,
                    prev: head.hash,
                    hash,
                    reducer,
                    timestamp_ms: None,
                    headers: Vec::new(),
                    payload,
                    tail_bytes,
                });
                (head.seq, head.offset, head.hash, head.tail_bytes) = (head.seq + 1, Some(offset), hash, tail_bytes);
            }
            applied
        };
        let first =
            Folded { applied: diffs(&mut head, 0..2), heads: vec![(model.clone(), head.clone())], ..Folded::default() };
        store.commit(&first, &[]).unwrap();
        let written = head.clone();
        let second = Folded {
            applied: diffs(&mut head, 2..5),
            advanced: vec![(model.clone(), head.clone())],
            ..Folded::default()
        };
        store.commit(&second, &[]).unwrap();
        let raw = store.db.get_cf(store.cf(HEADS), head_key("counter", "m1")).unwrap().unwrap();
        assert_eq!(decode_head(b"k", &raw).unwrap(), written, "the stored head is the first batch's");
        assert_eq!(store.read().head(&model).unwrap(), Some(head.clone()));
        assert_eq!(store.read().list("counter", None, 10).unwrap(), [("m1".to_owned(), head.clone())]);
        // An unwritten head must be where the batch's last diff leaves it.
        let mut wrong = head.clone();
        let mut bad = Folded {
            applied: diffs(&mut wrong, 5..6),
            advanced: vec![(model.clone(), head.clone())],
            ..Folded::default()
        };
        assert!(matches!(store.commit(&bad, &[]), Err(StoreError::Invalid { .. })));
        bad.advanced[0].1 = Head { tail_bytes: 0, ..wrong.clone() };
        assert!(matches!(store.commit(&bad, &[]), Err(StoreError::Invalid { .. })));
        // A diff after the stored head without tail bytes (as stored before they were), or
        // not advancing it: corruption, never a guess.
        let prefix = model_prefix("counter", "m1");
        let mut old = encode_diff(&bad.applied[0]);
        old.truncate(old.len() - 8);
        store.db.put_cf(store.cf(DIFFS), offset_key(&prefix, 5), &old).unwrap();
        assert!(matches!(store.read().head(&model), Err(StoreError::Corrupt { .. })));
        let behind = Applied { seq: 1, ..bad.applied[0].clone() };
        store.db.put_cf(store.cf(DIFFS), offset_key(&prefix, 5), encode_diff(&behind)).unwrap();
        assert!(matches!(store.read().head(&model), Err(StoreError::Corrupt { .. })));
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn head_round_trips_and_checks() {
        let model = ModelKey::new("counter", "m1");
        let head = Head {
            seq: 5,
            offset: Some(40),
            hash: model.genesis().next(b"x"),
            reducer: ModuleHash([7; 32]),
            checkpoints: vec![(2, 10), (4, 30)],
            pruned_through: Some(10),
            partition: Some(2),
            replayed: 1,
            checkpoint_bytes: 300,
            tail_bytes: 42,
            run_since: Some(3),
        };
        let bytes = encode_head(&head);
        assert_eq!(decode_head(b"k", &bytes).unwrap(), head);
        // Stored as a base, which a server from before bases refuses (an unknown format) ...
        assert!(Dec::value(&bytes).is_err());
        // ... and a whole head such a server stored still reads.
        let whole = [&[FORMAT][..], &bytes[1..]].concat();
        assert_eq!(decode_head(b"k", &whole).unwrap(), head);
        // A head stored before runs were recorded: not known.
        let old = decode_head(b"k", &bytes[..bytes.len() - 9]).unwrap();
        assert_eq!(old, Head { run_since: None, ..head.clone() });
        // ... nor checkpoint sizes: sizes not known (0).
        let old = decode_head(b"k", &bytes[..bytes.len() - 9 - 16]).unwrap();
        assert_eq!(old, Head { checkpoint_bytes: 0, tail_bytes: 0, run_since: None, ..head.clone() });
        // Truncated, trailing bytes, unknown format: corruption, never a default.
        for bad in [&bytes[..bytes.len() - 1], &[bytes.as_slice(), &[0]].concat()[..], &[9u8, 1, 2][..]] {
            assert!(matches!(decode_head(b"k", bad), Err(StoreError::Corrupt { .. })));
        }
        let inconsistent = Head { seq: 0, ..head };
        assert!(matches!(decode_head(b"k", &encode_head(&inconsistent)), Err(StoreError::Corrupt { .. })));
    }
}
