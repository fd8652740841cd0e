//! Transactions from other servers: `PUT /_matrix/federation/v1/send/{txnId}`.
//!
//! Each PDU goes through [`crate::rooms::remote::accept`], in the order sent, and the answer
//! has per event an error or, for one taken or rejected by the auth rules (handled either way;
//! a rejected event is kept out of sight), the empty result. One that follows events this
//! server lacks is taken once those are fetched from the sender ([`crate::rooms::missing`]).
//! EDUs (typing, receipts, presence, to-device) are federation's part 2 and are not read yet.

use actix_web::web;
use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, RoomId, RoomVersionId,
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
    let received = &state.remote()?.received;
    let _turn = received.one_at_a_time(&origin).await;
    if let Some(outcome) = received.answered(&origin, &body.transaction_id) {
        return Ok(send_transaction_message::v1::Response::new(outcome));
    }
    let mut outcome = Outcome::new();
    for pdu in &body.pdus {
        let Ok(json) = serde_json::from_str::<CanonicalJsonObject>(pdu.get()) else {
            // Without a valid body there is no event id to answer for.
            tracing::info!(%origin, "a PDU that is not canonical JSON was dropped");
            continue;
        };
        let Some((room_id, version)) = room_of(&state, &json).await? else {
            tracing::info!(%origin, "a PDU of a room this server is not in was dropped");
            continue;
        };
        let Ok(event_id) = federation::pdu::event_id_of(&json, &version) else {
            tracing::info!(%origin, "a PDU without a valid event id was dropped");
            continue;
        };
        if !remote::acl_allows(&state, &room_id, &origin).await? {
            outcome.insert(event_id, Err(format!("the server ACL of room {room_id} denies {origin}")));
            continue;
        }
        let mut taken = remote::accept(&state, &room_id, &version, json.clone()).await;
        if let Err(remote::Refused::Unknown(_)) = taken {
            // It follows events this server never got: those are asked of the sender first.
            if missing::fill(&state, &origin, &room_id, &version, &event_id)
                .await
                .map_err(remote::Refused::into_error)?
                > 0
            {
                taken = remote::accept(&state, &room_id, &version, json).await;
            }
        }
        let result = match taken {
            Ok(_) => Ok(()),
            Err(remote::Refused::Internal(why)) => return Err(Error::internal(why)),
            // An event the auth rules reject was handled, though not taken: the answer is the
            // empty result, as Synapse gives (an error is for what could not be processed).
            Err(remote::Refused::Auth(why)) => {
                tracing::info!(%origin, %event_id, %why, "an event from another server was rejected");
                Ok(())
            }
            Err(refused) => {
                tracing::info!(%origin, %event_id, %refused, "an event from another server was refused");
                Err(refused.to_string())
            }
        };
        outcome.insert(event_id, result);
    }
    received.remember(origin, body.transaction_id, outcome.clone());
    Ok(send_transaction_message::v1::Response::new(outcome))
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
