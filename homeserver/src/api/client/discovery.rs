//! Discovery: `/versions`, `/.well-known/matrix/client`, `capabilities`.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, web};
use ruma::api::client::discovery::{
    discover_homeserver::{self, HomeserverInfo},
    get_capabilities::{
        self,
        v3::{Capabilities, RoomVersionStability, RoomVersionsCapability},
    },
    get_supported_versions,
};

use serde_json::json;

use crate::{
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Spec versions whose client-server API Hearth serves.
const VERSIONS: &[&str] =
    &["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11"];

pub(super) fn routes(router: &mut Router) {
    router.add(get_supported_versions).add(discover_client);
}

/// GET /_matrix/client/versions
async fn get_supported_versions(
    _: web::Data<AppState>,
    _: Ruma<get_supported_versions::Request>,
) -> Result<get_supported_versions::Response> {
    let mut response =
        get_supported_versions::Response::new(VERSIONS.iter().map(|v| (*v).to_owned()).collect());
    response.unstable_features = BTreeMap::new();
    Ok(response)
}

/// GET /.well-known/matrix/client
async fn discover_client(
    state: web::Data<AppState>,
    _: Ruma<discover_homeserver::Request>,
) -> Result<discover_homeserver::Response> {
    Ok(discover_homeserver::Response::new(HomeserverInfo::new(state.config.base_url())))
}

/// GET /_matrix/client/v3/capabilities
///
/// What this server lets users do. Served outside the router (see `custom` in `mod.rs`): ruma
/// leaves out a capability that has the spec's default value, and clients look for each one.
pub(super) async fn get_capabilities(
    state: web::Data<AppState>,
    _: Ruma<get_capabilities::v3::Request>,
) -> Result<HttpResponse> {
    let mut capabilities = Capabilities::new();
    let available = federation::pdu::SUPPORTED_ROOM_VERSIONS
        .iter()
        .map(|version| (version.clone(), RoomVersionStability::Stable))
        .collect();
    capabilities.room_versions = RoomVersionsCapability::new(state.config.rooms.default_version(), available);
    // Addresses can be added only where codes can be sent to prove them.
    let threepids = state.email.is_some() || state.sms.is_some();
    let mut body = serde_json::to_value(&capabilities).map_err(Error::internal)?;
    let Some(map) = body.as_object_mut() else {
        return Err(Error::internal("capabilities are not an object"));
    };
    // Every account can change its password (by the old one, through UIA), its name and avatar.
    for (name, enabled) in [
        ("m.change_password", true),
        ("m.set_displayname", true),
        ("m.set_avatar_url", true),
        ("m.3pid_changes", threepids),
    ] {
        map.insert(name.to_owned(), json!({ "enabled": enabled }));
    }
    Ok(HttpResponse::Ok().json(json!({ "capabilities": body })))
}
