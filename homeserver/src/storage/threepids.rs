//! Verified addresses ("3PIDs": email addresses and phone numbers) and the one-time-code sessions
//! that verify them.

use async_trait::async_trait;
use ruma::{OwnedUserId, UserId};
use sqlx::{Row, any::AnyRow};

use super::{SqlStore, StoreResult, parse_id};

/// An address bound to an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreepidRecord {
    pub medium: String,
    pub address: String,
    pub validated_ts: i64,
    pub added_ts: i64,
}

/// A verification session: a code sent to an address for a purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreepidSession {
    pub sid: String,
    pub client_secret_hash: String,
    pub medium: String,
    /// Canonical form: a lower-cased email address, or an E.164 number without the `+`.
    pub address: String,
    /// `register`, `add`, `reset` or `login`: a session proves an address for that purpose only.
    pub purpose: String,
    pub code_hash: String,
    pub send_attempt: i64,
    pub failed_attempts: i64,
    pub validated_ts: Option<i64>,
    pub consumed: bool,
    pub created_ts: i64,
    pub code_expires_ts: i64,
}

#[async_trait]
pub trait ThreepidStore: Send + Sync {
    /// The session a client already has for this address and purpose (same client secret).
    async fn find_threepid_session(
        &self,
        client_secret_hash: &str,
        medium: &str,
        address: &str,
        purpose: &str,
    ) -> StoreResult<Option<ThreepidSession>>;
    async fn get_threepid_session(&self, sid: &str) -> StoreResult<Option<ThreepidSession>>;
    async fn create_threepid_session(&self, session: &ThreepidSession) -> StoreResult<()>;
    /// A new code for an existing session: resets the wrong-code count.
    async fn resend_threepid_code(
        &self,
        sid: &str,
        code_hash: &str,
        send_attempt: i64,
        code_expires_ts: i64,
    ) -> StoreResult<()>;
    /// Counts a wrong code; returns the count after it.
    async fn record_failed_code(&self, sid: &str) -> StoreResult<i64>;
    /// Marks the session's address verified (once; later calls keep the first time).
    async fn mark_threepid_validated(&self, sid: &str, now_ts: i64) -> StoreResult<()>;
    /// Uses up a verified session, atomically: `false` if it was not verified or already used.
    async fn consume_threepid_session(&self, sid: &str) -> StoreResult<bool>;
    /// Removes sessions whose code expired before `before_ts` and that were never verified.
    async fn delete_stale_threepid_sessions(&self, before_ts: i64) -> StoreResult<u64>;

    /// Binds the address to the user; `false` if it is bound already (to anyone).
    async fn bind_threepid(
        &self,
        user_id: &UserId,
        medium: &str,
        address: &str,
        validated_ts: i64,
    ) -> StoreResult<bool>;
    async fn threepid_owner(&self, medium: &str, address: &str) -> StoreResult<Option<OwnedUserId>>;
    async fn list_threepids(&self, user_id: &UserId) -> StoreResult<Vec<ThreepidRecord>>;
    /// Returns `false` if the user had no such address.
    async fn unbind_threepid(&self, user_id: &UserId, medium: &str, address: &str) -> StoreResult<bool>;
}

const SESSION_COLUMNS: &str = "sid, client_secret_hash, medium, address, purpose, code_hash, send_attempt, \
     failed_attempts, validated_ts, consumed, created_ts, code_expires_ts";

fn session_from_row(row: &AnyRow) -> StoreResult<ThreepidSession> {
    Ok(ThreepidSession {
        sid: row.try_get("sid")?,
        client_secret_hash: row.try_get("client_secret_hash")?,
        medium: row.try_get("medium")?,
        address: row.try_get("address")?,
        purpose: row.try_get("purpose")?,
        code_hash: row.try_get("code_hash")?,
        send_attempt: row.try_get("send_attempt")?,
        failed_attempts: row.try_get("failed_attempts")?,
        validated_ts: row.try_get("validated_ts")?,
        consumed: row.try_get::<i16, _>("consumed")? != 0,
        created_ts: row.try_get("created_ts")?,
        code_expires_ts: row.try_get("code_expires_ts")?,
    })
}

#[async_trait]
impl ThreepidStore for SqlStore {
    async fn find_threepid_session(
        &self,
        client_secret_hash: &str,
        medium: &str,
        address: &str,
        purpose: &str,
    ) -> StoreResult<Option<ThreepidSession>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM threepid_sessions
             WHERE client_secret_hash = $1 AND medium = $2 AND address = $3 AND purpose = $4
             ORDER BY created_ts DESC LIMIT 1"
        ));
        sqlx::query(sql)
            .bind(client_secret_hash)
            .bind(medium)
            .bind(address)
            .bind(purpose)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn get_threepid_session(&self, sid: &str) -> StoreResult<Option<ThreepidSession>> {
        let sql =
            sqlx::AssertSqlSafe(format!("SELECT {SESSION_COLUMNS} FROM threepid_sessions WHERE sid = $1"));
        sqlx::query(sql)
            .bind(sid)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn create_threepid_session(&self, s: &ThreepidSession) -> StoreResult<()> {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO threepid_sessions ({SESSION_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ));
        sqlx::query(sql)
            .bind(&s.sid)
            .bind(&s.client_secret_hash)
            .bind(&s.medium)
            .bind(&s.address)
            .bind(&s.purpose)
            .bind(&s.code_hash)
            .bind(s.send_attempt)
            .bind(s.failed_attempts)
            .bind(s.validated_ts)
            .bind(i16::from(s.consumed))
            .bind(s.created_ts)
            .bind(s.code_expires_ts)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn resend_threepid_code(
        &self,
        sid: &str,
        code_hash: &str,
        send_attempt: i64,
        code_expires_ts: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE threepid_sessions SET code_hash = $2, send_attempt = $3, code_expires_ts = $4,
                 failed_attempts = 0
             WHERE sid = $1",
        )
        .bind(sid)
        .bind(code_hash)
        .bind(send_attempt)
        .bind(code_expires_ts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_failed_code(&self, sid: &str) -> StoreResult<i64> {
        let row = sqlx::query(
            "UPDATE threepid_sessions SET failed_attempts = failed_attempts + 1 WHERE sid = $1
             RETURNING failed_attempts",
        )
        .bind(sid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => row.try_get("failed_attempts")?,
            None => i64::MAX,
        })
    }

    async fn mark_threepid_validated(&self, sid: &str, now_ts: i64) -> StoreResult<()> {
        sqlx::query("UPDATE threepid_sessions SET validated_ts = $2 WHERE sid = $1 AND validated_ts IS NULL")
            .bind(sid)
            .bind(now_ts)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn consume_threepid_session(&self, sid: &str) -> StoreResult<bool> {
        let row = sqlx::query(
            "UPDATE threepid_sessions SET consumed = 1
             WHERE sid = $1 AND consumed = 0 AND validated_ts IS NOT NULL RETURNING sid",
        )
        .bind(sid)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn delete_stale_threepid_sessions(&self, before_ts: i64) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM threepid_sessions WHERE code_expires_ts < $1 AND (validated_ts IS NULL OR consumed = 1)",
        )
        .bind(before_ts)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn bind_threepid(
        &self,
        user_id: &UserId,
        medium: &str,
        address: &str,
        validated_ts: i64,
    ) -> StoreResult<bool> {
        let row = sqlx::query(
            "INSERT INTO user_threepids (medium, address, user_id, validated_ts, added_ts)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (medium, address) DO NOTHING RETURNING address",
        )
        .bind(medium)
        .bind(address)
        .bind(user_id.as_str())
        .bind(validated_ts)
        .bind(super::now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn threepid_owner(&self, medium: &str, address: &str) -> StoreResult<Option<OwnedUserId>> {
        let row = sqlx::query("SELECT user_id FROM user_threepids WHERE medium = $1 AND address = $2")
            .bind(medium)
            .bind(address)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| parse_id(row.try_get("user_id")?)).transpose()
    }

    async fn list_threepids(&self, user_id: &UserId) -> StoreResult<Vec<ThreepidRecord>> {
        sqlx::query(
            "SELECT medium, address, validated_ts, added_ts FROM user_threepids WHERE user_id = $1
             ORDER BY added_ts, medium, address",
        )
        .bind(user_id.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(ThreepidRecord {
                medium: row.try_get("medium")?,
                address: row.try_get("address")?,
                validated_ts: row.try_get("validated_ts")?,
                added_ts: row.try_get("added_ts")?,
            })
        })
        .collect()
    }

    async fn unbind_threepid(&self, user_id: &UserId, medium: &str, address: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("DELETE FROM user_threepids WHERE user_id = $1 AND medium = $2 AND address = $3")
                .bind(user_id.as_str())
                .bind(medium)
                .bind(address)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }
}
