//! Reads at one consistent point in time (a RocksDB snapshot), every value decoded
//! strictly and every diff's chain checked; and the fold engine's [`View`] over them.

use super::*;

impl View for Store {
    fn head(&self, model: &ModelKey) -> Result<Option<Head>, ViewError> {
        Ok(self.read().head(model)?)
    }

    fn checkpoint(&self, model: &ModelKey, head: &Head) -> Result<History, ViewError> {
        Ok(self.read().checkpoint_before(model, head.checkpoint(), None)?)
    }

    fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, ViewError> {
        Ok(self.read().keyed(model, key)?)
    }

    fn deploy_chunk(&self, module: &ModuleHash, index: u32) -> Result<Option<Bytes>, ViewError> {
        Ok(self.db.get_cf(self.cf(REDUCERS), chunk_key(module, index))?.map(Bytes::from))
    }

    fn module(&self, id: &ModuleHash) -> Result<Option<Bytes>, ViewError> {
        Ok(Store::module(self, id)?.map(Bytes::from))
    }
}

/// Reads at one consistent point in time.
pub struct Reader<'a> {
    pub(super) store: &'a Store,
    pub(super) snapshot: rocksdb::Snapshot<'a>,
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
        self.advanced(model, decode_head(&key, &value)?).map(Some)
    }

    /// A stored head brought to the model's last diff: batches that only applied diffs
    /// leave the stored head as it was (see [`Folded::advanced`]), and the last diff says
    /// where the model stands. Checked: the diff is later than the stored head, was
    /// applied by the stored head's version, and records its tail bytes.
    fn advanced(&self, model: &ModelKey, mut head: Head) -> Result<Head, StoreError> {
        let prefix = model_prefix(&model.kind, &model.id);
        let mut options = self.options();
        options.set_iterate_lower_bound(offset_key(&prefix, head.offset.map_or(0, |o| o + 1)));
        options.set_iterate_upper_bound(prefix_end(&prefix));
        let mut iter = self.store.db.raw_iterator_cf_opt(self.store.cf(DIFFS), options);
        iter.seek_to_last();
        let Some((key, value)) = iter.item() else {
            iter.status()?;
            return Ok(head);
        };
        if key.len() != prefix.len() + 8 {
            return Err(StoreError::corrupt("diff key", key, "not the model's prefix and an offset"));
        }
        let offset = key_offset(key).map_err(|m| StoreError::corrupt("diff key", key, m.0))?;
        let diff = decode(DIFFS, key, value, read_diff)?;
        let Some(tail_bytes) = diff.tail_bytes else {
            return Err(StoreError::corrupt("diff", key, "after its model's stored head, but without tail bytes"));
        };
        if diff.seq <= head.seq || diff.reducer != head.reducer {
            return Err(StoreError::corrupt(
                "diff",
                key,
                format!(
                    "seq {} by {} does not advance the stored head (seq {} by {})",
                    diff.seq, diff.reducer, head.seq, head.reducer
                ),
            ));
        }
        head.seq = diff.seq;
        head.offset = Some(offset);
        head.hash = diff.hash;
        head.tail_bytes = tail_bytes;
        Ok(head)
    }

    /// The diff applied to `model` under idempotency key `key`, if one was.
    pub fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, StoreError> {
        let mut db_key = model_prefix(&model.kind, &model.id);
        db_key.extend_from_slice(key.as_bytes());
        let Some(value) = self.snapshot.get_cf(self.store.cf(KEYS), &db_key)? else { return Ok(None) };
        let (seq, offset, hash) = decode(KEYS, &db_key, &value, |d| Ok((d.u64()?, d.u64()?, d.hash()?)))?;
        Ok(Some(Keyed { model: model.clone(), key: key.to_owned(), seq, offset, hash }))
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
            let head = self.advanced(&ModelKey::new(kind, &id), decode_head(key, value)?)?;
            Ok(Some((id, head)))
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
                // (Absent from jobs stored before subjects were recorded.)
                subject: if d.is_empty() {
                    None
                } else {
                    d.opt_bytes()?.map(|b| String::from_utf8_lossy(b).into_owned())
                },
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
