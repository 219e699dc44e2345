//! Deploy records folded: a partition switches to the version the record carries, once all
//! its chunks are in.

use super::*;

impl Engine {
    /// A deploy record: its partition folds with the module it carries from the next
    /// offset on (in its value, or in chunks before it). A module that cannot load here is
    /// rejected (`invalid_deploy`) and the partition keeps its version.
    pub(super) fn deploy(
        &mut self,
        kind: usize,
        record: &Record,
        name: &[u8],
        view: &dyn View,
        folded: &mut Folded,
    ) -> Result<(), FoldError> {
        let reject = |reason: String| Rejected::new(record, None, Rejection::InvalidDeploy(reason));
        let refused = |folded: &mut Folded, reason: String| {
            let kind = &self.kinds[kind].name;
            tracing::error!(%kind, partition = record.partition, offset = record.offset, %reason, "deploy record refused; the partition keeps its version");
            folded.reject(reject(reason));
        };
        if let Some(header) = record.header(DEPLOY_CHUNK_HEADER) {
            match DeployChunk::parse_header(header) {
                Ok((module, index, _)) => {
                    folded.chunks.push(DeployChunk { module, index, bytes: record.value.clone() });
                    folded.mark(record, Became::DeployChunk, u64::from(index), module);
                }
                Err(reason) => refused(folded, reason),
            }
            return Ok(());
        }
        let module = match record.header(DEPLOY_MODULE_HEADER) {
            None => Ok(record.value.clone()),
            Some(header) => assemble(header, view, folded)?,
        };
        let (reducer, module) = match module.and_then(|m| Ok((self.versions.load(&m)?, m))) {
            Ok(loaded) => loaded,
            Err(reason) => {
                refused(folded, reason);
                return Ok(());
            }
        };
        let state = &mut self.kinds[kind];
        let text = |header| record.header(header).map(|v| String::from_utf8_lossy(v).into_owned());
        let count = text(DEPLOY_PARTITIONS_HEADER).and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        let versions = &mut state.versions;
        versions.partitions.insert(record.partition, reducer.id());
        versions.partition_count = versions.partition_count.max(count);
        let info = reducer.info();
        tracing::info!(kind = %state.name, partition = record.partition, offset = record.offset, version = %reducer.id(), "deploy record folded: the partition folds with this version from here");
        folded.deploys.push(DeployFolded {
            kind: state.name.clone(),
            name: String::from_utf8_lossy(name).into_owned(),
            version: reducer.id(),
            origin: text(DEPLOY_ORIGIN_HEADER).unwrap_or_else(|| "log".into()),
            subject: text(SUBJECT_HEADER),
            declared: (info.name.clone(), info.version.clone()),
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            module,
        });
        folded.mark(record, Became::Deployed, 0, reducer.id());
        folded.kind_versions.retain(|(k, _)| *k != state.name);
        folded.kind_versions.push((state.name.clone(), state.versions.clone()));
        Ok(())
    }
}

/// The module a deploy record names in its [`DEPLOY_MODULE_HEADER`]: its chunks (this
/// batch's, else stored ones) joined and checked against the hash; or, when they are gone
/// (an earlier deploy record of the same module, in another partition, assembled them and
/// they were deleted), the stored module. Either way the same bytes on every replica.
/// The module's chunks are deleted with this batch.
fn assemble(header: &[u8], view: &dyn View, folded: &mut Folded) -> Result<Result<Bytes, String>, FoldError> {
    let (id, count) = match DeployChunk::parse_module_header(header) {
        Ok(parsed) => parsed,
        Err(reason) => return Ok(Err(reason)),
    };
    if !folded.chunks_done.contains(&id) {
        folded.chunks_done.push(id);
    }
    let mut parts = Vec::new();
    for index in 0..count {
        let part = match folded.chunks.iter().rev().find(|c| c.module == id && c.index == index) {
            Some(chunk) => Some(chunk.bytes.clone()),
            None => view.deploy_chunk(&id, index).map_err(FoldError::View)?,
        };
        match part {
            Some(part) => parts.push(part),
            None => break,
        }
    }
    if parts.len() == count as usize {
        let module = Bytes::from(parts.concat());
        return Ok(if ModuleHash::of(&module) == id {
            Ok(module)
        } else {
            Err(format!("the {count} chunks of module {id} do not hash to it"))
        });
    }
    let missing = parts.len();
    if let Some(deployed) = folded.deploys.iter().find(|d| d.version == id) {
        return Ok(Ok(deployed.module.clone()));
    }
    Ok(view.module(&id).map_err(FoldError::View)?.ok_or_else(|| {
        format!("module {id}: chunk {missing} of {count} is not in the partition before its deploy record")
    }))
}
