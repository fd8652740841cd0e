//! Reports of events and rooms, kept for the server's admins.

use async_trait::async_trait;
use sqlx::Row;

use super::{SqlStore, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRecord {
    pub report_id: String,
    pub room_id: String,
    /// `None` for a report of the whole room.
    pub event_id: Option<String>,
    pub reporter: String,
    pub reason: Option<String>,
    /// -100 (most offensive) to 0, when the reporter gave one.
    pub score: Option<i64>,
    pub received_ts: i64,
}

#[async_trait]
pub trait ReportStore: Send + Sync {
    async fn add_report(&self, report: &ReportRecord) -> StoreResult<()>;
    /// The newest reports first, at most `limit`.
    async fn reports(&self, limit: i64) -> StoreResult<Vec<ReportRecord>>;
}

#[async_trait]
impl ReportStore for SqlStore {
    async fn add_report(&self, report: &ReportRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO reports (report_id, room_id, event_id, reporter, reason, score, received_ts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&report.report_id)
        .bind(&report.room_id)
        .bind(report.event_id.as_deref())
        .bind(&report.reporter)
        .bind(report.reason.as_deref())
        .bind(report.score)
        .bind(report.received_ts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reports(&self, limit: i64) -> StoreResult<Vec<ReportRecord>> {
        sqlx::query(
            "SELECT report_id, room_id, event_id, reporter, reason, score, received_ts FROM reports
             ORDER BY received_ts DESC, report_id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(ReportRecord {
                report_id: row.try_get("report_id")?,
                room_id: row.try_get("room_id")?,
                event_id: row.try_get("event_id")?,
                reporter: row.try_get("reporter")?,
                reason: row.try_get("reason")?,
                score: row.try_get("score")?,
                received_ts: row.try_get("received_ts")?,
            })
        })
        .collect()
    }
}
