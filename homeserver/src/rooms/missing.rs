//! Events another server sends that this server cannot check yet, because it lacks events they
//! follow or name as auth events (it was down, the sender lost its queue, or the room's history
//! forked long ago): what is lacking is asked of the server that sent the event.
//!
//! - Events it follows: the events in between, with `get_missing_events` (between the room's
//!   newest events here and the new one, at most [`MAX_MISSING`]), taken oldest first through
//!   the checks every event from another server goes through ([`remote::take`]).
//! - Events the oldest of those follow that are still lacking (a longer gap): the room's state
//!   at each of them, with `state_ids` ([`fetched::state_at`]), so that the event can be checked
//!   against the state they resolve to, as Synapse does. The gap itself stays: `/messages`
//!   shows the history here from both sides of it. The event that was sent (pushed) is never
//!   taken on the strength of a state its sender gives: if the events it follows cannot be
//!   had, it is refused (as Synapse does: it could become the room's only newest event, with a
//!   state its sender made up).
//! - Auth events: the event's auth chain, with `event_auth` ([`fetched::auth_chain`]).

use ruma::{
    CanonicalJsonObject, OwnedEventId, RoomId, RoomVersionId, ServerName, UInt,
    api::federation::event::get_missing_events,
};

use super::{
    fetched,
    remote::{self, Refused},
};
use crate::{state::AppState, storage::StoredEvent};

/// The most events fetched to fill one gap.
pub const MAX_MISSING: u32 = 20;
/// The most events whose state is fetched for one event (an event follows at most 20).
const MAX_STATES: usize = 10;

/// Takes an event `origin` sent, first fetching from it what this server lacks to check it (see
/// the module's comment). Events taken on the way are made seen; the event itself is the
/// caller's to make seen, as with [`remote::take`].
pub async fn take_from(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    json: CanonicalJsonObject,
) -> Result<StoredEvent, Refused> {
    let mut taken = remote::take(state, room_id, version, json.clone()).await;
    if let Err(Refused::Missing { prev, .. }) = &taken
        && !prev.is_empty()
    {
        let event_id = remote::checked_id(&json, version)?;
        fill(state, origin, room_id, version, &event_id).await?;
        taken = remote::take(state, room_id, version, json.clone()).await;
    }
    take_filling(state, origin, room_id, version, json, taken, false).await
}

/// What came of taking an event (`taken`); if it lacked something, taken again once the auth
/// events it names that this server lacks are fetched, and with `with_states` (an event this
/// server asked for) the state at the events it follows that it lacks.
async fn take_filling(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    json: CanonicalJsonObject,
    taken: Result<StoredEvent, Refused>,
    with_states: bool,
) -> Result<StoredEvent, Refused> {
    let (prev, auth) = match taken {
        Err(Refused::Missing { prev, auth }) => (prev, auth),
        taken => return taken,
    };
    let states = if with_states { prev.len().min(MAX_STATES) } else { 0 };
    if auth.is_empty() && states == 0 {
        return Err(Refused::Missing { prev, auth });
    }
    let event_id = remote::checked_id(&json, version)?;
    if !auth.is_empty() {
        fetched::auth_chain(state, origin, room_id, version, &event_id).await?;
    }
    for at in &prev[..states] {
        fetched::state_at(state, origin, room_id, version, at).await?;
    }
    remote::take(state, room_id, version, json).await
}

/// Fetches from `origin` the events between this server's newest events of `room_id` and
/// `latest` (an event `origin` sent whose prev events are unknown here), and takes those that
/// pass the checks. Returns how many were taken.
async fn fill(
    state: &AppState,
    origin: &ServerName,
    room_id: &RoomId,
    version: &RoomVersionId,
    latest: &OwnedEventId,
) -> Result<usize, Refused> {
    let Some(head) = state.store.room_head(room_id, &[], false).await? else { return Ok(0) };
    let mut request =
        get_missing_events::v1::Request::new(room_id.to_owned(), head.extremities, vec![latest.clone()]);
    request.limit = UInt::from(MAX_MISSING);
    let Some(answer) = fetched::ask(state, origin, request, "missing events").await? else { return Ok(0) };
    // Each with its depth, to be taken oldest first: an event's prev events before it.
    let mut fetched: Vec<(u64, CanonicalJsonObject)> = Vec::new();
    for raw in answer.events.iter().take(MAX_MISSING as usize) {
        let Ok(json) = serde_json::from_str::<CanonicalJsonObject>(raw.get()) else { continue };
        let depth = match json.get("depth") {
            Some(ruma::CanonicalJsonValue::Integer(depth)) => u64::try_from(i64::from(*depth)).unwrap_or(0),
            _ => continue,
        };
        fetched.push((depth, json));
    }
    fetched.sort_by_key(|(depth, _)| *depth);
    let (mut taken, mut newest) = (0, None);
    for (_, json) in fetched {
        let event_id = match remote::checked_id(&json, version) {
            Ok(id) if id != *latest => id,
            _ => continue,
        };
        let first = remote::take(state, room_id, version, json.clone()).await;
        match take_filling(state, origin, room_id, version, json, first, true).await {
            Ok(stored) => {
                taken += 1;
                newest = newest.max(Some(stored.stream_ordering));
            }
            Err(Refused::Internal(why)) => return Err(Refused::Internal(why)),
            Err(refused) => tracing::info!(%origin, %event_id, %refused, "a missing event was refused"),
        }
    }
    if let Some(newest) = newest {
        state.stream.flush().await?;
        state.notify(newest);
    }
    Ok(taken)
}
