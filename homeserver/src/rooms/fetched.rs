//! Events of a room fetched from another server on request, to check an event it sent: the
//! event's auth chain (`event_auth`), and the room's state at an event it follows that this
//! server never got (`state_ids`, then the events of that state this server lacks, one by one
//! with `event`, or all at once with `state` when many are lacking).
//!
//! What comes back is checked as one batch ([`check_batch`]): each event signed as it must be,
//! of the room, and passing the auth rules given its own auth events (from the batch or stored
//! here), oldest first. Those that pass are kept as outliers (in no timeline), those the rules
//! reject as rejected; an event whose auth events cannot be had is dropped. The event the state
//! was asked at keeps that state as its own, with itself applied, so that the event that
//! follows it can be checked against it ([`super::remote`]).

use std::collections::{BTreeSet, HashMap};

use federation::{auth::Pdu, pdu};
use futures_util::StreamExt as _;
use ruma::{
    CanonicalJsonObject, EventId, OwnedEventId, RoomId, RoomVersionId, ServerName,
    api::federation::{
        authorization::get_event_authorization,
        event::{get_event, get_room_state, get_room_state_ids},
    },
    events::StateEventType,
};

use super::remote::{self, Refused};
use crate::{
    state::AppState,
    storage::{NewEvent, Outlier, StateMap, StoredEvent},
};

/// The most events of a state fetched one by one; beyond, the whole state is asked for.
const MAX_SINGLE_FETCHES: usize = 50;
/// How many of those are asked at once.
const CONCURRENT_FETCHES: usize = 8;

/// An event of a batch, checked.
pub struct Checked {
    pub pdu: Pdu,
    pub event: NewEvent,
    /// Why the auth rules reject it, if they do.
    pub rejected: Option<String>,
}

/// Checks `events` of `room_id` sent by another server (see the module's comment), oldest first.
/// Those not signed as they must be, of another room or whose auth events are neither in the
/// batch nor stored here are left out.
pub async fn check_batch(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
    events: Vec<CanonicalJsonObject>,
) -> Result<Vec<Checked>, Refused> {
    let mut received: HashMap<OwnedEventId, (CanonicalJsonObject, Pdu)> = HashMap::new();
    for json in events {
        let Ok(event_id) = remote::checked_id(&json, version) else { continue };
        if received.contains_key(&event_id) {
            continue;
        }
        match remote::verified(state, event_id.clone(), version, json).await {
            Ok((json, pdu)) if of_room(&pdu, room_id, version) => {
                received.insert(event_id, (json, pdu));
            }
            Ok(_) => tracing::info!(%event_id, %room_id, "a fetched event of another room was dropped"),
            Err(Refused::Internal(why)) => return Err(Refused::Internal(why)),
            Err(refused) => tracing::info!(%event_id, %refused, "a fetched event was dropped"),
        }
    }
    // The auth events named that are not in the batch, as stored here.
    let outside: BTreeSet<&str> = received
        .values()
        .flat_map(|(_, pdu)| &pdu.auth_events)
        .filter(|id| !received.contains_key(*id))
        .map(|id| id.as_str())
        .collect();
    let outside: Vec<&str> = outside.into_iter().collect();
    let mut known: HashMap<OwnedEventId, Pdu> = HashMap::new();
    let mut rejected: BTreeSet<OwnedEventId> = BTreeSet::new();
    let mut foreign: BTreeSet<OwnedEventId> = BTreeSet::new();
    for stored in state.store.events_by_id(&outside).await? {
        let Some((id, pdu)) = stored_pdu(&stored) else { continue };
        if stored.room_id != room_id.as_str() {
            foreign.insert(id);
        } else {
            known.insert(id, pdu);
        }
    }
    for (id, _) in state.store.rejected_events(&outside).await? {
        if let Ok(id) = OwnedEventId::try_from(id) {
            known.remove(&id);
            rejected.insert(id);
        }
    }
    let create = create_event(state, room_id, version).await?;
    let mut order: Vec<(OwnedEventId, (CanonicalJsonObject, Pdu))> = received.into_iter().collect();
    order.sort_by_key(|(_, (_, pdu))| pdu.depth);
    let mut checked = Vec::new();
    for (event_id, (json, pdu)) in order {
        let verdict = if pdu.auth_events.iter().any(|id| rejected.contains(id)) {
            Err("one of its auth events was rejected".to_owned())
        } else if pdu.auth_events.iter().any(|id| foreign.contains(id)) {
            Err("one of its auth events is of another room".to_owned())
        } else {
            let mut auth_events: HashMap<OwnedEventId, Pdu> = pdu
                .auth_events
                .iter()
                .filter_map(|id| known.get(id).map(|auth| (id.clone(), auth.clone())))
                .collect();
            if auth_events.len() < pdu.auth_events.len() {
                tracing::info!(%event_id, "a fetched event whose auth events cannot be had was dropped");
                continue;
            }
            let create = create.clone().or_else(|| {
                // The create event of the batch itself, when the room is new here.
                known.values().find(|known| known.kind.to_string() == "m.room.create").cloned()
            });
            if let Some(create) = create.filter(|_| creates_not_named(version)) {
                auth_events.entry(create.event_id.clone()).or_insert(create);
            }
            remote::check_given_auth_events(version, &pdu, &auth_events)
        };
        match &verdict {
            Ok(()) => {
                known.insert(event_id.clone(), pdu.clone());
            }
            Err(why) => {
                tracing::info!(%event_id, %why, "a fetched event failing the auth rules was rejected");
                rejected.insert(event_id.clone());
            }
        }
        let event = remote::stored_form(&pdu, &json)?;
        checked.push(Checked { pdu, event, rejected: verdict.err() });
    }
    Ok(checked)
}

/// Whether the rules read the create event though events do not name it (room version 12 on).
fn creates_not_named(version: &RoomVersionId) -> bool {
    pdu::rules(version).is_ok_and(|rules| pdu::room_id_is_create_hash(&rules))
}

/// The room's create event, where the rules read it without events naming it.
async fn create_event(
    state: &AppState,
    room_id: &RoomId,
    version: &RoomVersionId,
) -> Result<Option<Pdu>, Refused> {
    if !creates_not_named(version) {
        return Ok(None);
    }
    let create = state.store.current_state_event(room_id, "m.room.create", "").await?;
    Ok(create.as_ref().and_then(stored_pdu).map(|(_, pdu)| pdu))
}

/// Whether `pdu` is of `room_id`: the create event by its id where the room id is its hash.
fn of_room(pdu: &Pdu, room_id: &RoomId, version: &RoomVersionId) -> bool {
    if pdu.kind.to_string() == "m.room.create" && creates_not_named(version) {
        return pdu::room_id_from_create(&pdu.event_id).ok().as_deref() == Some(room_id);
    }
    pdu.room_id.as_deref() == Some(room_id)
}

/// A stored event as the auth rules read it.
pub fn stored_pdu(event: &StoredEvent) -> Option<(OwnedEventId, Pdu)> {
    let id = OwnedEventId::try_from(event.event_id.as_str()).ok()?;
    let object: CanonicalJsonObject = crate::storage::parse_stored(&event.json).ok()?;
    Some((id.clone(), Pdu::from_json(id, &object).ok()?))
}

/// `origin`'s answer to `request` (up to [`crate::remote::MAX_STATE_BYTES`]), or `None` if it
/// cannot be had (logged, naming `what` was asked).
pub(super) async fn ask<R>(
    state: &AppState,
    origin: &ServerName,
    request: R,
    what: &str,
) -> Result<Option<R::IncomingResponse>, Refused>
where
    R: ruma::api::OutgoingRequest<PathBuilder = ruma::api::path_builder::SinglePath>,
    R::Authentication: crate::remote::RequestAuth,
{
    let remote = state.remote().map_err(|e| Refused::Internal(e.to_string()))?;
    let key = state.signing_key.key_pair();
    match remote.send_limited(&state.server_name, key, origin, request, crate::remote::MAX_STATE_BYTES).await
    {
        Ok(answer) => Ok(Some(answer)),
        Err(error) => {
            tracing::info!(%origin, %error, "{what} could not be fetched");
            Ok(None)
        }
    }
}

/// Fetches from `origin` the auth chain of its event `event_id` and keeps what checks out.
pub async fn auth_chain(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    event_id: &EventId,
) -> Result<(), Refused> {
    let request = get_event_authorization::v1::Request::new(room_id.to_owned(), event_id.to_owned());
    let Some(answer) = ask(state, origin, request, "the auth chain of an event").await? else {
        return Ok(());
    };
    let events = answer.auth_chain.iter().filter_map(|raw| serde_json::from_str(raw.get()).ok()).collect();
    let checked = check_batch(state, room_id, version, events).await?;
    let outliers: Vec<Outlier> = checked
        .into_iter()
        .map(|Checked { event, rejected, .. }| Outlier { event, state_after: None, rejected })
        .collect();
    Ok(state.store.store_outliers(room_id, &outliers).await?)
}

/// Fetches from `origin` the room's state at `at` (an event this server never got, or got
/// without its state) and `at` itself, and keeps them: `at` with the state after it.
pub async fn state_at(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    at: &EventId,
) -> Result<(), Refused> {
    let remote = state.remote().map_err(|e| Refused::Internal(e.to_string()))?;
    let (server_name, key) = (&state.server_name, state.signing_key.key_pair());
    let request = get_room_state_ids::v1::Request::new(at.to_owned(), room_id.to_owned());
    let Some(ids) = ask(state, origin, request, "the state at an event").await? else { return Ok(()) };
    let mut wanted: BTreeSet<&EventId> =
        ids.pdu_ids.iter().chain(&ids.auth_chain_ids).map(|id| &**id).collect();
    wanted.insert(at);
    let wanted_ids: Vec<&str> = wanted.iter().map(|id| id.as_str()).collect();
    let stored: HashMap<String, StoredEvent> = state
        .store
        .events_by_id(&wanted_ids)
        .await?
        .into_iter()
        .filter(|event| event.room_id == room_id.as_str())
        .map(|event| (event.event_id.clone(), event))
        .collect();
    // `at` itself is asked for again when it is here without a state: it is given one below.
    let lacking: Vec<&EventId> =
        wanted.iter().copied().filter(|id| *id == at || !stored.contains_key(id.as_str())).collect();
    let mut fetched: Vec<CanonicalJsonObject> = Vec::new();
    if lacking.len() > MAX_SINGLE_FETCHES {
        let request = get_room_state::v1::Request::new(at.to_owned(), room_id.to_owned());
        let Some(answer) = ask(state, origin, request, "the state at an event").await? else { return Ok(()) };
        let events = answer.pdus.iter().chain(&answer.auth_chain);
        fetched.extend(events.filter_map(|raw| serde_json::from_str(raw.get()).ok()));
    }
    let one_by_one: Vec<&EventId> = match fetched.is_empty() {
        true => lacking,
        false => vec![at],
    };
    let answers = futures_util::stream::iter(one_by_one)
        .map(|id| async move {
            let request = get_event::v1::Request::new(id.to_owned());
            match remote.send(server_name, key, origin, request).await {
                Ok(answer) => serde_json::from_str::<CanonicalJsonObject>(answer.pdu.get()).ok(),
                Err(error) => {
                    tracing::info!(%origin, event_id = %id, %error, "an event of a state could not be fetched");
                    None
                }
            }
        })
        .buffer_unordered(CONCURRENT_FETCHES)
        .collect::<Vec<_>>()
        .await;
    fetched.extend(answers.into_iter().flatten());
    // An answer holding another event than the one asked for is left out with the events
    // nobody asked for: `check_batch` keeps each under the id its content hashes to.
    let checked = check_batch(state, room_id, version, fetched).await?;
    let checked_at = checked.iter().find(|checked| checked.pdu.event_id == at);
    let at_stored = match (checked_at, stored.get(at.as_str())) {
        (Some(checked), _) => (checked.pdu.clone(), checked.event.clone(), checked.rejected.clone()),
        (None, Some(stored)) => {
            let Some((id, pdu)) = stored_pdu(stored) else { return Ok(()) };
            let object: CanonicalJsonObject =
                crate::storage::parse_stored(&stored.json).map_err(|e| Refused::Internal(e.to_string()))?;
            let event = remote::stored_form(&pdu, &object)?;
            let rejected = state.store.rejected_events(&[id.as_str()]).await?.pop().map(|_| String::new());
            (pdu, event, rejected)
        }
        (None, None) => {
            tracing::info!(%origin, %at, "the event a state was asked at could not be had");
            return Ok(());
        }
    };
    // The state after `at`: the state before it, with it applied unless it is rejected.
    let passed: HashMap<&str, &Pdu> = checked
        .iter()
        .filter(|checked| checked.rejected.is_none())
        .map(|checked| (checked.pdu.event_id.as_str(), &checked.pdu))
        .collect();
    let stored_pdus: HashMap<String, Pdu> =
        stored.values().filter_map(stored_pdu).map(|(id, pdu)| (id.to_string(), pdu)).collect();
    let mut state_after = StateMap::new();
    for id in &ids.pdu_ids {
        let Some(pdu) = passed.get(id.as_str()).copied().or_else(|| stored_pdus.get(id.as_str())) else {
            continue;
        };
        if let Some(key) = &pdu.state_key {
            state_after.insert((pdu.kind.to_string(), key.clone()), id.to_string());
        }
    }
    let (at_pdu, at_event, at_rejected) = at_stored;
    if let (None, Some(key)) = (&at_rejected, &at_pdu.state_key) {
        state_after.insert((at_pdu.kind.to_string(), key.clone()), at.to_string());
    }
    if !state_after.contains_key(&(StateEventType::RoomCreate.to_string(), String::new())) {
        tracing::info!(%origin, %at, "the state at an event came without a create event; it is not used");
        return Ok(());
    }
    let mut outliers: Vec<Outlier> = checked
        .into_iter()
        .filter(|checked| checked.pdu.event_id != at)
        .map(|Checked { event, rejected, .. }| Outlier { event, state_after: None, rejected })
        .collect();
    outliers.push(Outlier { event: at_event, state_after: Some(state_after), rejected: at_rejected });
    Ok(state.store.store_outliers(room_id, &outliers).await?)
}
