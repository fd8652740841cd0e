//! Sessions: `login`, `logout`, `logout/all`, `refresh`.

use std::net::IpAddr;

use actix_web::{http::StatusCode, web};
use ruma::{
    OwnedUserId, UserId,
    api::client::{
        session::{
            get_login_types::{
                self,
                v3::{ApplicationServiceLoginType, LoginType, PasswordLoginType},
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

use super::device::{MAX_DISPLAY_NAME, Removal, remove_devices};
use crate::{
    appservice::AppserviceAuth,
    auth::{self, jwt_login, password, ratelimit::Action, tokens},
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::UserRecord,
    threepid::{self, Purpose},
};

pub(super) fn routes(router: &mut Router) {
    router.add(get_login_types).add(login).add(logout).add(logout_all).add(refresh);
}

/// Hearth's code login: a code sent to an address bound to the account
/// (`/_matrix/client/unstable/chat.hearth.login.otp/requestToken`), then `{sid, client_secret,
/// token}` here.
pub const OTP_LOGIN_TYPE: &str = "chat.hearth.login.otp";

/// GET /_matrix/client/v3/login
async fn get_login_types(
    state: web::Data<AppState>,
    _: Ruma<get_login_types::v3::Request>,
) -> Result<get_login_types::v3::Response> {
    let mut flows = vec![LoginType::Password(PasswordLoginType::new())];
    if !state.appservices.is_empty() {
        flows.push(LoginType::ApplicationService(ApplicationServiceLoginType::new()));
    }
    let custom = |name: &str| LoginType::new(name, serde_json::Map::new()).map_err(Error::internal);
    if state.jwt_login.is_some() {
        flows.push(custom(jwt_login::LOGIN_TYPE)?);
    }
    if state.email.is_some() || state.sms.is_some() {
        flows.push(custom(OTP_LOGIN_TYPE)?);
    }
    Ok(get_login_types::v3::Response::new(flows))
}

fn invalid_login() -> Error {
    Error::forbidden("invalid username or password")
}

/// Resolves `m.id.user` (a localpart or a full id on this server) to a user id. Usernames are
/// matched whatever their case, as Synapse does: every account here has a lower-case id
/// (registration lowers the requested name), so the name is lowered.
fn user_from_name(state: &AppState, user: &str) -> Result<OwnedUserId> {
    let user = super::register::lower_localpart(user);
    let user_id = if user.starts_with('@') {
        UserId::parse(&user).map_err(|_| invalid_login())?
    } else {
        UserId::parse_with_server_name(user, &state.server_name).map_err(|_| invalid_login())?
    };
    if user_id.server_name() != state.server_name {
        return Err(invalid_login());
    }
    Ok(user_id)
}

/// Resolves any identifier to the account it names: a user id, or an address bound to one.
/// Unknown addresses fail exactly like wrong passwords.
async fn user_from_identifier(state: &AppState, identifier: &UserIdentifier) -> Result<Option<OwnedUserId>> {
    let (medium, address) = match identifier {
        UserIdentifier::Matrix(id) => return user_from_name(state, &id.user).map(Some),
        UserIdentifier::Email(email) => ("email", threepid::normalize_email(&email.address)),
        UserIdentifier::Msisdn(msisdn) => ("msisdn", threepid::normalize_phone(None, &msisdn.number)),
        UserIdentifier::PhoneNumber(phone) => {
            ("msisdn", threepid::normalize_phone(Some(&phone.country), &phone.phone))
        }
        _ => {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::Unknown,
                "unsupported identifier type; supported: m.id.user, m.id.thirdparty, m.id.phone",
            ));
        }
    };
    let Ok(address) = address else { return Ok(None) };
    Ok(state.store.threepid_owner(medium, &address).await?)
}

/// Proves who is logging in, by whichever login type they used.
async fn authenticate_login(
    state: &AppState,
    info: &LoginInfo,
    client_ip: IpAddr,
    appservice: &AppserviceAuth,
) -> Result<UserRecord> {
    let user_id = match info {
        LoginInfo::ApplicationService(info) => {
            // The service's token vouches for the users of its namespace; no password.
            let appservice = appservice.require()?;
            #[allow(deprecated)] // `user` is the pre-r0.4 form.
            let user_id = match (&info.identifier, &info.user) {
                (Some(UserIdentifier::Matrix(id)), _) => user_from_name(state, &id.user)?,
                (Some(_), _) => {
                    return Err(Error::invalid_param("an application service logs in with m.id.user"));
                }
                (None, Some(user)) => user_from_name(state, user)?,
                (None, None) => return Err(Error::missing_param("identifier is required")),
            };
            if !appservice.is_user_match(&user_id) {
                return Err(Error::new(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::Exclusive,
                    format!("{user_id} is outside the application service's user namespaces"),
                ));
            }
            user_id
        }
        LoginInfo::Password(info) => {
            #[allow(deprecated)] // `user` is the pre-r0.4 form some clients still send.
            let user_id = match (&info.identifier, &info.user) {
                (Some(identifier), _) => user_from_identifier(state, identifier).await?,
                (None, Some(user)) => Some(user_from_name(state, user)?),
                (None, None) => return Err(Error::missing_param("identifier is required")),
            };
            let record = match &user_id {
                Some(user_id) => state.store.get_user(user_id).await?,
                None => None,
            };
            let hash = record.as_ref().and_then(|r| r.password_hash.as_deref());
            // Wrong passwords are limited per account from any IP (the per-IP login limit alone
            // lets a botnet guess on), and per IP; right ones are not counted.
            let attempt =
                state.limiter.password_attempt(user_id.as_ref().map(|u| u.as_str()), client_ip).await?;
            let valid = password::verify(&info.password, hash).await?;
            if valid {
                attempt.succeeded().await;
            }
            return match record {
                Some(record) if valid => Ok(record),
                Some(record) if record.deactivated => Err(deactivated()),
                _ => Err(invalid_login()),
            };
        }
        LoginInfo::_Custom(_) if info.login_type() == jwt_login::LOGIN_TYPE => {
            let verifier = state.jwt_login.as_ref().ok_or_else(|| unsupported_login_type(info))?;
            let token = info.data().get("token").and_then(|t| t.as_str()).map(str::to_owned);
            let token = token.ok_or_else(|| Error::missing_param("token is required"))?;
            let localpart = verifier.verify(&token)?;
            let user_id = UserId::parse_with_server_name(localpart, &state.server_name)
                .map_err(|e| Error::forbidden(format!("the JWT names an invalid user: {e}")))?;
            if verifier.create_users && state.store.create_user(&user_id, None, false).await? {
                tracing::info!(user_id = %user_id, "created on first JWT login");
            }
            user_id
        }
        LoginInfo::_Custom(_) if info.login_type() == OTP_LOGIN_TYPE => {
            let data = info.data();
            let field = |name: &str| {
                data.get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| Error::missing_param(format!("{name} is required")))
            };
            let (sid, secret, code) = (field("sid")?, field("client_secret")?, field("token")?);
            let session = threepid::submit_code(state, &sid, &secret, &code).await?;
            if session.purpose != Purpose::Login.as_str()
                || !state.store.consume_threepid_session(&sid).await?
            {
                return Err(super::account::threepid_used());
            }
            state.store.threepid_owner(&session.medium, &session.address).await?.ok_or_else(invalid_login)?
        }
        other => return Err(unsupported_login_type(other)),
    };
    match state.store.get_user(&user_id).await? {
        Some(record) if record.deactivated => Err(deactivated()),
        Some(record) => Ok(record),
        None => Err(Error::forbidden("no such account")),
    }
}

fn deactivated() -> Error {
    Error::new(StatusCode::FORBIDDEN, ErrorKind::UserDeactivated, "this account has been deactivated")
}

fn unsupported_login_type(info: &LoginInfo) -> Error {
    Error::new(
        StatusCode::BAD_REQUEST,
        ErrorKind::Unknown,
        format!("login type `{}` is not supported here; GET /login lists those that are", info.login_type()),
    )
}

/// POST /_matrix/client/v3/login
async fn login(state: web::Data<AppState>, request: Ruma<login::v3::Request>) -> Result<login::v3::Response> {
    state.limiter.check_ip(Action::Login, request.client_ip).await?;
    let body = request.body;
    if let Some(name) = &body.initial_device_display_name
        && name.chars().count() > MAX_DISPLAY_NAME
    {
        return Err(Error::invalid_param(format!("display name longer than {MAX_DISPLAY_NAME} characters")));
    }
    let record = authenticate_login(&state, &body.login_info, request.client_ip, &request.sender).await?;
    let (device_id, tokens) = auth::log_in(
        &state,
        &record.user_id,
        body.device_id,
        body.initial_device_display_name.as_deref(),
        request.client_ip,
        body.refresh_token,
        record.is_guest,
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
    remove_devices(&state, &user.user_id, Removal::These(&[user.device_id])).await?;
    Ok(logout::v3::Response::new())
}

/// POST /_matrix/client/v3/logout/all
async fn logout_all(
    state: web::Data<AppState>,
    request: Ruma<logout_all::v3::Request>,
) -> Result<logout_all::v3::Response> {
    remove_devices(&state, &request.sender.user_id, Removal::AllBut(None)).await?;
    Ok(logout_all::v3::Response::new())
}

/// POST /_matrix/client/v3/refresh
async fn refresh(
    state: web::Data<AppState>,
    request: Ruma<refresh_token::v3::Request>,
) -> Result<refresh_token::v3::Response> {
    let new_refresh = format!("hrt_{}", tokens::random_token(32));
    let (old_hash, new_hash) =
        (tokens::sha256_hex(&request.body.refresh_token), tokens::sha256_hex(&new_refresh));
    let store = &state.store;
    let session = crate::rooms::at_new_position(&state, |position| async move {
        Ok(store.refresh_session(&old_hash, &new_hash, position).await?)
    })
    .await?
    .ok_or_else(|| Error::unknown_token(false, "unknown or already used refresh token"))?;
    // A guest's refreshed token is a guest's still.
    let guest = state.store.get_user(&session.user_id).await?.is_some_and(|user| user.is_guest);
    let (access_token, expires_in) = state.tokens.issue(&session, true, guest)?;
    let mut response = refresh_token::v3::Response::new(access_token);
    response.refresh_token = Some(new_refresh);
    response.expires_in_ms = expires_in;
    Ok(response)
}
