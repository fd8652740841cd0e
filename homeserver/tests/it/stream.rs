//! Stream positions under out-of-order commits: no reader misses or repeats a position.

use std::{collections::BTreeSet, time::Duration};

use homeserver::storage::{
    SqlStore, StreamStore,
    stream::{Liveness, StreamWriter},
};
use rand::Rng;
use sqlx::Executor;

use crate::common::{Db, TestDb};

async fn store(db: Db) -> (SqlStore, TestDb) {
    let test_db = TestDb::new(db).await;
    let store = SqlStore::connect(&test_db.url, 12).await.unwrap();
    store.migrate().await.unwrap();
    // Stands in for the events table: a row per committed position.
    store.pool().execute("CREATE TABLE stream_probe (position BIGINT PRIMARY KEY)").await.unwrap();
    (store, test_db)
}

/// Commits a row at `position`, holding the transaction open for `hold` first.
async fn commit_at(store: &SqlStore, position: i64, hold: Duration) {
    let mut tx = store.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO stream_probe (position) VALUES ($1)")
        .bind(position)
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(hold).await;
    tx.commit().await.unwrap();
}

async fn wait_for_upto(store: &SqlStore, at_least: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let upto = store.persisted_upto().await.unwrap();
        if upto >= at_least {
            return upto;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck at {upto}, waiting for {at_least}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

crate::on_both_backends! {
    async fn a_late_commit_holds_readers_back(db: Db) {
        let (store, test_db) = store(db).await;
        let a = StreamWriter::start(&store, "test").await.unwrap();
        let b = StreamWriter::start(&store, "test").await.unwrap();
        let early = a.allocate().await.unwrap();
        let late = b.allocate().await.unwrap();
        assert!(late.position > early.position);
        // The higher position commits first.
        let late_position = late.position;
        commit_at(&store, late_position, Duration::ZERO).await;
        drop(late);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let upto = store.persisted_upto().await.unwrap();
        assert!(upto < early.position, "a reader may not pass {} while it is in flight (got {upto})", early.position);
        let visible: i64 = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM stream_probe WHERE position <= $1")
            .bind(upto)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(visible, 0);
        // Once the lower one commits, readers move past both.
        commit_at(&store, early.position, Duration::ZERO).await;
        drop(early);
        wait_for_upto(&store, late_position).await;
        let visible: i64 = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM stream_probe WHERE position <= $1")
            .bind(store.persisted_upto().await.unwrap())
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(visible, 2);
        a.stop().await.unwrap();
        b.stop().await.unwrap();
        store.close().await;
        test_db.remove().await;
    }

    async fn readers_never_miss_or_repeat(db: Db) {
        let (store, test_db) = store(db).await;
        let writers = [StreamWriter::start(&store, "test").await.unwrap(), StreamWriter::start(&store, "test").await.unwrap()];
        const WRITES: usize = 240;
        let mut tasks = Vec::new();
        for t in 0..8 {
            let (store, writer) = (store.clone(), writers[t % 2].clone());
            tasks.push(tokio::spawn(async move {
                let mut written = Vec::new();
                for _ in 0..WRITES / 8 {
                    let guard = writer.allocate().await.unwrap();
                    let hold = Duration::from_millis(rand::thread_rng().gen_range(0..6));
                    commit_at(&store, guard.position, hold).await;
                    written.push(guard.position);
                }
                written
            }));
        }
        // The reader: advance to the safe position, read what is newly visible, repeat.
        let reader = {
            let store = store.clone();
            tokio::spawn(async move {
                let (mut last, mut seen, mut out_of_order) = (0i64, BTreeSet::new(), 0usize);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while seen.len() < WRITES {
                    assert!(tokio::time::Instant::now() < deadline, "reader saw {} of {WRITES}", seen.len());
                    let upto = store.persisted_upto().await.unwrap();
                    let max_committed: Option<i64> = sqlx::query_scalar::<_, Option<i64>>("SELECT MAX(position) FROM stream_probe")
                        .fetch_one(store.pool()).await.unwrap();
                    if max_committed.is_some_and(|m| m > upto) {
                        out_of_order += 1;
                    }
                    let rows: Vec<i64> = sqlx::query_scalar::<_, i64>(
                        "SELECT position FROM stream_probe WHERE position > $1 AND position <= $2 ORDER BY position",
                    )
                    .bind(last)
                    .bind(upto)
                    .fetch_all(store.pool())
                    .await
                    .unwrap();
                    for row in rows {
                        assert!(seen.insert(row), "position {row} delivered twice");
                    }
                    last = last.max(upto);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                (seen, out_of_order)
            })
        };
        let mut written = BTreeSet::new();
        for task in tasks {
            written.extend(task.await.unwrap());
        }
        let (seen, out_of_order) = reader.await.unwrap();
        assert_eq!(seen, written, "every committed position reached the reader exactly once");
        assert!(out_of_order > 0, "the test must actually see commits land out of order");
        for writer in &writers {
            writer.stop().await.unwrap();
        }
        store.close().await;
        test_db.remove().await;
    }

    async fn a_dead_writer_stops_holding_readers_back(db: Db) {
        let (store, test_db) = store(db).await;
        let live = StreamWriter::start(&store, "worker-a").await.unwrap();
        // A writer that died mid-write: its row still says it may commit the next position.
        let counter: i64 = sqlx::query_scalar::<_, i64>("SELECT position FROM stream_counter WHERE id = 1")
            .fetch_one(store.pool())
            .await
            .unwrap();
        let dead_row = |instance: &'static str, age_ms: i64| {
            let store = store.clone();
            async move {
                let now = match store.liveness() {
                    Liveness::Lease { .. } => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
                    Liveness::LockFiles(_) => "CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)",
                };
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO stream_writers (writer_id, lowest_unfinished, heartbeat_ts, instance, tag)
                     VALUES ($1, $2, {now} - $3, $4, 'hearth-gone')"
                )))
                .bind(format!("dead-{instance}"))
                .bind(counter + 1)
                .bind(age_ms)
                .bind(instance)
                .execute(store.pool())
                .await
                .unwrap();
            }
        };
        dead_row("worker-b", 0).await;
        // Writes after the dead one's position.
        for _ in 0..3 {
            let guard = live.allocate().await.unwrap();
            commit_at(&store, guard.position, Duration::ZERO).await;
        }
        let written = sqlx::query_scalar::<_, i64>("SELECT MAX(position) FROM stream_probe")
            .fetch_one(store.pool())
            .await
            .unwrap();
        match store.liveness() {
            Liveness::LockFiles(_) => {
                // SQLite: no process holds the dead writer's lock, so readers pass it at once.
                wait_for_upto(&store, written).await;
            }
            Liveness::Lease { .. } => {
                // Postgres: its lease is fresh, so it holds readers back...
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(store.persisted_upto().await.unwrap() <= counter, "a fresh lease holds readers back");
                // ...until the worker it belonged to starts again: none of that run's sessions
                // is left, so the new run releases the row at once.
                let restarted = StreamWriter::start(&store, "worker-b").await.unwrap();
                wait_for_upto(&store, written).await;
                // A dead writer that never comes back is passed once its lease has run out.
                dead_row("worker-c", 60_000).await;
                let guard = live.allocate().await.unwrap();
                commit_at(&store, guard.position, Duration::ZERO).await;
                let position = guard.position;
                drop(guard);
                wait_for_upto(&store, position).await;
                restarted.stop().await.unwrap();
            }
        }
        live.stop().await.unwrap();
        store.close().await;
        test_db.remove().await;
    }
}

/// A Postgres writer that cannot renew its lease (cut off, frozen) must not commit what it held
/// once readers may have given up on it; after a renewal it writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_without_its_lease_commits_nothing_it_held() {
    let (store, test_db) = store(Db::Postgres).await;
    let writer = StreamWriter::start(&store, "worker-a").await.unwrap();
    let held = writer.allocate().await.unwrap();
    assert!(held.still_leased().is_ok(), "a fresh lease");
    // Its renewals fail from now on, as when it cannot reach the database: readers pass it.
    sqlx::query("DELETE FROM stream_writers").execute(store.pool()).await.unwrap();
    let counter: i64 = sqlx::query_scalar::<_, i64>("SELECT position FROM stream_counter WHERE id = 1")
        .fetch_one(store.pool())
        .await
        .unwrap();
    let passed = wait_for_upto(&store, counter).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    // A new position comes with a renewed lease (and the row back), which names the old position
    // as still held until its transaction finds it doomed: readers do not go back for it.
    let fresh = writer.allocate().await.unwrap();
    assert!(fresh.position > counter, "new positions come after everything readers passed");
    assert!(fresh.still_leased().is_ok());
    assert!(store.persisted_upto().await.unwrap() >= passed, "readers never go back");
    assert!(held.still_leased().is_err(), "the position it held is doomed");
    drop(held);
    let rows: i64 = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM stream_writers")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1);
    drop(fresh);
    writer.stop().await.unwrap();
    store.close().await;
    test_db.remove().await;
}
