//! The envelope queue: to-device messages waiting for their device.
//!
//! A message is queued before `sendToDevice` answers, at the request's stream position, and
//! stays until its device syncs with a token past it. Two implementations:
//!
//! - [`Embedded`]: the `to_device` table of the database (SQLite or Postgres), durable with it.
//!   The in-memory stream window sees its rows, so a sync skips devices with nothing new.
//! - [`RedisQueue`]: one Redis Stream per device (`XADD`), shared by every worker. With Redis
//!   running `appendonly yes` and `appendfsync always`, an answered send survives `kill -9` of
//!   Hearth and of Redis. A Lua script records the sender's transaction id and appends the
//!   envelopes in one atomic step, so a retried request after a crash is queued exactly once.
//!
//! Stream entries are appended in arrival order, which across workers is not quite position
//! order, so readers filter and sort by the `pos` field rather than by entry id.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use redis::{AsyncCommands, aio::ConnectionManager, streams::StreamRangeReply};
use ruma::{DeviceId, UserId};

use crate::{
    error::{Error, ErrorKind, Result},
    storage::{Envelope, Storage},
};

/// Sender transaction ids are remembered this long (a retry comes within seconds).
const TXN_TTL_SECS: u64 = 7 * 24 * 3600;
/// Most entries read from one device's stream at once.
const MAX_READ: usize = 1000;

#[async_trait]
pub trait EnvelopeQueue: Send + Sync {
    /// Queues `(user, device, json)` envelopes at `position`, once per sender device and
    /// transaction id; false if that transaction was queued before.
    async fn push(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        envelopes: &[(String, String, String)],
        position: i64,
    ) -> Result<bool>;
    /// A device's envelopes in `(after, upto]`, by position, at most `limit`.
    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<Envelope>>;
    /// Drops a device's envelopes at or below `upto`: the device has them.
    async fn acknowledge(&self, user: &UserId, device: &DeviceId, upto: i64) -> Result<()>;
    /// Drops everything waiting for a deleted device.
    async fn forget_device(&self, user: &UserId, device: &DeviceId) -> Result<()>;
    /// Whether the stream window ([`crate::rooms::recent`]) marks this queue's envelopes, so
    /// that a sync may skip reading a device with no mark.
    fn marked_in_stream(&self) -> bool;
}

/// Opens the queue the configuration asks for.
pub async fn open(
    config: &crate::config::RedisConfig,
    store: Arc<dyn Storage>,
) -> anyhow::Result<Arc<dyn EnvelopeQueue>> {
    if config.url.is_empty() {
        return Ok(Arc::new(Embedded { store }));
    }
    Ok(Arc::new(RedisQueue::connect(&config.url, &config.key_prefix).await?))
}

/// The queue in the database.
pub struct Embedded {
    store: Arc<dyn Storage>,
}

#[async_trait]
impl EnvelopeQueue for Embedded {
    async fn push(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        envelopes: &[(String, String, String)],
        position: i64,
    ) -> Result<bool> {
        Ok(self.store.queue_to_device(sender, sender_device, txn_id, envelopes, position).await?)
    }

    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<Envelope>> {
        Ok(self.store.to_device_messages(user, device, after, upto, limit).await?)
    }

    async fn acknowledge(&self, user: &UserId, device: &DeviceId, upto: i64) -> Result<()> {
        Ok(self.store.remove_to_device(user, device, upto).await?)
    }

    async fn forget_device(&self, _user: &UserId, _device: &DeviceId) -> Result<()> {
        // Deleting a device deletes its rows in the same transaction.
        Ok(())
    }

    fn marked_in_stream(&self) -> bool {
        true
    }
}

/// The queue in Redis Streams.
pub struct RedisQueue {
    redis: ConnectionManager,
    push: redis::Script,
    acknowledge: redis::Script,
    prefix: String,
}

/// Records the transaction id (`KEYS[1]`) if new, then appends envelope `i` (`ARGV[i + 2]`) to
/// stream `KEYS[i + 1]` at position `ARGV[2]`; returns 0 for a transaction seen before.
const PUSH_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    return 0
end
for i = 2, #KEYS do
    redis.call('XADD', KEYS[i], '*', 'pos', ARGV[2], 'json', ARGV[i + 1])
end
return 1
";

/// Deletes the entries of stream `KEYS[1]` whose `pos` is at most `ARGV[1]`, in one round trip.
const ACKNOWLEDGE_SCRIPT: &str = r"
local upto = tonumber(ARGV[1])
local gone = 0
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
        if fields[i] == 'pos' and tonumber(fields[i + 1]) <= upto then
            gone = gone + redis.call('XDEL', KEYS[1], entry[1])
        end
    end
end
return gone
";

fn unavailable(error: redis::RedisError) -> Error {
    tracing::warn!(%error, "the envelope queue (Redis) failed");
    Error::new(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unknown,
        "the message queue is unavailable for a moment; retry the request",
    )
}

impl RedisQueue {
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let redis = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            redis,
            push: redis::Script::new(PUSH_SCRIPT),
            acknowledge: redis::Script::new(ACKNOWLEDGE_SCRIPT),
            prefix: prefix.to_owned(),
        })
    }

    /// The stream of one device's envelopes.
    fn inbox(&self, user: &str, device: &str) -> String {
        format!("{}:to_device:{user}|{device}", self.prefix)
    }

    /// Every entry of a device's stream as `(entry id, envelope)`.
    async fn entries(&self, user: &UserId, device: &DeviceId) -> Result<Vec<(String, Envelope)>> {
        let mut redis = self.redis.clone();
        let reply: StreamRangeReply = redis
            .xrange_count(self.inbox(user.as_str(), device.as_str()), "-", "+", MAX_READ)
            .await
            .map_err(unavailable)?;
        let mut entries = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let position: Option<i64> = entry.get("pos");
            let json: Option<String> = entry.get("json");
            match (position, json) {
                (Some(stream_ordering), Some(json)) => {
                    entries.push((entry.id, Envelope { stream_ordering, json }))
                }
                _ => tracing::warn!(id = %entry.id, "malformed envelope in the queue skipped"),
            }
        }
        entries.sort_by_key(|(_, envelope)| envelope.stream_ordering);
        Ok(entries)
    }
}

#[async_trait]
impl EnvelopeQueue for RedisQueue {
    async fn push(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        envelopes: &[(String, String, String)],
        position: i64,
    ) -> Result<bool> {
        let mut invocation = self.push.prepare_invoke();
        invocation.key(format!("{}:to_device_txn:{sender}|{sender_device}|{txn_id}", self.prefix));
        invocation.arg(TXN_TTL_SECS).arg(position);
        for (user, device, json) in envelopes {
            invocation.key(self.inbox(user, device)).arg(json);
        }
        let mut redis = self.redis.clone();
        let queued: i64 = invocation.invoke_async(&mut redis).await.map_err(unavailable)?;
        Ok(queued == 1)
    }

    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: i64,
        upto: i64,
        limit: i64,
    ) -> Result<Vec<Envelope>> {
        let limit = usize::try_from(limit).unwrap_or(0);
        Ok(self
            .entries(user, device)
            .await?
            .into_iter()
            .map(|(_, envelope)| envelope)
            .filter(|e| e.stream_ordering > after && e.stream_ordering <= upto)
            .take(limit)
            .collect())
    }

    async fn acknowledge(&self, user: &UserId, device: &DeviceId, upto: i64) -> Result<()> {
        let mut redis = self.redis.clone();
        let _: i64 = self
            .acknowledge
            .key(self.inbox(user.as_str(), device.as_str()))
            .arg(upto)
            .invoke_async(&mut redis)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn forget_device(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let mut redis = self.redis.clone();
        let _: i64 = redis.del(self.inbox(user.as_str(), device.as_str())).await.map_err(unavailable)?;
        Ok(())
    }

    fn marked_in_stream(&self) -> bool {
        false
    }
}
