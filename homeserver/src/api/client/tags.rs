//! Room tags: `GET /user/{userId}/rooms/{roomId}/tags`, `PUT` and `DELETE` of
//! `.../tags/{tag}`. A user's tags of a room are the room's `m.tag` account data
//! (`{"tags": {name: {"order": n}}}`), so `/sync` delivers them in the room's `account_data`.

use actix_web::web;
use ruma::{
    UserId,
    api::client::tag::{create_tag, delete_tag, get_tags},
    events::tag::{TagInfo, TagName, Tags},
};
use serde_json::{Map, Value};

use crate::{
    error::{Error, Result},
    rooms,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// The room account data type tags live in.
const TAG_TYPE: &str = "m.tag";
/// Longest tag name, in bytes (the spec's bound on event types and state keys).
const MAX_TAG_BYTES: usize = 255;
/// Most tags one room may carry for one user.
const MAX_TAGS: usize = 100;
/// Largest `m.tag` content, in bytes (as for any account data).
const MAX_CONTENT_BYTES: usize = 65_536;

pub(super) fn routes(router: &mut Router) {
    router.add(get_tags).add(set_tag).add(delete_tag);
}

fn own(sender: &UserId, target: &UserId) -> Result<()> {
    if sender == target { Ok(()) } else { Err(Error::forbidden("you can only reach your own tags")) }
}

fn check_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(Error::invalid_param(format!("a tag is 1 to {MAX_TAG_BYTES} bytes long")));
    }
    Ok(())
}

/// The `tags` object of stored `m.tag` content, and the rest of the content. Content set
/// through the generic account data endpoint may be anything: what is not an object is none.
fn split(content: Option<&str>) -> (Map<String, Value>, Map<String, Value>) {
    let mut whole: Map<String, Value> =
        content.and_then(|text| crate::storage::parse_stored(text).ok()).unwrap_or_default();
    let tags = match whole.remove("tags") {
        Some(Value::Object(tags)) => tags,
        _ => Map::new(),
    };
    (tags, whole)
}

/// Stored content with `tags` put back.
fn join(
    tags: Map<String, Value>,
    mut rest: Map<String, Value>,
) -> std::result::Result<Option<String>, String> {
    rest.insert("tags".to_owned(), Value::Object(tags));
    let text = Value::Object(rest).to_string();
    if text.len() > MAX_CONTENT_BYTES {
        return Err(format!("the room's tags would take more than {MAX_CONTENT_BYTES} bytes"));
    }
    Ok(Some(text))
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags
async fn get_tags(
    state: web::Data<AppState>,
    request: Ruma<get_tags::v3::Request>,
) -> Result<get_tags::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    let stored = state.store.account_data(&body.user_id, Some(body.room_id.as_str()), TAG_TYPE).await?;
    let (tags, _) = split(stored.as_deref());
    // Entries that are not a tag's info (written through the generic endpoint) are left out.
    let tags: Tags = tags
        .into_iter()
        .filter_map(|(name, info)| Some((TagName::from(name), serde_json::from_value::<TagInfo>(info).ok()?)))
        .collect();
    Ok(get_tags::v3::Response::new(tags))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
async fn set_tag(
    state: web::Data<AppState>,
    request: Ruma<create_tag::v3::Request>,
) -> Result<create_tag::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    check_tag(&body.tag)?;
    if body.tag_info.order.is_some_and(|order| !(0.0..=1.0).contains(&order)) {
        return Err(Error::invalid_param("order must be a number from 0 to 1"));
    }
    rooms::room_version(&state, &body.room_id).await?;
    let info = serde_json::to_value(&body.tag_info).map_err(Error::internal)?;
    let update = |current: Option<&str>| {
        let (mut tags, rest) = split(current);
        tags.insert(body.tag.clone(), info.clone());
        if tags.len() > MAX_TAGS {
            return Err(format!("a room may carry at most {MAX_TAGS} tags"));
        }
        join(tags, rest)
    };
    let (store, user, room) = (&state.store, &body.user_id, body.room_id.as_str());
    rooms::at_new_position(&state, |position| async move {
        Ok(store.update_account_data(user, Some(room), TAG_TYPE, position, &update).await?)
    })
    .await?
    .map_err(Error::invalid_param)?;
    Ok(create_tag::v3::Response::new())
}

/// DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
///
/// Removing a tag the room does not carry changes nothing and succeeds.
async fn delete_tag(
    state: web::Data<AppState>,
    request: Ruma<delete_tag::v3::Request>,
) -> Result<delete_tag::v3::Response> {
    let body = &request.body;
    own(&request.sender.user_id, &body.user_id)?;
    check_tag(&body.tag)?;
    let update = |current: Option<&str>| {
        let (mut tags, rest) = split(current);
        match tags.remove(&body.tag) {
            Some(_) => join(tags, rest),
            None => Ok(None),
        }
    };
    let (store, user, room) = (&state.store, &body.user_id, body.room_id.as_str());
    rooms::at_new_position(&state, |position| async move {
        Ok(store.update_account_data(user, Some(room), TAG_TYPE, position, &update).await?)
    })
    .await?
    .map_err(Error::invalid_param)?;
    Ok(delete_tag::v3::Response::new())
}
