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

/// Room versions Hearth creates and joins.
pub const SUPPORTED_ROOM_VERSIONS: &[RoomVersionId] = &[RoomVersionId::V10, RoomVersionId::V11];

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
    pub room_id: &'a RoomId,
    pub room_version: &'a RoomVersionId,
    pub sender: &'a UserId,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: &'a RawValue,
    /// The room's forward extremities when the event is made.
    pub prev_events: &'a [OwnedEventId],
    /// The state events that authorise it (create, power levels, the sender's membership, …).
    pub auth_events: &'a [OwnedEventId],
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
    /// Builds, hashes and signs the event as `server`.
    pub fn sign(&self, server: &ServerName, key: &SigningKey) -> Result<SignedPdu, PduError> {
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
        let mut object = CanonicalJsonObject::new();
        object.insert("room_id".into(), canonical(self.room_id)?);
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
        object.insert("prev_events".into(), canonical(self.prev_events)?);
        object.insert("auth_events".into(), canonical(self.auth_events)?);
        object.insert("depth".into(), canonical(self.depth)?);
        object.insert("origin_server_ts".into(), canonical(self.origin_server_ts)?);

        hash_and_sign_event(server.as_str(), key.key_pair(), &mut object, &rules.redaction)
            .map_err(signing_error)?;
        let size = CanonicalJsonValue::Object(object.clone()).to_string().len();
        if size > MAX_PDU_BYTES {
            return Err(PduError::TooLarge);
        }
        let hash = reference_hash(&object, &rules).map_err(signing_error)?;
        let event_id = EventId::parse(format!("${hash}")).map_err(|e| PduError::Json(e.to_string()))?;
        Ok(SignedPdu { event_id, json: object })
    }
}

/// The event id of a PDU received from elsewhere (room versions 3 and later: its reference hash).
pub fn event_id_of(json: &CanonicalJsonObject, version: &RoomVersionId) -> Result<OwnedEventId, PduError> {
    let hash = reference_hash(json, &rules(version)?).map_err(signing_error)?;
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
        let set = server_keys
            .iter()
            .map(|(id, key)| {
                ruma::serde::Base64::parse(key)
                    .map(|key| (id.clone(), key))
                    .map_err(|e| PduError::Signature(format!("bad key {id}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        map.insert(server.clone(), set);
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
            room_id: room_id!("!room:hearth.test"),
            room_version: version,
            sender: user_id!("@alice:hearth.test"),
            event_type: "m.room.message",
            state_key: None,
            content: &content,
            prev_events: &prev,
            auth_events: &auth,
            depth: 7,
            origin_server_ts: MilliSecondsSinceUnixEpoch(1_700_000_000_000u64.try_into().unwrap()),
            redacts: None,
        };
        let pdu = builder.sign(server_name!("hearth.test"), &key).unwrap();
        (key, pdu)
    }

    #[test]
    fn signed_events_verify_and_their_id_is_their_reference_hash() {
        for version in [RoomVersionId::V10, RoomVersionId::V11] {
            let (key, pdu) = message(&version, "hello");
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
        let mut builder = PduBuilder {
            room_id: room_id!("!room:hearth.test"),
            room_version: &RoomVersionId::V10,
            sender: user_id!("@alice:hearth.test"),
            event_type: "m.room.message",
            state_key: None,
            content: &big,
            prev_events: &prev,
            auth_events: &[],
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
        let v1 = RoomVersionId::V1;
        builder.prev_events = &prev;
        builder.room_version = &v1;
        assert!(matches!(
            builder.sign(server_name!("hearth.test"), &key),
            Err(PduError::UnsupportedRoomVersion(_))
        ));
    }
}
