//! History from before this server joined a room, fetched from a server in the room
//! (`/_matrix/federation/v1/backfill`) when a client pages back past the earliest event here.
//!
//! Each event is checked as any event from another server is (size, signatures, content hash —
//! the other server serves redacted what this one may not see — and room), then against the
//! auth rules given its own auth events ([`fetched::check_batch`]); one that fails is dropped. Kept events join the
//! timeline below everything before them ([`crate::storage::RoomStore::store_backfilled`]).

use ruma::{OwnedEventId, RoomId, UInt, api::federation::backfill::get_backfill};

use super::{fetched, graph, remote};
use crate::{error::Result, state::AppState};

/// How many servers are asked before giving up for this page.
const MAX_SERVERS: usize = 3;

/// Fetches up to `limit` events from before the room's earliest event here, if it has events
/// before it that this server lacks. Returns how many joined the timeline.
pub async fn fill(state: &AppState, room_id: &RoomId, limit: usize) -> Result<usize> {
    let Ok(remote) = state.remote() else { return Ok(0) };
    let Some(earliest) = state.store.earliest_event(room_id).await? else { return Ok(0) };
    let prev = graph::prev_events(&earliest);
    let prev_ids: Vec<&str> = prev.iter().map(String::as_str).collect();
    if prev.is_empty() || state.store.timeline_has(&prev_ids).await? == prev.len() {
        return Ok(0);
    }
    let version = super::room_version(state, room_id).await?;
    let from = OwnedEventId::try_from(earliest.event_id.as_str()).map_err(crate::error::Error::internal)?;
    let servers = remote::servers_in_room(state, room_id).await?;
    let limit = UInt::try_from(limit.min(graph::MAX_WALK)).unwrap_or(UInt::MIN);
    for server in servers.iter().filter(|server| **server != state.server_name).take(MAX_SERVERS) {
        let request = get_backfill::v1::Request::new(room_id.to_owned(), vec![from.clone()], limit);
        let answer = match remote
            .send_limited(
                &state.server_name,
                state.signing_key.key_pair(),
                server,
                request,
                crate::remote::MAX_STATE_BYTES,
            )
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                tracing::info!(%server, %room_id, %error, "backfill failed");
                continue;
            }
        };
        let events = answer.pdus.iter().filter_map(|raw| serde_json::from_str(raw.get()).ok()).collect();
        let checked = fetched::check_batch(state, room_id, &version, events)
            .await
            .map_err(remote::Refused::into_error)?;
        // Those the auth rules reject are dropped: the past keeps no rejected events.
        let mut kept: Vec<_> = checked
            .into_iter()
            .filter(|checked| checked.rejected.is_none())
            .map(|checked| checked.event)
            .collect();
        // Newest first, as they are stored downwards.
        kept.reverse();
        return Ok(state.store.store_backfilled(room_id, &kept).await?);
    }
    Ok(0)
}
