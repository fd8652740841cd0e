//! Profiles, account data, filters and receipts (pushers are in `push.rs`).

use async_trait::async_trait;
use ruma::UserId;
use sqlx::Row;

use super::{SqlStore, StoreResult, now_ms};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDataRecord {
    /// `None` for global account data.
    pub room_id: Option<String>,
    pub data_type: String,
    pub content: String,
    pub stream_ordering: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub room_id: String,
    pub user_id: String,
    pub receipt_type: String,
    /// `None` for unthreaded receipts.
    pub thread_id: Option<String>,
    pub event_id: String,
    pub ts: i64,
    pub stream_ordering: i64,
}

#[async_trait]
pub trait UserDataStore: Send + Sync {
    /// (displayname, avatar_url).
    async fn profile(&self, user_id: &UserId) -> StoreResult<(Option<String>, Option<String>)>;
    async fn set_displayname(&self, user_id: &UserId, name: Option<&str>) -> StoreResult<()>;
    async fn set_avatar_url(&self, user_id: &UserId, url: Option<&str>) -> StoreResult<()>;

    /// Stores account data at a stream position (`room_id` `None` for global).
    async fn put_account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
        position: i64,
    ) -> StoreResult<()>;
    async fn account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
    ) -> StoreResult<Option<String>>;
    /// Replaces an item of account data with what `update` makes of its content (`None`: there is
    /// none yet), at `position`. Updates of one user's data through here apply one after the
    /// other, so two edits of one item (two tags added at once) cannot lose one. `update`
    /// answering `Ok(None)` leaves the item as it is (the result is then `Ok(false)`); its error
    /// is handed back.
    async fn update_account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
        position: i64,
        update: &(dyn for<'c> Fn(Option<&'c str>) -> Result<Option<String>, String> + Send + Sync),
    ) -> StoreResult<Result<bool, String>>;
    /// A user's account data changed in `(after, upto]`.
    async fn account_data_changes(
        &self,
        user_id: &UserId,
        after: i64,
        upto: i64,
    ) -> StoreResult<Vec<AccountDataRecord>>;

    /// Stores a filter and returns its id.
    async fn create_filter(&self, user_id: &UserId, filter: &str) -> StoreResult<i64>;
    async fn filter(&self, user_id: &UserId, filter_id: i64) -> StoreResult<Option<String>>;

    /// Moves a user's receipt forward: one for an event older in the room than the event it is at
    /// now changes nothing (as in Synapse).
    async fn put_receipt(&self, receipt: &ReceiptRecord) -> StoreResult<()>;
    /// Receipts in a room changed in `(after, upto]`.
    async fn receipt_changes(&self, room_id: &str, after: i64, upto: i64) -> StoreResult<Vec<ReceiptRecord>>;
    /// Receipts changed in `(after, upto]` in every room, oldest first.
    async fn stream_receipts(&self, after: i64, upto: i64) -> StoreResult<Vec<ReceiptRecord>>;
    /// Users whose account data changed in `(after, upto]`, with the position of each change.
    async fn stream_account_data(&self, after: i64, upto: i64) -> StoreResult<Vec<(String, i64)>>;

    /// The stream position of the event a user last marked read in a room (public or private).
    async fn read_up_to(&self, room_id: &str, user_id: &UserId) -> StoreResult<Option<i64>>;
}

impl SqlStore {
    /// Receipts changed in `(after, upto]`, in one room or all, oldest first.
    async fn receipts_between(
        &self,
        room_id: Option<&str>,
        after: i64,
        upto: i64,
    ) -> StoreResult<Vec<ReceiptRecord>> {
        let in_room = if room_id.is_some() { "AND room_id = $3" } else { "" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts, stream_ordering FROM receipts
             WHERE stream_ordering > $1 AND stream_ordering <= $2 {in_room} ORDER BY stream_ordering"
        ));
        let mut query = sqlx::query(sql).bind(after).bind(upto);
        if let Some(room_id) = room_id {
            query = query.bind(room_id);
        }
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                let thread: String = row.try_get("thread_id")?;
                Ok(ReceiptRecord {
                    room_id: row.try_get("room_id")?,
                    user_id: row.try_get("user_id")?,
                    receipt_type: row.try_get("receipt_type")?,
                    thread_id: (!thread.is_empty()).then_some(thread),
                    event_id: row.try_get("event_id")?,
                    ts: row.try_get("ts")?,
                    stream_ordering: row.try_get("stream_ordering")?,
                })
            })
            .collect()
    }

    /// Upserts one profile column (`sql` binds the user id and the value).
    async fn set_profile_field(
        &self,
        sql: &'static str,
        user_id: &UserId,
        value: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(sql).bind(user_id.as_str()).bind(value).execute(&self.pool).await?;
        Ok(())
    }
}

/// One account data entry's content (global ones have the empty `room_id`).
const SELECT_ACCOUNT_DATA: &str =
    "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3";

/// Sets one account data entry at a stream position.
const UPSERT_ACCOUNT_DATA: &str =
    "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering) VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (user_id, room_id, data_type)
     DO UPDATE SET content = excluded.content, stream_ordering = excluded.stream_ordering";

#[async_trait]
impl UserDataStore for SqlStore {
    async fn profile(&self, user_id: &UserId) -> StoreResult<(Option<String>, Option<String>)> {
        let row = sqlx::query("SELECT displayname, avatar_url FROM profiles WHERE user_id = $1")
            .bind(user_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(row) => Ok((row.try_get("displayname")?, row.try_get("avatar_url")?)),
            None => Ok((None, None)),
        }
    }

    async fn set_displayname(&self, user_id: &UserId, name: Option<&str>) -> StoreResult<()> {
        self.set_profile_field(
            "INSERT INTO profiles (user_id, displayname) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET displayname = excluded.displayname",
            user_id,
            name,
        )
        .await
    }

    async fn set_avatar_url(&self, user_id: &UserId, url: Option<&str>) -> StoreResult<()> {
        self.set_profile_field(
            "INSERT INTO profiles (user_id, avatar_url) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET avatar_url = excluded.avatar_url",
            user_id,
            url,
        )
        .await
    }

    async fn put_account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
        content: &str,
        position: i64,
    ) -> StoreResult<()> {
        sqlx::query(UPSERT_ACCOUNT_DATA)
            .bind(user_id.as_str())
            .bind(room_id.unwrap_or_default())
            .bind(data_type)
            .bind(content)
            .bind(position)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
    ) -> StoreResult<Option<String>> {
        let row = sqlx::query(SELECT_ACCOUNT_DATA)
            .bind(user_id.as_str())
            .bind(room_id.unwrap_or_default())
            .bind(data_type)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("content").map_err(Into::into)).transpose()
    }

    async fn update_account_data(
        &self,
        user_id: &UserId,
        room_id: Option<&str>,
        data_type: &str,
        position: i64,
        update: &(dyn for<'c> Fn(Option<&'c str>) -> Result<Option<String>, String> + Send + Sync),
    ) -> StoreResult<Result<bool, String>> {
        let mut tx = self.begin().await?;
        // A write first: it locks the user's row on Postgres, and takes SQLite's write lock up
        // front, so the read below sees what the previous update wrote.
        sqlx::query("UPDATE users SET user_id = user_id WHERE user_id = $1")
            .bind(user_id.as_str())
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(SELECT_ACCOUNT_DATA)
            .bind(user_id.as_str())
            .bind(room_id.unwrap_or_default())
            .bind(data_type)
            .fetch_optional(&mut *tx)
            .await?;
        let current: Option<String> = row.map(|r| r.try_get("content")).transpose()?;
        let content = match update(current.as_deref()) {
            Ok(Some(content)) => content,
            Ok(None) => return Ok(Ok(false)),
            Err(refused) => return Ok(Err(refused)),
        };
        sqlx::query(UPSERT_ACCOUNT_DATA)
            .bind(user_id.as_str())
            .bind(room_id.unwrap_or_default())
            .bind(data_type)
            .bind(content)
            .bind(position)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(true))
    }

    async fn account_data_changes(
        &self,
        user_id: &UserId,
        after: i64,
        upto: i64,
    ) -> StoreResult<Vec<AccountDataRecord>> {
        sqlx::query(
            "SELECT room_id, data_type, content, stream_ordering FROM account_data
             WHERE user_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3 ORDER BY stream_ordering",
        )
        .bind(user_id.as_str())
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let room: String = row.try_get("room_id")?;
            Ok(AccountDataRecord {
                room_id: (!room.is_empty()).then_some(room),
                data_type: row.try_get("data_type")?,
                content: row.try_get("content")?,
                stream_ordering: row.try_get("stream_ordering")?,
            })
        })
        .collect()
    }

    async fn create_filter(&self, user_id: &UserId, filter: &str) -> StoreResult<i64> {
        let row = sqlx::query(
            "INSERT INTO filters (user_id, filter_id, filter)
             VALUES ($1, (SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = $1), $2)
             RETURNING filter_id",
        )
        .bind(user_id.as_str())
        .bind(filter)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("filter_id")?)
    }

    async fn filter(&self, user_id: &UserId, filter_id: i64) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT filter FROM filters WHERE user_id = $1 AND filter_id = $2")
            .bind(user_id.as_str())
            .bind(filter_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("filter").map_err(Into::into)).transpose()
    }

    async fn put_receipt(&self, r: &ReceiptRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO receipts (room_id, user_id, receipt_type, thread_id, event_id, ts, stream_ordering)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE SET
                 event_id = excluded.event_id, ts = excluded.ts, stream_ordering = excluded.stream_ordering
             WHERE COALESCE((SELECT e.stream_ordering FROM events e WHERE e.event_id = receipts.event_id), -1)
                 < (SELECT e.stream_ordering FROM events e WHERE e.event_id = excluded.event_id)",
        )
        .bind(&r.room_id)
        .bind(&r.user_id)
        .bind(&r.receipt_type)
        .bind(r.thread_id.as_deref().unwrap_or_default())
        .bind(&r.event_id)
        .bind(if r.ts == 0 { now_ms() } else { r.ts })
        .bind(r.stream_ordering)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn receipt_changes(&self, room_id: &str, after: i64, upto: i64) -> StoreResult<Vec<ReceiptRecord>> {
        self.receipts_between(Some(room_id), after, upto).await
    }

    async fn stream_receipts(&self, after: i64, upto: i64) -> StoreResult<Vec<ReceiptRecord>> {
        self.receipts_between(None, after, upto).await
    }

    async fn stream_account_data(&self, after: i64, upto: i64) -> StoreResult<Vec<(String, i64)>> {
        sqlx::query(
            "SELECT user_id, stream_ordering FROM account_data
             WHERE stream_ordering > $1 AND stream_ordering <= $2 ORDER BY stream_ordering",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("user_id")?, row.try_get("stream_ordering")?)))
        .collect()
    }

    async fn read_up_to(&self, room_id: &str, user_id: &UserId) -> StoreResult<Option<i64>> {
        let row = sqlx::query(
            "SELECT MAX(e.stream_ordering) AS position FROM receipts r JOIN events e ON e.event_id = r.event_id
             WHERE r.room_id = $1 AND r.user_id = $2 AND r.receipt_type IN ('m.read', 'm.read.private')",
        )
        .bind(room_id)
        .bind(user_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("position")?)
    }
}
