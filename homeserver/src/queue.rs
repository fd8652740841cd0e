//! The envelope queue: to-device messages waiting for their device.
//!
//! A message is queued before `sendToDevice` answers and stays until its device syncs with a
//! token past it. Each envelope has a *cursor*, its place in the device's queue; a sync response
//! that carries envelopes puts the last one's cursor in its token (`s<position>_t<cursor>`), and
//! the sync that presents that token acknowledges everything up to it. Two implementations:
//!
//! - [`Embedded`]: the `to_device` table of the database (SQLite or Postgres), durable with it.
//!   Envelopes take stream positions, which are their cursors: the in-memory stream window sees
//!   the rows, so a woken sync skips devices with nothing new ([`News::InStream`]).
//! - [`RedisQueue`]: one Redis Stream per device, shared by every worker; cursors are stream
//!   entry ids, which Redis assigns in append order. Sending touches neither the database nor
//!   the stream positions: the device's sync is woken by its bell ([`News::Bell`]). With Redis
//!   running `appendonly yes` and `appendfsync always`, an answered send survives `kill -9` of
//!   Hearth and of Redis. A Lua script records the sender's transaction id and appends the
//!   envelopes in one atomic step, so a retried request after a crash is queued exactly once.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use redis::{aio::ConnectionManager, streams::StreamRangeReply};
use ruma::{DeviceId, UserId};
use sha2::Sha256;

use crate::{
    error::{Error, ErrorKind, Result},
    notifier::{Channel, Update},
    rooms::recent::device_key,
    storage::Storage,
};

/// Sender transaction ids are remembered this long (a retry comes within seconds).
const TXN_TTL_SECS: u64 = 7 * 24 * 3600;

/// A queued message as a sync delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Its place in the device's queue.
    pub cursor: String,
    pub json: String,
}

/// How a waiting sync learns that its device's queue has something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum News {
    /// Envelopes take stream positions: the stream window marks the devices they are for.
    InStream,
    /// Envelopes ring their device's bell ([`crate::notifier::Bells`]), here or on another worker.
    Bell,
}

#[async_trait]
pub trait EnvelopeQueue: Send + Sync {
    /// Queues `(user, device, json)` envelopes, once per sender device and transaction id; false
    /// if that transaction was queued before. `position` is the request's stream position when
    /// the queue's [`News`] is [`News::InStream`] (and ignored otherwise).
    async fn push(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        envelopes: &[(String, String, String)],
        position: Option<i64>,
    ) -> Result<bool>;
    /// Drops a device's envelopes up to `acknowledged` when given (as [`Self::acknowledge`]),
    /// then returns the first `limit` still waiting, in queue order; for [`News::InStream`],
    /// only those at stream positions up to `upto`.
    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        acknowledged: Option<&str>,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<Envelope>>;
    /// Drops a device's envelopes up to and including `cursor`: the device has them. A cursor
    /// this queue never issued is `M_INVALID_PARAM`.
    async fn acknowledge(&self, user: &UserId, device: &DeviceId, cursor: &str) -> Result<()>;
    /// Drops everything waiting for a deleted device.
    async fn forget_device(&self, user: &UserId, device: &DeviceId) -> Result<()>;
    /// How a waiting sync hears of new envelopes.
    fn news(&self) -> News;
}

fn foreign_cursor(cursor: &str) -> Error {
    Error::invalid_param(format!("`{cursor}` is not a to-device position this server issued"))
}

/// Seals cursors for the sync tokens they travel in.
///
/// A client holds its sync token and could write any cursor into it; presenting a cursor
/// acknowledges, that is deletes, everything queued for the device up to it, delivered or not.
/// So a token carries its cursor with a MAC over the user, the device and the cursor, keyed by
/// a secret every worker shares: a cursor is accepted only from the device it was delivered to,
/// and only as far as it was delivered.
pub struct CursorSeal {
    key: Vec<u8>,
}

/// Bytes of HMAC-SHA256 kept in a sealed cursor (128 bits).
const SEAL_BYTES: usize = 16;

impl CursorSeal {
    /// A seal keyed from the deployment's token secret.
    pub fn new(secret: &[u8]) -> Self {
        Self { key: [b"hearth to-device cursors:".as_slice(), secret].concat() }
    }

    fn mac(&self, user: &UserId, device: &DeviceId, cursor: &str) -> Hmac<Sha256> {
        // Hmac takes keys of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        for part in [user.as_str(), device.as_str(), cursor] {
            mac.update(part.as_bytes());
            mac.update(b"\0");
        }
        mac
    }

    /// `cursor` as it goes into a token for `device`: `<cursor>.<mac in hex>`.
    pub fn seal(&self, user: &UserId, device: &DeviceId, cursor: &str) -> String {
        let tag = self.mac(user, device, cursor).finalize().into_bytes();
        let hex: String = tag.iter().take(SEAL_BYTES).map(|b| format!("{b:02x}")).collect();
        format!("{cursor}.{hex}")
    }

    /// The cursor in a sealed one, if it was sealed for this device; `M_INVALID_PARAM` if not.
    pub fn open<'a>(&self, user: &UserId, device: &DeviceId, sealed: &'a str) -> Result<&'a str> {
        let refused = || foreign_cursor(sealed);
        let (cursor, hex) = sealed.rsplit_once('.').ok_or_else(refused)?;
        // Lowercase only, as `seal` writes it: with `A-F` accepted too, a token changed in one
        // character would still open.
        if hex.len() != SEAL_BYTES * 2 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(refused());
        }
        let tag = (0..SEAL_BYTES)
            .map(|i| hex.get(i * 2..i * 2 + 2).and_then(|byte| u8::from_str_radix(byte, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(refused)?;
        self.mac(user, device, cursor).verify_truncated_left(&tag).map_err(|_| refused())?;
        Ok(cursor)
    }
}

/// Opens the queue the configuration asks for; a Redis queue tells the other workers about its
/// envelopes on `channel`.
pub async fn open(
    config: &crate::config::RedisConfig,
    store: Arc<dyn Storage>,
    channel: &Channel,
) -> anyhow::Result<Arc<dyn EnvelopeQueue>> {
    if config.url.is_empty() {
        return Ok(Arc::new(Embedded { store }));
    }
    Ok(Arc::new(RedisQueue::connect(&config.url, &config.key_prefix, channel.clone()).await?))
}

/// The queue in the database.
pub struct Embedded {
    store: Arc<dyn Storage>,
}

/// An embedded cursor is a stream position.
fn position(cursor: &str) -> Result<i64> {
    cursor.parse::<i64>().ok().filter(|p| *p >= 0).ok_or_else(|| foreign_cursor(cursor))
}

#[async_trait]
impl EnvelopeQueue for Embedded {
    async fn push(
        &self,
        sender: &UserId,
        sender_device: &DeviceId,
        txn_id: &str,
        envelopes: &[(String, String, String)],
        position: Option<i64>,
    ) -> Result<bool> {
        let position = position.ok_or_else(|| Error::internal("an embedded envelope needs a position"))?;
        Ok(self.store.queue_to_device(sender, sender_device, txn_id, envelopes, position).await?)
    }

    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        acknowledged: Option<&str>,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        let mut after = 0;
        if let Some(cursor) = acknowledged {
            after = position(cursor)?;
            self.store.remove_to_device(user, device, after).await?;
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.store.to_device_messages(user, device, after, upto, limit).await?;
        Ok(rows
            .into_iter()
            .map(|row| Envelope { cursor: row.stream_ordering.to_string(), json: row.json })
            .collect())
    }

    async fn acknowledge(&self, user: &UserId, device: &DeviceId, cursor: &str) -> Result<()> {
        Ok(self.store.remove_to_device(user, device, position(cursor)?).await?)
    }

    async fn forget_device(&self, _user: &UserId, _device: &DeviceId) -> Result<()> {
        // Deleting a device deletes its rows in the same transaction.
        Ok(())
    }

    fn news(&self) -> News {
        News::InStream
    }
}

/// The queue in Redis Streams.
pub struct RedisQueue {
    redis: PerThread,
    push: redis::Script,
    prefix: String,
    channel: Channel,
}

/// Records the transaction id (`KEYS[1]`) if new, then appends envelope `i` (`ARGV[i + 2]`) to
/// stream `KEYS[i]` and publishes `ARGV[3]` on channel `ARGV[2]` (the other workers wake the
/// devices' syncs); returns 0 for a transaction seen before.
const PUSH_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
    return 0
end
for i = 2, #KEYS do
    redis.call('XADD', KEYS[i], '*', 'json', ARGV[i + 2])
end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Redis connections, one per thread that uses them.
///
/// Each actix worker runs a single-threaded runtime. A connection made on the worker is driven
/// by a task on the worker's own thread, so a request's round trip to Redis wakes no other
/// thread; through one shared connection, driven on the main runtime, every call crossed threads
/// twice, and those wake-ups cost more CPU than the calls.
struct PerThread {
    client: redis::Client,
    /// Tells this queue's connections from those of other queues in the process (tests run
    /// several servers in one).
    id: u64,
}

thread_local! {
    static CONNECTIONS: std::cell::RefCell<HashMap<u64, ConnectionManager>> = Default::default();
}

impl PerThread {
    fn new(client: redis::Client) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self { client, id: NEXT.fetch_add(1, Ordering::Relaxed) }
    }

    /// This thread's connection, made on first use; it reconnects by itself after Redis returns.
    async fn get(&self) -> Result<ConnectionManager> {
        if let Some(connection) = CONNECTIONS.with_borrow(|c| c.get(&self.id).cloned()) {
            return Ok(connection);
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let connection =
            ConnectionManager::new_with_config(self.client.clone(), config).await.map_err(unavailable)?;
        CONNECTIONS.with_borrow_mut(|c| c.insert(self.id, connection.clone()));
        Ok(connection)
    }
}

fn unavailable(error: redis::RedisError) -> Error {
    tracing::warn!(%error, "the envelope queue (Redis) failed");
    Error::new(
        actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Unknown,
        "the message queue is unavailable for a moment; retry the request",
    )
}

/// The smallest stream entry id after `cursor` (an id, `<milliseconds>-<sequence>`): `XTRIM
/// MINID` keeps the entries from there on.
fn following(cursor: &str) -> Result<String> {
    let (ms, seq): (u64, u64) = cursor
        .split_once('-')
        .and_then(|(ms, seq)| Some((ms.parse().ok()?, seq.parse().ok()?)))
        .ok_or_else(|| foreign_cursor(cursor))?;
    Ok(match seq.checked_add(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-0", ms.saturating_add(1)),
    })
}

impl RedisQueue {
    /// Connects (once, to fail early if Redis is unreachable) and loads the push script.
    pub async fn connect(url: &str, prefix: &str, channel: Channel) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let push = redis::Script::new(PUSH_SCRIPT);
        let mut connection = client.get_multiplexed_async_connection().await?;
        push.prepare_invoke().load_async(&mut connection).await?;
        Ok(Self { redis: PerThread::new(client), push, prefix: prefix.to_owned(), channel })
    }

    /// The stream of one device's envelopes.
    fn inbox(&self, user: &str, device: &str) -> String {
        format!("{}:to_device:{user}|{device}", self.prefix)
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
        _position: Option<i64>,
    ) -> Result<bool> {
        let devices = envelopes.iter().map(|(user, device, _)| device_key(user, device)).collect();
        let mut invocation = self.push.prepare_invoke();
        invocation.key(format!("{}:to_device_txn:{sender}|{sender_device}|{txn_id}", self.prefix));
        invocation
            .arg(TXN_TTL_SECS)
            .arg(&self.channel.name)
            .arg(self.channel.message(Update::ToDevice { devices }));
        for (user, device, json) in envelopes {
            invocation.key(self.inbox(user, device)).arg(json);
        }
        let mut redis = self.redis.get().await?;
        let queued: i64 = invocation.invoke_async(&mut redis).await.map_err(unavailable)?;
        Ok(queued == 1)
    }

    async fn pending(
        &self,
        user: &UserId,
        device: &DeviceId,
        acknowledged: Option<&str>,
        _upto: i64,
        limit: usize,
    ) -> Result<Vec<Envelope>> {
        let inbox = self.inbox(user.as_str(), device.as_str());
        // One round trip for both.
        let mut pipe = redis::pipe();
        if let Some(cursor) = acknowledged {
            pipe.cmd("XTRIM").arg(&inbox).arg("MINID").arg(following(cursor)?).ignore();
        }
        pipe.cmd("XRANGE").arg(&inbox).arg("-").arg("+").arg("COUNT").arg(limit);
        let mut redis = self.redis.get().await?;
        let (reply,): (StreamRangeReply,) = pipe.query_async(&mut redis).await.map_err(unavailable)?;
        let mut envelopes = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            match entry.get::<String>("json") {
                Some(json) => envelopes.push(Envelope { cursor: entry.id, json }),
                None => tracing::warn!(id = %entry.id, "malformed envelope in the queue skipped"),
            }
        }
        Ok(envelopes)
    }

    async fn acknowledge(&self, user: &UserId, device: &DeviceId, cursor: &str) -> Result<()> {
        let mut redis = self.redis.get().await?;
        let _: i64 = redis::cmd("XTRIM")
            .arg(self.inbox(user.as_str(), device.as_str()))
            .arg("MINID")
            .arg(following(cursor)?)
            .query_async(&mut redis)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn forget_device(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let mut redis = self.redis.get().await?;
        let _: i64 = redis::cmd("DEL")
            .arg(self.inbox(user.as_str(), device.as_str()))
            .query_async(&mut redis)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn news(&self) -> News {
        News::Bell
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use ruma::{OwnedDeviceId, OwnedUserId};

    use super::*;
    use crate::json::arbitrary::config;

    fn user() -> impl Strategy<Value = OwnedUserId> {
        ("[a-z0-9._=/+-]{1,12}", prop::sample::select(vec!["localhost", "example.org", "h.test:8448"]))
            .prop_map(|(local, server)| UserId::parse(format!("@{local}:{server}")).unwrap())
    }

    /// Device ids and cursors have no NUL: it is refused in every request (see
    /// `ruma_wrapper::check_uri`), and the MAC separates its parts with one.
    fn device() -> impl Strategy<Value = OwnedDeviceId> {
        "[^\\x00]{1,12}".prop_map(OwnedDeviceId::from)
    }

    fn cursor() -> impl Strategy<Value = String> {
        prop_oneof!["[0-9]{1,12}", "[0-9]{1,13}-[0-9]{1,3}", "[^\\x00]{0,20}"]
    }

    /// A character a sealed cursor might be changed to: hex digits of either case, the
    /// separator, or any.
    fn other_char() -> impl Strategy<Value = char> {
        prop_oneof![
            prop::sample::select("0123456789abcdefABCDEF.-".chars().collect::<Vec<_>>()),
            any::<char>()
        ]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn a_sealed_cursor_opens_for_its_own_device_and_no_other(
            secret in prop::collection::vec(any::<u8>(), 0..40),
            (user, other_user) in (user(), user()),
            (device, other_device) in (device(), device()),
            cursor in cursor(),
        ) {
            let seal = CursorSeal::new(&secret);
            let sealed = seal.seal(&user, &device, &cursor);
            prop_assert_eq!(seal.open(&user, &device, &sealed).ok(), Some(cursor.as_str()));
            if other_user != user {
                prop_assert!(seal.open(&other_user, &device, &sealed).is_err());
            }
            if other_device != device {
                prop_assert!(seal.open(&user, &other_device, &sealed).is_err());
            }
            // (HMAC pads short keys with zeros, so another secret is one that differs in a byte
            // other than a trailing zero.)
            let mut other_secret = secret.clone();
            other_secret.push(1);
            prop_assert!(CursorSeal::new(&other_secret).open(&user, &device, &sealed).is_err());
        }

        #[test]
        fn a_sealed_cursor_changed_in_any_one_character_is_refused(
            user in user(),
            device in device(),
            cursor in cursor(),
            at in any::<prop::sample::Index>(),
            new in other_char(),
        ) {
            let seal = CursorSeal::new(b"secret");
            let sealed = seal.seal(&user, &device, &cursor);
            let mut chars: Vec<char> = sealed.chars().collect();
            let at = at.index(chars.len());
            prop_assume!(chars[at] != new);
            chars[at] = new;
            let changed: String = chars.into_iter().collect();
            prop_assert!(seal.open(&user, &device, &changed).is_err(), "{} opened as {}", changed, sealed);
        }

        #[test]
        fn opening_any_string_never_panics(user in user(), device in device(), text in "(?s).{0,60}") {
            let seal = CursorSeal::new(b"secret");
            if let Ok(cursor) = seal.open(&user, &device, &text) {
                prop_assert_eq!(seal.seal(&user, &device, cursor), text);
            }
        }
    }
}
