//! HTTPS: the `[tls]` certificate and key (rustls with the *ring* provider), ALPN `h2` then
//! `http/1.1`, and the reload of both files when they change (new connections get the new
//! pair; a pair that does not load is logged and the previous one kept).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// Reads the pair `config` names into a server config.
pub fn load(config: &TlsConfig) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("[tls] cert_file {}: not a PEM certificate chain", config.cert_file.display()))?;
    anyhow::ensure!(!certs.is_empty(), "[tls] cert_file {}: no certificate in it", config.cert_file.display());
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .with_context(|| format!("[tls] key_file {}: not a PEM private key", config.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("rustls: protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "[tls] {} and {}: the key does not fit the certificate, or is of a kind rustls cannot use",
                config.cert_file.display(),
                config.key_file.display()
            )
        })?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// What a look at the two files sees: each one's modification time and size.
type Seen = [Option<(SystemTime, u64)>; 2];

fn look(config: &TlsConfig) -> Seen {
    let of = |path: &Path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    [of(&config.cert_file), of(&config.key_file)]
}

/// Serves `first` (what [`load`] read at start), and reloads the pair whenever either file
/// changes, until `stop`.
pub fn reloading(config: &TlsConfig, first: ServerConfig, stop: CancellationToken) -> RustlsConfig {
    let mut seen = look(config);
    let rustls = RustlsConfig::from_config(Arc::new(first));
    let reloaded = rustls.clone();
    let config = config.clone();
    let interval = Duration::from_millis(config.reload_interval_ms);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let now = look(&config);
            if now == seen {
                continue;
            }
            seen = now;
            match load(&config) {
                Ok(server) => {
                    reloaded.reload_from_config(Arc::new(server));
                    tracing::info!(cert = %config.cert_file.display(), "TLS certificate reloaded");
                }
                Err(error) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "TLS certificate not reloaded; keeping the previous one"
                    )
                }
            }
        }
    });
    rustls
}
