//! Events as clients see them: the client-server "ClientEvent" format, from stored PDUs.

use ruma::serde::Raw;
use serde_json::{Map, Value, json};

use crate::{
    error::{Error, Result},
    storage::{StoredEvent, now_ms},
};

/// The fields of a PDU a client sees.
const CLIENT_FIELDS: &[&str] =
    &["content", "origin_server_ts", "room_id", "sender", "type", "state_key", "redacts"];

/// A stored event in the client format, with `unsigned.age`.
pub fn to_client(event: &StoredEvent) -> Result<Value> {
    let pdu: Map<String, Value> = serde_json::from_str(&event.json).map_err(Error::internal)?;
    let mut out: Map<String, Value> =
        pdu.into_iter().filter(|(k, _)| CLIENT_FIELDS.contains(&k.as_str())).collect();
    out.insert("event_id".into(), event.event_id.clone().into());
    if !out.contains_key("redacts")
        && out.get("type").and_then(Value::as_str) == Some("m.room.redaction")
        && let Some(redacts) = out.get("content").and_then(|c| c.get("redacts")).cloned()
    {
        // Room version 11 moved `redacts` into the content; clients still look at the top too.
        out.insert("redacts".into(), redacts);
    }
    let ts = out.get("origin_server_ts").and_then(Value::as_i64).unwrap_or_default();
    let mut unsigned = json!({ "age": (now_ms() - ts).max(0) });
    if let Some(by) = &event.redacted_by {
        unsigned["redacted_because"] = json!({ "event_id": by, "type": "m.room.redaction" });
    }
    out.insert("unsigned".into(), unsigned);
    Ok(Value::Object(out))
}

/// Whether an event passes a room event filter's type and sender rules (`*` ends a type prefix).
pub fn matches_filter(filter: &ruma::api::client::filter::RoomEventFilter, event: &Value) -> bool {
    let kind = event["type"].as_str().unwrap_or_default();
    let sender = event["sender"].as_str().unwrap_or_default();
    let type_matches = |pattern: &String| match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => kind == pattern,
    };
    filter.types.as_ref().is_none_or(|types| types.iter().any(type_matches))
        && !filter.not_types.iter().any(type_matches)
        && filter.senders.as_ref().is_none_or(|senders| senders.iter().any(|s| s.as_str() == sender))
        && !filter.not_senders.iter().any(|s| s.as_str() == sender)
}

/// Any JSON value as one of ruma's raw event types.
pub fn raw<T>(value: &Value) -> Result<Raw<T>> {
    serde_json::value::to_raw_value(value).map(Raw::from_json).map_err(Error::internal)
}

/// Stored events in the client format, as raw events.
pub fn raws<T>(events: &[StoredEvent]) -> Result<Vec<Raw<T>>> {
    events.iter().map(|e| raw(&to_client(e)?)).collect()
}
