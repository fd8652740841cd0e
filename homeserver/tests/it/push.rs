//! Push notifications: push rules, `/notifications`, unread counts in `/sync`, and HTTP pushers
//! delivering to a push gateway this test runs itself, which checks every field of every request
//! against the Push Gateway API.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestDb, TestServer, assert_error},
    tls::TestCa,
};

const PW: &str = "correct horse battery";
const V3: &str = "/_matrix/client/v3";

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// What the gateway was sent and what it made of it.
#[derive(Default)]
struct GatewayState {
    /// Every request body, in arrival order, with whether it was answered 200.
    received: Mutex<Vec<(Value, bool)>>,
    /// Ways in which requests broke the spec; a test fails if any.
    problems: Mutex<Vec<String>>,
    /// Answer this many of the next requests with 500.
    fail_next: AtomicUsize,
    /// Answer every request with 500 while set.
    failing: std::sync::atomic::AtomicBool,
    /// Pushkeys listed as `rejected` in the answers.
    rejected: Mutex<BTreeSet<String>>,
}

/// A push gateway on an ephemeral loopback port (the interop tests use it too).
pub(crate) struct Gateway {
    pub(crate) url: String,
    state: Arc<GatewayState>,
    handle: actix_web::dev::ServerHandle,
}

fn is_int(value: &Value) -> bool {
    value.as_u64().is_some()
}

/// Checks one request body against the Push Gateway API (`POST /_matrix/push/v1/notify`).
fn spec_problems(body: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |what: String| problems.push(format!("{what} in {body}"));
    let Some(top) = body.as_object() else {
        problem("the body is not an object".into());
        return problems;
    };
    if top.keys().any(|k| k != "notification") {
        problem("fields beside `notification`".into());
    }
    let Some(n) = body["notification"].as_object() else {
        problem("no `notification` object".into());
        return problems;
    };
    const KNOWN: [&str; 14] = [
        "id",
        "membership",
        "event_id",
        "room_id",
        "type",
        "sender",
        "sender_display_name",
        "room_name",
        "room_alias",
        "user_is_target",
        "prio",
        "content",
        "counts",
        "devices",
    ];
    for key in n.keys() {
        if !KNOWN.contains(&key.as_str()) {
            problem(format!("unknown field `{key}`"));
        }
    }
    let about_event = n.contains_key("event_id");
    // `id`: the legacy name of `event_id`, sent beside it as Synapse does, never in
    // `event_id_only` notifications (those have no `type`).
    if n.contains_key("id") && (n.get("id") != n.get("event_id") || !n.contains_key("type")) {
        problem("`id` that is not a full notification's `event_id`".into());
    }
    if n.contains_key("type") && about_event && !n.contains_key("id") {
        problem("a full notification without the legacy `id`".into());
    }
    // `membership`: a member event's, beside its content, as Synapse sends it.
    if n.get("membership").is_some_and(|m| {
        n.get("type") != Some(&"m.room.member".into())
            || Some(m) != n.get("content").and_then(|c| c.get("membership"))
    }) {
        problem("`membership` that is not a member event's".into());
    }
    if about_event && !n.contains_key("room_id") {
        problem("an event's notification without room_id".into());
    }
    let string_starting =
        |key: &str, sigil: char| n.get(key).is_none_or(|v| v.as_str().is_some_and(|s| s.starts_with(sigil)));
    for (key, sigil) in [("event_id", '$'), ("room_id", '!'), ("sender", '@'), ("room_alias", '#')] {
        if !string_starting(key, sigil) {
            problem(format!("`{key}` is not an id starting with {sigil}"));
        }
    }
    for key in ["type", "sender_display_name", "room_name"] {
        if n.get(key).is_some_and(|v| !v.is_string()) {
            problem(format!("`{key}` is not a string"));
        }
    }
    if n.get("user_is_target").is_some_and(|v| !v.is_boolean()) {
        problem("`user_is_target` is not a boolean".into());
    }
    if n.get("prio").is_some_and(|v| v != "high" && v != "low") {
        problem("`prio` is neither high nor low".into());
    }
    if n.get("content").is_some_and(|v| !v.is_object()) {
        problem("`content` is not an object".into());
    }
    if let Some(counts) = n.get("counts") {
        match counts.as_object() {
            None => problem("`counts` is not an object".into()),
            Some(counts) => {
                for (key, value) in counts {
                    if key != "unread" && key != "missed_calls" {
                        problem(format!("unknown count `{key}`"));
                    }
                    if !is_int(value) {
                        problem(format!("count `{key}` is not a non-negative integer"));
                    }
                    // "Counts whose value is zero should be omitted" for an event's notification;
                    // a badge update says zero out loud.
                    if about_event && value == 0 {
                        problem(format!("count `{key}` of zero sent with an event"));
                    }
                }
            }
        }
    }
    match n.get("devices").and_then(Value::as_array) {
        None => problem("no `devices` array".into()),
        Some(devices) if devices.is_empty() => problem("empty `devices`".into()),
        Some(devices) => {
            for device in devices {
                let Some(device) = device.as_object() else {
                    problem("a device that is not an object".into());
                    continue;
                };
                for key in device.keys() {
                    if !["app_id", "pushkey", "pushkey_ts", "data", "tweaks"].contains(&key.as_str()) {
                        problem(format!("unknown device field `{key}`"));
                    }
                }
                if !device
                    .get("app_id")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty() && s.len() <= 64)
                {
                    problem("device app_id missing or longer than 64".into());
                }
                if !device
                    .get("pushkey")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty() && s.len() <= 512)
                {
                    problem("device pushkey missing or longer than 512".into());
                }
                // Seconds, not milliseconds: within a day of now.
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                if device
                    .get("pushkey_ts")
                    .is_some_and(|ts| ts.as_u64().is_none_or(|ts| ts.abs_diff(now) > 86_400))
                {
                    problem("pushkey_ts is not a timestamp in seconds".into());
                }
                // Synapse always sends `data`, empty or not; so does Hearth.
                match device.get("data") {
                    None => problem("a device without `data`".into()),
                    Some(data) if !data.is_object() => problem("device data is not an object".into()),
                    Some(data) if data.get("url").is_some() => problem("device data still has `url`".into()),
                    Some(_) => {}
                }
                if let Some(tweaks) = device.get("tweaks") {
                    match tweaks.as_object() {
                        None => problem("tweaks is not an object".into()),
                        Some(tweaks) => {
                            if tweaks.get("highlight").is_some_and(|h| !h.is_boolean()) {
                                problem("the highlight tweak is not a boolean".into());
                            }
                            if tweaks.get("sound").is_some_and(|s| !s.is_string()) {
                                problem("the sound tweak is not a string".into());
                            }
                        }
                    }
                }
            }
        }
    }
    let event_id_only = n["devices"][0]["data"]["format"] == "event_id_only";
    if event_id_only {
        for key in n.keys() {
            if !["event_id", "room_id", "counts", "prio", "devices"].contains(&key.as_str()) {
                problem(format!("`{key}` sent to an event_id_only pusher"));
            }
        }
    }
    problems
}

async fn notify(request: HttpRequest, body: web::Bytes, state: web::Data<Arc<GatewayState>>) -> HttpResponse {
    let content_type =
        request.headers().get("Content-Type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => {
            state.problems.lock().unwrap().push(format!("not JSON: {e}"));
            return HttpResponse::BadRequest().finish();
        }
    };
    let mut problems = spec_problems(&value);
    if !content_type.starts_with("application/json") {
        problems.push(format!("content type {content_type}"));
    }
    state.problems.lock().unwrap().extend(problems);
    let fail = state.failing.load(Ordering::SeqCst)
        || state.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    state.received.lock().unwrap().push((value.clone(), !fail));
    if fail {
        return HttpResponse::InternalServerError().json(json!({"error": "try later"}));
    }
    let rejected: Vec<String> = {
        let rejected = state.rejected.lock().unwrap();
        value["notification"]["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["pushkey"].as_str())
            .filter(|key| rejected.contains(*key))
            .map(str::to_owned)
            .collect()
    };
    HttpResponse::Ok().json(json!({ "rejected": rejected }))
}

impl Gateway {
    pub(crate) async fn start() -> Self {
        Self::serve(None).await
    }

    /// A gateway that speaks HTTPS, with a certificate from `ca`.
    async fn start_tls(ca: &TestCa) -> Self {
        Self::serve(Some(ca.server_config())).await
    }

    async fn serve(tls: Option<rustls::ServerConfig>) -> Self {
        let state = Arc::new(GatewayState::default());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .route("/_matrix/push/v1/notify", web::post().to(notify))
                .default_service(web::to(|request: HttpRequest| async move {
                    HttpResponse::NotFound().body(format!("{} {}", request.method(), request.path()))
                }))
        })
        .workers(1)
        // No pooled connection outlives `stop`: each request opens its own.
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = match tls {
            Some(tls) => server.bind_rustls_0_23("127.0.0.1:0", tls),
            None => server.bind("127.0.0.1:0"),
        }
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { url: format!("{scheme}://{addr}/_matrix/push/v1/notify"), state, handle }
    }

    /// Every request so far (the spec problems are checked on each call).
    fn received(&self) -> Vec<Value> {
        self.assert_spec();
        self.state.received.lock().unwrap().iter().map(|(body, _)| body.clone()).collect()
    }

    /// The notifications the gateway took (answered 200).
    fn delivered(&self) -> Vec<Value> {
        self.assert_spec();
        self.state
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(body, _)| body["notification"].clone())
            .collect()
    }

    fn assert_spec(&self) {
        let problems = self.state.problems.lock().unwrap();
        assert!(
            problems.is_empty(),
            "the gateway got requests that break the spec:\n{}",
            problems.join("\n")
        );
    }

    /// Waits until `done` holds for the delivered notifications (at most 20 s).
    async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..400 {
            let delivered = self.delivered();
            if done(&delivered) {
                return delivered;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway never got {what}: {:?}", self.received());
    }

    /// The delivered notification about `event_id` (waiting for it).
    pub(crate) async fn notification_for(&self, event_id: &str) -> Value {
        let delivered = self.wait_for(event_id, |d| d.iter().any(|n| n["event_id"] == event_id)).await;
        delivered.into_iter().find(|n| n["event_id"] == event_id).unwrap()
    }

    pub(crate) async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// A server that may call gateways on loopback (the test's), with quick retries.
async fn server(db: Db) -> TestServer {
    TestServer::start_with(db, |config| {
        config.push.allow_private_addresses = true;
        config.push.initial_backoff_ms = 100;
    })
    .await
}

fn pusher_body(url: &str, pushkey: &str, data: Value) -> Value {
    let mut data = data;
    data["url"] = url.into();
    json!({
        "kind": "http", "app_id": "org.example.app", "pushkey": pushkey, "app_display_name": "Example",
        "device_display_name": "Phone", "profile_tag": "tag", "lang": "en", "data": data,
    })
}

async fn set_pusher(server: &TestServer, who: &Session, body: Value) {
    let (status, answer) = server.post(&format!("{V3}/pushers/set"), Some(&who.token), body).await;
    assert_eq!(status, 200, "{answer}");
}

/// The pushkeys of `who`'s pushers, sorted.
async fn pushkeys(server: &TestServer, who: &Session) -> Vec<String> {
    let (status, body) = server.get(&format!("{V3}/pushers"), Some(&who.token)).await;
    assert_eq!(status, 200, "{body}");
    let mut keys: Vec<String> = body["pushers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pushkey"].as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

async fn set_name(server: &TestServer, who: &Session, name: &str) {
    let path = format!("{V3}/profile/{}/displayname", enc(&who.user_id));
    assert_eq!(
        server.request("PUT", &path, Some(&who.token), Some(json!({"displayname": name}))).await.0,
        200
    );
}

/// A public room `owner` creates and `others` join (without invites, which would notify them).
async fn room_with(server: &TestServer, owner: &Session, others: &[&Session], extra: Value) -> String {
    let mut body = json!({"preset": "public_chat"});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (status, created) = server.post(&format!("{V3}/createRoom"), Some(&owner.token), body).await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    for other in others {
        let (status, joined) =
            server.post(&format!("{V3}/rooms/{}/join", enc(&room)), Some(&other.token), json!({})).await;
        assert_eq!(status, 200, "{joined}");
    }
    room
}

/// Sends a message; its event id.
async fn say(server: &TestServer, who: &Session, room: &str, content: Value) -> String {
    send(server, who, room, "m.room.message", content).await
}

/// Sends an event; its id.
async fn send(server: &TestServer, who: &Session, room: &str, event_type: &str, content: Value) -> String {
    static TXN: AtomicUsize = AtomicUsize::new(0);
    let txn = TXN.fetch_add(1, Ordering::Relaxed);
    let path = format!("{V3}/rooms/{}/send/{event_type}/t{txn}", enc(room));
    let (status, sent) = server.request("PUT", &path, Some(&who.token), Some(content)).await;
    assert_eq!(status, 200, "{sent}");
    sent["event_id"].as_str().unwrap().to_owned()
}

fn text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

/// The user's notification list (one page).
async fn notifications(server: &TestServer, who: &Session, query: &str) -> Value {
    let (status, body) = server.get(&format!("{V3}/notifications{query}"), Some(&who.token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the user's notifications include `event_id` (the evaluator runs beside the send).
async fn wait_notified(server: &TestServer, who: &Session, event_id: &str) -> Value {
    for _ in 0..400 {
        let list = notifications(server, who, "?limit=100").await;
        if list["notifications"].as_array().unwrap().iter().any(|n| n["event"]["event_id"] == event_id) {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{event_id} never notified {}", who.user_id);
}

fn listed_ids(list: &Value) -> Vec<String> {
    list["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

async fn unread(server: &TestServer, who: &Session, room: &str) -> (Value, Value) {
    let (status, sync) = server.get(&format!("{V3}/sync"), Some(&who.token)).await;
    assert_eq!(status, 200, "{sync}");
    let counts = &sync["rooms"]["join"][room]["unread_notifications"];
    (counts["notification_count"].clone(), counts["highlight_count"].clone())
}

async fn receipt(server: &TestServer, who: &Session, room: &str, kind: &str, event_id: &str) {
    let path = format!("{V3}/rooms/{}/receipt/{kind}/{}", enc(room), enc(event_id));
    let (status, body) = server.post(&path, Some(&who.token), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

crate::on_both_backends! {
    async fn mentions_reach_the_gateway_with_highlight_counts_and_every_field(db: Db) {
        let gateway = Gateway::start().await;
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        set_name(&server, &alice, "Alice Liddell").await;
        set_name(&server, &bob, "Bob").await;
        set_pusher(&server, &alice, pusher_body(&gateway.url, "alice-phone", json!({"custom": "kept"}))).await;
        let room = room_with(&server, &bob, &[], json!({"name": "Tea", "room_alias_name": "tea"})).await;

        // The invite is pushed to its target.
        let path = format!("{V3}/rooms/{}/invite", enc(&room));
        assert_eq!(server.post(&path, Some(&bob.token), json!({"user_id": alice.user_id})).await.0, 200);
        let invite = gateway.wait_for("the invite", |d| d.iter().any(|n| n["type"] == "m.room.member")).await;
        let invite = invite.iter().find(|n| n["type"] == "m.room.member").unwrap();
        assert_eq!(invite["user_is_target"], true, "{invite}");
        assert_eq!(invite["content"]["membership"], "invite");
        assert_eq!(invite["membership"], "invite", "as Synapse sends it: {invite}");
        assert_eq!((invite["room_id"].as_str(), invite["sender"].as_str()), (Some(room.as_str()), Some(bob.user_id.as_str())));
        assert_eq!(invite["counts"], json!({"unread": 1}), "the invite counts on the badge, as in Synapse: {invite}");
        assert_eq!(invite["id"], invite["event_id"], "the legacy id beside the event id: {invite}");
        let (status, joined) = server.post(&format!("{V3}/rooms/{}/join", enc(&room)), Some(&alice.token), json!({})).await;
        assert_eq!(status, 200, "{joined}");

        // One plain message (a one-to-one room: it notifies, with a sound) and three mentions,
        // each sent once the previous one arrived (the count is the one at delivery).
        let messages = [
            (text("hello there"), false, Some("default")),
            (text("look, Alice Liddell is here"), true, Some("default")),
            (text("@room tea is ready"), true, None),
            (json!({"msgtype": "m.text", "body": "you", "m.mentions": {"user_ids": [alice.user_id]}}), true, Some("default")),
        ];
        let mut sent = Vec::new();
        for (n, (content, highlight, sound)) in messages.into_iter().enumerate() {
            let event_id = say(&server, &bob, &room, content.clone()).await;
            let notification = gateway.notification_for(&event_id).await;
            sent.push(event_id);
            assert_eq!(notification["room_id"], room.as_str());
            assert_eq!(notification["type"], "m.room.message");
            assert_eq!(notification["sender"], bob.user_id.as_str());
            assert_eq!(notification["sender_display_name"], "Bob");
            assert_eq!(notification["room_name"], "Tea");
            assert_eq!(notification["room_alias"], "#tea:localhost");
            assert!(notification.get("user_is_target").is_none_or(|t| t == false), "{notification}");
            assert_eq!(notification["content"], content, "the event's content as sent");
            assert_eq!(notification["counts"]["unread"], n as u64 + 1, "unread so far: {notification}");
            assert!(notification["counts"].get("missed_calls").is_none(), "zero counts are left out");
            // Synapse's priorities: high for what makes a sound or highlights (ruma leaves the
            // spec's default, high, out).
            assert!(notification.get("prio").is_none_or(|p| p == "high"), "{notification}");
            let device = &notification["devices"][0];
            assert_eq!(notification["devices"].as_array().unwrap().len(), 1);
            assert_eq!((device["app_id"].as_str(), device["pushkey"].as_str()), (Some("org.example.app"), Some("alice-phone")));
            assert_eq!(device["data"], json!({"custom": "kept"}), "data without url: {device}");
            assert_eq!(device["tweaks"]["sound"].as_str(), sound, "{device}");
            assert_eq!(device["tweaks"].get("highlight").is_some_and(|h| h == true), highlight, "{device}");
        }

        // Bob is never pushed about his own messages; each event went out once.
        let delivered = gateway.delivered();
        let ids: Vec<&str> = delivered.iter().filter_map(|n| n["event_id"].as_str()).collect();
        assert_eq!(ids.len(), ids.iter().collect::<BTreeSet<_>>().len(), "each notification once: {ids:?}");
        assert_eq!(ids.len(), 5, "the invite and four messages: {delivered:?}");
        assert!(gateway.received().iter().all(|b| b["notification"]["sender"] != alice.user_id.as_str()));

        // Reading them sends the badge a zero.
        receipt(&server, &alice, &room, "m.read", &sent[3]).await;
        let badge = gateway.wait_for("a badge update", |d| d.iter().any(|n| n.get("event_id").is_none())).await;
        let badge = badge.iter().find(|n| n.get("event_id").is_none()).unwrap();
        assert_eq!(badge["counts"]["unread"], 0, "{badge}");
        assert_eq!(badge["devices"][0]["pushkey"], "alice-phone");
        // A call rings, and counts as missed until read.
        let call = send(&server, &bob, &room, "m.call.invite", json!({"call_id": "c1", "party_id": "p1",
            "version": "1", "lifetime": 60000, "offer": {"type": "offer", "sdp": "v=0"}})).await;
        let ring = gateway.notification_for(&call).await;
        assert_eq!(ring["counts"], json!({"unread": 1, "missed_calls": 1}), "{ring}");
        assert_eq!(ring["devices"][0]["tweaks"]["sound"], "ring");
        assert_eq!(ring["type"], "m.call.invite");
        server.stop().await;
        gateway.stop().await;
    }

    async fn an_event_id_only_pusher_gets_ids_and_counts(db: Db) {
        let gateway = Gateway::start().await;
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = room_with(&server, &bob, &[&alice, &carol], json!({"name": "Secret plans"})).await;
        set_pusher(&server, &alice, pusher_body(&gateway.url, "quiet", json!({"format": "event_id_only"}))).await;
        // A group room: a plain message notifies without a sound, so its priority is low.
        let plain = say(&server, &bob, &room, text("the plans are ready")).await;
        let notification = gateway.notification_for(&plain).await;
        let keys: BTreeSet<&str> = notification.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["event_id", "room_id", "counts", "prio", "devices"]), "{notification}");
        assert_eq!(notification["room_id"], room.as_str());
        assert_eq!(notification["counts"]["unread"], 1);
        assert_eq!(notification["prio"], "low");
        assert_eq!(notification["devices"][0]["data"], json!({"format": "event_id_only"}));
        assert!(notification["devices"][0].get("tweaks").is_none(), "no tweaks: {notification}");
        server.stop().await;
        gateway.stop().await;
    }

    async fn a_gateway_that_fails_twice_gets_the_notification_exactly_once_even_across_a_restart(db: Db) {
        let gateway = Gateway::start().await;
        let test_db = TestDb::new(db).await;
        let tweak = |config: &mut homeserver::config::Config| {
            config.push.allow_private_addresses = true;
            config.push.initial_backoff_ms = 100;
        };
        let server = TestServer::start_on(&test_db, tweak).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = room_with(&server, &bob, &[&alice], json!({})).await;
        set_pusher(&server, &alice, pusher_body(&gateway.url, "flaky", json!({}))).await;
        gateway.state.fail_next.store(2, Ordering::SeqCst);
        let first = say(&server, &bob, &room, text("one")).await;
        gateway.notification_for(&first).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let attempts: Vec<Value> = gateway.received().into_iter().filter(|b| b["notification"]["event_id"] == first.as_str()).collect();
        assert_eq!(attempts.len(), 3, "two failures, then the one that went through: {attempts:?}");
        assert_eq!(gateway.delivered().iter().filter(|n| n["event_id"] == first.as_str()).count(), 1);

        // The gateway goes down; the server is restarted while it retries; the gateway comes back.
        gateway.state.failing.store(true, Ordering::SeqCst);
        let second = say(&server, &bob, &room, text("two")).await;
        for _ in 0..200 {
            if gateway.received().iter().any(|b| b["notification"]["event_id"] == second.as_str()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.stop().await;
        gateway.state.failing.store(false, Ordering::SeqCst);
        let restarted = TestServer::start_on(&test_db, tweak).await;
        gateway.notification_for(&second).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let delivered = gateway.delivered();
        let count = |id: &str| delivered.iter().filter(|n| n["event_id"] == id).count();
        assert_eq!((count(&first), count(&second)), (1, 1), "each delivered once: {delivered:?}");
        restarted.stop().await;
        test_db.remove().await;
        gateway.stop().await;
    }

    async fn a_pushkey_the_gateway_rejects_removes_its_pusher(db: Db) {
        let gateway = Gateway::start().await;
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = room_with(&server, &bob, &[&alice], json!({})).await;
        set_pusher(&server, &alice, pusher_body(&gateway.url, "key_1", json!({}))).await;
        let mut second = pusher_body(&gateway.url, "key_2", json!({}));
        second["append"] = true.into();
        set_pusher(&server, &alice, second).await;
        assert_eq!(server.get(&format!("{V3}/pushers"), Some(&alice.token)).await.1["pushers"].as_array().unwrap().len(), 2);
        gateway.state.rejected.lock().unwrap().insert("key_1".to_owned());
        let message = say(&server, &bob, &room, text("hi")).await;
        gateway.wait_for("the message on both keys", |d| {
            d.iter().filter(|n| n["event_id"] == message.as_str()).count() == 2
        }).await;
        let mut listed = Vec::new();
        for _ in 0..100 {
            listed = server.get(&format!("{V3}/pushers"), Some(&alice.token)).await.1["pushers"].as_array().unwrap().clone();
            if listed.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let keys: Vec<&str> = listed.iter().map(|p| p["pushkey"].as_str().unwrap()).collect();
        assert_eq!(keys, ["key_2"], "the rejected pushkey's pusher is gone");
        // Later messages go to the pusher that is left only.
        let next = say(&server, &bob, &room, text("again")).await;
        gateway.notification_for(&next).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let to: Vec<Value> = gateway.delivered().into_iter().filter(|n| n["event_id"] == next.as_str()).map(|n| n["devices"][0]["pushkey"].clone()).collect();
        assert_eq!(to, [json!("key_2")]);
        server.stop().await;
        gateway.stop().await;
    }

    async fn notifications_list_pages_filters_highlights_and_marks_what_was_read(db: Db) {
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = room_with(&server, &bob, &[&alice, &carol], json!({})).await;
        let mut sent = Vec::new();
        for n in 0..5 {
            let content = match n {
                1 | 3 => json!({"msgtype": "m.text", "body": format!("alice, message {n}")}),
                _ => text(&format!("message {n}")),
            };
            sent.push(say(&server, &bob, &room, content).await);
        }
        wait_notified(&server, &alice, &sent[4]).await;
        // Newest first, two at a time.
        let first = notifications(&server, &alice, "?limit=2").await;
        assert_eq!(listed_ids(&first), [sent[4].clone(), sent[3].clone()]);
        let token = first["next_token"].as_str().unwrap().to_owned();
        let second = notifications(&server, &alice, &format!("?limit=2&from={token}")).await;
        assert_eq!(listed_ids(&second), [sent[2].clone(), sent[1].clone()]);
        let token = second["next_token"].as_str().unwrap().to_owned();
        let last = notifications(&server, &alice, &format!("?limit=2&from={token}")).await;
        assert_eq!(listed_ids(&last), [sent[0].clone()]);
        assert!(last.get("next_token").is_none(), "the last page says so: {last}");
        let entry = &first["notifications"][0];
        assert_eq!(entry["room_id"], room.as_str());
        assert_eq!(entry["read"], false);
        assert!(entry["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000), "{entry}");
        assert!(entry["actions"].as_array().unwrap().iter().any(|a| a == "notify"), "{entry}");
        assert_eq!(entry["event"]["content"]["body"], "message 4");
        assert_eq!(entry.get("profile_tag"), Some(&Value::Null), "written out, null, as Synapse: {entry}");
        // The name "alice" is a content rule of hers: those highlight.
        let highlights = notifications(&server, &alice, "?only=highlight").await;
        assert_eq!(listed_ids(&highlights), [sent[3].clone(), sent[1].clone()]);
        // A read receipt marks what it covers.
        receipt(&server, &alice, &room, "m.read", &sent[2]).await;
        let all = notifications(&server, &alice, "").await;
        let read: Vec<bool> = all["notifications"].as_array().unwrap().iter().map(|n| n["read"].as_bool().unwrap()).collect();
        assert_eq!(read, [false, false, true, true, true]);
        // Bob sent them all: nothing for him. Bounds and bad tokens.
        assert_eq!(listed_ids(&notifications(&server, &bob, "").await), Vec::<String>::new());
        assert_eq!(listed_ids(&notifications(&server, &alice, "?limit=100000").await).len(), 5, "limit is capped, not refused");
        for bad in ["?from=abc", "?from=-1", "?from=%2B5", "?only=everything", "?limit=-3"] {
            assert_error(&server.get(&format!("{V3}/notifications{bad}"), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        }
        assert_error(&server.get(&format!("{V3}/notifications"), None).await, 401, "M_MISSING_TOKEN");
        server.stop().await;
    }

    async fn unread_notifications_in_sync_count_and_reset_with_read_receipts(db: Db) {
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = room_with(&server, &bob, &[&alice, &carol], json!({})).await;
        assert_eq!(unread(&server, &alice, &room).await, (json!(0), json!(0)), "nothing yet (the invite does not count)");
        let one = say(&server, &bob, &room, text("one")).await;
        let two = say(&server, &bob, &room, text("hey alice")).await;
        let three = say(&server, &carol, &room, text("three")).await;
        // Counted at once, whether or not the evaluator got there yet...
        assert_eq!(unread(&server, &alice, &room).await, (json!(3), json!(1)));
        // ...and the same from what it stored.
        wait_notified(&server, &alice, &three).await;
        assert_eq!(unread(&server, &alice, &room).await, (json!(3), json!(1)));
        assert_eq!(unread(&server, &bob, &room).await, (json!(1), json!(0)), "bob: carol's message only");
        receipt(&server, &alice, &room, "m.read", &one).await;
        assert_eq!(unread(&server, &alice, &room).await, (json!(2), json!(1)));
        receipt(&server, &alice, &room, "m.read.private", &two).await;
        assert_eq!(unread(&server, &alice, &room).await, (json!(1), json!(0)), "a private receipt counts too");
        receipt(&server, &alice, &room, "m.read", &three).await;
        assert_eq!(unread(&server, &alice, &room).await, (json!(0), json!(0)));
        // An incremental sync carries the new count with the new event.
        let (_, before) = server.get(&format!("{V3}/sync"), Some(&alice.token)).await;
        let since = before["next_batch"].as_str().unwrap();
        say(&server, &bob, &room, text("four")).await;
        let (_, after) = server.get(&format!("{V3}/sync?since={since}&timeout=5000"), Some(&alice.token)).await;
        assert_eq!(after["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 1, "{after}");
        server.stop().await;
    }

    async fn only_members_joined_at_an_event_are_notified_of_it(db: Db) {
        let server = server(db).await;
        let [alice, bob, carol, dave, erin] = [
            server.register("alice", PW).await, server.register("bob", PW).await, server.register("carol", PW).await,
            server.register("dave", PW).await, server.register("erin", PW).await,
        ];
        let room = room_with(&server, &bob, &[&alice, &dave], json!({})).await;
        let (status, left) = server.post(&format!("{V3}/rooms/{}/leave", enc(&room)), Some(&dave.token), json!({})).await;
        assert_eq!(status, 200, "{left}");
        let (status, invited) = server.post(&format!("{V3}/rooms/{}/invite", enc(&room)), Some(&bob.token), json!({"user_id": carol.user_id})).await;
        assert_eq!(status, 200, "{invited}");
        // Each of them is named (their localpart is a highlighting content rule of theirs).
        let before = say(&server, &bob, &room, text("alice carol dave erin: before")).await;
        let (status, joined) = server.post(&format!("{V3}/rooms/{}/join", enc(&room)), Some(&erin.token), json!({})).await;
        assert_eq!(status, 200, "{joined}");
        let after = say(&server, &bob, &room, text("alice carol dave erin: after")).await;
        wait_notified(&server, &alice, &after).await;
        wait_notified(&server, &erin, &after).await;
        let messages = |list: &Value| -> Vec<String> {
            list["notifications"].as_array().unwrap().iter()
                .filter(|n| n["event"]["type"] == "m.room.message")
                .map(|n| n["event"]["event_id"].as_str().unwrap().to_owned()).collect()
        };
        assert_eq!(messages(&notifications(&server, &alice, "").await), [after.clone(), before.clone()], "alice was there for both");
        assert_eq!(messages(&notifications(&server, &erin, "").await), [after], "erin joined between them");
        assert_eq!(messages(&notifications(&server, &dave, "").await), Vec::<String>::new(), "dave had left");
        let carol_list = notifications(&server, &carol, "").await;
        assert_eq!(messages(&carol_list), Vec::<String>::new(), "carol is only invited");
        assert_eq!(carol_list["notifications"][0]["event"]["content"]["membership"], "invite", "but her invite notified her: {carol_list}");
        server.stop().await;
    }

    async fn push_rules_decide_what_notifies_and_the_api_refuses_bad_paths(db: Db) {
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let token = Some(alice.token.as_str());
        let rules = format!("{V3}/pushrules/global");
        let group = room_with(&server, &bob, &[&alice, &carol], json!({})).await;
        let other = room_with(&server, &bob, &[&alice, &carol], json!({})).await;

        // A disabled default rule stops ordinary messages notifying; mentions still do.
        let message = format!("{rules}/underride/.m.rule.message");
        assert_eq!(server.request("PUT", &format!("{message}/enabled"), token, Some(json!({"enabled": false}))).await.0, 200);
        assert_eq!(server.get(&format!("{message}/enabled"), token).await.1, json!({"enabled": false}));
        let quiet = say(&server, &bob, &group, text("quiet")).await;
        let loud = say(&server, &bob, &group, text("alice!")).await;
        let list = wait_notified(&server, &alice, &loud).await;
        assert!(!listed_ids(&list).contains(&quiet), "the disabled rule's message did not notify: {list}");
        assert_eq!(server.request("PUT", &format!("{message}/enabled"), token, Some(json!({"enabled": true}))).await.0, 200);
        // A default rule's actions can change: ordinary messages now highlight.
        let actions = json!({"actions": ["notify", {"set_tweak": "highlight"}]});
        assert_eq!(server.request("PUT", &format!("{message}/actions"), token, Some(actions.clone())).await.0, 200);
        assert_eq!(server.get(&format!("{message}/actions"), token).await.1, actions);
        let highlighted = say(&server, &carol, &other, text("plain words")).await;
        let list = wait_notified(&server, &alice, &highlighted).await;
        let entry = list["notifications"].as_array().unwrap().iter().find(|n| n["event"]["event_id"] == highlighted.as_str()).unwrap();
        assert!(entry["actions"].as_array().unwrap().iter().any(|a| a["set_tweak"] == "highlight"), "{entry}");
        assert_eq!(server.request("PUT", &format!("{message}/actions"), token, Some(json!({"actions": ["notify"]}))).await.0, 200);

        // A room rule mutes one room; a sender rule mutes one sender elsewhere.
        let room_rule = format!("{rules}/room/{}", enc(&group));
        assert_eq!(server.request("PUT", &room_rule, token, Some(json!({"actions": []}))).await.0, 200);
        let sender_rule = format!("{rules}/sender/{}", enc(&carol.user_id));
        assert_eq!(server.request("PUT", &sender_rule, token, Some(json!({"actions": []}))).await.0, 200);
        let (status, room_rules) = server.get(&format!("{rules}/room/"), token).await;
        assert_eq!(status, 200, "{room_rules}");
        assert_eq!(room_rules[0]["rule_id"], group.as_str(), "one kind's list: {room_rules}");
        let muted_room = say(&server, &bob, &group, text("in the muted room")).await;
        let muted_sender = say(&server, &carol, &other, text("from the muted sender")).await;
        let heard = say(&server, &bob, &other, text("from bob in the other room")).await;
        let list = wait_notified(&server, &alice, &heard).await;
        let ids = listed_ids(&list);
        assert!(!ids.contains(&muted_room) && !ids.contains(&muted_sender), "{list}");
        assert_eq!(server.request("DELETE", &room_rule, token, None).await.0, 200);
        assert_error(&server.get(&room_rule, token).await, 404, "M_NOT_FOUND");

        // Rule ids: no `/` or `\\` in any kind; dots are the server's.
        assert_error(&server.request("PUT", &format!("{rules}/room/a%5Cb"), token, Some(json!({"actions": []}))).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/sender/.bob"), token, Some(json!({"actions": []}))).await, 400, "M_INVALID_PARAM");
        let conditions = json!({"actions": ["notify"], "conditions": [{"kind": "event_match", "key": "type", "pattern": "m.room.topic"}]});
        assert_error(&server.request("PUT", &format!("{rules}/override/.m.rule.mine"), token, Some(conditions.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/override/.m.rule.master"), token, Some(conditions.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("DELETE", &format!("{rules}/override/.m.rule.master"), token, None).await, 403, "M_FORBIDDEN");
        // before and after place a rule among the user's own.
        for id in ["a", "b"] {
            assert_eq!(server.request("PUT", &format!("{rules}/override/{id}"), token, Some(conditions.clone())).await.0, 200);
        }
        assert_eq!(server.request("PUT", &format!("{rules}/override/c?before=a"), token, Some(conditions.clone())).await.0, 200);
        let (_, overrides) = server.get(&format!("{rules}/override/"), token).await;
        let order: Vec<&str> = overrides.as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).filter(|id| !id.starts_with('.')).collect();
        assert_eq!(order, ["b", "c", "a"], "newest first, c before a");
        // Clients get the rules the server applies through sync: theirs among the defaults.
        let (_, synced) = server.get(&format!("{V3}/sync"), token).await;
        let pushed = synced["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.push_rules").unwrap();
        let synced_ids: Vec<&str> = pushed["content"]["global"]["override"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
        assert!(synced_ids.starts_with(&[".m.rule.master", "b", "c", "a"]) && synced_ids.contains(&".m.rule.contains_display_name"), "{synced_ids:?}");
        assert_error(&server.request("PUT", &format!("{rules}/override/d?after=nothing"), token, Some(conditions.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/override/d?before=.m.rule.master"), token, Some(conditions.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/content/e"), token, Some(json!({"actions": ["notify"]}))).await, 400, "M_MISSING_PARAM");

        // Unknown rules.
        for path in ["override/nothing", "override/nothing/enabled", "override/nothing/actions", "room/%21nothing%3Alocalhost"] {
            assert_error(&server.get(&format!("{rules}/{path}"), token).await, 404, "M_NOT_FOUND");
        }
        assert_error(&server.request("DELETE", &format!("{rules}/override/nothing"), token, None).await, 404, "M_NOT_FOUND");
        assert_error(&server.request("PUT", &format!("{rules}/override/nothing/enabled"), token, Some(json!({"enabled": true}))).await, 404, "M_NOT_FOUND");
        assert_error(&server.request("PUT", &format!("{rules}/override/nothing/actions"), token, Some(json!({"actions": []}))).await, 404, "M_NOT_FOUND");
        // Paths that are not a rule's.
        assert_error(&server.get(&format!("{V3}/pushrules"), token).await, 404, "M_UNRECOGNIZED");
        for path in ["/pushrules/", "/pushrules/global/"] {
            assert_error(&server.request("PUT", &format!("{V3}{path}"), token, Some(json!({"actions": []}))).await, 400, "M_UNRECOGNIZED");
        }
        for path in ["/pushrules/global", "/pushrules/device/", "/pushrules/device/override/a",
                     "/pushrules/global/override", "/pushrules/global/override/a/bogus", "/pushrules/global/override//enabled",
                     "/pushrules/global/override/a/enabled/more"] {
            assert_error(&server.get(&format!("{V3}{path}"), token).await, 400, "M_UNRECOGNIZED");
        }
        assert_error(&server.request("PUT", &format!("{rules}/override/"), token, Some(conditions.clone())).await, 400, "M_UNRECOGNIZED");
        assert_error(&server.request("DELETE", &format!("{rules}/override/"), token, None).await, 400, "M_UNRECOGNIZED");
        for method in ["GET", "DELETE"] {
            assert_error(&server.request(method, &format!("{rules}/weird/a"), token, None).await, 400, "M_INVALID_PARAM");
        }
        assert_error(&server.request("PUT", &format!("{rules}/weird/a"), token, Some(json!({"actions": []}))).await, 400, "M_INVALID_PARAM");
        assert_error(&server.get(&format!("{rules}/weird/"), token).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/override/{}", "x".repeat(300)), token, Some(conditions)).await, 400, "M_INVALID_PARAM");
        assert_error(&server.get(&format!("{rules}/override/"), None).await, 401, "M_MISSING_TOKEN");
        server.stop().await;
    }

    async fn room_and_sender_rules_take_any_id_as_synapse_does_and_keep_their_order(db: Db) {
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let token = Some(alice.token.as_str());
        let rules = format!("{V3}/pushrules/global");
        let notify = json!({"actions": ["notify"]});
        let room_id = room_with(&server, &alice, &[], json!({})).await;

        // Aliases name room rules (as SyTest's do): new ones first, `before` and `after` place them.
        for id in ["%23a:example.com", "%23b:example.com", "%23c:example.com?before=%23a:example.com"] {
            assert_eq!(server.request("PUT", &format!("{rules}/room/{id}"), token, Some(notify.clone())).await.0, 200, "{id}");
        }
        assert_eq!(server.request("PUT", &format!("{rules}/room/%23d:example.com?after=%23b:example.com"), token, Some(notify.clone())).await.0, 200);
        assert_eq!(server.request("PUT", &format!("{rules}/room/{}", enc(&room_id)), token, Some(json!({"actions": []}))).await.0, 200);
        let (status, listed) = server.get(&format!("{rules}/room/"), token).await;
        assert_eq!(status, 200, "{listed}");
        let order: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
        assert_eq!(order, [room_id.as_str(), "#b:example.com", "#d:example.com", "#c:example.com", "#a:example.com"]);
        let (status, rule) = server.get(&format!("{rules}/room/%23a:example.com"), token).await;
        assert_eq!((status, &rule), (200, &json!({"rule_id": "#a:example.com", "actions": ["notify"], "enabled": true, "default": false})));
        let (_, all) = server.get(&format!("{V3}/pushrules/"), token).await;
        assert_eq!(all["global"]["room"], listed, "the whole ruleset lists them too");
        let (_, global) = server.get(&format!("{rules}/"), token).await;
        assert_eq!(global["room"], listed);

        // Enabled, actions and deletion work on them as on any rule.
        let a = format!("{rules}/room/%23a:example.com");
        assert_eq!(server.request("PUT", &format!("{a}/enabled"), token, Some(json!({"enabled": false}))).await.0, 200);
        assert_eq!(server.get(&format!("{a}/enabled"), token).await.1, json!({"enabled": false}));
        assert_eq!(server.request("PUT", &format!("{a}/actions"), token, Some(json!({"actions": []}))).await.0, 200);
        assert_eq!(server.get(&format!("{a}/actions"), token).await.1, json!({"actions": []}));
        assert_eq!(server.request("DELETE", &a, token, None).await.0, 200);
        assert_error(&server.get(&a, token).await, 404, "M_NOT_FOUND");
        assert_error(&server.request("PUT", &format!("{a}/enabled"), token, Some(json!({"enabled": true}))).await, 404, "M_NOT_FOUND");

        // Sender rules likewise take any id; a relative rule must exist; ids stay bounded.
        assert_eq!(server.request("PUT", &format!("{rules}/sender/bob"), token, Some(notify.clone())).await.0, 200);
        assert_eq!(server.get(&format!("{rules}/sender/bob/actions"), token).await.1, notify);
        assert_error(&server.request("PUT", &format!("{rules}/sender/carol?before=nobody"), token, Some(notify.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/room/{}", "x".repeat(300)), token, Some(notify.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/room/%23e:example.com"), token, Some(json!({"actions": "notify"}))).await, 400, "M_BAD_JSON");
        assert_error(&server.request("PUT", &format!("{rules}/room/%23e:example.com"), token, Some(json!({}))).await, 400, "M_MISSING_PARAM");
        // Actions are the spec's (and the retired dont_notify and coalesce, which Synapse keeps).
        let unknown = json!({"actions": ["not_an_action"]});
        assert_error(&server.request("PUT", &format!("{rules}/room/%23e:example.com"), token, Some(unknown.clone())).await, 400, "M_INVALID_PARAM");
        assert_error(&server.request("PUT", &format!("{rules}/sender/bob/actions"), token, Some(unknown)).await, 400, "M_INVALID_PARAM");
        assert_eq!(server.request("PUT", &format!("{rules}/sender/bob/actions"), token, Some(json!({"actions": ["dont_notify"]}))).await.0, 200);

        // /sync carries the rules the server applies: the room-id rule, not those that match nothing.
        let (_, synced) = server.get(&format!("{V3}/sync"), token).await;
        let pushed = synced["account_data"]["events"].as_array().unwrap().iter().find(|e| e["type"] == "m.push_rules").unwrap();
        let synced_rooms: Vec<&str> = pushed["content"]["global"]["room"].as_array().unwrap().iter().map(|r| r["rule_id"].as_str().unwrap()).collect();
        assert_eq!(synced_rooms, [room_id.as_str()]);
        assert!(pushed["content"]["global"]["sender"].as_array().is_none_or(|list| list.is_empty()), "{pushed}");
        server.stop().await;
    }

    async fn pushers_go_with_the_device_that_set_them_on_logout_and_password_change(db: Db) {
        let server = server(db).await;
        let alice = server.register("alice", PW).await;
        let login = |device: &'static str| {
            let server = &server;
            async move {
                let (status, body) = server.login("alice", PW, json!({"device_id": device})).await;
                assert_eq!(status, 200, "{body}");
                crate::common::session_of(&body)
            }
        };
        let (phone, laptop) = (login("PHONE").await, login("LAPTOP").await);
        let url = "https://push.example.org/_matrix/push/v1/notify";
        for (who, key) in [(&alice, "first"), (&phone, "phone"), (&laptop, "laptop")] {
            set_pusher(&server, who, pusher_body(url, key, json!({}))).await;
        }
        assert_eq!(pushkeys(&server, &alice).await, ["first", "laptop", "phone"]);
        // Logging out deletes the device, and its pusher.
        assert_eq!(server.post(&format!("{V3}/logout"), Some(&laptop.token), json!({})).await.0, 200);
        assert_eq!(pushkeys(&server, &alice).await, ["first", "phone"]);
        // A password change that logs the other devices out deletes theirs too.
        let change = json!({"new_password": "an even better password", "auth": {"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"}, "password": PW}});
        let (status, body) = server.post(&format!("{V3}/account/password"), Some(&alice.token), change).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(pushkeys(&server, &alice).await, ["first"]);
        server.stop().await;
    }

    async fn bad_pusher_input_is_refused_with_the_reason(db: Db) {
        let gateway = Gateway::start().await;
        let strict = TestServer::start(db).await;
        let alice = strict.register("alice", PW).await;
        let set = format!("{V3}/pushers/set");
        let post = |body: Value| strict.post(&set, Some(&alice.token), body);
        let good = pusher_body("https://push.example.org/_matrix/push/v1/notify", "key", json!({}));
        let with = |field: &str, value: Value| {
            let mut body = good.clone();
            body[field] = value;
            body
        };
        for url in ["ftp://push.example.org/_matrix/push/v1/notify", "https://push.example.org/notify",
                    "https://push.example.org/_matrix/push/v1/notify/x", "nonsense", gateway.url.as_str(),
                    "http://[::1]/_matrix/push/v1/notify", "http://10.0.0.1/_matrix/push/v1/notify"] {
            assert_error(&post(with("data", json!({"url": url}))).await, 400, "M_INVALID_PARAM");
        }
        assert_error(&post(with("data", json!({}))).await, 400, "M_MISSING_PARAM");
        assert_error(&post(with("kind", json!("email"))).await, 400, "M_INVALID_PARAM");
        assert_error(&post(with("kind", json!("carrier-pigeon"))).await, 400, "M_INVALID_PARAM");
        assert_error(&post(with("app_id", json!("a".repeat(65)))).await, 400, "M_INVALID_PARAM");
        assert_error(&post(with("pushkey", json!("k".repeat(513)))).await, 400, "M_INVALID_PARAM");
        assert_error(&post(with("pushkey", json!(""))).await, 400, "M_INVALID_PARAM");
        assert_error(&post(with("data", json!({"url": "https://push.example.org/_matrix/push/v1/notify", "x": "y".repeat(9000)}))).await, 400, "M_INVALID_PARAM");
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("app_display_name");
        assert_error(&post(missing).await, 400, "M_MISSING_PARAM");
        assert_eq!(strict.get(&format!("{V3}/pushers"), Some(&alice.token)).await.1["pushers"], json!([]), "nothing refused was kept");

        // kind: null deletes; a user has at most 100 pushers.
        assert_eq!(post(good.clone()).await.0, 200);
        assert_eq!(post(json!({"kind": null, "app_id": "org.example.app", "pushkey": "key"})).await.0, 200);
        assert_eq!(strict.get(&format!("{V3}/pushers"), Some(&alice.token)).await.1["pushers"], json!([]));
        for n in 0..100 {
            assert_eq!(post(with("pushkey", json!(format!("key{n}")))).await.0, 200);
        }
        assert_error(&post(with("pushkey", json!("one too many"))).await, 400, "M_INVALID_PARAM");
        assert_eq!(post(with("pushkey", json!("key7"))).await.0, 200, "replacing one is not adding one");
        strict.stop().await;
        gateway.stop().await;
    }

    async fn a_gateway_on_a_private_address_is_never_called_unless_allowed(db: Db) {
        let gateway = Gateway::start().await;
        let strict = TestServer::start(db).await;
        let alice = strict.register("alice", PW).await;
        let bob = strict.register("bob", PW).await;
        let room = room_with(&strict, &bob, &[&alice], json!({})).await;
        // A name is only judged when it resolves: `localhost` is accepted, then never called.
        let by_name = gateway.url.replace("127.0.0.1", "localhost");
        set_pusher(&strict, &alice, pusher_body(&by_name, "sneaky", json!({}))).await;
        let message = say(&strict, &bob, &room, text("hello")).await;
        wait_notified(&strict, &alice, &message).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(gateway.received(), Vec::<Value>::new(), "a loopback gateway was called");
        // The notification was given up on, not retried for ever: the next one is too.
        let second = say(&strict, &bob, &room, text("again")).await;
        wait_notified(&strict, &alice, &second).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(gateway.received(), Vec::<Value>::new());
        strict.stop().await;
        gateway.stop().await;
    }

    async fn a_gateway_behind_a_private_ca_is_reached_when_push_trusts_that_ca(db: Db) {
        let ca = TestCa::new();
        let gateway = Gateway::start_tls(&ca).await;
        assert!(gateway.url.starts_with("https://127.0.0.1:"), "{}", gateway.url);
        let server = TestServer::start_with(db, |config| {
            config.push.allow_private_addresses = true;
            config.push.initial_backoff_ms = 100;
            config.push.extra_ca_file = ca.ca_file();
        })
        .await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        set_pusher(&server, &alice, pusher_body(&gateway.url, "alice-phone", json!({}))).await;
        let room = room_with(&server, &bob, &[&alice], json!({"room_alias_name": "tls"})).await;
        let message = say(&server, &bob, &room, text("over TLS")).await;
        let notification = gateway.notification_for(&message).await;
        assert_eq!(notification["devices"][0]["pushkey"], "alice-phone", "{notification}");
        assert_eq!(notification["devices"][0]["data"], json!({}), "data, even empty: {notification}");
        // A room without a name is named by its alias.
        assert_eq!(notification["room_name"], "#tls:localhost", "{notification}");
        server.stop().await;
        gateway.stop().await;
    }

    async fn an_extra_ca_file_that_is_missing_or_holds_no_certificate_stops_the_server(db: Db) {
        let test_db = TestDb::new(db).await;
        let empty = test_db.dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let missing = test_db.dir.join("missing.pem");
        for file in [&empty, &missing] {
            for setting in ["push.extra_ca_file", "appservices.extra_ca_file"] {
                let mut config = crate::common::test_config(&test_db);
                let path = file.display().to_string();
                match setting {
                    "push.extra_ca_file" => config.push.extra_ca_file = path.clone(),
                    _ => config.appservices.extra_ca_file = path.clone(),
                }
                let error = match homeserver::server::start(config).await {
                    Ok(_) => panic!("{setting} = {path}: the server started"),
                    Err(error) => format!("{error:#}"),
                };
                assert!(error.contains(setting) && error.contains(&path), "{setting}: {error}");
            }
        }
        test_db.remove().await;
    }

    async fn two_workers_deliver_each_notification_once(db: Db) {
        let gateway = Gateway::start().await;
        let first = server(db).await;
        let second = first.another_worker().await;
        let alice = first.register("alice", PW).await;
        let bob = first.register("bob", PW).await;
        let room = room_with(&first, &bob, &[&alice], json!({})).await;
        set_pusher(&second, &alice, pusher_body(&gateway.url, "one-device", json!({}))).await;
        let mut sent = Vec::new();
        for n in 0..12 {
            let worker = if n % 2 == 0 { &first } else { &second };
            sent.push(say(worker, &bob, &room, text(&format!("message {n}"))).await);
        }
        let last = sent.last().unwrap().clone();
        gateway.notification_for(&last).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let delivered = gateway.delivered();
        let ids: Vec<&str> = delivered.iter().filter_map(|n| n["event_id"].as_str()).collect();
        assert_eq!(ids, sent.iter().map(String::as_str).collect::<Vec<_>>(), "each once, in order");
        second.stop().await;
        first.stop().await;
        gateway.stop().await;
    }
}
