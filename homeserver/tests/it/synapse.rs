//! Hearth federating with Synapse (from PyPI, in `interop/.venv`), started here on loopback
//! with TLS from the test CA, which it trusts, as both Hearths (one on SQLite, one on Postgres)
//! do. One Synapse serves the whole test.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{
    common::{Db, TestServer, enc},
    federated_chat::Client,
    federation::Federating,
    interop::{free_port, python},
    tls::TestCa,
};

/// A Synapse homeserver process.
pub(crate) struct Synapse {
    pub name: String,
    pub base: String,
    dir: PathBuf,
    child: Child,
}

impl Synapse {
    pub(crate) async fn start(ca: &TestCa) -> Self {
        let port = free_port();
        let name = format!("127.0.0.1:{port}");
        let dir = std::env::temp_dir()
            .join(format!("hearth-synapse-{}", homeserver::auth::tokens::random_token(10)));
        std::fs::create_dir_all(&dir).unwrap();
        let (certificate, key) = ca.server_files();
        let config = synapse_config(&name, port, &dir, &certificate, &key, &ca.ca_file());
        std::fs::write(dir.join("homeserver.yaml"), config).unwrap();
        let generate = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "-c", "homeserver.yaml", "--generate-keys"])
            .current_dir(&dir)
            .output()
            .await
            .expect("run synapse --generate-keys");
        assert!(
            generate.status.success(),
            "synapse --generate-keys: {}",
            String::from_utf8_lossy(&generate.stderr)
        );
        let log = std::fs::File::create(dir.join("synapse.log")).unwrap();
        let child = Command::new(python())
            .args(["-m", "synapse.app.homeserver", "-c", "homeserver.yaml"])
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn synapse");
        let synapse = Self { name, base: format!("https://127.0.0.1:{port}"), dir, child };
        synapse.wait_ready(ca).await;
        synapse
    }

    async fn wait_ready(&self, ca: &TestCa) {
        let started = Instant::now();
        let http = ca.client();
        while started.elapsed() < Duration::from_secs(240) {
            if let Ok(answer) = http.get(format!("{}/_matrix/client/versions", self.base)).send().await
                && answer.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("synapse did not start; log:\n{}", self.log());
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("synapse.log")).unwrap_or_default()
    }

    /// Registers a user (open registration, `m.login.dummy`); returns its user id and token.
    pub(crate) async fn register(&self, ca: &TestCa, username: &str) -> (String, String) {
        let body =
            json!({"username": username, "password": "a long password", "auth": {"type": "m.login.dummy"}});
        let answer: Value = ca
            .client()
            .post(format!("{}/_matrix/client/v3/register", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let user = answer["user_id"].as_str().unwrap_or_else(|| panic!("register on synapse: {answer}"));
        (user.to_owned(), answer["access_token"].as_str().unwrap().to_owned())
    }

    /// A client-server request to Synapse as `token`.
    pub(crate) async fn request(
        &self,
        ca: &TestCa,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = ca.client().request(method, format!("{}{path}", self.base)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.unwrap();
        let status = answer.status().as_u16();
        (status, answer.json().await.unwrap_or(Value::Null))
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn synapse_config(name: &str, port: u16, dir: &Path, certificate: &str, key: &str, ca: &str) -> String {
    let dir = dir.display();
    let secret = homeserver::auth::tokens::random_token(32);
    format!(
        r#"server_name: "{name}"
pid_file: "{dir}/homeserver.pid"
listeners:
  - port: {port}
    bind_addresses: ["127.0.0.1"]
    type: http
    tls: true
    x_forwarded: false
    resources:
      - names: [client, federation]
        compress: false
tls_certificate_path: "{certificate}"
tls_private_key_path: "{key}"
database:
  name: sqlite3
  args:
    database: "{dir}/homeserver.db"
media_store_path: "{dir}/media"
signing_key_path: "{dir}/signing.key"
report_stats: false
trusted_key_servers: []
suppress_key_server_warning: true
enable_registration: true
enable_registration_without_verification: true
registration_shared_secret: "{secret}"
macaroon_secret_key: "{secret}"
form_secret: "{secret}"
bcrypt_rounds: 4
federation_verify_certificates: true
federation_custom_ca_list: ["{ca}"]
federation_ip_range_blacklist: []
ip_range_whitelist: ["127.0.0.1"]
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
rc_federation: {{window_size: 1000, sleep_limit: 1000, sleep_delay: 1, reject_limit: 1000, concurrent: 100}}
"#
    )
}

/// Users and aliases are found across Hearth and Synapse in both directions: each checks the
/// other's X-Matrix signatures with keys fetched over TLS, and each answers the other's queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearth_and_synapse_find_each_others_users_and_aliases() {
    let ca = TestCa::new();
    let synapse = Synapse::start(&ca).await;
    let (bob, bob_token) = synapse.register(&ca, "bob").await;
    let (status, _) = synapse
        .request(
            &ca,
            "PUT",
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob)),
            &bob_token,
            Some(json!({"displayname": "Bob of Synapse"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, created) = synapse
        .request(
            &ca,
            "POST",
            "/_matrix/client/v3/createRoom",
            &bob_token,
            Some(json!({"room_alias_name": "plaza"})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let synapse_alias = format!("#plaza:{}", synapse.name);

    for db in [Db::Sqlite, Db::Postgres] {
        let hearth = Federating::start(db, &ca).await;
        let server: &TestServer = &hearth.server;
        let alice = server.register("alice", "a long password").await;
        crate::common::put_ok(
            server,
            &alice,
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id)),
            json!({"displayname": "Alice of Hearth"}),
        )
        .await;
        crate::common::create_room(server, &alice, json!({"room_alias_name": "hall"})).await;

        // Hearth asks Synapse.
        let (status, profile) =
            server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob)), Some(&alice.token)).await;
        assert_eq!(
            (status, &profile["displayname"]),
            (200, &json!("Bob of Synapse")),
            "{db:?}: {profile}\n{}",
            synapse.log()
        );
        let (status, found) = server
            .get(&format!("/_matrix/client/v3/directory/room/{}", enc(&synapse_alias)), Some(&alice.token))
            .await;
        assert_eq!((status, &found["room_id"]), (200, &created["room_id"]), "{db:?}: {found}");

        // Synapse asks Hearth.
        let (status, profile) = synapse
            .request(
                &ca,
                "GET",
                &format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)),
                &bob_token,
                None,
            )
            .await;
        assert_eq!(
            (status, &profile["displayname"]),
            (200, &json!("Alice of Hearth")),
            "{db:?}: {profile}\n{}",
            synapse.log()
        );
        let hearth_alias = format!("#hall:{}", hearth.name);
        let (status, found) = synapse
            .request(
                &ca,
                "GET",
                &format!("/_matrix/client/v3/directory/room/{}", enc(&hearth_alias)),
                &bob_token,
                None,
            )
            .await;
        assert_eq!(status, 200, "{db:?}: {found}\n{}", synapse.log());
        assert_eq!(found["servers"], json!([hearth.name.to_string()]));
        hearth.stop().await;
    }
    synapse.stop().await;
}

/// Rooms shared between Hearth and Synapse, each side hosting in turn: a user of the other
/// server joins by alias and by invite and reads the history from before, messages flow both
/// ways, invites are rejected, and kicks, bans, power levels and concurrent state changes hold
/// the same on both ([`crate::federated_chat`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearth_and_synapse_host_and_join_each_others_rooms_with_history_invites_kicks_bans_and_converging_state()
 {
    let ca = TestCa::new();
    let synapse = Synapse::start(&ca).await;
    for (n, db) in [Db::Sqlite, Db::Postgres].into_iter().enumerate() {
        let hearth = Federating::start(db, &ca).await;
        let alice = hearth.server.register("alice", "a long password").await;
        let (bob, bob_token) = synapse.register(&ca, &format!("bob{n}")).await;
        let on_hearth = Client::Hearth(&hearth.server, &alice.token);
        let on_synapse = Client::Synapse(&synapse, &ca, &bob_token);
        let context = || format!("{db:?}; synapse log:\n{}", synapse.log());
        crate::federated_chat::chat(&on_hearth, &hearth.name, &on_synapse, "hall", &context).await;
        crate::federated_chat::chat(&on_synapse, &synapse.name, &on_hearth, &format!("plaza{n}"), &context)
            .await;
        crate::federated_chat::invite_and_ban(&on_hearth, &on_synapse, &bob, &context).await;
        crate::federated_chat::invite_and_ban(&on_synapse, &on_hearth, &alice.user_id, &context).await;
        crate::federated_chat::invite_rejected(&on_hearth, &on_synapse, &bob, &context).await;
        crate::federated_chat::invite_rejected(&on_synapse, &on_hearth, &alice.user_id, &context).await;
        hearth.stop().await;
    }
    synapse.stop().await;
}

/// matrix-nio's users of Hearth and of Synapse share a room hosted on each side in turn
/// ([`crate::interop::run_federation_harness`]): joined by alias and by invite, messages in
/// order both ways, name, power levels and topic, history read by a late joiner, a kick and a
/// ban held on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_users_of_hearth_and_synapse_share_rooms_each_side_hosting() {
    let ca = TestCa::new();
    let synapse = Synapse::start(&ca).await;
    let hearth = Federating::start(Db::Sqlite, &ca).await;
    let log = || format!("synapse log:\n{}", synapse.log());
    crate::interop::run_federation_harness(&hearth.server.base, &synapse.base, &ca.ca_file(), &log).await;
    crate::interop::run_federation_harness(&synapse.base, &hearth.server.base, &ca.ca_file(), &log).await;
    hearth.stop().await;
    synapse.stop().await;
}

/// matrix-nio users of Hearth and of Synapse chat in an encrypted room, each side hosting it in
/// turn (nio's `e2ee.py` with bob on the other server): keys asked across, room keys sent to the
/// other server's devices, a second device of bob's announced across and decrypting what
/// follows, and messages sent while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_users_of_hearth_and_synapse_chat_encrypted_each_side_hosting() {
    let ca = TestCa::new();
    let synapse = Synapse::start(&ca).await;
    let hearth = Federating::start(Db::Sqlite, &ca).await;
    let log = || format!("synapse log:\n{}", synapse.log());
    crate::interop::run_e2ee_across(&hearth.server.base, &synapse.base, &ca.ca_file(), &log).await;
    crate::interop::run_e2ee_across(&synapse.base, &hearth.server.base, &ca.ca_file(), &log).await;
    hearth.stop().await;
    synapse.stop().await;
}
