//! Sharded mode: a request for a model another server serves is answered with a 307 to it
//! (`[cluster] route = "redirect"`), or forwarded there and its answer relayed (`"proxy"`).
//! Without `[cluster]` every request is served here.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;

use super::ApiError;
use crate::app::App;
use crate::app::Route;
use crate::app::RouteMode;
use crate::model::ModelKey;

/// Marks a request one server forwarded to another: the other serves it or refuses it,
/// never forwards it again (no loop while two servers' maps disagree for a moment).
pub(super) const FORWARDED_BY: &str = "statefold-forwarded-by";

/// Headers not passed on when forwarding (hop-by-hop, or set by the client library).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"];

/// A request as it arrived, for sending the client (or the request) elsewhere.
pub(super) struct Incoming<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub body: Option<Bytes>,
}

/// `Ok(None)`: this server serves `model`. Otherwise the answer: a 307 to the server that
/// does (an SSE stream's `Last-Event-ID` kept in its `since`), that server's answer, or 503
/// `partition_unavailable` with `Retry-After` while no server can serve it.
pub(super) async fn elsewhere(
    app: &Arc<App>,
    model: &ModelKey,
    incoming: Incoming<'_>,
) -> Result<Option<Response>, ApiError> {
    let (member, url) = match app.route(model)? {
        Route::Local => return Ok(None),
        Route::Unavailable(reason) => return Err(unavailable(reason)),
        Route::Elsewhere { member, url } => (member, url),
    };
    if let Some(by) = incoming.headers.get(FORWARDED_BY) {
        let by = by.to_str().unwrap_or("?");
        return Err(unavailable(format!(
            "forwarded here by {by}, but served by {member} as this server sees it: the servers' maps are settling; retry shortly"
        )));
    }
    let target = format!("{url}{}", path_and_query(incoming.uri, incoming.headers));
    let mode = app.route_mode().unwrap_or_default();
    tracing::debug!(kind = %model.kind, id = %model.id, %member, ?mode, %target, "served elsewhere");
    match mode {
        RouteMode::Redirect => {
            let location = HeaderValue::from_str(&target)
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
            Ok(Some((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()))
        }
        RouteMode::Proxy => forward(app, &target, incoming).await.map(Some),
    }
}

fn unavailable(reason: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "partition_unavailable", reason);
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
fn client(app: &App) -> &'static reqwest::Client {
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
    if let Some(body) = incoming.body {
        request = request.body(body);
    }
    let answer = request.send().await.map_err(|e| {
        let mut error =
            ApiError::new(StatusCode::BAD_GATEWAY, "forward_failed", format!("forwarding to {target}: {e}"));
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
    response.body(body).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}
