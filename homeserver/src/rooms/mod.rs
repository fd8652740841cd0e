//! The room service: turns what a local user does into signed, authorised events.
//!
//! Every write goes through [`append`]: under the room's lock it takes the room's head, builds the
//! PDU (`federation::pdu`), checks it against the auth rules (`federation::auth`, ruma's
//! state-res), stores it with its stream position, and wakes the syncs waiting on the notifier.

pub mod backfill;
pub mod client_event;
pub mod ephemeral;
pub mod expiry;
pub mod fetched;
pub mod graph;
pub mod invite;
pub mod join;
pub mod missing;
pub mod receipts;
pub mod recent;
pub mod remote;
pub mod visibility;

use std::collections::{BTreeMap, HashMap};

use actix_web::http::StatusCode;
use federation::{
    auth::{self, Pdu},
    pdu::{self, PduBuilder, SignedPdu},
};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, RoomId, RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, ErrorKind, Result},
    state::AppState,
    storage::{AppendError, NewEvent, RoomHead, StoredEvent},
};

/// Largest event a client may send (the spec's PDU limit).
pub const MAX_EVENT_BYTES: usize = federation::pdu::MAX_PDU_BYTES;

/// The spec's bound on an event's `type` and `state_key`, in bytes.
pub const MAX_TYPE_OR_KEY_BYTES: usize = 255;

/// Says what is wrong with an event type or state key longer than the spec allows (other
/// servers would refuse the event).
pub fn check_type_and_key(event_type: &str, state_key: Option<&str>) -> std::result::Result<(), String> {
    if event_type.len() > MAX_TYPE_OR_KEY_BYTES {
        return Err(format!("event type longer than {MAX_TYPE_OR_KEY_BYTES} bytes"));
    }
    if state_key.is_some_and(|key| key.len() > MAX_TYPE_OR_KEY_BYTES) {
        return Err(format!("state key longer than {MAX_TYPE_OR_KEY_BYTES} bytes"));
    }
    Ok(())
}

/// What a local user wants to add to a room.
#[derive(Debug, Clone)]
pub struct Draft<'a> {
    pub sender: &'a UserId,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: &'a RawValue,
    pub redacts: Option<&'a EventId>,
    /// The redacted JSON of the event a redaction removes, prepared by the caller.
    pub redacted_json: Option<String>,
    /// The client transaction the event answers: (device, txn id).
    pub txn: Option<(&'a str, &'a str)>,
}

impl<'a> Draft<'a> {
    /// `sender`'s membership event for `target` with `content`.
    pub fn membership(sender: &'a UserId, target: &'a UserId, content: &'a RawValue) -> Self {
        Draft {
            sender,
            event_type: "m.room.member",
            state_key: Some(target.as_str()),
            content,
            redacts: None,
            redacted_json: None,
            txn: None,
        }
    }
}

fn forbidden(message: impl Into<String>) -> Error {
    Error::forbidden(message)
}

fn parse_pdu(event_id: &str, json: &str) -> std::result::Result<Pdu, AppendError> {
    let id = OwnedEventId::try_from(event_id).map_err(|e| AppendError::Invalid(e.to_string()))?;
    let object: ruma::CanonicalJsonObject =
        crate::storage::parse_stored(json).map_err(|e| AppendError::Invalid(e.to_string()))?;
    Pdu::from_json(id, &object).map_err(|e| AppendError::Invalid(e.to_string()))
}

/// The `hashes` of a stored event, which room versions 1 and 2 name with its id.
fn hashes_of(json: &str) -> std::result::Result<ruma::CanonicalJsonValue, AppendError> {
    // Top-level fields only: the content stays raw, however deeply it is nested.
    let fields: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(json).map_err(|e| AppendError::Invalid(e.to_string()))?;
    let hashes = fields.get("hashes").ok_or_else(|| AppendError::Invalid("event without hashes".into()))?;
    serde_json::from_str(hashes.get()).map_err(|e| AppendError::Invalid(e.to_string()))
}

/// An event's JSON as a redaction leaves it, under the rules of room `version`.
pub fn pruned_json(version: &RoomVersionId, json: &str) -> Result<String> {
    let object: ruma::CanonicalJsonObject = crate::storage::parse_stored(json).map_err(Error::internal)?;
    let redacted = federation::pdu::redacted(object, version, None).map_err(Error::internal)?;
    Ok(ruma::CanonicalJsonValue::Object(redacted).to_string())
}

/// Where a new event goes in its room: the auth events the rules name for it (and the state
/// they are checked against), the references its room version writes, its depth.
struct Placement {
    version: RoomVersionId,
    rules: ruma::room_version_rules::RoomVersionRules,
    state_pdus: HashMap<(StateEventType, String), Pdu>,
    auth_ids: Vec<OwnedEventId>,
    auth_events: HashMap<OwnedEventId, Pdu>,
    reference_hashes: BTreeMap<OwnedEventId, ruma::CanonicalJsonValue>,
    depth: u64,
}

fn place(draft: &Draft<'_>, head: &RoomHead) -> std::result::Result<Placement, AppendError> {
    let version = RoomVersionId::try_from(head.room_version.as_str())
        .map_err(|e| AppendError::Invalid(e.to_string()))?;
    let rules = pdu::rules(&version).map_err(|e| AppendError::Invalid(e.to_string()))?;
    let kind = TimelineEventType::from(draft.event_type);
    let auth_keys = auth::auth_types(&version, &kind, draft.sender, draft.state_key, draft.content)
        .map_err(|e| AppendError::Invalid(e.to_string()))?;
    let mut state_pdus: HashMap<(StateEventType, String), Pdu> = HashMap::new();
    for ((event_type, state_key), (event_id, json)) in &head.state {
        state_pdus.insert(
            (StateEventType::from(event_type.as_str()), state_key.clone()),
            parse_pdu(event_id, json)?,
        );
    }
    let mut auth_events = HashMap::new();
    let mut auth_ids = Vec::new();
    for key in &auth_keys {
        if let Some(pdu) = state_pdus.get(key) {
            auth_ids.push(pdu.event_id.clone());
            auth_events.insert(pdu.event_id.clone(), pdu.clone());
        }
    }
    // From room version 12 the create event is not among an event's auth events, but the auth
    // rules still look it up (by the room id, which is its hash).
    if let Some(create) = state_pdus.get(&(StateEventType::RoomCreate, String::new())) {
        auth_events.entry(create.event_id.clone()).or_insert_with(|| create.clone());
    }
    let mut reference_hashes = BTreeMap::new();
    if pdu::ids_chosen_by_sender(&rules) {
        for (event_id, json) in head.state.values() {
            let id =
                OwnedEventId::try_from(event_id.as_str()).map_err(|e| AppendError::Invalid(e.to_string()))?;
            reference_hashes.insert(id, hashes_of(json)?);
        }
        for (id, json) in &head.extremity_json {
            reference_hashes.insert(id.clone(), hashes_of(json)?);
        }
    }
    let depth = u64::try_from(head.depth + 1).unwrap_or(1);
    Ok(Placement { version, rules, state_pdus, auth_ids, auth_events, reference_hashes, depth })
}

impl Placement {
    fn builder<'a>(
        &'a self,
        room_id: Option<&'a RoomId>,
        draft: &'a Draft<'_>,
        head: &'a RoomHead,
        origin_server_ts: MilliSecondsSinceUnixEpoch,
    ) -> PduBuilder<'a> {
        PduBuilder {
            room_id,
            room_version: &self.version,
            sender: draft.sender,
            event_type: draft.event_type,
            state_key: draft.state_key,
            content: draft.content,
            prev_events: followed(head),
            auth_events: &self.auth_ids,
            reference_hashes: &self.reference_hashes,
            depth: self.depth,
            origin_server_ts,
            redacts: draft.redacts,
        }
    }

    /// Signs `builder`'s event as this server and checks it against the auth rules.
    fn sign_and_check(
        &self,
        state: &AppState,
        builder: &PduBuilder<'_>,
    ) -> std::result::Result<SignedPdu, AppendError> {
        let signed = builder
            .sign(&state.server_name, &state.signing_key)
            .map_err(|e| AppendError::Invalid(e.to_string()))?;
        let pdu = Pdu::from_json(signed.event_id.clone(), &signed.json)
            .map_err(|e| AppendError::Invalid(e.to_string()))?;
        auth::check(&self.version, &pdu, &self.auth_events, &self.state_pdus)
            .map_err(AppendError::Refused)?;
        Ok(signed)
    }
}

/// The extremities a new event follows: all of them, or the newest the spec allows (20) when
/// other servers' events left more; the rest stay extremities until later events follow them.
fn followed(head: &RoomHead) -> &[OwnedEventId] {
    &head.extremities[head.extremities.len().saturating_sub(pdu::MAX_PREV_EVENTS)..]
}

/// Builds, signs and authorises `draft` against the room's head.
fn build(
    state: &AppState,
    room_id: &RoomId,
    draft: &Draft<'_>,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    head: &RoomHead,
) -> std::result::Result<NewEvent, AppendError> {
    let placement = place(draft, head)?;
    let kind = TimelineEventType::from(draft.event_type);
    let creates_room_id =
        kind == TimelineEventType::RoomCreate && pdu::room_id_is_create_hash(&placement.rules);
    let builder = placement.builder((!creates_room_id).then_some(room_id), draft, head, origin_server_ts);
    let SignedPdu { event_id, json } = placement.sign_and_check(state, &builder)?;
    if creates_room_id && pdu::room_id_from_create(&event_id).ok().as_deref() != Some(room_id) {
        return Err(AppendError::Invalid("the create event does not hash to the room id".into()));
    }
    let depth = placement.depth;

    let membership = (kind == TimelineEventType::RoomMember)
        .then(|| serde_json::from_str::<serde_json::Value>(draft.content.get()).ok())
        .flatten()
        .and_then(|c| c.get("membership").and_then(|m| m.as_str()).map(str::to_owned));
    Ok(NewEvent {
        event_id,
        json: ruma::CanonicalJsonValue::Object(json).to_string(),
        sender: draft.sender.to_string(),
        event_type: draft.event_type.to_owned(),
        state_key: draft.state_key.map(str::to_owned),
        depth: i64::try_from(depth).unwrap_or(i64::MAX),
        origin_server_ts: i64::try_from(u64::from(origin_server_ts.0)).unwrap_or(i64::MAX),
        membership,
        redaction: draft.redacts.zip(draft.redacted_json.clone()).map(|(id, json)| (id.to_string(), json)),
        txn: draft.txn.map(|(device, txn)| (draft.sender.to_string(), device.to_owned(), txn.to_owned())),
        prev_events: followed(head).to_vec(),
        resolved: None,
        expires_ts: state
            .config
            .rooms
            .self_destructing_messages
            .then(|| expiry::expiry_of(draft.event_type, draft.state_key, draft.content))
            .flatten(),
        replaces_state: draft
            .state_key
            .and_then(|key| head.state.get(&(draft.event_type.to_owned(), key.to_owned())))
            .map(|(event_id, _)| event_id.clone()),
    })
}

/// The state an event's builder reads from the room's head: its auth events, the create event
/// (the auth rules read it even where it is not an auth event, from version 12), and for a state
/// event the one it replaces (which its readers see in `unsigned`).
pub(crate) fn head_keys(
    version: &RoomVersionId,
    sender: &UserId,
    event_type: &str,
    state_key: Option<&str>,
    content: &RawValue,
) -> std::result::Result<Vec<(String, String)>, federation::pdu::PduError> {
    let kind = TimelineEventType::from(event_type);
    let mut keys: Vec<(String, String)> = auth::auth_types(version, &kind, sender, state_key, content)?
        .into_iter()
        .map(|(kind, key)| (kind.to_string(), key))
        .collect();
    let create_key = ("m.room.create".to_owned(), String::new());
    if !keys.contains(&create_key) {
        keys.push(create_key);
    }
    if let Some(key) = state_key {
        let replaced = (event_type.to_owned(), key.to_owned());
        if !keys.contains(&replaced) {
            keys.push(replaced);
        }
    }
    Ok(keys)
}

/// The event a user of another server would add to a room here (`make_join`, `make_leave`), for
/// that server to fill in and sign: unsigned, and only if the auth rules would let it in now.
pub async fn template(
    state: &AppState,
    room_id: &RoomId,
    draft: &Draft<'_>,
) -> Result<(RoomVersionId, ruma::CanonicalJsonObject)> {
    let version = room_version(state, room_id).await?;
    let rules = pdu::rules(&version).map_err(Error::internal)?;
    let keys = head_keys(&version, draft.sender, draft.event_type, draft.state_key, draft.content)
        .map_err(|e| Error::bad_json(e.to_string()))?;
    let head = state
        .store
        .room_head(room_id, &keys, pdu::ids_chosen_by_sender(&rules))
        .await?
        .ok_or_else(|| Error::not_found("no such room"))?;
    let refused = |error: AppendError| match error {
        AppendError::Refused(why) => forbidden(why),
        other => Error::bad_json(other.to_string()),
    };
    let placement = place(draft, &head).map_err(refused)?;
    let builder = placement.builder(Some(room_id), draft, &head, MilliSecondsSinceUnixEpoch::now());
    // Signed here only to put it through the auth rules as the other server will send it.
    placement.sign_and_check(state, &builder).map_err(refused)?;
    let template = builder.template().map_err(|e| Error::bad_json(e.to_string()))?;
    Ok((version, template))
}

/// Appends an event to a room, returning it as stored.
pub async fn append(state: &AppState, room_id: &RoomId, draft: Draft<'_>) -> Result<StoredEvent> {
    append_at(state, room_id, draft, None).await
}

/// A new random room id for a room of `version`, or `None` where the version makes it the
/// create event's hash (12 and later).
pub fn new_room_id(state: &AppState, version: &RoomVersionId) -> Result<Option<OwnedRoomId>> {
    let rules = pdu::rules(version).map_err(|e| Error::bad_json(e.to_string()))?;
    if pdu::room_id_is_create_hash(&rules) {
        return Ok(None);
    }
    let id = format!("!{}:{}", crate::auth::tokens::random_token(18), state.server_name);
    OwnedRoomId::try_from(id).map(Some).map_err(Error::internal)
}

/// Creates a room of `version` with its `m.room.create` event (`content` without
/// `room_version`, which this adds), returning the new room's id: `chosen_id` (from
/// [`new_room_id`]) or a random one, or from version 12 the create event's hash.
pub async fn create(
    state: &AppState,
    version: &RoomVersionId,
    creator: &UserId,
    mut content: serde_json::Map<String, serde_json::Value>,
    chosen_id: Option<OwnedRoomId>,
) -> Result<OwnedRoomId> {
    let rules = pdu::rules(version).map_err(|e| Error::bad_json(e.to_string()))?;
    content.insert("room_version".into(), version.as_str().into());
    let content = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
    let now = MilliSecondsSinceUnixEpoch::now();
    let room_id = if pdu::room_id_is_create_hash(&rules) {
        // Signing is deterministic: built again at the same time, in the new room, the create
        // event hashes to the same id (which `build` checks).
        let no_refs = BTreeMap::new();
        let create = PduBuilder {
            room_id: None,
            room_version: version,
            sender: creator,
            event_type: "m.room.create",
            state_key: Some(""),
            content: &content,
            prev_events: &[],
            auth_events: &[],
            reference_hashes: &no_refs,
            depth: 1,
            origin_server_ts: now,
            redacts: None,
        }
        .sign(&state.server_name, &state.signing_key)
        .map_err(|e| Error::bad_json(e.to_string()))?;
        pdu::room_id_from_create(&create.event_id).map_err(Error::internal)?
    } else {
        match chosen_id {
            Some(room_id) => room_id,
            None => new_room_id(state, version)?.ok_or_else(|| Error::internal("no room id"))?,
        }
    };
    if !state.store.create_room(&room_id, version.as_str(), creator).await? {
        return Err(Error::internal("room id collision"));
    }
    let draft = Draft {
        sender: creator,
        event_type: "m.room.create",
        state_key: Some(""),
        content: &content,
        redacts: None,
        redacted_json: None,
        txn: None,
    };
    append_at(state, &room_id, draft, Some(now)).await?;
    Ok(room_id)
}

/// [`append`], at a given `origin_server_ts` if one is set (now otherwise).
async fn append_at(
    state: &AppState,
    room_id: &RoomId,
    draft: Draft<'_>,
    origin_server_ts: Option<MilliSecondsSinceUnixEpoch>,
) -> Result<StoredEvent> {
    // Both come from the request's path here; `createRoom` checks its body's before it starts.
    check_type_and_key(draft.event_type, draft.state_key).map_err(Error::invalid_param)?;
    if draft.content.get().len() > MAX_EVENT_BYTES {
        return Err(Error::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooLarge,
            "event larger than 65536 bytes",
        ));
    }
    let version = room_version(state, room_id).await?;
    let rules = pdu::rules(&version).map_err(Error::internal)?;
    let auth_keys = head_keys(&version, draft.sender, draft.event_type, draft.state_key, draft.content)
        .map_err(|e| Error::bad_json(e.to_string()))?;
    let builder = |head: &RoomHead| {
        build(state, room_id, &draft, origin_server_ts.unwrap_or_else(MilliSecondsSinceUnixEpoch::now), head)
    };
    let with_extremity_json = pdu::ids_chosen_by_sender(&rules);
    let outcome =
        state.store.append_event(room_id, &state.stream, &auth_keys, with_extremity_json, &builder).await?;
    if let (Err(_), Some((device, txn))) = (&outcome, draft.txn) {
        // A retried transaction answers with its first event, even if sending again would now
        // be refused (the sender left, say).
        if let Some(event_id) = state.store.event_by_txn(draft.sender, device, txn).await?
            && let Some(stored) = state.store.get_event(&event_id).await?
        {
            return Ok(stored);
        }
    }
    match outcome {
        Ok(stored) => {
            // Make the event readable before answering, so the sender's next sync has it.
            state.stream.flush().await?;
            state.notify(stored.stream_ordering);
            if let Err(error) = remote::forward(state, room_id, &stored, None).await {
                // Stored and answered all the same: the other servers fetch it when a later event names it.
                tracing::warn!(%error, event_id = %stored.event_id, "an event was not queued for the other servers");
            }
            Ok(stored)
        }
        Err(AppendError::DuplicateTxn) => Err(Error::internal("transaction id used, but its event is gone")),
        Err(AppendError::HeadMoved) => Err(Error::internal("the room moved while a local event was built")),
        Err(AppendError::NoRoom) => Err(Error::not_found("no such room")),
        Err(AppendError::Refused(why) | AppendError::SoftFailed(why)) => Err(forbidden(why)),
        Err(AppendError::Invalid(why)) => {
            if why.contains("larger than") {
                Err(Error::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::TooLarge, why))
            } else {
                Err(Error::bad_json(why))
            }
        }
    }
}

/// The sender's membership, or M_FORBIDDEN if they are not joined.
pub async fn require_joined(state: &AppState, room_id: &RoomId, user_id: &UserId) -> Result<()> {
    match state.store.membership(room_id, user_id).await?.as_deref() {
        Some("join") => Ok(()),
        _ => {
            if state.store.room_version(room_id).await?.is_none() {
                Err(Error::not_found("no such room"))
            } else {
                Err(forbidden("you are not a member of this room"))
            }
        }
    }
}

/// Checks a room id from a request names a room here (M_NOT_FOUND otherwise).
pub async fn room_version(state: &AppState, room_id: &RoomId) -> Result<RoomVersionId> {
    let version = state.store.room_version(room_id).await?.ok_or_else(|| Error::not_found("no such room"))?;
    RoomVersionId::try_from(version.as_str()).map_err(Error::internal)
}

/// Takes a stream position for something that is not a room event (a receipt, account data,
/// typing, keys, a to-device message), runs `write` with it, and makes it readable and announced.
pub async fn at_new_position<F, Fut, T>(state: &AppState, write: F) -> Result<T>
where
    F: FnOnce(i64) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let guard = state.stream.allocate().await?;
    let position = guard.position;
    // These writes commit as they go: the lease is checked before the first.
    guard.still_leased()?;
    let written = write(position).await?;
    drop(guard);
    state.stream.flush().await?;
    state.notify(position);
    Ok(written)
}

/// A room creator's power level where creators outrank everyone (room version 12 and later).
pub const CREATOR_POWER: i64 = i64::MAX;

/// A user's power level in a room, and the room's power levels content (`{}` if none).
pub async fn power(state: &AppState, room_id: &RoomId, user: &UserId) -> Result<(i64, serde_json::Value)> {
    let mut content = serde_json::json!({});
    let mut is_creator = false;
    let rules = pdu::rules(&room_version(state, room_id).await?).map_err(Error::internal)?;
    for event in state.store.current_state(room_id).await? {
        let event = client_event::ClientEvent::parse(&event)?;
        if event.is_state("m.room.power_levels", "") {
            content = event.content_value()?;
        } else if event.is_state("m.room.create", "")
            && rules.authorization.explicitly_privilege_room_creators
        {
            let additional = event.content_value()?["additional_creators"].clone();
            is_creator = event.sender() == user.as_str()
                || additional
                    .as_array()
                    .is_some_and(|list| list.iter().any(|u| u.as_str() == Some(user.as_str())));
        }
    }
    if is_creator {
        return Ok((CREATOR_POWER, content));
    }
    let level = |v: &serde_json::Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    let user_level =
        level(&content["users"][user.as_str()]).or_else(|| level(&content["users_default"])).unwrap_or(0);
    Ok((user_level, content))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use federation::signing_key::SigningKey;
    use proptest::prelude::*;
    use ruma::{ServerName, owned_event_id, room_id, server_name, user_id};
    use serde_json::Value;

    use super::*;
    use crate::json::arbitrary::*;

    fn key() -> &'static SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| {
            let path = std::env::temp_dir().join(format!("hearth-proptest-key-{}", std::process::id()));
            let key = SigningKey::load_or_generate(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            key
        })
    }

    /// Content as a client may send it: an object of anything (numbers outside canonical JSON's
    /// range, floats, NULs, nesting past serde_json's limit), and now and then not an object.
    fn content() -> impl Strategy<Value = Value> {
        let small_int = (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(Value::from);
        let field = prop_oneof![3 => deep_value(135), 1 => small_int];
        prop_oneof![
            6 => prop::collection::vec((tricky_string(), field), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            1 => value(),
        ]
    }

    /// Whether canonical JSON can hold `value`: integers within ±(2^53 - 1), no floats.
    fn canonical_numbers(value: &Value) -> bool {
        match value {
            Value::Number(n) => n.as_i64().is_some_and(|n| n.unsigned_abs() < 1 << 53),
            Value::Array(items) => items.iter().all(canonical_numbers),
            Value::Object(map) => map.values().all(canonical_numbers),
            _ => true,
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn signing_any_content_refuses_it_or_keeps_it_as_sent(
            content in content(),
            style in style(),
            v11 in any::<bool>(),
            event_type in tricky_string(),
            state_key in prop::option::of(tricky_string()),
        ) {
            let text = write(&content, style);
            let raw = RawValue::from_string(text.clone()).unwrap();
            let version = if v11 { RoomVersionId::V11 } else { RoomVersionId::V10 };
            let prev = [owned_event_id!("$prev")];
            let no_refs = BTreeMap::new();
            let builder = PduBuilder {
                room_id: Some(room_id!("!room:hearth.test")),
                room_version: &version,
                sender: user_id!("@alice:hearth.test"),
                event_type: &event_type,
                state_key: state_key.as_deref(),
                content: &raw,
                prev_events: &prev,
                auth_events: &[],
                reference_hashes: &no_refs,
                depth: 2,
                origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
                redacts: None,
            };
            let server: &ServerName = server_name!("hearth.test");
            match builder.sign(server, key()) {
                Ok(pdu) => {
                    // Read as stored events are (content up to serde_json's limit makes an event
                    // one level deeper; the door keeps clients' content far shallower).
                    let signed: Value = crate::storage::parse_stored(&pdu.to_canonical_string()).unwrap();
                    prop_assert_eq!(&signed["content"], &content);
                    prop_assert_eq!(&signed["type"], &Value::from(event_type));
                }
                Err(error) => {
                    let storable = content.is_object()
                        && canonical_numbers(&content)
                        && depth_of(&content) < 120
                        && text.len() < 30_000;
                    prop_assert!(!storable, "refused {}: {}", text, error);
                }
            }
        }
    }
}
