//! Access and refresh tokens.
//!
//! An access token is a JWT (HS256) signed with the deployment's secret. It names the user, the
//! device, the session and the session's generation, and expires only when it was issued with a
//! refresh token. The signature and expiry are checked without touching the database; the session
//! row is then looked up, so logout, device deletion, password change and refresh revoke a token
//! at once on every worker (the row is gone, or its generation moved on).
//!
//! Refresh tokens are random and opaque; only their SHA-256 is stored.

use std::{path::Path, time::Duration};

use base64::Engine;
use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind as JwtErrorKind,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    error::{Error, Result},
    storage::SessionRecord,
};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Issuer: the server name, so a token from another deployment never parses as ours.
    iss: String,
    sub: String,
    dev: String,
    sid: String,
    generation: i64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    /// A guest's token: the guest gate reads it here, with no read per request. Absent in
    /// tokens of full accounts (and in those issued before guests existed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    guest: bool,
}

/// What a verified access token says; still to be checked against the session row.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    pub user_id: String,
    pub device_id: String,
    pub session_id: String,
    pub generation: i64,
    pub guest: bool,
}

pub struct TokenService {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    lifetime: Duration,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenService {
    pub fn new(secret: &[u8], issuer: &str, lifetime: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["iss", "sub"]);
        validation.set_issuer(&[issuer]);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            issuer: issuer.to_owned(),
            lifetime,
        }
    }

    /// Issues an access token for the session; with `expiring` it lasts the configured lifetime,
    /// which is returned. `guest` marks the token of a guest account.
    pub fn issue(
        &self,
        session: &SessionRecord,
        expiring: bool,
        guest: bool,
    ) -> Result<(String, Option<Duration>)> {
        let now = unix_now();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: session.user_id.to_string(),
            dev: session.device_id.to_string(),
            sid: session.session_id.clone(),
            generation: session.generation,
            iat: now,
            exp: expiring.then(|| now + self.lifetime.as_secs()),
            guest,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(Error::internal)?;
        Ok((token, expiring.then_some(self.lifetime)))
    }

    /// Checks signature, issuer and expiry. An expired token is a soft logout: the client may
    /// refresh or log in again keeping its device.
    pub fn verify(&self, token: &str) -> Result<TokenClaims> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            match e.kind() {
                JwtErrorKind::ExpiredSignature => Error::unknown_token(true, "access token has expired"),
                _ => Error::unknown_token(false, "unrecognised access token"),
            }
        })?;
        let c = data.claims;
        Ok(TokenClaims {
            user_id: c.sub,
            device_id: c.dev,
            session_id: c.sid,
            generation: c.generation,
            guest: c.guest,
        })
    }
}

/// Reads the token secret from `<data_dir>/token.key`, creating it (mode 0600) on first start.
pub fn load_or_create_secret(data_dir: &Path) -> std::io::Result<Vec<u8>> {
    let path = data_dir.join("token.key");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => return Ok(text.trim().as_bytes().to_vec()),
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is shorter than 32 characters", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(data_dir)?;
    let secret = random_token(48);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(&path)?, secret.as_bytes())?;
    Ok(secret.into_bytes())
}

/// A URL-safe random string from `bytes` bytes of OS randomness.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// SHA-256, hex: how refresh and registration tokens are stored. They are long random strings, so
/// a fast hash is enough (there is nothing to brute-force).
pub fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionRecord {
        SessionRecord {
            session_id: "s1".into(),
            user_id: "@a:localhost".try_into().unwrap(),
            device_id: "DEV".into(),
            generation: 3,
        }
    }

    #[test]
    fn issue_verify_and_tamper() {
        let service = TokenService::new(&[7u8; 32], "localhost", Duration::from_secs(60));
        let (token, lifetime) = service.issue(&session(), true, false).unwrap();
        assert_eq!(lifetime, Some(Duration::from_secs(60)));
        let claims = service.verify(&token).unwrap();
        assert_eq!((claims.user_id.as_str(), claims.generation), ("@a:localhost", 3));

        let other = TokenService::new(&[8u8; 32], "localhost", Duration::from_secs(60));
        assert!(other.verify(&token).is_err(), "a token signed with another secret must fail");
        let foreign = TokenService::new(&[7u8; 32], "elsewhere", Duration::from_secs(60));
        assert!(foreign.verify(&token).is_err(), "a token for another server must fail");
        assert!(service.verify("garbage").is_err());
        assert!(!claims.guest);
        let (guest, _) = service.issue(&session(), false, true).unwrap();
        assert!(service.verify(&guest).unwrap().guest, "a guest's token says so");
    }

    #[test]
    fn expired_tokens_are_soft_logout() {
        let service = TokenService::new(&[7u8; 32], "localhost", Duration::from_secs(0));
        let (token, _) = service.issue(&session(), true, false).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        match service.verify(&token) {
            Err(Error::Matrix { kind: crate::error::ErrorKind::UnknownToken(data), .. }) => {
                assert!(data.soft_logout)
            }
            other => panic!("expected soft logout, got {other:?}"),
        }
    }
}
