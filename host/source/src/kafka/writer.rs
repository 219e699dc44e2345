//! Appends to Kafka: an idempotent producer.

use super::*;

/// The Kafka writer: an idempotent producer, acks from all in-sync replicas.
pub struct KafkaWriter {
    producer: FutureProducer<Context>,
}

impl KafkaWriter {
    pub fn new(
        config: &KafkaConfig,
        limits: &SourceLimits,
        status: Arc<SourceStatus>,
    ) -> Result<KafkaWriter, BrokerError> {
        let settings = kafka_settings(config, limits, Role::Producer);
        tracing::info!(settings = %printable(&settings), "kafka producer");
        let producer = client_config(&settings)
            .create_with_context(Context { role: Role::Producer, status })
            .map_err(BrokerError::call("create the Kafka producer"))?;
        Ok(KafkaWriter { producer })
    }

    /// Appends to `partition`, or to the key's partition (the producer's partitioner).
    pub async fn append(
        &self,
        topic: &str,
        partition: Option<u32>,
        key: &[u8],
        value: &[u8],
        headers: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), WriteError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header { key: name, value: Some(value) });
        }
        let mut record = FutureRecord::to(topic).key(key).payload(value).headers(owned);
        if let Some(partition) = partition {
            record = record.partition(partition as i32);
        }
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| WriteError::Unavailable(format!("cannot queue the record: {e}")))?;
        match delivery.await {
            Ok(Ok(delivery)) => Ok((delivery.partition as u32, delivery.offset as u64)),
            Ok(Err((e, _))) => Err(WriteError::Unavailable(e.to_string())),
            Err(_) => Err(WriteError::Unavailable("the producer was closed".into())),
        }
    }

    /// The number of partitions of `topic`, as the broker reports it.
    pub async fn partitions(&self, topic: &str, timeout: Duration) -> Result<u32, WriteError> {
        let (producer, name) = (self.producer.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || partition_count(producer.client(), &name, timeout))
            .await
            .map_err(|e| WriteError::Unavailable(e.to_string()))?
            .map_err(|e| WriteError::Unavailable(e.to_string()))
    }

    /// Waits (up to `timeout`) for records still queued.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "records still queued at shutdown");
        }
    }
}
