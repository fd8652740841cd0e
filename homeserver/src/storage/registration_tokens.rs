//! Registration tokens (`m.login.registration_token`), stored as SHA-256 hashes.

use async_trait::async_trait;

use super::{SqlStore, StoreResult, now_ms};

#[async_trait]
pub trait RegistrationTokenStore: Send + Sync {
    async fn create_registration_token(
        &self,
        token_hash: &str,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> StoreResult<()>;
    /// Whether the token exists, has not expired and has uses left.
    async fn registration_token_valid(&self, token_hash: &str, now_ts: i64) -> StoreResult<bool>;
    /// Takes one use of the token if it is valid, atomically; `false` if it was not.
    async fn use_registration_token(&self, token_hash: &str, now_ts: i64) -> StoreResult<bool>;
}

const VALID: &str = "token_hash = $1 AND (expiry_ts IS NULL OR expiry_ts > $2)
                     AND (uses_allowed IS NULL OR completed < uses_allowed)";

#[async_trait]
impl RegistrationTokenStore for SqlStore {
    async fn create_registration_token(
        &self,
        token_hash: &str,
        uses_allowed: Option<i64>,
        expiry_ts: Option<i64>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO registration_tokens (token_hash, uses_allowed, completed, expiry_ts, created_ts)
             VALUES ($1, $2, 0, $3, $4)",
        )
        .bind(token_hash)
        .bind(uses_allowed)
        .bind(expiry_ts)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn registration_token_valid(&self, token_hash: &str, now_ts: i64) -> StoreResult<bool> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT token_hash FROM registration_tokens WHERE {VALID}"));
        let row = sqlx::query(sql).bind(token_hash).bind(now_ts).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }

    async fn use_registration_token(&self, token_hash: &str, now_ts: i64) -> StoreResult<bool> {
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE registration_tokens SET completed = completed + 1 WHERE {VALID} RETURNING token_hash"
        ));
        let row = sqlx::query(sql).bind(token_hash).bind(now_ts).fetch_optional(&self.pool).await?;
        Ok(row.is_some())
    }
}
