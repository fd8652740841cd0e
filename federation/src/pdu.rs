//! Persistent data units: the signed events rooms are made of.
//!
//! [`PduBuilder`] turns what a server wants to say (type, state key, content, and where it sits
//! in the room's graph) into a PDU of the room's version: content hash, this server's ed25519
//! signature, and the reference hash that is its event id (room versions 3 and later). Everything
//! cryptographic is ruma's (`ruma::signatures`, `ruma::canonical_json`); this module only puts
//! the fields together and checks the limits the spec sets.

use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, RoomId,
    RoomVersionId, ServerName, UserId,
    canonical_json::{RedactedBecause, redact, to_canonical_value},
    room_version_rules::RoomVersionRules,
    signatures::{PublicKeyMap, Verified, hash_and_sign_event, reference_hash, verify_event},
};
use serde_json::value::RawValue;

use crate::signing_key::SigningKey;

/// Largest PDU the spec allows, in bytes of canonical JSON.
pub const MAX_PDU_BYTES: usize = 65_536;
/// Most `prev_events` a PDU may name (the spec's limit for new events).
pub const MAX_PREV_EVENTS: usize = 20;
/// Most `auth_events` a PDU may name.
pub const MAX_AUTH_EVENTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("room version {0} is not supported")]
    UnsupportedRoomVersion(RoomVersionId),
    #[error("event is larger than {MAX_PDU_BYTES} bytes")]
    TooLarge,
    #[error("too many {0}")]
    TooManyReferences(&'static str),
    #[error("content is not a JSON object")]
    ContentNotObject,
    #[error("invalid canonical JSON: {0}")]
    Json(String),
    #[error("signature check failed: {0}")]
    Signature(String),
}

/// Room versions Hearth creates and joins: every stable version of the spec.
pub const SUPPORTED_ROOM_VERSIONS: &[RoomVersionId] = &[
    RoomVersionId::V1,
    RoomVersionId::V2,
    RoomVersionId::V3,
    RoomVersionId::V4,
    RoomVersionId::V5,
    RoomVersionId::V6,
    RoomVersionId::V7,
    RoomVersionId::V8,
    RoomVersionId::V9,
    RoomVersionId::V10,
    RoomVersionId::V11,
    RoomVersionId::V12,
];

/// Whether a room version's event ids are chosen by the sending server (`$random:server`, versions
/// 1 and 2) rather than being the event's reference hash: such events carry their `event_id`, and
/// their `prev_events`/`auth_events` name each event with its `hashes`.
pub fn ids_chosen_by_sender(rules: &RoomVersionRules) -> bool {
    rules.event_format.require_event_id
}

/// Whether a room version's room id is the reference hash of its `m.room.create` event (version
/// 12 and later): the create event then carries no `room_id`.
pub fn room_id_is_create_hash(rules: &RoomVersionRules) -> bool {
    !rules.event_format.require_room_create_room_id
}

/// The room id of a room whose version derives it from its create event (see
/// [`room_id_is_create_hash`]): `!` followed by the create event's reference hash.
pub fn room_id_from_create(create_event_id: &EventId) -> Result<ruma::OwnedRoomId, PduError> {
    RoomId::new_v2(create_event_id.as_str().trim_start_matches('$'))
        .map_err(|e| PduError::Json(e.to_string()))
}

/// The rules of a room version Hearth supports.
pub fn rules(version: &RoomVersionId) -> Result<RoomVersionRules, PduError> {
    if !SUPPORTED_ROOM_VERSIONS.contains(version) {
        return Err(PduError::UnsupportedRoomVersion(version.clone()));
    }
    version.rules().ok_or_else(|| PduError::UnsupportedRoomVersion(version.clone()))
}

/// What a new event says and where it goes in its room.
#[derive(Debug, Clone)]
pub struct PduBuilder<'a> {
    /// The room; `None` only for the `m.room.create` event of a room version whose room id is
    /// that event's hash (see [`room_id_is_create_hash`]), which carries none.
    pub room_id: Option<&'a RoomId>,
    pub room_version: &'a RoomVersionId,
    pub sender: &'a UserId,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: &'a RawValue,
    /// The room's forward extremities when the event is made.
    pub prev_events: &'a [OwnedEventId],
    /// The state events that authorise it (create, power levels, the sender's membership, …).
    pub auth_events: &'a [OwnedEventId],
    /// The `hashes` object of each event named in `prev_events` and `auth_events`. Only room
    /// versions 1 and 2 use them (their references are `[event_id, hashes]` pairs).
    pub reference_hashes: &'a BTreeMap<OwnedEventId, CanonicalJsonValue>,
    pub depth: u64,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    /// For redactions: the event redacted (top-level in room versions before 11).
    pub redacts: Option<&'a EventId>,
}

/// A hashed and signed event.
#[derive(Debug, Clone)]
pub struct SignedPdu {
    pub event_id: OwnedEventId,
    pub json: CanonicalJsonObject,
}

impl SignedPdu {
    /// The canonical JSON text, as stored and sent.
    pub fn to_canonical_string(&self) -> String {
        CanonicalJsonValue::Object(self.json.clone()).to_string()
    }
}

fn signing_error(error: ruma::signatures::JsonError) -> PduError {
    match error {
        ruma::signatures::JsonError::PduTooLarge => PduError::TooLarge,
        other => PduError::Json(other.to_string()),
    }
}

fn canonical<T: serde::Serialize>(value: T) -> Result<CanonicalJsonValue, PduError> {
    to_canonical_value(value).map_err(|e| PduError::Json(e.to_string()))
}

impl PduBuilder<'_> {
    /// The event as another server fills it in before signing it: what `make_join` and
    /// `make_leave` answer. No hashes, signatures or (room versions 1 and 2) event id.
    pub fn template(&self) -> Result<CanonicalJsonObject, PduError> {
        Ok(self.fields()?.0)
    }

    /// The event's fields before hashing and signing, and its room version's rules.
    fn fields(&self) -> Result<(CanonicalJsonObject, RoomVersionRules), PduError> {
        let rules = rules(self.room_version)?;
        if self.prev_events.len() > MAX_PREV_EVENTS {
            return Err(PduError::TooManyReferences("prev_events"));
        }
        if self.auth_events.len() > MAX_AUTH_EVENTS {
            return Err(PduError::TooManyReferences("auth_events"));
        }
        let content: CanonicalJsonValue =
            serde_json::from_str(self.content.get()).map_err(|e| PduError::Json(e.to_string()))?;
        let CanonicalJsonValue::Object(mut content) = content else {
            return Err(PduError::ContentNotObject);
        };
        let create_names_room = self.event_type == "m.room.create" && room_id_is_create_hash(&rules);
        let mut object = CanonicalJsonObject::new();
        match (self.room_id, create_names_room) {
            (Some(room_id), false) => {
                object.insert("room_id".into(), canonical(room_id)?);
            }
            (None, true) => {}
            (Some(_), true) => {
                return Err(PduError::Json(format!(
                    "the create event of a version {} room carries no room_id",
                    self.room_version
                )));
            }
            (None, false) => return Err(PduError::Json("room_id missing".to_owned())),
        }
        object.insert("sender".into(), canonical(self.sender)?);
        object.insert("type".into(), canonical(self.event_type)?);
        if let Some(state_key) = self.state_key {
            object.insert("state_key".into(), canonical(state_key)?);
        }
        if let Some(redacts) = self.redacts {
            // Room version 11 moved `redacts` into the content; earlier versions keep it at the top.
            if rules.redaction.content_field_redacts {
                content.insert("redacts".into(), canonical(redacts)?);
            } else {
                object.insert("redacts".into(), canonical(redacts)?);
            }
        }
        object.insert("content".into(), CanonicalJsonValue::Object(content));
        let sender_chooses_id = ids_chosen_by_sender(&rules);
        object.insert("prev_events".into(), self.references(self.prev_events, sender_chooses_id)?);
        object.insert("auth_events".into(), self.references(self.auth_events, sender_chooses_id)?);
        object.insert("depth".into(), canonical(self.depth)?);
        object.insert("origin_server_ts".into(), canonical(self.origin_server_ts)?);
        Ok((object, rules))
    }

    /// Builds, hashes and signs the event as `server`.
    pub fn sign(&self, server: &ServerName, key: &SigningKey) -> Result<SignedPdu, PduError> {
        let (mut object, rules) = self.fields()?;
        let chosen_id = if ids_chosen_by_sender(&rules) {
            let id = EventId::new_v1(server);
            object.insert("event_id".into(), canonical(&id)?);
            Some(id)
        } else {
            None
        };

        hash_and_sign_event(server.as_str(), key.key_pair(), &mut object, &rules.redaction)
            .map_err(signing_error)?;
        let size = CanonicalJsonValue::Object(object.clone()).to_string().len();
        if size > MAX_PDU_BYTES {
            return Err(PduError::TooLarge);
        }
        let event_id = match chosen_id {
            Some(id) => id,
            None => {
                let hash = reference_hash(&object, &rules).map_err(signing_error)?;
                EventId::parse(format!("${hash}")).map_err(|e| PduError::Json(e.to_string()))?
            }
        };
        Ok(SignedPdu { event_id, json: object })
    }

    /// `prev_events` or `auth_events` as the room version writes them: ids, or for versions 1
    /// and 2 `[id, hashes]` pairs.
    fn references(&self, ids: &[OwnedEventId], with_hashes: bool) -> Result<CanonicalJsonValue, PduError> {
        if !with_hashes {
            return canonical(ids);
        }
        let pairs = ids
            .iter()
            .map(|id| {
                let hashes = self
                    .reference_hashes
                    .get(id)
                    .cloned()
                    .ok_or_else(|| PduError::Json(format!("no hashes known for {id}")))?;
                Ok(CanonicalJsonValue::Array(vec![canonical(id)?, hashes]))
            })
            .collect::<Result<_, PduError>>()?;
        Ok(CanonicalJsonValue::Array(pairs))
    }
}

/// Hashes and signs an event another server filled in (a `make_join` template) as `server`, the
/// sender's: in room versions 1 and 2 this server also names it.
pub fn sign_template(
    mut template: CanonicalJsonObject,
    version: &RoomVersionId,
    server: &ServerName,
    key: &SigningKey,
) -> Result<SignedPdu, PduError> {
    let rules = rules(version)?;
    for field in ["hashes", "signatures", "unsigned", "event_id"] {
        template.remove(field);
    }
    if ids_chosen_by_sender(&rules) {
        template.insert("event_id".into(), canonical(EventId::new_v1(server))?);
    }
    hash_and_sign_event(server.as_str(), key.key_pair(), &mut template, &rules.redaction)
        .map_err(signing_error)?;
    let event_id = event_id_of(&template, version)?;
    Ok(SignedPdu { event_id, json: template })
}

/// Adds `server`'s signature to an event another server signed (an invite of this server's user
/// is signed by both); the other signatures stay.
pub fn add_signature(
    json: &mut CanonicalJsonObject,
    version: &RoomVersionId,
    server: &ServerName,
    key: &SigningKey,
) -> Result<(), PduError> {
    let rules = rules(version)?;
    hash_and_sign_event(server.as_str(), key.key_pair(), json, &rules.redaction).map_err(signing_error)
}

/// The event id of a PDU received from elsewhere: its reference hash, or in room versions 1 and
/// 2 the `event_id` it carries.
pub fn event_id_of(json: &CanonicalJsonObject, version: &RoomVersionId) -> Result<OwnedEventId, PduError> {
    let rules = rules(version)?;
    if ids_chosen_by_sender(&rules) {
        return match json.get("event_id") {
            Some(CanonicalJsonValue::String(id)) => {
                EventId::parse(id).map_err(|e| PduError::Json(e.to_string()))
            }
            _ => Err(PduError::Json("event without event_id".to_owned())),
        };
    }
    let hash = reference_hash(json, &rules).map_err(signing_error)?;
    EventId::parse(format!("${hash}")).map_err(|e| PduError::Json(e.to_string()))
}

/// Checks a PDU's signatures against the given keys (server name → key id → unpadded base64).
/// `Ok(true)` means the content hash matches too; `Ok(false)` that the event must be treated as
/// redacted (signatures fine, content altered).
pub fn verify(
    json: &CanonicalJsonObject,
    version: &RoomVersionId,
    keys: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<bool, PduError> {
    let rules = rules(version)?;
    let mut map = PublicKeyMap::new();
    for (server, server_keys) in keys {
        map.insert(server.clone(), crate::keys::public_key_set(server_keys).map_err(PduError::Signature)?);
    }
    match verify_event(&map, json, &rules).map_err(|e| PduError::Signature(e.to_string()))? {
        Verified::All => Ok(true),
        Verified::Signatures => Ok(false),
    }
}

/// The redacted form of an event under its room version's rules, as stored and served once a
/// redaction of it is accepted.
pub fn redacted(
    json: CanonicalJsonObject,
    version: &RoomVersionId,
    because: Option<RedactedBecause>,
) -> Result<CanonicalJsonObject, PduError> {
    redact(json, &rules(version)?.redaction, because).map_err(|e| PduError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use ruma::{owned_event_id, room_id, server_name, user_id};
    use serde_json::value::to_raw_value;

    use super::*;

    fn key() -> SigningKey {
        let dir = std::env::temp_dir().join(format!(
            "hearth-pdu-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        SigningKey::load_or_generate(&dir.join("signing.key")).unwrap()
    }

    fn keys_of(key: &SigningKey) -> BTreeMap<String, BTreeMap<String, String>> {
        BTreeMap::from([(
            "hearth.test".to_owned(),
            BTreeMap::from([(key.key_id(), key.public_key_base64())]),
        )])
    }

    fn message(version: &RoomVersionId, body: &str) -> (SigningKey, SignedPdu) {
        let key = key();
        let content = to_raw_value(&serde_json::json!({"msgtype": "m.text", "body": body})).unwrap();
        let prev = [owned_event_id!("$prev_event_in_the_room")];
        let auth = [owned_event_id!("$create"), owned_event_id!("$power"), owned_event_id!("$member")];
        let builder = PduBuilder {
            room_id: Some(room_id!("!room:hearth.test")),
            room_version: version,
            sender: user_id!("@alice:hearth.test"),
            event_type: "m.room.message",
            state_key: None,
            content: &content,
            prev_events: &prev,
            auth_events: &auth,
            reference_hashes: &BTreeMap::new(),
            depth: 7,
            origin_server_ts: MilliSecondsSinceUnixEpoch(1_700_000_000_000u64.try_into().unwrap()),
            redacts: None,
        };
        let pdu = builder.sign(server_name!("hearth.test"), &key).unwrap();
        (key, pdu)
    }

    #[test]
    fn signed_events_verify_and_their_id_is_their_reference_hash() {
        for version in SUPPORTED_ROOM_VERSIONS
            .iter()
            .filter(|v| !matches!(v, RoomVersionId::V1 | RoomVersionId::V2 | RoomVersionId::V3))
        {
            let (key, pdu) = message(version, "hello");
            let version = version.clone();
            assert!(pdu.event_id.as_str().starts_with('$'));
            assert!(!pdu.event_id.as_str().contains(['+', '/']), "URL-safe base64 since room v4");
            assert_eq!(event_id_of(&pdu.json, &version).unwrap(), pdu.event_id);
            assert!(verify(&pdu.json, &version, &keys_of(&key)).unwrap());
            for field in
                ["hashes", "signatures", "prev_events", "auth_events", "depth", "origin_server_ts", "sender"]
            {
                assert!(pdu.json.contains_key(field), "{field} in {version}");
            }
            assert!(!pdu.json.contains_key("event_id"), "room v3+ events carry no event_id");
        }
    }

    #[test]
    fn versions_1_and_2_carry_a_chosen_id_and_name_references_with_their_hashes() {
        let key = key();
        let content = to_raw_value(&serde_json::json!({"body": "old"})).unwrap();
        let prev = [owned_event_id!("$prev:hearth.test")];
        let hashes = CanonicalJsonValue::Object(
            [("sha256".to_owned(), CanonicalJsonValue::String("abc".to_owned()))].into_iter().collect(),
        );
        let refs = BTreeMap::from([(prev[0].clone(), hashes.clone())]);
        for version in [RoomVersionId::V1, RoomVersionId::V2] {
            let pdu = PduBuilder {
                room_id: Some(room_id!("!room:hearth.test")),
                room_version: &version,
                sender: user_id!("@alice:hearth.test"),
                event_type: "m.room.message",
                state_key: None,
                content: &content,
                prev_events: &prev,
                auth_events: &[],
                reference_hashes: &refs,
                depth: 2,
                origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
                redacts: None,
            }
            .sign(server_name!("hearth.test"), &key)
            .unwrap();
            assert_eq!(pdu.event_id.server_name().map(|s| s.as_str()), Some("hearth.test"));
            assert_eq!(event_id_of(&pdu.json, &version).unwrap(), pdu.event_id);
            assert_eq!(
                pdu.json.get("prev_events"),
                Some(&CanonicalJsonValue::Array(vec![CanonicalJsonValue::Array(vec![
                    CanonicalJsonValue::String(prev[0].to_string()),
                    hashes.clone()
                ])]))
            );
            assert!(verify(&pdu.json, &version, &keys_of(&key)).unwrap());
            let read = crate::auth::Pdu::from_json(pdu.event_id.clone(), &pdu.json).unwrap();
            assert_eq!(read.prev_events, prev.to_vec());
        }
        // Version 3 ids are the reference hash in standard base64.
        let (_, v3) = message(&RoomVersionId::V3, "hello");
        assert_eq!(event_id_of(&v3.json, &RoomVersionId::V3).unwrap(), v3.event_id);
        assert!(v3.event_id.server_name().is_none());
    }

    #[test]
    fn tampering_is_detected() {
        let version = RoomVersionId::V10;
        let (key, pdu) = message(&version, "hello");
        // Content changed: signatures hold (content is not signed directly) but the hash fails.
        let mut altered = pdu.json.clone();
        altered.insert("content".into(), canonical(serde_json::json!({"body": "evil"})).unwrap());
        assert!(!verify(&altered, &version, &keys_of(&key)).unwrap());
        // The id covers the content through `hashes`, so a swapped content keeps the id but fails
        // the hash: receivers treat such an event as redacted.
        assert_eq!(event_id_of(&altered, &version).unwrap(), pdu.event_id);
        // A signed field changed: the signature fails.
        let mut moved = pdu.json.clone();
        moved.insert("depth".into(), canonical(8u64).unwrap());
        assert!(verify(&moved, &version, &keys_of(&key)).is_err());
        // Another server's key does not verify it.
        assert!(verify(&pdu.json, &version, &keys_of(&self::key())).is_err());
    }

    #[test]
    fn redaction_keeps_the_event_verifiable() {
        let version = RoomVersionId::V11;
        let (key, pdu) = message(&version, "secret");
        let redacted = redacted(pdu.json.clone(), &version, None).unwrap();
        assert_eq!(redacted.get("content"), Some(&CanonicalJsonValue::Object(CanonicalJsonObject::new())));
        assert!(!verify(&redacted, &version, &keys_of(&key)).unwrap(), "hash no longer matches");
        assert_eq!(event_id_of(&redacted, &version).unwrap(), pdu.event_id, "same event after redaction");
    }

    #[test]
    fn limits() {
        let key = key();
        let big = to_raw_value(&serde_json::json!({"body": "x".repeat(MAX_PDU_BYTES)})).unwrap();
        let prev = [owned_event_id!("$p")];
        let no_refs = BTreeMap::new();
        let mut builder = PduBuilder {
            room_id: Some(room_id!("!room:hearth.test")),
            room_version: &RoomVersionId::V10,
            sender: user_id!("@alice:hearth.test"),
            event_type: "m.room.message",
            state_key: None,
            content: &big,
            prev_events: &prev,
            auth_events: &[],
            reference_hashes: &no_refs,
            depth: 1,
            origin_server_ts: MilliSecondsSinceUnixEpoch::now(),
            redacts: None,
        };
        assert!(matches!(builder.sign(server_name!("hearth.test"), &key), Err(PduError::TooLarge)));
        let not_object = to_raw_value(&serde_json::json!([1])).unwrap();
        builder.content = &not_object;
        assert!(matches!(builder.sign(server_name!("hearth.test"), &key), Err(PduError::ContentNotObject)));
        let many: Vec<OwnedEventId> = (0..21).map(|i| format!("$e{i}").try_into().unwrap()).collect();
        let small = to_raw_value(&serde_json::json!({})).unwrap();
        builder.content = &small;
        builder.prev_events = &many;
        assert!(matches!(
            builder.sign(server_name!("hearth.test"), &key),
            Err(PduError::TooManyReferences(_))
        ));
        let unknown = RoomVersionId::try_from("org.example.unknown").unwrap();
        builder.prev_events = &prev;
        builder.room_version = &unknown;
        assert!(matches!(
            builder.sign(server_name!("hearth.test"), &key),
            Err(PduError::UnsupportedRoomVersion(_))
        ));
        // Versions 1 and 2 name referenced events with their hashes, which must be known.
        builder.room_version = &RoomVersionId::V1;
        assert!(matches!(builder.sign(server_name!("hearth.test"), &key), Err(PduError::Json(_))));
        // A version 12 create event carries no room id; every other event needs one.
        builder.room_version = &RoomVersionId::V12;
        builder.event_type = "m.room.create";
        builder.state_key = Some("");
        assert!(builder.sign(server_name!("hearth.test"), &key).is_err());
        builder.room_id = None;
        let create = builder.sign(server_name!("hearth.test"), &key).unwrap();
        assert!(!create.json.contains_key("room_id"));
        builder.event_type = "m.room.message";
        builder.state_key = None;
        assert!(builder.sign(server_name!("hearth.test"), &key).is_err());
    }
}
