//! The fault suite: room messages and to-device envelopes sent under load while the parts of a
//! deployment fail — `hearth` workers killed with SIGKILL and restarted, Redis killed with
//! SIGKILL (it runs with `appendfsync always`), every Postgres session of the database
//! terminated. Every acknowledged message and envelope must be read back exactly once, and the
//! time until reads resume after each fault is reported.
//!
//! On Postgres: two workers on one database and one Redis. On SQLite: the single node. CI runs
//! one round of each fault; `TEST_FAULT_ROUNDS=N` runs N (and `TEST_FAULT_LOAD=M` sends M
//! messages and M envelopes per round instead of 60).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    common::{Db, TestDb},
    durability::RedisProcess,
    interop::{HearthProcess, free_port},
};

const PW: &str = "correct horse battery";

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A deployment under test: its workers (by port, so they restart where they were), Redis.
struct Deployment {
    db: Db,
    test_db: TestDb,
    ports: Vec<u16>,
    workers: Vec<Option<HearthProcess>>,
    redis: Option<RedisProcess>,
    /// The workers' addresses, which the senders use (a killed one fails until it is back).
    bases: Vec<String>,
}

impl Deployment {
    async fn start(db: Db) -> Self {
        let test_db = TestDb::new(db).await;
        let redis = match db {
            Db::Postgres => Some(RedisProcess::start(test_db.dir.join("redis"), free_port()).await),
            Db::Sqlite => None,
        };
        let workers = if db == Db::Postgres { 2 } else { 1 };
        let ports: Vec<u16> = (0..workers).map(|_| free_port()).collect();
        let mut deployment = Self {
            db,
            test_db,
            bases: ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect(),
            ports,
            workers: Vec::new(),
            redis,
        };
        for i in 0..workers {
            let worker = deployment.start_worker(i).await;
            deployment.workers.push(Some(worker));
        }
        deployment
    }

    fn env(&self, worker: usize) -> Vec<(&'static str, String)> {
        let mut env = vec![("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{}", self.ports[worker]))];
        if let Some(redis) = &self.redis {
            env.push(("HEARTH_REDIS__URL", redis.url()));
        }
        env
    }

    async fn start_worker(&self, worker: usize) -> HearthProcess {
        HearthProcess::start_with(&self.test_db, self.db, &self.env(worker)).await
    }

    async fn kill_worker(&mut self, worker: usize) {
        if let Some(process) = self.workers[worker].take() {
            process.stop().await;
        }
    }

    async fn restart_worker(&mut self, worker: usize) {
        let process = self.start_worker(worker).await;
        self.workers[worker] = Some(process);
    }

    async fn stop(mut self) {
        for worker in 0..self.workers.len() {
            self.kill_worker(worker).await;
        }
        drop(self.redis.take());
        self.test_db.remove().await;
    }
}

/// What the senders were told: transaction ids the server acknowledged.
#[derive(Default)]
struct Acknowledged {
    messages: BTreeSet<usize>,
    envelopes: BTreeSet<usize>,
}

/// Sends message `n` (a room message, or an envelope to `to`) until a worker acknowledges it,
/// trying the workers in turn, with the same transaction id each time.
async fn send_until_acknowledged(
    http: &reqwest::Client,
    bases: &[String],
    token: &str,
    target: &Target,
    n: usize,
) {
    let started = Instant::now();
    for attempt in 0.. {
        let base = &bases[(n + attempt) % bases.len()];
        let request = match target {
            Target::Room(room) => http
                .put(format!("{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/m{n}"))
                .json(&json!({"msgtype": "m.text", "body": format!("m{n}")})),
            Target::Device(user) => http
                .put(format!("{base}/_matrix/client/v3/sendToDevice/m.room.encrypted/t{n}"))
                .json(&json!({"messages": {user: {"*": {"n": n}}}})),
        };
        let response = request.bearer_auth(token).timeout(Duration::from_secs(10)).send().await;
        if response.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{n} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

enum Target {
    Room(String),
    Device(String),
}

/// Sends `count` messages and `count` envelopes from `first` on, four senders at a time, until
/// `stop` is set or all are acknowledged; returns when done.
#[allow(clippy::too_many_arguments)]
async fn load(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    token: String,
    room: String,
    alice: String,
    range: std::ops::Range<usize>,
    acknowledged: Arc<Mutex<Acknowledged>>,
    progress: Arc<AtomicUsize>,
) {
    let next = Arc::new(AtomicUsize::new(range.start));
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (http, bases, token, room, alice) =
            (http.clone(), bases.clone(), token.clone(), room.clone(), alice.clone());
        let (next, acknowledged, progress, end) =
            (next.clone(), acknowledged.clone(), progress.clone(), range.end);
        senders.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= end {
                    return;
                }
                send_until_acknowledged(&http, &bases, &token, &Target::Room(room.clone()), n).await;
                acknowledged.lock().unwrap().messages.insert(n);
                send_until_acknowledged(&http, &bases, &token, &Target::Device(alice.clone()), n).await;
                acknowledged.lock().unwrap().envelopes.insert(n);
                progress.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
}

/// How long after `since` a message sent through `base` becomes readable through `/messages`
/// of `reader_base`: the time until reads resume.
async fn time_until_reads_resume(
    http: &reqwest::Client,
    send_base: &str,
    read_base: &str,
    token: &str,
    room: &str,
    probe: &str,
    since: Instant,
) -> Duration {
    // The probe is sent through a live worker, retrying while the fault lasts.
    let event_id = loop {
        let sent = http
            .put(format!("{send_base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{probe}"))
            .json(&json!({"msgtype": "m.text", "body": probe}))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(sent) = sent
            && sent.status().is_success()
            && let Ok(body) = sent.json::<Value>().await
        {
            break body["event_id"].as_str().unwrap().to_owned();
        }
        assert!(since.elapsed() < Duration::from_secs(120), "the probe {probe} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // `/event` answers once the event is readable: below the stream's safe position.
    loop {
        let read = http
            .get(format!("{read_base}/_matrix/client/v3/rooms/{room}/event/{event_id}"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if read.is_ok_and(|r| r.status().is_success()) {
            return since.elapsed();
        }
        assert!(since.elapsed() < Duration::from_secs(120), "reads never resumed after {probe}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every message body of the room, read back through `/messages`, oldest first.
async fn read_room(http: &reqwest::Client, base: &str, token: &str, room: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let mut url = format!("{base}/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=500");
        if let Some(from) = &from {
            url.push_str(&format!("&from={from}"));
        }
        let page: Value = http.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        for event in page["chunk"].as_array().into_iter().flatten() {
            if event["type"] == "m.room.message" {
                bodies.push(event["content"]["body"].as_str().unwrap_or_default().to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) => from = Some(end.to_owned()),
            None => break,
        }
    }
    bodies.reverse();
    bodies
}

/// Every envelope alice's device receives until `expected` have come and a quiet sync follows.
async fn read_envelopes(http: &reqwest::Client, base: &str, token: &str, expected: usize) -> Vec<i64> {
    let mut received = Vec::new();
    let mut since: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let url = match &since {
            Some(since) => format!("{base}/_matrix/client/v3/sync?since={since}&timeout=1000"),
            None => format!("{base}/_matrix/client/v3/sync"),
        };
        let body: Value = http.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        let events = body["to_device"]["events"].as_array().cloned().unwrap_or_default();
        let quiet = events.is_empty();
        received.extend(events.iter().filter_map(|e| e["content"]["n"].as_i64()));
        since = Some(body["next_batch"].as_str().unwrap().to_owned());
        if (received.len() >= expected && quiet) || Instant::now() > deadline {
            return received;
        }
    }
}

fn duplicates<T: Ord + Clone>(items: &[T]) -> usize {
    let mut seen = BTreeSet::new();
    items.iter().filter(|item| !seen.insert((*item).clone())).count()
}

async fn register(http: &reqwest::Client, base: &str, name: &str) -> (String, String) {
    let body = json!({"username": name, "password": PW, "auth": {"type": "m.login.dummy"}});
    let response: Value = http
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (response["user_id"].as_str().unwrap().to_owned(), response["access_token"].as_str().unwrap().to_owned())
}

crate::on_both_backends! {
    async fn nothing_acknowledged_is_lost_or_repeated_across_faults(db: Db) {
        let rounds = env_number("TEST_FAULT_ROUNDS", 1);
        let per_round = env_number("TEST_FAULT_LOAD", 60);
        let mut deployment = Deployment::start(db).await;
        let http = reqwest::Client::new();
        let base0 = deployment.bases[0].clone();
        let (alice, alice_token) = register(&http, &base0, "alice").await;
        let (_, bob_token) = register(&http, &base0, "bob").await;
        let created: Value = http.post(format!("{base0}/_matrix/client/v3/createRoom"))
            .bearer_auth(&bob_token).json(&json!({"preset": "public_chat"})).send().await.unwrap().json().await.unwrap();
        let room = created["room_id"].as_str().unwrap().to_owned();
        let join = http.post(format!("{base0}/_matrix/client/v3/rooms/{room}/join")).bearer_auth(&alice_token)
            .json(&json!({})).send().await.unwrap();
        assert!(join.status().is_success());
        // Alice's device exists before the envelopes are sent ("*" means her devices now).
        let _ = read_envelopes(&http, &base0, &alice_token, 0).await;

        let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
        let bases = Arc::new(deployment.bases.clone());
        let mut resumed: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
        let mut probes = 0;
        for round in 0..rounds {
            let progress = Arc::new(AtomicUsize::new(0));
            let range = round * per_round..(round + 1) * per_round;
            let sending = tokio::spawn(load(
                http.clone(), bases.clone(), bob_token.clone(), room.clone(), alice.clone(), range,
                acknowledged.clone(), progress.clone(),
            ));
            let faults: Vec<&str> = match db {
                Db::Postgres => vec![
                    "kill -9 worker, restarted",
                    "kill -9 redis",
                    "terminate postgres sessions",
                    "kill -9 worker, not restarted",
                ],
                Db::Sqlite => vec!["kill -9 worker, restarted", "kill -9 worker again, restarted"],
            };
            for (i, fault) in faults.iter().enumerate() {
                // Each fault lands while the load is running.
                let at = per_round * (i + 1) / (faults.len() + 1);
                while progress.load(Ordering::SeqCst) < at && !sending.is_finished() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let struck = Instant::now();
                // Reads are measured on a worker that stays up, where there is one: after a kill
                // the dead worker's unfinished writes must stop holding it back, at the restart
                // of the dead one or, if it never comes back, when its lease runs out.
                let (victim, reader) = match (*fault, deployment.workers.len()) {
                    ("kill -9 worker, not restarted", 2) => (1, 0),
                    (_, 2) => (0, 1),
                    _ => (0, 0),
                };
                match *fault {
                    "kill -9 redis" => {
                        let redis = deployment.redis.take().unwrap();
                        let (dir, port) = redis.kill9().await;
                        deployment.redis = Some(RedisProcess::start(dir, port).await);
                    }
                    "terminate postgres sessions" => {
                        use sqlx::Connection;
                        let mut admin = sqlx::PgConnection::connect(&crate::common::postgres_admin_url()).await.unwrap();
                        let name = deployment.test_db.url.rsplit('/').next().unwrap().to_owned();
                        let terminated: i64 = sqlx::query_scalar(
                            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                        )
                        .bind(name).fetch_one(&mut admin).await.unwrap();
                        assert!(terminated > 0, "the workers had sessions to terminate");
                        admin.close().await.unwrap();
                    }
                    fault => {
                        deployment.kill_worker(victim).await;
                        if fault.ends_with(", restarted") {
                            deployment.restart_worker(victim).await;
                        }
                    }
                }
                probes += 1;
                let probe = format!("probe{probes}");
                let resume = time_until_reads_resume(
                    &http, &deployment.bases[reader], &deployment.bases[reader], &bob_token, &room, &probe, struck,
                ).await;
                resumed.entry((*fault).to_owned()).or_default().push(resume);
                if deployment.workers[victim].is_none() {
                    deployment.restart_worker(victim).await;
                }
            }
            sending.await.unwrap();
        }

        // Read everything back, through the first worker.
        let total = rounds * per_round;
        let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
        let bodies = read_room(&http, &deployment.bases[0], &alice_token, &room).await;
        let messages: Vec<usize> = bodies.iter().filter_map(|b| b.strip_prefix('m')?.parse().ok()).collect();
        let envelopes = read_envelopes(&http, &deployment.bases[0], &alice_token, total).await;
        let lost_messages = acknowledged.messages.iter().filter(|n| !messages.contains(n)).count();
        let lost_envelopes = acknowledged.envelopes.iter().filter(|n| !envelopes.contains(&(**n as i64))).count();
        let report = format!(
            "fault suite ({db:?}, {rounds} round(s), {} worker(s)): messages acknowledged {} / read {} / lost {lost_messages} / duplicated {}; \
             envelopes acknowledged {} / read {} / lost {lost_envelopes} / duplicated {}; reads resumed after: {resumed:?}",
            deployment.workers.len(),
            acknowledged.messages.len(), messages.len(), duplicates(&messages),
            acknowledged.envelopes.len(), envelopes.len(), duplicates(&envelopes),
        );
        println!("{report}");
        assert_eq!(acknowledged.messages.len(), total, "{report}");
        assert_eq!(lost_messages, 0, "{report}");
        assert_eq!(duplicates(&messages), 0, "{report}");
        assert_eq!(lost_envelopes, 0, "{report}");
        assert_eq!(duplicates(&envelopes), 0, "{report}");
        assert_eq!(probes, resumed.values().map(Vec::len).sum::<usize>(), "{report}");
        deployment.stop().await;
    }
}
