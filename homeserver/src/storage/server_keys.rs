//! Other servers' signing keys (see [`crate::remote::keys`]).

use async_trait::async_trait;
use sqlx::Row;

use super::{SqlStore, StoreResult};

/// One key of another server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeyRecord {
    pub server_name: String,
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64.
    pub public_key: String,
    /// Until when the document listing it may be relied on, in ms.
    pub valid_until_ts: i64,
    /// When the server stopped using it, for a key listed as old.
    pub expired_ts: Option<i64>,
    /// The key document it came from, as that server signed it.
    pub document: String,
    pub fetched_ts: i64,
}

#[async_trait]
pub trait ServerKeyStore: Send + Sync {
    /// Stores the keys of one fetched document. A key already known keeps the later of its two
    /// validities: a document fetched out of order cannot shorten it.
    async fn store_server_keys(&self, keys: &[ServerKeyRecord]) -> StoreResult<()>;
    /// Every key known of `server_name`.
    async fn server_keys(&self, server_name: &str) -> StoreResult<Vec<ServerKeyRecord>>;
}

#[async_trait]
impl ServerKeyStore for SqlStore {
    async fn store_server_keys(&self, keys: &[ServerKeyRecord]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for key in keys {
            sqlx::query(
                "INSERT INTO server_keys
                     (server_name, key_id, public_key, valid_until_ts, expired_ts, document, fetched_ts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (server_name, key_id) DO UPDATE SET
                     public_key = excluded.public_key, valid_until_ts = excluded.valid_until_ts,
                     expired_ts = excluded.expired_ts, document = excluded.document,
                     fetched_ts = excluded.fetched_ts
                 WHERE excluded.valid_until_ts >= server_keys.valid_until_ts",
            )
            .bind(&key.server_name)
            .bind(&key.key_id)
            .bind(&key.public_key)
            .bind(key.valid_until_ts)
            .bind(key.expired_ts)
            .bind(&key.document)
            .bind(key.fetched_ts)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn server_keys(&self, server_name: &str) -> StoreResult<Vec<ServerKeyRecord>> {
        sqlx::query(
            "SELECT server_name, key_id, public_key, valid_until_ts, expired_ts, document, fetched_ts
             FROM server_keys WHERE server_name = $1 ORDER BY key_id",
        )
        .bind(server_name)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(ServerKeyRecord {
                server_name: row.try_get("server_name")?,
                key_id: row.try_get("key_id")?,
                public_key: row.try_get("public_key")?,
                valid_until_ts: row.try_get("valid_until_ts")?,
                expired_ts: row.try_get("expired_ts")?,
                document: row.try_get("document")?,
                fetched_ts: row.try_get("fetched_ts")?,
            })
        })
        .collect()
    }
}
