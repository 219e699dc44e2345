//! Who may do what: bearer JWTs verified with `jsonwebtoken` against the configured key
//! (`[auth]`), carrying grants of actions over kind/model-id patterns. The API turns a
//! request's token into a [`Caller`] and asks it before each action; without `[auth]`
//! every caller may do everything (the loopback quickstart).
//!
//! A token's claims: `sub`, `exp` (required), `nbf`, `aud`, `iss` (checked), and
//! `grants`: `[{"actions": ["read", "subscribe"], "models": "workflow/run-*"}]`. A pattern
//! is `KIND/ID`, each side with `*` (any run of characters) and `?` (one); `KIND` alone
//! means every model of it. `admin` grants every action.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use wildmatch::WildMatch;

use crate::config::AuthConfig;

/// What a grant lets a caller do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Read,
    Subscribe,
    Create,
    Append,
    Deploy,
    Replay,
    Admin,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Subscribe => "subscribe",
            Action::Create => "create",
            Action::Append => "append",
            Action::Deploy => "deploy",
            Action::Replay => "replay",
            Action::Admin => "admin",
        }
    }
}

/// One grant: actions over the models a pattern names.
#[derive(Debug, Clone, Deserialize)]
pub struct Grant {
    pub actions: Vec<Action>,
    /// `KIND/ID` with wildcards, or `KIND` (every model of it).
    pub models: String,
}

impl Grant {
    fn allows(&self, action: Action, kind: &str, id: Option<&str>) -> bool {
        if !self.actions.iter().any(|a| *a == action || *a == Action::Admin) {
            return false;
        }
        let (kinds, ids) = self.models.split_once('/').unwrap_or((&self.models, "*"));
        if !WildMatch::new(kinds).matches(kind) {
            return false;
        }
        match id {
            Some(id) => WildMatch::new(ids).matches(id),
            // A kind-wide action (deploy, replay, a kind's rejections) needs the whole kind.
            None => ids == "*",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: i64,
    #[serde(default)]
    grants: Vec<Grant>,
}

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Access control is off: everything is allowed.
    Anyone,
    /// A verified token.
    Token { subject: Option<String>, expires_s: i64, grants: Vec<Grant> },
}

impl Caller {
    /// Whether the caller may do `action` to model `id` of `kind` (`None`: the kind as a
    /// whole).
    pub fn may(&self, action: Action, kind: &str, id: Option<&str>) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Token { grants, .. } => grants.iter().any(|g| g.allows(action, kind, id)),
        }
    }

    /// Whether the caller may do `action` to some models of `kind` (what a kind's listing
    /// and its reducers' metadata need: the models shown are filtered one by one).
    pub fn may_kind(&self, action: Action, kind: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Token { grants, .. } => grants.iter().any(|g| {
                let kinds = g.models.split_once('/').map_or(g.models.as_str(), |(k, _)| k);
                g.actions.iter().any(|a| *a == action || *a == Action::Admin) && WildMatch::new(kinds).matches(kind)
            }),
        }
    }

    /// Whether the caller may do `action` anywhere (admin routes: `/metrics`).
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Token { grants, .. } => {
                grants.iter().any(|g| g.actions.contains(&Action::Admin) && g.models.trim() == "*")
            }
        }
    }

    pub fn subject(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Token { subject, .. } => subject.as_deref(),
        }
    }

    /// When the token expires (seconds since the epoch); `None` without access control.
    pub fn expires_s(&self) -> Option<i64> {
        match self {
            Caller::Anyone => None,
            Caller::Token { expires_s, .. } => Some(*expires_s),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token (Authorization header or the {0} cookie)")]
    Missing(String),
    #[error("the token is not accepted: {0}")]
    Invalid(String),
    #[error("[auth]: {0}")]
    Config(String),
}

/// The configured verifier.
pub struct Auth {
    keys: Vec<(DecodingKey, Validation)>,
    cookie: String,
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Result<Auth, AuthError> {
        let validation = |algorithm: Algorithm| {
            let mut v = Validation::new(algorithm);
            v.set_audience(&[&config.audience]);
            if let Some(issuer) = &config.issuer {
                v.set_issuer(&[issuer]);
            }
            v.set_required_spec_claims(&["exp", "aud"]);
            v.validate_nbf = true;
            v.leeway = config.leeway_s;
            v
        };
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            let key = DecodingKey::from_secret(secret.as_bytes())
                .map_err(|e| AuthError::Config(format!("hs256_secret: {e}")))?;
            keys.push((key, validation(Algorithm::HS256)));
        }
        if let Some(path) = &config.public_key_file {
            let (key, algorithm) = public_key(path)?;
            keys.push((key, validation(algorithm)));
        }
        Ok(Auth { keys, cookie: config.cookie.clone() })
    }

    /// The caller a request's `Authorization` header or cookie names.
    pub fn caller(&self, authorization: Option<&str>, cookies: Option<&str>) -> Result<Caller, AuthError> {
        let token = match authorization {
            Some(value) => value
                .strip_prefix("Bearer ")
                .ok_or_else(|| AuthError::Invalid("the Authorization header is not `Bearer TOKEN`".into()))?
                .trim()
                .to_owned(),
            None => cookies
                .into_iter()
                .flat_map(|c| c.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(name, _)| *name == self.cookie)
                .map(|(_, value)| value.to_owned())
                .ok_or_else(|| AuthError::Missing(self.cookie.clone()))?,
        };
        let mut last = None;
        for (key, validation) in &self.keys {
            match jsonwebtoken::decode::<Claims>(&token, key, validation) {
                Ok(data) => {
                    let claims = data.claims;
                    return Ok(Caller::Token { subject: claims.sub, expires_s: claims.exp, grants: claims.grants });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(AuthError::Invalid(last.map_or_else(|| "no key configured".into(), |e| e.to_string())))
    }
}

/// A PEM public key and the algorithm its tokens are signed with.
fn public_key(path: &Path) -> Result<(DecodingKey, Algorithm), AuthError> {
    let pem = std::fs::read(path).map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?;
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    Err(AuthError::Config(format!("{}: not an Ed25519, EC or RSA public key in PEM", path.display())))
}
