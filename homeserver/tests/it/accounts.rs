//! Accounts and devices over HTTP: registration, login, devices, logout, refresh, password.

use serde_json::json;

use crate::common::{Db, TestServer, assert_error, session_of};

const PW: &str = "correct horse battery";

fn password_auth(user: &str, password: &str, session: &str) -> serde_json::Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user},
           "password": password, "session": session})
}

crate::on_both_backends! {
    async fn register_through_uia_and_use_devices(db: Db) {
        let server = TestServer::start(db).await;
        // First call: the UIA challenge, with everything strict clients need.
        let (status, challenge) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "alice", "password": PW}))
            .await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.dummy"]}]));
        assert!(challenge["params"].is_object());
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server
            .post("/_matrix/client/v3/register", None, json!({
                "username": "alice", "password": PW, "initial_device_display_name": "first",
                "auth": {"type": "m.login.dummy", "session": session}}))
            .await;
        assert_eq!(status, 200, "{body}");
        let first = session_of(&body);
        assert_eq!(first.user_id, "@alice:localhost");

        let (status, me) = server.get("/_matrix/client/v3/account/whoami", Some(&first.token)).await;
        assert_eq!(status, 200);
        assert_eq!(me["user_id"], "@alice:localhost");
        assert_eq!(me["device_id"], first.device_id.as_str());

        // A second device, by full user id, named by the client.
        let (status, body) = server
            .login("@alice:localhost", PW, json!({"device_id": "SECOND", "initial_device_display_name": "laptop"}))
            .await;
        assert_eq!(status, 200, "{body}");
        let second = session_of(&body);
        assert_eq!(second.device_id, "SECOND");
        assert_eq!(body["well_known"]["m.homeserver"]["base_url"].as_str().map(|u| u.starts_with("http://")), Some(true));

        let (status, devices) = server.get("/_matrix/client/v3/devices", Some(&second.token)).await;
        assert_eq!(status, 200);
        let devices = devices["devices"].as_array().unwrap().clone();
        assert_eq!(devices.len(), 2);
        for device in &devices {
            for key in ["device_id", "display_name", "last_seen_ip", "last_seen_ts"] {
                assert!(device.get(key).is_some(), "{key} missing from {device}");
            }
        }
        assert!(devices.iter().any(|d| d["device_id"] == "SECOND" && d["display_name"] == "laptop"));

        let (status, _) = server
            .request("PUT", &format!("/_matrix/client/v3/devices/{}", first.device_id), Some(&second.token),
                Some(json!({"display_name": "renamed"})))
            .await;
        assert_eq!(status, 200);
        let (status, device) = server.get(&format!("/_matrix/client/v3/devices/{}", first.device_id), Some(&second.token)).await;
        assert_eq!(status, 200);
        assert_eq!(device["display_name"], "renamed");

        // Deleting a device: challenge, a wrong password (same session, error in the body), then right.
        let path = format!("/_matrix/client/v3/devices/{}", first.device_id);
        let (status, challenge) = server.request("DELETE", &path, Some(&second.token), Some(json!({}))).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.password"]}]));
        let session = challenge["session"].as_str().unwrap().to_owned();
        let (status, retry) = server
            .request("DELETE", &path, Some(&second.token), Some(json!({"auth": password_auth("alice", "wrong password", &session)})))
            .await;
        assert_eq!(status, 401);
        assert_eq!(retry["errcode"], "M_FORBIDDEN");
        assert_eq!(retry["session"], session.as_str());
        let (status, body) = server
            .request("DELETE", &path, Some(&second.token), Some(json!({"auth": password_auth("alice", PW, &session)})))
            .await;
        assert_eq!(status, 200, "{body}");
        let gone = server.get("/_matrix/client/v3/account/whoami", Some(&first.token)).await;
        assert_error(&gone, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(gone.1["soft_logout"], false);
        assert_error(&server.get(&path, Some(&second.token)).await, 404, "M_NOT_FOUND");

        // Logout revokes the token and removes the device.
        assert_eq!(server.post("/_matrix/client/v3/logout", Some(&second.token), json!({})).await.0, 200);
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&second.token)).await, 401, "M_UNKNOWN_TOKEN");
        let (_, body) = server.login("alice", PW, json!({})).await;
        let third = session_of(&body);
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&third.token)).await;
        assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
        server.stop().await;
    }

    async fn delete_devices_in_bulk_and_logout_all(db: Db) {
        let server = TestServer::start(db).await;
        let a = server.register("bob", PW).await;
        let b = session_of(&server.login("bob", PW, json!({})).await.1);
        let c = session_of(&server.login("bob", PW, json!({})).await.1);
        let (status, challenge) = server
            .post("/_matrix/client/v3/delete_devices", Some(&a.token), json!({"devices": [b.device_id, c.device_id]}))
            .await;
        assert_eq!(status, 401);
        let session = challenge["session"].as_str().unwrap();
        let (status, _) = server
            .post("/_matrix/client/v3/delete_devices", Some(&a.token),
                json!({"devices": [b.device_id, c.device_id], "auth": password_auth("bob", PW, session)}))
            .await;
        assert_eq!(status, 200);
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&b.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&c.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&a.token)).await.0, 200);

        let d = session_of(&server.login("bob", PW, json!({})).await.1);
        assert_eq!(server.post("/_matrix/client/v3/logout/all", Some(&d.token), json!({})).await.0, 200);
        for token in [&a.token, &d.token] {
            assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(token)).await, 401, "M_UNKNOWN_TOKEN");
        }
        server.stop().await;
    }

    async fn reusing_a_device_id_revokes_its_old_token(db: Db) {
        let server = TestServer::start(db).await;
        server.register("carol", PW).await;
        let first = session_of(&server.login("carol", PW, json!({"device_id": "PHONE"})).await.1);
        let again = session_of(&server.login("carol", PW, json!({"device_id": "PHONE"})).await.1);
        assert_eq!(again.device_id, "PHONE");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&first.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&again.token)).await.0, 200);
        server.stop().await;
    }

    async fn change_password_and_deactivate(db: Db) {
        let server = TestServer::start(db).await;
        let main = server.register("dave", PW).await;
        let other = session_of(&server.login("dave", PW, json!({})).await.1);
        let new_pw = "a much better password";
        let weak = server.post("/_matrix/client/v3/account/password", Some(&main.token), json!({"new_password": "short"})).await;
        assert_error(&weak, 400, "M_WEAK_PASSWORD");
        let (status, challenge) = server
            .post("/_matrix/client/v3/account/password", Some(&main.token), json!({"new_password": new_pw}))
            .await;
        assert_eq!(status, 401);
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server
            .post("/_matrix/client/v3/account/password", Some(&main.token),
                json!({"new_password": new_pw, "auth": password_auth("dave", PW, session)}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&other.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&main.token)).await.0, 200, "the caller stays logged in");
        assert_error(&server.login("dave", PW, json!({})).await, 403, "M_FORBIDDEN");
        assert_eq!(server.login("dave", new_pw, json!({})).await.0, 200);

        // Keeping other devices logged in when asked to.
        let kept = session_of(&server.login("dave", new_pw, json!({})).await.1);
        let (_, challenge) = server.post("/_matrix/client/v3/account/password", Some(&main.token), json!({"new_password": PW})).await;
        let session = challenge["session"].as_str().unwrap();
        let (status, _) = server
            .post("/_matrix/client/v3/account/password", Some(&main.token),
                json!({"new_password": PW, "logout_devices": false, "auth": password_auth("dave", new_pw, session)}))
            .await;
        assert_eq!(status, 200);
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&kept.token)).await.0, 200);

        let (_, challenge) = server.post("/_matrix/client/v3/account/deactivate", Some(&main.token), json!({})).await;
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server
            .post("/_matrix/client/v3/account/deactivate", Some(&main.token), json!({"auth": password_auth("dave", PW, session)}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id_server_unbind_result"], "no-support");
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&main.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&server.login("dave", PW, json!({})).await, 403, "M_USER_DEACTIVATED");
        let taken = server.post("/_matrix/client/v3/register", None, json!({"username": "dave", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&taken, 400, "M_USER_IN_USE");
        server.stop().await;
    }

    async fn refresh_tokens_rotate(db: Db) {
        let server = TestServer::start(db).await;
        server.register("erin", PW).await;
        let (status, body) = server.login("erin", PW, json!({"refresh_token": true})).await;
        assert_eq!(status, 200);
        assert_eq!(body["expires_in_ms"], 300_000);
        let access = body["access_token"].as_str().unwrap().to_owned();
        let refresh = body["refresh_token"].as_str().unwrap().to_owned();
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(&access)).await.0, 200);

        let (status, body) = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await;
        assert_eq!(status, 200, "{body}");
        let new_access = body["access_token"].as_str().unwrap();
        assert!(body["refresh_token"].is_string() && body["refresh_token"] != refresh.as_str());
        assert_eq!(body["expires_in_ms"], 300_000);
        assert_eq!(server.get("/_matrix/client/v3/account/whoami", Some(new_access)).await.0, 200);
        assert_error(&server.get("/_matrix/client/v3/account/whoami", Some(&access)).await, 401, "M_UNKNOWN_TOKEN");
        let reused = server.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refresh})).await;
        assert_error(&reused, 401, "M_UNKNOWN_TOKEN");
        server.stop().await;
    }

    async fn registration_by_token(db: Db) {
        let server = TestServer::start_with(db, |c| c.registration.mode = homeserver::config::RegistrationMode::Token).await;
        let token = "a-registration-token";
        server.server.state.store
            .create_registration_token(&homeserver::auth::tokens::sha256_hex(token), Some(1), None)
            .await
            .unwrap();
        let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
        let (status, body) = server.get(&format!("{validity}?token={token}"), None).await;
        assert_eq!((status, body["valid"].as_bool()), (200, Some(true)));
        assert_eq!(server.get(&format!("{validity}?token=nope"), None).await.1["valid"], false);

        let (status, challenge) = server.post("/_matrix/client/v3/register", None, json!({"username": "frank", "password": PW})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.registration_token"]}]));
        let session = challenge["session"].as_str().unwrap();
        let (status, wrong) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "frank", "password": PW,
                "auth": {"type": "m.login.registration_token", "token": "wrong", "session": session}}))
            .await;
        assert_eq!((status, wrong["errcode"].as_str()), (401, Some("M_FORBIDDEN")));
        let dummy = server.post("/_matrix/client/v3/register", None, json!({"username": "frank", "password": PW,
                "auth": {"type": "m.login.dummy", "session": session}})).await;
        assert_eq!(dummy.0, 401, "a stage not offered does not complete registration");
        let (status, body) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "frank", "password": PW,
                "auth": {"type": "m.login.registration_token", "token": token, "session": session}}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.get(&format!("{validity}?token={token}"), None).await.1["valid"], false, "single use");
        let (status, wrong) = server
            .post("/_matrix/client/v3/register", None, json!({"username": "grace", "password": PW,
                "auth": {"type": "m.login.registration_token", "token": token}}))
            .await;
        assert_eq!((status, wrong["errcode"].as_str()), (401, Some("M_FORBIDDEN")));
        server.stop().await;
    }

    async fn closed_registration_and_availability(db: Db) {
        let server = TestServer::start(db).await;
        server.register("heidi", PW).await;
        let (status, body) = server.get("/_matrix/client/v3/register/available?username=ivan", None).await;
        assert_eq!((status, body["available"].as_bool()), (200, Some(true)));
        assert_error(&server.get("/_matrix/client/v3/register/available?username=heidi", None).await, 400, "M_USER_IN_USE");
        assert_error(&server.get("/_matrix/client/v3/register/available?username=Heidi!", None).await, 400, "M_INVALID_USERNAME");
        server.stop().await;

        let closed = TestServer::start_with(db, |c| c.registration.mode = homeserver::config::RegistrationMode::Closed).await;
        let result = closed.post("/_matrix/client/v3/register", None, json!({"username": "x", "password": PW, "auth": {"type": "m.login.dummy"}})).await;
        assert_error(&result, 403, "M_FORBIDDEN");
        closed.stop().await;
    }

    async fn registration_without_username_generates_one(db: Db) {
        let server = TestServer::start(db).await;
        let (status, body) = server
            .post("/_matrix/client/v3/register", None, json!({"password": PW, "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_eq!(status, 200, "{body}");
        let user_id = body["user_id"].as_str().unwrap();
        assert!(user_id.starts_with('@') && user_id.ends_with(":localhost"));
        let (status, body) = server
            .post("/_matrix/client/v3/register", None,
                json!({"username": "judy", "password": PW, "inhibit_login": true, "auth": {"type": "m.login.dummy"}}))
            .await;
        assert_eq!(status, 200);
        assert!(body.get("access_token").is_none());
        assert!(body.get("device_id").is_none(), "no device_id key without a login: {body}");
        server.stop().await;
    }

    async fn registration_remembers_first_step_parameters_and_a_replayed_session_gives_the_same_account(db: Db) {
        let server = TestServer::start(db).await;
        let register = "/_matrix/client/v3/register";
        // The first step names everything; the last sends only `auth`.
        let (status, challenge) = server
            .post(register, None, json!({"username": "kim", "password": "übers3kr1t", "device_id": "XYZZY",
                                         "initial_device_display_name": "kim's phone"}))
            .await;
        assert_eq!(status, 401, "{challenge}");
        assert_eq!(challenge["completed"], json!([]), "listed even when empty: {challenge}");
        let session = challenge["session"].as_str().unwrap().to_owned();
        let auth = json!({"auth": {"type": "m.login.dummy", "session": session}});
        let (status, body) = server.post(register, None, auth.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((body["user_id"].as_str(), body["device_id"].as_str()), (Some("@kim:localhost"), Some("XYZZY")));
        let first = session_of(&body);
        let (_, device) = server.get("/_matrix/client/v3/devices/XYZZY", Some(&first.token)).await;
        assert_eq!(device["display_name"], "kim's phone");
        let (status, login) = server.login("kim", "übers3kr1t", json!({})).await;
        assert_eq!(status, 200, "the remembered password is the account's: {login}");

        // The completed session replayed, with or without the parameters: the same account, a
        // fresh login, and no second account.
        let (status, again) = server.post(register, None, auth).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["user_id"], "@kim:localhost");
        assert_ne!(again["access_token"], body["access_token"]);
        let (status, again) = server
            .post(register, None, json!({"username": "kim", "password": "übers3kr1t",
                                         "auth": {"type": "m.login.dummy", "session": session}}))
            .await;
        assert_eq!((status, again["user_id"].as_str()), (200, Some("@kim:localhost")), "{again}");

        // Without a username, the replay gives the generated one again.
        let (_, challenge) = server.post(register, None, json!({"password": PW})).await;
        let session = challenge["session"].as_str().unwrap();
        let auth = json!({"password": PW, "auth": {"type": "m.login.dummy", "session": session}});
        let (status, made) = server.post(register, None, auth.clone()).await;
        assert_eq!(status, 200, "{made}");
        let (status, replayed) = server.post(register, None, auth).await;
        assert_eq!((status, &replayed["user_id"]), (200, &made["user_id"]));

        // A later step's parameters replace the first's; a taken name is still refused at the start.
        let (_, challenge) = server.post(register, None, json!({"username": "lee", "password": PW})).await;
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = server
            .post(register, None, json!({"username": "lea", "password": PW, "inhibit_login": true,
                                         "auth": {"type": "m.login.dummy", "session": session}}))
            .await;
        assert_eq!((status, body["user_id"].as_str()), (200, Some("@lea:localhost")), "{body}");
        assert!(body.get("access_token").is_none() && body.get("device_id").is_none(), "{body}");
        assert_error(&server.post(register, None, json!({"username": "kim", "password": PW})).await, 400, "M_USER_IN_USE");
        // A session with no password in any step cannot make an account.
        let (_, challenge) = server.post(register, None, json!({"username": "max"})).await;
        let session = challenge["session"].as_str().unwrap();
        let done = server.post(register, None, json!({"auth": {"type": "m.login.dummy", "session": session}})).await;
        assert_error(&done, 400, "M_MISSING_PARAM");
        server.stop().await;
    }

    async fn uia_password_of_another_account_is_refused_with_403_and_the_device_stays(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let eve = server.register("eve", "eve's own password").await;
        let (_, body) = server.login("alice", PW, json!({"device_id": "LOGIN_DEVICE"})).await;
        let other = session_of(&body);
        let path = format!("/_matrix/client/v3/devices/{}", other.device_id);
        let (status, challenge) = server.request("DELETE", &path, Some(&alice.token), Some(json!({}))).await;
        assert_eq!(status, 401, "{challenge}");
        let session = challenge["session"].as_str().unwrap().to_owned();
        // Eve, with alice's token, offers her own (right) password: 403, not a challenge.
        let stolen = server
            .request("DELETE", &path, Some(&alice.token), Some(json!({"auth": password_auth(&eve.user_id, "eve's own password", &session)})))
            .await;
        assert_error(&stolen, 403, "M_FORBIDDEN");
        assert!(stolen.1.get("flows").is_none(), "{}", stolen.1);
        assert_eq!(server.get(&path, Some(&alice.token)).await.0, 200, "the device is still there");
        // Alice's own password, in the same session, still works.
        let (status, body) = server
            .request("DELETE", &path, Some(&alice.token), Some(json!({"auth": password_auth(&alice.user_id, PW, &session)})))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_error(&server.get(&path, Some(&alice.token)).await, 404, "M_NOT_FOUND");
        server.stop().await;
    }

    async fn login_and_registration_are_rate_limited(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.rate_limits.enabled = true;
            c.rate_limits.login_burst = 2;
            c.rate_limits.login_per_second = 0.01;
        })
        .await;
        server.register("kim", PW).await;
        for _ in 0..2 {
            assert_error(&server.login("kim", "wrong password", json!({})).await, 403, "M_FORBIDDEN");
        }
        let limited = server.login("kim", PW, json!({})).await;
        assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
        assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 1000);
        server.stop().await;
    }

    async fn workers_share_sessions_and_revocation(db: Db) {
        let a = TestServer::start(db).await;
        let b = a.another_worker().await;
        let alice = a.register("maria", PW).await;
        assert_eq!(b.get("/_matrix/client/v3/account/whoami", Some(&alice.token)).await.0, 200);
        // A UIA session started on one worker finishes on the other.
        let other = session_of(&b.login("maria", PW, json!({})).await.1);
        // Each worker now holds the sessions it has seen in memory; revocations must reach them.
        assert_eq!(a.get("/_matrix/client/v3/account/whoami", Some(&other.token)).await.0, 200);
        let path = format!("/_matrix/client/v3/devices/{}", other.device_id);
        let (status, challenge) = a.request("DELETE", &path, Some(&alice.token), Some(json!({}))).await;
        assert_eq!(status, 401);
        let session = challenge["session"].as_str().unwrap();
        let (status, body) = b.request("DELETE", &path, Some(&alice.token),
            Some(json!({"auth": password_auth("maria", PW, session)}))).await;
        assert_eq!(status, 200, "{body}");
        // Revocation on one worker is seen by the other at once.
        assert_error(&a.get("/_matrix/client/v3/account/whoami", Some(&other.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_eq!(b.post("/_matrix/client/v3/logout", Some(&alice.token), json!({})).await.0, 200);
        assert_error(&a.get("/_matrix/client/v3/account/whoami", Some(&alice.token)).await, 401, "M_UNKNOWN_TOKEN");
        // A refresh on one worker retires the old access token on the other.
        let (_, refreshable) = a.login("maria", PW, json!({"refresh_token": true})).await;
        let old_token = refreshable["access_token"].as_str().unwrap().to_owned();
        assert_eq!(b.get("/_matrix/client/v3/account/whoami", Some(&old_token)).await.0, 200);
        let (status, refreshed) =
            a.post("/_matrix/client/v3/refresh", None, json!({"refresh_token": refreshable["refresh_token"]})).await;
        assert_eq!(status, 200, "{refreshed}");
        assert_error(&b.get("/_matrix/client/v3/account/whoami", Some(&old_token)).await, 401, "M_UNKNOWN_TOKEN");
        let new_token = refreshed["access_token"].as_str().unwrap();
        assert_eq!(b.get("/_matrix/client/v3/account/whoami", Some(new_token)).await.0, 200);
        b.stop().await;
        a.stop().await;
    }

    async fn client_ip_behind_a_trusted_proxy(db: Db) {
        let server = TestServer::start_with(db, |c| c.listen.trust_x_forwarded_for = true).await;
        let alice = server.register("nina", PW).await;
        let proxied = server.http.post(format!("{}/_matrix/client/v3/login", server.base))
            .header("X-Forwarded-For", "198.51.100.7, 203.0.113.9")
            .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "nina"},
                "password": PW, "device_id": "PROXIED"}))
            .send().await.unwrap();
        assert_eq!(proxied.status().as_u16(), 200);
        let (_, devices) = server.get("/_matrix/client/v3/devices", Some(&alice.token)).await;
        let devices = devices["devices"].as_array().unwrap().clone();
        let device = devices.iter().find(|d| d["device_id"] == "PROXIED").unwrap();
        assert_eq!(device["last_seen_ip"], "203.0.113.9", "the entry the proxy appended");
        server.stop().await;
    }

    async fn discovery_endpoints(db: Db) {
        let server = TestServer::start(db).await;
        let (status, versions) = server.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200);
        assert!(versions["versions"].as_array().unwrap().iter().any(|v| v == "v1.1"));
        let (status, well_known) = server.get("/.well-known/matrix/client", None).await;
        assert_eq!(status, 200);
        assert!(well_known["m.homeserver"]["base_url"].is_string());
        let session = server.register("liam", PW).await;
        let (status, caps) = server.get("/_matrix/client/v3/capabilities", Some(&session.token)).await;
        assert_eq!(status, 200);
        assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "10");
        // ruma leaves out a capability at its default (enabled).
        assert_ne!(caps["capabilities"]["m.change_password"]["enabled"], false);
        let (status, flows) = server.get("/_matrix/client/v3/login", None).await;
        assert_eq!(status, 200);
        assert_eq!(flows["flows"][0]["type"], "m.login.password");
        assert_eq!(server.get("/health", None).await.0, 200);

        // CORS on every response and for preflight.
        let response = server.http.get(format!("{}/_matrix/client/versions", server.base)).send().await.unwrap();
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
        let preflight = server.http.request(reqwest::Method::OPTIONS, format!("{}/_matrix/client/v3/login", server.base))
            .send().await.unwrap();
        assert!(preflight.status().is_success());
        assert!(preflight.headers()["access-control-allow-headers"].to_str().unwrap().contains("Authorization"));
        server.stop().await;
    }
}
