//! Self-destructing messages (MSC2228, unstable; on with `rooms.self_destructing_messages`).
//!
//! A sender may put `org.matrix.self_destruct_after` (a timestamp in milliseconds) in a message's
//! content; once that time has passed, the message's content is emptied (the event is pruned as
//! a redaction prunes it, without a redaction event), as Synapse does with its
//! `enable_ephemeral_messages`. State events never expire: emptying one would change the room's
//! state.
//!
//! Two parts make sure nobody reads an expired message: every worker prunes due messages in the
//! database ([`run`], at most a second late; the work is idempotent, so workers need not agree
//! on who does it), and [`is_due`] hides their content when they are served meanwhile (from the
//! in-memory stream window above all, which keeps events as they were when read).

use std::{sync::Weak, time::Duration};

use serde_json::value::RawValue;

use crate::{error::Error, rooms::client_event::ClientEvent, state::AppState, storage::now_ms};

/// The content key a sender sets its message's expiry with.
pub const SELF_DESTRUCT_AFTER: &str = "org.matrix.self_destruct_after";

/// How often due messages are looked for.
const EVERY: Duration = Duration::from_secs(1);

/// Messages pruned per round.
const BATCH: i64 = 100;

/// When a new event of `event_type` (a state event if `state_key` is set) with `content` is to
/// expire, if it asked to.
pub fn expiry_of(event_type: &str, state_key: Option<&str>, content: &RawValue) -> Option<i64> {
    if state_key.is_some() || event_type == "m.room.redaction" {
        return None;
    }
    let content: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(content.get()).ok()?;
    // An integer, as the MSC and Synapse have it: `1.5e12` or `"…"` asks for nothing.
    serde_json::from_str::<i64>(content.get(SELF_DESTRUCT_AFTER)?.get()).ok()
}

/// Whether `event` asked to expire and its time has come.
pub fn is_due(event: &ClientEvent<'_>, now: i64) -> bool {
    expiry_of(&event.kind(), event.state_key().as_deref(), event.content()).is_some_and(|at| at <= now)
}

/// Prunes due messages until the state is dropped (the server stopped).
pub async fn run(state: Weak<AppState>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        if let Err(error) = prune_due(&state).await {
            tracing::warn!(%error, "could not prune self-destructed messages");
        }
    }
}

async fn prune_due(state: &AppState) -> crate::error::Result<()> {
    for (event_id, room_id) in state.store.due_expiries(now_ms(), BATCH).await? {
        let pruned = match state.store.get_event(&event_id).await? {
            Some(event) => {
                let room_id = ruma::RoomId::parse(&room_id).map_err(Error::internal)?;
                let version = super::room_version(state, &room_id).await?;
                Some(super::pruned_json(&version, &event.json)?)
            }
            None => None,
        };
        state.store.expire_event(&event_id, pruned.as_deref()).await?;
    }
    Ok(())
}
