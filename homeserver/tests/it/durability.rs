//! Nothing acknowledged is lost: to-device envelopes survive `kill -9` of Hearth (and of Redis,
//! running with `appendfsync always`) between send and delivery, and arrive exactly once.
//!
//! Real processes only: the `hearth` binary, and on Postgres a `redis-server` of the test's own
//! with AOF on a spare port. On SQLite the embedded queue (the database) is what must hold.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{
    common::{Db, TestDb},
    interop::{HearthProcess, free_port},
};

const PW: &str = "correct horse battery";
/// Envelopes sent in the burst that the crash interrupts.
const ENVELOPES: usize = 120;

/// A `redis-server` that writes every command to its append-only file before answering.
pub(crate) struct RedisProcess {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisProcess {
    pub(crate) async fn start(dir: PathBuf, port: u16) -> Self {
        std::fs::create_dir_all(&dir).expect("redis dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (installed by scripts/services)");
        let redis = Self { child, port, dir };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(client) = redis::Client::open(redis.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) async fn kill9(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill().await;
        (self.dir, self.port)
    }
}

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut request = http.post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request").json().await.expect("json")
}

async fn register(http: &reqwest::Client, base: &str, name: &str) -> (String, String) {
    let body = json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}});
    let response = post(http, format!("{base}/_matrix/client/v3/register"), None, body).await;
    (
        response["user_id"].as_str().expect("user_id").to_owned(),
        response["access_token"].as_str().expect("token").to_owned(),
    )
}

/// Sends envelope `n` from bob to alice; true when the server answered 200.
async fn send(http: &reqwest::Client, base: &str, token: &str, alice: &str, n: usize) -> bool {
    let body = json!({"messages": {alice: {"*": {"n": n}}}});
    let url = format!("{base}/_matrix/client/v3/sendToDevice/m.room.encrypted/txn{n}");
    matches!(http.put(url).bearer_auth(token).json(&body).send().await, Ok(r) if r.status().is_success())
}

crate::on_both_backends! {
    async fn envelopes_survive_kill_9(db: Db) {
        let test_db = TestDb::new(db).await;
        let redis = match db {
            Db::Postgres => Some(RedisProcess::start(test_db.dir.join("redis"), free_port()).await),
            Db::Sqlite => None,
        };
        let env = |redis: &Option<RedisProcess>| -> Vec<(&'static str, String)> {
            redis.iter().map(|r| ("HEARTH_REDIS__URL", r.url())).collect()
        };
        let hearth = HearthProcess::start_with(&test_db, db, &env(&redis)).await;
        let http = reqwest::Client::new();
        let (alice, alice_token) = register(&http, &hearth.base, "alice").await;
        let (_, bob_token) = register(&http, &hearth.base, "bob").await;
        let first: Value = http.get(format!("{}/_matrix/client/v3/sync", hearth.base)).bearer_auth(&alice_token)
            .send().await.unwrap().json().await.unwrap();
        let since = first["next_batch"].as_str().unwrap().to_owned();

        // A burst of sends, four at a time; the crash lands in the middle of it.
        let base = hearth.base.clone();
        let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let burst = tokio::spawn({
            let (http, bob_token, alice, progress) = (http.clone(), bob_token.clone(), alice.clone(), progress.clone());
            async move {
                let mut answered = BTreeMap::new();
                for chunk in (0..ENVELOPES).collect::<Vec<_>>().chunks(4) {
                    let sends = chunk.iter().map(|&n| {
                        let (http, base, token, alice) = (http.clone(), base.clone(), bob_token.clone(), alice.clone());
                        tokio::spawn(async move { (n, send(&http, &base, &token, &alice, n).await) })
                    });
                    for send in sends {
                        let (n, ok) = send.await.unwrap();
                        answered.insert(n, ok);
                        progress.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                answered
            }
        });
        while progress.load(std::sync::atomic::Ordering::SeqCst) < ENVELOPES / 3 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        hearth.stop().await;
        let redis = match redis {
            Some(redis) => {
                let (dir, port) = redis.kill9().await;
                Some(RedisProcess::start(dir, port).await)
            }
            None => None,
        };
        let answered = burst.await.unwrap();
        let acknowledged = answered.values().filter(|ok| **ok).count();
        assert!(acknowledged > 0 && acknowledged < ENVELOPES, "the crash should fall inside the burst: {acknowledged} of {ENVELOPES} answered");

        // Restarted, the client retries what was not answered, and (as clients may) some of
        // what was: every transaction id is queued once.
        let hearth = HearthProcess::start_with(&test_db, db, &env(&redis)).await;
        for n in 0..ENVELOPES {
            if !answered[&n] || n % 10 == 0 {
                assert!(send(&http, &hearth.base, &bob_token, &alice, n).await, "retry of {n} after restart");
            }
        }

        // Alice's device receives each envelope exactly once.
        let mut received: Vec<i64> = Vec::new();
        let mut since = since;
        let deadline = Instant::now() + Duration::from_secs(90);
        while received.len() < ENVELOPES && Instant::now() < deadline {
            let url = format!("{}/_matrix/client/v3/sync?since={since}&timeout=5000", hearth.base);
            let body: Value = http.get(url).bearer_auth(&alice_token).send().await.unwrap().json().await.unwrap();
            received.extend(body["to_device"]["events"].as_array().into_iter().flatten().map(|e| e["content"]["n"].as_i64().unwrap()));
            since = body["next_batch"].as_str().unwrap().to_owned();
        }
        let mut sorted = received.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..ENVELOPES as i64).collect::<Vec<_>>(), "each envelope once: {} received\n{}", received.len(), hearth.log());
        // And nothing more comes.
        let url = format!("{}/_matrix/client/v3/sync?since={since}&timeout=500", hearth.base);
        let body: Value = http.get(url).bearer_auth(&alice_token).send().await.unwrap().json().await.unwrap();
        assert!(body["to_device"]["events"].as_array().is_none_or(Vec::is_empty), "{body}");
        hearth.stop().await;
        drop(redis);
        test_db.remove().await;
    }
}
