//! What workers tell each other: stream positions, typing and presence.
//!
//! Within a process, a write announces its stream position on a `watch` channel
//! ([`crate::state::AppState::notify`]) and the `/sync`s waiting there wake. With several
//! workers, a write on one must wake the syncs held by the others: with Redis configured, every
//! announced position is also published on a channel, and every worker's subscriber announces
//! what it hears locally. Typing and presence, which live in memory only, travel whole the same
//! way. Positions are coalesced (only the newest matters), and losing one is harmless — a woken
//! sync reads the database, which is the truth; a missed wake only costs that sync its timeout.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
}

impl Update {
    pub fn position(&self) -> i64 {
        match self {
            Update::Position { position }
            | Update::Typing { position, .. }
            | Update::Presence { position, .. } => *position,
        }
    }
}

/// An update as published: with the publishing process, which ignores its own.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    origin: String,
    update: Update,
}

/// The channel updates are published on.
fn channel(prefix: &str) -> String {
    format!("{prefix}:stream")
}

/// Starts the publisher and the subscriber for `state` when Redis is configured; returns the
/// sender through which this process's updates are published.
pub fn start(state: &Arc<AppState>) -> anyhow::Result<Option<mpsc::UnboundedSender<Update>>> {
    let config = &state.config.redis;
    if config.url.is_empty() {
        return Ok(None);
    }
    let client = redis::Client::open(config.url.as_str())?;
    let channel = channel(&config.key_prefix);
    let origin = crate::auth::tokens::random_token(12);
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(publish(client.clone(), channel.clone(), origin.clone(), receiver));
    tokio::spawn(subscribe(client, channel, origin, Arc::downgrade(state)));
    Ok(Some(sender))
}

/// Publishes this process's updates in order; of several positions queued together, only the
/// newest.
async fn publish(
    client: redis::Client,
    channel: String,
    origin: String,
    mut updates: mpsc::UnboundedReceiver<Update>,
) {
    let mut connection = None;
    while let Some(first) = updates.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = updates.try_recv() {
            batch.push(next);
        }
        let newest =
            batch.iter().filter(|u| matches!(u, Update::Position { .. })).map(Update::position).max();
        batch.retain(|u| !matches!(u, Update::Position { .. }));
        batch.extend(newest.map(|position| Update::Position { position }));
        for update in batch {
            if connection.is_none() {
                connection = client.get_multiplexed_async_connection().await.ok();
            }
            let Some(redis) = connection.as_mut() else { continue };
            let Ok(text) = serde_json::to_string(&Message { origin: origin.clone(), update }) else {
                continue;
            };
            let published: redis::RedisResult<i64> =
                redis::cmd("PUBLISH").arg(&channel).arg(text).query_async(redis).await;
            if let Err(error) = published {
                tracing::debug!(%error, "could not publish an update; reconnecting");
                connection = None;
            }
        }
    }
}

/// Applies what other workers publish, for as long as the server runs; reconnects after Redis
/// goes away.
async fn subscribe(client: redis::Client, channel: String, origin: String, state: std::sync::Weak<AppState>) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Some(state) = state.upgrade() else { return };
                        let Ok(text) = message.get_payload::<String>() else { continue };
                        match serde_json::from_str::<Message>(&text) {
                            Ok(message) if message.origin != origin => state.apply(&message.update),
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
