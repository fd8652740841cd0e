//! Read receipts: kept for the room at a stream position (so `/sync` sends them when they are
//! news), from this server's users and from other servers' ([`crate::remote::edu`]).

use ruma::{EventId, RoomId, UserId};

use crate::{
    error::{Error, Result},
    state::AppState,
    storage::ReceiptRecord,
};

/// Keeps `user`'s receipt of `receipt_type` for `event_id`, an event of the room, in `thread`
/// (`main` or a thread root's id). The user must be joined to the room. A public read receipt of
/// this server's user is sent to the other servers in the room; their unread count moved, so
/// their push gateways get the new badge.
pub async fn put(
    state: &AppState,
    room_id: &RoomId,
    user: &UserId,
    receipt_type: &str,
    event_id: &EventId,
    thread: Option<String>,
) -> Result<()> {
    super::require_joined(state, room_id, user).await?;
    let event = state.store.get_event(event_id.as_str()).await?;
    if event.is_none_or(|e| e.room_id != room_id.as_str()) {
        return Err(Error::not_found("no such event in this room"));
    }
    let thread_id = thread.clone();
    super::at_new_position(state, |position| async move {
        let record = ReceiptRecord {
            room_id: room_id.to_string(),
            user_id: user.to_string(),
            receipt_type: receipt_type.to_owned(),
            thread_id,
            event_id: event_id.to_string(),
            ts: 0,
            stream_ordering: position,
        };
        state.store.put_receipt(&record).await.map_err(Into::into)
    })
    .await?;
    if user.server_name() != state.server_name {
        return Ok(());
    }
    if receipt_type == "m.read" {
        crate::remote::edu::send_receipt(state, room_id, user, event_id, thread.as_deref()).await?;
    }
    if matches!(receipt_type, "m.read" | "m.read.private") {
        state.store.mark_badge(user).await?;
        state.push.wake();
    }
    Ok(())
}
