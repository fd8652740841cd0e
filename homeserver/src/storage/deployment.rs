//! What every worker of a deployment must share (`deployment_identity`).

use async_trait::async_trait;
use sqlx::Row;

use super::{SqlStore, StoreResult};

#[async_trait]
pub trait DeploymentStore: Send + Sync {
    /// Records `value` under `name` unless a value is there already; returns what is recorded
    /// now (the first worker's value wins, and every later one compares against it).
    async fn claim_identity(&self, name: &str, value: &str) -> StoreResult<String>;
}

#[async_trait]
impl DeploymentStore for SqlStore {
    async fn claim_identity(&self, name: &str, value: &str) -> StoreResult<String> {
        sqlx::query(
            "INSERT INTO deployment_identity (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT value FROM deployment_identity WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}
