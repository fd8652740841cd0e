//! `hearth-bench`: measures Hearth under load and prints throughput and latency percentiles.
//!
//! It either targets a running server (`--url`) or starts one in-process on a scratch database
//! (`--database sqlite` or a `postgres://` URL to create a scratch database on). Numbers are
//! for the machine they were taken on; they are reported, never asserted.
//!
//! Profiles:
//! - `accounts`: registrations, password logins and `whoami` calls, each with `--concurrency`
//!   requests in flight.
//! - `rooms`: `--users` users in `--rooms` rooms (everyone in every room), each long-polling
//!   `/sync`, while `--senders` tasks send `--messages` messages; reports messages/s, send
//!   latency, and send→delivery latency to every member.
//! - `idle-syncs`: `--connections` long-polling `/sync` requests held open at once; reports the
//!   server's memory per connection (`--url` and `--server-pid` of a separately started server).
//! - `to-device`: `--senders` accounts send `--messages` `sendToDevice` requests, each to one of
//!   `--users` receiving devices that long-poll `/sync`; reports requests/s, send latency and
//!   send→delivery latency, and counts missing and duplicated messages.
//! - `federation`: a user of the server at `--url` sends `--messages` messages at `--rate` a
//!   second into a room a user of the server at `--remote-url` joined over federation; reports
//!   the join's time (of a room with `--members` members, made by an application service
//!   with `--as-token`), send latency and send→delivery latency to the other server's `/sync`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

mod federation;
mod rooms;
mod to_device;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Load and latency benchmarks for Hearth")]
pub(crate) struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value = "accounts")]
    profile: Profile,
    /// Base URL of a running server; if absent, one is started in-process.
    #[arg(long)]
    url: Option<String>,
    /// For the in-process server: `sqlite`, or a Postgres URL on which a scratch database is made.
    #[arg(long, default_value = "sqlite")]
    database: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Accounts to register (and then log in as).
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// `whoami` requests to send.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Rooms for the `rooms` profile.
    #[arg(long, default_value_t = 5)]
    rooms: usize,
    /// Concurrent senders for the `rooms` profile.
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Messages (`rooms`) or requests (`to-device`) to send.
    #[arg(long, default_value_t = 5_000)]
    messages: usize,
    /// Long-polls to hold open in the `idle-syncs` profile.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Messages a second for the `federation` profile.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Members the `federation` profile's room has before the other server's user joins,
    /// made through an application service of the host (`--as-token`).
    #[arg(long, default_value_t = 0)]
    members: usize,
    /// The `as_token` of an application service of the host whose users are `@_bench_*`.
    #[arg(long)]
    as_token: Option<String>,
    /// Base URL of the other server for the `federation` profile (federating with `--url`'s).
    #[arg(long)]
    remote_url: Option<String>,
    /// Process id of the server, to read its memory (default: this process).
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    Accounts,
    Rooms,
    IdleSyncs,
    ToDevice,
    Federation,
}

const PASSWORD: &str = "benchmark-password";

/// Latencies of one phase.
pub(crate) struct Phase {
    name: &'static str,
    latencies: Vec<Duration>,
    errors: usize,
    elapsed: Duration,
}

impl Phase {
    pub(crate) fn report(&mut self) {
        self.latencies.sort_unstable();
        let pct = |p: f64| {
            let idx = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies.get(idx).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        let ok = self.latencies.len();
        println!(
            "{:<10} {:>7} ok {:>4} err {:>9.1} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms",
            self.name,
            ok,
            self.errors,
            ok as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
        );
    }
}

/// Runs `count` requests, `concurrency` at a time; `make(i)` performs request `i`.
pub(crate) async fn run_phase<F, Fut>(name: &'static str, count: usize, concurrency: usize, make: F) -> Phase
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (make, next) = (make.clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let t = Instant::now();
                    match make(i).await {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(e) => {
                            if errors == 0 {
                                eprintln!("{name}: {e:#}");
                            }
                            errors += 1;
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut phase = Phase { name, latencies: Vec::new(), errors: 0, elapsed: Duration::ZERO };
    for worker in workers {
        if let Ok((latencies, errors)) = worker.await {
            phase.latencies.extend(latencies);
            phase.errors += errors;
        }
    }
    phase.elapsed = started.elapsed();
    phase
}

pub(crate) async fn post(
    http: &reqwest::Client,
    url: String,
    token: Option<&str>,
    body: Value,
) -> anyhow::Result<Value> {
    let mut request = http.post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

async fn accounts(base: &str, args: &Args) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    let run = format!("b{}", std::process::id());
    let tokens = Arc::new(std::sync::Mutex::new(Vec::new()));

    let (h, b, r, t) = (http.clone(), base.to_owned(), run.clone(), tokens.clone());
    let mut register = run_phase("register", args.users, args.concurrency, move |i| {
        let (h, b, r, t) = (h.clone(), b.clone(), r.clone(), t.clone());
        async move {
            let body = json!({"username": format!("{r}u{i}"), "password": PASSWORD, "auth": {"type": "m.login.dummy"}});
            let response = post(&h, format!("{b}/_matrix/client/v3/register"), None, body).await?;
            let token = response["access_token"].as_str().context("no access_token")?.to_owned();
            t.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(token);
            Ok(())
        }
    })
    .await;
    register.report();

    let (h, b, r) = (http.clone(), base.to_owned(), run.clone());
    let users = args.users;
    let mut login = run_phase("login", args.users, args.concurrency, move |i| {
        let (h, b, r) = (h.clone(), b.clone(), r.clone());
        async move {
            let body = json!({"type": "m.login.password", "password": PASSWORD,
                "identifier": {"type": "m.id.user", "user": format!("{r}u{}", i % users)}});
            post(&h, format!("{b}/_matrix/client/v3/login"), None, body).await.map(drop)
        }
    })
    .await;
    login.report();

    let tokens: Arc<Vec<String>> = Arc::new(tokens.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone());
    if tokens.is_empty() {
        bail!("no account registered; cannot measure whoami");
    }
    let (h, b) = (http.clone(), base.to_owned());
    let mut whoami = run_phase("whoami", args.requests, args.concurrency, move |i| {
        let (h, b, tokens) = (h.clone(), b.clone(), tokens.clone());
        async move {
            let token = &tokens[i % tokens.len()];
            let response =
                h.get(format!("{b}/_matrix/client/v3/account/whoami")).bearer_auth(token).send().await?;
            if !response.status().is_success() {
                bail!("{}", response.status());
            }
            response.bytes().await?;
            Ok(())
        }
    })
    .await;
    whoami.report();
    Ok(())
}

/// Starts a server in-process on a scratch database; returns its URL and a cleanup handle.
async fn start_server(
    database: &str,
) -> anyhow::Result<(String, homeserver::server::RunningServer, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("hearth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut config = homeserver::config::Config { data_dir: dir.clone(), ..Default::default() };
    config.listen.client = "127.0.0.1:0".to_owned();
    config.rate_limits.enabled = false;
    config.database.max_connections = 16;
    if database != "sqlite" {
        let name = format!("hearth_bench_{}", std::process::id());
        let admin =
            reqwest::Url::parse(database).context("--database must be `sqlite` or a postgres:// URL")?;
        let output = std::process::Command::new("psql")
            .arg(admin.as_str())
            .args([
                "-qc",
                &format!("DROP DATABASE IF EXISTS {name}"),
                "-c",
                &format!("CREATE DATABASE {name}"),
            ])
            .output()
            .context("running psql to create the scratch database")?;
        if !output.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&output.stderr));
        }
        let mut url = admin.clone();
        url.set_path(&name);
        config.database.url = url.to_string();
    }
    let server = homeserver::server::start(config).await?;
    Ok((format!("http://{}", server.addr), server, dir))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    homeserver::install_crypto_provider();
    let args = Args::parse();
    let (base, server) = match &args.url {
        Some(url) => (url.trim_end_matches('/').to_owned(), None),
        None => {
            let (base, server, dir) = start_server(&args.database).await?;
            (base, Some((server, dir)))
        }
    };
    println!(
        "hearth-bench: server {base} ({})",
        if args.url.is_some() { "external".to_owned() } else { format!("in-process, {}", args.database) },
    );
    let result = match args.profile {
        Profile::Accounts => accounts(&base, &args).await,
        Profile::Rooms => rooms::run(&base, &args).await,
        Profile::IdleSyncs => rooms::idle_syncs(&base, &args).await,
        Profile::ToDevice => to_device::run(&base, &args).await,
        Profile::Federation => federation::run(&base, &args).await,
    };
    if let Some((server, dir)) = server {
        server.stop().await;
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}
