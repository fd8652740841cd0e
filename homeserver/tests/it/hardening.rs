//! What one member, or one forged token, must not be able to do to a room or to other people:
//! poison a room with an event no one can read, read history they may not see, or delete
//! messages queued for a device.

use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, assert_error},
    rooms::{create, room_path, send, sync, timeline_bodies},
};

const PW: &str = "correct horse battery";

/// `{"body": [[[ … ]]]}` with the array nested `depth` deep.
fn nested(depth: usize) -> Value {
    let mut value = json!("bottom");
    for _ in 0..depth {
        value = json!([value]);
    }
    json!({"msgtype": "m.text", "body": "deep", "deep": value})
}

async fn put(server: &TestServer, who: &Session, path: &str, body: Value) -> (u16, Value) {
    server.request("PUT", path, Some(&who.token), Some(body)).await
}

fn event_ids(events: &Value) -> Vec<String> {
    events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

async fn messages(server: &TestServer, who: &Session, room: &str) -> (u16, Value) {
    server.get(&room_path(room, "messages?dir=b&limit=100"), Some(&who.token)).await
}

/// The message bodies of a `/messages` chunk, oldest first.
fn bodies(chunk: &Value) -> Vec<String> {
    let mut bodies: Vec<String> = chunk["chunk"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect();
    bodies.reverse();
    bodies
}

/// An array nested `depth` deep as JSON text (past what serde_json parses by default).
fn deep_text(depth: usize) -> String {
    format!("{}\"bottom\"{}", "[".repeat(depth), "]".repeat(depth))
}

fn deep_value(depth: usize) -> Value {
    crate::common::parse_json(&deep_text(depth)).unwrap()
}

/// A room whose history visibility is `setting`, made by `alice`, with a message before anyone
/// else arrives.
async fn room_with(server: &TestServer, alice: &Session, setting: &str) -> String {
    let room = create(server, alice, json!({"preset": "public_chat"})).await;
    let content = json!({"history_visibility": setting});
    assert_eq!(
        put(server, alice, &room_path(&room, "state/m.room.history_visibility/"), content).await.0,
        200
    );
    assert_eq!(send(server, alice, &room, &format!("before-{setting}"), "said before").await.0, 200);
    room
}

async fn join(server: &TestServer, who: &Session, room: &str) {
    let (status, body) = server.post(&room_path(room, "join"), Some(&who.token), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

async fn invite(server: &TestServer, by: &Session, who: &Session, room: &str) {
    let (status, body) =
        server.post(&room_path(room, "invite"), Some(&by.token), json!({"user_id": who.user_id})).await;
    assert_eq!(status, 200, "{body}");
}

/// Whether `who` can read the message `body` by any of `/messages`, `/event`, `/context` and
/// an initial `/sync`; each must agree.
async fn can_read(server: &TestServer, who: &Session, room: &str, body: &str, event_id: &str) -> bool {
    let (status, page) = messages(server, who, room).await;
    let by_messages = status == 200 && bodies(&page).contains(&body.to_owned());
    let (status, _) = server.get(&room_path(room, &format!("event/{event_id}")), Some(&who.token)).await;
    let by_event = status == 200;
    let (status, context) =
        server.get(&room_path(room, &format!("context/{event_id}")), Some(&who.token)).await;
    let by_context = status == 200 && context["event"]["event_id"] == event_id;
    let initial = sync(server, who, None, 0).await;
    let by_sync = timeline_bodies(&initial, room).contains(&body.to_owned());
    let joined = initial["rooms"]["join"][room].is_object();
    if joined {
        assert_eq!(by_sync, by_messages, "{who:?}: /sync and /messages disagree on {body}");
    }
    assert_eq!(by_event, by_messages, "{who:?}: /event and /messages disagree on {body}");
    assert_eq!(by_context, by_messages, "{who:?}: /context and /messages disagree on {body}");
    by_messages
}

async fn event_of(server: &TestServer, who: &Session, room: &str, body: &str) -> String {
    let (_, page) = messages(server, who, room).await;
    page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["content"]["body"] == body)
        .and_then(|e| e["event_id"].as_str())
        .unwrap_or_else(|| panic!("{body} not in {page}"))
        .to_owned()
}

crate::on_both_backends! {
    async fn events_nested_too_deep_are_refused_at_the_door(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        for (path, label) in [
            (room_path(&room, "send/m.room.message/deep1"), "message"),
            (room_path(&room, "state/org.example.deep/key"), "state event"),
            (format!("/_matrix/client/v3/user/{}/account_data/org.example.deep", alice.user_id), "account data"),
        ] {
            let result = put(&server, &alice, &path, nested(126)).await;
            assert_error(&result, 400, "M_BAD_JSON");
            assert!(result.1["error"].as_str().unwrap().contains("nested deeper"), "{label}: {}", result.1);
        }
        // Canonical JSON: no floats, integers within ±(2^53 - 1).
        let float = put(&server, &alice, &room_path(&room, "send/m.room.message/f"), json!({"body": "x", "n": 1.5})).await;
        assert_error(&float, 400, "M_BAD_JSON");
        let huge = put(&server, &alice, &room_path(&room, "send/m.room.message/h"), json!({"body": "x", "n": 9_007_199_254_740_992_u64})).await;
        assert_error(&huge, 400, "M_BAD_JSON");
        // What is accepted is served back whole, everywhere.
        let (status, sent) = put(&server, &alice, &room_path(&room, "send/m.room.message/ok"), nested(60)).await;
        assert_eq!(status, 200, "{sent}");
        let event_id = sent["event_id"].as_str().unwrap();
        let (status, event) = server.get(&room_path(&room, &format!("event/{event_id}")), Some(&alice.token)).await;
        assert_eq!(status, 200, "{event}");
        assert_eq!(event["content"], nested(60));
        let initial = sync(&server, &alice, None, 0).await;
        assert!(timeline_bodies(&initial, &room).contains(&"deep".to_owned()));
        server.stop().await;
    }

    async fn an_event_stored_too_deep_by_an_older_version_does_not_break_its_room(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"invite": [bob.user_id]})).await;
        assert_eq!(server.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);
        let bob_since = sync(&server, &bob, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let (_, sent) = send(&server, &alice, &room, "poison", "to be poisoned").await;
        let poison = sent["event_id"].as_str().unwrap().to_owned();
        let (_, state) = put(&server, &alice, &room_path(&room, "state/org.example.deep/key"), json!({"x": 1})).await;
        let poison_state = state["event_id"].as_str().unwrap().to_owned();
        send(&server, &alice, &room, "after", "after the poison").await;
        // 126 arrays deep, as an older version stored it: what broke every reader of the room.
        let pool = sqlx::AnyPool::connect(&server.server.state.config.database_url()).await.unwrap();
        for id in [&poison, &poison_state] {
            let json: String = sqlx::query_scalar::<_, String>("SELECT json FROM events WHERE event_id = $1")
                .bind(id.as_str()).fetch_one(&pool).await.unwrap();
            let poisoned = json.replacen("\"content\":{", &format!("\"content\":{{\"deep\":{},", deep_text(126)), 1);
            assert_ne!(json, poisoned);
            sqlx::query("UPDATE events SET json = $2 WHERE event_id = $1")
                .bind(id.as_str()).bind(poisoned).execute(&pool).await.unwrap();
        }
        pool.close().await;
        // A fresh server on the database, so nothing is served from memory.
        let other = server.another_worker().await;
        for who in [&alice, &bob] {
            let (status, page) = messages(&other, who, &room).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(bodies(&page), ["to be poisoned", "after the poison"]);
            let (status, event) = other.get(&room_path(&room, &format!("event/{poison}")), Some(&who.token)).await;
            assert_eq!(status, 200, "{event}");
            assert_eq!(event["content"]["deep"], deep_value(126));
            let (status, context) = other.get(&room_path(&room, &format!("context/{poison}")), Some(&who.token)).await;
            assert_eq!(status, 200, "{context}");
            let (status, state) = other.get(&room_path(&room, "state"), Some(&who.token)).await;
            assert_eq!(status, 200, "{state}");
            let initial = sync(&other, who, None, 0).await;
            assert!(timeline_bodies(&initial, &room).contains(&"after the poison".to_owned()));
        }
        let incremental = sync(&other, &bob, Some(&bob_since), 0).await;
        assert!(timeline_bodies(&incremental, &room).contains(&"to be poisoned".to_owned()), "{incremental}");
        // The poisoned events can be redacted, and the room goes on.
        let redact = other.request("PUT", &room_path(&room, &format!("redact/{poison}/r1")), Some(&alice.token), Some(json!({}))).await;
        assert_eq!(redact.0, 200, "{}", redact.1);
        let (status, event) = other.get(&room_path(&room, &format!("event/{poison}")), Some(&bob.token)).await;
        assert_eq!(status, 200);
        assert_eq!(event["content"], json!({}));
        assert_eq!(send(&other, &bob, &room, "later", "still chatting").await.0, 200);
        other.stop().await;
        server.stop().await;
    }

    async fn history_visibility_is_enforced_on_every_read(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;

        // joined: a later joiner reads from their join on, not what was said before.
        let room = room_with(&server, &alice, "joined").await;
        let before = event_of(&server, &alice, &room, "said before").await;
        join(&server, &bob, &room).await;
        send(&server, &alice, &room, "after", "said after").await;
        let after = event_of(&server, &alice, &room, "said after").await;
        assert!(!can_read(&server, &bob, &room, "said before", &before).await);
        assert!(can_read(&server, &bob, &room, "said after", &after).await);
        let (_, context) = server.get(&room_path(&room, &format!("context/{after}")), Some(&bob.token)).await;
        assert!(!event_ids(&context["events_before"]).contains(&before), "{context}");

        // invited: readable from the invite on.
        let room = room_with(&server, &alice, "invited").await;
        let before = event_of(&server, &alice, &room, "said before").await;
        invite(&server, &alice, &carol, &room).await;
        send(&server, &alice, &room, "invited", "said while invited").await;
        let while_invited = event_of(&server, &alice, &room, "said while invited").await;
        join(&server, &carol, &room).await;
        assert!(!can_read(&server, &carol, &room, "said before", &before).await);
        assert!(can_read(&server, &carol, &room, "said while invited", &while_invited).await);

        // shared: a member reads everything, but one who left reads nothing said after leaving.
        let room = room_with(&server, &alice, "shared").await;
        let before = event_of(&server, &alice, &room, "said before").await;
        join(&server, &bob, &room).await;
        assert!(can_read(&server, &bob, &room, "said before", &before).await);
        assert_eq!(server.post(&room_path(&room, "leave"), Some(&bob.token), json!({})).await.0, 200);
        send(&server, &alice, &room, "gone", "said after bob left").await;
        let after_leave = event_of(&server, &alice, &room, "said after bob left").await;
        assert!(!can_read(&server, &bob, &room, "said after bob left", &after_leave).await);

        // world_readable: anyone, member or not.
        let room = room_with(&server, &alice, "world_readable").await;
        let before = event_of(&server, &alice, &room, "said before").await;
        assert!(can_read(&server, &carol, &room, "said before", &before).await);
        server.stop().await;
    }

    async fn people_who_never_joined_read_no_history(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let rejecter = server.register("rejecter", PW).await;
        let kicked = server.register("kicked", PW).await;
        let banned = server.register("banned", PW).await;
        let room = create(&server, &alice, json!({})).await;
        send(&server, &alice, &room, "secret", "private history").await;
        let secret = event_of(&server, &alice, &room, "private history").await;
        invite(&server, &alice, &rejecter, &room).await;
        assert_eq!(server.post(&room_path(&room, "leave"), Some(&rejecter.token), json!({})).await.0, 200);
        invite(&server, &alice, &kicked, &room).await;
        let kick = server.post(&room_path(&room, "kick"), Some(&alice.token), json!({"user_id": kicked.user_id})).await;
        assert_eq!(kick.0, 200, "{}", kick.1);
        let ban = server.post(&room_path(&room, "ban"), Some(&alice.token), json!({"user_id": banned.user_id})).await;
        assert_eq!(ban.0, 200, "{}", ban.1);
        send(&server, &alice, &room, "secret2", "more private history").await;
        for who in [&rejecter, &kicked, &banned] {
            let (status, page) = messages(&server, who, &room).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(bodies(&page), Vec::<String>::new(), "{who:?} read {page}");
            // They do see what happened to their own membership.
            assert!(page["chunk"].as_array().unwrap().iter().any(|e| e["state_key"] == who.user_id.as_str()), "{page}");
            let (status, _) = server.get(&room_path(&room, &format!("event/{secret}")), Some(&who.token)).await;
            assert_eq!(status, 404);
        }
        // Someone with no part in the room at all is refused outright.
        let stranger = server.register("stranger", PW).await;
        assert_error(&messages(&server, &stranger, &room).await, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn a_sync_token_cursor_only_acknowledges_what_its_device_received(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let (_, login) = server.login("alice", PW, json!({"device_id": "SECOND"})).await;
        let second = crate::common::session_of(&login);
        let bob = server.register("bob", PW).await;
        let first = alice.device_id.as_str();
        assert_eq!(to_device(&server, &bob, &alice, "t1", first, 1).await.0, 200);
        assert_eq!(to_device(&server, &bob, &alice, "t2", "SECOND", 2).await.0, 200);
        let delivered = sync(&server, &alice, None, 0).await;
        let token = delivered["next_batch"].as_str().unwrap().to_owned();
        assert!(token.contains("_t"), "the response carried a message, so its token a cursor: {token}");
        assert_eq!(to_device(&server, &bob, &alice, "t3", first, 3).await.0, 200);
        let (position, _) = token.split_once('_').unwrap();
        // Forged cursors: far ahead, tampered, unsealed. Each is refused and deletes nothing.
        let forged = [
            format!("{position}_t99999999999999-0"),
            format!("{position}_t99999999999999"),
            format!("{}0", token),
            format!("{position}_t{}", "f".repeat(40)),
        ];
        for since in &forged {
            let path = format!("/_matrix/client/v3/sync?since={}&timeout=0", urlencode(since));
            assert_error(&server.get(&path, Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        }
        // Another device's cursor is refused on this one: SECOND still has its message.
        let path = format!("/_matrix/client/v3/sync?since={}&timeout=0", urlencode(&token));
        assert_error(&server.get(&path, Some(&second.token)).await, 400, "M_INVALID_PARAM");
        let seconds = sync(&server, &second, None, 0).await;
        assert_eq!(seconds["to_device"]["events"][0]["content"]["n"], 2, "{seconds}");
        // The real token acknowledges what was delivered, and the next message still comes.
        let next = sync(&server, &alice, Some(&urlencode(&token)), 0).await;
        let events = next["to_device"]["events"].as_array().unwrap();
        assert_eq!(events.iter().map(|e| e["content"]["n"].clone()).collect::<Vec<_>>(), [json!(3)], "{next}");
        server.stop().await;
    }

    async fn a_stopped_server_retires_its_stream_writer(db: Db) {
        let test_db = crate::common::TestDb::new(db).await;
        let server = TestServer::start_on(&test_db, |_| {}).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        for n in 0..5 {
            assert_eq!(send(&server, &alice, &room, &format!("t{n}"), "hello").await.0, 200);
        }
        let url = server.server.state.config.database_url();
        server.stop().await;
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let rows: i64 = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM stream_writers").fetch_one(&pool).await.unwrap();
        assert_eq!(rows, 0, "a graceful stop removes the writer's row");
        pool.close().await;
        test_db.remove().await;
    }

    async fn behind_a_trusted_proxy_connections_per_address_are_not_capped(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.limits.connections_per_ip = 1;
            c.listen.trust_x_forwarded_for = true;
        })
        .await;
        let alice = server.register("alice", PW).await;
        // Every connection comes from the proxy's address: capping it would cap everyone.
        let held = [trickling(&server, &alice.token).await, trickling(&server, &alice.token).await];
        let from_proxy = reqwest::Client::builder().local_address(std::net::IpAddr::from(SLOW_CLIENT)).build().unwrap();
        let response = from_proxy.get(format!("{}/_matrix/client/versions", server.base)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        drop(held);
        server.stop().await;
    }

    async fn slow_clients_cannot_hold_every_connection(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.limits.connections_per_ip = 4;
            c.limits.body_timeout_secs = 2;
        })
        .await;
        let alice = server.register("alice", PW).await;
        let slow_client = || {
            reqwest::Client::builder().local_address(std::net::IpAddr::from(SLOW_CLIENT)).build().unwrap()
        };
        let mut stalled = Vec::new();
        for _ in 0..4 {
            stalled.push(trickling(&server, &alice.token).await);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // A fifth connection from the same address is turned away at once; others are served.
        let response = slow_client().get(format!("{}/_matrix/client/versions", server.base)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(server.get("/_matrix/client/versions", None).await.0, 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED");
        // The stalled bodies time out...
        for stream in &mut stalled {
            let status = answer(stream).await;
            assert!(status.starts_with("HTTP/1.1 408"), "{status}");
        }
        drop(stalled);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // ...and with their connections gone, the address is served again.
        let response = slow_client().get(format!("{}/_matrix/client/versions", server.base)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        server.stop().await;
    }
}

async fn to_device(
    server: &TestServer,
    from: &Session,
    to: &Session,
    txn: &str,
    device: &str,
    n: usize,
) -> (u16, Value) {
    let messages = json!({ to.user_id.clone(): { device: {"n": n} } });
    let path = format!("/_matrix/client/v3/sendToDevice/org.example.test/{txn}");
    server.request("PUT", &path, Some(&from.token), Some(json!({"messages": messages}))).await
}

fn urlencode(s: &str) -> String {
    s.replace('%', "%25").replace('+', "%2B").replace(' ', "%20")
}

/// The address the slow client connects from (all of 127/8 is loopback), so that no other
/// connection of the test counts against its limit.
const SLOW_CLIENT: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// Opens a connection that sends a request's headers and the first byte of its body, then
/// stalls: a client trickling its body.
async fn trickling(server: &TestServer, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((SLOW_CLIENT, 0).into()).unwrap();
    let mut stream = socket.connect(server.server.addr).await.unwrap();
    let head = format!(
        "PUT /_matrix/client/v3/user/%40a%3Alocalhost/account_data/x HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// What the server answered on a raw connection (its status line), once it answers.
async fn answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buffer = vec![0u8; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), stream.read(&mut buffer))
        .await
        .expect("the server answers a stalled body within its body timeout")
        .unwrap();
    String::from_utf8_lossy(&buffer[..read]).lines().next().unwrap_or_default().to_owned()
}

/// With Redis, a limit holds for the deployment: two workers spend from the same buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_shared_by_the_workers_of_a_deployment() {
    let first = TestServer::start_with(Db::Postgres, |c| {
        c.rate_limits.enabled = true;
        c.rate_limits.login_burst = 4;
        c.rate_limits.login_per_second = 0.001;
    })
    .await;
    let second = first.another_worker().await;
    first.register("alice", PW).await;
    let mut answers = Vec::new();
    for attempt in 0..6 {
        let worker = if attempt % 2 == 0 { &first } else { &second };
        answers.push(worker.login("alice", PW, json!({})).await.0);
    }
    assert_eq!(answers, [200, 200, 200, 200, 429, 429], "one budget of 4 logins for both workers");
    second.stop().await;
    first.stop().await;
}

/// A TCP relay to Postgres that the test can cut: while cut, it refuses new connections and has
/// dropped the open ones, as a database that went away would.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn open(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, task }
    }

    /// Cuts every connection and refuses new ones (the JoinSet dies with the task).
    fn cut(self) -> u16 {
        self.task.abort();
        self.port
    }
}

/// Postgres refusing connections is `503` with a retry hint, not `500`; service comes back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_and_service_resumes() {
    let relay = Relay::open(0).await;
    let db = crate::common::TestDb::new(Db::Postgres).await;
    let url = db.url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    assert_ne!(url, db.url, "the test database goes through the relay");
    let server = TestServer::start_on(&db, |c| c.database.url = url).await;
    let alice = server.register("alice", PW).await;
    let room = create(&server, &alice, json!({})).await;
    let port = relay.cut();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for (method, path) in [
        ("PUT", room_path(&room, "send/m.room.message/outage")),
        ("GET", room_path(&room, "messages?dir=b")),
        ("GET", "/_matrix/client/v3/sync".to_owned()),
    ] {
        let body = (method == "PUT").then(|| json!({"msgtype": "m.text", "body": "during the outage"}));
        let result = server.request(method, &path, Some(&alice.token), body).await;
        assert_error(&result, 503, "M_UNKNOWN");
        assert!(result.1["error"].as_str().unwrap().contains("retry"), "{}", result.1);
    }
    let relay = Relay::open(port).await;
    let mut sent = (0, Value::Null);
    for _ in 0..100 {
        sent = send(&server, &alice, &room, "after-outage", "after the outage").await;
        if sent.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sent.0, 200, "service resumes with the database: {}", sent.1);
    let (status, page) = messages(&server, &alice, &room).await;
    assert_eq!(status, 200);
    assert_eq!(bodies(&page), ["after the outage"]);
    server.stop().await;
    relay.cut();
    db.remove().await;
}

/// Redis out of reach costs to-device messages a delay, not everyone their `/sync`; nothing
/// queued is lost or repeated when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_is_served_while_redis_is_down() {
    let db = crate::common::TestDb::new(Db::Postgres).await;
    let redis =
        crate::durability::RedisProcess::start(db.dir.join("redis"), crate::interop::free_port()).await;
    let redis_url = redis.url();
    let server = TestServer::start_on(&db, |c| c.redis.url = redis_url).await;
    let alice = server.register("alice", PW).await;
    let bob = server.register("bob", PW).await;
    let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
    assert_eq!(server.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);
    assert_eq!(to_device(&server, &bob, &alice, "before", &alice.device_id, 1).await.0, 200);
    let first = sync(&server, &alice, None, 0).await;
    assert_eq!(first["to_device"]["events"][0]["content"]["n"], 1, "{first}");
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let (dir, port) = redis.kill9().await;
    // Room messages and syncs go on without Redis.
    assert_eq!(send(&server, &bob, &room, "redis-down", "while redis is down").await.0, 200);
    let during = sync(&server, &alice, Some(&urlencode(&since)), 0).await;
    assert!(timeline_bodies(&during, &room).contains(&"while redis is down".to_owned()), "{during}");
    let since = during["next_batch"].as_str().unwrap().to_owned();
    let redis = crate::durability::RedisProcess::start(dir, port).await;
    assert_eq!(to_device(&server, &bob, &alice, "after", &alice.device_id, 2).await.0, 200);
    // The first message was delivered before the outage: acknowledged now, never repeated. The
    // second may wait for the server's reconnection (a sync then goes without to-device
    // messages, as during the outage), so a few syncs are allowed to bring it.
    let mut since = since;
    let mut ns: Vec<Value> = Vec::new();
    for _ in 0..20 {
        let after = sync(&server, &alice, Some(&urlencode(&since)), 500).await;
        let events = after["to_device"]["events"].as_array().cloned().unwrap_or_default();
        ns.extend(events.iter().map(|e| e["content"]["n"].clone()));
        since = after["next_batch"].as_str().unwrap().to_owned();
        if !ns.is_empty() {
            break;
        }
    }
    assert_eq!(ns, [json!(2)], "the message sent after the outage, once");
    server.stop().await;
    drop(redis);
    db.remove().await;
}
