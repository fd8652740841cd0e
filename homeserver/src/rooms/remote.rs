//! Events made by other servers, taken into a room here: checked, then appended.
//!
//! The checks, in the spec's order: the PDU is within the size limit and of this room; its
//! signatures hold (the sender's server, and for room versions 1 and 2 the server that chose
//! the id), with keys fetched from the signing servers; a content hash that does not match
//! means the event is kept redacted; the events it follows and names as its auth events are
//! known here; it passes the auth rules given its auth events and given the room's current
//! state.
//!
//! The auth rules are applied as the spec's "Checks performed on receipt of a PDU" say: given
//! the event's own auth events, then given the state before it, then given the room's current
//! state. An event that follows all of the room's newest events applies to the current state;
//! one made on a fork to the state its own prev events resolve to, and the room's state is then
//! resolved across the fork (state resolution v2). Events it follows or names as auth events
//! that this server lacks are the caller's to fetch ([`super::missing`]): the event is refused
//! as [`Refused::Missing`] until they are here.
//!
//! An event failing either of the first two checks is rejected: kept as rejected (see migration
//! 0028), out of sight, and events naming it as an auth event are rejected too. One failing only
//! the last (made on a fork, and the room has since moved past what allowed it: its sender was
//! banned meanwhile, say) is soft-failed: kept out of the timeline and the room's state, as an
//! outlier with the state after it, so that events following it can still be checked.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use federation::{
    auth::{self, Pdu},
    pdu,
};
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
};

use crate::{
    state::AppState,
    storage::{AppendError, NewEvent, Outlier, Resolved, RoomHead, StateMap, StoredEvent},
};

/// The most servers and keys per server whose signatures on one event are checked: a PDU
/// cannot make this server fetch keys without end.
const MAX_SIGNING_SERVERS: usize = 4;
const MAX_KEYS_PER_SERVER: usize = 4;

/// Why another server's event was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Invalid(String),
    /// Not signed as it must be: not what it claims to be.
    #[error("{0}")]
    Forged(String),
    #[error("the event fails the auth rules: {0}")]
    Auth(String),
    /// Allowed where it was made, not by the room's current state: kept out of sight.
    #[error("the event fails the auth rules against the room's current state: {0}")]
    SoftFailed(String),
    /// Events it follows (`prev`) or names as auth events (`auth`) that this server does not
    /// have (or, for `prev`, has without the state after them).
    #[error("this server lacks events the event follows ({prev:?}) or is authorised by ({auth:?})")]
    Missing { prev: Vec<OwnedEventId>, auth: Vec<OwnedEventId> },
    #[error("{0}")]
    Internal(String),
}

impl From<crate::error::Error> for Refused {
    fn from(error: crate::error::Error) -> Self {
        Refused::Internal(error.to_string())
    }
}

impl From<crate::storage::StoreError> for Refused {
    fn from(error: crate::storage::StoreError) -> Self {
        Refused::Internal(error.to_string())
    }
}

fn invalid(why: impl std::fmt::Display) -> Refused {
    Refused::Invalid(why.to_string())
}

/// The keys of the servers that signed `json` (server → key id → key), as far as they can be
/// had: a server whose key is missing then fails the signature check.
async fn signing_keys(
    state: &AppState,
    json: &CanonicalJsonObject,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, Refused> {
    let Some(CanonicalJsonValue::Object(signatures)) = json.get("signatures") else {
        return Err(Refused::Forged("the event is not signed".to_owned()));
    };
    let remote = state.remote().map_err(|e| Refused::Internal(e.to_string()))?;
    let mut keys = BTreeMap::new();
    for (server, by_key) in signatures.iter().take(MAX_SIGNING_SERVERS) {
        let (Ok(name), CanonicalJsonValue::Object(by_key)) =
            (<&ruma::ServerName>::try_from(server.as_str()), by_key)
        else {
            continue;
        };
        let mut found = BTreeMap::new();
        for key_id in by_key.keys().take(MAX_KEYS_PER_SERVER) {
            match remote.keys.current_key(state, name, key_id).await {
                Ok(Some(key)) => {
                    found.insert(key_id.clone(), key);
                }
                Ok(None) => {}
                Err(error) => tracing::info!(%error, %server, "no keys to check an event's signature with"),
            }
        }
        keys.insert(server.clone(), found);
    }
    Ok(keys)
}

/// A verified PDU as it is stored (without the state event it replaces, which depends on where
/// it goes).
pub fn stored_form(parsed: &Pdu, json: &CanonicalJsonObject) -> Result<NewEvent, Refused> {
    let membership = match parsed.kind {
        TimelineEventType::RoomMember => {
            #[derive(serde::Deserialize)]
            struct Membership {
                membership: String,
            }
            let content: Membership = serde_json::from_str(parsed.content.get()).map_err(invalid)?;
            Some(content.membership)
        }
        _ => None,
    };
    Ok(NewEvent {
        event_id: parsed.event_id.clone(),
        json: CanonicalJsonValue::Object(json.clone()).to_string(),
        sender: parsed.sender.to_string(),
        event_type: parsed.kind.to_string(),
        state_key: parsed.state_key.clone(),
        depth: i64::try_from(parsed.depth).map_err(invalid)?,
        origin_server_ts: i64::try_from(u64::from(parsed.origin_server_ts.0)).map_err(invalid)?,
        membership,
        redaction: None,
        txn: None,
        replaces_state: None,
        expires_ts: None,
        prev_events: parsed.prev_events.clone(),
        resolved: None,
    })
}

/// Checks an event against the auth rules given only its own auth events (an event of the
/// room's past, whose state this server does not have): all must be here, and from room version
/// 12 the create event is added (the rules read it though events do not name it).
pub async fn check_with_own_auth_events(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    event: &Pdu,
    mut auth_events: HashMap<OwnedEventId, Pdu>,
) -> Result<(), String> {
    if auth_events.len() < event.auth_events.len() {
        return Err("some of its auth events are unknown here".to_owned());
    }
    if pdu::room_id_is_create_hash(&pdu::rules(version).map_err(|e| e.to_string())?)
        && let Some(create) =
            state.store.current_state_event(room_id, "m.room.create", "").await.map_err(|e| e.to_string())?
        && let Ok(id) = OwnedEventId::try_from(create.event_id.as_str())
        && let Ok(object) = crate::storage::parse_stored::<CanonicalJsonObject>(&create.json)
        && let Ok(create) = Pdu::from_json(id.clone(), &object)
    {
        auth_events.entry(id).or_insert(create);
    }
    check_given_auth_events(version, event, &auth_events)
}

/// Checks an event against the auth rules with its auth events as the state it applies to.
pub fn check_given_auth_events(
    version: &RoomVersionId,
    event: &Pdu,
    auth_events: &HashMap<OwnedEventId, Pdu>,
) -> Result<(), String> {
    let as_state: HashMap<(StateEventType, String), Pdu> = auth_events
        .values()
        .filter_map(|auth| {
            let key = auth.state_key.clone()?;
            Some(((StateEventType::from(auth.kind.to_string()), key), auth.clone()))
        })
        .collect();
    auth::check(version, event, auth_events, &as_state)
}

/// The id of a PDU within the size limit.
pub fn checked_id(json: &CanonicalJsonObject, version: &RoomVersionId) -> Result<OwnedEventId, Refused> {
    let size = CanonicalJsonValue::Object(json.clone()).to_string().len();
    if size > super::MAX_EVENT_BYTES {
        return Err(invalid(format!("the event is larger than {} bytes", super::MAX_EVENT_BYTES)));
    }
    pdu::event_id_of(json, version).map_err(invalid)
}

/// A PDU whose signatures hold, as it is to be kept: as sent, or redacted if its content no
/// longer matches its hash.
pub async fn verified(
    state: &AppState,
    event_id: OwnedEventId,
    version: &RoomVersionId,
    mut json: CanonicalJsonObject,
) -> Result<(CanonicalJsonObject, Pdu), Refused> {
    let keys = signing_keys(state, &json).await?;
    if !pdu::verify(&json, version, &keys).map_err(|e| Refused::Forged(format!("bad signature: {e}")))? {
        // Signed as sent, altered since: kept only as a redaction would leave it.
        tracing::info!(%event_id, "an event's content hash does not match; it is kept redacted");
        json = pdu::redacted(json, version, None).map_err(invalid)?;
    }
    let parsed = Pdu::from_json(event_id, &json).map_err(invalid)?;
    Ok((json, parsed))
}

/// Checks a PDU received from another server and appends it to `room_id`, then makes it seen
/// (the stream position published, syncs woken). An event already here is answered as stored.
pub async fn accept(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    json: CanonicalJsonObject,
) -> Result<StoredEvent, Refused> {
    let stored = take(state, room_id, version, json).await?;
    state.stream.flush().await?;
    state.notify(stored.stream_ordering);
    Ok(stored)
}

/// [`accept`] but for making it seen, which the caller does, once for all the events it takes
/// in a row (a transaction's).
pub async fn take(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    json: CanonicalJsonObject,
) -> Result<StoredEvent, Refused> {
    let event_id = checked_id(&json, version)?;
    // The event, the events it follows and its auth events, as far as this server has them, in
    // two queries (one for those taken, one for those rejected): every PDU of a busy room comes
    // this way. The references are read before the signatures are checked, only to look them
    // up; what is used is read again from the verified event.
    let (prev_events, auth_ids) = Pdu::from_json(event_id.clone(), &json)
        .map(|unverified| (unverified.prev_events, unverified.auth_events))
        .unwrap_or_default();
    let mut wanted: Vec<&str> = vec![event_id.as_str()];
    wanted.extend(prev_events.iter().chain(&auth_ids).map(|id| id.as_str()));
    let known: HashMap<String, StoredEvent> = state
        .store
        .events_by_id(&wanted)
        .await?
        .into_iter()
        .map(|event| (event.event_id.clone(), event))
        .collect();
    if let Some(stored) = known.get(event_id.as_str()) {
        return Ok(stored.clone());
    }
    wanted.retain(|id| !known.contains_key(*id));
    let rejected: HashMap<String, String> = state.store.rejected_events(&wanted).await?.into_iter().collect();
    if rejected.contains_key(event_id.as_str()) {
        return Err(Refused::Auth(format!("{event_id} was rejected before")));
    }
    let (json, parsed) = verified(state, event_id.clone(), version, json).await?;
    if parsed.room_id.as_deref() != Some(room_id) {
        return Err(invalid(format!("the event is not of room {room_id}")));
    }
    let (prev_events, auth_ids) = (parsed.prev_events.clone(), parsed.auth_events.clone());
    let of_room = |id: &OwnedEventId| match (known.get(id.as_str()), rejected.get(id.as_str())) {
        (Some(event), _) => Some(event.room_id == room_id.as_str()),
        (None, Some(room)) => Some(room == room_id.as_str()),
        (None, None) => None,
    };
    // Events it follows may have been rejected: it is part of the graph all the same.
    if prev_events.iter().any(|id| of_room(id) == Some(false)) {
        return Err(invalid(format!("{event_id} follows an event of another room")));
    }
    // Why its auth events reject it: one was rejected, or is of another room.
    let rejected_auth = if auth_ids.iter().any(|id| rejected.contains_key(id.as_str())) {
        Some("one of its auth events was rejected")
    } else {
        auth_ids
            .iter()
            .any(|id| of_room(id) == Some(false))
            .then_some("one of its auth events is of another room")
    };
    let lacking = |ids: &[OwnedEventId]| -> Vec<OwnedEventId> {
        ids.iter().filter(|id| of_room(id).is_none()).cloned().collect()
    };
    let missing_auth = if rejected_auth.is_some() { Vec::new() } else { lacking(&auth_ids) };
    if !lacking(&prev_events).is_empty() || !missing_auth.is_empty() {
        return Err(Refused::Missing { prev: lacking(&prev_events), auth: missing_auth });
    }
    let known_auth: Vec<&StoredEvent> = auth_ids.iter().filter_map(|id| known.get(id.as_str())).collect();
    let mut auth_events = HashMap::new();
    for event in known_auth {
        let id =
            OwnedEventId::try_from(event.event_id.as_str()).map_err(|e| Refused::Internal(e.to_string()))?;
        let object: CanonicalJsonObject =
            crate::storage::parse_stored(&event.json).map_err(|e| Refused::Internal(e.to_string()))?;
        auth_events
            .insert(id.clone(), Pdu::from_json(id, &object).map_err(|e| Refused::Internal(e.to_string()))?);
    }

    let kind = parsed.kind.clone();
    let state_key = parsed.state_key.clone();
    let sender = parsed.sender.clone();
    let auth_keys =
        super::head_keys(version, &sender, &kind.to_string(), state_key.as_deref(), &parsed.content)
            .map_err(invalid)?;
    let mut stored_form = stored_form(&parsed, &json)?;
    let redaction = redaction_of(state, room_id, version, &parsed).await;
    if let Ok(redaction) = &redaction {
        stored_form.redaction = redaction.clone();
    }
    let rules = pdu::rules(version).map_err(invalid)?;
    let create_not_an_auth_event = pdu::room_id_is_create_hash(&rules);
    let resolves_forks = matches!(rules.state_res, ruma::room_version_rules::StateResolutionVersion::V2(_));
    let prev_set: BTreeSet<&OwnedEventId> = prev_events.iter().collect();
    // An event that follows all of the room's extremities applies to the current state; one
    // that follows fewer (made on a fork) applies to the state its own prev events resolve to,
    // and the room's state is then resolved across the fork. It is first tried as following
    // them all (the common case, in one transaction); the head it finds otherwise, or that
    // moved meanwhile, is worked out and tried again. One the auth rules reject is kept as
    // rejected.
    let on_fork = |extremities: &[OwnedEventId]| {
        resolves_forks && extremities.iter().collect::<BTreeSet<_>>() != prev_set
    };
    let taken = async {
        if let Some(why) = rejected_auth {
            return Err(Refused::Auth(why.to_owned()));
        }
        redaction?;
        // The extremities the event was last found to be on a fork of.
        let mut fork_of: Option<Vec<OwnedEventId>> = None;
        let found_head = std::sync::Mutex::new(None);
        for _ in 0..MAX_FORK_ATTEMPTS {
            let resolved = match &fork_of {
                Some(extremities) => {
                    Some(Arc::new(fork_state(state, version, &parsed, &auth_events, extremities).await?))
                }
                None => None,
            };
            let build = |head: &RoomHead| -> Result<NewEvent, AppendError> {
                let fork = on_fork(&head.extremities).then_some(&head.extremities);
                if fork != fork_of.as_ref() {
                    *found_head.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = fork.cloned();
                    return Err(AppendError::HeadMoved);
                }
                let replaces_state = state_key
                    .as_ref()
                    .and_then(|key| head.state.get(&(kind.to_string(), key.clone())))
                    .map(|(id, _)| id.clone());
                // The room's current state, as far as the rules read it for this event.
                let mut current: HashMap<(StateEventType, String), Pdu> = HashMap::new();
                for ((event_type, key), (id, json)) in &head.state {
                    let id = OwnedEventId::try_from(id.as_str())
                        .map_err(|e| AppendError::Invalid(e.to_string()))?;
                    let object: CanonicalJsonObject = crate::storage::parse_stored(json)
                        .map_err(|e| AppendError::Invalid(e.to_string()))?;
                    let pdu = Pdu::from_json(id, &object).map_err(|e| AppendError::Invalid(e.to_string()))?;
                    current.insert((StateEventType::from(event_type.as_str()), key.clone()), pdu);
                }
                let mut auth_events = auth_events.clone();
                if create_not_an_auth_event
                    && let Some(create) = current.get(&(StateEventType::RoomCreate, String::new()))
                {
                    // From room version 12 the rules still read the create event (the room id is its hash).
                    auth_events.entry(create.event_id.clone()).or_insert_with(|| create.clone());
                }
                check_given_auth_events(version, &parsed, &auth_events).map_err(AppendError::Refused)?;
                let against_current = auth::check(version, &parsed, &auth_events, &current);
                match &resolved {
                    // Checked against the state before it when the fork was resolved.
                    Some(resolved) => {
                        against_current.map_err(AppendError::SoftFailed)?;
                        Ok(NewEvent {
                            replaces_state,
                            resolved: Some(resolved.clone()),
                            ..stored_form.clone()
                        })
                    }
                    // The current state is the state before it.
                    None => {
                        against_current.map_err(AppendError::Refused)?;
                        Ok(NewEvent { replaces_state, ..stored_form.clone() })
                    }
                }
            };
            let outcome = state.store.append_event(room_id, &state.stream, &auth_keys, false, &build).await?;
            return match outcome {
                Ok(stored) => Ok(stored),
                Err(AppendError::HeadMoved) => {
                    fork_of = found_head.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                    continue;
                }
                Err(AppendError::Refused(why)) => Err(Refused::Auth(why)),
                Err(AppendError::SoftFailed(why)) => {
                    let state_after = resolved.map(|resolved| resolved.after_event.clone());
                    let outlier = Outlier { event: stored_form.clone(), state_after, rejected: None };
                    state.store.store_outliers(room_id, &[outlier]).await?;
                    Err(Refused::SoftFailed(why))
                }
                Err(AppendError::NoRoom) => Err(invalid(format!("this server has no room {room_id}"))),
                Err(other) => Err(invalid(other)),
            };
        }
        Err(Refused::Internal(format!("room {room_id} kept moving while {event_id} was taken")))
    }
    .await;
    if let Err(Refused::Auth(why)) = &taken {
        let outlier = Outlier { event: stored_form, state_after: None, rejected: Some(why.clone()) };
        state.store.store_outliers(room_id, &[outlier]).await?;
    }
    taken
}

/// What a redaction from another server removes here: the event it names (at the top level,
/// or in its content from room version 11), with that event's pruned JSON, if the event is of
/// this room and may be redacted by the sender — a user of the same server as the event's
/// sender, or one whose power level allows redacting others' events (from room version 3 the
/// auth rules leave this to the server applying the redaction). A redaction that may not apply
/// is kept, removing nothing; one naming an event of another room is rejected.
async fn redaction_of(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    event: &Pdu,
) -> Result<Option<(String, String)>, Refused> {
    if event.kind != TimelineEventType::RoomRedaction {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Content {
        redacts: Option<OwnedEventId>,
    }
    let in_content = serde_json::from_str::<Content>(event.content.get()).ok().and_then(|c| c.redacts);
    let Some(target) = event.redacts.clone().or(in_content) else { return Ok(None) };
    let Some(target) = state.store.get_event(target.as_str()).await? else { return Ok(None) };
    if target.room_id != room_id.as_str() {
        // As Synapse: rejected, so that it cannot be taken for one of its own room.
        return Err(Refused::Auth(format!("it redacts {}, an event of another room", target.event_id)));
    }
    let target_sender = super::client_event::ClientEvent::parse(&target)?.sender().to_owned();
    let same_server = <&UserId>::try_from(target_sender.as_str())
        .is_ok_and(|sender| sender.server_name() == event.sender.server_name());
    if !same_server {
        let (have, levels) = super::power(state, room_id, &event.sender).await?;
        if have < levels["redact"].as_i64().unwrap_or(50) {
            tracing::info!(event_id = %event.event_id, "a redaction its sender may not make removes nothing");
            return Ok(None);
        }
    }
    Ok(Some((target.event_id.clone(), super::pruned_json(version, &target.json)?)))
}

/// How often an event of a fork is worked out again because the room moved meanwhile.
const MAX_FORK_ATTEMPTS: usize = 5;

/// The states an event made on a fork brings: the state before it (the states after its prev
/// events, resolved), which it must pass the auth rules against, with it applied; and the room's
/// state resolved across the extremities it leaves.
async fn fork_state(
    state: &AppState,
    version: &RoomVersionId,
    event: &Pdu,
    auth_events: &HashMap<OwnedEventId, Pdu>,
    extremities: &[OwnedEventId],
) -> Result<Resolved, Refused> {
    let mut before_prev = Vec::new();
    for prev in &event.prev_events {
        let after = state.store.state_after(prev.as_str()).await?;
        before_prev
            .push(after.ok_or_else(|| Refused::Missing { prev: vec![prev.clone()], auth: Vec::new() })?);
    }
    let before = resolve_states(state, version, before_prev, None).await?;
    let mut before_pdus: HashMap<(StateEventType, String), Pdu> = HashMap::new();
    let wanted: BTreeSet<String> = before.values().cloned().collect();
    let loaded = load_pdus(state, &wanted, false).await?;
    for ((kind, key), id) in &before {
        if let Some(pdu) = OwnedEventId::try_from(id.as_str()).ok().and_then(|id| loaded.get(&id)) {
            before_pdus.insert((StateEventType::from(kind.as_str()), key.clone()), pdu.clone());
        }
    }
    let mut auth_events = auth_events.clone();
    let create_not_an_auth_event = pdu::room_id_is_create_hash(&pdu::rules(version).map_err(invalid)?);
    if create_not_an_auth_event
        && let Some(create) = before_pdus.get(&(StateEventType::RoomCreate, String::new()))
    {
        auth_events.entry(create.event_id.clone()).or_insert_with(|| create.clone());
    }
    auth::check(version, event, &auth_events, &before_pdus).map_err(Refused::Auth)?;
    let mut after_event = before;
    if let Some(key) = &event.state_key {
        after_event.insert((event.kind.to_string(), key.clone()), event.event_id.to_string());
    }
    let mut tips = vec![after_event.clone()];
    for extremity in extremities.iter().filter(|id| !event.prev_events.contains(id)) {
        let after = state.store.state_after(extremity.as_str()).await?;
        tips.push(after.ok_or_else(|| Refused::Internal(format!("no state after extremity {extremity}")))?);
    }
    let current = resolve_states(state, version, tips, Some(event)).await?;
    let mut memberships = BTreeMap::new();
    let members: BTreeSet<String> =
        current.iter().filter(|((kind, _), _)| kind == "m.room.member").map(|(_, id)| id.clone()).collect();
    let mut member_pdus = load_pdus(state, &members, false).await?;
    member_pdus.insert(event.event_id.clone(), event.clone());
    for id in &members {
        let Some(pdu) = OwnedEventId::try_from(id.as_str()).ok().and_then(|id| member_pdus.get(&id).cloned())
        else {
            continue;
        };
        if let Ok(content) = serde_json::from_str::<serde_json::Value>(pdu.content.get())
            && let Some(membership) = content["membership"].as_str()
        {
            memberships.insert(id.clone(), membership.to_owned());
        }
    }
    Ok(Resolved { after_event, current, memberships })
}

/// The stored events of `ids` (and with `with_auth_chains`, every event of their auth chains)
/// as the auth rules read them.
async fn load_pdus(
    state: &AppState,
    ids: &BTreeSet<String>,
    with_auth_chains: bool,
) -> Result<HashMap<OwnedEventId, Pdu>, Refused> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut stored = state.store.events_by_id(&ids).await?;
    if with_auth_chains {
        let chain = super::graph::auth_chain(state, &stored).await?;
        stored.extend(chain);
    }
    let mut pdus = HashMap::new();
    for event in stored {
        let id =
            OwnedEventId::try_from(event.event_id.as_str()).map_err(|e| Refused::Internal(e.to_string()))?;
        let object: CanonicalJsonObject =
            crate::storage::parse_stored(&event.json).map_err(|e| Refused::Internal(e.to_string()))?;
        pdus.insert(id.clone(), Pdu::from_json(id, &object).map_err(|e| Refused::Internal(e.to_string()))?);
    }
    Ok(pdus)
}

/// The state `states` resolve to (one of them when they agree); `extra` is an event they may
/// name that is not stored yet.
async fn resolve_states(
    state: &AppState,
    version: &RoomVersionId,
    states: Vec<StateMap>,
    extra: Option<&Pdu>,
) -> Result<StateMap, Refused> {
    let Some(first) = states.first() else { return Err(Refused::Internal("no state to resolve".into())) };
    if states.iter().all(|other| other == first) {
        return Ok(first.clone());
    }
    let mut ids: BTreeSet<String> = states.iter().flat_map(|map| map.values().cloned()).collect();
    if let Some(extra) = extra {
        ids.remove(extra.event_id.as_str());
        ids.extend(extra.auth_events.iter().map(ToString::to_string));
    }
    let mut events = load_pdus(state, &ids, true).await?;
    if let Some(extra) = extra {
        events.insert(extra.event_id.clone(), extra.clone());
    }
    let maps = states
        .iter()
        .map(|map| federation::resolve::state_map(map.iter()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Refused::Internal)?;
    let resolved = federation::resolve::resolve(version, &maps, &events).map_err(Refused::Auth)?;
    Ok(resolved.into_iter().map(|((kind, key), id)| ((kind.to_string(), key), id.to_string())).collect())
}

impl Refused {
    /// The answer to the server that sent the event.
    pub fn into_error(self) -> crate::error::Error {
        use crate::error::Error;
        match self {
            Refused::Auth(why) | Refused::SoftFailed(why) | Refused::Forged(why) => Error::forbidden(why),
            missing @ Refused::Missing { .. } => Error::bad_json(missing.to_string()),
            Refused::Invalid(why) => Error::bad_json(why),
            Refused::Internal(why) => Error::internal(why),
        }
    }
}

/// The servers with a member joined to the room, this one included if it has one.
pub async fn servers_in_room(
    state: &AppState,
    room_id: &RoomId,
) -> crate::error::Result<BTreeSet<OwnedServerName>> {
    let members = state.store.members(room_id).await?;
    Ok(members
        .iter()
        .filter(|(_, membership)| membership == "join")
        .filter_map(|(user, _)| <&UserId>::try_from(user.as_str()).ok())
        .map(|user| user.server_name().to_owned())
        .collect())
}

/// The room's state just before `event`: the state it was checked against (with, for a state
/// event, the one it replaced), which other servers ask for (`state`, `state_ids`, a join).
pub async fn state_before(
    state: &AppState,
    room_id: &RoomId,
    event: &StoredEvent,
) -> crate::error::Result<Vec<StoredEvent>> {
    let mut events: Vec<StoredEvent> = state
        .store
        .state_at(room_id, event.stream_ordering)
        .await?
        .into_iter()
        .filter(|e| e.event_id != event.event_id)
        .collect();
    if let Some(replaced) = &event.replaces_state
        && let Some(replaced) = state.store.get_event(replaced).await?
    {
        events.push(replaced);
    }
    Ok(events)
}

/// Hands an event to the other servers in its room (all but `except`, which has it); for a
/// membership event, to the server of the member too, which must learn it was kicked, say — but
/// an invite, which reached the invitee's server through `/invite` (as Synapse does: a server
/// is sent the events of rooms it has no member in only then).
pub async fn forward(
    state: &AppState,
    room_id: &RoomId,
    event: &StoredEvent,
    except: Option<&ruma::ServerName>,
) -> crate::error::Result<()> {
    let Some(outbox) = state.outbox() else { return Ok(()) };
    let mut servers = servers_in_room(state, room_id).await?;
    #[derive(serde::Deserialize)]
    struct Fields {
        #[serde(rename = "type")]
        kind: String,
        state_key: Option<String>,
        #[serde(default)]
        content: Membership,
    }
    #[derive(serde::Deserialize, Default)]
    struct Membership {
        membership: Option<String>,
    }
    if let Ok(Fields { kind, state_key: Some(member), content }) = serde_json::from_str::<Fields>(&event.json)
        && kind == "m.room.member"
        && content.membership.as_deref() != Some("invite")
        && let Ok(member) = <&UserId>::try_from(member.as_str())
    {
        servers.insert(member.server_name().to_owned());
    }
    servers.remove(&state.server_name);
    if let Some(except) = except {
        servers.remove(except);
    }
    let mut allowed = BTreeSet::new();
    for server in servers {
        // A server the room's ACL denies is not sent the room's events.
        if acl_allows(state, room_id, &server).await? {
            allowed.insert(server);
        }
    }
    if !allowed.is_empty() {
        outbox.send(state, allowed, event).await?;
    }
    Ok(())
}

/// Whether the room's server ACL (`m.room.server_acl`) lets `server` take part: send its
/// events, join, read. A room without one lets every server.
pub async fn acl_allows(
    state: &AppState,
    room_id: &RoomId,
    server: &ruma::ServerName,
) -> crate::error::Result<bool> {
    let Some(acl) = state.store.current_state_event(room_id, "m.room.server_acl", "").await? else {
        return Ok(true);
    };
    let content = super::client_event::ClientEvent::parse(&acl)?;
    // An ACL whose content is not one (redacted, malformed) denies nothing, as in Synapse.
    Ok(serde_json::from_str::<ruma::events::room::server_acl::RoomServerAclEventContent>(
        content.content().get(),
    )
    .map_or(true, |acl| acl.is_allowed(server)))
}

/// [`acl_allows`], as the answer to a server the ACL denies: 403 `M_FORBIDDEN`.
pub async fn check_acl(
    state: &AppState,
    room_id: &RoomId,
    server: &ruma::ServerName,
) -> crate::error::Result<()> {
    match acl_allows(state, room_id, server).await? {
        true => Ok(()),
        false => {
            Err(crate::error::Error::forbidden(format!("the server ACL of room {room_id} denies {server}")))
        }
    }
}
