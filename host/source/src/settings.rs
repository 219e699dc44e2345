//! What the sources need to know: the brokers (`[kafka]`), sharded mode (`[cluster]`) and
//! the limits of reading, writing, relaying and attesting ([`SourceLimits`]). The server's
//! config composes them: `[kafka]` and `[cluster]` are these types, and `[limits]` (one
//! flat table, each also a flag) builds a [`SourceLimits`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// The limits the sources work under, from the server's `[limits]` (documented there, with
/// their defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLimits {
    /// Reactions kept in the outbox before the fold waits for the relay.
    pub outbox_records_max: u64,
    /// Reactions one relay batch writes at most.
    pub relay_batch_records_max: usize,
    /// How far a relay mark may lag the committed position before it moves.
    pub relay_mark_lag_records: u64,
    /// The transactional relay's transaction timeout (and how long the relay waits on the broker).
    pub relay_transaction_timeout_ms: u64,
    /// How often topics' partition counts and ends are looked at.
    pub kafka_check_interval_ms: u64,
    /// Largest diff accepted.
    pub diff_bytes_max: usize,
    /// The producer's queue.
    pub kafka_produce_queue_bytes_max: u64,
    /// Longest wait for a produce's acknowledgement.
    pub kafka_produce_timeout_ms: u64,
    /// The consumer's prefetch queue.
    pub kafka_fetch_queue_bytes_max: u64,
    /// Records one batch of the fold holds at most.
    pub batch_records_max: usize,
    /// Longest a fetch waits on the broker for records.
    pub kafka_fetch_wait_ms: u64,
    /// How often the folded position is committed to the group (monitoring only).
    pub kafka_commit_interval_ms: u64,
    /// Bytes one batch of the fold holds at most.
    pub batch_bytes_max: usize,
    /// The cluster group's session timeout.
    pub cluster_session_timeout_ms: u64,
    /// How often a server announces what it folds.
    pub cluster_heartbeat_interval_ms: u64,
    /// A member not heard from for this long is gone from the routes.
    pub cluster_member_timeout_ms: u64,
    /// Digests kept per partition for comparison with other replicas.
    pub attest_points_kept: usize,
}

/// `[kafka]`: the brokers, the consumer group, and librdkafka properties.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: host:port[,host:port...].
    pub brokers: String,
    /// The consumer group the folded position is committed to, for lag monitoring only.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// librdkafka properties for both clients: `security.protocol`, `sasl.*`, `ssl.*`,
    /// `client.id`... They override Statefold's own settings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (override `properties`).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only (override `properties`).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
    /// The topic replicas publish their partition digests to, to detect a replica that
    /// folds the log differently (create it with a few partitions; "" turns it off).
    #[serde(default = "default_attest_topic")]
    pub attest_topic: String,
}

pub fn default_attest_topic() -> String {
    "statefold-attestations".into()
}

pub fn default_group_id() -> String {
    "statefold".into()
}

impl KafkaConfig {
    /// Brokers, and every other setting at its default.
    pub fn new(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            group_id: default_group_id(),
            properties: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            attest_topic: default_attest_topic(),
        }
    }

    /// `KEY=VALUE`, as given to `--kafka-property`.
    pub fn parse_property(flag: &str) -> Result<(String, String), BadFlag> {
        let (key, value) = flag.split_once('=').ok_or_else(|| BadFlag::Property(flag.to_owned()))?;
        Ok((key.trim().to_owned(), value.to_owned()))
    }
}

/// `[cluster]`: sharded mode. The servers of one cluster share `[kafka] group_id`; the group
/// assigns each partition to one of them (cooperative-sticky), `standbys` others fold it
/// too, and a request for a model folded elsewhere is proxied (or redirected) there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The base URL other servers send this server's clients to, e.g.
    /// `https://statefold-1.internal:8443` (no path).
    pub advertise_url: String,
    /// How many servers besides the owner fold each partition (warm copies for failover).
    #[serde(default = "default_standbys")]
    pub standbys: usize,
    /// The topic servers publish what they fold to, and read the others' from (create it
    /// with one partition).
    #[serde(default = "default_cluster_topic")]
    pub topic: String,
    /// What a server does with a read, a stream or a waiting write for a model folded
    /// elsewhere: forward the request there and relay the answer (`proxy`, the default), or
    /// answer 307 to the owner (`redirect`). Either way a request takes at most one hop.
    #[serde(default)]
    pub route: RouteMode,
}

/// How a request for a model folded elsewhere gets there. Parsed by `FromStr`, for the
/// config file (serde) and `--cluster-route` alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum RouteMode {
    /// Forwarded to the owner, its answer relayed: one origin for the client, so its
    /// `Authorization` header, cookies and CORS work unchanged.
    #[default]
    Proxy,
    /// A 307 to the owner's advertised URL. Only where every server is one origin to the
    /// client: browsers and most HTTP clients drop `Authorization` on a redirect to another
    /// origin, a cookie is not sent to another host, and a cross-origin page's CORS check
    /// fails on the second origin.
    Redirect,
}

fn default_standbys() -> usize {
    1
}

pub fn default_cluster_topic() -> String {
    "statefold-cluster".into()
}

impl ClusterConfig {
    pub fn new(advertise_url: &str) -> ClusterConfig {
        ClusterConfig {
            advertise_url: advertise_url.trim_end_matches('/').to_owned(),
            standbys: default_standbys(),
            topic: default_cluster_topic(),
            route: RouteMode::default(),
        }
    }
}

impl std::str::FromStr for RouteMode {
    type Err = BadFlag;

    fn from_str(s: &str) -> Result<RouteMode, BadFlag> {
        match s {
            "proxy" => Ok(RouteMode::Proxy),
            "redirect" => Ok(RouteMode::Redirect),
            other => Err(BadFlag::RouteMode(other.to_owned())),
        }
    }
}

impl TryFrom<String> for RouteMode {
    type Error = BadFlag;

    fn try_from(s: String) -> Result<RouteMode, BadFlag> {
        s.parse()
    }
}

/// A flag's value that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum BadFlag {
    #[error("--kafka-property {0:?}: expected KEY=VALUE")]
    Property(String),
    #[error("{0:?} is not a route mode: proxy or redirect")]
    RouteMode(String),
}
