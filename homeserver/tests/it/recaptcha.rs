//! The `m.login.recaptcha` registration stage against a verifier the test runs: a stand-in for
//! Google's `siteverify` (an outside service), over HTTPS from a throwaway CA, that checks what
//! Hearth sends it.

use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use homeserver::config::Secret;
use serde_json::{Value, json};

use crate::{
    common::{Db, TestServer},
    providers::serde_html_form_decode as form_decode,
    tls::TestCa,
};

const PUBLIC_KEY: &str = "site-key-for-tests";
const SECRET: &str = "secret-key-for-tests";
const SOLVED: &str = "a-solved-captcha";

#[derive(Default)]
struct VerifierState {
    /// Each request's form fields.
    received: Mutex<Vec<Vec<(String, String)>>>,
}

async fn siteverify(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<Arc<VerifierState>>,
) -> HttpResponse {
    let content_type =
        request.headers().get("Content-Type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/x-www-form-urlencoded"), "content type {content_type}");
    let fields = form_decode(&body);
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let success = field("secret").as_deref() == Some(SECRET) && field("response").as_deref() == Some(SOLVED);
    state.received.lock().unwrap().push(fields);
    HttpResponse::Ok().json(json!({ "success": success, "hostname": "127.0.0.1" }))
}

struct Verifier {
    url: String,
    state: Arc<VerifierState>,
    handle: actix_web::dev::ServerHandle,
}

impl Verifier {
    async fn start(ca: &TestCa) -> Self {
        let state = Arc::new(VerifierState::default());
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new().app_data(data.clone()).route("/recaptcha/api/siteverify", web::post().to(siteverify))
        })
        .workers(1)
        // No pooled connection outlives `stop`: each request opens its own.
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals()
        .bind_rustls_0_23("127.0.0.1:0", ca.server_config())
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { url: format!("https://{addr}/recaptcha/api/siteverify"), state, handle }
    }

    fn received(&self) -> Vec<Vec<(String, String)>> {
        self.state.received.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

async fn start(db: Db, ca: &TestCa, url: &str, required: bool) -> TestServer {
    let (ca_file, url) = (ca.ca_file(), url.to_owned());
    TestServer::start_with(db, move |config| {
        let captcha = &mut config.registration.recaptcha;
        captcha.public_key = PUBLIC_KEY.to_owned();
        captcha.private_key = Secret(SECRET.to_owned());
        captcha.siteverify_url = url;
        captcha.required = required;
        captcha.extra_ca_file = ca_file;
    })
    .await
}

fn captcha(response: &str, session: &str) -> Value {
    json!({ "type": "m.login.recaptcha", "response": response, "session": session })
}

async fn register(server: &TestServer, body: Value) -> (u16, Value) {
    server.post("/_matrix/client/v3/register", None, body).await
}

crate::on_both_backends! {
    async fn a_required_captcha_gates_registration_and_is_checked_with_the_verifier(db: Db) {
        let ca = TestCa::new();
        let verifier = Verifier::start(&ca).await;
        let server = start(db, &ca, &verifier.url, true).await;

        let (status, challenge) = register(&server, json!({"username": "cat", "password": "a long password"})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.recaptcha"]}]));
        assert_eq!(challenge["params"], json!({"m.login.recaptcha": {"public_key": PUBLIC_KEY}}));
        let session = challenge["session"].as_str().unwrap().to_owned();

        // A wrong answer: the verifier says no, the stage stays open, no account is made.
        let (status, wrong) = register(&server, json!({"auth": captcha("a-guess", &session)})).await;
        assert_eq!(status, 401);
        assert_eq!(wrong["errcode"], "M_UNAUTHORIZED");
        assert_eq!(wrong["completed"], json!([]));
        // Dummy is not a way around it.
        let (status, dummy) =
            register(&server, json!({"auth": {"type": "m.login.dummy", "session": session}})).await;
        assert_eq!(status, 401);
        assert_eq!(dummy["errcode"], "M_FORBIDDEN");

        let (status, done) = register(&server, json!({"auth": captcha(SOLVED, &session)})).await;
        assert_eq!(status, 200, "{done}");
        assert!(done["user_id"].as_str().unwrap().starts_with("@cat:"), "{done}");

        let received = verifier.received();
        assert_eq!(received.len(), 2, "{received:?}");
        let fields = |n: usize| -> std::collections::BTreeMap<String, String> { received[n].iter().cloned().collect() };
        assert_eq!(fields(0)["response"], "a-guess");
        assert_eq!(fields(1)["response"], SOLVED);
        for n in 0..2 {
            assert_eq!(fields(n)["secret"], SECRET);
            assert_eq!(fields(n)["remoteip"], "127.0.0.1");
        }
        server.stop().await;
        verifier.stop().await;
    }

    async fn a_captcha_that_is_not_required_may_still_be_completed(db: Db) {
        let ca = TestCa::new();
        let verifier = Verifier::start(&ca).await;
        let server = start(db, &ca, &verifier.url, false).await;

        let (status, challenge) = register(&server, json!({"username": "dog", "password": "a long password"})).await;
        assert_eq!(status, 401);
        assert_eq!(challenge["flows"], json!([{"stages": ["m.login.dummy"]}]));
        assert_eq!(challenge["params"], json!({"m.login.recaptcha": {"public_key": PUBLIC_KEY}}));
        let session = challenge["session"].as_str().unwrap().to_owned();

        // Completed, it finishes no flow: the client is told so and goes on.
        let (status, partial) = register(&server, json!({"auth": captcha(SOLVED, &session)})).await;
        assert_eq!(status, 401);
        assert_eq!(partial["completed"], json!(["m.login.recaptcha"]));
        assert!(partial.get("errcode").is_none(), "{partial}");
        let (status, done) =
            register(&server, json!({"auth": {"type": "m.login.dummy", "session": session}})).await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(verifier.received().len(), 1);
        server.stop().await;
        verifier.stop().await;
    }

    async fn a_verifier_that_cannot_be_reached_is_a_clear_error(db: Db) {
        let ca = TestCa::new();
        // Nothing listens there once the verifier has stopped.
        let verifier = Verifier::start(&ca).await;
        let url = verifier.url.clone();
        verifier.stop().await;
        let server = start(db, &ca, &url, true).await;

        let (_, challenge) = register(&server, json!({"username": "eel", "password": "a long password"})).await;
        let session = challenge["session"].as_str().unwrap().to_owned();
        let (status, body) = register(&server, json!({"auth": captcha(SOLVED, &session)})).await;
        assert_eq!(status, 401);
        assert_eq!(body["errcode"], "M_UNKNOWN");
        assert!(body["error"].as_str().unwrap().contains("could not be checked"), "{body}");
        assert_eq!(body["completed"], json!([]));
        server.stop().await;
    }
}
