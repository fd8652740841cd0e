//! Who is asking: passwords, tokens, User-Interactive Auth, rate limits.

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

/// Verifies an access token: signature and expiry first (no I/O), then the session row, so a
/// revoked token fails on every worker at once.
pub async fn authenticate_token(state: &AppState, token: &str) -> Result<AuthedUser> {
    let claims = state.tokens.verify(token)?;
    let session = state.store.get_session(&claims.session_id).await?;
    match session {
        Some(s)
            if s.generation == claims.generation
                && s.user_id.as_str() == claims.user_id
                && s.device_id.as_str() == claims.device_id =>
        {
            Ok(AuthedUser {
                user_id: s.user_id,
                device_id: s.device_id,
                session_id: s.session_id,
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

/// Opens a session for a device that has just been created or reused, and issues its tokens.
/// With `refreshable` the access token expires and a refresh token comes with it.
pub async fn open_session(
    state: &AppState,
    user_id: &ruma::UserId,
    device_id: &ruma::DeviceId,
    refreshable: bool,
) -> Result<IssuedTokens> {
    let session = crate::storage::SessionRecord {
        session_id: tokens::random_token(18),
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        generation: 0,
    };
    let refresh_token = refreshable.then(|| format!("hrt_{}", tokens::random_token(32)));
    let refresh_hash = refresh_token.as_deref().map(tokens::sha256_hex);
    state
        .store
        .create_session(&session, refresh_hash.as_deref())
        .await?;
    let (access_token, expires_in) = state.tokens.issue(&session, refreshable)?;
    Ok(IssuedTokens {
        access_token,
        refresh_token,
        expires_in,
    })
}
