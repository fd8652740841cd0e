//! Addresses (3PIDs): the `requestToken` endpoints (Hearth sends the code itself and returns a
//! `submit_url`), the `submit_url` itself (JSON for clients, a page for the emailed link),
//! `account/3pid` (list), `account/3pid/add` (UIA) and `account/3pid/delete`.

use actix_web::{HttpRequest, HttpResponse, http::StatusCode, web};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedSessionId, UInt,
    api::client::account::{
        ThirdPartyIdRemovalStatus, add_3pid, delete_3pid, get_3pids, request_3pid_management_token_via_email,
        request_3pid_management_token_via_msisdn, request_password_change_token_via_email,
        request_password_change_token_via_msisdn, request_registration_token_via_email,
        request_registration_token_via_msisdn,
    },
    thirdparty::{Medium, ThirdPartyIdentifierInit},
};
use serde::Deserialize;

use super::{account::threepid_used, register::threepid_in_use};
use crate::{
    auth::{
        tokens,
        uia::{self, UiaRequest},
    },
    config::RegistrationMode,
    error::{Error, ErrorKind, Result},
    ruma_wrapper::{JsonBody, Router, Ruma, parse_json_body},
    state::AppState,
    threepid::{self, CodeRequest, Purpose},
};

pub(super) fn routes(router: &mut Router) {
    router
        .add(register_email)
        .add(register_msisdn)
        .add(add_email)
        .add(add_msisdn)
        .add(reset_email)
        .add(reset_msisdn)
        .add(get_3pids)
        .add(add_3pid)
        .add(delete_3pid);
}

/// Checks an address against what `purpose` needs, then sends the code.
async fn send_code(
    state: &AppState,
    medium: Medium,
    address: &str,
    purpose: Purpose,
    client_secret: &str,
    send_attempt: UInt,
    client_ip: std::net::IpAddr,
) -> Result<(OwnedSessionId, String)> {
    threepid::check_medium_supported(state, &medium)?;
    let owner = state.store.threepid_owner(medium.as_str(), address).await?;
    match purpose {
        Purpose::Register | Purpose::Add => {
            if purpose == Purpose::Register && state.config.registration.mode == RegistrationMode::Closed {
                return Err(Error::forbidden("registration is closed on this server"));
            }
            threepid::check_allowed(state, &medium, address)?;
            if owner.is_some() {
                return Err(threepid_in_use());
            }
        }
        Purpose::Reset if owner.is_none() => {
            return Err(Error::new(
                StatusCode::BAD_REQUEST,
                ErrorKind::ThreepidNotFound,
                "that address belongs to no account",
            ));
        }
        Purpose::Reset | Purpose::Login => {}
    }
    let request =
        CodeRequest { medium, address, purpose, client_secret, send_attempt: send_attempt.into(), client_ip };
    let sid = threepid::request_code(state, request).await?;
    let sid = OwnedSessionId::try_from(sid).map_err(Error::internal)?;
    Ok((sid, threepid::submit_url(state)))
}

/// Defines the `requestToken` handler for one (medium, purpose): the requests differ only in
/// how they name the address.
macro_rules! request_token_handler {
    ($(#[$doc:meta])* $name:ident, $module:ident, $medium:expr, $purpose:expr, |$body:ident| $address:expr) => {
        $(#[$doc])*
        async fn $name(
            state: web::Data<AppState>,
            request: Ruma<$module::v3::Request>,
        ) -> Result<$module::v3::Response> {
            let $body = &request.body;
            let address: String = $address?;
            let (sid, submit_url) = send_code(
                &state,
                $medium,
                &address,
                $purpose,
                $body.client_secret.as_str(),
                $body.send_attempt,
                request.client_ip,
            )
            .await?;
            let mut response = $module::v3::Response::new(sid);
            response.submit_url = Some(submit_url);
            Ok(response)
        }
    };
}

request_token_handler!(
    /// POST /_matrix/client/v3/register/email/requestToken
    register_email, request_registration_token_via_email, Medium::Email, Purpose::Register,
    |body| threepid::normalize_email(&body.email)
);
request_token_handler!(
    /// POST /_matrix/client/v3/register/msisdn/requestToken
    register_msisdn, request_registration_token_via_msisdn, Medium::Msisdn, Purpose::Register,
    |body| threepid::normalize_phone(Some(&body.country), &body.phone_number)
);
request_token_handler!(
    /// POST /_matrix/client/v3/account/3pid/email/requestToken
    add_email, request_3pid_management_token_via_email, Medium::Email, Purpose::Add,
    |body| threepid::normalize_email(&body.email)
);
request_token_handler!(
    /// POST /_matrix/client/v3/account/3pid/msisdn/requestToken
    add_msisdn, request_3pid_management_token_via_msisdn, Medium::Msisdn, Purpose::Add,
    |body| threepid::normalize_phone(Some(&body.country), &body.phone_number)
);
request_token_handler!(
    /// POST /_matrix/client/v3/account/password/email/requestToken
    reset_email, request_password_change_token_via_email, Medium::Email, Purpose::Reset,
    |body| threepid::normalize_email(&body.email)
);
request_token_handler!(
    /// POST /_matrix/client/v3/account/password/msisdn/requestToken
    reset_msisdn, request_password_change_token_via_msisdn, Medium::Msisdn, Purpose::Reset,
    |body| threepid::normalize_phone(Some(&body.country), &body.phone_number)
);

#[derive(Debug, Deserialize)]
struct SubmitToken {
    sid: String,
    client_secret: String,
    token: String,
}

/// POST /_hearth/client/v1/threepid/submit_token (the `submit_url` of every `requestToken`)
pub(super) async fn submit_token(state: web::Data<AppState>, body: JsonBody) -> Result<HttpResponse> {
    let body: SubmitToken = parse_json_body(&body.0)?;
    threepid::submit_code(&state, &body.sid, &body.client_secret, &body.token).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "success": true })))
}

/// GET /_hearth/client/v1/threepid/submit_token?sid=…&client_secret=…&token=… (the emailed link)
pub(super) async fn submit_token_link(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    let page = |status: StatusCode, title: &str, text: &str| {
        HttpResponse::build(status).content_type("text/html; charset=utf-8").body(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body style=\"font-family: sans-serif\"><h1>{title}</h1><p>{text}</p></body></html>"
        ))
    };
    if let Err(e) = crate::ruma_wrapper::check_uri(&request) {
        return actix_web::ResponseError::error_response(&e);
    }
    let query = web::Query::<SubmitToken>::from_query(request.query_string());
    let Ok(query) = query else {
        return page(
            StatusCode::BAD_REQUEST,
            "Link incomplete",
            "This link is missing parts; copy the code instead.",
        );
    };
    match threepid::submit_code(&state, &query.sid, &query.client_secret, &query.token).await {
        Ok(_) => page(
            StatusCode::OK,
            "Address confirmed",
            "Your address is confirmed. Go back to your Matrix client to continue.",
        ),
        Err(Error::Matrix { message, .. }) => {
            page(StatusCode::BAD_REQUEST, "Not confirmed", &html_escape(&message))
        }
        Err(other) => actix_web::ResponseError::error_response(&other),
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[derive(Debug, Deserialize)]
struct LoginCodeRequest {
    client_secret: String,
    send_attempt: UInt,
    medium: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    country: Option<String>,
    #[serde(default)]
    phone_number: Option<String>,
}

/// POST /_matrix/client/unstable/chat.hearth.login.otp/requestToken
///
/// The first step of Hearth's code login (`chat.hearth.login.otp`): a code goes to the address
/// if it belongs to an account. The answer is the same either way, so nobody learns which
/// addresses are registered.
pub(super) async fn request_login_code(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: JsonBody,
) -> Result<HttpResponse> {
    let body: LoginCodeRequest = parse_json_body(&body.0)?;
    let medium = threepid::parse_medium(&body.medium)?;
    let address = match medium {
        Medium::Email => threepid::normalize_email(body.address.as_deref().unwrap_or_default())?,
        _ => match (&body.phone_number, &body.address) {
            (Some(number), _) => threepid::normalize_phone(body.country.as_deref(), number)?,
            (None, Some(msisdn)) => threepid::normalize_phone(None, msisdn)?,
            (None, None) => return Err(Error::missing_param("phone_number or address is required")),
        },
    };
    threepid::check_medium_supported(&state, &medium)?;
    let ip = crate::ruma_wrapper::client_ip(&request, state.config.listen.trust_x_forwarded_for);
    let sid = if state.store.threepid_owner(medium.as_str(), &address).await?.is_some() {
        let (sid, _) =
            send_code(&state, medium, &address, Purpose::Login, &body.client_secret, body.send_attempt, ip)
                .await?;
        sid.to_string()
    } else {
        // Spend the same budget, so the limits do not tell registered addresses apart either.
        state.limiter.check(crate::auth::ratelimit::Action::CodeFromIp, &ip.to_string()).await?;
        tokens::random_token(18)
    };
    Ok(HttpResponse::Ok().json(serde_json::json!({ "sid": sid })))
}

/// GET /_matrix/client/v3/account/3pid
async fn get_3pids(
    state: web::Data<AppState>,
    request: Ruma<get_3pids::v3::Request>,
) -> Result<get_3pids::v3::Response> {
    let records = state.store.list_threepids(&request.sender.user_id).await?;
    let threepids = records
        .into_iter()
        .map(|r| {
            let at = |ts: i64| MilliSecondsSinceUnixEpoch(UInt::try_from(ts).unwrap_or_default());
            ThirdPartyIdentifierInit {
                address: r.address,
                medium: r.medium.as_str().into(),
                validated_at: at(r.validated_ts),
                added_at: at(r.added_ts),
            }
            .into()
        })
        .collect();
    Ok(get_3pids::v3::Response::new(threepids))
}

/// POST /_matrix/client/v3/account/3pid/add
async fn add_3pid(
    state: web::Data<AppState>,
    request: Ruma<add_3pid::v3::Request>,
) -> Result<add_3pid::v3::Response> {
    let user = &request.sender;
    let body = &request.body;
    let operation = UiaRequest::password("add_3pid", user, request.client_ip);
    // Check the verification before asking for the password, so a bad session fails fast.
    let session =
        threepid::verified_session(&state, body.sid.as_str(), body.client_secret.as_str(), Purpose::Add)
            .await?;
    uia::authenticate(&state, body.auth.as_ref(), operation).await?;
    if state.store.threepid_owner(&session.medium, &session.address).await?.is_some() {
        return Err(threepid_in_use());
    }
    if !state.store.consume_threepid_session(&session.sid).await? {
        return Err(threepid_used());
    }
    let validated = session.validated_ts.unwrap_or_else(crate::storage::now_ms);
    if !state.store.bind_threepid(&user.user_id, &session.medium, &session.address, validated).await? {
        return Err(threepid_in_use());
    }
    Ok(add_3pid::v3::Response::new())
}

/// POST /_matrix/client/v3/account/3pid/delete
async fn delete_3pid(
    state: web::Data<AppState>,
    request: Ruma<delete_3pid::v3::Request>,
) -> Result<delete_3pid::v3::Response> {
    let body = &request.body;
    let address = match body.medium {
        Medium::Email => threepid::normalize_email(&body.address)?,
        Medium::Msisdn => threepid::normalize_phone(None, &body.address)?,
        _ => {
            return Err(threepid::parse_medium(body.medium.as_str())
                .err()
                .unwrap_or_else(|| Error::invalid_param("medium")));
        }
    };
    if !state.store.unbind_threepid(&request.sender.user_id, body.medium.as_str(), &address).await? {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            ErrorKind::ThreepidNotFound,
            "that address is not bound to your account",
        ));
    }
    Ok(delete_3pid::v3::Response::new(ThirdPartyIdRemovalStatus::NoSupport))
}
