//! The bridge between actix-web and ruma's endpoint types.
//!
//! - [`Router`] registers a handler for a ruma request type under every path in the type's
//!   metadata, so no path is typed by hand; a known path with the wrong method answers 405
//!   `M_UNRECOGNIZED`.
//! - [`Ruma<T>`] is the extractor: it bounds and reads the body, tells malformed JSON
//!   (`M_NOT_JSON`) from JSON of the wrong shape (`M_BAD_JSON`, `M_MISSING_PARAM`), authenticates
//!   as the endpoint's ruma auth scheme demands and parses the request. For endpoints that need an
//!   access token, `sender` *is* the user: no handler ever unwraps an optional user.
//! - [`RumaResponse<T>`] serialises a ruma response.

use std::{collections::BTreeMap, future::Future, net::IpAddr, pin::Pin};

use actix_web::{
    FromRequest, HttpRequest, HttpResponse, Responder, body::BoxBody, dev::Payload, http::StatusCode, web,
};
use ruma::api::{
    IncomingRequest, IncomingRequestExt, OutgoingResponse, OutgoingResponseExt,
    auth_scheme::{
        AccessToken, AccessTokenOptional, AppserviceToken, AppserviceTokenOptional, NoAccessToken,
        NoAuthentication,
    },
    error::{DeserializationError, FromHttpRequestError},
    path_builder::PathBuilder,
};

use crate::{
    appservice::AppserviceAuth,
    auth::{AuthedUser, authenticate_request},
    error::{Error, Result},
    state::AppState,
};

pub(crate) type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// The request as sent, for schemes that authenticate all of it (X-Matrix signs the method,
/// URI and body).
#[derive(Clone, Copy)]
pub struct Incoming<'a> {
    pub request: &'a HttpRequest,
    pub body: &'a [u8],
}

/// Maps a ruma authentication scheme to what the handler receives as `sender`. `query` is the
/// raw query string, where application services name the user they act as.
pub trait ServerAuth {
    type Sender: 'static;
    fn authenticate<'a>(
        state: &'a AppState,
        token: Option<String>,
        ip: IpAddr,
        query: &'a str,
        incoming: Incoming<'a>,
    ) -> LocalFuture<'a, Result<Self::Sender>>;

    /// Whether the sender is a guest account, for the guest gate ([`crate::auth::guest`]).
    fn is_guest(_sender: &Self::Sender) -> bool {
        false
    }
}

impl ServerAuth for AccessToken {
    type Sender = AuthedUser;
    fn authenticate<'a>(
        state: &'a AppState,
        token: Option<String>,
        ip: IpAddr,
        query: &'a str,
        _: Incoming<'a>,
    ) -> LocalFuture<'a, Result<AuthedUser>> {
        Box::pin(async move {
            let token = token.ok_or_else(Error::missing_token)?;
            let user = authenticate_request(state, &token, query).await?;
            if user.has_device() && state.last_seen_due(&user.user_id, &user.device_id) {
                state.store.touch_device(&user.user_id, &user.device_id, &ip.to_string()).await?;
            }
            Ok(user)
        })
    }

    fn is_guest(sender: &AuthedUser) -> bool {
        sender.is_guest
    }
}

impl ServerAuth for AccessTokenOptional {
    type Sender = Option<AuthedUser>;
    fn authenticate<'a>(
        state: &'a AppState,
        token: Option<String>,
        _ip: IpAddr,
        query: &'a str,
        _: Incoming<'a>,
    ) -> LocalFuture<'a, Result<Self::Sender>> {
        Box::pin(async move {
            match token {
                Some(token) => authenticate_request(state, &token, query).await.map(Some),
                None => Ok(None),
            }
        })
    }

    fn is_guest(sender: &Option<AuthedUser>) -> bool {
        sender.as_ref().is_some_and(|user| user.is_guest)
    }
}

/// Which application service the token names, if any; the handler decides what a missing or
/// unknown one means (`register` and `login` serve clients without a token too).
fn appservice_auth(state: &AppState, token: Option<String>) -> AppserviceAuth {
    match token {
        None => AppserviceAuth::Absent,
        Some(token) => {
            state.appservices.by_token(&token).map_or(AppserviceAuth::Unknown, AppserviceAuth::Known)
        }
    }
}

impl ServerAuth for AppserviceTokenOptional {
    type Sender = AppserviceAuth;
    fn authenticate<'a>(
        state: &'a AppState,
        token: Option<String>,
        _: IpAddr,
        _: &'a str,
        _: Incoming<'a>,
    ) -> LocalFuture<'a, Result<AppserviceAuth>> {
        Box::pin(async move { Ok(appservice_auth(state, token)) })
    }
}

impl ServerAuth for AppserviceToken {
    type Sender = AppserviceAuth;
    fn authenticate<'a>(
        state: &'a AppState,
        token: Option<String>,
        _: IpAddr,
        _: &'a str,
        _: Incoming<'a>,
    ) -> LocalFuture<'a, Result<AppserviceAuth>> {
        Box::pin(async move {
            let token = token.ok_or_else(Error::missing_token)?;
            Ok(appservice_auth(state, Some(token)))
        })
    }
}

macro_rules! unauthenticated {
    ($($scheme:ty),*) => {$(
        impl ServerAuth for $scheme {
            type Sender = ();
            fn authenticate<'a>(
                _: &'a AppState, _: Option<String>, _: IpAddr, _: &'a str, _: Incoming<'a>,
            ) -> LocalFuture<'a, Result<()>> {
                Box::pin(async { Ok(()) })
            }
        }
    )*};
}
unauthenticated!(NoAuthentication, NoAccessToken);

/// A parsed, authenticated request.
pub struct Ruma<T: IncomingRequest>
where
    T::Authentication: ServerAuth,
{
    pub body: T,
    pub sender: <T::Authentication as ServerAuth>::Sender,
    pub client_ip: IpAddr,
    /// The body as sent (checked like every body: size, depth, no NUL), for the few fields
    /// ruma's types drop: the extra keys of a join, a report's `score`.
    pub raw_body: web::Bytes,
}

/// The path template a resource was registered under, so the extractor can find path arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PathTemplate(pub(crate) &'static str);

/// The access token from `Authorization: Bearer …` or the deprecated `access_token` query param.
fn access_token(req: &HttpRequest) -> Result<Option<String>> {
    if let Some(header) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        let value = header.to_str().unwrap_or_default();
        if value.starts_with("X-Matrix ") {
            // A server's signature, which the federation endpoints check (`ServerSignatures`).
            return Ok(None);
        }
        return match value.strip_prefix("Bearer ") {
            Some(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
            _ => Err(Error::new(
                StatusCode::UNAUTHORIZED,
                crate::error::ErrorKind::MissingToken,
                "the Authorization header must be `Bearer <access token>`",
            )),
        };
    }
    Ok(web::Query::<BTreeMap<String, String>>::from_query(req.query_string())
        .ok()
        .and_then(|q| q.get("access_token").cloned()))
}

/// The client's address: the peer, or behind a trusted proxy the last `X-Forwarded-For` entry.
pub fn client_ip(req: &HttpRequest, trust_forwarded: bool) -> IpAddr {
    let forwarded = trust_forwarded
        .then(|| req.headers().get("X-Forwarded-For"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|ip| ip.trim().parse().ok());
    forwarded.unwrap_or_else(|| req.peer_addr().map_or(IpAddr::from([127, 0, 0, 1]), |a| a.ip()))
}

/// Path arguments in template order, percent-decoded from the raw path.
fn path_args(req: &HttpRequest) -> Result<Vec<String>> {
    let template = req.app_data::<PathTemplate>().ok_or_else(|| Error::internal("route without template"))?;
    let raw: Vec<&str> = req.uri().path().split('/').collect();
    let mut args = Vec::new();
    for (i, segment) in template.0.split('/').enumerate() {
        if segment.starts_with('{') {
            // Only a trailing state key may be left out (see `Router::configure`).
            let raw = raw.get(i).copied().unwrap_or_default();
            let decoded = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| Error::invalid_param("path segment is not valid UTF-8"))?;
            args.push(decoded.into_owned());
        }
    }
    Ok(args)
}

/// Parses a JSON body for the few endpoints outside ruma's types, with the same errors.
pub fn parse_json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    check_json(body)?;
    serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("missing field") { Error::missing_param(text) } else { Error::bad_json(text) }
    })
}

/// Why NUL is refused everywhere: Postgres cannot hold it in `text` (the query fails, a 500)
/// while SQLite stores it, and no identifier, key or name needs it. Refused at the door, every
/// endpoint answers the same on both backends.
const NUL_IN_BODY: &str =
    "the request body has a NUL character (\\u0000) in a string; strings may not contain it";

/// Checks a body is JSON that Hearth can store and serve back: nested no deeper than
/// [`crate::json::MAX_JSON_DEPTH`], with no NUL in any string or object key. Clients send JSON
/// under any content type (or none), so the body itself decides; `M_NOT_JSON` for a syntax
/// error, `M_BAD_JSON` for the rest.
fn check_json(body: &[u8]) -> Result<()> {
    if !crate::json::within_depth(body) {
        // Too deep for the walk below (serde_json's recursion limit), and for what would serve
        // it back. Garbage is still told apart: skipping a value does not recurse.
        if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            return Err(Error::not_json("request body is not valid JSON"));
        }
        return Err(Error::bad_json(format!(
            "JSON nested deeper than {} levels of arrays and objects",
            crate::json::MAX_JSON_DEPTH
        )));
    }
    let not_json = || Error::not_json("request body is not valid JSON");
    match serde_json::from_slice::<NoNul>(body) {
        Ok(Walk) => Ok(()),
        // The walk stopped at the NUL; what follows may not be JSON at all, which comes first.
        Err(e) if e.is_data() => match serde_json::from_slice::<AnyJson>(body) {
            Ok(Walk) => Err(Error::bad_json(NUL_IN_BODY)),
            Err(_) => Err(not_json()),
        },
        Err(_) => Err(not_json()),
    }
}

/// A walk over any JSON value that decodes every string and key, and refuses NUL in them unless
/// `NUL_OK`. Deserialising it walks the body once without allocating, and the JSON parser decodes
/// escapes, so `"\\u0000"` (an escaped backslash, then `u0000`) is not taken for a NUL.
struct Walk<const NUL_OK: bool>;

/// Any JSON value whose strings and keys hold no NUL.
type NoNul = Walk<false>;
/// Any JSON value (strings still decoded: bad UTF-8 or escapes are not JSON).
type AnyJson = Walk<true>;

impl<'de, const NUL_OK: bool> serde::Deserialize<'de> for Walk<NUL_OK> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Walk)
    }
}

impl<'de, const NUL_OK: bool> serde::de::Visitor<'de> for Walk<NUL_OK> {
    type Value = Walk<NUL_OK>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(Walk)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(Walk)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(Walk)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(Walk)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(Walk)
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self, E> {
        if !NUL_OK && value.contains('\0') { Err(E::custom(NUL_IN_BODY)) } else { Ok(Walk) }
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Self>()?.is_some() {}
        Ok(Walk)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<Self, Self>()?.is_some() {}
        Ok(Walk)
    }
}

/// Refuses a NUL (`%00`) anywhere in the decoded path or query, for the reason given at
/// [`NUL_IN_BODY`]; the access token, identifiers and search terms all travel there.
pub fn check_uri(req: &HttpRequest) -> Result<()> {
    let has_nul = |text: &str| percent_encoding::percent_decode_str(text).any(|byte| byte == 0);
    if has_nul(req.uri().path()) {
        return Err(Error::invalid_param(
            "the path has a NUL character (%00); identifiers may not contain it",
        ));
    }
    if req.uri().query().is_some_and(has_nul) {
        return Err(Error::invalid_param(
            "the query string has a NUL character (%00); parameters may not contain it",
        ));
    }
    Ok(())
}

/// The app state, and the request's body once its path and query pass [`check_uri`]: what every
/// extractor of a JSON endpoint starts with.
async fn state_and_body(req: &HttpRequest, payload: Payload) -> Result<(web::Data<AppState>, web::Bytes)> {
    let state =
        req.app_data::<web::Data<AppState>>().cloned().ok_or_else(|| Error::internal("no app state"))?;
    check_uri(req)?;
    let body = read_body(req, payload, &state).await?;
    Ok((state, body))
}

/// The largest body another server may send: a full transaction (50 PDUs of 65,536 bytes and
/// 100 EDUs) with room to spare.
const FEDERATION_MAX_BODY: usize = 12 * 1024 * 1024;

/// Reads a request body within `limits.max_request_bytes` (for the federation API, at least
/// [`FEDERATION_MAX_BODY`]) and `limits.body_timeout_secs`, and checks a non-empty one with
/// [`check_json`].
async fn read_body(req: &HttpRequest, payload: Payload, state: &AppState) -> Result<web::Bytes> {
    let limit = match req.path().starts_with("/_matrix/federation/") {
        // Another server's transaction may hold 50 PDUs of up to 64 KiB each and 100 EDUs.
        true => state.config.limits.max_request_bytes.max(FEDERATION_MAX_BODY),
        false => state.config.limits.max_request_bytes,
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(Error::too_large(limit));
    }
    // A client that trickles its body would hold the connection (and a file descriptor) for as
    // long as it likes: the whole body has a deadline.
    let timeout = std::time::Duration::from_secs(state.config.limits.body_timeout_secs);
    let read = actix_web::body::to_bytes_limited(actix_web::body::BodyStream::new(payload), limit);
    let body = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| {
            Error::new(
                StatusCode::REQUEST_TIMEOUT,
                crate::error::ErrorKind::Unknown,
                format!("the request body did not arrive within {} seconds", timeout.as_secs()),
            )
        })?
        .map_err(|_| Error::too_large(limit))?
        .map_err(|e| Error::bad_json(format!("could not read the request body: {e}")))?;
    if !body.is_empty() {
        check_json(&body)?;
    }
    Ok(body)
}

/// The JSON body of an endpoint outside ruma's types, read and checked as [`Ruma`] reads
/// bodies (size, deadline, NUL and depth, NUL in the path and query); parse it with
/// [`parse_json_body`].
pub struct JsonBody(pub web::Bytes);

impl FromRequest for JsonBody {
    type Error = Error;
    type Future = LocalFuture<'static, Result<Self>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move { state_and_body(&req, payload).await.map(|(_, body)| JsonBody(body)) })
    }
}

/// A UIA password stage in the form of the spec before r0.4, `{"type": "m.login.password",
/// "user": ..., "password": ...}`, rewritten with the `identifier` that ruma requires: Synapse
/// still takes it, and so do clients' and SyTest's requests (`keys/device_signing/upload`).
/// `None` when the body has no such stage (most bodies: only those naming the stage are parsed).
fn legacy_password_auth(body: &[u8]) -> Option<Vec<u8>> {
    const STAGE: &[u8] = b"m.login.password";
    if !body.windows(STAGE.len()).any(|w| w == STAGE) {
        return None;
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    let auth = object.get_mut("auth")?.as_object_mut()?;
    if auth.get("type")?.as_str()? != "m.login.password" || auth.contains_key("identifier") {
        return None;
    }
    let user = auth.remove("user")?;
    user.as_str()?;
    auth.insert("identifier".to_owned(), serde_json::json!({"type": "m.id.user", "user": user}));
    serde_json::to_vec(&object).ok()
}

/// `{"typing": true}` without `timeout`, given the 30 s Synapse assumes (SyTest sends it so);
/// ruma requires the field. `None` for any other body or endpoint.
fn typing_default_timeout<T: 'static>(body: &[u8]) -> Option<Vec<u8>> {
    use std::any::TypeId;
    if TypeId::of::<T>() != TypeId::of::<ruma::api::client::typing::create_typing_event::v3::Request>() {
        return None;
    }
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    if object.get("typing")? != &serde_json::Value::Bool(true) || object.contains_key("timeout") {
        return None;
    }
    object.insert("timeout".to_owned(), 30_000.into());
    serde_json::to_vec(&object).ok()
}

/// Refuses a room version that is not even a version's name (`my_bad_version`) as the spec's
/// unsupported version, as any other version Hearth does not know is: ruma's parser refuses it
/// first, as malformed JSON.
fn check_room_version_name<T: 'static>(body: &[u8]) -> Result<()> {
    use ruma::api::client::room::{create_room, upgrade_room};
    use std::any::TypeId;
    let field = if TypeId::of::<T>() == TypeId::of::<upgrade_room::v3::Request>() {
        "new_version"
    } else if TypeId::of::<T>() == TypeId::of::<create_room::v3::Request>() {
        "room_version"
    } else {
        return Ok(());
    };
    let Ok(object) = serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) else {
        return Ok(());
    };
    match object.get(field).and_then(serde_json::Value::as_str) {
        Some(version) if ruma::RoomVersionId::try_from(version).is_err() => Err(Error::new(
            StatusCode::BAD_REQUEST,
            crate::error::ErrorKind::UnsupportedRoomVersion,
            format!("this server does not support room version `{version}`"),
        )),
        _ => Ok(()),
    }
}

/// Refuses, with the error ruma means to give, bodies on which ruma's parsers panic: ruma 0.17's
/// `LoginInfo` indexes its `type` field before checking it is there, so a `/login` body without
/// `type` panicked the worker (and the client saw its connection dropped).
fn check_known_parser_panics<T: 'static>(body: &[u8]) -> Result<()> {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<ruma::api::client::session::login::v3::Request>()
        && let Ok(object) = serde_json::from_slice::<BTreeMap<String, serde::de::IgnoredAny>>(body)
        && !object.contains_key("type")
    {
        return Err(Error::missing_param("missing field `type`: the login type, e.g. m.login.password"));
    }
    Ok(())
}

/// Converts an actix (http 0.2) request into the http 1.x request ruma parses.
pub(crate) fn to_http_request<'b>(req: &HttpRequest, body: &'b [u8]) -> Result<http::Request<&'b [u8]>> {
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(req.method().as_str().as_bytes()).map_err(Error::internal)?)
        .uri(req.uri().to_string());
    for (name, value) in req.headers() {
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    builder.body(body).map_err(|e| Error::bad_json(format!("malformed request: {e}")))
}

fn map_parse_error(error: FromHttpRequestError) -> Error {
    match error {
        FromHttpRequestError::Deserialization(DeserializationError::Json(e)) => {
            let text = e.to_string();
            if text.starts_with("missing field") { Error::missing_param(text) } else { Error::bad_json(text) }
        }
        FromHttpRequestError::Deserialization(DeserializationError::Query(e)) => {
            let text = e.to_string();
            if text.starts_with("missing field") {
                Error::missing_param(format!("query: {text}"))
            } else {
                Error::invalid_param(format!("query: {text}"))
            }
        }
        FromHttpRequestError::Deserialization(DeserializationError::Ident(e)) => {
            Error::invalid_param(format!("invalid identifier: {e}"))
        }
        FromHttpRequestError::MethodMismatch { .. } => {
            Error::unrecognized(StatusCode::METHOD_NOT_ALLOWED, "method not allowed for this endpoint")
        }
        other => Error::bad_json(other.to_string()),
    }
}

impl<T> FromRequest for Ruma<T>
where
    T: IncomingRequest + 'static,
    T::Authentication: ServerAuth,
{
    type Error = Error;
    type Future = LocalFuture<'static, Result<Self>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move {
            let (state, body) = state_and_body(&req, payload).await?;

            let token = access_token(&req)?;
            let client_ip = client_ip(&req, state.config.listen.trust_x_forwarded_for);
            let query = req.query_string();
            let incoming = Incoming { request: &req, body: &body };
            let sender =
                <T::Authentication as ServerAuth>::authenticate(&state, token, client_ip, query, incoming)
                    .await?;
            crate::auth::guest::check(
                <T::Authentication as ServerAuth>::is_guest(&sender),
                T::METHOD.as_str(),
                req.app_data::<PathTemplate>().map(|template| template.0),
            )?;
            let args = path_args(&req)?;
            let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
            // Clients (matrix-nio among them) send POSTs with no body where the spec's body has
            // only optional fields; read that as `{}`, as other homeservers do.
            let raw_body = body.clone();
            let body: &[u8] = if body.is_empty() && T::METHOD != http::Method::GET { b"{}" } else { &body };
            check_known_parser_panics::<T>(body)?;
            check_room_version_name::<T>(body)?;
            let rewritten = legacy_password_auth(body).or_else(|| typing_default_timeout::<T>(body));
            let body = rewritten.as_deref().unwrap_or(body);
            let http_request = to_http_request(&req, body)?;
            // Should a parser still panic on some input, that request gets a 500 (it is a bug, and
            // the sweep test reports it) instead of a panic that takes down the worker and every
            // connection it holds.
            let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                T::try_from_http_request(http_request, &arg_refs)
            }))
            .map_err(|_| Error::internal(format!("parsing a request for {} panicked", req.path())))?
            .map_err(map_parse_error)?;
            Ok(Ruma { body: parsed, sender, client_ip, raw_body })
        })
    }
}

/// The authenticated user of a request outside ruma's types (an access token required), with
/// the path and query checked as [`Ruma`] checks them.
pub struct Authenticated(pub AuthedUser);

impl FromRequest for Authenticated {
    type Error = Error;
    type Future = LocalFuture<'static, Result<Self>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = req
                .app_data::<web::Data<AppState>>()
                .cloned()
                .ok_or_else(|| Error::internal("no app state"))?;
            check_uri(&req)?;
            let token = access_token(&req)?;
            let ip = client_ip(&req, state.config.listen.trust_x_forwarded_for);
            let query = req.query_string().to_owned();
            let incoming = Incoming { request: &req, body: &[] };
            let user = <AccessToken as ServerAuth>::authenticate(&state, token, ip, &query, incoming).await?;
            crate::auth::guest::check(
                user.is_guest,
                req.method().as_str(),
                req.app_data::<PathTemplate>().map(|template| template.0),
            )?;
            Ok(Authenticated(user))
        })
    }
}

/// A ruma response, serialised for actix.
pub struct RumaResponse<T>(pub T);

impl<T: OutgoingResponse> Responder for RumaResponse<T> {
    type Body = BoxBody;

    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        let response = match self.0.try_into_http_response::<Vec<u8>>() {
            Ok(response) => response,
            Err(e) => return actix_web::ResponseError::error_response(&Error::internal(e)),
        };
        let (parts, body) = response.into_parts();
        let status = StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut builder = HttpResponse::build(status);
        for (name, value) in &parts.headers {
            builder.append_header((name.as_str(), value.as_bytes()));
        }
        builder.body(body)
    }
}

type RouteFactory = Box<dyn Fn() -> actix_web::Route>;

/// Collects ruma endpoints and registers them as actix resources.
#[derive(Default)]
pub struct Router {
    resources: BTreeMap<&'static str, Vec<(http::Method, RouteFactory)>>,
    /// What answers a path under one of these prefixes that no endpoint serves, instead of the
    /// plain 404 `M_UNRECOGNIZED`.
    fallbacks: Vec<(&'static str, RouteFactory)>,
}

impl Router {
    /// Registers `handler` for every path of the ruma request type `T`.
    pub fn add<T, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        T: IncomingRequest + 'static,
        T::Authentication: ServerAuth,
        F: Fn(web::Data<AppState>, Ruma<T>) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<T::OutgoingResponse>> + 'static,
    {
        self.add_responding(move |state, request| {
            let handler = handler.clone();
            async move { handler(state, request).await.map(RumaResponse) }
        })
    }

    /// Registers `handler` for every path of the ruma request type `T`, answering with its own
    /// responder: for answers shaped beyond what ruma's response type writes (`/sync`'s).
    pub fn add_responding<T, R, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        T: IncomingRequest + 'static,
        T::Authentication: ServerAuth,
        R: Responder + 'static,
        F: Fn(web::Data<AppState>, Ruma<T>) -> Fut + Clone + 'static,
        Fut: Future<Output = Result<R>> + 'static,
    {
        let method = actix_web::http::Method::from_bytes(T::METHOD.as_str().as_bytes())
            .unwrap_or(actix_web::http::Method::GET);
        for path in T::PATH_BUILDER.all_paths() {
            let handler = handler.clone();
            let method = method.clone();
            let factory: RouteFactory = Box::new(move || {
                let handler = handler.clone();
                web::method(method.clone()).to(move |state: web::Data<AppState>, request: Ruma<T>| {
                    let handler = handler.clone();
                    async move { handler(state, request).await }
                })
            });
            self.resources.entry(path).or_default().push((T::METHOD, factory));
        }
        self
    }

    /// Registers a plain actix route for `path` (a template like ruma's, `{name}` for a
    /// variable), for what ruma's types cannot express; it is routed, listed and swept like
    /// the others. A handler reads its variables with `HttpRequest::match_info`.
    pub fn add_route(
        &mut self,
        method: http::Method,
        path: &'static str,
        route: fn() -> actix_web::Route,
    ) -> &mut Self {
        self.resources.entry(path).or_default().push((method, Box::new(route)));
        self
    }

    /// Answers paths under `prefix` that no endpoint serves with `route`.
    pub fn fallback(&mut self, prefix: &'static str, route: fn() -> actix_web::Route) -> &mut Self {
        self.fallbacks.push((prefix, Box::new(route)));
        self
    }

    /// Every method and path registered, in path order (see [`crate::api::client::endpoints`]).
    pub fn endpoints(&self) -> Vec<crate::api::client::Endpoint> {
        self.resources
            .iter()
            .flat_map(|(path, routes)| {
                routes.iter().map(|(method, _)| crate::api::client::Endpoint { method: method.clone(), path })
            })
            .collect()
    }

    pub fn configure(self, config: &mut web::ServiceConfig) {
        // actix tries resources in turn and matches each dynamic one with a regex, which costs
        // a request a walk over every endpoint. So endpoints with path variables are grouped in
        // scopes by their static prefix: a request compares prefixes, then tries a few regexes.
        let mut scopes: BTreeMap<String, Vec<(String, &'static str)>> = BTreeMap::new();
        let mut top = Vec::new();
        let mut patterns = Vec::new();
        for path in self.resources.keys() {
            // Path variables may be empty: an empty state key is the common case
            // (`/state/m.room.name/`).
            let pattern = path
                .split('/')
                .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => format!("{{{name}:[^/]*}}"),
                    None => segment.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("/");
            // `/state/{eventType}` with no state key at all means the empty key too.
            if let Some(without) = pattern.strip_suffix("/{state_key:[^/]*}") {
                patterns.push((without.to_owned(), *path));
            }
            patterns.push((pattern, *path));
        }
        for (pattern, _) in &patterns {
            if let Some(dynamic) = pattern.find("/{") {
                scopes.entry(pattern[..dynamic].to_owned()).or_default();
            }
        }
        for (pattern, path) in patterns {
            // The longest scope whose prefix is a whole-segment prefix of the pattern.
            let scope = scopes
                .keys()
                .filter(|prefix| {
                    pattern.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/'))
                })
                .max_by_key(|prefix| prefix.len())
                .cloned();
            match scope {
                Some(prefix) => {
                    let rest = pattern[prefix.len()..].to_owned();
                    scopes.entry(prefix).or_default().push((rest, path));
                }
                None => top.push((pattern, path)),
            }
        }
        let resource = |pattern: &str, path: &'static str| {
            let mut resource = web::resource(pattern.to_owned()).app_data(PathTemplate(path));
            for (_, route) in &self.resources[path] {
                resource = resource.route(route());
            }
            resource.default_service(web::to(method_not_allowed))
        };
        for (pattern, path) in &top {
            config.service(resource(pattern, path));
        }
        // What a scope answers for paths it holds no endpoint for: the fallback of the longest
        // prefix that covers it, or 404.
        let fallback_for = |prefix: &str| {
            self.fallbacks
                .iter()
                .filter(|(covering, _)| {
                    prefix == *covering
                        || prefix.strip_prefix(covering).is_some_and(|rest| rest.starts_with('/'))
                })
                .max_by_key(|(covering, _)| covering.len())
                .map(|(_, route)| route())
        };
        // Longer prefixes first, so that a scope nested in another's prefix is reached.
        let mut scopes: Vec<_> = scopes.into_iter().collect();
        scopes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        for (prefix, members) in scopes {
            let mut scope = match fallback_for(&prefix) {
                Some(route) => web::scope(&prefix).default_service(route),
                None => web::scope(&prefix).default_service(web::to(unrecognized)),
            };
            for (pattern, path) in &members {
                scope = scope.service(resource(pattern, path));
            }
            config.service(scope);
        }
        for (prefix, route) in &self.fallbacks {
            config.service(web::scope(prefix).default_service(route()));
        }
    }
}

pub(crate) async fn method_not_allowed() -> HttpResponse {
    actix_web::ResponseError::error_response(&Error::unrecognized(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed for this endpoint",
    ))
}

/// The fallback for paths no endpoint serves.
pub async fn unrecognized() -> HttpResponse {
    actix_web::ResponseError::error_response(&Error::unrecognized(
        StatusCode::NOT_FOUND,
        "unrecognized request",
    ))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::json::{MAX_JSON_DEPTH, arbitrary::*};

    fn errcode(body: &str) -> Option<String> {
        match check_json(body.as_bytes()) {
            Ok(()) => None,
            Err(Error::Matrix { kind, .. }) => Some(kind.errcode().to_string()),
            Err(other) => Some(other.to_string()),
        }
    }

    #[test]
    fn nul_only_where_a_string_holds_one() {
        assert_eq!(errcode(r#"{"a": ["x", {"b": "y"}], "n": -1.5, "t": true, "z": null}"#), None);
        assert_eq!(errcode(r#"{"a": "\\u0000"}"#), None, "an escaped backslash, then u0000");
        for body in [r#""\u0000""#, r#"{"a": "x\u0000"}"#, r#"{"k\u0000": 1}"#, r#"[[{"a": ["\u0000"]}]]"#] {
            assert_eq!(errcode(body).as_deref(), Some("M_BAD_JSON"), "{body}");
        }
        assert_eq!(errcode("{\"a\": 1").as_deref(), Some("M_NOT_JSON"));
        assert_eq!(errcode(r#"["\u0000" x"#).as_deref(), Some("M_NOT_JSON"), "a NUL, then no JSON");
        assert_eq!(errcode("\"a\0\"").as_deref(), Some("M_NOT_JSON"), "a raw NUL is no JSON at all");
    }

    #[test]
    fn a_login_body_without_type_is_missing_param_before_ruma_parses_it() {
        type Login = ruma::api::client::session::login::v3::Request;
        let refused = |body: &str| match check_known_parser_panics::<Login>(body.as_bytes()) {
            Ok(()) => None,
            Err(Error::Matrix { kind, .. }) => Some(kind.errcode().to_string()),
            Err(other) => Some(other.to_string()),
        };
        assert_eq!(refused("{}").as_deref(), Some("M_MISSING_PARAM"));
        assert_eq!(refused(r#"{"password": "x"}"#).as_deref(), Some("M_MISSING_PARAM"));
        assert_eq!(refused(r#"{"type": "m.login.password"}"#), None);
        assert_eq!(refused(r#"{"type": 1}"#), None, "ruma refuses a `type` that is not a string itself");
        assert_eq!(refused("[]"), None, "ruma refuses a body that is not an object itself");
        assert_eq!(
            check_known_parser_panics::<ruma::api::client::account::whoami::v3::Request>(b"{}").ok(),
            Some(())
        );
    }

    /// What `check_json` should answer for `body`, from serde_json's parse of it (without its
    /// recursion limit, so only for bodies a test thread's stack can parse).
    fn expected(body: &[u8]) -> Option<&'static str> {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        deserializer.disable_recursion_limit();
        let parsed: Option<serde_json::Value> =
            serde::Deserialize::deserialize(&mut deserializer).ok().filter(|_| deserializer.end().is_ok());
        match parsed {
            None => Some("M_NOT_JSON"),
            Some(value) if depth_of(&value) > MAX_JSON_DEPTH || has_nul(&value) => Some("M_BAD_JSON"),
            Some(_) => None,
        }
    }

    /// Checks `check_json` against serde_json on one body.
    fn agrees(body: &[u8]) -> Result<(), TestCaseError> {
        let text = String::from_utf8_lossy(body);
        let got = errcode_of(body);
        match expected(body) {
            // Bodies too deep to be checked for more are refused as such, even when serde_json
            // would not parse them (a bad escape or UTF-8 deep inside is not looked for).
            Some("M_NOT_JSON") if crate::json::depth(body) > MAX_JSON_DEPTH => {
                prop_assert!(got.is_some(), "accepted {text}");
            }
            want => prop_assert_eq!(got.as_deref(), want, "{}", text),
        }
        Ok(())
    }

    fn errcode_of(body: &[u8]) -> Option<String> {
        match check_json(body) {
            Ok(()) => None,
            Err(Error::Matrix { kind, .. }) => Some(kind.errcode().to_string()),
            Err(other) => Some(other.to_string()),
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn check_json_refuses_exactly_bodies_too_deep_or_with_nul_and_agrees_with_serde_on_json(
            value in deep_value(100),
            style in style(),
        ) {
            agrees(write(&value, style).as_bytes())?;
        }

        #[test]
        fn check_json_agrees_with_serde_on_json_one_byte_off(
            value in deep_value(80),
            style in style(),
            at in any::<usize>(),
            byte in json_byte(),
            how in any::<u8>(),
        ) {
            agrees(&mutate(write(&value, style).as_bytes(), at, byte, how))?;
        }

        #[test]
        fn check_json_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(json_byte(), 0..300)) {
            agrees(&bytes)?;
        }
    }
}
