//! Calls this server makes to addresses others choose (push gateways, other homeservers):
//! which addresses it may call, and which certificates it trusts.
//!
//! A pusher URL or a server name is chosen by someone else, so the server must not become a way
//! to reach what only it can reach. Unless private addresses are allowed (tests on loopback), a
//! name is only called on a public address: IP literals are checked before the request, names as
//! they resolve (in the client's resolver, so a name cannot resolve to a public address when
//! checked and to a private one when connected).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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

/// Whether an address is on the public internet: not loopback, private, link-local, shared
/// (CGNAT), documentation, benchmarking, multicast, reserved or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = ip.segments();
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) carry an IPv4 address to reach.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            if segments[0] == 0x2002 {
                let [a, b] = segments[1].to_be_bytes();
                let [c, d] = segments[2].to_be_bytes();
                return is_public_v4(Ipv4Addr::new(a, b, c, d));
            }
            !(ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
                || ip == Ipv6Addr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a >= 240 // reserved
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2) // documentation
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || (a == 198 && (18..20).contains(&b))) // benchmarking
}

/// A name resolved only to addresses the server may not call.
#[derive(Debug)]
pub struct RefusedAddress(pub String);

impl std::fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves only to addresses that are not public", self.0)
    }
}

impl std::error::Error for RefusedAddress {}

/// The system resolver, keeping only public addresses (unless private ones are allowed).
pub struct PublicOnly {
    allow_private: bool,
}

impl PublicOnly {
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> =
                found.into_iter().filter(|addr| allow_private || is_public(addr.ip())).collect();
            if kept.is_empty() {
                return Err(Box::new(RefusedAddress(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
