//! What users keep on the server for themselves: account data (global and per room) and filters
//! (pushers are in `push.rs`).

use actix_web::web;
use ruma::{
    UserId,
    api::client::{
        config::{
            get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
        },
        filter::{FilterDefinition, create_filter, get_filter},
    },
};
use serde_json::value::RawValue;

use crate::{
    error::{Error, Result},
    rooms::{self, client_event::raw, visibility},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Largest account data item, in bytes.
const MAX_ACCOUNT_DATA: usize = 65_536;

pub(super) fn routes(router: &mut Router) {
    router.add(set_global).add(get_global).add(set_room).add(get_room).add(create_filter).add(get_filter);
}

fn own(sender: &UserId, target: &UserId) -> Result<()> {
    if sender == target { Ok(()) } else { Err(Error::forbidden("you can only reach your own account data")) }
}

pub(super) async fn put(
    state: &AppState,
    user: &UserId,
    room: Option<&str>,
    data_type: &str,
    content: &RawValue,
) -> Result<()> {
    if content.get().len() > MAX_ACCOUNT_DATA {
        return Err(Error::too_large(MAX_ACCOUNT_DATA));
    }
    if !content.get().trim_start().starts_with('{') {
        return Err(Error::bad_json("account data must be a JSON object"));
    }
    // These two have endpoints of their own that check what they hold.
    if (data_type == "m.push_rules" && room.is_none()) || (data_type == "m.fully_read" && room.is_some()) {
        return Err(Error::bad_json(format!("{data_type} is set through its own endpoint")));
    }
    if data_type == visibility::IGNORED_USER_LIST && room.is_none() {
        visibility::check_ignored_list(user, content.get())?;
    }
    let content = content.get().to_owned();
    rooms::at_new_position(state, |position| async move {
        state.store.put_account_data(user, room, data_type, &content, position).await.map_err(Into::into)
    })
    .await
    .map(drop)
}

/// PUT /_matrix/client/v3/user/{userId}/account_data/{type}
async fn set_global(
    state: web::Data<AppState>,
    request: Ruma<set_global_account_data::v3::Request>,
) -> Result<set_global_account_data::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    put(&state, &body.user_id, None, &body.event_type.to_string(), body.data.json()).await?;
    Ok(set_global_account_data::v3::Response::new())
}

/// GET /_matrix/client/v3/user/{userId}/account_data/{type}
async fn get_global(
    state: web::Data<AppState>,
    request: Ruma<get_global_account_data::v3::Request>,
) -> Result<get_global_account_data::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    let content = state
        .store
        .account_data(&body.user_id, None, &body.event_type.to_string())
        .await?
        .ok_or_else(|| Error::not_found("no account data of that type"))?;
    let value: serde_json::Value = serde_json::from_str(&content).map_err(Error::internal)?;
    Ok(get_global_account_data::v3::Response::new(raw(&value)?))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
async fn set_room(
    state: web::Data<AppState>,
    request: Ruma<set_room_account_data::v3::Request>,
) -> Result<set_room_account_data::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    rooms::room_version(&state, &body.room_id).await?;
    put(&state, &body.user_id, Some(body.room_id.as_str()), &body.event_type.to_string(), body.data.json())
        .await?;
    Ok(set_room_account_data::v3::Response::new())
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
async fn get_room(
    state: web::Data<AppState>,
    request: Ruma<get_room_account_data::v3::Request>,
) -> Result<get_room_account_data::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    let content = state
        .store
        .account_data(&body.user_id, Some(body.room_id.as_str()), &body.event_type.to_string())
        .await?
        .ok_or_else(|| Error::not_found("no account data of that type"))?;
    let value: serde_json::Value = serde_json::from_str(&content).map_err(Error::internal)?;
    Ok(get_room_account_data::v3::Response::new(raw(&value)?))
}

/// POST /_matrix/client/v3/user/{userId}/filter
async fn create_filter(
    state: web::Data<AppState>,
    request: Ruma<create_filter::v3::Request>,
) -> Result<create_filter::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    let text = serde_json::to_string(&body.filter).map_err(Error::internal)?;
    let id = state.store.create_filter(&body.user_id, &text).await?;
    Ok(create_filter::v3::Response::new(id.to_string()))
}

/// A stored filter by id.
pub(super) async fn load_filter(state: &AppState, user: &UserId, id: &str) -> Result<FilterDefinition> {
    let id: i64 = id.parse().map_err(|_| {
        Error::invalid_param("filter must be a filter id (digits, as POST /filter returned) or a JSON filter")
    })?;
    let text = state.store.filter(user, id).await?.ok_or_else(|| Error::not_found("no such filter"))?;
    serde_json::from_str(&text).map_err(Error::internal)
}

/// GET /_matrix/client/v3/user/{userId}/filter/{filterId}
async fn get_filter(
    state: web::Data<AppState>,
    request: Ruma<get_filter::v3::Request>,
) -> Result<get_filter::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    Ok(get_filter::v3::Response::new(load_filter(&state, &body.user_id, &body.filter_id).await?))
}
