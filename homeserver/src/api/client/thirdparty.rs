//! Third-party networks (`/thirdparty/*`): the protocols the application services bridge to,
//! and lookups of users and locations on them, each answered by asking the services
//! ([`crate::appservice::thirdparty`]).

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use ruma::api::client::thirdparty::{
    get_location_for_protocol, get_location_for_room_alias, get_protocol, get_protocols,
    get_user_for_protocol, get_user_for_user_id,
};

use crate::{
    auth::AuthedUser,
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    // Protocols as the services describe them, not through ruma's `Protocol`, which requires
    // instance fields that bridges leave out (see `crate::appservice::thirdparty`).
    router
        .add_responding(protocols)
        .add_responding(protocol)
        .add(users)
        .add(locations)
        .add(users_for_user_id)
        .add(locations_for_alias);
}

/// GET /_matrix/client/v3/thirdparty/protocols
async fn protocols(
    state: web::Data<AppState>,
    _request: Ruma<get_protocols::v3::Request>,
) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(state.appservices.protocols(None).await))
}

/// GET /_matrix/client/v3/thirdparty/protocol/{protocol}
async fn protocol(
    state: web::Data<AppState>,
    request: Ruma<get_protocol::v3::Request>,
) -> Result<HttpResponse> {
    let name = &request.body.protocol;
    match state.appservices.protocols(Some(name)).await.remove(name) {
        Some(protocol) => Ok(HttpResponse::Ok().json(protocol)),
        None => Err(Error::not_found("no application service here bridges that protocol")),
    }
}

/// The fields of a lookup: the query string, without the parameters that were the client's
/// own (its token, and the user an application service acts as).
fn lookup_fields(mut fields: BTreeMap<String, String>, sender: &AuthedUser) -> BTreeMap<String, String> {
    fields.remove("access_token");
    if sender.appservice.is_some() {
        fields.remove("user_id");
        fields.remove("device_id");
    }
    fields
}

/// GET /_matrix/client/v3/thirdparty/user/{protocol}
async fn users(
    state: web::Data<AppState>,
    request: Ruma<get_user_for_protocol::v3::Request>,
) -> Result<get_user_for_protocol::v3::Response> {
    let body = request.body;
    let fields = lookup_fields(body.fields, &request.sender);
    Ok(get_user_for_protocol::v3::Response::new(
        state.appservices.third_party_users(&body.protocol, &fields).await,
    ))
}

/// GET /_matrix/client/v3/thirdparty/location/{protocol}
async fn locations(
    state: web::Data<AppState>,
    request: Ruma<get_location_for_protocol::v3::Request>,
) -> Result<get_location_for_protocol::v3::Response> {
    let body = request.body;
    let fields = lookup_fields(body.fields, &request.sender);
    Ok(get_location_for_protocol::v3::Response::new(
        state.appservices.third_party_locations(&body.protocol, &fields).await,
    ))
}

/// GET /_matrix/client/v3/thirdparty/user?userid=
async fn users_for_user_id(
    state: web::Data<AppState>,
    request: Ruma<get_user_for_user_id::v3::Request>,
) -> Result<get_user_for_user_id::v3::Response> {
    Ok(get_user_for_user_id::v3::Response::new(
        state.appservices.third_party_users_for(&request.body.userid).await,
    ))
}

/// GET /_matrix/client/v3/thirdparty/location?alias=
async fn locations_for_alias(
    state: web::Data<AppState>,
    request: Ruma<get_location_for_room_alias::v3::Request>,
) -> Result<get_location_for_room_alias::v3::Response> {
    Ok(get_location_for_room_alias::v3::Response::new(
        state.appservices.third_party_locations_for(&request.body.alias).await,
    ))
}
