//! End-to-end encryption across servers, the serving side: another server asks for the device
//! and cross-signing keys of this server's users (`user/keys/query`, `user/devices`) and claims
//! their one-time keys (`user/keys/claim`), for its users who share rooms with them. Only this
//! server's users are answered for; a user-signing key, and anyone's own signatures of a master
//! key, never leave.

use std::collections::BTreeMap;

use actix_web::web;
use ruma::{
    UInt,
    api::federation::{
        device::get_devices,
        keys::{claim_keys, get_keys},
    },
};

use crate::{
    api::client::keys::{claim_local, local_keys},
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Most devices one request may name in all (as for clients).
const MAX_DEVICES_PER_REQUEST: usize = 10_000;

pub(super) fn routes(router: &mut Router) {
    router.add(query).add(claim).add(devices);
}

fn check_size(devices: usize) -> Result<()> {
    if devices > MAX_DEVICES_PER_REQUEST {
        return Err(Error::invalid_param(format!("at most {MAX_DEVICES_PER_REQUEST} devices per request")));
    }
    Ok(())
}

/// POST /_matrix/federation/v1/user/keys/query
async fn query(
    state: web::Data<AppState>,
    request: Ruma<get_keys::v1::Request>,
) -> Result<get_keys::v1::Response> {
    let body = request.body;
    check_size(body.device_keys.values().map(|d| d.len().max(1)).sum())?;
    let mut response = get_keys::v1::Response::new(BTreeMap::new());
    for (user, devices) in body.device_keys {
        if user.server_name() != state.server_name {
            continue;
        }
        let keys = local_keys(&state, &user, &devices, None).await?;
        if let Some(key) = keys.master {
            response.master_keys.insert(user.clone(), key);
        }
        if let Some(key) = keys.self_signing {
            response.self_signing_keys.insert(user.clone(), key);
        }
        response.device_keys.insert(user, keys.devices);
    }
    Ok(response)
}

/// POST /_matrix/federation/v1/user/keys/claim
async fn claim(
    state: web::Data<AppState>,
    request: Ruma<claim_keys::v1::Request>,
) -> Result<claim_keys::v1::Response> {
    let body = request.body;
    check_size(body.one_time_keys.values().map(BTreeMap::len).sum())?;
    let mut wanted = Vec::new();
    for (user, devices) in body.one_time_keys {
        if user.server_name() != state.server_name {
            continue;
        }
        for (device, algorithm) in devices {
            wanted.push((user.clone(), device, algorithm.to_string()));
        }
    }
    Ok(claim_keys::v1::Response::new(claim_local(&state, wanted).await?))
}

/// GET /_matrix/federation/v1/user/devices/{userId}
async fn devices(
    state: web::Data<AppState>,
    request: Ruma<get_devices::v1::Request>,
) -> Result<get_devices::v1::Response> {
    let user = &request.body.user_id;
    if user.server_name() != state.server_name || state.store.get_user(user).await?.is_none() {
        return Err(Error::not_found("no such user here"));
    }
    let keys = local_keys(&state, user, &[], None).await?;
    let names: BTreeMap<String, Option<String>> = state
        .store
        .list_devices(user)
        .await?
        .into_iter()
        .map(|device| (device.device_id.to_string(), device.display_name))
        .collect();
    // The stream position stands for the list's version: it only grows.
    let stream_id = UInt::try_from(state.recent.upto().max(0)).unwrap_or(UInt::MIN);
    let devices = keys
        .devices
        .into_iter()
        .map(|(device_id, device_keys)| {
            let mut device = get_devices::v1::UserDevice::new(device_id.clone(), device_keys);
            device.device_display_name = names.get(device_id.as_str()).cloned().flatten();
            device
        })
        .collect();
    let mut response = get_devices::v1::Response::new(user.clone(), stream_id);
    response.devices = devices;
    response.master_key = keys.master;
    response.self_signing_key = keys.self_signing;
    Ok(response)
}
