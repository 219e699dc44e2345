//! The caller of a request (see [`crate::auth`]): read from its `Authorization` header or
//! cookie before the handler runs (401 `unauthenticated` otherwise), and asked by the
//! handler before each action (403 `forbidden`, naming the missing grant).

use crate::code::Code;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderName, Method, StatusCode, header};

use super::ApiError;
use crate::app::App;
use crate::auth::{Action, AuthError, Caller, RequestOrigin};

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let caller = app.caller(header(header::AUTHORIZATION), header(header::COOKIE)).map_err(|error| {
            let challenge = match &error {
                AuthError::Missing(_) => r#"Bearer realm="statefold""#.to_owned(),
                other => format!(
                    r#"Bearer realm="statefold", error="invalid_token", error_description="{}""#,
                    escape(&other.to_string())
                ),
            };
            let mut error = ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthenticated, error.to_string());
            error.challenge = Some(challenge);
            error
        })?;
        let unsafe_method = !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let by_cookie = !parts.headers.contains_key(header::AUTHORIZATION);
        // A request another server of the cluster forwarded names the client's authority in
        // X-Forwarded-Host.
        let forwarded = parts.headers.contains_key(super::route::FORWARDED_BY);
        let host = forwarded
            .then(|| header(HeaderName::from_static("x-forwarded-host")))
            .flatten()
            .or_else(|| header(header::HOST))
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        let from = RequestOrigin { origin: header(header::ORIGIN), referer: header(header::REFERER), host };
        if let Some(reason) = app.cross_site(unsafe_method, by_cookie, &from) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                Code::CrossSite,
                format!("a {} authenticated by the cookie is refused: {reason}", parts.method),
            ));
        }
        Ok(caller)
    }
}

/// A header's quoted string: no quotes or backslashes, no control characters.
fn escape(text: &str) -> String {
    text.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect()
}

/// 403 unless the caller may do `action` to model `id` of `kind` (`None`: the whole kind).
pub(super) fn allow(caller: &Caller, action: Action, kind: &str, id: Option<&str>) -> Result<(), ApiError> {
    if caller.may(action, kind, id) {
        return Ok(());
    }
    let what = match id {
        Some(id) => format!("{kind}/{id}"),
        None => format!("{kind} (every model)"),
    };
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        Code::Forbidden,
        format!("the token grants no `{}` on {what}", action.as_str()),
    ))
}

/// 403 unless the caller may do `action` to some models of `kind`.
pub(super) fn allow_kind(caller: &Caller, action: Action, kind: &str) -> Result<(), ApiError> {
    if caller.may_kind(action, kind) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        Code::Forbidden,
        format!("the token grants no `{}` on any model of {kind}", action.as_str()),
    ))
}

/// 403 unless the caller is an administrator (every action on every model).
pub(super) fn allow_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_admin() {
        return Ok(());
    }
    Err(ApiError::new(StatusCode::FORBIDDEN, Code::Forbidden, "the token grants no `admin` on *"))
}
