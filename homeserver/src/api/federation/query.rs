//! Questions other servers ask about this one's users and aliases: `query/profile` and
//! `query/directory`.

use actix_web::web;
use ruma::{
    OwnedServerName,
    api::federation::query::{get_profile_information, get_room_information},
};

use crate::{
    error::{Error, Result},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(profile).add(directory);
}

/// GET /_matrix/federation/v1/query/profile
async fn profile(
    state: web::Data<AppState>,
    request: Ruma<get_profile_information::v1::Request>,
) -> Result<get_profile_information::v1::Response> {
    let user_id = &request.body.user_id;
    if user_id.server_name() != state.server_name {
        return Err(Error::invalid_param(format!("{user_id} is not a user of this server")));
    }
    let user = state.store.get_user(user_id).await?;
    if user.is_none_or(|user| user.deactivated) {
        return Err(Error::not_found("no such user"));
    }
    let (name, avatar) = state.store.profile(user_id).await?;
    let field = request.body.field.as_ref().map(|field| field.as_str().to_owned());
    let wanted = |name: &str| field.as_deref().is_none_or(|field| field == name);
    let mut response = get_profile_information::v1::Response::new();
    for (key, value) in [("displayname", name), ("avatar_url", avatar)] {
        if let Some(value) = value.filter(|_| wanted(key)) {
            response.set(key.to_owned(), value.into());
        }
    }
    Ok(response)
}

/// GET /_matrix/federation/v1/query/directory
async fn directory(
    state: web::Data<AppState>,
    request: Ruma<get_room_information::v1::Request>,
) -> Result<get_room_information::v1::Response> {
    let alias = &request.body.room_alias;
    if alias.server_name() != state.server_name {
        return Err(Error::invalid_param(format!("{alias} is not an alias of this server")));
    }
    let room_id = crate::api::client::resolve_alias(&state, alias).await?;
    let servers: Vec<OwnedServerName> = vec![state.server_name.clone()];
    Ok(get_room_information::v1::Response::new(room_id, servers))
}
