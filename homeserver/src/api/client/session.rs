//! Sessions: `login`, `logout`, `logout/all`, `refresh`.

use actix_web::web;
use ruma::{
    OwnedUserId, UserId,
    api::client::{
        session::{
            get_login_types::{
                self,
                v3::{LoginType, PasswordLoginType},
            },
            login::{
                self,
                v3::{DiscoveryInfo, HomeserverInfo, LoginInfo},
            },
            logout, logout_all, refresh_token,
        },
        uiaa::UserIdentifier,
    },
};

use super::device::MAX_DISPLAY_NAME;
use crate::{
    auth::{self, password, ratelimit::Action, tokens},
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(get_login_types).add(login).add(logout).add(logout_all).add(refresh);
}

/// GET /_matrix/client/v3/login
async fn get_login_types(
    _: web::Data<AppState>,
    _: Ruma<get_login_types::v3::Request>,
) -> Result<get_login_types::v3::Response> {
    Ok(get_login_types::v3::Response::new(vec![LoginType::Password(PasswordLoginType::new())]))
}

/// Resolves `m.id.user` (a localpart or a full id on this server) to a user id.
pub(super) fn user_from_identifier(state: &AppState, user: &str) -> Result<OwnedUserId> {
    let forbidden = || Error::forbidden("invalid username or password");
    let user_id = if user.starts_with('@') {
        UserId::parse(user).map_err(|_| forbidden())?
    } else {
        UserId::parse_with_server_name(user.to_lowercase(), &state.server_name).map_err(|_| forbidden())?
    };
    if user_id.server_name() != state.server_name {
        return Err(forbidden());
    }
    Ok(user_id)
}

/// POST /_matrix/client/v3/login
async fn login(state: web::Data<AppState>, request: Ruma<login::v3::Request>) -> Result<login::v3::Response> {
    state.limiter.check(Action::Login, request.client_ip)?;
    let body = request.body;
    let LoginInfo::Password(info) = &body.login_info else {
        return Err(Error::new(
            actix_web::http::StatusCode::BAD_REQUEST,
            ErrorKind::Unknown,
            "unsupported login type; supported: m.login.password",
        ));
    };
    #[allow(deprecated)] // `user` is the pre-r0.4 form some clients still send.
    let name = match (&info.identifier, &info.user) {
        (Some(UserIdentifier::Matrix(id)), _) => id.user.clone(),
        (None, Some(user)) => user.clone(),
        (Some(_), _) => {
            return Err(Error::new(
                actix_web::http::StatusCode::BAD_REQUEST,
                ErrorKind::Unknown,
                "unsupported identifier type; supported: m.id.user",
            ));
        }
        (None, None) => return Err(Error::missing_param("identifier is required")),
    };
    let user_id = user_from_identifier(&state, &name)?;
    let record = state.store.get_user(&user_id).await?;
    let valid =
        password::verify(&info.password, record.as_ref().and_then(|r| r.password_hash.as_deref())).await?;
    let record = match record {
        Some(record) if valid => record,
        Some(record) if record.deactivated => {
            return Err(Error::new(
                actix_web::http::StatusCode::FORBIDDEN,
                ErrorKind::UserDeactivated,
                "this account has been deactivated",
            ));
        }
        _ => return Err(Error::forbidden("invalid username or password")),
    };
    if let Some(name) = &body.initial_device_display_name
        && name.chars().count() > MAX_DISPLAY_NAME
    {
        return Err(Error::invalid_param(format!("display name longer than {MAX_DISPLAY_NAME} characters")));
    }
    let (device_id, tokens) = auth::log_in(
        &state,
        &record.user_id,
        body.device_id,
        body.initial_device_display_name.as_deref(),
        request.client_ip,
        body.refresh_token,
    )
    .await?;
    let mut response = login::v3::Response::new(record.user_id, tokens.access_token, device_id);
    response.refresh_token = tokens.refresh_token;
    response.expires_in = tokens.expires_in;
    response.well_known = Some(DiscoveryInfo::new(HomeserverInfo::new(state.config.base_url())));
    Ok(response)
}

/// POST /_matrix/client/v3/logout
async fn logout(
    state: web::Data<AppState>,
    request: Ruma<logout::v3::Request>,
) -> Result<logout::v3::Response> {
    let user = request.sender;
    state.store.delete_devices(&user.user_id, &[user.device_id]).await?;
    Ok(logout::v3::Response::new())
}

/// POST /_matrix/client/v3/logout/all
async fn logout_all(
    state: web::Data<AppState>,
    request: Ruma<logout_all::v3::Request>,
) -> Result<logout_all::v3::Response> {
    state.store.delete_devices_except(&request.sender.user_id, None).await?;
    Ok(logout_all::v3::Response::new())
}

/// POST /_matrix/client/v3/refresh
async fn refresh(
    state: web::Data<AppState>,
    request: Ruma<refresh_token::v3::Request>,
) -> Result<refresh_token::v3::Response> {
    let new_refresh = format!("hrt_{}", tokens::random_token(32));
    let session = state
        .store
        .refresh_session(&tokens::sha256_hex(&request.body.refresh_token), &tokens::sha256_hex(&new_refresh))
        .await?
        .ok_or_else(|| Error::unknown_token(false, "unknown or already used refresh token"))?;
    let (access_token, expires_in) = state.tokens.issue(&session, true)?;
    let mut response = refresh_token::v3::Response::new(access_token);
    response.refresh_token = Some(new_refresh);
    response.expires_in_ms = expires_in;
    Ok(response)
}
