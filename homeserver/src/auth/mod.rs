//! Who is asking: passwords, tokens, User-Interactive Auth, rate limits.

pub mod jwt_login;
pub mod password;
pub mod ratelimit;
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
    pub device_id: OwnedDeviceId,
    pub session_id: String,
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
    let (access_token, expires_in) = state.tokens.issue(&session, refreshable)?;
    Ok((device_id, IssuedTokens { access_token, refresh_token, expires_in }))
}
