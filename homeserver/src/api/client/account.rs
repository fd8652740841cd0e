//! The account: `account/whoami`, `account/password` (change, or reset by a verified address),
//! `account/deactivate`.

use actix_web::{http::StatusCode, web};
use ruma::api::client::account::{ThirdPartyIdRemovalStatus, change_password, deactivate, whoami};

use super::{
    device::{Removal, remove_devices},
    register::check_new_password,
};
use crate::{
    auth::{
        password,
        uia::{self, Stage, UiaRequest},
    },
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    threepid::Purpose,
};

pub(super) fn routes(router: &mut Router) {
    router.add(whoami).add(change_password).add(deactivate);
}

/// GET /_matrix/client/v3/account/whoami
async fn whoami(_: web::Data<AppState>, request: Ruma<whoami::v3::Request>) -> Result<whoami::v3::Response> {
    let user = request.sender;
    let has_device = user.has_device();
    let mut response = whoami::v3::Response::new(user.user_id, user.is_guest);
    // An application service acting without a device has none to name.
    response.device_id = has_device.then_some(user.device_id);
    Ok(response)
}

/// The flows that prove ownership of an account's address, for the media this server sends.
pub(super) fn threepid_flows(state: &AppState) -> Vec<Vec<Stage>> {
    let mut flows = Vec::new();
    if state.email.is_some() {
        flows.push(vec![Stage::EmailIdentity]);
    }
    if state.sms.is_some() {
        flows.push(vec![Stage::Msisdn]);
    }
    flows
}

/// POST /_matrix/client/v3/account/password
///
/// With an access token: a password change, confirmed with the old password. Without one: a
/// reset, confirmed by a code sent to an address bound to the account
/// (`account/password/{email,msisdn}/requestToken`).
async fn change_password(
    state: web::Data<AppState>,
    request: Ruma<change_password::v3::Request>,
) -> Result<change_password::v3::Response> {
    let body = request.body;
    check_new_password(&state, &body.new_password)?;
    let (user_id, keep_device) = match &request.sender {
        Some(user) => {
            let operation = UiaRequest::password("change_password", user, request.client_ip);
            uia::authenticate(&state, body.auth.as_ref(), operation).await?;
            (user.user_id.clone(), Some(user.device_id.clone()))
        }
        None => {
            let flows = threepid_flows(&state);
            if flows.is_empty() {
                return Err(Error::missing_token());
            }
            let operation = UiaRequest {
                operation: "reset_password",
                user: None,
                flows,
                optional: Vec::new(),
                threepid_purpose: Some(Purpose::Reset),
                client_ip: request.client_ip,
                by_appservice: false,
            };
            let done = uia::authenticate(&state, body.auth.as_ref(), operation).await?;
            let sid =
                done.threepid_sids.first().ok_or_else(|| Error::internal("reset without an address"))?;
            let session = state
                .store
                .get_threepid_session(sid)
                .await?
                .ok_or_else(|| Error::internal("verification session vanished"))?;
            let owner =
                state.store.threepid_owner(&session.medium, &session.address).await?.ok_or_else(|| {
                    Error::new(
                        StatusCode::BAD_REQUEST,
                        ErrorKind::ThreepidNotFound,
                        "that address belongs to no account",
                    )
                })?;
            if !state.store.consume_threepid_session(sid).await? {
                return Err(threepid_used());
            }
            (owner, None)
        }
    };
    let hash = password::hash(&body.new_password).await?;
    state.store.set_password_hash(&user_id, Some(&hash)).await?;
    if body.logout_devices {
        remove_devices(&state, &user_id, Removal::AllBut(keep_device.as_deref())).await?;
    }
    tracing::info!(user_id = %user_id, reset = keep_device.is_none(), "password changed");
    Ok(change_password::v3::Response::new())
}

pub(super) fn threepid_used() -> Error {
    Error::new(
        StatusCode::BAD_REQUEST,
        ErrorKind::ThreepidAuthFailed,
        "this verification has already been used",
    )
}

/// POST /_matrix/client/v3/account/deactivate
async fn deactivate(
    state: web::Data<AppState>,
    request: Ruma<deactivate::v3::Request>,
) -> Result<deactivate::v3::Response> {
    // Optional by the spec for servers that can identify the user from UIA alone; Hearth asks
    // for the account's password, so it needs to know whose.
    let user = request.sender.as_ref().ok_or_else(Error::missing_token)?;
    let operation = UiaRequest::password("deactivate", user, request.client_ip);
    uia::authenticate(&state, request.body.auth.as_ref(), operation).await?;
    if request.body.erase {
        // The profile goes while the account can still send: its member events lose the name
        // and avatar in every room. Its events are then served redacted to those who were not
        // in the room when they were sent (`rooms::visibility::erase_for_reader`).
        super::profile::clear(&state, &user.user_id).await?;
        state.store.erase_user(&user.user_id).await?;
    }
    remove_devices(&state, &user.user_id, Removal::AllBut(None)).await?;
    let (store, user_id) = (&state.store, &user.user_id);
    crate::rooms::at_new_position(&state, |position| async move {
        Ok(store.deactivate_user(user_id, position).await?)
    })
    .await?;
    tracing::info!(user_id = %user.user_id, erase = request.body.erase, "deactivated");
    Ok(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}
