//! The malformed-input sweep. Every endpoint the server routes (`api::client::endpoints`, so a
//! new one is swept without being added here) gets bad path variables, bad bodies and bad query
//! strings, with an access token and without; then the main endpoints' valid bodies get each
//! leaf replaced in turn by each bad value. No answer may be a 5xx (nor a dropped connection),
//! every error must be a Matrix error (`errcode` and `error`), and what was stored before the
//! sweep must be served the same after it. Failures are collected and reported together.
//!
//! `TEST_SWEEP=full` runs the long sweep: every bad body with every bad path variable, each query
//! parameter on its own, and bad access tokens.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::{StreamExt, stream};
use homeserver::api::client::{Endpoint, endpoints};
use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, parse_json},
    e2ee::DeviceKey,
    rooms::{create, room_path, send},
};

const PW: &str = "correct horse battery";

/// Whether `TEST_SWEEP=full` asks for the long sweep.
fn full_sweep() -> bool {
    std::env::var("TEST_SWEEP").is_ok_and(|value| value == "full")
}

/// Endpoints whose errors are pages for a browser, not Matrix errors: the link in the email.
const HTML_PAGES: &[(&str, &str)] = &[("GET", "/_hearth/client/v1/threepid/submit_token")];

/// A bad value, as the raw JSON text that replaces a body or a field.
struct Bad {
    name: String,
    json: Vec<u8>,
}

fn bad(name: &str, json: impl Into<Vec<u8>>) -> Bad {
    Bad { name: name.to_owned(), json: json.into() }
}

fn nested(depth: usize) -> String {
    format!("{}\"x\"{}", "[".repeat(depth), "]".repeat(depth))
}

/// Bad values for a field: NUL, bad UTF-8 and escapes, sizes, depth, wrong types, absurd numbers.
fn bad_values() -> Vec<Bad> {
    let huge = if full_sweep() { 500_000 } else { 70_000 };
    vec![
        bad("NUL string", r#""\u0000""#),
        bad("NUL inside a string", r#""a\u0000b""#),
        bad("invalid UTF-8", b"\"\xff\xfe\"".to_vec()),
        bad("overlong UTF-8", b"\"\xc0\xaf\"".to_vec()),
        bad("lone surrogate", r#""\ud800""#),
        bad("empty string", r#""""#),
        bad("300-byte string", format!("\"{}\"", "a".repeat(300))),
        bad("huge string", format!("\"{}\"", "a".repeat(huge))),
        bad("200 deep", nested(200)),
        bad("array", "[]"),
        bad("object", "{}"),
        bad("object with a NUL key", r#"{"\u0000": 1}"#),
        bad("string", r#""string""#),
        bad("null", "null"),
        bad("true", "true"),
        bad("zero", "0"),
        bad("-1", "-1"),
        bad("1.5", "1.5"),
        bad("1e400", "1e400"),
        bad("-1e400", "-1e400"),
        bad("2^53", "9007199254740992"),
        bad("2^63", "9223372036854775808"),
        bad("-2^63-1", "-9223372036854775809"),
        bad("2^64", "18446744073709551616"),
    ]
}

/// Whole bodies: every bad value at the top level, and bodies broken as a whole.
fn bad_bodies() -> Vec<Bad> {
    let mut bodies = bad_values();
    bodies.extend([
        bad("2 MB body", format!("{{\"a\":\"{}\"}}", "a".repeat(2 * 1024 * 1024))),
        bad("not JSON", "{not json"),
        bad("bytes that are not UTF-8", b"\xff\xfe\xfd".to_vec()),
        bad("two values", "{}{}"),
        bad("64 deep object", format!("{}1{}", "{\"a\":".repeat(64), "}".repeat(64))),
        bad("65 deep object", format!("{}1{}", "{\"a\":".repeat(65), "}".repeat(65))),
        bad("200 deep object", format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200))),
        bad("10,000 deep", nested(10_000)),
    ]);
    bodies
}

/// Bodies sent only with valid path variables, even in the long sweep: they cost the most and
/// are refused before the path is read.
const BIG_BODIES: &[&str] = &["2 MB body", "10,000 deep", "huge string"];

/// Bad path variables, already percent-encoded.
fn bad_path_values() -> Vec<(&'static str, String)> {
    vec![
        ("%00", "%00".to_owned()),
        ("NUL inside", "a%00b".to_owned()),
        ("%FF", "%FF".to_owned()),
        ("overlong UTF-8", "%C0%AF".to_owned()),
        ("300 bytes", "a".repeat(300)),
        ("empty", String::new()),
        ("encoded slash", "a%2Fb".to_owned()),
    ]
}

/// Bad query values, already percent-encoded.
fn bad_query_values() -> Vec<&'static str> {
    vec![
        "%00",
        "%FF",
        "%C0%AF",
        "",
        "-1",
        "1e400",
        "9223372036854775808",
        "18446744073709551616",
        "%7B",
        "%5B%5D",
        "true",
        "x",
    ]
}

/// Query parameters that endpoints read.
const QUERY_PARAMS: &[&str] = &[
    "from",
    "to",
    "dir",
    "limit",
    "since",
    "timeout",
    "filter",
    "full_state",
    "set_presence",
    "server",
    "via",
    "server_name",
    "at",
    "membership",
    "not_membership",
    "kind",
    "version",
    "user_id",
    "ts",
    "username",
    "token",
    "sid",
    "client_secret",
    "include_all_networks",
    "third_party_instance_id",
    "access_token",
];

/// What the sweep needs: who, where, and which values are valid.
struct Fixture {
    server: TestServer,
    alice: Session,
    carol: Session,
    /// Bob sweeps. A probe may log him out; then he logs in again (see [`Sweep::relogin`]).
    bob: Mutex<Session>,
    /// Alice's room, with her messages; Bob is a member.
    room: String,
    /// Bob's own room, where he may change state.
    bob_room: String,
    /// A room Bob may change the power levels of.
    pl_room: String,
    /// Alice's messages.
    events: Vec<String>,
    bob_event: String,
    bob_device: String,
    filter_id: String,
    backup_version: String,
    alias: String,
}

impl Fixture {
    fn bob(&self) -> Session {
        self.bob.lock().unwrap().clone()
    }

    /// A valid value, percent-encoded, for a path variable.
    fn valid(&self, name: &str) -> Option<String> {
        let value = match name {
            "room_id" | "room_id_or_alias" => self.room.clone(),
            "room_alias" => self.alias.clone(),
            "event_id" => self.events[0].clone(),
            "event_type" => "org.example.sweep".to_owned(),
            "state_key" => String::new(),
            "txn_id" => "sweep-txn".to_owned(),
            "user_id" => self.bob().user_id,
            "device_id" => self.bob_device.clone(),
            "kind" => "override".to_owned(),
            "rule_id" => "org.example.sweep".to_owned(),
            "receipt_type" => "m.read".to_owned(),
            "filter_id" => self.filter_id.clone(),
            "session_id" => "sweep-session".to_owned(),
            "version" => self.backup_version.clone(),
            "tag" => "u.sweep".to_owned(),
            "appservice_id" => "sweep-bridge".to_owned(),
            "network_id" => "sweep-network".to_owned(),
            "protocol" => "sweep-protocol".to_owned(),
            _ => return None,
        };
        Some(percent_encode(value.as_bytes(), NON_ALPHANUMERIC).to_string())
    }
}

async fn ok(server: &TestServer, method: &str, path: &str, who: &Session, body: Value) -> Value {
    let (status, response) = server.request(method, path, Some(&who.token), Some(body)).await;
    assert_eq!(status, 200, "{method} {path}: {response}");
    response
}

async fn setup(db: Db) -> Fixture {
    let server = TestServer::start(db).await;
    let alice = server.register("alice", PW).await;
    let bob = server.register("bob", PW).await;
    let carol = server.register("carol", PW).await;

    let room = create(
        &server,
        &alice,
        json!({"preset": "public_chat", "name": "Stored", "topic": "kept", "room_alias_name": "stored"}),
    )
    .await;
    ok(&server, "POST", &room_path(&room, "join"), &bob, json!({})).await;
    let mut events = Vec::new();
    for n in 0..3 {
        let (status, sent) =
            send(&server, &alice, &room, &format!("stored{n}"), &format!("stored {n}")).await;
        assert_eq!(status, 200, "{sent}");
        events.push(sent["event_id"].as_str().unwrap().to_owned());
    }
    let alice_data = format!("/_matrix/client/v3/user/{}/account_data/org.example.stored", alice.user_id);
    ok(&server, "PUT", &alice_data, &alice, json!({"kept": [1, "two", {"three": 3.5}]})).await;
    let alice_room_data =
        format!("/_matrix/client/v3/user/{}/rooms/{room}/account_data/org.example.stored", alice.user_id);
    ok(&server, "PUT", &alice_room_data, &alice, json!({"room": "kept"})).await;
    let profile = format!("/_matrix/client/v3/profile/{}", alice.user_id);
    ok(&server, "PUT", &format!("{profile}/displayname"), &alice, json!({"displayname": "Alice Stored"}))
        .await;
    ok(
        &server,
        "PUT",
        &format!("{profile}/avatar_url"),
        &alice,
        json!({"avatar_url": "mxc://localhost/stored"}),
    )
    .await;
    let key = DeviceKey::new(&alice.device_id);
    let keys =
        json!({"device_keys": key.device_keys(&alice), "one_time_keys": key.one_time_keys(&alice, 0, 50)});
    ok(&server, "POST", "/_matrix/client/v3/keys/upload", &alice, keys).await;

    let bob_room = create(&server, &bob, json!({"preset": "private_chat", "invite": [carol.user_id]})).await;
    let pl_room = create(&server, &bob, json!({"preset": "private_chat"})).await;
    let (status, sent) = send(&server, &bob, &bob_room, "bob0", "bob's own").await;
    assert_eq!(status, 200, "{sent}");
    let bob_event = sent["event_id"].as_str().unwrap().to_owned();
    let filter = ok(
        &server,
        "POST",
        &format!("/_matrix/client/v3/user/{}/filter", bob.user_id),
        &bob,
        json!({"room": {"timeline": {"limit": 5}}}),
    )
    .await;
    let backup = ok(
        &server,
        "POST",
        "/_matrix/client/v3/room_keys/version",
        &bob,
        json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc"}}),
    )
    .await;
    let alias = "#bobs:localhost".to_owned();
    let alias_path =
        format!("/_matrix/client/v3/directory/room/{}", percent_encode(alias.as_bytes(), NON_ALPHANUMERIC));
    ok(&server, "PUT", &alias_path, &bob, json!({"room_id": bob_room})).await;

    Fixture {
        filter_id: filter["filter_id"].as_str().unwrap().to_owned(),
        backup_version: backup["version"].as_str().unwrap().to_owned(),
        bob_device: bob.device_id.clone(),
        bob: Mutex::new(bob),
        server,
        alice,
        carol,
        room,
        bob_room,
        pl_room,
        events,
        bob_event,
        alias,
    }
}

/// Removes what changes by itself between two reads (`unsigned.age`).
fn without_age(mut value: Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("age");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut value);
    value
}

/// What Alice stored, as the server serves it to her.
async fn stored_data(fixture: &Fixture) -> Vec<(String, u16, Value)> {
    let (server, alice, room) = (&fixture.server, &fixture.alice, &fixture.room);
    let mut reads = vec![
        ("GET", "/_matrix/client/v3/account/whoami".to_owned(), None),
        ("GET", format!("/_matrix/client/v3/user/{}/account_data/org.example.stored", alice.user_id), None),
        (
            "GET",
            format!("/_matrix/client/v3/user/{}/rooms/{room}/account_data/org.example.stored", alice.user_id),
            None,
        ),
        ("GET", format!("/_matrix/client/v3/profile/{}", alice.user_id), None),
        ("GET", room_path(room, "state/m.room.name/"), None),
        ("GET", room_path(room, "state/m.room.topic/"), None),
        (
            "POST",
            "/_matrix/client/v3/keys/query".to_owned(),
            Some(json!({"device_keys": {&alice.user_id: []}})),
        ),
    ];
    for event in &fixture.events {
        reads.push((
            "GET",
            room_path(room, &format!("event/{}", percent_encode(event.as_bytes(), NON_ALPHANUMERIC))),
            None,
        ));
    }
    let mut data = Vec::new();
    for (method, path, body) in reads {
        let (status, value) = server.request(method, &path, Some(&alice.token), body).await;
        data.push((format!("{method} {path}"), status, without_age(value)));
    }
    // Alice's events, in order, among whatever the sweep added (thousands, in the long sweep).
    let (mut mine, mut from, mut status) = (Vec::new(), String::new(), 0);
    loop {
        let path = room_path(room, &format!("messages?dir=b&limit=1000{from}"));
        let (answer, page) = server.get(&path, Some(&alice.token)).await;
        status = status.max(answer);
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        mine.extend(
            chunk
                .iter()
                .filter(|event| event["sender"] == alice.user_id.as_str())
                .map(|e| without_age(e.clone())),
        );
        match page["end"].as_str() {
            Some(end) if answer == 200 && !chunk.is_empty() => from = format!("&from={end}"),
            _ => break,
        }
    }
    data.push(("GET /messages, Alice's events".to_owned(), status, Value::Array(mine)));
    data
}

/// One request of the sweep.
struct Probe {
    method: String,
    /// Path and query, percent-encoded.
    target: String,
    /// The endpoint's template, for the report and the exemptions.
    template: String,
    authed: bool,
    /// A token other than Bob's (a bad one), when `authed`.
    token: Option<String>,
    body: Option<Vec<u8>>,
    what: String,
    /// Whether the path is one the server routes (every path variable valid).
    routed: bool,
}

struct Sweep<'a> {
    fixture: &'a Fixture,
    http: reqwest::Client,
    failures: Mutex<Vec<String>>,
    probes: AtomicUsize,
    /// How many answers had each status, printed with the result.
    statuses: Mutex<std::collections::BTreeMap<u16, usize>>,
    relogin: tokio::sync::Mutex<()>,
    relogins: AtomicUsize,
}

impl Sweep<'_> {
    /// Sends a probe and records what is wrong with the answer.
    async fn run(&self, probe: Probe) {
        let done = self.probes.fetch_add(1, Ordering::Relaxed);
        if done.is_multiple_of(20_000) {
            println!("sweep: {done} probes sent");
        }
        let started = std::time::Instant::now();
        let mut result = self.send(&probe).await;
        if probe.authed
            && probe.token.is_none()
            && let Ok((401, _, body)) = &result
            && body.contains("M_UNKNOWN_TOKEN")
        {
            // An earlier probe logged Bob out (`/logout` takes any body): log in again, retry.
            self.relogin().await;
            result = self.send(&probe).await;
        }
        // Printed, never asserted: what made a run slow.
        if started.elapsed() > Duration::from_secs(2) {
            println!("sweep: slow probe: {} {} [{}]", probe.method, probe.template, probe.what);
        }
        let verdict = match result {
            Err(error) => Err(format!("no answer: {error}")),
            Ok((status, content_type, body)) => {
                *self.statuses.lock().unwrap().entry(status).or_default() += 1;
                judge(&probe, status, &content_type, &body)
            }
        };
        if let Err(problem) = verdict {
            let who = match (probe.authed, &probe.token) {
                (false, _) => "no token",
                (true, None) => "as bob",
                (true, Some(_)) => "bad token",
            };
            let mut target = probe.target.clone();
            if target.len() > 200 {
                target = format!("{}…", target.chars().take(200).collect::<String>());
            }
            let line =
                format!("{} {target} [{}; {who}; {}]: {problem}", probe.method, probe.template, probe.what);
            self.failures.lock().unwrap().push(line);
        }
    }

    async fn send(&self, probe: &Probe) -> Result<(u16, String, String), reqwest::Error> {
        let method = reqwest::Method::from_bytes(probe.method.as_bytes()).unwrap();
        let url = format!("{}{}", self.fixture.server.base, probe.target);
        let mut request = self.http.request(method, url).header("Content-Type", "application/json");
        if probe.authed {
            let token = probe.token.clone().unwrap_or_else(|| self.fixture.bob().token);
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        if let Some(body) = &probe.body {
            request = request.body(body.clone());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.text().await?;
        Ok((status, content_type, body))
    }

    /// Logs Bob in again, on his device, once for every probe that found his token revoked. Through
    /// the server's own login, not `/login`: hashing his password for each of the hundreds of
    /// logouts of the long sweep would take minutes.
    async fn relogin(&self) {
        let stale = self.fixture.bob();
        let _one_at_a_time = self.relogin.lock().await;
        if self.fixture.bob().token != stale.token {
            return;
        }
        let user = ruma::UserId::parse(&stale.user_id).unwrap();
        let device = Some(stale.device_id.as_str().into());
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let state = &self.fixture.server.server.state;
        let (_, tokens) =
            homeserver::auth::log_in(state, &user, device, None, ip, false, false).await.unwrap();
        self.fixture.bob.lock().unwrap().token = tokens.access_token;
        self.relogins.fetch_add(1, Ordering::Relaxed);
    }
}

/// Never a 5xx; every error a Matrix error, or the UIA challenge, or for the emailed link a page.
fn judge(probe: &Probe, status: u16, content_type: &str, body: &str) -> Result<(), String> {
    let excerpt = || body.chars().take(300).collect::<String>();
    if status >= 500 {
        return Err(format!("status {status}: {}", excerpt()));
    }
    if (200..300).contains(&status) {
        return Ok(());
    }
    if HTML_PAGES.contains(&(probe.method.as_str(), probe.template.as_str()))
        && content_type.starts_with("text/html")
    {
        return Ok(());
    }
    let Ok(json) = parse_json(body) else {
        return Err(format!("status {status} without a JSON body: {}", excerpt()));
    };
    // The spec's UIA challenge (401 with the flows) has `errcode` only when a stage failed.
    if status == 401 && json["flows"].is_array() && json["session"].is_string() {
        return Ok(());
    }
    if !json["errcode"].is_string() || !json["error"].is_string() {
        return Err(format!("status {status} without errcode and error: {}", excerpt()));
    }
    if probe.routed && matches!(status, 404 | 405) && json["errcode"] == "M_UNRECOGNIZED" {
        return Err(format!("listed by api::client::endpoints but not routed: {}", excerpt()));
    }
    Ok(())
}

/// The endpoint's path with each variable filled by `fill(name)`.
fn fill_path(template: &str, mut fill: impl FnMut(&str) -> String) -> String {
    template
        .split('/')
        .map(|segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => fill(name),
            None => segment.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn variables(template: &str) -> Vec<&str> {
    template.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect()
}

/// The body an endpoint gets when another part of the request is the bad one.
fn plain_body(endpoint: &Endpoint) -> Option<Vec<u8>> {
    (endpoint.method != reqwest::Method::GET).then(|| b"{}".to_vec())
}

/// Every probe of one endpoint.
fn endpoint_probes(fixture: &Fixture, endpoint: &Endpoint, full: bool) -> Vec<Probe> {
    let template = endpoint.path;
    let valid = |name: &str| {
        fixture.valid(name).unwrap_or_else(|| {
            panic!("the sweep has no valid value for the path variable `{name}` of {template}: add one to Fixture::valid")
        })
    };
    let valid_path = fill_path(template, &valid);
    let mut paths = vec![("valid path".to_owned(), valid_path.clone())];
    for variable in variables(template) {
        for (name, value) in bad_path_values() {
            let path = fill_path(template, |n| if n == variable { value.clone() } else { valid(n) });
            paths.push((format!("{{{variable}}} = {name}"), path));
        }
    }
    let mut tokens = vec![(true, None), (false, None)];
    if full {
        tokens.extend(
            ["%FF", "not-a-token", &"a".repeat(300), "a.b.c"].map(|token| (true, Some(token.to_owned()))),
        );
    }
    let method = endpoint.method.as_str().to_owned();
    let mut probes = Vec::new();
    let mut add =
        |target: String, authed: bool, token: &Option<String>, body: Option<Vec<u8>>, what: String| {
            probes.push(Probe {
                method: method.clone(),
                target,
                template: template.to_owned(),
                authed,
                token: token.clone(),
                body,
                routed: !what.starts_with('{'),
                what,
            });
        };
    let bodies = bad_bodies();
    for (authed, token) in &tokens {
        for (path_what, path) in &paths {
            let is_valid = path_what == "valid path";
            if !is_valid {
                add(path.clone(), *authed, token, plain_body(endpoint), path_what.clone());
            }
            if !(is_valid || full && token.is_none()) {
                continue;
            }
            for body in &bodies {
                if !is_valid && BIG_BODIES.contains(&body.name.as_str()) {
                    continue;
                }
                let what = format!("{path_what}, body: {}", body.name);
                add(path.clone(), *authed, token, Some(body.json.clone()), what);
            }
        }
        if token.is_some() {
            continue;
        }
        for value in bad_query_values() {
            if full {
                for param in QUERY_PARAMS {
                    let target = format!("{valid_path}?{param}={value}");
                    add(target, *authed, token, plain_body(endpoint), format!("query {param}={value:?}"));
                }
            } else {
                let query: Vec<String> =
                    QUERY_PARAMS.iter().map(|param| format!("{param}={value}")).collect();
                let target = format!("{valid_path}?{}", query.join("&"));
                add(
                    target,
                    *authed,
                    token,
                    plain_body(endpoint),
                    format!("every query parameter = {value:?}"),
                );
            }
        }
    }
    probes
}

/// A valid request of a main endpoint, whose body (or `filter` query) gets each leaf replaced.
struct Curated {
    method: &'static str,
    /// The path; `{txn}` becomes a fresh transaction id for every probe.
    path: String,
    authed: bool,
    body: Value,
    /// The value goes into this query parameter instead of the body.
    query: Option<&'static str>,
}

fn curated(fixture: &Fixture) -> Vec<Curated> {
    let bob = fixture.bob();
    let (alice, carol) = (&fixture.alice.user_id, &fixture.carol.user_id);
    let (room, bob_room, event) = (&fixture.room, &fixture.bob_room, &fixture.events[0]);
    let v3 = |rest: String| format!("/_matrix/client/v3/{rest}");
    let room_of = |room: &str, rest: &str| room_path(room, rest);
    let user = percent_encode(bob.user_id.as_bytes(), NON_ALPHANUMERIC).to_string();
    let encoded_event = percent_encode(event.as_bytes(), NON_ALPHANUMERIC).to_string();
    let own_event = percent_encode(fixture.bob_event.as_bytes(), NON_ALPHANUMERIC).to_string();
    let item = |method, path: String, body: Value| Curated { method, path, authed: true, body, query: None };
    vec![
        Curated {
            method: "POST",
            path: v3("register".into()),
            authed: false,
            body: json!({"username": "swept", "password": PW, "auth": {"type": "m.login.dummy"},
                "device_id": "SWEPT", "initial_device_display_name": "sweep", "inhibit_login": false,
                "refresh_token": false}),
            query: None,
        },
        Curated {
            method: "POST",
            path: v3("login".into()),
            authed: false,
            body: json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carol"},
                "password": PW, "device_id": "CAROLSWEEP", "initial_device_display_name": "sweep",
                "refresh_token": true}),
            query: None,
        },
        item(
            "POST",
            v3("createRoom".into()),
            json!({"name": "n", "topic": "t", "preset": "private_chat",
            "visibility": "private", "room_alias_name": "swept", "invite": [carol], "is_direct": false,
            "room_version": "10", "creation_content": {"m.federate": true},
            "initial_state": [{"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "can_join"}}],
            "power_level_content_override": {"users_default": 0, "events": {"m.room.name": 50}}}),
        ),
        item(
            "PUT",
            room_of(room, "send/m.room.message/{txn}"),
            json!({"msgtype": "m.text", "body": "hello",
            "format": "org.matrix.custom.html", "formatted_body": "<b>hello</b>",
            "m.relates_to": {"rel_type": "m.thread", "event_id": event}}),
        ),
        item("PUT", room_of(bob_room, "state/m.room.topic/"), json!({"topic": "swept"})),
        item("PUT", room_of(bob_room, "state/m.room.name/"), json!({"name": "swept"})),
        item("PUT", room_of(bob_room, "state/m.room.join_rules/"), json!({"join_rule": "invite"})),
        item(
            "PUT",
            room_of(bob_room, "state/m.room.history_visibility/"),
            json!({"history_visibility": "shared"}),
        ),
        item(
            "PUT",
            room_of(&fixture.pl_room, "state/m.room.power_levels/"),
            json!({"users": {&bob.user_id: 100},
            "users_default": 0, "events": {"m.room.name": 50}, "events_default": 0, "state_default": 50,
            "ban": 50, "kick": 50, "redact": 50, "invite": 0, "notifications": {"room": 50}}),
        ),
        item("PUT", room_of(bob_room, &format!("redact/{own_event}/{{txn}}")), json!({"reason": "swept"})),
        item(
            "POST",
            v3(format!("user/{user}/filter")),
            json!({"room": {"timeline": {"limit": 10,
            "types": ["m.room.message"], "not_senders": [alice]}, "state": {"lazy_load_members": true},
            "rooms": [room]}, "presence": {"not_types": ["*"]}, "event_fields": ["content.body"],
            "event_format": "client"}),
        ),
        Curated {
            method: "GET",
            path: v3("sync?timeout=0".into()),
            authed: true,
            body: json!({"room": {"timeline": {"limit": 1, "types": ["m.room.message"]},
                "state": {"lazy_load_members": true}}, "presence": {"limit": 1}}),
            query: Some("filter"),
        },
        Curated {
            method: "GET",
            path: room_of(room, "messages?dir=b&limit=5"),
            authed: true,
            body: json!({"types": ["m.room.message"], "not_senders": [carol], "limit": 3,
                "lazy_load_members": true, "contains_url": false}),
            query: Some("filter"),
        },
        item(
            "POST",
            v3("keys/upload".into()),
            json!({"device_keys": {"user_id": bob.user_id,
            "device_id": bob.device_id, "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("curve25519:{}", bob.device_id): "curve", format!("ed25519:{}", bob.device_id): "ed"},
            "signatures": {&bob.user_id: {format!("ed25519:{}", bob.device_id): "sig"}}},
            "one_time_keys": {"curve25519:AAAA": "key", "signed_curve25519:AAAB": {"key": "k", "signatures": {}}},
            "fallback_keys": {"signed_curve25519:AAAC": {"key": "k", "fallback": true, "signatures": {}}}}),
        ),
        item("POST", v3("keys/query".into()), json!({"device_keys": {alice: []}, "timeout": 10000})),
        item(
            "POST",
            v3("keys/claim".into()),
            json!({"one_time_keys": {alice: {&fixture.alice.device_id: "signed_curve25519"}}, "timeout": 10000}),
        ),
        item(
            "POST",
            v3("keys/device_signing/upload".into()),
            json!({"master_key": {"user_id": bob.user_id,
            "usage": ["master"], "keys": {"ed25519:base64key": "base64key"}}}),
        ),
        item(
            "POST",
            v3("keys/signatures/upload".into()),
            json!({&bob.user_id: {&bob.device_id: {
            "user_id": bob.user_id, "device_id": bob.device_id, "algorithms": [], "keys": {},
            "signatures": {&bob.user_id: {"ed25519:x": "sig"}}}}}),
        ),
        item(
            "PUT",
            v3("sendToDevice/m.room.encrypted/{txn}".into()),
            json!({"messages": {carol: {"*": {"algorithm": "m.olm.v1.curve25519-aes-sha2", "ciphertext": {}}}}}),
        ),
        item(
            "PUT",
            v3(format!("user/{user}/account_data/org.example.sweep")),
            json!({"a": 1, "b": "x", "c": [true]}),
        ),
        item(
            "PUT",
            v3(format!("user/{user}/rooms/{room}/account_data/org.example.sweep")),
            json!({"a": {"b": null}}),
        ),
        item("PUT", v3(format!("user/{user}/account_data/m.direct")), json!({carol: [bob_room]})),
        item("PUT", v3(format!("profile/{user}/displayname")), json!({"displayname": "Bob"})),
        item("PUT", v3(format!("profile/{user}/avatar_url")), json!({"avatar_url": "mxc://localhost/bob"})),
        item("POST", room_of(room, &format!("receipt/m.read/{encoded_event}")), json!({"thread_id": "main"})),
        item(
            "POST",
            room_of(room, "read_markers"),
            json!({"m.fully_read": event, "m.read": event, "m.read.private": event}),
        ),
        item("PUT", room_of(room, &format!("typing/{user}")), json!({"typing": true, "timeout": 30000})),
        item(
            "PUT",
            v3(format!("presence/{user}/status")),
            json!({"presence": "online", "status_msg": "here"}),
        ),
        item("PUT", v3(format!("devices/{}", fixture.bob_device)), json!({"display_name": "swept"})),
        item(
            "POST",
            v3("delete_devices".into()),
            json!({"devices": ["NOSUCHDEVICE"], "auth": {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": bob.user_id}, "password": PW}}),
        ),
        item(
            "POST",
            v3("pushers/set".into()),
            json!({"pushkey": "key", "kind": "http", "app_id": "org.example",
            "app_display_name": "Sweep", "device_display_name": "Sweep", "lang": "en", "append": false,
            "data": {"url": "https://push.invalid/_matrix/push/v1/notify", "format": "event_id_only"}}),
        ),
        item(
            "PUT",
            v3("pushrules/global/override/org.example.sweep".into()),
            json!({"conditions": [
            {"kind": "event_match", "key": "type", "pattern": "m.room.message"}],
            "actions": ["notify", {"set_tweak": "sound", "value": "default"}]}),
        ),
        item(
            "PUT",
            v3("pushrules/global/override/org.example.sweep/enabled".into()),
            json!({"enabled": true}),
        ),
        item("POST", room_of(bob_room, "invite"), json!({"user_id": carol, "reason": "swept"})),
        item("POST", v3("user_directory/search".into()), json!({"search_term": "ali", "limit": 10})),
        item("POST", v3("publicRooms".into()), json!({"limit": 10, "filter": {"generic_search_term": "x"}})),
        item(
            "POST",
            v3("room_keys/version".into()),
            json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
            "auth_data": {"public_key": "abc", "signatures": {}}}),
        ),
        item(
            "PUT",
            v3(format!("room_keys/keys/{room}/sweep-session?version={}", fixture.backup_version)),
            json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": false,
                "session_data": {"ephemeral": "e", "ciphertext": "c", "mac": "m"}}),
        ),
        item(
            "PUT",
            v3(format!("directory/room/{}", percent_encode(b"#swept2:localhost", NON_ALPHANUMERIC))),
            json!({"room_id": bob_room}),
        ),
        item(
            "POST",
            v3("account/3pid/email/requestToken".into()),
            json!({"client_secret": "secret", "email": "bob@example.org", "send_attempt": 1}),
        ),
        Curated {
            method: "POST",
            path: "/_hearth/client/v1/threepid/submit_token".into(),
            authed: false,
            body: json!({"sid": "sid", "client_secret": "secret", "token": "123456"}),
            query: None,
        },
        Curated {
            method: "POST",
            path: "/_matrix/client/unstable/chat.hearth.login.otp/requestToken".into(),
            authed: false,
            body: json!({"client_secret": "secret", "send_attempt": 1, "medium": "email",
                "address": "bob@example.org"}),
            query: None,
        },
    ]
}

/// Where each leaf (scalar, or empty array or object) of `value` is, as JSON pointers.
fn leaves(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                leaves(item, format!("{at}/{}", key.replace('~', "~0").replace('/', "~1")), out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                leaves(item, format!("{at}/{i}"), out);
            }
        }
        _ => out.push(at),
    }
}

/// `value` with the leaf at `pointer` replaced by the raw JSON text `raw`.
fn replace_leaf(value: &Value, pointer: &str, raw: &[u8]) -> Vec<u8> {
    const MARK: &str = "\u{1}sweep\u{1}";
    let mut value = value.clone();
    *value.pointer_mut(pointer).unwrap() = json!(MARK);
    let text = value.to_string();
    let marked = serde_json::to_string(MARK).unwrap();
    let at = text.find(&marked).unwrap();
    let text = text.as_bytes();
    [&text[..at], raw, &text[at + marked.len()..]].concat()
}

fn curated_probes(fixture: &Fixture) -> Vec<Probe> {
    let txn = AtomicUsize::new(0);
    let mut probes = Vec::new();
    for item in curated(fixture) {
        let mut pointers = Vec::new();
        leaves(&item.body, String::new(), &mut pointers);
        for pointer in pointers {
            for value in bad_values() {
                if item.query.is_some() && value.json.len() > 8 * 1024 {
                    // No client sends a URL that long (reqwest refuses to build it).
                    continue;
                }
                let json = replace_leaf(&item.body, &pointer, &value.json);
                let path =
                    item.path.replace("{txn}", &format!("swept{}", txn.fetch_add(1, Ordering::Relaxed)));
                let (target, body) = match item.query {
                    Some(param) => {
                        let separator = if path.contains('?') { '&' } else { '?' };
                        (
                            format!("{path}{separator}{param}={}", percent_encode(&json, NON_ALPHANUMERIC)),
                            None,
                        )
                    }
                    None => (path, Some(json)),
                };
                let what = format!("{} = {}", if pointer.is_empty() { "/" } else { &pointer }, value.name);
                probes.push(Probe {
                    method: item.method.to_owned(),
                    target,
                    template: item.path.clone(),
                    authed: item.authed,
                    token: None,
                    body,
                    what,
                    routed: true,
                });
            }
        }
    }
    probes
}

crate::on_both_backends! {
    async fn no_input_gets_a_5xx_or_a_non_matrix_error_and_stored_data_is_served_the_same_after(db: Db) {
        let full = full_sweep();
        let fixture = setup(db).await;
        let before = stored_data(&fixture).await;
        assert!(before.iter().all(|(_, status, _)| *status == 200), "{before:?}");

        let sweep = Sweep {
            fixture: &fixture,
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap(),
            failures: Mutex::new(Vec::new()),
            probes: AtomicUsize::new(0),
            statuses: Mutex::new(Default::default()),
            relogin: tokio::sync::Mutex::new(()),
            relogins: AtomicUsize::new(0),
        };
        let all = endpoints();
        assert!(all.len() > 100, "the server routes {} endpoints", all.len());
        // Endpoints in parallel, each one's probes in order.
        stream::iter(all.iter())
            .for_each_concurrent(4, |endpoint| {
                let sweep = &sweep;
                async move {
                    for probe in endpoint_probes(sweep.fixture, endpoint, full) {
                        sweep.run(probe).await;
                    }
                }
            })
            .await;
        for probe in curated_probes(&fixture) {
            sweep.run(probe).await;
        }

        let failures = sweep.failures.into_inner().unwrap();
        let probes = sweep.probes.load(Ordering::Relaxed);
        let statuses = sweep.statuses.into_inner().unwrap();
        let relogins = sweep.relogins.load(Ordering::Relaxed);
        println!("{probes} probes over {} endpoints, {relogins} logins again; answers by status: {statuses:?}", all.len());
        assert!(
            failures.is_empty(),
            "{} of {probes} probes over {} endpoints were answered wrongly:\n{}",
            failures.len(),
            all.len(),
            failures.join("\n")
        );
        let after = stored_data(&fixture).await;
        for ((what, status_before, before), (_, status_after, after)) in before.iter().zip(&after) {
            assert_eq!((status_before, before), (status_after, after), "{what} changed in the sweep");
        }
        fixture.server.stop().await;
    }
}
