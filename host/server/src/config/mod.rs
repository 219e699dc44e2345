//! Configuration: one TOML file plus flags, parsed and validated first, used to build
//! resources second. Every limit lives in [`Limits`], named with its unit last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod http;

/// Why a configuration cannot be used: each names the file, flag or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("--kind {flag:?}: expected NAME=FILE.wasm[@TOPIC]")]
    KindFlag { flag: String },
    /// A setting whose value does not make sense (alone or with another).
    #[error("{setting}: {reason}")]
    Invalid { setting: String, reason: String },
}

/// `Err(ConfigError::Invalid)` for `setting`.
fn invalid<T>(setting: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid { setting: setting.into(), reason: reason.into() })
}

pub use http::*;

pub use statefold_source::settings::{
    ClusterConfig, KafkaConfig, RouteMode, SourceLimits, default_attest_topic, default_cluster_topic, default_group_id,
};

/// Declares every limit once: the TOML field (with its default), the flag that overrides it,
/// and its documentation (shown by `--help`).
macro_rules! limits {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr ;)*) => {
        /// Every limit of a running Statefold. TOML section `[limits]`; each is also a flag.
        #[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Limits {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Limits { $( $name: $default, )* }
            }
        }

        /// Flags that override `[limits]` of the config file.
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct LimitFlags {
            $( $(#[doc = $doc])* #[arg(long, value_name = stringify!($ty))] pub $name: Option<$ty>, )*
        }

        impl LimitFlags {
            pub fn apply(&self, limits: &mut Limits) {
                $( if let Some(value) = &self.$name { limits.$name = value.clone(); } )*
            }
        }
    };
}

limits! {
    /// Largest diff (record value / request body), in bytes.
    diff_bytes_max: usize = crate::fold::FoldLimits::default().diff_bytes_max;
    /// Records folded per batch (and per RocksDB WriteBatch).
    batch_records_max: usize = 1000;
    /// Bytes of diffs read into one batch (the batch ends at the record that passes it).
    batch_bytes_max: usize = 16 << 20;
    /// A checkpoint of a model's state every this many applied diffs...
    checkpoint_interval_diffs: u64 = crate::fold::FoldLimits::default().checkpoint_interval_diffs;
    /// ... once their bytes add up to this percent of the latest checkpoint's size (a large
    /// state is snapshotted less often; 0: by the diff count alone).
    checkpoint_tail_percent: u64 = crate::fold::FoldLimits::default().checkpoint_tail_percent;
    /// Checkpoints kept per model; diffs before the oldest one kept are pruned.
    retain_checkpoints: usize = crate::fold::FoldLimits::default().retain_checkpoints;
    /// Model heads cached in memory per kind.
    head_cache_models_max: usize = crate::fold::FoldLimits::default().head_cache_models_max;
    /// Materialized states cached for GET and SSE snapshots, in bytes.
    state_cache_bytes_max: u64 = 64 << 20;
    /// Longest run of missed diffs composed with the reducer's merge when it also has delta;
    /// longer runs use delta (two state rebuilds instead of a pass over every diff).
    catchup_merge_diffs_max: usize = 256;
    /// Live diffs buffered per watched model (shared by its SSE clients); a client that
    /// falls further behind gets a patch instead.
    sse_queue_events_max: usize = 1024;
    /// SSE clients at once, over all models.
    sse_subscribers_max: usize = 100_000;
    /// Interval of SSE heartbeat comments, in milliseconds.
    sse_heartbeat_ms: u64 = 15_000;
    /// Reconnection delay sent to SSE clients (`retry:`), in milliseconds.
    sse_retry_ms: u64 = 1_000;
    /// A connection whose socket accepts no bytes for this long is closed, in milliseconds
    /// (HTTP/1.1 and HTTP/2 alike: under HTTP/2 it closes the connection's every stream).
    http_write_timeout_ms: u64 = 30_000;
    /// Streams (requests and SSE streams) one HTTP/2 connection may have open at once.
    http2_max_concurrent_streams: u32 = 100;
    /// Bytes of a response one HTTP/2 stream may have queued while the client's flow-control
    /// window is closed (or the one event being sent, if larger); with
    /// `http2_max_concurrent_streams` it bounds a connection's send buffers (a stream whose
    /// window stays closed stops being polled, and its SSE client leaves its place in the
    /// model's ring).
    http2_stream_send_buffer_bytes: usize = 32 << 10;
    /// Request-body bytes one HTTP/2 stream may receive before the server has read them
    /// (its initial flow-control window; at least 65535).
    http2_stream_window_bytes: u32 = 256 << 10;
    /// Request-body bytes one HTTP/2 connection may receive, over all of its streams, before
    /// the server has read them (at least 65535).
    http2_connection_window_bytes: u32 = 1 << 20;
    /// Longest wait of `?wait=applied`, in milliseconds.
    wait_applied_ms_max: u64 = 10_000;
    /// Longest wait for a hash (or model) this server does not know yet before answering
    /// `reset` + `snapshot` (or 404), in milliseconds: a client coming from a replica that
    /// is ahead of this one holds versions this one has not folded yet.
    failover_wait_ms: u64 = 2_000;
    /// Models per page of `GET /v1/models/{kind}`.
    list_page_max: usize = 1_000;
    /// fsync RocksDB's WAL on every commit and append (survives power loss, not only a crash).
    store_fsync: bool = false;
    /// RocksDB's memtable size per column family, in bytes: smaller makes each key a commit
    /// inserts cheaper to place (the fold's commits), larger flushes less often.
    store_write_buffer_bytes: usize = crate::store::StoreOptions::default().write_buffer_bytes;
    /// Linear memory cap of one reducer instance, in bytes.
    reducer_memory_bytes_max: usize = crate::reducer::ReducerLimits::default().memory_bytes_max;
    /// CPU budget of one diff, in wasmtime fuel (about one unit per wasm instruction).
    reducer_diff_fuel_max: u64 = crate::reducer::ReducerLimits::default().diff_fuel_max;
    /// CPU budget of any other reducer call (snapshot, restore, merge, delta), in fuel.
    reducer_call_fuel_max: u64 = crate::reducer::ReducerLimits::default().call_fuel_max;
    /// Guest heap one instance may hold before cold models are evicted, in bytes.
    reducer_resident_bytes_max: u64 = crate::reducer::ReducerLimits::default().resident_bytes_max;
    /// Models resident in one reducer instance before cold ones are evicted.
    reducer_resident_models_max: usize = crate::reducer::ReducerLimits::default().resident_models_max;
    /// Bytes of a reducer's stderr kept for error messages.
    reducer_stderr_bytes_max: usize = crate::reducer::ReducerLimits::default().stderr_bytes_max;
    /// Records fetched from Kafka and not yet folded, in bytes (librdkafka's consumer queue,
    /// `queued.max.messages.kbytes`): when folding falls behind, fetching pauses.
    kafka_fetch_queue_bytes_max: u64 = 32 << 20;
    /// Longest time the broker holds a fetch waiting for new records, in milliseconds
    /// (`fetch.wait.max.ms`).
    kafka_fetch_wait_ms: u64 = 100;
    /// Produced records waiting for the broker's acknowledgement, in bytes
    /// (`queue.buffering.max.kbytes`); when full, appends answer 503.
    kafka_produce_queue_bytes_max: u64 = 32 << 20;
    /// Longest time an append waits for the broker to take its record, in milliseconds
    /// (`message.timeout.ms`).
    kafka_produce_timeout_ms: u64 = 10_000;
    /// Interval of the broker checks (reachability, partitions, high watermarks for lag),
    /// in milliseconds; a check that fails makes the server unready.
    kafka_check_interval_ms: u64 = 1_000;
    /// Interval of committing the folded position to the consumer group (for lag
    /// monitoring only: positions are read from the store), in milliseconds.
    kafka_commit_interval_ms: u64 = 5_000;
    /// Interval of polling the reducers directory for new or replaced `.wasm` files, in
    /// milliseconds. A file is read once it is unchanged (size and mtime) across a whole
    /// interval, so a copy in progress is not loaded.
    reducer_watch_interval_ms: u64 = 500;
    /// Largest module deployed (by `PUT /v1/reducers/{name}`, or a file), in bytes.
    reducer_module_bytes_max: usize = 64 << 20;
    /// Stored checkpoints restored into a new version (off the fold thread) before it is
    /// deployed; a version that cannot restore one is refused.
    deploy_check_models_max: usize = 10_000;
    /// Largest deploy record value, in bytes: keep it within the log's message size limit
    /// (Kafka's `message.max.bytes`, 1 MB by default). A larger module goes in chunks of
    /// this size, reassembled and checked by blake3 on every replica.
    deploy_record_bytes_max: usize = 1_000_000;
    /// Resident models moved between two batches off a version no partition folds with any
    /// more (snapshot on the old version, restore on the new): bounds the pause folding sees.
    deploy_move_models_max: usize = 1000;
    /// Refused versions remembered per reducer (oldest forgotten first).
    reducer_refused_kept_max: usize = 100;
    /// Past reducer versions kept instantiated per kind, to rebuild states they applied.
    reducer_versions_resident_max: usize = 4;
    /// Models a replay rebuilds between two batches of the log (one WriteBatch).
    replay_page_models: usize = 64;
    /// A replica publishes its digest of a partition each time the partition's offsets
    /// cross a multiple of this (with Kafka; see `attest_topic`).
    attest_interval_records: u64 = 1000;
    /// Digests kept per partition, this replica's and other replicas' not compared yet.
    attest_points_kept: usize = 1000;
    /// Sharded mode: how often each server publishes what it folds to the cluster topic,
    /// in milliseconds.
    cluster_heartbeat_interval_ms: u64 = 500;
    /// Sharded mode: a server not heard from for this long is taken for gone (its
    /// partitions are served from a standby until the group reassigns them), in
    /// milliseconds.
    cluster_member_timeout_ms: u64 = 3000;
    /// Sharded mode and request/reply: the consumer groups' session timeout (librdkafka
    /// `session.timeout.ms`): how long after a server's last heartbeat its group reassigns
    /// its partitions (of the folded topics; of the request topic), in milliseconds.
    cluster_session_timeout_ms: u64 = 10000;
    /// Reactions one diff may emit; a diff that emits more fails (rejection `failed`).
    reactions_per_diff_max: usize = crate::reducer::ReducerLimits::default().reactions_per_diff_max;
    /// Bytes of one reaction (key, value and headers); a diff that emits a larger one fails.
    reaction_bytes_max: usize = crate::reducer::ReducerLimits::default().reaction_bytes_max;
    /// Reactions committed and not yet relayed; past it, folding pauses until the relay
    /// catches up (the outbox is a queue on disk, and bounded like any other).
    outbox_records_max: u64 = 1_000_000;
    /// Reactions relayed in one Kafka transaction (or one embedded-log write); a diff's
    /// reactions are never split across two.
    relay_batch_records_max: usize = 1000;
    /// Longest wait of the relay for a run's acknowledgement (or a transaction's commit)
    /// before it is retried, in milliseconds.
    relay_transaction_timeout_ms: u64 = 30_000;
    /// Without transactions, a relay reads back, after a restart or a takeover, what it
    /// wrote to each output partition since its mark there; it moves the mark up once what
    /// its committed position covers is this many records past it (a mark is one
    /// consumer-group offset commit), which bounds that read.
    relay_mark_lag_records: u64 = 10_000;
    /// Requests over Kafka handled at once; the next waits for one to be answered.
    requests_in_flight_max: usize = 256;
}

impl Limits {
    pub fn reducer(&self) -> crate::reducer::ReducerLimits {
        crate::reducer::ReducerLimits {
            memory_bytes_max: self.reducer_memory_bytes_max,
            diff_fuel_max: self.reducer_diff_fuel_max,
            call_fuel_max: self.reducer_call_fuel_max,
            resident_bytes_max: self.reducer_resident_bytes_max,
            resident_models_max: self.reducer_resident_models_max,
            stderr_bytes_max: self.reducer_stderr_bytes_max,
            reactions_per_diff_max: self.reactions_per_diff_max,
            reaction_bytes_max: self.reaction_bytes_max,
        }
    }

    pub fn fold(&self) -> crate::fold::FoldLimits {
        crate::fold::FoldLimits {
            checkpoint_interval_diffs: self.checkpoint_interval_diffs,
            checkpoint_tail_percent: self.checkpoint_tail_percent,
            retain_checkpoints: self.retain_checkpoints,
            head_cache_models_max: self.head_cache_models_max,
            diff_bytes_max: self.diff_bytes_max,
        }
    }

    pub fn store(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions { fsync: self.store_fsync, write_buffer_bytes: self.store_write_buffer_bytes }
    }

    /// What the sources (the embedded log, Kafka) work under.
    pub fn source(&self) -> SourceLimits {
        SourceLimits {
            outbox_records_max: self.outbox_records_max,
            relay_batch_records_max: self.relay_batch_records_max,
            relay_mark_lag_records: self.relay_mark_lag_records,
            relay_transaction_timeout_ms: self.relay_transaction_timeout_ms,
            kafka_check_interval_ms: self.kafka_check_interval_ms,
            diff_bytes_max: self.diff_bytes_max,
            kafka_produce_queue_bytes_max: self.kafka_produce_queue_bytes_max,
            kafka_produce_timeout_ms: self.kafka_produce_timeout_ms,
            kafka_fetch_queue_bytes_max: self.kafka_fetch_queue_bytes_max,
            batch_records_max: self.batch_records_max,
            kafka_fetch_wait_ms: self.kafka_fetch_wait_ms,
            kafka_commit_interval_ms: self.kafka_commit_interval_ms,
            batch_bytes_max: self.batch_bytes_max,
            cluster_session_timeout_ms: self.cluster_session_timeout_ms,
            cluster_heartbeat_interval_ms: self.cluster_heartbeat_interval_ms,
            cluster_member_timeout_ms: self.cluster_member_timeout_ms,
            attest_points_kept: self.attest_points_kept,
        }
    }

    pub fn deploy(&self) -> crate::deploy::DeployLimits {
        crate::deploy::DeployLimits {
            check_models_max: self.deploy_check_models_max,
            refused_kept_max: self.reducer_refused_kept_max,
            record_bytes_max: self.deploy_record_bytes_max,
            module_bytes_max: self.reducer_module_bytes_max,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = self.reducer().validate() {
            return invalid("limits", e.to_string());
        }
        let positive = [
            ("reducer_watch_interval_ms", self.reducer_watch_interval_ms),
            ("reducer_module_bytes_max", self.reducer_module_bytes_max as u64),
            ("reducer_refused_kept_max", self.reducer_refused_kept_max as u64),
            ("deploy_move_models_max", self.deploy_move_models_max as u64),
            ("deploy_record_bytes_max", self.deploy_record_bytes_max as u64),
            ("store_write_buffer_bytes", self.store_write_buffer_bytes as u64),
            ("reducer_versions_resident_max", self.reducer_versions_resident_max as u64),
            ("replay_page_models", self.replay_page_models as u64),
            ("attest_interval_records", self.attest_interval_records),
            ("attest_points_kept", self.attest_points_kept as u64),
            ("diff_bytes_max", self.diff_bytes_max as u64),
            ("batch_records_max", self.batch_records_max as u64),
            ("batch_bytes_max", self.batch_bytes_max as u64),
            ("checkpoint_interval_diffs", self.checkpoint_interval_diffs),
            ("retain_checkpoints", self.retain_checkpoints as u64),
            ("sse_queue_events_max", self.sse_queue_events_max as u64),
            ("sse_subscribers_max", self.sse_subscribers_max as u64),
            ("sse_heartbeat_ms", self.sse_heartbeat_ms),
            ("http_write_timeout_ms", self.http_write_timeout_ms),
            ("http2_max_concurrent_streams", u64::from(self.http2_max_concurrent_streams)),
            ("http2_stream_send_buffer_bytes", self.http2_stream_send_buffer_bytes as u64),
            ("wait_applied_ms_max", self.wait_applied_ms_max),
            ("list_page_max", self.list_page_max as u64),
            ("catchup_merge_diffs_max", self.catchup_merge_diffs_max as u64),
            ("kafka_fetch_queue_bytes_max", self.kafka_fetch_queue_bytes_max >> 10),
            ("kafka_produce_queue_bytes_max", self.kafka_produce_queue_bytes_max >> 10),
            ("kafka_produce_timeout_ms", self.kafka_produce_timeout_ms),
            ("outbox_records_max", self.outbox_records_max),
            ("relay_batch_records_max", self.relay_batch_records_max as u64),
            ("relay_transaction_timeout_ms", self.relay_transaction_timeout_ms),
            ("relay_mark_lag_records", self.relay_mark_lag_records),
            ("requests_in_flight_max", self.requests_in_flight_max as u64),
            ("kafka_check_interval_ms", self.kafka_check_interval_ms),
            ("kafka_commit_interval_ms", self.kafka_commit_interval_ms),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return invalid(format!("limits.{name}"), "must be positive");
        }
        for (name, window) in [
            ("http2_stream_window_bytes", self.http2_stream_window_bytes),
            ("http2_connection_window_bytes", self.http2_connection_window_bytes),
        ] {
            if !(65_535..=i32::MAX as u32).contains(&window) {
                return invalid(format!("limits.{name}"), "must be between 65535 and 2^31-1 (HTTP/2's window sizes)");
            }
        }
        if self.diff_bytes_max > 64 << 20 {
            return invalid("limits.diff_bytes_max", "must be at most 64 MiB");
        }
        if self.head_cache_models_max < self.batch_records_max {
            return invalid(
                "limits.head_cache_models_max",
                format!(
                    "{} must be at least limits.batch_records_max ({}): a batch's heads stay cached until it commits",
                    self.head_cache_models_max, self.batch_records_max
                ),
            );
        }
        Ok(())
    }
}

/// One kind: a reducer fed by one topic.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindConfig {
    pub name: String,
    /// The reducer's `.wasm` file, relative to `reducers_dir` (or absolute).
    pub reducer: PathBuf,
    /// The topic its diffs are read from; defaults to the kind's name.
    pub topic: Option<String>,
}

impl KindConfig {
    /// The reducer's name: its file name without `.wasm` (versions are deployed under it).
    pub fn reducer_name(&self) -> String {
        let file = self.reducer.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        file.strip_suffix(".wasm").map(str::to_owned).unwrap_or(file)
    }

    pub fn topic(&self) -> &str {
        self.topic.as_deref().unwrap_or(&self.name)
    }

    /// `NAME=FILE.wasm[@TOPIC]`, as given to `--kind`.
    pub fn parse_flag(flag: &str) -> Result<KindConfig, ConfigError> {
        let (name, rest) = flag.split_once('=').ok_or_else(|| ConfigError::KindFlag { flag: flag.to_owned() })?;
        let (reducer, topic) = match rest.rsplit_once('@') {
            Some((file, topic)) => (file, Some(topic.to_owned())),
            None => (rest, None),
        };
        Ok(KindConfig { name: name.to_owned(), reducer: reducer.into(), topic })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_reducers_dir")]
    pub reducers_dir: PathBuf,
    #[serde(default, rename = "kind")]
    pub kinds: Vec<KindConfig>,
    /// Fold from Kafka; without it, from the embedded log.
    pub kafka: Option<KafkaConfig>,
    /// Serve reads and streams only: creates, appends, deploys and replays answer 403
    /// `read_only` (for deployments that keep ingestion on separate gateways).
    #[serde(default)]
    pub read_only: bool,
    /// Bearer tokens: off unless configured (the loopback quickstart).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Cross-origin requests from web pages: off unless configured.
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// HTTPS (HTTP/2 and HTTP/1.1): off unless configured, when the port serves plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Sharded mode (with `[kafka]`): fold only the partitions the group assigns, plus
    /// standby copies; off unless configured, when every server folds every partition.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// How reducers' reactions are relayed from the outbox.
    #[serde(default)]
    pub reactions: ReactionsConfig,
    /// Request/reply over Kafka (with `[kafka]`): off unless configured.
    #[serde(default)]
    pub requests: Option<RequestsConfig>,
    #[serde(default)]
    pub limits: Limits,
}

/// `[reactions]`: the relay of what reducers emit (see ARCHITECTURE.md, "Reactions").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactionsConfig {
    /// This server relays the outbox of the partitions it folds (sharded: of those it owns).
    /// Of unsharded replicas folding the same partitions, let one relay.
    #[serde(default = "yes")]
    pub relay: bool,
    /// With Kafka: relay in transactions, each with the relay's position (exactly once for
    /// consumers reading committed records), for brokers that implement them. The default
    /// (`false`) needs none: acknowledged produces of the idempotent producer, the position
    /// after them, and after a crash or a takeover the relay reads back what it wrote to each
    /// output partition and skips it: exactly once for any reader.
    #[serde(default)]
    pub transactional: bool,
}

/// `[requests]`: request/reply over Kafka (the Resonate Kafka API): the servers sharing
/// `group` consume `topic`, answer the requests addressed to `target` on each request's
/// reply topic, and drop the others.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestsConfig {
    /// The request topic.
    #[serde(default = "default_requests_topic")]
    pub topic: String,
    /// The target this server answers for.
    #[serde(default = "default_requests_target")]
    pub target: String,
    /// The consumer group the servers of this target share (default: `[kafka] group_id` +
    /// `.requests.` + target: each target reads every request once, and drops the others').
    #[serde(default)]
    pub group: Option<String>,
}

pub fn default_requests_topic() -> String {
    "statefold-requests".into()
}

pub fn default_requests_target() -> String {
    "statefold".into()
}

impl Default for RequestsConfig {
    fn default() -> Self {
        RequestsConfig { topic: default_requests_topic(), target: default_requests_target(), group: None }
    }
}

impl Default for ReactionsConfig {
    fn default() -> Self {
        ReactionsConfig { relay: true, transactional: false }
    }
}

fn yes() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_data_dir() -> PathBuf {
    "data".into()
}

fn default_reducers_dir() -> PathBuf {
    "reducers".into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            data_dir: default_data_dir(),
            reducers_dir: default_reducers_dir(),
            kinds: Vec::new(),
            kafka: None,
            read_only: false,
            auth: None,
            cors: None,
            tls: None,
            cluster: None,
            reactions: ReactionsConfig::default(),
            requests: None,
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Reads a TOML file. Paths in it are relative to the file's directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        config.reducers_dir = base.join(&config.reducers_dir);
        if let Some(key) = config.auth.as_mut().and_then(|a| a.public_key_file.as_mut()) {
            *key = base.join(&*key);
        }
        if let Some(tls) = config.tls.as_mut() {
            tls.cert_file = base.join(&tls.cert_file);
            tls.key_file = base.join(&tls.key_file);
        }
        Ok(config)
    }

    /// The reducer file of a kind.
    pub fn reducer_path(&self, kind: &KindConfig) -> PathBuf {
        self.reducers_dir.join(&kind.reducer)
    }

    /// Checks everything that can be checked without opening anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits.validate()?;
        self.validate_http()?;
        self.validate_kafka()?;
        self.validate_kinds()
    }

    /// `[cors]`, `[tls]` and `[auth]`.
    fn validate_http(&self) -> Result<(), ConfigError> {
        if let Some(cors) = &self.cors {
            if cors.allowed_origins.is_empty() {
                return invalid("[cors] allowed_origins", "name at least one origin");
            }
            for origin in &cors.allowed_origins {
                if origin == "*" || !origin.bytes().all(|b| b.is_ascii_graphic()) || !origin.contains("://") {
                    return invalid(
                        "[cors] allowed_origins",
                        format!("{origin:?} is not an origin like https://app.example.com"),
                    );
                }
            }
        }
        if let Some(tls) = &self.tls
            && (tls.reload_interval_ms == 0 || tls.handshake_timeout_ms == 0)
        {
            return invalid("[tls] reload_interval_ms and handshake_timeout_ms", "must be positive");
        }
        if let Some(auth) = &self.auth {
            if auth.public_key_file.is_none() && auth.hs256_secret.is_none() {
                return invalid("[auth]", "set public_key_file or hs256_secret");
            }
            if auth.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
                return invalid("[auth] hs256_secret", "at least 32 bytes");
            }
            if auth.audience.is_empty() {
                return invalid("[auth] audience", "must not be empty");
            }
        }
        Ok(())
    }

    /// `[kafka]`, `[requests]` and `[cluster]`.
    fn validate_kafka(&self) -> Result<(), ConfigError> {
        if let Some(kafka) = &self.kafka {
            if kafka.brokers.trim().is_empty() {
                return invalid("kafka.brokers", "empty: give host:port[,host:port...]");
            }
            if kafka.group_id.is_empty() {
                return invalid("kafka.group_id", "empty");
            }
        }
        if let Some(requests) = &self.requests {
            if self.kafka.is_none() {
                return invalid("[requests]", "needs [kafka]: requests and replies are Kafka records");
            }
            if let Err(e) = crate::model::validate_topic(&requests.topic) {
                return invalid("requests.topic", e.to_string());
            }
            if requests.target.is_empty() {
                return invalid("requests.target", "empty");
            }
        }
        if let Some(cluster) = &self.cluster {
            if self.kafka.is_none() {
                return invalid("[cluster]", "needs [kafka]: servers share partitions of Kafka topics");
            }
            let url = &cluster.advertise_url;
            let scheme = url.starts_with("http://") || url.starts_with("https://");
            let rest = url.split_once("://").map_or("", |(_, rest)| rest);
            if !scheme
                || rest.is_empty()
                || rest.contains(['/', '?', '#'])
                || !url.bytes().all(|b| b.is_ascii_graphic())
            {
                return invalid(
                    "[cluster] advertise_url",
                    format!("{url:?}: expected a base URL like https://statefold-1.internal:8443 (no path)"),
                );
            }
            if cluster.topic.is_empty() {
                return invalid("[cluster] topic", "empty");
            }
            let limits = &self.limits;
            if limits.cluster_heartbeat_interval_ms == 0
                || limits.cluster_member_timeout_ms <= limits.cluster_heartbeat_interval_ms
            {
                return invalid(
                    "limits.cluster_member_timeout_ms",
                    "must be longer than cluster_heartbeat_interval_ms (> 0)",
                );
            }
        }
        Ok(())
    }

    /// The kinds: at least one, names and topics well-formed and distinct, reducers there.
    fn validate_kinds(&self) -> Result<(), ConfigError> {
        if self.kinds.is_empty() {
            return invalid(
                "[[kind]]",
                "no kinds configured: add [[kind]] sections (name, reducer, topic) or --kind NAME=FILE.wasm",
            );
        }
        let mut names = std::collections::HashSet::new();
        let mut topics = std::collections::HashSet::new();
        for kind in &self.kinds {
            let valid = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.')
            };
            if !valid(&kind.name) {
                return invalid(format!("kind name {:?}", kind.name), "use 1 to 64 of a-z 0-9 _ - .");
            }
            if !valid(kind.topic()) {
                return invalid(
                    format!("kind {:?}: topic {:?}", kind.name, kind.topic()),
                    "use 1 to 64 of a-z 0-9 _ - .",
                );
            }
            if !names.insert(&kind.name) {
                return invalid(format!("kind {:?}", kind.name), "configured twice");
            }
            if !topics.insert(kind.topic()) {
                return invalid(format!("topic {:?}", kind.topic()), "feeds two kinds; each kind needs its own topic");
            }
            let path = self.reducer_path(kind);
            if !path.is_file() {
                return invalid(format!("kind {:?}", kind.name), format!("reducer file {} not found", path.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_limits_and_kinds() {
        let config: Config = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            [limits]
            diff_bytes_max = 2048
            [[kind]]
            name = "counter"
            reducer = "counter.wasm"
            "#,
        )
        .unwrap();
        assert_eq!(config.limits.diff_bytes_max, 2048);
        assert_eq!(config.limits.batch_records_max, Limits::default().batch_records_max);
        assert_eq!(config.kinds[0].topic(), "counter");
        let typo = toml::from_str::<Config>("[limits]\ndiff_byte_max = 1\n").unwrap_err();
        assert!(typo.to_string().contains("unknown field `diff_byte_max`"), "{typo}");
        let zero = Limits { batch_records_max: 0, ..Limits::default() };
        assert_eq!(zero.validate().unwrap_err().to_string(), "limits.batch_records_max: must be positive");
        assert_eq!(
            KindConfig::parse_flag("doc=document.wasm@docs").unwrap(),
            KindConfig { name: "doc".into(), reducer: "document.wasm".into(), topic: Some("docs".into()) }
        );
        assert!(KindConfig::parse_flag("nope").is_err());
    }

    /// `[cluster] route` parses as `--cluster-route` does (one `FromStr`).
    #[test]
    fn the_route_mode_parses_one_way_in_the_file_and_the_flag() {
        let cluster = |route: &str| {
            toml::from_str::<Config>(&format!("[cluster]\nadvertise_url = \"http://a:1\"\nroute = \"{route}\"\n"))
                .map(|config| config.cluster.expect("a [cluster]").route)
        };
        assert_eq!(cluster("redirect").unwrap(), RouteMode::Redirect);
        assert_eq!(cluster("proxy").unwrap(), "proxy".parse::<RouteMode>().unwrap());
        let bad = cluster("Redirect").unwrap_err().to_string();
        assert!(bad.contains("\"Redirect\" is not a route mode: proxy or redirect"), "{bad}");
    }
}
