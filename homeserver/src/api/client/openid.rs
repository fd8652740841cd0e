//! OpenID: `POST /user/{userId}/openid/request_token` hands a user a token that proves who they
//! are to a third party (a widget, an integration manager), which redeems it at
//! `GET /_matrix/federation/v1/openid/userinfo?access_token=…`. That endpoint belongs to the
//! federation API; Hearth has no federation listener yet, so it is served on the client
//! listener, as Synapse's `openid` resource can be (see `docs/decisions.md`).

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use ruma::api::client::account::request_openid_token;

use crate::{
    auth::{ratelimit::Action, tokens},
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma, check_uri},
    state::AppState,
    storage::now_ms,
};

/// How long an OpenID token is good for (Synapse's hour).
const LIFETIME: Duration = Duration::from_secs(3600);
/// Longest token a third party may present; Hearth's are 43 characters.
const MAX_TOKEN_CHARS: usize = 256;

pub(super) fn routes(router: &mut Router) {
    router.add(request_token);
}

/// POST /_matrix/client/v3/user/{userId}/openid/request_token
async fn request_token(
    state: web::Data<AppState>,
    request: Ruma<request_openid_token::v3::Request>,
) -> Result<request_openid_token::v3::Response> {
    let user = &request.sender.user_id;
    if *user != request.body.user_id {
        return Err(Error::forbidden("you can only request OpenID tokens for yourself"));
    }
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    let token = tokens::random_token(32);
    let now = now_ms();
    let lifetime = i64::try_from(LIFETIME.as_millis()).unwrap_or(i64::MAX);
    state
        .store
        .add_openid_token(&tokens::sha256_hex(&token), user, now.saturating_add(lifetime), now)
        .await?;
    Ok(request_openid_token::v3::Response::new(
        token,
        ruma::authentication::TokenType::Bearer,
        state.server_name.clone(),
        LIFETIME,
    ))
}

/// GET /_matrix/federation/v1/openid/userinfo?access_token=…
///
/// `{"sub": user id}` for a live token; 401 `M_MISSING_TOKEN` without one, `M_UNKNOWN_TOKEN`
/// for one unknown, expired, or of a deactivated account.
pub async fn userinfo(state: web::Data<AppState>, request: HttpRequest) -> Result<HttpResponse> {
    check_uri(&request)?;
    let query = web::Query::<std::collections::BTreeMap<String, String>>::from_query(request.query_string())
        .map_err(|e| Error::invalid_param(format!("query: {e}")))?;
    let token = query.get("access_token").filter(|t| !t.is_empty()).ok_or_else(Error::missing_token)?;
    let unknown = || Error::unknown_token(false, "unknown or expired OpenID token");
    if token.chars().count() > MAX_TOKEN_CHARS {
        return Err(unknown());
    }
    let user = state.store.openid_user(&tokens::sha256_hex(token), now_ms()).await?.ok_or_else(unknown)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "sub": user })))
}
