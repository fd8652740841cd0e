//! User-Interactive Authentication (spec: client-server API, "User-interactive authentication API").
//!
//! An endpoint that needs UIA names the operation, the user it acts for (if any) and the flows
//! it accepts, and calls [`authenticate`]. The first call (or one without `auth`) starts a
//! session and answers 401 with `flows`, `params` and `session`; each call with `auth` runs one
//! stage. When the completed stages cover a whole flow, the session is consumed and the endpoint
//! proceeds. Sessions live in the database, so a client may continue on any worker.
//!
//! Registration also keeps its parameters in the session ([`authenticate_remembering`]): a
//! client may send them only in the first step, as Synapse allows, and a completed registration
//! replayed with its session gives the same account again (registration is idempotent).
//!
//! Stages are plain functions of [`Stage`]. The email and phone stages check a verification
//! session (see [`crate::threepid`]) and remember its `sid`, so the endpoint can bind the proven
//! address once the flow is complete.

use std::{collections::BTreeMap, net::IpAddr};

use actix_web::http::StatusCode;
use ruma::{
    UserId,
    api::{
        client::uiaa::{AuthData, AuthFlow, AuthType, UiaaInfo, UserIdentifier},
        error::StandardErrorBody,
    },
};
use serde_json::value::to_raw_value;

use super::{password, recaptcha, tokens};
use crate::{
    auth::AuthedUser,
    error::{Error, ErrorKind, Result},
    state::AppState,
    storage::{UiaSessionRecord, now_ms},
    threepid::{self, Purpose},
};

/// A stage Hearth can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Dummy,
    Password,
    RegistrationToken,
    EmailIdentity,
    Msisdn,
    Recaptcha,
}

impl Stage {
    fn auth_type(self) -> AuthType {
        match self {
            Stage::Dummy => AuthType::Dummy,
            Stage::Password => AuthType::Password,
            Stage::RegistrationToken => AuthType::RegistrationToken,
            Stage::EmailIdentity => AuthType::EmailIdentity,
            Stage::Msisdn => AuthType::Msisdn,
            Stage::Recaptcha => AuthType::ReCaptcha,
        }
    }

    fn name(self) -> String {
        self.auth_type().as_str().to_owned()
    }
}

/// What an endpoint asks of UIA.
#[derive(Debug)]
pub struct UiaRequest<'a> {
    /// Names the operation; a session started for one cannot complete another.
    pub operation: &'a str,
    /// The account acting; `None` for registration.
    pub user: Option<&'a UserId>,
    /// Accepted flows, each a list of stages.
    pub flows: Vec<Vec<Stage>>,
    /// Stages a client may complete though no flow needs them (a captcha that is configured but
    /// not required): they are recorded in `completed` like any other.
    pub optional: Vec<Stage>,
    /// What the email and phone stages must have verified their address for; `None` when the
    /// flows have no such stage.
    pub threepid_purpose: Option<Purpose>,
    /// Where the request came from: wrong passwords are limited per IP as well as per account.
    pub client_ip: IpAddr,
    /// An application service acting for a user of its namespace: no stage is asked. Its users
    /// have no password to confirm with, and the service holds their accounts (the spec says so
    /// for deleting devices; Synapse does it for every operation).
    pub by_appservice: bool,
}

impl<'a> UiaRequest<'a> {
    /// An operation of a signed-in user, confirmed with their password.
    pub fn password(operation: &'a str, user: &'a AuthedUser, client_ip: IpAddr) -> Self {
        Self {
            operation,
            user: Some(&user.user_id),
            flows: vec![vec![Stage::Password]],
            optional: Vec::new(),
            threepid_purpose: None,
            client_ip,
            by_appservice: user.appservice.is_some(),
        }
    }
}

/// A completed flow.
#[derive(Debug, Default)]
pub struct UiaDone {
    /// Verification sessions whose addresses the flow proved, for the endpoint to use up.
    pub threepid_sids: Vec<String>,
    /// With [`authenticate_remembering`]: the session, if the client has its id (kept, for
    /// [`set_result`]), the parameters in force, and what an earlier completion produced (a
    /// replay: the endpoint answers as it did then, and runs nothing again).
    pub session_id: Option<String>,
    pub params: Option<String>,
    pub result: Option<String>,
}

/// Runs one step of UIA. `Ok` means a flow is complete and the operation may proceed.
pub async fn authenticate(
    state: &AppState,
    auth: Option<&AuthData>,
    request: UiaRequest<'_>,
) -> Result<UiaDone> {
    run(state, auth, request, None).await
}

/// [`authenticate`] for an operation that keeps its parameters in the session: `params` (JSON,
/// bounded by the request's size) are this request's, or `None` when it sent only `auth`, and
/// then those of an earlier step are used. Synapse's rule: a later step that brings parameters
/// replaces them. The session outlives completion (until it expires), so that a replay finds
/// the result recorded with [`set_result`].
pub async fn authenticate_remembering(
    state: &AppState,
    auth: Option<&AuthData>,
    request: UiaRequest<'_>,
    params: Option<String>,
) -> Result<UiaDone> {
    run(state, auth, request, Some(params)).await
}

/// Records what a completed operation produced, for replays of its session.
pub async fn set_result(state: &AppState, session_id: &str, result: &str) -> Result<()> {
    Ok(state.store.set_uia_result(session_id, result).await?)
}

async fn run(
    state: &AppState,
    auth: Option<&AuthData>,
    request: UiaRequest<'_>,
    remember: Option<Option<String>>,
) -> Result<UiaDone> {
    if request.by_appservice {
        return Ok(UiaDone::default());
    }
    let lifetime_ms =
        i64::try_from(state.config.auth.uia_session_lifetime_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let (mut session, stored) = match auth.and_then(AuthData::session) {
        Some(id) => {
            let session = state
                .store
                .get_uia_session(id)
                .await?
                .filter(|s| s.created_ts > now_ms().saturating_sub(lifetime_ms))
                .ok_or_else(|| {
                    Error::new(StatusCode::BAD_REQUEST, ErrorKind::Unknown, "unknown or expired UIA session")
                })?;
            if session.operation != request.operation || session.user_id.as_deref() != request.user {
                return Err(Error::forbidden("this UIA session was started for a different request"));
            }
            (session, true)
        }
        // A new session stays in memory until it has to outlive this request: a flow finished in
        // one step (`m.login.dummy` sent straight away) costs no writes.
        None => {
            let session = UiaSessionRecord {
                session_id: tokens::random_token(18),
                operation: request.operation.to_owned(),
                user_id: request.user.map(ToOwned::to_owned),
                completed: Vec::new(),
                threepid_sids: Vec::new(),
                created_ts: now_ms(),
                params: None,
                result: None,
            };
            (session, false)
        }
    };
    let keeps = remember.is_some();
    if keeps && stored && session.result.is_some() {
        // A completed operation, replayed: the same answer, no stage run again.
        return Ok(UiaDone {
            threepid_sids: Vec::new(),
            session_id: Some(session.session_id),
            params: session.params,
            result: session.result,
        });
    }
    let new_params = remember.flatten();
    if let Some(params) = &new_params {
        session.params = Some(params.clone());
    }

    // `auth` with only a session (the spec's acknowledgement after fallback auth, and how
    // clients poll) runs no stage: it asks where the session stands.
    let auth = auth.filter(|auth| !matches!(auth, AuthData::FallbackAcknowledgement(_)));
    // A password stage naming another account than the one acting (someone with a stolen access
    // token offering their own password) is refused outright, 403 and not a UIA challenge, as
    // Synapse answers; the session stays as it was.
    if let (Some(AuthData::Password(data)), Some(user)) = (auth, request.user)
        && let UserIdentifier::Matrix(id) = &data.identifier
        && !names(user, &id.user)
    {
        return Err(Error::forbidden("the password stage must name the account making this request"));
    }
    // A password stage takes one failure from the account's and the IP's budgets before the
    // password is compared, and a right one gives it back: a stolen access token cannot be used
    // to guess the password, and a locked-out client gets 429, not another try.
    let password_attempt = match (auth, request.user) {
        (Some(AuthData::Password(_)), Some(user)) => {
            Some(state.limiter.password_attempt(Some(user.as_str()), request.client_ip).await?)
        }
        _ => None,
    };
    let stage_error = match auth {
        None => None,
        Some(auth) => match run_stage(state, auth, &request).await {
            Ok((stage, sid)) => {
                if let Some(attempt) = password_attempt {
                    attempt.succeeded().await;
                }
                let name = stage.name();
                if !session.completed.contains(&name) {
                    session.completed.push(name);
                }
                session.threepid_sids.extend(sid.filter(|sid| !session.threepid_sids.contains(sid)));
                None
            }
            Err(error) => Some(error),
        },
    };
    let done = request.flows.iter().any(|flow| flow.iter().all(|s| session.completed.contains(&s.name())));
    if done {
        if stored && !keeps {
            state.store.delete_uia_session(&session.session_id).await?;
        }
        if stored && keeps {
            state
                .store
                .set_uia_completed(&session.session_id, &session.completed, &session.threepid_sids)
                .await?;
            if let Some(params) = &new_params {
                state.store.set_uia_params(&session.session_id, params).await?;
            }
        }
        return Ok(UiaDone {
            threepid_sids: session.threepid_sids,
            session_id: stored.then_some(session.session_id),
            params: session.params,
            result: None,
        });
    }
    if stored {
        if stage_error.is_none() && auth.is_some() {
            state
                .store
                .set_uia_completed(&session.session_id, &session.completed, &session.threepid_sids)
                .await?;
        }
        if let Some(params) = &new_params {
            state.store.set_uia_params(&session.session_id, params).await?;
        }
    } else {
        if state.uia_cleanup_due() {
            // Housekeeping without a timer: expired sessions go when new ones are made.
            state.store.delete_uia_sessions_before(now_ms().saturating_sub(lifetime_ms)).await?;
        }
        state.store.create_uia_session(&session).await?;
    }
    Err(challenge(state, &request, &session, stage_error))
}

/// Whether `given` (a user id or localpart) names `user`, whatever the case, as at login (every
/// account here has a lower-case id).
fn names(user: &UserId, given: &str) -> bool {
    given.eq_ignore_ascii_case(user.as_str()) || given.eq_ignore_ascii_case(user.localpart())
}

fn stage_of(auth: &AuthData) -> Option<Stage> {
    match auth {
        AuthData::Dummy(_) => Some(Stage::Dummy),
        AuthData::Password(_) => Some(Stage::Password),
        AuthData::RegistrationToken(_) => Some(Stage::RegistrationToken),
        AuthData::EmailIdentity(_) => Some(Stage::EmailIdentity),
        AuthData::Msisdn(_) => Some(Stage::Msisdn),
        AuthData::ReCaptcha(_) => Some(Stage::Recaptcha),
        _ => None,
    }
}

/// Checks the data of one stage; returns it and, for the email and phone stages, the `sid` of
/// the verification it relied on. The error becomes the `errcode`/`error` of the 401 body.
async fn run_stage(
    state: &AppState,
    auth: &AuthData,
    request: &UiaRequest<'_>,
) -> Result<(Stage, Option<String>), StandardErrorBody> {
    let stage = stage_of(auth).ok_or_else(|| {
        let kind = auth.auth_type().map(|t| t.to_string()).unwrap_or_default();
        StandardErrorBody::new(
            ErrorKind::Unrecognized,
            format!("authentication type `{kind}` is not supported"),
        )
    })?;
    if !request.flows.iter().flatten().chain(&request.optional).any(|s| *s == stage) {
        return Err(StandardErrorBody::new(
            ErrorKind::Forbidden,
            format!("authentication type `{}` is not offered for this request", stage.name()),
        ));
    }
    let internal = |e: Error| {
        tracing::error!(error = %e, "UIA stage failed internally");
        StandardErrorBody::new(ErrorKind::Unknown, "internal error".to_owned())
    };
    match auth {
        AuthData::Dummy(_) => Ok((stage, None)),
        AuthData::Password(data) => {
            let user = request.user.ok_or_else(|| {
                StandardErrorBody::new(ErrorKind::Forbidden, "no account to check a password for".to_owned())
            })?;
            let names_user = match &data.identifier {
                UserIdentifier::Matrix(id) => names(user, &id.user),
                _ => false,
            };
            let record = state.store.get_user(user).await.map_err(|e| internal(e.into()))?;
            let hash = record.and_then(|r| r.password_hash);
            let ok = password::verify(&data.password, hash.as_deref()).await.map_err(internal)?;
            if names_user && ok {
                Ok((stage, None))
            } else {
                Err(StandardErrorBody::new(ErrorKind::Forbidden, "invalid password".to_owned()))
            }
        }
        AuthData::RegistrationToken(data) => {
            // A use of the token is taken when this stage completes.
            let hash = tokens::sha256_hex(&data.token);
            if state.store.use_registration_token(&hash, now_ms()).await.map_err(|e| internal(e.into()))? {
                Ok((stage, None))
            } else {
                Err(StandardErrorBody::new(ErrorKind::Forbidden, "invalid registration token".to_owned()))
            }
        }
        AuthData::EmailIdentity(ruma::api::client::uiaa::EmailIdentity {
            thirdparty_id_creds: creds,
            ..
        })
        | AuthData::Msisdn(ruma::api::client::uiaa::Msisdn { thirdparty_id_creds: creds, .. }) => {
            let medium = if stage == Stage::EmailIdentity { "email" } else { "msisdn" };
            let purpose = request.threepid_purpose.ok_or_else(|| {
                StandardErrorBody::new(
                    ErrorKind::Forbidden,
                    "no address to verify for this request".to_owned(),
                )
            })?;
            let session =
                threepid::verified_session(state, creds.sid.as_str(), creds.client_secret.as_str(), purpose)
                    .await
                    .map_err(|e| match e {
                        Error::Matrix { kind, message, .. } => StandardErrorBody::new(kind, message),
                        other => internal(other),
                    })?;
            if session.medium != medium {
                return Err(StandardErrorBody::new(
                    ErrorKind::ThreepidAuthFailed,
                    format!("that session verified a {}, not a {medium}", session.medium),
                ));
            }
            Ok((stage, Some(session.sid)))
        }
        AuthData::ReCaptcha(data) => {
            let captcha = state.recaptcha.as_ref().ok_or_else(|| {
                StandardErrorBody::new(ErrorKind::Forbidden, "no captcha is configured".to_owned())
            })?;
            match captcha.verify(&data.response, request.client_ip).await {
                Ok(()) => Ok((stage, None)),
                Err(refused @ recaptcha::Refused::Wrong) => {
                    Err(StandardErrorBody::new(ErrorKind::Unauthorized, refused.to_string()))
                }
                Err(recaptcha::Refused::Unavailable(why)) => {
                    tracing::warn!(%why, "the captcha verifier did not answer");
                    Err(StandardErrorBody::new(
                        ErrorKind::Unknown,
                        "the captcha could not be checked; try again later".to_owned(),
                    ))
                }
            }
        }
        _ => Err(StandardErrorBody::new(ErrorKind::Unrecognized, "unsupported stage".to_owned())),
    }
}

fn challenge(
    state: &AppState,
    request: &UiaRequest<'_>,
    session: &UiaSessionRecord,
    error: Option<StandardErrorBody>,
) -> Error {
    let flows = request
        .flows
        .iter()
        .map(|flow| AuthFlow::new(flow.iter().map(|s| s.auth_type()).collect()))
        .collect();
    let mut info = UiaaInfo::new(flows);
    info.session = Some(session.session_id.clone());
    info.completed = session.completed.iter().map(|s| AuthType::from(s.as_str())).collect();
    // What a client needs to complete the stages offered: the captcha's site key.
    let mut params = BTreeMap::<String, serde_json::Value>::new();
    if let Some(captcha) = &state.recaptcha
        && request.flows.iter().flatten().chain(&request.optional).any(|s| *s == Stage::Recaptcha)
    {
        params.insert(Stage::Recaptcha.name(), serde_json::json!({ "public_key": captcha.public_key }));
    }
    info.params = to_raw_value(&params).ok();
    info.auth_error = error.map(Box::new);
    Error::Uia(Box::new(info))
}
