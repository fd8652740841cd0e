#![doc = include_str!("../README.md")]

pub mod api;
pub mod appservice;
pub mod auth;
pub mod config;
pub mod error;
pub mod json;
pub mod notifier;
pub mod push;
pub mod queue;
pub mod rooms;
pub mod ruma_wrapper;
pub mod server;
pub mod state;
pub mod storage;
pub mod threepid;

/// Installs the one TLS crypto provider (ring) everything here uses: SMTP, SMS, Postgres, and
/// later federation. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Trusts the certificates in the PEM file at `path` (an operator's own CA, or a test's) besides
/// the system's roots, for an outbound HTTPS client. `None` or an empty path: the system's only.
pub fn trust_extra_ca(
    builder: reqwest::ClientBuilder,
    path: Option<&str>,
) -> anyhow::Result<reqwest::ClientBuilder> {
    use anyhow::Context as _;
    let Some(path) = path.filter(|p| !p.is_empty()) else { return Ok(builder) };
    let pem = std::fs::read(path).with_context(|| format!("reading the CA file {path}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("the CA file {path} holds no PEM certificate"))?;
    anyhow::ensure!(!certs.is_empty(), "the CA file {path} holds no PEM certificate");
    Ok(builder.tls_certs_merge(certs))
}
