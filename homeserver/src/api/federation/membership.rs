//! Another server's users joining and leaving rooms here: `make_join` then `send_join` (v2),
//! `make_leave` then `send_leave` (v2); and this server's users invited to rooms elsewhere
//! (`invite`, v2).
//!
//! `make_*` answers with an event to fill in and sign, built on the room's head and refused
//! unless the auth rules would let it in; `send_*` takes the signed event through the same checks
//! as any event from another server ([`crate::rooms::remote::accept`]), then hands it to the
//! other servers in the room.

use actix_web::{http::StatusCode, web};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId,
    ServerName, UserId,
    api::federation::membership::{
        RawStrippedState, create_invite, create_join_event, create_leave_event, prepare_join_event,
        prepare_leave_event,
    },
};
use serde_json::value::{RawValue, to_raw_value};

use crate::{
    error::{Error, ErrorKind, Result},
    rooms::{self, Draft, remote},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(make_join).add(send_join).add(make_leave).add(send_leave).add(invite);
}

/// Checks `origin` may act for `user_id` in `room_id`, a room this server is in, and gives the
/// room's version.
async fn room_for(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    user_id: &UserId,
) -> Result<RoomVersionId> {
    if user_id.server_name() != origin {
        return Err(Error::forbidden(format!("{origin} may only act for its own users, not {user_id}")));
    }
    let version = rooms::room_version(state, room_id).await?;
    remote::check_acl(state, room_id, origin).await?;
    if !remote::servers_in_room(state, room_id).await?.contains(&state.server_name) {
        return Err(Error::not_found(format!("{} is not in room {room_id}", state.server_name)));
    }
    Ok(version)
}

/// The template of a membership event of `user_id`.
async fn membership_template(
    state: &AppState,
    room_id: &RoomId,
    user_id: &UserId,
    membership: &str,
) -> Result<(RoomVersionId, Box<RawValue>)> {
    let content = to_raw_value(&serde_json::json!({ "membership": membership })).map_err(Error::internal)?;
    let draft = Draft::membership(user_id, user_id, &content);
    let (version, template) = rooms::template(state, room_id, &draft).await?;
    let event = to_raw_value(&CanonicalJsonValue::Object(template)).map_err(Error::internal)?;
    Ok((version, event))
}

/// GET /_matrix/federation/v1/make_join/{roomId}/{userId}
async fn make_join(
    state: web::Data<AppState>,
    request: Ruma<prepare_join_event::v1::Request>,
) -> Result<prepare_join_event::v1::Response> {
    let prepare_join_event::v1::Request { room_id, user_id, ver, .. } = request.body;
    let version = room_for(&state, &request.sender, &room_id, &user_id).await?;
    if !ver.contains(&version) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::IncompatibleRoomVersion(ruma::api::error::IncompatibleRoomVersionErrorData::new(
                version.clone(),
            )),
            format!("room {room_id} is of version {version}, which {} does not support", request.sender),
        ));
    }
    let (version, event) = membership_template(&state, &room_id, &user_id, "join").await?;
    let mut response = prepare_join_event::v1::Response::new(event);
    response.room_version = Some(version);
    Ok(response)
}

/// GET /_matrix/federation/v1/make_leave/{roomId}/{userId}
async fn make_leave(
    state: web::Data<AppState>,
    request: Ruma<prepare_leave_event::v1::Request>,
) -> Result<prepare_leave_event::v1::Response> {
    let prepare_leave_event::v1::Request { room_id, user_id, .. } = request.body;
    room_for(&state, &request.sender, &room_id, &user_id).await?;
    let (version, event) = membership_template(&state, &room_id, &user_id, "leave").await?;
    Ok(prepare_leave_event::v1::Response::new(Some(version), event))
}

/// Takes a signed membership event of `origin`'s user, checked to be the `membership` it must be.
pub(super) async fn take_membership(
    state: &AppState,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    event_id: &OwnedEventId,
    pdu: &RawValue,
    membership: &str,
) -> Result<crate::storage::StoredEvent> {
    let json: CanonicalJsonObject = serde_json::from_str(pdu.get())
        .map_err(|e| Error::bad_json(format!("the event is not a PDU: {e}")))?;
    let field = |name: &str| match json.get(name) {
        Some(CanonicalJsonValue::String(value)) => Some(value.as_str()),
        _ => None,
    };
    let sender = field("sender")
        .and_then(|sender| OwnedUserId::try_from(sender).ok())
        .ok_or_else(|| Error::bad_json("the event has no valid sender"))?;
    let content_membership = match json.get("content") {
        Some(CanonicalJsonValue::Object(content)) => match content.get("membership") {
            Some(CanonicalJsonValue::String(value)) => Some(value.as_str()),
            _ => None,
        },
        _ => None,
    };
    if field("type") != Some("m.room.member")
        || field("state_key") != Some(sender.as_str())
        || content_membership != Some(membership)
    {
        return Err(Error::bad_json(format!("the event is not a {membership} of its sender")));
    }
    let version = room_for(state, origin, room_id, &sender).await?;
    let id = federation::pdu::event_id_of(&json, &version).map_err(|e| Error::bad_json(e.to_string()))?;
    if id != *event_id {
        return Err(Error::bad_json(format!("the event's id is {id}, not {event_id}")));
    }
    let stored = remote::accept(state, room_id, &version, json).await.map_err(remote::Refused::into_error)?;
    // The other servers in the room learn of it from here; the joining server has it.
    remote::forward(state, room_id, &stored, Some(origin)).await?;
    Ok(stored)
}

/// PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}
///
/// With `omit_members` (a "faster join") the state leaves out membership events but those of
/// the room's heroes when the room has no name or canonical alias (the joining server names
/// the room from them), the auth chain leaves out what the state holds, and the servers in the
/// room are listed; the joining server fetches the rest later (`state_ids`, `event`).
async fn send_join(
    state: web::Data<AppState>,
    request: Ruma<create_join_event::v2::Request>,
) -> Result<create_join_event::v2::Response> {
    let create_join_event::v2::Request { room_id, event_id, pdu, omit_members, .. } = request.body;
    let room_state = take_join(&state, &request.sender, &room_id, &event_id, &pdu, omit_members).await?;
    Ok(create_join_event::v2::Response::new(room_state))
}

/// Takes `origin`'s signed join and gives the room's state at it with its auth chain (v1 and
/// v2 of `send_join`).
pub(super) async fn take_join(
    state: &AppState,
    origin: &ServerName,
    room_id: &OwnedRoomId,
    event_id: &OwnedEventId,
    pdu: &RawValue,
    omit_members: bool,
) -> Result<create_join_event::v2::RoomState> {
    let stored = take_membership(state, origin, room_id, event_id, pdu, "join").await?;
    let mut state_before = remote::state_before(state, room_id, &stored).await?;
    let mut room_state = create_join_event::v2::RoomState::new();
    if omit_members {
        let kept = kept_members(state, room_id, &stored, &state_before).await?;
        state_before.retain(|event| match state_key_of_member(event) {
            Some(member) => kept.contains(&member),
            None => true,
        });
        room_state.members_omitted = true;
        room_state.servers_in_room =
            Some(remote::servers_in_room(state, room_id).await?.iter().map(ToString::to_string).collect());
    }
    let mut seeds = state_before.clone();
    seeds.push(stored.clone());
    let mut auth_chain = rooms::graph::auth_chain(state, &seeds).await?;
    if omit_members {
        let in_state: std::collections::HashSet<&str> =
            state_before.iter().map(|e| e.event_id.as_str()).collect();
        auth_chain.retain(|event| !in_state.contains(event.event_id.as_str()));
    }
    let raw = |events: &[crate::storage::StoredEvent]| -> Result<Vec<Box<RawValue>>> {
        events
            .iter()
            .map(|event| RawValue::from_string(event.json.clone()).map_err(Error::internal))
            .collect()
    };
    room_state.state = raw(&state_before)?;
    room_state.auth_chain = raw(&auth_chain)?;
    room_state.event = Some(RawValue::from_string(stored.json.clone()).map_err(Error::internal)?);
    Ok(room_state)
}

/// The member whose membership an `m.room.member` event sets.
fn state_key_of_member(event: &crate::storage::StoredEvent) -> Option<String> {
    let event = rooms::client_event::ClientEvent::parse(event).ok()?;
    (event.kind() == "m.room.member").then(|| event.state_key()).flatten()
}

/// The members whose membership events a faster join is still sent: the room's heroes when it
/// has neither a name nor a canonical alias.
async fn kept_members(
    state: &AppState,
    room_id: &RoomId,
    join: &crate::storage::StoredEvent,
    room_state: &[crate::storage::StoredEvent],
) -> Result<std::collections::HashSet<String>> {
    let named = room_state
        .iter()
        .filter_map(|event| rooms::client_event::ClientEvent::parse(event).ok())
        .any(|event| event.is_state("m.room.name", "") || event.is_state("m.room.canonical_alias", ""));
    if named {
        return Ok(Default::default());
    }
    let joiner = state_key_of_member(join).and_then(|member| OwnedUserId::try_from(member).ok());
    let Some(joiner) = joiner else { return Ok(Default::default()) };
    Ok(state.store.heroes(room_id, &joiner, 5).await?.into_iter().collect())
}

/// PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}
async fn send_leave(
    state: web::Data<AppState>,
    request: Ruma<create_leave_event::v2::Request>,
) -> Result<create_leave_event::v2::Response> {
    let create_leave_event::v2::Request { room_id, event_id, pdu, .. } = request.body;
    take_membership(&state, &request.sender, &room_id, &event_id, &pdu, "leave").await?;
    Ok(create_leave_event::v2::Response::new())
}

/// PUT /_matrix/federation/v2/invite/{roomId}/{eventId}
///
/// The invite is checked (signed by the inviter's server, an invite of a user here who exists),
/// signed here and answered. A room this server is in gets the invite like any other event; for
/// one it is not in, the invite and the stripped state sent with it are kept for the invitee.
async fn invite(
    state: web::Data<AppState>,
    request: Ruma<create_invite::v2::Request>,
) -> Result<create_invite::v2::Response> {
    let origin = &request.sender;
    let body = request.body;
    let version = body.room_version;
    if federation::pdu::rules(&version).is_err() {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::IncompatibleRoomVersion(ruma::api::error::IncompatibleRoomVersionErrorData::new(
                version.clone(),
            )),
            format!("room version {version} is not supported here"),
        ));
    }
    let json: CanonicalJsonObject = serde_json::from_str(body.event.get())
        .map_err(|e| Error::bad_json(format!("the invite is not a PDU: {e}")))?;
    let event_id = remote::checked_id(&json, &version).map_err(remote::Refused::into_error)?;
    if event_id != body.event_id {
        return Err(Error::bad_json(format!("the event's id is {event_id}, not {}", body.event_id)));
    }
    let (mut json, pdu) =
        remote::verified(&state, event_id, &version, json).await.map_err(remote::Refused::into_error)?;
    let membership: Option<String> = serde_json::from_str::<serde_json::Value>(pdu.content.get())
        .ok()
        .and_then(|content| content["membership"].as_str().map(str::to_owned));
    let invitee = pdu.state_key.as_deref().and_then(|key| OwnedUserId::try_from(key).ok());
    let (true, Some("invite"), Some(invitee)) =
        (pdu.kind.to_string() == "m.room.member", membership.as_deref(), invitee)
    else {
        return Err(Error::bad_json("the event is not an invite"));
    };
    if pdu.room_id.as_deref() != Some(&*body.room_id) {
        return Err(Error::bad_json(format!("the invite is not to room {}", body.room_id)));
    }
    if pdu.sender.server_name() != origin {
        return Err(Error::forbidden(format!("{origin} may only send invites from its own users")));
    }
    // A server the room's ACL denies learns nothing, not even whether the user exists.
    let in_room = remote::servers_in_room(&state, &body.room_id).await?.contains(&state.server_name);
    if in_room {
        remote::check_acl(&state, &body.room_id, origin).await?;
    }
    if invitee.server_name() != state.server_name
        || state.store.get_user(&invitee).await?.is_none_or(|user| user.deactivated)
    {
        return Err(Error::not_found(format!("there is no user {invitee} here")));
    }
    federation::pdu::add_signature(&mut json, &version, &state.server_name, &state.signing_key)
        .map_err(Error::internal)?;
    if !in_room {
        let stripped: Vec<serde_json::Value> = body
            .invite_room_state
            .iter()
            .filter_map(|event| match event {
                RawStrippedState::Pdu(pdu) => rooms::invite::stripped(pdu),
                #[allow(deprecated)]
                RawStrippedState::Stripped(event) => rooms::invite::stripped(event.json()),
                _ => None,
            })
            .take(rooms::invite::INVITE_STATE.len() * 2)
            .collect();
        let stripped = serde_json::to_string(&stripped).map_err(Error::internal)?;
        let new_event = remote::stored_form(&pdu, &json).map_err(remote::Refused::into_error)?;
        let stored = state
            .store
            .store_outsider_membership(
                &body.room_id,
                version.as_str(),
                &state.stream,
                new_event,
                Some(&stripped),
            )
            .await?;
        state.stream.flush().await?;
        state.notify(stored.stream_ordering);
    }
    let event = to_raw_value(&CanonicalJsonValue::Object(json)).map_err(Error::internal)?;
    Ok(create_invite::v2::Response::new(event))
}
