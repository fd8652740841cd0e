//! State snapshots (state groups): the room state after an event, stored as a delta from an
//! earlier snapshot so that a state event in a room of 10,000 members costs a row of one entry,
//! not a copy of 10,000.
//!
//! A snapshot row holds either the whole map (`prev_snapshot` NULL) or the entries that differ
//! from `prev_snapshot` (an event id, or null where a key is gone). Reading one follows its chain
//! down to a whole map in one recursive query; a chain never grows past [`MAX_DELTA_CHAIN`], so a
//! read applies a bounded number of deltas. Rows are written once and never change, which is what
//! lets every worker cache them (see `ImmutableCache`).

use std::sync::Arc;

use ruma::RoomId;
use sqlx::Row;

use super::{StoreError, StoreResult, rooms::StateMap};

/// How many deltas may lie between a snapshot and the whole map under it. Past it a write stores
/// the whole map again, so a read costs one whole map and at most this many small rows.
const MAX_DELTA_CHAIN: usize = 100;

/// A state snapshot as held in memory.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: i64,
    /// How many deltas lie between this snapshot and the whole map it builds on.
    pub chain: usize,
    pub state: Arc<StateMap>,
}

/// Entries that differ between two maps: `(event_type, state_key, event id or None if gone)`.
pub type Delta = Vec<(String, String, Option<String>)>;

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// What turns `base` into `new`.
pub fn delta_between(base: &StateMap, new: &StateMap) -> Delta {
    let mut delta: Delta = new
        .iter()
        .filter(|(key, id)| base.get(*key) != Some(*id))
        .map(|((t, k), id)| (t.clone(), k.clone(), Some(id.clone())))
        .collect();
    delta
        .extend(base.keys().filter(|key| !new.contains_key(*key)).map(|(t, k)| (t.clone(), k.clone(), None)));
    delta
}

/// Stores `state` as snapshot `id`: as `delta` from `base` while that keeps the chain short and
/// the delta has under half as many entries as the map, else whole. `delta` must be what turns
/// `base`'s map into `state`.
pub async fn write(
    conn: &mut sqlx::AnyConnection,
    room_id: &RoomId,
    id: i64,
    base: Option<(i64, usize)>,
    state: Arc<StateMap>,
    delta: Delta,
) -> StoreResult<Snapshot> {
    let as_delta = base.filter(|(_, chain)| *chain < MAX_DELTA_CHAIN && delta.len() * 2 < state.len());
    let (prev, chain, text) = match as_delta {
        Some((prev, chain)) => (Some(prev), chain + 1, serde_json::to_string(&delta).map_err(corrupt)?),
        None => {
            let whole: Vec<[&str; 3]> =
                state.iter().map(|((t, k), event)| [t.as_str(), k.as_str(), event.as_str()]).collect();
            (None, 0, serde_json::to_string(&whole).map_err(corrupt)?)
        }
    };
    sqlx::query(
        "INSERT INTO state_snapshots (snapshot_id, room_id, state, prev_snapshot) VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(room_id.as_str())
    .bind(text)
    .bind(prev)
    .execute(conn)
    .await?;
    Ok(Snapshot { id, chain, state })
}

/// Reads snapshot `id`, its chain applied.
pub async fn read(conn: &mut sqlx::AnyConnection, id: i64) -> StoreResult<Snapshot> {
    // From the snapshot down to its whole map; applied from the bottom up.
    let rows = sqlx::query(
        "WITH RECURSIVE chain (snapshot_id, prev_snapshot, state, n) AS (
             SELECT snapshot_id, prev_snapshot, state, 0 FROM state_snapshots WHERE snapshot_id = $1
             UNION ALL
             SELECT s.snapshot_id, s.prev_snapshot, s.state, c.n + 1
             FROM state_snapshots s JOIN chain c ON s.snapshot_id = c.prev_snapshot
         )
         SELECT prev_snapshot, state FROM chain ORDER BY n DESC",
    )
    .bind(id)
    .fetch_all(conn)
    .await?;
    let (Some(bottom), chain) = (rows.first(), rows.len().saturating_sub(1)) else {
        return Err(corrupt(format!("state snapshot {id} missing")));
    };
    if bottom.try_get::<Option<i64>, _>("prev_snapshot")?.is_some() {
        return Err(corrupt(format!("the chain of state snapshot {id} is broken")));
    }
    let mut state = StateMap::new();
    for row in &rows {
        let entries: Delta = serde_json::from_str(&row.try_get::<String, _>("state")?).map_err(corrupt)?;
        for (event_type, state_key, event_id) in entries {
            match event_id {
                Some(event_id) => state.insert((event_type, state_key), event_id),
                None => state.remove(&(event_type, state_key)),
            };
        }
    }
    Ok(Snapshot { id, chain, state: Arc::new(state) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str, &str)]) -> StateMap {
        entries.iter().map(|(t, k, id)| ((t.to_string(), k.to_string()), id.to_string())).collect()
    }

    #[test]
    fn delta_between_lists_changed_added_and_removed_keys() {
        let base =
            map(&[("m.room.create", "", "$c"), ("m.room.member", "@a:x", "$a1"), ("m.room.name", "", "$n")]);
        let new =
            map(&[("m.room.create", "", "$c"), ("m.room.member", "@a:x", "$a2"), ("m.room.topic", "", "$t")]);
        let mut delta = delta_between(&base, &new);
        delta.sort();
        assert_eq!(
            delta,
            vec![
                ("m.room.member".into(), "@a:x".into(), Some("$a2".into())),
                ("m.room.name".into(), "".into(), None),
                ("m.room.topic".into(), "".into(), Some("$t".into())),
            ]
        );
    }
}
