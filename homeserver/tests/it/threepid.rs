//! Verified accounts end to end: codes travel over real SMTP (aiosmtpd) and through a
//! Twilio-style SMS endpoint, and are read from what those received.

use homeserver::config::{Config, RequiredThreepid};
use serde_json::{Value, json};

use crate::{
    common::{Db, TestServer, assert_error, session_of},
    providers::{SMS_FROM, SmsMode, SmsProvider, SmtpSink, code_in},
};

const PW: &str = "correct horse battery";

struct World {
    server: TestServer,
    smtp: SmtpSink,
    sms: SmsProvider,
}

impl World {
    async fn start(db: Db, tweak: impl FnOnce(&mut Config)) -> Self {
        let smtp = SmtpSink::start().await;
        let sms = SmsProvider::start().await;
        let server = TestServer::start_with(db, |config| {
            smtp.configure(config);
            sms.configure(config);
            tweak(config);
        })
        .await;
        Self { server, smtp, sms }
    }

    async fn stop(self) {
        self.server.stop().await;
        self.sms.stop().await;
    }

    /// Asks for an email code; returns the response.
    async fn email_code(&self, path: &str, email: &str, secret: &str, attempt: u32) -> (u16, Value) {
        let body = json!({"client_secret": secret, "email": email, "send_attempt": attempt});
        self.server.post(&format!("/_matrix/client/v3/{path}/email/requestToken"), None, body).await
    }

    async fn phone_code(
        &self,
        path: &str,
        country: &str,
        phone: &str,
        secret: &str,
        attempt: u32,
    ) -> (u16, Value) {
        let body = json!({"client_secret": secret, "country": country, "phone_number": phone, "send_attempt": attempt});
        self.server.post(&format!("/_matrix/client/v3/{path}/msisdn/requestToken"), None, body).await
    }

    /// Submits a code to the `submit_url` the server returned.
    async fn submit(&self, submit_url: &str, sid: &str, secret: &str, code: &str) -> (u16, Value) {
        let path = submit_url.strip_prefix(&self.server.base).expect("submit_url on this server");
        self.server.post(path, None, json!({"sid": sid, "client_secret": secret, "token": code})).await
    }

    /// The latest email's code.
    async fn emailed_code(&self, n: usize) -> String {
        code_in(self.smtp.message(n).await["text"].as_str().unwrap())
    }

    /// Requests, receives and submits an email code; returns the sid.
    async fn verify_email(&self, path: &str, email: &str, secret: &str) -> String {
        let before = self.smtp.messages().len();
        let (status, body) = self.email_code(path, email, secret, 1).await;
        assert_eq!(status, 200, "{body}");
        let sid = body["sid"].as_str().unwrap().to_owned();
        let code = self.emailed_code(before + 1).await;
        let (status, result) = self.submit(body["submit_url"].as_str().unwrap(), &sid, secret, &code).await;
        assert_eq!((status, result["success"].as_bool()), (200, Some(true)), "{result}");
        sid
    }

    /// Requests, receives and submits an SMS code; returns the sid.
    async fn verify_phone(&self, path: &str, country: &str, phone: &str, secret: &str) -> String {
        let before = self.sms.received().len();
        let (status, body) = self.phone_code(path, country, phone, secret, 1).await;
        assert_eq!(status, 200, "{body}");
        let sid = body["sid"].as_str().unwrap().to_owned();
        let sms = self.sms.received();
        assert_eq!(sms.len(), before + 1, "one SMS sent; rejected: {:?}", self.sms.rejected());
        let code = code_in(&sms[before].body);
        let (status, result) = self.submit(body["submit_url"].as_str().unwrap(), &sid, secret, &code).await;
        assert_eq!(status, 200, "{result}");
        sid
    }

    async fn register_with(&self, username: &str, auth: Value) -> (u16, Value) {
        self.server
            .post(
                "/_matrix/client/v3/register",
                None,
                json!({"username": username, "password": PW, "auth": auth}),
            )
            .await
    }
}

fn creds(kind: &str, sid: &str, secret: &str, session: Option<&str>) -> Value {
    let mut auth = json!({"type": kind, "threepid_creds": {"sid": sid, "client_secret": secret}});
    if let Some(session) = session {
        auth["session"] = session.into();
    }
    auth
}

fn require(require: RequiredThreepid) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| config.registration.require = require
}

crate::on_both_backends! {
    async fn register_with_email_only(db: Db) {
        let world = World::start(db, require(RequiredThreepid::Email)).await;
        let (status, challenge) = world.server.post("/_matrix/client/v3/register", None, json!({"username": "ann", "password": PW})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.email.identity"]}]));
        let session = challenge["session"].as_str().unwrap();
        let dummy = world.register_with("ann", json!({"type": "m.login.dummy", "session": session})).await;
        assert_eq!(dummy.0, 401, "a dummy stage does not satisfy an email requirement");

        let (status, body) = world.email_code("register", "Ann@Example.org", "secret-ann", 1).await;
        assert_eq!(status, 200, "{body}");
        let sid = body["sid"].as_str().unwrap();
        assert!(body["submit_url"].as_str().unwrap().ends_with("/_hearth/client/v1/threepid/submit_token"));
        let mail = world.smtp.message(1).await;
        assert_eq!(mail["rcpt_tos"], json!(["ann@example.org"]));
        assert_eq!(mail["from"], "Hearth Test <noreply@hearth.test>");
        let code = code_in(mail["text"].as_str().unwrap());
        assert!(mail["html"].as_str().unwrap().contains(&code), "the HTML part carries the code too");
        assert!(!body.to_string().contains(&code), "a code never appears in a response");

        // Unverified creds do not pass the stage.
        let early = world.register_with("ann", creds("m.login.email.identity", sid, "secret-ann", Some(session))).await;
        assert_eq!((early.0, early.1["errcode"].as_str()), (401, Some("M_THREEPID_AUTH_FAILED")));
        // The emailed link verifies the address for a person with a browser.
        let text = mail["text"].as_str().unwrap();
        let link = text.lines().find(|l| l.starts_with("http")).unwrap().trim();
        let page = world.server.http.get(link).send().await.unwrap();
        assert_eq!(page.status().as_u16(), 200);
        assert!(page.text().await.unwrap().contains("confirmed"));

        let (status, body) = world.register_with("ann", creds("m.login.email.identity", sid, "secret-ann", Some(session))).await;
        assert_eq!(status, 200, "{body}");
        let ann = session_of(&body);
        let (_, threepids) = world.server.get("/_matrix/client/v3/account/3pid", Some(&ann.token)).await;
        assert_eq!(threepids["threepids"][0]["medium"], "email");
        assert_eq!(threepids["threepids"][0]["address"], "ann@example.org");

        // Login by email address and password.
        let login = world.server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.password",
            "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "ANN@example.org"}, "password": PW})).await;
        assert_eq!(login.0, 200, "{}", login.1);
        assert_eq!(login.1["user_id"], "@ann:localhost");

        // The verification was used up: it cannot register a second account, nor be resubmitted.
        let again = world.register_with("ann2", creds("m.login.email.identity", sid, "secret-ann", None)).await;
        assert_eq!(again.0, 401);
        let reused = world.submit(&format!("{}/_hearth/client/v1/threepid/submit_token", world.server.base), sid, "secret-ann", &code).await;
        assert_error(&reused, 400, "M_THREEPID_AUTH_FAILED");
        // The address is taken now.
        assert_error(&world.email_code("register", "ann@example.org", "other-secret", 1).await, 400, "M_THREEPID_IN_USE");
        world.stop().await;
    }

    async fn register_with_phone_only(db: Db) {
        let world = World::start(db, require(RequiredThreepid::Msisdn)).await;
        let sid = world.verify_phone("register", "GB", "07400 123456", "secret-bo").await;
        let sms = &world.sms.received()[0];
        assert_eq!(sms.to, "+447400123456", "normalised to E.164");
        assert_eq!(sms.from, SMS_FROM);
        assert!(world.sms.rejected().is_empty(), "{:?}", world.sms.rejected());
        let (status, body) = world.register_with("bo", creds("m.login.msisdn", &sid, "secret-bo", None)).await;
        assert_eq!(status, 200, "{body}");
        let login = world.server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.password",
            "identifier": {"type": "m.id.phone", "country": "GB", "phone": "+44 7400 123456"}, "password": PW})).await;
        assert_eq!((login.0, login.1["user_id"].as_str()), (200, Some("@bo:localhost")));
        let email_stage = world.register_with("bo2", creds("m.login.email.identity", &sid, "secret-bo", None)).await;
        assert_eq!(email_stage.0, 401, "the email stage is not offered");
        world.stop().await;
    }

    async fn register_with_either(db: Db) {
        let world = World::start(db, require(RequiredThreepid::EmailOrMsisdn)).await;
        let (_, challenge) = world.server.post("/_matrix/client/v3/register", None, json!({})).await;
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.email.identity"]}, {"stages": ["m.login.msisdn"]}]));
        let sid = world.verify_email("register", "cy@example.org", "s1").await;
        assert_eq!(world.register_with("cy", creds("m.login.email.identity", &sid, "s1", None)).await.0, 200);
        let sid = world.verify_phone("register", "US", "(201) 555-0123", "s2").await;
        assert_eq!(world.register_with("di", creds("m.login.msisdn", &sid, "s2", None)).await.0, 200);
        // A verification for registration does not reset a password.
        let sid = world.verify_email("register", "ed@example.org", "s3").await;
        let reset = world.server.post("/_matrix/client/v3/account/password", None,
            json!({"new_password": "whatever password", "auth": creds("m.login.email.identity", &sid, "s3", None)})).await;
        assert_eq!(reset.0, 401);
        world.stop().await;
    }

    async fn an_address_may_be_given_at_registration_when_none_is_required(db: Db) {
        let world = World::start(db, require(RequiredThreepid::None)).await;
        let (_, challenge) = world.server.post("/_matrix/client/v3/register", None, json!({})).await;
        assert_eq!(
            challenge["flows"],
            json!([{"stages": ["m.login.dummy"]}, {"stages": ["m.login.email.identity"]}, {"stages": ["m.login.msisdn"]}]),
            "registering without an address, or with one this server can verify"
        );
        let sid = world.verify_email("register", "fay@example.org", "s1").await;
        let (status, body) = world.register_with("fay", creds("m.login.email.identity", &sid, "s1", None)).await;
        assert_eq!(status, 200, "{body}");
        let fay = session_of(&body);
        let (_, threepids) = world.server.get("/_matrix/client/v3/account/3pid", Some(&fay.token)).await;
        assert_eq!(threepids["threepids"][0]["address"], "fay@example.org", "the address is bound: {threepids}");
        let (status, body) = world.register_with("gus", json!({"type": "m.login.dummy"})).await;
        assert_eq!(status, 200, "{body}");
        world.stop().await;
    }

    async fn password_reset_by_email_and_by_sms(db: Db) {
        let world = World::start(db, require(RequiredThreepid::EmailOrMsisdn)).await;
        let sid = world.verify_email("register", "fay@example.org", "s1").await;
        let fay = session_of(&world.register_with("fay", creds("m.login.email.identity", &sid, "s1", None)).await.1);
        let sid = world.verify_phone("register", "GB", "07400 654321", "s2").await;
        world.register_with("gus", creds("m.login.msisdn", &sid, "s2", None)).await;

        assert_error(&world.email_code("account/password", "nobody@example.org", "s3", 1).await, 400, "M_THREEPID_NOT_FOUND");
        let sid = world.verify_email("account/password", "fay@example.org", "s3").await;
        let new_pw = "a brand new password";
        let (status, body) = world.server.post("/_matrix/client/v3/account/password", None,
            json!({"new_password": new_pw, "auth": creds("m.login.email.identity", &sid, "s3", None)})).await;
        assert_eq!(status, 200, "{body}");
        assert_error(&world.server.get("/_matrix/client/v3/account/whoami", Some(&fay.token)).await, 401, "M_UNKNOWN_TOKEN");
        assert_error(&world.server.login("fay", PW, json!({})).await, 403, "M_FORBIDDEN");
        assert_eq!(world.server.login("fay", new_pw, json!({})).await.0, 200);
        let replay = world.server.post("/_matrix/client/v3/account/password", None,
            json!({"new_password": "yet another password", "auth": creds("m.login.email.identity", &sid, "s3", None)})).await;
        assert_eq!(replay.0, 401, "a reset verification works once");

        let sid = world.verify_phone("account/password", "GB", "+447400654321", "s4").await;
        let (status, body) = world.server.post("/_matrix/client/v3/account/password", None,
            json!({"new_password": new_pw, "auth": creds("m.login.msisdn", &sid, "s4", None)})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(world.server.login("gus", new_pw, json!({})).await.0, 200);
        world.stop().await;
    }

    async fn add_and_remove_addresses(db: Db) {
        let world = World::start(db, |_| {}).await;
        let hal = world.server.register("hal", PW).await;
        let sid = world.verify_email("account/3pid", "hal@example.org", "s1").await;
        let add = |auth: Option<Value>| {
            let mut body = json!({"sid": sid, "client_secret": "s1"});
            if let Some(auth) = auth {
                body["auth"] = auth;
            }
            world.server.post("/_matrix/client/v3/account/3pid/add", Some(&hal.token), body)
        };
        let (status, challenge) = add(None).await;
        assert_eq!(status, 401);
        let session = challenge["session"].as_str().unwrap().to_owned();
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "hal"}, "password": PW, "session": session});
        assert_eq!(add(Some(auth)).await.0, 200);
        let sid2 = world.verify_phone("account/3pid", "GB", "07400 111222", "s2").await;
        let (_, challenge) = world.server.post("/_matrix/client/v3/account/3pid/add", Some(&hal.token), json!({"sid": sid2, "client_secret": "s2"})).await;
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "hal"}, "password": PW, "session": challenge["session"]});
        assert_eq!(world.server.post("/_matrix/client/v3/account/3pid/add", Some(&hal.token), json!({"sid": sid2, "client_secret": "s2", "auth": auth})).await.0, 200);

        let (_, list) = world.server.get("/_matrix/client/v3/account/3pid", Some(&hal.token)).await;
        let list: Vec<(String, String)> = list["threepids"].as_array().unwrap().iter()
            .map(|t| (t["medium"].as_str().unwrap().to_owned(), t["address"].as_str().unwrap().to_owned())).collect();
        assert_eq!(list, [("email".to_owned(), "hal@example.org".to_owned()), ("msisdn".to_owned(), "447400111222".to_owned())]);

        // Someone else cannot claim the address now.
        assert_error(&world.email_code("account/3pid", "hal@example.org", "s3", 1).await, 400, "M_THREEPID_IN_USE");
        let (status, body) = world.server.post("/_matrix/client/v3/account/3pid/delete", Some(&hal.token),
            json!({"medium": "email", "address": "hal@example.org"})).await;
        assert_eq!(status, 200, "{body}");
        let (_, list) = world.server.get("/_matrix/client/v3/account/3pid", Some(&hal.token)).await;
        assert_eq!(list["threepids"].as_array().map_or(0, Vec::len), 1);
        let login = world.server.post("/_matrix/client/v3/login", None, json!({"type": "m.login.password",
            "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "hal@example.org"}, "password": PW})).await;
        assert_error(&login, 403, "M_FORBIDDEN");
        assert_error(&world.server.post("/_matrix/client/v3/account/3pid/delete", Some(&hal.token),
            json!({"medium": "email", "address": "hal@example.org"})).await, 400, "M_THREEPID_NOT_FOUND");
        world.stop().await;
    }

    async fn otp_login(db: Db) {
        let world = World::start(db, |_| {}).await;
        let ivy = world.server.register("ivy", PW).await;
        let sid = world.verify_phone("account/3pid", "GB", "07400 333444", "s1").await;
        let (_, challenge) = world.server.post("/_matrix/client/v3/account/3pid/add", Some(&ivy.token), json!({"sid": sid, "client_secret": "s1"})).await;
        let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "ivy"}, "password": PW, "session": challenge["session"]});
        assert_eq!(world.server.post("/_matrix/client/v3/account/3pid/add", Some(&ivy.token), json!({"sid": sid, "client_secret": "s1", "auth": auth})).await.0, 200);

        let (_, flows) = world.server.get("/_matrix/client/v3/login", None).await;
        assert!(flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "chat.hearth.login.otp"));
        let request = "/_matrix/client/unstable/chat.hearth.login.otp/requestToken";
        let sent = world.sms.received().len();
        let (status, body) = world.server.post(request, None,
            json!({"client_secret": "otp1", "send_attempt": 1, "medium": "msisdn", "country": "GB", "phone_number": "07400333444"})).await;
        assert_eq!(status, 200, "{body}");
        let otp_sid = body["sid"].as_str().unwrap().to_owned();
        let code = code_in(&world.sms.received()[sent].body);
        let wrong = world.server.post("/_matrix/client/v3/login", None,
            json!({"type": "chat.hearth.login.otp", "sid": otp_sid, "client_secret": "otp1", "token": "000000"})).await;
        assert_error(&wrong, 400, "M_THREEPID_AUTH_FAILED");
        let (status, body) = world.server.post("/_matrix/client/v3/login", None,
            json!({"type": "chat.hearth.login.otp", "sid": otp_sid, "client_secret": "otp1", "token": code})).await;
        assert_eq!((status, body["user_id"].as_str()), (200, Some("@ivy:localhost")), "{body}");
        let replay = world.server.post("/_matrix/client/v3/login", None,
            json!({"type": "chat.hearth.login.otp", "sid": otp_sid, "client_secret": "otp1", "token": code})).await;
        assert_error(&replay, 400, "M_THREEPID_AUTH_FAILED");

        // An unbound address gets the same answer and no SMS.
        let sent = world.sms.received().len();
        let (status, body) = world.server.post(request, None,
            json!({"client_secret": "otp2", "send_attempt": 1, "medium": "msisdn", "country": "GB", "phone_number": "07400999888"})).await;
        assert_eq!(status, 200);
        assert!(body["sid"].is_string());
        assert_eq!(world.sms.received().len(), sent);
        world.stop().await;
    }

    async fn jwt_login(db: Db) {
        let secret = "an-organisation-shared-secret-of-enough-length";
        let world = World::start(db, |config| {
            config.jwt_login.enabled = true;
            config.jwt_login.secret = homeserver::config::Secret(secret.to_owned());
            config.jwt_login.issuer = "https://idp.test".to_owned();
            config.jwt_login.audience = "hearth".to_owned();
            config.jwt_login.create_users = true;
        }).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let sign = |claims: Value, key: &str| {
            jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims,
                &jsonwebtoken::EncodingKey::from_secret(key.as_bytes())).unwrap()
        };
        let login = |token: String| world.server.post("/_matrix/client/v3/login", None, json!({"type": "org.matrix.login.jwt", "token": token}));
        let good = json!({"sub": "jo", "iss": "https://idp.test", "aud": "hearth", "exp": now + 60});
        let (status, body) = login(sign(good.clone(), secret)).await;
        assert_eq!((status, body["user_id"].as_str()), (200, Some("@jo:localhost")), "{body}");
        assert_eq!(login(sign(good.clone(), secret)).await.0, 200, "the account is reused");
        assert_error(&login(sign(good.clone(), "some-other-secret-of-enough-length-too")).await, 403, "M_FORBIDDEN");
        let mut expired = good.clone();
        expired["exp"] = (now - 120).into();
        assert_error(&login(sign(expired, secret)).await, 403, "M_FORBIDDEN");
        let mut wrong_issuer = good.clone();
        wrong_issuer["iss"] = "https://evil.test".into();
        assert_error(&login(sign(wrong_issuer, secret)).await, 403, "M_FORBIDDEN");
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_error(&login(sign(no_exp, secret)).await, 403, "M_FORBIDDEN");
        assert_error(&login("not.a.jwt".to_owned()).await, 403, "M_FORBIDDEN");
        let (_, flows) = world.server.get("/_matrix/client/v3/login", None).await;
        assert!(flows["flows"].as_array().unwrap().iter().any(|f| f["type"] == "org.matrix.login.jwt"));
        world.stop().await;
    }

    async fn wrong_expired_and_foreign_codes(db: Db) {
        let world = World::start(db, |config| config.threepid.code_lifetime_secs = 2).await;
        let submit_url = format!("{}/_hearth/client/v1/threepid/submit_token", world.server.base);
        // Five wrong codes kill the session: even the right code fails after that.
        let (_, body) = world.email_code("register", "kit@example.org", "k1", 1).await;
        let sid = body["sid"].as_str().unwrap().to_owned();
        let code = world.emailed_code(1).await;
        let wrong = if code == "111111" { "222222" } else { "111111" };
        for left in (0..5).rev() {
            let result = world.submit(&submit_url, &sid, "k1", wrong).await;
            assert_error(&result, 400, "M_THREEPID_AUTH_FAILED");
            if left > 0 {
                assert!(result.1["error"].as_str().unwrap().contains(&format!("{left} attempts left")), "{}", result.1);
            }
        }
        assert_error(&world.submit(&submit_url, &sid, "k1", &code).await, 400, "M_THREEPID_AUTH_FAILED");
        // A new send (higher send_attempt) gives a new code and a fresh count.
        let (status, again) = world.email_code("register", "kit@example.org", "k1", 2).await;
        assert_eq!((status, again["sid"].as_str()), (200, Some(sid.as_str())));
        let new_code = world.emailed_code(2).await;
        // The same send_attempt again sends nothing.
        assert_eq!(world.email_code("register", "kit@example.org", "k1", 2).await.0, 200);
        // Codes for another session or another client secret do not work.
        let (_, other) = world.email_code("register", "lou@example.org", "l1", 1).await;
        let other_sid = other["sid"].as_str().unwrap().to_owned();
        let other_code = world.emailed_code(3).await;
        assert_eq!(world.smtp.messages().len(), 3, "a repeated send_attempt sends no mail");
        if other_code != new_code {
            assert_error(&world.submit(&submit_url, &sid, "k1", &other_code).await, 400, "M_THREEPID_AUTH_FAILED");
        }
        assert_error(&world.submit(&submit_url, &other_sid, "k1", &other_code).await, 400, "M_THREEPID_AUTH_FAILED");
        assert_eq!(world.submit(&submit_url, &sid, "k1", &new_code).await.0, 200);
        // An expired code fails.
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        assert_error(&world.submit(&submit_url, &other_sid, "l1", &other_code).await, 400, "M_THREEPID_AUTH_FAILED");
        // Garbage.
        assert_error(&world.server.raw("POST", "/_hearth/client/v1/threepid/submit_token", None, b"{".to_vec()).await, 400, "M_NOT_JSON");
        assert_error(&world.server.post("/_hearth/client/v1/threepid/submit_token", None, json!({"sid": "x"})).await, 400, "M_MISSING_PARAM");
        world.stop().await;
    }

    async fn bad_addresses_and_policy(db: Db) {
        let world = World::start(db, |config| {
            config.registration.allowed_email_domains = vec!["example.org".to_owned()];
            config.registration.allowed_phone_countries = vec!["44".to_owned()];
        }).await;
        assert_error(&world.email_code("register", "not-an-email", "s", 1).await, 400, "M_INVALID_PARAM");
        assert_error(&world.email_code("register", "x@elsewhere.net", "s", 1).await, 403, "M_THREEPID_DENIED");
        assert_eq!(world.email_code("register", "x@team.example.org", "s", 1).await.0, 200, "subdomains are allowed");
        assert_error(&world.phone_code("register", "GB", "12", "s", 1).await, 400, "M_INVALID_PARAM");
        assert_error(&world.phone_code("register", "ZZ", "07400123456", "s", 1).await, 400, "M_INVALID_PARAM");
        assert_error(&world.phone_code("register", "US", "(201) 555-0123", "s", 1).await, 403, "M_THREEPID_DENIED");
        // ruma rejects a client secret outside the spec's grammar while parsing the body.
        assert_error(&world.email_code("register", "y@example.org", "bad secret!", 1).await, 400, "M_BAD_JSON");
        world.stop().await;

        // A server that sends no SMS says so.
        let smtp = SmtpSink::start().await;
        let server = TestServer::start_with(db, |c| smtp.configure(c)).await;
        let body = json!({"client_secret": "s", "country": "GB", "phone_number": "07400123456", "send_attempt": 1});
        let result = server.post("/_matrix/client/v3/register/msisdn/requestToken", None, body).await;
        assert_error(&result, 400, "M_THREEPID_MEDIUM_NOT_SUPPORTED");
        server.stop().await;
    }

    /// Three people behind one office NAT register with email under the default limits: the
    /// registration budget counts attempts, not the round trips of each one's flow (the client
    /// polls while its user reads the mail).
    async fn one_office_registers_with_email(db: Db) {
        let world = World::start(db, |config| {
            config.rate_limits.enabled = true;
            config.registration.require = RequiredThreepid::Email;
        }).await;
        for (n, name) in ["ann", "ben", "cat"].into_iter().enumerate() {
            let (status, challenge) = world.server.post("/_matrix/client/v3/register", None, json!({"username": name, "password": PW})).await;
            assert_eq!(status, 401, "{challenge}");
            let session = challenge["session"].as_str().unwrap();
            let secret = format!("secret-{name}");
            let (status, body) = world.email_code("register", &format!("{name}@example.org"), &secret, 1).await;
            assert_eq!(status, 200, "{body}");
            let sid = body["sid"].as_str().unwrap();
            for _ in 0..3 {
                let early = world.register_with(name, creds("m.login.email.identity", sid, &secret, Some(session))).await;
                assert_eq!((early.0, early.1["errcode"].as_str()), (401, Some("M_THREEPID_AUTH_FAILED")), "{}", early.1);
            }
            let code = world.emailed_code(n + 1).await;
            let (status, result) = world.submit(body["submit_url"].as_str().unwrap(), sid, &secret, &code).await;
            assert_eq!(status, 200, "{result}");
            let (status, done) = world.register_with(name, creds("m.login.email.identity", sid, &secret, Some(session))).await;
            assert_eq!(status, 200, "{name}: {done}");
        }
        world.stop().await;
    }

    async fn floods_are_limited(db: Db) {
        let world = World::start(db, |config| {
            config.rate_limits.enabled = true;
            config.rate_limits.register_burst = 100;
            config.rate_limits.code_per_address_burst = 3;
            config.rate_limits.code_per_ip_burst = 6;
        }).await;
        // One address: three sends, then wait.
        for attempt in 1..=3 {
            assert_eq!(world.email_code("register", "flood@example.org", "f", attempt).await.0, 200);
        }
        let limited = world.email_code("register", "flood@example.org", "f", 4).await;
        assert_error(&limited, 429, "M_LIMIT_EXCEEDED");
        assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 1000);
        // One IP: six sends in all, to any addresses.
        for n in 0..3 {
            assert_eq!(world.email_code("register", &format!("f{n}@example.org"), "f", 1).await.0, 200);
        }
        assert_error(&world.email_code("register", "f9@example.org", "f", 1).await, 429, "M_LIMIT_EXCEEDED");
        assert_eq!(world.smtp.messages().len(), 6);
        world.stop().await;
    }

    async fn provider_down_is_a_clear_error(db: Db) {
        let world = World::start(db, |_| {}).await;
        world.sms.set_mode(SmsMode::Fail);
        let failed = world.phone_code("register", "GB", "07400 123456", "p", 1).await;
        assert_error(&failed, 502, "M_UNKNOWN");
        assert!(failed.1["error"].as_str().unwrap().contains("SMS provider"), "{}", failed.1);
        world.sms.set_mode(SmsMode::Hang);
        let timed_out = world.phone_code("register", "GB", "07400 123456", "p", 2).await;
        assert_error(&timed_out, 502, "M_UNKNOWN");
        world.sms.set_mode(SmsMode::Accept);
        assert_eq!(world.phone_code("register", "GB", "07400 123456", "p", 3).await.0, 200, "a retry goes through");
        world.stop().await;

        // Email to a server that is not there.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = TestServer::start_with(db, |c| {
            c.email.smtp_host = "127.0.0.1".to_owned();
            c.email.smtp_port = closed;
            c.email.smtp_tls = homeserver::config::SmtpTls::None;
            c.email.timeout_secs = 2;
        }).await;
        let result = server.post("/_matrix/client/v3/register/email/requestToken", None,
            json!({"client_secret": "e", "email": "m@example.org", "send_attempt": 1})).await;
        assert_error(&result, 502, "M_UNKNOWN");
        server.stop().await;
    }
}

/// JWT login with a public key (EdDSA): the identity provider keeps the private half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_login_with_a_public_key() {
    use base64::Engine;
    let der = ruma::signatures::Ed25519KeyPair::generate();
    let public = ruma::signatures::Ed25519KeyPair::from_der(&der, "1".to_owned()).unwrap().public_key();
    // SubjectPublicKeyInfo for an Ed25519 key: a fixed 12-byte prefix, then the key.
    let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(&public);
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&spki)
    );
    let key_dir = std::env::temp_dir().join(format!("hearth-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&key_dir).unwrap();
    let key_file = key_dir.join("idp.pem");
    std::fs::write(&key_file, pem).unwrap();
    let server = TestServer::start_with(Db::Sqlite, |config| {
        config.jwt_login.enabled = true;
        config.jwt_login.algorithm = "EdDSA".to_owned();
        config.jwt_login.public_key_file = key_file.display().to_string();
        config.jwt_login.subject_claim = "preferred_username".to_owned();
    })
    .await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"preferred_username": "kai", "exp": now + 60});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
        &claims,
        &jsonwebtoken::EncodingKey::from_ed_der(&der),
    )
    .unwrap();
    let login = |token: String| {
        server.post("/_matrix/client/v3/login", None, json!({"type": "org.matrix.login.jwt", "token": token}))
    };
    // Accounts are not created unless configured.
    assert_error(&login(token.clone()).await, 403, "M_FORBIDDEN");
    server.register("kai", PW).await;
    let (status, body) = login(token).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some("@kai:localhost")), "{body}");
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"guessing-the-algorithm-does-not-work"),
    )
    .unwrap();
    assert_error(&login(forged).await, 403, "M_FORBIDDEN");
    server.stop().await;
    let _ = std::fs::remove_dir_all(key_dir);
}
