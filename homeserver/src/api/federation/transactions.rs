//! Transactions from other servers: `PUT /_matrix/federation/v1/send/{txnId}`.
//!
//! Each PDU goes through [`crate::rooms::remote::take`], in the order sent (those taken are made
//! seen together at the end), and the answer has per event an error or, for one taken or
//! rejected by the auth rules (handled either way; a rejected event is kept out of sight), the
//! empty result (soft-failed ones too). One that follows or names events this server lacks is
//! taken once what it lacks is fetched from the sender ([`crate::rooms::missing`]).
//! Then its EDUs ([`crate::remote::edu`]).

use actix_web::web;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, RoomId, RoomVersionId,
    api::federation::transactions::send_transaction_message,
};

use crate::{
    error::{Error, Result},
    remote::received::Outcome,
    rooms::{missing, remote},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// The spec's limits on one transaction.
const MAX_PDUS: usize = 50;
const MAX_EDUS: usize = 100;

pub(super) fn routes(router: &mut Router) {
    router.add(send);
}

/// PUT /_matrix/federation/v1/send/{txnId}
async fn send(
    state: web::Data<AppState>,
    request: Ruma<send_transaction_message::v1::Request>,
) -> Result<send_transaction_message::v1::Response> {
    let origin = request.sender;
    let body = request.body;
    if body.origin != origin {
        return Err(Error::forbidden(format!(
            "the transaction says it is from {}, but {origin} signed it",
            body.origin
        )));
    }
    if body.pdus.len() > MAX_PDUS || body.edus.len() > MAX_EDUS {
        return Err(Error::bad_json(format!(
            "a transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs"
        )));
    }
    if let Some(outbox) = state.outbox() {
        outbox.heard_from(&origin);
    }
    let received = &state.remote()?.received;
    let _turn = received.one_at_a_time(&origin).await;
    if let Some(outcome) = received.answered(&origin, &body.transaction_id) {
        return Ok(send_transaction_message::v1::Response::new(outcome));
    }
    let mut outcome = Outcome::new();
    // The PDUs taken are made seen together, once the transaction is through (or fails).
    let (mut newest, mut failed) = (None, None);
    for pdu in &body.pdus {
        match take_pdu(&state, &origin, pdu).await {
            Ok(Some((event_id, result))) => {
                newest = newest.max(result.as_ref().ok().copied().flatten());
                outcome.insert(event_id, result.map(|_| ()));
            }
            Ok(None) => {}
            Err(error) => {
                failed = Some(error);
                break;
            }
        }
    }
    if let Some(newest) = newest {
        state.stream.flush().await?;
        state.notify(newest);
    }
    if let Some(error) = failed {
        return Err(error);
    }
    // After the PDUs, so that a receipt can name an event of the same transaction.
    crate::remote::edu::receive(&state, &origin, &body.edus).await;
    received.remember(origin, body.transaction_id, outcome.clone());
    Ok(send_transaction_message::v1::Response::new(outcome))
}

/// Takes one PDU of `origin`'s transaction: its id and the answer for it (with the position it
/// was taken at, if it was), or nothing for one without an id to answer for.
async fn take_pdu(
    state: &AppState,
    origin: &ruma::ServerName,
    pdu: &serde_json::value::RawValue,
) -> Result<Option<(OwnedEventId, std::result::Result<Option<i64>, String>)>> {
    let Ok(json) = serde_json::from_str::<CanonicalJsonObject>(pdu.get()) else {
        // Without a valid body there is no event id to answer for.
        tracing::info!(%origin, "a PDU that is not canonical JSON was dropped");
        return Ok(None);
    };
    let Some((room_id, version)) = room_of(state, &json).await? else {
        tracing::info!(%origin, "a PDU of a room this server is not in was dropped");
        return Ok(None);
    };
    let Ok(event_id) = federation::pdu::event_id_of(&json, &version) else {
        tracing::info!(%origin, "a PDU without a valid event id was dropped");
        return Ok(None);
    };
    if !remote::acl_allows(state, &room_id, origin).await? {
        return Ok(Some((event_id, Err(format!("the server ACL of room {room_id} denies {origin}")))));
    }
    let result = match missing::take_from(state, origin, &room_id, &version, json).await {
        Ok(stored) => Ok(Some(stored.stream_ordering)),
        Err(remote::Refused::Internal(why)) => return Err(Error::internal(why)),
        // An event the auth rules reject was handled, though not taken: the answer is the
        // empty result, as Synapse gives (an error is for what could not be processed).
        Err(remote::Refused::Auth(why)) => {
            tracing::info!(%origin, %event_id, %why, "an event from another server was rejected");
            Ok(None)
        }
        Err(remote::Refused::SoftFailed(why)) => {
            tracing::info!(%origin, %event_id, %why, "an event from another server was soft-failed");
            Ok(None)
        }
        Err(refused) => {
            tracing::info!(%origin, %event_id, %refused, "an event from another server was refused");
            Err(refused.to_string())
        }
    };
    Ok(Some((event_id, result)))
}

/// The room a PDU is of, with its version, if this server has it.
async fn room_of(
    state: &AppState,
    json: &CanonicalJsonObject,
) -> Result<Option<(ruma::OwnedRoomId, RoomVersionId)>> {
    let Some(CanonicalJsonValue::String(room_id)) = json.get("room_id") else { return Ok(None) };
    let Ok(room_id) = <&RoomId>::try_from(room_id.as_str()) else { return Ok(None) };
    let Some(version) = state.store.room_version(room_id).await? else { return Ok(None) };
    let version = RoomVersionId::try_from(version.as_str()).map_err(Error::internal)?;
    Ok(Some((room_id.to_owned(), version)))
}
