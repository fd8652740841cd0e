//! Invites across servers. Inviting another server's user: the invite is built and signed here,
//! signed by the invitee's server too (`/_matrix/federation/v2/invite`, with the room's stripped
//! state as full PDUs), then stored and sent to the room. Receiving an invite for a user here:
//! see `api::federation::membership`.

use federation::pdu;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomId, UserId,
    api::federation::membership::{RawStrippedState, create_invite},
};
use serde_json::value::{RawValue, to_raw_value};

use super::{Draft, client_event::ClientEvent, remote};
use crate::{
    error::{Error, Result},
    state::AppState,
    storage::StoredEvent,
};

/// The state events an invitee is shown of a room before joining (the spec's recommendation).
pub const INVITE_STATE: &[&str] = &[
    "m.room.create",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.join_rules",
    "m.room.canonical_alias",
    "m.room.encryption",
];

/// Invites `target`, a user of another server, to `room_id` as `sender`; `is_direct` marks a
/// direct chat (`createRoom`'s).
pub async fn invite_remote(
    state: &AppState,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    reason: Option<&str>,
    is_direct: bool,
) -> Result<StoredEvent> {
    let mut content = serde_json::json!({"membership": "invite"});
    if let Some(reason) = reason {
        content["reason"] = reason.into();
    }
    if is_direct {
        content["is_direct"] = true.into();
    }
    let content = to_raw_value(&content).map_err(Error::internal)?;
    let draft = Draft::membership(sender, target, &content);
    let (version, template) = super::template(state, room_id, &draft).await?;
    let signed = pdu::sign_template(template, &version, &state.server_name, &state.signing_key)
        .map_err(|e| Error::bad_json(e.to_string()))?;
    let mut invite_room_state = Vec::new();
    for event in state.store.current_state(room_id).await? {
        if INVITE_STATE.contains(&ClientEvent::parse(&event)?.kind().as_str()) {
            invite_room_state
                .push(RawStrippedState::Pdu(RawValue::from_string(event.json).map_err(Error::internal)?));
        }
    }
    let event = RawValue::from_string(CanonicalJsonValue::Object(signed.json).to_string())
        .map_err(Error::internal)?;
    let request = create_invite::v2::Request::new(
        room_id.to_owned(),
        signed.event_id.clone(),
        version.clone(),
        event,
        invite_room_state,
    );
    let answer = state
        .remote()?
        .send(&state.server_name, state.signing_key.key_pair(), target.server_name(), request)
        .await?;
    let returned: CanonicalJsonObject =
        serde_json::from_str(answer.event.get()).map_err(|e| Error::bad_json(e.to_string()))?;
    // The same event (its id is its hash), now signed by the invitee's server too.
    if pdu::event_id_of(&returned, &version).ok().as_ref() != Some(&signed.event_id) {
        return Err(Error::bad_json(format!(
            "{} returned another event than the invite",
            target.server_name()
        )));
    }
    let stored =
        remote::accept(state, room_id, &version, returned).await.map_err(remote::Refused::into_error)?;
    remote::forward(state, room_id, &stored, None).await?;
    Ok(stored)
}

/// A state event as an invitee is shown it: type, state key, content and sender. `None` for
/// anything else.
pub fn stripped(event: &RawValue) -> Option<serde_json::Value> {
    let event: serde_json::Value = serde_json::from_str(event.get()).ok()?;
    let field = |name: &str| event.get(name).cloned();
    Some(serde_json::json!({
        "type": field("type").filter(serde_json::Value::is_string)?,
        "state_key": field("state_key").filter(serde_json::Value::is_string)?,
        "content": field("content").filter(serde_json::Value::is_object)?,
        "sender": field("sender").filter(serde_json::Value::is_string)?,
    }))
}
