//! Who is asking: passwords, tokens, User-Interactive Auth, rate limits.

pub mod guest;
pub mod jwt_login;
pub mod password;
pub mod ratelimit;
pub mod recaptcha;
pub mod tokens;
pub mod uia;

use ruma::{OwnedDeviceId, OwnedUserId};

use crate::{
    error::{Error, Result},
    state::AppState,
};

/// The user and device behind a valid access token.
#[derive(Debug, Clone)]
pub struct AuthedUser {
    pub user_id: OwnedUserId,
    /// Empty for an application service acting without `device_id` (see [`AuthedUser::has_device`]).
    pub device_id: OwnedDeviceId,
    pub session_id: String,
    /// The application service whose `as_token` the request carried.
    pub appservice: Option<std::sync::Arc<crate::appservice::Appservice>>,
    /// A guest account: only the endpoints of [`guest::allowed`] serve it.
    pub is_guest: bool,
}

impl AuthedUser {
    /// Whether the request acts with a device: always, except for an application service that
    /// named none (the spec: such requests fail where a device is needed).
    pub fn has_device(&self) -> bool {
        !self.device_id.as_str().is_empty()
    }

    /// Whether per-user rate limits pass this request: an application service acting as its own
    /// user (the spec: "the sender is excluded"), or as a user of its namespace when registered
    /// with `rate_limited: false`.
    pub fn exempt_from_rate_limits(&self) -> bool {
        self.appservice.as_ref().is_some_and(|a| a.sender == self.user_id || !a.rate_limited())
    }

    /// Refuses requests that need a device but act without one.
    pub fn require_device(&self) -> Result<&ruma::DeviceId> {
        if self.has_device() {
            Ok(&self.device_id)
        } else {
            Err(Error::new(
                actix_web::http::StatusCode::BAD_REQUEST,
                crate::error::ErrorKind::UnknownDevice,
                "this request needs a device: an application service names one with the device_id query parameter",
            ))
        }
    }
}

/// Authenticates a request's access token: an application service's `as_token` (acting as the
/// user and device that the `user_id` and `device_id` query parameters name, see
/// [`authenticate_appservice`]), or a user's access token ([`authenticate_token`]).
pub async fn authenticate_request(state: &AppState, token: &str, query: &str) -> Result<AuthedUser> {
    match state.appservices.by_token(token) {
        Some(appservice) => authenticate_appservice(state, appservice, query).await,
        None => authenticate_token(state, token).await,
    }
}

/// The spec's identity assertion: an application service acts as its own user, or as the user
/// of its user namespace named by `user_id`, and with the device named by `device_id` if any.
async fn authenticate_appservice(
    state: &AppState,
    appservice: std::sync::Arc<crate::appservice::Appservice>,
    query: &str,
) -> Result<AuthedUser> {
    let params = actix_web::web::Query::<std::collections::BTreeMap<String, String>>::from_query(query).ok();
    let param = |name: &str| params.as_ref().and_then(|p| p.get(name)).filter(|v| !v.is_empty());
    let user_id = match param("user_id") {
        None => appservice.sender.clone(),
        Some(raw) => {
            let user_id = OwnedUserId::try_from(raw.as_str())
                .map_err(|e| Error::invalid_param(format!("user_id is not a user id: {e}")))?;
            if !appservice.is_user_match(&user_id) {
                return Err(Error::forbidden(
                    "the application service cannot act as this user: it is outside its user namespaces",
                ));
            }
            user_id
        }
    };
    if user_id != appservice.sender {
        match state.store.get_user(&user_id).await? {
            Some(record) if !record.deactivated => {}
            Some(_) => return Err(Error::forbidden("this user has been deactivated")),
            None => return Err(Error::forbidden("the application service has not registered this user")),
        }
    }
    let device_id = match param("device_id") {
        None => OwnedDeviceId::from(""),
        Some(raw) => {
            let device_id = OwnedDeviceId::from(raw.as_str());
            if raw.len() > MAX_DEVICE_ID || state.store.get_device(&user_id, &device_id).await?.is_none() {
                return Err(Error::new(
                    actix_web::http::StatusCode::BAD_REQUEST,
                    crate::error::ErrorKind::UnknownDevice,
                    "no such device for this user",
                ));
            }
            device_id
        }
    };
    Ok(AuthedUser {
        user_id,
        device_id,
        session_id: String::new(),
        appservice: Some(appservice),
        is_guest: false,
    })
}

/// Verifies an access token: signature and expiry first (no I/O), then its session, so a
/// revoked token fails on every worker at once.
pub async fn authenticate_token(state: &AppState, token: &str) -> Result<AuthedUser> {
    let claims = state.tokens.verify(token)?;
    // Revocation is instant on every worker: the window is brought up to date first (one read
    // shared by every request in flight), and a session read before a revocation it shows is
    // read again.
    let upto = state.recent.catch_up(&*state.store).await?;
    let session = state.recent.session(&*state.store, &claims.session_id, &claims.user_id, upto).await?;
    match session.as_deref() {
        Some(s)
            if s.generation == claims.generation
                && s.user_id.as_str() == claims.user_id
                && s.device_id.as_str() == claims.device_id =>
        {
            Ok(AuthedUser {
                user_id: s.user_id.clone(),
                device_id: s.device_id.clone(),
                session_id: s.session_id.clone(),
                appservice: None,
                is_guest: claims.guest,
            })
        }
        _ => Err(Error::unknown_token(false, "access token has been revoked")),
    }
}

/// The tokens handed to a client at login, registration or refresh.
#[derive(Debug)]
pub struct IssuedTokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: Option<std::time::Duration>,
}

/// Longest device id a client may choose, in bytes.
const MAX_DEVICE_ID: usize = 255;

/// A fresh device id: ten upper-case letters, as other homeservers make them.
fn new_device_id() -> ruma::OwnedDeviceId {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..10).map(|_| char::from(rng.gen_range(b'A'..=b'Z'))).collect::<String>().into()
}

/// Logs a device in after its user proved who they are (login or registration): creates the
/// device, or reuses the one the client named (its old tokens die), opens a session and issues
/// its tokens. With `refreshable` the access token expires and a refresh token comes with it.
pub async fn log_in(
    state: &AppState,
    user_id: &ruma::UserId,
    device_id: Option<ruma::OwnedDeviceId>,
    display_name: Option<&str>,
    ip: std::net::IpAddr,
    refreshable: bool,
    guest: bool,
) -> Result<(ruma::OwnedDeviceId, IssuedTokens)> {
    let device_id = match device_id {
        Some(id) if id.as_str().is_empty() || id.as_str().len() > MAX_DEVICE_ID => {
            return Err(Error::invalid_param(format!("device_id must be 1 to {MAX_DEVICE_ID} bytes")));
        }
        Some(id) => id,
        None => new_device_id(),
    };
    let session = crate::storage::SessionRecord {
        session_id: tokens::random_token(18),
        user_id: user_id.to_owned(),
        device_id: device_id.clone(),
        generation: 0,
    };
    let refresh_token = refreshable.then(|| format!("hrt_{}", tokens::random_token(32)));
    let refresh_hash = refresh_token.as_deref().map(tokens::sha256_hex);
    let (store, ip) = (&state.store, ip.to_string());
    let (session_ref, refresh_hash) = (&session, refresh_hash.as_deref());
    crate::rooms::at_new_position(state, |position| async move {
        Ok(store.login_device(session_ref, refresh_hash, display_name, Some(&ip), position).await?)
    })
    .await?;
    let (access_token, expires_in) = state.tokens.issue(&session, refreshable, guest)?;
    Ok((device_id, IssuedTokens { access_token, refresh_token, expires_in }))
}
