//! The account: `account/whoami`, `account/password`, `account/deactivate`.

use actix_web::web;
use ruma::api::client::account::{ThirdPartyIdRemovalStatus, change_password, deactivate, whoami};

use super::register::check_new_password;
use crate::{
    auth::{
        password,
        uia::{self, Stage, UiaRequest},
    },
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(whoami).add(change_password).add(deactivate);
}

/// GET /_matrix/client/v3/account/whoami
async fn whoami(_: web::Data<AppState>, request: Ruma<whoami::v3::Request>) -> Result<whoami::v3::Response> {
    let user = request.sender;
    let mut response = whoami::v3::Response::new(user.user_id, false);
    response.device_id = Some(user.device_id);
    Ok(response)
}

/// POST /_matrix/client/v3/account/password
async fn change_password(
    state: web::Data<AppState>,
    request: Ruma<change_password::v3::Request>,
) -> Result<change_password::v3::Response> {
    // Optional by the spec so that a password reset can work without a session; that flow
    // (proving an email address or phone number) comes with one-time codes.
    let user = request.sender.as_ref().ok_or_else(Error::missing_token)?;
    let body = request.body;
    check_new_password(&state, &body.new_password)?;
    let flows = vec![vec![Stage::Password]];
    uia::authenticate(
        &state,
        body.auth.as_ref(),
        UiaRequest { operation: "change_password", user: Some(&user.user_id), flows },
    )
    .await?;
    let hash = password::hash(&body.new_password).await?;
    state.store.set_password_hash(&user.user_id, Some(&hash)).await?;
    if body.logout_devices {
        state.store.delete_devices_except(&user.user_id, Some(&user.device_id)).await?;
    }
    Ok(change_password::v3::Response::new())
}

/// POST /_matrix/client/v3/account/deactivate
async fn deactivate(
    state: web::Data<AppState>,
    request: Ruma<deactivate::v3::Request>,
) -> Result<deactivate::v3::Response> {
    let user = request.sender.as_ref().ok_or_else(Error::missing_token)?;
    let flows = vec![vec![Stage::Password]];
    uia::authenticate(
        &state,
        request.body.auth.as_ref(),
        UiaRequest { operation: "deactivate", user: Some(&user.user_id), flows },
    )
    .await?;
    state.store.deactivate_user(&user.user_id).await?;
    tracing::info!(user_id = %user.user_id, "deactivated");
    Ok(deactivate::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}
