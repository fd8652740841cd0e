//! What other servers ask of a room's events: one event (`event`), the state at an event
//! (`state`, `state_ids`), an event's auth chain (`event_auth`), history (`backfill`) and the
//! events between two points (`get_missing_events`).
//!
//! Only a server with a member joined to the room may ask about it (as Synapse requires), except
//! for a single event, which any server may fetch if it may see it; never one the room's server
//! ACL denies. Events a server may not see
//! under the room's history visibility are served redacted ([`ServerRules`]).

use std::collections::BTreeSet;

use actix_web::web;
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, RoomId, RoomVersionId, ServerName,
    api::federation::{
        authorization::get_event_authorization,
        backfill::get_backfill,
        event::{get_event, get_missing_events, get_room_state, get_room_state_ids},
    },
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    rooms::{self, graph, remote, visibility::ServerRules},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::StoredEvent,
};

pub(super) fn routes(router: &mut Router) {
    router.add(event).add(state).add(state_ids).add(event_auth).add(backfill).add(missing_events);
}

/// The room's version, once `origin` is found to have a member joined to it.
async fn joined_room(state: &AppState, origin: &ServerName, room_id: &RoomId) -> Result<RoomVersionId> {
    let version = rooms::room_version(state, room_id).await?;
    remote::check_acl(state, room_id, origin).await?;
    if !remote::servers_in_room(state, room_id).await?.contains(origin) {
        return Err(Error::forbidden(format!("{origin} has no member in room {room_id}")));
    }
    Ok(version)
}

/// An event of `room_id` (M_NOT_FOUND if it is not one).
async fn event_in(state: &AppState, room_id: &RoomId, event_id: &OwnedEventId) -> Result<StoredEvent> {
    state
        .store
        .get_event(event_id.as_str())
        .await?
        .filter(|event| event.room_id == room_id.as_str())
        .ok_or_else(|| Error::not_found(format!("room {room_id} has no event {event_id}")))
}

fn raw(events: &[StoredEvent]) -> Result<Vec<Box<RawValue>>> {
    events.iter().map(|event| RawValue::from_string(event.json.clone()).map_err(Error::internal)).collect()
}

fn ids(events: &[StoredEvent]) -> Result<Vec<OwnedEventId>> {
    events
        .iter()
        .map(|event| OwnedEventId::try_from(event.event_id.as_str()).map_err(Error::internal))
        .collect()
}

/// GET /_matrix/federation/v1/event/{eventId}
async fn event(
    state: web::Data<AppState>,
    request: Ruma<get_event::v1::Request>,
) -> Result<get_event::v1::Response> {
    let event_id = &request.body.event_id;
    let stored = state
        .store
        .get_event(event_id.as_str())
        .await?
        .ok_or_else(|| Error::not_found(format!("no event {event_id}")))?;
    let room_id = <&RoomId>::try_from(stored.room_id.as_str()).map_err(Error::internal)?;
    let rules = ServerRules::load(&state, room_id, &request.sender).await?;
    if !rules.may_see(&stored) || !remote::acl_allows(&state, room_id, &request.sender).await? {
        // As if it did not exist: whether it does is not the asking server's to know.
        return Err(Error::not_found(format!("no event {event_id}")));
    }
    let pdu = RawValue::from_string(stored.json).map_err(Error::internal)?;
    Ok(get_event::v1::Response::new(state.server_name.clone(), MilliSecondsSinceUnixEpoch::now(), pdu))
}

/// The state just before an event and the auth chain of that state, for `state` and `state_ids`.
async fn state_at(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    event_id: &OwnedEventId,
) -> Result<(Vec<StoredEvent>, Vec<StoredEvent>)> {
    joined_room(state, origin, room_id).await?;
    let at = event_in(state, room_id, event_id).await?;
    if at.outlier {
        // This server does not have the state at an event in no timeline (as Synapse answers).
        return Err(Error::not_found(format!(
            "no state is known at {event_id}, which is not in the timeline"
        )));
    }
    let before = remote::state_before(state, room_id, &at).await?;
    let chain = graph::auth_chain(state, &before).await?;
    Ok((before, chain))
}

/// GET /_matrix/federation/v1/state/{roomId}
async fn state(
    state: web::Data<AppState>,
    request: Ruma<get_room_state::v1::Request>,
) -> Result<get_room_state::v1::Response> {
    let (pdus, chain) =
        state_at(&state, &request.sender, &request.body.room_id, &request.body.event_id).await?;
    Ok(get_room_state::v1::Response::new(raw(&chain)?, raw(&pdus)?))
}

/// GET /_matrix/federation/v1/state_ids/{roomId}
async fn state_ids(
    state: web::Data<AppState>,
    request: Ruma<get_room_state_ids::v1::Request>,
) -> Result<get_room_state_ids::v1::Response> {
    let (pdus, chain) =
        state_at(&state, &request.sender, &request.body.room_id, &request.body.event_id).await?;
    Ok(get_room_state_ids::v1::Response::new(ids(&chain)?, ids(&pdus)?))
}

/// GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}
async fn event_auth(
    state: web::Data<AppState>,
    request: Ruma<get_event_authorization::v1::Request>,
) -> Result<get_event_authorization::v1::Response> {
    let room_id = &request.body.room_id;
    joined_room(&state, &request.sender, room_id).await?;
    let event = event_in(&state, room_id, &request.body.event_id).await?;
    let chain = graph::auth_chain(&state, std::slice::from_ref(&event)).await?;
    Ok(get_event_authorization::v1::Response::new(raw(&chain)?))
}

/// Events of a walk as the asking server may have them.
async fn served(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    events: &[StoredEvent],
) -> Result<Vec<Box<RawValue>>> {
    let rules = ServerRules::load(state, room_id, origin).await?;
    events.iter().map(|event| rules.serve(version, event)).collect()
}

/// GET /_matrix/federation/v1/backfill/{roomId}
async fn backfill(
    state: web::Data<AppState>,
    request: Ruma<get_backfill::v1::Request>,
) -> Result<get_backfill::v1::Response> {
    let room_id = &request.body.room_id;
    let version = joined_room(&state, &request.sender, room_id).await?;
    let from: Vec<String> = request.body.v.iter().map(ToString::to_string).collect();
    let limit = usize::try_from(u64::from(request.body.limit)).unwrap_or(usize::MAX);
    let events = graph::walk_back(&state, room_id.as_str(), &from, &BTreeSet::new(), 0, limit).await?;
    let pdus = served(&state, &request.sender, room_id, &version, &events).await?;
    Ok(get_backfill::v1::Response::new(state.server_name.clone(), MilliSecondsSinceUnixEpoch::now(), pdus))
}

/// POST /_matrix/federation/v1/get_missing_events/{roomId}
async fn missing_events(
    state: web::Data<AppState>,
    request: Ruma<get_missing_events::v1::Request>,
) -> Result<get_missing_events::v1::Response> {
    let body = &request.body;
    let room_id = &body.room_id;
    let version = joined_room(&state, &request.sender, room_id).await?;
    // From what the latest events follow, back to what the asking server has.
    let latest: Vec<String> = body.latest_events.iter().map(ToString::to_string).collect();
    let mut stop_at: BTreeSet<String> = body.earliest_events.iter().map(ToString::to_string).collect();
    stop_at.extend(latest.iter().cloned());
    let mut from = Vec::new();
    for event in state.store.events_by_id(&latest.iter().map(String::as_str).collect::<Vec<_>>()).await? {
        if event.room_id == room_id.as_str() {
            from.extend(graph::prev_events(&event));
        }
    }
    let min_depth = i64::try_from(u64::from(body.min_depth)).unwrap_or(i64::MAX);
    let limit = usize::try_from(u64::from(body.limit)).unwrap_or(usize::MAX);
    let mut events = graph::walk_back(&state, room_id.as_str(), &from, &stop_at, min_depth, limit).await?;
    // Oldest first, as they are to be taken.
    events.reverse();
    let pdus = served(&state, &request.sender, room_id, &version, &events).await?;
    Ok(get_missing_events::v1::Response::new(pdus))
}
