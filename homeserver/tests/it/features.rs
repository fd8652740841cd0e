//! Client-server features clients call: tags, ignoring users, reporting, OpenID, whois,
//! capabilities, joined members, join content, typing, canonical aliases, receipts, username
//! case, erasure, `/messages` paging, idempotent state, member events through the state API.

use percent_encoding::{NON_ALPHANUMERIC, percent_encode};
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, assert_error},
    rooms::{create, room_path, send, sync},
};

const PW: &str = "correct horse battery";

fn enc(text: &str) -> String {
    percent_encode(text.as_bytes(), NON_ALPHANUMERIC).to_string()
}

fn v3(rest: &str) -> String {
    format!("/_matrix/client/v3/{rest}")
}

fn tags_path(who: &Session, room: &str, tag: Option<&str>) -> String {
    let base = v3(&format!("user/{}/rooms/{}/tags", enc(&who.user_id), enc(room)));
    match tag {
        Some(tag) => format!("{base}/{}", enc(tag)),
        None => base,
    }
}

/// A request with everything owned, for closures that make requests.
async fn call(
    server: &TestServer,
    method: &str,
    path: String,
    token: Option<String>,
    body: Option<Value>,
) -> (u16, Value) {
    server.request(method, &path, token.as_deref(), body).await
}

async fn ok(server: &TestServer, method: &str, path: &str, who: &Session, body: Value) -> Value {
    let (status, response) = server.request(method, path, Some(&who.token), Some(body)).await;
    assert_eq!(status, 200, "{method} {path}: {response}");
    response
}

async fn join(server: &TestServer, who: &Session, room: &str) {
    ok(server, "POST", &room_path(room, "join"), who, json!({})).await;
}

async fn sent(server: &TestServer, who: &Session, room: &str, txn: &str, body: &str) -> String {
    let (status, response) = send(server, who, room, txn, body).await;
    assert_eq!(status, 200, "{response}");
    response["event_id"].as_str().unwrap().to_owned()
}

async fn next_batch(server: &TestServer, who: &Session) -> String {
    sync(server, who, None, 0).await["next_batch"].as_str().unwrap().to_owned()
}

/// The message bodies of a list of events, in order (redacted ones as `None`).
fn bodies(events: &Value) -> Vec<Option<String>> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn senders_of_messages(events: &Value) -> Vec<String> {
    events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["sender"].as_str().unwrap().to_owned())
        .collect()
}

async fn member_state(server: &TestServer, who: &Session, room: &str, user: &str) -> (u16, Value) {
    server.get(&room_path(room, &format!("state/m.room.member/{}", enc(user))), Some(&who.token)).await
}

fn ignore_body(users: &[&str]) -> Value {
    json!({"ignored_users": users.iter().map(|u| (u.to_string(), json!({}))).collect::<serde_json::Map<_, _>>()})
}

async fn ignore(server: &TestServer, who: &Session, users: &[&str]) {
    let path = v3(&format!("user/{}/account_data/m.ignored_user_list", enc(&who.user_id)));
    ok(server, "PUT", &path, who, ignore_body(users)).await;
}

/// Deactivates `who` with `erase`, through UIA with the password.
async fn deactivate(server: &TestServer, who: &Session, localpart: &str, erase: bool) {
    let path = v3("account/deactivate");
    let (status, challenge) = server.post(&path, Some(&who.token), json!({"erase": erase})).await;
    assert_eq!(status, 401, "{challenge}");
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": localpart},
        "password": PW, "session": challenge["session"]});
    let (status, body) = server.post(&path, Some(&who.token), json!({"erase": erase, "auth": auth})).await;
    assert_eq!(status, 200, "{body}");
}

crate::on_both_backends! {
    async fn tags_are_set_listed_and_deleted_as_the_rooms_m_tag_account_data(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let since = next_batch(&server, &alice).await;

        ok(&server, "PUT", &tags_path(&alice, &room, Some("m.favourite")), &alice, json!({"order": 0.25})).await;
        ok(&server, "PUT", &tags_path(&alice, &room, Some("u.work")), &alice, json!({})).await;
        let listed = ok(&server, "GET", &tags_path(&alice, &room, None), &alice, json!({})).await;
        assert_eq!(listed["tags"], json!({"m.favourite": {"order": 0.25}, "u.work": {}}));

        // Delivered by /sync as the room's `m.tag` account data, initial and incremental.
        let tag_event = |sync: &Value| {
            sync["rooms"]["join"][&room]["account_data"]["events"]
                .as_array()
                .and_then(|events| events.iter().find(|e| e["type"] == "m.tag").cloned())
        };
        let initial = sync(&server, &alice, None, 0).await;
        assert_eq!(tag_event(&initial).unwrap()["content"]["tags"], listed["tags"]);
        let incremental = sync(&server, &alice, Some(&since), 0).await;
        assert_eq!(tag_event(&incremental).unwrap()["content"]["tags"], listed["tags"]);
        let since = incremental["next_batch"].as_str().unwrap().to_owned();

        ok(&server, "DELETE", &tags_path(&alice, &room, Some("u.work")), &alice, json!({})).await;
        let after_delete = sync(&server, &alice, Some(&since), 0).await;
        assert_eq!(tag_event(&after_delete).unwrap()["content"]["tags"], json!({"m.favourite": {"order": 0.25}}));
        // Removing a tag the room does not carry changes nothing.
        ok(&server, "DELETE", &tags_path(&alice, &room, Some("u.never")), &alice, json!({})).await;

        // Concurrent additions are all kept.
        let adds = (0..8).map(|n| {
            let path = tags_path(&alice, &room, Some(&format!("u.concurrent{n}")));
            call(&server, "PUT", path, Some(alice.token.clone()), Some(json!({"order": 0.5})))
        });
        for (status, body) in futures_util::future::join_all(adds).await {
            assert_eq!(status, 200, "{body}");
        }
        let listed = ok(&server, "GET", &tags_path(&alice, &room, None), &alice, json!({})).await;
        assert_eq!(listed["tags"].as_object().unwrap().len(), 9, "{listed}");

        // Bad input.
        let put = |path: String, who: &Session, body: Value| {
            let token = who.token.clone();
            let server = &server;
            async move { server.request("PUT", &path, Some(&token), Some(body)).await }
        };
        assert_error(&put(tags_path(&alice, &room, Some("u.x")), &alice, json!({"order": 1.5})).await, 400, "M_INVALID_PARAM");
        assert_error(&put(tags_path(&alice, &room, Some("u.x")), &alice, json!({"order": -0.1})).await, 400, "M_INVALID_PARAM");
        assert_error(&put(tags_path(&alice, &room, Some("u.x")), &alice, json!({"order": "high"})).await, 400, "M_BAD_JSON");
        let long = "t".repeat(256);
        assert_error(&put(tags_path(&alice, &room, Some(&long)), &alice, json!({})).await, 400, "M_INVALID_PARAM");
        assert_error(&put(tags_path(&alice, "!nowhere:localhost", Some("u.x")), &alice, json!({})).await, 404, "M_NOT_FOUND");
        // Only one's own tags.
        let alices_tag = tags_path(&alice, &room, Some("u.bob"));
        assert_error(&put(alices_tag.clone(), &bob, json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.get(&tags_path(&alice, &room, None), Some(&bob.token)).await, 403, "M_FORBIDDEN");
        assert_error(&server.request("DELETE", &alices_tag, Some(&bob.token), None).await, 403, "M_FORBIDDEN");
        // Bounded in number.
        for n in 9..100 {
            ok(&server, "PUT", &tags_path(&alice, &room, Some(&format!("u.many{n}"))), &alice, json!({})).await;
        }
        assert_error(&put(tags_path(&alice, &room, Some("u.one_too_many")), &alice, json!({})).await, 400, "M_INVALID_PARAM");
        server.stop().await;
    }

    async fn messages_of_ignored_users_are_hidden_from_sync_messages_and_context(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        join(&server, &carol, &room).await;
        sent(&server, &alice, &room, "a1", "from alice").await;
        let bobs = sent(&server, &bob, &room, "b1", "from bob").await;
        let carols = sent(&server, &carol, &room, "c1", "from carol").await;

        // Bad lists first: nothing is ignored by them.
        let path = v3(&format!("user/{}/account_data/m.ignored_user_list", enc(&alice.user_id)));
        let put = |body: Value| server.request("PUT", &path, Some(&alice.token), Some(body));
        assert_error(&put(ignore_body(&[&alice.user_id])).await, 400, "M_INVALID_PARAM");
        assert_error(&put(json!({"ignored_users": [bob.user_id]})).await, 400, "M_BAD_JSON");
        assert_error(&put(json!({"ignored_users": {"bob": {}}})).await, 400, "M_BAD_JSON");
        assert_error(&put(json!({"ignored_users": {&bob.user_id: 1}})).await, 400, "M_BAD_JSON");
        assert_error(&put(json!({"someone": "else"})).await, 400, "M_BAD_JSON");
        let initial = sync(&server, &alice, None, 0).await;
        assert_eq!(crate::rooms::timeline_bodies(&initial, &room), ["from alice", "from bob", "from carol"]);

        ignore(&server, &alice, &[&bob.user_id]).await;
        // The next sync already hides him: his messages, not his member event.
        let initial = sync(&server, &alice, None, 0).await;
        assert_eq!(crate::rooms::timeline_bodies(&initial, &room), ["from alice", "from carol"]);
        let joined = &initial["rooms"]["join"][&room];
        let members: Vec<&Value> = joined["timeline"]["events"].as_array().unwrap().iter()
            .chain(joined["state"]["events"].as_array().into_iter().flatten())
            .filter(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id.as_str())
            .collect();
        assert_eq!(members.len(), 1, "bob's join is state, and stays: {joined}");
        let since = initial["next_batch"].as_str().unwrap().to_owned();

        let (status, page) = server.get(&room_path(&room, "messages?dir=b&limit=50"), Some(&alice.token)).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(bodies(&page["chunk"]), [Some("from carol".into()), Some("from alice".into())]);
        let context = room_path(&room, &format!("context/{}?limit=10", enc(&carols)));
        let (status, around) = server.get(&context, Some(&alice.token)).await;
        assert_eq!(status, 200, "{around}");
        assert_eq!(bodies(&around["events_before"]), [Some("from alice".into())]);
        assert_error(&server.get(&room_path(&room, &format!("event/{}", enc(&bobs))), Some(&alice.token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&room_path(&room, &format!("context/{}", enc(&bobs))), Some(&alice.token)).await, 404, "M_NOT_FOUND");
        // Carol ignores nobody.
        let (_, page) = server.get(&room_path(&room, "messages?dir=b&limit=50"), Some(&carol.token)).await;
        assert_eq!(bodies(&page["chunk"]).len(), 3);

        // Only his news: the room is not in the next sync at all.
        sent(&server, &bob, &room, "b2", "bob again").await;
        let quiet = sync(&server, &alice, Some(&since), 0).await;
        assert!(quiet["rooms"]["join"].get(&room).is_none(), "{quiet}");
        sent(&server, &carol, &room, "c2", "carol again").await;
        let news = sync(&server, &alice, Some(&since), 0).await;
        assert_eq!(crate::rooms::timeline_bodies(&news, &room), ["carol again"]);
        let since = news["next_batch"].as_str().unwrap().to_owned();

        // His invites are not shown, in incremental syncs nor initial ones.
        let his_room = create(&server, &bob, json!({"invite": [alice.user_id]})).await;
        let later = sync(&server, &alice, Some(&since), 0).await;
        assert!(later["rooms"]["invite"].get(&his_room).is_none(), "{later}");
        assert!(sync(&server, &alice, None, 0).await["rooms"]["invite"].get(&his_room).is_none());
        let carols_room = create(&server, &carol, json!({"invite": [alice.user_id]})).await;
        assert!(sync(&server, &alice, None, 0).await["rooms"]["invite"].get(&carols_room).is_some());

        // No longer ignored: his new messages come again.
        let since = next_batch(&server, &alice).await;
        ignore(&server, &alice, &[]).await;
        sent(&server, &bob, &room, "b3", "bob heard").await;
        let heard = sync(&server, &alice, Some(&since), 0).await;
        assert_eq!(crate::rooms::timeline_bodies(&heard, &room), ["bob heard"]);
        server.stop().await;
    }

    async fn messages_of_ignored_users_do_not_count_as_notifications(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        join(&server, &carol, &room).await;
        ignore(&server, &alice, &[&bob.user_id]).await;
        sent(&server, &bob, &room, "b1", "one").await;
        sent(&server, &bob, &room, "b2", "two").await;
        sent(&server, &carol, &room, "c1", "three").await;
        let counts = |sync: &Value| sync["rooms"]["join"][&room]["unread_notifications"]["notification_count"].clone();
        assert_eq!(counts(&sync(&server, &alice, None, 0).await), 1);
        assert_eq!(counts(&sync(&server, &carol, None, 0).await), 2, "carol ignores nobody");
        server.stop().await;
    }

    async fn reports_of_visible_events_and_of_rooms_are_stored_for_admins(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"invite": [bob.user_id]})).await;
        join(&server, &bob, &room).await;
        let event = sent(&server, &alice, &room, "a1", "rude").await;
        let report = room_path(&room, &format!("report/{}", enc(&event)));

        ok(&server, "POST", &report, &bob, json!({"score": -50, "reason": "rude words"})).await;
        ok(&server, "POST", &report, &bob, json!({})).await;
        // Bad scores and reasons.
        for score in [json!(5), json!(-101), json!("-10"), json!(-1.5)] {
            assert_error(&server.post(&report, Some(&bob.token), json!({"score": score})).await, 400, "M_INVALID_PARAM");
        }
        let long = "r".repeat(5000);
        assert_error(&server.post(&report, Some(&bob.token), json!({"reason": long})).await, 400, "M_INVALID_PARAM");
        // Carol was never in the private room: the event is as good as missing to her.
        assert_error(&server.post(&report, Some(&carol.token), json!({"reason": "x"})).await, 404, "M_NOT_FOUND");
        let missing = room_path(&room, &format!("report/{}", enc("$missing")));
        assert_error(&server.post(&missing, Some(&bob.token), json!({})).await, 404, "M_NOT_FOUND");
        let elsewhere = format!("/_matrix/client/v3/rooms/{}/report/{}", enc("!nowhere:localhost"), enc(&event));
        assert_error(&server.post(&elsewhere, Some(&bob.token), json!({})).await, 404, "M_NOT_FOUND");

        // Rooms: anyone may report one that exists.
        ok(&server, "POST", &room_path(&room, "report"), &carol, json!({"reason": "a bad room"})).await;
        let unknown = format!("/_matrix/client/v3/rooms/{}/report", enc("!nowhere:localhost"));
        assert_error(&server.post(&unknown, Some(&carol.token), json!({"reason": "x"})).await, 404, "M_NOT_FOUND");

        let mut stored = server.server.state.store.reports(10).await.unwrap();
        stored.sort_by_key(|r| (r.event_id.is_none(), r.score.is_none()));
        let summary: Vec<_> = stored
            .iter()
            .map(|r| (r.event_id.as_deref(), r.reporter.as_str(), r.reason.as_deref(), r.score))
            .collect();
        assert_eq!(summary, [
            (Some(event.as_str()), bob.user_id.as_str(), Some("rude words"), Some(-50)),
            (Some(event.as_str()), bob.user_id.as_str(), None, None),
            (None, carol.user_id.as_str(), Some("a bad room"), None),
        ]);
        assert!(stored.iter().all(|r| r.room_id == room));
        server.stop().await;
    }

    async fn openid_tokens_tell_a_third_party_who_the_user_is_until_they_expire(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let request = v3(&format!("user/{}/openid/request_token", enc(&alice.user_id)));
        let issued = ok(&server, "POST", &request, &alice, json!({})).await;
        assert_eq!(issued["token_type"], "Bearer");
        assert_eq!(issued["matrix_server_name"], "localhost");
        assert_eq!(issued["expires_in"], 3600);
        let token = issued["access_token"].as_str().unwrap().to_owned();

        let userinfo = |token: &str| {
            call(&server, "GET", format!("/_matrix/federation/v1/openid/userinfo?access_token={}", enc(token)), None, None)
        };
        let (status, info) = userinfo(&token).await;
        assert_eq!(status, 200, "{info}");
        assert_eq!(info, json!({"sub": alice.user_id}));
        // Kept as a hash: the token itself finds nothing in the store.
        let store = &server.server.state.store;
        let now = homeserver::storage::now_ms();
        assert!(store.openid_user(&token, now).await.unwrap().is_none());
        let hash = homeserver::auth::tokens::sha256_hex(&token);
        assert_eq!(store.openid_user(&hash, now).await.unwrap().unwrap().as_str(), alice.user_id);

        assert_error(&userinfo("an/invalid/token").await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get("/_matrix/federation/v1/openid/userinfo", None).await, 401, "M_MISSING_TOKEN");
        // Only for oneself.
        assert_error(&server.post(&request, Some(&bob.token), json!({})).await, 403, "M_FORBIDDEN");

        // One that expired is unknown.
        let user = ruma::UserId::parse(&alice.user_id).unwrap();
        let expired = "an-expired-openid-token";
        store.add_openid_token(&homeserver::auth::tokens::sha256_hex(expired), &user, now - 1, now - 3_600_001).await.unwrap();
        assert_error(&userinfo(expired).await, 401, "M_UNKNOWN_TOKEN");
        // So is one of a deactivated account.
        deactivate(&server, &alice, "alice", false).await;
        assert_error(&userinfo(&token).await, 401, "M_UNKNOWN_TOKEN");
        server.stop().await;
    }

    async fn whois_shows_devices_to_admins_and_to_the_user_only(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let store = &server.server.state.store;
        let root = ruma::UserId::parse("@root:localhost").unwrap();
        let hash = homeserver::auth::password::hash(PW).await.unwrap();
        assert!(store.create_user(&root, Some(&hash), true).await.unwrap());
        let (status, login) = server.login("root", PW, json!({})).await;
        assert_eq!(status, 200, "{login}");
        let root = crate::common::session_of(&login);

        let whois = |user: &str| v3(&format!("admin/whois/{}", enc(user)));
        for asker in [&alice, &root] {
            let (status, info) = server.get(&whois(&alice.user_id), Some(&asker.token)).await;
            assert_eq!(status, 200, "{info}");
            assert_eq!(info["user_id"], alice.user_id.as_str());
            let devices = info["devices"].as_object().unwrap();
            assert_eq!(devices.keys().collect::<Vec<_>>(), [&alice.device_id]);
            let connection = &devices[&alice.device_id]["sessions"][0]["connections"][0];
            assert_eq!(connection["ip"], "127.0.0.1", "{info}");
            assert!(connection["last_seen"].as_u64().is_some_and(|ts| ts > 0), "{info}");
        }
        assert_error(&server.get(&whois(&alice.user_id), Some(&bob.token)).await, 403, "M_FORBIDDEN");
        assert_error(&server.get(&whois("@nobody:localhost"), Some(&root.token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&whois("@alice:elsewhere.org"), Some(&root.token)).await, 404, "M_NOT_FOUND");
        assert_error(&server.get(&whois(&alice.user_id), None).await, 401, "M_MISSING_TOKEN");
        server.stop().await;
    }

    async fn capabilities_announce_what_the_server_allows(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        for version in ["v3", "r0"] {
            let (status, body) = server.get(&format!("/_matrix/client/{version}/capabilities"), Some(&alice.token)).await;
            assert_eq!(status, 200, "{body}");
            let caps = &body["capabilities"];
            assert_eq!(caps["m.change_password"], json!({"enabled": true}));
            assert_eq!(caps["m.set_displayname"], json!({"enabled": true}));
            assert_eq!(caps["m.set_avatar_url"], json!({"enabled": true}));
            // No email or SMS is configured: addresses cannot be proven, so not added.
            assert_eq!(caps["m.3pid_changes"], json!({"enabled": false}));
            let versions = &caps["m.room_versions"];
            assert_eq!(versions["default"], "10");
            let available: Vec<&str> = federation::pdu::SUPPORTED_ROOM_VERSIONS.iter().map(|v| v.as_str()).collect();
            assert_eq!(versions["available"].as_object().unwrap().keys().map(String::as_str).collect::<Vec<_>>().len(), available.len());
            for version in available {
                assert_eq!(versions["available"][version], "stable");
            }
        }
        assert_error(&server.get("/_matrix/client/v3/capabilities", None).await, 401, "M_MISSING_TOKEN");
        assert_error(&server.post("/_matrix/client/v3/capabilities", Some(&alice.token), json!({})).await, 405, "M_UNRECOGNIZED");
        // The default is what createRoom makes.
        let room = create(&server, &alice, json!({})).await;
        let (_, create_event) = server.get(&room_path(&room, "state/m.room.create/"), Some(&alice.token)).await;
        assert_eq!(create_event["room_version"], "10");
        server.stop().await;

        // With email to prove addresses by, they can be changed.
        let mailing = TestServer::start_with(db, |c| {
            c.email.smtp_host = "127.0.0.1".to_owned();
            c.email.smtp_tls = homeserver::config::SmtpTls::None;
            c.email.from = "hearth@localhost".to_owned();
        })
        .await;
        let bob = mailing.register("bob", PW).await;
        let (status, body) = mailing.get("/_matrix/client/v3/capabilities", Some(&bob.token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["capabilities"]["m.3pid_changes"], json!({"enabled": true}));
        mailing.stop().await;
    }

    async fn joined_members_carry_display_names_and_avatars(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let profile = |who: &Session, field: &str| v3(&format!("profile/{}/{field}", enc(&who.user_id)));
        ok(&server, "PUT", &profile(&alice, "displayname"), &alice, json!({"displayname": "Alice A."})).await;
        ok(&server, "PUT", &profile(&alice, "avatar_url"), &alice, json!({"avatar_url": "mxc://localhost/alice"})).await;
        ok(&server, "PUT", &profile(&bob, "displayname"), &bob, json!({"displayname": "Bob B."})).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        let members = ok(&server, "GET", &room_path(&room, "joined_members"), &bob, json!({})).await;
        assert_eq!(members["joined"], json!({
            &alice.user_id: {"display_name": "Alice A.", "avatar_url": "mxc://localhost/alice"},
            &bob.user_id: {"display_name": "Bob B.", "avatar_url": null},
        }), "unset fields are null, as Synapse has them");
        assert_error(&server.get(&room_path(&room, "joined_members"), Some(&carol.token)).await, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn joins_keep_the_custom_keys_of_their_body(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat", "room_alias_name": "lounge"})).await;
        let by_alias = v3(&format!("join/{}", enc("#lounge:localhost")));
        let (status, joined) = server.post(&by_alias, Some(&bob.token),
            json!({"foo": "bar", "reason": "hello", "membership": "leave", "third_party_signed": null})).await;
        assert_eq!(status, 200, "{joined}");
        assert_eq!(joined["room_id"], room.as_str());
        let (status, member) = member_state(&server, &bob, &room, &bob.user_id).await;
        assert_eq!(status, 200, "{member}");
        assert_eq!(member, json!({"membership": "join", "foo": "bar", "reason": "hello"}));

        ok(&server, "POST", &room_path(&room, "join"), &carol, json!({"org.example.colour": {"hue": 120}})).await;
        let (_, member) = member_state(&server, &carol, &room, &carol.user_id).await;
        assert_eq!(member, json!({"membership": "join", "org.example.colour": {"hue": 120}}));
        server.stop().await;
    }

    async fn typing_stops_without_a_timeout_and_starts_for_30_s_without_one(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let typing = room_path(&room, &format!("typing/{}", enc(&alice.user_id)));
        ok(&server, "PUT", &typing, &alice, json!({"typing": true, "timeout": 5000})).await;
        ok(&server, "PUT", &typing, &alice, json!({"typing": false})).await;
        // Without a timeout, Synapse's default of 30 s (SyTest sends none).
        ok(&server, "PUT", &typing, &alice, json!({"typing": true})).await;
        let (_, synced) = server.get("/_matrix/client/v3/sync", Some(&alice.token)).await;
        let ephemeral = &synced["rooms"]["join"][&room]["ephemeral"]["events"];
        let typing_now = ephemeral.as_array().unwrap().iter().find(|e| e["type"] == "m.typing").unwrap();
        assert_eq!(typing_now["content"]["user_ids"], json!([alice.user_id]), "{synced}");
        assert_error(&server.request("PUT", &typing, Some(&alice.token), Some(json!({"typing": "yes", "timeout": 1}))).await, 400, "M_BAD_JSON");
        server.stop().await;
    }

    async fn canonical_aliases_must_be_aliases_of_the_room(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({"room_alias_name": "tea"})).await;
        let other = create(&server, &alice, json!({"room_alias_name": "coffee"})).await;
        let alias_path = room_path(&room, "state/m.room.canonical_alias/");
        let put = |body: Value| server.request("PUT", &alias_path, Some(&alice.token), Some(body));
        ok(&server, "PUT", &v3(&format!("directory/room/{}", enc("#green:localhost"))), &alice, json!({"room_id": room})).await;

        ok(&server, "PUT", &alias_path, &alice, json!({"alias": "#tea:localhost", "alt_aliases": ["#green:localhost"]})).await;
        // Aliases that do not lead here: M_BAD_ALIAS; what is no alias at all: M_INVALID_PARAM.
        for bad in [
            json!({"alias": "#coffee:localhost"}),
            json!({"alias": "#unknown:localhost"}),
            json!({"alias": "#tea:elsewhere.org"}),
            json!({"alias": "#tea:localhost", "alt_aliases": ["#coffee:localhost"]}),
        ] {
            assert_error(&put(bad.clone()).await, 400, "M_BAD_ALIAS");
        }
        for invalid in [
            json!({"alias": "not an alias"}),
            json!({"alias": 7}),
            json!({"alias": "#tea:localhost", "alt_aliases": ["#green:localhost", "tea"]}),
            json!({"alias": "#tea:localhost", "alt_aliases": "#green:localhost"}),
        ] {
            assert_error(&put(invalid.clone()).await, 400, "M_INVALID_PARAM");
        }
        // A deleted alias leaves the canonical alias event (as Synapse does), sent by the deleter.
        assert_eq!(server.request("DELETE", &v3(&format!("directory/room/{}", enc("#green:localhost"))), Some(&alice.token), None).await.0, 200);
        let (_, current) = server.get(&alias_path, Some(&alice.token)).await;
        assert_eq!(current, json!({"alias": "#tea:localhost", "alt_aliases": []}));
        // Only aliases the change adds are checked.
        ok(&server, "PUT", &alias_path, &alice, json!({"alias": "#tea:localhost", "org.example": 1})).await;
        assert_eq!(server.request("DELETE", &v3(&format!("directory/room/{}", enc("#tea:localhost"))), Some(&alice.token), None).await.0, 200);
        let (_, current) = server.get(&alias_path, Some(&alice.token)).await;
        assert_eq!(current, json!({"org.example": 1}), "the main alias goes too");
        // Deleted by someone who may not change the event: the deletion stands, the event stays.
        let bob = server.register("bob", PW).await;
        ok(&server, "POST", &room_path(&room, "invite"), &alice, json!({"user_id": bob.user_id})).await;
        assert_eq!(server.post(&room_path(&room, "join"), Some(&bob.token), json!({})).await.0, 200);
        ok(&server, "PUT", &v3(&format!("directory/room/{}", enc("#bobs:localhost"))), &bob, json!({"room_id": room})).await;
        ok(&server, "PUT", &alias_path, &alice, json!({"alt_aliases": ["#bobs:localhost"]})).await;
        assert_eq!(server.request("DELETE", &v3(&format!("directory/room/{}", enc("#bobs:localhost"))), Some(&bob.token), None).await.0, 200);
        assert_eq!(server.get(&v3(&format!("directory/room/{}", enc("#bobs:localhost"))), Some(&bob.token)).await.0, 404);
        assert_eq!(server.get(&alias_path, Some(&alice.token)).await.1, json!({"alt_aliases": ["#bobs:localhost"]}));
        ok(&server, "PUT", &alias_path, &alice, json!({})).await;
        let (_, current) = server.get(&alias_path, Some(&alice.token)).await;
        assert_eq!(current, json!({}));
        let _ = other;

        // createRoom: the room is new, so only the alias it creates can be named.
        let (_, before) = server.get("/_matrix/client/v3/joined_rooms", Some(&alice.token)).await;
        let refused = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_alias_name": "milk",
            "initial_state": [{"type": "m.room.canonical_alias", "state_key": "", "content": {"alias": "#coffee:localhost"}}]})).await;
        assert_error(&refused, 400, "M_BAD_ALIAS");
        let (_, after) = server.get("/_matrix/client/v3/joined_rooms", Some(&alice.token)).await;
        assert_eq!(before, after, "a refused createRoom makes no room");
        let created = create(&server, &alice, json!({"room_alias_name": "milk",
            "initial_state": [{"type": "m.room.canonical_alias", "state_key": "", "content": {"alias": "#milk:localhost"}}]})).await;
        let (_, current) = server.get(&room_path(&created, "state/m.room.canonical_alias/"), Some(&alice.token)).await;
        assert_eq!(current["alias"], "#milk:localhost");
        server.stop().await;
    }

    async fn receipts_of_unknown_types_or_bad_threads_are_refused(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let event = sent(&server, &alice, &room, "a1", "read me").await;
        let receipt = |kind: &str| room_path(&room, &format!("receipt/{kind}/{}", enc(&event)));
        ok(&server, "POST", &receipt("m.read"), &alice, json!({})).await;
        ok(&server, "POST", &receipt("m.read"), &alice, json!({"thread_id": "main"})).await;
        ok(&server, "POST", &receipt("m.read.private"), &alice, json!({"thread_id": &event})).await;
        ok(&server, "POST", &receipt("m.fully_read"), &alice, json!({})).await;
        assert_error(&server.post(&receipt("m.custom"), Some(&alice.token), json!({})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.post(&receipt("m.fully_read"), Some(&alice.token), json!({"thread_id": "main"})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.post(&receipt("m.read"), Some(&alice.token), json!({"thread_id": ""})).await, 400, "M_INVALID_PARAM");
        assert_error(&server.post(&receipt("m.read"), Some(&alice.token), json!({"thread_id": "side"})).await, 400, "M_INVALID_PARAM");
        assert_eq!(server.post(&receipt("m.read"), Some(&alice.token), json!({"thread_id": 5})).await.0, 400);
        server.stop().await;
    }

    async fn usernames_in_capitals_are_lowered_at_registration_and_login(db: Db) {
        let server = TestServer::start(db).await;
        let (status, body) = server.post("/_matrix/client/v3/register", None,
            json!({"username": "user-UPPER", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], "@user-upper:localhost");
        let (status, body) = server.post("/_matrix/client/v3/register", None,
            json!({"username": "@Full-Id:localhost", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["user_id"], "@full-id:localhost");
        let taken = server.post("/_matrix/client/v3/register", None,
            json!({"username": "USER-upper", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&taken, 400, "M_USER_IN_USE");
        for name in ["USER-UPPER", "user-upper", "@User-Upper:localhost"] {
            let (status, login) = server.login(name, PW, json!({})).await;
            assert_eq!(status, 200, "{name}: {login}");
            assert_eq!(login["user_id"], "@user-upper:localhost");
        }
        // The deprecated `user` field too.
        let (status, login) = server.post("/_matrix/client/v3/login", None,
            json!({"type": "m.login.password", "user": "User-Upper", "password": PW})).await;
        assert_eq!(status, 200, "{login}");
        assert_eq!(login["user_id"], "@user-upper:localhost");
        // `register/available` checks a name as given, as Synapse: capitals are not a username.
        assert_error(&server.get("/_matrix/client/v3/register/available?username=Someone", None).await, 400, "M_INVALID_USERNAME");
        assert_error(&server.login("@user-upper:elsewhere.org", PW, json!({})).await, 403, "M_FORBIDDEN");
        // User-Interactive Auth names the user in any case too.
        let (_, login) = server.login("user-upper", PW, json!({})).await;
        deactivate(&server, &crate::common::session_of(&login), "User-UPPER", false).await;
        server.stop().await;
    }

    async fn events_of_erased_accounts_are_redacted_for_those_who_were_not_there(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let dave = server.register("dave", PW).await;
        let profile = |who: &Session| v3(&format!("profile/{}/displayname", enc(&who.user_id)));
        ok(&server, "PUT", &profile(&alice), &alice, json!({"displayname": "Alice"})).await;
        let room = create(&server, &bob, json!({"preset": "public_chat"})).await;
        join(&server, &alice, &room).await;
        let secret = sent(&server, &alice, &room, "a1", "alice's secret").await;
        sent(&server, &bob, &room, "b1", "bob's words").await;
        join(&server, &dave, &room).await;
        let daves = sent(&server, &dave, &room, "d1", "dave stays").await;
        deactivate(&server, &dave, "dave", false).await;
        deactivate(&server, &alice, "alice", true).await;
        join(&server, &carol, &room).await;

        // Bob was there: he reads what Alice wrote. Carol came later: redacted for her, and
        // not Dave's, who was deactivated without erasure.
        let messages = |who: &Session| {
            let path = room_path(&room, "messages?dir=b&limit=50");
            let token = who.token.clone();
            let server = &server;
            async move {
                let (status, page) = server.get(&path, Some(&token)).await;
                assert_eq!(status, 200, "{page}");
                page["chunk"].clone()
            }
        };
        let by_alice = |events: &Value| -> Vec<Value> {
            events.as_array().unwrap().iter()
                .filter(|e| e["type"] == "m.room.message" && e["sender"] == alice.user_id.as_str())
                .map(|e| e["content"].clone())
                .collect()
        };
        assert_eq!(by_alice(&messages(&bob).await), [json!({"msgtype": "m.text", "body": "alice's secret"})]);
        assert_eq!(by_alice(&messages(&carol).await), [json!({})]);
        let dave_for_carol: Vec<Option<String>> = messages(&carol).await.as_array().unwrap().iter()
            .filter(|e| e["type"] == "m.room.message" && e["sender"] == dave.user_id.as_str())
            .map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(dave_for_carol, [Some("dave stays".to_owned())]);

        let event_path = room_path(&room, &format!("event/{}", enc(&secret)));
        assert_eq!(ok(&server, "GET", &event_path, &carol, json!({})).await["content"], json!({}));
        assert_eq!(ok(&server, "GET", &event_path, &bob, json!({})).await["content"]["body"], "alice's secret");
        let context = room_path(&room, &format!("context/{}?limit=10", enc(&daves)));
        let around = ok(&server, "GET", &context, &carol, json!({})).await;
        assert_eq!(by_alice(&around["events_before"]), [json!({})]);
        let alices_in_sync = |sync: &Value| by_alice(&sync["rooms"]["join"][&room]["timeline"]["events"]);
        let filter = enc(&json!({"room": {"timeline": {"limit": 50}}}).to_string());
        let full = |who: &Session| {
            call(&server, "GET", format!("/_matrix/client/v3/sync?filter={filter}"), Some(who.token.clone()), None)
        };
        let (_, carols_sync) = full(&carol).await;
        assert_eq!(alices_in_sync(&carols_sync), [json!({})]);
        let (_, bobs_sync) = full(&bob).await;
        assert_eq!(alices_in_sync(&bobs_sync), [json!({"msgtype": "m.text", "body": "alice's secret"})]);

        // Her profile is gone, from the room's member event too.
        let (status, member) = member_state(&server, &bob, &room, &alice.user_id).await;
        assert_eq!(status, 200);
        assert_eq!(member, json!({"membership": "join"}));
        assert_eq!(server.get(&v3(&format!("profile/{}", enc(&alice.user_id))), Some(&bob.token)).await.0, 404);
        server.stop().await;
    }

    async fn messages_give_an_end_token_while_more_history_remains(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        for n in 0..5 {
            sent(&server, &alice, &room, &format!("a{n}"), &format!("alice {n}")).await;
        }
        // Paging back two at a time: every page has `end` until the room's start is reached.
        let mut from = String::new();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            let (status, page) = server.get(&room_path(&room, &format!("messages?dir=b&limit=2{from}")), Some(&alice.token)).await;
            assert_eq!(status, 200, "{page}");
            seen.extend(page["chunk"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()));
            match page["end"].as_str() {
                Some(end) => from = format!("&from={end}"),
                None => break,
            }
            assert!(pages < 20, "paging never ends");
        }
        assert_eq!(seen.last().map(String::as_str), Some("m.room.create"), "{seen:?}");
        assert_eq!(seen.iter().filter(|t| *t == "m.room.message").count(), 5);

        // Ten of Bob's, whom Alice ignores, above hers: the first pages are all hidden, and
        // still say where to go on.
        ignore(&server, &alice, &[&bob.user_id]).await;
        for n in 0..10 {
            sent(&server, &bob, &room, &format!("b{n}"), &format!("bob {n}")).await;
        }
        // Pages of three: bob 9 to 0 are hidden, and the page is filled from further back.
        let (_, page) = server.get(&room_path(&room, "messages?dir=b&limit=3"), Some(&alice.token)).await;
        assert_eq!(bodies(&page["chunk"]), [Some("alice 4".into()), Some("alice 3".into()), Some("alice 2".into())]);
        assert!(page["end"].is_string(), "{page}");
        // A filter nothing matches reads to the start, and then has nothing more to offer.
        let filter = enc(&json!({"types": ["org.example.none"]}).to_string());
        let (_, page) = server.get(&room_path(&room, &format!("messages?dir=b&limit=5&filter={filter}")), Some(&alice.token)).await;
        assert_eq!(page["chunk"], json!([]));
        assert!(page.get("end").is_none(), "{page}");

        // Forwards: `end` with what was found; from there, nothing and no `end`.
        let (_, page) = server.get(&room_path(&room, "messages?dir=f&limit=100"), Some(&bob.token)).await;
        assert_eq!(senders_of_messages(&page["chunk"]).len(), 15);
        let end = page["end"].as_str().unwrap().to_owned();
        let (_, rest) = server.get(&room_path(&room, &format!("messages?dir=f&limit=100&from={end}")), Some(&bob.token)).await;
        assert_eq!(rest["chunk"], json!([]));
        assert!(rest.get("end").is_none(), "{rest}");
        server.stop().await;
    }

    async fn identical_state_and_repeated_joins_make_no_new_event(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat",
            "power_level_content_override": {"users": {&alice.user_id: 100, &bob.user_id: 100}}})).await;
        join(&server, &bob, &room).await;
        let topic = room_path(&room, "state/m.room.topic/");
        let first = ok(&server, "PUT", &topic, &alice, json!({"topic": "tea"})).await["event_id"].clone();
        let again = ok(&server, "PUT", &topic, &alice, json!({"topic": "tea"})).await["event_id"].clone();
        assert_eq!(first, again);
        let changed = ok(&server, "PUT", &topic, &alice, json!({"topic": "coffee"})).await["event_id"].clone();
        assert_ne!(first, changed);
        // The same content from someone else is a new event: the sender is part of the state.
        let bobs = ok(&server, "PUT", &topic, &bob, json!({"topic": "coffee"})).await["event_id"].clone();
        assert_ne!(changed, bobs);

        let count = |page: &Value, kind: &str| page["chunk"].as_array().unwrap().iter().filter(|e| e["type"] == kind).count();
        let history = || call(&server, "GET", room_path(&room, "messages?dir=b&limit=100"), Some(alice.token.clone()), None);
        let members_before = count(&history().await.1, "m.room.member");
        join(&server, &bob, &room).await;
        ok(&server, "POST", &v3(&format!("join/{}", enc(&room))), &bob, json!({})).await;
        assert_eq!(count(&history().await.1, "m.room.member"), members_before, "joined already, nothing changed");
        ok(&server, "POST", &room_path(&room, "join"), &bob, json!({"foo": 1})).await;
        assert_eq!(count(&history().await.1, "m.room.member"), members_before + 1, "new content, new event");
        ok(&server, "POST", &room_path(&room, "join"), &bob, json!({"foo": 1})).await;
        assert_eq!(count(&history().await.1, "m.room.member"), members_before + 1);
        assert_eq!(count(&history().await.1, "m.room.topic"), 3);
        server.stop().await;
    }

    async fn member_state_changes_own_profile_and_moderates_by_power(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        let member = |user: &str| room_path(&room, &format!("state/m.room.member/{}", enc(user)));
        let put = |who: &Session, user: &str, body: Value| call(&server, "PUT", member(user), Some(who.token.clone()), Some(body));

        // Bob names himself in this room only.
        ok(&server, "PUT", &member(&bob.user_id), &bob, json!({"membership": "join", "displayname": "Bobby"})).await;
        let members = ok(&server, "GET", &room_path(&room, "joined_members"), &alice, json!({})).await;
        assert_eq!(members["joined"][&bob.user_id]["display_name"], "Bobby");
        // Alice has the power to invite, kick and ban; Bob (level 0) may not kick or ban.
        ok(&server, "PUT", &member(&carol.user_id), &alice, json!({"membership": "invite"})).await;
        assert_eq!(member_state(&server, &alice, &room, &carol.user_id).await.1["membership"], "invite");
        assert_error(&put(&bob, &alice.user_id, json!({"membership": "leave"})).await, 403, "M_FORBIDDEN");
        assert_error(&put(&bob, &carol.user_id, json!({"membership": "ban"})).await, 403, "M_FORBIDDEN");
        assert_error(&put(&bob, &alice.user_id, json!({"membership": "join"})).await, 403, "M_FORBIDDEN");
        ok(&server, "PUT", &member(&bob.user_id), &alice, json!({"membership": "ban", "reason": "spam"})).await;
        assert_eq!(member_state(&server, &alice, &room, &bob.user_id).await.1, json!({"membership": "ban", "reason": "spam"}));
        // Bad input.
        assert_error(&put(&alice, "not-a-user", json!({"membership": "invite"})).await, 400, "M_INVALID_PARAM");
        assert_error(&put(&alice, &carol.user_id, json!({"displayname": "no membership"})).await, 400, "M_BAD_JSON");
        assert_error(&put(&alice, &carol.user_id, json!({"membership": 1})).await, 400, "M_BAD_JSON");
        assert_error(&put(&alice, &carol.user_id, json!({"membership": "invite", "reason": "r".repeat(2000)})).await, 400, "M_INVALID_PARAM");
        let create_state = server.request("PUT", &room_path(&room, "state/m.room.create/"), Some(&alice.token), Some(json!({}))).await;
        assert_error(&create_state, 403, "M_FORBIDDEN");
        server.stop().await;
    }
}
