//! Accounts: user ids, password hashes, admin and deactivation flags.

use async_trait::async_trait;
use ruma::{OwnedUserId, UserId};
use sqlx::Row;

use super::{SqlStore, StoreResult, UserMark, mark_user, now_ms, parse_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub user_id: OwnedUserId,
    /// argon2id PHC string; `None` for accounts that cannot log in with a password.
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub deactivated: bool,
    pub created_ts: i64,
    /// A guest account (`POST /register?kind=guest`): no password, and only the endpoints the
    /// spec lists for guests.
    pub is_guest: bool,
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates the account. Returns `false` when the id is taken, by a live or deactivated user:
    /// ids are never reused.
    async fn create_user(
        &self,
        user_id: &UserId,
        password_hash: Option<&str>,
        is_admin: bool,
    ) -> StoreResult<bool>;
    /// Creates a guest account (no password). Returns `false` when the id is taken.
    async fn create_guest(&self, user_id: &UserId) -> StoreResult<bool>;
    /// Turns a guest account into a full one with this password. Returns `false` when the
    /// account is not a guest's (any more).
    async fn upgrade_guest(&self, user_id: &UserId, password_hash: &str) -> StoreResult<bool>;
    async fn get_user(&self, user_id: &UserId) -> StoreResult<Option<UserRecord>>;
    async fn set_password_hash(&self, user_id: &UserId, password_hash: Option<&str>) -> StoreResult<()>;
    /// Marks the account deactivated, forgets its password and deletes its devices, sessions and
    /// verified addresses, in one transaction.
    async fn deactivate_user(&self, user_id: &UserId, position: i64) -> StoreResult<()>;
    /// Marks the account erased (deactivated with `erase: true`) and clears its profile, in one
    /// transaction.
    async fn erase_user(&self, user_id: &UserId) -> StoreResult<()>;
    /// Which of `user_ids` are erased accounts.
    async fn erased_among(&self, user_ids: &[&str]) -> StoreResult<std::collections::HashSet<String>>;
}

fn user_from_row(row: &sqlx::any::AnyRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        user_id: parse_id(row.try_get("user_id")?)?,
        password_hash: row.try_get("password_hash")?,
        is_admin: row.try_get::<i16, _>("is_admin")? != 0,
        deactivated: row.try_get::<i16, _>("deactivated")? != 0,
        created_ts: row.try_get("created_ts")?,
        is_guest: row.try_get::<i16, _>("is_guest")? != 0,
    })
}

#[async_trait]
impl AccountStore for SqlStore {
    async fn create_user(
        &self,
        user_id: &UserId,
        password_hash: Option<&str>,
        is_admin: bool,
    ) -> StoreResult<bool> {
        let created = sqlx::query(
            "INSERT INTO users (user_id, password_hash, is_admin, deactivated, created_ts)
             VALUES ($1, $2, $3, 0, $4) ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
        )
        .bind(user_id.as_str())
        .bind(password_hash)
        .bind(i16::from(is_admin))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(created.is_some())
    }

    async fn create_guest(&self, user_id: &UserId) -> StoreResult<bool> {
        let created = sqlx::query(
            "INSERT INTO users (user_id, password_hash, is_admin, deactivated, created_ts, is_guest)
             VALUES ($1, NULL, 0, 0, $2, 1) ON CONFLICT (user_id) DO NOTHING RETURNING user_id",
        )
        .bind(user_id.as_str())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(created.is_some())
    }

    async fn upgrade_guest(&self, user_id: &UserId, password_hash: &str) -> StoreResult<bool> {
        let upgraded = sqlx::query(
            "UPDATE users SET password_hash = $2, is_guest = 0
             WHERE user_id = $1 AND is_guest = 1 AND deactivated = 0 RETURNING user_id",
        )
        .bind(user_id.as_str())
        .bind(password_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(upgraded.is_some())
    }

    async fn get_user(&self, user_id: &UserId) -> StoreResult<Option<UserRecord>> {
        sqlx::query(
            "SELECT user_id, password_hash, is_admin, deactivated, created_ts, is_guest
             FROM users WHERE user_id = $1",
        )
        .bind(user_id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(user_from_row)
        .transpose()
    }

    async fn set_password_hash(&self, user_id: &UserId, password_hash: Option<&str>) -> StoreResult<()> {
        sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1")
            .bind(user_id.as_str())
            .bind(password_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn deactivate_user(&self, user_id: &UserId, position: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        mark_user(&mut tx, UserMark::Sessions, user_id.as_str(), position).await?;
        sqlx::query("UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = $1")
            .bind(user_id.as_str())
            .execute(&mut *tx)
            .await?;
        // The account's addresses are freed for others; its id never is.
        for sql in [
            "DELETE FROM sessions WHERE user_id = $1",
            "DELETE FROM devices WHERE user_id = $1",
            "DELETE FROM user_threepids WHERE user_id = $1",
        ] {
            sqlx::query(sql).bind(user_id.as_str()).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn erase_user(&self, user_id: &UserId) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        for sql in [
            "UPDATE users SET erased = 1 WHERE user_id = $1",
            "UPDATE profiles SET displayname = NULL, avatar_url = NULL WHERE user_id = $1",
        ] {
            sqlx::query(sql).bind(user_id.as_str()).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn erased_among(&self, user_ids: &[&str]) -> StoreResult<std::collections::HashSet<String>> {
        let mut erased = std::collections::HashSet::new();
        for chunk in user_ids.chunks(super::IN_CHUNK) {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT user_id FROM users WHERE erased = 1 AND user_id IN ({})",
                super::placeholders(1, chunk.len())
            ));
            let mut query = sqlx::query(sql);
            for user in chunk {
                query = query.bind(*user);
            }
            for row in query.fetch_all(&self.pool).await? {
                erased.insert(row.try_get("user_id")?);
            }
        }
        Ok(erased)
    }
}
