//! The one error type of the HTTP layer and its one mapping to Matrix errors.
//!
//! Policy:
//! - Anything a client did wrong is an [`Error::Matrix`] with the spec's `errcode` (from ruma's
//!   [`ErrorKind`], so no code is spelled by hand), the HTTP status the spec names, and a message
//!   that says what was wrong and what is allowed.
//! - A User-Interactive Auth challenge is [`Error::Uia`]: HTTP 401 with `flows`, `params` and
//!   `session` always present (matrix-nio refuses bodies without `params`).
//! - Anything else (database down, a bug) is [`Error::Internal`]: logged in full on the server,
//!   answered with a bare `M_UNKNOWN` 500 that leaks nothing.

use std::time::Duration;

use actix_web::{HttpResponse, ResponseError, http::StatusCode};
pub use ruma::api::error::ErrorKind;
use ruma::api::{
    client::uiaa::UiaaInfo,
    error::{LimitExceededErrorData, RetryAfter, UnknownTokenErrorData},
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{status} {}: {message}", kind.errcode())]
    Matrix { status: StatusCode, kind: ErrorKind, message: String },
    #[error("user-interactive authentication required")]
    Uia(Box<UiaaInfo>),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn new(status: StatusCode, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Matrix { status, kind, message: message.into() }
    }

    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::BadJson, message)
    }

    pub fn not_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::NotJson, message)
    }

    pub fn missing_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::MissingParam, message)
    }

    pub fn invalid_param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidParam, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorKind::Forbidden, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, message)
    }

    pub fn unrecognized(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, ErrorKind::Unrecognized, message)
    }

    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorKind::MissingToken, "missing access token")
    }

    /// `soft_logout` tells the client its session can be refreshed or re-logged-in without
    /// losing its device (an expired token), rather than being gone (a revoked one).
    pub fn unknown_token(soft_logout: bool, message: impl Into<String>) -> Self {
        let mut data = UnknownTokenErrorData::new();
        data.soft_logout = soft_logout;
        Self::new(StatusCode::UNAUTHORIZED, ErrorKind::UnknownToken(data), message)
    }

    pub fn limit_exceeded(retry_after: Duration) -> Self {
        let mut data = LimitExceededErrorData::new();
        data.retry_after = Some(RetryAfter::Delay(retry_after));
        Self::new(StatusCode::TOO_MANY_REQUESTS, ErrorKind::LimitExceeded(data), "too many requests")
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooLarge,
            format!("request body larger than the limit of {limit} bytes"),
        )
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(format!("database: {error}"))
    }
}

impl ResponseError for Error {
    fn status_code(&self) -> StatusCode {
        match self {
            Error::Matrix { status, .. } => *status,
            Error::Uia(_) => StatusCode::UNAUTHORIZED,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        let body = match self {
            Error::Matrix { kind, message, .. } => {
                let mut body = serde_json::json!({ "errcode": kind.errcode().to_string(), "error": message });
                match kind {
                    ErrorKind::UnknownToken(data) => body["soft_logout"] = data.soft_logout.into(),
                    ErrorKind::BadStatus(data) => {
                        if let Some(status) = data.status {
                            body["status"] = status.as_u16().into();
                        }
                        if let Some(text) = &data.body {
                            body["body"] = text.clone().into();
                        }
                    }
                    ErrorKind::IncompatibleRoomVersion(data) => {
                        body["room_version"] = data.room_version.to_string().into();
                    }
                    ErrorKind::WrongRoomKeysVersion(data) => {
                        body["current_version"] = data.current_version.clone().into();
                    }
                    ErrorKind::LimitExceeded(LimitExceededErrorData {
                        retry_after: Some(RetryAfter::Delay(delay)),
                        ..
                    }) => {
                        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                        body["retry_after_ms"] = ms.into();
                        response.insert_header(("Retry-After", delay.as_secs_f64().ceil().to_string()));
                    }
                    _ => {}
                }
                body
            }
            Error::Uia(info) => {
                let mut body = serde_json::to_value(info).unwrap_or_default();
                // matrix-nio requires `params`; ruma omits it when empty.
                if body.get("params").is_none() {
                    body["params"] = serde_json::json!({});
                }
                // Always listed, empty or not, as Synapse does (SyTest reads it); ruma omits it
                // when empty.
                if body.get("completed").is_none() {
                    body["completed"] = serde_json::json!([]);
                }
                body
            }
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                serde_json::json!({ "errcode": "M_UNKNOWN", "error": "internal server error" })
            }
        };
        response.json(body)
    }
}
