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

/// Waits (up to 30 s) for `check` to find what it looks for.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `m.room.message` bodies of a room's timeline in a `/sync` answer, in order.
fn message_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Follows `/sync` (through `sync`, given each `since`) from `since` until `count` messages
/// arrived in `room` (up to 30 s); their bodies in order.
async fn messages_after<F, Fut>(mut since: String, room: &str, count: usize, sync: F) -> Vec<String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Value>,
{
    let started = Instant::now();
    let mut bodies = Vec::new();
    while bodies.len() < count {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out; messages so far: {bodies:?}");
        let answer = sync(since.clone()).await;
        bodies.extend(message_bodies(&answer, room));
        since = answer["next_batch"].as_str().unwrap_or(&since).to_owned();
    }
    bodies
}

/// A Synapse user joins a room on Hearth by its alias (`make_join`, `send_join`); then messages
/// sent on either server reach the other's `/sync` in the order sent (transactions both ways),
/// and a name set on Hearth is the room's name on Synapse too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_joins_a_hearth_room_by_alias_and_messages_flow_both_ways() {
    let ca = TestCa::new();
    let synapse = Synapse::start(&ca).await;
    for (n, db) in [Db::Sqlite, Db::Postgres].into_iter().enumerate() {
        let (bob, bob_token) = synapse.register(&ca, &format!("bob{n}")).await;
        let hearth = Federating::start(db, &ca).await;
        let server: &TestServer = &hearth.server;
        let alice = server.register("alice", "a long password").await;
        let room = crate::common::create_room(
            server,
            &alice,
            json!({"room_alias_name": "hall", "preset": "public_chat", "room_version": "12"}),
        )
        .await;
        let alias = format!("#hall:{}", hearth.name);
        let (status, joined) = synapse
            .request(
                &ca,
                "POST",
                &format!("/_matrix/client/v3/join/{}", enc(&alias)),
                &bob_token,
                Some(json!({})),
            )
            .await;
        assert_eq!((status, &joined["room_id"]), (200, &json!(room)), "{db:?}: {joined}\n{}", synapse.log());

        // Hearth sees the join, then Synapse's messages, in order.
        let (_, first) = server.get("/_matrix/client/v3/sync", Some(&alice.token)).await;
        let since = first["next_batch"].as_str().unwrap().to_owned();
        for (i, body) in ["one from synapse", "two from synapse"].iter().enumerate() {
            let (status, sent) = synapse
                .request(
                    &ca,
                    "PUT",
                    &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/s{i}", enc(&room)),
                    &bob_token,
                    Some(json!({"msgtype": "m.text", "body": body})),
                )
                .await;
            assert_eq!(status, 200, "{sent}");
        }
        let bodies = messages_after(since, &room, 2, |since| {
            let path = format!("/_matrix/client/v3/sync?since={since}&timeout=1000");
            let token = &alice.token;
            async move { server.get(&path, Some(token)).await.1 }
        })
        .await;
        assert_eq!(bodies, ["one from synapse", "two from synapse"], "{db:?}");
        let (_, members) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&alice.token))
            .await;
        assert!(members["joined"].get(&bob).is_some(), "{db:?}: {members}");

        // Synapse sees Hearth's messages in order, and the name Hearth set.
        let (_, first) = synapse.request(&ca, "GET", "/_matrix/client/v3/sync", &bob_token, None).await;
        let since = first["next_batch"].as_str().unwrap().to_owned();
        for (i, body) in ["one from hearth", "two from hearth", "three from hearth"].iter().enumerate() {
            crate::common::send_text(server, &alice, &room, &format!("h{i}"), body).await;
        }
        crate::common::put_state(server, &alice, &room, "m.room.name", "", json!({"name": "The Hall"})).await;
        let bodies = messages_after(since, &room, 3, |since| {
            let path = format!("/_matrix/client/v3/sync?since={since}&timeout=1000");
            let (synapse, ca, token) = (&synapse, &ca, &bob_token);
            async move { synapse.request(ca, "GET", &path, token, None).await.1 }
        })
        .await;
        assert_eq!(bodies, ["one from hearth", "two from hearth", "three from hearth"], "{db:?}");
        let name = eventually("the room's name on Synapse", || async {
            let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
            let (status, name) = synapse.request(&ca, "GET", &path, &bob_token, None).await;
            (status == 200).then_some(name)
        })
        .await;
        assert_eq!(name["name"], "The Hall", "{db:?}");
        hearth.stop().await;
    }
    synapse.stop().await;
}
