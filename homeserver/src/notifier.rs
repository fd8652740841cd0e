//! Waking long-polls across workers.
//!
//! Within a process, a write announces its stream position on a `watch` channel
//! ([`crate::state::AppState::notify`]) and the `/sync`s waiting there wake. With several
//! workers, a write on one must wake the syncs held by the others: with Redis configured, every
//! announced position is also published on a channel, and every worker's subscriber announces
//! what it hears locally. Publications are coalesced (only the newest position matters), and
//! losing one is harmless — a woken sync reads the database, which is the truth; a missed wake
//! only costs that sync its timeout.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::state::AppState;

/// The channel positions are published on.
fn channel(prefix: &str) -> String {
    format!("{prefix}:stream")
}

/// Starts the publisher and the subscriber for `state` when Redis is configured; returns the
/// sender through which local writes are published.
pub fn start(state: &Arc<AppState>) -> anyhow::Result<Option<mpsc::UnboundedSender<i64>>> {
    let config = &state.config.redis;
    if config.url.is_empty() {
        return Ok(None);
    }
    let client = redis::Client::open(config.url.as_str())?;
    let channel = channel(&config.key_prefix);
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(publish(client.clone(), channel.clone(), receiver));
    tokio::spawn(subscribe(client, channel, Arc::downgrade(state)));
    Ok(Some(sender))
}

/// Publishes this process's positions, newest only when several queued up.
async fn publish(client: redis::Client, channel: String, mut positions: mpsc::UnboundedReceiver<i64>) {
    let mut connection = None;
    while let Some(mut position) = positions.recv().await {
        while let Ok(newer) = positions.try_recv() {
            position = position.max(newer);
        }
        if connection.is_none() {
            connection = client.get_multiplexed_async_connection().await.ok();
        }
        let Some(redis) = connection.as_mut() else { continue };
        let published: redis::RedisResult<i64> =
            redis::cmd("PUBLISH").arg(&channel).arg(position).query_async(redis).await;
        if let Err(error) = published {
            tracing::debug!(%error, "could not publish a stream position; reconnecting");
            connection = None;
        }
    }
}

/// Announces positions other workers published, for as long as the server runs; reconnects
/// after Redis goes away.
async fn subscribe(client: redis::Client, channel: String, state: std::sync::Weak<AppState>) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Some(state) = state.upgrade() else { return };
                        if let Ok(position) = message.get_payload::<i64>() {
                            state.announce(position);
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "cannot subscribe to stream positions yet"),
        }
        if state.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
