//! Routes of hot reload: reducer versions, deploys, replays.

use crate::code::Code;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::access::{allow, allow_kind};
use super::{ApiError, blocking};
use crate::app::{App, AppError, Module};
use crate::auth::{Action, Caller};
use crate::deploy::{DeployError, Deployed};
use crate::model::ReplayJob;
use crate::model::VersionRecord;

#[derive(Serialize)]
struct VersionBody {
    version: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<serde_json::Value>,
    origin: String,
    /// Who deployed it (the token's subject, with `[auth]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    declared: Option<serde_json::Value>,
    bytes: u64,
    first_seen_ms: i64,
    changed_ms: i64,
}

impl From<VersionRecord> for VersionBody {
    fn from(v: VersionRecord) -> VersionBody {
        VersionBody {
            version: v.id.to_string(),
            status: v.status.as_str(),
            error: v.refusal.map(|(code, message)| serde_json::json!({"code": code, "message": message})),
            origin: v.origin,
            subject: v.subject,
            declared: v.declared.map(|(name, version)| serde_json::json!({"name": name, "version": version})),
            bytes: v.bytes,
            first_seen_ms: v.first_ms,
            changed_ms: v.changed_ms,
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(error: DeployError) -> ApiError {
        let message = error.to_string();
        match error {
            DeployError::UnknownReducer(_) => ApiError::new(StatusCode::NOT_FOUND, Code::UnknownReducer, message),
            DeployError::UnknownVersion { .. } => ApiError::new(StatusCode::NOT_FOUND, Code::UnknownVersion, message),
            DeployError::Refused { code, .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message),
            DeployError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::ShuttingDown, message),
            DeployError::ReadOnly => ApiError::new(StatusCode::FORBIDDEN, Code::ReadOnly, message),
            DeployError::Unavailable(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, message),
            DeployError::Store(e) => AppError::Store(e).into(),
        }
    }
}

/// `GET /v1/reducers`: every reducer, its kinds and its active version.
pub(super) async fn list(State(app): State<Arc<App>>, caller: Caller) -> Result<Response, ApiError> {
    let reducers = blocking(&app, move |app| {
        let mut out = Vec::new();
        // Only the reducers of kinds the token may read or deploy to.
        for (name, kinds) in app.reducer_names().iter().filter(|(_, kinds)| sees(&caller, kinds)) {
            let versions = app.reducer_versions(name).map_err(deploy_error)?;
            let active = versions.into_iter().next().map(VersionBody::from);
            out.push(serde_json::json!({"name": name, "kinds": kinds.iter().map(|k| &**k).collect::<Vec<_>>(), "active": active}));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(serde_json::json!({ "reducers": reducers })).into_response())
}

/// `GET /v1/reducers/{name}`: its versions, the active one first, then by last change.
pub(super) async fn show(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (kinds, versions) = blocking(&app, move |app| {
        let versions = app.reducer_versions(&name).map_err(deploy_error)?;
        allow_reducer(&caller, &name, &app.reducer_names()[&name])?;
        let kinds: Vec<String> = app.reducer_names()[&name].iter().map(|k| k.to_string()).collect();
        Ok((kinds, versions))
    })
    .await?;
    let versions: Vec<VersionBody> = versions.into_iter().map(VersionBody::from).collect();
    Ok(Json(serde_json::json!({"kinds": kinds, "versions": versions})).into_response())
}

/// `GET /v1/reducers/{name}/versions/{version}/module`: the version's `.wasm`, so that a
/// client folds with the server's own code. Content-addressed (the version is the module's
/// blake3), so cacheable for good.
pub(super) async fn module(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let bytes = blocking(&app, move |app| {
        // An unknown reducer is answered 404 by the lookup.
        if let Some(kinds) = app.reducer_names().get(&name) {
            allow_reducer(&caller, &name, kinds)?;
        }
        app.reducer_module(&name, &version).map_err(deploy_error)
    })
    .await?;
    let cache =
        if app.auth_on() { "private, max-age=31536000, immutable" } else { "public, max-age=31536000, immutable" };
    let headers = [(axum::http::header::CONTENT_TYPE, "application/wasm"), (axum::http::header::CACHE_CONTROL, cache)];
    Ok((headers, bytes).into_response())
}

/// Whether the token may see reducer versions of these kinds: `read` or `deploy` on one.
fn sees(caller: &Caller, kinds: &[Arc<str>]) -> bool {
    kinds.iter().any(|k| caller.may_kind(Action::Read, k) || caller.may_kind(Action::Deploy, k))
}

/// [`sees`], or 403 naming what is missing for reducer `name`.
fn allow_reducer(caller: &Caller, name: &str, kinds: &[Arc<str>]) -> Result<(), AppError> {
    if sees(caller, kinds) {
        return Ok(());
    }
    Err(AppError::Forbidden(format!("the token grants no `read` or `deploy` on the kinds of {name}")))
}

#[derive(Deserialize)]
pub(super) struct DeployQuery {
    /// Deploy this stored version again (a rollback) instead of a module in the body.
    version: Option<String>,
}

/// `PUT /v1/reducers/{name}`: deploys the module in the body (or `?version=` a stored one).
/// Answers once it folds (200), or why it was refused (422, the active version goes on).
pub(super) async fn deploy(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<DeployQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    if let Some(kinds) = app.reducer_names().get(&name) {
        for kind in kinds {
            allow(&caller, Action::Deploy, kind, None)?;
        }
    }
    app.writable()?;
    let max = app.limits().reducer_module_bytes_max;
    let body = match body {
        Ok(body) if body.len() > max => None,
        Ok(body) => Some(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => None,
        Err(rejection) => return Err(ApiError::bad_request(Code::BadBody, rejection.body_text())),
    };
    let Some(body) = body else {
        let message = format!("the module is larger than reducer_module_bytes_max ({max} bytes)");
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, Code::TooLarge, message));
    };
    let module = match (query.version, body.is_empty()) {
        (Some(version), true) => Module::Stored(version),
        (Some(_), false) => {
            return Err(ApiError::bad_request(Code::BadQuery, "send either a module or ?version=, not both"));
        }
        (None, _) => Module::Bytes(body.to_vec()),
    };
    let deployed = app.deploy(&name, module, "http", caller.subject()).await?;
    Ok(Json(deployed_body(deployed)).into_response())
}

fn deployed_body(deployed: Deployed) -> serde_json::Value {
    serde_json::json!({
        "version": VersionBody::from(deployed.version),
        "unchanged": deployed.unchanged,
        "partitions": deployed.partitions,
        "took_ms": deployed.took.as_secs_f64() * 1e3,
    })
}

/// Deploy errors travel through `blocking` as application errors.
fn deploy_error(error: DeployError) -> AppError {
    AppError::Deploy(Box::new(error))
}

fn replay_body(job: ReplayJob) -> serde_json::Value {
    serde_json::json!({
        "kind": job.kind,
        "reducer": job.reducer.to_string(),
        "state": if job.finished_ms.is_some() { "finished" } else { "running" },
        "models_total": job.total,
        "models_done": job.done,
        "models_failed": job.failed,
        "first_error": job.first_error,
        "subject": job.subject,
        "started_ms": job.started_ms,
        "finished_ms": job.finished_ms,
    })
}

/// `POST /v1/kinds/{kind}/replay`: starts a replay (202), or 409 if one runs.
pub(super) async fn start_replay(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(kind): Path<String>,
) -> Result<Response, ApiError> {
    allow(&caller, Action::Replay, &kind, None)?;
    let job = app.start_replay(&kind, caller.subject()).await?;
    Ok((StatusCode::ACCEPTED, Json(replay_body(job))).into_response())
}

/// `GET /v1/kinds/{kind}/replay`: the latest replay's progress.
pub(super) async fn replay(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(kind): Path<String>,
) -> Result<Response, ApiError> {
    if !caller.may_kind(Action::Replay, &kind) {
        allow_kind(&caller, Action::Read, &kind)?;
    }
    let job = blocking(&app, move |app| app.replay(&kind)).await?;
    match job {
        Some(job) => Ok(Json(replay_body(job)).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, Code::NoReplay, "no replay of this kind has run")),
    }
}
