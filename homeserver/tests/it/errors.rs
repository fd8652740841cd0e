//! Bad input of every kind gets the right Matrix error and status, never a 500.

use std::time::Duration;

use homeserver::{auth::tokens::TokenService, storage::SessionRecord};
use serde_json::json;

use crate::common::{Db, TOKEN_SECRET, TestServer, assert_error};

const PW: &str = "correct horse battery";

crate::on_both_backends! {
    async fn malformed_requests(db: Db) {
        let server = TestServer::start_with(db, |c| c.limits.max_request_bytes = 4096).await;
        let register = "/_matrix/client/v3/register";
        assert_error(&server.raw("POST", register, None, b"{not json".to_vec()).await, 400, "M_NOT_JSON");
        assert_error(&server.raw("POST", "/_matrix/client/v3/login", None, b"\xff\xfe".to_vec()).await, 400, "M_NOT_JSON");
        assert_error(&server.post(register, None, json!({"username": 5, "password": PW})).await, 400, "M_BAD_JSON");
        assert_error(&server.post(register, None, json!([1, 2])).await, 400, "M_BAD_JSON");
        let no_password = server.post("/_matrix/client/v3/login", None,
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "x"}})).await;
        assert!(no_password.0 == 400 && ["M_MISSING_PARAM", "M_BAD_JSON"].contains(&no_password.1["errcode"].as_str().unwrap()), "{no_password:?}");
        assert_error(&server.post("/_matrix/client/v3/refresh", None, json!({})).await, 400, "M_MISSING_PARAM");
        let unsupported = server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.fancy"})).await;
        assert_eq!(unsupported.0, 400, "{unsupported:?}");

        // Oversized bodies, declared or not.
        let big = json!({"username": "x".repeat(10_000), "password": PW});
        assert_error(&server.post(register, None, big).await, 413, "M_TOO_LARGE");

        // Unknown endpoints and methods.
        assert_error(&server.get("/_matrix/client/v3/no/such/endpoint", None).await, 404, "M_UNRECOGNIZED");
        assert_error(&server.get("/nothing", None).await, 404, "M_UNRECOGNIZED");
        assert_error(&server.request("PUT", "/_matrix/client/v3/login", None, Some(json!({}))).await, 405, "M_UNRECOGNIZED");
        assert_error(&server.request("DELETE", "/_matrix/client/versions", None, None).await, 405, "M_UNRECOGNIZED");
        assert_error(&server.get("/_matrix/client/v3/register/available", None).await, 400, "M_MISSING_PARAM");
        server.stop().await;
    }

    async fn bad_and_taken_usernames(db: Db) {
        let server = TestServer::start(db).await;
        server.register("taken", PW).await;
        let long = "a".repeat(300);
        for name in ["a b", "", "ali:ce", "@alice:elsewhere.org", "al#ce", "émile", long.as_str()] {
            let result = server.post("/_matrix/client/v3/register", None,
                json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}})).await;
            assert_error(&result, 400, "M_INVALID_USERNAME");
        }
        let taken = server.post("/_matrix/client/v3/register", None,
            json!({"username": "taken", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&taken, 400, "M_USER_IN_USE");
        let weak = server.post("/_matrix/client/v3/register", None,
            json!({"username": "newbie", "password": "123", "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&weak, 400, "M_WEAK_PASSWORD");
        let guest = server.post("/_matrix/client/v3/register?kind=guest", None, json!({})).await;
        assert_error(&guest, 403, "M_GUEST_ACCESS_FORBIDDEN");
        // Logins for unknown users and with wrong passwords look the same.
        assert_error(&server.login("nobody", PW, json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("taken", "not the password", json!({})).await, 403, "M_FORBIDDEN");
        assert_error(&server.login("@taken:elsewhere.org", PW, json!({})).await, 403, "M_FORBIDDEN");
        let long_name = server.login("taken", PW, json!({"initial_device_display_name": "n".repeat(300)})).await;
        assert_error(&long_name, 400, "M_INVALID_PARAM");
        server.stop().await;
    }

    async fn missing_garbage_expired_and_revoked_tokens(db: Db) {
        let server = TestServer::start(db).await;
        let whoami = "/_matrix/client/v3/account/whoami";
        assert_error(&server.get(whoami, None).await, 401, "M_MISSING_TOKEN");
        let garbage = server.get(whoami, Some("not-a-token")).await;
        assert_error(&garbage, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(garbage.1["soft_logout"], false);
        let basic = server.http.get(format!("{}{whoami}", server.base)).header("Authorization", "Basic abc").send().await.unwrap();
        assert_eq!(basic.status().as_u16(), 401);
        assert_eq!(basic.json::<serde_json::Value>().await.unwrap()["errcode"], "M_MISSING_TOKEN");

        let alice = server.register("alice", PW).await;
        // The deprecated query-string form still works.
        assert_eq!(server.get(&format!("{whoami}?access_token={}", alice.token), None).await.0, 200);

        // A token signed with another secret, or tampered with, is refused.
        let session = SessionRecord {
            session_id: "forged".into(),
            user_id: alice.user_id.as_str().try_into().unwrap(),
            device_id: alice.device_id.as_str().into(),
            generation: 0,
        };
        let forger = TokenService::new(b"another-secret-another-secret-another", "localhost", Duration::from_secs(60));
        let (forged, _) = forger.issue(&session, false, false).unwrap();
        assert_error(&server.get(whoami, Some(&forged)).await, 401, "M_UNKNOWN_TOKEN");
        let mut tampered = alice.token.clone();
        tampered.pop();
        tampered.push(if alice.token.ends_with('A') { 'B' } else { 'A' });
        assert_error(&server.get(whoami, Some(&tampered)).await, 401, "M_UNKNOWN_TOKEN");

        // Expired: signed by the server's own secret, but past its lifetime — a soft logout.
        let (_, body) = server.login("alice", PW, json!({"refresh_token": true})).await;
        let claims = server.server.state.tokens.verify(body["access_token"].as_str().unwrap()).unwrap();
        let real = SessionRecord { session_id: claims.session_id, generation: claims.generation, ..session };
        let short = TokenService::new(TOKEN_SECRET.as_bytes(), "localhost", Duration::from_secs(0));
        let (expired, _) = short.issue(&real, true, false).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let result = server.get(whoami, Some(&expired)).await;
        assert_error(&result, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(result.1["soft_logout"], true);

        // Revoked.
        assert_eq!(server.post("/_matrix/client/v3/logout", Some(&alice.token), json!({})).await.0, 200);
        let revoked = server.get(whoami, Some(&alice.token)).await;
        assert_error(&revoked, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(revoked.1["soft_logout"], false);
        server.stop().await;
    }

    async fn wrong_uia_sessions(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let delete = |device: &str| format!("/_matrix/client/v3/devices/{device}");
        let auth = |user: &str, session: &str| json!({"auth": {"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user}, "password": PW, "session": session}});

        let unknown = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token), Some(auth("alice", "no-such-session"))).await;
        assert_error(&unknown, 400, "M_UNKNOWN");

        // A session started for registration cannot delete a device.
        let (_, challenge) = server.post("/_matrix/client/v3/register", None, json!({"username": "zed", "password": PW})).await;
        let register_session = challenge["session"].as_str().unwrap();
        let other_op = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token), Some(auth("alice", register_session))).await;
        assert_error(&other_op, 403, "M_FORBIDDEN");

        // Bob's session cannot be finished by Alice, and approving one device does not approve another.
        let (_, challenge) = server.request("DELETE", &delete(&bob.device_id), Some(&bob.token), Some(json!({}))).await;
        let bob_session = challenge["session"].as_str().unwrap();
        let stolen = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token), Some(auth("alice", bob_session))).await;
        assert_error(&stolen, 403, "M_FORBIDDEN");
        let second = server.login("bob", PW, json!({})).await.1["device_id"].as_str().unwrap().to_owned();
        let swapped = server.request("DELETE", &delete(&second), Some(&bob.token), Some(auth("bob", bob_session))).await;
        assert_error(&swapped, 403, "M_FORBIDDEN");

        // Someone else's password does not pass the stage: a plain 403, as Synapse answers.
        let (_, challenge) = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token), Some(json!({}))).await;
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token), Some(auth("bob", session))).await;
        assert_eq!((status, body["errcode"].as_str(), body.get("flows")), (403, Some("M_FORBIDDEN"), None));
        let unsupported = server.request("DELETE", &delete(&alice.device_id), Some(&alice.token),
            Some(json!({"auth": {"type": "m.login.recaptcha", "response": "x", "session": session}}))).await;
        assert_eq!(unsupported.0, 401);
        assert!(unsupported.1["errcode"].is_string());
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&alice.token)).await.0, 200, "nothing was deleted");

        // Unknown devices.
        assert_error(&server.request("DELETE", &delete("NOPE"), Some(&alice.token), Some(json!({}))).await, 404, "M_NOT_FOUND");
        assert_error(&server.request("PUT", &delete("NOPE"), Some(&alice.token), Some(json!({"display_name": "x"}))).await, 404, "M_NOT_FOUND");
        let long = server.request("PUT", &delete(&alice.device_id), Some(&alice.token), Some(json!({"display_name": "x".repeat(300)}))).await;
        assert_error(&long, 400, "M_INVALID_PARAM");
        server.stop().await;
    }
}
