//! Where a server name leads (the server-server API's "Resolving server names"), cached.
//!
//! In the spec's order: an IP literal is the address (port 8448 unless given); a host name with
//! an explicit port is that host and port; otherwise `https://<name>/.well-known/matrix/server`
//! may delegate to another host (itself resolved the same way, without a second delegation);
//! otherwise the name on port 8448. SRV records (`_matrix-fed._tcp`, then `_matrix._tcp`) are
//! not looked up yet: a name served through SRV alone is tried on 8448.
//!
//! What is found is cached: a delegation for as long as the well-known answer allows (one day
//! without `Cache-Control`, at most two), the lack of one for an hour.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::ServerName;

/// The port federation is served on unless a name or delegation says otherwise.
const DEFAULT_PORT: u16 = 8448;
/// How long a delegation is trusted without `Cache-Control`, and at most.
const WELL_KNOWN_DEFAULT: Duration = Duration::from_secs(24 * 3600);
const WELL_KNOWN_MAX: Duration = Duration::from_secs(48 * 3600);
/// How long a name without a (valid) well-known answer goes without asking again.
const NO_WELL_KNOWN: Duration = Duration::from_secs(3600);
/// The largest well-known answer read.
const MAX_WELL_KNOWN_BYTES: usize = 64 * 1024;
/// Entries kept before the cache is cleared.
const CACHE_CAPACITY: usize = 10_000;

/// Where to send a server's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// `https://host:port`, the host being the name the certificate must be for.
    pub base_url: String,
}

impl Destination {
    fn at(host: &str, port: Option<u16>) -> Self {
        // IPv6 literals keep their brackets in a URL.
        Self { base_url: format!("https://{host}:{}", port.unwrap_or(DEFAULT_PORT)) }
    }
}

/// A host and optional port, split from a server name or a delegation.
fn split(name: &str) -> Option<(&str, Option<u16>)> {
    // `[::1]:8448`, `[::1]`, `host:8448`, `host`.
    let (host, port) = match name.rfind(':') {
        Some(i) if !name[i..].contains(']') => (&name[..i], Some(name[i + 1..].parse().ok()?)),
        _ => (name, None),
    };
    (!host.is_empty()).then_some((host, port))
}

fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Resolves server names, with a cache of well-known delegations.
#[derive(Debug, Default)]
pub struct Discovery {
    delegations: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

/// Why a name cannot be called.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{0} is not an address this server may call")]
    Private(String),
    #[error("{0} is not a server name")]
    Malformed(String),
}

impl Discovery {
    /// Where `server` is reached. `http` fetches the well-known document (its resolver keeps
    /// names to allowed addresses); `allow_private` lets IP literals be private.
    pub async fn resolve(
        &self,
        http: &reqwest::Client,
        server: &ServerName,
        allow_private: bool,
    ) -> Result<Destination, DiscoveryError> {
        let (host, port) =
            split(server.as_str()).ok_or_else(|| DiscoveryError::Malformed(server.to_string()))?;
        if let Some(destination) = direct(host, port, allow_private)? {
            return Ok(destination);
        }
        let delegated = self.delegation(http, host).await;
        match delegated.as_deref().and_then(split) {
            Some((host, port)) => {
                Ok(direct(host, port, allow_private)?.unwrap_or_else(|| Destination::at(host, None)))
            }
            None => Ok(Destination::at(host, None)),
        }
    }

    /// The well-known delegation of `host`, cached.
    async fn delegation(&self, http: &reqwest::Client, host: &str) -> Option<String> {
        let now = Instant::now();
        if let Some((delegation, until)) = self.lock().get(host)
            && *until > now
        {
            return delegation.clone();
        }
        let (delegation, lifetime) = match fetch_well_known(http, host).await {
            Some((server, lifetime)) => (Some(server), lifetime),
            None => (None, NO_WELL_KNOWN),
        };
        let mut cache = self.lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(host.to_owned(), (delegation.clone(), now + lifetime));
        delegation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Option<String>, Instant)>> {
        self.delegations.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An IP literal, or a host with an explicit port: reached as named. `None` for a host name
/// without a port, which may be delegated.
fn direct(host: &str, port: Option<u16>, allow_private: bool) -> Result<Option<Destination>, DiscoveryError> {
    if let Some(ip) = ip_literal(host) {
        if !allow_private && !crate::outbound::is_public(ip) {
            return Err(DiscoveryError::Private(ip.to_string()));
        }
        return Ok(Some(Destination::at(host, port)));
    }
    Ok(port.map(|port| Destination::at(host, Some(port))))
}

/// `m.server` of `https://<host>/.well-known/matrix/server`, and how long it may be cached.
async fn fetch_well_known(http: &reqwest::Client, host: &str) -> Option<(String, Duration)> {
    let url = format!("https://{host}/.well-known/matrix/server");
    let response = http.get(&url).send().await.ok()?.error_for_status().ok()?;
    let lifetime = response
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|value| value.to_str().ok())
        .and_then(max_age)
        .map_or(WELL_KNOWN_DEFAULT, |age| age.min(WELL_KNOWN_MAX));
    let body = super::read_limited(response, MAX_WELL_KNOWN_BYTES).await.ok()?;
    let document: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let server = document.get("m.server")?.as_str()?;
    // A delegation is a server name (host and optional port), nothing else.
    <&ServerName>::try_from(server).ok()?;
    Some((server.to_owned(), lifetime))
}

fn max_age(header: &str) -> Option<Duration> {
    header.split(',').find_map(|part| {
        let value = part.trim().strip_prefix("max-age=")?;
        value.trim_matches('"').parse().ok().map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_host_and_port() {
        assert_eq!(split("example.org"), Some(("example.org", None)));
        assert_eq!(split("example.org:8449"), Some(("example.org", Some(8449))));
        assert_eq!(split("127.0.0.1:1234"), Some(("127.0.0.1", Some(1234))));
        assert_eq!(split("[::1]"), Some(("[::1]", None)));
        assert_eq!(split("[::1]:80"), Some(("[::1]", Some(80))));
        assert_eq!(split("host:notaport"), None);
    }

    #[test]
    fn literals_and_explicit_ports_are_reached_directly_and_private_literals_only_when_allowed() {
        assert_eq!(direct("1.1.1.1", None, false).unwrap(), Some(Destination::at("1.1.1.1", None)));
        assert_eq!(direct("1.1.1.1", None, false).unwrap().unwrap().base_url, "https://1.1.1.1:8448");
        assert_eq!(
            direct("[2606:4700::1111]", Some(443), false).unwrap().unwrap().base_url,
            "https://[2606:4700::1111]:443"
        );
        assert_eq!(
            direct("example.org", Some(8449), false).unwrap().unwrap().base_url,
            "https://example.org:8449"
        );
        assert_eq!(direct("example.org", None, false).unwrap(), None);
        assert!(matches!(direct("127.0.0.1", Some(1), false), Err(DiscoveryError::Private(_))));
        assert!(matches!(direct("[::1]", None, false), Err(DiscoveryError::Private(_))));
        assert!(direct("127.0.0.1", Some(1), true).unwrap().is_some());
    }

    #[test]
    fn cache_control_sets_how_long_a_delegation_lasts() {
        assert_eq!(max_age("public, max-age=600"), Some(Duration::from_secs(600)));
        assert_eq!(max_age("no-cache"), None);
    }
}
