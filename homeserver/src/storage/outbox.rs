//! The federation outbox: what this server has yet to send to each other server, kept in the
//! database so that a restart loses none of it (see `remote::outbox`).

use async_trait::async_trait;
use sqlx::Row;

use super::{SqlStore, StoreResult};

/// One thing queued for a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Its place in the destination's queue.
    pub id: i64,
    pub kind: OutboxKind,
    /// For an event, its stream position.
    pub position: Option<i64>,
    /// The event's or the EDU's JSON.
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxKind {
    Pdu,
    Edu,
}

impl OutboxKind {
    fn as_str(self) -> &'static str {
        match self {
            OutboxKind::Pdu => "pdu",
            OutboxKind::Edu => "edu",
        }
    }
}

#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Queues `body` for each of `destinations`.
    async fn queue_outbound(
        &self,
        destinations: &[&str],
        kind: OutboxKind,
        position: Option<i64>,
        body: &str,
    ) -> StoreResult<()>;
    /// The oldest items queued for `destination`, in queue order, up to `max_pdus` events and
    /// `max_edus` EDUs (stopping at the first item past either).
    async fn outbound(
        &self,
        destination: &str,
        max_pdus: usize,
        max_edus: usize,
    ) -> StoreResult<Vec<OutboxItem>>;
    /// Drops `destination`'s items up to and including `upto`: it took them.
    async fn sent_outbound(&self, destination: &str, upto: i64) -> StoreResult<()>;
    /// Drops `destination`'s oldest events beyond its newest `keep`, and its oldest EDUs beyond
    /// its newest `keep_edus`: a server away for long is sent what is newest, and fetches the
    /// events in between when it sees they are missing. Returns how many went.
    async fn trim_outbound(&self, destination: &str, keep: usize, keep_edus: usize) -> StoreResult<u64>;
    /// The destinations with something queued.
    async fn outbound_destinations(&self) -> StoreResult<Vec<String>>;
    /// Makes `worker` the sender of `destination` until `until_ts` (ms), unless another worker
    /// is until a later time than `now_ms`; whether it is.
    async fn lease_destination(
        &self,
        destination: &str,
        worker: &str,
        now_ms: i64,
        until_ts: i64,
    ) -> StoreResult<bool>;
    /// Ends `worker`'s hold on `destination`, if it has it.
    async fn release_destination(&self, destination: &str, worker: &str) -> StoreResult<()>;
}

#[async_trait]
impl OutboxStore for SqlStore {
    async fn queue_outbound(
        &self,
        destinations: &[&str],
        kind: OutboxKind,
        position: Option<i64>,
        body: &str,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for destination in destinations {
            sqlx::query(
                "INSERT INTO federation_outbox (destination, kind, position, body) VALUES ($1, $2, $3, $4)",
            )
            .bind(*destination)
            .bind(kind.as_str())
            .bind(position)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn outbound(
        &self,
        destination: &str,
        max_pdus: usize,
        max_edus: usize,
    ) -> StoreResult<Vec<OutboxItem>> {
        let limit = i64::try_from(max_pdus + max_edus).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT id, kind, position, body FROM federation_outbox WHERE destination = $1 ORDER BY id LIMIT $2",
        )
        .bind(destination)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let (mut pdus, mut edus) = (0, 0);
        let mut items = Vec::new();
        for row in rows {
            let kind = match row.try_get::<String, _>("kind")?.as_str() {
                "pdu" => OutboxKind::Pdu,
                _ => OutboxKind::Edu,
            };
            let count = if kind == OutboxKind::Pdu { &mut pdus } else { &mut edus };
            *count += 1;
            if pdus > max_pdus || edus > max_edus {
                break;
            }
            items.push(OutboxItem {
                id: row.try_get("id")?,
                kind,
                position: row.try_get("position")?,
                body: row.try_get("body")?,
            });
        }
        Ok(items)
    }

    async fn sent_outbound(&self, destination: &str, upto: i64) -> StoreResult<()> {
        sqlx::query("DELETE FROM federation_outbox WHERE destination = $1 AND id <= $2")
            .bind(destination)
            .bind(upto)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn trim_outbound(&self, destination: &str, keep: usize, keep_edus: usize) -> StoreResult<u64> {
        let mut gone = 0;
        for (kind, keep) in [(OutboxKind::Pdu, keep), (OutboxKind::Edu, keep_edus)] {
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            // The id of the oldest item kept, if more than `keep` are queued.
            let row = sqlx::query(
                "SELECT id FROM federation_outbox WHERE destination = $1 AND kind = $2
                 ORDER BY id DESC LIMIT 1 OFFSET $3",
            )
            .bind(destination)
            .bind(kind.as_str())
            .bind(keep)
            .fetch_optional(&self.pool)
            .await?;
            let Some(row) = row else { continue };
            let newest_dropped: i64 = row.try_get("id")?;
            gone += sqlx::query(
                "DELETE FROM federation_outbox WHERE destination = $1 AND kind = $2 AND id <= $3",
            )
            .bind(destination)
            .bind(kind.as_str())
            .bind(newest_dropped)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(gone)
    }

    async fn outbound_destinations(&self) -> StoreResult<Vec<String>> {
        let rows =
            sqlx::query("SELECT DISTINCT destination FROM federation_outbox").fetch_all(&self.pool).await?;
        rows.iter().map(|row| Ok(row.try_get("destination")?)).collect()
    }

    async fn lease_destination(
        &self,
        destination: &str,
        worker: &str,
        now_ms: i64,
        until_ts: i64,
    ) -> StoreResult<bool> {
        let taken = sqlx::query(
            "INSERT INTO federation_senders (destination, worker, until_ts) VALUES ($1, $2, $3)
             ON CONFLICT (destination) DO UPDATE SET worker = excluded.worker, until_ts = excluded.until_ts
             WHERE federation_senders.worker = excluded.worker OR federation_senders.until_ts < $4",
        )
        .bind(destination)
        .bind(worker)
        .bind(until_ts)
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(taken == 1)
    }

    async fn release_destination(&self, destination: &str, worker: &str) -> StoreResult<()> {
        sqlx::query("UPDATE federation_senders SET until_ts = 0 WHERE destination = $1 AND worker = $2")
            .bind(destination)
            .bind(worker)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
