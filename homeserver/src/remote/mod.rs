//! Talking to other Matrix servers: where a name leads ([`discovery`]), requests signed with
//! X-Matrix, and their signing keys ([`keys`]).
//!
//! Every call has a deadline (`federation.request_timeout_secs`) and a cap on what it reads;
//! names are only called on public addresses unless `federation.allow_private_addresses` is set
//! (see [`crate::outbound`]). Redirects are not followed and no proxy is used.

pub mod discovery;
pub mod edu;
pub mod keys;
pub mod outbox;
pub mod received;

use std::{sync::Arc, time::Duration};

use ruma::{
    ServerName,
    api::{
        OutgoingRequest, OutgoingRequestExt,
        auth_scheme::{AuthScheme, NoAuthentication},
        federation::authentication::{ServerSignatures, XMatrixSigningInput},
        path_builder::SinglePath,
    },
    signatures::Ed25519KeyPair,
};

use crate::{config::FederationConfig, error::ErrorKind};

/// The largest answer read from another server, but for a room's state.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// The largest room state read (`send_join`, `state`): a room of tens of thousands of members.
pub const MAX_STATE_BYTES: usize = 64 * 1024 * 1024;

/// What went wrong with a call to another server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("federation is not enabled on this server")]
    Disabled,
    #[error("{0}")]
    Discovery(#[from] discovery::DiscoveryError),
    #[error("could not reach {server}: {why}")]
    Unreachable { server: String, why: String },
    #[error("{server} answered {status}: {}: {error}", kind.errcode())]
    Answered { server: String, status: u16, kind: Box<ErrorKind>, error: String },
    #[error("the request to {server} could not be made: {why}")]
    Malformed { server: String, why: String },
    /// A success whose body is not what the spec describes.
    #[error("{server} answered with something that is not what the spec describes: {why}")]
    Unreadable { server: String, why: String },
}

/// How an endpoint's requests are authenticated, for [`Remote::send`].
pub trait RequestAuth: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a>;
}

impl RequestAuth for ServerSignatures {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a> {
        XMatrixSigningInput::new(origin.to_owned(), destination.to_owned(), key)
    }
}

impl RequestAuth for NoAuthentication {
    fn input<'a>(_: &ServerName, _: &ServerName, _: &'a Ed25519KeyPair) -> Self::Input<'a> {}
}

/// The client this server calls others with.
pub struct Remote {
    http: reqwest::Client,
    allow_private: bool,
    discovery: discovery::Discovery,
    pub keys: keys::RemoteKeys,
    pub received: received::Received,
}

impl Remote {
    pub fn new(config: &FederationConfig) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(config.request_timeout_secs);
        let (discovery, resolver) =
            discovery::Discovery::new(&config.nameservers, config.allow_private_addresses)?;
        let builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(resolver));
        let http = crate::outbound::trust_extra_ca(builder, Some(&config.extra_ca_file))
            .map_err(|e| e.context("federation.extra_ca_file"))?
            .build()?;
        Ok(Self {
            http,
            allow_private: config.allow_private_addresses,
            discovery,
            keys: keys::RemoteKeys::default(),
            received: received::Received::default(),
        })
    }

    /// Sends `request` to `destination` as this server (`origin`, signing with `key` when the
    /// endpoint asks for X-Matrix) and parses the answer.
    pub async fn send<R>(
        &self,
        origin: &ServerName,
        key: &Ed25519KeyPair,
        destination: &ServerName,
        request: R,
    ) -> Result<R::IncomingResponse, RemoteError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: RequestAuth,
    {
        self.send_limited(origin, key, destination, request, MAX_ANSWER_BYTES).await
    }

    /// [`Remote::send`], reading an answer of up to `limit` bytes.
    pub async fn send_limited<R>(
        &self,
        origin: &ServerName,
        key: &Ed25519KeyPair,
        destination: &ServerName,
        request: R,
        limit: usize,
    ) -> Result<R::IncomingResponse, RemoteError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        R::Authentication: RequestAuth,
    {
        let server = destination.to_string();
        let target = self.discovery.resolve(&self.http, destination, self.allow_private).await?;
        let input = <R::Authentication as RequestAuth>::input(origin, destination, key);
        let request = request.try_into_http_request::<Vec<u8>>(&target.base_url, input, ()).map_err(|e| {
            RemoteError::Malformed { server: server.clone(), why: format!("building the request: {e}") }
        })?;
        let mut request = reqwest::Request::try_from(request)
            .map_err(|e| RemoteError::Malformed { server: server.clone(), why: e.to_string() })?;
        if let Some(host) = target.host_header.as_deref().and_then(|host| host.parse().ok()) {
            request.headers_mut().insert(reqwest::header::HOST, host);
        }
        let unreachable = |why: String| RemoteError::Unreachable { server: server.clone(), why };
        let response =
            self.http.execute(request).await.map_err(|e| unreachable(e.without_url().to_string()))?;
        let status = response.status();
        let body = read_limited(response, limit).await.map_err(unreachable)?;
        if status.as_u16() >= 400 {
            let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let message = error.get("error").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
            // The errcode with the fields that go with it (`room_version` of an incompatible
            // room version, say), so that a refusal can reach the client as the other server put it.
            let kind = serde_json::from_value::<ErrorKind>(error).unwrap_or(ErrorKind::Unknown);
            return Err(RemoteError::Answered {
                server,
                status: status.as_u16(),
                kind: Box::new(kind),
                error: message,
            });
        }
        let response = http::Response::builder()
            .status(status.as_u16())
            .body(body.as_slice())
            .map_err(|e| RemoteError::Unreadable { server: server.clone(), why: e.to_string() })?;
        <R::IncomingResponse as ruma::api::IncomingResponseExt>::try_from_http_response(response)
            .map_err(|e| RemoteError::Unreadable { server, why: e.to_string() })
    }
}

/// Reads a response body, refusing more than `limit` bytes.
pub(crate) async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.without_url().to_string())? {
        if body.len() + chunk.len() > limit {
            return Err(format!("the answer is larger than {limit} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("allow_private", &self.allow_private).finish_non_exhaustive()
    }
}

/// What a client is told when a call to another server on its behalf fails: the other server's
/// "not found" as ours, its refusal of the request (400 or 403: a ban, an invite-only room, a
/// room version this server cannot join) as it gave it, anything else as 502 (the spec's answer
/// for an unreachable server).
impl From<RemoteError> for crate::error::Error {
    fn from(error: RemoteError) -> Self {
        use crate::error::Error;
        use actix_web::http::StatusCode;
        match error {
            RemoteError::Disabled => Error::not_found("this server does not federate with other servers"),
            RemoteError::Answered { status: 404, error, server, .. } => {
                Error::not_found(format!("{server} knows no such thing: {error}"))
            }
            RemoteError::Answered { status: status @ (400 | 403), kind, error, server } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                Error::new(status, *kind, format!("{server} refused: {error}"))
            }
            other => {
                tracing::info!(error = %other, "a call to another server failed");
                Error::new(StatusCode::BAD_GATEWAY, ErrorKind::Unknown, other.to_string())
            }
        }
    }
}
