//! OpenID tokens: short-lived proofs of who a user is, for third parties (a widget's server asks
//! `/_matrix/federation/v1/openid/userinfo` whose token it was handed). Kept as SHA-256 hashes.

use async_trait::async_trait;
use ruma::{OwnedUserId, UserId};
use sqlx::Row;

use super::{SqlStore, StoreResult, parse_id};

/// Unexpired tokens one user may hold; issuing another drops the oldest.
pub const MAX_OPENID_TOKENS_PER_USER: i64 = 20;

#[async_trait]
pub trait OpenIdStore: Send + Sync {
    /// Stores a token (its hash) valid until `expires_ts`; drops expired tokens, and the user's
    /// oldest beyond [`MAX_OPENID_TOKENS_PER_USER`].
    async fn add_openid_token(
        &self,
        token_hash: &str,
        user_id: &UserId,
        expires_ts: i64,
        now: i64,
    ) -> StoreResult<()>;
    /// The active user a token (its hash) names, if it is known, unexpired at `now`, and its user
    /// not deactivated.
    async fn openid_user(&self, token_hash: &str, now: i64) -> StoreResult<Option<OwnedUserId>>;
}

#[async_trait]
impl OpenIdStore for SqlStore {
    async fn add_openid_token(
        &self,
        token_hash: &str,
        user_id: &UserId,
        expires_ts: i64,
        now: i64,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM openid_tokens WHERE expires_ts <= $1").bind(now).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO openid_tokens (token_hash, user_id, expires_ts) VALUES ($1, $2, $3)")
            .bind(token_hash)
            .bind(user_id.as_str())
            .bind(expires_ts)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM openid_tokens WHERE user_id = $1 AND token_hash NOT IN (
                 SELECT token_hash FROM openid_tokens WHERE user_id = $1
                 ORDER BY expires_ts DESC, token_hash LIMIT $2)",
        )
        .bind(user_id.as_str())
        .bind(MAX_OPENID_TOKENS_PER_USER)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn openid_user(&self, token_hash: &str, now: i64) -> StoreResult<Option<OwnedUserId>> {
        let row = sqlx::query(
            "SELECT t.user_id FROM openid_tokens t JOIN users u ON u.user_id = t.user_id
             WHERE t.token_hash = $1 AND t.expires_ts > $2 AND u.deactivated = 0",
        )
        .bind(token_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| parse_id(row.try_get("user_id")?)).transpose()
    }
}
