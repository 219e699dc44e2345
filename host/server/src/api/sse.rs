//! `GET /v1/models/{kind}/{id}/events`: catch-up, then live.
//!
//! The hand-over is race-free: the stream subscribes to live diffs first, then plans the
//! catch-up from the committed head, then drops live diffs the catch-up already covers
//! (seq at or below it). Every later diff must chain from the hash the client holds
//! (`prev`); a client that falls a full ring behind, or a chain that does not follow, is
//! answered with a patch from the client's last hash instead. Lossless either way.
//!
//! A stream is the connection's response body: no task or channel of its own. The body is
//! polled when the connection can take more, so a client that does not read leaves its
//! place in the model's ring, which absorbs the rest. A live diff's event is rendered once
//! for all of its subscribers.

use crate::code::Code;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::{ApiError, DiffBody, parse_hash, stored_json};
use crate::app::Route;
use crate::app::{App, Plan};
use crate::auth::{Action, Caller};
use crate::chain::Hash;
use crate::hub::{Live, LiveDiff, Subscription};
use crate::model::ModelKey;

/// The reconnection delay a `moved` event asks for (its `retry:` field): at once, nearly.
const MOVED_RETRY_MS: u64 = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    since: Option<String>,
}

pub(super) async fn events(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((kind, id)): Path<(String, String)>,
    query: Result<Query<EventsQuery>, QueryRejection>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    super::access::allow(&caller, Action::Subscribe, &kind, Some(&id))?;
    let Query(query) = query?;
    let incoming =
        super::route::Incoming { method: &axum::http::Method::GET, uri: &uri, headers: &headers, body: None };
    if let Some(response) = super::route::elsewhere(&app, &ModelKey::new(&kind, &id), incoming).await? {
        return Ok(response);
    }
    // `Last-Event-ID` (what a browser's EventSource sends on reconnect) overrides `since`.
    // An empty one (or an empty `since`) is as if absent: EventSource never sends one.
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("<not text>").to_owned());
    let nonempty = |s: &String| !s.is_empty();
    let since = last_event_id.filter(nonempty).or(query.since.filter(nonempty));
    let since = since.as_deref().map(parse_hash).transpose()?;
    let model = ModelKey::new(&kind, &id);
    {
        // A model created through a replica ahead of this one: wait for it briefly.
        let model = model.clone();
        let unknown = |result: &Result<_, ApiError>| matches!(result, Err(error) if error.code == Code::UnknownModel);
        super::patiently(&app, unknown, move |app| app.head(&model)).await?;
    }
    let subscription = app.subscribe(&model).map_err(|full| {
        ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, Code::TooManySubscribers, full.to_string())
    })?;
    let mut feed = Feed::new(app, model, since, subscription);
    feed.hopped = headers.contains_key(super::route::FORWARDED_BY);
    if let Some(expires_s) = caller.expires_s() {
        feed.expires = Some(Box::pin(tokio::time::sleep_until(deadline_of(expires_s))));
    }
    let frames = futures_util::stream::unfold(feed, |mut feed| async move {
        let frame = feed.next().await?;
        Some((Ok::<_, Infallible>(frame), feed))
    });
    let headers = [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")];
    Ok((headers, Body::from_stream(frames)).into_response())
}

/// One client's stream: retry, catch-up, synced, then live diffs, with a heartbeat when
/// nothing was sent for `sse_heartbeat_ms`. Ends when the server stops (or the client
/// goes, which drops it).
struct Feed {
    app: Arc<App>,
    model: ModelKey,
    sub: Subscription,
    /// The version the client holds once `queue` is sent; `None` before the first catch-up.
    at: Option<(Hash, u64)>,
    since: Option<Hash>,
    /// Frames to send before the next live diff.
    queue: VecDeque<Bytes>,
    heartbeat: Duration,
    /// When the last frame went out, and the timer that checks it.
    sent: Instant,
    idle: Pin<Box<Sleep>>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When the caller's token expires: the stream then ends with an `expired` event.
    expires: Option<Pin<Box<Sleep>>>,
    /// Sharded mode: route changes; the stream ends with a `moved` event when its model is
    /// no longer served here.
    routes: Option<tokio::sync::watch::Receiver<u64>>,
    /// Another server sent this stream's request here: it is served while this server
    /// folds the model's partition, whoever owns it.
    hopped: bool,
    over: bool,
}

/// Waits for a route change (forever when not sharded).
async fn route_change(routes: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    match routes {
        Some(routes) => {
            if routes.changed().await.is_err() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending().await,
    }
}

/// The instant a token that expires at `expires_s` (seconds since the epoch) runs out.
fn deadline_of(expires_s: i64) -> Instant {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    Instant::now() + Duration::from_secs_f64((expires_s as f64 - now_s).max(0.0))
}

/// Waits for the token to expire (forever without one).
async fn expiry(expires: &mut Option<Pin<Box<Sleep>>>) {
    match expires {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

impl Feed {
    fn new(app: Arc<App>, model: ModelKey, since: Option<Hash>, sub: Subscription) -> Feed {
        let heartbeat = Duration::from_millis(app.limits().sse_heartbeat_ms);
        // A child token: polling it locks its own node, not the one all streams share.
        let stop = Box::pin(app.stopping().child_token().cancelled_owned());
        let retry = format!("retry: {}\n\n", app.limits().sse_retry_ms);
        let routes = app.route_changes();
        Feed {
            app,
            model,
            sub,
            at: None,
            since,
            queue: VecDeque::from([Bytes::from(retry)]),
            heartbeat,
            sent: Instant::now(),
            idle: Box::pin(tokio::time::sleep(heartbeat)),
            stop,
            expires: None,
            routes,
            hopped: false,
            over: false,
        }
    }

    /// The next frame to send, or `None` once the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        let frame = self.frame().await?;
        self.sent = Instant::now();
        Some(frame)
    }

    async fn frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = self.queue.pop_front() {
                return Some(frame);
            }
            if self.over {
                return None;
            }
            let Some(at) = self.at else {
                let since = self.since;
                if let Some(at) = self.catch_up(since).await {
                    let synced = serde_json::json!({"hash": at.0.to_string(), "seq": at.1}).to_string();
                    self.queue.push_back(frame("synced", None, &synced));
                }
                continue;
            };
            let next = tokio::select! {
                next = self.sub.receiver.recv() => next,
                () = self.idle.as_mut() => {
                    // Re-armed from the last frame sent, so a busy stream resets no timer.
                    let due = self.sent + self.heartbeat;
                    if due <= Instant::now() {
                        self.idle.as_mut().reset(Instant::now() + self.heartbeat);
                        return Some(Bytes::from_static(b":\n\n"));
                    }
                    self.idle.as_mut().reset(due);
                    continue;
                }
                () = self.stop.as_mut() => return None,
                () = route_change(&mut self.routes) => {
                    match self.app.route(&self.model, self.hopped) {
                        Ok(Route::Local) => continue,
                        route => {
                            // A rebalance moved the model: the client reconnects with its last
                            // hash (here: a redirect to where it is served now).
                            self.over = true;
                            let to = match route {
                                Ok(Route::Elsewhere { url, .. }) => Some(url),
                                _ => None,
                            };
                            let data = serde_json::json!({"reason": "rebalance", "to": to}).to_string();
                            let mut moved = BytesMut::from(format!("retry: {}\n", MOVED_RETRY_MS).as_bytes());
                            moved.extend_from_slice(&frame("moved", None, &data));
                            return Some(moved.freeze());
                        }
                    }
                }
                () = expiry(&mut self.expires) => {
                    self.over = true;
                    let data = r#"{"reason":"the token expired: reconnect with a fresh one"}"#;
                    return Some(frame("expired", None, data));
                }
            };
            let next = next.as_deref().map(|live| match live {
                Live::Diff(diff) => Some(diff),
                Live::Replaced => None,
            });
            match next {
                Ok(Some(diff)) if diff.seq <= at.1 => {} // covered by the catch-up
                Ok(Some(diff)) if diff.prev == at.0 => {
                    self.at = Some((diff.hash, diff.seq));
                    let frame = diff_frame(diff);
                    self.app.metrics().sse_publish_delay_seconds.observe(diff.published.elapsed().as_secs_f64());
                    return Some(frame);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
                // Fell a full ring behind, or (never expected) a diff that does not chain:
                // one patch from the client's hash to the head instead.
                other => {
                    let (kind, id) = (&self.model.kind, &self.model.id);
                    match other {
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            self.app.metrics().sse_lagged.inc();
                            tracing::debug!(%kind, %id, missed, "slow client lagged; catching up");
                        }
                        Ok(None) => tracing::debug!(%kind, %id, "model replayed; resetting"),
                        _ => tracing::warn!(%kind, %id, "live diff does not chain; catching up"),
                    }
                    self.catch_up(Some(at.0)).await;
                }
            }
        }
    }

    /// Queues the catch-up from `since` to the committed head and returns the version the
    /// client will be at; or queues an error and ends the stream.
    async fn catch_up(&mut self, since: Option<Hash>) -> Option<(Hash, u64)> {
        match super::plan_patiently(&self.app, self.model.clone(), since).await {
            Ok(plan) => {
                self.queue.extend(plan_frames(&plan));
                self.at = Some(plan.version());
                self.at
            }
            Err(error) => {
                let data = serde_json::json!({"code": error.code.as_str(), "message": error.message});
                self.queue.push_back(frame("error", None, &data.to_string()));
                self.over = true;
                None
            }
        }
    }
}

/// `snapshot` data. States and diffs are embedded as stored, never re-parsed.
#[derive(Serialize)]
struct SnapshotData {
    state: Box<RawValue>,
    hash: String,
    seq: u64,
    version: String,
}

/// `patch` data.
#[derive(Serialize)]
struct PatchData {
    from: String,
    to: String,
    seq: u64,
    diff: Box<RawValue>,
    version: String,
}

fn plan_frames(plan: &Plan) -> Vec<Bytes> {
    match plan {
        Plan::UpToDate { .. } => Vec::new(),
        Plan::Snapshot { reset, state, hash, seq, reducer } => {
            let mut frames = Vec::new();
            if let Some(reason) = reset {
                frames.push(frame("reset", None, &serde_json::json!({"reason": reason.as_str()}).to_string()));
            }
            let data = SnapshotData {
                state: stored_json(state),
                hash: hash.to_string(),
                seq: *seq,
                version: reducer.to_string(),
            };
            let data = serde_json::to_string(&data).expect("serializable");
            frames.push(frame("snapshot", Some(hash), &data));
            frames
        }
        Plan::Patch { from, to, seq, diff, reducer } => {
            let data = PatchData {
                from: from.to_string(),
                to: to.to_string(),
                seq: *seq,
                diff: stored_json(diff),
                version: reducer.to_string(),
            };
            let data = serde_json::to_string(&data).expect("serializable");
            vec![frame("patch", Some(to), &data)]
        }
        Plan::Diffs(diffs) => diffs
            .iter()
            .map(|d| {
                frame("diff", Some(&d.hash), &serde_json::to_string(&DiffBody::from_stored(d)).expect("serializable"))
            })
            .collect(),
    }
}

/// A live diff's event, rendered by its first subscriber for all of them.
fn diff_frame(diff: &LiveDiff) -> Bytes {
    diff.rendered
        .get_or_init(|| {
            let body = DiffBody {
                prev: diff.prev.to_string(),
                hash: diff.hash.to_string(),
                seq: diff.seq,
                offset: diff.offset,
                diff: stored_json(&diff.payload),
                version: diff.reducer.to_string(),
            };
            frame("diff", Some(&diff.hash), &serde_json::to_string(&body).expect("serializable"))
        })
        .clone()
}

/// One SSE event: `event`, `id` (a hash) and `data`, whose lines (a stored JSON text may
/// have some) each become a `data:` field.
fn frame(event: &str, id: Option<&Hash>, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 100);
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    if let Some(id) = id {
        out.put_slice(b"\nid: ");
        out.put_slice(id.to_string().as_bytes());
    }
    for line in data.split('\n') {
        for line in line.strip_suffix('\r').unwrap_or(line).split('\r') {
            out.put_slice(b"\ndata: ");
            out.put_slice(line.as_bytes());
        }
    }
    out.put_slice(b"\n\n");
    out.freeze()
}
