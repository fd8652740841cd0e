//! Stream positions with several writers: the hard point of `architecture.md`.
//!
//! `/sync` tokens are positions in one global stream. Writers (server processes) take positions
//! from a shared counter, in blocks so that allocation rarely touches the database, and their
//! transactions may commit in any order: position 101 can be visible while 100 is still being
//! written. A reader that answered "up to 101" would then never see 100. So:
//!
//! - each writer publishes, in `stream_writers`, the lowest position it may still commit
//!   (`lowest_unfinished`), *before* it can hold any position at or above it;
//! - a reader's safe position ([`persisted_upto`]) is the counter, capped just below the lowest
//!   `lowest_unfinished` of every live writer. Everything at or below it has committed or will
//!   never exist.
//!
//! A writer that goes idle drops the rest of its block and publishes "nothing in flight"; a
//! writer that crashes stops heartbeating and is ignored after [`WRITER_TIMEOUT_MS`] (its
//! unfinished transactions rolled back with it). Publishing advances is lazy — a background task
//! coalesces them — which is always safe: a published bound lower than the truth only makes
//! readers wait a few milliseconds longer. This is the design of Synapse's multi-writer id
//! generator, reduced to one stream.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use sqlx::{AnyPool, Row};
use tokio::sync::Notify;

use super::{SqlStore, StoreResult, now_ms};

/// Positions a writer reserves at once.
const BLOCK: i64 = 8;
/// A writer whose heartbeat is older than this is presumed dead.
pub const WRITER_TIMEOUT_MS: i64 = 30_000;
/// A busy writer refreshes its heartbeat at least this often.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// Shortest pause between two publications of a writer's bound.
const PUBLISH_PAUSE: Duration = Duration::from_millis(2);

#[derive(Debug, Default)]
struct WriterState {
    /// Positions handed out and not yet finished.
    unfinished: BTreeSet<i64>,
    /// Next position of the current block, and one past its end.
    next: i64,
    end: i64,
    /// What `stream_writers` says now.
    published: Option<i64>,
    stopped: bool,
}

impl WriterState {
    /// The lowest position this writer may still commit; `None` when idle.
    fn bound(&self) -> Option<i64> {
        self.unfinished.first().copied()
    }
}

/// One process's handle on the stream.
#[derive(Debug)]
pub struct StreamWriter {
    pool: AnyPool,
    writer_id: String,
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
    writer: Arc<StreamWriter>,
}

impl Drop for PositionGuard {
    fn drop(&mut self) {
        self.writer.finish(self.position);
    }
}

impl StreamWriter {
    /// Registers a writer and starts its publisher task.
    pub async fn start(store: &SqlStore) -> StoreResult<Arc<Self>> {
        let writer_id = crate::auth::tokens::random_token(12);
        sqlx::query(
            "INSERT INTO stream_writers (writer_id, lowest_unfinished, heartbeat_ts) VALUES ($1, NULL, $2)",
        )
        .bind(&writer_id)
        .bind(now_ms())
        .execute(store.pool())
        .await?;
        // Rows of writers long gone and idle are clutter; rows of busy ones are ignored anyway.
        sqlx::query("DELETE FROM stream_writers WHERE lowest_unfinished IS NULL AND heartbeat_ts < $1")
            .bind(now_ms() - WRITER_TIMEOUT_MS * 10)
            .execute(store.pool())
            .await?;
        let writer = Arc::new(Self {
            pool: store.pool().clone(),
            writer_id,
            publish_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(WriterState::default()),
            dirty: Notify::new(),
        });
        tokio::spawn(publisher(Arc::downgrade(&writer)));
        Ok(writer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the next position. Hold the guard until the transaction writing at it is over.
    pub async fn allocate(self: &Arc<Self>) -> StoreResult<PositionGuard> {
        {
            let mut state = self.lock();
            if state.next < state.end {
                let position = state.next;
                state.next += 1;
                state.unfinished.insert(position);
                return Ok(PositionGuard { position, writer: self.clone() });
            }
        }
        let _publishing = self.publish_lock.lock().await;
        if self.lock().bound().is_none() {
            // Going from idle to busy: say so before holding anything. Every position reserved
            // from here on is above the counter read in this statement.
            sqlx::query(
                "UPDATE stream_writers SET heartbeat_ts = $2,
                     lowest_unfinished = (SELECT position + 1 FROM stream_counter WHERE id = 1)
                 WHERE writer_id = $1 RETURNING lowest_unfinished",
            )
            .bind(&self.writer_id)
            .bind(now_ms())
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get::<i64, _>("lowest_unfinished"))
            .map(|bound| self.lock().published = Some(bound))?;
        }
        let row =
            sqlx::query("UPDATE stream_counter SET position = position + $1 WHERE id = 1 RETURNING position")
                .bind(BLOCK)
                .fetch_one(&self.pool)
                .await?;
        let end: i64 = row.try_get("position")?;
        let mut state = self.lock();
        let position = end - BLOCK + 1;
        state.next = position + 1;
        state.end = end + 1;
        state.unfinished.insert(position);
        Ok(PositionGuard { position, writer: self.clone() })
    }

    fn finish(&self, position: i64) {
        let mut state = self.lock();
        state.unfinished.remove(&position);
        if state.unfinished.is_empty() {
            // Idle: the rest of the block will never be written, so it must not hold readers back.
            state.next = state.end;
        }
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
        sqlx::query(
            "UPDATE stream_writers SET lowest_unfinished = $2, heartbeat_ts = $3 WHERE writer_id = $1",
        )
        .bind(&self.writer_id)
        .bind(bound)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.lock().published = bound;
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
            sqlx::query("DELETE FROM stream_writers WHERE writer_id = $1")
                .bind(&self.writer_id)
                .execute(&self.pool)
                .await?;
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

/// The highest position below which every position has committed or never will: the most a
/// `/sync` may return.
pub async fn persisted_upto(connection: &mut sqlx::AnyConnection) -> StoreResult<i64> {
    let row = sqlx::query(
        "SELECT (SELECT position FROM stream_counter WHERE id = 1) AS allocated,
                (SELECT MIN(lowest_unfinished) FROM stream_writers
                  WHERE lowest_unfinished IS NOT NULL AND heartbeat_ts > $1) AS low",
    )
    .bind(now_ms() - WRITER_TIMEOUT_MS)
    .fetch_one(connection)
    .await?;
    let allocated: i64 = row.try_get("allocated")?;
    let low: Option<i64> = row.try_get("low")?;
    Ok(low.map_or(allocated, |low| allocated.min(low - 1)))
}
