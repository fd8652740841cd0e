//! Hardening: what a request may hold (no NUL, the spec's lengths, bounded lists) and how often a
//! user or an address may try (rate limits on sends, logins and UIA passwords).

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error};

const PW: &str = "correct horse battery";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('#', "%23").replace('@', "%40").replace('$', "%24")
}

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn create_room(server: &TestServer, who: &Session, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

fn query(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Logs in from `ip` (the server trusts `X-Forwarded-For` in these tests).
async fn login_from(server: &TestServer, ip: &str, user: &str, password: &str) -> (u16, Value) {
    let body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password});
    let response = server
        .http
        .post(format!("{}/_matrix/client/v3/login", server.base))
        .header("X-Forwarded-For", ip)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// PUTs `{"body": "x"}` (event content) to `path`.
async fn put_content(server: &TestServer, token: String, path: String) -> (u16, Value) {
    server.request("PUT", &path, Some(&token), Some(json!({"body": "x"}))).await
}

async fn get(server: &TestServer, token: &str, path: String) -> (u16, Value) {
    server.get(&path, Some(token)).await
}

#[track_caller]
fn assert_limited(result: &(u16, Value)) {
    assert_error(result, 429, "M_LIMIT_EXCEEDED");
    assert!(result.1["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{}", result.1);
}

crate::on_both_backends! {
    /// A NUL (`\u0000` in JSON, `%00` in a path or query) is refused with 400 by every endpoint,
    /// on both backends (Postgres cannot store it and used to answer 500).
    async fn nul_is_refused_everywhere(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let t = Some(alice.token.as_str());
        let me = enc(&alice.user_id);
        let room = create_room(&server, &alice, json!({"name": "before"})).await;
        let (status, sent) = server.request("PUT", &room_path(&room, "send/m.room.message/t1"), t,
            Some(json!({"msgtype": "m.text", "body": "stored before"}))).await;
        assert_eq!(status, 200, "{sent}");

        // In the path or the query: M_INVALID_PARAM.
        for (method, path) in [
            ("PUT", room_path(&room, "state/m.room.topic/a%00b")),
            ("PUT", room_path(&room, "send/m.ro%00om/t2")),
            ("PUT", room_path(&room, "send/m.room.message/t%00")),
            ("PUT", format!("/_matrix/client/v3/user/{me}/account_data/x%00y")),
            ("GET", format!("/_matrix/client/v3/user/{me}/filter/1%00")),
            ("GET", "/_matrix/client/v3/directory/room/%23a%00%3Alocalhost".to_owned()),
            ("GET", "/_matrix/client/v3/sync?filter=%7B%7D%00".to_owned()),
            ("GET", format!("{}?limit=1&from=%00", room_path(&room, "messages"))),
            ("GET", "/_matrix/client/v3/account/whoami?access_token=%00".to_owned()),
        ] {
            let answer = server.request(method, &path, t, Some(json!({"topic": "x"}))).await;
            assert_error(&answer, 400, "M_INVALID_PARAM");
            assert!(answer.1["error"].as_str().unwrap().contains("NUL"), "{path}: {}", answer.1);
        }
        // In a JSON body: M_BAD_JSON, in values and in keys alike.
        for (method, path, body) in [
            ("PUT", format!("/_matrix/client/v3/profile/{me}/displayname"), json!({"displayname": "a\u{0}b"})),
            ("PUT", format!("/_matrix/client/v3/devices/{}", alice.device_id), json!({"display_name": "\u{0}"})),
            ("POST", "/_matrix/client/v3/user_directory/search".to_owned(), json!({"search_term": "al\u{0}"})),
            ("POST", format!("/_matrix/client/v3/user/{me}/filter"), json!({"room": {"rooms": ["!a\u{0}:localhost"]}})),
            ("PUT", format!("/_matrix/client/v3/user/{me}/account_data/org.example"), json!({"k\u{0}": 1})),
            ("PUT", room_path(&room, "send/m.room.message/t3"), json!({"msgtype": "m.text", "body": ["x", {"y": "\u{0}"}]})),
            ("POST", "/_matrix/client/v3/createRoom".to_owned(), json!({"room_alias_name": "a\u{0}"})),
            ("POST", "/_matrix/client/v3/login".to_owned(),
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice\u{0}"}, "password": PW})),
            ("POST", "/_hearth/client/v1/threepid/submit_token".to_owned(), json!({"sid": "\u{0}", "client_secret": "a", "token": "1"})),
        ] {
            let answer = server.request(method, &path, t, Some(body)).await;
            assert_error(&answer, 400, "M_BAD_JSON");
            assert!(answer.1["error"].as_str().unwrap().contains("NUL"), "{path}: {}", answer.1);
        }
        let link = server.get("/_hearth/client/v1/threepid/submit_token?sid=%00&client_secret=a&token=1", None).await;
        assert_eq!(link.0, 400, "the emailed link: {}", link.1);

        // An escaped backslash followed by `u0000` is six ordinary characters, not a NUL.
        let literal = server.request("PUT", &room_path(&room, "send/m.room.message/t4"), t,
            Some(json!({"msgtype": "m.text", "body": "\\u0000"}))).await;
        assert_eq!(literal.0, 200, "{}", literal.1);

        // What was stored before is still served.
        let (status, messages) = server.get(&format!("{}?dir=b&limit=10", room_path(&room, "messages")), t).await;
        assert_eq!(status, 200, "{messages}");
        let bodies: Vec<&str> = messages["chunk"].as_array().unwrap().iter()
            .filter_map(|e| e["content"]["body"].as_str()).collect();
        assert_eq!(bodies, ["\\u0000", "stored before"]);
        let (status, name) = server.get(&room_path(&room, "state/m.room.name/"), t).await;
        assert_eq!((status, name["name"].as_str()), (200, Some("before")));
        server.stop().await;
    }

    /// The spec's bounds: 255 bytes for event types, state keys, room and user ids; presence
    /// states; filters that are neither ids nor definitions; negative limits; initial_state.
    async fn spec_limits_are_enforced(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let t = Some(alice.token.as_str());
        let me = enc(&alice.user_id);
        let room = create_room(&server, &alice, json!({})).await;
        let long = "a".repeat(256);
        let max = "a".repeat(255);
        let put = |path: String| put_content(&server, alice.token.clone(), path);
        assert_eq!(put(room_path(&room, &format!("send/{max}/t1"))).await.0, 200, "255 bytes is allowed");
        assert_error(&put(room_path(&room, &format!("send/{long}/t2"))).await, 400, "M_INVALID_PARAM");
        assert_error(&put(room_path(&room, &format!("state/{long}/"))).await, 400, "M_INVALID_PARAM");
        assert_error(&put(room_path(&room, &format!("state/m.room.topic/{long}"))).await, 400, "M_INVALID_PARAM");
        assert_eq!(put(room_path(&room, &format!("state/org.example/{max}"))).await.0, 200);
        let long_room = format!("!{}:localhost", "r".repeat(250));
        assert_error(&put(room_path(&long_room, "send/m.room.message/t3")).await, 400, "M_INVALID_PARAM");
        let long_user = format!("@{}:localhost", "u".repeat(250));
        assert_error(&server.post(&room_path(&room, "invite"), t, json!({"user_id": long_user})).await, 400, "M_BAD_JSON");
        assert_error(&server.get(&format!("/_matrix/client/v3/profile/{}", enc(&long_user)), t).await, 400, "M_INVALID_PARAM");
        let long_name = server.post("/_matrix/client/v3/register", None,
            json!({"username": "u".repeat(250), "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&long_name, 400, "M_INVALID_USERNAME");

        // createRoom: initial_state entries are bounded in number and checked before anything
        // is written.
        let state_event = |event_type: &str, key: &str| json!({"type": event_type, "state_key": key, "content": {}});
        let too_many: Vec<Value> = (0..101).map(|i| state_event("org.example", &i.to_string())).collect();
        let refused = server.post("/_matrix/client/v3/createRoom", t, json!({"initial_state": too_many})).await;
        assert_error(&refused, 400, "M_INVALID_PARAM");
        assert!(refused.1["error"].as_str().unwrap().contains("at most 100"), "{}", refused.1);
        for bad in [state_event(&long, ""), state_event("org.example", &long)] {
            let refused = server.post("/_matrix/client/v3/createRoom", t, json!({"initial_state": [bad]})).await;
            assert_error(&refused, 400, "M_BAD_JSON");
        }
        let (_, rooms) = server.get("/_matrix/client/v3/joined_rooms", t).await;
        assert_eq!(rooms["joined_rooms"], json!([room]), "refused requests made no room");

        // Presence: online, offline, unavailable and nothing else.
        let presence = format!("/_matrix/client/v3/presence/{me}/status");
        let dancing = server.request("PUT", &presence, t, Some(json!({"presence": "dancing"}))).await;
        assert_error(&dancing, 400, "M_INVALID_PARAM");
        assert!(dancing.1["error"].as_str().unwrap().contains("online, offline, unavailable"));
        assert_eq!(server.request("PUT", &presence, t, Some(json!({"presence": "unavailable"}))).await.0, 200);
        assert_error(&server.get("/_matrix/client/v3/sync?set_presence=dancing", t).await, 400, "M_INVALID_PARAM");
        assert_eq!(server.get("/_matrix/client/v3/sync?set_presence=online&timeout=0", t).await.0, 200);

        // Filters: an id that is no id, a definition that is no definition, negative limits.
        let sync_with = |filter: &str| get(&server, &alice.token, format!("/_matrix/client/v3/sync?timeout=0&filter={}", query(filter)));
        assert_error(&sync_with("abc").await, 400, "M_INVALID_PARAM");
        assert_error(&sync_with("{not json").await, 400, "M_BAD_JSON");
        assert_error(&sync_with(r#"{"room": {"timeline": {"limit": -1}}}"#).await, 400, "M_BAD_JSON");
        assert_error(&sync_with("12345").await, 404, "M_NOT_FOUND");
        assert_eq!(sync_with(r#"{"room": {"timeline": {"limit": 1}}}"#).await.0, 200);
        assert_error(&server.get(&format!("/_matrix/client/v3/user/{me}/filter/abc"), t).await, 400, "M_INVALID_PARAM");
        let messages = room_path(&room, "messages");
        assert_error(&server.get(&format!("{messages}?dir=b&limit=-1"), t).await, 400, "M_INVALID_PARAM");
        assert_error(&server.get(&format!("{messages}?dir=b&filter={}", query(r#"{"limit": -1}"#)), t).await, 400, "M_INVALID_PARAM");
        let (_, sent) = server.request("PUT", &room_path(&room, "send/m.room.message/t9"), t, Some(json!({"body": "x"}))).await;
        let context = room_path(&room, &format!("context/{}", enc(sent["event_id"].as_str().unwrap())));
        assert_error(&server.get(&format!("{context}?limit=-1"), t).await, 400, "M_INVALID_PARAM");
        assert_eq!(server.get(&format!("{context}?limit=2"), t).await.0, 200);
        server.stop().await;
    }

    /// Registration refuses the names people would take for the operator's.
    async fn reserved_usernames(db: Db) {
        let server = TestServer::start(db).await;
        let register = |name: &str| server.post("/_matrix/client/v3/register", None,
            json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}}));
        let refused = register("admin").await;
        assert_error(&refused, 400, "M_EXCLUSIVE");
        assert!(refused.1["error"].as_str().unwrap().contains("reserved"), "{}", refused.1);
        assert_error(&register("@postmaster:localhost").await, 400, "M_EXCLUSIVE");
        assert_error(&server.get("/_matrix/client/v3/register/available?username=support", None).await, 400, "M_EXCLUSIVE");
        assert_eq!(register("administrators").await.0, 200, "only the names themselves");
        server.stop().await;

        let custom = TestServer::start_with(db, |c| c.registration.reserved_usernames = vec!["boss".to_owned()]).await;
        let register = |name: &str| custom.post("/_matrix/client/v3/register", None,
            json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}}));
        assert_error(&register("boss").await, 400, "M_EXCLUSIVE");
        assert_eq!(register("admin").await.0, 200, "the list is the operator's");
        custom.stop().await;
    }

    /// Room events, typing and presence are limited per user.
    async fn sending_is_rate_limited_per_user(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.rate_limits.enabled = true;
            c.rate_limits.events_burst = 3;
            c.rate_limits.events_per_second = 0.01;
        }).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create_room(&server, &alice, json!({"preset": "public_chat", "initial_state": [
            {"type": "org.example", "state_key": "", "content": {}}
        ]})).await;
        assert_eq!(server.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), Some(&bob.token), json!({})).await.0, 200,
            "creating and joining rooms is not limited here");
        let send = |who: &Session, txn: &str| put_content(&server, who.token.clone(), room_path(&room, &format!("send/m.room.message/{txn}")));
        assert_eq!(send(&alice, "1").await.0, 200);
        assert_eq!(send(&alice, "2").await.0, 200);
        let typing = format!("typing/{}", enc(&alice.user_id));
        assert_eq!(server.request("PUT", &room_path(&room, &typing), Some(&alice.token), Some(json!({"typing": true, "timeout": 1000}))).await.0, 200);
        assert_limited(&send(&alice, "3").await);
        assert_limited(&server.request("PUT", &room_path(&room, "state/m.room.topic/"), Some(&alice.token), Some(json!({"topic": "t"}))).await);
        assert_limited(&server.request("PUT", &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)),
            Some(&alice.token), Some(json!({"presence": "online"}))).await);
        assert_eq!(send(&bob, "1").await.0, 200, "each user has a budget of their own");
        server.stop().await;
    }

    /// Wrong passwords are limited per account (from any IP) and per IP, at login and in
    /// User-Interactive Auth alike; right passwords are not counted, and while locked out even
    /// the right password is refused.
    async fn password_guessing_is_limited(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.rate_limits.enabled = true;
            c.rate_limits.login_burst = 1000;
            c.rate_limits.password_failures_per_account_burst = 3;
            c.rate_limits.password_failures_per_account_per_second = 0.001;
            c.rate_limits.password_failures_per_ip_burst = 5;
            c.rate_limits.password_failures_per_ip_per_second = 0.001;
            c.listen.trust_x_forwarded_for = true;
        }).await;
        for name in ["alice", "bob", "carol"] {
            server.register(name, PW).await;
        }
        // Right passwords do not count.
        for _ in 0..6 {
            assert_eq!(login_from(&server, "10.0.0.1", "alice", PW).await.0, 200);
        }
        // One account, wrong passwords from three addresses: then locked, from a fourth too.
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert_error(&login_from(&server, ip, "alice", "wrong").await, 403, "M_FORBIDDEN");
        }
        assert_limited(&login_from(&server, "10.0.0.4", "alice", PW).await);
        // One address, wrong passwords for several accounts (and one that does not exist).
        for user in ["bob", "bob", "carol", "carol", "nobody"] {
            assert_error(&login_from(&server, "10.0.1.1", user, "wrong").await, 403, "M_FORBIDDEN");
        }
        assert_limited(&login_from(&server, "10.0.1.1", "carol", PW).await);
        assert_eq!(login_from(&server, "10.0.1.2", "carol", PW).await.0, 200, "carol from elsewhere");

        // UIA: a stolen token does not buy guesses at the password.
        let dan = server.register("dan", PW).await;
        let change = |password: &str, session: &str| server.post("/_matrix/client/v3/account/password", Some(&dan.token),
            json!({"new_password": "a new password", "auth": {"type": "m.login.password", "session": session,
                "identifier": {"type": "m.id.user", "user": "dan"}, "password": password}}));
        let (status, challenge) = server.post("/_matrix/client/v3/account/password", Some(&dan.token), json!({"new_password": "a new password"})).await;
        assert_eq!(status, 401, "{challenge}");
        let session = challenge["session"].as_str().unwrap();
        for _ in 0..3 {
            let (status, failed) = change("wrong", session).await;
            assert_eq!((status, failed["errcode"].as_str()), (401, Some("M_FORBIDDEN")), "{failed}");
        }
        assert_limited(&change(PW, session).await);
        assert_limited(&login_from(&server, "10.0.2.1", "dan", PW).await);
        server.stop().await;
    }

    /// The registration budget counts attempts (started or failed), not the round trips of
    /// their User-Interactive Auth: people behind one address can each finish a flow of
    /// several steps, while failed attempts are still limited.
    async fn registration_counts_attempts_not_steps(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.rate_limits.enabled = true;
            c.registration.mode = homeserver::config::RegistrationMode::Token;
        }).await;
        let defaults = homeserver::config::RateLimitConfig::default();
        assert_eq!(defaults.register_burst, 5, "the test assumes the default budget");
        let token = "office-token";
        server.server.state.store
            .create_registration_token(&homeserver::auth::tokens::sha256_hex(token), None, None)
            .await
            .unwrap();
        for name in ["ann", "ben", "cat"] {
            let body = json!({"username": name, "password": PW});
            let (status, challenge) = server.post("/_matrix/client/v3/register", None, body.clone()).await;
            assert_eq!(status, 401, "{challenge}");
            let session = challenge["session"].as_str().unwrap();
            let mut step = body.clone();
            // Clients poll with the session alone while the user is busy elsewhere.
            step["auth"] = json!({"session": session});
            for _ in 0..2 {
                let (status, again) = server.post("/_matrix/client/v3/register", None, step.clone()).await;
                assert_eq!((status, again["session"].as_str()), (401, Some(session)), "{again}");
                assert!(again.get("errcode").is_none(), "a poll is no failed stage: {again}");
            }
            step["auth"] = json!({"type": "m.login.registration_token", "token": token, "session": session});
            let (status, done) = server.post("/_matrix/client/v3/register", None, step).await;
            assert_eq!(status, 200, "{name}: {done}");
        }
        // Failed attempts from the same address use up what is left.
        let mut limited = None;
        for i in 0..6 {
            let answer = server.post("/_matrix/client/v3/register", None, json!({"username": format!("spam{i}"), "password": PW,
                "auth": {"type": "m.login.registration_token", "token": "guess"}})).await;
            if answer.0 == 429 {
                limited = Some((i, answer));
                break;
            }
            assert_eq!(answer.0, 401, "{}", answer.1);
        }
        let (i, answer) = limited.expect("failed attempts are limited");
        assert_limited(&answer);
        assert!(i <= 3, "three registrations and two failures use the burst of five (plus what refilled); limited after {i}");
        server.stop().await;
    }
}
