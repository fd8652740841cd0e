//! Room upgrades: a room replaced by a new one of another version, which members follow.
//!
//! As the spec lays it out (and Synapse does it): the new room names its predecessor, gets the
//! old room's state that describes it (name, topic, rules, encryption, bans, power levels), the
//! local aliases move over, the old room gets an `m.room.tombstone` pointing at the new one, and
//! its power levels are raised so that only moderators can still talk there.

use actix_web::web;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId, api::client::room::upgrade_room};
use serde_json::{Map, Value, json};

use super::room::{append_json, set_creators, supported_rules};
use crate::{
    error::{Error, Result},
    rooms::{self, client_event::ClientEvent},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(upgrade_room);
}

/// State carried from the old room to the new one, besides power levels and bans: what says
/// what the room is and who may do what in it.
const CARRIED_STATE: &[&str] = &[
    "m.room.join_rules",
    "m.room.name",
    "m.room.topic",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.pinned_events",
    "m.space.child",
    "m.space.parent",
];

/// Keys of the old create event's content the new room keeps.
const CARRIED_CREATE_KEYS: &[&str] = &["type", "m.federate"];

/// The power levels a content gives as numbers (versions before 10 allow numeric strings, which
/// later versions refuse).
fn integer_levels(value: &mut Value) {
    match value {
        Value::String(text) => {
            if let Ok(number) = text.trim().parse::<i64>() {
                *value = Value::from(number);
            }
        }
        Value::Object(map) => map.values_mut().for_each(integer_levels),
        _ => {}
    }
}

fn level(value: &Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// The power level needed to send a state event of `event_type`.
fn needed_for_state(levels: &Value, event_type: &str) -> i64 {
    level(&levels["events"][event_type]).or_else(|| level(&levels["state_default"])).unwrap_or(50)
}

/// POST /_matrix/client/v3/rooms/{roomId}/upgrade
async fn upgrade_room(
    state: web::Data<AppState>,
    request: Ruma<upgrade_room::v3::Request>,
) -> Result<upgrade_room::v3::Response> {
    let user = &request.sender.user_id;
    let body = request.body;
    let rules = supported_rules(&body.new_version)?;
    let old_room = &body.room_id;
    rooms::require_joined(&state, old_room, user).await?;
    let (have, levels) = rooms::power(&state, old_room, user).await?;
    let need = needed_for_state(&levels, "m.room.tombstone");
    if have < need {
        return Err(Error::forbidden(format!(
            "upgrading this room needs power level {need}; you have {have}"
        )));
    }

    let old_state = state.store.current_state(old_room).await?;
    let mut create_content = Map::new();
    let mut carried = Vec::new();
    let mut bans = Vec::new();
    let mut canonical_alias = None;
    for stored in &old_state {
        let event = ClientEvent::parse(stored)?;
        let (kind, key) = (event.kind(), event.state_key().unwrap_or_default());
        if kind == "m.room.create" {
            let old: Map<String, Value> = serde_json::from_value(event.content_value()?).unwrap_or_default();
            create_content.extend(old.into_iter().filter(|(k, _)| CARRIED_CREATE_KEYS.contains(&k.as_str())));
        } else if kind == "m.room.member" && event.content_str("membership").as_deref() == Some("ban") {
            bans.push((key, event.content_str("reason")));
        } else if kind == "m.room.canonical_alias" && key.is_empty() {
            canonical_alias = Some(event.content_value()?);
        } else if CARRIED_STATE.contains(&kind.as_str()) {
            carried.push((kind, key, event.content_value()?));
        }
    }
    // Where the new room's id is random, the tombstone goes first and the new room names it as
    // its predecessor's last event (as Synapse); from version 12 the new room's id is its create
    // event's hash, which cannot name an event that names it, so the tombstone comes last and
    // the predecessor names the old room's last event before it (clients such as matrix-nio
    // require an `event_id`).
    let chosen_id = rooms::new_room_id(&state, &body.new_version)?;
    let last_event = match &chosen_id {
        Some(new_room) => tombstone(&state, old_room, user, new_room).await?,
        None => state
            .store
            .room_events(old_room, 0, i64::MAX, 1, true)
            .await?
            .pop()
            .ok_or_else(|| Error::internal("a room without events"))?,
    };
    let predecessor = json!({ "room_id": old_room, "event_id": last_event.event_id });
    create_content.insert("predecessor".into(), predecessor);
    if !body.additional_creators.is_empty() {
        let listed = body.additional_creators.iter().map(|u| Value::from(u.as_str())).collect();
        create_content.insert("additional_creators".into(), Value::Array(listed));
    }
    let creators = set_creators(&mut create_content, &rules, user, &[])?;
    // Synapse sets the new room up with the private-chat preset before the old room's state
    // overrides it: guests may join unless the old room said otherwise.
    if !carried.iter().any(|(kind, _, _)| kind == "m.room.guest_access") {
        carried.push(("m.room.guest_access".to_owned(), String::new(), json!({"guest_access": "can_join"})));
    }

    // The new room's power levels are the old ones (as integers), without the creators where
    // they outrank everyone; the upgrader gets, for the time it sets the room up, what it needs.
    let mut power = levels.clone();
    if !power.is_object() {
        power = json!({});
    }
    integer_levels(&mut power);
    if rules.authorization.explicitly_privilege_room_creators {
        if let Some(users) = power["users"].as_object_mut() {
            users.retain(|id, _| !creators.iter().any(|c| c.as_str() == id));
        }
        if level(&power["events"]["m.room.tombstone"]).is_none_or(|l| l < 150) {
            power["events"]["m.room.tombstone"] = 150.into();
        }
    }
    let new_room = rooms::create(&state, &body.new_version, user, create_content, chosen_id.clone()).await?;
    append_json(
        &state,
        &new_room,
        user,
        "m.room.member",
        Some(user.as_str()),
        &json!({"membership": "join"}),
    )
    .await?;
    let setup_power = setup_power(&power, user, &creators, &rules, &carried);
    append_json(
        &state,
        &new_room,
        user,
        "m.room.power_levels",
        Some(""),
        setup_power.as_ref().unwrap_or(&power),
    )
    .await?;
    for (kind, key, content) in &carried {
        append_json(&state, &new_room, user, kind, Some(key), content).await?;
    }
    for (banned, reason) in &bans {
        let mut content = json!({"membership": "ban"});
        if let Some(reason) = reason {
            content["reason"] = reason.clone().into();
        }
        append_json(&state, &new_room, user, "m.room.member", Some(banned), &content).await?;
    }
    if setup_power.is_some() {
        append_json(&state, &new_room, user, "m.room.power_levels", Some(""), &power).await?;
    }

    move_aliases(&state, old_room, &new_room, user, canonical_alias).await?;
    if chosen_id.is_none() {
        tombstone(&state, old_room, user, &new_room).await?;
    }
    restrict_old_room(&state, old_room, user, levels).await?;
    transfer_user_state(&state, user, old_room, &new_room).await?;
    tracing::info!(%old_room, %new_room, version = %body.new_version, "room upgraded");
    Ok(upgrade_room::v3::Response::new(new_room))
}

/// What a user kept about the old room for themself goes to the new one, as Synapse does: the
/// room stays a direct chat (`m.direct`) and keeps its tags (`m.tag`), unless the user tagged the
/// new room already. For the upgrader at the upgrade, for other members when they join.
pub(super) async fn transfer_user_state(
    state: &AppState,
    user: &UserId,
    old_room: &RoomId,
    new_room: &RoomId,
) -> Result<()> {
    // Read and written in one locked step, so a client's concurrent change is not lost.
    let add_new_room = |current: Option<&str>| -> std::result::Result<Option<String>, String> {
        let Some(mut direct) = current.and_then(|c| crate::storage::parse_stored::<Value>(c).ok()) else {
            return Ok(None);
        };
        let mut changed = false;
        for rooms in direct.as_object_mut().into_iter().flat_map(|people| people.values_mut()) {
            if let Some(rooms) = rooms.as_array_mut()
                && rooms.iter().any(|r| r.as_str() == Some(old_room.as_str()))
                && !rooms.iter().any(|r| r.as_str() == Some(new_room.as_str()))
            {
                rooms.push(new_room.as_str().into());
                changed = true;
            }
        }
        Ok(changed.then(|| direct.to_string()))
    };
    let store = &state.store;
    rooms::at_new_position(state, |position| async move {
        Ok(store.update_account_data(user, None, "m.direct", position, &add_new_room).await?)
    })
    .await?
    .map_err(Error::internal)?;
    if state.store.account_data(user, Some(new_room.as_str()), "m.tag").await?.is_none()
        && let Some(tags) = state.store.account_data(user, Some(old_room.as_str()), "m.tag").await?
    {
        let content = serde_json::value::RawValue::from_string(tags).map_err(Error::internal)?;
        super::user_data::put(state, user, Some(new_room.as_str()), "m.tag", &content).await?;
    }
    Ok(())
}

/// Marks the old room as replaced by the new one.
async fn tombstone(
    state: &AppState,
    old_room: &RoomId,
    user: &UserId,
    new_room: &RoomId,
) -> Result<crate::storage::StoredEvent> {
    let content = json!({"body": "This room has been replaced", "replacement_room": new_room});
    append_json(state, old_room, user, "m.room.tombstone", Some(""), &content).await
}

/// Power levels that let `user` send every carried state event and the bans, if `power` does
/// not already (`None` then). Creators need none where they outrank everyone.
fn setup_power(
    power: &Value,
    user: &UserId,
    creators: &[OwnedUserId],
    rules: &ruma::room_version_rules::RoomVersionRules,
    carried: &[(String, String, Value)],
) -> Option<Value> {
    if rules.authorization.explicitly_privilege_room_creators && creators.iter().any(|c| c == user) {
        return None;
    }
    let have = level(&power["users"][user.as_str()]).or_else(|| level(&power["users_default"])).unwrap_or(0);
    let need = carried
        .iter()
        .map(|(kind, _, _)| needed_for_state(power, kind))
        .chain([level(&power["ban"]).unwrap_or(50), needed_for_state(power, "m.room.power_levels")])
        .max()
        .unwrap_or(0);
    if have >= need {
        return None;
    }
    let mut raised = power.clone();
    raised["users"][user.as_str()] = need.into();
    Some(raised)
}

/// Moves the local aliases and the canonical alias from the old room to the new one, and the
/// directory listing with them.
async fn move_aliases(
    state: &AppState,
    old_room: &RoomId,
    new_room: &OwnedRoomId,
    user: &UserId,
    canonical_alias: Option<Value>,
) -> Result<()> {
    state.store.move_aliases(old_room, new_room).await?;
    if let Some(content) = canonical_alias.filter(|c| c.as_object().is_some_and(|m| !m.is_empty())) {
        // Cleared in the old room first: an alias must point at the room that names it.
        append_json(state, old_room, user, "m.room.canonical_alias", Some(""), &json!({})).await?;
        append_json(state, new_room, user, "m.room.canonical_alias", Some(""), &content).await?;
    }
    if state.store.room_is_public(old_room).await? {
        state.store.set_room_public(new_room, true).await?;
        state.store.set_room_public(old_room, false).await?;
    }
    Ok(())
}

/// Raises the old room's `events_default` and `invite` to at least 50 (and above
/// `users_default`), so that only moderators talk or invite there once it is replaced.
async fn restrict_old_room(
    state: &AppState,
    old_room: &RoomId,
    user: &UserId,
    mut levels: Value,
) -> Result<()> {
    if !levels.is_object() {
        return Ok(());
    }
    let restricted = (level(&levels["users_default"]).unwrap_or(0) + 1).max(50);
    let mut changed = false;
    for key in ["events_default", "invite"] {
        if level(&levels[key]).unwrap_or(0) < restricted {
            levels[key] = restricted.into();
            changed = true;
        }
    }
    if changed {
        // Best effort, as in Synapse: the upgrader may lack the level to change power levels.
        if let Err(error) = append_json(state, old_room, user, "m.room.power_levels", Some(""), &levels).await
        {
            tracing::info!(%old_room, %error, "old room's power levels not restricted after upgrade");
        }
    }
    Ok(())
}
