//! The `rooms` and `idle-syncs` profiles.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{Args, Phase, post};

const PASSWORD: &str = "benchmark-password";

/// Resident memory of a process, in KiB.
pub(crate) fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or("/proc/self/status".to_owned(), |pid| format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('@', "%40")
}

pub(crate) async fn register(
    http: &reqwest::Client,
    base: &str,
    name: String,
) -> anyhow::Result<(String, String)> {
    let body = json!({"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}});
    let response = post(http, format!("{base}/_matrix/client/v3/register"), None, body).await?;
    Ok((
        response["user_id"].as_str().context("user_id")?.to_owned(),
        response["access_token"].as_str().context("access_token")?.to_owned(),
    ))
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Timeline limit large enough that no long-poll misses events under load.
const SYNC_FILTER: &str = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A100%7D%7D%7D";

pub async fn run(base: &str, args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.users * 2 + args.senders).build()?;
    let run = format!("r{}", std::process::id());
    let mut users = Vec::new();
    for n in 0..args.users {
        users.push(register(&http, base, format!("{run}u{n}")).await?);
    }
    let mut rooms = Vec::new();
    for _ in 0..args.rooms {
        let created = post(
            &http,
            format!("{base}/_matrix/client/v3/createRoom"),
            Some(&users[0].1),
            json!({"preset": "public_chat"}),
        )
        .await?;
        let room = created["room_id"].as_str().context("room_id")?.to_owned();
        for (_, token) in &users[1..] {
            post(
                &http,
                format!("{base}/_matrix/client/v3/rooms/{}/join", enc(&room)),
                Some(token),
                json!({}),
            )
            .await?;
        }
        rooms.push(room);
    }
    println!(
        "rooms: {} users in {} rooms, {} senders, {} messages",
        args.users, args.rooms, args.senders, args.messages
    );

    // Every user long-polls, noting when each benchmark message reaches them.
    let received: Arc<Mutex<HashMap<usize, Vec<Instant>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut syncers = Vec::new();
    for (_, token) in &users {
        let (http, base, token, received, stop) =
            (http.clone(), base.to_owned(), token.clone(), received.clone(), stop.clone());
        let first: Value = http
            .get(format!("{base}/_matrix/client/v3/sync?filter={SYNC_FILTER}"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let mut since = first["next_batch"].as_str().context("next_batch")?.to_owned();
        syncers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let url =
                    format!("{base}/_matrix/client/v3/sync?filter={SYNC_FILTER}&timeout=2000&since={since}");
                let Ok(response) = http.get(url).bearer_auth(&token).send().await else { continue };
                let Ok(body) = response.json::<Value>().await else { continue };
                let now = Instant::now();
                if let Some(joined) = body["rooms"]["join"].as_object() {
                    let mut received = received.lock().expect("lock");
                    for room in joined.values() {
                        for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                            if let Some(id) = event["content"]["bench_id"].as_u64() {
                                received.entry(id as usize).or_default().push(now);
                            }
                        }
                    }
                }
                if let Some(next) = body["next_batch"].as_str() {
                    since = next.to_owned();
                }
            }
        }));
    }

    let sent_at: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for s in 0..args.senders {
        let (http, base, users, rooms, sent_at, next) =
            (http.clone(), base.to_owned(), users.clone(), rooms.clone(), sent_at.clone(), next.clone());
        let total = args.messages;
        senders.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= total {
                    break;
                }
                let (_, token) = &users[(s + id) % users.len()];
                let room = &rooms[id % rooms.len()];
                let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/b{id}", enc(room));
                let t = Instant::now();
                sent_at.lock().expect("lock").insert(id, t);
                let body = json!({"msgtype": "m.text", "body": "benchmark", "bench_id": id});
                match http.put(url).bearer_auth(token).json(&body).send().await {
                    Ok(r) if r.status().is_success() => latencies.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut send = Phase { name: "send", latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for sender in senders {
        let (latencies, errors) = sender.await?;
        send.latencies.extend(latencies);
        send.errors += errors;
    }
    send.elapsed = started.elapsed();
    send.report();

    // Wait for the deliveries to finish (or give up after a while).
    let expected = args.users;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = received.lock().expect("lock").values().filter(|v| v.len() >= expected).count();
        if done >= args.messages - send.errors {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let received = received.lock().expect("lock").clone();
    let sent_at = sent_at.lock().expect("lock").clone();
    let (mut each, mut all, mut missing) = (Vec::new(), Vec::new(), 0usize);
    for (id, sent) in &sent_at {
        let times = received.get(id).cloned().unwrap_or_default();
        missing += expected.saturating_sub(times.len());
        each.extend(times.iter().map(|t| t.duration_since(*sent)));
        if times.len() >= expected
            && let Some(last) = times.iter().max()
        {
            all.push(last.duration_since(*sent));
        }
    }
    each.sort_unstable();
    all.sort_unstable();
    println!(
        "delivery   {:>7} to each member: p50 {:>7.2} ms  p99 {:>7.2} ms; to every member: p50 {:>7.2} ms  p99 {:>7.2} ms; missing {missing}",
        each.len(),
        percentile(&each, 0.5),
        percentile(&each, 0.99),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    );
    if let Some(rss) = rss_kib(args.server_pid) {
        println!(
            "rss        {:.1} MiB ({})",
            rss as f64 / 1024.0,
            if args.server_pid.is_some() { "server" } else { "bench process, server included" }
        );
    }
    for syncer in syncers {
        syncer.abort();
    }
    Ok(())
}

pub async fn idle_syncs(base: &str, args: &Args) -> anyhow::Result<()> {
    if args.server_pid.is_none() {
        bail!("idle-syncs measures a separate server: give --url and --server-pid");
    }
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let (_, token) = register(&http, base, format!("idle{}", std::process::id())).await?;
    let first: Value =
        http.get(format!("{base}/_matrix/client/v3/sync")).bearer_auth(&token).send().await?.json().await?;
    let since = first["next_batch"].as_str().context("next_batch")?.to_owned();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib(args.server_pid).context("server memory")?;
    let mut polls = Vec::new();
    for _ in 0..args.connections {
        let (http, base, token, since) = (http.clone(), base.to_owned(), token.clone(), since.clone());
        polls.push(tokio::spawn(async move {
            let url = format!("{base}/_matrix/client/v3/sync?since={since}&timeout=120000");
            http.get(url).bearer_auth(token).send().await.map(|r| r.status().as_u16())
        }));
    }
    // Let every request arrive and settle into its wait.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let finished = polls.iter().filter(|p| p.is_finished()).count();
    let during = rss_kib(args.server_pid).context("server memory")?;
    let per = (during.saturating_sub(before)) as f64 * 1024.0 / args.connections as f64;
    println!(
        "idle-syncs {} held ({} ended early): server RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes per connection",
        args.connections - finished,
        finished,
        before as f64 / 1024.0,
        during as f64 / 1024.0,
        per
    );
    for poll in polls {
        poll.abort();
    }
    Ok(())
}
