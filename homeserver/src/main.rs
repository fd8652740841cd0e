//! `hearth`: the Hearth homeserver's command line.

use std::{io::BufRead, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use homeserver::{
    auth::{password, tokens},
    config::{Config, LogFormat, RegistrationMode},
    server,
    storage::{AccountStore, RegistrationTokenStore, now_ms},
};
use ruma::UserId;

#[derive(Parser)]
#[command(name = "hearth", version, about = "Hearth, a Matrix homeserver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// TOML configuration file; without one the defaults make a local development server.
    #[arg(long, short, env = "HEARTH_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver.
    Serve(ConfigArg),
    /// Apply database migrations and exit.
    Migrate(ConfigArg),
    /// Create an account.
    CreateUser {
        #[command(flatten)]
        config: ConfigArg,
        /// Localpart (`alice`) or full user id (`@alice:example.org`).
        #[arg(long)]
        username: String,
        /// Read the password from the first line of standard input instead of generating one.
        #[arg(long)]
        password_stdin: bool,
        /// Make the account a server administrator.
        #[arg(long)]
        admin: bool,
    },
    /// Create a registration token for `registration.mode = "token"` and print it.
    CreateRegistrationToken {
        #[command(flatten)]
        config: ConfigArg,
        /// How many registrations it allows; unlimited if left out.
        #[arg(long)]
        uses: Option<u32>,
        /// Seconds until it expires; never if left out.
        #[arg(long)]
        expires_in: Option<u64>,
    },
    /// Print a complete, commented example configuration.
    GenerateConfig,
    /// Write a new signing key to FILE (which must not exist) and print its id: the key every
    /// worker of a deployment shares (`signing_key_file`).
    GenerateSigningKey {
        /// Where to write it (mode 0600).
        output: PathBuf,
    },
}

fn init_logging(config: &Config) {
    let filter = std::env::var("HEARTH_LOG").unwrap_or_else(|_| config.logging.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    let config = Config::load(arg.config.as_deref()).context("invalid configuration")?;
    init_logging(&config);
    Ok(config)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    homeserver::install_crypto_provider();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hearth: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::GenerateConfig => {
            print!("{}", homeserver::config::EXAMPLE);
            Ok(())
        }
        Command::GenerateSigningKey { output } => {
            if output.exists() {
                bail!("{} exists; a signing key is never overwritten", output.display());
            }
            let key = federation::signing_key::SigningKey::load_or_generate(&output)
                .with_context(|| format!("writing {}", output.display()))?;
            println!("{} written to {}", key.key_id(), output.display());
            Ok(())
        }
        Command::Serve(arg) => serve(load(&arg)?).await,
        Command::Migrate(arg) => {
            let config = load(&arg)?;
            let store = server::open_store(&config).await?;
            store.migrate().await?;
            tracing::info!("database is up to date");
            Ok(())
        }
        Command::CreateUser { config, username, password_stdin, admin } => {
            let config = load(&config)?;
            let store = server::open_store(&config).await?;
            store.migrate().await?;
            let user_id = if username.starts_with('@') {
                UserId::parse(&username)?
            } else {
                UserId::parse_with_server_name(
                    username.as_str(),
                    <&ruma::ServerName>::try_from(config.server_name.as_str())?,
                )?
            };
            user_id.validate_strict().context("usernames may contain only a-z, 0-9 and . _ = - / +")?;
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                (line.trim_end_matches(['\r', '\n']).to_owned(), false)
            } else {
                (tokens::random_token(18), true)
            };
            if password.is_empty() {
                bail!("the password is empty");
            }
            let hash = password::hash(&password).await?;
            if !store.create_user(&user_id, Some(&hash), admin).await? {
                bail!("{user_id} already exists");
            }
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
            if generated {
                println!("password: {password}");
            }
            Ok(())
        }
        Command::CreateRegistrationToken { config, uses, expires_in } => {
            let config = load(&config)?;
            let store = server::open_store(&config).await?;
            store.migrate().await?;
            let token = tokens::random_token(18);
            let expiry = expires_in.map(|secs| {
                now_ms().saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
            });
            store.create_registration_token(&tokens::sha256_hex(&token), uses.map(i64::from), expiry).await?;
            println!("{token}");
            Ok(())
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "Hearth starting");
    let mode = match config.registration.mode {
        RegistrationMode::Open => "open registration (m.login.dummy)",
        RegistrationMode::Token => "registration by token (m.login.registration_token)",
        RegistrationMode::Closed => "registration closed",
    };
    if config.is_embedded() {
        tracing::info!(
            server_name = %config.server_name,
            database = %config.database_url(),
            "local development server: SQLite database and embedded queue under {}, {mode}; \
             see `hearth generate-config` for production settings",
            config.data_dir.display(),
        );
    } else {
        tracing::info!(server_name = %config.server_name, database = ?config.database_kind()?, "{mode}");
    }
    if !config.redis.url.is_empty() {
        tracing::info!("to-device messages are queued in Redis");
    }
    let running = server::start(config).await?;
    tracing::info!("client API listening on http://{}", running.addr);
    shutdown_signal().await?;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
