//! History from before this server joined a room, fetched from a server in the room
//! (`/_matrix/federation/v1/backfill`) when a client pages back past the earliest event here.
//!
//! Each event is checked as any event from another server is (size, signatures, content hash —
//! the other server serves redacted what this one may not see — and room), then against the
//! auth rules given its own auth events; one that fails is dropped. Kept events join the
//! timeline below everything before them ([`crate::storage::RoomStore::store_backfilled`]).

use std::collections::HashMap;

use federation::auth::Pdu;
use ruma::{OwnedEventId, RoomId, UInt, api::federation::backfill::get_backfill};

use super::{graph, remote};
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
        // Checked oldest first, so an event's auth events from the same answer are known.
        let mut received: Vec<(OwnedEventId, ruma::CanonicalJsonObject, Pdu)> = Vec::new();
        for raw in &answer.pdus {
            let Ok(json) = serde_json::from_str::<ruma::CanonicalJsonObject>(raw.get()) else { continue };
            let Ok(event_id) = remote::checked_id(&json, &version) else { continue };
            match remote::verified(state, event_id.clone(), &version, json).await {
                Ok((json, pdu)) if pdu.room_id.as_deref() == Some(room_id) => {
                    received.push((event_id, json, pdu))
                }
                Ok(_) => {}
                Err(remote::Refused::Internal(why)) => return Err(crate::error::Error::internal(why)),
                Err(refused) => tracing::info!(%event_id, %refused, "a backfilled event was dropped"),
            }
        }
        received.sort_by_key(|(_, _, pdu)| pdu.depth);
        let mut known: HashMap<OwnedEventId, Pdu> = HashMap::new();
        let mut kept = Vec::new();
        for (event_id, json, pdu) in received {
            let mut auth_events = HashMap::new();
            let wanted: Vec<&str> =
                pdu.auth_events.iter().filter(|id| !known.contains_key(*id)).map(|id| id.as_str()).collect();
            for stored in state.store.events_by_id(&wanted).await? {
                if let Some((id, stored_pdu)) = stored_pdu(&stored) {
                    auth_events.insert(id, stored_pdu);
                }
            }
            for id in &pdu.auth_events {
                if let Some(found) = known.get(id) {
                    auth_events.insert(id.clone(), found.clone());
                }
            }
            if let Err(why) =
                remote::check_with_own_auth_events(state, room_id, &version, &pdu, auth_events).await
            {
                tracing::info!(%event_id, %why, "a backfilled event failing the auth rules was dropped");
                continue;
            }
            known.insert(event_id, pdu.clone());
            kept.push(remote::stored_form(&pdu, &json).map_err(remote::Refused::into_error)?);
        }
        // Newest first, as they are stored downwards.
        kept.reverse();
        return Ok(state.store.store_backfilled(room_id, &kept).await?);
    }
    Ok(0)
}

fn stored_pdu(event: &crate::storage::StoredEvent) -> Option<(OwnedEventId, Pdu)> {
    let id = OwnedEventId::try_from(event.event_id.as_str()).ok()?;
    let object: ruma::CanonicalJsonObject = crate::storage::parse_stored(&event.json).ok()?;
    Some((id.clone(), Pdu::from_json(id, &object).ok()?))
}
