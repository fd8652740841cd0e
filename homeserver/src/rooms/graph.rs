//! Walks over a room's event graph, as other servers ask for it: the auth chain of events
//! (`send_join`, `state`, `event_auth`), history back from some events (`backfill`), and the
//! events between what a server has and what it was sent (`get_missing_events`).
//!
//! Each walk reads the references events carry (`prev_events`, `auth_events`), so it follows
//! the graph as the events say, whatever order they were stored in.

use std::collections::{BTreeSet, HashSet};

use crate::{error::Result, state::AppState, storage::StoredEvent};

/// The most events one walk returns.
pub const MAX_WALK: usize = 100;

/// What a walk reads of an event.
#[derive(serde::Deserialize)]
struct Links {
    #[serde(default)]
    prev_events: Vec<serde_json::Value>,
    #[serde(default)]
    auth_events: Vec<serde_json::Value>,
    #[serde(default)]
    depth: i64,
}

impl Links {
    fn of(event: &StoredEvent) -> Self {
        serde_json::from_str(&event.json).unwrap_or(Self {
            prev_events: vec![],
            auth_events: vec![],
            depth: 0,
        })
    }
}

/// The ids in `prev_events` or `auth_events` (in room versions 1 and 2, the first of each pair).
fn ids(references: Vec<serde_json::Value>) -> impl Iterator<Item = String> {
    references.into_iter().filter_map(|reference| match reference {
        serde_json::Value::String(id) => Some(id),
        serde_json::Value::Array(mut pair) if !pair.is_empty() => match pair.swap_remove(0) {
            serde_json::Value::String(id) => Some(id),
            _ => None,
        },
        _ => None,
    })
}

/// The stored events of `ids` that are of `room_id`.
async fn load(state: &AppState, room_id: &str, ids: &[String]) -> Result<Vec<StoredEvent>> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    Ok(state.store.events_by_id(&ids).await?.into_iter().filter(|event| event.room_id == room_id).collect())
}

/// Every event that authorises `events`, their auth events' auth events and so on (the events
/// themselves left out unless one authorises another), oldest first.
pub async fn auth_chain(state: &AppState, events: &[StoredEvent]) -> Result<Vec<StoredEvent>> {
    let Some(room_id) = events.first().map(|event| event.room_id.clone()) else { return Ok(Vec::new()) };
    let mut seen: HashSet<String> = HashSet::new();
    let mut chain = Vec::new();
    let mut wanted: Vec<String> = events.iter().flat_map(|event| ids(Links::of(event).auth_events)).collect();
    while !wanted.is_empty() {
        wanted.retain(|id| seen.insert(id.clone()));
        let found = load(state, &room_id, &wanted).await?;
        wanted = found.iter().flat_map(|event| ids(Links::of(event).auth_events)).collect();
        chain.extend(found);
    }
    chain.sort_by_key(|event| event.stream_ordering);
    Ok(chain)
}

/// Up to `limit` events of `room_id` from `from` (included) back through `prev_events`, the
/// deepest first, none below `min_depth` and none of `stop_at` (or what only they lead to).
pub async fn walk_back(
    state: &AppState,
    room_id: &str,
    from: &[String],
    stop_at: &BTreeSet<String>,
    min_depth: i64,
    limit: usize,
) -> Result<Vec<StoredEvent>> {
    let limit = limit.min(MAX_WALK);
    let mut seen: HashSet<String> = stop_at.iter().cloned().collect();
    // The frontier, deepest first: events are taken in depth order, as a server paginating
    // backwards wants them.
    let mut frontier: Vec<(i64, StoredEvent)> = Vec::new();
    let mut wanted: Vec<String> = from.iter().filter(|id| seen.insert((*id).clone())).cloned().collect();
    let mut taken = Vec::new();
    loop {
        for event in load(state, room_id, &wanted).await? {
            let depth = Links::of(&event).depth;
            if depth >= min_depth {
                frontier.push((depth, event));
            }
        }
        frontier.sort_by_key(|(depth, event)| (*depth, event.stream_ordering));
        let Some((_, event)) = frontier.pop() else { break };
        if taken.len() >= limit {
            break;
        }
        wanted = ids(Links::of(&event).prev_events).filter(|id| seen.insert(id.clone())).collect();
        taken.push(event);
    }
    Ok(taken)
}

/// The events `event` follows.
pub fn prev_events(event: &StoredEvent) -> Vec<String> {
    ids(Links::of(event).prev_events).collect()
}
