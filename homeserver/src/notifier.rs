//! What workers tell each other: stream positions, typing and presence.
//!
//! Within a process, a write announces its stream position on a `watch` channel
//! ([`crate::state::AppState::notify`]) and the `/sync`s waiting there wake. With several
//! workers, a write on one must wake the syncs held by the others: with Redis configured, every
//! announced position is also published on a channel, and every worker's subscriber announces
//! what it hears locally. Typing and presence, which live in memory only, travel whole the same
//! way, as do the devices for which to-device envelopes were queued in Redis (whose syncs are
//! woken by [`Bells`]). Positions are coalesced (only the newest matters), and losing one is
//! harmless — a woken sync reads the database or the queue, which is the truth; a missed wake
//! only costs that sync its timeout.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::state::AppState;

/// What one worker tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Update {
    /// The stream reached `position` (stored data: the others read it from the database).
    Position { position: i64 },
    /// Someone started or stopped typing; kept in memory only, so it travels whole.
    Typing { room_id: OwnedRoomId, user_id: OwnedUserId, timeout_ms: Option<u64>, position: i64 },
    /// Someone's presence changed; kept in memory only, so it travels whole.
    Presence { user_id: OwnedUserId, state: String, status_msg: Option<String>, position: i64 },
    /// Envelopes were queued in Redis for these devices ([`crate::rooms::recent::device_key`]);
    /// their syncs, wherever they wait, should read their queues. Published by the queue's own
    /// push script ([`crate::queue::RedisQueue`]), in the same step as the envelopes.
    ToDevice { devices: Vec<String> },
}

impl Update {
    /// The stream position the update is at, if it is on the stream.
    pub fn position(&self) -> Option<i64> {
        match self {
            Update::Position { position }
            | Update::Typing { position, .. }
            | Update::Presence { position, .. } => Some(*position),
            Update::ToDevice { .. } => None,
        }
    }
}

/// One bell per device whose sync is waiting: rung when envelopes are queued for the device.
///
/// The queues that do not take stream positions ([`crate::queue::News::Bell`]) wake only the
/// syncs of the devices they are for, instead of every waiting sync.
#[derive(Debug, Default)]
pub struct Bells {
    bells: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Bells {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.bells.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver that changes whenever `device`'s bell rings from now on.
    pub fn listen(&self, device: &str) -> watch::Receiver<u64> {
        let mut bells = self.lock();
        if let Some(bell) = bells.get(device) {
            return bell.subscribe();
        }
        if bells.len() >= 1024 && bells.len().is_power_of_two() {
            // Bells nobody listens to any more; swept as the map doubles, so rarely.
            bells.retain(|_, bell| bell.receiver_count() > 0);
        }
        let (bell, receiver) = watch::channel(0);
        bells.insert(device.to_owned(), bell);
        receiver
    }

    /// Rings the bells of the devices that have one.
    pub fn ring<'a>(&self, devices: impl IntoIterator<Item = &'a String>) {
        let mut bells = self.lock();
        for device in devices {
            if let Some(bell) = bells.get(device) {
                if bell.receiver_count() == 0 {
                    bells.remove(device);
                } else {
                    bell.send_modify(|rung| *rung += 1);
                }
            }
        }
    }
}

/// An update as published: with the publishing process, which ignores its own.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    origin: String,
    update: Update,
}

/// The Redis channel updates are published on, and this process's name on it.
#[derive(Debug, Clone)]
pub struct Channel {
    pub name: String,
    origin: String,
}

impl Channel {
    pub fn new(config: &crate::config::RedisConfig) -> Self {
        Self { name: format!("{}:stream", config.key_prefix), origin: crate::auth::tokens::random_token(12) }
    }

    /// `update` as this process publishes it.
    pub fn message(&self, update: Update) -> String {
        serde_json::to_string(&Message { origin: self.origin.clone(), update }).unwrap_or_default()
    }
}

/// Starts the publisher and the subscriber for `state` on `channel` when Redis is configured;
/// returns the sender through which this process's updates are published.
pub fn start(
    state: &Arc<AppState>,
    channel: &Channel,
) -> anyhow::Result<Option<mpsc::UnboundedSender<Update>>> {
    let config = &state.config.redis;
    if config.url.is_empty() {
        return Ok(None);
    }
    let client = redis::Client::open(config.url.as_str())?;
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(publish(client.clone(), channel.clone(), receiver));
    tokio::spawn(subscribe(client, channel.clone(), Arc::downgrade(state)));
    Ok(Some(sender))
}

/// Publishes this process's updates in order; of several positions queued together, only the
/// newest.
async fn publish(client: redis::Client, channel: Channel, mut updates: mpsc::UnboundedReceiver<Update>) {
    let mut connection = None;
    while let Some(first) = updates.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = updates.try_recv() {
            batch.push(next);
        }
        let newest =
            batch.iter().filter(|u| matches!(u, Update::Position { .. })).filter_map(Update::position).max();
        batch.retain(|u| !matches!(u, Update::Position { .. }));
        batch.extend(newest.map(|position| Update::Position { position }));
        for update in batch {
            if connection.is_none() {
                connection = client.get_multiplexed_async_connection().await.ok();
            }
            let Some(redis) = connection.as_mut() else { continue };
            let published: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel.name)
                .arg(channel.message(update))
                .query_async(redis)
                .await;
            if let Err(error) = published {
                tracing::debug!(%error, "could not publish an update; reconnecting");
                connection = None;
            }
        }
    }
}

/// Applies what other workers publish, for as long as the server runs; reconnects after Redis
/// goes away.
async fn subscribe(client: redis::Client, channel: Channel, state: std::sync::Weak<AppState>) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel.name).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Some(state) = state.upgrade() else { return };
                        let Ok(text) = message.get_payload::<String>() else { continue };
                        match serde_json::from_str::<Message>(&text) {
                            Ok(message) if message.origin != channel.origin => state.apply(&message.update),
                            Ok(_) => {}
                            Err(error) => tracing::debug!(%error, "unreadable update ignored"),
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot subscribe to updates yet"),
        }
        if state.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
