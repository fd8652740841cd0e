//! Sessions: what an access token refers to. A token is valid while its session row exists and
//! its generation matches; a refresh bumps the generation, so the previous access token dies.

use async_trait::async_trait;
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, UserId};
use sqlx::Row;

use super::{SqlStore, StoreResult, now_ms, parse_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub session_id: String,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub generation: i64,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Stores a new session; `refresh_token_hash` is set for sessions that can be refreshed.
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh_token_hash: Option<&str>,
    ) -> StoreResult<()>;
    async fn get_session(&self, session_id: &str) -> StoreResult<Option<SessionRecord>>;
    /// Atomically swaps the refresh token and bumps the generation. `None` if no session holds
    /// `old_hash` (unknown or already used refresh token).
    async fn refresh_session(&self, old_hash: &str, new_hash: &str) -> StoreResult<Option<SessionRecord>>;
    async fn delete_session(&self, session_id: &str) -> StoreResult<()>;
    /// Revokes every token of one device, keeping the device.
    async fn delete_device_sessions(&self, user_id: &UserId, device_id: &DeviceId) -> StoreResult<()>;
}

#[async_trait]
impl SessionStore for SqlStore {
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh_token_hash: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO sessions (session_id, user_id, device_id, generation, refresh_token_hash, created_ts)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&session.session_id)
        .bind(session.user_id.as_str())
        .bind(session.device_id.as_str())
        .bind(session.generation)
        .bind(refresh_token_hash)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_session(&self, session_id: &str) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query("SELECT user_id, device_id, generation FROM sessions WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(SessionRecord {
                session_id: session_id.to_owned(),
                user_id: parse_id(row.try_get("user_id")?)?,
                device_id: row.try_get::<String, _>("device_id")?.into(),
                generation: row.try_get("generation")?,
            })
        })
        .transpose()
    }

    async fn refresh_session(&self, old_hash: &str, new_hash: &str) -> StoreResult<Option<SessionRecord>> {
        let row = sqlx::query(
            "UPDATE sessions SET refresh_token_hash = $2, generation = generation + 1
             WHERE refresh_token_hash = $1 RETURNING session_id, user_id, device_id, generation",
        )
        .bind(old_hash)
        .bind(new_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(SessionRecord {
                session_id: row.try_get("session_id")?,
                user_id: parse_id(row.try_get("user_id")?)?,
                device_id: row.try_get::<String, _>("device_id")?.into(),
                generation: row.try_get("generation")?,
            })
        })
        .transpose()
    }

    async fn delete_session(&self, session_id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE session_id = $1")
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_device_sessions(&self, user_id: &UserId, device_id: &DeviceId) -> StoreResult<()> {
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND device_id = $2")
            .bind(user_id.as_str())
            .bind(device_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
