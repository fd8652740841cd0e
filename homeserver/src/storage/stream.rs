//! Stream positions with several writers: the hard point of `architecture.md`.
//!
//! `/sync` tokens are positions in one global stream. Writers (server processes) take positions
//! one at a time from a shared counter, and their transactions may commit in any order: position
//! 101 can be visible while 100 is still being written. A reader that answered "up to 101" would
//! then never see 100. So:
//!
//! - each writer publishes, in `stream_writers`, the lowest position it may still commit
//!   (`lowest_unfinished`), *before* it can hold any position at or above it;
//! - a reader's safe position ([`read_positions`]) is the counter, capped just below the lowest
//!   `lowest_unfinished` of every live writer. Everything at or below it has committed or will
//!   never exist.
//!
//! A writer with nothing in flight publishes "nothing in flight". Publishing advances is lazy — a
//! background task coalesces them — which is always safe: a published bound lower than the truth
//! only makes readers wait a few milliseconds longer. This is the design of Synapse's
//! multi-writer id generator, reduced to one stream.
//!
//! Positions are never handed out in blocks: a worker holding a block would give a later write a
//! lower position than an earlier one written elsewhere, and a room's events would be read out of
//! the order they were sent. A room event takes its position while its room is locked
//! ([`StreamWriter::allocate_in`]), so within a room stream order is the order of the room's graph
//! whatever worker wrote each event. On Postgres the counter is bumped on a connection of the
//! writer's own, outside the room's transaction (which would otherwise hold the counter's row lock
//! until it commits, one room write at a time for the whole deployment); on SQLite, where one
//! transaction writes at a time anyway, inside it, so the position appears with its event.
//!
//! A writer that dies mid-write must stop holding readers back, quickly, without readers ever
//! passing a position a live writer may still commit ([`Liveness`]):
//! - **SQLite**: every writer is a process on this host holding an exclusive lock on a file of
//!   its own beside the database. The kernel releases it when the process dies, so readers know
//!   a dead writer at once.
//! - **Postgres**: a lease. A busy writer renews its heartbeat twice a second, stamped with the
//!   *database's* clock (no two hosts' clocks are compared); a writer silent for [`LEASE_MS`] is
//!   dead. A writer that has not renewed for [`FENCE`] — frozen, cut off from the database —
//!   refuses to commit what it holds ([`PositionGuard::still_leased`]), so when readers give up
//!   on it, nothing of it can still appear below them. A restarted worker releases the rows of its
//!   previous run at once: same instance name, and no database session left with that run's tag
//!   (`application_name`, which dies with the connection).

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{AnyPool, Row};
use tokio::sync::Notify;

use super::{Backend, SqlStore, StoreError, StoreResult, now_ms};

/// Connections of a Postgres writer's own pool: allocations run on them while room transactions
/// hold the server's pool, which they could otherwise exhaust.
const WRITER_CONNECTIONS: u32 = 4;
/// A Postgres writer whose heartbeat (by the database's clock) is older than this is dead.
pub const LEASE_MS: i64 = 4_000;
/// A Postgres writer that has not renewed its lease for this long commits nothing more: half
/// the lease, leaving the other half for a commit that passed the check to land.
const FENCE: Duration = Duration::from_millis(2_000);
/// A busy writer renews its heartbeat at least this often.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// Shortest pause between two publications of a writer's bound.
const PUBLISH_PAUSE: Duration = Duration::from_millis(2);
/// Idle rows of writers gone this long are deleted when a writer starts.
const FORGET_IDLE_MS: i64 = 300_000;

/// The database's clock in milliseconds, on Postgres.
pub(super) const PG_NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// How readers tell a live writer from a dead one (see the module documentation).
#[derive(Debug, Clone)]
pub enum Liveness {
    /// SQLite: lock files in this directory, one per writer.
    LockFiles(PathBuf),
    /// Postgres: the heartbeat lease; `tag` is this process's `application_name`.
    Lease { tag: String },
}

#[derive(Debug, Default)]
struct WriterState {
    /// Positions handed out and not yet finished, with the lease generation they were handed
    /// out in and whether they are doomed (refused by [`PositionGuard::still_leased`], so their
    /// transaction will not commit).
    unfinished: BTreeMap<i64, (u64, bool)>,
    /// Allocations under way, by id: the lowest position each can get (the counter as last seen,
    /// plus one: the counter only grows).
    allocating: BTreeMap<u64, i64>,
    next_allocation: u64,
    /// What `stream_writers` says now.
    published: Option<i64>,
    /// Bumped when the writer lost its lease: positions of earlier generations never commit.
    generation: u64,
    /// When the writer's row was last written successfully (its lease renewed).
    renewed: Option<Instant>,
    stopped: bool,
}

impl WriterState {
    /// The lowest position this writer may still commit; `None` when idle.
    fn bound(&self) -> Option<i64> {
        let held = self.unfinished.iter().find(|(_, (_, doomed))| !doomed).map(|(p, _)| *p);
        let allocating = self.allocating.values().min().copied();
        match (held, allocating) {
            (Some(held), Some(allocating)) => Some(held.min(allocating)),
            (held, allocating) => held.or(allocating),
        }
    }

    fn lease_lapsed(&self, liveness: &Liveness) -> bool {
        matches!(liveness, Liveness::Lease { .. }) && self.renewed.is_none_or(|at| at.elapsed() > FENCE)
    }
}

/// One process's handle on the stream.
#[derive(Debug)]
pub struct StreamWriter {
    /// Postgres: a small pool of the writer's own; SQLite: the server's.
    pool: AnyPool,
    backend: Backend,
    /// The highest counter value this process has seen: every position taken later is above it.
    counter_seen: Arc<AtomicI64>,
    writer_id: String,
    /// The worker this writer belongs to, across restarts.
    instance: String,
    liveness: Liveness,
    /// The exclusive lock that says this writer lives (SQLite), held until the process ends.
    _lock: Option<File>,
    /// Serialises every write to this writer's `stream_writers` row with block reservation, so a
    /// stale publication can never land after a fresher one.
    publish_lock: tokio::sync::Mutex<()>,
    state: Mutex<WriterState>,
    dirty: Notify,
}

/// A position held by a writer until the transaction that uses it has committed or failed.
/// Dropping it finishes it.
#[derive(Debug)]
pub struct PositionGuard {
    pub position: i64,
    generation: u64,
    writer: Arc<StreamWriter>,
    /// Whether the writer holds readers back for it; not when the position was taken inside the
    /// transaction that writes at it (SQLite), which makes both visible at once.
    tracked: bool,
}

impl Drop for PositionGuard {
    fn drop(&mut self) {
        if self.tracked {
            self.writer.finish(self.position);
        }
    }
}

impl PositionGuard {
    /// Checks, just before the write at this position commits, that the writer still holds its
    /// lease; if not, the position is doomed and the caller must not commit (`503`, retry).
    pub fn still_leased(&self) -> StoreResult<()> {
        if !self.tracked {
            return Ok(());
        }
        let mut state = self.writer.lock();
        if state.generation == self.generation && !state.lease_lapsed(&self.writer.liveness) {
            return Ok(());
        }
        if state.generation == self.generation {
            // Lapsed: later positions come from a fresh registration.
            state.generation += 1;
        }
        if let Some(entry) = state.unfinished.get_mut(&self.position) {
            entry.1 = true;
        }
        self.writer.dirty.notify_one();
        Err(StoreError::Unavailable("the stream writer lost its lease on the database".into()))
    }
}

fn lock_file(dir: &Path, writer_id: &str) -> PathBuf {
    dir.join(format!("{writer_id}.lock"))
}

/// Whether the writer owning `path`'s lock is alive: it holds the lock. A missing file means a
/// writer that is gone (files are made before their rows).
fn lock_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    matches!(file.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

impl StreamWriter {
    /// Registers a writer and starts its publisher task. `instance` names this worker across
    /// restarts (Postgres: its previous run's rows are released at once).
    pub async fn start(store: &SqlStore, instance: &str) -> StoreResult<Arc<Self>> {
        let writer_id = crate::auth::tokens::random_token(12);
        let liveness = store.liveness();
        let mut lock = None;
        match &liveness {
            Liveness::LockFiles(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", dir.display())))?;
                let path = lock_file(dir, &writer_id);
                let file = File::create(&path)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
                file.lock().map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
                lock = Some(file);
                // Rows of writers that are gone: their locks are free.
                let rows =
                    sqlx::query("SELECT writer_id FROM stream_writers").fetch_all(store.pool()).await?;
                for row in rows {
                    let id: String = row.try_get("writer_id")?;
                    let path = lock_file(dir, &id);
                    if id != writer_id && !lock_held(&path) {
                        sqlx::query("DELETE FROM stream_writers WHERE writer_id = $1")
                            .bind(&id)
                            .execute(store.pool())
                            .await?;
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
            Liveness::Lease { .. } => {
                // This worker's previous run, if its sessions are gone, is dead: release it now
                // instead of after its lease.
                let released = sqlx::query(
                    "DELETE FROM stream_writers WHERE instance = $1 AND (tag IS NULL OR NOT EXISTS
                         (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = stream_writers.tag))",
                )
                .bind(instance)
                .execute(store.pool())
                .await?;
                if released.rows_affected() > 0 {
                    tracing::info!(
                        rows = released.rows_affected(),
                        "released the stream rows of this worker's previous run"
                    );
                }
            }
        }
        // Rows of writers long gone and idle are clutter; rows of busy ones are ignored anyway.
        sqlx::query("DELETE FROM stream_writers WHERE lowest_unfinished IS NULL AND heartbeat_ts < $1")
            .bind(now_ms() - FORGET_IDLE_MS)
            .execute(store.pool())
            .await?;
        let pool = match store.backend() {
            Backend::Postgres => store.side_pool(WRITER_CONNECTIONS).await?,
            Backend::Sqlite => store.pool().clone(),
        };
        let writer = Arc::new(Self {
            pool,
            backend: store.backend(),
            counter_seen: store.counter_seen(),
            writer_id,
            instance: instance.to_owned(),
            liveness,
            _lock: lock,
            publish_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(WriterState::default()),
            dirty: Notify::new(),
        });
        writer.insert_row().await?;
        tokio::spawn(publisher(Arc::downgrade(&writer)));
        Ok(writer)
    }

    /// Adds this writer's row, idle: at start, and again should it have been deleted.
    async fn insert_row(&self) -> StoreResult<()> {
        let tag = match &self.liveness {
            Liveness::Lease { tag } => Some(tag.as_str()),
            Liveness::LockFiles(_) => None,
        };
        sqlx::query(
            "INSERT INTO stream_writers (writer_id, lowest_unfinished, heartbeat_ts, instance, tag)
             VALUES ($1, NULL, $2, $3, $4) ON CONFLICT (writer_id) DO NOTHING",
        )
        .bind(&self.writer_id)
        .bind(now_ms())
        .bind(&self.instance)
        .bind(tag)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A statement on this writer's row (`$1`, with `$2` the bound) that stamps `{now}`: the
    /// database's clock on Postgres, where writers are on several hosts, this host's on SQLite.
    fn row_update(
        &self,
        statement: &'static str,
        bound: Option<i64>,
    ) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
        let now = match self.backend {
            Backend::Postgres => PG_NOW_MS,
            Backend::Sqlite => "$3",
        };
        let query = sqlx::query(sqlx::AssertSqlSafe(statement.replace("{now}", now)))
            .bind(self.writer_id.clone())
            .bind(bound);
        match self.backend {
            Backend::Postgres => query,
            Backend::Sqlite => query.bind(now_ms()),
        }
    }

    /// Takes the next position from the shared counter, for writes that commit as they go (not
    /// room events: see [`StreamWriter::allocate_in`]). Hold the guard until they are over.
    pub async fn allocate(self: &Arc<Self>) -> StoreResult<PositionGuard> {
        let (id, generation) = match self.start_allocation() {
            Some(started) => started,
            None => {
                let _publishing = self.publish_lock.lock().await;
                match self.start_allocation() {
                    Some(started) => started,
                    None => self.register().await?,
                }
            }
        };
        let taken =
            sqlx::query("UPDATE stream_counter SET position = position + 1 WHERE id = 1 RETURNING position")
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::from)
                .and_then(|row| Ok(row.try_get::<i64, _>("position")?));
        let mut state = self.lock();
        state.allocating.remove(&id);
        let position = match taken {
            Ok(position) => position,
            Err(error) => {
                drop(state);
                self.dirty.notify_one();
                return Err(error);
            }
        };
        self.counter_seen.fetch_max(position, Ordering::AcqRel);
        state.unfinished.insert(position, (generation, false));
        Ok(PositionGuard { position, generation, writer: self.clone(), tracked: true })
    }

    /// Takes the next position for a room event, inside the transaction that holds its room
    /// locked: events of one room get positions in the order they are written, on any worker.
    pub async fn allocate_in(
        self: &Arc<Self>,
        transaction: &mut sqlx::AnyConnection,
    ) -> StoreResult<PositionGuard> {
        match self.backend {
            // Outside the transaction (see the module documentation); the room stays locked.
            Backend::Postgres => self.allocate().await,
            Backend::Sqlite => {
                let row = sqlx::query(
                    "UPDATE stream_counter SET position = position + 1 WHERE id = 1 RETURNING position",
                )
                .fetch_one(transaction)
                .await?;
                let position: i64 = row.try_get("position")?;
                Ok(PositionGuard { position, generation: 0, writer: self.clone(), tracked: false })
            }
        }
    }

    /// Starts an allocation without I/O when this writer is busy (its published bound is at or
    /// below anything it can take next) and leased; `None` when it must register first.
    fn start_allocation(&self) -> Option<(u64, u64)> {
        let mut state = self.lock();
        if state.bound().is_none() || state.lease_lapsed(&self.liveness) {
            return None;
        }
        Some(self.add_allocation(&mut state))
    }

    fn add_allocation(&self, state: &mut WriterState) -> (u64, u64) {
        let id = state.next_allocation;
        state.next_allocation += 1;
        state.allocating.insert(id, self.counter_seen.load(Ordering::Acquire) + 1);
        (id, state.generation)
    }

    /// Going from idle to busy (or renewing a lapsed lease): says so in this writer's row before
    /// holding anything, then starts an allocation. Every position taken from here on is above
    /// the counter read in this statement. Called with `publish_lock` held.
    async fn register(&self) -> StoreResult<(u64, u64)> {
        let held = {
            let mut state = self.lock();
            if state.lease_lapsed(&self.liveness) {
                // What this writer holds is doomed (see `PositionGuard::still_leased`).
                state.generation += 1;
            }
            state.bound()
        };
        let register = || {
            self.row_update(
                "UPDATE stream_writers SET heartbeat_ts = {now},
                     lowest_unfinished = COALESCE($2, (SELECT position + 1 FROM stream_counter WHERE id = 1))
                 WHERE writer_id = $1
                 RETURNING lowest_unfinished, (SELECT position FROM stream_counter WHERE id = 1) AS counter",
                held,
            )
            .fetch_optional(&self.pool)
        };
        let row = match register().await? {
            Some(row) => row,
            None => {
                // The row was deleted (by an operator, or as a dead writer's): add it again.
                self.insert_row().await?;
                register()
                    .await?
                    .ok_or_else(|| StoreError::Unavailable("this stream writer's row is gone".into()))?
            }
        };
        let bound = row.try_get::<i64, _>("lowest_unfinished")?;
        self.counter_seen.fetch_max(row.try_get::<i64, _>("counter")?, Ordering::AcqRel);
        let mut state = self.lock();
        state.published = Some(bound);
        state.renewed = Some(Instant::now());
        Ok(self.add_allocation(&mut state))
    }

    fn finish(&self, position: i64) {
        let mut state = self.lock();
        state.unfinished.remove(&position);
        if state.bound() != state.published {
            self.dirty.notify_one();
        }
    }

    /// Writes this writer's current bound (and heartbeat) if it changed or `force`.
    async fn publish(&self, force: bool) -> StoreResult<()> {
        let _publishing = self.publish_lock.lock().await;
        let bound = {
            let state = self.lock();
            if state.bound() == state.published && !force {
                return Ok(());
            }
            state.bound()
        };
        let started = Instant::now();
        let updated = self
            .row_update(
                "UPDATE stream_writers SET lowest_unfinished = $2, heartbeat_ts = {now} WHERE writer_id = $1",
                bound,
            )
            .execute(&self.pool)
            .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::Unavailable("this stream writer's row is gone".into()));
        }
        let mut state = self.lock();
        state.published = bound;
        // The lease runs from when the renewal was sent, not when it was answered.
        state.renewed = Some(started);
        Ok(())
    }

    /// Publishes this writer's bound now if it moved: after a write, so that the writer's own
    /// clients read what they just wrote. Concurrent callers coalesce into one write.
    pub async fn flush(&self) -> StoreResult<()> {
        self.publish(false).await
    }

    /// Publishes what is left and removes this writer's row (graceful shutdown).
    pub async fn stop(&self) -> StoreResult<()> {
        self.lock().stopped = true;
        self.dirty.notify_one();
        let _publishing = self.publish_lock.lock().await;
        if self.lock().bound().is_none() {
            // On a connection of its own: the pool's were opened on the server's worker threads,
            // whose runtimes are gone by now, and a query on one of them fails.
            let mut connection = sqlx::ConnectOptions::connect(&*self.pool.connect_options()).await?;
            sqlx::query("DELETE FROM stream_writers WHERE writer_id = $1")
                .bind(&self.writer_id)
                .execute(&mut connection)
                .await?;
            let _ = sqlx::Connection::close(connection).await;
            if let Liveness::LockFiles(dir) = &self.liveness {
                let _ = std::fs::remove_file(lock_file(dir, &self.writer_id));
            }
        }
        Ok(())
    }
}

/// Publishes a writer's advances, coalesced, and keeps its heartbeat fresh while it is busy.
async fn publisher(writer: Weak<StreamWriter>) {
    loop {
        let Some(strong) = writer.upgrade() else { return };
        if strong.lock().stopped {
            return;
        }
        let busy = strong.lock().published.is_some();
        let woken = tokio::time::timeout(HEARTBEAT_EVERY, strong.dirty.notified()).await.is_ok();
        if let Err(error) = strong.publish(!woken && busy).await {
            tracing::warn!(%error, "could not publish the stream position");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(strong);
        tokio::time::sleep(PUBLISH_PAUSE).await;
    }
}

/// What a reader learns of the stream in one read ([`read_positions`]).
#[derive(Debug, Clone, Default)]
pub struct Positions {
    /// The highest position handed out: every write that has answered is at or below it.
    pub allocated: i64,
    /// The highest position below which every position has committed or never will: the most a
    /// `/sync` may return.
    pub upto: i64,
    /// Users with a session revoked or refreshed after the position the reader asked about,
    /// committed whether or not readers may pass it yet: revocation must not wait for the safe
    /// position, which a slow or dead writer holds back.
    pub session_changes: Vec<String>,
}

/// Reads the stream's [`Positions`], with the session changes after `sessions_after`.
pub async fn read_positions(
    connection: &mut sqlx::AnyConnection,
    liveness: &Liveness,
    sessions_after: i64,
) -> StoreResult<Positions> {
    match liveness {
        Liveness::Lease { .. } => {
            // One round trip: every authenticated request waits for this read.
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT position FROM stream_counter WHERE id = 1) AS allocated,
                        (SELECT MIN(lowest_unfinished) FROM stream_writers
                          WHERE lowest_unfinished IS NOT NULL AND heartbeat_ts > {PG_NOW_MS} - $1) AS low,
                        (SELECT CAST(json_agg(user_id) AS TEXT) FROM session_changes
                          WHERE stream_ordering > $2) AS sessions"
            )))
            .bind(LEASE_MS)
            .bind(sessions_after)
            .fetch_one(connection)
            .await?;
            let allocated: i64 = row.try_get("allocated")?;
            let low: Option<i64> = row.try_get("low")?;
            let sessions: Option<String> = row.try_get("sessions")?;
            Ok(Positions {
                allocated,
                upto: low.map_or(allocated, |low| allocated.min(low - 1)),
                session_changes: parse_users(sessions.as_deref())?,
            })
        }
        Liveness::LockFiles(dir) => {
            let rows = sqlx::query(
                "SELECT w.writer_id, w.lowest_unfinished, c.position AS allocated FROM stream_counter c
                 LEFT JOIN stream_writers w ON w.lowest_unfinished IS NOT NULL WHERE c.id = 1",
            )
            .fetch_all(&mut *connection)
            .await?;
            let (mut upto, mut allocated) = (i64::MAX, 0);
            for row in rows {
                allocated = row.try_get("allocated")?;
                upto = upto.min(allocated);
                let writer: Option<String> = row.try_get("writer_id")?;
                let bound: Option<i64> = row.try_get("lowest_unfinished")?;
                if let (Some(writer), Some(bound)) = (writer, bound)
                    && lock_held(&lock_file(dir, &writer))
                {
                    upto = upto.min(bound - 1);
                }
            }
            let sessions: Option<String> = sqlx::query_scalar(
                "SELECT json_group_array(user_id) FROM session_changes WHERE stream_ordering > $1",
            )
            .bind(sessions_after)
            .fetch_one(connection)
            .await?;
            Ok(Positions { allocated, upto, session_changes: parse_users(sessions.as_deref())? })
        }
    }
}

fn parse_users(json: Option<&str>) -> StoreResult<Vec<String>> {
    json.map_or(Ok(Vec::new()), |json| {
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("session changes: {e}")))
    })
}
