//! Events as clients see them: the client-server "ClientEvent" format, from stored PDUs.
//!
//! A stored event is read by its top-level fields only; every value below them (`content` above
//! all) stays the raw JSON text it was stored as and is served byte for byte. Nothing on the read
//! path rebuilds an event as a recursive structure, so how deeply a sender nested its content
//! cannot make an event, or a room, unservable (serde_json skips a raw value iteratively, with
//! no recursion limit).

use std::collections::{BTreeMap, HashMap};

use ruma::{DeviceId, UserId, serde::Raw};
use serde::de::DeserializeOwned;
use serde_json::{Value, json, value::RawValue};

use crate::{
    error::{Error, Result},
    state::AppState,
    storage::{StoredEvent, now_ms},
};

/// The fields of a PDU a client sees, besides `room_id` and `event_id` (which come from the
/// stored row: a version 12 create event names no room).
const CLIENT_FIELDS: &[&str] = &["content", "origin_server_ts", "sender", "type", "state_key", "redacts"];

/// A stored event seen through its top-level fields.
#[derive(Debug)]
pub struct ClientEvent<'a> {
    stored: &'a StoredEvent,
    fields: BTreeMap<String, Box<RawValue>>,
}

impl<'a> ClientEvent<'a> {
    pub fn parse(stored: &'a StoredEvent) -> Result<Self> {
        let fields = serde_json::from_str(&stored.json).map_err(Error::internal)?;
        Ok(Self { stored, fields })
    }

    /// One top-level field, if present and of type `T`.
    fn field<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.fields.get(name).and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    pub fn kind(&self) -> String {
        self.field("type").unwrap_or_default()
    }

    pub fn sender(&self) -> String {
        self.field("sender").unwrap_or_default()
    }

    pub fn state_key(&self) -> Option<String> {
        self.field("state_key")
    }

    pub fn is_state(&self, kind: &str, state_key: &str) -> bool {
        self.state_key().as_deref() == Some(state_key) && self.kind() == kind
    }

    /// The content as stored (`{}` if the event has none).
    pub fn content(&self) -> &RawValue {
        self.fields.get("content").map_or_else(|| empty_object(), |raw| &**raw)
    }

    /// A string field of the content (`content.membership`, `content.name`, …).
    pub fn content_str(&self, key: &str) -> Option<String> {
        let content: BTreeMap<String, Box<RawValue>> = serde_json::from_str(self.content().get()).ok()?;
        content.get(key).and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// The whole content as a JSON value, for the few callers that edit or inspect it deeply
    /// (power levels, a member event re-sent with a new profile). Stored JSON is bounded in depth
    /// (see [`crate::storage::parse_stored`]).
    pub fn content_value(&self) -> Result<Value> {
        crate::storage::parse_stored(self.content().get()).map_err(Error::internal)
    }

    /// The event in the client format, with `unsigned`, as JSON text.
    pub fn to_json(&self) -> Result<Box<RawValue>> {
        self.to_json_with(&Unsigned::default())
    }

    /// The event in the client format, with `extra` in its `unsigned`, as JSON text.
    fn to_json_with(&self, extra: &Unsigned<'_>) -> Result<Box<RawValue>> {
        self.serialize(extra, false)
    }

    /// The event in the client format, or with every field of the stored PDU (`federation`: the
    /// filters' `event_format: federation`: `prev_events`, `auth_events`, `depth`, `hashes`,
    /// `signatures` and the rest), with `extra` in its `unsigned`.
    fn serialize(&self, extra: &Unsigned<'_>, federation: bool) -> Result<Box<RawValue>> {
        let mut out = String::with_capacity(self.stored.json.len() + 96);
        out.push('{');
        for (name, raw) in &self.fields {
            let served = match federation {
                // `room_id` and `event_id` come from the row, `unsigned` is the reader's.
                true => !matches!(name.as_str(), "room_id" | "event_id" | "unsigned"),
                false => CLIENT_FIELDS.contains(&name.as_str()),
            };
            if served {
                let value = match extra.expired && name == "content" {
                    true => "{}",
                    false => raw.get(),
                };
                push_field(&mut out, name, value);
            }
        }
        for (name, value) in [("room_id", &self.stored.room_id), ("event_id", &self.stored.event_id)] {
            push_field(&mut out, name, &serde_json::to_string(value).map_err(Error::internal)?);
        }
        if !federation
            && !self.fields.contains_key("redacts")
            && self.kind() == "m.room.redaction"
            && let Some(redacts) = self.content_str("redacts")
        {
            // Room version 11 moved `redacts` into the content; clients still look at the top too.
            push_field(&mut out, "redacts", &serde_json::to_string(&redacts).map_err(Error::internal)?);
        }
        let ts: i64 = self.field("origin_server_ts").unwrap_or_default();
        let mut unsigned = json!({ "age": now_ms().saturating_sub(ts).max(0) });
        if let Some(by) = &self.stored.redacted_by {
            unsigned["redacted_because"] = json!({ "event_id": by, "type": "m.room.redaction" });
        }
        if let Some(txn) = extra.transaction_id {
            unsigned["transaction_id"] = txn.into();
        }
        let mut unsigned = unsigned.to_string();
        if let Some(replaced) = extra.replaced {
            // The content replaced is spliced in as stored, never re-parsed.
            let replaced = ClientEvent::parse(replaced)?;
            unsigned.pop();
            for (name, value) in [
                (
                    "replaces_state",
                    serde_json::to_string(&replaced.stored.event_id).map_err(Error::internal)?,
                ),
                ("prev_sender", serde_json::to_string(&replaced.sender()).map_err(Error::internal)?),
                ("prev_content", replaced.content().get().to_owned()),
            ] {
                unsigned.push_str(&format!(",\"{name}\":{value}"));
            }
            unsigned.push('}');
        }
        push_field(&mut out, "unsigned", &unsigned);
        out.push('}');
        RawValue::from_string(out).map_err(Error::internal)
    }

    pub fn to_raw<T>(&self) -> Result<Raw<T>> {
        self.to_json().map(Raw::from_json)
    }

    /// The stripped state event shown to invitees: type, state key, content and sender.
    pub fn stripped<T>(&self) -> Result<Raw<T>> {
        let mut out = String::from("{");
        for name in ["type", "state_key", "content", "sender"] {
            if let Some(raw) = self.fields.get(name) {
                push_field(&mut out, name, raw.get());
            }
        }
        out.push('}');
        RawValue::from_string(out).map(Raw::from_json).map_err(Error::internal)
    }
}

fn push_field(out: &mut String, name: &str, json: &str) {
    if out.len() > 1 {
        out.push(',');
    }
    out.push('"');
    out.push_str(name);
    out.push_str("\":");
    out.push_str(json);
}

fn empty_object() -> &'static RawValue {
    static EMPTY: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable!()))
}

/// Whether an event passes a room event filter's type and sender rules (`*` ends a type prefix).
pub fn matches_filter(filter: &ruma::api::client::filter::RoomEventFilter, event: &ClientEvent<'_>) -> bool {
    let sender = event.sender();
    type_allowed(&filter.types, &filter.not_types, &event.kind())
        && filter.senders.as_ref().is_none_or(|senders| senders.iter().any(|s| s.as_str() == sender))
        && !filter.not_senders.iter().any(|s| s.as_str() == sender)
}

/// Whether a filter's `types` and `not_types` let an event type through (`*` ends a prefix;
/// `not_types` wins).
pub fn type_allowed(types: &Option<Vec<String>>, not_types: &[String], kind: &str) -> bool {
    let matches = |pattern: &String| match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => kind == pattern,
    };
    types.as_ref().is_none_or(|types| types.iter().any(matches)) && !not_types.iter().any(matches)
}

/// Any JSON value as one of ruma's raw event types.
pub fn raw<T>(value: &Value) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value).map(Raw::from_json).map_err(Error::internal)
}

/// What a reader's view of an event adds to its `unsigned` besides its age.
#[derive(Debug, Default)]
struct Unsigned<'a> {
    /// The reader's own transaction id, when the reader's device sent the event.
    transaction_id: Option<&'a str>,
    /// The state event this one replaced, as stored now (redacted if it was).
    replaced: Option<&'a StoredEvent>,
    /// A self-destructed message not yet pruned where it was read from: served with `{}` as its
    /// content (see [`crate::rooms::expiry`]).
    expired: bool,
}

/// Who reads events: a user, and the device whose transaction ids they see.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    pub user: &'a UserId,
    pub device: &'a DeviceId,
    /// Serve events in the federation format (a sync filter's `event_format`).
    pub federation_format: bool,
}

/// Events in the client format as `reader` sees them: `unsigned.transaction_id` on those its
/// device sent, and on state events that replaced others `replaces_state`, `prev_content` and
/// `prev_sender` (the replaced events read in one query).
pub async fn serve<T>(state: &AppState, events: &[StoredEvent], reader: Reader<'_>) -> Result<Vec<Raw<T>>> {
    let wanted: Vec<&str> = events.iter().filter_map(|e| e.replaces_state.as_deref()).collect();
    let replaced: HashMap<String, StoredEvent> = match wanted.is_empty() {
        true => HashMap::new(),
        false => {
            state.store.events_by_id(&wanted).await?.into_iter().map(|e| (e.event_id.clone(), e)).collect()
        }
    };
    let (expiring, now) = (state.config.rooms.self_destructing_messages, now_ms());
    events
        .iter()
        .map(|event| {
            let client = ClientEvent::parse(event)?;
            let expired = expiring && super::expiry::is_due(&client, now);
            let transaction_id = event
                .txn
                .as_ref()
                .filter(|(device, _)| {
                    device == reader.device.as_str() && client.sender() == reader.user.as_str()
                })
                .map(|(_, txn)| txn.as_str());
            let replaced = event.replaces_state.as_ref().and_then(|id| replaced.get(id));
            client
                .serialize(&Unsigned { transaction_id, replaced, expired }, reader.federation_format)
                .map(Raw::from_json)
        })
        .collect()
}

/// One event in the client format as `reader` sees it (see [`serve`]).
pub async fn serve_one<T>(state: &AppState, event: &StoredEvent, reader: Reader<'_>) -> Result<Raw<T>> {
    let mut served = serve(state, std::slice::from_ref(event), reader).await?;
    served.pop().ok_or_else(|| Error::internal("no event served"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::{Value, value::RawValue};

    use super::*;
    use crate::json::arbitrary::*;

    /// A timestamp as stored, or not: any integer (the extremes too), or another type.
    fn timestamp() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), Just(-1), Just(0)].prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => scalar(),
        ]
    }

    /// A stored event: an object with some of the fields of a PDU, whatever their values, and
    /// others; its content nested deeper than serde_json's recursion limit at times.
    fn stored_object() -> impl Strategy<Value = serde_json::Map<String, Value>> {
        let content = prop_oneof![4 => deep_value(140), 1 => scalar()];
        let kind = prop_oneof![
            Just(Value::from("m.room.redaction")),
            Just(Value::from("m.room.message")),
            scalar(),
        ];
        (
            prop::option::weighted(0.9, content),
            prop::option::of(kind),
            prop::option::of(timestamp()),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "state_key",
                        "redacts",
                        "sender",
                        "room_id",
                        "unsigned",
                        "event_id",
                    ]),
                    value(),
                ),
                0..4,
            ),
            prop::collection::vec((tricky_string(), value()), 0..3),
        )
            .prop_map(|(content, kind, ts, fields, others)| {
                let mut object: serde_json::Map<String, Value> = others.into_iter().collect();
                object.extend(fields.into_iter().map(|(name, value)| (name.to_owned(), value)));
                for (name, value) in [("content", content), ("type", kind), ("origin_server_ts", ts)] {
                    if let Some(value) = value {
                        object.insert(name.to_owned(), value);
                    }
                }
                object
            })
    }

    /// Parses JSON text as clients without a recursion limit do.
    fn parse_unbounded(text: &str) -> serde_json::Result<Value> {
        crate::storage::parse_stored(text)
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn a_stored_event_is_served_as_valid_json_with_its_content_byte_for_byte(
            object in stored_object(),
            style in style(),
            event_id in tricky_string(),
            redacted_by in prop::option::of(tricky_string()),
        ) {
            let json = write(&Value::Object(object), style);
            let stored = StoredEvent { stream_ordering: 1, event_id, room_id: "!r:h".to_owned(), json, redacted_by, replaces_state: None, txn: None, outlier: false };
            let event = ClientEvent::parse(&stored).unwrap();
            let served = event.to_json().unwrap();
            let parsed = parse_unbounded(served.get());
            prop_assert!(parsed.is_ok(), "not JSON: {}", served.get());
            let fields = |text: &str| serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(text).unwrap();
            let (before, after) = (fields(&stored.json), fields(served.get()));
            prop_assert_eq!(
                before.get("content").map(|raw| raw.get()),
                after.get("content").map(|raw| raw.get()),
                "content changed"
            );
            let event_id = serde_json::to_string(&stored.event_id).unwrap();
            prop_assert_eq!(after.get("event_id").map(|raw| raw.get()), Some(event_id.as_str()));
            let age = &parsed.unwrap()["unsigned"]["age"];
            prop_assert!(age.as_i64().is_some_and(|age| age >= 0), "age {}", age);
            prop_assert!(event.stripped::<Value>().is_ok());
        }

        #[test]
        fn parsing_any_stored_text_never_panics(text in "(?s).{0,80}", bytes in prop::collection::vec(json_byte(), 0..80)) {
            for json in [text, String::from_utf8_lossy(&bytes).into_owned()] {
                let stored = StoredEvent { stream_ordering: 1, event_id: "$e".to_owned(), room_id: "!r:h".to_owned(), json, redacted_by: None, replaces_state: None, txn: None, outlier: false };
                if let Ok(event) = ClientEvent::parse(&stored) {
                    let _ = (event.kind(), event.sender(), event.state_key(), event.content_str("membership"));
                    prop_assert!(event.to_json().is_ok());
                }
            }
        }
    }
}
