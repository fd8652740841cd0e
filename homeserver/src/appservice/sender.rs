//! Pushing events to application services: one ordered, durable queue per service.
//!
//! A service's queue is a row (`storage/appservice.rs`): the stream position up to which its
//! events went out, and the transaction being delivered, stored whole before it is first sent.
//! Each worker runs one sender per service (with a `url`); they share the row:
//!
//! 1. Claim the row's lease (or renew it). Another worker holds it: wait and try again later.
//! 2. A transaction is pending: send it (`PUT /_matrix/app/v1/transactions/{txnId}`), exactly as
//!    stored, under the same id, until the service answers 2xx; then move the queue past it.
//!    Failures back off exponentially.
//! 3. Otherwise read the events after the queue's position, up to the stream's safe position
//!    (every event below it has committed, see `storage/stream.rs`), keep those the service is
//!    interested in (at most [`MAX_EVENTS`]), and store them as the next transaction; none: move
//!    the position past them.
//!
//! Order follows from one pending transaction at a time, built from the stream in order; a
//! restart finds the pending transaction and the position in the database. The lease (by the
//! database's clock on Postgres) is renewed before every send and outlasts the send's timeout,
//! so two workers never send a service's transaction at the same time.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use ruma::{
    OwnedTransactionId, UserId,
    api::{OutgoingRequestExt, appservice::event::push_events},
    events::AnyTimelineEvent,
    serde::Raw,
};
use tokio::sync::watch;

use super::{Appservice, CallError};
use crate::{
    rooms::client_event::ClientEvent,
    state::AppState,
    storage::{PendingTxn, StreamEvent},
};

/// How long a claim lasts, in milliseconds; renewed at every step.
const LEASE_MS: i64 = 60_000;
/// A send starts only this soon after the claim that covers it.
const SEND_WITHIN: Duration = Duration::from_secs(20);
/// Most events in one transaction.
const MAX_EVENTS: usize = 100;
/// Most events read from the stream per step.
const SCAN: i64 = 1_000;
/// How often an idle sender looks for new events when nothing wakes it (writes of other workers
/// without Redis).
const POLL: Duration = Duration::from_secs(2);
/// How often a worker whose queue another worker holds tries to claim it.
const HELD_ELSEWHERE: Duration = Duration::from_secs(10);
/// The first wait after a failed send, doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What one step did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Sent, stored or skipped something: there may be more.
    Busy,
    /// Nothing to send until new events come.
    Idle,
    /// Another worker holds the queue.
    Elsewhere,
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20))).min(BACKOFF_MAX)
}

/// Runs a service's sender until `stop` (or the server is gone).
pub(super) async fn run(
    state: Weak<AppState>,
    service: Arc<Appservice>,
    owner: String,
    mut stop: watch::Receiver<bool>,
) {
    let Some(mut wake) = state.upgrade().map(|s| s.subscribe()) else { return };
    let mut failures = 0u32;
    while !*stop.borrow() {
        let Some(strong) = state.upgrade() else { return };
        let outcome = step(&strong, &service, &owner).await;
        drop(strong);
        let (pause, on_wake) = match outcome {
            Ok(Step::Busy) => {
                failures = 0;
                continue;
            }
            Ok(Step::Idle) => {
                failures = 0;
                (POLL, true)
            }
            Ok(Step::Elsewhere) => (HELD_ELSEWHERE, false),
            Err(error) => {
                failures = failures.saturating_add(1);
                let pause = backoff(failures);
                tracing::warn!(
                    appservice = service.id(), %error, failures, retry_in_ms = pause.as_millis() as u64,
                    "could not deliver to the application service"
                );
                (pause, false)
            }
        };
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(pause) => {}
            changed = wake.changed(), if on_wake => if changed.is_err() { return },
        }
    }
    if let Some(state) = state.upgrade()
        && let Err(error) = state.store.release_appservice_queue(service.id(), &owner).await
    {
        tracing::warn!(appservice = service.id(), %error, "could not hand the application service queue back");
    }
}

/// One step of the queue (see the module documentation). An error is a failed delivery or an
/// unavailable database: the caller backs off.
async fn step(state: &AppState, service: &Appservice, owner: &str) -> Result<Step, String> {
    let id = service.id();
    let upto = state.recent.catch_up(&*state.store).await.map_err(|e| e.to_string())?;
    let store = &state.store;
    let Some(queue) = store.claim_appservice_queue(id, owner, LEASE_MS).await.map_err(|e| e.to_string())?
    else {
        return Ok(Step::Elsewhere);
    };
    let claimed = Instant::now();
    if let Some(pending) = queue.pending {
        deliver(state, service, &pending, claimed).await?;
        store.complete_appservice_txn(id, owner, &pending.txn_id).await.map_err(|e| e.to_string())?;
        tracing::debug!(appservice = id, txn_id = %pending.txn_id, "transaction delivered");
        return Ok(Step::Busy);
    }
    if upto <= queue.last_pos {
        return Ok(Step::Idle);
    }
    let events = store.stream_events(queue.last_pos, upto, SCAN).await.map_err(|e| e.to_string())?;
    // A full read may stop short of `upto`: the next step goes on from its last event.
    let read_to = match events.last() {
        Some(last) if events.len() as i64 == SCAN => last.event.stream_ordering,
        _ => upto,
    };
    let mut rooms = HashMap::new();
    let mut chosen = Vec::new();
    let mut reached = read_to;
    for event in &events {
        if interested(state, service, event, &mut rooms).await? {
            chosen.push(event);
            if chosen.len() == MAX_EVENTS {
                reached = event.event.stream_ordering;
                break;
            }
        }
    }
    if chosen.is_empty() {
        store.skip_appservice_events(id, owner, read_to).await.map_err(|e| e.to_string())?;
        return Ok(Step::Busy);
    }
    let body = transaction_body(&chosen)?;
    store.queue_appservice_txn(id, owner, &body, reached).await.map_err(|e| e.to_string())?;
    Ok(Step::Busy)
}

/// Sends a pending transaction, as stored, under its id.
async fn deliver(
    state: &AppState,
    service: &Appservice,
    pending: &PendingTxn,
    claimed: Instant,
) -> Result<(), String> {
    if claimed.elapsed() > SEND_WITHIN {
        // The claim is too old to cover a whole send (a stalled worker): claim again first.
        return Err("the claim on the queue is too old to send under".to_owned());
    }
    let request =
        push_events::v1::Request::new(OwnedTransactionId::from(pending.txn_id.as_str()), Vec::new());
    // At most 30 s (`appservices.transaction_timeout_secs`): well inside the lease, so the lease
    // cannot lapse while a send is under way.
    let timeout = Duration::from_secs(state.config.appservices.transaction_timeout_secs);
    let sent =
        state.appservices.call(service, request, Some(pending.body.clone().into_bytes()), timeout).await;
    sent.map(drop).map_err(|error| match error {
        CallError::Status(status, body) => {
            let body: String = body.chars().take(200).collect();
            format!("transaction {}: the application service answered {status}: {body}", pending.txn_id)
        }
        other => format!("transaction {}: {other}", pending.txn_id),
    })
}

/// The body of a transaction with these events, in the client format.
fn transaction_body(events: &[&StreamEvent]) -> Result<String, String> {
    let events = events
        .iter()
        .map(|event| ClientEvent::parse(&event.event).and_then(|e| e.to_raw::<AnyTimelineEvent>()))
        .collect::<crate::error::Result<Vec<Raw<AnyTimelineEvent>>>>()
        .map_err(|e| e.to_string())?;
    // ruma serialises the request; the transaction id is in the path, not the body.
    let request = push_events::v1::Request::new(OwnedTransactionId::from("0"), events);
    let http =
        request.try_into_http_request::<Vec<u8>>("http://localhost", "", ()).map_err(|e| e.to_string())?;
    String::from_utf8(http.into_body()).map_err(|e| e.to_string())
}

/// Whether a service is interested in an event: its sender or (for a membership) its target is
/// one of the service's users, or its room is one the service is interested in.
async fn interested(
    state: &AppState,
    service: &Appservice,
    event: &StreamEvent,
    rooms: &mut HashMap<String, bool>,
) -> Result<bool, String> {
    let is_ours = |user: &str| <&UserId>::try_from(user).is_ok_and(|user| service.is_user_match(user));
    let Ok(parsed) = ClientEvent::parse(&event.event) else { return Ok(false) };
    if is_ours(&parsed.sender()) {
        return Ok(true);
    }
    if event.event_type == "m.room.member" && event.state_key.as_deref().is_some_and(is_ours) {
        return Ok(true);
    }
    let room = &event.event.room_id;
    if let Some(known) = rooms.get(room) {
        return Ok(*known);
    }
    let answer = room_interests(state, service, room).await.map_err(|e| e.to_string())?;
    rooms.insert(room.clone(), answer);
    Ok(answer)
}

/// Whether a service is interested in a whole room: its id or one of its aliases is in the
/// service's namespaces, or one of the service's users is joined or invited.
async fn room_interests(state: &AppState, service: &Appservice, room: &str) -> crate::error::Result<bool> {
    if service.is_room_match(room) {
        return Ok(true);
    }
    let Ok(room_id) = <&ruma::RoomId>::try_from(room) else { return Ok(false) };
    if state.store.room_aliases(room_id).await?.iter().any(|alias| service.is_alias_match(alias)) {
        return Ok(true);
    }
    let members = state.store.members(room_id).await?;
    Ok(members.iter().any(|(user, membership)| {
        matches!(membership.as_str(), "join" | "invite")
            && <&UserId>::try_from(user.as_str()).is_ok_and(|user| service.is_user_match(user))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_quarter_second_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
