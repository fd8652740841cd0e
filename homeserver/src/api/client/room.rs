//! Rooms: `createRoom`, membership (join, invite, leave, kick, ban, unban, forget), sending
//! events, state, redaction, and reading history (`messages`, `event`, `members`).

use std::collections::BTreeMap;

use actix_web::{http::StatusCode, web};
use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    api::{
        Direction,
        client::{
            context::get_context,
            membership::{
                ban_user, forget_room, get_member_events, invite_user, join_room_by_id,
                join_room_by_id_or_alias, joined_members, joined_rooms, kick_user, leave_room, unban_user,
            },
            message::{get_message_events, send_message_event},
            redact::redact_event,
            room::{Visibility, create_room, get_room_event},
            state::{get_state_event_for_key, get_state_events, send_state_event},
        },
    },
};
use serde_json::{Map, Value, json, value::to_raw_value};

use crate::{
    auth::ratelimit::Action,
    error::{Error, ErrorKind, Result},
    rooms::{
        self, Draft,
        client_event::{ClientEvent, Reader, matches_filter, serve, serve_one},
        visibility::{Ignored, ReadRules, erase_for_reader},
    },
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::StoredEvent,
};

/// Longest `limit` a client may ask `/messages` for.
const MAX_PAGE: i64 = 1000;

pub(super) fn routes(router: &mut Router) {
    router
        .add(create_room)
        .add(join_by_id)
        .add(join_by_id_or_alias)
        .add(invite)
        .add(leave)
        .add(kick)
        .add(ban)
        .add(unban)
        .add(forget)
        .add(joined_rooms)
        .add_responding(joined_members)
        .add(members)
        .add(send_message)
        .add(send_state)
        .add(get_state_for_key)
        .add(get_state)
        .add(messages)
        .add(get_event)
        .add(context)
        .add(redact);
    // Without a transaction id: no spec version has it, but Synapse serves it and SyTest and old
    // clients use it. Each request is a new event.
    for path in [
        "/_matrix/client/v3/rooms/{room_id}/send/{event_type}",
        "/_matrix/client/r0/rooms/{room_id}/send/{event_type}",
    ] {
        router.add_route(http::Method::POST, path, || web::post().to(send_message_without_txn));
    }
}

fn raw_json(value: &Value) -> Result<Box<serde_json::value::RawValue>> {
    to_raw_value(value).map_err(Error::internal)
}

pub(super) async fn append_json(
    state: &AppState,
    room_id: &RoomId,
    sender: &UserId,
    event_type: &str,
    state_key: Option<&str>,
    content: &Value,
) -> Result<StoredEvent> {
    let content = raw_json(content)?;
    let draft = Draft {
        sender,
        event_type,
        state_key,
        content: &content,
        redacts: None,
        redacted_json: None,
        txn: None,
    };
    rooms::append(state, room_id, draft).await
}

/// Merges `overrides` (a JSON object) into `base`, key by key.
fn merge(base: &mut Value, overrides: &serde_json::value::RawValue) -> Result<()> {
    let overrides: Map<String, Value> = serde_json::from_str(overrides.get())
        .map_err(|_| Error::bad_json("power_level_content_override must be an object"))?;
    if let Some(base) = base.as_object_mut() {
        base.extend(overrides);
    }
    Ok(())
}

/// POST /_matrix/client/v3/createRoom
async fn create_room(
    state: web::Data<AppState>,
    request: Ruma<create_room::v3::Request>,
) -> Result<create_room::v3::Response> {
    let creator = &request.sender.user_id;
    let body = request.body;
    let version = body.room_version.clone().unwrap_or_else(|| state.config.rooms.default_version());
    let rules = supported_rules(&version)?;
    let alias = match &body.room_alias_name {
        Some(name) => {
            let alias = ruma::OwnedRoomAliasId::try_from(format!("#{name}:{}", state.server_name))
                .map_err(|e| Error::invalid_param(format!("room_alias_name: {e}")))?;
            super::directory::local_alias(&state, &alias)?;
            if state.store.resolve_alias(alias.as_str()).await?.is_some() {
                return Err(Error::new(StatusCode::BAD_REQUEST, ErrorKind::RoomInUse, "that alias is taken"));
            }
            Some(alias)
        }
        None => None,
    };
    for user in &body.invite {
        if user == creator {
            return Err(Error::invalid_param("you cannot invite yourself"));
        }
    }
    // Checked before anything is written, so a refused request leaves no half-made room; the
    // count is bounded because each entry is an event signed and stored one by one.
    let max_initial_state = state.config.limits.max_initial_state;
    if body.initial_state.len() > max_initial_state {
        return Err(Error::invalid_param(format!(
            "initial_state has {} events; at most {max_initial_state} are allowed",
            body.initial_state.len()
        )));
    }
    let mut initial_state = Vec::with_capacity(body.initial_state.len());
    for event in &body.initial_state {
        let event: Map<String, Value> = serde_json::from_str(event.json().get())
            .map_err(|_| Error::bad_json("initial_state entries must be objects"))?;
        let event_type = event
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_json("initial_state entry without type"))?
            .to_owned();
        if matches!(event_type.as_str(), "m.room.create" | "m.room.member" | "m.room.power_levels") {
            return Err(Error::bad_json(format!("initial_state may not set {event_type}")));
        }
        let key = event.get("state_key").and_then(Value::as_str).unwrap_or_default().to_owned();
        rooms::check_type_and_key(&event_type, Some(&key))
            .map_err(|why| Error::bad_json(format!("initial_state: {why}")))?;
        let content = event.get("content").cloned().unwrap_or_else(|| json!({}));
        if event_type == CANONICAL_ALIAS && key.is_empty() {
            // The room is new: only the alias this request creates can point to it.
            for named in new_canonical_aliases(&content, None)? {
                if Some(&named) != alias.as_ref() {
                    return Err(bad_alias(format!("{named} does not point to this room")));
                }
            }
        }
        initial_state.push((event_type, key, content));
    }
    let mut creation = match &body.creation_content {
        Some(raw) => serde_json::from_str::<Map<String, Value>>(raw.json().get())
            .map_err(|_| Error::bad_json("creation_content must be an object"))?,
        None => Map::new(),
    };
    creation.remove("room_version");
    if creation.get("type").is_some_and(|t| !t.is_string()) {
        return Err(Error::bad_json("creation_content.type must be a string"));
    }

    use create_room::v3::RoomPreset;
    let preset = body.preset.clone().unwrap_or(match body.visibility {
        Visibility::Public => RoomPreset::PublicChat,
        _ => RoomPreset::PrivateChat,
    });
    // In a trusted private chat the people invited are the creator's equals: from version 12
    // they are creators too (as Synapse makes them), before it they get power level 100.
    let invitees_are_creators =
        preset == RoomPreset::TrustedPrivateChat && rules.authorization.additional_room_creators;
    let extra_creators = if invitees_are_creators { body.invite.as_slice() } else { &[] };
    let creators = set_creators(&mut creation, &rules, creator, extra_creators)?;
    let mut users = Map::new();
    if !rules.authorization.explicitly_privilege_room_creators {
        users.insert(creator.to_string(), json!(100));
        if preset == RoomPreset::TrustedPrivateChat {
            users.extend(body.invite.iter().map(|u| (u.to_string(), json!(100))));
        }
    }
    // Where creators outrank everyone (version 12), only they may upgrade the room.
    let tombstone = if rules.authorization.explicitly_privilege_room_creators { 150 } else { 100 };
    let mut power = json!({
        "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
        "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": tombstone,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "notifications": {"room": 50}
    });
    if let Some(overrides) = &body.power_level_content_override {
        merge(&mut power, overrides.json())?;
    }
    if rules.authorization.explicitly_privilege_room_creators
        && creators.iter().any(|c| power["users"].get(c.as_str()).is_some())
    {
        return Err(Error::bad_json(
            "room creators outrank every power level and may not be listed in users",
        ));
    }
    let room_id = rooms::create(&state, &version, creator, creation, None).await?;
    let creator_join = own_join_content(&state, creator, Map::new(), None).await?;
    append_json(&state, &room_id, creator, "m.room.member", Some(creator.as_str()), &creator_join).await?;

    append_json(&state, &room_id, creator, "m.room.power_levels", Some(""), &power).await?;

    if let Some(alias) = &alias {
        super::directory::add_alias(&state, alias, &room_id, creator).await?;
        append_json(&state, &room_id, creator, "m.room.canonical_alias", Some(""), &json!({"alias": alias}))
            .await?;
    }
    let join_rule = if preset == RoomPreset::PublicChat { "public" } else { "invite" };
    let mut initial: Vec<(String, String, Value)> = vec![
        ("m.room.join_rules".into(), String::new(), json!({"join_rule": join_rule})),
        ("m.room.history_visibility".into(), String::new(), json!({"history_visibility": "shared"})),
    ];
    if preset != RoomPreset::PublicChat {
        initial.push(("m.room.guest_access".into(), String::new(), json!({"guest_access": "can_join"})));
    }
    for (event_type, key, content) in initial_state {
        initial.retain(|(t, k, _)| !(*t == event_type && *k == key));
        initial.push((event_type, key, content));
    }
    if let Some(name) = &body.name {
        initial.push(("m.room.name".into(), String::new(), json!({"name": name})));
    }
    if let Some(topic) = &body.topic {
        initial.push(("m.room.topic".into(), String::new(), json!({"topic": topic})));
    }
    for (event_type, key, content) in &initial {
        append_json(&state, &room_id, creator, event_type, Some(key), content).await?;
    }
    for user in &body.invite {
        if user.server_name() != state.server_name {
            // Another server's user: that server signs the invite too, as for `/invite`.
            rooms::invite::invite_remote(&state, &room_id, creator, user, None, body.is_direct).await?;
            continue;
        }
        let mut content = json!({"membership": "invite"});
        if body.is_direct {
            content["is_direct"] = true.into();
        }
        append_json(&state, &room_id, creator, "m.room.member", Some(user.as_str()), &content).await?;
    }
    if body.visibility == Visibility::Public {
        state.store.set_room_public(&room_id, true).await?;
    }
    tracing::info!(%room_id, %version, "room created");
    Ok(create_room::v3::Response::new(room_id))
}

/// The rules of a room version a client asked for, or `M_UNSUPPORTED_ROOM_VERSION`.
pub(super) fn supported_rules(version: &RoomVersionId) -> Result<ruma::room_version_rules::RoomVersionRules> {
    federation::pdu::rules(version).map_err(|_| {
        let supported: Vec<&str> =
            federation::pdu::SUPPORTED_ROOM_VERSIONS.iter().map(|v| v.as_str()).collect();
        Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedRoomVersion,
            format!("room version {version} is not supported; supported: {}", supported.join(", ")),
        )
    })
}

/// Most additional creators a room may name (each is checked on every power check).
const MAX_ADDITIONAL_CREATORS: usize = 100;

/// Puts the creator fields a room version uses into a create event's `content` (`creator`
/// before version 11; `additional_creators` from version 12, with `extra` added to those the
/// client listed) and returns every creator.
pub(super) fn set_creators(
    content: &mut Map<String, Value>,
    rules: &ruma::room_version_rules::RoomVersionRules,
    creator: &UserId,
    extra: &[ruma::OwnedUserId],
) -> Result<Vec<ruma::OwnedUserId>> {
    if rules.authorization.use_room_create_sender {
        content.remove("creator");
    } else {
        content.insert("creator".into(), creator.as_str().into());
    }
    let mut creators = vec![creator.to_owned()];
    if !rules.authorization.additional_room_creators {
        content.remove("additional_creators");
        return Ok(creators);
    }
    let listed = match content.remove("additional_creators") {
        None => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(Error::bad_json("additional_creators must be a list of user ids")),
    };
    for item in listed {
        let user = item
            .as_str()
            .and_then(|id| ruma::OwnedUserId::try_from(id).ok())
            .ok_or_else(|| Error::bad_json("additional_creators must be a list of user ids"))?;
        if !creators.contains(&user) {
            creators.push(user);
        }
    }
    for user in extra {
        if !creators.contains(user) {
            creators.push(user.clone());
        }
    }
    if creators.len() > MAX_ADDITIONAL_CREATORS + 1 {
        return Err(Error::invalid_param(format!("at most {MAX_ADDITIONAL_CREATORS} additional creators")));
    }
    if creators.len() > 1 {
        let others: Vec<Value> = creators[1..].iter().map(|u| Value::from(u.as_str())).collect();
        content.insert("additional_creators".into(), Value::Array(others));
    }
    Ok(creators)
}

/// Longest `reason` of a membership change, in bytes.
const MAX_REASON_BYTES: usize = 1024;

fn check_reason(reason: Option<&str>) -> Result<()> {
    if reason.is_some_and(|reason| reason.len() > MAX_REASON_BYTES) {
        return Err(Error::invalid_param(format!("reason longer than {MAX_REASON_BYTES} bytes")));
    }
    Ok(())
}

/// Sets `target`'s membership in a room, as `sender`.
async fn set_membership(
    state: &AppState,
    room_id: &RoomId,
    sender: &UserId,
    target: &UserId,
    membership: &str,
    reason: Option<&str>,
) -> Result<()> {
    check_reason(reason)?;
    let mut content = json!({"membership": membership});
    if let Some(reason) = reason {
        content["reason"] = reason.into();
    }
    append_json(state, room_id, sender, "m.room.member", Some(target.as_str()), &content).await.map(drop)
}

/// The content of `user`'s own join: `extra` (what else the client put in its request), the
/// user's display name and avatar unless `extra` names them (as Synapse, so that members see who
/// joined), and the reason.
async fn own_join_content(
    state: &AppState,
    user: &UserId,
    mut extra: Map<String, Value>,
    reason: Option<&str>,
) -> Result<Value> {
    check_reason(reason)?;
    let (displayname, avatar_url) = state.store.profile(user).await?;
    for (key, value) in [("displayname", displayname), ("avatar_url", avatar_url)] {
        if let Some(value) = value
            && !extra.contains_key(key)
        {
            extra.insert(key.to_owned(), value.into());
        }
    }
    match reason {
        Some(reason) => extra.insert("reason".to_owned(), reason.into()),
        None => extra.remove("reason"),
    };
    extra.insert("membership".to_owned(), "join".into());
    Ok(Value::Object(extra))
}

/// The keys of a join request's body besides those the spec defines: clients may add their own,
/// and they go into the member event (SyTest: "POST /join/:room_alias can join a room with
/// custom content").
fn extra_join_keys(raw_body: &[u8]) -> Result<Map<String, Value>> {
    if raw_body.is_empty() {
        return Ok(Map::new());
    }
    let mut extra: Map<String, Value> = serde_json::from_slice(raw_body)
        .map_err(|_| Error::bad_json("the body of a join must be a JSON object"))?;
    for defined in ["reason", "third_party_signed", "membership"] {
        extra.remove(defined);
    }
    Ok(extra)
}

/// Joins `user` to a room with `content`, unless they are joined already with exactly that
/// content: then nothing changes and no event is sent (as Synapse). A guest joins only rooms
/// whose `m.room.guest_access` is `can_join` (the spec's "Guest access").
async fn join(
    state: &AppState,
    room_id: &RoomId,
    user: &crate::auth::AuthedUser,
    content: &Value,
    via: &[ruma::OwnedServerName],
) -> Result<()> {
    let user_id = &user.user_id;
    if state.remote().is_ok()
        && !rooms::remote::servers_in_room(state, room_id).await?.contains(&state.server_name)
    {
        // No one here is in the room: it is joined through a server that is, the inviter's first.
        let mut via: Vec<_> = via.iter().filter(|server| **server != state.server_name).cloned().collect();
        if let Some(invite) =
            state.store.current_state_event(room_id, "m.room.member", user_id.as_str()).await?
            && let Ok(sender) = ruma::OwnedUserId::try_from(ClientEvent::parse(&invite)?.sender())
            && sender.server_name() != state.server_name
        {
            via.insert(0, sender.server_name().to_owned());
        }
        if !via.is_empty() {
            if user.is_guest {
                return Err(Error::forbidden("guests may not join rooms of other servers"));
            }
            rooms::join::join_remote(state, room_id, &via, user_id, content).await?;
            return Ok(());
        }
    }
    if user.is_guest && !guests_can_join(state, room_id).await? {
        return Err(Error::forbidden("guests may not join this room: its guest access is not can_join"));
    }
    let user = user_id;
    if unchanged_state(state, room_id, user, "m.room.member", user.as_str(), content).await?.is_some() {
        return Ok(());
    }
    let was_joined = state.store.membership(room_id, user).await?.as_deref() == Some("join");
    append_json(state, room_id, user, "m.room.member", Some(user.as_str()), content).await?;
    // Joining an upgraded room: what the user kept about the room it replaced follows them, as
    // in Synapse (the upgrader's moved at the upgrade).
    if !was_joined && let Some(old_room) = predecessor(state, room_id).await? {
        super::upgrade::transfer_user_state(state, user, &old_room, room_id).await?;
    }
    Ok(())
}

/// The room an upgraded room replaced (its create event's `predecessor`).
async fn predecessor(state: &AppState, room_id: &RoomId) -> Result<Option<ruma::OwnedRoomId>> {
    let Some(create) = state.store.current_state_event(room_id, "m.room.create", "").await? else {
        return Ok(None);
    };
    let content = ClientEvent::parse(&create)?.content_value()?;
    Ok(content["predecessor"]["room_id"].as_str().and_then(|id| ruma::OwnedRoomId::try_from(id).ok()))
}

/// The event in a room's current state at `(event_type, state_key)` if `sender` sent it with
/// exactly `content`: sending it again would change nothing, so the spec's idempotence (and
/// Synapse) answers with that event instead of making another.
async fn unchanged_state(
    state: &AppState,
    room_id: &RoomId,
    sender: &UserId,
    event_type: &str,
    state_key: &str,
    content: &Value,
) -> Result<Option<String>> {
    let Some(current) = state.store.current_state_event(room_id, event_type, state_key).await? else {
        return Ok(None);
    };
    let client = ClientEvent::parse(&current)?;
    if client.sender() != sender.as_str() || current.redacted_by.is_some() {
        return Ok(None);
    }
    Ok((client.content_value()? == *content).then_some(current.event_id))
}

/// Whether the room's `m.room.guest_access` lets guests join.
async fn guests_can_join(state: &AppState, room_id: &RoomId) -> Result<bool> {
    let Some(event) = state.store.current_state_event(room_id, "m.room.guest_access", "").await? else {
        return Ok(false);
    };
    Ok(ClientEvent::parse(&event)?.content_str("guest_access").as_deref() == Some("can_join"))
}

/// POST /_matrix/client/v3/rooms/{roomId}/join
async fn join_by_id(
    state: web::Data<AppState>,
    request: Ruma<join_room_by_id::v3::Request>,
) -> Result<join_room_by_id::v3::Response> {
    let user = &request.sender.user_id;
    let room_id = request.body.room_id;
    let extra = extra_join_keys(&request.raw_body)?;
    let content = own_join_content(&state, user, extra, request.body.reason.as_deref()).await?;
    let via = rooms::join::servers_for(&room_id, &[]);
    join(&state, &room_id, &request.sender, &content, &via).await?;
    Ok(join_room_by_id::v3::Response::new(room_id))
}

/// POST /_matrix/client/v3/join/{roomIdOrAlias}
async fn join_by_id_or_alias(
    state: web::Data<AppState>,
    request: Ruma<join_room_by_id_or_alias::v3::Request>,
) -> Result<join_room_by_id_or_alias::v3::Response> {
    let user = &request.sender.user_id;
    let target = &request.body.room_id_or_alias;
    let (room_id, servers) = match <&ruma::RoomAliasId>::try_from(target.as_str()) {
        Ok(alias) => super::directory::resolve_anywhere(&state, alias).await?,
        Err(_) => (
            OwnedRoomId::try_from(target.as_str())
                .map_err(|_| Error::invalid_param("not a room id or alias"))?,
            Vec::new(),
        ),
    };
    let mut via = request.body.via.clone();
    via.extend(servers);
    let via = rooms::join::servers_for(&room_id, &via);
    let extra = extra_join_keys(&request.raw_body)?;
    let content = own_join_content(&state, user, extra, request.body.reason.as_deref()).await?;
    join(&state, &room_id, &request.sender, &content, &via).await?;
    Ok(join_room_by_id_or_alias::v3::Response::new(room_id))
}

/// POST /_matrix/client/v3/rooms/{roomId}/invite
async fn invite(
    state: web::Data<AppState>,
    request: Ruma<invite_user::v3::Request>,
) -> Result<invite_user::v3::Response> {
    let body = &request.body;
    let (target, reason) = match &body.recipient {
        invite_user::v3::InvitationRecipient::UserId(recipient) => {
            (recipient.user_id.clone(), recipient.reason.clone())
        }
        _ => {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::Unknown,
                "third-party invites are not supported",
            ));
        }
    };
    // An invitee of an application service's namespace that does not exist yet is asked of the
    // service, which may create it.
    if target.server_name() == state.server_name && state.store.get_user(&target).await?.is_none() {
        state.appservices.query_user(&target).await;
    }
    if target.server_name() != state.server_name {
        // Another server's user: that server signs the invite too.
        check_reason(reason.as_deref())?;
        rooms::invite::invite_remote(
            &state,
            &body.room_id,
            &request.sender.user_id,
            &target,
            reason.as_deref(),
            false,
        )
        .await?;
        return Ok(invite_user::v3::Response::new());
    }
    set_membership(&state, &body.room_id, &request.sender.user_id, &target, "invite", reason.as_deref())
        .await?;
    Ok(invite_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/leave
async fn leave(
    state: web::Data<AppState>,
    request: Ruma<leave_room::v3::Request>,
) -> Result<leave_room::v3::Response> {
    let user = &request.sender.user_id;
    let room_id = &request.body.room_id;
    check_reason(request.body.reason.as_deref())?;
    if state.remote().is_ok()
        && !rooms::remote::servers_in_room(&state, room_id).await?.contains(&state.server_name)
        && let Some(invite) = state.store.current_state_event(room_id, "m.room.member", user.as_str()).await?
        && let Ok(inviter) = ruma::OwnedUserId::try_from(ClientEvent::parse(&invite)?.sender())
        && inviter.server_name() != state.server_name
    {
        // Invited to a room of another server and not in it: the invite is rejected there.
        let server = inviter.server_name().to_owned();
        rooms::join::leave_remote(&state, &server, room_id, user, request.body.reason.as_deref()).await?;
        return Ok(leave_room::v3::Response::new());
    }
    set_membership(&state, room_id, user, user, "leave", request.body.reason.as_deref()).await?;
    Ok(leave_room::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/kick
async fn kick(
    state: web::Data<AppState>,
    request: Ruma<kick_user::v3::Request>,
) -> Result<kick_user::v3::Response> {
    let body = &request.body;
    match state.store.membership(&body.room_id, &body.user_id).await?.as_deref() {
        Some("join" | "invite" | "knock") => {}
        _ => return Err(Error::forbidden("that user is not in the room")),
    }
    set_membership(
        &state,
        &body.room_id,
        &request.sender.user_id,
        &body.user_id,
        "leave",
        body.reason.as_deref(),
    )
    .await?;
    Ok(kick_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/ban
async fn ban(
    state: web::Data<AppState>,
    request: Ruma<ban_user::v3::Request>,
) -> Result<ban_user::v3::Response> {
    let body = &request.body;
    set_membership(
        &state,
        &body.room_id,
        &request.sender.user_id,
        &body.user_id,
        "ban",
        body.reason.as_deref(),
    )
    .await?;
    Ok(ban_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/unban
async fn unban(
    state: web::Data<AppState>,
    request: Ruma<unban_user::v3::Request>,
) -> Result<unban_user::v3::Response> {
    let body = &request.body;
    if state.store.membership(&body.room_id, &body.user_id).await?.as_deref() != Some("ban") {
        return Err(Error::forbidden("that user is not banned"));
    }
    set_membership(
        &state,
        &body.room_id,
        &request.sender.user_id,
        &body.user_id,
        "leave",
        body.reason.as_deref(),
    )
    .await?;
    Ok(unban_user::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/forget
async fn forget(
    state: web::Data<AppState>,
    request: Ruma<forget_room::v3::Request>,
) -> Result<forget_room::v3::Response> {
    match state.store.membership(&request.body.room_id, &request.sender.user_id).await?.as_deref() {
        Some("join" | "invite" | "knock") => Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::Unknown,
            "leave the room before forgetting it",
        )),
        // Forgetting hides nothing yet: left rooms are not sent in initial syncs anyway.
        _ => Ok(forget_room::v3::Response::new()),
    }
}

/// GET /_matrix/client/v3/joined_rooms
async fn joined_rooms(
    state: web::Data<AppState>,
    request: Ruma<joined_rooms::v3::Request>,
) -> Result<joined_rooms::v3::Response> {
    let rooms = state.store.user_rooms(&request.sender.user_id).await?;
    let joined = rooms
        .into_iter()
        .filter(|(_, membership, _)| membership == "join")
        .filter_map(|(room, _, _)| OwnedRoomId::try_from(room).ok())
        .collect();
    Ok(joined_rooms::v3::Response::new(joined))
}

/// The member events among state events.
fn members_of(events: Vec<StoredEvent>) -> Result<Vec<StoredEvent>> {
    let mut members = Vec::new();
    for event in events {
        if ClientEvent::parse(&event)?.kind() == "m.room.member" {
            members.push(event);
        }
    }
    Ok(members)
}

/// GET /_matrix/client/v3/rooms/{roomId}/joined_members
///
/// Every member has `display_name` and `avatar_url`, `null` when unset, as Synapse answers
/// (SyTest reads both keys); ruma leaves unset ones out.
async fn joined_members(
    state: web::Data<AppState>,
    request: Ruma<joined_members::v3::Request>,
) -> Result<actix_web::HttpResponse> {
    let mut body = super::response_json(joined_members_of(&state, &request).await?)?;
    if let Some(joined) = body.get_mut("joined").and_then(Value::as_object_mut) {
        for member in joined.values_mut().filter_map(Value::as_object_mut) {
            for key in ["display_name", "avatar_url"] {
                member.entry(key).or_insert(Value::Null);
            }
        }
    }
    Ok(actix_web::HttpResponse::Ok().json(body))
}

async fn joined_members_of(
    state: &AppState,
    request: &Ruma<joined_members::v3::Request>,
) -> Result<joined_members::v3::Response> {
    let room_id = &request.body.room_id;
    // Members, and anyone in a world-readable room (as Synapse); a departed member sees the
    // members as of their leave, as `/members` shows them.
    let rules = ReadRules::for_reader(state, room_id, &request.sender.user_id).await?;
    let mut joined = BTreeMap::new();
    for event in members_of(rules.readable_state(state, room_id).await?)? {
        let event = ClientEvent::parse(&event)?;
        if event.content_str("membership").as_deref() != Some("join") {
            continue;
        }
        let Some(user) = event.state_key().and_then(|u| OwnedUserId::try_from(u).ok()) else {
            continue;
        };
        let mut member = joined_members::v3::RoomMember::new();
        member.display_name = event.content_str("displayname");
        member.avatar_url = event.content_str("avatar_url").map(ruma::OwnedMxcUri::from);
        joined.insert(user, member);
    }
    Ok(joined_members::v3::Response::new(joined))
}

/// The reader behind a request: its user and device.
pub(super) fn reader_of(sender: &crate::auth::AuthedUser) -> Reader<'_> {
    Reader { user: &sender.user_id, device: &sender.device_id, federation_format: false }
}

/// Parses a pagination token (`s<position>`).
pub(super) fn parse_token(token: &str) -> Result<i64> {
    // A sync token may carry more after `_` (see `sync::parse_sync_token`); the position is first.
    let position = token.split_once('_').map_or(token, |(position, _)| position);
    // Only as `token` writes it: `s+5` or `s05` were never issued.
    position
        .strip_prefix('s')
        .and_then(|digits| digits.parse::<i64>().ok().filter(|n| *n >= 0 && n.to_string() == digits))
        .ok_or_else(|| Error::invalid_param(format!("`{token}` is not a token this server issued")))
}

/// A pagination token of `/messages`, which may point below zero: into history fetched from
/// other servers, stored before everything seen live.
fn parse_page_token(token: &str) -> Result<i64> {
    match token.strip_prefix("s-") {
        Some(digits) => digits
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0 && n.to_string() == digits)
            .map(|n| -n)
            .ok_or_else(|| Error::invalid_param(format!("`{token}` is not a token this server issued"))),
        None => parse_token(token),
    }
}

pub(super) fn token(position: i64) -> String {
    format!("s{position}")
}

/// GET /_matrix/client/v3/rooms/{roomId}/members
async fn members(
    state: web::Data<AppState>,
    request: Ruma<get_member_events::v3::Request>,
) -> Result<get_member_events::v3::Response> {
    let body = &request.body;
    let rules = ReadRules::for_reader(&state, &body.room_id, &request.sender.user_id).await?;
    let at = body.at.as_deref().map(parse_token).transpose()?;
    let events = match at {
        // At a point of the past: only while the reader could read it.
        Some(at) if rules.allows(at) => state.store.state_at(&body.room_id, at).await?,
        Some(_) => return Err(Error::forbidden("you could not read the room at that point")),
        None => rules.readable_state(&state, &body.room_id).await?,
    };
    let mut chunk = Vec::new();
    for event in members_of(events)? {
        let client = ClientEvent::parse(&event)?;
        let membership = client.content_str("membership").unwrap_or_default();
        if body.membership.as_ref().is_some_and(|m| m.as_str() != membership)
            || body.not_membership.as_ref().is_some_and(|m| m.as_str() == membership)
        {
            continue;
        }
        chunk.push(event);
    }
    Ok(get_member_events::v3::Response::new(serve(&state, &chunk, reader_of(&request.sender)).await?))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
async fn send_message(
    state: web::Data<AppState>,
    request: Ruma<send_message_event::v3::Request>,
) -> Result<send_message_event::v3::Response> {
    let user = &request.sender;
    let body = &request.body;
    state.limiter.check_user(Action::RoomEvent, user).await?;
    // A retried transaction is recognised inside the append (see `rooms::append`).
    let event_type = body.event_type.to_string();
    if event_type == "m.room.redaction" {
        return Err(Error::bad_json("use the redact endpoint to redact events"));
    }
    let content = body.body.json();
    serde_json::from_str::<Map<String, Value>>(content.get())
        .map_err(|_| Error::bad_json("content must be an object"))?;
    let draft = Draft {
        sender: &user.user_id,
        event_type: &event_type,
        state_key: None,
        content,
        redacts: None,
        redacted_json: None,
        txn: Some((user.device_id.as_str(), body.txn_id.as_str())),
    };
    let stored = rooms::append(&state, &body.room_id, draft).await?;
    Ok(send_message_event::v3::Response::new(stored.event_id.try_into().map_err(Error::internal)?))
}

/// POST /_matrix/client/v3/rooms/{roomId}/send/{eventType}
///
/// `PUT …/send/{eventType}/{txnId}` with a fresh transaction id of the server's choosing.
async fn send_message_without_txn(
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    crate::ruma_wrapper::Authenticated(sender): crate::ruma_wrapper::Authenticated,
    crate::ruma_wrapper::JsonBody(raw_body): crate::ruma_wrapper::JsonBody,
) -> Result<crate::ruma_wrapper::RumaResponse<send_message_event::v3::Response>> {
    let room_id = OwnedRoomId::try_from(req.match_info().get("room_id").unwrap_or_default())
        .map_err(|e| Error::invalid_param(format!("not a room id: {e}")))?;
    let event_type = req.match_info().get("event_type").unwrap_or_default();
    let content: Box<serde_json::value::RawValue> = crate::ruma_wrapper::parse_json_body(&raw_body)?;
    let txn_id = ruma::OwnedTransactionId::from(format!("hearth-{}", crate::auth::tokens::random_token(12)));
    let body = send_message_event::v3::Request::new_raw(
        room_id,
        txn_id,
        event_type.into(),
        ruma::serde::Raw::from_json(content),
    );
    let client_ip = crate::ruma_wrapper::client_ip(&req, state.config.listen.trust_x_forwarded_for);
    send_message(state, Ruma { body, sender, client_ip, raw_body })
        .await
        .map(crate::ruma_wrapper::RumaResponse)
}

/// The state event type of a room's published alias.
const CANONICAL_ALIAS: &str = "m.room.canonical_alias";

/// Most aliases one `m.room.canonical_alias` event may add (each is looked up).
const MAX_NEW_ALIASES: usize = 100;

fn bad_alias(message: impl Into<String>) -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::BadAlias, message)
}

/// The aliases `m.room.canonical_alias` content names (`alias`, `alt_aliases`) that `previous`
/// content did not: those must be checked to point to the room (as Synapse, only new ones, so
/// that an alias deleted since does not block every later change). Each must be a room alias
/// (`M_INVALID_PARAM` when it is not one, as the spec and Synapse answer; `M_BAD_ALIAS` is for
/// aliases that do not lead to the room); `alt_aliases` must be a list (`M_INVALID_PARAM`). An
/// empty `alias` is none.
fn new_canonical_aliases(content: &Value, previous: Option<&Value>) -> Result<Vec<OwnedRoomAliasId>> {
    let parse = |value: &Value| -> Result<Option<OwnedRoomAliasId>> {
        match value {
            Value::Null => Ok(None),
            Value::String(text) if text.is_empty() => Ok(None),
            // Not an alias at all is a bad parameter; an alias that does not point here is
            // `M_BAD_ALIAS` (as Synapse and the compliance suite tell them apart).
            Value::String(text) => OwnedRoomAliasId::try_from(text.as_str())
                .map(Some)
                .map_err(|e| Error::invalid_param(format!("`{text}` is not a room alias: {e}"))),
            _ => Err(Error::invalid_param("aliases must be strings")),
        }
    };
    let alt = |content: &Value| -> Result<Vec<Value>> {
        match content.get("alt_aliases") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.clone()),
            Some(_) => Err(Error::invalid_param("alt_aliases must be a list of room aliases")),
        }
    };
    let old_alias = previous.and_then(|p| p.get("alias")).and_then(Value::as_str);
    let old_alt: Vec<Value> = previous.map(|p| alt(p).unwrap_or_default()).unwrap_or_default();
    let mut new = Vec::new();
    if let Some(alias) = content.get("alias")
        && alias.as_str() != old_alias
        && let Some(alias) = parse(alias)?
    {
        new.push(alias);
    }
    for item in alt(content)? {
        if old_alt.contains(&item) {
            continue;
        }
        if let Some(alias) = parse(&item)? {
            new.push(alias);
        }
    }
    new.sort();
    new.dedup();
    if new.len() > MAX_NEW_ALIASES {
        return Err(Error::invalid_param(format!("at most {MAX_NEW_ALIASES} aliases may be added at once")));
    }
    Ok(new)
}

/// Checks new `m.room.canonical_alias` content of a room: every alias it adds must point to the
/// room (`M_BAD_ALIAS`, as the spec asks). Aliases of other servers cannot be looked up until
/// Hearth federates, so they are refused.
async fn check_canonical_alias(state: &AppState, room_id: &RoomId, content: &Value) -> Result<()> {
    let previous = match state.store.current_state_event(room_id, CANONICAL_ALIAS, "").await? {
        Some(event) => Some(ClientEvent::parse(&event)?.content_value()?),
        None => None,
    };
    for alias in new_canonical_aliases(content, previous.as_ref())? {
        if alias.server_name() != state.server_name {
            return Err(bad_alias(format!("{alias} is on another server and cannot be checked")));
        }
        let points_here = state
            .store
            .resolve_alias(alias.as_str())
            .await?
            .is_some_and(|(target, _)| target == room_id.as_str());
        if !points_here {
            return Err(bad_alias(format!("{alias} does not point to this room")));
        }
    }
    Ok(())
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
///
/// Member events too: a user's own profile in the room, and invites, kicks and bans by those
/// with the power, as the auth rules decide.
async fn send_state(
    state: web::Data<AppState>,
    request: Ruma<send_state_event::v3::Request>,
) -> Result<send_state_event::v3::Response> {
    let body = &request.body;
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    let event_type = body.event_type.to_string();
    if event_type == "m.room.create" {
        return Err(Error::forbidden("m.room.create cannot be set through the state endpoint"));
    }
    let content = body.body.json();
    let value = serde_json::from_str::<Map<String, Value>>(content.get())
        .map(Value::Object)
        .map_err(|_| Error::bad_json("content must be an object"))?;
    if event_type == "m.room.member" {
        UserId::parse(&body.state_key).map_err(|e| {
            Error::invalid_param(format!("the state key of a member event is a user id: {e}"))
        })?;
        match value.get("membership") {
            Some(Value::String(_)) => {}
            _ => return Err(Error::bad_json("membership must be a string")),
        }
        check_reason(value.get("reason").and_then(Value::as_str))?;
    }
    rooms::room_version(&state, &body.room_id).await?;
    if event_type == CANONICAL_ALIAS && body.state_key.is_empty() {
        check_canonical_alias(&state, &body.room_id, &value).await?;
    }
    if let Some(event_id) =
        unchanged_state(&state, &body.room_id, &request.sender.user_id, &event_type, &body.state_key, &value)
            .await?
    {
        return Ok(send_state_event::v3::Response::new(event_id.try_into().map_err(Error::internal)?));
    }
    let draft = Draft {
        sender: &request.sender.user_id,
        event_type: &event_type,
        state_key: Some(&body.state_key),
        content,
        redacts: None,
        redacted_json: None,
        txn: None,
    };
    let stored = rooms::append(&state, &body.room_id, draft).await?;
    if event_type == "m.room.guest_access"
        && body.state_key.is_empty()
        && value.get("guest_access").and_then(Value::as_str) != Some("can_join")
    {
        remove_guests(&state, &body.room_id).await?;
    }
    Ok(send_state_event::v3::Response::new(stored.event_id.try_into().map_err(Error::internal)?))
}

/// Makes the guests joined to a room leave it, once its guest access is no longer `can_join`
/// (as Synapse does): each leaves by itself, so no power level is needed.
async fn remove_guests(state: &AppState, room_id: &RoomId) -> Result<()> {
    for (member, membership) in state.store.members(room_id).await? {
        if membership != "join" {
            continue;
        }
        let Ok(member) = OwnedUserId::try_from(member) else { continue };
        if state.store.get_user(&member).await?.is_some_and(|user| user.is_guest) {
            set_membership(state, room_id, &member, &member, "leave", None).await?;
        }
    }
    Ok(())
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
async fn get_state_for_key(
    state: web::Data<AppState>,
    request: Ruma<get_state_event_for_key::v3::Request>,
) -> Result<get_state_event_for_key::v3::Response> {
    let body = &request.body;
    let rules = ReadRules::for_reader(&state, &body.room_id, &request.sender.user_id).await?;
    let event_type = body.event_type.to_string();
    for event in rules.readable_state(&state, &body.room_id).await? {
        let client = ClientEvent::parse(&event)?;
        if client.is_state(&event_type, &body.state_key) {
            let value = match body.format {
                get_state_event_for_key::v3::StateEventFormat::Event => {
                    serve_one::<Value>(&state, &event, reader_of(&request.sender)).await?.into_json()
                }
                _ => client.content().to_owned(),
            };
            return Ok(get_state_event_for_key::v3::Response::new(value));
        }
    }
    Err(Error::not_found("no such state event"))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state
async fn get_state(
    state: web::Data<AppState>,
    request: Ruma<get_state_events::v3::Request>,
) -> Result<get_state_events::v3::Response> {
    let room_id = &request.body.room_id;
    let rules = ReadRules::for_reader(&state, room_id, &request.sender.user_id).await?;
    let events = rules.readable_state(&state, room_id).await?;
    Ok(get_state_events::v3::Response::new(serve(&state, &events, reader_of(&request.sender)).await?))
}

/// Pages `/messages` reads to fill one answer when a filter or the history-visibility rules
/// leave events out, before it answers with what it has (the client pages on from `end`).
const MAX_PAGES: usize = 10;

/// GET /_matrix/client/v3/rooms/{roomId}/messages
///
/// `end` is given whenever paging on may find more: backwards it is left out only once the
/// start of the room, `to`, or the first event the user may read is reached; forwards, once a
/// page finds nothing (the present). A page the filter, the history-visibility rules or the
/// user's ignore list leave empty still moves `end` past what was read.
pub(super) async fn messages(
    state: web::Data<AppState>,
    request: Ruma<get_message_events::v3::Request>,
) -> Result<get_message_events::v3::Response> {
    let body = &request.body;
    let reader = &request.sender.user_id;
    let rules = ReadRules::for_reader(&state, &body.room_id, reader).await?;
    let ignored = Ignored::load(&state, reader).await?;
    let matching = |event: &StoredEvent| -> Result<bool> {
        Ok(matches_filter(&body.filter, &ClientEvent::parse(event)?))
    };
    let shown = |event: &StoredEvent| -> Result<bool> {
        Ok(rules.may_see(event) && !ignored.hides(event) && matching(event)?)
    };
    // As Synapse: `end` is left out only when nothing matching the filter was read and nothing
    // more is there; a page the reader may not see still says where to go on.
    let mut matched = false;
    let upto = state.readable().await?;
    let limit = i64::try_from(u64::from(body.limit)).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let to = body.to.as_deref().map(parse_page_token).transpose()?;
    // Nothing below the floor is readable, so paging stops there.
    let floor = rules.floor();
    let mut response = get_message_events::v3::Response::new();
    let mut chunk = Vec::new();
    match body.dir {
        Direction::Backward => {
            let from = body.from.as_deref().map(parse_page_token).transpose()?.unwrap_or(upto).min(upto);
            response.start = token(from);
            let bottom = to.unwrap_or(i64::MIN).max(floor);
            let mut ceiling = from;
            let mut backfilled = false;
            for _ in 0..MAX_PAGES {
                let page = state.store.room_events(&body.room_id, bottom, ceiling, limit, true).await?;
                if (page.len() as i64) < limit && to.is_none() && !backfilled {
                    // The oldest event here is reached: a room joined through another server
                    // has history there, which is fetched, then read with the rest.
                    backfilled = true;
                    let wanted = usize::try_from(limit).unwrap_or(1);
                    if rooms::backfill::fill(&state, &body.room_id, wanted).await? > 0 {
                        continue;
                    }
                }
                // A full page may have more before it; one that is not reached the bottom.
                let mut more = page.len() as i64 == limit;
                if page.is_empty() {
                    ceiling = bottom;
                }
                for event in page.iter().rev() {
                    ceiling = event.stream_ordering - 1;
                    matched |= matching(event)?;
                    if shown(event)? {
                        chunk.push(event.clone());
                    }
                    if chunk.len() as i64 == limit {
                        more = ceiling > bottom;
                        break;
                    }
                }
                response.end = (more || matched).then(|| token(ceiling));
                if !more || chunk.len() as i64 == limit {
                    break;
                }
            }
        }
        Direction::Forward => {
            let from = body.from.as_deref().map(parse_page_token).transpose()?.unwrap_or(i64::MIN);
            response.start = token(from);
            let ceiling = to.unwrap_or(upto).min(upto);
            let mut bottom = from.max(floor);
            for _ in 0..MAX_PAGES {
                let page = state.store.room_events(&body.room_id, bottom, ceiling, limit, false).await?;
                let mut more = page.len() as i64 == limit;
                for event in &page {
                    bottom = event.stream_ordering;
                    if shown(event)? {
                        chunk.push(event.clone());
                    }
                    if chunk.len() as i64 == limit {
                        more = true;
                        break;
                    }
                }
                // Forward, `end` is where the next page starts as long as anything was read (as
                // Synapse: the present may grow).
                if !page.is_empty() {
                    response.end = Some(token(bottom));
                }
                if !more || chunk.len() as i64 == limit {
                    break;
                }
            }
        }
    }
    response.chunk =
        serve(&state, &erase_for_reader(&state, &rules, chunk).await?, reader_of(&request.sender)).await?;
    Ok(response)
}

/// An event of a room that the user may read and does not ignore, as they are served it, or
/// M_NOT_FOUND (whether it exists or is hidden).
async fn readable_event(
    state: &AppState,
    rules: &ReadRules,
    ignored: &Ignored,
    room_id: &RoomId,
    event_id: &ruma::EventId,
) -> Result<(StoredEvent, i64)> {
    let upto = state.readable().await?;
    let event = state
        .store
        .get_event(event_id.as_str())
        .await?
        .filter(|e| {
            e.room_id == room_id.as_str()
                && e.stream_ordering <= upto
                && rules.may_see(e)
                && !ignored.hides(e)
        })
        .ok_or_else(|| Error::not_found("no such event"))?;
    let event = erase_for_reader(state, rules, vec![event])
        .await?
        .pop()
        .ok_or_else(|| Error::internal("an event was lost while served"))?;
    Ok((event, upto))
}

/// GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}
async fn get_event(
    state: web::Data<AppState>,
    request: Ruma<get_room_event::v3::Request>,
) -> Result<get_room_event::v3::Response> {
    let body = &request.body;
    let reader = &request.sender.user_id;
    // One event of a room the reader was never in is as missing as a hidden one (404, as
    // Synapse answers): whether it exists is not theirs to learn.
    let rules = match ReadRules::for_reader(&state, &body.room_id, reader).await {
        Err(Error::Matrix { status: StatusCode::FORBIDDEN, .. }) => {
            return Err(Error::not_found("no such event"));
        }
        other => other?,
    };
    let ignored = Ignored::load(&state, reader).await?;
    let (event, _) = readable_event(&state, &rules, &ignored, &body.room_id, &body.event_id).await?;
    Ok(get_room_event::v3::Response::new(serve_one(&state, &event, reader_of(&request.sender)).await?))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}
async fn redact(
    state: web::Data<AppState>,
    request: Ruma<redact_event::v3::Request>,
) -> Result<redact_event::v3::Response> {
    let user = &request.sender;
    let body = &request.body;
    state.limiter.check_user(Action::RoomEvent, user).await?;
    if let Some(event_id) =
        state.store.event_by_txn(&user.user_id, user.device_id.as_str(), body.txn_id.as_str()).await?
    {
        return Ok(redact_event::v3::Response::new(event_id.try_into().map_err(Error::internal)?));
    }
    let version = rooms::room_version(&state, &body.room_id).await?;
    rooms::require_joined(&state, &body.room_id, &user.user_id).await?;
    let target = state
        .store
        .get_event(body.event_id.as_str())
        .await?
        .filter(|e| e.room_id == body.room_id.as_str())
        // 400 as Synapse answers for an event of another room (SyTest), and the same for one
        // that does not exist, so that the answer tells nothing of other rooms' events.
        .ok_or_else(|| Error::invalid_param("no such event in this room"))?;
    if ClientEvent::parse(&target)?.sender() != user.user_id.as_str() {
        let (have, levels) = rooms::power(&state, &body.room_id, &user.user_id).await?;
        let need = levels["redact"].as_i64().unwrap_or(50);
        if have < need {
            return Err(Error::forbidden(format!(
                "redacting others' events needs power level {need}; you have {have}"
            )));
        }
    }
    let mut content = json!({});
    if let Some(reason) = &body.reason {
        content["reason"] = reason.as_str().into();
    }
    let content = raw_json(&content)?;
    let draft = Draft {
        sender: &user.user_id,
        event_type: "m.room.redaction",
        state_key: None,
        content: &content,
        redacts: Some(&body.event_id),
        redacted_json: Some(rooms::pruned_json(&version, &target.json)?),
        txn: Some((user.device_id.as_str(), body.txn_id.as_str())),
    };
    let stored = rooms::append(&state, &body.room_id, draft).await?;
    Ok(redact_event::v3::Response::new(stored.event_id.try_into().map_err(Error::internal)?))
}

/// GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}
async fn context(
    state: web::Data<AppState>,
    request: Ruma<get_context::v3::Request>,
) -> Result<get_context::v3::Response> {
    let body = &request.body;
    let reader = &request.sender.user_id;
    let rules = ReadRules::for_reader(&state, &body.room_id, reader).await?;
    let ignored = Ignored::load(&state, reader).await?;
    let (event, upto) = readable_event(&state, &rules, &ignored, &body.room_id, &body.event_id).await?;
    let limit = i64::try_from(u64::from(body.limit)).unwrap_or(MAX_PAGE).clamp(0, MAX_PAGE);
    let (before_count, after_count) = (limit / 2, limit - limit / 2);
    let mut before = state
        .store
        .room_events(&body.room_id, rules.floor(), event.stream_ordering - 1, before_count, true)
        .await?;
    before.reverse();
    let after =
        state.store.room_events(&body.room_id, event.stream_ordering, upto, after_count, false).await?;
    let mut response = get_context::v3::Response::new();
    // The tokens move past what was read, hidden or not, so paging on continues from there.
    response.start = Some(token(before.last().map_or(event.stream_ordering - 1, |e| e.stream_ordering - 1)));
    response.end = Some(token(after.last().map_or(event.stream_ordering, |e| e.stream_ordering)));
    let shown = |mut events: Vec<StoredEvent>| {
        events.retain(|e| rules.may_see(e) && !ignored.hides(e));
        erase_for_reader(&state, &rules, events)
    };
    let (before, after) = (shown(before).await?, shown(after).await?);
    let mut context_state = state.store.state_at(&body.room_id, event.stream_ordering).await?;
    if !body.filter.lazy_load_options.is_disabled() {
        // Only the members who sent the events returned (and the reader).
        let senders: std::collections::BTreeSet<String> = before
            .iter()
            .chain(&after)
            .chain([&event])
            .filter_map(|e| ClientEvent::parse(e).ok().map(|c| c.sender()))
            .chain([reader.to_string()])
            .collect();
        context_state.retain(|e| {
            ClientEvent::parse(e).is_ok_and(|c| {
                c.kind() != "m.room.member" || c.state_key().is_some_and(|member| senders.contains(&member))
            })
        });
    }
    let reader = reader_of(&request.sender);
    response.events_before = serve(&state, &before, reader).await?;
    response.events_after = serve(&state, &after, reader).await?;
    response.event = Some(serve_one(&state, &event, reader).await?);
    response.state = serve(&state, &context_state, reader).await?;
    Ok(response)
}
