//! Per-model fan-out of live diffs to SSE streams.
//!
//! Each watched model has one bounded broadcast ring shared by all its subscribers: a diff
//! is stored once however many clients follow the model, and memory per model is bounded
//! by the ring's length times the largest diff. A subscriber that falls a full ring behind
//! loses its place (`Lagged`) and catches up from its last hash instead: lossless.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::chain::Hash;
use crate::model::{Folded, ModelKey};

/// One applied diff, as streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDiff {
    pub seq: u64,
    pub offset: u64,
    pub prev: Hash,
    pub hash: Hash,
    pub payload: Bytes,
    /// The reducer version that applied it.
    pub reducer: crate::model::ModuleHash,
    /// When it was published (after its batch's commit): the start of its delay to a client.
    pub published: Instant,
    /// The event as the API renders it, rendered once for all subscribers.
    pub rendered: std::sync::OnceLock<Bytes>,
}

/// What a model's subscribers are sent.
#[derive(Debug)]
pub enum Live {
    Diff(LiveDiff),
    /// A replay rewrote the model's history: every hash a subscriber holds is gone.
    Replaced,
}

/// Too many subscribers already.
#[derive(Debug, thiserror::Error)]
#[error("{0} SSE subscribers already (sse_subscribers_max)")]
pub struct Full(pub usize);

pub struct Hub {
    models: Mutex<HashMap<ModelKey, broadcast::Sender<Arc<Live>>>>,
    ring_events: usize,
    subscribers_max: usize,
    subscribers: Arc<AtomicUsize>,
}

/// A subscriber's place in a model's ring. Dropping it frees the slot.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<Live>>,
    subscribers: Arc<AtomicUsize>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    pub fn new(ring_events: usize, subscribers_max: usize) -> Hub {
        Hub {
            models: Mutex::new(HashMap::new()),
            ring_events: ring_events.max(1),
            subscribers_max,
            subscribers: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Subscribes to the model's live diffs from now on.
    pub fn subscribe(&self, model: &ModelKey) -> Result<Subscription, Full> {
        let before = self.subscribers.fetch_add(1, Ordering::Relaxed);
        if before >= self.subscribers_max {
            self.subscribers.fetch_sub(1, Ordering::Relaxed);
            return Err(Full(self.subscribers_max));
        }
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        let sender = models.entry(model.clone()).or_insert_with(|| broadcast::channel(self.ring_events).0);
        Ok(Subscription { receiver: sender.subscribe(), subscribers: self.subscribers.clone() })
    }

    /// Publishes a committed batch's applied diffs to their models' subscribers.
    pub fn publish(&self, folded: &Folded) {
        let published = Instant::now();
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        for model in &folded.replaced {
            if let Some(sender) = models.get(model) {
                // Nobody listening is fine: the ring is cleaned up below.
                let _ = sender.send(Arc::new(Live::Replaced));
            }
        }
        for applied in &folded.applied {
            if folded.replaced.contains(&applied.model) {
                continue; // rewritten history, not new diffs
            }
            let Some(sender) = models.get(&applied.model) else { continue };
            let diff = LiveDiff {
                seq: applied.seq,
                offset: applied.offset,
                prev: applied.prev,
                hash: applied.hash,
                payload: applied.payload.clone(),
                reducer: applied.reducer,
                published,
                rendered: std::sync::OnceLock::new(),
            };
            if sender.send(Arc::new(Live::Diff(diff))).is_err() {
                // Nobody listens any more.
                models.remove(&applied.model);
            }
        }
        // Rings of models nobody follows any more go too.
        if models.len() > 1024 {
            models.retain(|_, sender| sender.receiver_count() > 0);
        }
    }
}
