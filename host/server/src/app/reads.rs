//! Reads: heads, states (now or at a retained hash, through a cache of materialized
//! states), what a client that last saw a hash is sent ([`Plan`]), listings and rejections.

use super::*;

impl App {
    /// The model's committed head.
    pub fn head(&self, model: &ModelKey) -> Result<Head, AppError> {
        self.kind(&model.kind)?;
        self.store.read().head(model)?.ok_or_else(|| unknown(model))
    }

    /// The state at the head, or at `at` while it is retained.
    pub fn state(&self, model: &ModelKey, at: Option<Hash>) -> Result<StateAt, AppError> {
        self.kind(&model.kind)?;
        let reader = self.store.read();
        let head = reader.head(model)?.ok_or_else(|| unknown(model))?;
        let (hash, seq, offset) = match at {
            None => (head.hash, head.seq, head.offset),
            Some(hash) => match reader.find_hash(model, &hash)? {
                None => return Err(AppError::UnknownHash(hash)),
                Some(at) if is_pruned(&head, at) => return Err(AppError::Pruned(hash)),
                Some(HashAt::Genesis) => (hash, 0, None),
                Some(HashAt::Diff { seq, offset }) => (hash, seq, Some(offset)),
            },
        };
        let state = self.materialize(&reader, model, &head, hash, offset)?;
        Ok(StateAt { state, hash, seq, offset })
    }

    fn materialize(
        &self,
        reader: &Reader<'_>,
        model: &ModelKey,
        head: &Head,
        hash: Hash,
        offset: Option<u64>,
    ) -> Result<Arc<[u8]>, AppError> {
        // A cached state is served without waiting for the reader instance.
        if let Some(state) = self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model, &hash) {
            return Ok(state);
        }
        let kind = self.kind(&model.kind)?;
        let mut versions = kind.readers.lock().unwrap_or_else(|p| p.into_inner());
        self.materialize_with(&mut versions, reader, model, head, hash, offset)
    }

    /// The state at (`hash`, `offset`) rebuilt on `models` from the nearest retained
    /// checkpoint, through the cache.
    fn materialize_with(
        &self,
        versions: &mut Versions,
        reader: &Reader<'_>,
        model: &ModelKey,
        head: &Head,
        hash: Hash,
        offset: Option<u64>,
    ) -> Result<Arc<[u8]>, AppError> {
        if let Some(state) = self.states.lock().unwrap_or_else(|p| p.into_inner()).get(model, &hash) {
            return Ok(state);
        }
        let history = match offset {
            None => Default::default(),
            Some(offset) => reader.checkpoint_for(model, head, offset)?,
        };
        let state: Arc<[u8]> = versions.materialize(&model.id, history, head.reducer)?.into();
        self.states.lock().unwrap_or_else(|p| p.into_inner()).put(model, hash, state.clone());
        Ok(state)
    }

    /// What a client holding `since` (or nothing) needs to reach the committed head.
    pub fn plan(&self, model: &ModelKey, since: Option<Hash>) -> Result<Plan, AppError> {
        let started = Instant::now();
        let plan = self.plan_uncounted(model, since);
        self.metrics.catchup_plan_seconds.observe(started.elapsed().as_secs_f64());
        plan
    }

    fn plan_uncounted(&self, model: &ModelKey, since: Option<Hash>) -> Result<Plan, AppError> {
        let kind = self.kind(&model.kind)?;
        let reader = self.store.read();
        let head = reader.head(model)?.ok_or_else(|| unknown(model))?;
        let snapshot = |reset| -> Result<Plan, AppError> {
            let state = self.materialize(&reader, model, &head, head.hash, head.offset)?;
            Ok(Plan::Snapshot { reset, state, hash: head.hash, seq: head.seq, reducer: head.reducer })
        };
        let Some(since) = since else { return snapshot(None) };
        if since == head.hash {
            return Ok(Plan::UpToDate { hash: head.hash, seq: head.seq });
        }
        let at = match reader.find_hash(model, &since)? {
            None => return snapshot(Some(Reset::Unknown)),
            Some(at) if is_pruned(&head, at) => return snapshot(Some(Reset::Pruned)),
            Some(at) => at,
        };
        let (after, since_seq) = match at {
            HashAt::Genesis => (None, 0),
            HashAt::Diff { seq, offset } => (Some(offset), seq),
        };
        let through = head.offset.expect("a model past its genesis hash has applied a diff");
        // Summed up first: a patch by `delta` needs only the two states, not the diffs. The
        // head says how many there are and whether one version applied them all; a head
        // stored before it recorded that has them counted from the store (a scan).
        let (len, one_version) = match head.run_since {
            Some(_) if since_seq >= head.seq => {
                return Err(StoreError::Corrupt {
                    what: "hashes",
                    key: format!("{model:?}"),
                    detail: format!("{since} is at seq {since_seq}, not before the head's {}", head.seq),
                }
                .into());
            }
            Some(run_since) => ((head.seq - since_seq) as usize, since_seq + 1 >= run_since),
            None => {
                let run = reader.run(model, after, through, since_seq)?;
                if run.last != Some(head.hash) {
                    return Err(StoreError::Corrupt {
                        what: "diffs",
                        key: format!("{model:?}"),
                        detail: format!("the diffs after {since} do not lead to the head {}", head.hash),
                    }
                    .into());
                }
                (run.len, run.reducers == [head.reducer])
            }
        };
        let missed = || reader.diffs(model, after, through, since, since_seq);
        let plan = if !one_version {
            // Missed diffs span a deploy: composition is one version's, so one by one.
            CatchUp::Diffs
        } else {
            let mut versions = kind.readers.lock().unwrap_or_else(|p| p.into_inner());
            let max = self.limits.catchup_merge_diffs_max;
            let payloads = || Ok::<_, AppError>(missed()?.into_iter().map(|d| d.payload).collect());
            plan_catch_up(&mut versions, head.reducer, len, max, payloads, |versions| {
                let from = self.materialize_with(versions, &reader, model, &head, since, after)?;
                let to = self.materialize_with(versions, &reader, model, &head, head.hash, head.offset)?;
                Ok::<_, AppError>((from, to))
            })
        };
        Ok(match plan {
            CatchUp::Patch { diff, how } => {
                tracing::debug!(kind = %model.kind, id = %model.id, missed = len, how, "catch-up patch");
                Plan::Patch { from: since, to: head.hash, seq: head.seq, diff, reducer: head.reducer }
            }
            CatchUp::Diffs => Plan::Diffs(missed()?),
        })
    }

    /// Sharded mode: who lists each partition of `kind`'s topic, as this server routes:
    /// `None` for this server, else the serving server's URL (`Ok(None)`: not sharded).
    /// A partition no server can serve now is `PartitionUnavailable`.
    pub fn list_sources(&self, kind: &str) -> Result<Option<ListSources>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let count = cluster.partition_count(&topic);
        if count == 0 {
            return Err(AppError::PartitionUnavailable(format!(
                "the partitions of topic {topic:?} are not known yet; retry shortly"
            )));
        }
        let mut sources: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
        for partition in 0..count {
            let source = match cluster.route(&topic, partition) {
                Route::Local => None,
                Route::Elsewhere { url, .. } => Some(url),
                Route::Unavailable(reason) => return Err(AppError::PartitionUnavailable(reason)),
            };
            sources.entry(source).or_default().push(partition);
        }
        Ok(Some(sources))
    }

    /// Models of a kind, after the id `after`, at most `limit`. Sharded: the models of
    /// `partitions` (which this server must serve or fold and have caught up on), or of the
    /// partitions served here when `None`.
    pub fn list(
        &self,
        kind: &str,
        after: Option<&str>,
        limit: usize,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<(String, Head)>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let limit = limit.min(self.limits.list_page_max);
        let reader = self.store.read();
        let Some(served) = self.listed_partitions(&topic, partitions)? else {
            return Ok(reader.list(kind, after, limit)?);
        };
        let count = served.len() as u32;
        let (mut out, mut cursor) = (Vec::new(), after.map(str::to_owned));
        while out.len() < limit && count > 0 {
            let page = reader.list(kind, cursor.as_deref(), limit)?;
            let done = page.len() < limit;
            cursor = page.last().map(|(id, _)| id.clone());
            out.extend(page.into_iter().filter(|(id, _)| served[partition_of(id.as_bytes(), count) as usize]));
            if done {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Sharded mode: which partitions of `topic` a listing here covers (indexed by
    /// partition; `None`: not sharded, every one). The store may also hold partitions folded
    /// here before and no longer followed: only `partitions` (each served here, or folded
    /// and caught up on) are listed, or the partitions served here when `None`.
    fn listed_partitions(&self, topic: &str, partitions: Option<&[u32]>) -> Result<Option<Vec<bool>>, AppError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let count = cluster.partition_count(topic);
        let Some(partitions) = partitions else {
            return Ok(Some((0..count).map(|p| cluster.route(topic, p) == Route::Local).collect()));
        };
        let mut listed = vec![false; count as usize];
        for &p in partitions {
            if p >= count || !(cluster.route(topic, p) == Route::Local || self.source.is_ready(topic, p)) {
                return Err(AppError::PartitionUnavailable(format!(
                    "partition {p} of topic {topic:?} is not served here; retry shortly"
                )));
            }
            listed[p as usize] = true;
        }
        Ok(Some(listed))
    }

    /// Rejected records of a kind's topic, after (partition, offset).
    /// Sharded: those of `partitions`, or of the partitions served here (see `list`).
    pub fn rejections(
        &self,
        kind: &str,
        after: Option<(u32, u64)>,
        limit: usize,
        partitions: Option<&[u32]>,
    ) -> Result<Vec<StoredRejection>, AppError> {
        let topic = self.kind(kind)?.topic.clone();
        let limit = limit.min(self.limits.list_page_max);
        let reader = self.store.read();
        let Some(listed) = self.listed_partitions(&topic, partitions)? else {
            return Ok(reader.rejections(&topic, after, limit)?);
        };
        let (mut out, mut cursor) = (Vec::new(), after);
        while out.len() < limit && !listed.is_empty() {
            let page = reader.rejections(&topic, cursor, limit)?;
            let done = page.len() < limit;
            cursor = page.last().map(|r| (r.partition, r.offset));
            out.extend(page.into_iter().filter(|r| listed.get(r.partition as usize).copied().unwrap_or(false)));
            if done {
                break;
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}

fn is_pruned(head: &Head, at: HashAt) -> bool {
    match (head.pruned_through, at) {
        (None, _) => false,
        (Some(_), HashAt::Genesis) => true,
        (Some(pruned), HashAt::Diff { offset, .. }) => offset < pruned,
    }
}

/// Materialized states by (model, hash), bounded in bytes.
pub(super) struct StateCache {
    entries: LruCache<(ModelKey, Hash), Arc<[u8]>>,
    bytes: u64,
    bytes_max: u64,
}

impl StateCache {
    pub(super) fn new(bytes_max: u64) -> StateCache {
        StateCache { entries: LruCache::unbounded(), bytes: 0, bytes_max }
    }

    pub(super) fn get(&mut self, model: &ModelKey, hash: &Hash) -> Option<Arc<[u8]>> {
        self.entries.get(&(model.clone(), *hash)).cloned()
    }

    pub(super) fn put(&mut self, model: &ModelKey, hash: Hash, state: Arc<[u8]>) {
        if state.len() as u64 > self.bytes_max / 4 {
            return;
        }
        self.bytes += state.len() as u64;
        if let Some((_, old)) = self.entries.push((model.clone(), hash), state) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes > self.bytes_max {
            let Some((_, old)) = self.entries.pop_lru() else { break };
            self.bytes -= old.len() as u64;
        }
    }
}
