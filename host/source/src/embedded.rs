//! The embedded log: a durable append-only log in the store's `log` column family, one
//! partition per topic, with Kafka's offset semantics. The zero-setup default.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Source, SourceError, SourceStatus};
use statefold_core::model::Record;
use statefold_store::{LogAppend, Store, StoreError};

/// Embedded topics have one partition.
pub const PARTITION: u32 = 0;
pub const SOURCE_NAME: &str = "embedded";

/// The writing side: appends and wakes the source.
pub struct EmbeddedLog {
    store: Arc<Store>,
    appended: Arc<(Mutex<u64>, Condvar)>,
    status: Arc<SourceStatus>,
}

impl EmbeddedLog {
    pub fn new(store: Arc<Store>, status: Arc<SourceStatus>) -> EmbeddedLog {
        EmbeddedLog { store, appended: Arc::new((Mutex::new(0), Condvar::new())), status }
    }

    /// Appends one record; returns (partition, offset). Durable when it returns.
    pub fn append(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        timestamp_ms: i64,
        headers: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), StoreError> {
        let offset = self.store.append(topic, PARTITION, key, value, timestamp_ms, headers)?;
        self.status.set_end(topic, PARTITION, offset + 1);
        self.wake();
        Ok((PARTITION, offset))
    }

    /// The relay's write: `appends`, and the outbox of (`topic`, `partition`) relayed up to
    /// source offset `next`, in one WriteBatch (see [`Store::relayed`]).
    /// Returns how many entries left the outbox.
    pub fn relayed(
        &self,
        topic: &str,
        partition: u32,
        next: u64,
        appends: &[LogAppend<'_>],
    ) -> Result<u64, StoreError> {
        let (offsets, removed) = self.store.relayed(topic, partition, next, appends)?;
        for (append, offset) in appends.iter().zip(offsets) {
            // Only a topic the source reads (a kind's): others have no lag to report.
            if self.status.knows(append.topic, append.partition) {
                self.status.set_end(append.topic, append.partition, offset + 1);
            }
        }
        self.wake();
        Ok(removed)
    }

    /// Wakes the source: something was appended.
    fn wake(&self) {
        let (count, cvar) = &*self.appended;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cvar.notify_all();
    }

    /// The offset the next record of (`topic`, `partition`) will get.
    pub fn end(&self, topic: &str, partition: u32) -> Result<u64, StoreError> {
        self.store.log_end(topic, partition)
    }

    /// The reading side, over `topics`, from the positions stored in the store.
    pub fn source(&self, topics: Vec<String>, batch_bytes_max: usize) -> Result<EmbeddedSource, StoreError> {
        let mut partitions = Vec::new();
        for topic in topics {
            let next = self.store.position(SOURCE_NAME, &topic, PARTITION)?.unwrap_or(0);
            let end_at_start = self.store.log_end(&topic, PARTITION)?;
            self.status.set_next(&topic, PARTITION, next);
            self.status.set_end(&topic, PARTITION, end_at_start);
            partitions.push(Partition { topic, next, end_at_start });
        }
        Ok(EmbeddedSource { store: self.store.clone(), appended: self.appended.clone(), partitions, batch_bytes_max })
    }
}

struct Partition {
    topic: String,
    next: u64,
    end_at_start: u64,
}

/// The reading side of the embedded log.
pub struct EmbeddedSource {
    store: Arc<Store>,
    appended: Arc<(Mutex<u64>, Condvar)>,
    partitions: Vec<Partition>,
    batch_bytes_max: usize,
}

impl Source for EmbeddedSource {
    fn name(&self) -> &'static str {
        SOURCE_NAME
    }

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Record>, SourceError> {
        let appended = self.appended.clone();
        let (count, cvar) = &*appended;
        let seen = *count.lock().unwrap_or_else(|p| p.into_inner());
        let records = self.read(max)?;
        if !records.is_empty() {
            return Ok(records);
        }
        // Nothing new: wait for an append after the read above (none is missed: the
        // counter was taken before reading), or the timeout.
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        drop(cvar.wait_timeout_while(guard, timeout, |now| *now == seen));
        Ok(self.read(max)?)
    }

    fn caught_up(&self) -> bool {
        self.partitions.iter().all(|p| p.next >= p.end_at_start)
    }

    fn partitions(&self) -> Vec<(Arc<str>, u32)> {
        self.partitions.iter().map(|p| (Arc::from(p.topic.as_str()), PARTITION + 1)).collect()
    }
}

impl EmbeddedSource {
    /// Up to `max` records (and about `batch_bytes_max` bytes) over the topics, fairly: each
    /// topic gets an equal share first, then what the topics with fewer records left is
    /// shared by the ones that filled their share (they may hold more).
    fn read(&mut self, max: usize) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let share = (max / self.partitions.len().max(1)).max(1);
        let mut busy = Vec::new();
        for index in 0..self.partitions.len() {
            let room = share.min(max - out.len());
            if room == 0 || bytes >= self.batch_bytes_max {
                return Ok(out);
            }
            if self.read_partition(index, room, &mut out, &mut bytes)? == room {
                busy.push(index);
            }
        }
        for (i, index) in busy.iter().enumerate() {
            let room = (max - out.len()) / (busy.len() - i);
            if room == 0 || bytes >= self.batch_bytes_max {
                break;
            }
            self.read_partition(*index, room, &mut out, &mut bytes)?;
        }
        Ok(out)
    }

    /// Up to `room` records of the partition `index` onto `out`; how many.
    fn read_partition(
        &mut self,
        index: usize,
        room: usize,
        out: &mut Vec<Record>,
        bytes: &mut usize,
    ) -> Result<usize, StoreError> {
        let partition = &mut self.partitions[index];
        let mut read = 0;
        for record in self.store.read_log(&partition.topic, PARTITION, partition.next, room)? {
            if *bytes >= self.batch_bytes_max {
                break;
            }
            *bytes += record.value.len();
            partition.next = record.offset + 1;
            out.push(record);
            read += 1;
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of four topics, `(topic, records)` each, and a source over all four.
    fn source_over(records: &[(&str, usize)]) -> (tempfile::TempDir, EmbeddedSource) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &Default::default()).unwrap());
        let log = EmbeddedLog::new(store, Arc::new(SourceStatus::default()));
        for (topic, count) in records {
            for i in 0..*count {
                log.append(topic, format!("m{i}").as_bytes(), b"{}", 0, &[]).unwrap();
            }
        }
        let topics = records.iter().map(|(topic, _)| topic.to_string()).collect();
        let source = log.source(topics, 16 << 20).unwrap();
        (dir, source)
    }

    fn per_topic(records: &[Record]) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for record in records {
            *counts.entry(record.topic.to_string()).or_insert(0) += 1;
        }
        counts.into_iter().collect()
    }

    /// One busy topic among idle ones gets the whole batch, not a quarter of it.
    #[test]
    fn a_busy_topic_gets_the_room_idle_topics_leave() {
        let (_dir, mut source) = source_over(&[("a", 0), ("b", 3000), ("c", 10), ("d", 0)]);
        let batch = source.poll(1000, Duration::ZERO).unwrap();
        assert_eq!(per_topic(&batch), [("b".to_owned(), 990), ("c".to_owned(), 10)]);
        // Each topic's records in offset order, and the next batch goes on from there.
        let next = source.poll(1000, Duration::ZERO).unwrap();
        assert_eq!(next.first().map(|r| r.offset), Some(990));
        assert_eq!(per_topic(&next), [("b".to_owned(), 1000)]);
    }

    /// Busy topics share the room fairly: each gets its share, then the rest is split.
    #[test]
    fn busy_topics_share_the_batch() {
        let (_dir, mut source) = source_over(&[("a", 5000), ("b", 5000), ("c", 100), ("d", 0)]);
        let batch = source.poll(1000, Duration::ZERO).unwrap();
        assert_eq!(per_topic(&batch), [("a".to_owned(), 450), ("b".to_owned(), 450), ("c".to_owned(), 100)]);
    }
}
