//! The outbox: reactions committed with the diffs that emitted them (in `Store::commit`'s
//! WriteBatch), read and acknowledged by the relay (`source::relay`). Keyed by where the
//! diff was read, `topic ‖ 0 ‖ partition ‖ offset ‖ index`, so one partition's entries are
//! in the order they were folded (each model's in its order).

use std::sync::Arc;

use super::*;
use statefold_core::model::{Outgoing, Reaction};

/// The source name under which the relay's positions are stored in `progress`.
pub(super) const RELAY_SOURCE: &str = "relay";

/// A record to append to the embedded log.
pub struct LogAppend<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub timestamp_ms: i64,
    pub headers: &'a [(String, Vec<u8>)],
}

pub(super) fn outbox_key(o: &Outgoing) -> Vec<u8> {
    let mut key = offset_key(&partition_prefix(&o.source, o.partition), o.offset);
    key.extend_from_slice(&o.index.to_be_bytes());
    key
}

pub(super) fn encode_outgoing(o: &Outgoing) -> Vec<u8> {
    let r = &o.reaction;
    Enc::value()
        .bytes(o.model.kind.as_bytes())
        .bytes(o.model.id.as_bytes())
        .u64(o.seq)
        .bytes(r.topic.as_bytes())
        .bytes(r.key.as_bytes())
        .headers(&r.headers)
        .bytes(&r.value)
        .done()
}

impl Store {
    /// Outbox entries of (`topic`, `partition`) from source offset `from`: at least `max`
    /// unless fewer are pending, and always every reaction of the last diff taken (a diff's
    /// reactions are relayed together).
    pub fn outbox(&self, topic: &str, partition: u32, from: u64, max: usize) -> Result<Vec<Outgoing>, StoreError> {
        let prefix = partition_prefix(topic, partition);
        let start = offset_key(&prefix, from);
        let source: Arc<str> = topic.into();
        let mut out: Vec<Outgoing> = Vec::new();
        for item in self.db.iterator_cf(self.cf(OUTBOX), IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Ok(rest) = <[u8; 12]>::try_from(&key[prefix.len()..]) else {
                return Err(StoreError::corrupt(OUTBOX, &key, "not topic ‖ 0 ‖ partition ‖ offset ‖ index"));
            };
            let offset = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
            let index = u32::from_be_bytes(rest[8..].try_into().expect("4 bytes"));
            if out.len() >= max && out.last().is_some_and(|last| last.offset != offset) {
                break;
            }
            let outgoing = decode(OUTBOX, &key, &value, |d| {
                let kind = d.string()?;
                let id = d.string()?;
                let seq = d.u64()?;
                let topic = d.string()?;
                let key = d.string()?;
                let headers = d.headers()?;
                let value = d.bytes()?.to_vec();
                Ok(Outgoing {
                    source: source.clone(),
                    partition,
                    offset,
                    model: ModelKey::new(&kind, &id),
                    seq,
                    index,
                    reaction: Reaction { topic, key, value, headers },
                })
            })?;
            out.push(outgoing);
        }
        Ok(out)
    }

    /// Outbox entries not relayed yet, over every partition (a scan: once, at start).
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(OUTBOX), IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Where the relay of (`topic`, `partition`) stands: the source offset of the first diff
    /// whose reactions it has not relayed (`None`: it never relayed any).
    pub fn relay_position(&self, topic: &str, partition: u32) -> Result<Option<u64>, StoreError> {
        self.position(RELAY_SOURCE, topic, partition)
    }

    /// Records that the reactions of (`topic`, `partition`) before source offset `next` are
    /// relayed, appending `appends` to the embedded log (the relay to it), in one WriteBatch:
    /// the entries are deleted and the position stored with the appends, so each is
    /// appended once. Returns the offsets the appends got, and how many entries left the
    /// outbox.
    pub fn relayed(
        &self,
        topic: &str,
        partition: u32,
        next: u64,
        appends: &[LogAppend<'_>],
    ) -> Result<(Vec<u64>, u64), StoreError> {
        let mut batch = WriteBatch::default();
        let prefix = partition_prefix(topic, partition);
        let end = offset_key(&prefix, next);
        // Counted (for the outbox's gauge) before they go: each entry once in its life.
        let mut removed = 0;
        for item in self.db.iterator_cf(self.cf(OUTBOX), IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, _) = item?;
            if key.as_ref() >= end.as_slice() {
                break;
            }
            removed += 1;
        }
        batch.delete_range_cf(self.cf(OUTBOX), &prefix, &end);
        let position = Position { topic: topic.to_owned(), partition, next_offset: next, digest: None, witness: None };
        batch.put_cf(self.cf(PROGRESS), progress_key(RELAY_SOURCE, topic, partition), encode_progress(&position));
        Ok((self.append_with(appends, batch)?, removed))
    }
}
