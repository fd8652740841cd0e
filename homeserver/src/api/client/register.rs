//! Registration: `register` (behind User-Interactive Auth), `register/available`, and the
//! registration-token validity check.

use actix_web::{HttpResponse, http::StatusCode, web};
use ruma::{
    OwnedDeviceId, OwnedUserId, UserId,
    api::client::{
        account::{
            check_registration_token_validity, get_username_availability,
            register::{self, LoginType, RegistrationKind},
        },
        uiaa::AuthData,
    },
};

use crate::{
    auth::{
        self, password,
        ratelimit::Action,
        tokens,
        uia::{self, Stage, UiaRequest},
    },
    config::{RegistrationMode, RequiredThreepid},
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::now_ms,
    threepid::Purpose,
};

/// Longest password accepted, in bytes: argon2 hashes anything, but nobody needs more and an
/// unbounded input is an easy way to burn CPU.
pub(super) const MAX_PASSWORD_BYTES: usize = 512;

/// What a registration asks for beside `auth`, kept in its UIA session: a client may send it only
/// in the first step (SyTest: "registration remembers parameters"). The password is kept hashed.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RegistrationParams {
    username: Option<String>,
    password_hash: Option<String>,
    device_id: Option<OwnedDeviceId>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
}

/// How the new account's first device logs in.
struct FirstLogin {
    device_id: Option<OwnedDeviceId>,
    initial_device_display_name: Option<String>,
    inhibit_login: bool,
    refresh_token: bool,
}

impl From<&RegistrationParams> for FirstLogin {
    fn from(params: &RegistrationParams) -> Self {
        Self {
            device_id: params.device_id.clone(),
            initial_device_display_name: params.initial_device_display_name.clone(),
            inhibit_login: params.inhibit_login,
            refresh_token: params.refresh_token,
        }
    }
}

pub(super) fn routes(router: &mut Router) {
    router.add_responding(register).add(get_username_availability).add(check_registration_token_validity);
}

fn invalid_username(message: impl Into<String>) -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidUsername, message)
}

/// Applies the spec's user-id grammar to a requested username (a localpart or a full id here),
/// and keeps the reserved names and application services' exclusive namespaces for their own.
fn parse_username(state: &AppState, username: &str) -> Result<OwnedUserId> {
    let user_id = username_syntax(state, username)?;
    let localpart = user_id.localpart();
    if state.config.registration.reserved_usernames.iter().any(|r| r.eq_ignore_ascii_case(localpart)) {
        // M_EXCLUSIVE, as Synapse answers for the ids it keeps for itself (its server-notices
        // user, application services' namespaces), and as the spec lists for `/register` and
        // `/register/available`: the name is well formed, just not for the taking.
        // M_INVALID_USERNAME would tell the client to fix its syntax.
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::Exclusive,
            format!("the username `{localpart}` is reserved on this server"),
        ));
    }
    if state.appservices.exclusive_user_owner(&user_id).is_some() {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::Exclusive,
            format!("the username `{localpart}` is reserved for an application service"),
        ));
    }
    Ok(user_id)
}

/// The spec's user-id grammar, applied to a localpart or a full id on this server.
fn username_syntax(state: &AppState, username: &str) -> Result<OwnedUserId> {
    let user_id = if username.starts_with('@') {
        UserId::parse(username).map_err(|e| invalid_username(format!("invalid user id: {e}")))?
    } else {
        if username.is_empty() {
            return Err(invalid_username("username must not be empty"));
        }
        UserId::parse_with_server_name(username, &state.server_name)
            .map_err(|e| invalid_username(format!("invalid username: {e}")))?
    };
    if user_id.server_name() != state.server_name {
        return Err(invalid_username(format!("user ids here end in :{}", state.server_name)));
    }
    user_id.validate_strict().map_err(|_| {
        invalid_username("usernames may contain only lower-case letters a-z, digits 0-9 and . _ = - / +")
    })?;
    Ok(user_id)
}

/// A requested username (a localpart, or a full user id) with its localpart in lower case; the
/// server name is left as given (and checked to be this server's).
pub(super) fn lower_localpart(username: &str) -> String {
    match username.strip_prefix('@').and_then(|rest| rest.split_once(':')) {
        Some((localpart, server)) => format!("@{}:{server}", localpart.to_lowercase()),
        None => username.to_lowercase(),
    }
}

fn user_in_use() -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::UserInUse, "that user id is already taken")
}

/// Checks a new password against the configured policy.
pub(super) fn check_new_password(state: &AppState, password: &str) -> Result<()> {
    let min = usize::try_from(state.config.registration.min_password_length).unwrap_or(usize::MAX);
    if password.chars().count() < min {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::WeakPassword,
            format!("password must be at least {min} characters"),
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::invalid_param(format!("password longer than {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

/// A random localpart for registrations that name none.
fn generated_localpart() -> String {
    tokens::random_token(9).to_ascii_lowercase().replace(['_', '-'], "x")
}

/// The UIA flows registration offers: who may register (`registration.mode`) combined with the
/// address they must prove (`registration.require`).
pub(super) fn registration_flows(state: &AppState) -> Result<Vec<Vec<Stage>>> {
    let base = match state.config.registration.mode {
        RegistrationMode::Open => vec![],
        RegistrationMode::Token => vec![Stage::RegistrationToken],
        RegistrationMode::Closed => return Err(Error::forbidden("registration is closed on this server")),
    };
    // Without a required address, the ways to give one anyway that this server can verify are
    // offered beside registering without (as Synapse offers them): the address is then bound.
    let optional: Vec<Option<Stage>> = [
        (!state.config.email.smtp_host.is_empty()).then_some(Stage::EmailIdentity),
        (!state.config.sms.account_sid.is_empty()).then_some(Stage::Msisdn),
    ]
    .into_iter()
    .flatten()
    .map(Some)
    .collect();
    let proofs: Vec<Option<Stage>> = match state.config.registration.require {
        RequiredThreepid::None => std::iter::once(None).chain(optional).collect(),
        RequiredThreepid::Email => vec![Some(Stage::EmailIdentity)],
        RequiredThreepid::Msisdn => vec![Some(Stage::Msisdn)],
        RequiredThreepid::EmailOrMsisdn => vec![Some(Stage::EmailIdentity), Some(Stage::Msisdn)],
    };
    // A required captcha comes first in every flow, as Synapse orders it: it is the cheapest
    // stage to check, and the one that keeps bots from the others (sending codes costs).
    let captcha = state.recaptcha.as_ref().filter(|c| c.required).map(|_| Stage::Recaptcha);
    Ok(proofs
        .iter()
        .map(|proof| {
            let mut flow: Vec<Stage> = captcha.into_iter().chain(base.iter().copied()).collect();
            flow.extend(proof);
            if flow.is_empty() {
                flow.push(Stage::Dummy);
            }
            flow
        })
        .collect())
}

/// The stages registration accepts though no flow needs them: a captcha configured as not
/// required.
fn optional_registration_stages(state: &AppState) -> Vec<Stage> {
    state.recaptcha.as_ref().filter(|c| !c.required).map(|_| Stage::Recaptcha).into_iter().collect()
}

/// POST /_matrix/client/v3/register
///
/// The client IP's registration budget counts attempts, not round trips: a request that starts
/// one (names no UIA session), one refused outright (a taken name, a weak password), and one
/// whose stage failed (a wrong registration token: guesses must cost). Continuing a flow costs
/// nothing, and neither does a failed email or phone stage, which mostly means the code has not
/// been entered yet (clients poll every few seconds meanwhile). So people behind one NAT can
/// each go through a verification flow, while a flood of new or failed attempts is limited.
async fn register(state: web::Data<AppState>, request: Ruma<register::v3::Request>) -> Result<HttpResponse> {
    without_null_device(register_outcome(state, request).await?)
}

/// ruma writes `"device_id": null` for a registration without login (`inhibit_login`); the spec
/// and Synapse leave the key out (SyTest: "registration with inhibit_login inhibits login").
fn without_null_device(response: register::v3::Response) -> Result<HttpResponse> {
    let mut body = super::response_json(response)?;
    if let Some(body) = body.as_object_mut() {
        body.retain(|_, value| !value.is_null());
    }
    Ok(HttpResponse::Ok().json(body))
}

async fn register_outcome(
    state: web::Data<AppState>,
    request: Ruma<register::v3::Request>,
) -> Result<register::v3::Response> {
    if request.body.login_type == Some(LoginType::ApplicationService) {
        // No UIA and no per-IP budget: the service's token is the authority.
        return register_for_appservice(&state, request).await;
    }
    let ip = request.client_ip.to_string();
    state.limiter.peek(Action::Register, &ip).await?;
    let auth = request.body.auth.as_ref();
    let starts_attempt = auth.and_then(AuthData::session).is_none();
    let verifying = matches!(auth, Some(AuthData::EmailIdentity(_) | AuthData::Msisdn(_)));
    let outcome = register_account(&state, request).await;
    let failed = match &outcome {
        Ok(_) => false,
        Err(Error::Uia(info)) => info.auth_error.is_some() && !verifying,
        Err(_) => true,
    };
    if starts_attempt || failed {
        state.limiter.charge(Action::Register, &ip).await;
    }
    outcome
}

async fn register_account(
    state: &AppState,
    request: Ruma<register::v3::Request>,
) -> Result<register::v3::Response> {
    let body = request.body;
    if body.kind == RegistrationKind::Guest {
        return register_guest(state, body, request.client_ip).await;
    }
    let flows = registration_flows(state)?;
    // Check what can be checked before the client goes through UIA. Capitals are lowered, as
    // Synapse does (SyTest: "POST /register downcases capitals in usernames"), rather than
    // refused: logins find the account whatever case is typed. A name is checked for being
    // taken when a session starts; a later step may be the replay of a completed registration
    // (which took it), and the account's creation checks again anyway.
    let mut requested =
        body.username.as_deref().map(|u| parse_username(state, &lower_localpart(u))).transpose()?;
    // A guest becoming a full account keeps its user id (the spec's `guest_access_token`).
    let upgrading = match body.guest_access_token.as_deref() {
        Some(token) => {
            let guest = guest_to_upgrade(state, token, requested.as_deref()).await?;
            requested = Some(guest.clone());
            Some(guest)
        }
        None => None,
    };
    if let Some(user_id) = &requested
        && upgrading.is_none()
        && body.auth.as_ref().and_then(AuthData::session).is_none()
        && state.store.get_user(user_id).await?.is_some()
    {
        return Err(user_in_use());
    }
    if let Some(password) = &body.password {
        check_new_password(state, password)?;
    }
    if let Some(name) = &body.initial_device_display_name
        && name.chars().count() > super::device::MAX_DISPLAY_NAME
    {
        return Err(Error::invalid_param("initial_device_display_name is too long"));
    }

    let operation = UiaRequest {
        operation: "register",
        user: None,
        flows,
        optional: optional_registration_stages(state),
        threepid_purpose: Some(Purpose::Register),
        client_ip: request.client_ip,
        by_appservice: false,
    };
    let sent_params = body.username.is_some()
        || body.password.is_some()
        || body.device_id.is_some()
        || body.initial_device_display_name.is_some()
        || body.inhibit_login
        || body.refresh_token;
    let params = if sent_params {
        let password_hash = match &body.password {
            Some(password) => Some(password::hash(password).await?),
            None => None,
        };
        let params = RegistrationParams {
            username: requested.as_ref().map(|user_id| user_id.localpart().to_owned()),
            password_hash,
            device_id: body.device_id.clone(),
            initial_device_display_name: body.initial_device_display_name.clone(),
            inhibit_login: body.inhibit_login,
            refresh_token: body.refresh_token,
        };
        Some(serde_json::to_string(&params).map_err(Error::internal)?)
    } else {
        None
    };
    let done = uia::authenticate_remembering(state, body.auth.as_ref(), operation, params).await?;
    let params: RegistrationParams = match &done.params {
        Some(stored) => serde_json::from_str(stored).map_err(Error::internal)?,
        None => RegistrationParams::default(),
    };
    if let Some(registered) = &done.result {
        // The replay of a completed registration: the same account, logged in again.
        let user_id = UserId::parse(registered.as_str()).map_err(Error::internal)?;
        return first_login(state, user_id, &FirstLogin::from(&params), request.client_ip, false).await;
    }
    let requested = params.username.as_deref().map(|u| parse_username(state, u)).transpose()?;
    // The addresses the flow proved must still be free when the account is made.
    let mut proven = Vec::new();
    for sid in &done.threepid_sids {
        let session = state
            .store
            .get_threepid_session(sid)
            .await?
            .ok_or_else(|| Error::internal("verification session vanished"))?;
        if state.store.threepid_owner(&session.medium, &session.address).await?.is_some() {
            return Err(threepid_in_use());
        }
        proven.push(session);
    }

    let hash = params.password_hash.as_deref().ok_or_else(|| Error::missing_param("password is required"))?;
    let user_id = match requested {
        Some(user_id) if upgrading.is_some() => {
            if !state.store.upgrade_guest(&user_id, hash).await? {
                return Err(Error::forbidden("that account is no longer a guest account"));
            }
            user_id
        }
        Some(user_id) => {
            if !state.store.create_user(&user_id, Some(hash), false).await? {
                return Err(user_in_use());
            }
            user_id
        }
        None => loop {
            let user_id = UserId::parse_with_server_name(generated_localpart(), &state.server_name)
                .map_err(Error::internal)?;
            if state.store.create_user(&user_id, Some(hash), false).await? {
                break user_id;
            }
        },
    };
    for session in proven {
        if !state.store.consume_threepid_session(&session.sid).await? {
            return Err(super::account::threepid_used());
        }
        let validated = session.validated_ts.unwrap_or_else(now_ms);
        if !state.store.bind_threepid(&user_id, &session.medium, &session.address, validated).await? {
            return Err(threepid_in_use());
        }
    }
    tracing::info!(user_id = %user_id, "registered");
    if let Some(session_id) = &done.session_id {
        uia::set_result(state, session_id, user_id.as_str()).await?;
    }

    first_login(state, user_id, &FirstLogin::from(&params), request.client_ip, false).await
}

/// The guest account a `guest_access_token` belongs to, when `username` (if given) names it:
/// a guest may upgrade only itself.
async fn guest_to_upgrade(state: &AppState, token: &str, username: Option<&UserId>) -> Result<OwnedUserId> {
    let not_yours = || Error::forbidden("guest_access_token is not the access token of this guest account");
    let guest = auth::authenticate_token(state, token).await.map_err(|_| not_yours())?;
    if !guest.is_guest || username.is_some_and(|user| user != guest.user_id) {
        return Err(not_yours());
    }
    Ok(guest.user_id)
}

/// `POST /register?kind=guest`: a guest account with a random localpart, no password and no UIA,
/// when `registration.allow_guests` is on. The body's other fields (username, password) are
/// ignored, as Synapse does; only the device fields are used.
async fn register_guest(
    state: &AppState,
    mut body: register::v3::Request,
    client_ip: std::net::IpAddr,
) -> Result<register::v3::Response> {
    if !state.config.registration.allow_guests {
        return Err(Error::new(
            StatusCode::FORBIDDEN,
            ErrorKind::GuestAccessForbidden,
            "guest access is disabled",
        ));
    }
    if let Some(name) = &body.initial_device_display_name
        && name.chars().count() > super::device::MAX_DISPLAY_NAME
    {
        return Err(Error::invalid_param("initial_device_display_name is too long"));
    }
    let user_id = loop {
        let user_id = UserId::parse_with_server_name(generated_localpart(), &state.server_name)
            .map_err(Error::internal)?;
        if state.store.create_guest(&user_id).await? {
            break user_id;
        }
    };
    tracing::info!(user_id = %user_id, "registered a guest");
    // A guest without a token could never use the account: `inhibit_login` is not honoured.
    body.inhibit_login = false;
    let login = FirstLogin {
        device_id: body.device_id,
        initial_device_display_name: body.initial_device_display_name,
        inhibit_login: body.inhibit_login,
        refresh_token: body.refresh_token,
    };
    first_login(state, user_id, &login, client_ip, true).await
}

/// `POST /register` with `type: m.login.application_service` and the service's `as_token`: a user
/// of the service's user namespace, without a password.
async fn register_for_appservice(
    state: &AppState,
    request: Ruma<register::v3::Request>,
) -> Result<register::v3::Response> {
    let appservice = request.sender.require()?;
    let body = request.body;
    let username = body.username.as_deref().ok_or_else(|| Error::missing_param("username is required"))?;
    let user_id = username_syntax(state, username)?;
    let exclusive = |message: String| Error::new(StatusCode::BAD_REQUEST, ErrorKind::Exclusive, message);
    if !appservice.is_user_match(&user_id) {
        return Err(exclusive(format!("{user_id} is outside the application service's user namespaces")));
    }
    if state.appservices.exclusive_user_owner(&user_id).is_some_and(|owner| owner.id() != appservice.id()) {
        return Err(exclusive(format!("{user_id} is in another application service's exclusive namespace")));
    }
    if let Some(name) = &body.initial_device_display_name
        && name.chars().count() > super::device::MAX_DISPLAY_NAME
    {
        return Err(Error::invalid_param("initial_device_display_name is too long"));
    }
    if !state.store.create_user(&user_id, None, false).await? {
        return Err(user_in_use());
    }
    tracing::info!(user_id = %user_id, appservice = appservice.id(), "registered by an application service");
    let login = FirstLogin {
        device_id: body.device_id,
        initial_device_display_name: body.initial_device_display_name,
        inhibit_login: body.inhibit_login,
        refresh_token: body.refresh_token,
    };
    first_login(state, user_id, &login, request.client_ip, false).await
}

/// The answer to a registration: the new account's first device logged in, unless the client
/// asked not to (`inhibit_login`).
async fn first_login(
    state: &AppState,
    user_id: OwnedUserId,
    login: &FirstLogin,
    client_ip: std::net::IpAddr,
    guest: bool,
) -> Result<register::v3::Response> {
    let mut response = register::v3::Response::new(user_id.clone());
    if !login.inhibit_login {
        let (device_id, tokens) = auth::log_in(
            state,
            &user_id,
            login.device_id.clone(),
            login.initial_device_display_name.as_deref(),
            client_ip,
            login.refresh_token,
            guest,
        )
        .await?;
        response.device_id = Some(device_id);
        response.access_token = Some(tokens.access_token);
        response.refresh_token = tokens.refresh_token;
        response.expires_in = tokens.expires_in;
    }
    Ok(response)
}

pub(super) fn threepid_in_use() -> Error {
    Error::new(
        StatusCode::BAD_REQUEST,
        ErrorKind::ThreepidInUse,
        "that address is already bound to an account",
    )
}

/// GET /_matrix/client/v3/register/available
async fn get_username_availability(
    state: web::Data<AppState>,
    request: Ruma<get_username_availability::v3::Request>,
) -> Result<get_username_availability::v3::Response> {
    state.limiter.check_ip(Action::Register, request.client_ip).await?;
    let user_id = parse_username(&state, &request.body.username)?;
    if state.store.get_user(&user_id).await?.is_some() {
        return Err(user_in_use());
    }
    Ok(get_username_availability::v3::Response::new(true))
}

/// GET /_matrix/client/v1/register/m.login.registration_token/validity
async fn check_registration_token_validity(
    state: web::Data<AppState>,
    request: Ruma<check_registration_token_validity::v1::Request>,
) -> Result<check_registration_token_validity::v1::Response> {
    state.limiter.check_ip(Action::Register, request.client_ip).await?;
    if state.config.registration.mode != RegistrationMode::Token {
        return Err(Error::forbidden("registration tokens are not in use on this server"));
    }
    let valid =
        state.store.registration_token_valid(&tokens::sha256_hex(&request.body.token), now_ms()).await?;
    Ok(check_registration_token_validity::v1::Response::new(valid))
}
