//! Application service queues: how far each service's events went, the transaction being
//! delivered, and which worker may deliver it (see `appservice/sender.rs`).
//!
//! Every change after the claim names the claiming worker (`lease_owner`), so a worker that lost
//! its lease to another changes nothing. The lease is timed by the database's clock on Postgres,
//! where workers are on several hosts (as in `stream.rs`), and by this host's on SQLite.

use async_trait::async_trait;
use sqlx::{Row, any::AnyRow};

use super::{Backend, SqlStore, StoreResult};

/// The transaction a service has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTxn {
    pub txn_id: String,
    /// The request body, exactly as first built.
    pub body: String,
    /// The stream position its events reach; delivered, the queue moves there.
    pub upto: i64,
}

/// A service's queue, as its claimant sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppserviceQueue {
    /// Events at or below this position went out (or were of no interest).
    pub last_pos: i64,
    pub pending: Option<PendingTxn>,
}

#[async_trait]
pub trait AppserviceStore: Send + Sync {
    /// Starts a service's queue after `position`, unless it has one: a service sees events from
    /// when it was first registered on.
    async fn init_appservice_queue(&self, id: &str, position: i64) -> StoreResult<()>;
    /// Takes (or renews) the right to deliver a service's transactions for `lease_ms`; `None`
    /// while another worker holds it.
    async fn claim_appservice_queue(
        &self,
        id: &str,
        owner: &str,
        lease_ms: i64,
    ) -> StoreResult<Option<AppserviceQueue>>;
    /// Makes `body` the pending transaction, reaching position `upto`, under the next transaction
    /// id, which it returns; `None` if the lease was lost or a transaction is already pending.
    async fn queue_appservice_txn(
        &self,
        id: &str,
        owner: &str,
        body: &str,
        upto: i64,
    ) -> StoreResult<Option<String>>;
    /// Moves the queue past events of no interest to the service, up to `upto`; false if the lease
    /// was lost or a transaction is pending.
    async fn skip_appservice_events(&self, id: &str, owner: &str, upto: i64) -> StoreResult<bool>;
    /// Records that the service acknowledged the pending transaction `txn_id`.
    async fn complete_appservice_txn(&self, id: &str, owner: &str, txn_id: &str) -> StoreResult<bool>;
    /// Gives the lease up (a worker stopping), so another may deliver at once.
    async fn release_appservice_queue(&self, id: &str, owner: &str) -> StoreResult<()>;
}

impl SqlStore {
    /// The clock leases are timed by, in milliseconds.
    fn lease_clock(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS BIGINT)",
        }
    }
}

fn queue_from_row(row: &AnyRow) -> StoreResult<AppserviceQueue> {
    let txn_id: Option<String> = row.try_get("pending_txn")?;
    let body: Option<String> = row.try_get("pending_body")?;
    let upto: Option<i64> = row.try_get("pending_upto")?;
    let pending = match (txn_id, body, upto) {
        (Some(txn_id), Some(body), Some(upto)) => Some(PendingTxn { txn_id, body, upto }),
        _ => None,
    };
    Ok(AppserviceQueue { last_pos: row.try_get("last_pos")?, pending })
}

#[async_trait]
impl AppserviceStore for SqlStore {
    async fn init_appservice_queue(&self, id: &str, position: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO appservice_queues (appservice_id, last_pos) VALUES ($1, $2)
             ON CONFLICT (appservice_id) DO NOTHING",
        )
        .bind(id)
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn claim_appservice_queue(
        &self,
        id: &str,
        owner: &str,
        lease_ms: i64,
    ) -> StoreResult<Option<AppserviceQueue>> {
        let now = self.lease_clock();
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE appservice_queues SET lease_owner = $2, lease_until = {now} + $3
             WHERE appservice_id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < {now})
             RETURNING last_pos, pending_txn, pending_body, pending_upto"
        ));
        let row = sqlx::query(sql).bind(id).bind(owner).bind(lease_ms).fetch_optional(&self.pool).await?;
        row.as_ref().map(queue_from_row).transpose()
    }

    async fn queue_appservice_txn(
        &self,
        id: &str,
        owner: &str,
        body: &str,
        upto: i64,
    ) -> StoreResult<Option<String>> {
        let row = sqlx::query(
            "UPDATE appservice_queues SET pending_txn = CAST(next_txn AS TEXT), pending_body = $3,
                 pending_upto = $4, next_txn = next_txn + 1
             WHERE appservice_id = $1 AND lease_owner = $2 AND pending_txn IS NULL
             RETURNING pending_txn",
        )
        .bind(id)
        .bind(owner)
        .bind(body)
        .bind(upto)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| row.try_get("pending_txn").map_err(Into::into)).transpose()
    }

    async fn skip_appservice_events(&self, id: &str, owner: &str, upto: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE appservice_queues SET last_pos = $3
             WHERE appservice_id = $1 AND lease_owner = $2 AND pending_txn IS NULL AND last_pos < $3",
        )
        .bind(id)
        .bind(owner)
        .bind(upto)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn complete_appservice_txn(&self, id: &str, owner: &str, txn_id: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE appservice_queues SET last_pos = pending_upto, pending_txn = NULL, pending_body = NULL,
                 pending_upto = NULL
             WHERE appservice_id = $1 AND lease_owner = $2 AND pending_txn = $3",
        )
        .bind(id)
        .bind(owner)
        .bind(txn_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn release_appservice_queue(&self, id: &str, owner: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE appservice_queues SET lease_owner = NULL, lease_until = 0
             WHERE appservice_id = $1 AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
