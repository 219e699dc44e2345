//! The HTTP side's settings: `[tls]`, `[auth]` and `[cors]`.

use std::path::PathBuf;

use serde::Deserialize;

/// `[tls]`: serve HTTPS, HTTP/2 or HTTP/1.1 as the client's ALPN asks (a browser follows
/// many models' streams over one HTTP/2 connection; over HTTP/1.1 it opens at most six
/// connections to an origin).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM, the server's own certificate first.
    pub cert_file: PathBuf,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the two files are looked at; when either changed, both are read again and
    /// new connections get the new certificate (a pair that does not load is logged and the
    /// previous one kept), in milliseconds.
    #[serde(default = "default_tls_reload_interval_ms")]
    pub reload_interval_ms: u64,
    /// Longest TLS handshake; a client slower than that is disconnected, in milliseconds.
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
}

pub fn default_tls_reload_interval_ms() -> u64 {
    1_000
}

pub fn default_tls_handshake_timeout_ms() -> u64 {
    10_000
}

/// `[auth]`: who may do what. Every route but `/healthz`, `/readyz` and
/// `/v1/openapi.json` takes a bearer JWT (the `Authorization` header, or the cookie
/// `cookie`) whose `grants` claim lists actions over kind/model-id patterns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The issuer's keys: one PEM public key (Ed25519, P-256 or RSA: tokens signed EdDSA,
    /// ES256 or RS256), or a JSON Web Key Set (a token's `kid` picks its key). Read again
    /// when the file changes (looked at once a second at most), so keys rotate without a
    /// restart.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// A shared secret for HS256 tokens: for development.
    #[serde(default)]
    pub hs256_secret: Option<String>,
    /// The `aud` a token must carry.
    pub audience: String,
    /// The `iss` a token must carry, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The cookie a browser's token may come in (so that a plain `EventSource` works).
    #[serde(default = "default_auth_cookie")]
    pub cookie: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[serde(default = "default_auth_leeway_s")]
    pub leeway_s: u64,
}

/// `[cors]`: which web origins may call the API from a browser (tower-http's CORS layer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed, e.g. `https://app.example.com` (exactly as a browser sends them).
    pub allowed_origins: Vec<String>,
    /// Whether a page may send its cookies (the `[auth]` cookie) with its requests.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer, in seconds.
    #[serde(default = "default_cors_max_age_s")]
    pub max_age_s: u64,
}

pub fn default_cors_max_age_s() -> u64 {
    600
}

pub fn default_auth_cookie() -> String {
    "statefold_token".into()
}

pub fn default_auth_leeway_s() -> u64 {
    30
}
