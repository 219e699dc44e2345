//! Deploys and replays, written as records to every partition of a kind's topic and waited
//! for until folded.

use super::*;

impl App {
    /// Deploys a version of reducer `name`: checks it (off the async runtime), writes a
    /// deploy record carrying it to every partition of each of its kinds' topics, and
    /// answers once this server has folded them all. Every replica switches each
    /// partition at its record.
    pub async fn deploy(
        self: &Arc<App>,
        name: &str,
        module: Module,
        origin: &str,
        subject: Option<&str>,
    ) -> Result<Deployed, DeployError> {
        if self.read_only {
            return Err(DeployError::ReadOnly);
        }
        let _serial = self.deployer.serial().await;
        let (app, name_owned, origin_owned) = (self.clone(), name.to_owned(), origin.to_owned());
        let subject_owned = subject.map(str::to_owned);
        let prepared = tokio::task::spawn_blocking(move || {
            let module = match module {
                Module::Bytes(bytes) => bytes,
                Module::Stored(id) => app.deployer.stored(&name_owned, &id)?,
            };
            app.deployer.prepare(&name_owned, module, &origin_owned, subject_owned.as_deref())
        })
        .await
        .map_err(|_| DeployError::Stopped)??;
        let (record, module, kinds) = match prepared {
            Prepared::Unchanged(version) => {
                return Ok(Deployed { version, unchanged: true, partitions: 0, took: Duration::ZERO });
            }
            Prepared::Ready { record, module, kinds } => (record, module, kinds),
        };
        let started = Instant::now();
        let mut written = 0;
        for kind in &kinds {
            let topic = &self.kind(kind).map_err(|e| DeployError::Unavailable(e.to_string()))?.topic;
            let headers = deploy_headers(name, origin, subject);
            let records = crate::deploy::records(&module, &headers, self.limits.deploy_record_bytes_max);
            written += self.in_every_partition(topic, name.as_bytes(), &records).await.map_err(|e| match e {
                AppError::ShuttingDown => DeployError::Stopped,
                AppError::WaitTimeout(..) => DeployError::Unavailable(format!(
                    "the deploy records are in the log and every replica will fold them, but this server did not within wait_applied_ms_max: {e}"
                )),
                e => DeployError::Unavailable(format!("writing the deploy records: {e}")),
            })?;
        }
        let versions = self.deployer.versions(name)?;
        let version = versions.into_iter().find(|v| v.id == record.id).unwrap_or(record);
        Ok(Deployed { version, unchanged: false, partitions: written, took: started.elapsed() })
    }

    /// Writes records (each a value and headers; [`DEPLOY_PARTITIONS_HEADER`] is added) to
    /// every partition of `topic`, in order, and waits until this server has folded them
    /// all: how deploy and replay records reach every replica at one place in each
    /// partition. Returns the number of partitions.
    async fn in_every_partition(
        &self,
        topic: &str,
        key: &[u8],
        records: &[crate::deploy::Append<'_>],
    ) -> Result<usize, AppError> {
        let count = self.writer.partitions(topic).await?;
        let partitions = (DEPLOY_PARTITIONS_HEADER.to_owned(), count.to_string().into_bytes());
        let records: Vec<_> = records
            .iter()
            .map(|(value, headers)| (*value, headers.iter().cloned().chain([partitions.clone()]).collect()))
            .collect();
        let mut written = Vec::new();
        for partition in 0..count {
            written.push((partition, self.append_all(topic, partition, key, &records).await?));
        }
        let timeout = Duration::from_millis(self.limits.wait_applied_ms_max);
        for &(partition, offset) in &written {
            // Sharded: the partitions folded here; the others' servers fold theirs.
            if self.cluster.is_some() && !self.source.is_folding(topic, partition) {
                continue;
            }
            self.wait_stored(topic, partition, offset, timeout).await?;
        }
        Ok(written.len())
    }

    /// Appends records to one partition in order; the offset of the last.
    pub(super) async fn append_all(
        &self,
        topic: &str,
        partition: u32,
        key: &[u8],
        records: &[crate::deploy::Append<'_>],
    ) -> Result<u64, AppError> {
        let mut last = 0;
        for (value, headers) in records {
            (_, last) = self.appended(self.writer.append_to(topic, Some(partition), key, value, headers).await)?;
        }
        Ok(last)
    }

    /// Starts rebuilding a kind's states from the retained diffs with its active reducer.
    pub async fn start_replay(self: &Arc<App>, kind: &str, subject: Option<&str>) -> Result<ReplayJob, AppError> {
        let topic = self.writable_kind(kind)?.topic.clone();
        if let Some(job) = self.replays_running().into_iter().find(|job| job.kind == kind) {
            return Err(AppError::ReplayRunning(Box::new(job)));
        }
        // A replay record in every partition: each replica rebuilds each partition's models
        // for it, at the same place in the log.
        let mut headers = vec![(REPLAY_HEADER.to_owned(), kind.as_bytes().to_vec())];
        if let Some(subject) = subject {
            headers.push((SUBJECT_HEADER.to_owned(), subject.as_bytes().to_vec()));
        }
        self.in_every_partition(&topic, kind.as_bytes(), &[(&b""[..], headers)]).await?;
        let job = self.replays.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned();
        job.ok_or_else(|| AppError::Unavailable("the replay records were folded but no replay started".into()))
    }

    /// The kind's latest replay.
    pub fn replay(&self, kind: &str) -> Result<Option<ReplayJob>, AppError> {
        self.kind(kind)?;
        Ok(self.replays.lock().unwrap_or_else(|p| p.into_inner()).get(kind).cloned())
    }

    /// Replays still running (for the fold loop).
    pub fn replays_running(&self) -> Vec<ReplayJob> {
        let replays = self.replays.lock().unwrap_or_else(|p| p.into_inner());
        replays.values().filter(|job| job.finished_ms.is_none()).cloned().collect()
    }

    /// Progress committed by the fold loop.
    pub fn replay_progress(&self, job: ReplayJob) {
        self.replays.lock().unwrap_or_else(|p| p.into_inner()).insert(job.kind.clone(), job);
    }
}

/// The headers of a deploy record of reducer `name` (the partition count is added per
/// write).
pub(super) fn deploy_headers(name: &str, origin: &str, subject: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let mut headers = vec![
        (DEPLOY_HEADER.to_owned(), name.as_bytes().to_vec()),
        (DEPLOY_ORIGIN_HEADER.to_owned(), origin.as_bytes().to_vec()),
    ];
    if let Some(subject) = subject {
        headers.push((SUBJECT_HEADER.to_owned(), subject.as_bytes().to_vec()));
    }
    headers
}
