//! The `federation` profile: delivery from one server to another.
//!
//! A user of the server at `--url` creates a room, a user of the server at `--remote-url` joins
//! it over federation and long-polls `/sync` there, and the first sends `--messages` messages
//! at `--rate` a second (each send started on time, whatever the previous ones are doing).
//! Reports the sends' latency and the send→`/sync` delivery latency on the other server, with
//! messages missing or out of order.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    Args, Phase, post,
    rooms::{percentile, register},
    run_phase,
};

/// Timeline limit large enough that no long-poll misses events under load.
const SYNC_FILTER: &str = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A200%7D%7D%7D";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('@', "%40").replace('#', "%23")
}

pub async fn run(base: &str, args: &Args) -> anyhow::Result<()> {
    let remote = args.remote_url.as_deref().context("the federation profile needs --remote-url")?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let run = format!("f{}", std::process::id());
    let (alice, alice_token) = register(&http, base, format!("{run}a")).await?;
    let (_, bob_token) = register(&http, remote, format!("{run}b")).await?;
    let host = alice.split_once(':').context("user id")?.1.to_owned();
    let created = post(
        &http,
        format!("{base}/_matrix/client/v3/createRoom"),
        Some(&alice_token),
        json!({"preset": "public_chat", "room_version": "12"}),
    )
    .await?;
    let room = created["room_id"].as_str().context("room_id")?.to_owned();
    if args.members > 0 {
        add_members(&http, base, &room, &host, &run, args).await?;
    }
    let joined_at = Instant::now();
    post(
        &http,
        format!("{remote}/_matrix/client/v3/join/{}?server_name={}", enc(&room), enc(&host)),
        Some(&bob_token),
        json!({}),
    )
    .await
    .context("joining over federation")?;
    let joined = joined_at.elapsed();
    let url = format!("{remote}/_matrix/client/v3/rooms/{}/send/m.room.message/first", enc(&room));
    let first = http
        .put(url)
        .bearer_auth(&bob_token)
        .json(&json!({"msgtype": "m.text", "body": "here"}))
        .send()
        .await?;
    anyhow::ensure!(first.status().is_success(), "the first message after the join: {}", first.status());
    println!(
        "federation: joined a room of {} members over federation in {:.0} ms, first message sent at {:.0} ms; {} messages at {}/s",
        args.members + 1,
        joined.as_secs_f64() * 1000.0,
        joined_at.elapsed().as_secs_f64() * 1000.0,
        args.messages,
        args.rate
    );

    // Bob long-polls on the other server, noting when and in which order each message arrives.
    let received: Arc<Mutex<Vec<(usize, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let first: Value = http
        .get(format!("{remote}/_matrix/client/v3/sync?filter={SYNC_FILTER}"))
        .bearer_auth(&bob_token)
        .send()
        .await?
        .json()
        .await?;
    let mut since = first["next_batch"].as_str().context("next_batch")?.to_owned();
    let syncer = {
        let (http, remote, token, received, stop) =
            (http.clone(), remote.to_owned(), bob_token.clone(), received.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let url = format!(
                    "{remote}/_matrix/client/v3/sync?filter={SYNC_FILTER}&timeout=2000&since={since}"
                );
                let Ok(response) = http.get(url).bearer_auth(&token).send().await else { continue };
                let Ok(body) = response.json::<Value>().await else { continue };
                let now = Instant::now();
                for room in body["rooms"]["join"].as_object().into_iter().flat_map(|rooms| rooms.values()) {
                    for event in room["timeline"]["events"].as_array().into_iter().flatten() {
                        if let Some(id) = event["content"]["bench_id"].as_u64() {
                            received.lock().expect("lock").push((id as usize, now));
                        }
                    }
                }
                if let Some(next) = body["next_batch"].as_str() {
                    since = next.to_owned();
                }
            }
        })
    };

    // Alice sends at the rate asked, each send on its own task so a slow one delays no other.
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.001));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sends = Vec::new();
    let mut sent_at = HashMap::new();
    for id in 0..args.messages {
        ticks.tick().await;
        let url = format!("{base}/_matrix/client/v3/rooms/{}/send/m.room.message/f{id}", enc(&room));
        let body = json!({"msgtype": "m.text", "body": "benchmark", "bench_id": id});
        let t = Instant::now();
        sent_at.insert(id, t);
        let request = http.put(url).bearer_auth(&alice_token).json(&body).send();
        sends.push(tokio::spawn(async move {
            match request.await {
                Ok(r) if r.status().is_success() => Ok(t.elapsed()),
                Ok(r) => Err(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                Err(e) => Err(e.to_string()),
            }
        }));
    }
    let mut send = Phase { name: "send", latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for sent in sends {
        match sent.await? {
            Ok(latency) => send.latencies.push(latency),
            Err(why) => {
                if send.errors == 0 {
                    eprintln!("send: {why}");
                }
                send.errors += 1;
            }
        }
    }
    send.elapsed = started.elapsed();
    send.report();

    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && received.lock().expect("lock").len() < args.messages - send.errors {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    syncer.abort();
    let received = received.lock().expect("lock").clone();
    // Sends overlap, so the origin's order is not the order they were started in: the other
    // server's order is compared with the origin's timeline.
    let origin_order = timeline_order(&http, base, &alice_token, &room).await?;
    let position: HashMap<usize, usize> = origin_order.iter().enumerate().map(|(at, id)| (*id, at)).collect();
    let out_of_order = received
        .windows(2)
        .filter(|pair| match (position.get(&pair[0].0), position.get(&pair[1].0)) {
            (Some(first), Some(second)) => second < first,
            _ => true,
        })
        .count();
    let mut latencies: Vec<Duration> =
        received.iter().filter_map(|(id, at)| Some(at.duration_since(*sent_at.get(id)?))).collect();
    latencies.sort_unstable();
    println!(
        "delivery   {:>7} to the other server's /sync: p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms; missing {}, out of the origin's order {out_of_order}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        args.messages.saturating_sub(received.len()),
    );
    Ok(())
}

/// Fills the room with `--members` users of the host, made and joined by an application service
/// (`--as-token`, users `@_bench_*`), which needs no password hashing per user.
async fn add_members(
    http: &reqwest::Client,
    base: &str,
    room: &str,
    host: &str,
    run: &str,
    args: &Args,
) -> anyhow::Result<()> {
    let token = Arc::new(args.as_token.clone().context("--members needs --as-token")?);
    let (base, room, host, run) =
        (Arc::new(base.to_owned()), Arc::new(room.to_owned()), host.to_owned(), run.to_owned());
    let (http2, base2, token2, run2) = (http.clone(), base.clone(), token.clone(), run.clone());
    let mut registered = run_phase("members", args.members, args.concurrency, move |n| {
        let (http, base, token) = (http2.clone(), base2.clone(), token2.clone());
        let body = json!({"type": "m.login.application_service", "username": format!("_bench_{run2}_{n}"), "inhibit_login": true});
        async move {
            post(&http, format!("{base}/_matrix/client/v3/register"), Some(&token), body).await.map(|_| ())
        }
    })
    .await;
    registered.report();
    let http = http.clone();
    let mut joined = run_phase("joins", args.members, args.concurrency, move |n| {
        let user = format!("@_bench_{run}_{n}:{host}");
        let url = format!("{base}/_matrix/client/v3/rooms/{}/join?user_id={}", enc(&room), enc(&user));
        let (http, token) = (http.clone(), token.clone());
        async move { post(&http, url, Some(&token), json!({})).await.map(|_| ()) }
    })
    .await;
    joined.report();
    Ok(())
}

/// The benchmark messages of `room` in the order of the timeline at `base`, oldest first.
async fn timeline_order(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    room: &str,
) -> anyhow::Result<Vec<usize>> {
    let mut ids = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let mut url = format!("{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=500", enc(room));
        if let Some(from) = &from {
            url.push_str(&format!("&from={from}"));
        }
        let page: Value = http.get(url).bearer_auth(token).send().await?.json().await?;
        let chunk = page["chunk"].as_array().cloned().unwrap_or_default();
        ids.extend(
            chunk.iter().filter_map(|event| event["content"]["bench_id"].as_u64().map(|id| id as usize)),
        );
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
            _ => break,
        }
    }
    ids.reverse();
    Ok(ids)
}
