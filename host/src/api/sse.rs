//! `GET /v1/models/{kind}/{id}/events`: catch-up, then live.
//!
//! The hand-over is race-free: the stream subscribes to live diffs first, then plans the
//! catch-up from the committed head, then drops live diffs the catch-up already covers
//! (seq at or below it). Every later diff must chain from the hash the client holds
//! (`prev`); a client that falls a full ring behind, or a chain that does not follow, is
//! answered with a patch from the client's last hash instead. Lossless either way.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc};

use super::{ApiError, DiffBody, parse_hash, stored_json};
use crate::app::{App, Plan};
use crate::chain::Hash;
use crate::fold::ModelKey;
use crate::hub::{Live, LiveDiff, Subscription};

/// Events buffered between a stream's feeder task and its connection. Small: a client
/// that does not read makes the feeder wait, and the model's ring absorbs the rest.
const CONNECTION_EVENTS: usize = 4;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    since: Option<String>,
}

pub(super) async fn events(
    State(app): State<Arc<App>>,
    Path((kind, id)): Path<(String, String)>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    // `Last-Event-ID` (what a browser's EventSource sends on reconnect) overrides `since`.
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let since = last_event_id.or(query.since).filter(|s| !s.is_empty()).as_deref().map(parse_hash).transpose()?;
    let model = ModelKey::new(&kind, &id);
    {
        // A model created through a replica ahead of this one: wait for it briefly.
        let model = model.clone();
        let unknown = |result: &Result<_, ApiError>| matches!(result, Err(error) if error.code == "unknown_model");
        super::patiently(&app, unknown, move |app| app.head(&model)).await?;
    }
    let subscription = app.hub.subscribe(&model).map_err(|full| {
        ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "too_many_subscribers", full.to_string())
    })?;
    let (tx, mut rx) = mpsc::channel(CONNECTION_EVENTS);
    tokio::spawn(feed(app.clone(), model, since, subscription, tx));
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>)));
    let keep_alive = KeepAlive::new().interval(Duration::from_millis(app.limits.sse_heartbeat_ms));
    Ok(([(header::CACHE_CONTROL, "no-cache")], Sse::new(stream).keep_alive(keep_alive)).into_response())
}

/// Feeds one client: retry, catch-up, synced, then live diffs. Ends when the client goes.
async fn feed(app: Arc<App>, model: ModelKey, since: Option<Hash>, mut sub: Subscription, tx: mpsc::Sender<Event>) {
    let retry = Event::default().retry(Duration::from_millis(app.limits.sse_retry_ms));
    if tx.send(retry).await.is_err() {
        return;
    }
    let Some(mut at) = catch_up(&app, &model, since, &tx).await else { return };
    let synced = serde_json::json!({"hash": at.0.to_string(), "seq": at.1});
    if tx.send(Event::default().event("synced").data(synced.to_string())).await.is_err() {
        return;
    }
    loop {
        let next = tokio::select! {
            next = sub.receiver.recv() => next,
            () = tx.closed() => return,
            () = app.status.stop.cancelled() => return,
        };
        let next = next.as_deref().map(|live| match live {
            Live::Diff(diff) => Some(diff),
            Live::Replaced => None,
        });
        let diff = match next {
            Ok(Some(diff)) if diff.seq <= at.1 => continue, // covered by the catch-up
            Ok(Some(diff)) if diff.prev == at.0 => diff,
            Err(broadcast::error::RecvError::Closed) => return,
            // Fell a full ring behind, or (never expected) a diff that does not chain:
            // one patch from the client's hash to the head instead.
            other => {
                match other {
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        app.hub.lagged_total.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(kind = %model.kind, id = %model.id, missed, "slow client lagged; catching up");
                    }
                    Ok(None) => tracing::debug!(kind = %model.kind, id = %model.id, "model replayed; resetting"),
                    _ => tracing::warn!(kind = %model.kind, id = %model.id, "live diff does not chain; catching up"),
                }
                match catch_up(&app, &model, Some(at.0), &tx).await {
                    Some(now) => at = now,
                    None => return,
                }
                continue;
            }
        };
        if tx.send(diff_event(diff)).await.is_err() {
            return;
        }
        at = (diff.hash, diff.seq);
    }
}

/// Sends the catch-up from `since` to the committed head; returns the version the client
/// is at, or `None` if the stream is over.
async fn catch_up(
    app: &Arc<App>,
    model: &ModelKey,
    since: Option<Hash>,
    tx: &mpsc::Sender<Event>,
) -> Option<(Hash, u64)> {
    let plan = super::plan_patiently(app, model.clone(), since).await;
    let plan = match plan {
        Ok(plan) => plan,
        Err(error) => {
            let data = serde_json::json!({"code": error.code, "message": error.message});
            let _ = tx.send(Event::default().event("error").data(data.to_string())).await;
            return None;
        }
    };
    for event in plan_events(&plan) {
        tx.send(event).await.ok()?;
    }
    Some(plan.version())
}

/// `snapshot` data. States and diffs are embedded as stored, never re-parsed.
#[derive(Serialize)]
struct SnapshotData {
    state: Box<RawValue>,
    hash: String,
    seq: u64,
}

/// `patch` data.
#[derive(Serialize)]
struct PatchData {
    from: String,
    to: String,
    seq: u64,
    diff: Box<RawValue>,
}

fn plan_events(plan: &Plan) -> Vec<Event> {
    match plan {
        Plan::UpToDate { .. } => Vec::new(),
        Plan::Snapshot { reset, state, hash, seq } => {
            let mut events = Vec::new();
            if let Some(reason) = reset {
                events.push(Event::default().event("reset").data(serde_json::json!({"reason": reason}).to_string()));
            }
            let data = SnapshotData { state: stored_json(state), hash: hash.to_string(), seq: *seq };
            let data = serde_json::to_string(&data).expect("serializable");
            events.push(Event::default().event("snapshot").id(hash.to_string()).data(data));
            events
        }
        Plan::Patch { from, to, seq, diff } => {
            let data = PatchData { from: from.to_string(), to: to.to_string(), seq: *seq, diff: stored_json(diff) };
            let data = serde_json::to_string(&data).expect("serializable");
            vec![Event::default().event("patch").id(to.to_string()).data(data)]
        }
        Plan::Diffs(diffs) => diffs
            .iter()
            .map(|d| {
                let body = serde_json::to_string(&DiffBody::from_stored(d)).expect("serializable");
                Event::default().event("diff").id(d.hash.to_string()).data(body)
            })
            .collect(),
    }
}

fn diff_event(diff: &LiveDiff) -> Event {
    let data = diff.rendered.get_or_init(|| {
        let body = DiffBody {
            prev: diff.prev.to_string(),
            hash: diff.hash.to_string(),
            seq: diff.seq,
            offset: diff.offset,
            diff: stored_json(&diff.payload),
        };
        serde_json::to_vec(&body).expect("serializable").into()
    });
    let data = std::str::from_utf8(data).expect("JSON is UTF-8");
    Event::default().event("diff").id(diff.hash.to_string()).data(data)
}
