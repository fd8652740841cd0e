//! Guest accounts, reading world-readable rooms without joining them, and the legacy sync
//! endpoints (`/initialSync`, `/rooms/{roomId}/initialSync`, `/events`).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error, session_of};

const PW: &str = "correct horse battery";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('#', "%23").replace('@', "%40").replace('$', "%24")
}

async fn guest_server(db: Db) -> TestServer {
    TestServer::start_with(db, |c| c.registration.allow_guests = true).await
}

async fn register_guest(server: &TestServer) -> Session {
    let (status, body) = server.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
    assert_eq!(status, 200, "{body}");
    session_of(&body)
}

async fn create_room(server: &TestServer, who: &Session, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

async fn send_text(server: &TestServer, who: &Session, room: &str, text: &str) -> String {
    let path =
        format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room), text.replace(' ', "_"));
    let (status, sent) = server
        .request("PUT", &path, Some(&who.token), Some(json!({"msgtype": "m.text", "body": text})))
        .await;
    assert_eq!(status, 200, "{sent}");
    sent["event_id"].as_str().unwrap().to_owned()
}

async fn put_state(server: &TestServer, who: &Session, room: &str, event_type: &str, content: Value) {
    let path = format!("/_matrix/client/v3/rooms/{}/state/{event_type}/", enc(room));
    let (status, body) = server.request("PUT", &path, Some(&who.token), Some(content)).await;
    assert_eq!(status, 200, "{body}");
}

fn bodies(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// The read endpoints a peeker uses, for one room and one of its events.
fn read_paths(room: &str, event_id: &str) -> Vec<String> {
    let room = enc(room);
    let event = enc(event_id);
    vec![
        format!("/_matrix/client/v3/rooms/{room}/messages?dir=b"),
        format!("/_matrix/client/v3/rooms/{room}/state"),
        format!("/_matrix/client/v3/rooms/{room}/state/m.room.create/"),
        format!("/_matrix/client/v3/rooms/{room}/members"),
        format!("/_matrix/client/v3/rooms/{room}/joined_members"),
        format!("/_matrix/client/v3/rooms/{room}/event/{event}"),
        format!("/_matrix/client/v3/rooms/{room}/context/{event}"),
        format!("/_matrix/client/v3/rooms/{room}/initialSync"),
        format!("/_matrix/client/v3/events?room_id={room}&timeout=0"),
    ]
}

crate::on_both_backends! {
    async fn guest_registration_is_forbidden_unless_allowed_guests(db: Db) {
        let server = TestServer::start(db).await;
        let refused = server.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
        assert_error(&refused, 403, "M_GUEST_ACCESS_FORBIDDEN");
        server.stop().await;

        let server = guest_server(db).await;
        let guest = register_guest(&server).await;
        let (status, me) = server.get("/_matrix/client/v3/account/whoami", Some(&guest.token)).await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["user_id"], guest.user_id.as_str());
        assert_eq!(me["is_guest"], true);
        let (status, sync) = server.get("/_matrix/client/v3/sync?timeout=0", Some(&guest.token)).await;
        assert_eq!(status, 200, "a guest syncs: {sync}");
        // A full account's registration is unchanged.
        server.register("alice", PW).await;
        server.stop().await;
    }

    async fn guests_get_guest_access_forbidden_outside_the_guest_endpoints(db: Db) {
        let server = guest_server(db).await;
        let guest = register_guest(&server).await;
        let refused = server.post("/_matrix/client/v3/createRoom", Some(&guest.token), json!({})).await;
        assert_error(&refused, 403, "M_GUEST_ACCESS_FORBIDDEN");
        let refused = server.get("/_matrix/client/v3/account/3pid", Some(&guest.token)).await;
        assert_error(&refused, 403, "M_GUEST_ACCESS_FORBIDDEN");
        // A custom (non-ruma) route is gated too.
        let refused = server.get("/_matrix/client/v3/initialSync", Some(&guest.token)).await;
        assert_eq!(refused.0, 200, "initialSync is a guest endpoint: {}", refused.1);
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&guest.user_id));
        let (status, body) =
            server.request("PUT", &path, Some(&guest.token), Some(json!({"displayname": "Visitor"}))).await;
        assert_eq!(status, 200, "guests set their display name: {body}");
        server.stop().await;
    }

    async fn guests_join_only_rooms_whose_guest_access_is_can_join(db: Db) {
        let server = guest_server(db).await;
        let alice = server.register("alice", PW).await;
        let guest = register_guest(&server).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        let join = format!("/_matrix/client/v3/rooms/{}/join", enc(&room));
        let refused = server.post(&join, Some(&guest.token), json!({})).await;
        assert_error(&refused, 403, "M_FORBIDDEN");

        put_state(&server, &alice, &room, "m.room.guest_access", json!({"guest_access": "can_join"})).await;
        let (status, body) = server.post(&join, Some(&guest.token), json!({})).await;
        assert_eq!(status, 200, "{body}");
        send_text(&server, &guest, &room, "hello from a guest").await;
        let (status, page) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b", enc(&room)), Some(&alice.token))
            .await;
        assert_eq!(status, 200);
        assert!(bodies(&page["chunk"]).contains(&"hello from a guest".to_owned()), "{page}");
        server.stop().await;
    }

    async fn guests_leave_rooms_whose_guest_access_is_revoked(db: Db) {
        let server = guest_server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let guest = register_guest(&server).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        put_state(&server, &alice, &room, "m.room.guest_access", json!({"guest_access": "can_join"})).await;
        for who in [&bob, &guest] {
            let (status, body) = server
                .post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&who.token), json!({}))
                .await;
            assert_eq!(status, 200, "{body}");
        }
        put_state(&server, &alice, &room, "m.room.guest_access", json!({"guest_access": "forbidden"})).await;
        let membership = |who: &Session| {
            let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&who.user_id));
            let (server, token) = (&server, alice.token.clone());
            async move { server.get(&path, Some(&token)).await.1["membership"].clone() }
        };
        assert_eq!(membership(&guest).await, "leave", "the guest left");
        assert_eq!(membership(&bob).await, "join", "full accounts stay");
        server.stop().await;
    }

    async fn a_guest_upgrades_itself_to_a_full_account_and_no_other(db: Db) {
        let server = guest_server(db).await;
        let guest = register_guest(&server).await;
        let other = register_guest(&server).await;
        let localpart = guest.user_id.trim_start_matches('@').split(':').next().unwrap().to_owned();
        let body = |token: &str| json!({
            "username": localpart, "password": PW, "guest_access_token": token,
            "auth": {"type": "m.login.dummy"},
        });
        let refused = server.post("/_matrix/client/v3/register", None, body(&other.token)).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        let (status, upgraded) = server.post("/_matrix/client/v3/register", None, body(&guest.token)).await;
        assert_eq!(status, 200, "{upgraded}");
        assert_eq!(upgraded["user_id"], guest.user_id.as_str(), "the same account");
        let full = session_of(&upgraded);
        let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&full.token), json!({})).await;
        assert_eq!(status, 200, "no longer limited: {created}");
        let (status, login) = server.login(&localpart, PW, json!({})).await;
        assert_eq!(status, 200, "the password logs in: {login}");
        let again = server.post("/_matrix/client/v3/register", None, body(&guest.token)).await;
        assert_error(&again, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn non_members_read_world_readable_rooms_and_not_shared_ones(db: Db) {
        let server = guest_server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let guest = register_guest(&server).await;
        let open = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        put_state(&server, &alice, &open, "m.room.history_visibility",
            json!({"history_visibility": "world_readable"})).await;
        let open_event = send_text(&server, &alice, &open, "for all eyes").await;
        let shared = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        let shared_event = send_text(&server, &alice, &shared, "members only").await;

        for reader in [&bob, &guest] {
            for path in read_paths(&open, &open_event) {
                let (status, body) = server.get(&path, Some(&reader.token)).await;
                assert_eq!(status, 200, "{path} for a non-member of a world-readable room: {body}");
            }
            for path in read_paths(&shared, &shared_event) {
                let refused = server.get(&path, Some(&reader.token)).await;
                // One event of a room never joined is as missing as a hidden one (Synapse's 404).
                match path.contains("/event/") {
                    true => assert_error(&refused, 404, "M_NOT_FOUND"),
                    false => assert_error(&refused, 403, "M_FORBIDDEN"),
                }
            }
        }
        let (_, page) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b", enc(&open)), Some(&bob.token))
            .await;
        assert!(bodies(&page["chunk"]).contains(&"for all eyes".to_owned()), "{page}");
        server.stop().await;
    }

    async fn initial_sync_shows_joined_rooms_and_departed_ones_when_archived(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat", "name": "Lobby"})).await;
        send_text(&server, &alice, &room, "before bob").await;
        let (status, _) =
            server.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200);
        send_text(&server, &alice, &room, "while bob is here").await;
        let (status, _) = server
            .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({}))
            .await;
        assert_eq!(status, 200);
        let last = send_text(&server, &alice, &room, "after bob left").await;
        let receipt = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last));
        let (status, body) = server.post(&receipt, Some(&alice.token), json!({})).await;
        assert_eq!(status, 200, "{body}");

        let (status, all) = server.get("/_matrix/client/v3/initialSync?limit=10", Some(&alice.token)).await;
        assert_eq!(status, 200, "{all}");
        assert!(all["end"].is_string(), "{all}");
        let rooms = all["rooms"].as_array().unwrap();
        let entry = rooms.iter().find(|r| r["room_id"] == room.as_str()).expect("alice's room is listed");
        assert_eq!(entry["membership"], "join");
        assert_eq!(entry["visibility"], "private", "not published in the directory");
        assert_eq!(bodies(&entry["messages"]["chunk"]), ["before bob", "while bob is here", "after bob left"],
            "oldest first");
        assert!(entry["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.name"), "{entry}");
        let receipt = all["receipts"].as_array().unwrap().iter().find(|r| r["room_id"] == room.as_str());
        assert!(receipt.expect("alice's receipt")["content"][&last]["m.read"][&alice.user_id]["ts"].is_number(),
            "{all}");
        let (_, bare) = server.get("/_matrix/client/v3/initialSync?limit=0", Some(&alice.token)).await;
        let entry = bare["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == room.as_str()).unwrap();
        assert_eq!(entry["messages"]["chunk"], json!([]), "limit=0 is the state alone: {entry}");
        assert!(entry["state"].as_array().is_some_and(|s| !s.is_empty()));

        let (_, bobs) = server.get("/_matrix/client/v3/initialSync", Some(&bob.token)).await;
        assert_eq!(bobs["rooms"], json!([]), "a departed room only with archived=true: {bobs}");
        let (status, bobs) = server.get("/_matrix/client/v3/initialSync?archived=true", Some(&bob.token)).await;
        assert_eq!(status, 200, "{bobs}");
        let entry = &bobs["rooms"][0];
        assert_eq!(entry["membership"], "leave", "{bobs}");
        assert!(!bodies(&entry["messages"]["chunk"]).contains(&"after bob left".to_owned()),
            "nothing after bob left: {entry}");

        let (status, one) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/initialSync", enc(&room)), Some(&bob.token))
            .await;
        assert_eq!(status, 200, "a departed member's room initialSync: {one}");
        assert_eq!(one["membership"], "leave");
        assert_eq!(bodies(&one["messages"]["chunk"]), ["before bob", "while bob is here"]);
        assert_eq!(one["presence"], json!([]), "{one}");
        assert_eq!(one["receipts"], json!([]), "no receipts for a departed member: {one}");
        let (_, alices) =
            server.get(&format!("/_matrix/client/v3/rooms/{}/initialSync", enc(&room)), Some(&alice.token)).await;
        assert_eq!(alices["receipts"][0]["type"], "m.receipt", "a member's room has its receipts: {alices}");
        let (status, newest) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/initialSync?limit=2", enc(&room)), Some(&bob.token))
            .await;
        assert_eq!(status, 200, "{newest}");
        let chunk = newest["messages"]["chunk"].as_array().unwrap();
        assert_eq!(chunk.len(), 2, "{newest}");
        assert_eq!(chunk[0]["content"]["body"], "while bob is here", "the newest readable, oldest first");
        assert_eq!(chunk[1]["content"]["membership"], "leave", "bob's leave is the last he saw");
        server.stop().await;
    }

    async fn events_long_poll_is_woken_by_a_new_event(db: Db) {
        let server = guest_server(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        put_state(&server, &alice, &room, "m.room.history_visibility",
            json!({"history_visibility": "world_readable"})).await;
        let (status, now) = server.get("/_matrix/client/v3/events?timeout=0", Some(&alice.token)).await;
        assert_eq!(status, 200, "{now}");
        assert_eq!(now["chunk"], json!([]), "without `from`, the stream starts now: {now}");
        let from = now["end"].as_str().unwrap().to_owned();

        let poll = |token: &str, query: String| {
            let url = format!("{}/_matrix/client/v3/events?{query}&timeout=60000", server.base);
            let request = server.http.get(url).bearer_auth(token);
            tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
        };
        let started = Instant::now();
        let stream = poll(&alice.token, format!("from={from}"));
        // Bob peeks at the room without joining it.
        let peek = poll(&bob.token, format!("from={from}&room_id={}", enc(&room)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        send_text(&server, &alice, &room, "wake up").await;
        let woken = tokio::time::timeout(Duration::from_secs(20), stream).await.unwrap().unwrap();
        let peeked = tokio::time::timeout(Duration::from_secs(20), peek).await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(30), "woken, not timed out");
        for answer in [&woken, &peeked] {
            let event = answer["chunk"].as_array().unwrap().iter().find(|e| e["content"]["body"] == "wake up");
            assert_eq!(event.expect("the new event")["room_id"], room.as_str(), "{answer}");
            assert_eq!(answer["start"], from.as_str());
            assert!(answer["end"].as_str().is_some_and(|end| end != from), "{answer}");
        }

        // A stream read in pages of `limit` gets every event once, oldest first.
        let mark = woken["end"].as_str().unwrap().to_owned();
        for n in 0..5 {
            send_text(&server, &alice, &room, &format!("message {n}")).await;
        }
        let mut seen = Vec::new();
        let mut from = mark;
        for _ in 0..5 {
            let (status, page) = server
                .get(&format!("/_matrix/client/v3/events?from={from}&limit=2&timeout=0"), Some(&alice.token))
                .await;
            assert_eq!(status, 200, "{page}");
            assert!(page["chunk"].as_array().unwrap().len() <= 2, "{page}");
            seen.extend(bodies(&page["chunk"]));
            from = page["end"].as_str().unwrap().to_owned();
        }
        assert_eq!(seen, (0..5).map(|n| format!("message {n}")).collect::<Vec<_>>());
        server.stop().await;
    }

    /// The legacy endpoints carry what `/sync` does besides events: presence (of the user, who
    /// is online for syncing, and of the members of their rooms), all account data (global, and
    /// per room in the room's entry, tags among it), read receipts, which never move back, and in
    /// the event stream typing too, for members and for someone peeking at the room.
    async fn legacy_sync_endpoints_carry_presence_account_data_and_receipts(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        let (status, _) = server.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200);
        let (status, _) = server.get("/_matrix/client/v3/sync?timeout=0", Some(&bob.token)).await;
        assert_eq!(status, 200);
        let put = |path: String, content: Value| {
            let token = alice.token.clone();
            let server = &server;
            async move {
                let (status, body) = server.request("PUT", &path, Some(&token), Some(content)).await;
                assert_eq!(status, 200, "{path}: {body}");
            }
        };
        let user = enc(&alice.user_id);
        put(format!("/_matrix/client/v3/user/{user}/account_data/my.global"), json!({"cats": 1})).await;
        put(format!("/_matrix/client/v3/user/{user}/rooms/{}/account_data/my.room", enc(&room)), json!({"rats": 2})).await;
        put(format!("/_matrix/client/v3/user/{user}/rooms/{}/tags/u.work", enc(&room)), json!({"order": 0.5})).await;
        let first = send_text(&server, &alice, &room, "first").await;
        let second = send_text(&server, &alice, &room, "second").await;
        let receipt = |event: String| {
            let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&event));
            let server = &server;
            let token = alice.token.clone();
            async move {
                let (status, body) = server.post(&path, Some(&token), json!({})).await;
                assert_eq!(status, 200, "{body}");
            }
        };
        receipt(second.clone()).await;
        // Back to an older event: the receipt stays where it was.
        receipt(first.clone()).await;

        let (status, initial) = server.get("/_matrix/client/v3/initialSync", Some(&alice.token)).await;
        assert_eq!(status, 200, "{initial}");
        let presence_of = |list: &Value, who: &str| {
            list.as_array().unwrap().iter().find(|e| e["content"]["user_id"] == who).cloned()
        };
        let own = presence_of(&initial["presence"], &alice.user_id).expect("the user's own presence");
        assert_eq!(own["type"], "m.presence");
        assert_eq!(own["content"]["presence"], "online", "syncing is activity: {own}");
        assert!(own["content"]["last_active_ago"].is_u64(), "{own}");
        let bobs = presence_of(&initial["presence"], &bob.user_id).expect("a room member's presence");
        assert_eq!(bobs["content"]["presence"], "online");
        assert!(initial["account_data"].as_array().unwrap().iter().any(|e| e["type"] == "my.global" && e["content"]["cats"] == 1), "{initial}");
        let entry = initial["rooms"].as_array().unwrap().iter().find(|r| r["room_id"] == room.as_str()).unwrap();
        let room_data = entry["account_data"].as_array().unwrap();
        assert!(room_data.iter().any(|e| e["type"] == "my.room" && e["content"]["rats"] == 2), "{entry}");
        assert!(room_data.iter().any(|e| e["type"] == "m.tag" && e["content"]["tags"]["u.work"]["order"] == 0.5), "{entry}");
        assert!(presence_of(&entry["presence"], &bob.user_id).is_some(), "{entry}");
        assert!(own["content"].as_object().unwrap().contains_key("status_msg"), "{own}");
        // Events in the legacy format name their sender as `user_id` too.
        for event in entry["state"].as_array().unwrap().iter().chain(entry["messages"]["chunk"].as_array().unwrap()) {
            assert_eq!(event["user_id"], event["sender"], "{event}");
        }
        let read_at = |receipts: &Value| -> Vec<String> {
            receipts.as_array().unwrap().iter()
                .filter(|r| r["type"] == "m.receipt" && r["room_id"] == room.as_str())
                .flat_map(|r| r["content"].as_object().unwrap().iter()
                    .filter(|(_, types)| types["m.read"][&alice.user_id].is_object())
                    .map(|(event, _)| event.clone()).collect::<Vec<_>>())
                .collect()
        };
        assert_eq!(read_at(&initial["receipts"]), vec![second.clone()], "{initial}");

        let (status, room_initial) =
            server.get(&format!("/_matrix/client/v3/rooms/{}/initialSync", enc(&room)), Some(&alice.token)).await;
        assert_eq!(status, 200, "{room_initial}");
        assert!(room_initial["account_data"].as_array().unwrap().iter().any(|e| e["type"] == "my.room"), "{room_initial}");
        assert!(presence_of(&room_initial["presence"], &alice.user_id).is_some(), "{room_initial}");
        assert_eq!(read_at(&room_initial["receipts"]), vec![second.clone()]);

        // The event stream carries account data (naming the room where it has one) and receipts.
        let (_, now) = server.get("/_matrix/client/v3/events?timeout=0", Some(&alice.token)).await;
        let from = now["end"].as_str().unwrap().to_owned();
        put(format!("/_matrix/client/v3/user/{user}/rooms/{}/account_data/my.room", enc(&room)), json!({"rats": 3})).await;
        put(format!("/_matrix/client/v3/user/{user}/account_data/my.global"), json!({"cats": 4})).await;
        let third = send_text(&server, &alice, &room, "third").await;
        receipt(third.clone()).await;
        let mut chunk = Vec::new();
        let mut from = from;
        for _ in 0..10 {
            let (status, page) = server.get(&format!("/_matrix/client/v3/events?from={from}&timeout=1000"), Some(&alice.token)).await;
            assert_eq!(status, 200, "{page}");
            chunk.extend(page["chunk"].as_array().unwrap().clone());
            from = page["end"].as_str().unwrap().to_owned();
            if chunk.iter().any(|e| e["type"] == "m.receipt") {
                break;
            }
        }
        let chunk = Value::Array(chunk);
        assert!(chunk.as_array().unwrap().iter().any(|e| e["type"] == "my.room" && e["room_id"] == room.as_str() && e["content"]["rats"] == 3), "{chunk}");
        assert!(chunk.as_array().unwrap().iter().any(|e| e["type"] == "my.global" && e["content"]["cats"] == 4 && e.get("room_id").is_none()), "{chunk}");
        assert_eq!(read_at(&chunk), vec![third]);
        let message = chunk.as_array().unwrap().iter().find(|e| e["type"] == "m.room.message").expect("the new message");
        assert_eq!(message["user_id"], alice.user_id.as_str(), "{message}");

        // Someone peeking at a world-readable room sees its members' presence and receipts.
        put_state(&server, &alice, &room, "m.room.history_visibility", json!({"history_visibility": "world_readable"})).await;
        let carol = server.register("carol", PW).await;
        let peek = |from: Option<String>| {
            let server = &server;
            let (token, room) = (carol.token.clone(), room.clone());
            async move {
                let from = from.map(|f| format!("&from={f}")).unwrap_or_default();
                let path = format!("/_matrix/client/v3/events?room_id={}&timeout=1000{from}", enc(&room));
                let (status, page) = server.get(&path, Some(&token)).await;
                assert_eq!(status, 200, "{page}");
                page
            }
        };
        let mut from = peek(None).await["end"].as_str().unwrap().to_owned();
        let status = json!({"presence": "unavailable", "status_msg": "brewing"});
        put(format!("/_matrix/client/v3/presence/{user}/status"), status).await;
        let fourth = send_text(&server, &alice, &room, "fourth").await;
        put(format!("/_matrix/client/v3/rooms/{}/typing/{user}", enc(&room)), json!({"typing": true, "timeout": 30000})).await;
        receipt(fourth.clone()).await;
        let mut peeked = Vec::new();
        for _ in 0..10 {
            let page = peek(Some(from.clone())).await;
            peeked.extend(page["chunk"].as_array().unwrap().clone());
            from = page["end"].as_str().unwrap().to_owned();
            if peeked.iter().any(|e| e["type"] == "m.receipt") {
                break;
            }
        }
        let peeked = Value::Array(peeked);
        let presence = presence_of(&peeked, &alice.user_id).expect("a member's presence in the peek");
        assert_eq!(presence["content"]["presence"], "unavailable", "{peeked}");
        assert_eq!(presence["content"]["status_msg"], "brewing");
        assert!(presence_of(&peeked, &carol.user_id).is_none(), "the peeker is not a member: {peeked}");
        assert_eq!(read_at(&peeked), vec![fourth]);
        let typing = peeked.as_array().unwrap().iter().find(|e| e["type"] == "m.typing").expect("typing in the peek");
        assert_eq!(typing["room_id"], room.as_str());
        assert_eq!(typing["content"]["user_ids"], json!([alice.user_id]));
        server.stop().await;
    }

    async fn post_send_without_txn_id_sends_a_new_event_each_time(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create_room(&server, &alice, json!({})).await;
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message", enc(&room));
        let content = json!({"msgtype": "m.text", "body": "twice"});
        let (status, first) = server.post(&path, Some(&alice.token), content.clone()).await;
        assert_eq!(status, 200, "{first}");
        let (status, second) = server.post(&path, Some(&alice.token), content).await;
        assert_eq!(status, 200, "{second}");
        assert_ne!(first["event_id"], second["event_id"]);
        let (_, page) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b", enc(&room)), Some(&alice.token))
            .await;
        assert_eq!(bodies(&page["chunk"]), ["twice", "twice"]);
        assert_error(&server.raw("POST", &path, Some(&alice.token), b"{nope".to_vec()).await, 400, "M_NOT_JSON");
        assert_error(&server.post(&path, Some(&alice.token), json!([1])).await, 400, "M_BAD_JSON");
        assert_error(&server.post(&path, None, json!({})).await, 401, "M_MISSING_TOKEN");
        server.stop().await;
    }

    async fn legacy_endpoints_answer_bad_input_with_matrix_errors(db: Db) {
        let server = guest_server(db).await;
        let alice = server.register("alice", PW).await;
        let guest = register_guest(&server).await;
        let shared = create_room(&server, &alice, json!({"preset": "public_chat"})).await;
        let token = Some(alice.token.as_str());
        for path in [
            "/_matrix/client/v3/events?from=garbage",
            "/_matrix/client/v3/events?timeout=soon",
            "/_matrix/client/v3/events?room_id=not-a-room",
            "/_matrix/client/v3/initialSync?archived=maybe",
            "/_matrix/client/v3/initialSync?limit=-1",
            "/_matrix/client/v3/events?limit=0",
        ] {
            assert_error(&server.get(path, token).await, 400, "M_INVALID_PARAM");
        }
        assert_error(&server.get("/_matrix/client/r0/events", None).await, 401, "M_MISSING_TOKEN");
        assert_error(&server.get("/_matrix/client/v3/initialSync", None).await, 401, "M_MISSING_TOKEN");
        let unknown = server.get("/_matrix/client/v3/rooms/%21nowhere%3Alocalhost/initialSync", token).await;
        assert_error(&unknown, 404, "M_NOT_FOUND");
        // A guest peeking at a room that is not world readable.
        let refused = server
            .get(&format!("/_matrix/client/v3/events?room_id={}&timeout=0", enc(&shared)), Some(&guest.token))
            .await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        server.stop().await;
    }
}
