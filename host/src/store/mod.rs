//! The RocksDB store: column families keyed by offset (see ARCHITECTURE.md, "Storage").
//!
//! One [`Store::commit`] per consumed batch writes the diffs, heads, hash index,
//! checkpoints, rejections and the source position in ONE `WriteBatch`, so a crash at any
//! instant neither loses nor repeats a diff. What is written is checked before the batch
//! is built; what is read back is checked after decoding. A value that fails those checks
//! is corruption: [`StoreError::Corrupt`], which stops the process.
//!
//! The embedded log (`log` CF) is a durable append-only log in the same database.

mod codec;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};

use crate::chain::Hash;
use crate::fold::{History, View, ViewError};
use crate::model::{
    Applied, Folded, Head, KindVersions, ModelKey, ModuleHash, Record, Rejected, Rejection, ReplayJob, VersionRecord,
    VersionStatus,
};
use crate::model::{Checkpoint, DiffRecord};
use codec::{Dec, Enc, Malformed, head_key, key_offset, model_prefix, offset_key, partition_prefix, progress_key};

const DIFFS: &str = "diffs";
const STATES: &str = "states";
const HEADS: &str = "heads";
const HASHES: &str = "hashes";
const PROGRESS: &str = "progress";
const REDUCERS: &str = "reducers";
const LOG: &str = "log";
const REJECTS: &str = "rejects";
const FAMILIES: [&str; 8] = [DIFFS, STATES, HEADS, HASHES, PROGRESS, REDUCERS, LOG, REJECTS];

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
    /// [`crate::source::attest`]); `None` where none is kept.
    pub digest: Option<Hash>,
}

/// The RocksDB store.
pub struct Store {
    db: DB,
    write: WriteOptions,
    /// Next offset of each embedded-log partition; the lock also orders appends.
    log_ends: Mutex<HashMap<(String, u32), u64>>,
    written: Written,
}

/// What the fold's commits wrote (for metrics, and for the benchmark that writes the same
/// bytes to RocksDB directly).
#[derive(Debug, Default)]
pub struct Written {
    pub commits: AtomicU64,
    /// Puts and range deletes.
    pub entries: AtomicU64,
    /// RocksDB's size of the write batches.
    pub bytes: AtomicU64,
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
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&db_options, path, families)?;
        let mut write = WriteOptions::default();
        write.set_sync(options.fsync);
        Ok(Store { db, write, log_ends: Mutex::new(HashMap::new()), written: Written::default() })
    }

    /// Opens a store for reading only, beside the server that may be writing it (RocksDB
    /// takes no lock for this): what it reads is the store as of this call.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let mut db_options = Options::default();
        db_options.create_if_missing(false);
        let db = DB::open_cf_for_read_only(&db_options, path, FAMILIES, false)?;
        Ok(Store {
            db,
            write: WriteOptions::default(),
            log_ends: Mutex::new(HashMap::new()),
            written: Written::default(),
        })
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
            let (next_offset, digest) = decode(PROGRESS, &key, &value, decode_progress)?;
            out.push(Position { topic, partition, next_offset, digest });
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
            for cf in [DIFFS, STATES, HASHES] {
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

    /// Commits one folded batch and the source positions after it, atomically. Returns the
    /// bytes written (the WriteBatch's size).
    pub fn commit(&self, folded: &Folded, positions: &[(String, Position)]) -> Result<u64, StoreError> {
        self.commit_with(folded, positions, &[])
    }

    /// [`Store::commit`], with the version records the batch's deploy records make.
    pub fn commit_with(
        &self,
        folded: &Folded,
        positions: &[(String, Position)],
        versions: &[VersionRecord],
    ) -> Result<u64, StoreError> {
        check_folded(folded)?;
        let mut batch = WriteBatch::default();
        for record in versions {
            batch.put_cf(self.cf(REDUCERS), version_key(&record.name, &record.id), encode_version(record));
        }
        for model in &folded.replaced {
            // A replayed model's history is rewritten whole: what it had goes first.
            let prefix = model_prefix(&model.kind, &model.id);
            let end = prefix_end(&prefix);
            for cf in [DIFFS, STATES, HASHES] {
                batch.delete_range_cf(self.cf(cf), &prefix, &end);
            }
        }
        for applied in &folded.applied {
            let prefix = model_prefix(&applied.model.kind, &applied.model.id);
            batch.put_cf(self.cf(DIFFS), offset_key(&prefix, applied.offset), encode_diff(applied));
            let mut key = prefix;
            key.extend_from_slice(applied.hash.as_bytes());
            batch.put_cf(self.cf(HASHES), key, Enc::value().u64(applied.seq).u64(applied.offset).done());
        }
        for cp in &folded.checkpoints {
            let prefix = model_prefix(&cp.model.kind, &cp.model.id);
            let value = Enc::value().u64(cp.seq).hash(&cp.hash).module(&cp.reducer).bytes(&cp.snapshot).done();
            batch.put_cf(self.cf(STATES), offset_key(&prefix, cp.offset), value);
            // A checkpoint's hash resolves even where its diff is gone (a replay's base).
            let mut key = prefix;
            key.extend_from_slice(cp.hash.as_bytes());
            batch.put_cf(self.cf(HASHES), key, Enc::value().u64(cp.seq).u64(cp.offset).done());
        }
        for prune in &folded.prunes {
            let prefix = model_prefix(&prune.model.kind, &prune.model.id);
            batch.delete_range_cf(self.cf(DIFFS), offset_key(&prefix, 0), offset_key(&prefix, prune.diffs_through + 1));
            batch.delete_range_cf(
                self.cf(STATES),
                offset_key(&prefix, 0),
                offset_key(&prefix, prune.checkpoints_before),
            );
        }
        for (model, head) in &folded.heads {
            batch.put_cf(self.cf(HEADS), head_key(&model.kind, &model.id), encode_head(head));
        }
        for rejected in &folded.rejected {
            let key = offset_key(&partition_prefix(&rejected.topic, rejected.partition), rejected.offset);
            batch.put_cf(self.cf(REJECTS), key, encode_reject(rejected));
        }
        if let Some(job) = &folded.replay {
            batch.put_cf(self.cf(REDUCERS), replay_key(&job.kind), encode_replay(job));
        }
        let mut modules: Vec<ModuleHash> = Vec::new();
        for deploy in &folded.deploys {
            if !modules.contains(&deploy.version) {
                modules.push(deploy.version);
                batch.put_cf(self.cf(REDUCERS), module_key(&deploy.version), &deploy.module);
            }
        }
        for (kind, versions) in &folded.kind_versions {
            batch.put_cf(self.cf(REDUCERS), kind_versions_key(kind), encode_kind_versions(versions));
        }
        for (source, position) in positions {
            let key = progress_key(source, &position.topic, position.partition);
            let mut value = Enc::value();
            value.u64(position.next_offset);
            if let Some(digest) = &position.digest {
                value.hash(digest);
            }
            batch.put_cf(self.cf(PROGRESS), key, value.done());
        }
        let (entries, bytes) = (batch.len() as u64, batch.size_in_bytes() as u64);
        self.db.write_opt(batch, &self.write)?;
        self.written.commits.fetch_add(1, Ordering::Relaxed);
        self.written.entries.fetch_add(entries, Ordering::Relaxed);
        self.written.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(bytes)
    }

    /// What the fold's commits have written since the store was opened.
    pub fn written(&self) -> &Written {
        &self.written
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
        Ok(self.progress(source, topic, partition)?.map(|(next, _)| next))
    }

    /// The stored position of a source's partition and its digest.
    pub fn progress(
        &self,
        source: &str,
        topic: &str,
        partition: u32,
    ) -> Result<Option<(u64, Option<Hash>)>, StoreError> {
        let key = progress_key(source, topic, partition);
        let Some(value) = self.db.get_cf(self.cf(PROGRESS), &key)? else { return Ok(None) };
        decode(PROGRESS, &key, &value, decode_progress).map(Some)
    }

    /// The sources positions are stored for.
    pub fn sources(&self) -> Result<Vec<String>, StoreError> {
        let mut out: Vec<String> = Vec::new();
        for item in self.db.iterator_cf(self.cf(PROGRESS), IteratorMode::Start) {
            let (key, _) = item?;
            let name = key.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).into_owned();
            // Keys are sorted: a source's positions are adjacent.
            if out.last() != Some(&name) {
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

    /// Appends a record to the embedded log; returns its offset.
    pub fn append(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        value: &[u8],
        timestamp_ms: i64,
        headers: &[(String, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let mut ends = self.log_ends.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (topic.to_owned(), partition);
        let offset = match ends.get(&slot) {
            Some(end) => *end,
            None => self.log_end_from_disk(topic, partition)?,
        };
        let record = Enc::value().opt_bytes(Some(key)).opt_i64(Some(timestamp_ms)).headers(headers).bytes(value).done();
        let log_key = offset_key(&partition_prefix(topic, partition), offset);
        self.db.put_cf_opt(self.cf(LOG), log_key, record, &self.write)?;
        ends.insert(slot, offset + 1);
        Ok(offset)
    }

    /// The next offset the embedded log will assign in a partition.
    pub fn log_end(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        let ends = self.log_ends.lock().unwrap_or_else(|p| p.into_inner());
        match ends.get(&(topic.to_owned(), partition)) {
            Some(end) => Ok(*end),
            None => self.log_end_from_disk(topic, partition),
        }
    }

    fn log_end_from_disk(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        let prefix = partition_prefix(topic, partition);
        let upper = offset_key(&prefix, u64::MAX);
        let mut iter = self.db.iterator_cf(self.cf(LOG), IteratorMode::From(&upper, Direction::Reverse));
        match iter.next().transpose()? {
            Some((key, _)) if key.starts_with(&prefix) && key.len() == prefix.len() + 8 => {
                let offset = key_offset(&key).map_err(|m| StoreError::corrupt("log key", &key, m.0))?;
                Ok(offset + 1)
            }
            _ => Ok(0),
        }
    }

    /// Up to `max` records of an embedded-log partition from offset `from`.
    pub fn read_log(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Record>, StoreError> {
        let prefix = partition_prefix(topic, partition);
        let start = offset_key(&prefix, from);
        let topic: std::sync::Arc<str> = topic.into();
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(LOG), IteratorMode::From(&start, Direction::Forward));
        for (expected, item) in (from..).zip(iter) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || out.len() >= max {
                break;
            }
            let offset = key_offset(&key).map_err(|m| StoreError::corrupt("log key", &key, m.0))?;
            if offset != expected {
                return Err(StoreError::corrupt("log", &key, format!("offset {offset} where {expected} was due")));
            }
            let record = decode(LOG, &key, &value, |d| {
                let key = d.opt_bytes()?.map(<[u8]>::to_vec);
                let timestamp_ms = d.opt_i64()?;
                let headers = d.headers()?;
                let value = Bytes::copy_from_slice(d.bytes()?);
                Ok(Record { topic: topic.clone(), partition, offset, key, value, timestamp_ms, headers })
            })?;
            out.push(record);
        }
        Ok(out)
    }
}

impl View for Store {
    fn head(&self, model: &ModelKey) -> Result<Option<Head>, ViewError> {
        Ok(self.read().head(model)?)
    }

    fn checkpoint(&self, model: &ModelKey, head: &Head) -> Result<History, ViewError> {
        Ok(self.read().checkpoint_before(model, head.checkpoint(), None)?)
    }
}

/// Reads at one consistent point in time.
pub struct Reader<'a> {
    store: &'a Store,
    snapshot: rocksdb::Snapshot<'a>,
}

impl Reader<'_> {
    fn options(&self) -> ReadOptions {
        let mut options = ReadOptions::default();
        options.set_snapshot(&self.snapshot);
        options
    }

    pub fn head(&self, model: &ModelKey) -> Result<Option<Head>, StoreError> {
        let key = head_key(&model.kind, &model.id);
        let Some(value) = self.snapshot.get_cf(self.store.cf(HEADS), &key)? else { return Ok(None) };
        decode_head(&key, &value).map(Some)
    }

    /// Models of a kind, ordered by id, after `after`.
    pub fn list(&self, kind: &str, after: Option<&str>, max: usize) -> Result<Vec<(String, Head)>, StoreError> {
        let prefix = head_key(kind, "");
        let start = head_key(kind, after.unwrap_or(""));
        self.page(HEADS, &prefix, &start, max, |key, value| {
            let id = String::from_utf8(key[prefix.len()..].to_vec())
                .map_err(|_| StoreError::corrupt("head key", key, "id is not UTF-8"))?;
            if after == Some(id.as_str()) {
                return Ok(None);
            }
            Ok(Some((id, decode_head(key, value)?)))
        })
    }

    /// Up to `max` entries of `cf` from `start` on while keys have `prefix`, each decoded
    /// by `decode` (which skips one by answering `None`).
    fn page<T>(
        &self,
        cf: &'static str,
        prefix: &[u8],
        start: &[u8],
        max: usize,
        mut decode: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        let iter = self.store.db.iterator_cf_opt(
            self.store.cf(cf),
            self.options(),
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(prefix) || out.len() >= max {
                break;
            }
            out.extend(decode(&key, &value)?);
        }
        Ok(out)
    }

    /// Models of a kind.
    pub fn count(&self, kind: &str) -> Result<u64, StoreError> {
        let mut prefix = kind.as_bytes().to_vec();
        prefix.push(0);
        let mut n = 0u64;
        self.page(HEADS, &prefix, &prefix, usize::MAX, |_, _| {
            n += 1;
            Ok(None::<()>)
        })?;
        Ok(n)
    }

    /// Every recorded version of a reducer, by id.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionRecord>, StoreError> {
        let mut prefix = vec![b'v'];
        prefix.extend_from_slice(name.as_bytes());
        prefix.push(0);
        self.page(REDUCERS, &prefix, &prefix, usize::MAX, |key, value| decode_version(name, key, value).map(Some))
    }

    /// Which version folds each partition of a kind (`None` before its first start).
    pub fn kind_versions(&self, kind: &str) -> Result<Option<KindVersions>, StoreError> {
        let key = kind_versions_key(kind);
        let Some(value) = self.snapshot.get_cf(self.store.cf(REDUCERS), &key)? else { return Ok(None) };
        decode(REDUCERS, &key, &value, |d| {
            let genesis = d.module()?;
            let partition_count = d.u32()?;
            let mut partitions = std::collections::BTreeMap::new();
            for _ in 0..d.u32()? {
                let partition = d.u32()?;
                partitions.insert(partition, d.module()?);
            }
            let mut replays = std::collections::BTreeMap::new();
            for _ in 0..d.u32()? {
                let partition = d.u32()?;
                replays.insert(partition, (d.u64()?, d.module()?));
            }
            Ok(KindVersions { genesis, partitions, partition_count, replays })
        })
        .map(Some)
    }

    /// The kind's replay, running or last finished.
    pub fn replay(&self, kind: &str) -> Result<Option<ReplayJob>, StoreError> {
        let key = replay_key(kind);
        let Some(value) = self.snapshot.get_cf(self.store.cf(REDUCERS), &key)? else { return Ok(None) };
        decode(REDUCERS, &key, &value, |d| {
            Ok(ReplayJob {
                kind: kind.to_owned(),
                reducer: d.module()?,
                started_ms: d.u64()? as i64,
                finished_ms: d.opt_i64()?,
                total: d.u64()?,
                done: d.u64()?,
                failed: d.u64()?,
                first_error: d.opt_bytes()?.map(|b| String::from_utf8_lossy(b).into_owned()),
                cursor: d.opt_bytes()?.map(|b| String::from_utf8_lossy(b).into_owned()),
            })
        })
        .map(Some)
    }

    /// Where `hash` stands in the model's chain, if it is one of its hashes.
    pub fn find_hash(&self, model: &ModelKey, hash: &Hash) -> Result<Option<HashAt>, StoreError> {
        if *hash == model.genesis() {
            return Ok(Some(HashAt::Genesis));
        }
        let mut key = model_prefix(&model.kind, &model.id);
        key.extend_from_slice(hash.as_bytes());
        let Some(value) = self.snapshot.get_cf(self.store.cf(HASHES), &key)? else { return Ok(None) };
        let (seq, offset) = decode(HASHES, &key, &value, |d| Ok((d.u64()?, d.u64()?)))?;
        Ok(Some(HashAt::Diff { seq, offset }))
    }

    /// The stored diffs after `after` (exclusive; `None`: from the start) through
    /// `through` (inclusive), checked as a hash chain from `prev`.
    pub fn diffs(
        &self,
        model: &ModelKey,
        after: Option<u64>,
        through: u64,
        mut prev: Hash,
        prev_seq: u64,
    ) -> Result<Vec<Applied>, StoreError> {
        let mut out = Vec::new();
        self.scan_diffs(model, after, through, prev_seq, |key, offset, value| {
            let diff = checked_diff(model, key, value, offset, prev)?;
            prev = diff.hash;
            out.push(diff);
            Ok(())
        })?;
        Ok(out)
    }

    /// What [`Reader::diffs`] would return, summed up without copying a payload or hashing:
    /// how many diffs, the last one's hash, and the reducers that applied them. Enough to
    /// plan a catch-up whose composition needs only two states.
    pub fn run(&self, model: &ModelKey, after: Option<u64>, through: u64, prev_seq: u64) -> Result<Run, StoreError> {
        let mut run = Run::default();
        self.scan_diffs(model, after, through, prev_seq, |_, _, value| {
            if !run.reducers.contains(&value.reducer) {
                run.reducers.push(value.reducer);
            }
            run.len += 1;
            run.last = Some(value.hash);
            Ok(())
        })?;
        Ok(run)
    }

    /// Visits the stored diffs after `after` through `through` in order, checking that
    /// their seqs follow `prev_seq` one by one.
    fn scan_diffs(
        &self,
        model: &ModelKey,
        after: Option<u64>,
        through: u64,
        prev_seq: u64,
        mut visit: impl FnMut(&[u8], u64, DiffValue<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = model_prefix(&model.kind, &model.id);
        let mut options = self.options();
        match through.checked_add(1) {
            Some(end) => options.set_iterate_upper_bound(offset_key(&prefix, end)),
            None => options.set_iterate_upper_bound(prefix_end(&prefix)),
        }
        let mut iter = self.store.db.raw_iterator_cf_opt(self.store.cf(DIFFS), options);
        iter.seek(offset_key(&prefix, after.map_or(0, |a| a + 1)));
        let mut seq = prev_seq;
        while let Some((key, value)) = iter.item() {
            if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 {
                break;
            }
            let offset = key_offset(key).map_err(|m| StoreError::corrupt("diff key", key, m.0))?;
            let value = decode(DIFFS, key, value, read_diff)?;
            if value.seq != seq + 1 {
                return Err(StoreError::corrupt("diff", key, format!("seq {} follows seq {seq}", value.seq)));
            }
            seq = value.seq;
            visit(key, offset, value)?;
            iter.next();
        }
        Ok(iter.status()?)
    }

    /// One stored diff, if `offset` applied to the model.
    pub fn diff_at(&self, model: &ModelKey, offset: u64) -> Result<Option<(u64, Hash)>, StoreError> {
        let key = offset_key(&model_prefix(&model.kind, &model.id), offset);
        let Some(value) = self.snapshot.get_cf(self.store.cf(DIFFS), &key)? else { return Ok(None) };
        let (seq, hash) = decode(DIFFS, &key, &value, |d| read_diff(d).map(|v| (v.seq, v.hash)))?;
        Ok(Some((seq, hash)))
    }

    /// Why a record was rejected, if it was.
    pub fn rejection(&self, topic: &str, partition: u32, offset: u64) -> Result<Option<Rejection>, StoreError> {
        let key = offset_key(&partition_prefix(topic, partition), offset);
        let Some(value) = self.snapshot.get_cf(self.store.cf(REJECTS), &key)? else { return Ok(None) };
        Ok(Some(decode_reject(&key, &value)?.reason))
    }

    /// Rejected records of a topic, in (partition, offset) order, after `after`.
    pub fn rejections(
        &self,
        topic: &str,
        after: Option<(u32, u64)>,
        max: usize,
    ) -> Result<Vec<StoredRejection>, StoreError> {
        let mut prefix = topic.as_bytes().to_vec();
        prefix.push(0);
        let start = match after {
            Some((partition, offset)) => match offset.checked_add(1) {
                Some(next) => offset_key(&partition_prefix(topic, partition), next),
                None => partition_prefix(topic, partition.saturating_add(1)),
            },
            None => prefix.clone(),
        };
        self.page(REJECTS, &prefix, &start, max, |key, value| decode_reject(key, value).map(Some))
    }

    /// The latest checkpoint at or before `at` (as (seq, offset); `None`: the empty
    /// state) and the diffs after it through `through` (`None`: all).
    pub fn checkpoint_before(
        &self,
        model: &ModelKey,
        at: Option<(u64, u64)>,
        through: Option<u64>,
    ) -> Result<History, StoreError> {
        let (snapshot, prev, seq, after) = match at {
            None => (None, model.genesis(), 0, None),
            Some((seq, offset)) => {
                let key = offset_key(&model_prefix(&model.kind, &model.id), offset);
                let Some(value) = self.snapshot.get_cf(self.store.cf(STATES), &key)? else {
                    return Err(StoreError::corrupt("checkpoint", &key, "named by the head but missing"));
                };
                let (stored_seq, hash, snapshot) = decode(STATES, &key, &value, |d| {
                    let (seq, hash, reducer) = (d.u64()?, d.hash()?, d.module()?);
                    Ok((seq, hash, (d.bytes()?.to_vec(), reducer)))
                })?;
                if stored_seq != seq {
                    return Err(StoreError::corrupt("checkpoint", &key, format!("seq {stored_seq}, head says {seq}")));
                }
                (Some(snapshot), hash, seq, Some(offset))
            }
        };
        let diffs = self.diffs(model, after, through.unwrap_or(u64::MAX), prev, seq)?;
        let tail = diffs.iter().map(|d| (d.prev, DiffRecord::from(d))).collect();
        let applied_by = diffs.iter().map(|d| d.reducer).collect();
        let (snapshot, snapshot_by) = snapshot.map_or((None, None), |(bytes, by)| (Some(bytes), Some(by)));
        Ok(History { checkpoint: Checkpoint { snapshot, tail }, snapshot_by, applied_by })
    }

    /// The checkpoint to rebuild the version after offset `through` from: the latest
    /// retained one at or before it.
    pub fn checkpoint_for(&self, model: &ModelKey, head: &Head, through: u64) -> Result<History, StoreError> {
        let at = head.checkpoints.iter().rev().find(|(_, offset)| *offset <= through).copied();
        self.checkpoint_before(model, at, Some(through))
    }
}

fn decode<'a, T>(
    what: &'static str,
    key: &[u8],
    value: &'a [u8],
    f: impl FnOnce(&mut Dec<'a>) -> Result<T, Malformed>,
) -> Result<T, StoreError> {
    let mut dec = Dec::value(value).map_err(|m| StoreError::corrupt(what, key, m.0))?;
    let out = f(&mut dec).map_err(|m| StoreError::corrupt(what, key, m.0))?;
    dec.finish().map_err(|m| StoreError::corrupt(what, key, m.0))?;
    Ok(out)
}

/// The first key after every key that starts with `prefix` (which ends in a NUL).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("model prefixes end in a separator") += 1;
    end
}

fn module_key(id: &ModuleHash) -> Vec<u8> {
    [&b"m"[..], &id.0].concat()
}

fn version_key(name: &str, id: &ModuleHash) -> Vec<u8> {
    [&b"v"[..], name.as_bytes(), &[0], &id.0].concat()
}

/// A position: the next offset, then the partition's digest if one is kept.
fn decode_progress(d: &mut Dec<'_>) -> Result<(u64, Option<Hash>), Malformed> {
    let next = d.u64()?;
    let digest = if d.is_empty() { None } else { Some(d.hash()?) };
    Ok((next, digest))
}

fn kind_versions_key(kind: &str) -> Vec<u8> {
    [&b"k"[..], kind.as_bytes()].concat()
}

fn encode_kind_versions(versions: &KindVersions) -> Vec<u8> {
    let mut enc = Enc::value();
    enc.module(&versions.genesis).u32(versions.partition_count);
    enc.u32(versions.partitions.len() as u32);
    for (partition, version) in &versions.partitions {
        enc.u32(*partition).module(version);
    }
    enc.u32(versions.replays.len() as u32);
    for (partition, (generation, version)) in &versions.replays {
        enc.u32(*partition).u64(*generation).module(version);
    }
    enc.done()
}

fn replay_key(kind: &str) -> Vec<u8> {
    [&b"r"[..], kind.as_bytes()].concat()
}

fn encode_replay(job: &ReplayJob) -> Vec<u8> {
    Enc::value()
        .module(&job.reducer)
        .u64(job.started_ms as u64)
        .opt_i64(job.finished_ms)
        .u64(job.total)
        .u64(job.done)
        .u64(job.failed)
        .opt_bytes(job.first_error.as_deref().map(str::as_bytes))
        .opt_bytes(job.cursor.as_deref().map(str::as_bytes))
        .done()
}

fn encode_version(record: &VersionRecord) -> Vec<u8> {
    let status = match record.status {
        VersionStatus::Active => 0,
        VersionStatus::Retired => 1,
        VersionStatus::Refused => 2,
    };
    let (code, message) = record.refusal.clone().unzip();
    let (declared_name, declared_version) = record.declared.clone().unzip();
    Enc::value()
        .u8(status)
        .opt_bytes(code.as_deref().map(str::as_bytes))
        .opt_bytes(message.as_deref().map(str::as_bytes))
        .bytes(record.origin.as_bytes())
        .opt_bytes(declared_name.as_deref().map(str::as_bytes))
        .opt_bytes(declared_version.as_deref().map(str::as_bytes))
        .u64(record.bytes)
        .u64(record.first_ms as u64)
        .u64(record.changed_ms as u64)
        .done()
}

fn decode_version(name: &str, key: &[u8], value: &[u8]) -> Result<VersionRecord, StoreError> {
    let id = key
        .len()
        .checked_sub(32)
        .map(|at| ModuleHash(key[at..].try_into().expect("32 bytes")))
        .ok_or_else(|| StoreError::corrupt("reducer version key", key, "too short"))?;
    let text = |b: Option<&[u8]>| b.map(|b| String::from_utf8_lossy(b).into_owned());
    decode(REDUCERS, key, value, |d| {
        let status = match d.u8()? {
            0 => VersionStatus::Active,
            1 => VersionStatus::Retired,
            2 => VersionStatus::Refused,
            other => return Err(Malformed(format!("unknown version status {other}"))),
        };
        let code = text(d.opt_bytes()?);
        let message = text(d.opt_bytes()?);
        let origin = d.string()?;
        let declared_name = text(d.opt_bytes()?);
        let declared_version = text(d.opt_bytes()?);
        Ok(VersionRecord {
            name: name.to_owned(),
            id,
            status,
            refusal: code.zip(message),
            origin,
            declared: declared_name.zip(declared_version),
            bytes: d.u64()?,
            first_ms: d.u64()? as i64,
            changed_ms: d.u64()? as i64,
        })
    })
}

fn encode_head(head: &Head) -> Vec<u8> {
    let mut enc = Enc::value();
    enc.u64(head.seq).opt_u64(head.offset).hash(&head.hash).module(&head.reducer);
    enc.u32(head.checkpoints.len() as u32);
    for (seq, offset) in &head.checkpoints {
        enc.u64(*seq).u64(*offset);
    }
    enc.opt_u64(head.pruned_through).opt_u64(head.partition.map(u64::from)).u64(head.replayed);
    enc.u64(head.checkpoint_bytes).u64(head.tail_bytes).done()
}

fn decode_head(key: &[u8], value: &[u8]) -> Result<Head, StoreError> {
    let mut dec = Dec::value(value).map_err(|m| StoreError::corrupt("head", key, m.0))?;
    let head = read_head(&mut dec).map_err(|m| StoreError::corrupt("head", key, m.0))?;
    dec.finish().map_err(|m| StoreError::corrupt("head", key, m.0))?;
    check_head(&head).map_err(|detail| StoreError::corrupt("head", key, detail))?;
    Ok(head)
}

fn read_head(dec: &mut Dec<'_>) -> Result<Head, Malformed> {
    let seq = dec.u64()?;
    let offset = dec.opt_u64()?;
    let hash = dec.hash()?;
    let reducer = dec.module()?;
    let n = dec.u32()? as usize;
    let mut checkpoints = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        checkpoints.push((dec.u64()?, dec.u64()?));
    }
    let pruned_through = dec.opt_u64()?;
    // Heads written before partitions and replays were recorded end here.
    let (partition, replayed) = if dec.is_empty() {
        (None, 0)
    } else {
        let partition = dec.opt_u64()?.map(|p| u32::try_from(p).map_err(|_| Malformed(format!("partition {p}"))));
        (partition.transpose()?, dec.u64()?)
    };
    // Heads written before checkpoint sizes were recorded end here: 0 is "not known", and
    // the next checkpoint is due by the diff count alone.
    let (checkpoint_bytes, tail_bytes) = if dec.is_empty() { (0, 0) } else { (dec.u64()?, dec.u64()?) };
    Ok(Head {
        seq,
        offset,
        hash,
        reducer,
        checkpoints,
        pruned_through,
        partition,
        replayed,
        checkpoint_bytes,
        tail_bytes,
    })
}

/// Invariants of a head, checked before it is written and after it is read.
fn check_head(head: &Head) -> Result<(), String> {
    if (head.seq == 0) != head.offset.is_none() {
        return Err(format!("seq {} with offset {:?}", head.seq, head.offset));
    }
    let mut last: Option<(u64, u64)> = None;
    for &(seq, offset) in &head.checkpoints {
        if seq == 0 || seq > head.seq || head.offset.is_some_and(|o| offset > o) {
            return Err(format!("checkpoint ({seq}, {offset}) beyond head ({}, {:?})", head.seq, head.offset));
        }
        if last.is_some_and(|(s, o)| s >= seq || o >= offset) {
            return Err("checkpoints out of order".into());
        }
        last = Some((seq, offset));
    }
    if let Some(pruned) = head.pruned_through
        && head.checkpoints.first().is_none_or(|&(_, o)| o != pruned)
    {
        return Err(format!("pruned through {pruned} but the oldest checkpoint is {:?}", head.checkpoints.first()));
    }
    Ok(())
}

fn encode_diff(applied: &Applied) -> Vec<u8> {
    Enc::value()
        .u64(applied.seq)
        .hash(&applied.hash)
        .module(&applied.reducer)
        .opt_i64(applied.timestamp_ms)
        .headers(&applied.headers)
        .bytes(&applied.payload)
        .done()
}

/// A `diffs` value, decoded field by field (the inverse of [`encode_diff`]).
struct DiffValue<'a> {
    seq: u64,
    hash: Hash,
    reducer: ModuleHash,
    timestamp_ms: Option<i64>,
    headers: Vec<(String, Vec<u8>)>,
    payload: &'a [u8],
}

fn read_diff<'a>(d: &mut Dec<'a>) -> Result<DiffValue<'a>, Malformed> {
    Ok(DiffValue {
        seq: d.u64()?,
        hash: d.hash()?,
        reducer: d.module()?,
        timestamp_ms: d.opt_i64()?,
        headers: d.headers()?,
        payload: d.bytes()?,
    })
}

/// A stored diff, checked to follow `prev` in the hash chain.
fn checked_diff(
    model: &ModelKey,
    key: &[u8],
    v: DiffValue<'_>,
    offset: u64,
    prev: Hash,
) -> Result<Applied, StoreError> {
    if prev.next(v.payload) != v.hash {
        return Err(StoreError::corrupt("diff", key, "hash does not follow from the previous hash and the diff"));
    }
    Ok(Applied {
        model: model.clone(),
        offset,
        seq: v.seq,
        prev,
        hash: v.hash,
        reducer: v.reducer,
        timestamp_ms: v.timestamp_ms,
        headers: v.headers,
        payload: Bytes::copy_from_slice(v.payload),
    })
}

fn encode_reject(rejected: &Rejected) -> Vec<u8> {
    Enc::value()
        .opt_bytes(rejected.key.as_deref())
        .opt_i64(rejected.timestamp_ms)
        .bytes(rejected.reason.code().as_bytes())
        .bytes(rejected.reason.message().as_bytes())
        .opt_u64(rejected.reason.detail())
        .done()
}

/// A rejected record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRejection {
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
    pub reason: Rejection,
}

fn decode_reject(key: &[u8], value: &[u8]) -> Result<StoredRejection, StoreError> {
    let malformed = || StoreError::corrupt("rejection key", key, "expected topic, partition and offset");
    let offset = key_offset(key).map_err(|_| malformed())?;
    let partition_at = key.len().checked_sub(12).ok_or_else(malformed)?;
    let partition = u32::from_be_bytes(key[partition_at..partition_at + 4].try_into().expect("4 bytes"));
    let (record_key, timestamp_ms, code, message, detail) = decode(REJECTS, key, value, |d| {
        Ok((d.opt_bytes()?.map(<[u8]>::to_vec), d.opt_i64()?, d.string()?, d.string()?, d.opt_u64()?))
    })?;
    let reason = Rejection::from_parts(&code, message, detail)
        .ok_or_else(|| StoreError::corrupt("rejection", key, format!("unknown code {code:?}")))?;
    Ok(StoredRejection { partition, offset, key: record_key, timestamp_ms, reason })
}

/// Checks a batch before it is written: each model's applied diffs chain from its previous
/// head, seqs and offsets increase, heads agree with the last diff.
fn check_folded(folded: &Folded) -> Result<(), StoreError> {
    let invalid = |detail: String| StoreError::Invalid { what: "batch", detail };
    let mut last: HashMap<&ModelKey, &Applied> = HashMap::new();
    for applied in &folded.applied {
        if applied.prev.next(&applied.payload) != applied.hash {
            return Err(invalid(format!("{:?} offset {}: hash is not the chain's", applied.model, applied.offset)));
        }
        if let Some(before) = last.get(&applied.model)
            && (before.hash != applied.prev || before.seq + 1 != applied.seq || before.offset >= applied.offset)
        {
            return Err(invalid(format!(
                "{:?} offset {}: does not follow offset {}",
                applied.model, applied.offset, before.offset
            )));
        }
        last.insert(&applied.model, applied);
    }
    for (model, head) in &folded.heads {
        check_head(head).map_err(|detail| invalid(format!("head of {model:?}: {detail}")))?;
        if let Some(applied) = last.get(model)
            && (applied.hash != head.hash || applied.seq != head.seq)
        {
            return Err(invalid(format!("head of {model:?} does not match its last diff")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let bytes = encode_head(&head);
        assert_eq!(decode_head(b"k", &bytes).unwrap(), head);
        // A head stored before checkpoint sizes were recorded: sizes not known (0).
        let old = decode_head(b"k", &bytes[..bytes.len() - 16]).unwrap();
        assert_eq!(old, Head { checkpoint_bytes: 0, tail_bytes: 0, ..head.clone() });
        // Truncated, trailing bytes, unknown format: corruption, never a default.
        for bad in [&bytes[..bytes.len() - 1], &[bytes.as_slice(), &[0]].concat()[..], &[9u8, 1, 2][..]] {
            assert!(matches!(decode_head(b"k", bad), Err(StoreError::Corrupt { .. })));
        }
        let inconsistent = Head { seq: 0, ..head };
        assert!(matches!(decode_head(b"k", &encode_head(&inconsistent)), Err(StoreError::Corrupt { .. })));
    }
}
