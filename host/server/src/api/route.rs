//! Sharded mode: a request for a model another server serves is forwarded there and its
//! answer relayed (`[cluster] route = "proxy"`, the default), or answered with a 307 to it
//! (`"redirect"`). Without `[cluster]` every request is served here.
//!
//! **A request takes at most one hop.** A forwarded request carries the header
//! [`FORWARDED_BY`], a redirected one the query parameter [`HOP_PARAM`] (which
//! [`hop_marker`] turns into the same header before any handler sees it); both name the
//! server that sent it. A server reached by a hop serves the request if it folds the
//! model's partition and has caught up on it, and otherwise answers 503
//! `partition_unavailable` with `Retry-After`: it never sends it on, so two servers whose
//! maps disagree for a moment cannot pass a request back and forth.

use crate::code::Code;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;

use super::ApiError;
use crate::app::App;
use crate::app::Route;
use crate::app::RouteMode;
use crate::model::ModelKey;

/// Marks a request one server sent to another (its value: the sender's member name).
pub(super) const FORWARDED_BY: &str = "statefold-forwarded-by";

/// The query parameter a redirect adds to its `Location` to mark the hop (its value: the
/// redirecting server's member name).
pub(super) const HOP_PARAM: &str = "statefold_hop";

/// Headers not passed on when forwarding (hop-by-hop, or set by the client library).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "x-forwarded-host",
];

/// A request as it arrived, for sending the client (or the request) elsewhere.
pub(super) struct Incoming<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: Option<Bytes>,
}

/// Middleware: a request that arrives by a redirect (its query has [`HOP_PARAM`]) loses
/// the parameter and gains the [`FORWARDED_BY`] header, so that every handler sees one hop
/// marker and no handler's query has to know the parameter.
pub(super) async fn hop_marker(mut request: Request, next: Next) -> Response {
    let Some(query) = request.uri().query() else { return next.run(request).await };
    let prefix = format!("{HOP_PARAM}=");
    if !query.split('&').any(|p| p.starts_with(&prefix)) {
        return next.run(request).await;
    }
    let by = query.split('&').find_map(|p| p.strip_prefix(&prefix)).unwrap_or_default().to_owned();
    let rest: Vec<&str> = query.split('&').filter(|p| !p.starts_with(&prefix) && !p.is_empty()).collect();
    let path = request.uri().path();
    let path_and_query = if rest.is_empty() { path.to_owned() } else { format!("{path}?{}", rest.join("&")) };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    match Uri::from_parts(parts) {
        Ok(uri) => *request.uri_mut() = uri,
        Err(e) => return ApiError::bad_request(Code::BadQuery, format!("{HOP_PARAM}: {e}")).into_response(),
    }
    let by = HeaderValue::from_str(&by).unwrap_or_else(|_| HeaderValue::from_static("?"));
    request.headers_mut().insert(FORWARDED_BY, by);
    next.run(request).await
}

/// `Ok(None)`: this server serves `model`. Otherwise the answer: that server's answer
/// (proxy), a 307 to it (redirect; an SSE stream's `Last-Event-ID` kept in its `since`), or
/// 503 `partition_unavailable` with `Retry-After` while no server can serve it, or when the
/// request came by a hop and this server cannot serve it.
pub(super) async fn elsewhere(
    app: &Arc<App>,
    model: &ModelKey,
    incoming: Incoming<'_>,
) -> Result<Option<Response>, ApiError> {
    let hopped = incoming.headers.contains_key(FORWARDED_BY);
    let (member, url) = match app.route(model, hopped)? {
        Route::Local => return Ok(None),
        Route::Unavailable(reason) => return Err(unavailable(reason)),
        Route::Elsewhere { member, url } => (member, url),
    };
    // `route` never sends a hopped request on.
    debug_assert!(!hopped);
    let target = format!("{url}{}", path_and_query(incoming.uri, incoming.headers));
    let mode = app.route_mode().unwrap_or_default();
    tracing::debug!(kind = %model.kind, id = %model.id, %member, ?mode, %target, "served elsewhere");
    match mode {
        RouteMode::Redirect => {
            let by = app.member().unwrap_or_default();
            let separator = if target.contains('?') { '&' } else { '?' };
            let location = format!("{target}{separator}{HOP_PARAM}={}", encode_query_value(by));
            let location = HeaderValue::from_str(&location)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, e.to_string()))?;
            Ok(Some((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()))
        }
        RouteMode::Proxy => forward(app, &target, incoming).await.map(Some),
    }
}

/// A member name as a query value (names are configured text; `%`-encode all but the
/// unreserved characters).
pub(super) fn encode_query_value(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) fn unavailable(reason: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::PartitionUnavailable, reason);
    error.retry_after_s = Some(1);
    error
}

/// The path and query to send on, with an SSE client's `Last-Event-ID` written into `since`
/// (so that the hash it holds survives any client's redirect handling).
fn path_and_query(uri: &Uri, headers: &HeaderMap) -> String {
    let path = uri.path();
    let query = uri.query().unwrap_or("");
    let last =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).filter(|v| v.parse::<crate::chain::Hash>().is_ok());
    let query = match last {
        Some(hash) => {
            let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !p.starts_with("since=")).collect();
            let since = format!("since={hash}");
            pairs.push(&since);
            pairs.join("&")
        }
        None => query.to_owned(),
    };
    if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") }
}

/// The one client servers forward with: no overall timeout (streams are long), a connect
/// timeout, redirects not followed (the other server's answer is relayed as it is).
pub(super) fn client(app: &App) -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(app.limits().cluster_member_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a client with these settings builds")
    })
}

/// Sends the request to `target` and relays the answer, its body streamed.
async fn forward(app: &Arc<App>, target: &str, incoming: Incoming<'_>) -> Result<Response, ApiError> {
    let mut request = client(app).request(incoming.method.clone(), target);
    for (name, value) in incoming.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name.as_str() != FORWARDED_BY {
            request = request.header(name, value);
        }
    }
    request = request.header(FORWARDED_BY, app.member().unwrap_or_default());
    // The authority the client addressed, for the owner's same-origin check.
    let host = incoming
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| incoming.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    if let Some(host) = host {
        request = request.header("x-forwarded-host", host);
    }
    if let Some(body) = incoming.body {
        request = request.body(body);
    }
    let answer = request.send().await.map_err(|e| {
        let mut error =
            ApiError::new(StatusCode::BAD_GATEWAY, Code::ForwardFailed, format!("forwarding to {target}: {e}"));
        error.retry_after_s = Some(1);
        error
    })?;
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response = response.header(name.clone(), value.clone());
        }
    }
    let served_by = HeaderName::from_static("statefold-served-by");
    response = response.header(served_by, target.split('/').take(3).collect::<Vec<_>>().join("/"));
    let body = Body::from_stream(answer.bytes_stream().map_err(std::io::Error::other));
    response.body(body).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, e.to_string()))
}
