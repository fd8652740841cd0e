//! Application services, driven as a bridge would: a test-started HTTP server on loopback plays
//! the service. It checks every request Hearth sends it (path, `hs_token`, body shape), records
//! what it accepted, and calls Hearth back with its `as_token` (to register users and create
//! rooms on demand).

use std::{
    collections::HashSet,
    net::TcpListener,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use homeserver::config::Config;
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestDb, TestServer, assert_error},
    tls::TestCa,
};

const PW: &str = "correct horse battery";
const ID: &str = "bridge";
const SENDER: &str = "@_bridge_bot:localhost";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('#', "%23").replace('@', "%40")
}

/// How the service answers transactions and pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Accept = 0,
    Fail = 1,
}

/// One transaction request the service received.
#[derive(Debug, Clone)]
struct Txn {
    txn_id: String,
    events: Vec<Value>,
    accepted: bool,
}

#[derive(Default)]
struct Seen {
    txns: Vec<Txn>,
    /// Paths of user and alias queries.
    queries: Vec<String>,
    pings: Vec<Value>,
    /// What failed the service's checks (wrong token, bad body): must stay empty.
    rejected: Vec<String>,
    /// Transactions being handled now, and any that arrived while already being handled.
    in_flight: HashSet<String>,
    overlaps: Vec<String>,
}

struct AsState {
    as_token: String,
    hs_token: String,
    hearth: Mutex<Option<String>>,
    mode: AtomicU8,
    /// How long each transaction takes to answer, in milliseconds.
    slow_ms: AtomicU64,
    seen: Mutex<Seen>,
    /// Set: the service speaks HTTPS.
    tls: Option<rustls::ServerConfig>,
}

impl AsState {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }

    /// Checks the `Authorization` header carries the `hs_token`.
    fn authorised(&self, request: &HttpRequest) -> bool {
        let auth = request.headers().get("Authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if auth == format!("Bearer {}", self.hs_token) {
            return true;
        }
        self.seen().rejected.push(format!("{} with Authorization `{auth}`", request.path()));
        false
    }

    async fn call_hearth(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let base = self.hearth.lock().unwrap().clone().expect("Hearth's address");
        let response = reqwest::Client::new()
            .request(method, format!("{base}{path}"))
            .bearer_auth(&self.as_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn forbidden() -> HttpResponse {
    HttpResponse::Forbidden().json(json!({"errcode": "M_FORBIDDEN", "error": "bad hs_token"}))
}

fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"errcode": "M_NOT_FOUND", "error": "nothing here"}))
}

/// Checks a pushed event has the client format's fields.
fn client_event_problem(event: &Value) -> Option<String> {
    let strings = ["event_id", "room_id", "sender", "type"];
    if strings.iter().any(|k| !event[k].is_string()) || !event["content"].is_object() {
        return Some(format!("event without the client format's fields: {event}"));
    }
    if !event["origin_server_ts"].is_u64() {
        return Some(format!("event without origin_server_ts: {event}"));
    }
    None
}

async fn transaction(
    request: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<Arc<AsState>>,
) -> HttpResponse {
    if !state.authorised(&request) {
        return forbidden();
    }
    let txn_id = path.into_inner();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(events) = parsed["events"].as_array().cloned() else {
        state.seen().rejected.push(format!("transaction {txn_id} without events: {parsed}"));
        return HttpResponse::BadRequest().finish();
    };
    if let Some(problem) = events.iter().find_map(client_event_problem) {
        state.seen().rejected.push(problem);
    }
    if !state.seen().in_flight.insert(txn_id.clone()) {
        state.seen().overlaps.push(txn_id.clone());
    }
    let slow = state.slow_ms.load(Ordering::SeqCst);
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    let accepted = state.mode.load(Ordering::SeqCst) == Mode::Accept as u8;
    let mut seen = state.seen();
    seen.in_flight.remove(&txn_id);
    seen.txns.push(Txn { txn_id, events, accepted });
    if accepted { HttpResponse::Ok().json(json!({})) } else { HttpResponse::InternalServerError().finish() }
}

/// `GET /_matrix/app/v1/thirdparty/{kind}[/{protocol}]`: the bridge's protocol ("bridge"),
/// described as bridges describe theirs (an instance without `fields`), and lookups that answer
/// with what they were asked, beside an entry that is not a user or location at all.
async fn thirdparty(request: HttpRequest, state: web::Data<Arc<AsState>>) -> HttpResponse {
    if !state.authorised(&request) {
        return forbidden();
    }
    let path = request.path().trim_start_matches("/_matrix/app/v1/thirdparty/").to_owned();
    let query: Value = serde_json::to_value(
        web::Query::<std::collections::BTreeMap<String, String>>::from_query(request.query_string())
            .map(web::Query::into_inner)
            .unwrap_or_default(),
    )
    .unwrap();
    state.seen().queries.push(format!("thirdparty/{path}?{}", request.query_string()));
    let broken = json!({"protocol": "bridge", "fields": "not an object"});
    match path.as_str() {
        "protocol/bridge" => HttpResponse::Ok().json(json!({
            "user_fields": ["nick"], "location_fields": ["channel"], "icon": "mxc://localhost/icon",
            "field_types": {},
            "instances": [{"desc": "Main network", "network_id": "main"}, {"desc": "No network id"}],
        })),
        "user/bridge" => HttpResponse::Ok().json(json!([
            {"userid": "@_bridge_nick:localhost", "protocol": "bridge", "fields": query}, broken,
        ])),
        "location/bridge" => HttpResponse::Ok().json(json!([
            {"alias": "#_bridge_chan:localhost", "protocol": "bridge", "fields": query}, broken,
        ])),
        "user" => HttpResponse::Ok().json(json!([
            {"userid": query["userid"], "protocol": "bridge", "fields": {"nick": "found"}},
        ])),
        "location" => HttpResponse::Ok().json(json!([
            {"alias": query["alias"], "protocol": "bridge", "fields": {"channel": "found"}},
        ])),
        _ => not_found(),
    }
}

/// `GET /_matrix/app/v1/users/{userId}`: users named `@_bridge_auto…` are created on demand.
async fn query_user(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Arc<AsState>>,
) -> HttpResponse {
    if !state.authorised(&request) {
        return forbidden();
    }
    let user_id = path.into_inner();
    state.seen().queries.push(format!("users/{user_id}"));
    let Some(localpart) = user_id.strip_prefix('@').and_then(|u| u.split(':').next()) else {
        return not_found();
    };
    if !localpart.starts_with("_bridge_auto") {
        return not_found();
    }
    let body = json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true});
    let (status, answer) =
        state.call_hearth(reqwest::Method::POST, "/_matrix/client/v3/register", body).await;
    if status != 200 {
        state.seen().rejected.push(format!("could not create {user_id}: {answer}"));
        return not_found();
    }
    HttpResponse::Ok().json(json!({}))
}

/// `GET /_matrix/app/v1/rooms/{alias}`: aliases `#_bridge_chan…` get a room on demand.
async fn query_alias(
    request: HttpRequest,
    path: web::Path<String>,
    state: web::Data<Arc<AsState>>,
) -> HttpResponse {
    if !state.authorised(&request) {
        return forbidden();
    }
    let alias = path.into_inner();
    state.seen().queries.push(format!("rooms/{alias}"));
    let Some(localpart) = alias.strip_prefix('#').and_then(|a| a.split(':').next()) else {
        return not_found();
    };
    if !localpart.starts_with("_bridge_chan") {
        return not_found();
    }
    let body = json!({"room_alias_name": localpart, "preset": "public_chat"});
    let (status, answer) =
        state.call_hearth(reqwest::Method::POST, "/_matrix/client/v3/createRoom", body).await;
    if status != 200 {
        state.seen().rejected.push(format!("could not create a room for {alias}: {answer}"));
        return not_found();
    }
    HttpResponse::Ok().json(json!({}))
}

async fn ping(request: HttpRequest, body: web::Bytes, state: web::Data<Arc<AsState>>) -> HttpResponse {
    if !state.authorised(&request) {
        return forbidden();
    }
    state.seen().pings.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    if state.mode.load(Ordering::SeqCst) == Mode::Fail as u8 {
        return HttpResponse::InternalServerError().body("down for maintenance");
    }
    HttpResponse::Ok().json(json!({}))
}

/// The service: its HTTP server on loopback, and what it saw.
struct FakeAppservice {
    port: u16,
    state: Arc<AsState>,
    handle: actix_web::dev::ServerHandle,
}

impl FakeAppservice {
    async fn start() -> Self {
        Self::start_with(None)
    }

    /// A service that speaks HTTPS, with a certificate from `ca`.
    async fn start_tls(ca: &TestCa) -> Self {
        Self::start_with(Some(ca.server_config()))
    }

    fn start_with(tls: Option<rustls::ServerConfig>) -> Self {
        let state = Arc::new(AsState {
            as_token: format!("as_{}", homeserver::auth::tokens::random_token(16)),
            hs_token: format!("hs_{}", homeserver::auth::tokens::random_token(16)),
            hearth: Mutex::new(None),
            mode: AtomicU8::new(Mode::Accept as u8),
            slow_ms: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
            tls,
        });
        Self::serve(TcpListener::bind("127.0.0.1:0").unwrap(), state)
    }

    fn serve(listener: TcpListener, state: Arc<AsState>) -> Self {
        let port = listener.local_addr().unwrap().port();
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/_matrix/app/v1/transactions/{txn_id}", web::put().to(transaction))
                .route("/_matrix/app/v1/users/{user_id}", web::get().to(query_user))
                .route("/_matrix/app/v1/rooms/{alias}", web::get().to(query_alias))
                .route("/_matrix/app/v1/ping", web::post().to(ping))
                .route("/_matrix/app/v1/thirdparty/{tail:.*}", web::get().to(thirdparty))
        })
        .workers(2)
        // A fresh connection per request: after `stop`, a pooled keep-alive connection could
        // otherwise still reach a worker that has not shut down yet.
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals();
        let server = match state.tls.clone() {
            Some(tls) => server.listen_rustls_0_23(listener, tls),
            None => server.listen(listener),
        }
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { port, state, handle }
    }

    /// Stops listening: connections are refused until [`FakeAppservice::restart`].
    async fn stop(self) -> (u16, Arc<AsState>) {
        self.handle.stop(false).await;
        (self.port, self.state)
    }

    /// Listens again on the same port, with what it saw so far.
    async fn restart(port: u16, state: Arc<AsState>) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => return Self::serve(listener, state),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("port {port}: {e}"),
            }
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn set_hearth(&self, server: &TestServer) {
        *self.state.hearth.lock().unwrap() = Some(server.base.clone());
    }

    /// A registration file for this service, in `dir`.
    fn registration_file(&self, dir: &std::path::Path) -> PathBuf {
        let path = dir.join(format!("bridge-{}.yaml", self.port));
        let yaml = format!(
            r##"# A bridge, as the bridges write their registration files.
id: {ID}
url: "{scheme}://127.0.0.1:{port}"
as_token: "{as_token}"
hs_token: "{hs_token}"
sender_localpart: _bridge_bot
namespaces:
  users:
    - exclusive: true
      regex: "@_bridge_.*"
  aliases:
    - exclusive: true
      regex: "#_bridge_.*"
  rooms: []
rate_limited: false
protocols: ["bridge"]
"##,
            scheme = if self.state.tls.is_some() { "https" } else { "http" },
            port = self.port,
            as_token = self.state.as_token,
            hs_token = self.state.hs_token,
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }

    fn configure(&self, config: &mut Config) {
        let file = self.registration_file(&config.data_dir);
        config.appservices.registration_files = vec![file.display().to_string()];
    }

    fn token(&self) -> &str {
        &self.state.as_token
    }

    /// Events of the transactions it accepted, in the order it accepted them.
    fn accepted_events(&self) -> Vec<Value> {
        self.state.seen().txns.iter().filter(|t| t.accepted).flat_map(|t| t.events.clone()).collect()
    }

    /// Bodies of the messages it accepted, in order.
    fn accepted_messages(&self) -> Vec<String> {
        self.accepted_events()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `done` holds of what the service saw.
    async fn wait_for(&self, what: &str, done: impl Fn(&Seen) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&self.state.seen()) {
            assert!(Instant::now() < deadline, "the application service never saw {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_messages(&self, bodies: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.accepted_messages().len() < bodies.len() {
            assert!(
                Instant::now() < deadline,
                "the application service accepted {:?}, not {bodies:?}",
                self.accepted_messages()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.accepted_messages(), bodies);
    }

    /// Checks every request passed the service's checks, no transaction was sent twice at once
    /// nor accepted twice, and no event came twice.
    fn assert_clean(&self) {
        let seen = self.state.seen();
        assert!(seen.rejected.is_empty(), "the service refused: {:?}", seen.rejected);
        assert!(seen.overlaps.is_empty(), "transactions sent twice at once: {:?}", seen.overlaps);
        let accepted: Vec<&str> =
            seen.txns.iter().filter(|t| t.accepted).map(|t| t.txn_id.as_str()).collect();
        assert_eq!(
            accepted.iter().collect::<HashSet<_>>().len(),
            accepted.len(),
            "accepted twice: {accepted:?}"
        );
        drop(seen);
        let ids: Vec<String> =
            self.accepted_events().iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "an event came twice: {ids:?}");
    }
}

/// Hearth with the service registered, and the service told where Hearth is.
async fn start(db: Db) -> (TestServer, FakeAppservice) {
    let service = FakeAppservice::start().await;
    let server = TestServer::start_with(db, |c| service.configure(c)).await;
    service.set_hearth(&server);
    (server, service)
}

/// The service registers a user of its namespace, without logging it in.
async fn register_bridged(server: &TestServer, service: &FakeAppservice, localpart: &str) -> String {
    let (status, body) = server
        .post(
            "/_matrix/client/v3/register",
            Some(service.token()),
            json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("access_token").is_none(), "inhibit_login: {body}");
    body["user_id"].as_str().unwrap().to_owned()
}

fn as_user(path: &str, user: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}user_id={}", enc(user))
}

async fn create_room(server: &TestServer, token: &str, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

async fn send(server: &TestServer, token: &str, room: &str, body: &str) {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{body}", enc(room));
    let (status, answer) =
        server.request("PUT", &path, Some(token), Some(json!({"msgtype": "m.text", "body": body}))).await;
    assert_eq!(status, 200, "{answer}");
}

/// Alice's room with the bridged `@_bridge_alice` joined: a room the service is interested in.
async fn bridged_room(server: &TestServer, service: &FakeAppservice, alice: &Session) -> String {
    let bridged = register_bridged(server, service, "_bridge_alice").await;
    let room = create_room(server, &alice.token, json!({"invite": [bridged]})).await;
    let join = as_user(&format!("/_matrix/client/v3/join/{}", enc(&room)), &bridged);
    let (status, body) = server.post(&join, Some(service.token()), json!({})).await;
    assert_eq!(status, 200, "{body}");
    room
}

crate::on_both_backends! {
    async fn the_registration_file_is_loaded_and_its_sender_acts_with_the_as_token(db: Db) {
        let (server, service) = start(db).await;
        let (status, me) = server.get("/_matrix/client/v3/account/whoami", Some(service.token())).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["user_id"], SENDER, "the sender was created at start-up");
        assert!(me.get("device_id").is_none(), "no device_id asked for: {me}");
        let (status, profile) = server.get(&format!("/_matrix/client/v3/profile/{}", enc(SENDER)), None).await;
        assert_eq!(status, 200, "{profile}");
        let (_, flows) = server.get("/_matrix/client/v3/login", None).await;
        assert!(
            flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "m.login.application_service"),
            "{flows}"
        );
        assert_error(
            &server.get("/_matrix/client/v3/account/whoami", Some("as_wrong_token")).await,
            401,
            "M_UNKNOWN_TOKEN",
        );
        service.assert_clean();
        server.stop().await;
    }

    async fn the_appservice_registers_namespaced_users_and_masquerades_only_as_them(db: Db) {
        let (server, service) = start(db).await;
        let bob = server.register("bob", PW).await;
        let bridged = register_bridged(&server, &service, "_bridge_alice").await;
        assert_eq!(bridged, "@_bridge_alice:localhost");
        let whoami = "/_matrix/client/v3/account/whoami";
        let (status, me) = server.get(&as_user(whoami, &bridged), Some(service.token())).await;
        assert_eq!((status, me["user_id"].as_str()), (200, Some(bridged.as_str())), "{me}");
        // Outside the namespace, and in it but never registered.
        assert_error(&server.get(&as_user(whoami, &bob.user_id), Some(service.token())).await, 403, "M_FORBIDDEN");
        assert_error(
            &server.get(&as_user(whoami, "@_bridge_nobody:localhost"), Some(service.token())).await,
            403,
            "M_FORBIDDEN",
        );
        assert_error(&server.get(&as_user(whoami, "not a user"), Some(service.token())).await, 400, "M_INVALID_PARAM");
        // `user_id` means nothing with a user's own token.
        let (status, me) = server.get(&as_user(whoami, &bridged), Some(&bob.token)).await;
        assert_eq!((status, me["user_id"].as_str()), (200, Some(bob.user_id.as_str())), "{me}");
        // A device it names must be the user's.
        let with_device = format!("{}&device_id=NOPE", as_user(whoami, &bridged));
        assert_error(&server.get(&with_device, Some(service.token())).await, 400, "M_UNKNOWN_DEVICE");
        assert_error(
            &server.post(&as_user("/_matrix/client/v3/keys/upload", &bridged), Some(service.token()), json!({})).await,
            400,
            "M_UNKNOWN_DEVICE",
        );
        // Registration outside its namespace, twice, and without or with a wrong token.
        let register = |username: &str| {
            json!({"type": "m.login.application_service", "username": username, "inhibit_login": true})
        };
        assert_error(
            &server.post("/_matrix/client/v3/register", Some(service.token()), register("carol")).await,
            400,
            "M_EXCLUSIVE",
        );
        assert_error(
            &server.post("/_matrix/client/v3/register", Some(service.token()), register("_bridge_alice")).await,
            400,
            "M_USER_IN_USE",
        );
        assert_error(&server.post("/_matrix/client/v3/register", None, register("_bridge_x")).await, 401, "M_MISSING_TOKEN");
        assert_error(
            &server.post("/_matrix/client/v3/register", Some(&bob.token), register("_bridge_x")).await,
            401,
            "M_UNKNOWN_TOKEN",
        );
        service.assert_clean();
        server.stop().await;
    }

    async fn ordinary_users_cannot_take_names_or_aliases_of_an_exclusive_namespace(db: Db) {
        let (server, service) = start(db).await;
        let mallory = server.register("mallory", PW).await;
        assert_error(
            &server
                .post(
                    "/_matrix/client/v3/register",
                    None,
                    json!({"username": "_bridge_mallory", "password": PW, "auth": {"type": "m.login.dummy"}}),
                )
                .await,
            400,
            "M_EXCLUSIVE",
        );
        assert_error(
            &server.get("/_matrix/client/v3/register/available?username=_bridge_mallory", None).await,
            400,
            "M_EXCLUSIVE",
        );
        assert_error(
            &server
                .post("/_matrix/client/v3/createRoom", Some(&mallory.token), json!({"room_alias_name": "_bridge_fake"}))
                .await,
            400,
            "M_EXCLUSIVE",
        );
        let room = create_room(&server, &mallory.token, json!({})).await;
        let alias = format!("/_matrix/client/v3/directory/room/{}", enc("#_bridge_fake:localhost"));
        assert_error(
            &server.request("PUT", &alias, Some(&mallory.token), Some(json!({"room_id": room}))).await,
            400,
            "M_EXCLUSIVE",
        );
        // The service itself may, for a room it is not in (as Synapse lets it); an alias outside
        // its namespaces it may not, nor one for a room that does not exist.
        let (status, body) = server.request("PUT", &alias, Some(service.token()), Some(json!({"room_id": room}))).await;
        assert_eq!(status, 200, "{body}");
        let (status, found) = server.get(&alias, Some(&mallory.token)).await;
        assert_eq!((status, found["room_id"].as_str()), (200, Some(room.as_str())), "{found}");
        let nowhere = format!("/_matrix/client/v3/directory/room/{}", enc("#_bridge_nowhere:localhost"));
        assert_error(
            &server.request("PUT", &nowhere, Some(service.token()), Some(json!({"room_id": "!missing:localhost"}))).await,
            404,
            "M_NOT_FOUND",
        );
        let other = format!("/_matrix/client/v3/directory/room/{}", enc("#elsewhere:localhost"));
        assert_error(
            &server.request("PUT", &other, Some(service.token()), Some(json!({"room_id": room}))).await,
            400,
            "M_EXCLUSIVE",
        );
        server.stop().await;
    }

    async fn events_of_interested_rooms_reach_the_appservice_in_order_exactly_once(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let room = bridged_room(&server, &service, &alice).await;
        let elsewhere = create_room(&server, &alice.token, json!({})).await;
        let bodies: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
        for (i, body) in bodies.iter().enumerate() {
            send(&server, &alice.token, &room, body).await;
            send(&server, &alice.token, &elsewhere, &format!("private{i}")).await;
        }
        // The bridged user answers, through the service.
        let path = as_user(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room)), "@_bridge_alice:localhost");
        let (status, answer) = server.request("PUT", &path, Some(service.token()), Some(json!({"msgtype": "m.text", "body": "reply"}))).await;
        assert_eq!(status, 200, "{answer}");
        let mut expected: Vec<&str> = bodies.iter().map(String::as_str).collect();
        expected.push("reply");
        service.wait_for_messages(&expected).await;
        let events = service.accepted_events();
        assert!(events.iter().all(|e| e["room_id"] == room.as_str()), "only the bridged room's events");
        assert!(
            events.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == "@_bridge_alice:localhost"),
            "the bridged user's invite and join"
        );
        let reply = events.iter().find(|e| e["content"]["body"] == "reply").unwrap();
        assert_eq!(reply["sender"], "@_bridge_alice:localhost");
        // Nothing more comes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(service.accepted_messages(), expected);
        service.assert_clean();
        server.stop().await;
    }

    async fn transactions_reach_an_appservice_behind_a_private_ca_when_hearth_trusts_that_ca(db: Db) {
        let ca = TestCa::new();
        let service = FakeAppservice::start_tls(&ca).await;
        let server = TestServer::start_with(db, |c| {
            service.configure(c);
            c.appservices.extra_ca_file = ca.ca_file();
        })
        .await;
        service.set_hearth(&server);
        let alice = server.register("alice", PW).await;
        let room = bridged_room(&server, &service, &alice).await;
        send(&server, &alice.token, &room, "over-tls").await;
        service.wait_for_messages(&["over-tls"]).await;
        service.assert_clean();
        server.stop().await;
        service.stop().await;
    }

    async fn third_party_lookups_are_answered_by_the_bridging_service(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let get = |path: String| {
            let server = &server;
            let token = alice.token.clone();
            async move { server.get(&path, Some(&token)).await }
        };
        // The protocol as the bridge describes it, with an instance id for the instance that has
        // a network, asked once and then remembered.
        let (status, protocols) = get("/_matrix/client/v3/thirdparty/protocols".into()).await;
        assert_eq!(status, 200, "{protocols}");
        let instances = protocols["bridge"]["instances"].as_array().unwrap();
        assert_eq!(instances[0], json!({"desc": "Main network", "network_id": "main", "instance_id": "bridge|main"}));
        assert_eq!(instances[1], json!({"desc": "No network id"}), "passed through as the bridge sent it");
        assert_eq!(protocols["bridge"]["user_fields"], json!(["nick"]));
        let (status, one) = get("/_matrix/client/v3/thirdparty/protocol/bridge".into()).await;
        assert_eq!((status, &one), (200, &protocols["bridge"]));
        assert_error(&get("/_matrix/client/v3/thirdparty/protocol/irc".into()).await, 404, "M_NOT_FOUND");
        let asked = |what: &str| service.state.seen().queries.iter().filter(|q| q.starts_with(what)).count();
        assert_eq!(asked("thirdparty/protocol/bridge"), 1, "the metadata is cached");

        // Lookups carry the client's fields, not its token; entries that are not users or
        // locations are dropped.
        let (status, users) = get("/_matrix/client/v3/thirdparty/user/bridge?nick=bob&access_token=x".into()).await;
        assert_eq!(status, 200, "{users}");
        assert_eq!(users, json!([{"userid": "@_bridge_nick:localhost", "protocol": "bridge", "fields": {"nick": "bob"}}]));
        let (status, locations) = get("/_matrix/client/v3/thirdparty/location/bridge?channel=rust".into()).await;
        assert_eq!(status, 200, "{locations}");
        assert_eq!(locations, json!([{"alias": "#_bridge_chan:localhost", "protocol": "bridge", "fields": {"channel": "rust"}}]));
        // A protocol no service bridges asks nobody.
        assert_eq!(get("/_matrix/client/v3/thirdparty/user/irc?nick=bob".into()).await, (200, json!([])));
        // Reverse lookups.
        let (status, users) = get(format!("/_matrix/client/v3/thirdparty/user?userid={}", enc("@_bridge_x:localhost"))).await;
        assert_eq!((status, users[0]["userid"].as_str()), (200, Some("@_bridge_x:localhost")), "{users}");
        let (status, locations) = get(format!("/_matrix/client/v3/thirdparty/location?alias={}", enc("#_bridge_y:localhost"))).await;
        assert_eq!((status, locations[0]["alias"].as_str()), (200, Some("#_bridge_y:localhost")), "{locations}");
        assert_error(&get("/_matrix/client/v3/thirdparty/user?userid=nobody".into()).await, 400, "M_INVALID_PARAM");
        assert_error(&server.get("/_matrix/client/v3/thirdparty/protocols", None).await, 401, "M_MISSING_TOKEN");
        let queries = service.state.seen().queries.clone();
        assert!(queries.iter().all(|q| !q.contains("access_token")), "{queries:?}");
        service.assert_clean();
        server.stop().await;
    }

    async fn the_appservice_lists_rooms_in_its_own_directory_apart_from_the_main_one(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create_room(&server, &alice.token, json!({"preset": "public_chat", "name": "Bridged"})).await;
        let list = format!("/_matrix/client/v3/directory/list/appservice/main/{}", enc(&room));
        let listed = |body: Value| {
            let server = &server;
            let token = alice.token.clone();
            async move {
                let (status, page) = server.post("/_matrix/client/v3/publicRooms", Some(&token), body).await;
                assert_eq!(status, 200, "{page}");
                page["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            }
        };
        let (status, body) = server.request("PUT", &list, Some(service.token()), Some(json!({"visibility": "public"}))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(listed(json!({})).await, Vec::<String>::new(), "not in the server's own directory");
        assert_eq!(listed(json!({"third_party_instance_id": "bridge|main"})).await, vec![room.clone()]);
        assert_eq!(listed(json!({"third_party_instance_id": "bridge|other"})).await, Vec::<String>::new());
        assert_eq!(listed(json!({"include_all_networks": true})).await, vec![room.clone()]);
        // Listed in the main directory too, it shows once in the whole list.
        let main = format!("/_matrix/client/v3/directory/list/room/{}", enc(&room));
        assert_eq!(server.request("PUT", &main, Some(&alice.token), Some(json!({"visibility": "public"}))).await.0, 200);
        assert_eq!(listed(json!({"include_all_networks": true})).await, vec![room.clone()]);
        // Taken out with DELETE, or with PUT `private`.
        assert_eq!(server.request("DELETE", &list, Some(service.token()), None).await.0, 200);
        assert_eq!(listed(json!({"third_party_instance_id": "bridge|main"})).await, Vec::<String>::new());
        assert_eq!(server.request("PUT", &list, Some(service.token()), Some(json!({"visibility": "public"}))).await.0, 200);
        assert_eq!(server.request("PUT", &list, Some(service.token()), Some(json!({"visibility": "private"}))).await.0, 200);
        assert_eq!(listed(json!({"third_party_instance_id": "bridge|main"})).await, Vec::<String>::new());
        // Only services edit their directories; bad input is refused.
        let public = Some(json!({"visibility": "public"}));
        assert_error(&server.request("PUT", &list, Some(&alice.token), public.clone()).await, 403, "M_FORBIDDEN");
        assert_error(&server.request("DELETE", &list, Some(&alice.token), None).await, 403, "M_FORBIDDEN");
        assert_error(&server.request("PUT", &list, None, public.clone()).await, 401, "M_MISSING_TOKEN");
        let nowhere = format!("/_matrix/client/v3/directory/list/appservice/main/{}", enc("!nowhere:localhost"));
        assert_error(&server.request("PUT", &nowhere, Some(service.token()), public.clone()).await, 404, "M_NOT_FOUND");
        let piped = format!("/_matrix/client/v3/directory/list/appservice/a%7Cb/{}", enc(&room));
        assert_error(&server.request("PUT", &piped, Some(service.token()), public).await, 400, "M_INVALID_PARAM");
        let (status, page) = server.post("/_matrix/client/v3/publicRooms", Some(&alice.token), json!({"third_party_instance_id": "nopipe"})).await;
        assert_error(&(status, page), 400, "M_INVALID_PARAM");
        server.stop().await;
    }

    async fn the_appservice_deactivates_its_users_without_being_asked_for_a_password(db: Db) {
        let (server, service) = start(db).await;
        let bridged = register_bridged(&server, &service, "_bridge_gone").await;
        let deactivate = as_user("/_matrix/client/v3/account/deactivate", &bridged);
        let (status, body) = server.post(&deactivate, Some(service.token()), json!({})).await;
        assert_eq!(status, 200, "{body}");
        let login = json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": bridged}});
        let (status, body) = server.post("/_matrix/client/v3/login", Some(service.token()), login).await;
        assert_eq!((status, body["errcode"].as_str()), (403, Some("M_USER_DEACTIVATED")), "{body}");
        // People are still asked.
        let alice = server.register("alice", PW).await;
        let (status, body) = server.post("/_matrix/client/v3/account/deactivate", Some(&alice.token), json!({})).await;
        assert_eq!(status, 401, "{body}");
        assert!(body["flows"].is_array(), "{body}");
        server.stop().await;
    }

    async fn queued_transactions_survive_an_appservice_outage_and_a_server_restart(db: Db) {
        let test_db = TestDb::new(db).await;
        let service = FakeAppservice::start().await;
        let server = TestServer::start_on(&test_db, |c| service.configure(c)).await;
        service.set_hearth(&server);
        let alice = server.register("alice", PW).await;
        let room = bridged_room(&server, &service, &alice).await;
        service.wait_for("the bridged user's join", |seen| seen.txns.iter().any(|t| t.accepted && t.events.iter().any(|e| e["content"]["membership"] == "join"))).await;

        // The service fails: the transaction is retried under the same id.
        service.set_mode(Mode::Fail);
        for body in ["m0", "m1", "m2"] {
            send(&server, &alice.token, &room, body).await;
        }
        service.wait_for("a retry", |seen| seen.txns.iter().filter(|t| !t.accepted).count() >= 2).await;
        let failed: Vec<String> = service.state.seen().txns.iter().filter(|t| !t.accepted).map(|t| t.txn_id.clone()).collect();
        assert!(failed.iter().all(|id| *id == failed[0]), "retries keep the transaction id: {failed:?}");
        let first_attempt = service.state.seen().txns.iter().find(|t| !t.accepted).unwrap().events.clone();

        // The service goes away, Hearth restarts, more is said meanwhile.
        let (port, state) = service.stop().await;
        send(&server, &alice.token, &room, "m3").await;
        server.stop().await;
        let file = test_db.dir.join(format!("bridge-{port}.yaml")).display().to_string();
        let server = TestServer::start_on(&test_db, |c| c.appservices.registration_files = vec![file]).await;
        send(&server, &alice.token, &room, "m4").await;
        let service = FakeAppservice::restart(port, state).await;
        service.set_mode(Mode::Accept);
        service.set_hearth(&server);
        service.wait_for_messages(&["m0", "m1", "m2", "m3", "m4"]).await;
        let resent = service.state.seen().txns.iter().find(|t| t.accepted && t.txn_id == failed[0]).cloned();
        let resent = resent.unwrap_or_else(|| panic!("transaction {} was never accepted", failed[0]));
        let ids = |events: &[Value]| events.iter().map(|e| e["event_id"].clone()).collect::<Vec<_>>();
        assert_eq!(ids(&resent.events), ids(&first_attempt), "a retry sends the same events");
        service.assert_clean();
        server.stop().await;
        service.stop().await;
        test_db.remove().await;
    }

    async fn two_workers_never_send_a_transaction_twice(db: Db) {
        let (server, service) = start(db).await;
        let other = server.another_worker().await;
        service.state.slow_ms.store(100, Ordering::SeqCst);
        let alice = server.register("alice", PW).await;
        let room = bridged_room(&server, &service, &alice).await;
        let bodies: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        for (i, body) in bodies.iter().enumerate() {
            // Writes land on both workers, as behind a load balancer.
            let worker = if i % 2 == 0 { &server } else { &other };
            send(worker, &alice.token, &room, body).await;
        }
        let expected: Vec<&str> = bodies.iter().map(String::as_str).collect();
        service.wait_for_messages(&expected).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(service.accepted_messages(), expected);
        service.assert_clean();
        other.stop().await;
        server.stop().await;
    }

    async fn an_alias_query_lets_the_appservice_create_the_alias_on_demand(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let alias = "#_bridge_chan_rust:localhost";
        let (status, found) = server.get(&format!("/_matrix/client/v3/directory/room/{}", enc(alias)), Some(&alice.token)).await;
        assert_eq!(status, 200, "{found}");
        assert!(found["room_id"].as_str().is_some_and(|r| r.starts_with('!')), "{found}");
        assert_eq!(service.state.seen().queries, vec![format!("rooms/{alias}")]);
        // Alice joins by the alias; the second lookup needs no query.
        let (status, joined) = server.post(&format!("/_matrix/client/v3/join/{}", enc(alias)), Some(&alice.token), json!({})).await;
        assert_eq!((status, &joined["room_id"]), (200, &found["room_id"]), "{joined}");
        assert_eq!(service.state.seen().queries.len(), 1);
        // An alias the service does not want, and one outside its namespace (never asked).
        assert_error(&server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#_bridge_nope:localhost")), None).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#other:localhost")), None).await, 404, "M_NOT_FOUND");
        assert_eq!(service.state.seen().queries, vec![format!("rooms/{alias}"), "rooms/#_bridge_nope:localhost".to_owned()]);
        // The alias is the service's to remove, whichever of its users asks; not alice's.
        let path = format!("/_matrix/client/v3/directory/room/{}", enc(alias));
        assert_error(&server.request("DELETE", &path, Some(&alice.token), None).await, 403, "M_FORBIDDEN");
        let bridged = register_bridged(&server, &service, "_bridge_alice").await;
        let (status, body) = server.request("DELETE", &as_user(&path, &bridged), Some(service.token()), None).await;
        assert_eq!(status, 200, "{body}");
        service.assert_clean();
        server.stop().await;
    }

    async fn a_user_query_lets_the_appservice_create_the_user_on_demand(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let wanted = "@_bridge_auto_ann:localhost";
        let (status, profile) = server.get(&format!("/_matrix/client/v3/profile/{}", enc(wanted)), Some(&alice.token)).await;
        assert_eq!(status, 200, "{profile}");
        assert_error(&server.get(&format!("/_matrix/client/v3/profile/{}", enc("@_bridge_ghost:localhost")), None).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&format!("/_matrix/client/v3/profile/{}", enc("@ghost:localhost")), None).await, 404, "M_NOT_FOUND");
        // Inviting a user of the namespace asks too.
        let room = create_room(&server, &alice.token, json!({})).await;
        let invitee = "@_bridge_auto_ben:localhost";
        let (status, body) = server.post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)), Some(&alice.token), json!({"user_id": invitee})).await;
        assert_eq!(status, 200, "{body}");
        let (status, me) = server.get(&as_user("/_matrix/client/v3/account/whoami", invitee), Some(service.token())).await;
        assert_eq!((status, me["user_id"].as_str()), (200, Some(invitee)), "the invitee exists now: {me}");
        assert_eq!(
            service.state.seen().queries,
            vec![format!("users/{wanted}"), "users/@_bridge_ghost:localhost".to_owned(), format!("users/{invitee}")]
        );
        service.assert_clean();
        server.stop().await;
    }

    async fn appservice_login_gives_tokens_for_users_of_its_namespace_only(db: Db) {
        let (server, service) = start(db).await;
        let bob = server.register("bob", PW).await;
        let bridged = register_bridged(&server, &service, "_bridge_alice").await;
        let login = |user: &str| {
            json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": user}})
        };
        let (status, session) = server.post("/_matrix/client/v3/login", Some(service.token()), login("_bridge_alice")).await;
        assert_eq!(status, 200, "{session}");
        assert_eq!(session["user_id"], bridged.as_str());
        let token = session["access_token"].as_str().unwrap();
        let (status, me) = server.get("/_matrix/client/v3/account/whoami", Some(token)).await;
        assert_eq!((status, &me["device_id"]), (200, &session["device_id"]), "{me}");
        // That device can now be named when masquerading.
        let device = session["device_id"].as_str().unwrap();
        let with_device = format!("{}&device_id={device}", as_user("/_matrix/client/v3/account/whoami", &bridged));
        let (status, me) = server.get(&with_device, Some(service.token())).await;
        assert_eq!((status, me["device_id"].as_str()), (200, Some(device)), "{me}");
        // It deletes the device without UIA (its users have no password), which ends the session.
        let path = as_user(&format!("/_matrix/client/v3/devices/{device}"), &bridged);
        let (status, body) = server.request("DELETE", &path, Some(service.token()), Some(json!({}))).await;
        assert_eq!(status, 200, "{body}");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(token)).await, 401, "M_UNKNOWN_TOKEN");
        // A user deleting a device still goes through UIA.
        let (_, bob_session) = server.login("bob", PW, json!({})).await;
        let path = format!("/_matrix/client/v3/devices/{}", bob_session["device_id"].as_str().unwrap());
        let (status, challenge) = server.request("DELETE", &path, Some(&bob.token), Some(json!({}))).await;
        assert_eq!(status, 401, "{challenge}");
        assert!(challenge["flows"].is_array(), "{challenge}");
        assert_error(&server.post("/_matrix/client/v3/login", Some(service.token()), login(&bob.user_id)).await, 400, "M_EXCLUSIVE");
        assert_error(&server.post("/_matrix/client/v3/login", None, login("_bridge_alice")).await, 401, "M_MISSING_TOKEN");
        assert_error(&server.post("/_matrix/client/v3/login", Some("as_wrong"), login("_bridge_alice")).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.post("/_matrix/client/v3/login", Some(service.token()), login("_bridge_unregistered")).await, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn ping_reaches_the_appservice_and_reports_its_failures(db: Db) {
        let (server, service) = start(db).await;
        let alice = server.register("alice", PW).await;
        let ping = format!("/_matrix/client/v1/appservice/{ID}/ping");
        let (status, answer) = server.post(&ping, Some(service.token()), json!({"transaction_id": "meow"})).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["duration_ms"].is_u64(), "{answer}");
        assert_eq!(service.state.seen().pings, vec![json!({"transaction_id": "meow"})]);
        assert_error(&server.post("/_matrix/client/v1/appservice/other/ping", Some(service.token()), json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.post(&ping, Some(&alice.token), json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.post(&ping, None, json!({})).await, 401, "M_MISSING_TOKEN");
        service.set_mode(Mode::Fail);
        let failed = server.post(&ping, Some(service.token()), json!({})).await;
        assert_error(&failed, 502, "M_BAD_STATUS");
        assert_eq!((&failed.1["status"], &failed.1["body"]), (&json!(500), &json!("down for maintenance")));
        service.assert_clean();
        let token = service.token().to_owned();
        service.stop().await;
        assert_error(&server.post(&ping, Some(&token), json!({})).await, 502, "M_CONNECTION_FAILED");
        server.stop().await;
    }

    async fn the_appservice_and_its_users_pass_event_rate_limits_that_hold_people(db: Db) {
        let service = FakeAppservice::start().await;
        let server = TestServer::start_with(db, |c| {
            service.configure(c);
            c.rate_limits.enabled = true;
            c.rate_limits.events_per_second = 0.001;
            c.rate_limits.events_burst = 2;
        })
        .await;
        service.set_hearth(&server);
        let alice = server.register("alice", PW).await;
        let room = bridged_room(&server, &service, &alice).await;
        let (status, body) = server.post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)), Some(&alice.token), json!({"user_id": SENDER})).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = server.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(service.token()), json!({})).await;
        assert_eq!(status, 200, "{body}");
        let bridged = as_user("", "@_bridge_alice:localhost");
        for i in 0..5 {
            // `rate_limited: false`: the users it acts for are not limited, nor is its own.
            let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/b{i}{bridged}", enc(&room));
            let (status, answer) = server.request("PUT", &path, Some(service.token()), Some(json!({"msgtype": "m.text", "body": "b"}))).await;
            assert_eq!(status, 200, "bridged message {i}: {answer}");
            let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s{i}", enc(&room));
            let (status, answer) = server.request("PUT", &path, Some(service.token()), Some(json!({"msgtype": "m.text", "body": "s"}))).await;
            assert_eq!(status, 200, "the service's own message {i}: {answer}");
        }
        send(&server, &alice.token, &room, "a0").await;
        send(&server, &alice.token, &room, "a1").await;
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/a2", enc(&room));
        assert_error(
            &server.request("PUT", &path, Some(&alice.token), Some(json!({"msgtype": "m.text", "body": "a2"}))).await,
            429,
            "M_LIMIT_EXCEEDED",
        );
        server.stop().await;
    }

    async fn bad_registration_files_stop_the_server_naming_the_file_and_the_problem(db: Db) {
        let test_db = TestDb::new(db).await;
        let service = FakeAppservice::start().await;
        let good = service.registration_file(&test_db.dir);
        let text = std::fs::read_to_string(&good).unwrap();
        // Another service: its own sender and tokens, the same id.
        let other = text
            .replace("_bridge_bot", "_other_bot")
            .replace(service.token(), "as_other_token")
            .replace(&service.state.hs_token, "hs_other_token");
        let cases = [
            ("duplicate.yaml", other.clone(), "another registration already has the id `bridge`"),
            (
                "regex.yaml",
                other.replace("id: bridge", "id: second").replace("\"@_bridge_.*\"", "\"@_bridge_(\""),
                "namespaces.users regex `@_bridge_(` is invalid",
            ),
            (
                "token.yaml",
                other.replace("id: bridge", "id: second").replace("as_other_token", service.token()),
                "another registration already has this as_token",
            ),
            ("broken.yaml", "id: [unclosed".to_owned(), "not a valid registration"),
        ];
        for (name, yaml, problem) in cases {
            let path = test_db.dir.join(name);
            std::fs::write(&path, yaml).unwrap();
            let mut config = crate::common::test_config(&test_db);
            config.appservices.registration_files = vec![good.display().to_string(), path.display().to_string()];
            if name == "broken.yaml" {
                config.appservices.registration_files.remove(0);
            }
            let error = match homeserver::server::start(config).await {
                Ok(_) => panic!("{name}: the server started"),
                Err(error) => format!("{error:#}"),
            };
            assert!(error.contains(&path.display().to_string()) && error.contains(problem), "{name}: {error}");
            assert!(!error.contains(service.token()), "no token in the message: {error}");
        }
        let mut config = crate::common::test_config(&test_db);
        config.appservices.registration_files = vec![test_db.dir.join("missing.yaml").display().to_string()];
        let error = homeserver::server::start(config).await.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(error.contains("missing.yaml"), "{error}");
        service.stop().await;
        test_db.remove().await;
    }
}
