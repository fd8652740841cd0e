//! Profiles: `profile/{userId}`, its `displayname` and `avatar_url`. A change is also sent as a
//! new member event in every room the user is in, so other members see it.

use actix_web::web;
use ruma::{
    OwnedMxcUri, OwnedUserId, UserId,
    api::client::profile::{get_avatar_url, get_display_name, get_profile, set_avatar_url, set_display_name},
};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    rooms::{self, Draft, client_event::ClientEvent},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Longest display name, in characters.
const MAX_DISPLAYNAME: usize = 256;
/// As Synapse's limit on avatar URLs.
const MAX_AVATAR_URL_BYTES: usize = 1000;

pub(super) fn routes(router: &mut Router) {
    router.add(get_profile).add(get_displayname).add(set_displayname).add(get_avatar).add(set_avatar);
}

/// Checks the user exists (asking the application service whose namespace covers a local user
/// that does not, which may create it).
async fn known_user(state: &AppState, user_id: &UserId) -> Result<()> {
    let mut user = state.store.get_user(user_id).await?;
    if user.is_none()
        && user_id.server_name() == state.server_name
        && state.appservices.query_user(user_id).await
    {
        user = state.store.get_user(user_id).await?;
    }
    match user {
        Some(user) if !user.deactivated => Ok(()),
        _ => Err(Error::not_found("no such user")),
    }
}

/// A user's display name and avatar URL: a local user's from the database, another server's
/// user's asked of that server (`query/profile`).
async fn profile_of(state: &AppState, user_id: &UserId) -> Result<(Option<String>, Option<String>)> {
    if user_id.server_name() == state.server_name {
        known_user(state, user_id).await?;
        return Ok(state.store.profile(user_id).await?);
    }
    let request = ruma::api::federation::query::get_profile_information::v1::Request::new(user_id.to_owned());
    let answer = state
        .remote()?
        .send(&state.server_name, state.signing_key.key_pair(), user_id.server_name(), request)
        .await?;
    // What another server says is bounded here as what users here may set.
    let field = |name: &str, max: usize| {
        answer
            .get(name)
            .and_then(|value| value.as_str())
            .filter(|value| value.len() <= max)
            .map(str::to_owned)
    };
    Ok((field("displayname", MAX_DISPLAYNAME * 4), field("avatar_url", MAX_AVATAR_URL_BYTES)))
}

/// GET /_matrix/client/v3/profile/{userId}
async fn get_profile(
    state: web::Data<AppState>,
    request: Ruma<get_profile::v3::Request>,
) -> Result<get_profile::v3::Response> {
    let (name, avatar) = profile_of(&state, &request.body.user_id).await?;
    let mut response = get_profile::v3::Response::new();
    if let Some(name) = name {
        response.data.set("displayname".to_owned(), name.into());
    }
    if let Some(avatar) = avatar {
        response.data.set("avatar_url".to_owned(), avatar.into());
    }
    Ok(response)
}

/// GET /_matrix/client/v3/profile/{userId}/displayname
async fn get_displayname(
    state: web::Data<AppState>,
    request: Ruma<get_display_name::v3::Request>,
) -> Result<get_display_name::v3::Response> {
    Ok(get_display_name::v3::Response::new(profile_of(&state, &request.body.user_id).await?.0))
}

/// GET /_matrix/client/v3/profile/{userId}/avatar_url
async fn get_avatar(
    state: web::Data<AppState>,
    request: Ruma<get_avatar_url::v3::Request>,
) -> Result<get_avatar_url::v3::Response> {
    let avatar = profile_of(&state, &request.body.user_id).await?.1.map(OwnedMxcUri::from);
    Ok(get_avatar_url::v3::Response::new(avatar))
}

fn own(sender: &UserId, target: &OwnedUserId) -> Result<()> {
    if sender == target { Ok(()) } else { Err(Error::forbidden("you can only change your own profile")) }
}

/// Sends the user's new profile (each `(field, value)`; `None` removes it) into each room they
/// are in.
async fn propagate(state: &AppState, user_id: &UserId, changes: &[(&str, Option<&str>)]) -> Result<()> {
    for (room, membership, _) in state.store.user_rooms(user_id).await? {
        if membership != "join" {
            continue;
        }
        let Ok(room_id) = ruma::OwnedRoomId::try_from(room) else { continue };
        let current = state.store.current_state(&room_id).await?;
        let member = current
            .iter()
            .map(ClientEvent::parse)
            .find(|e| e.as_ref().is_ok_and(|e| e.is_state("m.room.member", user_id.as_str())));
        let mut content = match member.transpose()? {
            Some(event) => event.content_value()?,
            None => continue,
        };
        let before = content.clone();
        for (field, value) in changes {
            match value {
                Some(value) => content[*field] = Value::from(*value),
                None => {
                    content.as_object_mut().map(|c| c.remove(*field));
                }
            }
        }
        if content == before {
            // The room already shows it: no new event (Synapse skips such duplicates too).
            continue;
        }
        let content = serde_json::value::to_raw_value(&content).map_err(Error::internal)?;
        let draft = Draft::membership(user_id, user_id, &content);
        if let Err(error) = rooms::append(state, &room_id, draft).await {
            tracing::warn!(%room_id, %error, "could not update the member event");
        }
    }
    Ok(())
}

/// PUT /_matrix/client/v3/profile/{userId}/displayname
async fn set_displayname(
    state: web::Data<AppState>,
    request: Ruma<set_display_name::v3::Request>,
) -> Result<set_display_name::v3::Response> {
    let user = &request.sender.user_id;
    own(user, &request.body.user_id)?;
    let name = request.body.displayname.as_deref().filter(|n| !n.is_empty());
    if name.is_some_and(|n| n.chars().count() > MAX_DISPLAYNAME) {
        return Err(Error::invalid_param(format!("displayname longer than {MAX_DISPLAYNAME} characters")));
    }
    state.store.set_displayname(user, name).await?;
    propagate(&state, user, &[("displayname", name)]).await?;
    Ok(set_display_name::v3::Response::new())
}

/// PUT /_matrix/client/v3/profile/{userId}/avatar_url
async fn set_avatar(
    state: web::Data<AppState>,
    request: Ruma<set_avatar_url::v3::Request>,
) -> Result<set_avatar_url::v3::Response> {
    let user = &request.sender.user_id;
    own(user, &request.body.user_id)?;
    let url = request.body.avatar_url.as_ref().map(|u| u.as_str()).filter(|u| !u.is_empty());
    // Any string of bounded length, as Synapse takes it (bridges set their networks' avatar
    // URLs, and the compliance suite a plain word): it is served back as it came, and clients
    // only fetch `mxc://` ones.
    if url.is_some_and(|u| u.len() > MAX_AVATAR_URL_BYTES) {
        return Err(Error::invalid_param(format!("avatar_url is longer than {MAX_AVATAR_URL_BYTES} bytes")));
    }
    state.store.set_avatar_url(user, url).await?;
    propagate(&state, user, &[("avatar_url", url)]).await?;
    Ok(set_avatar_url::v3::Response::new())
}

/// Clears a user's display name and avatar, here and in the member events of every room they
/// are in (an account deactivated with `erase: true`).
pub(super) async fn clear(state: &AppState, user_id: &UserId) -> Result<()> {
    state.store.set_displayname(user_id, None).await?;
    state.store.set_avatar_url(user_id, None).await?;
    propagate(state, user_id, &[("displayname", None), ("avatar_url", None)]).await
}
