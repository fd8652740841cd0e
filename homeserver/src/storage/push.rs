//! Push notifications: the pushers and where each stands, the notifications the push-rule
//! evaluator writes, and how far it has read the stream.
//!
//! Two jobs are shared by the workers of a deployment through leases on rows, stamped with the
//! database's clock on Postgres (workers on several hosts; no two hosts' clocks are compared) and
//! with this host's on SQLite (every worker on one host):
//! - **evaluating**: one worker at a time holds `push_progress`; it reads the stream past the
//!   position there and writes the notifications it found together with the new position, in one
//!   transaction that commits only while its lease holds ([`PushStore::record_notifications`]),
//!   so each event is evaluated once, and none is skipped, whatever crashes;
//! - **delivering**: a pusher is claimed by one worker at a time ([`PushStore::claim_pushers`]),
//!   and every step of its delivery (moving on, backing off, releasing) is conditioned on still
//!   holding it. Its position (the last notification delivered or given up on) is durable, so a
//!   restarted server resumes where it stopped.

use async_trait::async_trait;
use ruma::{RoomId, UserId};
use sqlx::{Row, any::AnyRow};

use super::{
    Backend, SqlStore, StoreResult, StoredEvent, now_ms,
    rooms::{EVENT_COLUMNS, event_from_row},
};

/// Which pusher: the spec's identity of one (app id and pushkey, per user).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PusherKey {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
}

/// A pusher with its delivery state, as claimed for delivery.
#[derive(Debug, Clone)]
pub struct PusherRecord {
    pub key: PusherKey,
    /// The pusher as the client set it (ruma's `Pusher`, as JSON).
    pub data: String,
    /// When it was set, in milliseconds (the push gateway's `pushkey_ts`, in seconds).
    pub created_ts: i64,
    /// The stream position of the last notification delivered or given up on.
    pub position: i64,
    /// Failed attempts at the next notification.
    pub failures: i64,
    /// A read receipt moved the user's unread count since the last push.
    pub badge: bool,
}

/// A notification the evaluator found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNotification {
    pub user_id: String,
    /// The event's position in the stream.
    pub stream_ordering: i64,
    pub room_id: String,
    pub event_id: String,
    pub event_type: String,
    /// The push rule's actions, as JSON.
    pub actions: String,
    pub highlight: bool,
    pub ts: i64,
}

/// A stored notification with its event (as stored now: redacted if it was redacted since).
#[derive(Debug, Clone)]
pub struct NotificationRecord {
    pub stream_ordering: i64,
    pub room_id: String,
    pub event_type: String,
    pub actions: String,
    pub highlight: bool,
    pub ts: i64,
    pub event: StoredEvent,
}

/// A user's notifications in one room after their read receipt, as far as the evaluator has
/// gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredUnread {
    pub notify: u64,
    pub highlight: u64,
    /// The counts cover the events up to here: the lower of the evaluator's position and the
    /// position asked for.
    pub through: i64,
}

#[async_trait]
pub trait PushStore: Send + Sync {
    /// Creates or replaces a pusher. A new one starts at the evaluator's position: it is sent
    /// what is found from now on, not the user's older notifications. With `exclusive`, the same
    /// app id and pushkey are removed from other users (the spec's `append: false`).
    /// `device_id`: the device that set it, whose deletion deletes it.
    async fn put_pusher(
        &self,
        key: &PusherKey,
        kind: &str,
        data: &str,
        exclusive: bool,
        device_id: Option<&str>,
    ) -> StoreResult<()>;
    /// Removes a pusher; `false` if there was none.
    async fn delete_pusher(&self, key: &PusherKey) -> StoreResult<bool>;
    /// A user's pushers, as stored JSON.
    async fn pushers(&self, user_id: &UserId) -> StoreResult<Vec<String>>;

    /// Takes (or renews) the evaluator's lease for `lease_ms`; the position to evaluate from, or
    /// `None` while another worker holds it.
    async fn claim_push_progress(&self, owner: &str, lease_ms: i64) -> StoreResult<Option<i64>>;
    /// Stores `notifications` and moves the evaluator to `position`, in one transaction, only if
    /// `owner` still holds the lease (renewing it); `false` (and nothing written) otherwise.
    async fn record_notifications(
        &self,
        owner: &str,
        lease_ms: i64,
        position: i64,
        notifications: &[NewNotification],
    ) -> StoreResult<bool>;
    /// Gives the evaluator's lease up (a graceful stop).
    async fn release_push_progress(&self, owner: &str) -> StoreResult<()>;

    /// The user's notifications and highlights in a room in `(after, upto]`, as far as the
    /// evaluator has gone.
    async fn unread_counts(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        after: i64,
        upto: i64,
    ) -> StoreResult<StoredUnread>;
    /// A user's notifications below `before`, newest first, at most `limit`.
    async fn notifications(
        &self,
        user_id: &UserId,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> StoreResult<Vec<NotificationRecord>>;
    /// What a push gateway shows on the user's badge: unread notifications in the rooms they are
    /// joined to (after their read receipt, or without one after their membership event, as
    /// Synapse counts) plus the invites they have not answered (as Synapse counts them too), and
    /// how many of the notifications are calls (`m.call.invite`).
    async fn badge_counts(&self, user_id: &UserId) -> StoreResult<(u64, u64)>;
    /// Deletes notifications older than `ts`; how many went.
    async fn prune_notifications(&self, before_ts: i64) -> StoreResult<u64>;
    /// Every user with a membership in a room: (user id, membership, position of that membership).
    async fn members_with_positions(&self, room_id: &RoomId) -> StoreResult<Vec<(String, String, i64)>>;

    /// Marks the user's pushers as owing their gateway a new badge count.
    async fn mark_badge(&self, user_id: &UserId) -> StoreResult<()>;
    /// Claims up to `limit` HTTP pushers that have something to send and are due (not backing
    /// off), for `lease_ms`.
    async fn claim_pushers(&self, owner: &str, lease_ms: i64, limit: i64) -> StoreResult<Vec<PusherRecord>>;
    /// Renews a claim; `false` if it is no longer `owner`'s (or the pusher is gone).
    async fn renew_pusher(&self, key: &PusherKey, owner: &str, lease_ms: i64) -> StoreResult<bool>;
    /// The user's first notification after `after`.
    async fn next_notification(&self, user_id: &str, after: i64) -> StoreResult<Option<NotificationRecord>>;
    /// Moves a claimed pusher past the notification at `position` (delivered, or given up on)
    /// and clears its failures; `false` if the claim was lost.
    async fn pusher_advanced(&self, key: &PusherKey, owner: &str, position: i64) -> StoreResult<bool>;
    /// Records a failed attempt and releases the claim: the next is due in `delay_ms`.
    async fn pusher_backoff(
        &self,
        key: &PusherKey,
        owner: &str,
        failures: i64,
        delay_ms: i64,
    ) -> StoreResult<()>;
    /// Clears the badge mark of a claimed pusher; whether it was set.
    async fn take_badge(&self, key: &PusherKey, owner: &str) -> StoreResult<bool>;
    /// Sets the badge mark again (the badge push failed).
    async fn restore_badge(&self, key: &PusherKey) -> StoreResult<()>;
    /// Releases a claim.
    async fn release_pusher(&self, key: &PusherKey, owner: &str) -> StoreResult<()>;
    /// Releases every claim of `owner` (a graceful stop).
    async fn release_pushers(&self, owner: &str) -> StoreResult<()>;
}

impl SqlStore {
    /// The clock leases are stamped with, in milliseconds: the database's on Postgres, this
    /// host's on SQLite (an integer this process formats, never user input).
    fn now_sql(&self) -> String {
        match self.backend {
            Backend::Postgres => super::stream::PG_NOW_MS.to_owned(),
            Backend::Sqlite => now_ms().to_string(),
        }
    }

    /// `statement` with `{now}` replaced by [`Self::now_sql`].
    fn with_now(&self, statement: &str) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(statement.replace("{now}", &self.now_sql()))
    }
}

fn notification_from_row(row: &AnyRow) -> StoreResult<NotificationRecord> {
    Ok(NotificationRecord {
        stream_ordering: row.try_get("stream_ordering")?,
        room_id: row.try_get("room_id")?,
        event_type: row.try_get("event_type")?,
        actions: row.try_get("actions")?,
        highlight: row.try_get::<i16, _>("highlight")? != 0,
        ts: row.try_get("ts")?,
        event: event_from_row(row)?,
    })
}

fn pusher_from_row(row: &AnyRow) -> StoreResult<PusherRecord> {
    Ok(PusherRecord {
        key: PusherKey {
            user_id: row.try_get("user_id")?,
            app_id: row.try_get("app_id")?,
            pushkey: row.try_get("pushkey")?,
        },
        data: row.try_get("data")?,
        created_ts: row.try_get("created_ts")?,
        position: row.try_get("position")?,
        failures: row.try_get("failures")?,
        badge: row.try_get::<i16, _>("badge")? != 0,
    })
}

/// The columns of a notification joined with its event (`n` and `e`).
fn notification_columns() -> String {
    let event = EVENT_COLUMNS.split(", ").map(|column| format!("e.{column}")).collect::<Vec<_>>().join(", ");
    format!("n.event_type, n.actions, n.highlight, n.ts, {event}")
}

/// Rows per multi-row INSERT: 8 columns each, well under SQLite's limit on bound values.
const INSERT_CHUNK: usize = 100;

#[async_trait]
impl PushStore for SqlStore {
    async fn put_pusher(
        &self,
        key: &PusherKey,
        kind: &str,
        data: &str,
        exclusive: bool,
        device_id: Option<&str>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if exclusive {
            sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
                .bind(&key.app_id)
                .bind(&key.pushkey)
                .bind(&key.user_id)
                .execute(&mut *tx)
                .await?;
        }
        // A pusher set again keeps its place in the notifications, and starts afresh on retries.
        sqlx::query(
            "INSERT INTO pushers (user_id, app_id, pushkey, data, kind, created_ts, position, device_id)
             VALUES ($1, $2, $3, $4, $5, $6, (SELECT position FROM push_progress WHERE id = 1), $7)
             ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET data = excluded.data, kind = excluded.kind,
                 created_ts = excluded.created_ts, failures = 0, retry_at = 0, device_id = excluded.device_id",
        )
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(data)
        .bind(kind)
        .bind(now_ms())
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_pusher(&self, key: &PusherKey) -> StoreResult<bool> {
        let deleted = sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
            .bind(&key.user_id)
            .bind(&key.app_id)
            .bind(&key.pushkey)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn pushers(&self, user_id: &UserId) -> StoreResult<Vec<String>> {
        sqlx::query("SELECT data FROM pushers WHERE user_id = $1 ORDER BY app_id, pushkey")
            .bind(user_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("data").map_err(Into::into))
            .collect()
    }

    async fn claim_push_progress(&self, owner: &str, lease_ms: i64) -> StoreResult<Option<i64>> {
        let row = sqlx::query(self.with_now(
            "UPDATE push_progress SET owner = $1, lease_until = {now} + $2
             WHERE id = 1 AND (owner IS NULL OR owner = $1 OR lease_until < {now}) RETURNING position",
        ))
        .bind(owner)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get("position").map_err(Into::into)).transpose()
    }

    async fn record_notifications(
        &self,
        owner: &str,
        lease_ms: i64,
        position: i64,
        notifications: &[NewNotification],
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        // First, so that the row stays locked (Postgres) or the database (SQLite) until commit:
        // a worker that takes the lease over afterwards reads the new position.
        let held = sqlx::query(self.with_now(
            "UPDATE push_progress SET position = $2, lease_until = {now} + $3
             WHERE id = 1 AND owner = $1 AND lease_until >= {now} AND position <= $2",
        ))
        .bind(owner)
        .bind(position)
        .bind(lease_ms)
        .execute(&mut *tx)
        .await?;
        if held.rows_affected() != 1 {
            return Ok(false);
        }
        for chunk in notifications.chunks(INSERT_CHUNK) {
            let values = (0..chunk.len())
                .map(|i| {
                    let n = i * 8;
                    format!(
                        "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                        n + 1,
                        n + 2,
                        n + 3,
                        n + 4,
                        n + 5,
                        n + 6,
                        n + 7,
                        n + 8
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = sqlx::AssertSqlSafe(format!(
                "INSERT INTO notifications (user_id, stream_ordering, room_id, event_id, event_type, actions, highlight, ts)
                 VALUES {values} ON CONFLICT (user_id, stream_ordering) DO NOTHING"
            ));
            let mut query = sqlx::query(sql);
            for n in chunk {
                query = query
                    .bind(&n.user_id)
                    .bind(n.stream_ordering)
                    .bind(&n.room_id)
                    .bind(&n.event_id)
                    .bind(&n.event_type)
                    .bind(&n.actions)
                    .bind(i16::from(n.highlight))
                    .bind(n.ts);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn release_push_progress(&self, owner: &str) -> StoreResult<()> {
        sqlx::query("UPDATE push_progress SET owner = NULL, lease_until = 0 WHERE id = 1 AND owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn unread_counts(
        &self,
        user_id: &UserId,
        room_id: &RoomId,
        after: i64,
        upto: i64,
    ) -> StoreResult<StoredUnread> {
        // One statement: the counts and the position they are complete up to, consistently.
        let row = sqlx::query(
            "SELECT p.position AS position,
                 (SELECT COUNT(*) FROM notifications n WHERE n.user_id = $1 AND n.room_id = $2
                     AND n.stream_ordering > $3 AND n.stream_ordering <= $4 AND n.stream_ordering <= p.position) AS notify,
                 (SELECT COUNT(*) FROM notifications n WHERE n.user_id = $1 AND n.room_id = $2
                     AND n.stream_ordering > $3 AND n.stream_ordering <= $4 AND n.stream_ordering <= p.position
                     AND n.highlight = 1) AS highlight
             FROM push_progress p WHERE p.id = 1",
        )
        .bind(user_id.as_str())
        .bind(room_id.as_str())
        .bind(after)
        .bind(upto)
        .fetch_one(&self.pool)
        .await?;
        let position: i64 = row.try_get("position")?;
        let count = |name: &str| -> StoreResult<u64> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
        };
        Ok(StoredUnread {
            notify: count("notify")?,
            highlight: count("highlight")?,
            through: position.min(upto),
        })
    }

    async fn notifications(
        &self,
        user_id: &UserId,
        before: i64,
        limit: i64,
        only_highlight: bool,
    ) -> StoreResult<Vec<NotificationRecord>> {
        let highlight = if only_highlight { "AND n.highlight = 1" } else { "" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM notifications n JOIN events e ON e.stream_ordering = n.stream_ordering
             WHERE n.user_id = $1 AND n.stream_ordering < $2 {highlight}
             ORDER BY n.stream_ordering DESC LIMIT $3",
            notification_columns()
        ));
        sqlx::query(sql)
            .bind(user_id.as_str())
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(notification_from_row)
            .collect()
    }

    async fn badge_counts(&self, user_id: &UserId) -> StoreResult<(u64, u64)> {
        let row = sqlx::query(
            "SELECT COUNT(*) + (SELECT COUNT(*) FROM memberships i WHERE i.user_id = $1 AND i.membership = 'invite')
                 AS unread,
                 COUNT(CASE WHEN n.event_type = 'm.call.invite' THEN 1 END) AS calls
             FROM notifications n
             JOIN memberships m ON m.room_id = n.room_id AND m.user_id = n.user_id AND m.membership = 'join'
             WHERE n.user_id = $1 AND n.stream_ordering > COALESCE(
                 (SELECT MAX(e.stream_ordering) FROM receipts r JOIN events e ON e.event_id = r.event_id
                  WHERE r.room_id = n.room_id AND r.user_id = n.user_id
                    AND r.receipt_type IN ('m.read', 'm.read.private')), m.stream_ordering)",
        )
        .bind(user_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        let count = |name: &str| -> StoreResult<u64> {
            Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
        };
        Ok((count("unread")?, count("calls")?))
    }

    async fn prune_notifications(&self, before_ts: i64) -> StoreResult<u64> {
        let deleted = sqlx::query("DELETE FROM notifications WHERE ts < $1")
            .bind(before_ts)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected())
    }

    async fn members_with_positions(&self, room_id: &RoomId) -> StoreResult<Vec<(String, String, i64)>> {
        sqlx::query("SELECT user_id, membership, stream_ordering FROM memberships WHERE room_id = $1")
            .bind(room_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("user_id")?, r.try_get("membership")?, r.try_get("stream_ordering")?)))
            .collect()
    }

    async fn mark_badge(&self, user_id: &UserId) -> StoreResult<()> {
        sqlx::query("UPDATE pushers SET badge = 1 WHERE user_id = $1 AND badge = 0")
            .bind(user_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_pushers(&self, owner: &str, lease_ms: i64, limit: i64) -> StoreResult<Vec<PusherRecord>> {
        // The outer condition is checked again on the row itself when it is updated, so two
        // workers that pick the same pusher cannot both claim it; on Postgres they do not even
        // wait for each other.
        let skip_locked = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let statement = format!(
            "UPDATE pushers SET owner = $1, lease_until = {{now}} + $2
             WHERE (app_id, pushkey, user_id) IN (
                 SELECT p.app_id, p.pushkey, p.user_id FROM pushers p
                 WHERE p.kind = 'http' AND p.retry_at <= {{now}} AND (p.owner IS NULL OR p.lease_until < {{now}})
                   AND (p.badge = 1 OR EXISTS (SELECT 1 FROM notifications n
                        WHERE n.user_id = p.user_id AND n.stream_ordering > p.position))
                 ORDER BY p.retry_at LIMIT $3 {skip_locked})
               AND (owner IS NULL OR lease_until < {{now}})
             RETURNING user_id, app_id, pushkey, data, created_ts, position, failures, badge"
        );
        sqlx::query(self.with_now(&statement))
            .bind(owner)
            .bind(lease_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(pusher_from_row)
            .collect()
    }

    async fn renew_pusher(&self, key: &PusherKey, owner: &str, lease_ms: i64) -> StoreResult<bool> {
        let renewed = sqlx::query(self.with_now(
            "UPDATE pushers SET lease_until = {now} + $5
             WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND owner = $4",
        ))
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(owner)
        .bind(lease_ms)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn next_notification(&self, user_id: &str, after: i64) -> StoreResult<Option<NotificationRecord>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM notifications n JOIN events e ON e.stream_ordering = n.stream_ordering
             WHERE n.user_id = $1 AND n.stream_ordering > $2 ORDER BY n.stream_ordering LIMIT 1",
            notification_columns()
        ));
        let row = sqlx::query(sql).bind(user_id).bind(after).fetch_optional(&self.pool).await?;
        row.as_ref().map(notification_from_row).transpose()
    }

    async fn pusher_advanced(&self, key: &PusherKey, owner: &str, position: i64) -> StoreResult<bool> {
        let moved = sqlx::query(
            "UPDATE pushers SET position = $5, failures = 0, retry_at = 0
             WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND owner = $4 AND position < $5",
        )
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(owner)
        .bind(position)
        .execute(&self.pool)
        .await?;
        Ok(moved.rows_affected() == 1)
    }

    async fn pusher_backoff(
        &self,
        key: &PusherKey,
        owner: &str,
        failures: i64,
        delay_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query(self.with_now(
            "UPDATE pushers SET failures = $5, retry_at = {now} + $6, owner = NULL, lease_until = 0
             WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND owner = $4",
        ))
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(owner)
        .bind(failures)
        .bind(delay_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn take_badge(&self, key: &PusherKey, owner: &str) -> StoreResult<bool> {
        let taken = sqlx::query(
            "UPDATE pushers SET badge = 0
             WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND owner = $4 AND badge = 1",
        )
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(taken.rows_affected() == 1)
    }

    async fn restore_badge(&self, key: &PusherKey) -> StoreResult<()> {
        sqlx::query("UPDATE pushers SET badge = 1 WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
            .bind(&key.user_id)
            .bind(&key.app_id)
            .bind(&key.pushkey)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_pusher(&self, key: &PusherKey, owner: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE pushers SET owner = NULL, lease_until = 0
             WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND owner = $4",
        )
        .bind(&key.user_id)
        .bind(&key.app_id)
        .bind(&key.pushkey)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn release_pushers(&self, owner: &str) -> StoreResult<()> {
        sqlx::query("UPDATE pushers SET owner = NULL, lease_until = 0 WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
