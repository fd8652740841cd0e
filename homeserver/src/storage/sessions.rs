//! Sessions: what an access token refers to. A token is valid while its session row exists and
//! its generation matches; a refresh bumps the generation, so the previous access token dies.

use async_trait::async_trait;
use ruma::{OwnedDeviceId, OwnedUserId};
use sqlx::{Row, any::AnyRow};

use super::{SqlStore, StoreResult, UserMark, devices::UPSERT_DEVICE, mark_user, now_ms, parse_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub session_id: String,
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub generation: i64,
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// A login, in one transaction: creates the session's device or reuses it (revoking the
    /// device's earlier sessions, as the spec asks), and stores the session.
    /// `refresh_token_hash` is set for sessions that can be refreshed; a display name or IP of
    /// `None` keeps the device's old one.
    async fn login_device(
        &self,
        session: &SessionRecord,
        refresh_token_hash: Option<&str>,
        display_name: Option<&str>,
        ip: Option<&str>,
        position: i64,
    ) -> StoreResult<()>;
    async fn get_session(&self, session_id: &str) -> StoreResult<Option<SessionRecord>>;
    /// Atomically swaps the refresh token and bumps the generation. `None` if no session holds
    /// `old_hash` (unknown or already used refresh token). The change is marked at `position`.
    async fn refresh_session(
        &self,
        old_hash: &str,
        new_hash: &str,
        position: i64,
    ) -> StoreResult<Option<SessionRecord>>;
}

fn session_from_row(row: &AnyRow) -> StoreResult<SessionRecord> {
    Ok(SessionRecord {
        session_id: row.try_get("session_id")?,
        user_id: parse_id(row.try_get("user_id")?)?,
        device_id: row.try_get::<String, _>("device_id")?.into(),
        generation: row.try_get("generation")?,
    })
}

#[async_trait]
impl SessionStore for SqlStore {
    async fn login_device(
        &self,
        session: &SessionRecord,
        refresh_token_hash: Option<&str>,
        display_name: Option<&str>,
        ip: Option<&str>,
        position: i64,
    ) -> StoreResult<()> {
        let (user_id, device_id, now) = (session.user_id.as_str(), session.device_id.as_str(), now_ms());
        let mut tx = self.begin().await?;
        // The user's mark first, as every transaction that revokes sessions takes it: revoking
        // first and marking after deadlocked on Postgres with a logout of the same device, which
        // takes them in that order (found by the sweep test). Marking a login that revoked
        // nothing only makes other workers read the user's sessions again once.
        mark_user(&mut tx, UserMark::Sessions, user_id, position).await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND device_id = $2")
            .bind(user_id)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(UPSERT_DEVICE)
            .bind(user_id)
            .bind(device_id)
            .bind(display_name)
            .bind(ip)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // A device that is new, or logged in again, is news to everyone who shares a room.
        mark_user(&mut tx, UserMark::DeviceList, user_id, position).await?;
        sqlx::query(
            "INSERT INTO sessions (session_id, user_id, device_id, generation, refresh_token_hash, created_ts)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&session.session_id)
        .bind(user_id)
        .bind(device_id)
        .bind(session.generation)
        .bind(refresh_token_hash)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_session(&self, session_id: &str) -> StoreResult<Option<SessionRecord>> {
        sqlx::query("SELECT session_id, user_id, device_id, generation FROM sessions WHERE session_id = $1")
            .bind(session_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    async fn refresh_session(
        &self,
        old_hash: &str,
        new_hash: &str,
        position: i64,
    ) -> StoreResult<Option<SessionRecord>> {
        // The user's mark is taken before the session's row, in the order logouts take them
        // (see `login_device`), so the user is looked up first — outside the transaction: on
        // SQLite a transaction that reads before it writes cannot always upgrade to a writer
        // ("database is locked" at once), and the update below checks the user again.
        let user: Option<String> =
            sqlx::query_scalar("SELECT user_id FROM sessions WHERE refresh_token_hash = $1")
                .bind(old_hash)
                .fetch_optional(&self.pool)
                .await?;
        let Some(user) = user else {
            return Ok(None);
        };
        let mut tx = self.begin().await?;
        mark_user(&mut tx, UserMark::Sessions, &user, position).await?;
        let refreshed = sqlx::query(
            "UPDATE sessions SET refresh_token_hash = $2, generation = generation + 1
             WHERE refresh_token_hash = $1 AND user_id = $3 RETURNING session_id, user_id, device_id, generation",
        )
        .bind(old_hash)
        .bind(new_hash)
        .bind(&user)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(session_from_row)
        .transpose()?;
        tx.commit().await?;
        Ok(refreshed)
    }
}
