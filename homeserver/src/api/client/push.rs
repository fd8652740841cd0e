//! Push notifications, the client's side: push rules, pushers and the notification list.
//!
//! - **Rules** are the server's default ruleset plus each user's changes, kept as their
//!   `m.push_rules` global account data (which is how clients also receive them through
//!   `/sync`), and brought up to date with the server's defaults when read
//!   ([`crate::push::ruleset`]). Users create and delete their own rules; the server's (ids
//!   starting with `.`) can only be enabled, disabled and given other actions. A path that is
//!   not a rule's (an unknown scope, a missing rule id or part) is 400 `M_UNRECOGNIZED`, as
//!   Synapse answers; an unknown kind 400 `M_INVALID_PARAM`; an unknown rule 404 `M_NOT_FOUND`.
//!   `GET /pushrules/global/{kind}/` lists one kind (a Synapse extension SyTest uses). Room and
//!   sender rules take any rule id without `/` or `\\`, as Synapse's do (SyTest names room rules
//!   by alias), though the spec names them by room or user id; those that are no such id match
//!   no event, so only the push-rule API shows them, not ruma's ruleset that the evaluator and
//!   `/sync` use ([`crate::push::ruleset`]).
//! - **Pushers**: only HTTP pushers are taken (this server sends no email), with a URL that
//!   follows the spec and, unless `push.allow_private_addresses`, names no private address.
//! - **`/notifications`**: what the evaluator stored ([`crate::push::evaluate`]), newest first.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, http::StatusCode, web};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedRoomId, RoomId, UInt,
    api::client::push::PushRule,
    api::client::push::{
        PusherKind, delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions,
        get_pushrule_enabled, get_pushrules_all, get_pushrules_global_scope, set_pusher,
        set_pushrule_actions, set_pushrule_enabled,
    },
    push::{
        Action, InsertPushRuleError, NewConditionalPushRule, NewPatternedPushRule, NewPushRule,
        PushCondition, RemovePushRuleError, RuleKind, Ruleset, SimplePushRule, SimplePushRuleInit,
    },
};
use serde_json::json;

use crate::{
    error::{Error, ErrorKind, Result},
    push::{ruleset, stored_rules},
    rooms::{self, visibility::ReadRules},
    ruma_wrapper::{Authenticated, JsonBody, Router, Ruma, parse_json_body},
    state::AppState,
    storage::PusherKey,
};

/// Largest stored ruleset, in bytes (the bound of any account data).
const MAX_RULES_BYTES: usize = 65_536;
/// Longest rule id, in bytes.
const MAX_RULE_ID_BYTES: usize = 255;
/// Notifications per page of `/notifications` when the client does not say, and at most.
const DEFAULT_NOTIFICATIONS: u64 = 50;
const MAX_NOTIFICATIONS: u64 = 100;
/// Most pushers one user may have.
const MAX_PUSHERS: i64 = 100;
/// Bounds of a pusher's fields, in bytes: the spec's for `app_id` (64) and `pushkey` (512),
/// and the JSON of the whole pusher.
const MAX_APP_ID: usize = 64;
const MAX_PUSHKEY: usize = 512;
const MAX_PUSHER_BYTES: usize = 8_192;

/// The prefixes of the push-rule paths, for the answer to malformed ones.
const RULE_PREFIXES: [&str; 2] = ["/_matrix/client/r0/pushrules", "/_matrix/client/v3/pushrules"];

pub(super) fn routes(router: &mut Router) {
    router
        .add_responding(get_all)
        .add_responding(get_global)
        .add(get_rule)
        .add(get_enabled)
        .add(get_actions)
        .add(delete_rule)
        .add(set_enabled)
        .add(set_actions)
        .add(get_pushers)
        .add(set_pusher)
        .add_responding(get_notifications);
    for prefix in RULE_PREFIXES {
        router.fallback(prefix, || web::route().to(malformed_rule_path));
    }
    for path in ["/_matrix/client/r0/pushrules/global/{kind}/", "/_matrix/client/v3/pushrules/global/{kind}/"]
    {
        router
            .add_route(http::Method::GET, path, || web::get().to(get_kind))
            .add_route(http::Method::PUT, path, || web::put().to(no_rule_id))
            .add_route(http::Method::DELETE, path, || web::delete().to(no_rule_id));
    }
    // Writing to the ruleset as a whole or to a scope is no request: 400, not 405.
    for path in [
        "/_matrix/client/r0/pushrules/",
        "/_matrix/client/v3/pushrules/",
        "/_matrix/client/r0/pushrules/global/",
        "/_matrix/client/v3/pushrules/global/",
    ] {
        router.add_route(http::Method::PUT, path, || web::put().to(malformed_rule_path)).add_route(
            http::Method::DELETE,
            path,
            || web::delete().to(malformed_rule_path),
        );
    }
    for path in [
        "/_matrix/client/r0/pushrules/global/{kind}/{rule_id}",
        "/_matrix/client/v3/pushrules/global/{kind}/{rule_id}",
    ] {
        router.add_route(http::Method::PUT, path, || web::put().to(set_rule));
    }
}

/// A user's rules as the push-rule API shows them: ruma's ruleset, and the room and sender
/// rules in their order under any id (see the module's doc).
struct Rules {
    ruleset: Ruleset,
    room: Vec<SimplePushRule<String>>,
    sender: Vec<SimplePushRule<String>>,
}

impl Rules {
    async fn load(state: &AppState, user: &ruma::UserId) -> Result<Self> {
        let ruleset = ruleset(state, user).await?;
        let stored = stored_rules(state, user).await?;
        // Written by `save` only; a list that cannot be read is left as empty (as `ruleset` fails).
        let list = |kind: &str| {
            stored
                .as_ref()
                .and_then(|global| global.get(kind))
                .and_then(|list| serde_json::from_value::<Vec<SimplePushRule<String>>>(list.clone()).ok())
                .unwrap_or_default()
        };
        Ok(Self { ruleset, room: list("room"), sender: list("sender") })
    }

    /// The room or sender rules, which this type keeps itself; `None` for the other kinds.
    fn simple(&mut self, kind: &RuleKind) -> Option<&mut Vec<SimplePushRule<String>>> {
        match kind {
            RuleKind::Room => Some(&mut self.room),
            RuleKind::Sender => Some(&mut self.sender),
            _ => None,
        }
    }

    fn get(&mut self, kind: &RuleKind, rule_id: &str) -> Option<PushRule> {
        match self.simple(kind) {
            Some(list) => list.iter().find(|rule| rule.rule_id == rule_id).cloned().map(Into::into),
            None => self.ruleset.get(kind.clone(), rule_id).map(|rule| rule.to_owned().into()),
        }
    }

    /// The `global` object: ruma's ruleset with the room and sender lists as kept here.
    fn to_json(&self) -> Result<serde_json::Value> {
        let mut global = serde_json::to_value(&self.ruleset).map_err(Error::internal)?;
        global["room"] = serde_json::to_value(&self.room).map_err(Error::internal)?;
        global["sender"] = serde_json::to_value(&self.sender).map_err(Error::internal)?;
        Ok(global)
    }

    async fn save(&self, state: &AppState, user: &ruma::UserId) -> Result<()> {
        let content = json!({ "global": self.to_json()? }).to_string();
        if content.len() > MAX_RULES_BYTES {
            return Err(Error::invalid_param(format!(
                "push rules may take at most {MAX_RULES_BYTES} bytes; remove some first"
            )));
        }
        rooms::at_new_position(state, |position| async move {
            state
                .store
                .put_account_data(user, None, "m.push_rules", &content, position)
                .await
                .map_err(Into::into)
        })
        .await
        .map(drop)
    }
}

/// Inserts a room or sender rule as ruma's ruleset inserts the others: replacing one of the same
/// id, first of its kind unless `before` or `after` names another.
fn insert_simple(
    list: &mut Vec<SimplePushRule<String>>,
    rule: SimplePushRule<String>,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<()> {
    if rule.rule_id.starts_with('.') {
        return Err(server_default_rule_id());
    }
    if rule.rule_id.contains(['/', '\\']) {
        return Err(invalid_rule_id());
    }
    list.retain(|existing| existing.rule_id != rule.rule_id);
    let position =
        |id: &str| list.iter().position(|existing| existing.rule_id == id).ok_or_else(unknown_relative_rule);
    let at = match (before, after) {
        (Some(before), Some(after)) => {
            let (before, after) = (position(before)?, position(after)?);
            if before < after {
                return Err(Error::invalid_param(
                    "`before` names a rule that comes before the one `after` names",
                ));
            }
            before
        }
        (Some(before), None) => position(before)?,
        (None, Some(after)) => position(after)? + 1,
        (None, None) => 0,
    };
    list.insert(at, rule);
    Ok(())
}

/// Refuses actions the spec does not define (ruma reads any string as a custom action), as
/// Synapse does; `dont_notify` and `coalesce`, which the spec retired but clients still send,
/// are kept.
fn check_actions(actions: &[Action]) -> Result<()> {
    for action in actions {
        match action {
            Action::Notify | Action::SetTweak(_) => {}
            other => {
                let name = serde_json::to_value(other).map_err(Error::internal)?;
                if !matches!(name.as_str(), Some("dont_notify" | "coalesce")) {
                    return Err(Error::invalid_param(format!(
                        "unknown push rule action {name}: notify, set_tweak, or the retired \
                         dont_notify and coalesce"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn server_default_rule_id() -> Error {
    Error::invalid_param(
        "rule ids starting with `.` belong to the server's default rules, which cannot be created or \
         replaced (their actions and `enabled` can be changed)",
    )
}

fn invalid_rule_id() -> Error {
    Error::invalid_param("rule ids may not contain `/` or `\\`")
}

fn unknown_relative_rule() -> Error {
    Error::invalid_param("`before` or `after` names no rule of this kind")
}

fn not_found() -> Error {
    Error::not_found("no such push rule")
}

/// A push-rule path that is not one: 400 `M_UNRECOGNIZED`, as Synapse answers.
async fn malformed_rule_path(req: HttpRequest) -> Result<HttpResponse> {
    let after = RULE_PREFIXES.iter().find_map(|prefix| req.path().strip_prefix(prefix)).unwrap_or_default();
    if after.is_empty() {
        // `/pushrules` itself names nothing (Synapse: 404; SyTest expects it).
        return Err(Error::unrecognized(StatusCode::NOT_FOUND, "push rules are at /pushrules/"));
    }
    let message = match after.split('/').nth(1) {
        None | Some("") => "push rule paths are /pushrules/ or /pushrules/global/...".to_owned(),
        Some("global") => {
            "push rule paths are /pushrules/global/, /pushrules/global/{kind}/{ruleId} and its \
             /enabled or /actions"
                .to_owned()
        }
        Some(scope) => format!("unknown push rule scope `{scope}`: the only scope is `global`"),
    };
    Err(Error::unrecognized(StatusCode::BAD_REQUEST, message))
}

/// `PUT` or `DELETE` of `/pushrules/global/{kind}/`: the rule id is missing.
async fn no_rule_id(_auth: Authenticated) -> Result<HttpResponse> {
    Err(Error::unrecognized(
        StatusCode::BAD_REQUEST,
        "the path needs a rule id: /pushrules/global/{kind}/{ruleId}",
    ))
}

/// Refuses kinds the spec does not have (ruma reads any string as a kind).
fn check_kind(kind: &RuleKind) -> Result<()> {
    match kind {
        RuleKind::Override | RuleKind::Underride | RuleKind::Sender | RuleKind::Room | RuleKind::Content => {
            Ok(())
        }
        other => Err(Error::invalid_param(format!(
            "unknown push rule kind `{other}`: override, underride, sender, room or content"
        ))),
    }
}

/// Refuses an empty or overlong rule id.
fn check_rule_id(rule_id: &str) -> Result<()> {
    if rule_id.is_empty() {
        return Err(Error::unrecognized(
            StatusCode::BAD_REQUEST,
            "the path needs a rule id: /pushrules/global/{kind}/{ruleId}",
        ));
    }
    if rule_id.len() > MAX_RULE_ID_BYTES {
        return Err(Error::invalid_param(format!("rule ids are at most {MAX_RULE_ID_BYTES} bytes")));
    }
    Ok(())
}

/// GET /_matrix/client/v3/pushrules/
///
/// Answered as JSON of its own (ruma's response type holds room and sender rules by room or
/// user id only).
async fn get_all(
    state: web::Data<AppState>,
    request: Ruma<get_pushrules_all::v3::Request>,
) -> Result<HttpResponse> {
    let rules = Rules::load(&state, &request.sender.user_id).await?;
    Ok(HttpResponse::Ok().json(json!({ "global": rules.to_json()? })))
}

/// GET /_matrix/client/v3/pushrules/global/
async fn get_global(
    state: web::Data<AppState>,
    request: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<HttpResponse> {
    let rules = Rules::load(&state, &request.sender.user_id).await?;
    Ok(HttpResponse::Ok().json(rules.to_json()?))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/
async fn get_kind(state: web::Data<AppState>, auth: Authenticated, req: HttpRequest) -> Result<HttpResponse> {
    let kind = RuleKind::from(req.match_info().get("kind").unwrap_or_default());
    check_kind(&kind)?;
    let rules = Rules::load(&state, &auth.0.user_id).await?.to_json()?;
    Ok(HttpResponse::Ok().json(&rules[kind.as_str()]))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn get_rule(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule::v3::Request>,
) -> Result<get_pushrule::v3::Response> {
    let body = &request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    let mut rules = Rules::load(&state, &request.sender.user_id).await?;
    let rule = rules.get(&body.kind, &body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule::v3::Response::new(rule))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn get_enabled(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<get_pushrule_enabled::v3::Response> {
    let body = &request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    let mut rules = Rules::load(&state, &request.sender.user_id).await?;
    let rule = rules.get(&body.kind, &body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.enabled))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn get_actions(
    state: web::Data<AppState>,
    request: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<get_pushrule_actions::v3::Response> {
    let body = &request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    let mut rules = Rules::load(&state, &request.sender.user_id).await?;
    let rule = rules.get(&body.kind, &body.rule_id).ok_or_else(not_found)?;
    Ok(get_pushrule_actions::v3::Response::new(rule.actions))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
///
/// Outside ruma's request type, which refuses room and sender rules not named by a room or user
/// id (see the module's doc); the body is the spec's for each kind.
async fn set_rule(
    state: web::Data<AppState>,
    auth: Authenticated,
    req: HttpRequest,
    body: JsonBody,
) -> Result<HttpResponse> {
    #[derive(serde::Deserialize)]
    struct Body {
        actions: Vec<Action>,
        #[serde(default)]
        conditions: Option<Vec<PushCondition>>,
        #[serde(default)]
        pattern: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Position {
        before: Option<String>,
        after: Option<String>,
    }
    let user = &auth.0.user_id;
    // The raw segments, decoded here (`/pushrules/global/{kind}/{ruleId}`).
    let segments: Vec<&str> = req.path().rsplitn(3, '/').collect();
    let decode = |raw: &str| {
        percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| Error::invalid_param("path segment is not valid UTF-8"))
    };
    let rule_id = decode(segments.first().copied().unwrap_or_default())?;
    let kind = RuleKind::from(decode(segments.get(1).copied().unwrap_or_default())?);
    check_kind(&kind)?;
    check_rule_id(&rule_id)?;
    let position = web::Query::<Position>::from_query(req.query_string())
        .map_err(|e| Error::invalid_param(format!("bad `before` or `after`: {e}")))?
        .into_inner();
    for relative in [&position.before, &position.after].into_iter().flatten() {
        check_rule_id(relative)?;
    }
    let body: Body = parse_json_body(&body.0)?;
    check_actions(&body.actions)?;
    let mut rules = Rules::load(&state, user).await?;
    let (before, after) = (position.before.as_deref(), position.after.as_deref());
    if let Some(list) = rules.simple(&kind) {
        let rule =
            SimplePushRuleInit { actions: body.actions, default: false, enabled: true, rule_id }.into();
        insert_simple(list, rule, before, after)?;
    } else {
        let rule = match kind {
            RuleKind::Content => NewPushRule::Content(NewPatternedPushRule::new(
                rule_id,
                body.pattern.ok_or_else(|| Error::missing_param("content rules need a `pattern`"))?,
                body.actions,
            )),
            RuleKind::Override => NewPushRule::Override(NewConditionalPushRule::new(
                rule_id,
                body.conditions.unwrap_or_default(),
                body.actions,
            )),
            _ => NewPushRule::Underride(NewConditionalPushRule::new(
                rule_id,
                body.conditions.unwrap_or_default(),
                body.actions,
            )),
        };
        rules.ruleset.insert(rule, after, before).map_err(|e| match e {
            InsertPushRuleError::ServerDefaultRuleId => server_default_rule_id(),
            InsertPushRuleError::InvalidRuleId => invalid_rule_id(),
            InsertPushRuleError::RelativeToServerDefaultRule => {
                Error::invalid_param("`before` and `after` must name rules of your own, not the server's")
            }
            InsertPushRuleError::UnknownRuleId => unknown_relative_rule(),
            InsertPushRuleError::BeforeHigherThanAfter => {
                Error::invalid_param("`before` names a rule that comes before the one `after` names")
            }
            other => Error::invalid_param(other.to_string()),
        })?;
    }
    rules.save(&state, user).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

/// DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
async fn delete_rule(
    state: web::Data<AppState>,
    request: Ruma<delete_pushrule::v3::Request>,
) -> Result<delete_pushrule::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    let mut rules = Rules::load(&state, user).await?;
    if let Some(list) = rules.simple(&body.kind) {
        let at = list.iter().position(|rule| rule.rule_id == body.rule_id).ok_or_else(not_found)?;
        list.remove(at);
    } else {
        rules.ruleset.remove(body.kind.clone(), &body.rule_id).map_err(|e| match e {
            RemovePushRuleError::ServerDefault => Error::forbidden(
                "the server's default rules cannot be deleted; disable them through /enabled instead",
            ),
            _ => not_found(),
        })?;
    }
    rules.save(&state, user).await?;
    Ok(delete_pushrule::v3::Response::new())
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
async fn set_enabled(
    state: web::Data<AppState>,
    request: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<set_pushrule_enabled::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    let mut rules = Rules::load(&state, user).await?;
    if let Some(list) = rules.simple(&body.kind) {
        let rule = list.iter_mut().find(|rule| rule.rule_id == body.rule_id).ok_or_else(not_found)?;
        rule.enabled = body.enabled;
    } else {
        rules.ruleset.set_enabled(body.kind.clone(), &body.rule_id, body.enabled).map_err(|_| not_found())?;
    }
    rules.save(&state, user).await?;
    Ok(set_pushrule_enabled::v3::Response::new())
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
async fn set_actions(
    state: web::Data<AppState>,
    request: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<set_pushrule_actions::v3::Response> {
    let user = &request.sender.user_id;
    let body = request.body;
    check_kind(&body.kind)?;
    check_rule_id(&body.rule_id)?;
    check_actions(&body.actions)?;
    let mut rules = Rules::load(&state, user).await?;
    if let Some(list) = rules.simple(&body.kind) {
        let rule = list.iter_mut().find(|rule| rule.rule_id == body.rule_id).ok_or_else(not_found)?;
        rule.actions = body.actions;
    } else {
        rules.ruleset.set_actions(body.kind.clone(), &body.rule_id, body.actions).map_err(|_| not_found())?;
    }
    rules.save(&state, user).await?;
    Ok(set_pushrule_actions::v3::Response::new())
}

/// GET /_matrix/client/v3/pushers
async fn get_pushers(
    state: web::Data<AppState>,
    request: Ruma<get_pushers::v3::Request>,
) -> Result<get_pushers::v3::Response> {
    let stored = state.store.pushers(&request.sender.user_id).await?;
    let pushers = stored.iter().filter_map(|data| serde_json::from_str(data).ok()).collect();
    Ok(get_pushers::v3::Response::new(pushers))
}

/// POST /_matrix/client/v3/pushers/set
async fn set_pusher(
    state: web::Data<AppState>,
    request: Ruma<set_pusher::v3::Request>,
) -> Result<set_pusher::v3::Response> {
    let user = &request.sender.user_id;
    match &request.body.action {
        set_pusher::v3::PusherAction::Post(post) => {
            let pusher = &post.pusher;
            let ids = &pusher.ids;
            if ids.app_id.is_empty() || ids.app_id.len() > MAX_APP_ID {
                return Err(Error::invalid_param(format!("app_id must be 1 to {MAX_APP_ID} bytes")));
            }
            if ids.pushkey.is_empty() || ids.pushkey.len() > MAX_PUSHKEY {
                return Err(Error::invalid_param(format!("pushkey must be 1 to {MAX_PUSHKEY} bytes")));
            }
            match &pusher.kind {
                PusherKind::Http(http) => {
                    crate::push::gateway::check_url(&http.url, state.config.push.allow_private_addresses)
                        .map_err(Error::invalid_param)?;
                }
                PusherKind::Email(_) => {
                    return Err(Error::invalid_param(
                        "this server sends no email notifications: only `http` pushers are taken",
                    ));
                }
                other => {
                    let kind =
                        serde_json::to_value(other).ok().and_then(|v| v["kind"].as_str().map(str::to_owned));
                    return Err(Error::invalid_param(format!(
                        "unknown pusher kind `{}`: `http` (or null to delete)",
                        kind.unwrap_or_default()
                    )));
                }
            }
            let data = serde_json::to_string(pusher).map_err(Error::internal)?;
            if data.len() > MAX_PUSHER_BYTES {
                return Err(Error::invalid_param(format!(
                    "a pusher may take at most {MAX_PUSHER_BYTES} bytes"
                )));
            }
            let key = PusherKey {
                user_id: user.to_string(),
                app_id: ids.app_id.clone(),
                pushkey: ids.pushkey.clone(),
            };
            let existing = state.store.pushers(user).await?;
            let replaces = existing
                .iter()
                .filter_map(|d| serde_json::from_str::<ruma::api::client::push::Pusher>(d).ok())
                .any(|p| p.ids.app_id == key.app_id && p.ids.pushkey == key.pushkey);
            if !replaces && existing.len() as i64 >= MAX_PUSHERS {
                return Err(Error::new(
                    StatusCode::BAD_REQUEST,
                    ErrorKind::InvalidParam,
                    format!("at most {MAX_PUSHERS} pushers per user; delete one first"),
                ));
            }
            // Kept with the device that set it: deleting the device (logout, a password change
            // that logs the others out) deletes the pusher, as Synapse does.
            let device = request.sender.device_id.as_str();
            state.store.put_pusher(&key, "http", &data, !post.append, Some(device)).await?;
        }
        set_pusher::v3::PusherAction::Delete(ids) => {
            let key = PusherKey {
                user_id: user.to_string(),
                app_id: ids.app_id.clone(),
                pushkey: ids.pushkey.clone(),
            };
            state.store.delete_pusher(&key).await?;
        }
        _ => return Err(Error::bad_json("unknown pusher action")),
    }
    Ok(set_pusher::v3::Response::new())
}

/// GET /_matrix/client/v3/notifications
///
/// Every notification has `profile_tag`, `null` as Synapse writes it (Hearth has no per-profile
/// rule sets); ruma leaves an unset one out.
async fn get_notifications(
    state: web::Data<AppState>,
    request: Ruma<get_notifications::v3::Request>,
) -> Result<HttpResponse> {
    let mut body = super::response_json(notifications_of(&state, &request).await?)?;
    if let Some(list) = body.get_mut("notifications").and_then(serde_json::Value::as_array_mut) {
        for notification in list.iter_mut().filter_map(serde_json::Value::as_object_mut) {
            notification.entry("profile_tag").or_insert(serde_json::Value::Null);
        }
    }
    Ok(HttpResponse::Ok().json(body))
}

async fn notifications_of(
    state: &AppState,
    request: &Ruma<get_notifications::v3::Request>,
) -> Result<get_notifications::v3::Response> {
    let user = &request.sender.user_id;
    let body = &request.body;
    let before = match body.from.as_deref() {
        None | Some("") => i64::MAX,
        Some(from) => from
            .parse::<i64>()
            .ok()
            // Only what this endpoint writes: no sign, no leading zeros.
            .filter(|n| *n >= 0 && n.to_string() == from)
            .ok_or_else(|| Error::invalid_param("`from` must be a `next_token` this endpoint returned"))?,
    };
    let only_highlight = match body.only.as_deref() {
        None | Some("") => false,
        Some("highlight") => true,
        Some(other) => {
            return Err(Error::invalid_param(format!("`only` may only be `highlight`, not `{other}`")));
        }
    };
    let limit = body.limit.map_or(DEFAULT_NOTIFICATIONS, u64::from).clamp(1, MAX_NOTIFICATIONS);
    let limit = i64::try_from(limit).unwrap_or(1);
    let stored = state.store.notifications(user, before, limit, only_highlight).await?;
    // Read positions and read rules, once per room on the page.
    let mut rooms: HashMap<String, (i64, ReadRules)> = HashMap::new();
    let mut notifications = Vec::with_capacity(stored.len());
    for notification in &stored {
        if !rooms.contains_key(&notification.room_id) {
            let room_id = <&RoomId>::try_from(notification.room_id.as_str()).map_err(Error::internal)?;
            let read = state.store.read_up_to(room_id.as_str(), user).await?.unwrap_or(0);
            let rules = ReadRules::load(state, room_id, user).await?;
            rooms.insert(notification.room_id.clone(), (read, rules));
        }
        let Some((read, rules)) = rooms.get(&notification.room_id) else { continue };
        // Notifications are only written for events the user could read; this holds to it.
        if !rules.may_see(&notification.event) {
            continue;
        }
        let actions = serde_json::from_str(&notification.actions).unwrap_or_default();
        // As every endpoint serves events: a self-destructed message not yet pruned is empty.
        let event = rooms::client_event::serve_one(
            state,
            &notification.event,
            super::room::reader_of(&request.sender),
        )
        .await?;
        let room_id = OwnedRoomId::try_from(notification.room_id.as_str()).map_err(Error::internal)?;
        let ts = MilliSecondsSinceUnixEpoch(
            UInt::try_from(u64::try_from(notification.ts).unwrap_or_default()).unwrap_or_default(),
        );
        let read = notification.stream_ordering <= *read;
        notifications.push(get_notifications::v3::Notification::new(actions, event, read, room_id, ts));
    }
    let mut response = get_notifications::v3::Response::new(notifications);
    if stored.len() as i64 == limit {
        response.next_token = stored.last().map(|n| n.stream_ordering.to_string());
    }
    Ok(response)
}
