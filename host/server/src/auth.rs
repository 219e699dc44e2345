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
use std::str::FromStr;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

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
    /// The id pattern this grant gives `action` over in `kind`, if it gives any.
    fn ids_in(&self, action: Action, kind: &str) -> Option<&str> {
        if !self.actions.iter().any(|a| *a == action || *a == Action::Admin) {
            return None;
        }
        let (kinds, ids) = self.models.split_once('/').unwrap_or((&self.models, "*"));
        WildMatch::new(kinds).matches(kind).then_some(ids)
    }

    fn allows(&self, action: Action, kind: &str, id: Option<&str>) -> bool {
        let Some(ids) = self.ids_in(action, kind) else { return false };
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
            Caller::Token { grants, .. } => grants.iter().any(|g| g.ids_in(action, kind).is_some()),
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
    config: AuthConfig,
    /// The HS256 secret's key, if configured.
    secret: Option<DecodingKey>,
    /// The key file's keys (PEM or JWKS), read again when the file changes.
    file: Option<RwLock<KeyFile>>,
    /// The web origins (`[cors] allowed_origins`) a cookie-authenticated unsafe request may
    /// come from, besides the server's own.
    origins: Vec<String>,
}

/// Keys from `public_key_file`, and when that file was read.
struct KeyFile {
    modified: Option<SystemTime>,
    /// When the file was last looked at (it is looked at once a second at most).
    checked: Instant,
    keys: Vec<FileKey>,
}

struct FileKey {
    /// A JWK's `kid`: a token naming one is checked with that key alone.
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

impl Auth {
    /// The verifier of `config`; a cookie-authenticated POST, PUT or DELETE is taken only
    /// from the server's own origin or one of `origins` (see [`Auth::cross_site`]).
    pub fn new(config: &AuthConfig, origins: &[String]) -> Result<Auth, AuthError> {
        let secret = match &config.hs256_secret {
            Some(secret) => Some(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| AuthError::Config(format!("hs256_secret: {e}")))?,
            ),
            None => None,
        };
        let file = match &config.public_key_file {
            Some(path) => {
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                Some(RwLock::new(KeyFile { modified, checked: Instant::now(), keys: read_keys(path)? }))
            }
            None => None,
        };
        Ok(Auth { config: config.clone(), secret, file, origins: origins.to_vec() })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut v = Validation::new(algorithm);
        v.set_audience(&[&self.config.audience]);
        if let Some(issuer) = &self.config.issuer {
            v.set_issuer(&[issuer]);
        }
        v.set_required_spec_claims(&["exp", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.config.leeway_s;
        v
    }

    /// Reads the key file again if it changed (looked at once a second at most). A file
    /// that no longer parses keeps the keys read before, loudly.
    fn refresh(&self) {
        let (Some(file), Some(path)) = (&self.file, &self.config.public_key_file) else { return };
        if file.read().unwrap_or_else(|p| p.into_inner()).checked.elapsed() < Duration::from_secs(1) {
            return;
        }
        let mut file = file.write().unwrap_or_else(|p| p.into_inner());
        file.checked = Instant::now();
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified == file.modified {
            return;
        }
        match read_keys(path) {
            Ok(keys) => {
                tracing::info!(file = %path.display(), keys = keys.len(), "token keys read again");
                file.keys = keys;
                file.modified = modified;
            }
            Err(e) => tracing::error!(error = %e, "the changed key file cannot be read; the keys read before stay"),
        }
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
                .find(|(name, _)| *name == self.config.cookie)
                .map(|(_, value)| value.to_owned())
                .ok_or_else(|| AuthError::Missing(self.config.cookie.clone()))?,
        };
        let header = jsonwebtoken::decode_header(&token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        self.refresh();
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key =
                    self.secret.as_ref().ok_or_else(|| AuthError::Invalid("HS256 tokens are not taken".into()))?;
                jsonwebtoken::decode::<Claims>(&token, key, &self.validation(Algorithm::HS256))
                    .map_err(|e| AuthError::Invalid(e.to_string()))?
                    .claims
            }
            algorithm => {
                let file = self
                    .file
                    .as_ref()
                    .ok_or_else(|| AuthError::Invalid(format!("{algorithm:?} tokens are not taken")))?;
                let file = file.read().unwrap_or_else(|p| p.into_inner());
                let candidates = file.keys.iter().filter(|k| {
                    k.algorithm == algorithm && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
                });
                let mut last = format!(
                    "no {algorithm:?} key{}",
                    header.kid.as_deref().map(|k| format!(" with kid {k:?}")).unwrap_or_default()
                );
                let mut found = None;
                for key in candidates {
                    match jsonwebtoken::decode::<Claims>(&token, &key.key, &self.validation(algorithm)) {
                        Ok(data) => {
                            found = Some(data.claims);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                found.ok_or(AuthError::Invalid(last))?
            }
        };
        Ok(Caller::Token { subject: claims.sub, expires_s: claims.exp, grants: claims.grants })
    }
}

/// What a request says of where it comes from, for the CSRF check.
pub struct RequestOrigin<'a> {
    /// `Origin`, or failing that `Referer` (browsers send one of them with every unsafe
    /// request).
    pub origin: Option<&'a str>,
    pub referer: Option<&'a str>,
    /// The authority the client addressed: `Host` (HTTP/1.1) or the URI's (HTTP/2), or
    /// `X-Forwarded-Host` of a request another server of the cluster forwarded.
    pub host: Option<&'a str>,
}

impl Auth {
    /// Why a request is refused as cross-site (`None`: it is not). Only a request whose
    /// token came in the cookie (no `Authorization` header) with an unsafe method is
    /// checked: a browser attaches the cookie to a form post from any site, but never a
    /// header. Such a request must come from the server's own origin (its `Origin`'s
    /// authority is the one the client addressed) or from an allowed origin; one that names
    /// no origin at all is refused too.
    pub fn cross_site(&self, unsafe_method: bool, by_cookie: bool, from: &RequestOrigin<'_>) -> Option<String> {
        if !(unsafe_method && by_cookie) {
            return None;
        }
        let origin = match (from.origin, from.referer) {
            (Some(origin), _) if origin != "null" => origin.to_owned(),
            (_, Some(referer)) => referer.split('/').take(3).collect::<Vec<_>>().join("/"),
            (Some(_), None) => return Some("the request's Origin is null (an opaque origin)".into()),
            (None, None) => return Some("the request names no Origin (nor Referer)".into()),
        };
        if self.origins.contains(&origin) {
            return None;
        }
        let authority = origin.split_once("://").map(|(_, a)| a);
        if authority.is_some() && authority == from.host {
            return None;
        }
        Some(format!("origin {origin:?} is neither this server's nor one of [cors] allowed_origins"))
    }
}

/// The keys of a key file: a JSON Web Key Set (`{"keys": [...]}`), or one PEM public key.
fn read_keys(path: &Path) -> Result<Vec<FileKey>, AuthError> {
    let bytes = std::fs::read(path).map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&bytes)
            .map_err(|e| AuthError::Config(format!("{}: not a JWKS: {e}", path.display())))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?;
            let algorithm = match &jwk.common.key_algorithm {
                Some(alg) => Algorithm::from_str(&alg.to_string())
                    .map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?,
                None => match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                    _ => Algorithm::RS256,
                },
            };
            keys.push(FileKey { kid: jwk.common.key_id.clone(), key, algorithm });
        }
        return Ok(keys);
    }
    let (key, algorithm) = public_key(path, &bytes)?;
    Ok(vec![FileKey { kid: None, key, algorithm }])
}

/// A PEM public key and the algorithm its tokens are signed with.
fn public_key(path: &Path, pem: &[u8]) -> Result<(DecodingKey, Algorithm), AuthError> {
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((key, Algorithm::EdDSA));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok((key, Algorithm::ES256));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    Err(AuthError::Config(format!("{}: not an Ed25519, EC or RSA public key in PEM", path.display())))
}
