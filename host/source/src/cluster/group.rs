//! The consumer group that decides who owns which partition: its rebalance callback, the
//! generation it is at, and the group's reader that reads nothing.

use super::*;

/// Reads the cluster topic, every partition, from a little before its end; why not,
/// otherwise.
pub(super) fn assign_all(reader: &BaseConsumer, topic: &str) -> Result<(), BrokerError> {
    let count = partition_count(reader.client(), topic, Duration::from_secs(2))?;
    let mut list = TopicPartitionList::new();
    for partition in 0..count as i32 {
        let _ = list.add_partition_offset(topic, partition, Offset::OffsetTail(100));
    }
    reader.assign(&list).map_err(BrokerError::call(format!("read the cluster topic {topic:?}")))
}

/// Commits the owned partitions' folded positions to the group (for lag monitoring).
pub(super) fn commit_owned(
    group: &BaseConsumer<GroupContext>,
    owned: &BTreeSet<Partition>,
    status: &SourceStatus,
    committed: &mut BTreeMap<Partition, u64>,
) {
    let mut list = TopicPartitionList::new();
    for ((topic, partition), p) in status.partitions() {
        let key = (topic, partition);
        if owned.contains(&key) && p.next > 0 && committed.get(&key) != Some(&p.next) {
            let _ = list.add_partition_offset(&key.0, partition as i32, Offset::Offset(p.next as i64));
            committed.insert(key, p.next);
        }
    }
    if list.count() > 0
        && let Err(e) = group.commit(&list, CommitMode::Async)
    {
        tracing::debug!(error = %e, "committing the folded positions to the group failed (monitoring only)");
    }
}

/// The group's generation, as librdkafka holds it now (`None`: not known).
///
/// librdkafka has no getter for it; its serialized group metadata (the format KIP-447's
/// `sendOffsetsToTransaction` uses, `rd_kafka_consumer_group_metadata_write`, format v2:
/// `"CGMDv2:"`, then the generation as a native-endian i32) carries it.
pub(super) fn group_generation(group: &BaseConsumer<GroupContext>) -> Option<i32> {
    use rdkafka::bindings as rd;
    const MAGIC: &[u8] = b"CGMDv2:";
    let rk = group.client().native_ptr();
    // SAFETY: `rk` is the live consumer's handle; the metadata is a copy this function owns
    // and destroys, and the buffer librdkafka allocates is read within its size, then freed.
    unsafe {
        let metadata = rd::rd_kafka_consumer_group_metadata(rk);
        if metadata.is_null() {
            return None;
        }
        let mut buffer: *mut std::ffi::c_void = std::ptr::null_mut();
        let mut size = 0usize;
        let error = rd::rd_kafka_consumer_group_metadata_write(metadata, &mut buffer, &mut size);
        rd::rd_kafka_consumer_group_metadata_destroy(metadata);
        if !error.is_null() {
            rd::rd_kafka_error_destroy(error);
            return None;
        }
        if buffer.is_null() {
            return None;
        }
        let bytes = std::slice::from_raw_parts(buffer as *const u8, size);
        let generation = bytes
            .strip_prefix(MAGIC)
            .and_then(|rest| rest.get(..4))
            .map(|g| i32::from_ne_bytes(g.try_into().expect("4 bytes")));
        rd::rd_kafka_mem_free(rk, buffer);
        generation
    }
}

/// The group consumer's context: rebalances tell the cluster what this server owns.
pub(super) struct GroupContext {
    pub(super) cluster: std::sync::Weak<Cluster>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .filter_map(|e| Some((e.topic().to_owned(), u32::try_from(e.partition()).ok()?)))
            .collect();
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Paused at the end: this consumer only holds the assignment.
                let mut list = TopicPartitionList::new();
                for (topic, partition) in &partitions {
                    let _ = list.add_partition_offset(topic, *partition as i32, Offset::End);
                }
                let assigned = if cooperative { consumer.incremental_assign(&list) } else { consumer.assign(&list) };
                if let Err(e) = assigned.and_then(|()| consumer.pause(&list)) {
                    tracing::warn!(error = %e, "cannot take the group's assignment");
                }
                if let Some(cluster) = self.cluster.upgrade() {
                    cluster.rebalanced(&partitions, &[]);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = revoked {
                    tracing::warn!(error = %e, "cannot give back the revoked partitions");
                }
                if let Some(cluster) = self.cluster.upgrade() {
                    cluster.rebalanced(&[], &partitions);
                }
            }
            other => {
                tracing::warn!(error = ?other, "the group's rebalance failed; the assignment is dropped");
                let _ = consumer.unassign();
                if let Some(cluster) = self.cluster.upgrade() {
                    let owned: Vec<Partition> = cluster.lock().owned.iter().cloned().collect();
                    cluster.rebalanced(&[], &owned);
                }
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "committing to the group failed (monitoring only)");
        }
    }
}
