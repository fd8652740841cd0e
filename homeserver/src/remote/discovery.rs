//! Where a server name leads (the server-server API's "Resolving server names"), cached.
//!
//! In the spec's order: an IP literal is the address (port 8448 unless given); a host name with
//! an explicit port is that host and port; otherwise `https://<name>/.well-known/matrix/server`
//! may delegate to another host (itself resolved the same way, without a second delegation);
//! otherwise, for the name (or the delegated host, without a port), the SRV records
//! `_matrix-fed._tcp.<host>` then `_matrix._tcp.<host>`: the target of the lowest priority, on
//! the record's port; otherwise the host on port 8448.
//!
//! Through SRV, the request still goes to `https://<host>:<port>`, so that the certificate is
//! checked for the host and the Host header names it (the spec's rules), but the connection is
//! made to the target's addresses: the client's resolver ([`Resolver`]) looks the target up in
//! place of the host. Until the host is resolved again, every connection to it goes there.
//!
//! What is found is cached: a delegation for as long as the well-known answer allows (one day
//! without `Cache-Control`, at most two), the lack of one for an hour; DNS answers (SRV and
//! addresses) for as long as their TTL, by the DNS resolver, which uses the system's servers or
//! `federation.nameservers`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, NameServerConfigGroup, ResolverConfig},
    name_server::TokioConnectionProvider,
    proto::xfer::Protocol,
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
    /// The Host header, when it is not the URL's host and port: the host alone, for a server
    /// found through SRV.
    pub host_header: Option<String>,
}

impl Destination {
    fn at(host: &str, port: Option<u16>) -> Self {
        // IPv6 literals keep their brackets in a URL.
        Self { base_url: format!("https://{host}:{}", port.unwrap_or(DEFAULT_PORT)), host_header: None }
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

/// Host names whose connections go to another host (an SRV target): host → target.
type Targets = Arc<Mutex<HashMap<String, String>>>;

/// Resolves server names, with a cache of well-known delegations.
pub struct Discovery {
    delegations: Mutex<HashMap<String, (Option<String>, Instant)>>,
    dns: Arc<TokioResolver>,
    targets: Targets,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
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
    /// Resolves with the DNS servers `nameservers` (`ip:port`), or the system's when there are
    /// none. Returns the resolver the HTTP client is to connect with (see the module's comment).
    pub fn new(nameservers: &[String], allow_private: bool) -> anyhow::Result<(Self, Resolver)> {
        let provider = TokioConnectionProvider::default();
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .unwrap_or_else(|_| TokioResolver::builder_with_config(ResolverConfig::default(), provider))
        } else {
            let mut servers = Vec::new();
            for server in nameservers {
                let address: SocketAddr = server.parse().map_err(|_| {
                    anyhow::anyhow!("federation.nameservers: `{server}` is not an ip:port address")
                })?;
                servers.push(NameServerConfig::new(address, Protocol::Udp));
                servers.push(NameServerConfig::new(address, Protocol::Tcp));
            }
            let group = NameServerConfigGroup::from(servers);
            TokioResolver::builder_with_config(ResolverConfig::from_parts(None, Vec::new(), group), provider)
        };
        let dns = Arc::new(builder.build());
        let targets = Targets::default();
        let resolver = Resolver { dns: dns.clone(), targets: targets.clone(), allow_private };
        Ok((Self { delegations: Mutex::default(), dns, targets }, resolver))
    }

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
            Some((host, port)) => match direct(host, port, allow_private)? {
                Some(destination) => Ok(destination),
                None => Ok(self.service(host).await),
            },
            None => Ok(self.service(host).await),
        }
    }

    /// A host name without a port: where its SRV records point, or the host on port 8448.
    async fn service(&self, host: &str) -> Destination {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let Ok(found) = self.dns.srv_lookup(format!("{service}.{host}.")).await else { continue };
            // The lowest priority, the heaviest among equals (a client may pick at random by
            // weight; one choice that does not change between requests keeps one connection).
            let Some(record) =
                found.iter().min_by_key(|record| (record.priority(), u16::MAX - record.weight()))
            else {
                continue;
            };
            let target = record.target().to_utf8();
            let target = target.trim_end_matches('.');
            if target.is_empty() {
                // "." as the target: the service is decidedly not offered there.
                break;
            }
            let mut targets = self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if targets.len() >= CACHE_CAPACITY {
                targets.clear();
            }
            targets.insert(host.to_owned(), target.to_owned());
            return Destination {
                base_url: format!("https://{host}:{}", record.port()),
                host_header: Some(host.to_owned()),
            };
        }
        self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(host);
        Destination::at(host, None)
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

/// The HTTP client's name resolution for calls to other servers: a host found through SRV is
/// looked up as its target; only public addresses unless private ones are allowed (checked as
/// names resolve, so a name cannot pass as public and then connect to a private address).
pub struct Resolver {
    dns: Arc<TokioResolver>,
    targets: Targets,
    allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (dns, allow_private) = (self.dns.clone(), self.allow_private);
        let host = name.as_str().to_owned();
        let target =
            self.targets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&host).cloned();
        Box::pin(async move {
            let lookup = target.unwrap_or(host);
            let found = dns.lookup_ip(format!("{lookup}.")).await?;
            let kept: Vec<SocketAddr> = found
                .iter()
                .filter(|ip| allow_private || crate::outbound::is_public(*ip))
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if kept.is_empty() {
                return Err(Box::new(crate::outbound::RefusedAddress(lookup))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
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
