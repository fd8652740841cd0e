//! Events another server sends that follow events this server never received (it was down, or
//! the sender lost its queue): the events in between are asked for with
//! `/_matrix/federation/v1/get_missing_events` from the server that sent the event — between the
//! room's newest events here and the new one — and taken oldest first through the checks every
//! event from another server goes through ([`remote::accept`]).
//!
//! A gap longer than [`MAX_MISSING`] events is not filled, and the event after it is refused:
//! fetching the room's state across such a gap (`state_ids`), as Synapse does, is not done yet.

use ruma::{
    CanonicalJsonObject, OwnedEventId, RoomId, RoomVersionId, ServerName, UInt,
    api::federation::event::get_missing_events,
};

use super::remote::{self, Refused};
use crate::state::AppState;

/// The most events fetched to fill one gap.
pub const MAX_MISSING: u32 = 20;

/// Fetches from `origin` the events between this server's newest events of `room_id` and
/// `latest` (an event `origin` sent whose prev events are unknown here), and takes those that
/// pass the checks. Returns how many were taken.
pub async fn fill(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    latest: &OwnedEventId,
) -> Result<usize, Refused> {
    let remote = state.remote().map_err(|e| Refused::Internal(e.to_string()))?;
    let Some(head) = state.store.room_head(room_id, &[], false).await? else { return Ok(0) };
    let mut request =
        get_missing_events::v1::Request::new(room_id.to_owned(), head.extremities, vec![latest.clone()]);
    request.limit = UInt::from(MAX_MISSING);
    let answer = match remote
        .send_limited(
            &state.server_name,
            state.signing_key.key_pair(),
            origin,
            request,
            crate::remote::MAX_STATE_BYTES,
        )
        .await
    {
        Ok(answer) => answer,
        Err(error) => {
            tracing::info!(%origin, %room_id, %error, "missing events could not be fetched");
            return Ok(0);
        }
    };
    // Each with its depth, to be taken oldest first: an event's prev events before it.
    let mut fetched: Vec<(u64, CanonicalJsonObject)> = Vec::new();
    for raw in answer.events.iter().take(MAX_MISSING as usize) {
        let Ok(json) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else { continue };
        let depth = match json.get("depth") {
            Some(ruma::CanonicalJsonValue::Integer(depth)) => u64::try_from(i64::from(*depth)).unwrap_or(0),
            _ => continue,
        };
        fetched.push((depth, json));
    }
    fetched.sort_by_key(|(depth, _)| *depth);
    let mut taken = 0;
    for (_, json) in fetched {
        let event_id = match remote::checked_id(&json, version) {
            Ok(id) if id != *latest => id,
            _ => continue,
        };
        match remote::accept(state, room_id, version, json).await {
            Ok(_) => taken += 1,
            Err(Refused::Internal(why)) => return Err(Refused::Internal(why)),
            Err(refused) => tracing::info!(%origin, %event_id, %refused, "a missing event was refused"),
        }
    }
    Ok(taken)
}
