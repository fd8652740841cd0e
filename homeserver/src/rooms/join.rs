//! Joining a room that lives on other servers (the spec's "Joining Rooms", from the joining
//! side): `make_join` to a server in the room for an event to sign, `send_join` with it, and
//! the room's state and auth chain in the answer checked and stored as one unit of work.
//!
//! Every event of the answer is checked as any event from another server is (size, signatures
//! with keys fetched from their servers, content hash, room), then against the auth rules given
//! its own auth events, oldest first; an auth-chain event that fails is dropped (and with it
//! what it authorised), a state event that fails fails the join. The join event itself must
//! pass the auth rules against that state.

use std::collections::{BTreeMap, HashMap, HashSet};

use federation::{
    auth::{self, Pdu},
    pdu,
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedRoomId, OwnedServerName, RoomId,
    RoomVersionId, UserId,
    api::federation::membership::{
        create_join_event, create_leave_event, prepare_join_event, prepare_leave_event,
    },
    events::StateEventType,
};
use serde_json::value::RawValue;

use super::remote::{self, Refused};
use crate::{
    error::{Error, ErrorKind, Result},
    state::AppState,
    storage::{NewEvent, StoredEvent},
};

/// How many servers a join is tried through before giving up.
const MAX_JOIN_ATTEMPTS: usize = 5;

/// Joins `user` to `room_id` through one of `via` (the first that lets them), with `content`
/// for their member event (`membership` is set here). Returns the stored join.
pub async fn join_remote(
    state: &AppState,
    room_id: &RoomId,
    via: &[OwnedServerName],
    user: &UserId,
    content: &serde_json::Value,
) -> Result<StoredEvent> {
    let mut tried = HashSet::new();
    let mut last_error = None;
    for server in via.iter().filter(|server| **server != state.server_name).take(MAX_JOIN_ATTEMPTS) {
        if !tried.insert(server.clone()) {
            continue;
        }
        match join_through(state, server, room_id, user, content).await {
            Ok(stored) => return Ok(stored),
            Err(error) => {
                tracing::info!(%server, %room_id, %error, "joining a room through another server failed");
                last_error = Some(error);
            }
        }
    }
    Err(last_error.unwrap_or_else(|| Error::not_found(format!("no server to join room {room_id} through"))))
}

async fn join_through(
    state: &AppState,
    server: &OwnedServerName,
    room_id: &RoomId,
    user: &UserId,
    content: &serde_json::Value,
) -> Result<StoredEvent> {
    let remote = state.remote()?;
    let key = state.signing_key.key_pair();
    let started = std::time::Instant::now();
    let mut make = prepare_join_event::v1::Request::new(room_id.to_owned(), user.to_owned());
    make.ver = pdu::SUPPORTED_ROOM_VERSIONS.to_vec();
    let made = remote.send(&state.server_name, key, server, make).await?;
    let version = made.room_version.unwrap_or(RoomVersionId::V1);
    if pdu::rules(&version).is_err() {
        return Err(Error::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            ErrorKind::UnsupportedRoomVersion,
            format!("room {room_id} is of version {version}, which this server does not support"),
        ));
    }
    let template = fill_template(&made.event, room_id, user, content, "join")?;
    let join = pdu::sign_template(template, &version, &state.server_name, &state.signing_key)
        .map_err(|e| Error::bad_json(format!("the join template from {server} cannot be signed: {e}")))?;
    let pdu = RawValue::from_string(CanonicalJsonValue::Object(join.json.clone()).to_string())
        .map_err(Error::internal)?;
    let send = create_join_event::v2::Request::new(room_id.to_owned(), join.event_id.clone(), pdu);
    let answer = remote
        .send_limited(&state.server_name, key, server, send, crate::remote::MAX_STATE_BYTES)
        .await?
        .room_state;
    if answer.members_omitted {
        return Err(Error::bad_json(format!(
            "{server} left members out of the room's state, which was not asked"
        )));
    }
    // The resident server may have added its signature (a restricted room's join); ours stays.
    let join_json = match &answer.event {
        Some(event) => {
            let json: CanonicalJsonObject =
                serde_json::from_str(event.get()).map_err(|e| Error::bad_json(e.to_string()))?;
            match pdu::event_id_of(&json, &version) {
                Ok(id) if id == join.event_id => json,
                _ => join.json,
            }
        }
        None => join.json,
    };
    let answered = started.elapsed();
    let room = checked_state(state, room_id, &version, &answer.state, &answer.auth_chain).await?;
    let checked = started.elapsed();
    let (join_json, join_pdu) = remote::verified(state, join.event_id.clone(), &version, join_json)
        .await
        .map_err(Refused::into_error)?;
    let mut auth_events = room.auth_events_of(&join_pdu);
    room.add_create(&version, &mut auth_events);
    auth::check(&version, &join_pdu, &auth_events, &room.state).map_err(|why| {
        Error::forbidden(format!("the join does not pass the auth rules of the room's state: {why}"))
    })?;
    let mut join_event = remote::stored_form(&join_pdu, &join_json).map_err(Refused::into_error)?;
    join_event.replaces_state =
        room.state.get(&(StateEventType::RoomMember, user.to_string())).map(|pdu| pdu.event_id.to_string());
    let creator = room
        .state
        .get(&(StateEventType::RoomCreate, String::new()))
        .map(|create| create.sender.to_string())
        .ok_or_else(|| Error::bad_json("the room's state has no create event"))?;
    let state_ids: Vec<(String, String, String)> = room
        .state
        .iter()
        .map(|((kind, key), pdu)| (kind.to_string(), key.clone(), pdu.event_id.to_string()))
        .collect();
    let stored = state
        .store
        .join_remote_room(
            room_id,
            version.as_str(),
            &creator,
            &state.stream,
            &room.outliers,
            &state_ids,
            join_event,
        )
        .await?;
    state.stream.flush().await?;
    state.notify(stored.stream_ordering);
    // What a join costs, step by step: for operators, and for the join benchmark.
    tracing::info!(
        %room_id, %server, state = answer.state.len(), auth_chain = answer.auth_chain.len(),
        answered_ms = answered.as_millis(), checked_ms = (checked - answered).as_millis(),
        stored_ms = (started.elapsed() - checked).as_millis(), "joined a room through another server"
    );
    Ok(stored)
}

/// Leaves (or rejects the invite to) a room this server is not in, through `server` (the
/// inviter's): `make_leave`, the template signed here, `send_leave`; the leave is then stored
/// as the user's membership.
pub async fn leave_remote(
    state: &AppState,
    server: &OwnedServerName,
    room_id: &RoomId,
    user: &UserId,
    reason: Option<&str>,
) -> Result<StoredEvent> {
    let remote = state.remote()?;
    let key = state.signing_key.key_pair();
    let made = remote
        .send(
            &state.server_name,
            key,
            server,
            prepare_leave_event::v1::Request::new(room_id.to_owned(), user.to_owned()),
        )
        .await?;
    let version = made.room_version.unwrap_or(RoomVersionId::V1);
    pdu::rules(&version).map_err(|e| Error::bad_json(e.to_string()))?;
    let mut content = serde_json::json!({});
    if let Some(reason) = reason {
        content["reason"] = reason.into();
    }
    let template = fill_template(&made.event, room_id, user, &content, "leave")?;
    let leave = pdu::sign_template(template, &version, &state.server_name, &state.signing_key)
        .map_err(|e| Error::bad_json(format!("the leave template from {server} cannot be signed: {e}")))?;
    let pdu = RawValue::from_string(CanonicalJsonValue::Object(leave.json.clone()).to_string())
        .map_err(Error::internal)?;
    let send = create_leave_event::v2::Request::new(room_id.to_owned(), leave.event_id.clone(), pdu);
    remote.send(&state.server_name, key, server, send).await?;
    let parsed =
        Pdu::from_json(leave.event_id.clone(), &leave.json).map_err(|e| Error::internal(e.to_string()))?;
    let event = remote::stored_form(&parsed, &leave.json).map_err(Refused::into_error)?;
    let stored =
        state.store.store_outsider_membership(room_id, version.as_str(), &state.stream, event, None).await?;
    state.stream.flush().await?;
    state.notify(stored.stream_ordering);
    Ok(stored)
}

/// A `make_join` or `make_leave` template, checked to be a membership event of `user` in
/// `room_id`, with `content` and `membership`.
fn fill_template(
    event: &RawValue,
    room_id: &RoomId,
    user: &UserId,
    content: &serde_json::Value,
    membership: &str,
) -> Result<CanonicalJsonObject> {
    let mut template: CanonicalJsonObject = serde_json::from_str(event.get())
        .map_err(|e| Error::bad_json(format!("the {membership} template is not JSON: {e}")))?;
    let field = |name: &str| match template.get(name) {
        Some(CanonicalJsonValue::String(value)) => Some(value.clone()),
        _ => None,
    };
    if field("type").as_deref() != Some("m.room.member")
        || field("sender").as_deref() != Some(user.as_str())
        || field("state_key").as_deref() != Some(user.as_str())
        || field("room_id").as_deref() != Some(room_id.as_str())
    {
        return Err(Error::bad_json(format!("the {membership} template is not of this user in this room")));
    }
    let mut merged = match template.remove("content") {
        Some(CanonicalJsonValue::Object(content)) => content,
        _ => CanonicalJsonObject::new(),
    };
    // The template's own keys stay (`join_authorised_via_users_server`); the user's are added.
    let ours: CanonicalJsonObject =
        serde_json::from_value(content.clone()).map_err(|e| Error::bad_json(e.to_string()))?;
    for (key, value) in ours {
        merged.entry(key).or_insert(value);
    }
    merged.insert("membership".into(), CanonicalJsonValue::String(membership.into()));
    template.insert("content".into(), CanonicalJsonValue::Object(merged));
    let now = ruma::MilliSecondsSinceUnixEpoch::now();
    template.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::Int::from(now.get())));
    Ok(template)
}

/// A room's state as another server gave it, checked.
struct CheckedState {
    /// (type, state key) → event.
    state: HashMap<(StateEventType, String), Pdu>,
    /// Every checked event of the answer, by id.
    events: HashMap<OwnedEventId, Pdu>,
    /// Every checked event as it is stored (the state and its auth chain).
    outliers: Vec<NewEvent>,
}

impl CheckedState {
    fn auth_events_of(&self, event: &Pdu) -> HashMap<OwnedEventId, Pdu> {
        event
            .auth_events
            .iter()
            .filter_map(|id| self.events.get(id).map(|pdu| (id.clone(), pdu.clone())))
            .collect()
    }

    /// From room version 12 the rules read the create event though events do not name it.
    fn add_create(&self, version: &RoomVersionId, auth_events: &mut HashMap<OwnedEventId, Pdu>) {
        if pdu::rules(version).is_ok_and(|rules| pdu::room_id_is_create_hash(&rules))
            && let Some(create) = self.state.get(&(StateEventType::RoomCreate, String::new()))
        {
            auth_events.entry(create.event_id.clone()).or_insert_with(|| create.clone());
        }
    }
}

/// Checks the state and auth chain of a `send_join` answer (see the module's comment).
async fn checked_state(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    room_state: &[Box<RawValue>],
    auth_chain: &[Box<RawValue>],
) -> Result<CheckedState> {
    let bad = |why: String| Error::bad_json(format!("the room's state from the resident server: {why}"));
    let mut parsed: BTreeMap<OwnedEventId, (CanonicalJsonObject, Pdu)> = BTreeMap::new();
    let mut state_ids = Vec::new();
    for (is_state, raw) in
        room_state.iter().map(|raw| (true, raw)).chain(auth_chain.iter().map(|raw| (false, raw)))
    {
        let json: CanonicalJsonObject = serde_json::from_str(raw.get()).map_err(|e| bad(e.to_string()))?;
        let event_id = remote::checked_id(&json, version).map_err(|e| bad(e.to_string()))?;
        if is_state {
            state_ids.push(event_id.clone());
        }
        if parsed.contains_key(&event_id) {
            continue;
        }
        match remote::verified(state, event_id.clone(), version, json).await {
            Ok((json, pdu)) => {
                parsed.insert(event_id, (json, pdu));
            }
            Err(Refused::Internal(why)) => return Err(Error::internal(why)),
            Err(refused) if is_state => return Err(bad(format!("{event_id}: {refused}"))),
            Err(refused) => {
                tracing::info!(%event_id, %refused, "an auth chain event of a joined room was dropped")
            }
        }
    }
    // Every event is of this room: the create event by its id where the room id is its hash.
    let create_names_room =
        pdu::room_id_is_create_hash(&pdu::rules(version).map_err(|e| bad(e.to_string()))?);
    for (event_id, (_, pdu)) in &parsed {
        let of_room = match (&pdu.room_id, pdu.kind.to_string() == "m.room.create" && create_names_room) {
            (_, true) => pdu::room_id_from_create(event_id).ok().as_deref() == Some(room_id),
            (Some(id), false) => id == room_id,
            (None, false) => false,
        };
        if !of_room {
            return Err(bad(format!("{event_id} is not of room {room_id}")));
        }
    }
    // The auth rules, oldest first: each event given its own auth events.
    let mut order: Vec<&OwnedEventId> = parsed.keys().collect();
    order.sort_by_key(|id| parsed[*id].1.depth);
    let mut checked = CheckedState { state: HashMap::new(), events: HashMap::new(), outliers: Vec::new() };
    let create = parsed
        .values()
        .find(|(_, pdu)| pdu.kind.to_string() == "m.room.create" && pdu.state_key.as_deref() == Some(""))
        .map(|(_, pdu)| pdu.clone())
        .ok_or_else(|| bad("no create event".to_owned()))?;
    checked.state.insert((StateEventType::RoomCreate, String::new()), create);
    for event_id in order {
        let (json, pdu) = &parsed[event_id];
        let mut auth_events = checked.auth_events_of(pdu);
        if auth_events.len() < pdu.auth_events.len() {
            tracing::info!(%event_id, "an event of a joined room whose auth events failed was dropped");
            continue;
        }
        checked.add_create(version, &mut auth_events);
        if let Err(why) = remote::check_given_auth_events(version, pdu, &auth_events) {
            tracing::info!(%event_id, %why, "an event of a joined room failing the auth rules was dropped");
            continue;
        }
        checked.events.insert(event_id.clone(), pdu.clone());
        checked.outliers.push(remote::stored_form(pdu, json).map_err(Refused::into_error)?);
    }
    for event_id in state_ids {
        let pdu = checked
            .events
            .get(&event_id)
            .ok_or_else(|| bad(format!("state event {event_id} fails the auth rules")))?;
        let key = pdu
            .state_key
            .clone()
            .ok_or_else(|| bad(format!("{event_id} in the state is not a state event")))?;
        checked.state.insert((StateEventType::from(pdu.kind.to_string()), key), pdu.clone());
    }
    Ok(checked)
}

/// The servers to join a room through: those named by the client, then the one in its id (room
/// versions before 12 name the server that created the room).
pub fn servers_for(room_id: &OwnedRoomId, named: &[OwnedServerName]) -> Vec<OwnedServerName> {
    let mut servers: Vec<OwnedServerName> = named.to_vec();
    if let Some(server) = room_id.server_name() {
        servers.push(server.to_owned());
    }
    servers
}
