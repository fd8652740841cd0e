//! Verified addresses: one-time codes sent by email or SMS, and the sessions that prove an
//! address for one purpose (registration, adding it to an account, a password reset, a login).
//!
//! A code is six digits from the OS's CSPRNG. It is stored only as an HMAC keyed with the
//! server's secret (six digits alone would fall to a dictionary if the table leaked), expires
//! after `threepid.code_lifetime_secs`, and dies after `threepid.max_attempts` wrong guesses.
//! Sends are rate-limited per address and per client IP. Codes never appear in a response or a
//! log line.

pub mod delivery;
pub mod templates;

use std::net::IpAddr;

use actix_web::http::StatusCode;
use hmac::{Hmac, Mac};
use rand::Rng;
use ruma::thirdparty::Medium;
use sha2::Sha256;

use crate::{
    auth::{ratelimit::Action, tokens},
    error::{Error, ErrorKind, Result},
    state::AppState,
    storage::{ThreepidSession, now_ms},
};

/// What a verification session proves its address for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Register,
    Add,
    Reset,
    Login,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::Add => "add",
            Purpose::Reset => "reset",
            Purpose::Login => "login",
        }
    }

    /// For people, in the message that carries the code.
    fn words(self) -> &'static str {
        match self {
            Purpose::Register => "to register a new account",
            Purpose::Add => "to add this address to your account",
            Purpose::Reset => "to reset your password",
            Purpose::Login => "to sign in",
        }
    }
}

/// How long a verified session can still be used by the request it was made for.
const VERIFIED_SESSION_LIFETIME_MS: i64 = 24 * 60 * 60 * 1000;
/// Longest email address accepted (RFC 5321's path limit).
const MAX_EMAIL: usize = 254;
/// Longest client secret accepted; the spec's grammar allows 255 characters.
const MAX_CLIENT_SECRET: usize = 255;

pub fn medium_str(medium: &Medium) -> &str {
    medium.as_str()
}

fn threepid_error(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Error {
    Error::new(status, kind, message)
}

fn auth_failed(message: impl Into<String>) -> Error {
    threepid_error(StatusCode::BAD_REQUEST, ErrorKind::ThreepidAuthFailed, message)
}

/// Validates an email address and returns its canonical (lower-cased) form.
pub fn normalize_email(raw: &str) -> Result<String> {
    let trimmed = raw.trim();
    if trimmed.len() > MAX_EMAIL {
        return Err(Error::invalid_param(format!("email address longer than {MAX_EMAIL} characters")));
    }
    let address: lettre::Address =
        trimmed.parse().map_err(|_| Error::invalid_param(format!("`{trimmed}` is not an email address")))?;
    if !address.domain().contains('.') {
        return Err(Error::invalid_param(format!("`{trimmed}` has no fully qualified domain")));
    }
    Ok(address.to_string().to_lowercase())
}

/// Parses a phone number, given with a two-letter country (as the spec's requestToken sends it)
/// or in international form, into E.164 without the `+` (the spec's form of an msisdn).
pub fn normalize_phone(country: Option<&str>, number: &str) -> Result<String> {
    let region = match country.map(str::trim).filter(|c| !c.is_empty()) {
        Some(code) => Some(
            code.to_ascii_uppercase()
                .parse::<phonenumber::country::Id>()
                .map_err(|_| Error::invalid_param(format!("`{code}` is not a two-letter country code")))?,
        ),
        None => None,
    };
    let trimmed = number.trim();
    if trimmed.len() > 32 {
        return Err(Error::invalid_param("phone number longer than 32 characters"));
    }
    // Bare digits without a country are an msisdn already: read them as international.
    let text = if region.is_none() && !trimmed.starts_with('+') {
        format!("+{trimmed}")
    } else {
        trimmed.to_owned()
    };
    let parsed = phonenumber::parse(region, &text)
        .map_err(|_| Error::invalid_param(format!("`{trimmed}` is not a phone number")))?;
    if !parsed.is_valid() {
        return Err(Error::invalid_param(format!("`{trimmed}` is not a valid phone number")));
    }
    let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
    Ok(e164.trim_start_matches('+').to_owned())
}

/// Checks an address against the registration policy's allow-lists.
pub fn check_allowed(state: &AppState, medium: &Medium, address: &str) -> Result<()> {
    let policy = &state.config.registration;
    let denied = |what: String| threepid_error(StatusCode::FORBIDDEN, ErrorKind::ThreepidDenied, what);
    match medium {
        Medium::Email if !policy.allowed_email_domains.is_empty() => {
            let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
            let allowed = policy.allowed_email_domains.iter().any(|allowed| {
                let allowed = allowed.trim_start_matches('@').to_lowercase();
                domain == allowed || domain.ends_with(&format!(".{allowed}"))
            });
            if allowed {
                Ok(())
            } else {
                Err(denied(format!("email addresses at {domain} are not allowed here")))
            }
        }
        Medium::Msisdn if !policy.allowed_phone_countries.is_empty() => {
            let code = phonenumber::parse(None, format!("+{address}"))
                .map(|n| n.code().value().to_string())
                .unwrap_or_default();
            if policy.allowed_phone_countries.contains(&code) {
                Ok(())
            } else {
                Err(denied(format!("phone numbers with country code +{code} are not allowed here")))
            }
        }
        _ => Ok(()),
    }
}

/// Fails unless this server can send to the medium.
pub fn check_medium_supported(state: &AppState, medium: &Medium) -> Result<()> {
    let supported = match medium {
        Medium::Email => state.email.is_some(),
        Medium::Msisdn => state.sms.is_some(),
        _ => false,
    };
    if supported {
        Ok(())
    } else {
        Err(threepid_error(
            StatusCode::BAD_REQUEST,
            ErrorKind::ThreepidMediumNotSupported,
            format!("this server does not send codes by {}", medium.as_str()),
        ))
    }
}

fn check_client_secret(secret: &str) -> Result<()> {
    let valid = !secret.is_empty()
        && secret.len() <= MAX_CLIENT_SECRET
        && secret.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '=' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::invalid_param("client_secret must be 1 to 255 characters of [0-9a-zA-Z.=_-]"))
    }
}

/// The keyed hash a code is stored as, bound to its session.
fn code_hash(state: &AppState, sid: &str, code: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(state.code_key()) else {
        // HMAC takes keys of any length; this cannot happen.
        return String::new();
    };
    mac.update(sid.as_bytes());
    mac.update(b":");
    mac.update(code.as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn new_code() -> String {
    format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32))
}

/// A request to send a code.
#[derive(Debug)]
pub struct CodeRequest<'a> {
    pub medium: Medium,
    /// Canonical address (see [`normalize_email`], [`normalize_phone`]).
    pub address: &'a str,
    pub purpose: Purpose,
    pub client_secret: &'a str,
    pub send_attempt: u64,
    pub client_ip: IpAddr,
}

/// Where a code's link sends a person, and where clients submit codes.
pub fn submit_url(state: &AppState) -> String {
    format!("{}/_hearth/client/v1/threepid/submit_token", state.config.base_url())
}

/// Sends a code, or does nothing if this client already asked with this `send_attempt` (the
/// spec's idempotency rule). Returns the session id.
pub async fn request_code(state: &AppState, request: CodeRequest<'_>) -> Result<String> {
    check_client_secret(request.client_secret)?;
    check_medium_supported(state, &request.medium)?;
    let now = now_ms();
    let secret_hash = tokens::sha256_hex(request.client_secret);
    let medium = request.medium.as_str();
    let send_attempt = i64::try_from(request.send_attempt).unwrap_or(i64::MAX);
    let existing = state
        .store
        .find_threepid_session(&secret_hash, medium, request.address, request.purpose.as_str())
        .await?
        .filter(|s| !s.consumed && s.created_ts > now - VERIFIED_SESSION_LIFETIME_MS);
    if let Some(session) = &existing
        && send_attempt <= session.send_attempt
    {
        return Ok(session.sid.clone());
    }

    // Only a real send costs from the budgets.
    state.limiter.check(Action::CodeToAddress, &format!("{medium}:{}", request.address)).await?;
    state.limiter.check(Action::CodeFromIp, &request.client_ip.to_string()).await?;
    if state.code_sweep_due() {
        state.store.delete_stale_threepid_sessions(now).await?;
    }

    let code = new_code();
    let lifetime_ms = i64::try_from(state.config.threepid.code_lifetime_secs * 1000).unwrap_or(i64::MAX);
    let sid = match existing {
        Some(session) => {
            let hash = code_hash(state, &session.sid, &code);
            state.store.resend_threepid_code(&session.sid, &hash, send_attempt, now + lifetime_ms).await?;
            session.sid
        }
        None => {
            let sid = tokens::random_token(18);
            let session = ThreepidSession {
                sid: sid.clone(),
                client_secret_hash: secret_hash,
                medium: medium.to_owned(),
                address: request.address.to_owned(),
                purpose: request.purpose.as_str().to_owned(),
                code_hash: code_hash(state, &sid, &code),
                send_attempt,
                failed_attempts: 0,
                validated_ts: None,
                consumed: false,
                created_ts: now,
                code_expires_ts: now + lifetime_ms,
            };
            state.store.create_threepid_session(&session).await?;
            sid
        }
    };
    deliver(state, &request, &sid, &code).await?;
    tracing::info!(medium, purpose = request.purpose.as_str(), "verification code sent");
    Ok(sid)
}

async fn deliver(state: &AppState, request: &CodeRequest<'_>, sid: &str, code: &str) -> Result<()> {
    let minutes = state.config.threepid.code_lifetime_secs.div_ceil(60);
    let link = format!(
        "{}?sid={}&client_secret={}&token={code}",
        submit_url(state),
        percent_encoding::utf8_percent_encode(sid, percent_encoding::NON_ALPHANUMERIC),
        percent_encoding::utf8_percent_encode(request.client_secret, percent_encoding::NON_ALPHANUMERIC),
    );
    let vars = templates::Vars {
        server_name: state.server_name.as_str(),
        code,
        link: &link,
        minutes,
        purpose: request.purpose.words(),
    };
    let result = match request.medium {
        Medium::Email => match &state.email {
            Some(sender) => {
                let subject = format!("Your {} verification code", state.server_name);
                sender
                    .send(request.address, &subject, state.templates.text(&vars), state.templates.html(&vars))
                    .await
            }
            None => return check_medium_supported(state, &request.medium),
        },
        _ => match &state.sms {
            Some(sender) => {
                let body = format!(
                    "{code} is your {} verification code. It expires in {minutes} minutes.",
                    state.server_name
                );
                sender.send(&format!("+{}", request.address), &body).await
            }
            None => return check_medium_supported(state, &request.medium),
        },
    };
    result.map_err(|e| {
        tracing::warn!(medium = request.medium.as_str(), error = %e, "could not deliver a verification code");
        Error::new(
            StatusCode::BAD_GATEWAY,
            ErrorKind::Unknown,
            format!("could not deliver the code by {}: {e}; try again later", request.medium.as_str()),
        )
    })
}

/// The session `sid`, if `client_secret` is the one it was requested with. Without the secret a
/// session does not exist, so nobody can guess codes for another client's session.
async fn client_session(state: &AppState, sid: &str, client_secret: &str) -> Result<ThreepidSession> {
    state
        .store
        .get_threepid_session(sid)
        .await?
        .filter(|s| s.client_secret_hash == tokens::sha256_hex(client_secret))
        .ok_or_else(|| auth_failed("unknown verification session"))
}

/// Checks a submitted code. On success the session's address is verified.
pub async fn submit_code(
    state: &AppState,
    sid: &str,
    client_secret: &str,
    code: &str,
) -> Result<ThreepidSession> {
    let session = client_session(state, sid, client_secret).await?;
    if session.consumed {
        return Err(auth_failed("this code has already been used; request a new one"));
    }
    let max = i64::from(state.config.threepid.max_attempts);
    if session.failed_attempts >= max {
        return Err(auth_failed("too many wrong codes; request a new one"));
    }
    if session.code_expires_ts <= now_ms() {
        return Err(auth_failed("the code has expired; request a new one"));
    }
    let digits = code.trim();
    if digits.len() != 6 || code_hash(state, sid, digits) != session.code_hash {
        let failed = state.store.record_failed_code(sid).await?;
        let left = (max - failed).max(0);
        return Err(if left == 0 {
            auth_failed("wrong code; too many wrong codes, request a new one")
        } else {
            auth_failed(format!("wrong code; {left} attempts left"))
        });
    }
    state.store.mark_threepid_validated(sid, now_ms()).await?;
    let mut session = session;
    session.validated_ts.get_or_insert(now_ms());
    Ok(session)
}

/// A session this client verified for `purpose`, not yet used.
pub async fn verified_session(
    state: &AppState,
    sid: &str,
    client_secret: &str,
    purpose: Purpose,
) -> Result<ThreepidSession> {
    let session = client_session(state, sid, client_secret).await?;
    if session.purpose != purpose.as_str() {
        return Err(auth_failed(format!("this session did not verify the address {}", purpose.words())));
    }
    if session.consumed {
        return Err(auth_failed("this verification has already been used"));
    }
    if session.validated_ts.is_none() {
        return Err(auth_failed("the address has not been verified yet: submit the code first"));
    }
    if session.created_ts <= now_ms() - VERIFIED_SESSION_LIFETIME_MS {
        return Err(auth_failed("this verification has expired; start again"));
    }
    Ok(session)
}

/// Parses a medium name from a request.
pub fn parse_medium(medium: &str) -> Result<Medium> {
    match medium {
        "email" => Ok(Medium::Email),
        "msisdn" => Ok(Medium::Msisdn),
        other => Err(threepid_error(
            StatusCode::BAD_REQUEST,
            ErrorKind::ThreepidMediumNotSupported,
            format!("medium `{other}` is not supported; use email or msisdn"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_validated_and_lowercased() {
        assert_eq!(normalize_email(" Alice@Example.ORG ").unwrap(), "alice@example.org");
        for bad in ["alice", "alice@", "@example.org", "a b@example.org", "alice@localhost"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
        assert!(normalize_email(&format!("{}@example.org", "a".repeat(260))).is_err());
    }

    #[test]
    fn phone_numbers_become_e164() {
        assert_eq!(normalize_phone(Some("GB"), "07400 123456").unwrap(), "447400123456");
        assert_eq!(normalize_phone(Some("gb"), "+44 7400 123456").unwrap(), "447400123456");
        assert_eq!(normalize_phone(None, "+1 (415) 555-2671").unwrap(), "14155552671");
        assert_eq!(normalize_phone(None, "14155552671").unwrap(), "14155552671");
        assert!(normalize_phone(Some("GB"), "123").is_err());
        assert!(normalize_phone(Some("XX"), "07400123456").is_err());
        assert!(normalize_phone(None, "not a number").is_err());
    }

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..100 {
            let code = new_code();
            assert_eq!(code.len(), 6);
            assert!(code.chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn client_secrets_follow_the_grammar() {
        assert!(check_client_secret("abc.DEF=_-123").is_ok());
        assert!(check_client_secret("").is_err());
        assert!(check_client_secret("no spaces").is_err());
        assert!(check_client_secret(&"a".repeat(256)).is_err());
    }
}
