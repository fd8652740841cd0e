//! Finding rooms and people: aliases, the public room directory, the user directory, and the
//! TURN servers calls go through.

use std::time::Duration;

use actix_web::{http::StatusCode, web};
use base64::Engine;
use hmac::{Hmac, Mac};
use ruma::{
    OwnedRoomAliasId, OwnedRoomId, OwnedUserId, RoomAliasId, UInt,
    api::client::{
        alias::{create_alias, delete_alias, get_alias},
        directory::{get_public_rooms, get_public_rooms_filtered, get_room_visibility, set_room_visibility},
        room::{Visibility, aliases},
        user_directory::search_users,
        voip::get_turn_server_info,
    },
    api::federation::directory as remote_directory,
    directory::{PublicRoomsChunk, PublicRoomsChunkInit, RoomNetwork},
    room::JoinRuleKind,
};

use crate::{
    error::{Error, ErrorKind, Result},
    rooms::{self, client_event::ClientEvent},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::Directory,
};

/// Most rooms or users one directory page returns.
const MAX_PAGE: usize = 500;

pub(super) fn routes(router: &mut Router) {
    router
        .add(create_alias)
        .add(get_alias)
        .add(delete_alias)
        .add(room_aliases)
        .add(public_rooms)
        .add(public_rooms_filtered)
        .add(get_visibility)
        .add(set_visibility)
        .add(search_users)
        .add(turn_server);
}

/// Checks an alias is one this server can hold.
pub(super) fn local_alias(state: &AppState, alias: &RoomAliasId) -> Result<()> {
    if alias.server_name() != state.server_name {
        return Err(Error::invalid_param(format!("aliases here end in :{}", state.server_name)));
    }
    if alias.as_str().len() > 255 {
        return Err(Error::invalid_param("alias longer than 255 bytes"));
    }
    Ok(())
}

/// The room an alias names, or M_NOT_FOUND. An alias nobody made yet in an application
/// service's namespace is asked of the service, which may make it on demand.
pub async fn resolve(state: &AppState, alias: &RoomAliasId) -> Result<OwnedRoomId> {
    let mut found = state.store.resolve_alias(alias.as_str()).await?;
    if found.is_none()
        && alias.server_name() == state.server_name
        && state.appservices.query_alias(alias).await
    {
        found = state.store.resolve_alias(alias.as_str()).await?;
    }
    let (room, _) = found.ok_or_else(|| Error::not_found("no such room alias"))?;
    OwnedRoomId::try_from(room).map_err(Error::internal)
}

fn exclusive(message: impl Into<String>) -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::Exclusive, message)
}

fn room_in_use() -> Error {
    Error::new(StatusCode::BAD_REQUEST, ErrorKind::RoomInUse, "that alias is taken")
}

/// Creates an alias for a room (the caller has checked who may).
pub(super) async fn add_alias(
    state: &AppState,
    alias: &RoomAliasId,
    room_id: &ruma::RoomId,
    creator: &ruma::UserId,
) -> Result<()> {
    local_alias(state, alias)?;
    // An exclusive alias namespace is its service's: only the service's own users make aliases
    // there.
    if let Some(owner) = state.appservices.exclusive_alias_owner(alias.as_str())
        && !owner.is_user_match(creator)
    {
        return Err(exclusive("that alias is reserved for an application service"));
    }
    if state.store.create_alias(alias.as_str(), room_id, creator).await? {
        Ok(())
    } else {
        Err(room_in_use())
    }
}

/// PUT /_matrix/client/v3/directory/room/{roomAlias}
async fn create_alias(
    state: web::Data<AppState>,
    request: Ruma<create_alias::v3::Request>,
) -> Result<create_alias::v3::Response> {
    let body = &request.body;
    if let Some(appservice) = &request.sender.appservice
        && !appservice.is_alias_match(body.room_alias.as_str())
    {
        return Err(exclusive("that alias is outside the application service's alias namespaces"));
    }
    // A service points the aliases of its namespace at any room (as in Synapse: it answers alias
    // queries for rooms it has not joined); a user only at a room they are in.
    if request.sender.appservice.is_some() {
        rooms::room_version(&state, &body.room_id).await?;
    } else {
        rooms::require_joined(&state, &body.room_id, &request.sender.user_id).await?;
    }
    add_alias(&state, &body.room_alias, &body.room_id, &request.sender.user_id).await?;
    Ok(create_alias::v3::Response::new())
}

/// GET /_matrix/client/v3/directory/room/{roomAlias}
async fn get_alias(
    state: web::Data<AppState>,
    request: Ruma<get_alias::v3::Request>,
) -> Result<get_alias::v3::Response> {
    let (room, servers) = resolve_anywhere(&state, &request.body.room_alias).await?;
    Ok(get_alias::v3::Response::new(room, servers))
}

/// The room an alias of any server names, and servers in it: another server's alias is asked
/// of that server (`query/directory`).
pub async fn resolve_anywhere(
    state: &AppState,
    alias: &RoomAliasId,
) -> Result<(OwnedRoomId, Vec<ruma::OwnedServerName>)> {
    if alias.server_name() == state.server_name {
        return Ok((resolve(state, alias).await?, vec![state.server_name.clone()]));
    }
    let question = ruma::api::federation::query::get_room_information::v1::Request::new(alias.to_owned());
    let answer = state
        .remote()?
        .send(&state.server_name, state.signing_key.key_pair(), alias.server_name(), question)
        .await?;
    Ok((answer.room_id, answer.servers))
}

/// DELETE /_matrix/client/v3/directory/room/{roomAlias}
async fn delete_alias(
    state: web::Data<AppState>,
    request: Ruma<delete_alias::v3::Request>,
) -> Result<delete_alias::v3::Response> {
    let alias = request.body.room_alias.as_str();
    let (room, creator) =
        state.store.resolve_alias(alias).await?.ok_or_else(|| Error::not_found("no such room alias"))?;
    let user = &request.sender.user_id;
    // An application service controls the aliases of its namespace (the spec's "server admin
    // style permissions").
    let own_namespace = request.sender.appservice.as_ref().is_some_and(|a| a.is_alias_match(alias));
    if creator != user.as_str() && !own_namespace {
        let room_id = OwnedRoomId::try_from(room.as_str()).map_err(Error::internal)?;
        let (power, _) = rooms::power(&state, &room_id, user).await?;
        if power < 50 {
            return Err(Error::forbidden("only the alias's creator or a room moderator may remove it"));
        }
    }
    state.store.delete_alias(alias).await?;
    drop_from_canonical_alias(&state, &room, user, alias).await?;
    Ok(delete_alias::v3::Response::new())
}

/// Takes a deleted alias out of its room's `m.room.canonical_alias` (`alias` and
/// `alt_aliases`), as Synapse does, so that the room stops advertising an alias that no longer
/// leads to it. Sent as the user who deleted the alias; if they may not change that state
/// event, the alias stays advertised (as in Synapse) and the deletion still stands.
async fn drop_from_canonical_alias(
    state: &AppState,
    room: &str,
    user: &ruma::UserId,
    alias: &str,
) -> Result<()> {
    let room_id = OwnedRoomId::try_from(room).map_err(Error::internal)?;
    let Some(event) = state.store.current_state_event(&room_id, "m.room.canonical_alias", "").await? else {
        return Ok(());
    };
    let mut content = ClientEvent::parse(&event)?.content_value()?;
    let Some(object) = content.as_object_mut() else { return Ok(()) };
    let mut changed = false;
    if object.get("alias").and_then(|a| a.as_str()) == Some(alias) {
        object.remove("alias");
        changed = true;
    }
    if let Some(alt) = object.get_mut("alt_aliases").and_then(|a| a.as_array_mut()) {
        let before = alt.len();
        alt.retain(|a| a.as_str() != Some(alias));
        changed |= alt.len() != before;
    }
    if !changed {
        return Ok(());
    }
    match super::room::append_json(state, &room_id, user, "m.room.canonical_alias", Some(""), &content).await
    {
        Ok(_) => Ok(()),
        Err(Error::Matrix { status, .. }) if status == StatusCode::FORBIDDEN => Ok(()),
        Err(other) => Err(other),
    }
}

/// GET /_matrix/client/v3/rooms/{roomId}/aliases
async fn room_aliases(
    state: web::Data<AppState>,
    request: Ruma<aliases::v3::Request>,
) -> Result<aliases::v3::Response> {
    let room_id = &request.body.room_id;
    if !state.store.room_is_public(room_id).await? {
        rooms::require_joined(&state, room_id, &request.sender.user_id).await?;
    }
    let list = state.store.room_aliases(room_id).await?;
    Ok(aliases::v3::Response::new(
        list.into_iter().filter_map(|a| OwnedRoomAliasId::try_from(a).ok()).collect(),
    ))
}

/// A public room's directory entry, from its current state.
async fn chunk(state: &AppState, room_id: &ruma::RoomId) -> Result<PublicRoomsChunk> {
    let mut chunk: PublicRoomsChunk = PublicRoomsChunkInit {
        num_joined_members: UInt::default(),
        room_id: room_id.to_owned(),
        world_readable: false,
        guest_can_join: false,
    }
    .into();
    for event in state.store.current_state(room_id).await? {
        let event = ClientEvent::parse(&event)?;
        if event.state_key().as_deref() != Some("") {
            continue;
        }
        let field = |key: &str| event.content_str(key);
        match event.kind().as_str() {
            "m.room.name" => chunk.name = field("name"),
            "m.room.topic" => chunk.topic = field("topic"),
            "m.room.canonical_alias" => {
                chunk.canonical_alias = field("alias").and_then(|a| OwnedRoomAliasId::try_from(a).ok())
            }
            "m.room.avatar" => chunk.avatar_url = field("url").map(Into::into),
            "m.room.join_rules" => {
                chunk.join_rule = JoinRuleKind::from(field("join_rule").as_deref().unwrap_or("invite"))
            }
            "m.room.guest_access" => {
                chunk.guest_can_join = field("guest_access").as_deref() == Some("can_join")
            }
            "m.room.history_visibility" => {
                chunk.world_readable = field("history_visibility").as_deref() == Some("world_readable")
            }
            _ => {}
        }
    }
    let joined = state.store.members(room_id).await?.iter().filter(|(_, m)| m == "join").count();
    chunk.num_joined_members = UInt::try_from(joined as u64).unwrap_or_default();
    Ok(chunk)
}

/// One page of a room directory, as every public rooms answer carries it.
pub(crate) struct Page {
    pub chunk: Vec<PublicRoomsChunk>,
    pub next_batch: Option<String>,
    pub prev_batch: Option<String>,
    pub total_room_count_estimate: Option<UInt>,
}

/// A public rooms response (client or federation API, GET or POST: ruma's four types have the
/// same fields and no trait in common) with `$page` in it.
macro_rules! with_page {
    ($response:expr, $page:expr) => {{
        let (mut response, page) = ($response, $page);
        response.chunk = page.chunk;
        response.next_batch = page.next_batch;
        response.prev_batch = page.prev_batch;
        response.total_room_count_estimate = page.total_room_count_estimate;
        response
    }};
}
pub(crate) use with_page;

/// One page of the directory: rooms matching `term`, from offset `since` (`p<n>`).
pub(crate) async fn directory_page(
    state: &AppState,
    directory: Directory<'_>,
    limit: Option<UInt>,
    since: Option<&str>,
    term: Option<&str>,
) -> Result<Page> {
    let offset = match since {
        Some(token) => token
            .strip_prefix('p')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::invalid_param("`since` is not a token this server issued"))?,
        None => 0,
    };
    let limit =
        limit.map_or(MAX_PAGE, |l| usize::try_from(u64::from(l)).unwrap_or(MAX_PAGE)).clamp(1, MAX_PAGE);
    let term = term.map(str::to_lowercase).filter(|t| !t.is_empty());
    let mut all = Vec::new();
    for room in state.store.public_rooms(directory).await? {
        let Ok(room_id) = OwnedRoomId::try_from(room) else { continue };
        let chunk = chunk(state, &room_id).await?;
        let matches = term.as_ref().is_none_or(|term| {
            [
                chunk.name.as_deref(),
                chunk.topic.as_deref(),
                chunk.canonical_alias.as_ref().map(|a| a.as_str()),
            ]
            .into_iter()
            .flatten()
            .any(|text| text.to_lowercase().contains(term))
        });
        if matches {
            all.push(chunk);
        }
    }
    let total = all.len();
    let page: Vec<_> = all.into_iter().skip(offset).take(limit).collect();
    Ok(Page {
        next_batch: (offset + page.len() < total).then(|| format!("p{}", offset + page.len())),
        prev_batch: (offset > 0).then(|| format!("p{}", offset.saturating_sub(limit))),
        total_room_count_estimate: UInt::try_from(total as u64).ok(),
        chunk: page,
    })
}

/// The directory a `room_network` names: Matrix's, all of them, or one network of an
/// application service.
pub(crate) fn directory_of(room_network: &RoomNetwork) -> Result<Directory<'_>> {
    Ok(match room_network {
        RoomNetwork::Matrix => Directory::Matrix,
        RoomNetwork::All => Directory::All,
        // What `/thirdparty/protocols` gives as an instance's `instance_id`.
        RoomNetwork::ThirdParty(instance) => {
            let (appservice_id, network_id) = instance.split_once('|').ok_or_else(|| {
                Error::invalid_param("third_party_instance_id is not an instance id this server gave")
            })?;
            Directory::Network { appservice_id, network_id }
        }
        _ => Directory::Matrix,
    })
}

/// The other server whose directory a client asks for with `server`, if it is not this one.
fn elsewhere<'a>(
    state: &AppState,
    server: Option<&'a ruma::OwnedServerName>,
) -> Option<&'a ruma::ServerName> {
    server.filter(|server| **server != state.server_name).map(|server| &**server)
}

/// GET /_matrix/client/v3/publicRooms
async fn public_rooms(
    state: web::Data<AppState>,
    request: Ruma<get_public_rooms::v3::Request>,
) -> Result<get_public_rooms::v3::Response> {
    let body = &request.body;
    let response = get_public_rooms::v3::Response::new(Vec::new());
    if let Some(server) = elsewhere(&state, body.server.as_ref()) {
        let mut asked = remote_directory::get_public_rooms::v1::Request::new();
        asked.limit = body.limit;
        asked.since = body.since.clone();
        let answer =
            state.remote()?.send(&state.server_name, state.signing_key.key_pair(), server, asked).await?;
        return Ok(with_page!(response, answer));
    }
    let page = directory_page(&state, Directory::Matrix, body.limit, body.since.as_deref(), None).await?;
    Ok(with_page!(response, page))
}

/// POST /_matrix/client/v3/publicRooms
async fn public_rooms_filtered(
    state: web::Data<AppState>,
    request: Ruma<get_public_rooms_filtered::v3::Request>,
) -> Result<get_public_rooms_filtered::v3::Response> {
    let body = &request.body;
    let response = get_public_rooms_filtered::v3::Response::new();
    if let Some(server) = elsewhere(&state, body.server.as_ref()) {
        let mut asked = remote_directory::get_public_rooms_filtered::v1::Request::new();
        asked.limit = body.limit;
        asked.since = body.since.clone();
        asked.filter = body.filter.clone();
        asked.room_network = body.room_network.clone();
        let answer =
            state.remote()?.send(&state.server_name, state.signing_key.key_pair(), server, asked).await?;
        return Ok(with_page!(response, answer));
    }
    let term = body.filter.generic_search_term.as_deref();
    let directory = directory_of(&body.room_network)?;
    let page = directory_page(&state, directory, body.limit, body.since.as_deref(), term).await?;
    Ok(with_page!(response, page))
}

/// GET /_matrix/client/v3/directory/list/room/{roomId}
async fn get_visibility(
    state: web::Data<AppState>,
    request: Ruma<get_room_visibility::v3::Request>,
) -> Result<get_room_visibility::v3::Response> {
    rooms::room_version(&state, &request.body.room_id).await?;
    let public = state.store.room_is_public(&request.body.room_id).await?;
    Ok(get_room_visibility::v3::Response::new(if public { Visibility::Public } else { Visibility::Private }))
}

/// PUT /_matrix/client/v3/directory/list/room/{roomId}
async fn set_visibility(
    state: web::Data<AppState>,
    request: Ruma<set_room_visibility::v3::Request>,
) -> Result<set_room_visibility::v3::Response> {
    let body = &request.body;
    rooms::require_joined(&state, &body.room_id, &request.sender.user_id).await?;
    let (power, _) = rooms::power(&state, &body.room_id, &request.sender.user_id).await?;
    if power < 50 {
        return Err(Error::forbidden("listing a room in the directory needs power level 50"));
    }
    state.store.set_room_public(&body.room_id, body.visibility == Visibility::Public).await?;
    Ok(set_room_visibility::v3::Response::new())
}

/// POST /_matrix/client/v3/user_directory/search
async fn search_users(
    state: web::Data<AppState>,
    request: Ruma<search_users::v3::Request>,
) -> Result<search_users::v3::Response> {
    let body = &request.body;
    let term = body.search_term.trim().to_lowercase();
    if term.is_empty() || term.len() > 256 {
        return Err(Error::invalid_param("search_term must be 1 to 256 bytes"));
    }
    let limit = usize::try_from(u64::from(body.limit)).unwrap_or(MAX_PAGE).clamp(1, 50);
    // As Synapse by default: only people the searcher could meet anyway (a shared room or a
    // public one), unless the operator opens the whole directory.
    let visible_to =
        (!state.config.user_directory.search_all_users).then_some(request.sender.user_id.as_ref());
    let found = state.store.search_users(&term, visible_to, (limit + 1) as i64).await?;
    let limited = found.len() > limit;
    let results = found
        .into_iter()
        .take(limit)
        .filter_map(|(user, name, avatar)| {
            let mut user = search_users::v3::User::new(OwnedUserId::try_from(user).ok()?);
            user.display_name = name;
            user.avatar_url = avatar.map(Into::into);
            Some(user)
        })
        .collect();
    Ok(search_users::v3::Response::new(results, limited))
}

/// GET /_matrix/client/v3/voip/turnServer
async fn turn_server(
    state: web::Data<AppState>,
    request: Ruma<get_turn_server_info::v3::Request>,
) -> Result<get_turn_server_info::v3::Response> {
    let turn = &state.config.turn;
    if turn.uris.is_empty() {
        return Err(Error::not_found("no TURN server is configured"));
    }
    // The TURN REST API scheme coturn understands: username "<expiry>:<user>", password the
    // HMAC-SHA1 of it under the shared secret.
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        + turn.user_lifetime_secs;
    let username = format!("{expiry}:{}", request.sender.user_id);
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(turn.shared_secret.expose().as_bytes())
        .map_err(Error::internal)?;
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(get_turn_server_info::v3::Response::new(
        username,
        password,
        turn.uris.clone(),
        Duration::from_secs(turn.user_lifetime_secs),
    ))
}
