//! Server administration: `GET /admin/whois/{userId}`.

use std::collections::BTreeMap;

use actix_web::web;
use ruma::{
    MilliSecondsSinceUnixEpoch, UInt,
    api::client::admin::get_user_info::v3::{self as whois, ConnectionInfo, DeviceInfo, SessionInfo},
};

use crate::{
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(get_user_info);
}

/// GET /_matrix/client/v3/admin/whois/{userId}
///
/// For server admins, and for users asking about themselves. Each device is one session (a
/// login on a device replaces the device's earlier sessions), with the one connection Hearth
/// records: where and when the device was last seen. The user agent is not recorded.
async fn get_user_info(state: web::Data<AppState>, request: Ruma<whois::Request>) -> Result<whois::Response> {
    let asker = &request.sender.user_id;
    let target = &request.body.user_id;
    if asker != target && !state.store.get_user(asker).await?.is_some_and(|user| user.is_admin) {
        return Err(Error::forbidden("only server admins may look up other users"));
    }
    if target.server_name() != state.server_name || state.store.get_user(target).await?.is_none() {
        return Err(Error::not_found("no such user on this server"));
    }
    let mut devices = BTreeMap::new();
    for device in state.store.list_devices(target).await? {
        let mut connection = ConnectionInfo::new();
        connection.ip = device.last_seen_ip;
        connection.last_seen =
            device.last_seen_ts.and_then(|ts| UInt::try_from(ts).ok()).map(MilliSecondsSinceUnixEpoch);
        let mut session = SessionInfo::new();
        session.connections = vec![connection];
        let mut info = DeviceInfo::new();
        info.sessions = vec![session];
        devices.insert(device.device_id.to_string(), info);
    }
    let mut response = whois::Response::new();
    response.user_id = Some(target.clone());
    response.devices = devices;
    Ok(response)
}
