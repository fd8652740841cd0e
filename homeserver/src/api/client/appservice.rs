//! The client-server API's extensions for application services: `appservice/{id}/ping`, and
//! the services' own room directories (`directory/list/appservice/{networkId}/{roomId}`).

use actix_web::{HttpRequest, HttpResponse, http::StatusCode, web};
use ruma::{
    RoomId,
    api::{
        client::{
            appservice::{request_ping, set_room_visibility},
            room::Visibility,
        },
        error::BadStatusErrorData,
    },
};

use crate::{
    appservice::{Appservice, AppserviceAuth, CallError},
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Authenticated, Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(ping).add(list_room);
    // Taking a room out with DELETE, as Synapse allows besides `PUT` with `private` (the spec
    // has only the PUT).
    router.add_route(
        http::Method::DELETE,
        "/_matrix/client/v3/directory/list/appservice/{network_id}/{room_id}",
        || web::delete().to(unlist_room),
    );
}

/// Longest network id, in bytes.
const MAX_NETWORK_ID_BYTES: usize = 255;

fn not_a_service() -> Error {
    Error::forbidden("only an application service edits its room directory")
}

/// Lists a room in, or takes it out of, `service`'s directory for `network_id`.
async fn set_listed(
    state: &AppState,
    service: &Appservice,
    network_id: &str,
    room_id: &RoomId,
    listed: bool,
) -> Result<()> {
    // The `|` separates the service from the network in the instance id `/publicRooms` takes.
    if network_id.is_empty() || network_id.len() > MAX_NETWORK_ID_BYTES || network_id.contains('|') {
        return Err(Error::invalid_param(format!(
            "networkId must be 1 to {MAX_NETWORK_ID_BYTES} bytes without `|`"
        )));
    }
    crate::rooms::room_version(state, room_id).await?;
    Ok(state.store.set_appservice_room_listed(service.id(), network_id, room_id, listed).await?)
}

/// PUT /_matrix/client/v3/directory/list/appservice/{networkId}/{roomId}
async fn list_room(
    state: web::Data<AppState>,
    request: Ruma<set_room_visibility::v3::Request>,
) -> Result<set_room_visibility::v3::Response> {
    // A user's token is refused as not being a service's, not as unknown: that would tell the
    // user's client that it was logged out.
    let service = match &request.sender {
        AppserviceAuth::Known(service) => service,
        AppserviceAuth::Absent => return Err(Error::missing_token()),
        AppserviceAuth::Unknown => return Err(not_a_service()),
    };
    let body = &request.body;
    let listed = body.visibility == Visibility::Public;
    set_listed(&state, service, &body.network_id, &body.room_id, listed).await?;
    Ok(set_room_visibility::v3::Response::new())
}

/// DELETE /_matrix/client/v3/directory/list/appservice/{networkId}/{roomId}
async fn unlist_room(
    state: web::Data<AppState>,
    req: HttpRequest,
    Authenticated(user): Authenticated,
) -> Result<HttpResponse> {
    let service = user.appservice.ok_or_else(not_a_service)?;
    let network_id = req.match_info().get("network_id").unwrap_or_default();
    let room_id = req.match_info().get("room_id").unwrap_or_default();
    let room_id =
        <&RoomId>::try_from(room_id).map_err(|e| Error::invalid_param(format!("not a room id: {e}")))?;
    set_listed(&state, &service, network_id, room_id, false).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({})))
}

/// POST /_matrix/client/v1/appservice/{appserviceId}/ping
///
/// The service asks to be pinged (`POST /_matrix/app/v1/ping`), to check that this server
/// reaches it with the right token.
async fn ping(
    state: web::Data<AppState>,
    request: Ruma<request_ping::v1::Request>,
) -> Result<request_ping::v1::Response> {
    let service = match &request.sender {
        AppserviceAuth::Known(service) if service.id() == request.body.appservice_id => service,
        _ => return Err(Error::forbidden("the access token is not this application service's as_token")),
    };
    if service.url().is_none() {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::UrlNotSet,
            "the application service has no url in its registration",
        ));
    }
    match state.appservices.ping(service, request.body.transaction_id).await {
        Ok(duration) => Ok(request_ping::v1::Response::new(duration)),
        Err(CallError::Status(status, body)) => {
            let mut data = BadStatusErrorData::new();
            data.status = http::StatusCode::from_u16(status).ok();
            data.body = Some(body);
            Err(Error::new(
                StatusCode::BAD_GATEWAY,
                ErrorKind::BadStatus(data),
                format!("the application service answered the ping with {status}"),
            ))
        }
        Err(CallError::Timeout) => Err(Error::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::ConnectionTimeout,
            "the application service did not answer the ping in time",
        )),
        Err(error) => {
            Err(Error::new(StatusCode::BAD_GATEWAY, ErrorKind::ConnectionFailed, error.to_string()))
        }
    }
}
