//! User-Interactive Auth sessions, kept in the database so any worker can continue one.

use async_trait::async_trait;
use ruma::OwnedUserId;
use sqlx::Row;

use super::{SqlStore, StoreError, StoreResult, parse_id};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiaSessionRecord {
    pub session_id: String,
    /// What the session authorises (`register`, `delete_devices`, …); a session started for one
    /// operation cannot complete another.
    pub operation: String,
    /// The user it was started for; `None` for registration.
    pub user_id: Option<OwnedUserId>,
    /// Stage types completed so far, in order.
    pub completed: Vec<String>,
    /// Verification sessions (`sid`s) whose addresses the completed stages proved.
    pub threepid_sids: Vec<String>,
    pub created_ts: i64,
    /// The request's parameters (JSON) as the endpoint keeps them, for later steps that send
    /// only `auth`.
    pub params: Option<String>,
    /// What the completed operation produced (the registered user id), for a replay.
    pub result: Option<String>,
}

#[async_trait]
pub trait UiaStore: Send + Sync {
    async fn create_uia_session(&self, session: &UiaSessionRecord) -> StoreResult<()>;
    async fn get_uia_session(&self, session_id: &str) -> StoreResult<Option<UiaSessionRecord>>;
    /// Records the stages completed so far and the addresses they proved.
    async fn set_uia_completed(
        &self,
        session_id: &str,
        completed: &[String],
        threepid_sids: &[String],
    ) -> StoreResult<()>;
    /// Replaces the remembered parameters.
    async fn set_uia_params(&self, session_id: &str, params: &str) -> StoreResult<()>;
    /// Records what the completed operation produced.
    async fn set_uia_result(&self, session_id: &str, result: &str) -> StoreResult<()>;
    async fn delete_uia_session(&self, session_id: &str) -> StoreResult<()>;
    /// Removes sessions created before `before_ts`; returns how many.
    async fn delete_uia_sessions_before(&self, before_ts: i64) -> StoreResult<u64>;
}

fn to_json(list: &[String]) -> StoreResult<String> {
    serde_json::to_string(list).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json(text: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl UiaStore for SqlStore {
    async fn create_uia_session(&self, session: &UiaSessionRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO uia_sessions
                 (session_id, operation, user_id, completed, threepid_sids, created_ts, params, result)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&session.session_id)
        .bind(&session.operation)
        .bind(session.user_id.as_ref().map(|u| u.as_str()))
        .bind(to_json(&session.completed)?)
        .bind(to_json(&session.threepid_sids)?)
        .bind(session.created_ts)
        .bind(&session.params)
        .bind(&session.result)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_uia_session(&self, session_id: &str) -> StoreResult<Option<UiaSessionRecord>> {
        let row = sqlx::query(
            "SELECT operation, user_id, completed, threepid_sids, created_ts, params, result FROM uia_sessions
             WHERE session_id = $1",
        )
        .bind(session_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(UiaSessionRecord {
                session_id: session_id.to_owned(),
                operation: row.try_get("operation")?,
                user_id: row.try_get::<Option<String>, _>("user_id")?.map(parse_id).transpose()?,
                completed: from_json(&row.try_get::<String, _>("completed")?)?,
                threepid_sids: from_json(&row.try_get::<String, _>("threepid_sids")?)?,
                created_ts: row.try_get("created_ts")?,
                params: row.try_get("params")?,
                result: row.try_get("result")?,
            })
        })
        .transpose()
    }

    async fn set_uia_completed(
        &self,
        session_id: &str,
        completed: &[String],
        threepid_sids: &[String],
    ) -> StoreResult<()> {
        sqlx::query("UPDATE uia_sessions SET completed = $2, threepid_sids = $3 WHERE session_id = $1")
            .bind(session_id)
            .bind(to_json(completed)?)
            .bind(to_json(threepid_sids)?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_uia_params(&self, session_id: &str, params: &str) -> StoreResult<()> {
        sqlx::query("UPDATE uia_sessions SET params = $2 WHERE session_id = $1")
            .bind(session_id)
            .bind(params)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_uia_result(&self, session_id: &str, result: &str) -> StoreResult<()> {
        sqlx::query("UPDATE uia_sessions SET result = $2 WHERE session_id = $1")
            .bind(session_id)
            .bind(result)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_uia_session(&self, session_id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM uia_sessions WHERE session_id = $1")
            .bind(session_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_uia_sessions_before(&self, before_ts: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM uia_sessions WHERE created_ts < $1")
            .bind(before_ts)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
