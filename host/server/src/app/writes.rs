//! Writes: creates and appends checked, written to the log, and waited for until folded
//! (`?wait=applied`) or stored.

use super::*;

impl App {
    /// Waits until this server has folded the record at (`partition`, `offset`) of `kind`'s
    /// topic, however it was produced (through another replica, by another service).
    pub async fn wait_position(&self, kind: &str, partition: u32, offset: u64) -> Result<(), AppError> {
        let topic = self.kind(kind)?.topic.clone();
        // A position that cannot be in the log is the client's mistake: said at once,
        // rather than after a wait that cannot end well.
        let partitions = self.writer.partitions(&topic).await?;
        if partition >= partitions {
            return Err(AppError::BadPosition(format!(
                "{topic} has {partitions} partition(s): there is no partition {partition}"
            )));
        }
        if let Some(end) = self.writer.known_end(&topic, partition)?
            && offset >= end
        {
            return Err(AppError::BadPosition(format!(
                "{topic} partition {partition} ends at offset {end}: there is no record at {offset}"
            )));
        }
        self.wait_stored(&topic, partition, offset, Duration::from_millis(self.limits.wait_applied_ms_max)).await
    }

    /// Waits until the stored position of (`topic`, `partition`) passes `offset`: checked
    /// after each commit of the fold loop.
    pub(super) async fn wait_stored(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<(), AppError> {
        let deadline = Instant::now() + timeout;
        let mut committed = self.committed.clone();
        loop {
            committed.borrow_and_update();
            if self.store.position(self.source_name, topic, partition)?.unwrap_or(0) > offset {
                return Ok(());
            }
            let stopped = || match self.status.unwritable_reason() {
                Some(reason) => AppError::StoreUnwritable(reason),
                None => AppError::ShuttingDown,
            };
            if self.status.unwritable_reason().is_some() {
                return Err(stopped());
            }
            match tokio::time::timeout_at(deadline.into(), committed.changed()).await {
                Err(_) => return Err(AppError::WaitTimeout(timeout, offset)),
                // The fold thread ended: the process stops, or the store failed a write.
                Ok(Err(_)) => return Err(stopped()),
                Ok(Ok(())) => {}
            }
        }
    }

    /// Checks that a model can be created; returns its kind's topic.
    pub fn check_create(&self, kind: &str, id: &str) -> Result<Arc<str>, AppError> {
        let kind = self.writable_kind(kind)?;
        crate::model::validate_id(id.as_bytes()).map_err(AppError::InvalidId)?;
        let model = ModelKey { kind: kind.name.clone(), id: id.into() };
        if self.store.read().head(&model)?.is_some() {
            return Err(AppError::Exists { kind: model.kind.to_string(), id: id.to_owned() });
        }
        Ok(kind.topic.clone())
    }

    /// Checks that a model exists; returns its kind's topic.
    pub fn check_append(&self, model: &ModelKey) -> Result<Arc<str>, AppError> {
        let kind = self.writable_kind(&model.kind)?;
        // Sharded: a model served elsewhere is not in this store (or not up to date): the
        // server that folds it checks it (an unknown model is a rejection there).
        if self.route(model, false)? == Route::Local {
            self.store.read().head(model)?.ok_or_else(|| unknown(model))?;
        }
        Ok(kind.topic.clone())
    }

    /// Appends a record for `id` to the log (a create record when `diff` is `None`); returns
    /// (partition, offset) once the log has it.
    pub async fn write(
        &self,
        topic: &str,
        id: &str,
        diff: Option<&[u8]>,
        extra: &[(String, Vec<u8>)],
    ) -> Result<(u32, u64), AppError> {
        let mut headers = match diff {
            None => vec![(CREATE_HEADER.to_owned(), Vec::new())],
            Some(_) => Vec::new(),
        };
        headers.extend_from_slice(extra);
        self.appended(self.writer.append(topic, id.as_bytes(), diff.unwrap_or_default(), &headers).await)
    }

    /// The diff applied to `model` under idempotency key `key`, if one was.
    pub fn keyed(&self, model: &ModelKey, key: &str) -> Result<Option<Keyed>, AppError> {
        Ok(self.store.read().keyed(model, key)?)
    }

    /// Waits until the record at `offset` is folded, then says what became of it.
    pub async fn wait_folded(
        &self,
        model: &ModelKey,
        topic: &str,
        partition: u32,
        offset: u64,
        timeout: Duration,
    ) -> Result<Version, AppError> {
        self.wait_stored(topic, partition, offset, timeout).await?;
        let reader = self.store.read();
        if let Some(rejection) = reader.rejection(topic, partition, offset)? {
            return Err(AppError::Rejected(rejection));
        }
        if let Some((seq, hash)) = reader.diff_at(model, offset)? {
            return Ok(Version { offset, seq, hash });
        }
        // A create record that was not rejected: the model's first version.
        Ok(Version { offset, seq: 0, hash: model.genesis() })
    }
}
