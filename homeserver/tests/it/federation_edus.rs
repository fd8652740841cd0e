//! Typing notifications, read receipts, presence, to-device messages and device lists between
//! two Hearths (EDUs), end-to-end encryption across them, and EDUs a server may not send ignored.

use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, create_room, enc, put_ok, send_text},
    federation::Federating,
    tls::TestCa,
};

/// Syncs as `who` until a response satisfies `found`; that response.
async fn sync_until(server: &TestServer, who: &Session, what: &str, found: impl Fn(&Value) -> bool) -> Value {
    let started = std::time::Instant::now();
    let mut since = String::new();
    loop {
        let path = format!("/_matrix/client/v3/sync?timeout=500{since}");
        let (status, body) = server.get(&path, Some(&who.token)).await;
        assert_eq!(status, 200, "{body}");
        if found(&body) {
            return body;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{what} never came: {body}");
        since = format!("&since={}", body["next_batch"].as_str().unwrap());
    }
}

/// The ephemeral events of `room` in a sync response.
fn ephemeral<'a>(body: &'a Value, room: &str) -> Vec<&'a Value> {
    body["rooms"]["join"][room]["ephemeral"]["events"].as_array().into_iter().flatten().collect()
}

fn typing_users(body: &Value, room: &str) -> Option<Vec<String>> {
    let typing = ephemeral(body, room).into_iter().find(|event| event["type"] == "m.typing")?;
    Some(
        typing["content"]["user_ids"]
            .as_array()?
            .iter()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect(),
    )
}

fn has_receipt(body: &Value, room: &str, event_id: &str, user: &str) -> bool {
    ephemeral(body, room)
        .into_iter()
        .any(|event| event["type"] == "m.receipt" && event["content"][event_id]["m.read"][user].is_object())
}

fn presence_of<'a>(body: &'a Value, user: &str) -> Option<&'a Value> {
    body["presence"]["events"]
        .as_array()?
        .iter()
        .find(|event| event["sender"] == user)
        .map(|event| &event["content"])
}

/// A room of alice (on A) that bob (on B) joined, with a message of alice's; the message's id.
async fn shared_room(a: &Federating, b: &Federating, alice: &Session, bob: &Session) -> (String, String) {
    let room = create_room(&a.server, alice, json!({"preset": "public_chat", "room_version": "12"})).await;
    let join = format!("/_matrix/client/v3/join/{}?server_name={}", enc(&room), enc(a.name.as_str()));
    let (status, joined) = b.server.post(&join, Some(&bob.token), json!({})).await;
    assert_eq!(status, 200, "{joined}");
    let message = send_text(&a.server, alice, &room, "hello", "hello bob").await;
    sync_until(&b.server, bob, "alice's message", |body| body.to_string().contains("hello bob")).await;
    (room, message)
}

crate::on_both_backends! {
    /// Typing, read receipts and presence set on one server reach the other server's users in
    /// their `/sync`, both ways; a private read receipt stays home.
    async fn typing_receipts_and_presence_reach_the_other_server_both_ways(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let (room, message) = shared_room(&a, &b, &alice, &bob).await;
        let typing = |user: &str| format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(user));

        put_ok(&a.server, &alice, &typing(&alice.user_id), json!({"typing": true, "timeout": 20000})).await;
        sync_until(&b.server, &bob, "alice typing", |body| typing_users(body, &room) == Some(vec![alice.user_id.clone()])).await;
        put_ok(&b.server, &bob, &typing(&bob.user_id), json!({"typing": true, "timeout": 20000})).await;
        sync_until(&a.server, &alice, "bob typing", |body| {
            typing_users(body, &room).is_some_and(|users| users.contains(&bob.user_id))
        })
        .await;
        put_ok(&a.server, &alice, &typing(&alice.user_id), json!({"typing": false})).await;
        sync_until(&b.server, &bob, "alice stopping", |body| {
            typing_users(body, &room).is_some_and(|users| !users.contains(&alice.user_id))
        })
        .await;

        // Bob's private receipt first: alice never sees it; his public one she does.
        let receipt = |kind: &str| format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(&room), enc(&message));
        let (status, _) = b.server.post(&receipt("m.read.private"), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200);
        let (status, _) = b.server.post(&receipt("m.read"), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200);
        sync_until(&a.server, &alice, "bob's receipt", |body| has_receipt(body, &room, &message, &bob.user_id)).await;
        let (_, whole) = a.server.get("/_matrix/client/v3/sync", Some(&alice.token)).await;
        assert!(!whole.to_string().contains("m.read.private"), "{whole}");
        // Alice's receipt of bob's message reaches bob.
        let reply = send_text(&b.server, &bob, &room, "reply", "hello alice").await;
        sync_until(&a.server, &alice, "bob's reply", |body| body.to_string().contains("hello alice")).await;
        let path = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&reply));
        let (status, _) = a.server.post(&path, Some(&alice.token), json!({})).await;
        assert_eq!(status, 200);
        sync_until(&b.server, &bob, "alice's receipt", |body| has_receipt(body, &room, &reply, &alice.user_id)).await;

        let presence = |user: &str| format!("/_matrix/client/v3/presence/{}/status", enc(user));
        put_ok(&a.server, &alice, &presence(&alice.user_id), json!({"presence": "online", "status_msg": "at the hearth"})).await;
        sync_until(&b.server, &bob, "alice's presence", |body| {
            presence_of(body, &alice.user_id)
                .is_some_and(|content| content["presence"] == "online" && content["status_msg"] == "at the hearth")
        })
        .await;
        put_ok(&b.server, &bob, &presence(&bob.user_id), json!({"presence": "unavailable"})).await;
        sync_until(&a.server, &alice, "bob's presence", |body| {
            presence_of(body, &bob.user_id).is_some_and(|content| content["presence"] == "unavailable")
        })
        .await;
        let (status, got) = b.server.get(&presence(&alice.user_id), Some(&bob.token)).await;
        assert_eq!((status, &got["presence"]), (200, &json!("online")), "{got}");
        a.stop().await;
        b.stop().await;
    }

    /// EDUs a server may not send are ignored, the transaction taken all the same: typing and
    /// presence for users of another server, typing for a user of the sender who is not in the
    /// room, a receipt for an event the room does not have; the one allowed EDU among them
    /// takes effect.
    async fn edus_about_other_servers_users_or_rooms_they_are_not_in_are_ignored(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let carol = a.server.register("carol", "a long password").await;
        let (room, message) = shared_room(&a, &b, &alice, &bob).await;
        let (status, _) = a.server.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&carol.token), json!({})).await;
        assert_eq!(status, 200);
        let outsider = format!("@outsider:{}", b.name);
        let typing = |user: &str| json!({"edu_type": "m.typing", "content": {"room_id": room, "user_id": user, "typing": true}});
        let receipt = |user: &str, event: &str| json!({"edu_type": "m.receipt", "content": {room.clone(): {"m.read": {user: {"data": {"ts": 1}, "event_ids": [event]}}}}});
        let presence = |user: &str| json!({"edu_type": "m.presence", "content": {"push": [{"user_id": user, "presence": "online", "last_active_ago": 0}]}});
        let edus = [
            typing(&carol.user_id),
            typing(&outsider),
            presence(&carol.user_id),
            presence(&outsider),
            receipt(&bob.user_id, "$nothere"),
            receipt(&carol.user_id, &message),
            json!({"edu_type": "m.typing", "content": "not an object"}),
            typing(&bob.user_id),
        ];
        let (status, answer) = b.signer().transaction_with(&ca, &a, "e1", &[], &edus).await;
        assert_eq!((status, &answer["pdus"]), (200, &json!({})), "{answer}");
        let body = sync_until(&a.server, &alice, "bob typing", |body| typing_users(body, &room).is_some_and(|users| users.contains(&bob.user_id))).await;
        assert_eq!(typing_users(&body, &room).unwrap(), std::slice::from_ref(&bob.user_id), "{body}");
        let (_, whole) = a.server.get("/_matrix/client/v3/sync", Some(&alice.token)).await;
        assert!(!has_receipt(&whole, &room, &message, &carol.user_id), "{whole}");
        assert!(!whole.to_string().contains("$nothere"), "{whole}");
        assert!(presence_of(&whole, &carol.user_id).is_none_or(|content| content["presence"] != "online"), "{whole}");
        assert!(presence_of(&whole, &outsider).is_none(), "{whole}");
        a.stop().await;
        b.stop().await;
    }

    /// matrix-nio users of two Hearths chat in an encrypted room (each side's keys asked of the
    /// other server, room keys sent to the other server's devices), both ways; bob's second
    /// device, announced to alice's server, decrypts what alice sends after it appeared, and
    /// messages sent while it was away, each in a Megolm session of its own.
    async fn matrix_nio_users_of_two_hearths_chat_encrypted_and_a_new_device_decrypts_what_follows(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        crate::interop::run_e2ee_across(&a.server.base, &b.server.base, &ca.ca_file(), &|| format!("{db:?}")).await;
        a.stop().await;
        b.stop().await;
    }

    /// To-device messages to a user of the other server reach each of their devices once, also
    /// when the client retries its request; a message to a device that does not exist reaches no
    /// one; one relayed by a server for a user of another server is ignored.
    async fn to_device_messages_reach_the_other_servers_devices_once(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let (_room, _) = shared_room(&a, &b, &alice, &bob).await;
        let path = |txn: &str| format!("/_matrix/client/v3/sendToDevice/m.test/{txn}");
        let messages = json!({"messages": {bob.user_id.clone(): {
            bob.device_id.clone(): {"n": 1},
            "NOSUCHDEVICE": {"n": 2},
        }}});
        put_ok(&a.server, &alice, &path("t1"), messages.clone()).await;
        put_ok(&a.server, &alice, &path("t1"), messages).await;
        put_ok(&a.server, &alice, &path("t2"), json!({"messages": {bob.user_id.clone(): {"*": {"n": 3}}}})).await;
        let to_device = |body: &Value| -> Vec<Value> {
            body["to_device"]["events"].as_array().into_iter().flatten().cloned().collect()
        };
        let mut got = Vec::new();
        let started = std::time::Instant::now();
        let mut since = String::new();
        while got.len() < 2 && started.elapsed() < std::time::Duration::from_secs(20) {
            let (_, body) = b.server.get(&format!("/_matrix/client/v3/sync?timeout=500{since}"), Some(&bob.token)).await;
            got.extend(to_device(&body));
            since = format!("&since={}", body["next_batch"].as_str().unwrap());
        }
        // A moment more for a duplicate to show.
        let (_, body) = b.server.get(&format!("/_matrix/client/v3/sync?timeout=1000{since}"), Some(&bob.token)).await;
        got.extend(to_device(&body));
        let numbers: Vec<&Value> = got.iter().map(|event| &event["content"]["n"]).collect();
        assert_eq!(numbers, [&json!(1), &json!(3)], "{got:?}");
        assert!(got.iter().all(|event| event["sender"] == json!(alice.user_id) && event["type"] == "m.test"), "{got:?}");

        // B relays a message "from" a user of A: ignored.
        let forged = json!({"edu_type": "m.direct_to_device", "content": {
            "sender": alice.user_id, "type": "m.test", "message_id": "forged",
            "messages": {alice.user_id.clone(): {"*": {"n": 4}}},
        }});
        let (status, _) = b.signer().transaction_with(&ca, &a, "f1", &[], &[forged]).await;
        assert_eq!(status, 200);
        let (_, body) = a.server.get("/_matrix/client/v3/sync?timeout=1000", Some(&alice.token)).await;
        assert!(to_device(&body).is_empty(), "{body}");
        a.stop().await;
        b.stop().await;
    }

    /// Device keys and cross-signing keys uploaded on one server are announced to the other
    /// (its users see the owner in `device_lists.changed`) and fetched from it by `keys/query`:
    /// the master and self-signing keys, never the user-signing key. A server that does not
    /// answer a query or a claim is listed in `failures`.
    async fn the_other_servers_device_and_cross_signing_keys_are_announced_and_queried(db: Db) {
        use crate::e2ee::{DeviceKey, cross_key, upload};
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        shared_room(&a, &b, &alice, &bob).await;
        let (_, start) = b.server.get("/_matrix/client/v3/sync", Some(&bob.token)).await;
        let changed = |body: &Value| {
            body["device_lists"]["changed"].as_array().is_some_and(|users| users.contains(&json!(alice.user_id)))
        };
        let next_change = |since: String| {
            let (server, bob, changed) = (&b.server, &bob, &changed);
            async move {
                let started = std::time::Instant::now();
                let mut since = since;
                loop {
                    let (_, body) = server.get(&format!("/_matrix/client/v3/sync?timeout=500&since={since}"), Some(&bob.token)).await;
                    since = body["next_batch"].as_str().unwrap().to_owned();
                    if changed(&body) {
                        return since;
                    }
                    assert!(started.elapsed() < std::time::Duration::from_secs(20), "no device list change: {body}");
                }
            }
        };
        let device = DeviceKey::new(&alice.device_id);
        assert_eq!(upload(&a.server, &alice, json!({"device_keys": device.device_keys(&alice)})).await.0, 200);
        let since = next_change(start["next_batch"].as_str().unwrap().to_owned()).await;
        let (master, master_json) = cross_key(&alice.user_id, "master", None);
        let (_, ssk_json) = cross_key(&alice.user_id, "self_signing", Some(&master));
        let (_, usk_json) = cross_key(&alice.user_id, "user_signing", Some(&master));
        let keys = json!({"master_key": master_json, "self_signing_key": ssk_json, "user_signing_key": usk_json});
        let (status, body) = a.server.post("/_matrix/client/v3/keys/device_signing/upload", Some(&alice.token), keys).await;
        assert_eq!(status, 200, "{body}");
        next_change(since).await;

        let query = json!({"device_keys": {alice.user_id.clone(): []}});
        let (status, found) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), query).await;
        assert_eq!(status, 200, "{found}");
        assert!(found["failures"].as_object().is_none_or(serde_json::Map::is_empty), "{found}");
        let keys_of = |field: &str| found[field][&alice.user_id].clone();
        assert_eq!(keys_of("device_keys")[&alice.device_id]["keys"], device.device_keys(&alice)["keys"], "{found}");
        assert_eq!(keys_of("master_keys")["keys"], master_json["keys"], "{found}");
        assert_eq!(keys_of("self_signing_keys")["keys"], ssk_json["keys"], "{found}");
        assert!(found["user_signing_keys"].get(&alice.user_id).is_none(), "{found}");
        assert_ne!(keys_of("self_signing_keys")["keys"], usk_json["keys"]);

        // A server that does not answer is listed in `failures`; the others' keys still come.
        let gone = format!("127.0.0.1:{}", crate::interop::free_port());
        let query = json!({"device_keys": {alice.user_id.clone(): [], format!("@x:{gone}"): []}, "timeout": 3000});
        let (status, found) = b.server.post("/_matrix/client/v3/keys/query", Some(&bob.token), query).await;
        assert_eq!(status, 200, "{found}");
        assert!(found["failures"][&gone]["status"].is_number(), "{found}");
        assert!(found["device_keys"][&alice.user_id][&alice.device_id].is_object(), "{found}");
        let claim = json!({"one_time_keys": {format!("@x:{gone}"): {"DEV": "signed_curve25519"}}, "timeout": 3000});
        let (status, claimed) = b.server.post("/_matrix/client/v3/keys/claim", Some(&bob.token), claim).await;
        assert_eq!((status, claimed["failures"][&gone]["status"].is_number()), (200, true), "{claimed}");
        a.stop().await;
        b.stop().await;
    }

    /// What is queued for a server that is down stays queued across a restart of the sender:
    /// once it is back, its user gets the messages in the order sent and a to-device message,
    /// each once.
    async fn what_is_queued_for_a_server_that_is_down_survives_the_senders_restart_and_arrives_once(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let (room, _) = shared_room(&a, &b, &alice, &bob).await;
        let (_, start) = b.server.get("/_matrix/client/v3/sync", Some(&bob.token)).await;
        let said = ["queued 1", "queued 2", "queued 3"];
        let (b, a) = b
            .down_while(async {
                for (n, body) in said.iter().enumerate() {
                    send_text(&a.server, &alice, &room, &format!("q{n}"), body).await;
                }
                let to_device = json!({"messages": {bob.user_id.clone(): {bob.device_id.clone(): {"kept": true}}}});
                put_ok(&a.server, &alice, "/_matrix/client/v3/sendToDevice/m.test/d1", to_device).await;
                let (a, ()) = a.down_while(async {}).await;
                a
            })
            .await;
        let mut since = start["next_batch"].as_str().unwrap().to_owned();
        let (mut bodies, mut to_device) = (Vec::new(), Vec::new());
        let started = std::time::Instant::now();
        while (bodies.len() < said.len() || to_device.is_empty()) && started.elapsed() < std::time::Duration::from_secs(40) {
            let (_, body) = b.server.get(&format!("/_matrix/client/v3/sync?timeout=1000&since={since}"), Some(&bob.token)).await;
            since = body["next_batch"].as_str().unwrap().to_owned();
            for event in body["rooms"]["join"][&room]["timeline"]["events"].as_array().into_iter().flatten() {
                if let Some(text) = event["content"]["body"].as_str() {
                    bodies.push(text.to_owned());
                }
            }
            to_device.extend(body["to_device"]["events"].as_array().into_iter().flatten().cloned());
        }
        // A moment more for a duplicate to show.
        let (_, body) = b.server.get(&format!("/_matrix/client/v3/sync?timeout=1000&since={since}"), Some(&bob.token)).await;
        to_device.extend(body["to_device"]["events"].as_array().into_iter().flatten().cloned());
        assert_eq!(bodies, said, "{body}");
        assert_eq!(to_device.len(), 1, "{to_device:?}");
        assert_eq!(to_device[0]["content"]["kept"], json!(true), "{to_device:?}");
        a.stop().await;
        b.stop().await;
    }
}
