//! Kafka clients as Statefold builds them: every librdkafka property (Statefold's own, then
//! the config's overrides), the log and error callbacks, and what the brokers say of a
//! topic.

use super::*;

/// Which client a set of properties is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Consumer,
    Producer,
}

/// The librdkafka properties of a client: Statefold's settings, then `[kafka.properties]`,
/// then `[kafka.consumer]` or `[kafka.producer]`, each overriding the one before.
pub fn kafka_settings(config: &KafkaConfig, limits: &SourceLimits, role: Role) -> BTreeMap<String, String> {
    let mut settings: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        settings.insert(k.to_owned(), v);
    };
    set("bootstrap.servers", config.brokers.clone());
    set("client.id", "statefold".into());
    set("socket.keepalive.enable", "true".into());
    match role {
        Role::Consumer => {
            set("group.id", config.group_id.clone());
            // Positions live in the store; the group's offsets are for monitoring.
            set("enable.auto.commit", "false".into());
            set("enable.auto.offset.store", "false".into());
            // A stored position outside the log means records were lost: stop, never
            // skip silently to the earliest or latest offset.
            set("auto.offset.reset", "error".into());
            set("enable.partition.eof", "false".into());
            set("isolation.level", "read_committed".into());
            set("check.crcs", "true".into());
            set("fetch.wait.max.ms", limits.kafka_fetch_wait_ms.to_string());
            set("fetch.min.bytes", "1".into());
            // librdkafka's default (1 s) caps catch-up near 100k records/s.
            set("fetch.queue.backoff.ms", "1".into());
            set("queued.max.messages.kbytes", (limits.kafka_fetch_queue_bytes_max >> 10).max(1).to_string());
            set("queued.min.messages", (limits.batch_records_max * 10).to_string());
            set("fetch.max.bytes", limits.kafka_fetch_queue_bytes_max.clamp(1 << 20, 50 << 20).to_string());
            // A record up to diff_bytes_max must fit a fetch (a larger one is rejected).
            set("max.partition.fetch.bytes", (limits.diff_bytes_max + (64 << 10)).max(1 << 20).to_string());
        }
        Role::Producer => {
            set("acks", "all".into());
            set("enable.idempotence", "true".into());
            set("max.in.flight.requests.per.connection", "5".into());
            set("linger.ms", "1".into());
            set("message.timeout.ms", limits.kafka_produce_timeout_ms.to_string());
            set("queue.buffering.max.kbytes", (limits.kafka_produce_queue_bytes_max >> 10).max(1).to_string());
            set("queue.buffering.max.messages", "100000".into());
            set("message.max.bytes", (limits.diff_bytes_max + (64 << 10)).max(1 << 20).to_string());
            // The Java client's partitioner: a model's records land on the same partition
            // whichever client produced them.
            set("partitioner", "murmur2_random".into());
        }
    }
    let overrides = match role {
        Role::Consumer => &config.consumer,
        Role::Producer => &config.producer,
    };
    for (k, v) in config.properties.iter().chain(overrides) {
        settings.insert(k.clone(), v.clone());
    }
    settings
}

/// The request/reply clients: a consumer of `topic` in `group` that commits by hand (from
/// the earliest request when the group has no position), and a producer for the replies.
pub fn request_clients(
    config: &KafkaConfig,
    limits: &SourceLimits,
    topic: &str,
    group: &str,
) -> Result<(StreamConsumer, FutureProducer), BrokerError> {
    let mut settings = kafka_settings(config, limits, Role::Consumer);
    settings.insert("group.id".into(), group.to_owned());
    settings.insert("auto.offset.reset".into(), "earliest".into());
    // A server that died holds its partitions of the request topic this long.
    settings.insert("session.timeout.ms".into(), limits.cluster_session_timeout_ms.to_string());
    // A rebalance waits for members to rejoin at most this long (the consumer polls all
    // the time: it never comes near it otherwise).
    settings.insert("max.poll.interval.ms".into(), (limits.cluster_session_timeout_ms * 3).to_string());
    let consumer: StreamConsumer =
        client_config(&settings).create().map_err(BrokerError::call("create the request consumer"))?;
    consumer.subscribe(&[topic]).map_err(BrokerError::call(format!("subscribe to {topic}")))?;
    let producer: FutureProducer = client_config(&kafka_settings(config, limits, Role::Producer))
        .create()
        .map_err(BrokerError::call("create the reply producer"))?;
    Ok((consumer, producer))
}

pub(crate) fn client_config(settings: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in settings {
        config.set(k, v);
    }
    config.set_log_level(RDKafkaLogLevel::Warning);
    config
}

/// Properties as logged: secrets masked.
pub(super) fn printable(settings: &BTreeMap<String, String>) -> String {
    settings
        .iter()
        .map(|(k, v)| {
            let secret =
                ["password", "secret", "key", "token"].iter().any(|s| k.contains(s)) && k != "ssl.key.location";
            if secret { format!("{k}=***") } else { format!("{k}={v}") }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// librdkafka's logs and errors, into tracing and the source status.
pub(super) struct Context {
    pub(super) role: Role,
    pub(super) status: Arc<SourceStatus>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let role = self.role;
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(?role, fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(?role, fac, "librdkafka: {message}"),
            _ => tracing::debug!(?role, fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let role = self.role;
        tracing::warn!(?role, %error, "librdkafka: {reason}");
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.status.set_problem(Some(format!("all brokers are down: {reason}")));
        }
    }
}

impl ConsumerContext for Context {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "committing the folded position to the group failed (monitoring only)");
        }
    }
}

/// The number of partitions of `topic`, as the brokers describe it; why not, otherwise.
pub(crate) fn partition_count<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<u32, BrokerError> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(BrokerError::call(format!("reach the brokers: metadata of topic {topic:?}")))?;
    let described = metadata.topics().iter().find(|t| t.name() == topic);
    match described {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as u32),
        Some(t) => {
            let error = t.error().map(|e| format!("{:?}", RDKafkaErrorCode::from(e))).unwrap_or_default();
            Err(BrokerError::Topic { topic: topic.to_owned(), reason: format!("is not available ({error})") })
        }
        None => Err(BrokerError::Topic { topic: topic.to_owned(), reason: "is not on the brokers".into() }),
    }
}
