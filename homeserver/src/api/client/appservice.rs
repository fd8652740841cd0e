//! The client-server API's extensions for application services: `appservice/{id}/ping`.

use actix_web::{http::StatusCode, web};
use ruma::api::{client::appservice::request_ping, error::BadStatusErrorData};

use crate::{
    appservice::CallError,
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(ping);
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
        crate::appservice::AppserviceAuth::Known(service) if service.id() == request.body.appservice_id => {
            service
        }
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
