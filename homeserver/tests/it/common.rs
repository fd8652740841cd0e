//! The test harness: a real database per test (a SQLite file, or a fresh Postgres database) and
//! the real server on an ephemeral loopback port, driven over HTTP.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use homeserver::{config::Config, server::RunningServer};
use serde_json::{Value, json};
use sqlx::{Connection, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Postgres server the tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Redis the Postgres tests queue envelopes in (under a key prefix of their own).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A fresh, empty database and a scratch directory, removed when the test is done. Postgres
/// tests run as a deployment would: with the envelope queue in Redis; SQLite tests as a
/// single node would: with the embedded queue.
pub struct TestDb {
    pub url: String,
    pub dir: PathBuf,
    pg_name: Option<String>,
    /// The Redis key prefix, for Postgres tests.
    pub redis_prefix: Option<String>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("hearth_t_{}_{n}_{nanos}", std::process::id())
}

impl TestDb {
    pub async fn new(db: Db) -> Self {
        homeserver::install_crypto_provider();
        let name = unique_name();
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        match db {
            Db::Sqlite => {
                // Where `hearth serve` keeps it by default when run in `dir`.
                let data = dir.join("hearth-data");
                std::fs::create_dir_all(&data).expect("data dir");
                let url = format!("sqlite://{}?mode=rwc", data.join("hearth.db").display());
                Self { url, dir, pg_name: None, redis_prefix: None }
            }
            Db::Postgres => {
                let admin = postgres_admin_url();
                let mut conn =
                    sqlx::PgConnection::connect(&admin).await.expect("connect to Postgres for tests");
                conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .expect("create db");
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
                Self {
                    url: format!("{base}/{name}"),
                    dir,
                    pg_name: Some(name.clone()),
                    redis_prefix: Some(name),
                }
            }
        }
    }

    /// Removes the database and the scratch directory.
    pub async fn remove(self) {
        if let Some(name) = &self.pg_name
            && let Ok(mut conn) = sqlx::PgConnection::connect(&postgres_admin_url()).await
        {
            let _ = conn
                .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .await;
        }
        if let Some(prefix) = &self.redis_prefix
            && let Ok(client) = redis::Client::open(redis_url())
            && let Ok(mut redis) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}:*"))
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await;
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Secret the test servers sign tokens with, so tests can mint tokens as the server would.
pub const TOKEN_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config { data_dir: db.dir.clone(), ..Config::default() };
    config.listen.client = "127.0.0.1:0".to_owned();
    config.database.url = db.url.clone();
    config.database.max_connections = 4;
    config.rate_limits.enabled = false;
    config.auth.token_secret = homeserver::config::Secret(TOKEN_SECRET.to_owned());
    if let Some(prefix) = &db.redis_prefix {
        config.redis.url = redis_url();
        config.redis.key_prefix = prefix.clone();
    }
    config
}

pub struct TestServer {
    pub base: String,
    pub http: reqwest::Client,
    pub server: RunningServer,
    /// The database, owned by the first server started on it.
    db: Option<TestDb>,
}

/// A server stopped by [`TestServer::halt`].
pub struct Halted {
    config: Config,
    db: Option<TestDb>,
}

impl Halted {
    /// Starts the server again as it was configured (a new port for the client listener).
    pub async fn start(self) -> TestServer {
        let mut config = self.config;
        config.listen.client = "127.0.0.1:0".to_owned();
        TestServer::run(config, self.db).await
    }
}

/// A logged-in client.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

impl TestServer {
    pub async fn start(db: Db) -> Self {
        Self::start_with(db, |_| {}).await
    }

    /// A server on a fresh database, which it removes when stopped.
    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::new(db).await;
        let mut server = Self::start_on(&db, tweak).await;
        server.db = Some(db);
        server
    }

    /// A server on a database the caller keeps.
    pub async fn start_on(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(db);
        tweak(&mut config);
        Self::run(config, None).await
    }

    /// A server started with `config`, owning `db` if given.
    async fn run(config: Config, db: Option<TestDb>) -> Self {
        let server = homeserver::server::start(config).await.expect("server starts");
        let base = format!("http://{}", server.addr);
        Self { base, http: reqwest::Client::new(), server, db }
    }

    /// Another worker on the same database and token secret, as in a scaled-out deployment.
    pub async fn another_worker(&self) -> Self {
        let mut config = self.server.state.config.clone();
        config.listen.client = "127.0.0.1:0".to_owned();
        Self::run(config, None).await
    }

    /// Starts a `/sync` long-poll from `since` with a two-minute timeout, in the background: a
    /// test that sees it end within seconds knows it was woken.
    pub fn long_poll(&self, token: &str, since: &str) -> tokio::task::JoinHandle<Value> {
        let url = format!("{}/_matrix/client/v3/sync?since={since}&timeout=120000", self.base);
        let request = self.http.get(url).bearer_auth(token);
        tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
    }

    /// Stops the server, keeping its database and data directory, to be started again on them.
    pub async fn halt(mut self) -> Halted {
        let config = self.server.state.config.clone();
        let db = self.db.take();
        self.server.stop().await;
        Halted { config, db }
    }

    pub async fn stop(self) {
        self.server.stop().await;
        if let Some(db) = self.db {
            db.remove().await;
        }
    }

    /// Sends a request; `body` of `None` sends no body. Returns status and JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let json = parse_json(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// Sends raw bytes with a content type.
    pub async fn raw(&self, method: &str, path: &str, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let json = response.json().await.unwrap_or(Value::Null);
        (status, json)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.request("GET", path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        self.request("POST", path, token, Some(body)).await
    }

    /// Registers through UIA (`m.login.dummy`) and returns the new session.
    pub async fn register(&self, username: &str, password: &str) -> Session {
        let (status, body) = self
            .post(
                "/_matrix/client/v3/register",
                None,
                json!({"username": username, "password": password, "auth": {"type": "m.login.dummy"}}),
            )
            .await;
        assert_eq!(status, 200, "register {username}: {body}");
        session_of(&body)
    }

    pub async fn login(&self, username: &str, password: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        self.post("/_matrix/client/v3/login", None, body).await
    }
}

/// Percent-encodes an id for a path (version 3 event ids are standard base64, with `+` and `/`).
pub fn enc(s: &str) -> String {
    s.replace('%', "%25")
        .replace('!', "%21")
        .replace(':', "%3A")
        .replace('#', "%23")
        .replace('@', "%40")
        .replace('$', "%24")
        .replace('/', "%2F")
        .replace('+', "%2B")
}

/// Creates a room as `who`, returning its id.
pub async fn create_room(server: &TestServer, who: &Session, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().expect("room_id").to_owned()
}

/// A PUT that must succeed, returning its answer.
pub async fn put_ok(server: &TestServer, who: &Session, path: &str, body: Value) -> Value {
    let (status, answer) = server.request("PUT", path, Some(&who.token), Some(body)).await;
    assert_eq!(status, 200, "PUT {path}: {answer}");
    answer
}

/// Sends a text message as `who`, returning its event id.
pub async fn send_text(server: &TestServer, who: &Session, room: &str, txn: &str, body: &str) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
    put_ok(server, who, &path, json!({"msgtype": "m.text", "body": body})).await["event_id"]
        .as_str()
        .expect("event_id")
        .to_owned()
}

/// Sets a room's state as `who`, returning the event id.
pub async fn put_state(
    server: &TestServer,
    who: &Session,
    room: &str,
    kind: &str,
    key: &str,
    content: Value,
) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key));
    put_ok(server, who, &path, content).await["event_id"].as_str().expect("event_id").to_owned()
}

/// Joins a room by id or alias, answering status and body.
pub async fn join_room(server: &TestServer, who: &Session, room: &str) -> (u16, Value) {
    server.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&who.token), json!({})).await
}

/// Parses a response as clients without a recursion limit do (Python's and JavaScript's parsers
/// take far deeper JSON than serde_json's default of 128 levels).
pub fn parse_json(text: &str) -> serde_json::Result<Value> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    let value = serde::Deserialize::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

pub fn session_of(body: &Value) -> Session {
    Session {
        user_id: body["user_id"].as_str().expect("user_id").to_owned(),
        device_id: body["device_id"].as_str().expect("device_id").to_owned(),
        token: body["access_token"].as_str().expect("access_token").to_owned(),
    }
}

/// Asserts a Matrix error with this status and errcode.
#[track_caller]
pub fn assert_error(result: &(u16, Value), status: u16, errcode: &str) {
    assert_eq!(result.0, status, "status of {}", result.1);
    assert_eq!(result.1["errcode"], errcode, "errcode of {}", result.1);
    assert!(result.1["error"].is_string(), "error message in {}", result.1);
}

/// Defines each `async fn name(db: Db)` once and runs it as a test on SQLite and on Postgres.
#[macro_export]
macro_rules! on_both_backends {
    ($($(#[$meta:meta])* async fn $name:ident($db:ident: $ty:ty) $body:block)*) => {
        $($(#[$meta])* async fn $name($db: $ty) $body)*
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Db::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Db::Postgres).await })*
        }
    };
}
