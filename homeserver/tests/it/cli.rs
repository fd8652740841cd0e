//! The `hearth` command line: what operators and scripts rely on.

use std::process::Command;

use serde_json::json;

use crate::{
    common::{Db, TestDb, TestServer},
    interop::HearthProcess,
};

/// `hearth` run in the test's directory: on SQLite with the defaults (`./hearth-data`), on
/// Postgres with the test database.
fn hearth(db: &TestDb, backend: Db) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hearth"));
    command.current_dir(&db.dir);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("HEARTH_")) {
        command.env_remove(key);
    }
    if backend == Db::Postgres {
        command.env("HEARTH_DATABASE__URL", &db.url);
    }
    command
}

#[test]
fn generate_config_prints_the_documented_example() {
    let output = Command::new(env!("CARGO_BIN_EXE_hearth")).arg("generate-config").output().unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed, homeserver::config::EXAMPLE);
    assert!(printed.parse::<toml::Table>().is_ok());
}

#[test]
fn generate_signing_key_writes_a_key_that_workers_load_and_never_overwrites() {
    let dir = std::env::temp_dir().join(format!("hearth-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("signing.key");
    let output =
        Command::new(env!("CARGO_BIN_EXE_hearth")).arg("generate-signing-key").arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    let loaded = federation::signing_key::SigningKey::load_or_generate(&path).unwrap();
    assert!(printed.starts_with(&loaded.key_id()), "{printed}");
    let written = std::fs::read(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let again =
        Command::new(env!("CARGO_BIN_EXE_hearth")).arg("generate-signing-key").arg(&path).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    assert_eq!(std::fs::read(&path).unwrap(), written);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_configuration_refuses_to_start_and_names_the_key() {
    let cases = [
        ("HEARTH_REGISTRATION__MODE", "sometimes", "registration.mode"),
        ("HEARTH_LISTEN__CLIENT", "not-an-address", "listen.client"),
        ("HEARTH_RATE_LIMITS__ENABLED", "perhaps", "HEARTH_RATE_LIMITS__ENABLED"),
        ("HEARTH_NO_SUCH_SETTING", "1", "no_such_setting"),
    ];
    for (var, value, named) in cases {
        let output =
            Command::new(env!("CARGO_BIN_EXE_hearth")).arg("serve").env(var, value).output().unwrap();
        assert!(!output.status.success(), "{var}={value} must not start");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{var}={value}: {stderr}");
    }
    let dir = std::env::temp_dir().join(format!("hearth-badconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hearth.toml");
    std::fs::write(&file, "[database]\nurl = \"mysql://x\"\n").unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_hearth")).args(["serve", "--config"]).arg(&file).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("database.url"));
    let _ = std::fs::remove_dir_all(dir);
}

crate::on_both_backends! {
    async fn create_user_and_registration_tokens(db: Db) {
        let test_db = TestDb::new(db).await;
        let migrate = hearth(&test_db, db).arg("migrate").output().unwrap();
        assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));

        let mut child = hearth(&test_db, db)
            .args(["create-user", "--username", "root", "--admin", "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"an admin password\n").unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        assert!(String::from_utf8_lossy(&output.stdout).contains("@root:localhost (admin)"));
        let again = hearth(&test_db, db).args(["create-user", "--username", "root"]).output().unwrap();
        assert!(!again.status.success(), "an existing user is not created twice");
        let generated = hearth(&test_db, db).args(["create-user", "--username", "ops"]).output().unwrap();
        let text = String::from_utf8_lossy(&generated.stdout).to_string();
        let password = text.lines().find_map(|l| l.strip_prefix("password: ")).unwrap().to_owned();
        let token = hearth(&test_db, db).args(["create-registration-token", "--uses", "1"]).output().unwrap();
        assert!(token.status.success());
        let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();

        let hearth_process = HearthProcess::start(&test_db, db).await;
        let client = reqwest::Client::new();
        let login = |user: &'static str, password: String| {
            let client = client.clone();
            let base = hearth_process.base.clone();
            async move {
                client.post(format!("{base}/_matrix/client/v3/login"))
                    .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password}))
                    .send().await.unwrap().status().as_u16()
            }
        };
        assert_eq!(login("root", "an admin password".to_owned()).await, 200);
        assert_eq!(login("ops", password).await, 200);
        let validity = client
            .get(format!("{}/_matrix/client/v1/register/m.login.registration_token/validity?token={token}", hearth_process.base))
            .send().await.unwrap().status().as_u16();
        assert_eq!(validity, 403, "the server runs with open registration, so tokens are not in use");
        hearth_process.stop().await;

        // The same database served in token mode accepts the token once.
        let server = TestServer::start_on(&test_db, |c| c.registration.mode = homeserver::config::RegistrationMode::Token).await;
        let body = json!({"username": "newcomer", "password": "a long password",
            "auth": {"type": "m.login.registration_token", "token": token}});
        assert_eq!(server.post("/_matrix/client/v3/register", None, body).await.0, 200);
        server.stop().await;
        test_db.remove().await;
    }
}
