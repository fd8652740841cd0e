//! Interop: matrix-nio (from PyPI), a client nobody here wrote, drives the real `hearth` binary
//! started the way the README starts it, on SQLite (the zero-setup default) and on Postgres.
//!
//! The Python environment comes from `scripts/test` (`interop/.venv`); `TEST_PYTHON` may point
//! elsewhere. A missing environment fails the test: interop is never silently skipped.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use crate::common::{Db, TestDb};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

pub fn python() -> PathBuf {
    let python = std::env::var_os("TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("interop/.venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run `scripts/test` (it installs matrix-nio into interop/.venv) or set TEST_PYTHON",
        python.display()
    );
    python
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `hearth serve` as a separate process, configured only through `HEARTH_` variables.
pub struct HearthProcess {
    pub base: String,
    child: Child,
    log: PathBuf,
}

impl HearthProcess {
    pub async fn start(db: &TestDb, backend: Db) -> Self {
        Self::start_with(db, backend, &[]).await
    }

    /// Starts it with more `HEARTH_` variables (these win over the test's defaults).
    pub async fn start_with(db: &TestDb, backend: Db, env: &[(&str, String)]) -> Self {
        // A listen address among `env` (to restart on the same port) is where to find it.
        let port = env
            .iter()
            .find(|(key, _)| *key == "HEARTH_LISTEN__CLIENT")
            .and_then(|(_, addr)| addr.rsplit_once(':')?.1.parse().ok())
            .unwrap_or_else(free_port);
        let log = db.dir.join("hearth.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_hearth"));
        command.arg("serve").current_dir(&db.dir);
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEARTH_")) {
            command.env_remove(key);
        }
        // The signing key and token secret of the in-process test servers on the same
        // database (`common::test_config`): a worker with others would refuse to start.
        command
            .env("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{port}"))
            .env("HEARTH_SIGNING_KEY_FILE", db.dir.join("signing.key"))
            .env("HEARTH_AUTH__TOKEN_SECRET", crate::common::TOKEN_SECRET)
            .env("HEARTH_RATE_LIMITS__ENABLED", "false")
            .env("HEARTH_LOG", "info,homeserver=debug");
        // SQLite runs on the defaults alone: ./hearth-data under the working directory.
        if backend == Db::Postgres {
            command.env("HEARTH_DATABASE__URL", &db.url);
        }
        if let Some(prefix) = &db.redis_prefix {
            command
                .env("HEARTH_REDIS__URL", crate::common::redis_url())
                .env("HEARTH_REDIS__KEY_PREFIX", prefix);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        // Appended to, so that a restarted process's log follows the killed one's.
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        command.stdout(Stdio::null()).stderr(log_file.try_clone().expect("log")).kill_on_drop(true);
        let child = command.spawn().expect("spawn hearth");
        let process = Self { base: format!("http://127.0.0.1:{port}"), child, log };
        process.wait_healthy().await;
        process
    }

    async fn wait_healthy(&self) {
        let started = Instant::now();
        let client = reqwest::Client::new();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(response) = client.get(format!("{}/health", self.base)).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "hearth did not become healthy; log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it with SIGKILL: no shutdown, no flushing, as a crash would.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Runs one harness script from `interop/` against the server (Python for `.py`, Node for
/// `.mjs`); panics with its output on failure.
pub async fn run_harness(script: &str, hearth: &HearthProcess) {
    run_harness_at(script, &hearth.base, &|| hearth.log()).await;
}

/// Runs one harness script against the server at `base` (one worker or a proxy in front of
/// several); `log` gives the servers' logs to show on failure.
pub async fn run_harness_at(script: &str, base: &str, log: &dyn Fn() -> String) {
    let output = harness(script, base, &[]).output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("harness finished in time")
        .expect("harness ran");
    check_harness(script, &output, &log());
}

/// matrix-js-sdk's Rust crypto and a matrix-nio peer chat encrypted through the server at
/// `base` (`js/e2ee.mjs`, which drives `nio/e2ee_peer.py`).
pub async fn run_e2ee_with_nio_peer(base: &str, log: &dyn Fn() -> String) {
    let peer = workspace_root().join("interop/nio/e2ee_peer.py");
    let output = harness("js/e2ee.mjs", base, &[&python(), &peer]).output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("harness finished in time")
        .expect("harness ran");
    check_harness("js/e2ee.mjs", &output, &log());
}

/// matrix-nio's users of two federating servers share a room hosted at `host_base`
/// (`nio/federation.py`); `ca_file` is the CA the servers' certificates come from.
pub async fn run_federation_harness(
    host_base: &str,
    other_base: &str,
    ca_file: &str,
    log: &dyn Fn() -> String,
) {
    let mut command = harness("nio/federation.py", host_base, &[Path::new(other_base)]);
    let output = command.env("HARNESS_CA_FILE", ca_file).output();
    let output = tokio::time::timeout(Duration::from_secs(240), output)
        .await
        .expect("harness finished in time")
        .expect("harness ran");
    check_harness("nio/federation.py", &output, &log());
}

/// matrix-nio's encrypted chat (`nio/e2ee.py`) with alice on the server at `base` and bob, with
/// both his devices, on the one at `other_base`; `ca_file` is the CA the servers' certificates
/// come from.
pub async fn run_e2ee_across(base: &str, other_base: &str, ca_file: &str, log: &dyn Fn() -> String) {
    let mut command = harness("nio/e2ee.py", base, &[]);
    let output = command.env("HARNESS_OTHER_BASE", other_base).env("HARNESS_CA_FILE", ca_file).output();
    let output = tokio::time::timeout(Duration::from_secs(240), output)
        .await
        .expect("harness finished in time")
        .expect("harness ran");
    check_harness("nio/e2ee.py", &output, &log());
}

/// The command that runs a harness script with its arguments.
fn harness(script: &str, base: &str, args: &[&Path]) -> Command {
    let program = if script.ends_with(".mjs") {
        let modules = workspace_root().join("interop/js/node_modules/matrix-js-sdk");
        assert!(
            modules.exists(),
            "matrix-js-sdk is not installed: run `scripts/test` (npm ci in interop/js)"
        );
        PathBuf::from("node")
    } else {
        python()
    };
    let mut command = Command::new(program);
    command.arg(workspace_root().join("interop").join(script)).arg(base).args(args).kill_on_drop(true);
    command
}

/// Panics with the harness's output unless it passed every check.
fn check_harness(script: &str, output: &std::process::Output, hearth_log: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- hearth log\n{hearth_log}",
        output.status,
    );
    assert!(stdout.contains("ALL CHECKS PASSED"), "{script} did not finish its checks:\n{stdout}");
}

/// Runs a push harness (`nio/push.py` or `js/push.mjs`): its client sets an HTTP pusher to a
/// gateway this test runs, and every event it lists (`PUSHED <event id> <pushkey>`) must reach
/// the gateway as a highlight for that pushkey, with every field as the spec says (the gateway
/// checks).
async fn push_harness(script: &str, db: Db) {
    let gateway = crate::push::Gateway::start().await;
    let test_db = TestDb::new(db).await;
    let env = [("HEARTH_PUSH__ALLOW_PRIVATE_ADDRESSES", "true".to_owned())];
    let hearth = HearthProcess::start_with(&test_db, db, &env).await;
    let output = harness(script, &hearth.base, &[Path::new(&gateway.url)]).output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("harness finished in time")
        .expect("harness ran");
    check_harness(script, &output, &hearth.log());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let pushed: Vec<(&str, &str)> =
        stdout.lines().filter_map(|line| line.strip_prefix("PUSHED ")?.split_once(' ')).collect();
    assert_eq!(pushed.len(), 2, "the mention and the rule's match:\n{stdout}");
    for (event_id, pushkey) in pushed {
        let notification = gateway.notification_for(event_id).await;
        let device = &notification["devices"][0];
        assert_eq!(device["pushkey"], pushkey, "{notification}");
        assert_eq!(device["tweaks"]["highlight"], true, "{notification}");
        assert_eq!(notification["type"], "m.room.message");
        assert!(notification["counts"]["unread"].as_u64().is_some_and(|n| n >= 1), "{notification}");
    }
    hearth.stop().await;
    test_db.remove().await;
    gateway.stop().await;
}

crate::on_both_backends! {
    /// matrix-nio sets an HTTP pusher (through its raw request API: nio has none for pushers)
    /// and a content rule (nio's `set_pushrule`); a mention and the rule's match reach the
    /// gateway.
    async fn matrix_nio_pusher_gets_mentions_to_the_gateway(db: Db) {
        push_harness("nio/push.py", db).await;
    }

    /// matrix-js-sdk sets an HTTP pusher (`setPusher`) and a content rule (`addPushRule`); a
    /// mention and the rule's match reach the gateway.
    async fn matrix_js_sdk_pusher_gets_mentions_to_the_gateway(db: Db) {
        push_harness("js/push.mjs", db).await;
    }

    /// Encrypted chat with matrix-nio's vodozemac crypto; on SQLite with the embedded queue, on
    /// Postgres with Redis. While a device is away, Hearth is killed (-9) and restarted on the
    /// same port; the device then decrypts everything it missed.
    async fn matrix_nio_e2ee(db: Db) {
        let test_db = TestDb::new(db).await;
        let port = free_port();
        let env = [("HEARTH_LISTEN__CLIENT", format!("127.0.0.1:{port}"))];
        let mut hearth = HearthProcess::start_with(&test_db, db, &env).await;
        let control = test_db.dir.join("control");
        std::fs::create_dir_all(&control).expect("control dir");
        let mut child = harness("nio/e2ee.py", &hearth.base, &[&control])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("harness ran");
        let started = Instant::now();
        while !control.join("kill").exists() && started.elapsed() < Duration::from_secs(120) {
            if child.try_wait().expect("harness status").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if control.join("kill").exists() {
            hearth.stop().await;
            hearth = HearthProcess::start_with(&test_db, db, &env).await;
            std::fs::write(control.join("restarted"), b"").expect("signal the harness");
        }
        let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("harness finished in time")
            .expect("harness ran");
        check_harness("nio/e2ee.py", &output, &hearth.log());
        assert!(control.join("restarted").exists(), "the harness reached the restart");
        hearth.stop().await;
        test_db.remove().await;
    }

    /// matrix-js-sdk's Rust crypto and matrix-nio chat encrypted through Hearth; js-sdk backs its
    /// keys up and a new js-sdk device restores them and decrypts the history.
    async fn matrix_js_sdk_e2ee_with_nio(db: Db) {
        let test_db = TestDb::new(db).await;
        let hearth = HearthProcess::start(&test_db, db).await;
        run_e2ee_with_nio_peer(&hearth.base, &|| hearth.log()).await;
        hearth.stop().await;
        test_db.remove().await;
    }

    async fn matrix_js_sdk_rooms(db: Db) {
        let test_db = TestDb::new(db).await;
        let hearth = HearthProcess::start(&test_db, db).await;
        run_harness("js/rooms.mjs", &hearth).await;
        hearth.stop().await;
        test_db.remove().await;
    }

    async fn matrix_nio_rooms(db: Db) {
        let test_db = TestDb::new(db).await;
        let hearth = HearthProcess::start(&test_db, db).await;
        run_harness("nio/rooms.py", &hearth).await;
        hearth.stop().await;
        test_db.remove().await;
    }

    async fn matrix_nio_accounts_and_devices(db: Db) {
        let test_db = TestDb::new(db).await;
        let hearth = HearthProcess::start(&test_db, db).await;
        run_harness("nio/accounts.py", &hearth).await;
        if db == Db::Sqlite {
            assert!(test_db.dir.join("hearth-data/hearth.db").exists(), "the default keeps its database in ./hearth-data");
        }
        hearth.stop().await;
        test_db.remove().await;
    }
}
