//! Prometheus metrics, through `prometheus-client`: one [`Registry`] per process, every
//! series with `# HELP` text, counters named `*_total`, histograms in seconds.
//!
//! Counters and histograms are updated where things happen (the fold thread, the store's
//! commits, SSE streams, HTTP requests, reducer calls). Gauges that describe a state
//! (readiness, subscribers, each partition's position and lag, replicas) are set from
//! that state when `/metrics` is scraped ([`Metrics::encode`] takes a [`Gauges`]).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::store::Committed;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The route's pattern (`/v1/models/{kind}/{id}`), never the path itself: one series
    /// per route, whatever the ids.
    pub route: String,
    pub status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// 100 µs to ~26 s in 19 steps of 2x: a fold, a commit, a call or a request.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every series Statefold exports.
pub struct Metrics {
    registry: Registry,
    pub fold_batches: Counter,
    pub diffs_applied: Counter,
    pub records_rejected: Family<CodeLabels, Counter>,
    pub fold_batch_seconds: Histogram,
    pub store_commits: Counter,
    pub store_commit_entries: Counter,
    pub store_commit_bytes: Counter,
    pub store_commit_seconds: Histogram,
    pub deploy_records_folded: Counter,
    deploy_batch_max_seconds: Gauge<f64, AtomicU64>,
    pub reducer_call_seconds: Histogram,
    pub catchup_plan_seconds: Histogram,
    pub sse_publish_delay_seconds: Histogram,
    pub sse_lagged: Counter,
    pub http_request_seconds: HistogramFamily<RequestLabels>,
    ready: Gauge,
    kind_stopped: Family<KindLabels, Gauge>,
    sse_subscribers: Gauge,
    source_next_offset: Family<PartitionLabels, Gauge>,
    source_lag: Family<PartitionLabels, Gauge>,
    /// Counted by the attestor.
    pub replica_digests_compared: Counter,
    replica_peers_disagreeing: Gauge,
    replica_diverged: Gauge,
    cluster_members: Gauge,
    cluster_partitions: Family<RoleLabels, Gauge>,
    /// Counted by the relay.
    pub reactions_relayed: Counter,
    requests_answered: Family<CodeLabels, Counter>,
    requests_dropped: Family<ReasonLabels, Counter>,
    request_seconds: Histogram,
    outbox_pending: Gauge,
}

/// The state-describing values, read when `/metrics` is scraped.
pub struct Gauges {
    pub ready: bool,
    /// Each kind, and whether its folding is stopped.
    pub kinds_stopped: Vec<(String, bool)>,
    pub sse_subscribers: usize,
    /// (topic, partition, next offset, lag when the end is known).
    pub partitions: Vec<(String, u32, u64, Option<u64>)>,
    /// With replicas compared (Kafka with an attestation topic): peers that disagree now,
    /// and whether this replica is the odd one out.
    pub replicas: Option<(usize, bool)>,
    /// Sharded mode: live members, and this server's partitions owned, folded, served.
    pub cluster: Option<ClusterGauges>,
    /// Reactions committed to the outbox and not relayed yet.
    pub outbox_pending: u64,
}

/// Sharded mode's gauges.
pub struct ClusterGauges {
    pub members: usize,
    pub owned: usize,
    pub folded: usize,
    pub served: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("statefold");
        let m = Metrics {
            fold_batches: Counter::default(),
            diffs_applied: Counter::default(),
            records_rejected: Family::default(),
            fold_batch_seconds: latency(),
            store_commits: Counter::default(),
            store_commit_entries: Counter::default(),
            store_commit_bytes: Counter::default(),
            store_commit_seconds: latency(),
            deploy_records_folded: Counter::default(),
            deploy_batch_max_seconds: Gauge::default(),
            reducer_call_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 25)),
            catchup_plan_seconds: latency(),
            sse_publish_delay_seconds: latency(),
            sse_lagged: Counter::default(),
            http_request_seconds: Family::new_with_constructor(latency),
            ready: Gauge::default(),
            kind_stopped: Family::default(),
            sse_subscribers: Gauge::default(),
            source_next_offset: Family::default(),
            source_lag: Family::default(),
            replica_digests_compared: Counter::default(),
            replica_peers_disagreeing: Gauge::default(),
            replica_diverged: Gauge::default(),
            cluster_members: Gauge::default(),
            reactions_relayed: Counter::default(),
            requests_answered: Family::default(),
            requests_dropped: Family::default(),
            request_seconds: latency(),
            outbox_pending: Gauge::default(),
            cluster_partitions: Family::default(),
            registry: Registry::default(),
        };
        m.register_fold_and_store(&mut registry);
        m.register_serving(&mut registry);
        Metrics { registry, ..m }
    }

    /// The fold's, the store's, deploys' and reducers' series, and catch-up planning.
    fn register_fold_and_store(&self, registry: &mut Registry) {
        registry.register("fold_batches", "Batches folded and committed", self.fold_batches.clone());
        registry.register("diffs_applied", "Diffs applied to models", self.diffs_applied.clone());
        registry.register(
            "records_rejected",
            "Records not applied, by rejection code (see GET /v1/kinds/{kind}/rejections)",
            self.records_rejected.clone(),
        );
        registry.register_with_unit(
            "fold_batch",
            "Time to fold one batch (reducer calls included, commit excluded)",
            Unit::Seconds,
            self.fold_batch_seconds.clone(),
        );
        registry.register("store_commits", "RocksDB WriteBatches committed by the fold", self.store_commits.clone());
        registry.register(
            "store_commit_entries",
            "Puts and range deletes the fold's commits wrote",
            self.store_commit_entries.clone(),
        );
        registry.register(
            "store_commit_bytes",
            "Bytes of keys and values the fold's commits wrote",
            self.store_commit_bytes.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Time to commit one WriteBatch (checks, write, sync)",
            Unit::Seconds,
            self.store_commit_seconds.clone(),
        );
        registry.register("deploy_records_folded", "Deploy records folded", self.deploy_records_folded.clone());
        registry.register(
            "deploy_batch_max_seconds",
            "The longest batch that folded a deploy record (compiling a new version included)",
            self.deploy_batch_max_seconds.clone(),
        );
        registry.register_with_unit(
            "reducer_call",
            "Time of one reducer apply call (a model's run of diffs in a batch)",
            Unit::Seconds,
            self.reducer_call_seconds.clone(),
        );
        registry.register_with_unit(
            "catchup_plan",
            "Time to plan what a client at a hash is sent (patch, diffs or snapshot)",
            Unit::Seconds,
            self.catchup_plan_seconds.clone(),
        );
        registry.register_with_unit(
            "sse_publish_delay",
            "From a live diff's publication (after its commit) to its SSE event being written",
            Unit::Seconds,
            self.sse_publish_delay_seconds.clone(),
        );
        registry.register(
            "sse_lagged",
            "Times an SSE subscriber fell a full queue behind (it was sent a patch instead)",
            self.sse_lagged.clone(),
        );
    }

    /// HTTP and SSE, readiness, the source, replicas, the cluster, reactions and requests.
    fn register_serving(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "http_request",
            "HTTP request time to the response head, by method, route and status",
            Unit::Seconds,
            self.http_request_seconds.clone(),
        );
        registry.register("ready", "1 when ready (caught up, store writable, not diverged)", self.ready.clone());
        registry.register(
            "kind_stopped",
            "1 when a kind's folding is stopped: its topic is not the log this store folded (see /readyz)",
            self.kind_stopped.clone(),
        );
        registry.register("sse_subscribers", "SSE streams open", self.sse_subscribers.clone());
        registry.register("source_next_offset", "Next offset to fold, per partition", self.source_next_offset.clone());
        registry.register("source_lag", "Records in the log not folded yet, per partition", self.source_lag.clone());
        registry.register(
            "replica_digests_compared",
            "Attestation points compared with other replicas",
            self.replica_digests_compared.clone(),
        );
        registry.register(
            "replica_peers_disagreeing",
            "Replicas whose latest digest differs from this one's",
            self.replica_peers_disagreeing.clone(),
        );
        registry.register(
            "replica_diverged",
            "1 when this replica disagrees with at least as many replicas as agree with it",
            self.replica_diverged.clone(),
        );
        registry.register(
            "cluster_members",
            "Sharded mode: servers heard from, this one included",
            self.cluster_members.clone(),
        );
        registry.register(
            "cluster_partitions",
            "Sharded mode: this server's partitions, by role (owned: assigned by the group; folded: owned, standby or held; served: requests answered here)",
            self.cluster_partitions.clone(),
        );
        registry.register(
            "reactions_relayed",
            "Reactions this server relayed from its outbox to their topics",
            self.reactions_relayed.clone(),
        );
        registry.register(
            "requests_answered",
            "Requests over Kafka answered, by code (ok, or the error's code)",
            self.requests_answered.clone(),
        );
        registry.register(
            "requests_dropped",
            "Requests over Kafka dropped unanswered, by reason (other_target, malformed)",
            self.requests_dropped.clone(),
        );
        registry.register(
            "request_seconds",
            "Requests over Kafka: from taking the request to the reply being sent",
            self.request_seconds.clone(),
        );
        registry.register(
            "outbox_pending",
            "Reactions committed with their diffs and not relayed yet (the outbox's lag)",
            self.outbox_pending.clone(),
        );
    }

    /// The fold committed a WriteBatch in `took`.
    pub fn committed(&self, committed: Committed, took: Duration) {
        self.store_commits.inc();
        self.store_commit_entries.inc_by(committed.entries);
        self.store_commit_bytes.inc_by(committed.bytes);
        self.store_commit_seconds.observe(took.as_secs_f64());
    }

    /// A batch that folded `records` deploy records took `took` (compile included).
    pub fn deploys_folded(&self, records: usize, took: Duration) {
        self.deploy_records_folded.inc_by(records as u64);
        let seconds = took.as_secs_f64();
        if seconds > self.deploy_batch_max_seconds.get() {
            // The fold thread is the only writer: no lost update.
            self.deploy_batch_max_seconds.set(seconds);
        }
    }

    /// A request over Kafka answered (`code`: the error's, `None` for success) in `took`.
    pub fn request_answered(&self, code: Option<&str>, took: Duration) {
        let code = code.unwrap_or("ok").to_owned();
        self.requests_answered.get_or_create(&CodeLabels { code }).inc();
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// A request over Kafka dropped: another target's, or not a request.
    pub fn request_dropped(&self, reason: &'static str) {
        self.requests_dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn rejected(&self, code: &str) {
        self.records_rejected.get_or_create(&CodeLabels { code: code.to_owned() }).inc();
    }

    /// The Prometheus text exposition (0.0.4) of every series, `gauges` as they stand.
    pub fn encode(&self, gauges: Gauges) -> String {
        self.ready.set(i64::from(gauges.ready));
        for (kind, stopped) in gauges.kinds_stopped {
            self.kind_stopped.get_or_create(&KindLabels { kind }).set(i64::from(stopped));
        }
        self.sse_subscribers.set(gauges.sse_subscribers as i64);
        self.outbox_pending.set(gauges.outbox_pending as i64);
        // Only the partitions read now (sharded mode moves them).
        self.source_next_offset.clear();
        self.source_lag.clear();
        for (topic, partition, next, lag) in gauges.partitions {
            let labels = PartitionLabels { topic, partition: partition.to_string() };
            self.source_next_offset.get_or_create(&labels).set(next as i64);
            match lag {
                Some(lag) => {
                    self.source_lag.get_or_create(&labels).set(lag as i64);
                }
                None => {
                    self.source_lag.remove(&labels);
                }
            }
        }
        if let Some(cluster) = gauges.cluster {
            self.cluster_members.set(cluster.members as i64);
            for (role, n) in [("owned", cluster.owned), ("folded", cluster.folded), ("served", cluster.served)] {
                self.cluster_partitions.get_or_create(&RoleLabels { role }).set(n as i64);
            }
        }
        if let Some((disagreeing, diverged)) = gauges.replicas {
            self.replica_peers_disagreeing.set(disagreeing as i64);
            self.replica_diverged.set(i64::from(diverged));
        }
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
