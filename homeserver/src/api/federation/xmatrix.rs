//! X-Matrix: how a server signs its requests to another (the server-server API's
//! "Request Authentication"), checked on every request of an endpoint that asks for it.
//!
//! The `Authorization: X-Matrix origin=…,destination=…,key=…,sig=…` header signs the method,
//! the URI as sent, origin, destination and the body as canonical JSON. A request is refused
//! with 401 `M_UNAUTHORIZED` when the header is missing or malformed, names another
//! destination, or is signed with a key the origin does not use (as it publishes them), or the
//! signature does not match; the origin's keys are fetched when not known
//! ([`crate::remote::keys`]). A request from a known key whose body is not canonical JSON is
//! 400 `M_BAD_JSON`.

use std::net::IpAddr;

use actix_web::http::StatusCode;
use ruma::{
    CanonicalJsonValue, OwnedServerName,
    api::federation::authentication::{ServerSignatures, XMatrix},
    serde::Base64,
    signatures::PublicKeyMap,
};

use crate::{
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Incoming, LocalFuture, ServerAuth},
    state::AppState,
};

fn unauthorized(message: impl Into<String>) -> Error {
    Error::new(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, message)
}

impl ServerAuth for ServerSignatures {
    /// The server that signed the request.
    type Sender = OwnedServerName;

    fn authenticate<'a>(
        state: &'a AppState,
        _: Option<String>,
        _: IpAddr,
        _: &'a str,
        incoming: Incoming<'a>,
    ) -> LocalFuture<'a, Result<OwnedServerName>> {
        Box::pin(async move { verify(state, incoming).await })
    }
}

pub(super) async fn verify(state: &AppState, incoming: Incoming<'_>) -> Result<OwnedServerName> {
    let header = incoming
        .request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("this endpoint needs an X-Matrix Authorization header"))?;
    let header = header.to_str().map_err(|_| unauthorized("the Authorization header is not text"))?;
    let xmatrix =
        XMatrix::parse(header).map_err(|e| unauthorized(format!("malformed X-Matrix header: {e}")))?;
    if let Some(destination) = &xmatrix.destination
        && *destination != state.server_name
    {
        return Err(unauthorized(format!("this request is for {destination}, not {}", state.server_name)));
    }
    let origin = xmatrix.origin.clone();
    let key = state
        .remote()?
        .keys
        .current_key(state, &origin, xmatrix.key.as_str())
        .await
        .map_err(|e| unauthorized(format!("the keys of {origin} could not be fetched: {e}")))?
        .ok_or_else(|| unauthorized(format!("{origin} does not use a key {}", xmatrix.key)))?;
    let key = Base64::parse(&key).map_err(|_| Error::internal("a stored server key is not base64"))?;
    let keys: PublicKeyMap = [(origin.to_string(), [(xmatrix.key.to_string(), key)].into())].into();
    let request = crate::ruma_wrapper::to_http_request(incoming.request, incoming.body)?;
    if let Err(error) = xmatrix.verify_http_request(&request, &state.server_name, &keys) {
        // A body that cannot be signed (floats, integers past 2^53) cannot be verified either:
        // it is malformed, as room versions from 6 on say, not forged. Looked at only then, so
        // that a good request's body is parsed once.
        if !incoming.body.is_empty() && serde_json::from_slice::<CanonicalJsonValue>(incoming.body).is_err() {
            return Err(Error::bad_json(
                "the body is not canonical JSON (no floats, integers within ±(2^53 - 1))",
            ));
        }
        return Err(unauthorized(format!("the X-Matrix signature does not check out: {error}")));
    }
    // Per server, once it is known who asks: a busy server cannot crowd out the others.
    state.limiter.check(crate::auth::ratelimit::Action::FederationRequest, origin.as_str()).await?;
    Ok(origin)
}
