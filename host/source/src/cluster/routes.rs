//! Routes worked out from the members' announcements: the owner of a partition, its
//! standbys (rendezvous hashing), and where a request goes (never a second hop).

use super::*;

/// The route of a request that came by a hop: here if this server serves the partition or
/// folds it and has caught up (`ready_here`), else unavailable; never elsewhere.
pub(super) fn after_hop(route: Route, ready_here: bool, topic: &str, partition: u32) -> Route {
    match (route, ready_here) {
        (Route::Local, _) | (_, true) => Route::Local,
        (Route::Elsewhere { member, .. }, false) => Route::Unavailable(format!(
            "this request was routed here, but partition {partition} of topic {topic:?} is served by {member} as this server sees it: the servers' maps are settling; retry shortly"
        )),
        (unavailable, false) => unavailable,
    }
}

/// A partition's route in the table the last [`Cluster::settle`] made.
pub(super) fn route_in_table(inner: &Inner, topic: &str, partition: u32) -> Route {
    match inner.routes.get(&(topic.to_owned(), partition)) {
        Some(route) => route.clone(),
        None => Route::Unavailable(format!(
            "this server has not yet heard where partition {partition} of topic {topic:?} is served; retry shortly"
        )),
    }
}

pub(super) fn ready_in(announce: &Announce, topic: &str, partition: u32) -> bool {
    announce.folding.iter().any(|f| f.topic == topic && f.partition == partition && f.ready)
}

/// The newest group generation among `members`' announcements.
pub(super) fn newest_generation(members: &[Announce]) -> i32 {
    members.iter().map(|a| a.generation).max().unwrap_or_else(no_generation)
}

/// The owner of a partition: the member the group assigned it to. Of two claiming it for a
/// moment (a revoke not announced yet), the claim of the newer group generation (the
/// older may name a partition the group has moved since), then the later claim.
pub(super) fn owner_of<'a>(members: &'a [Announce], topic: &str, partition: u32) -> Option<&'a Announce> {
    members.iter().filter(|a| a.owned.iter().any(|(t, p)| t == topic && *p == partition)).max_by(|a, b| {
        (a.generation, a.claimed_ms).cmp(&(b.generation, b.claimed_ms)).then_with(|| b.member.cmp(&a.member))
    })
}

/// The `n` standbys of a partition: the members other than its owner ranked first by
/// blake3(member, topic, partition). Every server ranks alike; a member leaving moves only
/// the partitions it stood by for.
pub(super) fn standbys_of(
    members: &[Announce],
    owner: Option<&str>,
    n: usize,
    topic: &str,
    partition: u32,
) -> Vec<String> {
    let mut ranked: Vec<(blake3::Hash, &str)> = members
        .iter()
        .filter(|a| Some(a.member.as_str()) != owner)
        .map(|a| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(a.member.as_bytes()).update(&[0]).update(topic.as_bytes()).update(&[0]);
            hasher.update(&partition.to_be_bytes());
            (hasher.finalize(), a.member.as_str())
        })
        .collect();
    ranked.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    ranked.into_iter().take(n).map(|(_, m)| m.to_owned()).collect()
}

pub(super) fn route_in(members: &[Announce], me: &str, topic: &str, partition: u32) -> Route {
    let elsewhere = |a: &Announce| Route::Elsewhere { member: a.member.clone(), url: a.url.clone() };
    if let Some(owner) = owner_of(members, topic, partition)
        && ready_in(owner, topic, partition)
    {
        return if owner.member == me { Route::Local } else { elsewhere(owner) };
    }
    // The owner has not caught up (or none is known): a warm copy serves, this one first.
    let ready: Vec<(&Announce, u64)> = members
        .iter()
        .filter_map(|a| {
            let f = a.folding.iter().find(|f| f.topic == topic && f.partition == partition && f.ready)?;
            Some((a, f.lag().unwrap_or(u64::MAX)))
        })
        .collect();
    if ready.iter().any(|(a, _)| a.member == me) {
        return Route::Local;
    }
    match ready.iter().min_by_key(|(a, lag)| (*lag, a.member.clone())) {
        Some((a, _)) => elsewhere(a),
        None => Route::Unavailable(format!(
            "no server has caught up on partition {partition} of topic {topic:?} yet (a rebalance or a failover is under way); retry shortly"
        )),
    }
}
