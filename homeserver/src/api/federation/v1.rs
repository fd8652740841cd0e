//! The v1 forms of `send_join` and `send_leave`, deprecated by v2 but still called by older
//! servers (and SyTest). ruma has no types for them, so they are routed by hand: the same
//! checks as v2 (X-Matrix, the body as every body), answered as `[200, body]`, as v1 was
//! specified.

use actix_web::{HttpRequest, HttpResponse, web};
use ruma::{OwnedEventId, OwnedRoomId};
use serde_json::value::RawValue;

use super::{membership, xmatrix};
use crate::{
    error::{Error, Result},
    ruma_wrapper::{Incoming, PathTemplate, method_not_allowed, parse_json_body},
    state::AppState,
};

const SEND_JOIN: &str = "/_matrix/federation/v1/send_join/{roomId}/{eventId}";
const SEND_LEAVE: &str = "/_matrix/federation/v1/send_leave/{roomId}/{eventId}";

pub(super) fn configure(config: &mut web::ServiceConfig) {
    for (path, handler) in [(SEND_JOIN, Membership::Join), (SEND_LEAVE, Membership::Leave)] {
        config.service(
            web::resource(path)
                .app_data(PathTemplate(path))
                .app_data(handler)
                .route(web::put().to(send))
                .default_service(web::to(method_not_allowed)),
        );
    }
}

#[derive(Clone, Copy)]
enum Membership {
    Join,
    Leave,
}

/// PUT /_matrix/federation/v1/send_join/{roomId}/{eventId} and
/// PUT /_matrix/federation/v1/send_leave/{roomId}/{eventId}
async fn send(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let origin = xmatrix::verify(&state, Incoming { request: &request, body: &body }).await?;
    let (room_id, event_id) = path.into_inner();
    let room_id =
        OwnedRoomId::try_from(room_id).map_err(|e| Error::invalid_param(format!("room id: {e}")))?;
    let event_id =
        OwnedEventId::try_from(event_id).map_err(|e| Error::invalid_param(format!("event id: {e}")))?;
    let pdu: Box<RawValue> = parse_json_body(&body)?;
    let answer = match request.app_data::<Membership>().copied().unwrap_or(Membership::Join) {
        Membership::Join => {
            let room_state = membership::take_join(&state, &origin, &room_id, &event_id, &pdu, false).await?;
            serde_json::to_value(room_state).map_err(Error::internal)?
        }
        Membership::Leave => {
            membership::take_membership(&state, &origin, &room_id, &event_id, &pdu, "leave").await?;
            serde_json::json!({})
        }
    };
    Ok(HttpResponse::Ok().json(serde_json::json!([200, answer])))
}
