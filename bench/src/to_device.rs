//! The `to-device` profile: `--senders` accounts send to-device messages, one device per request
//! round-robin over `--users` receiving devices that long-poll `/sync`. Reports requests/s,
//! send latency, and send→delivery latency.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    Args, Phase,
    rooms::{percentile, register, rss_kib},
};

pub async fn run(base: &str, args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.users + args.senders * 2).build()?;
    let run = format!("t{}", std::process::id());
    let mut receivers = Vec::new();
    for n in 0..args.users {
        let (user, token) = register(&http, base, format!("{run}r{n}")).await?;
        let whoami: Value = http
            .get(format!("{base}/_matrix/client/v3/account/whoami"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        let device = whoami["device_id"].as_str().context("device_id")?.to_owned();
        receivers.push((user, device, token));
    }
    let mut senders = Vec::new();
    for n in 0..args.senders {
        senders.push(register(&http, base, format!("{run}s{n}")).await?.1);
    }
    println!(
        "to-device: {} receiving devices, {} senders, {} requests",
        args.users, args.senders, args.messages
    );

    let received: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let duplicates = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut syncers = Vec::new();
    for (_, _, token) in &receivers {
        let first: Value = http
            .get(format!("{base}/_matrix/client/v3/sync"))
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        let mut since = first["next_batch"].as_str().context("next_batch")?.to_owned();
        let (http, base, token, received, duplicates, stop) = (
            http.clone(),
            base.to_owned(),
            token.clone(),
            received.clone(),
            duplicates.clone(),
            stop.clone(),
        );
        syncers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let url = format!("{base}/_matrix/client/v3/sync?timeout=2000&since={since}");
                let Ok(response) = http.get(url).bearer_auth(&token).send().await else { continue };
                let Ok(body) = response.json::<Value>().await else { continue };
                let now = Instant::now();
                let mut received = received.lock().expect("lock");
                for event in body["to_device"]["events"].as_array().into_iter().flatten() {
                    if let Some(id) = event["content"]["bench_id"].as_u64()
                        && received.insert(id as usize, now).is_some()
                    {
                        duplicates.fetch_add(1, Ordering::Relaxed);
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
    let mut workers = Vec::new();
    for token in senders {
        let (http, base, receivers, sent_at, next) =
            (http.clone(), base.to_owned(), receivers.clone(), sent_at.clone(), next.clone());
        let total = args.messages;
        workers.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let id = next.fetch_add(1, Ordering::Relaxed);
                if id >= total {
                    break;
                }
                let (user, device, _) = &receivers[id % receivers.len()];
                let url = format!("{base}/_matrix/client/v3/sendToDevice/org.example.bench/b{id}");
                let body = json!({"messages": {user: {device: {"bench_id": id}}}});
                let t = Instant::now();
                sent_at.lock().expect("lock").insert(id, t);
                match http.put(url).bearer_auth(&token).json(&body).send().await {
                    Ok(r) if r.status().is_success() => latencies.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut send = Phase { name: "send", latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for worker in workers {
        let (latencies, errors) = worker.await?;
        send.latencies.extend(latencies);
        send.errors += errors;
    }
    send.elapsed = started.elapsed();
    send.report();

    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && received.lock().expect("lock").len() < args.messages - send.errors {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let received = received.lock().expect("lock").clone();
    let sent_at = sent_at.lock().expect("lock").clone();
    let mut delays: Vec<Duration> =
        received.iter().filter_map(|(id, at)| Some(at.duration_since(*sent_at.get(id)?))).collect();
    delays.sort_unstable();
    println!(
        "delivery   {:>7} delivered: p50 {:>7.2} ms  p99 {:>7.2} ms; missing {}, duplicates {}",
        delays.len(),
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        args.messages - send.errors - received.len().min(args.messages - send.errors),
        duplicates.load(Ordering::Relaxed),
    );
    if let Some(rss) = rss_kib(args.server_pid) {
        println!("rss        {:.1} MiB", rss as f64 / 1024.0);
    }
    for syncer in syncers {
        syncer.abort();
    }
    Ok(())
}
