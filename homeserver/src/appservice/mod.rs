//! Application services: bridges and bots registered by the operator (the spec's Application
//! Service API).
//!
//! - [`Appservices::load`] reads the registration files named by `appservices.registration_files`
//!   at start-up and refuses, naming the file, anything ambiguous or unbounded.
//! - An `as_token` authenticates like an access token (`crate::auth::authenticate_request`), as the
//!   service's sender or, with `?user_id=`, as a user of its user namespace.
//! - [`sender`] pushes the events a service is interested in, as transactions, through a durable
//!   queue per service.
//! - [`Appservices::query_user`] and [`Appservices::query_alias`] ask the services whose
//!   namespaces cover a user or alias that does not exist, so they can create it on demand.

pub mod sender;
pub mod thirdparty;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use regex::{Regex, RegexBuilder};
use ruma::{
    OwnedRoomAliasId, OwnedServerName, OwnedTransactionId, OwnedUserId, RoomAliasId, ServerName, UserId,
    api::{
        OutgoingRequest, OutgoingRequestExt,
        appservice::{
            Registration,
            ping::send_ping,
            query::{query_room_alias, query_user_id},
        },
        auth_scheme::AuthScheme,
        path_builder::SinglePath,
    },
};

use crate::{auth::tokens::sha256_hex, config::Config};

/// Largest registration file read, in bytes.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most regular expressions in one namespace list (users, aliases or rooms).
const MAX_NAMESPACES: usize = 64;
/// Longest regular expression, in bytes, and what it may compile to.
const MAX_REGEX_BYTES: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Most protocols one service may declare.
const MAX_PROTOCOLS: usize = 64;
/// Longest `id` and token, in bytes.
const MAX_ID_BYTES: usize = 255;
const MAX_TOKEN_BYTES: usize = 1024;
/// How long a user or alias query may take before the lookup goes on without the service.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries one service may have in flight at once; more wait their turn.
const QUERIES_PER_SERVICE: usize = 16;
/// Most of a service's answer read (error bodies are quoted back by the ping endpoint).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One regular expression of a namespace.
#[derive(Debug)]
struct Pattern {
    exclusive: bool,
    regex: Regex,
}

fn matches(patterns: &[Pattern], value: &str, exclusive_only: bool) -> bool {
    patterns.iter().any(|p| (p.exclusive || !exclusive_only) && p.regex.is_match(value))
}

/// One registered application service.
pub struct Appservice {
    pub registration: Registration,
    /// `@<sender_localpart>:<server_name>`.
    pub sender: OwnedUserId,
    users: Vec<Pattern>,
    aliases: Vec<Pattern>,
    rooms: Vec<Pattern>,
    server_name: OwnedServerName,
    queries: tokio::sync::Semaphore,
}

/// Only the id: the registration holds both tokens.
impl std::fmt::Debug for Appservice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appservice").field("id", &self.registration.id).finish_non_exhaustive()
    }
}

impl Appservice {
    pub fn id(&self) -> &str {
        &self.registration.id
    }

    /// Where the service listens; `None`: nothing is pushed to it and it is never queried.
    pub fn url(&self) -> Option<&str> {
        self.registration.url.as_deref().filter(|url| !url.is_empty())
    }

    /// Whether the user is the service's own or in its user namespace. Only users of this server
    /// count (the spec's note on the users namespace).
    pub fn is_user_match(&self, user: &UserId) -> bool {
        user == self.sender
            || (user.server_name() == self.server_name && matches(&self.users, user.as_str(), false))
    }

    /// Whether the user is in one of the service's exclusive user namespaces.
    pub fn is_exclusive_user(&self, user: &UserId) -> bool {
        user.server_name() == self.server_name && matches(&self.users, user.as_str(), true)
    }

    pub fn is_alias_match(&self, alias: &str) -> bool {
        matches(&self.aliases, alias, false)
    }

    pub fn is_exclusive_alias(&self, alias: &str) -> bool {
        matches(&self.aliases, alias, true)
    }

    pub fn is_room_match(&self, room_id: &str) -> bool {
        matches(&self.rooms, room_id, false)
    }

    /// Whether the users the service acts for are held to the per-user rate limits (its own
    /// sender never is). The spec's default is yes.
    pub fn rate_limited(&self) -> bool {
        self.registration.rate_limited.unwrap_or(true)
    }
}

/// What the `as_token` of a request on an endpoint that application services may call without
/// a user (`register`, `login`, `ping`) says.
#[derive(Debug, Clone)]
pub enum AppserviceAuth {
    /// No token.
    Absent,
    /// A token, but no service's (a user's access token, or a wrong one).
    Unknown,
    Known(Arc<Appservice>),
}

impl AppserviceAuth {
    /// The service, or the spec's 401 for a missing or unknown token.
    pub fn require(&self) -> crate::error::Result<&Arc<Appservice>> {
        match self {
            AppserviceAuth::Known(service) => Ok(service),
            AppserviceAuth::Absent => Err(crate::error::Error::missing_token()),
            AppserviceAuth::Unknown => {
                Err(crate::error::Error::unknown_token(false, "unknown application service token"))
            }
        }
    }
}

/// Why a call to a service failed.
#[derive(Debug)]
pub enum CallError {
    /// The service has no `url`.
    NoUrl,
    /// No connection, or it broke.
    Connection(String),
    /// No answer in time.
    Timeout,
    /// It answered with a status other than 2xx: the status and (the start of) the body.
    Status(u16, String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoUrl => f.write_str("the application service has no url"),
            CallError::Connection(why) => write!(f, "could not reach the application service: {why}"),
            CallError::Timeout => f.write_str("the application service did not answer in time"),
            CallError::Status(status, _) => write!(f, "the application service answered {status}"),
        }
    }
}

/// Every registered service, and what the server needs to reach them.
pub struct Appservices {
    list: Vec<Arc<Appservice>>,
    /// SHA-256 of each `as_token` → its service: a lookup by hash, so comparing a guessed token
    /// tells nothing about a real one.
    by_token: HashMap<String, Arc<Appservice>>,
    http: reqwest::Client,
    /// Stops the senders ([`sender`]) when the server stops.
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Third-party protocol metadata already fetched ([`thirdparty`]).
    protocol_cache: Mutex<thirdparty::ProtocolCache>,
}

impl std::fmt::Debug for Appservices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list.iter()).finish()
    }
}

/// A registration's `url`: `null`, or an http(s) URL.
fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url `{url}` is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(format!("url `{url}` must be an http:// or https:// URL with a host"));
    }
    Ok(())
}

/// A token travels in an `Authorization` header: printable ASCII without spaces.
fn check_token(name: &str, token: &str) -> Result<(), String> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(format!("{name} must be 1 to {MAX_TOKEN_BYTES} bytes"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{name} may contain only printable ASCII characters without spaces"));
    }
    Ok(())
}

fn compile(kind: &str, namespaces: &[ruma::api::appservice::Namespace]) -> Result<Vec<Pattern>, String> {
    if namespaces.len() > MAX_NAMESPACES {
        return Err(format!("namespaces.{kind} has more than {MAX_NAMESPACES} entries"));
    }
    namespaces
        .iter()
        .map(|namespace| {
            if namespace.regex.len() > MAX_REGEX_BYTES {
                return Err(format!("a namespaces.{kind} regex is longer than {MAX_REGEX_BYTES} bytes"));
            }
            // Matched from the start of the id, as Synapse does (Python's `re.match`); the end
            // is not anchored.
            let regex = RegexBuilder::new(&format!("^(?:{})", namespace.regex))
                .size_limit(REGEX_SIZE_LIMIT)
                .dfa_size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| format!("namespaces.{kind} regex `{}` is invalid: {e}", namespace.regex))?;
            Ok(Pattern { exclusive: namespace.exclusive, regex })
        })
        .collect()
}

impl Appservices {
    /// No services.
    pub fn none() -> Self {
        Self::new(Vec::new())
    }

    fn new(list: Vec<Arc<Appservice>>) -> Self {
        let by_token = list.iter().map(|a| (sha256_hex(&a.registration.as_token), a.clone())).collect();
        let http = Self::http_client(None).unwrap_or_else(|_| reqwest::Client::new());
        Self {
            list,
            by_token,
            http,
            stop: tokio::sync::watch::channel(false).0,
            tasks: Mutex::default(),
            protocol_cache: Mutex::default(),
        }
    }

    fn http_client(extra_ca_file: Option<&str>) -> anyhow::Result<reqwest::Client> {
        // reqwest needs the TLS provider even for a client that speaks plain HTTP to a service
        // on loopback.
        crate::install_crypto_provider();
        // Redirects would carry the hs_token elsewhere.
        let builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
        Ok(crate::outbound::trust_extra_ca(builder, extra_ca_file)?.build()?)
    }

    /// Reads and checks every registration file the configuration names.
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let server_name = <&ServerName>::try_from(config.server_name.as_str())?;
        let mut registrations = Vec::new();
        for path in &config.appservices.registration_files {
            let context = || format!("application service registration {path}");
            let size = std::fs::metadata(path).with_context(context)?.len();
            if size > MAX_FILE_BYTES {
                anyhow::bail!("{}: larger than {MAX_FILE_BYTES} bytes", context());
            }
            let text = std::fs::read_to_string(path).with_context(context)?;
            // Without the snippet of the file the parser would quote: it may hold a token.
            let registration: Registration = serde_saphyr::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a valid registration: {}", context(), e.without_snippet())
            })?;
            registrations.push((path.clone(), registration));
        }
        let mut services = Self::from_registrations(registrations, server_name)?;
        services.http = Self::http_client(Some(&config.appservices.extra_ca_file))
            .context("appservices.extra_ca_file")?;
        Ok(services)
    }

    /// Checks registrations (each with where it came from, for the messages) and compiles their
    /// namespaces.
    pub fn from_registrations(
        registrations: Vec<(String, Registration)>,
        server_name: &ServerName,
    ) -> anyhow::Result<Self> {
        let mut list: Vec<Arc<Appservice>> = Vec::new();
        let (mut ids, mut as_tokens, mut senders) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (source, registration) in registrations {
            let fail =
                |problem: String| anyhow::anyhow!("application service registration {source}: {problem}");
            let r = &registration;
            if r.id.is_empty() || r.id.len() > MAX_ID_BYTES {
                return Err(fail(format!("id must be 1 to {MAX_ID_BYTES} bytes")));
            }
            check_token("as_token", &r.as_token).map_err(fail)?;
            check_token("hs_token", &r.hs_token).map_err(fail)?;
            if let Some(url) = r.url.as_deref().filter(|url| !url.is_empty()) {
                check_url(url).map_err(fail)?;
            }
            let sender = UserId::parse_with_server_name(r.sender_localpart.as_str(), server_name)
                .and_then(|sender| sender.validate_historical().map(|()| sender))
                .map_err(|e| {
                    fail(format!("sender_localpart `{}` is not a valid localpart: {e}", r.sender_localpart))
                })?;
            if r.protocols.as_ref().is_some_and(|p| p.len() > MAX_PROTOCOLS) {
                return Err(fail(format!("more than {MAX_PROTOCOLS} protocols")));
            }
            // The spec: ids and as_tokens identify services, so each must be unique.
            if !ids.insert(r.id.clone()) {
                return Err(fail(format!("another registration already has the id `{}`", r.id)));
            }
            if !as_tokens.insert(r.as_token.clone()) {
                return Err(fail("another registration already has this as_token".to_owned()));
            }
            if !senders.insert(sender.clone()) {
                return Err(fail(format!("another registration already has the sender {sender}")));
            }
            let users = compile("users", &r.namespaces.users).map_err(fail)?;
            let aliases = compile("aliases", &r.namespaces.aliases).map_err(fail)?;
            let rooms = compile("rooms", &r.namespaces.rooms).map_err(fail)?;
            list.push(Arc::new(Appservice {
                sender,
                users,
                aliases,
                rooms,
                server_name: server_name.to_owned(),
                queries: tokio::sync::Semaphore::new(QUERIES_PER_SERVICE),
                registration,
            }));
        }
        // An as_token that is also a user's access token cannot happen: those are JWTs signed
        // here. One that is another service's hs_token would let that service act as this one.
        for service in &list {
            if list.iter().any(|other| other.registration.hs_token == service.registration.as_token) {
                anyhow::bail!(
                    "application service registration for `{}`: its as_token is also an hs_token",
                    service.id()
                );
            }
        }
        Ok(Self::new(list))
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn all(&self) -> &[Arc<Appservice>] {
        &self.list
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Appservice>> {
        self.list.iter().find(|a| a.id() == id)
    }

    /// The service whose `as_token` this is.
    pub fn by_token(&self, token: &str) -> Option<Arc<Appservice>> {
        if self.list.is_empty() {
            return None;
        }
        self.by_token.get(&sha256_hex(token)).cloned()
    }

    /// The service that holds the user in an exclusive namespace, if one does.
    pub fn exclusive_user_owner(&self, user: &UserId) -> Option<&Arc<Appservice>> {
        self.list.iter().find(|a| a.is_exclusive_user(user))
    }

    /// The service that holds the alias in an exclusive namespace, if one does.
    pub fn exclusive_alias_owner(&self, alias: &str) -> Option<&Arc<Appservice>> {
        self.list.iter().find(|a| a.is_exclusive_alias(alias))
    }

    /// Asks the services whose user namespaces cover a user that does not exist whether it does
    /// (`GET /_matrix/app/v1/users/{userId}`); a service that wants it creates it before
    /// answering 200. True if one did.
    pub async fn query_user(&self, user: &UserId) -> bool {
        for service in self.list.iter().filter(|a| a.url().is_some() && a.is_user_match(user)) {
            let request = query_user_id::v1::Request::new(user.to_owned());
            match self.query(service, request).await {
                Ok(()) => return true,
                Err(error) => tracing::debug!(appservice = service.id(), %user, %error, "user query"),
            }
        }
        false
    }

    /// As [`Appservices::query_user`], for a room alias (`GET /_matrix/app/v1/rooms/{alias}`).
    pub async fn query_alias(&self, alias: &RoomAliasId) -> bool {
        for service in self.list.iter().filter(|a| a.url().is_some() && a.is_alias_match(alias.as_str())) {
            let request = query_room_alias::v1::Request::new(OwnedRoomAliasId::from(alias));
            match self.query(service, request).await {
                Ok(()) => return true,
                Err(error) => tracing::debug!(appservice = service.id(), %alias, %error, "alias query"),
            }
        }
        false
    }

    async fn query<R>(&self, service: &Appservice, request: R) -> Result<(), CallError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        for<'a> R::Authentication: AuthScheme<Input<'a> = &'a str>,
    {
        self.lookup(service, request).await.map(drop)
    }

    /// `POST /_matrix/app/v1/ping` on the service, for its own request to be pinged: how long the
    /// answer took.
    pub async fn ping(
        &self,
        service: &Appservice,
        transaction_id: Option<OwnedTransactionId>,
    ) -> Result<Duration, CallError> {
        let mut request = send_ping::v1::Request::new();
        request.transaction_id = transaction_id;
        let started = Instant::now();
        self.call(service, request, None, QUERY_TIMEOUT).await?;
        Ok(started.elapsed())
    }

    /// Sends a request to a service with its `hs_token`; `body` replaces the one ruma would
    /// serialise (a transaction, sent again exactly as first built). The status and body of a
    /// 2xx answer.
    pub(crate) async fn call<R>(
        &self,
        service: &Appservice,
        request: R,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError>
    where
        R: OutgoingRequest<PathBuilder = SinglePath>,
        for<'a> R::Authentication: AuthScheme<Input<'a> = &'a str>,
    {
        let base = service.url().ok_or(CallError::NoUrl)?;
        let built = request
            .try_into_http_request::<Vec<u8>>(base, &service.registration.hs_token, ())
            .map_err(|e| CallError::Connection(format!("could not build the request: {e}")))?;
        let (parts, built_body) = built.into_parts();
        // The token goes in the `Authorization` header only (ruma adds it), as the spec asks
        // since 1.4: in the query string it would land in the service's access logs.
        let outgoing = self
            .http
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .timeout(timeout)
            .body(body.unwrap_or(built_body));
        let mut response = outgoing.send().await.map_err(|e| {
            if e.is_timeout() { CallError::Timeout } else { CallError::Connection(error_chain(&e)) }
        })?;
        let status = response.status().as_u16();
        let mut answer = Vec::new();
        loop {
            match tokio::time::timeout(timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) if answer.len() < MAX_ANSWER_BYTES => answer.extend_from_slice(&chunk),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => break,
                Ok(Err(e)) => return Err(CallError::Connection(error_chain(&e))),
                Err(_) => return Err(CallError::Timeout),
            }
        }
        answer.truncate(MAX_ANSWER_BYTES);
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(CallError::Status(status, String::from_utf8_lossy(&answer).into_owned()))
        }
    }

    /// Starts the senders (see [`sender`]); the server calls this once it serves.
    pub fn start(&self, state: &Arc<crate::state::AppState>, owner: &str) {
        let mut tasks = self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for service in self.list.iter().filter(|a| a.url().is_some()) {
            let task =
                sender::run(Arc::downgrade(state), service.clone(), owner.to_owned(), self.stop.subscribe());
            tasks.push(tokio::spawn(task));
        }
    }

    /// Stops the senders, which hand their queues back for another worker (or the next run).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// An error and its causes, which reqwest keeps apart ("error sending request" says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(yaml: &str) -> Registration {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const IRC: &str = r##"
id: "IRC Bridge"
url: "http://127.0.0.1:1234"
as_token: "30c05ae90a248a4188e620216fa72e349803310ec83e2a77b34fe90be6081f46"
hs_token: "312df522183efd404ec1cd22d2ffa4bbc76a8c1ccf541dd692eef281356bb74e"
sender_localpart: "_irc_bot"
namespaces:
  users:
    - exclusive: true
      regex: "@_irc_bridge_.*"
  aliases:
    - exclusive: false
      regex: "#_irc_bridge_.*"
  rooms: []
"##;

    fn load(registrations: Vec<Registration>) -> anyhow::Result<Appservices> {
        let server: &ServerName = "example.org".try_into().unwrap();
        Appservices::from_registrations(
            registrations.into_iter().enumerate().map(|(i, r)| (format!("file{i}.yaml"), r)).collect(),
            server,
        )
    }

    #[test]
    fn the_spec_example_loads_and_its_namespaces_match_from_the_start() {
        let services = load(vec![registration(IRC)]).unwrap();
        let irc = &services.all()[0];
        assert_eq!(irc.sender, "@_irc_bot:example.org");
        let user = |id: &str| OwnedUserId::try_from(id).unwrap();
        assert!(irc.is_exclusive_user(&user("@_irc_bridge_alice:example.org")));
        assert!(!irc.is_user_match(&user("@_irc_bridge_alice:elsewhere.org")), "remote users never match");
        assert!(!irc.is_user_match(&user("@x_irc_bridge_alice:example.org")), "anchored at the start");
        assert!(irc.is_user_match(&user("@_irc_bot:example.org")), "the sender is the service's own");
        assert!(irc.is_alias_match("#_irc_bridge_chan:example.org"));
        assert!(!irc.is_exclusive_alias("#_irc_bridge_chan:example.org"));
        assert!(
            services.by_token("30c05ae90a248a4188e620216fa72e349803310ec83e2a77b34fe90be6081f46").is_some()
        );
        assert!(
            services.by_token("312df522183efd404ec1cd22d2ffa4bbc76a8c1ccf541dd692eef281356bb74e").is_none()
        );
    }

    #[test]
    fn a_null_url_is_read_as_no_url() {
        let services = load(vec![registration(&IRC.replace("\"http://127.0.0.1:1234\"", "null"))]).unwrap();
        assert!(services.all()[0].url().is_none());
    }

    #[test]
    fn ambiguous_or_unbounded_registrations_are_refused_by_name() {
        let irc = registration(IRC);
        let mut same_token = registration(&IRC.replace("IRC Bridge", "Other").replace("_irc_bot", "_other"));
        same_token.hs_token = "another".to_owned();
        let refused = |list: Vec<Registration>| load(list).unwrap_err().to_string();
        assert!(refused(vec![irc.clone(), irc.clone()]).contains("id `IRC Bridge`"));
        assert!(
            refused(vec![irc.clone(), same_token])
                .contains("file1.yaml: another registration already has this as_token")
        );
        let bad_regex = registration(&IRC.replace("\"@_irc_bridge_.*\"", "\"@_irc_(\""));
        assert!(refused(vec![bad_regex]).contains("namespaces.users regex `@_irc_(` is invalid"));
        let huge = registration(&IRC.replace("\"@_irc_bridge_.*\"", "\"(a{1000}){1000}\""));
        assert!(refused(vec![huge]).contains("is invalid"), "a regex past the size limit");
        let bad_url = registration(&IRC.replace("http://127.0.0.1:1234", "ftp://x"));
        assert!(refused(vec![bad_url]).contains("url `ftp://x`"));
        let bad_sender = registration(&IRC.replace("_irc_bot", "bad localpart"));
        assert!(refused(vec![bad_sender]).contains("sender_localpart"));
        let spaced = registration(&IRC.replace("30c05ae9", "30c0 ae9"));
        assert!(refused(vec![spaced]).contains("as_token may contain only printable ASCII"));
    }
}
