//! Devices: `devices`, `devices/{deviceId}` (GET, PUT, DELETE behind UIA), `delete_devices`.

use actix_web::web;
use ruma::{
    DeviceId, MilliSecondsSinceUnixEpoch, OwnedDeviceId, UInt, UserId,
    api::client::device::{self, delete_device, delete_devices, get_device, get_devices, update_device},
};

use crate::{
    auth::{
        AuthedUser, tokens,
        uia::{self, UiaRequest},
    },
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::DeviceRecord,
};

/// Longest device display name accepted, in characters.
pub(super) const MAX_DISPLAY_NAME: usize = 256;
/// Most devices one `delete_devices` call may name.
const MAX_DELETE: usize = 1000;

pub(super) fn routes(router: &mut Router) {
    router.add(get_devices).add(get_device).add(update_device).add(delete_device).add(delete_devices);
}

/// Which devices go.
pub(super) enum Removal<'a> {
    These(&'a [OwnedDeviceId]),
    /// Every device but this one (or all).
    AllBut(Option<&'a DeviceId>),
}

/// Deletes devices with their sessions, keys and waiting to-device messages, and tells
/// everyone who shares a room with the user that their device list changed.
pub(super) async fn remove_devices(state: &AppState, user: &UserId, which: Removal<'_>) -> Result<()> {
    let gone: Vec<OwnedDeviceId> = match which {
        Removal::These(devices) => devices.to_vec(),
        Removal::AllBut(keep) => state
            .store
            .list_devices(user)
            .await?
            .into_iter()
            .map(|d| d.device_id)
            .filter(|d| Some(d.as_ref()) != keep)
            .collect(),
    };
    let store = &state.store;
    crate::rooms::at_new_position(state, |position| async move {
        match which {
            Removal::These(devices) => store.delete_devices(user, devices, position).await?,
            Removal::AllBut(keep) => store.delete_devices_except(user, keep, position).await?,
        }
        Ok(())
    })
    .await?;
    for device in &gone {
        state.queue.forget_device(user, device).await?;
    }
    super::keys::mark_device_list_changed(state, user).await?;
    for device in &gone {
        crate::remote::edu::send_device_list_update(state, user, device, true).await?;
    }
    Ok(())
}

fn to_ruma(record: DeviceRecord) -> device::Device {
    let mut device = device::Device::new(record.device_id);
    device.display_name = record.display_name;
    device.last_seen_ip = record.last_seen_ip;
    device.last_seen_ts =
        record.last_seen_ts.and_then(|ts| UInt::try_from(ts).ok()).map(MilliSecondsSinceUnixEpoch);
    device
}

/// GET /_matrix/client/v3/devices
async fn get_devices(
    state: web::Data<AppState>,
    request: Ruma<get_devices::v3::Request>,
) -> Result<get_devices::v3::Response> {
    let devices = state.store.list_devices(&request.sender.user_id).await?;
    Ok(get_devices::v3::Response::new(devices.into_iter().map(to_ruma).collect()))
}

/// GET /_matrix/client/v3/devices/{deviceId}
async fn get_device(
    state: web::Data<AppState>,
    request: Ruma<get_device::v3::Request>,
) -> Result<get_device::v3::Response> {
    let device = state
        .store
        .get_device(&request.sender.user_id, &request.body.device_id)
        .await?
        .ok_or_else(|| Error::not_found("no such device"))?;
    Ok(get_device::v3::Response::new(to_ruma(device)))
}

/// PUT /_matrix/client/v3/devices/{deviceId}
async fn update_device(
    state: web::Data<AppState>,
    request: Ruma<update_device::v3::Request>,
) -> Result<update_device::v3::Response> {
    let name = request.body.display_name.as_deref();
    if name.is_some_and(|n| n.chars().count() > MAX_DISPLAY_NAME) {
        return Err(Error::invalid_param(format!("display_name longer than {MAX_DISPLAY_NAME} characters")));
    }
    let found =
        state.store.set_device_display_name(&request.sender.user_id, &request.body.device_id, name).await?;
    if !found {
        return Err(Error::not_found("no such device"));
    }
    // The name is part of what `keys/query` shows of the device (`unsigned`): those who share a
    // room learn of the change through `device_lists`, as Synapse tells them.
    super::keys::device_list_changed(&state, &request.sender.user_id, &request.body.device_id, false).await?;
    Ok(update_device::v3::Response::new())
}

/// Runs UIA for deleting devices: the user confirms with their password.
async fn authorize_deletion(
    state: &AppState,
    user: &AuthedUser,
    devices: &[OwnedDeviceId],
    auth: Option<&ruma::api::client::uiaa::AuthData>,
    client_ip: std::net::IpAddr,
) -> Result<()> {
    // The operation names the devices, so a session approved for one set cannot delete another.
    let mut names: Vec<&str> = devices.iter().map(|d| d.as_str()).collect();
    names.sort_unstable();
    let operation = format!("delete_devices:{}", tokens::sha256_hex(&names.join("\n")));
    uia::authenticate(state, auth, UiaRequest::password(&operation, user, client_ip)).await.map(drop)
}

/// DELETE /_matrix/client/v3/devices/{deviceId}
async fn delete_device(
    state: web::Data<AppState>,
    request: Ruma<delete_device::v3::Request>,
) -> Result<delete_device::v3::Response> {
    let user = &request.sender;
    let body = request.body;
    if state.store.get_device(&user.user_id, &body.device_id).await?.is_none() {
        return Err(Error::not_found("no such device"));
    }
    let devices = [body.device_id];
    authorize_deletion(&state, user, &devices, body.auth.as_ref(), request.client_ip).await?;
    remove_devices(&state, &user.user_id, Removal::These(&devices)).await?;
    Ok(delete_device::v3::Response::new())
}

/// POST /_matrix/client/v3/delete_devices
async fn delete_devices(
    state: web::Data<AppState>,
    request: Ruma<delete_devices::v3::Request>,
) -> Result<delete_devices::v3::Response> {
    let user = &request.sender;
    let body = request.body;
    if body.devices.len() > MAX_DELETE {
        return Err(Error::invalid_param(format!("at most {MAX_DELETE} devices per request")));
    }
    authorize_deletion(&state, user, &body.devices, body.auth.as_ref(), request.client_ip).await?;
    remove_devices(&state, &user.user_id, Removal::These(&body.devices)).await?;
    Ok(delete_devices::v3::Response::new())
}
