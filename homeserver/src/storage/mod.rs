//! Storage: one async trait per data area, implemented once over sqlx's `Any` driver for both
//! Postgres and SQLite.
//!
//! Both dialects accept `$n` placeholders, `ON CONFLICT` and `RETURNING`, so almost all SQL is
//! shared; where they differ the statement is chosen by [`Backend`] side by side in the same
//! function. Types crossing the `Any` driver are limited to integers, text and bytes: flags are
//! SMALLINT 0/1, timestamps BIGINT milliseconds, JSON is TEXT. Migrations are per backend in
//! `homeserver/migrations/{postgres,sqlite}/` and are compiled into the binary.
//!
//! The conformance suite (`tests/it/storage.rs`) runs every trait against both backends.

mod accounts;
mod appservice;
mod backup;
mod deployment;
mod devices;
pub mod keys;
mod openid;
pub mod outbox;
pub mod push;
mod registration_tokens;
mod reports;
pub mod rooms;
mod server_keys;
mod sessions;
mod state;
pub mod stream;
mod threepids;
mod uia;
mod user_data;

use std::{borrow::Cow, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use sqlx::{
    AnyPool, Executor, SqlSafeStr,
    any::AnyPoolOptions,
    migrate::{Migration, MigrationSource, MigrationType, Migrator},
};

pub use self::{
    accounts::{AccountStore, UserRecord},
    appservice::{AppserviceQueue, AppserviceStore, PendingTxn},
    backup::{BackupKey, BackupStore, BackupVersion},
    deployment::DeploymentStore,
    devices::{DeviceRecord, DeviceStore},
    keys::{ClaimedKey, Envelope, KeyConflict, KeyStore, SignedTarget},
    openid::{MAX_OPENID_TOKENS_PER_USER, OpenIdStore},
    push::{NewNotification, NotificationRecord, PushStore, PusherKey, PusherRecord, StoredUnread},
    registration_tokens::RegistrationTokenStore,
    reports::{ReportRecord, ReportStore},
    rooms::{
        AppendError, Directory, NewEvent, Outlier, Resolved, RoomHead, RoomStore, StateMap, StoredEvent,
        StreamEvent,
    },
    server_keys::{ServerKeyRecord, ServerKeyStore},
    sessions::{SessionRecord, SessionStore},
    threepids::{ThreepidRecord, ThreepidSession, ThreepidStore},
    uia::{UiaSessionRecord, UiaStore},
    user_data::{AccountDataRecord, ReceiptRecord, UserDataStore},
};

/// Ids bound in one `IN (...)` list: far below every backend's limit on parameters.
pub(super) const IN_CHUNK: usize = 500;

/// `$first, $first+1, …`: `count` numbered parameters, for an `IN (...)` list or a row of values.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count).map(|n| format!("${n}")).collect::<Vec<_>>().join(", ")
}

/// Parses JSON that Hearth stored itself, into a recursive structure, without serde_json's
/// recursion limit. Safe because stored JSON is bounded: new writes by [`crate::json::MAX_JSON_DEPTH`], and
/// those of older versions by serde_json's own limit of 128 when they were written — which an
/// event at that bound would exceed once wrapped, breaking its room for good.
pub fn parse_stored<T: serde::de::DeserializeOwned>(json: &str) -> serde_json::Result<T> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    deserializer.disable_recursion_limit();
    let value = T::deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Every data area; what the server holds as `Arc<dyn Storage>`.
pub trait Storage:
    AccountStore
    + DeviceStore
    + SessionStore
    + UiaStore
    + RegistrationTokenStore
    + ThreepidStore
    + RoomStore
    + StreamStore
    + UserDataStore
    + KeyStore
    + BackupStore
    + ReportStore
    + OpenIdStore
    + PushStore
    + AppserviceStore
    + DeploymentStore
    + ServerKeyStore
    + outbox::OutboxStore
{
}

/// Reading the stream's positions (see `stream.rs`).
#[async_trait::async_trait]
pub trait StreamStore: Send + Sync {
    /// The stream's positions, with the users whose sessions changed after `sessions_after`.
    async fn positions(&self, sessions_after: i64) -> StoreResult<stream::Positions>;

    /// The highest position every reader may go up to.
    async fn persisted_upto(&self) -> StoreResult<i64> {
        Ok(self.positions(i64::MAX).await?.upto)
    }
}

#[async_trait::async_trait]
impl StreamStore for SqlStore {
    /// Read on a connection of its own, outside the pool: every authenticated request waits for
    /// this query (shared by the requests in flight, see `rooms::recent`), and a pooled query
    /// costs a second round trip, since the pool pings each connection it takes back.
    async fn positions(&self, sessions_after: i64) -> StoreResult<stream::Positions> {
        let mut slot = self.upto_connection.lock().await;
        // Taken out while in use: a query cancelled midway (or failed) leaves the connection in
        // an unknown state, and it is dropped with this future.
        // On failure, perhaps because the database restarted, once more on a fresh connection.
        let read = match slot.take() {
            Some(mut connection) => {
                match stream::read_positions(&mut connection, &self.liveness, sessions_after).await {
                    Ok(positions) => Some((positions, connection)),
                    Err(_) => None,
                }
            }
            None => None,
        };
        let (mut positions, connection) = match read {
            Some(read) => read,
            None => {
                let mut connection = self.pool.acquire().await?.detach();
                (stream::read_positions(&mut connection, &self.liveness, sessions_after).await?, connection)
            }
        };
        *slot = Some(connection);
        let previous = self.upto_read.fetch_max(positions.upto, std::sync::atomic::Ordering::AcqRel);
        positions.upto = positions.upto.max(previous);
        self.counter_seen.fetch_max(positions.allocated, std::sync::atomic::Ordering::AcqRel);
        Ok(positions)
    }
}

impl<T> Storage for T where
    T: AccountStore
        + DeviceStore
        + SessionStore
        + UiaStore
        + RegistrationTokenStore
        + ThreepidStore
        + RoomStore
        + StreamStore
        + UserDataStore
        + KeyStore
        + BackupStore
        + ReportStore
        + OpenIdStore
        + PushStore
        + AppserviceStore
        + DeploymentStore
        + ServerKeyStore
        + outbox::OutboxStore
{
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database cannot take the write now; the client should retry.
    #[error("{0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the database was out of reach (refusing connections, restarting, the pool
    /// exhausted) rather than the request or the data being wrong.
    fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed => true,
                // Postgres shutting down, or refusing new sessions (57P01-57P03 admin shutdown,
                // crash shutdown, cannot connect now; 53300 too many connections).
                sqlx::Error::Database(db) => {
                    db.code().is_some_and(|code| code.starts_with("57P") || code == "53300")
                }
                _ => false,
            },
            _ => false,
        }
    }
}

impl From<StoreError> for crate::error::Error {
    fn from(error: StoreError) -> Self {
        if error.is_unavailable() {
            tracing::warn!(%error, "the database is unavailable");
            return Self::new(
                actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                crate::error::ErrorKind::Unknown,
                "the database is unavailable for a moment; retry the request",
            );
        }
        Self::internal(error)
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// The SQL database behind every storage trait.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    immutable: Arc<ImmutableCache>,
    /// The connection [`StreamStore::persisted_upto`] reads on.
    upto_connection: Arc<tokio::sync::Mutex<Option<sqlx::AnyConnection>>>,
    /// The highest safe position read so far: answers never go back, even when a writer that
    /// readers had given up on renews its lease (its old positions are doomed, see `stream.rs`).
    upto_read: Arc<std::sync::atomic::AtomicI64>,
    /// The highest stream counter value seen, shared with the stream writer (see `stream.rs`).
    counter_seen: Arc<std::sync::atomic::AtomicI64>,
    liveness: stream::Liveness,
}

/// Rows that never change once written, kept in memory after their first read. Safe with any
/// number of workers, since no one can make them stale.
#[derive(Debug, Default)]
struct ImmutableCache {
    /// Room id → room version.
    room_versions: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Room id → its latest state snapshot read here (snapshots are written once, by id).
    snapshots: std::sync::Mutex<std::collections::HashMap<String, state::Snapshot>>,
}

impl ImmutableCache {
    /// Entries kept per map before it is cleared.
    const CAPACITY: usize = 50_000;
}

/// Embedded migrations: (version, description, postgres SQL, sqlite SQL).
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "accounts",
        include_str!("../../migrations/postgres/0001_accounts.sql"),
        include_str!("../../migrations/sqlite/0001_accounts.sql"),
    ),
    (
        2,
        "threepids",
        include_str!("../../migrations/postgres/0002_threepids.sql"),
        include_str!("../../migrations/sqlite/0002_threepids.sql"),
    ),
    (
        3,
        "streams",
        include_str!("../../migrations/postgres/0003_streams.sql"),
        include_str!("../../migrations/sqlite/0003_streams.sql"),
    ),
    (
        4,
        "rooms",
        include_str!("../../migrations/postgres/0004_rooms.sql"),
        include_str!("../../migrations/sqlite/0004_rooms.sql"),
    ),
    (
        5,
        "user_data",
        include_str!("../../migrations/postgres/0005_user_data.sql"),
        include_str!("../../migrations/sqlite/0005_user_data.sql"),
    ),
    (
        6,
        "receipt_stream",
        include_str!("../../migrations/postgres/0006_receipt_stream.sql"),
        include_str!("../../migrations/sqlite/0006_receipt_stream.sql"),
    ),
    (
        7,
        "aliases",
        include_str!("../../migrations/postgres/0007_aliases.sql"),
        include_str!("../../migrations/sqlite/0007_aliases.sql"),
    ),
    (
        8,
        "pushers",
        include_str!("../../migrations/postgres/0008_pushers.sql"),
        include_str!("../../migrations/sqlite/0008_pushers.sql"),
    ),
    (
        9,
        "e2ee",
        include_str!("../../migrations/postgres/0009_e2ee.sql"),
        include_str!("../../migrations/sqlite/0009_e2ee.sql"),
    ),
    (
        10,
        "key backup",
        include_str!("../../migrations/postgres/0010_key_backup.sql"),
        include_str!("../../migrations/sqlite/0010_key_backup.sql"),
    ),
    (
        11,
        "cross-signing",
        include_str!("../../migrations/postgres/0011_cross_signing.sql"),
        include_str!("../../migrations/sqlite/0011_cross_signing.sql"),
    ),
    (
        12,
        "session changes",
        include_str!("../../migrations/postgres/0012_session_changes.sql"),
        include_str!("../../migrations/sqlite/0012_session_changes.sql"),
    ),
    (
        13,
        "state history",
        include_str!("../../migrations/postgres/0013_state_history.sql"),
        include_str!("../../migrations/sqlite/0013_state_history.sql"),
    ),
    (
        14,
        "writer liveness",
        include_str!("../../migrations/postgres/0014_writer_liveness.sql"),
        include_str!("../../migrations/sqlite/0014_writer_liveness.sql"),
    ),
    (
        15,
        "push",
        include_str!("../../migrations/postgres/0015_push.sql"),
        include_str!("../../migrations/sqlite/0015_push.sql"),
    ),
    (
        16,
        "features: erased accounts, reports, OpenID tokens",
        include_str!("../../migrations/postgres/0016_features.sql"),
        include_str!("../../migrations/sqlite/0016_features.sql"),
    ),
    (
        17,
        "appservices",
        include_str!("../../migrations/postgres/0017_appservices.sql"),
        include_str!("../../migrations/sqlite/0017_appservices.sql"),
    ),
    (
        18,
        "event unsigned",
        include_str!("../../migrations/postgres/0018_event_unsigned.sql"),
        include_str!("../../migrations/sqlite/0018_event_unsigned.sql"),
    ),
    (
        19,
        "guests",
        include_str!("../../migrations/postgres/0019_guests.sql"),
        include_str!("../../migrations/sqlite/0019_guests.sql"),
    ),
    (
        20,
        "uia params",
        include_str!("../../migrations/postgres/0020_uia_params.sql"),
        include_str!("../../migrations/sqlite/0020_uia_params.sql"),
    ),
    (
        21,
        "deployment identity",
        include_str!("../../migrations/postgres/0021_deployment_identity.sql"),
        include_str!("../../migrations/sqlite/0021_deployment_identity.sql"),
    ),
    (
        22,
        "appservice room lists",
        include_str!("../../migrations/postgres/0022_appservice_room_lists.sql"),
        include_str!("../../migrations/sqlite/0022_appservice_room_lists.sql"),
    ),
    (
        23,
        "own key changes",
        include_str!("../../migrations/postgres/0023_own_key_changes.sql"),
        include_str!("../../migrations/sqlite/0023_own_key_changes.sql"),
    ),
    (
        24,
        "event expiry",
        include_str!("../../migrations/postgres/0024_event_expiry.sql"),
        include_str!("../../migrations/sqlite/0024_event_expiry.sql"),
    ),
    (
        25,
        "server keys",
        include_str!("../../migrations/postgres/0025_server_keys.sql"),
        include_str!("../../migrations/sqlite/0025_server_keys.sql"),
    ),
    (
        26,
        "invite states",
        include_str!("../../migrations/postgres/0026_invite_states.sql"),
        include_str!("../../migrations/sqlite/0026_invite_states.sql"),
    ),
    (
        27,
        "outliers and backfill",
        include_str!("../../migrations/postgres/0027_outliers_and_backfill.sql"),
        include_str!("../../migrations/sqlite/0027_outliers_and_backfill.sql"),
    ),
    (
        28,
        "rejected events",
        include_str!("../../migrations/postgres/0028_rejected_events.sql"),
        include_str!("../../migrations/sqlite/0028_rejected_events.sql"),
    ),
    (
        29,
        "state deltas",
        include_str!("../../migrations/postgres/0029_state_deltas.sql"),
        include_str!("../../migrations/sqlite/0029_state_deltas.sql"),
    ),
    (
        30,
        "federation outbox",
        include_str!("../../migrations/postgres/0030_federation_outbox.sql"),
        include_str!("../../migrations/sqlite/0030_federation_outbox.sql"),
    ),
];

#[derive(Debug)]
struct EmbeddedMigrations(Backend);

impl<'s> MigrationSource<'s> for EmbeddedMigrations {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, postgres, sqlite)| {
                    let sql = if self.0 == Backend::Postgres { postgres } else { sqlite };
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        sql.into_sql_str(),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Per-user stream marks: the latest position at which something about a user changed, written
/// in the transaction that changed it and read by every worker's in-memory window.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UserMark {
    /// A device came or went, or keys changed (`device_list_changes`).
    DeviceList,
    /// A session was revoked or refreshed (`session_changes`), so memories of it are dropped.
    Sessions,
}

pub(crate) async fn mark_user(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    mark: UserMark,
    user: &str,
    position: i64,
) -> StoreResult<()> {
    let sql = match mark {
        UserMark::DeviceList => {
            "INSERT INTO device_list_changes (user_id, stream_ordering) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET stream_ordering = excluded.stream_ordering"
        }
        UserMark::Sessions => {
            "INSERT INTO session_changes (user_id, stream_ordering) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET stream_ordering = excluded.stream_ordering"
        }
    };
    sqlx::query(sql).bind(user).bind(position).execute(&mut **tx).await?;
    Ok(())
}

/// A change that concerns one user about a second thing: a device's key counts, or another
/// user's keys as only this user sees them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PairMark {
    /// `(user, device)`: the device's one-time or fallback key counts (`key_count_changes`).
    KeyCounts,
    /// `(user, changed user)`: tells the user's own devices, and no one else, that the changed
    /// user's keys changed as the user sees them (`own_key_changes`).
    OwnKeys,
}

/// Records a [`PairMark`] at `position` (the latest position per pair).
pub(crate) async fn mark_pair(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    mark: PairMark,
    user: &str,
    second: &str,
    position: i64,
) -> StoreResult<()> {
    let sql = match mark {
        PairMark::KeyCounts => {
            "INSERT INTO key_count_changes (user_id, device_id, stream_ordering) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, device_id) DO UPDATE SET stream_ordering = excluded.stream_ordering"
        }
        PairMark::OwnKeys => {
            "INSERT INTO own_key_changes (user_id, changed_user, stream_ordering) VALUES ($1, $2, $3)
             ON CONFLICT (user_id, changed_user) DO UPDATE SET stream_ordering = excluded.stream_ordering"
        }
    };
    sqlx::query(sql).bind(user).bind(second).bind(position).execute(&mut **tx).await?;
    Ok(())
}

/// How Hearth's pools connect. No ping before each use: it would double the round trips of
/// every query. A connection that died is dropped when its query fails, and idle ones are
/// recycled. SQLite gets WAL and a busy timeout so that concurrent requests wait for the writer
/// instead of failing.
fn pool_options(backend: Backend, liveness: &stream::Liveness, max_connections: u32) -> AnyPoolOptions {
    let options = AnyPoolOptions::new()
        .max_connections(max_connections)
        // A request waits this long for a connection; past it (the database is down, or every
        // connection busy), it is answered 503 and the client retries.
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .idle_timeout(Duration::from_secs(60));
    match (backend, liveness) {
        (Backend::Postgres, stream::Liveness::Lease { tag }) => {
            // Every session says which run of which process it belongs to (stream.rs releases a
            // restarted worker's rows when none of its old sessions is left); the keepalives let
            // Postgres notice a client host that vanished within seconds, not hours.
            let setup = format!(
                "SET application_name = '{tag}'; SET tcp_keepalives_idle = 2; \
                 SET tcp_keepalives_interval = 1; SET tcp_keepalives_count = 3"
            );
            options.after_connect(move |conn, _| {
                let setup = setup.clone();
                Box::pin(async move {
                    conn.execute(sqlx::AssertSqlSafe(setup)).await?;
                    Ok(())
                })
            })
        }
        _ => options.after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                Ok(())
            })
        }),
    }
}

impl SqlStore {
    /// Connects to `sqlite://…` or `postgres://…` (see [`pool_options`]).
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres") { Backend::Postgres } else { Backend::Sqlite };
        let tag = format!("hearth-{}", crate::auth::tokens::random_token(12));
        let liveness = match backend {
            Backend::Postgres => stream::Liveness::Lease { tag: tag.clone() },
            Backend::Sqlite => stream::Liveness::LockFiles(sqlite_writers_dir(url)),
        };
        let pool = pool_options(backend, &liveness, max_connections).connect(url).await?;
        Ok(Self {
            pool,
            backend,
            immutable: Arc::default(),
            upto_connection: Arc::default(),
            upto_read: Arc::default(),
            counter_seen: Arc::default(),
            liveness,
        })
    }

    /// Another pool on the same database with the same session settings, for work that must not
    /// wait for (or hold) the server's connections.
    pub async fn side_pool(&self, max_connections: u32) -> StoreResult<AnyPool> {
        let options = pool_options(self.backend, &self.liveness, max_connections);
        Ok(options.connect_with((*self.pool.connect_options()).clone()).await?)
    }

    /// A transaction. On SQLite it takes the write lock as it begins (`BEGIN IMMEDIATE`): a
    /// deferred one that reads first fails at once when it comes to write (`SQLITE_BUSY`, without
    /// waiting out the busy timeout) if another connection wrote in between, which the server's
    /// background writers (the stream writer's heartbeat, push evaluation) make happen.
    pub(crate) async fn begin(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    pub(crate) fn counter_seen(&self) -> Arc<std::sync::atomic::AtomicI64> {
        self.counter_seen.clone()
    }

    pub fn liveness(&self) -> stream::Liveness {
        self.liveness.clone()
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Brings the schema up to date. Safe to run from several workers at once (sqlx takes a lock).
    pub async fn migrate(&self) -> StoreResult<()> {
        let migrator = Migrator::new(EmbeddedMigrations(self.backend)).await?;
        migrator.run(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Where SQLite stream writers keep their lock files: beside the database file.
fn sqlite_writers_dir(url: &str) -> std::path::PathBuf {
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    let path = path.split('?').next().unwrap_or(path);
    std::path::PathBuf::from(format!("{path}.writers"))
}

/// Milliseconds since the Unix epoch, the unit of every stored timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn parse_id<T>(raw: String) -> StoreResult<T>
where
    T: TryFrom<String>,
    T::Error: std::fmt::Display,
{
    T::try_from(raw.clone()).map_err(|e| StoreError::Corrupt(format!("`{raw}`: {e}")))
}
