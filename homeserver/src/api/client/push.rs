//! Push rules: the server's default ruleset plus each user's changes, kept as their `m.push_rules`
//! global account data (which is how clients also receive them through `/sync`).

use actix_web::{http::StatusCode, web};
use ruma::{
    UserId,
    api::client::push::{
        delete_pushrule, get_pushrule, get_pushrule_actions, get_pushrule_enabled, get_pushrules_all,
        get_pushrules_global_scope, set_pushrule, set_pushrule_actions, set_pushrule_enabled,
    },
    push::Ruleset,
};
use serde_json::json;

use crate::{
    error::{Error, ErrorKind, Result},
    rooms,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router
        .add(get_all)
        .add(get_global)
        .add(get_rule)
        .add(get_enabled)
        .add(get_actions)
        .add(set_rule)
        .add(delete_rule)
        .add(set_enabled)
        .add(set_actions);
}

/// The user's ruleset: what they stored, or the server's defaults.
pub async fn ruleset(state: &AppState, user: &UserId) -> Result<Ruleset> {
    match state.store.account_data(user, None, "m.push_rules").await? {
        Some(stored) => {
            let value: serde_json::Value = serde_json::from_str(&stored).map_err(Error::internal)?;
            serde_json::from_value(value["global"].clone()).map_err(Error::internal)
        }
        None => Ok(Ruleset::server_default(user)),
    }
}

async fn save(state: &AppState, user: &UserId, rules: &Ruleset) -> Result<()> {
    let content = json!({ "global": rules }).to_string();
    rooms::at_new_position(state, |position| async move {
        state.store.put_account_data(user, None, "m.push_rules", &content, position).await.map_err(Into::into)
    })
    .await
    .map(drop)
}

fn not_found() -> Error {
    Error::not_found("no such push rule")
}

/// GET /_matrix/client/v3/pushrules/
async fn get_all(
    state: web::Data<AppState>,
    request: Ruma<get_pushrules_all::v3::Request>,
) -> Result<get_pushrules_all::v3::Response> {
    Ok(get_pushrules_all::v3::Response::new(ruleset(&state, &request.sender.user_id).await?))
}

/// GET /_matrix/client/v3/pushrules/global/
async fn get_global(
    state: web::Data<AppState>,
    request: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<get_pushrules_global_scope::v3::Response> {
    Ok(get_pushrules_global_scope::v3::Response::new(ruleset(&state, &request.sender.user_id).await?))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn get_rule(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule::v3::Request>,
) -> Result<get_pushrule::v3::Response> {
    let rules = ruleset(&state, &request.sender.user_id).await?;
    let rule = rules.get(request.body.kind.clone(), &request.body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule::v3::Response::new(rule.to_owned().into()))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn get_enabled(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<get_pushrule_enabled::v3::Response> {
    let rules = ruleset(&state, &request.sender.user_id).await?;
    let rule = rules.get(request.body.kind.clone(), &request.body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.enabled()))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn get_actions(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<get_pushrule_actions::v3::Response> {
    let rules = ruleset(&state, &request.sender.user_id).await?;
    let rule = rules.get(request.body.kind.clone(), &request.body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule_actions::v3::Response::new(rule.actions().to_vec()))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn set_rule(
    state: web::Data<AppState>,
    request: Ruma<set_pushrule::v3::Request>,
) -> Result<set_pushrule::v3::Response> {
    let user = &request.sender.user_id;
    let body = request.body;
    let mut rules = ruleset(&state, user).await?;
    rules.insert(body.rule, body.after.as_deref(), body.before.as_deref()).map_err(|e| {
        let text = e.to_string();
        if text.contains("not found") || text.contains("unknown") {
            Error::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, text)
        } else {
            Error::bad_json(text)
        }
    })?;
    save(&state, user, &rules).await?;
    Ok(set_pushrule::v3::Response::new())
}

/// DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn delete_rule(
    state: web::Data<AppState>,
    request: Ruma<delete_pushrule::v3::Request>,
) -> Result<delete_pushrule::v3::Response> {
    let user = &request.sender.user_id;
    let mut rules = ruleset(&state, user).await?;
    rules.remove(request.body.kind.clone(), &request.body.rule_id).map_err(|e| {
        if request.body.rule_id.starts_with('.') {
            Error::forbidden(format!("server default rules cannot be deleted: {e}"))
        } else {
            not_found()
        }
    })?;
    save(&state, user, &rules).await?;
    Ok(delete_pushrule::v3::Response::new())
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn set_enabled(
    state: web::Data<AppState>,
    request: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<set_pushrule_enabled::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    let mut rules = ruleset(&state, user).await?;
    rules.set_enabled(body.kind.clone(), &body.rule_id, body.enabled).map_err(|_| not_found())?;
    save(&state, user, &rules).await?;
    Ok(set_pushrule_enabled::v3::Response::new())
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn set_actions(
    state: web::Data<AppState>,
    request: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<set_pushrule_actions::v3::Response> {
    let user = &request.sender.user_id;
    let body = request.body;
    let mut rules = ruleset(&state, user).await?;
    rules.set_actions(body.kind.clone(), &body.rule_id, body.actions).map_err(|_| not_found())?;
    save(&state, user, &rules).await?;
    Ok(set_pushrule_actions::v3::Response::new())
}
