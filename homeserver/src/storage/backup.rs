//! Key backup versions and the session keys in them.

use async_trait::async_trait;
use ruma::UserId;
use sqlx::Row;

use super::{SqlStore, StoreResult};

/// A backup version as stored.
#[derive(Debug, Clone)]
pub struct BackupVersion {
    pub version: i64,
    /// `{"algorithm": ..., "auth_data": {...}}`.
    pub algorithm: String,
    pub etag: i64,
    pub count: i64,
}

/// One backed-up Megolm session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupKey {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    /// The encrypted session data, as JSON.
    pub session_data: String,
}

impl BackupKey {
    /// The spec's rule for a session uploaded again: a verified key beats an unverified one,
    /// then the one that decrypts from an earlier message, then the less forwarded one.
    pub fn better_than(&self, stored: &BackupKey) -> bool {
        (!self.is_verified, self.first_message_index, self.forwarded_count)
            < (!stored.is_verified, stored.first_message_index, stored.forwarded_count)
    }
}

#[async_trait]
pub trait BackupStore: Send + Sync {
    /// Creates a version (numbered after every earlier one, deleted or not).
    async fn create_backup_version(&self, user_id: &UserId, algorithm: &str) -> StoreResult<i64>;
    /// A version that is not deleted; the newest when `version` is `None`.
    async fn backup_version(
        &self,
        user_id: &UserId,
        version: Option<i64>,
    ) -> StoreResult<Option<BackupVersion>>;
    /// Replaces a version's algorithm data; false if there is no such version.
    async fn update_backup_version(
        &self,
        user_id: &UserId,
        version: i64,
        algorithm: &str,
    ) -> StoreResult<bool>;
    /// Deletes a version and its keys; false if there was no such version.
    async fn delete_backup_version(&self, user_id: &UserId, version: i64) -> StoreResult<bool>;
    /// Stores keys, each replacing the stored one only if it is better; returns the version's
    /// etag and count afterwards.
    async fn put_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        keys: &[BackupKey],
    ) -> StoreResult<(i64, i64)>;
    /// Keys of a version, of one room or one session if given.
    async fn backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StoreResult<Vec<BackupKey>>;
    /// Deletes keys of a version (all, one room's, or one session); returns etag and count.
    async fn delete_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StoreResult<(i64, i64)>;
}

/// `AND room_id = $3 [AND session_id = $4]` for the parts given.
fn scope(room_id: Option<&str>, session_id: Option<&str>) -> &'static str {
    match (room_id, session_id) {
        (Some(_), Some(_)) => "AND room_id = $3 AND session_id = $4",
        (Some(_), None) => "AND room_id = $3",
        _ => "",
    }
}

impl SqlStore {
    /// A version's etag (bumped first when `bump`) and key count, inside a transaction.
    async fn backup_state(
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        user: &str,
        version: i64,
        bump: bool,
    ) -> StoreResult<(i64, i64)> {
        if bump {
            sqlx::query("UPDATE backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2")
                .bind(user)
                .bind(version)
                .execute(&mut **tx)
                .await?;
        }
        let row = sqlx::query(
            "SELECT etag, (SELECT COUNT(*) FROM backup_keys k WHERE k.user_id = $1 AND k.version = $2) AS n
             FROM backup_versions WHERE user_id = $1 AND version = $2",
        )
        .bind(user)
        .bind(version)
        .fetch_one(&mut **tx)
        .await?;
        Ok((row.try_get("etag")?, row.try_get("n")?))
    }
}

fn key_from_row(row: &sqlx::any::AnyRow) -> StoreResult<BackupKey> {
    Ok(BackupKey {
        room_id: row.try_get("room_id")?,
        session_id: row.try_get("session_id")?,
        first_message_index: row.try_get("first_message_index")?,
        forwarded_count: row.try_get("forwarded_count")?,
        is_verified: row.try_get::<i16, _>("is_verified")? != 0,
        session_data: row.try_get("session_data")?,
    })
}

const KEY_COLUMNS: &str =
    "room_id, session_id, first_message_index, forwarded_count, is_verified, session_data";

#[async_trait]
impl BackupStore for SqlStore {
    async fn create_backup_version(&self, user_id: &UserId, algorithm: &str) -> StoreResult<i64> {
        let mut tx = self.begin().await?;
        // Lock out a concurrent creation for the same user (SQLite locks the file anyway).
        let row = sqlx::query(
            "INSERT INTO backup_versions (user_id, version, algorithm, etag, deleted)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2, 0, 0 FROM backup_versions WHERE user_id = $1
             RETURNING version",
        )
        .bind(user_id.as_str())
        .bind(algorithm)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.try_get("version")?)
    }

    async fn backup_version(
        &self,
        user_id: &UserId,
        version: Option<i64>,
    ) -> StoreResult<Option<BackupVersion>> {
        let which = if version.is_some() { "AND version = $2" } else { "ORDER BY version DESC LIMIT 1" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT version, algorithm, etag,
                    (SELECT COUNT(*) FROM backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version) AS n
             FROM backup_versions v WHERE user_id = $1 AND deleted = 0 {which}"
        ));
        let mut query = sqlx::query(sql).bind(user_id.as_str());
        if let Some(version) = version {
            query = query.bind(version);
        }
        query
            .fetch_optional(&self.pool)
            .await?
            .map(|row| {
                Ok(BackupVersion {
                    version: row.try_get("version")?,
                    algorithm: row.try_get("algorithm")?,
                    etag: row.try_get("etag")?,
                    count: row.try_get("n")?,
                })
            })
            .transpose()
    }

    async fn update_backup_version(
        &self,
        user_id: &UserId,
        version: i64,
        algorithm: &str,
    ) -> StoreResult<bool> {
        let updated = sqlx::query(
            "UPDATE backup_versions SET algorithm = $3 WHERE user_id = $1 AND version = $2 AND deleted = 0
             RETURNING version",
        )
        .bind(user_id.as_str())
        .bind(version)
        .bind(algorithm)
        .fetch_optional(&self.pool)
        .await?;
        Ok(updated.is_some())
    }

    async fn delete_backup_version(&self, user_id: &UserId, version: i64) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let deleted = sqlx::query(
            "UPDATE backup_versions SET deleted = 1 WHERE user_id = $1 AND version = $2 AND deleted = 0
             RETURNING version",
        )
        .bind(user_id.as_str())
        .bind(version)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM backup_keys WHERE user_id = $1 AND version = $2")
            .bind(user_id.as_str())
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted.is_some())
    }

    async fn put_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        keys: &[BackupKey],
    ) -> StoreResult<(i64, i64)> {
        let user = user_id.as_str();
        let mut tx = self.begin().await?;
        // Take the version's row first: concurrent uploads to one version go one at a time.
        sqlx::query("UPDATE backup_versions SET etag = etag WHERE user_id = $1 AND version = $2")
            .bind(user)
            .bind(version)
            .execute(&mut *tx)
            .await?;
        let mut changed = false;
        for key in keys {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {KEY_COLUMNS} FROM backup_keys
                 WHERE user_id = $1 AND version = $2 AND room_id = $3 AND session_id = $4"
            ));
            let stored = sqlx::query(sql)
                .bind(user)
                .bind(version)
                .bind(&key.room_id)
                .bind(&key.session_id)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| key_from_row(&row))
                .transpose()?;
            if stored.as_ref().is_some_and(|stored| !key.better_than(stored)) {
                continue;
            }
            sqlx::query(
                "INSERT INTO backup_keys (user_id, version, room_id, session_id, first_message_index,
                     forwarded_count, is_verified, session_data)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET
                     first_message_index = excluded.first_message_index,
                     forwarded_count = excluded.forwarded_count, is_verified = excluded.is_verified,
                     session_data = excluded.session_data",
            )
            .bind(user)
            .bind(version)
            .bind(&key.room_id)
            .bind(&key.session_id)
            .bind(key.first_message_index)
            .bind(key.forwarded_count)
            .bind(i16::from(key.is_verified))
            .bind(&key.session_data)
            .execute(&mut *tx)
            .await?;
            changed = true;
        }
        let state = Self::backup_state(&mut tx, user, version, changed).await?;
        tx.commit().await?;
        Ok(state)
    }

    async fn backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StoreResult<Vec<BackupKey>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {KEY_COLUMNS} FROM backup_keys WHERE user_id = $1 AND version = $2 {}
             ORDER BY room_id, session_id",
            scope(room_id, session_id)
        ));
        let mut query = sqlx::query(sql).bind(user_id.as_str()).bind(version);
        for part in [room_id, session_id].into_iter().flatten() {
            query = query.bind(part);
        }
        query.fetch_all(&self.pool).await?.iter().map(key_from_row).collect()
    }

    async fn delete_backup_keys(
        &self,
        user_id: &UserId,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> StoreResult<(i64, i64)> {
        let user = user_id.as_str();
        let mut tx = self.begin().await?;
        let sql = sqlx::AssertSqlSafe(format!(
            "DELETE FROM backup_keys WHERE user_id = $1 AND version = $2 {}",
            scope(room_id, session_id)
        ));
        let mut query = sqlx::query(sql).bind(user).bind(version);
        for part in [room_id, session_id].into_iter().flatten() {
            query = query.bind(part);
        }
        let deleted = query.execute(&mut *tx).await?.rows_affected();
        let state = Self::backup_state(&mut tx, user, version, deleted > 0).await?;
        tx.commit().await?;
        Ok(state)
    }
}
