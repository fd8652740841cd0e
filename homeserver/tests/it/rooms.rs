//! Rooms over HTTP: creating, joining, chatting, permissions, history and sync.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error};

const PW: &str = "correct horse battery";

pub(crate) fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", percent(room))
}

fn percent(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('$', "%24").replace('@', "%40")
}

pub(crate) async fn create(server: &TestServer, who: &Session, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

pub(crate) async fn send(
    server: &TestServer,
    who: &Session,
    room: &str,
    txn: &str,
    body: &str,
) -> (u16, Value) {
    server
        .request(
            "PUT",
            &room_path(room, &format!("send/m.room.message/{txn}")),
            Some(&who.token),
            Some(json!({"msgtype": "m.text", "body": body})),
        )
        .await
}

pub(crate) async fn sync(server: &TestServer, who: &Session, since: Option<&str>, timeout_ms: u64) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?since={since}&timeout={timeout_ms}"),
        None => "/_matrix/client/v3/sync".to_owned(),
    };
    let (status, body) = server.get(&path, Some(&who.token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(crate) fn timeline_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .map(|e| e["content"]["body"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Incremental syncs with a filter, on a server whose in-memory window holds `recent_changes`.
async fn filtered_syncs(db: Db, recent_changes: usize) {
    let server = TestServer::start_with(db, |config| config.limits.recent_changes = recent_changes).await;
    let alice = server.register("alice", PW).await;
    let bob = server.register("bob", PW).await;
    let chat = create(&server, &alice, json!({"invite": [bob.user_id]})).await;
    let other = create(&server, &alice, json!({"invite": [bob.user_id]})).await;
    for room in [&chat, &other] {
        assert_eq!(server.post(&room_path(room, "join"), Some(&bob.token), json!({})).await.0, 200);
    }
    let since = sync(&server, &bob, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    for n in 0..12 {
        assert_eq!(send(&server, &alice, &chat, &format!("a{n}"), &format!("alice {n}")).await.0, 200);
        if n % 4 == 0 {
            let ping = room_path(&chat, &format!("send/org.example.ping/p{n}"));
            assert_eq!(server.request("PUT", &ping, Some(&alice.token), Some(json!({"n": n}))).await.0, 200);
            assert_eq!(send(&server, &bob, &chat, &format!("b{n}"), &format!("bob {n}")).await.0, 200);
        }
    }
    assert_eq!(send(&server, &alice, &other, "o1", "elsewhere").await.0, 200);
    let filtered = |filter: Value| {
        let filter = percent_encode(&filter.to_string());
        let (server, bob, since) = (&server, &bob, since.clone());
        async move {
            let (status, body) = server
                .get(
                    &format!("/_matrix/client/v3/sync?since={since}&timeout=0&filter={filter}"),
                    Some(&bob.token),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };

    // Only messages, not bob's own, only the chat room: the newest five, and more are left out.
    let update = filtered(json!({"room": {"rooms": [chat], "timeline": {"limit": 5, "types": ["m.room.message"], "not_senders": [bob.user_id]}}})).await;
    assert!(update["rooms"]["join"].get(&other).is_none(), "rooms outside the filter are left out: {update}");
    let timeline = &update["rooms"]["join"][&chat]["timeline"];
    assert_eq!(timeline_bodies(&update, &chat), ["alice 7", "alice 8", "alice 9", "alice 10", "alice 11"]);
    assert_eq!(timeline["events"].as_array().unwrap().len(), 5, "{timeline}");
    assert_eq!(timeline["limited"], true);
    // Paging back from prev_batch with the same filter finds the rest.
    let prev = timeline["prev_batch"].as_str().unwrap();
    let page_filter =
        percent_encode(&json!({"types": ["m.room.message"], "not_senders": [bob.user_id]}).to_string());
    let (_, page) = server
        .get(
            &format!("{}?dir=b&from={prev}&limit=10&filter={page_filter}", room_path(&chat, "messages")),
            Some(&bob.token),
        )
        .await;
    let bodies: Vec<&str> =
        page["chunk"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap()).collect();
    assert_eq!(bodies[..3], ["alice 6", "alice 5", "alice 4"]);

    // A type prefix: all three pings and nothing else, complete.
    let pings = filtered(json!({"room": {"timeline": {"types": ["org.example.*"]}}})).await;
    let timeline = &pings["rooms"]["join"][&chat]["timeline"];
    let kinds: Vec<&str> =
        timeline["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["org.example.ping"; 3], "{timeline}");
    assert!(!timeline["limited"].as_bool().unwrap_or(false), "nothing left out (false may be omitted)");
    assert!(
        pings["rooms"]["join"].get(&other).is_none(),
        "a room with nothing that passes is not sent: {pings}"
    );

    // Without a filter the default limit of ten applies to everything.
    let plain = sync(&server, &bob, Some(&since), 0).await;
    assert_eq!(plain["rooms"]["join"][&chat]["timeline"]["events"].as_array().unwrap().len(), 10);
    assert_eq!(timeline_bodies(&plain, &other), ["elsewhere"]);

    // A redaction reaches events a sync already read: the same range read again shows it redacted.
    let last =
        plain["rooms"]["join"][&chat]["timeline"]["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"]["body"], "alice 11");
    let redact = room_path(&chat, &format!("redact/{}/r1", percent(last["event_id"].as_str().unwrap())));
    assert_eq!(server.request("PUT", &redact, Some(&alice.token), Some(json!({}))).await.0, 200);
    let again = sync(&server, &bob, Some(&since), 0).await;
    let events = again["rooms"]["join"][&chat]["timeline"]["events"].as_array().unwrap().clone();
    let redacted = events.iter().find(|e| e["event_id"] == last["event_id"]).expect("still in the timeline");
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    assert_eq!(events.last().unwrap()["type"], "m.room.redaction");
    server.stop().await;
}

/// With Redis (as the Postgres tests run), a write on one worker wakes the long-polls held by
/// another; without it they would wait for their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_wake_across_workers() {
    let a = TestServer::start(Db::Postgres).await;
    let b = a.another_worker().await;
    let alice = a.register("alice", PW).await;
    let room = create(&a, &alice, json!({})).await;
    let since = sync(&b, &alice, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let waiting = b.long_poll(&alice.token, &since);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the sync on worker b waits");
    assert_eq!(send(&a, &alice, &room, "t1", "from worker a").await.0, 200);
    // Far less than the sync's two-minute timeout: only a wake ends it in time.
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("worker b's long-poll was woken by worker a's write")
        .unwrap();
    assert_eq!(timeline_bodies(&woken, &room), ["from worker a"]);

    // Typing and presence live in memory; they reach the other worker whole.
    let bob = a.register("bob", PW).await;
    assert_eq!(
        a.post(&room_path(&room, "invite"), Some(&alice.token), json!({"user_id": bob.user_id})).await.0,
        200
    );
    assert_eq!(a.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);
    let mut since = sync(&b, &bob, None, 0).await["next_batch"].as_str().unwrap().to_owned();
    let typing = room_path(&room, &format!("typing/{}", percent(&alice.user_id)));
    let (status, _) =
        a.request("PUT", &typing, Some(&alice.token), Some(json!({"typing": true, "timeout": 20000}))).await;
    assert_eq!(status, 200);
    let presence = format!("/_matrix/client/v3/presence/{}/status", percent(&alice.user_id));
    let (status, _) = a
        .request(
            "PUT",
            &presence,
            Some(&alice.token),
            Some(json!({"presence": "unavailable", "status_msg": "lunch"})),
        )
        .await;
    assert_eq!(status, 200);
    let (mut seen_typing, mut seen_presence) = (false, false);
    for _ in 0..10 {
        let update = sync(&b, &bob, Some(&since), 5000).await;
        let ephemeral =
            update["rooms"]["join"][&room]["ephemeral"]["events"].as_array().cloned().unwrap_or_default();
        seen_typing |= ephemeral
            .iter()
            .any(|e| e["type"] == "m.typing" && e["content"]["user_ids"] == json!([alice.user_id]));
        let presence = update["presence"]["events"].as_array().cloned().unwrap_or_default();
        seen_presence |= presence
            .iter()
            .any(|e| e["sender"] == alice.user_id.as_str() && e["content"]["status_msg"] == "lunch");
        since = update["next_batch"].as_str().unwrap().to_owned();
        if seen_typing && seen_presence {
            break;
        }
    }
    assert!(seen_typing, "alice typing through worker a is seen on worker b");
    assert!(seen_presence, "alice's presence set through worker a is seen on worker b");

    // To-device messages queued through worker a wake bob's long-poll on worker b.
    let since = sync(&b, &bob, Some(&since), 0).await["next_batch"].as_str().unwrap().to_owned();
    let waiting = b.long_poll(&bob.token, &since);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "bob's sync on worker b waits");
    let body = json!({"messages": {bob.user_id.clone(): {"*": {"note": "across workers"}}}});
    let (status, _) = a
        .request("PUT", "/_matrix/client/v3/sendToDevice/org.example/x1", Some(&alice.token), Some(body))
        .await;
    assert_eq!(status, 200);
    let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("worker b's long-poll was woken by a message queued through worker a")
        .unwrap();
    assert_eq!(woken["to_device"]["events"][0]["content"]["note"], "across workers", "{woken}");
    b.stop().await;
    a.stop().await;
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

crate::on_both_backends! {
    async fn redacting_an_event_of_another_room_or_of_none_is_400_and_redacts_nothing(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let alices = create(&server, &alice, json!({})).await;
        let bobs = create(&server, &bob, json!({})).await;
        let (_, sent) = send(&server, &alice, &alices, "t1", "keep me").await;
        let event_id = sent["event_id"].as_str().unwrap().to_owned();
        let redact = |room: &str, event: &str, txn: &str| room_path(room, &format!("redact/{}/{txn}", percent(event)));
        // Bob, in his own room, names alice's event; or an event that does not exist: the same 400.
        let elsewhere = server.request("PUT", &redact(&bobs, &event_id, "r1"), Some(&bob.token), Some(json!({}))).await;
        assert_error(&elsewhere, 400, "M_INVALID_PARAM");
        let unknown = server.request("PUT", &redact(&bobs, "$nothing", "r2"), Some(&bob.token), Some(json!({}))).await;
        assert_error(&unknown, 400, "M_INVALID_PARAM");
        let (status, event) = server.get(&room_path(&alices, &format!("event/{}", percent(&event_id))), Some(&alice.token)).await;
        assert_eq!((status, &event["content"]["body"]), (200, &json!("keep me")));
        server.stop().await;
    }

    async fn an_event_of_a_room_one_may_not_read_is_404_like_one_that_does_not_exist(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "private_chat"})).await;
        let (_, sent) = send(&server, &alice, &room, "t1", "private").await;
        let path = room_path(&room, &format!("event/{}", percent(sent["event_id"].as_str().unwrap())));
        assert_error(&server.get(&path, Some(&bob.token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&room_path(&room, "event/%24nothing"), Some(&bob.token)).await, 404, "M_NOT_FOUND");
        assert_eq!(server.get(&path, Some(&alice.token)).await.0, 200);
        server.stop().await;
    }

    async fn a_departed_member_reads_the_room_as_it_was_when_they_left(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &bob, json!({"preset": "public_chat", "name": "before"})).await;
        assert_eq!(server.post(&room_path(&room, "join"), Some(&alice.token), json!({})).await.0, 200);
        for n in 1..=2 {
            assert_eq!(send(&server, &bob, &room, &format!("m{n}"), &format!("M{n} before")).await.0, 200);
        }
        assert_eq!(server.post(&room_path(&room, "leave"), Some(&alice.token), json!({})).await.0, 200);
        assert_eq!(send(&server, &bob, &room, "m3", "M3 after").await.0, 200);
        let (status, _) = server.request("PUT", &room_path(&room, "state/m.room.name/"), Some(&bob.token),
            Some(json!({"name": "after"}))).await;
        assert_eq!(status, 200);

        let (status, page) = server.get(&room_path(&room, "messages?dir=b&limit=2"), Some(&alice.token)).await;
        assert_eq!(status, 200, "{page}");
        let chunk = page["chunk"].as_array().unwrap();
        assert_eq!(chunk.len(), 2, "the page is filled from what alice may read: {page}");
        assert_eq!(chunk[0]["content"]["membership"], "leave");
        assert_eq!(chunk[1]["content"]["body"], "M2 before");
        assert!(page["end"].is_string(), "more before: {page}");
        let (status, name) = server.get(&room_path(&room, "state/m.room.name/"), Some(&alice.token)).await;
        assert_eq!((status, &name["name"]), (200, &json!("before")), "the name when alice left");
        let (status, state) = server.get(&room_path(&room, "state"), Some(&alice.token)).await;
        assert_eq!(status, 200);
        assert!(state.as_array().unwrap().iter().all(|e| e["content"]["name"] != "after"), "{state}");
        let (status, members) = server.get(&room_path(&room, "members"), Some(&alice.token)).await;
        assert_eq!(status, 200);
        let own = members["chunk"].as_array().unwrap().iter().find(|e| e["state_key"] == alice.user_id.as_str()).unwrap();
        assert_eq!(own["content"]["membership"], "leave");
        // Someone never in the room reads nothing of it.
        assert_error(&server.get(&room_path(&room, "state"), Some(&carol.token)).await, 403, "M_FORBIDDEN");
        assert_error(&server.get(&room_path(&room, "members"), Some(&carol.token)).await, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn events_of_rooms_one_was_never_in_are_not_found_and_redactions_stay_in_their_room(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let carol = server.register("carol", PW).await;
        let private = create(&server, &alice, json!({"preset": "private_chat"})).await;
        let other = create(&server, &alice, json!({"preset": "private_chat"})).await;
        let (_, sent) = send(&server, &alice, &private, "p1", "private").await;
        let event_id = sent["event_id"].as_str().unwrap().to_owned();
        let event_path = room_path(&private, &format!("event/{}", percent(&event_id)));
        assert_error(&server.get(&event_path, Some(&carol.token)).await, 404, "M_NOT_FOUND");
        // Alice names an event of one room in another: a bad request, as she is in both.
        let (status, body) = server.request("PUT", &room_path(&other, &format!("redact/{}/r1", percent(&event_id))),
            Some(&alice.token), Some(json!({}))).await;
        assert_error(&(status, body), 400, "M_INVALID_PARAM");
        let (status, event) = server.get(&event_path, Some(&alice.token)).await;
        assert_eq!((status, &event["content"]["body"]), (200, &json!("private")), "not redacted");
        server.stop().await;
    }

    async fn sync_filters_from_memory(db: Db) {
        filtered_syncs(db, 20_000).await;
    }

    /// A window of three changes cannot hold the range: every read falls back to the database.
    async fn sync_filters_from_the_database(db: Db) {
        filtered_syncs(db, 3).await;
    }

    async fn two_users_chat(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"name": "Tea", "topic": "brewing", "invite": [bob.user_id]})).await;

        let first = sync(&server, &bob, None, 0).await;
        let invite = &first["rooms"]["invite"][&room]["invite_state"]["events"];
        assert!(invite.as_array().unwrap().iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Tea"));
        let since = first["next_batch"].as_str().unwrap().to_owned();

        assert_eq!(server.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);
        let (status, sent) = send(&server, &alice, &room, "t1", "hello bob").await;
        assert_eq!(status, 200);
        let again = send(&server, &alice, &room, "t1", "hello bob").await;
        assert_eq!(again.1["event_id"], sent["event_id"], "a retried transaction is the same event");
        assert_eq!(send(&server, &bob, &room, "t1", "hi alice").await.0, 200);

        let update = sync(&server, &bob, Some(&since), 0).await;
        let joined = &update["rooms"]["join"][&room];
        assert_eq!(timeline_bodies(&update, &room), ["hello bob", "hi alice"]);
        assert!(joined["state"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"), "a newly joined room comes with its state");

        // Alice sees Bob's message in an incremental sync.
        let alice_first = sync(&server, &alice, None, 0).await;
        assert_eq!(timeline_bodies(&alice_first, &room), ["hello bob", "hi alice"]);
        let alice_since = alice_first["next_batch"].as_str().unwrap().to_owned();
        assert_eq!(send(&server, &bob, &room, "t2", "more").await.0, 200);
        let next = sync(&server, &alice, Some(&alice_since), 0).await;
        assert_eq!(timeline_bodies(&next, &room), ["more"]);
        // Notification counts follow the push rules and reset with a read receipt.
        let counts = &next["rooms"]["join"][&room]["unread_notifications"];
        assert_eq!(counts["notification_count"], 2, "bob's two messages since alice's last receipt: {counts}");
        let (_, mention) = server
            .request("PUT", &room_path(&room, "send/m.room.message/t3"), Some(&bob.token),
                Some(json!({"msgtype": "m.text", "body": "hey alice, look", "m.mentions": {"user_ids": [alice.user_id]}})))
            .await;
        let mentioned = sync(&server, &alice, next["next_batch"].as_str(), 0).await;
        let counts = &mentioned["rooms"]["join"][&room]["unread_notifications"];
        // Two highlights: the mention, and "hi alice", which names her (the legacy content rule
        // the server's defaults keep, as Synapse's).
        assert_eq!((counts["notification_count"].as_u64(), counts["highlight_count"].as_u64()), (Some(3), Some(2)), "{counts}");
        let receipt = format!("{}/{}", room_path(&room, "receipt/m.read"), mention["event_id"].as_str().unwrap().replace('$', "%24"));
        assert_eq!(server.post(&receipt, Some(&alice.token), json!({})).await.0, 200);
        let read = sync(&server, &alice, mentioned["next_batch"].as_str(), 0).await;
        assert_eq!(read["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0);
        let next = read;
        let nothing = sync(&server, &alice, next["next_batch"].as_str(), 0).await;
        assert!(nothing["rooms"]["join"].get(&room).is_none(), "nothing new, nothing sent: {nothing}");

        // Paginate back through all of it.
        let (status, page) = server.get(&format!("{}?dir=b&limit=2", room_path(&room, "messages")), Some(&bob.token)).await;
        assert_eq!(status, 200, "{page}");
        let bodies: Vec<&str> = page["chunk"].as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap_or("")).collect();
        assert_eq!(bodies, ["hey alice, look", "more"]);
        let mut all = Vec::new();
        let mut from = page["start"].as_str().unwrap().to_owned();
        loop {
            let (_, page) = server.get(&format!("{}?dir=b&limit=3&from={from}", room_path(&room, "messages")), Some(&bob.token)).await;
            all.extend(page["chunk"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()));
            match page["end"].as_str() {
                Some(end) => from = end.to_owned(),
                None => break,
            }
        }
        assert_eq!(all.first().map(String::as_str), Some("m.room.message"));
        assert_eq!(all.last().map(String::as_str), Some("m.room.create"), "back to the start of the room");
        // Filters narrow a page: only messages, only from bob.
        let filter = "%7B%22types%22%3A%5B%22m.room.message%22%5D%2C%22senders%22%3A%5B%22%40bob%3Alocalhost%22%5D%7D";
        let (status, filtered) = server.get(&format!("{}?dir=b&limit=50&filter={filter}", room_path(&room, "messages")), Some(&bob.token)).await;
        assert_eq!(status, 200, "{filtered}");
        let kinds: Vec<(&str, &str)> = filtered["chunk"].as_array().unwrap().iter()
            .map(|e| (e["type"].as_str().unwrap(), e["sender"].as_str().unwrap())).collect();
        assert!(!kinds.is_empty() && kinds.iter().all(|k| *k == ("m.room.message", "@bob:localhost")), "{kinds:?}");
        let (_, members) = server.get(&room_path(&room, "joined_members"), Some(&bob.token)).await;
        let joined: BTreeMap<String, Value> = serde_json::from_value(members["joined"].clone()).unwrap();
        assert_eq!(joined.keys().cloned().collect::<Vec<_>>(), ["@alice:localhost", "@bob:localhost"]);
        let (_, rooms) = server.get("/_matrix/client/v3/joined_rooms", Some(&bob.token)).await;
        assert_eq!(rooms["joined_rooms"], json!([room]));
        server.stop().await;
    }

    async fn long_poll_wakes_on_new_events(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let since = sync(&server, &alice, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let waiting = {
            let (base, token, since) = (server.base.clone(), alice.token.clone(), since.clone());
            tokio::spawn(async move {
                reqwest::Client::new()
                    .get(format!("{base}/_matrix/client/v3/sync?since={since}&timeout=60000"))
                    .bearer_auth(token)
                    .send().await.unwrap().json::<Value>().await.unwrap()
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the sync waits while nothing happens");
        assert_eq!(send(&server, &alice, &room, "t1", "ping").await.0, 200);
        let woken = waiting.await.unwrap();
        assert_eq!(timeline_bodies(&woken, &room), ["ping"], "woken by the new event, long before the timeout");
        server.stop().await;
    }

    async fn power_and_membership_rules(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"invite": [bob.user_id]})).await;
        assert_eq!(server.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);

        let name = server.request("PUT", &room_path(&room, "state/m.room.name/"), Some(&bob.token), Some(json!({"name": "mine"}))).await;
        assert_error(&name, 403, "M_FORBIDDEN");
        let forged = server.request("PUT", &room_path(&room, "state/org.example.status/@alice:localhost"), Some(&bob.token), Some(json!({"busy": true}))).await;
        assert_error(&forged, 403, "M_FORBIDDEN");
        assert_eq!(server.request("PUT", &room_path(&room, "state/org.example.status/@bob:localhost"), Some(&bob.token),
            Some(json!({"busy": true}))).await.0, 403, "state_default is 50");
        assert_error(&server.post(&room_path(&room, "join"), Some(&carol.token), json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&send(&server, &carol, &room, "t1", "let me in").await, 403, "M_FORBIDDEN");
        assert_error(&server.post(&room_path(&room, "kick"), Some(&bob.token), json!({"user_id": alice.user_id})).await, 403, "M_FORBIDDEN");
        assert_error(&server.post(&room_path(&room, "invite"), Some(&carol.token), json!({"user_id": bob.user_id})).await, 403, "M_FORBIDDEN");

        // Redaction: own events yes, others' only with power.
        let (_, mine) = send(&server, &bob, &room, "m1", "oops").await;
        let (_, hers) = send(&server, &alice, &room, "m2", "important").await;
        let redact_path = |event: &Value, txn: &str| {
            room_path(&room, &format!("redact/{}/{txn}", percent(event["event_id"].as_str().unwrap())))
        };
        let reason = Some(json!({"reason": "test"}));
        let refused = server.request("PUT", &redact_path(&hers, "r1"), Some(&bob.token), reason.clone()).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        assert_eq!(server.request("PUT", &redact_path(&mine, "r2"), Some(&bob.token), reason.clone()).await.0, 200);
        let by_power = server.request("PUT", &redact_path(&hers, "r3"), Some(&alice.token), reason).await;
        assert_eq!(by_power.0, 200, "the creator has the power");
        let path = room_path(&room, &format!("event/{}", percent(mine["event_id"].as_str().unwrap())));
        let (status, redacted) = server.get(&path, Some(&alice.token)).await;
        assert_eq!(status, 200);
        assert_eq!(redacted["content"], json!({}), "redacted content is gone: {redacted}");

        // Alice kicks Bob, then bans and unbans him.
        assert_eq!(server.post(&room_path(&room, "kick"), Some(&alice.token), json!({"user_id": bob.user_id, "reason": "bye"})).await.0, 200);
        assert_error(&send(&server, &bob, &room, "t9", "still here?").await, 403, "M_FORBIDDEN");
        assert_eq!(server.post(&room_path(&room, "ban"), Some(&alice.token), json!({"user_id": bob.user_id})).await.0, 200);
        assert_error(&server.post(&room_path(&room, "invite"), Some(&alice.token), json!({"user_id": bob.user_id})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.post(&room_path(&room, "unban"), Some(&alice.token), json!({"user_id": bob.user_id})).await.0, 200);
        assert_eq!(server.post(&room_path(&room, "invite"), Some(&alice.token), json!({"user_id": bob.user_id})).await.0, 200);
        server.stop().await;
    }

    async fn public_rooms_leave_and_errors(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let dave = server.register("dave", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat", "room_version": "11"})).await;
        let since = sync(&server, &dave, None, 0).await["next_batch"].as_str().unwrap().to_owned();
        let (status, _) = server.post(&format!("/_matrix/client/v3/join/{}", percent(&room)), Some(&dave.token), json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(server.post(&room_path(&room, "leave"), Some(&dave.token), json!({})).await.0, 200);
        let update = sync(&server, &dave, Some(&since), 0).await;
        assert!(update["rooms"]["leave"].get(&room).is_some(), "{update}");
        assert_error(&server.post(&room_path(&room, "forget"), Some(&alice.token), json!({})).await, 400, "M_UNKNOWN");
        assert_eq!(server.post(&room_path(&room, "forget"), Some(&dave.token), json!({})).await.0, 200);

        // Bad input.
        assert_error(&send(&server, &alice, "!nosuchroom:localhost", "t1", "x").await, 404, "M_NOT_FOUND");
        assert_error(&server.request("PUT", "/_matrix/client/v3/rooms/not-a-room/send/m.room.message/t1", Some(&alice.token),
            Some(json!({"body": "x"}))).await, 400, "M_INVALID_PARAM");
        let big = server.request("PUT", &room_path(&room, "send/m.room.message/big"), Some(&alice.token),
            Some(json!({"msgtype": "m.text", "body": "x".repeat(70_000)}))).await;
        assert_error(&big, 413, "M_TOO_LARGE");
        let not_object = server.request("PUT", &room_path(&room, "send/m.room.message/arr"), Some(&alice.token), Some(json!([1]))).await;
        assert_error(&not_object, 400, "M_BAD_JSON");
        let version = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_version": "99"})).await;
        assert_error(&version, 400, "M_UNSUPPORTED_ROOM_VERSION");
        assert_error(&server.get(&room_path(&room, "messages?dir=b&from=garbage"), Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        let (status, history) = server.get(&room_path(&room, "messages?dir=b"), Some(&dave.token)).await;
        assert_eq!(status, 200, "a former member reads up to their leave: {history}");
        server.stop().await;
    }

    async fn events_are_signed_pdus(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let (_, sent) = send(&server, &alice, &room, "t1", "signed").await;
        let event_id = sent["event_id"].as_str().unwrap();
        let stored = server.server.state.store.get_event(event_id).await.unwrap().unwrap();
        let json: ruma::CanonicalJsonObject = serde_json::from_str(&stored.json).unwrap();
        let version = ruma::RoomVersionId::V10;
        assert_eq!(federation::pdu::event_id_of(&json, &version).unwrap().as_str(), event_id, "the id is the reference hash");
        let key = &server.server.state.signing_key;
        let keys = BTreeMap::from([("localhost".to_owned(), BTreeMap::from([(key.key_id(), key.public_key_base64())]))]);
        assert!(federation::pdu::verify(&json, &version, &keys).unwrap(), "signed by this server, content hash intact");
        // create, creator's join, power levels, join rules, history visibility, guest access.
        assert_eq!(json["depth"], ruma::CanonicalJsonValue::Integer(ruma::Int::from(7u32)), "after the room's 6 creation events");
        server.stop().await;
    }

    async fn the_state_at_every_event_survives_delta_chains_and_a_restart(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let slot = "org.example.slot";
        // 240 state events: past two rollovers of a delta chain (100), with slot 0 rewritten
        // every 50 so that deltas replace what is under them.
        let (mut expected, mut at_event) = (BTreeMap::new(), Vec::new());
        for n in 0..240 {
            let key = if n % 50 == 49 { "0".to_owned() } else { n.to_string() };
            let id = crate::common::put_state(&server, &alice, &room, slot, &key, json!({"n": n})).await;
            expected.insert(key, id.clone());
            at_event.push((id, expected.clone()));
        }
        let slots_at = |state: &homeserver::storage::StateMap| -> BTreeMap<String, String> {
            state.iter().filter(|((t, _), _)| t == slot).map(|((_, k), id)| (k.clone(), id.clone())).collect()
        };
        for (id, expected) in &at_event {
            let state = server.server.state.store.state_after(id).await.unwrap().expect("stored");
            assert_eq!(&slots_at(&state), expected, "the state after {id}");
        }
        // Deltas, not a whole map per state event: the rows together hold about one entry per
        // event (a whole map every 100 events and the room's creation), not 240 × 120 entries.
        let db = homeserver::storage::SqlStore::connect(&server.server.state.config.database.url, 1).await.unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT CAST(SUM(LENGTH(state)) AS BIGINT) FROM state_snapshots")
            .fetch_one(db.pool())
            .await
            .unwrap();
        db.close().await;
        let whole = 240 * 120 * 70;
        assert!(stored < whole / 20, "{stored} bytes of snapshots for what whole maps would store in {whole}");

        // Started again (nothing in memory), the current state is read back through its chain.
        let server = server.halt().await.start().await;
        let last = crate::common::put_state(&server, &alice, &room, slot, "last", json!({})).await;
        expected.insert("last".to_owned(), last.clone());
        let state = server.server.state.store.state_after(&last).await.unwrap().expect("stored");
        assert_eq!(slots_at(&state), expected);
        let (status, context) = server.get(&room_path(&room, &format!("context/{}?limit=0", percent(&last))), Some(&alice.token)).await;
        assert_eq!(status, 200, "{context}");
        let served: BTreeMap<String, String> = context["state"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|event| event["type"] == slot)
            .map(|event| (event["state_key"].as_str().unwrap().to_owned(), event["event_id"].as_str().unwrap().to_owned()))
            .collect();
        assert_eq!(served, expected, "/context serves the state at the event");
        server.stop().await;
    }
}
