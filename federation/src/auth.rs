//! Authorisation of events against room state: the spec's auth rules, run by ruma's state-res.

use std::collections::HashMap;

use ruma::{
    CanonicalJsonObject, EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId,
    RoomVersionId, UserId,
    events::{StateEventType, TimelineEventType},
    state_res::{self, Event},
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::pdu::{PduError, rules};

/// An event as the auth rules see it, read from its stored canonical JSON.
#[derive(Debug, Clone, Deserialize)]
pub struct Pdu {
    #[serde(skip_deserializing, default = "placeholder_id")]
    pub event_id: OwnedEventId,
    /// Absent from the create event of room versions whose room id is that event's hash.
    #[serde(default)]
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    #[serde(default)]
    pub state_key: Option<String>,
    #[serde(default, deserialize_with = "references")]
    pub prev_events: Vec<OwnedEventId>,
    #[serde(default, deserialize_with = "references")]
    pub auth_events: Vec<OwnedEventId>,
    #[serde(default)]
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
}

/// Event references as any room version writes them: ids, or `[id, hashes]` pairs (versions 1
/// and 2).
fn references<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<OwnedEventId>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Reference {
        Id(OwnedEventId),
        WithHashes(OwnedEventId, serde::de::IgnoredAny),
    }
    let references = Vec::<Reference>::deserialize(deserializer)?;
    Ok(references
        .into_iter()
        .map(|reference| match reference {
            Reference::Id(id) | Reference::WithHashes(id, _) => id,
        })
        .collect())
}

fn placeholder_id() -> OwnedEventId {
    ruma::owned_event_id!("$placeholder")
}

impl Pdu {
    /// Reads a PDU whose id is known (its reference hash, computed when it was built or received).
    pub fn from_json(event_id: OwnedEventId, json: &CanonicalJsonObject) -> Result<Self, PduError> {
        let text = ruma::CanonicalJsonValue::Object(json.clone()).to_string();
        let mut pdu: Pdu = serde_json::from_str(&text).map_err(|e| PduError::Json(e.to_string()))?;
        pdu.event_id = event_id;
        if pdu.redacts.is_none() {
            // Room version 11 keeps `redacts` in the content.
            #[derive(Deserialize)]
            struct Redacts {
                redacts: Option<OwnedEventId>,
            }
            if let Ok(Redacts { redacts: Some(id) }) = serde_json::from_str(pdu.content.get()) {
                pdu.redacts = Some(id);
            }
        }
        Ok(pdu)
    }
}

impl Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }

    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }

    fn sender(&self) -> &UserId {
        &self.sender
    }

    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }

    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }

    fn content(&self) -> &RawValue {
        &self.content
    }

    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }

    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }

    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }

    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }

    fn rejected(&self) -> bool {
        false
    }
}

/// Which state an event of this kind is authorised by: `(type, state_key)` pairs.
pub fn auth_types(
    version: &RoomVersionId,
    kind: &TimelineEventType,
    sender: &UserId,
    state_key: Option<&str>,
    content: &RawValue,
) -> Result<Vec<(StateEventType, String)>, PduError> {
    state_res::auth_types_for_event(kind, sender, state_key, content, &rules(version)?.authorization)
        .map_err(PduError::Json)
}

/// Checks an event against the auth rules, given the events it names as `auth_events` and the
/// room state it would apply to (`state`: `(type, state_key)` → event).
pub fn check(
    version: &RoomVersionId,
    event: &Pdu,
    auth_events: &HashMap<OwnedEventId, Pdu>,
    state: &HashMap<(StateEventType, String), Pdu>,
) -> Result<(), String> {
    let rules = rules(version).map_err(|e| e.to_string())?;
    let fetch_event = |id: &EventId| auth_events.get(id).cloned();
    state_res::check_state_independent_auth_rules(&rules.authorization, event, fetch_event)?;
    let fetch_state = |kind: &StateEventType, key: &str| state.get(&(kind.clone(), key.to_owned())).cloned();
    state_res::check_state_dependent_auth_rules(&rules.authorization, event, fetch_state)
}
