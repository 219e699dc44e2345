//! The embedded log's storage: records appended to the `log` column family, one
//! partition per topic, offsets from 0 (see `source::embedded`).

use super::outbox::LogAppend;
use super::*;

impl Store {
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
        let record = LogAppend { topic, partition, key, value, timestamp_ms, headers };
        Ok(self.append_with(&[record], WriteBatch::default())?[0])
    }

    /// Appends `records` to the embedded log with the writes already in `batch`, in one
    /// WriteBatch; returns the offsets they got.
    pub(super) fn append_with(&self, records: &[LogAppend<'_>], mut batch: WriteBatch) -> Result<Vec<u64>, StoreError> {
        let mut ends = self.log_ends.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: HashMap<(String, u32), u64> = HashMap::new();
        let mut offsets = Vec::with_capacity(records.len());
        for r in records {
            let slot = (r.topic.to_owned(), r.partition);
            let offset = match next.get(&slot).or_else(|| ends.get(&slot)) {
                Some(end) => *end,
                None => self.log_end_from_disk(r.topic, r.partition)?,
            };
            let value = Enc::value()
                .opt_bytes(Some(r.key))
                .opt_i64(Some(r.timestamp_ms))
                .headers(r.headers)
                .bytes(r.value)
                .done();
            batch.put_cf(self.cf(LOG), offset_key(&partition_prefix(r.topic, r.partition), offset), value);
            next.insert(slot, offset + 1);
            offsets.push(offset);
        }
        self.db.write_opt(batch, &self.write)?;
        ends.extend(next);
        Ok(offsets)
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
