//! Hearth's configuration: a typed struct read from TOML, with `HEARTH_` environment overrides.
//!
//! Every setting has a default, so `hearth serve` with no file is a local development server. An
//! environment variable `HEARTH_<KEY>` overrides a top-level key and `HEARTH_<SECTION>__<KEY>` a key
//! in a section (`HEARTH_LISTEN__CLIENT=0.0.0.0:8008`). The value is read as the type the key has,
//! so an override can never change a string into a number by accident. Unknown keys, in the file
//! or the environment, are refused by name: a typo must not silently fall back to a default.
//!
//! `config/hearth.example.toml` documents every key; a test keeps it and this struct in step.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ruma::ServerName;
use serde::{Deserialize, Serialize};

/// The commented example configuration shipped in `config/`, printed by `hearth generate-config`.
pub const EXAMPLE: &str = include_str!("../../config/hearth.example.toml");

/// Environment variables with the `HEARTH_` prefix that are not configuration keys.
const RESERVED_ENV: &[&str] = &["HEARTH_CONFIG", "HEARTH_LOG"];

/// A configured secret: its `Debug` never shows it, so it cannot reach a log line by accident.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "<redacted>" })
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The domain in every user id (`@alice:<server_name>`). Cannot change once users exist.
    pub server_name: String,
    /// Where the embedded database, keys and other local state live.
    pub data_dir: PathBuf,
    /// The URL clients reach this server at, announced in `/.well-known/matrix/client`.
    /// Empty: derived from the client listener.
    pub public_baseurl: String,
    /// The server's ed25519 signing key. Empty: `<data_dir>/signing.key`, created on first start.
    pub signing_key_file: String,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub federation: FederationConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub registration: RegistrationConfig,
    pub auth: AuthConfig,
    pub rate_limits: RateLimitConfig,
    pub limits: LimitsConfig,
    pub user_directory: UserDirectoryConfig,
    pub rooms: RoomsConfig,
    pub appservices: AppservicesConfig,
    pub threepid: ThreepidConfig,
    pub email: EmailConfig,
    pub sms: SmsConfig,
    pub jwt_login: JwtLoginConfig,
    pub turn: TurnConfig,
    pub push: PushConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Address of the client-server API listener.
    pub client: String,
    /// Take the client's IP (for rate limits and "last seen") from the last `X-Forwarded-For`
    /// entry, which the reverse proxy in front of Hearth appends. Only for deployments behind
    /// such a proxy: otherwise clients could pick their own IP.
    pub trust_x_forwarded_for: bool,
    /// Address of the federation listener (other servers reach it, port 8448 by convention).
    /// Empty: no federation. The client listener's own address: one listener serves both APIs
    /// (behind a TLS proxy that does not route by path; `tls` then does not apply).
    pub federation: String,
}

/// The certificate the federation listener serves. Empty: it speaks plain HTTP, for a
/// deployment with a TLS proxy in front.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the certificate chain.
    pub certificate: String,
    /// PEM file of its private key.
    pub private_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Talk to other servers. Takes effect only with `listen.federation` set.
    pub enabled: bool,
    /// A PEM file of certificates trusted besides the system's roots when calling other servers
    /// (a private CA). Empty: the system's roots only.
    pub extra_ca_file: String,
    /// Call servers on loopback, private, link-local and other non-public addresses. Off, a
    /// server name cannot make Hearth call into its own network (tests on loopback turn it on).
    pub allow_private_addresses: bool,
    /// How long one request to another server may take, in seconds.
    pub request_timeout_secs: u64,
    /// Keys this server signed with before, still published (`old_verify_keys`) so that what it
    /// signed with them can be checked.
    pub old_signing_keys: Vec<OldSigningKey>,
    /// Notaries asked for another server's keys when that server cannot be asked itself, in this
    /// order (`/_matrix/key/v2/query`).
    pub trusted_key_servers: Vec<TrustedKeyServer>,
    /// DNS servers (`ip:port`) that resolve other servers' names (SRV and address records)
    /// instead of the system's (`/etc/resolv.conf`). Empty: the system's.
    pub nameservers: Vec<String>,
    /// While a server fails, the newest events kept queued for it (older ones it fetches when
    /// newer ones name them), and the newest EDUs.
    pub max_backlog_pdus: usize,
    pub max_backlog_edus: usize,
}

/// A notary: a server trusted to vouch for other servers' keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustedKeyServer {
    pub server_name: String,
    /// Its keys (key id → public key, unpadded base64), one of which must have signed what it
    /// vouches for. Empty: its keys are fetched from it like any server's.
    pub verify_keys: std::collections::BTreeMap<String, String>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            extra_ca_file: String::new(),
            allow_private_addresses: false,
            request_timeout_secs: 30,
            old_signing_keys: Vec::new(),
            trusted_key_servers: Vec::new(),
            nameservers: Vec::new(),
            max_backlog_pdus: crate::remote::outbox::MAX_BACKLOG_PDUS,
            max_backlog_edus: crate::remote::outbox::MAX_BACKLOG_EDUS,
        }
    }
}

/// A signing key retired from use.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OldSigningKey {
    /// `ed25519:<version>`, as it was published.
    pub key_id: String,
    /// The public key, unpadded base64.
    pub public_key: String,
    /// When it stopped being used, in ms since the epoch.
    pub expired_ts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path` or `postgres://user@host/db`. Empty: SQLite at `<data_dir>/hearth.db`.
    pub url: String,
    /// Upper bound of the connection pool.
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Empty: the embedded queue in the database.
    pub url: String,
    /// Prefix of every key Hearth writes, so that several deployments can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: String::new(), key_prefix: "hearth".to_owned() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationMode {
    /// Anyone may register (`m.login.dummy`).
    Open,
    /// Registration needs a registration token (`m.login.registration_token`).
    Token,
    /// Only `hearth create-user` and the admin API create accounts.
    Closed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    pub mode: RegistrationMode,
    /// Which verified address a new account must have.
    pub require: RequiredThreepid,
    /// Email domains that may be used (`example.org` also admits its subdomains). Empty: any.
    pub allowed_email_domains: Vec<String>,
    /// Country calling codes phone numbers may have (`"44"`, `"1"`). Empty: any.
    pub allowed_phone_countries: Vec<String>,
    /// Minimum password length for new passwords.
    pub min_password_length: u32,
    /// Usernames nobody may register (`hearth create-user` still may): names people would
    /// take for the operator's.
    pub reserved_usernames: Vec<String>,
    /// Whether `POST /register?kind=guest` makes guest accounts (no password, the spec's guest
    /// endpoints only). Off: it answers 403 `M_GUEST_ACCESS_FORBIDDEN`.
    pub allow_guests: bool,
    pub recaptcha: RecaptchaConfig,
}

/// The `m.login.recaptcha` registration stage (Google reCAPTCHA v2, or a service with the same
/// verification API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecaptchaConfig {
    /// The site key, handed to clients in the stage's `params`. Empty: no captcha stage.
    pub public_key: String,
    /// The secret key, sent to the verifier with each answer.
    pub private_key: Secret,
    /// The verification endpoint (`siteverify`).
    pub siteverify_url: String,
    /// Every registration flow asks for the captcha. Off: no flow asks for it, but a client
    /// that completes the stage anyway is answered as for any stage (Synapse does the same).
    pub required: bool,
    /// A PEM file of certificates trusted besides the system's roots when calling the verifier
    /// (a private CA). Empty: the system's roots only.
    pub extra_ca_file: String,
}

impl Default for RecaptchaConfig {
    fn default() -> Self {
        Self {
            public_key: String::new(),
            private_key: Secret::default(),
            siteverify_url: "https://www.google.com/recaptcha/api/siteverify".to_owned(),
            required: true,
            extra_ca_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequiredThreepid {
    None,
    Email,
    Msisdn,
    EmailOrMsisdn,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThreepidConfig {
    /// How long a one-time code stays valid, in seconds.
    pub code_lifetime_secs: u64,
    /// Wrong codes accepted before the verification session is dead.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SmtpTls {
    /// Plain SMTP: only for a relay on the same host or network.
    None,
    /// Upgrade with STARTTLS (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// SMTP server. Empty: this server sends no email.
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: SmtpTls,
    /// SMTP credentials; leave empty for a relay without authentication.
    pub smtp_username: String,
    pub smtp_password: Secret,
    /// The From of every message, `Name <address>` or `address`.
    pub from: String,
    /// Seconds to wait for the SMTP server.
    pub timeout_secs: u64,
    /// Directory with `verification.txt` and `verification.html` to replace the built-in
    /// templates (see `config/templates/`). Empty: built-in.
    pub templates_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsConfig {
    /// Base URL of a Twilio-compatible Messages API.
    pub base_url: String,
    /// Account SID. Empty: this server sends no SMS.
    pub account_sid: String,
    pub auth_token: Secret,
    /// Sender number (E.164) or sender id.
    pub from: String,
    /// Seconds to wait for the provider.
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtLoginConfig {
    /// Accept `org.matrix.login.jwt` logins signed by the organisation's identity provider.
    pub enabled: bool,
    /// `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256`, `ES384` or `EdDSA`.
    pub algorithm: String,
    /// Shared secret for the HS algorithms.
    pub secret: Secret,
    /// PEM file with the public key for the RS, ES and EdDSA algorithms.
    pub public_key_file: String,
    /// Required `iss`; empty: not checked.
    pub issuer: String,
    /// Required `aud`; empty: not checked.
    pub audience: String,
    /// Claim that holds the user's localpart.
    pub subject_claim: String,
    /// Create the account on its first JWT login.
    pub create_users: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Secret that signs access tokens (HS256). Every worker of one deployment needs the same.
    /// Empty: generated on first start and kept in `<data_dir>/token.key`.
    pub token_secret: Secret,
    /// Lifetime of access tokens issued with a refresh token, in seconds.
    pub access_token_lifetime_secs: u64,
    /// How long a User-Interactive Auth session stays usable, in seconds.
    pub uia_session_lifetime_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Master switch for every limit below.
    pub enabled: bool,
    /// Login attempts per second and client IP, sustained.
    pub login_per_second: f64,
    /// Login attempts a client IP may make in a burst.
    pub login_burst: u32,
    /// Registration attempts (completed or failed, not each step of their User-Interactive
    /// Auth) and username checks per second and client IP, sustained.
    pub register_per_second: f64,
    /// Registration attempts a client IP may make in a burst.
    pub register_burst: u32,
    /// One-time codes sent to one address per second, sustained, and in a burst.
    pub code_per_address_per_second: f64,
    pub code_per_address_burst: u32,
    /// One-time codes one client IP may have sent per second, sustained, and in a burst.
    pub code_per_ip_per_second: f64,
    pub code_per_ip_burst: u32,
    /// Wrong passwords (at login or in User-Interactive Auth) one account may receive, from any
    /// IP, per second, sustained, and in a burst. Right passwords are not counted; while the
    /// budget is empty even the right one is refused.
    pub password_failures_per_account_per_second: f64,
    pub password_failures_per_account_burst: u32,
    /// Wrong passwords one client IP may send, per second, sustained, and in a burst.
    pub password_failures_per_ip_per_second: f64,
    pub password_failures_per_ip_burst: u32,
    /// Room events (messages, state, redactions), typing and presence updates one user may
    /// send per second, sustained, and in a burst.
    pub events_per_second: f64,
    pub events_burst: u32,
    /// Requests one other server may make of the federation API per second, sustained, and in a
    /// burst (counted once its signature is checked).
    pub federation_requests_per_second: f64,
    pub federation_requests_burst: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body the client API accepts, in bytes.
    pub max_request_bytes: usize,
    /// Recent stream changes (events, receipts, account data writes) each process keeps in
    /// memory for `/sync`; older sync tokens are answered from the database.
    pub recent_changes: usize,
    /// Seconds a client has to send a request's whole body; a slower one is answered 408.
    pub body_timeout_secs: u64,
    /// Connections one client IP may hold open at once; past it, requests are answered 429 and
    /// their connections closed. 0: no limit. Not applied behind a trusted proxy
    /// (`listen.trust_x_forwarded_for`), where every connection comes from the proxy.
    pub connections_per_ip: usize,
    /// Most `initial_state` events a `createRoom` request may carry.
    pub max_initial_state: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    /// Search every active local user. Off: only users who share a room with the searcher or
    /// are joined to a public room (Synapse's `search_all_users = false`).
    pub search_all_users: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// The room version of rooms created without one (`createRoom`'s `room_version`), also
    /// announced as the default in `/capabilities`. Any of 1–12.
    pub default_version: String,
    /// Self-destructing messages (MSC2228, an unstable proposal): a message whose content has
    /// `org.matrix.self_destruct_after` (a time in milliseconds) is emptied once that time has
    /// passed, as a redaction empties it but without a redaction event.
    pub self_destructing_messages: bool,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self { default_version: "10".to_owned(), self_destructing_messages: false }
    }
}

impl RoomsConfig {
    /// The default room version, parsed (checked at start-up).
    pub fn default_version(&self) -> ruma::RoomVersionId {
        ruma::RoomVersionId::try_from(self.default_version.as_str()).unwrap_or(ruma::RoomVersionId::V10)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppservicesConfig {
    /// Registration files of application services (YAML), read at start-up
    /// (see [`crate::appservice`]).
    pub registration_files: Vec<String>,
    /// A PEM file of certificates trusted besides the system's roots when calling the services
    /// over HTTPS (a private CA). Empty: the system's roots only.
    pub extra_ca_file: String,
    /// How long a service may take to answer a transaction before it is sent again, in seconds
    /// (1 to 30: a send must end well inside the 60-second claim on the service's queue).
    pub transaction_timeout_secs: u64,
}

impl Default for AppservicesConfig {
    fn default() -> Self {
        Self { registration_files: Vec::new(), extra_ca_file: String::new(), transaction_timeout_secs: 30 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// TURN server URIs handed to clients (`turn:turn.example.org:3478?transport=udp`). Empty:
    /// no TURN server.
    pub uris: Vec<String>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`), from which
    /// time-limited credentials are made.
    pub shared_secret: Secret,
    /// How long those credentials last, in seconds.
    pub user_lifetime_secs: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: Vec::new(), shared_secret: Secret::default(), user_lifetime_secs: 86_400 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Deliver to push gateways on loopback, private, link-local and other non-public addresses.
    /// Pushers are URLs users choose: off, a user cannot make the server call into its own
    /// network (as Synapse's `ip_range_blacklist`).
    pub allow_private_addresses: bool,
    /// A PEM file of certificates trusted besides the system's roots when calling push gateways
    /// (a private CA). Empty: the system's roots only.
    pub extra_ca_file: String,
    /// Attempts at delivering one notification before it is given up on.
    pub max_attempts: u32,
    /// Wait before the first retry, in milliseconds; it doubles with each failed attempt.
    pub initial_backoff_ms: u64,
    /// Longest wait between two attempts, in seconds.
    pub max_backoff_secs: u64,
    /// How long one request to a push gateway may take, in seconds.
    pub request_timeout_secs: u64,
    /// How long notifications are kept for `/notifications`, in days.
    pub retention_days: u64,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            allow_private_addresses: false,
            extra_ca_file: String::new(),
            max_attempts: 10,
            initial_backoff_ms: 1_000,
            max_backoff_secs: 3_600,
            request_timeout_secs: 10,
            retention_days: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `pretty` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A tracing filter (`info`, `homeserver=debug,info`). `HEARTH_LOG` takes precedence.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".to_owned(),
            data_dir: PathBuf::from("./hearth-data"),
            public_baseurl: String::new(),
            signing_key_file: String::new(),
            listen: ListenConfig::default(),
            tls: TlsConfig::default(),
            federation: FederationConfig::default(),
            database: DatabaseConfig::default(),
            redis: RedisConfig::default(),
            registration: RegistrationConfig::default(),
            auth: AuthConfig::default(),
            rate_limits: RateLimitConfig::default(),
            limits: LimitsConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            rooms: RoomsConfig::default(),
            appservices: AppservicesConfig::default(),
            threepid: ThreepidConfig::default(),
            email: EmailConfig::default(),
            sms: SmsConfig::default(),
            jwt_login: JwtLoginConfig::default(),
            turn: TurnConfig::default(),
            push: PushConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { client: "127.0.0.1:8008".to_owned(), trust_x_forwarded_for: false, federation: String::new() }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: String::new(), max_connections: 16 }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: RegistrationMode::Open,
            require: RequiredThreepid::None,
            allowed_email_domains: Vec::new(),
            allowed_phone_countries: Vec::new(),
            min_password_length: 8,
            allow_guests: false,
            recaptcha: RecaptchaConfig::default(),
            reserved_usernames: [
                "admin",
                "administrator",
                "root",
                "postmaster",
                "hostmaster",
                "webmaster",
                "abuse",
                "security",
                "support",
                "noc",
                "system",
                "hearth",
                "server",
                "moderator",
                "staff",
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token_secret: Secret::default(),
            access_token_lifetime_secs: 300,
            uia_session_lifetime_secs: 900,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            login_per_second: 0.5,
            login_burst: 10,
            register_per_second: 0.2,
            register_burst: 5,
            code_per_address_per_second: 1.0 / 300.0,
            code_per_address_burst: 3,
            code_per_ip_per_second: 1.0 / 60.0,
            code_per_ip_burst: 10,
            password_failures_per_account_per_second: 1.0 / 60.0,
            password_failures_per_account_burst: 10,
            password_failures_per_ip_per_second: 1.0 / 30.0,
            password_failures_per_ip_burst: 20,
            events_per_second: 5.0,
            events_burst: 50,
            federation_requests_per_second: 50.0,
            federation_requests_burst: 500,
        }
    }
}

impl Default for ThreepidConfig {
    fn default() -> Self {
        Self { code_lifetime_secs: 600, max_attempts: 5 }
    }
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_host: String::new(),
            smtp_port: 587,
            smtp_tls: SmtpTls::Starttls,
            smtp_username: String::new(),
            smtp_password: Secret::default(),
            from: "Hearth <noreply@localhost>".to_owned(),
            timeout_secs: 10,
            templates_dir: String::new(),
        }
    }
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.twilio.com".to_owned(),
            account_sid: String::new(),
            auth_token: Secret::default(),
            from: String::new(),
            timeout_secs: 10,
        }
    }
}

impl Default for JwtLoginConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: "HS256".to_owned(),
            secret: Secret::default(),
            public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            subject_claim: "sub".to_owned(),
            create_users: false,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1024 * 1024,
            recent_changes: 20_000,
            body_timeout_secs: 60,
            connections_per_ip: 256,
            max_initial_state: 100,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".to_owned() }
    }
}

/// A configuration that cannot be used, with the key at fault and what is allowed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Toml { path: PathBuf, source: toml::de::Error },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.into() }
}

/// Where the database lives, once the configuration has been resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

impl Config {
    /// Reads the file (if any), applies the process environment and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests use this).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Toml { path: path.to_owned(), source })?
            }
            None => toml::Table::new(),
        };
        apply_env(&mut table, env)?;
        Self::from_table(table)
    }

    /// Deserialises and validates a TOML table.
    pub fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            invalid(&key, message.trim_end_matches('\n'))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        ServerName::parse(&self.server_name).map_err(|e| {
            invalid("server_name", format!("{e}; allowed: a host name or IP, optionally with :port"))
        })?;
        self.client_listen_addr()?;
        self.database_kind()?;
        if !(self.redis.url.is_empty()
            || self.redis.url.starts_with("redis://")
            || self.redis.url.starts_with("rediss://"))
        {
            return Err(invalid(
                "redis.url",
                "must be empty (embedded queue) or start with redis:// or rediss://",
            ));
        }
        let url = &self.public_baseurl;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("public_baseurl", "must be empty or an http:// or https:// URL"));
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be at least 1"));
        }
        if self.auth.access_token_lifetime_secs < 10 {
            return Err(invalid("auth.access_token_lifetime_secs", "must be at least 10"));
        }
        if !self.auth.token_secret.0.is_empty() && self.auth.token_secret.0.len() < 32 {
            return Err(invalid("auth.token_secret", "must be empty (generated) or at least 32 characters"));
        }
        let rl = &self.rate_limits;
        if [
            rl.login_per_second,
            rl.register_per_second,
            rl.code_per_address_per_second,
            rl.code_per_ip_per_second,
            rl.password_failures_per_account_per_second,
            rl.password_failures_per_ip_per_second,
            rl.events_per_second,
            rl.federation_requests_per_second,
        ]
        .iter()
        .any(|rate| *rate <= 0.0)
        {
            return Err(invalid(
                "rate_limits",
                "rates must be greater than 0 (use enabled = false to turn limits off)",
            ));
        }
        if [
            rl.login_burst,
            rl.register_burst,
            rl.code_per_address_burst,
            rl.code_per_ip_burst,
            rl.password_failures_per_account_burst,
            rl.password_failures_per_ip_burst,
            rl.events_burst,
            rl.federation_requests_burst,
        ]
        .contains(&0)
        {
            return Err(invalid("rate_limits", "bursts must be at least 1"));
        }
        if self.limits.max_request_bytes < 1024 {
            return Err(invalid("limits.max_request_bytes", "must be at least 1024"));
        }
        let supported = federation::pdu::SUPPORTED_ROOM_VERSIONS;
        if !supported.iter().any(|v| v.as_str() == self.rooms.default_version) {
            let list: Vec<&str> = supported.iter().map(|v| v.as_str()).collect();
            return Err(invalid("rooms.default_version", format!("allowed: {}", list.join(", "))));
        }
        self.validate_threepids()?;
        self.validate_recaptcha()?;
        self.validate_federation()?;
        self.validate_jwt_login()?;
        if !self.turn.uris.is_empty() && self.turn.shared_secret.is_empty() {
            return Err(invalid("turn.shared_secret", "needed when turn.uris is set"));
        }
        if !(1..=30).contains(&self.appservices.transaction_timeout_secs) {
            return Err(invalid("appservices.transaction_timeout_secs", "must be 1 to 30"));
        }
        if self.push.max_attempts == 0 {
            return Err(invalid("push.max_attempts", "must be at least 1"));
        }
        if self.push.initial_backoff_ms == 0 || self.push.max_backoff_secs == 0 {
            return Err(invalid("push", "initial_backoff_ms and max_backoff_secs must be at least 1"));
        }
        if self.push.request_timeout_secs == 0 || self.push.retention_days == 0 {
            return Err(invalid("push", "request_timeout_secs and retention_days must be at least 1"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.logging.level)
            .map_err(|e| invalid("logging.level", format!("not a tracing filter: {e}")))?;
        Ok(())
    }

    fn validate_threepids(&self) -> Result<(), ConfigError> {
        let require = self.registration.require;
        if matches!(require, RequiredThreepid::Email | RequiredThreepid::EmailOrMsisdn) && !self.sends_email()
        {
            return Err(invalid("registration.require", "needs email: set email.smtp_host"));
        }
        if matches!(require, RequiredThreepid::Msisdn | RequiredThreepid::EmailOrMsisdn) && !self.sends_sms()
        {
            return Err(invalid("registration.require", "needs SMS: set sms.account_sid"));
        }
        if self.sends_email() {
            self.email.from.parse::<lettre::message::Mailbox>().map_err(|e| {
                invalid("email.from", format!("not a mailbox (`Name <a@b.c>` or `a@b.c`): {e}"))
            })?;
        }
        if self.sends_sms() {
            if !(self.sms.base_url.starts_with("https://") || self.sms.base_url.starts_with("http://")) {
                return Err(invalid("sms.base_url", "must be an http:// or https:// URL"));
            }
            if self.sms.auth_token.is_empty() || self.sms.from.is_empty() {
                return Err(invalid("sms", "account_sid, auth_token and from must all be set"));
            }
        }
        for code in &self.registration.allowed_phone_countries {
            if code.is_empty() || code.len() > 3 || !code.chars().all(|c| c.is_ascii_digit()) {
                return Err(invalid(
                    "registration.allowed_phone_countries",
                    format!("`{code}` is not a country calling code (1 to 3 digits, like \"44\")"),
                ));
            }
        }
        if self.threepid.code_lifetime_secs == 0 {
            return Err(invalid("threepid.code_lifetime_secs", "must be at least 1"));
        }
        if self.threepid.max_attempts == 0 {
            return Err(invalid("threepid.max_attempts", "must be at least 1"));
        }
        Ok(())
    }

    fn validate_federation(&self) -> Result<(), ConfigError> {
        self.federation_listen_addr()?;
        if self.tls.certificate.is_empty() != self.tls.private_key.is_empty() {
            return Err(invalid("tls", "certificate and private_key must be set together"));
        }
        if !(1..=300).contains(&self.federation.request_timeout_secs) {
            return Err(invalid("federation.request_timeout_secs", "must be from 1 to 300"));
        }
        let is_key = |key_id: &str, public_key: &str| {
            key_id.starts_with("ed25519:")
                && ruma::serde::Base64::<ruma::serde::base64::Standard>::parse(public_key)
                    .is_ok_and(|key| key.as_bytes().len() == 32)
        };
        for old in &self.federation.old_signing_keys {
            if !is_key(&old.key_id, &old.public_key) {
                return Err(invalid(
                    "federation.old_signing_keys",
                    format!("`{}` needs an ed25519:<version> id and a 32-byte base64 public key", old.key_id),
                ));
            }
        }
        if self.federation.max_backlog_pdus == 0 || self.federation.max_backlog_edus == 0 {
            return Err(invalid(
                "federation.max_backlog_pdus",
                "max_backlog_pdus and max_backlog_edus must be at least 1",
            ));
        }
        if let Some(bad) =
            self.federation.nameservers.iter().find(|server| server.parse::<std::net::SocketAddr>().is_err())
        {
            return Err(invalid("federation.nameservers", format!("`{bad}` is not an ip:port address")));
        }
        for notary in &self.federation.trusted_key_servers {
            if ruma::ServerName::parse(&notary.server_name).is_err() {
                return Err(invalid(
                    "federation.trusted_key_servers",
                    format!("`{}` is not a server name", notary.server_name),
                ));
            }
            if let Some((key_id, _)) = notary.verify_keys.iter().find(|(id, key)| !is_key(id, key)) {
                return Err(invalid(
                    "federation.trusted_key_servers",
                    format!(
                        "`{key_id}` of {} needs an ed25519:<version> id and a 32-byte base64 public key",
                        notary.server_name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_recaptcha(&self) -> Result<(), ConfigError> {
        let captcha = &self.registration.recaptcha;
        if captcha.public_key.is_empty() {
            return Ok(());
        }
        if captcha.private_key.is_empty() {
            return Err(invalid("registration.recaptcha.private_key", "must be set with public_key"));
        }
        if !(captcha.siteverify_url.starts_with("https://") || captcha.siteverify_url.starts_with("http://"))
        {
            return Err(invalid(
                "registration.recaptcha.siteverify_url",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }

    fn validate_jwt_login(&self) -> Result<(), ConfigError> {
        let jwt = &self.jwt_login;
        if !jwt.enabled {
            return Ok(());
        }
        let algorithm: jsonwebtoken::Algorithm = jwt.algorithm.parse().map_err(|_| {
            invalid(
                "jwt_login.algorithm",
                "one of HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, EdDSA",
            )
        })?;
        let symmetric = matches!(
            algorithm,
            jsonwebtoken::Algorithm::HS256 | jsonwebtoken::Algorithm::HS384 | jsonwebtoken::Algorithm::HS512
        );
        if symmetric && jwt.secret.0.len() < 32 {
            return Err(invalid(
                "jwt_login.secret",
                "the HS algorithms need a secret of at least 32 characters",
            ));
        }
        if !symmetric && jwt.public_key_file.is_empty() {
            return Err(invalid("jwt_login.public_key_file", "needed for the RS, ES and EdDSA algorithms"));
        }
        if jwt.subject_claim.is_empty() {
            return Err(invalid("jwt_login.subject_claim", "must name a claim"));
        }
        Ok(())
    }

    /// Whether email delivery is configured.
    pub fn sends_email(&self) -> bool {
        !self.email.smtp_host.is_empty()
    }

    /// Whether SMS delivery is configured.
    pub fn sends_sms(&self) -> bool {
        !self.sms.account_sid.is_empty()
    }

    /// Where the server's signing key is: `signing_key_file`, or `<data_dir>/signing.key`.
    pub fn signing_key_path(&self) -> std::path::PathBuf {
        if self.signing_key_file.is_empty() {
            self.data_dir.join("signing.key")
        } else {
            std::path::PathBuf::from(&self.signing_key_file)
        }
    }

    /// Whether this server federates: enabled, with a federation listener.
    pub fn federates(&self) -> bool {
        self.federation.enabled && !self.listen.federation.is_empty()
    }

    /// Whether the client listener serves the federation API too (`listen.federation` is its
    /// address).
    pub fn federation_on_client_listener(&self) -> bool {
        self.federates() && self.listen.federation == self.listen.client
    }

    /// The federation listener's address, when the server federates on a listener of its own.
    pub fn federation_listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if !self.federates() || self.federation_on_client_listener() {
            return Ok(None);
        }
        self.listen.federation.parse().map(Some).map_err(|_| {
            invalid("listen.federation", format!("`{}` is not an IP:port address", self.listen.federation))
        })
    }

    pub fn client_listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.client.parse().map_err(|_| {
            invalid("listen.client", format!("`{}` is not an IP:port address", self.listen.client))
        })
    }

    pub fn database_kind(&self) -> Result<DatabaseKind, ConfigError> {
        let url = &self.database.url;
        if url.is_empty() || url.starts_with("sqlite:") {
            Ok(DatabaseKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DatabaseKind::Postgres)
        } else {
            Err(invalid("database.url", "must be empty (SQLite in data_dir), sqlite://… or postgres://…"))
        }
    }

    /// The database URL with the embedded default filled in.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!("sqlite://{}?mode=rwc", self.data_dir.join("hearth.db").display())
        } else {
            self.database.url.clone()
        }
    }

    /// Whether this is the zero-setup development shape (embedded database and queue).
    pub fn is_embedded(&self) -> bool {
        self.database.url.is_empty() && self.redis.url.is_empty()
    }

    /// The base URL clients are told to use.
    pub fn base_url(&self) -> String {
        if self.public_baseurl.is_empty() {
            format!("http://{}", self.listen.client)
        } else {
            self.public_baseurl.trim_end_matches('/').to_owned()
        }
    }
}

/// Applies `HEARTH_*` variables to the TOML table, typed by the key's default value.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let defaults = toml::Table::try_from(Config::default()).map_err(|e| invalid("", e.to_string()))?;
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("HEARTH_") && !RESERVED_ENV.contains(&k.as_str()))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var["HEARTH_".len()..].split("__").map(str::to_ascii_lowercase).collect();
        let env_err = |message: String| ConfigError::Env { var: var.clone(), message };
        let (last, sections) = path.split_last().ok_or_else(|| env_err("empty key".to_owned()))?;
        let mut default_table = &defaults;
        let mut target = &mut *table;
        for section in sections {
            default_table = default_table
                .get(section)
                .and_then(toml::Value::as_table)
                .ok_or_else(|| env_err(format!("there is no config section `{section}`")))?;
            target = target
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| env_err(format!("`{section}` is not a section")))?;
        }
        let default = default_table
            .get(last)
            .ok_or_else(|| env_err(format!("there is no config key `{}`", path.join("."))))?;
        let value = typed_value(default, &raw).map_err(env_err)?;
        target.insert(last.clone(), value);
    }
    Ok(())
}

fn typed_value(default: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    Ok(match default {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(format!("`{raw}` is not a boolean (true/false)")),
        }),
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| format!("`{raw}` is not an integer"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| format!("`{raw}` is not a number"))?)
        }
        toml::Value::Table(_) => return Err("names a section, not a key".to_owned()),
        other => {
            let wrapped = format!("v = {raw}");
            let mut parsed: toml::Table =
                wrapped.parse().map_err(|e| format!("not a valid TOML {}: {e}", other.type_str()))?;
            parsed.remove("v").ok_or("missing value")?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_are_the_development_server() {
        let config = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(config.server_name, "localhost");
        assert_eq!(config.listen.client, "127.0.0.1:8008");
        assert_eq!(config.database_kind().unwrap(), DatabaseKind::Sqlite);
        assert!(config.database_url().contains("hearth-data"));
        assert!(config.is_embedded());
        assert_eq!(config.registration.mode, RegistrationMode::Open);
    }

    #[test]
    fn env_overrides_are_typed() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("HEARTH_SERVER_NAME", "example.org"),
                ("HEARTH_LISTEN__CLIENT", "127.0.0.1:9000"),
                ("HEARTH_RATE_LIMITS__ENABLED", "false"),
                ("HEARTH_DATABASE__URL", "postgres://u@127.0.0.1/db"),
                ("HEARTH_REDIS__URL", "redis://127.0.0.1:6379"),
                ("HEARTH_DATABASE__MAX_CONNECTIONS", "4"),
                ("HEARTH_DATA_DIR", "/tmp/x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.server_name, "example.org");
        assert_eq!(config.client_listen_addr().unwrap().port(), 9000);
        assert!(!config.rate_limits.enabled);
        assert_eq!(config.database_kind().unwrap(), DatabaseKind::Postgres);
        assert_eq!(config.database.max_connections, 4);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
        assert!(!config.is_embedded());
    }

    /// The overrides operators' scripts rely on for one-time codes.
    #[test]
    fn delivery_overrides() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("HEARTH_EMAIL__SMTP_HOST", "smtp.example.org"),
                ("HEARTH_EMAIL__SMTP_PORT", "465"),
                ("HEARTH_EMAIL__SMTP_TLS", "tls"),
                ("HEARTH_EMAIL__FROM", "Chat <chat@example.org>"),
                ("HEARTH_SMS__BASE_URL", "http://127.0.0.1:9999"),
                ("HEARTH_SMS__ACCOUNT_SID", "AC123"),
                ("HEARTH_SMS__AUTH_TOKEN", "token"),
                ("HEARTH_SMS__FROM", "+15005550006"),
                ("HEARTH_REGISTRATION__REQUIRE", "email_or_msisdn"),
            ]),
        )
        .unwrap();
        assert_eq!((config.email.smtp_host.as_str(), config.email.smtp_port), ("smtp.example.org", 465));
        assert_eq!(config.email.smtp_tls, SmtpTls::Tls);
        assert_eq!(config.sms.base_url, "http://127.0.0.1:9999");
        assert_eq!(config.sms.auth_token.expose(), "token");
        assert_eq!(config.registration.require, RequiredThreepid::EmailOrMsisdn);
        assert!(!format!("{config:?}").contains("\"token\""), "secrets stay out of Debug");
        let err = Config::load_with_env(None, env(&[("HEARTH_REGISTRATION__REQUIRE", "email")])).unwrap_err();
        assert!(err.to_string().contains("email.smtp_host"), "{err}");
        let err = Config::load_with_env(None, env(&[("HEARTH_EMAIL__SMTP_TLS", "ssl")])).unwrap_err();
        assert!(err.to_string().contains("email.smtp_tls"), "{err}");
    }

    #[test]
    fn an_appservice_transaction_timeout_outside_1_to_30_seconds_is_refused() {
        for bad in ["0", "31"] {
            let err =
                Config::load_with_env(None, env(&[("HEARTH_APPSERVICES__TRANSACTION_TIMEOUT_SECS", bad)]))
                    .unwrap_err();
            assert!(err.to_string().contains("appservices.transaction_timeout_secs"), "{bad}: {err}");
        }
        let config =
            Config::load_with_env(None, env(&[("HEARTH_APPSERVICES__TRANSACTION_TIMEOUT_SECS", "3")]))
                .unwrap();
        assert_eq!(config.appservices.transaction_timeout_secs, 3);
        assert_eq!(Config::default().appservices.transaction_timeout_secs, 30);
    }

    #[test]
    fn a_captcha_needs_both_keys_and_a_web_url_and_hides_its_secret() {
        let public = ("HEARTH_REGISTRATION__RECAPTCHA__PUBLIC_KEY", "site");
        let err = Config::load_with_env(None, env(&[public])).unwrap_err();
        assert!(err.to_string().contains("registration.recaptcha.private_key"), "{err}");
        let secret = ("HEARTH_REGISTRATION__RECAPTCHA__PRIVATE_KEY", "very-secret-key");
        let bad_url = ("HEARTH_REGISTRATION__RECAPTCHA__SITEVERIFY_URL", "ftp://x");
        let err = Config::load_with_env(None, env(&[public, secret, bad_url])).unwrap_err();
        assert!(err.to_string().contains("registration.recaptcha.siteverify_url"), "{err}");
        let config = Config::load_with_env(None, env(&[public, secret])).unwrap();
        assert!(config.registration.recaptcha.required);
        assert!(!format!("{config:?}").contains("very-secret-key"));
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load_with_env(None, env(&[("HEARTH_RATE_LIMITS__ENABLED", "maybe")])).unwrap_err();
        assert!(err.to_string().contains("HEARTH_RATE_LIMITS__ENABLED"), "{err}");
        let err = Config::load_with_env(None, env(&[("HEARTH_NO_SUCH_KEY", "1")])).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
        let err =
            Config::load_with_env(None, env(&[("HEARTH_REGISTRATION__MODE", "sometimes")])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("registration.mode") && text.contains("open"), "{text}");
        let err = Config::load_with_env(None, env(&[("HEARTH_DATABASE__URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
        let err = Config::load_with_env(None, env(&[("HEARTH_SERVER_NAME", "bad name!")])).unwrap_err();
        assert!(err.to_string().contains("server_name"), "{err}");
        let err = Config::load_with_env(None, env(&[("HEARTH_LISTEN__CLIENT", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("listen.client"), "{err}");
    }

    #[test]
    fn debug_hides_the_token_secret() {
        let config =
            Config::load_with_env(None, env(&[("HEARTH_AUTH__TOKEN_SECRET", &"s".repeat(40))])).unwrap();
        assert!(!format!("{config:?}").contains(&"s".repeat(40)));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let table: toml::Table = "[listen]\nclinet = \"127.0.0.1:1\"\n".parse().unwrap();
        let err = Config::from_table(table).unwrap_err().to_string();
        assert!(err.contains("clinet") && err.contains("listen"), "{err}");
    }

    /// The example documents every key the struct has, with valid values, and nothing else.
    #[test]
    fn example_matches_the_struct() {
        let example: toml::Table = EXAMPLE.parse().unwrap();
        Config::from_table(example.clone()).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
            for (k, v) in table {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::Table(t) => keys(&name, t, out),
                    _ => out.push(name),
                }
            }
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        keys("", &example, &mut a);
        keys("", &defaults, &mut b);
        a.sort();
        b.sort();
        assert_eq!(a, b, "config/hearth.example.toml and Config have different keys");
    }
}
