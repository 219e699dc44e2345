//! Exactly once without broker transactions: after a crash or a takeover, a relay reads
//! back from its output partitions how far it got, and skips what is already there.
//!
//! A reaction's place in its source partition's order is (source offset, index), and the
//! relay writes each source partition's reactions in that order through one idempotent
//! producer, each to the partition its key maps to (the Java client's murmur2, chosen here,
//! not by the client): in every output partition, a source partition's reactions are in
//! order, without gaps or copies within a producer's life (`enable.gapless.guarantee`).
//! So the last of them in an output partition says which of the reactions bound there are
//! written: exactly those at or before its place (header `statefold-reaction-source`).
//!
//! Finding that last one without reading the whole partition: before a relay first writes
//! to an output partition it commits a **mark** there: the partition's end, as the committed
//! offset of the output partition in the consumer group `<group_id>.relay.<topic>.<partition>`
//! (one per source partition). A recovery reads each output partition from its mark to its
//! end; with no mark, the source partition never wrote there. Kafka holds the marks, so the
//! next owner of a partition finds them too.
//!
//! A mark moves up only to where the relay's *committed position* covers everything before
//! it (the partition's end as of the last position commit), once it lags that by
//! `relay_mark_lag_records`: a mark moved past reactions the position does not cover yet
//! would hide them from the next read-back, which would write them again (a kill right
//! after such a move did, in the crash test: 500 copies).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::super::kafka::{client_config, partition_count};
use crate::BrokerError;
use statefold_core::model::{HEADER_REACTION_SOURCE, Outgoing, partition_of};

/// A reaction's place in its source partition: (source offset, index among its diff's).
pub type Place = (u64, u32);

/// An output partition: (topic, partition).
type Output = (String, u32);

/// One source partition's view of its output partitions, for one producer's life.
pub struct Tail {
    /// The source partition, as the header's value begins: `TOPIC/PARTITION/`.
    prefix: String,
    /// Reads output partitions and commits the marks (group of this source partition).
    consumer: BaseConsumer,
    /// Partition counts of the output topics, read once per producer.
    counts: BTreeMap<String, u32>,
    /// Output partitions read back: the place of this source's last reaction in each.
    found: BTreeMap<Output, Option<Place>>,
    /// Each output partition's mark as committed (read or written in this producer's life);
    /// its end as far as this relay knows (read back, then its own deliveries); and that end
    /// as of the last position commit (where a mark may move up to).
    marked: BTreeMap<Output, u64>,
    written: BTreeMap<Output, u64>,
    covered: BTreeMap<Output, u64>,
    timeout: Duration,
    mark_lag: u64,
}

impl Tail {
    /// The tail of `topic`/`partition`'s reactions; `settings` are a consumer's (no group).
    pub fn new(
        settings: &BTreeMap<String, String>,
        group: &str,
        topic: &str,
        partition: u32,
        timeout: Duration,
        mark_lag: u64,
    ) -> Result<Tail, BrokerError> {
        let mut settings = settings.clone();
        settings.insert("group.id".into(), format!("{group}.{topic}.{partition}"));
        // What a plain consumer reads.
        settings.insert("isolation.level".into(), "read_uncommitted".into());
        let consumer: BaseConsumer =
            client_config(&settings).create().map_err(BrokerError::call("create the relay's reader"))?;
        Ok(Tail {
            prefix: format!("{topic}/{partition}/"),
            consumer,
            counts: BTreeMap::new(),
            found: BTreeMap::new(),
            marked: BTreeMap::new(),
            written: BTreeMap::new(),
            covered: BTreeMap::new(),
            timeout,
            mark_lag,
        })
    }

    /// The output partition each entry goes to.
    pub fn outputs(&mut self, entries: &[Outgoing]) -> Result<Vec<u32>, BrokerError> {
        let mut out = Vec::with_capacity(entries.len());
        for o in entries {
            let topic = &o.reaction.topic;
            let count = match self.counts.get(topic) {
                Some(count) => *count,
                None => {
                    // (Reactions are produced to existing topics: the error says to create it.)
                    let count = partition_count(self.consumer.client(), topic, self.timeout)?;
                    self.counts.insert(topic.clone(), count);
                    count
                }
            };
            out.push(partition_of(o.reaction.key.as_bytes(), count));
        }
        Ok(out)
    }

    /// Before a run goes to `outputs`: reads back the output partitions not read yet in this
    /// producer's life, and commits the marks the run needs (one commit).
    pub fn prepare(&mut self, outputs: &[Output], stop: &dyn Fn() -> bool) -> Result<(), BrokerError> {
        let mut marks = TopicPartitionList::new();
        for output in outputs {
            if !self.found.contains_key(output) {
                let back = self.read_back(output, stop)?;
                self.found.insert(output.clone(), back.last);
                self.written.insert(output.clone(), back.end);
                match back.mark {
                    // Still below whatever the position does not cover.
                    Some(mark) => {
                        self.marked.insert(output.clone(), mark);
                    }
                    // Never written there: nothing to cover, the end is a safe first mark.
                    None => {
                        self.covered.insert(output.clone(), back.end);
                    }
                }
            }
            let covered = self.covered.get(output).copied();
            let to = match (self.marked.get(output), covered) {
                (None, Some(covered)) => Some(covered),
                (Some(mark), Some(covered)) if covered.saturating_sub(*mark) >= self.mark_lag => Some(covered),
                _ => None,
            };
            if let Some(to) = to
                && marks.find_partition(&output.0, output.1 as i32).is_none()
            {
                marks
                    .add_partition_offset(&output.0, output.1 as i32, Offset::Offset(to as i64))
                    .map_err(BrokerError::call("name the relay's mark"))?;
            }
        }
        if marks.count() > 0 {
            self.consumer.commit(&marks, CommitMode::Sync).map_err(BrokerError::call("commit the relay's marks"))?;
            for e in marks.elements() {
                if let Offset::Offset(n) = e.offset() {
                    self.marked.insert((e.topic().to_owned(), e.partition() as u32), n as u64);
                }
            }
        }
        Ok(())
    }

    /// Whether the reaction at `place`, bound for `output`, is already written there.
    pub fn written(&self, output: &Output, place: Place) -> bool {
        self.found.get(output).copied().flatten().is_some_and(|last| place <= last)
    }

    /// A run was acknowledged: its last offset (+1) in each output partition.
    pub fn delivered(&mut self, ends: impl IntoIterator<Item = (Output, u64)>) {
        for (output, end) in ends {
            let slot = self.written.entry(output).or_insert(0);
            *slot = (*slot).max(end);
        }
    }

    /// The relay's position now covers everything it wrote: marks may move up to here.
    pub fn committed(&mut self) {
        self.covered.clone_from(&self.written);
    }

    /// This source's last reaction in `output` since its mark, the mark, and the end.
    fn read_back(&self, output: &Output, stop: &dyn Fn() -> bool) -> Result<ReadBack, BrokerError> {
        let started = Instant::now();
        let (topic, partition) = (&output.0, output.1 as i32);
        let (low, high) = self
            .consumer
            .fetch_watermarks(topic, partition, self.timeout)
            .map_err(BrokerError::call(format!("read the end of {topic}/{partition}")))?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        let mut list = TopicPartitionList::new();
        list.add_partition(topic, partition);
        let committed = self
            .consumer
            .committed_offsets(list, self.timeout)
            .map_err(BrokerError::call(format!("read the relay's mark in {topic}/{partition}")))?;
        let mark = match committed.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(n)) if n >= 0 => n as u64,
            // No mark: this source partition never wrote there.
            _ => return Ok(ReadBack { last: None, mark: None, end: high }),
        };
        // Records below the log's start are gone for every reader.
        let from = mark.max(low);
        if from >= high {
            return Ok(ReadBack { last: None, mark: Some(mark), end: high });
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, Offset::Offset(from as i64))
            .map_err(BrokerError::call(format!("name {topic}/{partition} at {from}")))?;
        self.consumer.assign(&list).map_err(BrokerError::call(format!("read {topic}/{partition}")))?;
        let mut last = None;
        let mut deadline = Instant::now() + self.timeout;
        let mut next = from;
        while next < high {
            if stop() {
                return Err(BrokerError::Stopping);
            }
            if Instant::now() > deadline {
                let output = format!("{topic}/{partition}");
                return Err(BrokerError::Stalled { output, from, next, end: high, waited: self.timeout });
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    deadline = Instant::now() + self.timeout;
                    next = m.offset() as u64 + 1;
                    let place = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == HEADER_REACTION_SOURCE)
                            .and_then(|h| h.value)
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| parse_place(v, &self.prefix))
                    });
                    if place.is_some() {
                        last = place;
                    }
                }
                Some(Err(e)) => return Err(BrokerError::call(format!("read {topic}/{partition} back"))(e)),
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        tracing::info!(output = %format!("{topic}/{partition}"), from, to = high, ?last, took = ?started.elapsed(), source = %self.prefix, "relay: read back");
        Ok(ReadBack { last, mark: Some(mark), end: high })
    }
}

/// What a read-back of one output partition found.
struct ReadBack {
    /// The place of this source partition's last reaction there.
    last: Option<Place>,
    /// The mark it read from (none: never written there).
    mark: Option<u64>,
    /// The partition's end when read.
    end: u64,
}

/// `OFFSET/INDEX` after `prefix` (`TOPIC/PARTITION/`), if the value has that prefix.
pub fn parse_place(value: &str, prefix: &str) -> Option<Place> {
    let (offset, index) = value.strip_prefix(prefix)?.split_once('/')?;
    Some((offset.parse().ok()?, index.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::parse_place;

    #[test]
    fn a_place_is_read_only_from_its_own_source_partition() {
        assert_eq!(parse_place("runs/2/1042/0", "runs/2/"), Some((1042, 0)));
        assert_eq!(parse_place("runs/2/1042/3", "runs/2/"), Some((1042, 3)));
        assert_eq!(parse_place("runs/21/1042/0", "runs/2/"), None);
        assert_eq!(parse_place("runs-x/2/1042/0", "runs/2/"), None);
        assert_eq!(parse_place("runs/2/x/0", "runs/2/"), None);
        assert_eq!(parse_place("runs/2/1042", "runs/2/"), None);
    }
}
