//! Sharded mode: which partitions this server folds and serves, and where the others are.
//!
//! **Ownership** comes from Kafka: every server joins the consumer group `[kafka] group_id`
//! with the cooperative-sticky assignor, subscribed to the kinds' topics. That consumer
//! never reads a record (each assigned partition is paused at its end): the group only says
//! which partitions this server owns, and takes them away from a server that stops
//! heartbeating (`cluster_session_timeout_ms`). It also carries the group's committed
//! offsets: the owned partitions' folded positions, for lag monitoring only.
//!
//! **The map** comes from the cluster topic: every `cluster_heartbeat_interval_ms` each
//! server publishes an [`Announce`] (its advertised URL, the partitions it owns, and for
//! each partition it folds: next offset, end, whether it has caught up). Each server reads
//! the others'; one not heard from for `cluster_member_timeout_ms` is taken for gone.
//!
//! **What a server folds** ([`Cluster::wanted`]): the partitions it owns; those it is a
//! standby of (the `standbys` members ranked first for the partition by a hash of (member,
//! topic, partition), the owner left out: the same ranking on every server, and a departed
//! member's partitions keep most of their standbys); and the partitions it folds already and
//! whose owner has not caught up yet, so that a warm copy serves until the new owner can.
//!
//! **Where a request goes** ([`Cluster::route`]): the owner, once it has caught up; before
//! that (a rebalance, a failover), a server that has caught up on the partition, this one
//! first, else the one least behind. Folding is deterministic, so two servers that fold a
//! partition publish the same hash for the same (model, seq): which one serves is a matter
//! of freshness, never of correctness.

mod group;
mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::kafka::{Role, client_config, kafka_settings, partition_count};
use super::{BrokerError, SourceStatus};
use crate::settings::{ClusterConfig, KafkaConfig, RouteMode, SourceLimits};
use group::*;
use routes::*;

/// A topic's partition.
pub type Partition = (String, u32);

/// What one server says of itself on the cluster topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    pub member: String,
    pub url: String,
    /// Partitions the group assigned to it.
    pub owned: Vec<Partition>,
    /// When it was last assigned or revoked a partition (its wall clock, ms): of two
    /// members of one generation claiming a partition for a moment, the later claim is the
    /// owner.
    pub claimed_ms: i64,
    /// The consumer group's generation its `owned` is of (-1: not in the group yet, or an
    /// announcement from a server before generations were announced). Of two claims of one
    /// partition, the newer generation's wins: a server never routes by a claim the group
    /// has superseded.
    #[serde(default = "no_generation")]
    pub generation: i32,
    /// Every partition it folds.
    pub folding: Vec<Folding>,
    pub sent_ms: i64,
}

fn no_generation() -> i32 {
    -1
}

/// One partition a server folds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folding {
    pub topic: String,
    pub partition: u32,
    /// The next offset it will fold.
    pub next: u64,
    /// The log's end when it last looked.
    pub end: Option<u64>,
    /// It has folded up to the end the log had when it started folding the partition.
    pub ready: bool,
}

impl Folding {
    pub fn lag(&self) -> Option<u64> {
        self.end.map(|end| end.saturating_sub(self.next))
    }
}

/// Where a request for a model on a partition goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This server serves it.
    Local,
    /// Another server does: its advertised URL.
    Elsewhere { member: String, url: String },
    /// No server has caught up on the partition (a rebalance is under way).
    Unavailable(String),
}

/// One partition of the map, for `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionMap {
    pub topic: String,
    pub partition: u32,
    pub owner: Option<String>,
    pub standbys: Vec<String>,
    /// Every server folding it, with how far it is behind.
    pub folders: Vec<Folder>,
    /// Where a request for one of its models goes now.
    pub serves: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Folder {
    pub member: String,
    pub next: u64,
    pub lag: Option<u64>,
    pub ready: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub member: String,
    pub url: String,
    pub owned: usize,
    pub folding: usize,
    /// The group generation its announced ownership is of.
    pub generation: i32,
    /// Milliseconds since it was last heard from (0: this server).
    pub heard_ms: u64,
}

/// The whole map, as this server sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    pub member: String,
    pub url: String,
    /// The newest group generation heard (each member's own is in `members`); of two
    /// claims of a partition, the newer generation's wins.
    pub generation: i32,
    pub standbys: usize,
    pub members: Vec<MemberView>,
    pub partitions: Vec<PartitionMap>,
}

struct Heard {
    announce: Announce,
    at: Instant,
}

#[derive(Default)]
struct Inner {
    /// What the group assigned to this server.
    owned: BTreeSet<Partition>,
    claimed_ms: i64,
    /// The group's generation, as librdkafka last said.
    generation: i32,
    /// Publish this server's announcement at once (its ownership or generation changed).
    announce_now: bool,
    /// The other members, as last heard.
    members: BTreeMap<String, Heard>,
    /// What this server should fold (see [`Cluster::wanted`]).
    wanted: BTreeSet<Partition>,
    /// Where each partition's requests go, as of the last [`Cluster::settle`].
    routes: BTreeMap<Partition, Route>,
    /// The kinds' topics' partition counts, as of the last [`Cluster::settle`].
    counts: BTreeMap<String, u32>,
    /// A settle has seen the topics: the fold thread then knows what to fold, even if
    /// that is nothing yet.
    settled: bool,
}

/// This server's view of the cluster. Shared by the fold thread (what to fold), the HTTP side
/// (where a request goes) and the cluster thread (the group and the cluster topic).
pub struct Cluster {
    member: String,
    url: String,
    standbys: usize,
    mode: RouteMode,
    timeout: Duration,
    status: Arc<SourceStatus>,
    inner: Mutex<Inner>,
    /// Bumped when what this server should fold changes (read by the fold thread).
    wanted_generation: AtomicU64,
    /// Bumped when a route may have changed (read by streams, which end when their model
    /// moves).
    routes: watch::Sender<u64>,
    /// Why this server cannot see the cluster (the cluster topic unreadable).
    problem: Mutex<Option<String>>,
}

impl Cluster {
    /// Joins the group and starts the cluster thread (until `stop`).
    pub fn start(
        cluster: &ClusterConfig,
        kafka: &KafkaConfig,
        limits: &SourceLimits,
        member: String,
        topics: Vec<String>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> anyhow::Result<(Arc<Cluster>, std::thread::JoinHandle<()>)> {
        let this = Arc::new(Cluster {
            member,
            url: cluster.advertise_url.clone(),
            standbys: cluster.standbys,
            mode: cluster.route,
            timeout: Duration::from_millis(limits.cluster_member_timeout_ms),
            status,
            inner: Mutex::new(Inner { generation: no_generation(), ..Inner::default() }),
            wanted_generation: AtomicU64::new(0),
            routes: watch::Sender::new(0),
            problem: Mutex::new(Some(format!("joining the cluster (topic {:?})", cluster.topic))),
        });
        let mut group = kafka_settings(kafka, limits, Role::Consumer);
        group.insert("partition.assignment.strategy".into(), "cooperative-sticky".into());
        group.insert("session.timeout.ms".into(), limits.cluster_session_timeout_ms.to_string());
        group.insert("heartbeat.interval.ms".into(), (limits.cluster_session_timeout_ms / 5).max(100).to_string());
        // It reads nothing: assigned partitions are paused at their end.
        group.insert("auto.offset.reset".into(), "latest".into());
        let group: BaseConsumer<GroupContext> = client_config(&group)
            .create_with_context(GroupContext { cluster: Arc::downgrade(&this) })
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka group consumer: {e}"))?;
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        group.subscribe(&topic_refs).map_err(|e| anyhow::anyhow!("cannot join the consumer group: {e}"))?;
        let mut reader_config = kafka.clone();
        reader_config.group_id = format!("{}.cluster.{}", kafka.group_id, this.member);
        let mut reader = kafka_settings(&reader_config, limits, Role::Consumer);
        reader.insert("fetch.wait.max.ms".into(), (limits.cluster_heartbeat_interval_ms / 2).max(10).to_string());
        let reader: BaseConsumer = client_config(&reader).create()?;
        let producer: ThreadedProducer<DefaultProducerContext> =
            client_config(&kafka_settings(kafka, limits, Role::Producer)).create()?;
        tracing::info!(member = %this.member, url = %this.url, group = %kafka.group_id, topic = %cluster.topic, standbys = this.standbys, "sharded mode: joining the cluster");
        let thread = {
            let (this, topic) = (this.clone(), cluster.topic.clone());
            let interval = Duration::from_millis(limits.cluster_heartbeat_interval_ms);
            let commit_interval = Duration::from_millis(limits.kafka_commit_interval_ms);
            std::thread::Builder::new()
                .name("cluster".into())
                .spawn(move || this.run(&group, &reader, &producer, &topic, interval, commit_interval, &stop))?
        };
        Ok((this, thread))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why this server cannot see the other servers (`None`: all is well).
    pub fn problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn mode(&self) -> RouteMode {
        self.mode
    }

    /// Changes of the routes: a stream looks at its model's route again on each.
    pub fn route_changes(&self) -> watch::Receiver<u64> {
        self.routes.subscribe()
    }

    /// What this server should fold, if that changed since `seen` (which is updated).
    pub fn wanted_since(&self, seen: &mut u64) -> Option<BTreeSet<Partition>> {
        let generation = self.wanted_generation.load(Ordering::Acquire);
        if generation == *seen {
            return None;
        }
        *seen = generation;
        Some(self.lock().wanted.clone())
    }

    /// What this server folds now, as its announcement says it.
    fn folding(&self) -> BTreeMap<Partition, Folding> {
        self.status
            .partitions()
            .into_iter()
            .filter(|(_, p)| p.folding)
            .map(|((topic, partition), p)| {
                let folding = Folding { topic: topic.clone(), partition, next: p.next, end: p.end, ready: p.ready };
                ((topic, partition), folding)
            })
            .collect()
    }

    /// This server's announcement: what it owns and folds now.
    fn own(&self, inner: &Inner, sent_ms: i64) -> Announce {
        Announce {
            member: self.member.clone(),
            url: self.url.clone(),
            owned: inner.owned.iter().cloned().collect(),
            claimed_ms: inner.claimed_ms,
            generation: inner.generation,
            folding: self.folding().into_values().collect(),
            sent_ms,
        }
    }

    /// Every live member's announcement, this server's included.
    fn members(&self, inner: &Inner) -> Vec<Announce> {
        let mut all: Vec<Announce> =
            inner.members.values().filter(|h| h.at.elapsed() < self.timeout).map(|h| h.announce.clone()).collect();
        all.push(self.own(inner, 0));
        all.sort_by(|a, b| a.member.cmp(&b.member));
        all
    }

    /// The partition counts of the kinds' topics, as the source has seen them.
    fn counts(&self) -> BTreeMap<String, u32> {
        let mut counts = BTreeMap::new();
        for ((topic, partition), _) in self.status.partitions() {
            let count = counts.entry(topic).or_insert(0);
            *count = (*count).max(partition + 1);
        }
        counts
    }

    /// Where a request for the model `key` of `topic` goes: the route of its partition
    /// ([`statefold_core::model::partition_of`] among the topic's partitions).
    ///
    /// A request that another server already sent here (`hopped`) takes no second hop: it is
    /// served here if this server folds the partition and has caught up on it (any server
    /// that folds it publishes the same hashes; the client's hash says how far it is), and
    /// is otherwise unavailable. Two servers whose maps disagree for a moment therefore
    /// cannot send a request back and forth.
    pub fn route_of(&self, topic: &str, key: &[u8], hopped: bool) -> Route {
        let inner = self.lock();
        let Some(&count) = inner.counts.get(topic) else {
            return Route::Unavailable(format!("the partitions of topic {topic:?} are not known yet"));
        };
        let partition = statefold_core::model::partition_of(key, count);
        let route = route_in_table(&inner, topic, partition);
        drop(inner);
        if !hopped {
            return route;
        }
        after_hop(route, self.status.is_ready(topic, partition), topic, partition)
    }

    /// The number of partitions of `topic`, as of the last look at the cluster (0: not
    /// known yet).
    pub fn partition_count(&self, topic: &str) -> u32 {
        self.lock().counts.get(topic).copied().unwrap_or(0)
    }

    /// Where a request for a model on (`topic`, `partition`) goes (as of the last look at
    /// the cluster, at most `cluster_heartbeat_interval_ms` ago).
    pub fn route(&self, topic: &str, partition: u32) -> Route {
        route_in_table(&self.lock(), topic, partition)
    }

    /// For `/metrics`: (live members, partitions owned, partitions served here).
    pub fn summary(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        let members = 1 + inner.members.values().filter(|h| h.at.elapsed() < self.timeout).count();
        let served = inner.routes.values().filter(|r| **r == Route::Local).count();
        (members, inner.owned.len(), served)
    }
}

impl Cluster {
    /// The whole map, for `GET /v1/cluster`.
    pub fn view(&self) -> ClusterView {
        let inner = self.lock();
        let members = self.members(&inner);
        let generation = newest_generation(&members);
        let mut partitions = Vec::new();
        for (topic, count) in self.counts() {
            for partition in 0..count {
                let owner = owner_of(&members, &topic, partition).map(|a| a.member.clone());
                let standbys = standbys_of(&members, owner.as_deref(), self.standbys, &topic, partition);
                let folders = members
                    .iter()
                    .filter_map(|a| {
                        let f = a.folding.iter().find(|f| f.topic == topic && f.partition == partition)?;
                        Some(Folder { member: a.member.clone(), next: f.next, lag: f.lag(), ready: f.ready })
                    })
                    .collect();
                let serves = match route_in(&members, &self.member, &topic, partition) {
                    Route::Local => Some(self.member.clone()),
                    Route::Elsewhere { member, .. } => Some(member),
                    Route::Unavailable(_) => None,
                };
                partitions.push(PartitionMap { topic: topic.clone(), partition, owner, standbys, folders, serves });
            }
        }
        let members = members
            .iter()
            .map(|a| MemberView {
                member: a.member.clone(),
                url: a.url.clone(),
                owned: a.owned.len(),
                folding: a.folding.len(),
                generation: a.generation,
                heard_ms: inner.members.get(&a.member).map_or(0, |h| h.at.elapsed().as_millis() as u64),
            })
            .collect();
        ClusterView {
            member: self.member.clone(),
            url: self.url.clone(),
            generation,
            standbys: self.standbys,
            members,
            partitions,
        }
    }

    /// Works out what this server should fold and where each partition's requests go from
    /// what it knows now; tells the fold thread and the streams what changed.
    fn settle(&self) {
        let mut inner = self.lock();
        let members = self.members(&inner);
        let me = members.iter().find(|a| a.member == self.member).expect("members() includes this server");
        let counts = self.counts();
        let mut wanted = BTreeSet::new();
        let mut routes = BTreeMap::new();
        for (topic, &count) in &counts {
            for partition in 0..count {
                let key = (topic.clone(), partition);
                routes.insert(key.clone(), route_in(&members, &self.member, topic, partition));
                let owner = owner_of(&members, topic, partition);
                // Every partition the group assigned to this server is folded here, whatever
                // another's claim says (folding more is never wrong; it may be needed).
                let mine = inner.owned.contains(&key)
                    || owner.is_some_and(|o| o.member == self.member)
                    || standbys_of(&members, owner.map(|o| o.member.as_str()), self.standbys, topic, partition)
                        .contains(&self.member);
                // A warm copy is kept until the owner has caught up.
                let owner_ready = owner.is_some_and(|o| ready_in(o, topic, partition));
                let folded = me.folding.iter().any(|f| f.topic == *topic && f.partition == partition);
                let held = folded && !owner_ready;
                if mine || held {
                    wanted.insert(key);
                }
            }
        }
        inner.counts = counts;
        let first = !inner.settled && !routes.is_empty();
        inner.settled |= first;
        if wanted != inner.wanted || first {
            tracing::info!(
                folds = %wanted.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(","),
                owns = %inner.owned.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(","),
                "the partitions this server folds changed"
            );
            inner.wanted = wanted;
            self.wanted_generation.fetch_add(1, Ordering::AcqRel);
        }
        if routes != inner.routes {
            inner.routes = routes;
            drop(inner);
            self.routes.send_modify(|n| *n += 1);
        }
    }

    /// The partitions the group assigned to this server.
    pub fn owned(&self) -> BTreeSet<Partition> {
        self.lock().owned.clone()
    }

    /// The group assigned or revoked partitions.
    fn rebalanced(&self, assigned: &[Partition], revoked: &[Partition]) {
        if assigned.is_empty() && revoked.is_empty() {
            return;
        }
        {
            let mut inner = self.lock();
            for p in revoked {
                inner.owned.remove(p);
            }
            inner.owned.extend(assigned.iter().cloned());
            inner.claimed_ms = super::now_ms();
            inner.announce_now = true;
            tracing::info!(
                assigned = assigned.len(),
                revoked = revoked.len(),
                owns = %inner.owned.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>().join(","),
                "the group rebalanced"
            );
        }
        self.settle();
    }

    /// Takes another member's announcement; whether it was one (not this server's own, nor
    /// stale).
    fn heard(&self, announce: Announce) -> bool {
        if announce.member == self.member {
            return false;
        }
        // A stale announcement (read back from before this server started) names no live
        // member.
        let age = super::now_ms().saturating_sub(announce.sent_ms);
        if age > self.timeout.as_millis() as i64 {
            return false;
        }
        let mut inner = self.lock();
        inner.members.insert(announce.member.clone(), Heard { announce, at: Instant::now() });
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        group: &BaseConsumer<GroupContext>,
        reader: &BaseConsumer,
        producer: &ThreadedProducer<DefaultProducerContext>,
        topic: &str,
        interval: Duration,
        commit_interval: Duration,
        stop: &CancellationToken,
    ) {
        let mut assigned = false;
        let mut last_sent = Instant::now() - interval;
        let mut last_commit = Instant::now();
        let mut committed: BTreeMap<Partition, u64> = BTreeMap::new();
        while !stop.is_cancelled() {
            // The group: heartbeats, rebalances (through GroupContext). Records never come:
            // every assigned partition is paused.
            if let Some(Err(e)) = group.poll(Duration::ZERO) {
                tracing::debug!(error = %e, "cluster group consumer");
            }
            if let Some(generation) = group_generation(group) {
                let mut inner = self.lock();
                if inner.generation != generation {
                    tracing::info!(generation, was = inner.generation, "the group's generation changed");
                    inner.generation = generation;
                    inner.announce_now = true;
                }
            }
            if !assigned {
                let problem = assign_all(reader, topic).err().map(|e| e.to_string());
                assigned = problem.is_none();
                let mut current = self.problem.lock().unwrap_or_else(|p| p.into_inner());
                if *current != problem {
                    match &problem {
                        Some(problem) => tracing::warn!(%problem, "sharded mode: the cluster topic is not readable"),
                        None => tracing::info!(%topic, "reading the cluster topic"),
                    }
                    *current = problem;
                }
            }
            let deadline = Instant::now() + interval.min(Duration::from_millis(100));
            let mut heard = false;
            while assigned && Instant::now() < deadline {
                match reader.poll(deadline.saturating_duration_since(Instant::now())) {
                    Some(Ok(message)) => {
                        match message.payload().and_then(|p| serde_json::from_slice::<Announce>(p).ok()) {
                            Some(announce) => heard |= self.heard(announce),
                            None => tracing::debug!(offset = message.offset(), "not an announcement; skipped"),
                        }
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "reading the cluster topic"),
                    None => break,
                }
            }
            if !assigned {
                std::thread::sleep(Duration::from_millis(100));
            }
            let now = std::mem::take(&mut self.lock().announce_now);
            if last_sent.elapsed() >= interval || now {
                last_sent = Instant::now();
                let body = serde_json::to_vec(&self.own(&self.lock(), super::now_ms())).expect("serializable");
                let record = BaseRecord::<[u8], [u8]>::to(topic).key(self.member.as_bytes()).payload(&body);
                if let Err((e, _)) = producer.send(record) {
                    tracing::debug!(error = %e, "announcement not published");
                }
                self.settle();
            } else if heard {
                // Routes follow what was just heard, not the next heartbeat.
                self.settle();
            }
            if last_commit.elapsed() >= commit_interval {
                last_commit = Instant::now();
                commit_owned(group, &self.lock().owned.clone(), &self.status, &mut committed);
            }
        }
        producer.flush(Duration::from_secs(1)).ok();
        // Leave the group now rather than after the session timeout.
        group.unsubscribe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, owned: &[u32], ready: &[u32], claimed_ms: i64) -> Announce {
        Announce {
            member: name.into(),
            url: format!("http://{name}"),
            owned: owned.iter().map(|p| ("t".to_owned(), *p)).collect(),
            claimed_ms,
            generation: 1,
            folding: ready
                .iter()
                .map(|p| Folding { topic: "t".into(), partition: *p, next: 10, end: Some(10), ready: true })
                .collect(),
            sent_ms: 0,
        }
    }

    #[test]
    fn a_ready_owner_serves_else_a_warm_copy_else_nobody() {
        let members = [member("a", &[0], &[0, 1], 1), member("b", &[1], &[], 2), member("c", &[], &[1], 0)];
        assert_eq!(route_in(&members, "a", "t", 0), Route::Local);
        assert_eq!(route_in(&members, "b", "t", 0), Route::Elsewhere { member: "a".into(), url: "http://a".into() });
        // b owns partition 1 but has not caught up: a warm copy serves, the asker first.
        assert_eq!(route_in(&members, "c", "t", 1), Route::Local);
        assert!(matches!(route_in(&members, "b", "t", 1), Route::Elsewhere { .. }));
        assert!(matches!(route_in(&members, "a", "t", 2), Route::Unavailable(_)));
    }

    #[test]
    fn a_request_that_came_by_a_hop_is_served_here_or_not_at_all() {
        let elsewhere = Route::Elsewhere { member: "b".into(), url: "http://b".into() };
        assert_eq!(after_hop(elsewhere.clone(), true, "t", 0), Route::Local);
        assert!(matches!(after_hop(elsewhere, false, "t", 0), Route::Unavailable(m) if m.contains("served by b")));
        assert_eq!(after_hop(Route::Local, false, "t", 0), Route::Local);
        let none = Route::Unavailable("no server".into());
        assert_eq!(after_hop(none.clone(), false, "t", 0), none);
        assert_eq!(after_hop(none, true, "t", 0), Route::Local);
    }

    #[test]
    fn of_two_claims_the_newer_generation_owns() {
        // a's claim is later by the clock, but of an older generation: b owns.
        let mut a = member("a", &[0, 1], &[0, 1], 9);
        a.generation = 1;
        let mut b = member("b", &[0], &[0], 5);
        b.generation = 2;
        let members = [a, b];
        assert_eq!(owner_of(&members, "t", 0).unwrap().member, "b");
        // A claim no newer one contradicts still stands (a member that has not announced
        // the new generation yet keeps what it had).
        assert_eq!(owner_of(&members, "t", 1).unwrap().member, "a");
        assert_eq!(route_in(&members, "b", "t", 1), Route::Elsewhere { member: "a".into(), url: "http://a".into() });
        assert_eq!(newest_generation(&members), 2);
    }

    #[test]
    fn the_later_claim_owns_and_standbys_leave_out_the_owner() {
        let members = [member("a", &[0], &[0], 1), member("b", &[0], &[0], 5), member("c", &[], &[], 0)];
        assert_eq!(owner_of(&members, "t", 0).unwrap().member, "b");
        for partition in 0..12 {
            let standbys = standbys_of(&members, Some("b"), 1, "t", partition);
            assert_eq!(standbys.len(), 1);
            assert_ne!(standbys[0], "b");
            // The same on every server: it depends on the members alone.
            assert_eq!(standbys, standbys_of(&members[..], Some("b"), 1, "t", partition));
        }
        // With every other member a standby, all of them are.
        assert_eq!(standbys_of(&members, Some("b"), 5, "t", 0).len(), 2);
    }
}
