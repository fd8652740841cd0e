#![doc = include_str!("../README.md")]

pub mod api;
pub mod appservice;
pub mod auth;
pub mod config;
pub mod error;
pub mod json;
pub mod notifier;
pub mod outbound;
pub mod push;
pub mod queue;
pub mod remote;
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
