//! Several workers, one homeserver: three `hearth` processes on one Postgres and one Redis
//! behind a per-request round-robin proxy (`hearth-cluster`), with a chat load running in the
//! background while each check runs. Order within a room, a client reading its own writes and
//! revocation must hold whatever worker answers and however busy the others are; every
//! acknowledged message must reach every member exactly once through kills and SIGTERMs.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hearth_cluster::{Cluster, ClusterConfig};
use serde_json::{Value, json};

use crate::common::{Db, TestDb, redis_url};

const PW: &str = "correct horse battery";

/// A cluster on a fresh database.
struct Setup {
    cluster: Cluster,
    test_db: TestDb,
    http: reqwest::Client,
}

impl Setup {
    async fn start(workers: usize) -> Self {
        let test_db = TestDb::new(Db::Postgres).await;
        let config = ClusterConfig {
            hearth: env!("CARGO_BIN_EXE_hearth").into(),
            workers,
            database_url: test_db.url.clone(),
            redis_url: redis_url(),
            redis_prefix: test_db.redis_prefix.clone().unwrap(),
            dir: test_db.dir.join("cluster"),
            listen: "127.0.0.1:0".parse().unwrap(),
            env: vec![("HEARTH_RATE_LIMITS__ENABLED".into(), "false".into())],
        };
        let cluster = Cluster::start(config).await.unwrap();
        Self { cluster, test_db, http: reqwest::Client::new() }
    }

    fn url(&self) -> String {
        self.cluster.url().to_owned()
    }

    fn worker(&self, index: usize) -> String {
        self.cluster.worker_url(index % self.cluster.workers())
    }

    async fn stop(self) {
        self.cluster.stop().await;
        self.test_db.remove().await;
    }
}

struct User {
    user_id: String,
    device_id: String,
    token: String,
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method.parse().unwrap(), url).timeout(Duration::from_secs(60));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn register(http: &reqwest::Client, base: &str, name: &str) -> User {
    let body = json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}});
    let (status, body) =
        call(http, "POST", format!("{base}/_matrix/client/v3/register"), None, Some(body)).await;
    assert_eq!(status, 200, "register {name}: {body}");
    user_of(&body)
}

fn user_of(body: &Value) -> User {
    User {
        user_id: body["user_id"].as_str().unwrap().to_owned(),
        device_id: body["device_id"].as_str().unwrap().to_owned(),
        token: body["access_token"].as_str().unwrap().to_owned(),
    }
}

async fn login(http: &reqwest::Client, base: &str, user: &str, extra: Value) -> Value {
    let mut body = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": PW});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, body) =
        call(http, "POST", format!("{base}/_matrix/client/v3/login"), None, Some(body)).await;
    assert_eq!(status, 200, "login {user}: {body}");
    body
}

async fn create_room(http: &reqwest::Client, base: &str, token: &str, invite: &[&str]) -> String {
    let body = json!({"preset": "private_chat", "invite": invite});
    let (status, body) =
        call(http, "POST", format!("{base}/_matrix/client/v3/createRoom"), Some(token), Some(body)).await;
    assert_eq!(status, 200, "createRoom: {body}");
    body["room_id"].as_str().unwrap().to_owned()
}

async fn join(http: &reqwest::Client, base: &str, token: &str, room: &str) {
    let (status, body) =
        call(http, "POST", format!("{base}/_matrix/client/v3/join/{room}"), Some(token), Some(json!({})))
            .await;
    assert_eq!(status, 200, "join: {body}");
}

/// Sends a message with transaction id `txn` until a worker acknowledges it (the same id each
/// time, so a retry is the same message); returns its event id.
async fn send(http: &reqwest::Client, base: &str, token: &str, room: &str, txn: &str) -> String {
    let started = Instant::now();
    loop {
        let url = format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}");
        let sent = http
            .put(url)
            .bearer_auth(token)
            .json(&json!({"msgtype": "m.text", "body": txn}))
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        if let Ok(sent) = sent
            && sent.status().is_success()
            && let Ok(body) = sent.json::<Value>().await
        {
            return body["event_id"].as_str().unwrap().to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{txn} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Chat in the background: `senders` users, each in a room of their own with a listener who
/// syncs, sending as fast as they are answered, through the proxy, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(setup: &Setup, senders: usize) -> Self {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let mut tasks = Vec::new();
        for n in 0..senders {
            let (http, base) = (setup.http.clone(), setup.url());
            let sender = register(&http, &base, &format!("load{n}")).await;
            let listener = register(&http, &base, &format!("listener{n}")).await;
            let room = create_room(&http, &base, &sender.token, &[&listener.user_id]).await;
            join(&http, &base, &listener.token, &room).await;
            let (stop, sent) = (stop.clone(), sent.clone());
            let (http2, base2, stop2) = (http.clone(), base.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    send(&http, &base, &sender.token, &room, &format!("load{i}")).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
            tasks.push(tokio::spawn(async move {
                let mut since: Option<String> = None;
                while !stop2.load(Ordering::Relaxed) {
                    let url = match &since {
                        Some(since) => format!("{base2}/_matrix/client/v3/sync?since={since}&timeout=1000"),
                        None => format!("{base2}/_matrix/client/v3/sync"),
                    };
                    let (status, body) = call(&http2, "GET", url, Some(&listener.token), None).await;
                    if status == 200 {
                        since = body["next_batch"].as_str().map(str::to_owned);
                    }
                }
            }));
        }
        // Under way before the checks start.
        while sent.load(Ordering::Relaxed) < 2 * senders {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { stop, sent, tasks }
    }

    /// Stops the load; returns how many messages it sent.
    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// Every message of the room through `/messages` (backwards, then reversed), as event ids.
async fn messages(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    room: &str,
    from: Option<&str>,
) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let mut from = from.map(str::to_owned);
    loop {
        let mut url = format!("{base}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=100");
        if let Some(from) = &from {
            url.push_str(&format!("&from={from}"));
        }
        let (status, page) = call(http, "GET", url, Some(token), None).await;
        assert_eq!(status, 200, "{page}");
        for event in page["chunk"].as_array().into_iter().flatten() {
            if event["type"] == "m.room.message" {
                let body = event["content"]["body"].as_str().unwrap_or_default().to_owned();
                events.push((event["event_id"].as_str().unwrap().to_owned(), body));
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    events.reverse();
    events
}

/// How many adjacent pairs of `seen` (bodies `{prefix}{n}`) are in the wrong order.
fn inversions(seen: &[String], prefix: &str) -> usize {
    let numbers: Vec<usize> =
        seen.iter().filter_map(|body| body.strip_prefix(prefix)?.parse().ok()).collect();
    numbers.windows(2).filter(|pair| pair[0] > pair[1]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_senders_messages_through_every_worker_keep_their_order() {
    let setup = Setup::start(3).await;
    let load = Load::start(&setup, 6).await;
    let http = &setup.http;
    let alice = register(http, &setup.url(), "alice").await;
    let room = create_room(http, &setup.url(), &alice.token, &[]).await;
    const SENT: usize = 60;
    // One after another, each through the next worker.
    for n in 0..SENT {
        send(http, &setup.worker(n), &alice.token, &room, &format!("o{n}")).await;
    }
    let read = messages(http, &setup.url(), &alice.token, &room, None).await;
    let bodies: Vec<String> = read.iter().map(|(_, body)| body.clone()).collect();
    assert_eq!(bodies.len(), SENT, "{bodies:?}");
    assert_eq!(inversions(&bodies, "o"), 0, "/messages out of the order sent: {bodies:?}");
    let filter = json!({"room": {"timeline": {"limit": 100}}}).to_string();
    for worker in 0..3 {
        let url = format!("{}/_matrix/client/v3/sync?filter={}", setup.worker(worker), urlencode(&filter));
        let (status, body) = call(http, "GET", url, Some(&alice.token), None).await;
        assert_eq!(status, 200);
        let timeline: Vec<String> = body["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "m.room.message")
            .map(|e| e["content"]["body"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(timeline, bodies, "worker {worker}'s /sync shows another order than /messages");
    }
    let sent = load.stop().await;
    eprintln!("background load: {sent} messages while {SENT} were sent in order");
    setup.stop().await;
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn timeline_ids(body: &Value, room: &str) -> Vec<String> {
    body["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_in_the_writers_next_sync_and_messages_on_any_worker() {
    let setup = Setup::start(3).await;
    let load = Load::start(&setup, 6).await;
    let http = &setup.http;
    let alice = register(http, &setup.url(), "alice").await;
    let room = create_room(http, &setup.url(), &alice.token, &[]).await;
    let (_, first) =
        call(http, "GET", format!("{}/_matrix/client/v3/sync", setup.worker(0)), Some(&alice.token), None)
            .await;
    let mut since = first["next_batch"].as_str().unwrap().to_owned();
    const ROUNDS: usize = 60;
    let mut missed = Vec::new();
    for n in 0..ROUNDS {
        let event_id = send(http, &setup.worker(n), &alice.token, &room, &format!("w{n}")).await;
        // The very next request, on the next worker.
        let url = format!("{}/_matrix/client/v3/sync?since={since}&timeout=0", setup.worker(n + 1));
        let (status, body) = call(http, "GET", url, Some(&alice.token), None).await;
        assert_eq!(status, 200, "{body}");
        if !timeline_ids(&body, &room).contains(&event_id) {
            missed.push(n);
        }
        since = body["next_batch"].as_str().unwrap().to_owned();
    }
    assert!(missed.is_empty(), "{} of {ROUNDS} syncs right after a send lacked it: {missed:?}", missed.len());
    // Five sends, each through another worker, then `/messages` through the next one.
    let mut incomplete = 0;
    for round in 0..10 {
        let mut sent = Vec::new();
        for n in 0..5 {
            sent.push(
                send(http, &setup.worker(round + n), &alice.token, &room, &format!("m{round}.{n}")).await,
            );
        }
        let url =
            format!("{}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=5", setup.worker(round + 5));
        let (_, page) = call(http, "GET", url, Some(&alice.token), None).await;
        let mut read: Vec<String> = page["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event_id"].as_str().unwrap().to_owned())
            .collect();
        read.reverse();
        if read != sent {
            incomplete += 1;
        }
    }
    assert_eq!(incomplete, 0, "/messages right after five sends lacked some of them");
    load.stop().await;
    setup.stop().await;
}

/// Uses `token` through one worker (so that the worker knows its session), which must take it.
async fn used_on(setup: &Setup, worker: usize, token: &str) {
    let url = format!("{}/_matrix/client/v3/account/whoami", setup.worker(worker));
    let (status, body) = call(&setup.http, "GET", url, Some(token), None).await;
    assert_eq!(status, 200, "{body}");
}

/// The workers that still take `token`: every worker must answer 401 M_UNKNOWN_TOKEN.
async fn refused_everywhere(setup: &Setup, token: &str) -> Vec<usize> {
    let mut accepted = Vec::new();
    for worker in 0..setup.cluster.workers() {
        let url = format!("{}/_matrix/client/v3/account/whoami", setup.worker(worker));
        let (status, body) = call(&setup.http, "GET", url, Some(token), None).await;
        if status != 401 || body["errcode"] != "M_UNKNOWN_TOKEN" {
            accepted.push(worker);
        }
    }
    accepted
}

/// A revocation of each kind — logout, device deletion, refresh, password change, deactivation —
/// answered by worker `n + 2` for a token last used through worker `n + 1`; the token must then be
/// refused by every worker. Returns what was not.
async fn revoke_each_way(setup: &Setup, user: &User, n: usize) -> Vec<String> {
    let (http, name) =
        (&setup.http, user.user_id.trim_start_matches('@').split(':').next().unwrap().to_owned());
    let mut failures = Vec::new();
    let mut check = |what: &str, accepted: Vec<usize>| {
        if !accepted.is_empty() {
            failures.push(format!("round {n}: after {what}, workers {accepted:?} still took the token"));
        }
    };
    // Logout.
    let token =
        login(http, &setup.worker(n), &name, json!({})).await["access_token"].as_str().unwrap().to_owned();
    used_on(setup, n + 1, &token).await;
    let (status, _) = call(
        http,
        "POST",
        format!("{}/_matrix/client/v3/logout", setup.worker(n + 2)),
        Some(&token),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    check("logout", refused_everywhere(setup, &token).await);
    // Device deletion, by another device of the user.
    let doomed = user_of(&login(http, &setup.worker(n), &name, json!({})).await);
    used_on(setup, n + 1, &doomed.token).await;
    let auth = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": PW}});
    let url = format!("{}/_matrix/client/v3/devices/{}", setup.worker(n + 2), doomed.device_id);
    let (status, body) = call(http, "DELETE", url, Some(&user.token), Some(auth)).await;
    assert_eq!(status, 200, "{body}");
    check("device deletion", refused_everywhere(setup, &doomed.token).await);
    // Refresh: the old access token dies.
    let refreshable = login(http, &setup.worker(n), &name, json!({"refresh_token": true})).await;
    let old = refreshable["access_token"].as_str().unwrap().to_owned();
    used_on(setup, n + 1, &old).await;
    let body = json!({"refresh_token": refreshable["refresh_token"]});
    let (status, body) =
        call(http, "POST", format!("{}/_matrix/client/v3/refresh", setup.worker(n + 2)), None, Some(body))
            .await;
    assert_eq!(status, 200, "{body}");
    check("refresh", refused_everywhere(setup, &old).await);
    // A password change logs out the user's other devices.
    let owner = register(http, &setup.worker(n), &format!("pw{n}")).await;
    let other = login(http, &setup.worker(n), &format!("pw{n}"), json!({})).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    used_on(setup, n + 1, &other).await;
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": format!("pw{n}")}, "password": PW});
    let body = json!({"new_password": "a new password, long enough", "auth": auth});
    let (status, body) = call(
        http,
        "POST",
        format!("{}/_matrix/client/v3/account/password", setup.worker(n + 2)),
        Some(&owner.token),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check("a password change", refused_everywhere(setup, &other).await);
    // Deactivation.
    let gone = register(http, &setup.worker(n), &format!("gone{n}")).await;
    used_on(setup, n + 1, &gone.token).await;
    let auth = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": format!("gone{n}")}, "password": PW});
    let (status, body) = call(
        http,
        "POST",
        format!("{}/_matrix/client/v3/account/deactivate", setup.worker(n + 2)),
        Some(&gone.token),
        Some(json!({"auth": auth})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check("deactivation", refused_everywhere(setup, &gone.token).await);
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_refused_at_once_by_every_worker_under_load_and_behind_a_stuck_writer() {
    let setup = Setup::start(3).await;
    let load = Load::start(&setup, 6).await;
    let alice = register(&setup.http, &setup.url(), "alice").await;
    let mut failures = Vec::new();
    for round in 0..12 {
        failures.extend(revoke_each_way(&setup, &alice, round).await);
    }
    // A writer that holds readers back (alive, with a position in flight): what readers may
    // pass stops moving, and revocation must not wait for it.
    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&setup.test_db.url).await.unwrap();
    let stamp = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO stream_writers (writer_id, lowest_unfinished, heartbeat_ts, instance, tag)
         SELECT 'stuck', position + 1, {stamp}, 'stuck', NULL FROM stream_counter WHERE id = 1"
    )))
    .execute(&mut db)
    .await
    .unwrap();
    let keep_alive = {
        let url = setup.test_db.url.clone();
        tokio::spawn(async move {
            let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let renew =
                    format!("UPDATE stream_writers SET heartbeat_ts = {stamp} WHERE writer_id = 'stuck'");
                sqlx::query(sqlx::AssertSqlSafe(renew)).execute(&mut db).await.unwrap();
            }
        })
    };
    for round in 0..3 {
        failures.extend(revoke_each_way(&setup, &alice, 100 + round).await);
    }
    // The stuck writer really held readers back all along.
    let stuck: i64 =
        sqlx::query_scalar("SELECT lowest_unfinished FROM stream_writers WHERE writer_id = 'stuck'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    let counter: i64 = sqlx::query_scalar("SELECT position FROM stream_counter WHERE id = 1")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert!(counter > stuck, "writes went on past the stuck writer's position");
    keep_alive.abort();
    sqlx::query("DELETE FROM stream_writers WHERE writer_id = 'stuck'").execute(&mut db).await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    load.stop().await;
    setup.stop().await;
}

/// What one member's syncs delivered, in order, with the gaps of `limited` syncs filled by
/// paginating back from `prev_batch`, as a client does.
async fn follow(
    http: reqwest::Client,
    base: String,
    token: String,
    room: String,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let filter = urlencode(&json!({"room": {"timeline": {"limit": 50}}}).to_string());
    let mut delivered: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut since: Option<String> = None;
    let mut quiet_after_stop = 0;
    loop {
        let url = match &since {
            Some(since) => format!("{base}/_matrix/client/v3/sync?since={since}&timeout=500&filter={filter}"),
            None => format!("{base}/_matrix/client/v3/sync?filter={filter}"),
        };
        let Ok(response) = http.get(url).bearer_auth(&token).timeout(Duration::from_secs(30)).send().await
        else {
            continue;
        };
        if !response.status().is_success() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let body: Value = response.json().await.unwrap();
        let timeline = &body["rooms"]["join"][&room]["timeline"];
        let mut batch: Vec<String> = Vec::new();
        if timeline["limited"] == true
            && since.is_some()
            && let Some(prev) = timeline["prev_batch"].as_str()
        {
            // The gap: back from prev_batch until something already delivered.
            let mut gap = Vec::new();
            for (event_id, _) in messages(&http, &base, &token, &room, Some(prev)).await.into_iter().rev() {
                if seen.contains(&event_id) {
                    break;
                }
                gap.push(event_id);
            }
            gap.reverse();
            batch.extend(gap);
        }
        batch.extend(
            timeline["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["type"] == "m.room.message")
                .filter_map(|e| e["event_id"].as_str().map(str::to_owned)),
        );
        for event_id in batch {
            seen.insert(event_id.clone());
            delivered.push(event_id);
        }
        since = Some(body["next_batch"].as_str().unwrap().to_owned());
        if stop.load(Ordering::Relaxed) {
            quiet_after_stop += 1;
            if quiet_after_stop >= 3 {
                return delivered;
            }
        }
    }
}

/// Sends `count` messages as `sender`, retrying each with its transaction id until
/// acknowledged; records the acknowledged event ids.
async fn send_all(
    http: reqwest::Client,
    base: String,
    sender: User,
    room: String,
    count: usize,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    progress: Arc<AtomicUsize>,
) {
    let name = sender.user_id.clone();
    for n in 0..count {
        let txn = format!("{}-{n}", name.trim_start_matches('@').split(':').next().unwrap());
        let event_id = send(&http, &base, &sender.token, &room, &txn).await;
        acked.lock().unwrap().insert(event_id, txn);
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// How long until a message sent now is readable through the proxy.
async fn time_until_reads_resume(
    setup: &Setup,
    token: &str,
    room: &str,
    probe: &str,
    since: Instant,
) -> Duration {
    let event_id = send(&setup.http, &setup.url(), token, room, probe).await;
    loop {
        let url = format!("{}/_matrix/client/v3/rooms/{room}/event/{event_id}", setup.url());
        let read = setup.http.get(url).bearer_auth(token).timeout(Duration::from_secs(10)).send().await;
        if read.is_ok_and(|r| r.status().is_success()) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(120), "reads never resumed after {probe}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_reaches_every_member_once_through_a_kill_and_a_sigterm() {
    let mut setup = Setup::start(3).await;
    let http = setup.http.clone();
    let base = setup.url();
    let members = [
        register(&http, &base, "alice").await,
        register(&http, &base, "bob").await,
        register(&http, &base, "carol").await,
    ];
    let room =
        create_room(&http, &base, &members[0].token, &[&members[1].user_id, &members[2].user_id]).await;
    for member in &members[1..] {
        join(&http, &base, &member.token, &room).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let followers: Vec<_> = members
        .iter()
        .map(|m| {
            tokio::spawn(follow(http.clone(), base.clone(), m.token.clone(), room.clone(), stop.clone()))
        })
        .collect();
    const PER_SENDER: usize = 60;
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let progress = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for member in &members {
        let sender = User {
            user_id: member.user_id.clone(),
            device_id: member.device_id.clone(),
            token: member.token.clone(),
        };
        senders.push(tokio::spawn(send_all(
            http.clone(),
            base.clone(),
            sender,
            room.clone(),
            PER_SENDER,
            acked.clone(),
            progress.clone(),
        )));
    }
    let total = PER_SENDER * members.len();
    while progress.load(Ordering::Relaxed) < total / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = Instant::now();
    setup.cluster.kill(1).await;
    let after_kill = time_until_reads_resume(&setup, &members[0].token, &room, "probe-kill", killed).await;
    setup.cluster.restart(1).await.unwrap();
    while progress.load(Ordering::Relaxed) < 2 * total / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let terminated = Instant::now();
    setup.cluster.terminate(2).await.unwrap();
    let after_sigterm =
        time_until_reads_resume(&setup, &members[0].token, &room, "probe-term", terminated).await;
    let status = setup.cluster.wait_exit(2).await.unwrap();
    assert!(status.success(), "a worker stops cleanly on SIGTERM: {status}\n{}", setup.cluster.log(2));
    setup.cluster.restart(2).await.unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let mut acked: BTreeSet<String> = acked.lock().unwrap().keys().cloned().collect();
    // The probes are messages too.
    for (event_id, body) in messages(&http, &base, &members[0].token, &room, None).await {
        if body.starts_with("probe-") {
            acked.insert(event_id);
        }
    }
    // Every member's syncs catch up, then stop.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read: BTreeSet<String> = messages(&http, &base, &members[0].token, &room, None)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if read.is_superset(&acked) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let read = messages(&http, &base, &members[0].token, &room, None).await;
    let read_ids: Vec<String> = read.iter().map(|(id, _)| id.clone()).collect();
    let read_set: BTreeSet<String> = read_ids.iter().cloned().collect();
    assert_eq!(read_ids.len(), read_set.len(), "/messages repeats an event");
    assert_eq!(read_set, acked, "/messages has exactly the acknowledged messages");
    for (member, follower) in members.iter().zip(followers) {
        let delivered = follower.await.unwrap();
        let set: BTreeSet<String> = delivered.iter().cloned().collect();
        assert_eq!(
            delivered.len(),
            set.len(),
            "{} was given {} events twice",
            member.user_id,
            delivered.len() - set.len()
        );
        let missing: Vec<&String> = acked.difference(&set).collect();
        assert!(missing.is_empty(), "{} never got {} acknowledged messages", member.user_id, missing.len());
        assert!(set.is_subset(&acked), "{} got messages nobody sent", member.user_id);
    }
    eprintln!(
        "{} messages acknowledged; reads resumed {:.0} ms after kill -9 and {:.0} ms after SIGTERM; proxy retried {} attempts",
        acked.len(),
        after_kill.as_secs_f64() * 1000.0,
        after_sigterm.as_secs_f64() * 1000.0,
        setup.cluster.proxy.stats.retried.load(Ordering::Relaxed),
    );
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_and_matrix_js_sdk_chat_through_three_workers() {
    let setup = Setup::start(3).await;
    let load = Load::start(&setup, 3).await;
    let log = || (0..3).map(|w| setup.cluster.log(w)).collect::<Vec<_>>().join("\n");
    for script in ["nio/rooms.py", "js/rooms.mjs", "nio/accounts.py"] {
        crate::interop::run_harness_at(script, &setup.url(), &log).await;
    }
    crate::interop::run_e2ee_with_nio_peer(&setup.url(), &log).await;
    load.stop().await;
    setup.stop().await;
}

crate::on_both_backends! {
    /// A worker started with another signing key or token secret than the deployment's first
    /// refuses to start, saying which setting to share; the same ones start.
    async fn a_worker_with_another_signing_key_or_token_secret_refuses_to_start(db: Db) {
        let first = crate::common::TestServer::start(db).await;
        let config = first.server.state.config.clone();
        let mut other_key = config.clone();
        other_key.listen.client = "127.0.0.1:0".to_owned();
        other_key.signing_key_file = first.server.state.config.data_dir.join("other.key").display().to_string();
        let refused = homeserver::server::start(other_key).await.err().expect("another signing key is refused");
        let message = format!("{refused:#}");
        assert!(message.contains("signing key") && message.contains("signing_key_file"), "{message}");
        let mut other_secret = config.clone();
        other_secret.listen.client = "127.0.0.1:0".to_owned();
        other_secret.auth.token_secret = homeserver::config::Secret("another-secret-another-secret-another-secret".to_owned());
        let refused = homeserver::server::start(other_secret).await.err().expect("another token secret is refused");
        let message = format!("{refused:#}");
        assert!(message.contains("token secret") && message.contains("HEARTH_AUTH__TOKEN_SECRET"), "{message}");
        let same = first.another_worker().await;
        let (status, _) = same.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200);
        same.stop().await;
        first.stop().await;
    }
}
