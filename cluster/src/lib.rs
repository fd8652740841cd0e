//! Hearth scaled out on one machine: N `hearth` workers on one Postgres database and one Redis,
//! behind a per-request round-robin proxy ([`Proxy`]), the way `deploy/scaled` runs them. The
//! workers share the signing key and the token secret and have data directories of their own.
//!
//! Used by the multi-worker tests (`homeserver/tests/it/cluster.rs`), by `scripts/cluster`
//! (the `hearth-cluster` binary) and so by the interop harnesses and the benchmark run against
//! it.

mod proxy;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
pub use proxy::{Proxy, ProxyStats};
use tokio::process::{Child, Command};

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The `hearth` binary.
    pub hearth: PathBuf,
    pub workers: usize,
    /// A Postgres database of its own.
    pub database_url: String,
    pub redis_url: String,
    /// Key prefix in Redis, so that several clusters can share one.
    pub redis_prefix: String,
    /// Where the workers keep their data directories, logs and the shared signing key.
    pub dir: PathBuf,
    /// Where the proxy listens (port 0: any free port).
    pub listen: std::net::SocketAddr,
    /// More `HEARTH_` variables for every worker.
    pub env: Vec<(String, String)>,
}

/// A running worker.
struct Worker {
    child: Child,
}

/// N workers and the proxy in front of them.
pub struct Cluster {
    config: ClusterConfig,
    token_secret: String,
    ports: Vec<u16>,
    workers: Vec<Option<Worker>>,
    pub proxy: Proxy,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Cluster {
    /// Starts the workers (the first alone, so that it makes the signing key and migrates the
    /// database before the others read them) and then the proxy.
    pub async fn start(config: ClusterConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(config.workers > 0, "a cluster needs at least one worker");
        std::fs::create_dir_all(&config.dir)?;
        let token_secret = format!("cluster-{}", random_hex(24));
        let ports = (0..config.workers).map(|_| free_port()).collect::<anyhow::Result<Vec<_>>>()?;
        let upstreams = ports.iter().map(|port| format!("http://127.0.0.1:{port}")).collect();
        let proxy = Proxy::start(config.listen, upstreams)?;
        let mut cluster =
            Self { workers: (0..config.workers).map(|_| None).collect(), config, token_secret, ports, proxy };
        cluster.restart(0).await?;
        let mut rest = Vec::new();
        for index in 1..cluster.config.workers {
            rest.push((index, cluster.spawn(index)?));
        }
        for (index, child) in rest {
            cluster.wait_healthy(index).await?;
            cluster.workers[index] = Some(Worker { child });
        }
        Ok(cluster)
    }

    /// The proxy's URL: what clients use.
    pub fn url(&self) -> &str {
        &self.proxy.url
    }

    /// One worker's own URL, bypassing the proxy.
    pub fn worker_url(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[index])
    }

    pub fn workers(&self) -> usize {
        self.ports.len()
    }

    /// The worker's log (every run of it, appended).
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(self.log_path(index)).unwrap_or_default()
    }

    fn log_path(&self, index: usize) -> PathBuf {
        self.config.dir.join(format!("worker-{index}.log"))
    }

    /// The token secret every worker shares, to mint tokens as a worker would.
    pub fn token_secret(&self) -> &str {
        &self.token_secret
    }

    fn spawn(&self, index: usize) -> anyhow::Result<Child> {
        let data = self.config.dir.join(format!("worker-{index}"));
        std::fs::create_dir_all(&data)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(index))?;
        let mut command = Command::new(&self.config.hearth);
        command.arg("serve").current_dir(&data);
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("HEARTH_")) {
            command.env_remove(key);
        }
        command
            .env("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{}", self.ports[index]))
            .env("HEARTH_LISTEN__TRUST_X_FORWARDED_FOR", "true")
            .env("HEARTH_PUBLIC_BASEURL", &self.proxy.url)
            .env("HEARTH_DATABASE__URL", &self.config.database_url)
            .env("HEARTH_REDIS__URL", &self.config.redis_url)
            .env("HEARTH_REDIS__KEY_PREFIX", &self.config.redis_prefix)
            .env("HEARTH_DATA_DIR", &data)
            .env("HEARTH_SIGNING_KEY_FILE", self.config.dir.join("signing.key"))
            .env("HEARTH_AUTH__TOKEN_SECRET", &self.token_secret);
        for (key, value) in &self.config.env {
            command.env(key, value);
        }
        command.stdout(Stdio::null()).stderr(log.try_clone()?).kill_on_drop(true);
        command.spawn().with_context(|| format!("starting {}", self.config.hearth.display()))
    }

    async fn wait_healthy(&mut self, index: usize) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("{}/health", self.worker_url(index));
        for _ in 0..600 {
            if client.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("worker {index} did not become healthy; its log:\n{}", self.log(index))
    }

    /// Starts a worker that is not running (again, on its port).
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers[index].is_none(), "worker {index} is running");
        let child = self.spawn(index)?;
        self.workers[index] = Some(Worker { child });
        self.wait_healthy(index).await
    }

    /// Kills a worker with SIGKILL: no shutdown, as a crash would.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut worker) = self.workers[index].take() {
            let _ = worker.child.kill().await;
        }
    }

    /// Sends a worker SIGTERM, which asks it to finish what it is doing and exit; see
    /// [`Cluster::wait_exit`].
    pub async fn terminate(&self, index: usize) -> anyhow::Result<()> {
        let worker = self.workers[index].as_ref().context("worker is not running")?;
        let pid = worker.child.id().context("worker has exited")?;
        let signal = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
        anyhow::ensure!(signal.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// Waits (up to a minute) for a worker to exit, and returns how it did.
    pub async fn wait_exit(&mut self, index: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut worker = self.workers[index].take().context("worker is not running")?;
        Ok(tokio::time::timeout(Duration::from_secs(60), worker.child.wait()).await??)
    }

    /// Stops every worker (SIGKILL) and the proxy.
    pub async fn stop(mut self) {
        for index in 0..self.workers.len() {
            self.kill(index).await;
        }
        self.proxy.stop().await;
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes).map(|_| format!("{:02x}", rng.r#gen::<u8>())).collect()
}
