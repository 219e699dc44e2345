//! The reducers-directory watcher: polls each kind's reducer file and deploys it when its
//! content changes.
//!
//! Polling (`reducer_watch_interval_ms`) rather than inotify: it behaves the same on every
//! filesystem, including network mounts and Kubernetes ConfigMap volumes (which swap a
//! symlink). A half-written file is never loaded: a file is read only once its size and
//! mtime have not changed across a whole interval and did not change while it was read; a
//! writer that stalls longer than that leaves a file cut short, which the deploy path
//! refuses as `truncated` (and the completed file is deployed when it lands).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::app::{App, Module};
use crate::deploy::DeployError;
use crate::model::ModuleHash;

/// One watched file.
struct Watched {
    name: String,
    path: PathBuf,
    /// (size, mtime) at the last poll.
    seen: Option<(u64, SystemTime)>,
    /// The signature last read, and the content deployed from it (a rewrite with the same
    /// bytes is not deployed twice).
    read: Option<(u64, SystemTime)>,
    content: Option<ModuleHash>,
}

fn signature(path: &PathBuf) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// Starts the watcher thread. Files as they are now count as seen (the store's active
/// versions were chosen at start); a file written again later is deployed, even with the
/// same bytes as now (a deploy of the active version changes nothing).
pub fn spawn(
    app: Arc<App>,
    runtime: tokio::runtime::Handle,
    files: Vec<(String, PathBuf)>,
    interval: Duration,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut watched: Vec<Watched> = files
        .into_iter()
        .map(|(name, path)| {
            let seen = signature(&path);
            Watched { name, path, seen, read: seen, content: None }
        })
        .collect();
    std::thread::Builder::new().name("reducer-watch".into()).spawn(move || {
        while !stop.is_cancelled() {
            std::thread::sleep(interval);
            for file in &mut watched {
                poll(&app, &runtime, file);
            }
        }
    })
}

fn poll(app: &Arc<App>, runtime: &tokio::runtime::Handle, file: &mut Watched) {
    let now = signature(&file.path);
    if now != file.seen {
        file.seen = now; // changed (or still changing): look again after an interval
        return;
    }
    if now.is_none() || now == file.read {
        return;
    }
    let Ok(bytes) = std::fs::read(&file.path) else { return };
    if signature(&file.path) != now {
        return; // written to while read
    }
    file.read = now;
    let content = ModuleHash::of(&bytes);
    if file.content == Some(content) {
        return;
    }
    file.content = Some(content);
    tracing::info!(reducer = %file.name, path = %file.path.display(), version = %content, "reducer file changed; deploying");
    match runtime.block_on(app.deploy(&file.name, Module::Bytes(bytes), "directory", None)) {
        Ok(deployed) if deployed.unchanged => tracing::info!(reducer = %file.name, "already the active version"),
        Ok(_) => {}
        Err(DeployError::Refused { .. }) => {} // logged and recorded by the deployer
        Err(e) => tracing::error!(reducer = %file.name, error = %e, "deploy from the reducers directory failed"),
    }
}
