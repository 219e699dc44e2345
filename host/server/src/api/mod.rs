//! The HTTP API (axum): the routes of the design's table, JSON errors, the SSE stream.
//! Only this module speaks JSON; wire types live here.

mod access;
mod listing;
mod reducers;
pub mod requests;
mod route;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::app::{App, AppError, Plan, Reset};
use crate::auth::{Action, Caller};
use crate::chain::Hash;
use crate::code::Code;
use crate::metrics::RequestLabels;
use crate::model::{Applied, ModelKey};
use access::{allow, allow_admin};

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The inspector page and its scripts, built into the binary: no build step at run time.
/// `client.js` is `@statefold/client`'s build (`clients/typescript`, `npm run build`;
/// tests/tests/client_typescript.rs checks that this copy is the current one).
const INSPECTOR_HTML: &str = include_str!("inspector/index.html");
const INSPECTOR_JS: &str = include_str!("inspector/inspector.js");
pub const INSPECTOR_CLIENT_JS: &str = include_str!("inspector/client.js");

pub fn router(app: Arc<App>) -> Router {
    let body_max = app.limits().diff_bytes_max;
    Router::new()
        .route("/v1/models/{kind}", post(create).get(listing::models))
        .route("/v1/models/{kind}/{id}", get(state))
        .route("/v1/models/{kind}/{id}/diffs", post(append).get(missing))
        .route("/v1/models/{kind}/{id}/events", get(sse::events))
        .route("/v1/kinds/{kind}/rejections", get(listing::rejections))
        .route("/v1/kinds/{kind}/replay", post(reducers::start_replay).get(reducers::replay))
        .route("/v1/reducers", get(reducers::list))
        .route(
            "/v1/reducers/{name}",
            get(reducers::show)
                .put(reducers::deploy)
                .layer(DefaultBodyLimit::max(app.limits().reducer_module_bytes_max + 1)),
        )
        .route("/v1/reducers/{name}/versions/{version}/module", get(reducers::module))
        .route("/inspector", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INSPECTOR_HTML) }))
        .route("/inspector/", get(|| async { axum::response::Redirect::permanent("../inspector") }))
        .route("/inspector/inspector.js", get(|| async { javascript(INSPECTOR_JS) }))
        .route("/inspector/client.js", get(|| async { javascript(INSPECTOR_CLIENT_JS) }))
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/v1/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, Code::NotFound, "no such route") })
        // One more byte than a diff may have, so that the handler sees "too large" itself.
        .layer(DefaultBodyLimit::max(body_max + 1))
        .layer(middleware::from_fn(close_after_unread_body))
        .layer(middleware::from_fn(route::hop_marker))
        .layer(middleware::from_fn_with_state(app.clone(), timed))
        .with_state(app)
}

/// An HTTP/1 request refused before its body is read (401, 403, 413, or no such route: an
/// upload refused before its first byte) ends its connection, and the response says so
/// (`Connection: close`). hyper closes a connection whose request body was left unread;
/// without the header, a client could send its next request on it just as it closes.
async fn close_after_unread_body(request: Request, next: Next) -> Response {
    use axum::http::Version;
    let headers = request.headers();
    let length = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let body = length.is_some_and(|n| n > 0) || headers.contains_key(header::TRANSFER_ENCODING);
    let http1 = request.version() < Version::HTTP_2;
    let routed = request.extensions().get::<MatchedPath>().is_some();
    let mut response = next.run(request).await;
    let unread =
        matches!(response.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::PAYLOAD_TOO_LARGE)
            || !routed;
    if http1 && body && unread && response.status().is_client_error() {
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// An error response: `{"error": {"code", "message"}}` with a fitting status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
    /// `WWW-Authenticate` of a 401.
    challenge: Option<String>,
    /// `Retry-After` of a 503 that passes soon, in seconds.
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), challenge: None, retry_after_s: None }
    }

    fn bad_request(code: Code, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(challenge) = self.challenge.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::bad_request(Code::BadQuery, rejection.body_text())
    }
}

impl From<AppError> for ApiError {
    fn from(error: AppError) -> ApiError {
        let error = match error {
            AppError::Deploy(error) => return (*error).into(),
            other => other,
        };
        let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, error.code(), error.message())
    }
}

/// Runs blocking service code off the async threads; a fatal store error stops the process.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    f: impl FnOnce(&App) -> Result<T, AppError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    let result = tokio::task::spawn_blocking({
        let app = app.clone();
        move || f(&app)
    })
    .await;
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(AppError::Store(e))) if e.is_fatal() => {
            app.fatal(e.to_string());
            Err(AppError::Store(e).into())
        }
        Ok(Err(e)) => Err(e.into()),
        Err(join) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, join.to_string())),
    }
}

/// `PARTITION:OFFSET` in query parameter `name`.
fn parse_position(text: &str, name: &str) -> Result<(u32, u64), ApiError> {
    // A number past its type's range is as far as that type goes: it names no record (no
    // such partition, or past the end), which is not a malformed position.
    let digits = |text: &str| {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse::<u64>().unwrap_or(u64::MAX))
    };
    text.split_once(':')
        .and_then(|(p, o)| Some((u32::try_from(digits(p)?).unwrap_or(u32::MAX), digits(o)?)))
        .ok_or_else(|| ApiError::bad_request(Code::BadQuery, format!("{name}={text}: expected PARTITION:OFFSET")))
}

/// Runs `f` until it stops answering "unknown" (see `unknown`), or `failover_wait_ms` has
/// passed, trying again after each commit of the fold loop. A client that comes from a
/// replica ahead of this one holds hashes (and models) this one has not folded yet: it waits
/// for them briefly instead of being told to start over.
async fn patiently<T: Send + 'static>(
    app: &Arc<App>,
    unknown: impl Fn(&Result<T, ApiError>) -> bool,
    f: impl Fn(&App) -> Result<T, AppError> + Clone + Send + 'static,
) -> Result<T, ApiError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(app.limits().failover_wait_ms);
    let mut commits = app.commits();
    loop {
        commits.borrow_and_update();
        let result = blocking(app, f.clone()).await;
        if !unknown(&result) {
            return result;
        }
        match tokio::time::timeout_at(deadline, commits.changed()).await {
            Ok(Ok(())) => {}
            Err(_) | Ok(Err(_)) => return result,
        }
    }
}

/// The catch-up plan for a client at `since`, waiting briefly for a `since` (or a model)
/// this replica has not folded yet.
async fn plan_patiently(app: &Arc<App>, model: ModelKey, since: Option<Hash>) -> Result<Plan, ApiError> {
    let unknown = |result: &Result<Plan, ApiError>| match result {
        Ok(Plan::Snapshot { reset, .. }) => *reset == Some(Reset::Unknown),
        Err(error) => error.code == Code::UnknownModel,
        Ok(_) => false,
    };
    patiently(app, unknown, move |app| app.plan(&model, since)).await
}

fn parse_hash(text: &str) -> Result<Hash, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(Code::MalformedHash, format!("{text:?} is not a hash: expected 64 hex digits"))
    })
}

fn raw_json(bytes: &[u8], what: &str) -> Result<Box<RawValue>, ApiError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::bad_request(Code::MalformedJson, format!("{what} is not UTF-8")))?;
    RawValue::from_string(text.to_owned())
        .map_err(|e| ApiError::bad_request(Code::MalformedJson, format!("{what} is not valid JSON: {e}")))
}

/// Stored JSON (states and diffs the reducer accepted) embedded as is.
fn stored_json(bytes: &[u8]) -> Box<RawValue> {
    raw_json(bytes, "stored value").unwrap_or_else(|_| {
        // The reducer declared JSON but produced something else: send it as a string
        // rather than failing the client.
        RawValue::from_string(serde_json::to_string(&String::from_utf8_lossy(bytes)).expect("a string serializes"))
            .expect("a JSON string is JSON")
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct VersionBody {
    id: String,
    hash: String,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
}

async fn create(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(kind): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(&app, body)?;
    let request: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(Code::MalformedJson, format!("body: {e}")))?
    };
    let id = match request.id {
        Some(id) => id,
        None => local_id(&app, &kind)?,
    };
    allow(&caller, Action::Create, &kind, Some(&id))?;
    // Sharded: created where it is folded (the answer waits for the fold).
    let model = ModelKey::new(&kind, &id);
    let incoming = route::Incoming { method: &method, uri: &uri, headers: &headers, body: Some(body.clone()) };
    if let Some(response) = route::elsewhere(&app, &model, incoming).await? {
        return Ok(response);
    }
    let topic = {
        let (kind, id) = (kind.clone(), id.clone());
        blocking(&app, move |app| app.check_create(&kind, &id)).await?
    };
    let (partition, offset) = app.write(&topic, &id, None, &[]).await?;
    let model = ModelKey::new(&kind, &id);
    let wait = Duration::from_millis(app.limits().wait_applied_ms_max);
    let version = app.wait_folded(&model, &topic, partition, offset, wait).await?;
    let body = VersionBody { id, hash: version.hash.to_string(), seq: version.seq, offset: None };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub(super) fn new_id() -> String {
    use rand::RngExt;
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

/// A new id; sharded, one on a partition this server serves when it serves any of `kind`'s
/// (else any: the request then goes to a server that does, which picks its own).
fn local_id(app: &App, kind: &str) -> Result<String, ApiError> {
    for _ in 0..LOCAL_ID_TRIES {
        let id = new_id();
        if app.route(&ModelKey::new(kind, &id), false)? == crate::app::Route::Local {
            return Ok(id);
        }
    }
    Ok(new_id())
}

/// Ids drawn to find one served here: with 1 partition of 64 served, 1 - (63/64)^256 of
/// creates land here (98%).
const LOCAL_ID_TRIES: usize = 256;

fn body_bytes(app: &App, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::TooLarge,
            format!("the body is larger than diff_bytes_max ({} bytes)", app.limits().diff_bytes_max),
        )
    };
    match body {
        Ok(bytes) if bytes.len() > app.limits().diff_bytes_max => Err(too_large()),
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
        Err(rejection) => Err(ApiError::bad_request(Code::BadBody, rejection.body_text())),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendQuery {
    wait: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn append(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((kind, id)): Path<(String, String)>,
    query: Result<Query<AppendQuery>, QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Append, &kind, Some(&id))?;
    let Query(query) = query?;
    let wait = match query.wait.as_deref() {
        None | Some("accepted") => false,
        Some("applied") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                Code::BadQuery,
                format!("wait={other}: expected `applied` or `accepted`"),
            ));
        }
    };
    app.kind(&kind)?;
    let body = body_bytes(&app, body)?;
    raw_json(&body, "the diff")?;
    let model = ModelKey::new(&kind, &id);
    if wait {
        // Sharded: a waiting append goes where the model is folded; one that does not wait
        // is written through any server.
        let incoming = route::Incoming { method: &method, uri: &uri, headers: &headers, body: Some(body.clone()) };
        if let Some(response) = route::elsewhere(&app, &model, incoming).await? {
            return Ok(response);
        }
    }
    let topic = {
        // A model created through another replica may not be folded here yet.
        let model = model.clone();
        let unknown = |result: &Result<Arc<str>, ApiError>| matches!(result, Err(e) if e.code == Code::UnknownModel);
        patiently(&app, unknown, move |app| app.check_append(&model)).await?
    };
    let (partition, offset) = app.write(&topic, &id, Some(&body), &[]).await?;
    if !wait {
        let body = serde_json::json!({"partition": partition, "offset": offset});
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let timeout = Duration::from_millis(app.limits().wait_applied_ms_max);
    let version = app.wait_folded(&model, &topic, partition, offset, timeout).await?;
    let body = VersionBody { id, hash: version.hash.to_string(), seq: version.seq, offset: Some(version.offset) };
    Ok(Json(body).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateQuery {
    at: Option<String>,
    /// PARTITION:OFFSET: answer once this server has folded that record of the kind's
    /// topic (written through any replica).
    folded: Option<String>,
}

#[derive(Serialize)]
struct StateBody {
    kind: String,
    id: String,
    hash: String,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    state: Box<RawValue>,
}

impl StateBody {
    fn new(kind: String, id: String, state: &crate::app::StateAt) -> StateBody {
        StateBody {
            kind,
            id,
            hash: state.hash.to_string(),
            seq: state.seq,
            offset: state.offset,
            state: stored_json(&state.state),
        }
    }
}

async fn state(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((kind, id)): Path<(String, String)>,
    query: Result<Query<StateQuery>, QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Read, &kind, Some(&id))?;
    let Query(query) = query?;
    let incoming = route::Incoming { method: &Method::GET, uri: &uri, headers: &headers, body: None };
    if let Some(response) = route::elsewhere(&app, &ModelKey::new(&kind, &id), incoming).await? {
        return Ok(response);
    }
    let at = query.at.as_deref().map(parse_hash).transpose()?;
    if let Some(position) = query.folded.as_deref() {
        let (partition, offset) = parse_position(position, "folded")?;
        app.wait_position(&kind, partition, offset).await?;
    }
    let model = ModelKey::new(&kind, &id);
    let unknown = |result: &Result<_, ApiError>| matches!(result, Err(error) if error.code == Code::UnknownHash || error.code == Code::UnknownModel);
    let state = patiently(&app, unknown, move |app| app.state(&model, at)).await?;
    let etag = format!("\"{}\"", state.hash);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag = HeaderValue::from_str(&etag).expect("hex is a valid header value");
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    Ok(([(header::ETAG, etag)], Json(StateBody::new(kind, id, &state))).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingQuery {
    since: Option<String>,
}

/// The body of `GET .../diffs?since=`: the plan, as one JSON object.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum PlanBody {
    Snapshot {
        #[serde(skip_serializing_if = "Option::is_none")]
        reset: Option<&'static str>,
        hash: String,
        seq: u64,
        state: Box<RawValue>,
        version: String,
    },
    Patch {
        from: String,
        to: String,
        seq: u64,
        diff: Box<RawValue>,
        version: String,
    },
    Diffs {
        diffs: Vec<DiffBody>,
    },
    UpToDate {
        hash: String,
        seq: u64,
    },
}

/// One applied diff on the wire (SSE `diff` data, and in `GET .../diffs`); `version`: the
/// reducer version that applied it (a client folding with the reducer's own module switches
/// at the same diff as the server).
#[derive(Serialize)]
struct DiffBody {
    prev: String,
    hash: String,
    seq: u64,
    offset: u64,
    diff: Box<RawValue>,
    version: String,
}

impl DiffBody {
    fn from_stored(d: &Applied) -> DiffBody {
        DiffBody {
            prev: d.prev.to_string(),
            hash: d.hash.to_string(),
            seq: d.seq,
            offset: d.offset,
            diff: stored_json(&d.payload),
            version: d.reducer.to_string(),
        }
    }
}

impl From<&Plan> for PlanBody {
    fn from(plan: &Plan) -> PlanBody {
        match plan {
            Plan::Snapshot { reset, state, hash, seq, reducer } => PlanBody::Snapshot {
                reset: reset.map(Reset::as_str),
                hash: hash.to_string(),
                seq: *seq,
                state: stored_json(state),
                version: reducer.to_string(),
            },
            Plan::Patch { from, to, seq, diff, reducer } => PlanBody::Patch {
                from: from.to_string(),
                to: to.to_string(),
                seq: *seq,
                diff: stored_json(diff),
                version: reducer.to_string(),
            },
            Plan::Diffs(diffs) => PlanBody::Diffs { diffs: diffs.iter().map(DiffBody::from_stored).collect() },
            Plan::UpToDate { hash, seq } => PlanBody::UpToDate { hash: hash.to_string(), seq: *seq },
        }
    }
}

async fn missing(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((kind, id)): Path<(String, String)>,
    query: Result<Query<MissingQuery>, QueryRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Read, &kind, Some(&id))?;
    let Query(query) = query?;
    let since =
        query.since.as_deref().ok_or_else(|| ApiError::bad_request(Code::BadQuery, "since=<hash> is required"))?;
    let since = parse_hash(since)?;
    let model = ModelKey::new(&kind, &id);
    let incoming = route::Incoming { method: &Method::GET, uri: &uri, headers: &headers, body: None };
    if let Some(response) = route::elsewhere(&app, &model, incoming).await? {
        return Ok(response);
    }
    let plan = plan_patiently(&app, model, Some(since)).await?;
    Ok(Json(PlanBody::from(&plan)).into_response())
}

#[derive(Serialize)]
struct PartitionBody {
    topic: String,
    partition: u32,
    next: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag: Option<u64>,
}

/// Readiness, with where each partition stands: 200 when ready, 503 otherwise (same body,
/// plus the reason).
fn javascript(text: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], text)
        .into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let partitions: Vec<PartitionBody> = app
        .partitions()
        .into_iter()
        .map(|((topic, partition), p)| PartitionBody { topic, partition, next: p.next, end: p.end, lag: p.lag() })
        .collect();
    let replicas = app.replicas();
    let diverged = replicas.as_ref().and_then(|r| r.diverged.clone());
    let mut body = serde_json::json!({"ready": true, "partitions": partitions, "outbox": app.outbox()});
    if let Some(replicas) = replicas {
        // Only with replicas compared (Kafka and an attestation topic).
        body["replicas"] = serde_json::json!(replicas);
    }
    let error = match (app.unready_reason(), diverged) {
        (None, None) => return Json(body).into_response(),
        (_, Some(diverged)) => serde_json::json!({"code": Code::Diverged.as_str(), "message": diverged}),
        (Some(reason), None) => serde_json::json!({"code": Code::NotReady.as_str(), "message": reason}),
    };
    body["ready"] = false.into();
    body["error"] = error;
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// `GET /v1/cluster`: sharded mode's map as this server sees it (404 `not_sharded`
/// otherwise).
async fn cluster(State(app): State<Arc<App>>, caller: Caller) -> Result<Response, ApiError> {
    allow_admin(&caller)?;
    match app.cluster() {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            Code::NotSharded,
            "this server folds every partition: there is no cluster map ([cluster] turns sharded mode on)",
        )),
    }
}

async fn metrics(State(app): State<Arc<App>>, caller: Caller) -> Result<Response, ApiError> {
    allow_admin(&caller)?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], app.metrics_text()).into_response())
}

/// Times every request to its response head, by method, route pattern and status
/// (`statefold_http_request_seconds`). A request no route matched counts as `unmatched`,
/// a method outside the standard ones as `other`: a client cannot grow the label set.
async fn timed(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    use axum::http::Method;
    let started = std::time::Instant::now();
    let standard = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::TRACE,
        Method::CONNECT,
    ];
    let method = if standard.contains(request.method()) { request.method().as_str() } else { "other" }.to_owned();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let response = next.run(request).await;
    let labels = RequestLabels { method, route, status: response.status().as_u16() };
    app.metrics().http_request_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    response
}
