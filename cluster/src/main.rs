//! `hearth-cluster`: N `hearth` workers on a fresh Postgres database and one Redis, behind a
//! per-request round-robin proxy, until interrupted. `scripts/cluster N` runs it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hearth_cluster::{Cluster, ClusterConfig};
use sqlx::{Connection, Executor};

#[derive(Parser)]
#[command(about = "Runs several hearth workers behind a round-robin proxy on loopback")]
struct Args {
    /// How many workers.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8008")]
    listen: std::net::SocketAddr,
    /// A Postgres server: a fresh database is made on it (its query string, such as
    /// `?sslmode=disable`, is kept for the workers).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    postgres: String,
    /// The database's name, also the workers' Redis key prefix (default `hearth_cluster_<time>`).
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The `hearth` binary (default: next to this one).
    #[arg(long)]
    hearth: Option<PathBuf>,
    /// Data directories, logs and the signing key (default: a new directory under /tmp).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// More `HEARTH_` settings for every worker, as `NAME=VALUE`.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((name.to_owned(), value.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let name = args.name.unwrap_or_else(|| format!("hearth_cluster_{stamp}"));
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "--name takes lower-case letters, digits and underscores"
    );
    let mut admin = sqlx::PgConnection::connect(&args.postgres).await.context("connecting to Postgres")?;
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
    let (server, query) = match args.postgres.split_once('?') {
        Some((server, query)) => (server, format!("?{query}")),
        None => (args.postgres.as_str(), String::new()),
    };
    let base = server.rsplit_once('/').map_or(server, |(base, _)| base);
    let hearth = match args.hearth {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("hearth"),
    };
    let dir = args.dir.unwrap_or_else(|| std::env::temp_dir().join(&name));
    let config = ClusterConfig {
        hearth,
        workers: args.workers,
        database_url: format!("{base}/{name}{query}"),
        redis_url: args.redis,
        redis_prefix: name.clone(),
        dir: dir.clone(),
        listen: args.listen,
        env: args.env,
    };
    let cluster = Cluster::start(config).await?;
    println!(
        "hearth-cluster: {} workers behind {} (database {name}, logs in {})",
        cluster.workers(),
        cluster.url(),
        dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        stopped = tokio::signal::ctrl_c() => stopped?,
        _ = term.recv() => {}
    }
    cluster.stop().await;
    Ok(())
}
