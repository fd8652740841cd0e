//! Discovery: `/versions`, `/.well-known/matrix/client`, `capabilities`.

use std::collections::BTreeMap;

use actix_web::web;
use ruma::api::client::discovery::{
    discover_homeserver::{self, HomeserverInfo},
    get_capabilities::{
        self,
        v3::{Capabilities, RoomVersionStability, RoomVersionsCapability},
    },
    get_supported_versions,
};

use crate::{
    error::Result,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Spec versions whose client-server API Hearth serves.
const VERSIONS: &[&str] =
    &["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11"];

pub(super) fn routes(router: &mut Router) {
    router.add(get_supported_versions).add(discover_client).add(get_capabilities);
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
async fn get_capabilities(
    state: web::Data<AppState>,
    _: Ruma<get_capabilities::v3::Request>,
) -> Result<get_capabilities::v3::Response> {
    let mut capabilities = Capabilities::new();
    capabilities.change_password.enabled = true;
    capabilities.room_versions = RoomVersionsCapability::new(
        state.config.rooms.default_version(),
        federation::pdu::SUPPORTED_ROOM_VERSIONS
            .iter()
            .map(|v| (v.clone(), RoomVersionStability::Stable))
            .collect(),
    );
    Ok(get_capabilities::v3::Response::new(capabilities))
}
