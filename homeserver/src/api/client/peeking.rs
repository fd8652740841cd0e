//! The spec's legacy sync endpoints, deprecated but still specified (and still used by SyTest
//! and old clients): `GET /initialSync`, `GET /rooms/{roomId}/initialSync` and `GET /events`,
//! the global event stream or, with `room_id`, a peek at one room's new events.
//!
//! They are answered with the building blocks of `/sync` and `/messages`, not copies of them:
//! the global `/events` is a `/sync` from the `from` token, flattened into one list of events;
//! a room's initial sync is its readable state and a backwards `/messages` page.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use http::Method;
use ruma::{
    OwnedRoomId, RoomId, UInt,
    api::{
        Direction,
        client::{
            message::get_message_events,
            peeking::get_current_state::{self, v3::PaginationChunk},
            room::Visibility,
        },
    },
    events::room::member::MembershipState,
    serde::Raw,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::room::{parse_token, reader_of, token};
use crate::{
    auth::AuthedUser,
    error::{Error, Result},
    rooms::{
        client_event::{raw, serve},
        visibility::{ReadRules, erase_for_reader},
    },
    ruma_wrapper::{Authenticated, Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    // Not ruma's `get_current_state`: it has no `limit`, and its answer no `presence`.
    for path in
        ["/_matrix/client/v3/rooms/{room_id}/initialSync", "/_matrix/client/r0/rooms/{room_id}/initialSync"]
    {
        router.add_route(Method::GET, path, || web::get().to(get_room_initial_sync));
    }
    // Not ruma's `listen_to_new_events`: it requires `room_id`, and without one `/events` is the
    // user's whole event stream. ruma has no type for the global `/initialSync`.
    for path in ["/_matrix/client/v3/events", "/_matrix/client/r0/events"] {
        router.add_route(Method::GET, path, || web::get().to(get_events));
    }
    for path in ["/_matrix/client/v3/initialSync", "/_matrix/client/r0/initialSync"] {
        router.add_route(Method::GET, path, || web::get().to(get_initial_sync));
    }
}

/// Timeline events in a room's initial sync unless `limit` says otherwise (Synapse's default).
const DEFAULT_LIMIT: u32 = 10;
/// The most timeline events one room's initial sync sends.
const MAX_LIMIT: u32 = 100;
/// The longest `/events` waits, as `/sync`.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// Events one `/events` answers with unless `limit` says otherwise, and the most it may ask.
const DEFAULT_EVENTS: i64 = 100;
const MAX_EVENTS: i64 = 1000;

/// The query parameters of the legacy endpoints; others (`access_token`) are ignored.
#[derive(Debug, Default, Deserialize)]
struct LegacyQuery {
    from: Option<String>,
    timeout: Option<String>,
    room_id: Option<String>,
    limit: Option<String>,
    archived: Option<String>,
}

impl LegacyQuery {
    fn parse(req: &HttpRequest) -> Result<Self> {
        web::Query::<Self>::from_query(req.query_string())
            .map(web::Query::into_inner)
            .map_err(|e| Error::invalid_param(format!("query: {e}")))
    }

    fn timeout(&self) -> Result<Duration> {
        let Some(raw) = &self.timeout else { return Ok(Duration::ZERO) };
        let ms = raw
            .parse::<u64>()
            .map_err(|_| Error::invalid_param("timeout must be a number of milliseconds"))?;
        Ok(Duration::from_millis(ms).min(MAX_TIMEOUT))
    }

    fn limit(&self) -> Result<u32> {
        let Some(raw) = &self.limit else { return Ok(DEFAULT_LIMIT) };
        let limit = raw.parse::<u32>().map_err(|_| Error::invalid_param("limit must be a whole number"))?;
        Ok(limit.min(MAX_LIMIT))
    }

    fn archived(&self) -> Result<bool> {
        match self.archived.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(_) => Err(Error::invalid_param("archived must be true or false")),
        }
    }
}

/// GET /_matrix/client/v3/rooms/{roomId}/initialSync
///
/// For members, departed members (the room as of their leave) and anyone in a world-readable
/// room, as the history-visibility rules let each read it.
async fn get_room_initial_sync(
    state: web::Data<AppState>,
    req: HttpRequest,
    Authenticated(user): Authenticated,
) -> Result<HttpResponse> {
    let query = LegacyQuery::parse(&req)?;
    let room_id = req.match_info().get("room_id").unwrap_or_default();
    let room_id =
        <&RoomId>::try_from(room_id).map_err(|e| Error::invalid_param(format!("not a room id: {e}")))?;
    let client_ip = crate::ruma_wrapper::client_ip(&req, state.config.listen.trust_x_forwarded_for);
    super::ephemeral::note_syncing(&state, &user.user_id, "online").await?;
    let upto = state.readable().await?;
    let room = room_initial_sync(&state, &user, client_ip, room_id, query.limit()?, upto).await?;
    let (receipts, presence) = match room.membership {
        Some(MembershipState::Join) => {
            (room_receipts(&state, &user, room_id, upto).await?, room_presence(&state, room_id).await?)
        }
        _ => (Vec::new(), Vec::new()),
    };
    Ok(HttpResponse::Ok().json(room_json(room, receipts, presence)))
}

/// The presence of a room's joined members, as the legacy endpoints send it.
async fn room_presence(state: &AppState, room_id: &RoomId) -> Result<Vec<Value>> {
    let members = joined_members(state, room_id).await?;
    Ok(members.iter().map(|member| super::ephemeral::legacy_presence(state, member)).collect())
}

/// A room's joined members.
async fn joined_members(state: &AppState, room_id: &RoomId) -> Result<Vec<ruma::OwnedUserId>> {
    Ok(state
        .store
        .members(room_id)
        .await?
        .into_iter()
        .filter(|(_, membership)| membership == "join")
        .filter_map(|(member, _)| ruma::OwnedUserId::try_from(member).ok())
        .collect())
}

/// One room's initial sync: its readable state, the newest `limit` readable events, the user's
/// membership, the room's directory visibility and the user's tags for it.
async fn room_initial_sync(
    state: &web::Data<AppState>,
    sender: &AuthedUser,
    client_ip: std::net::IpAddr,
    room_id: &RoomId,
    limit: u32,
    upto: i64,
) -> Result<get_current_state::v3::Response> {
    let user = &sender.user_id;
    let rules = ReadRules::for_reader(state, room_id, user).await?;
    let room_state = rules.readable_state(state, room_id).await?;
    let mut response = get_current_state::v3::Response::new(room_id.to_owned());
    response.state = serve(state, &room_state, reader_of(sender)).await?;
    response.membership = state.store.membership(room_id, user).await?.map(MembershipState::from);
    // The newest page, as `/messages` reads it backwards, served oldest first; none for
    // `limit=0`, which asks for the state alone.
    let messages = if limit == 0 {
        let now = token(upto);
        let mut empty = PaginationChunk::new(Vec::new(), now.clone());
        empty.start = Some(now);
        empty
    } else {
        let mut page_request = get_message_events::v3::Request::new(room_id.to_owned(), Direction::Backward);
        page_request.limit = UInt::from(limit);
        let page = super::room::messages(
            state.clone(),
            Ruma { body: page_request, sender: sender.clone(), client_ip, raw_body: web::Bytes::new() },
        )
        .await?;
        let mut chunk = page.chunk;
        chunk.reverse();
        let mut messages = PaginationChunk::new(chunk, page.start);
        messages.start = Some(page.end.unwrap_or_else(|| token(0)));
        messages
    };
    response.messages = Some(messages);
    response.visibility = Some(if state.store.room_is_public(room_id).await? {
        Visibility::Public
    } else {
        Visibility::Private
    });
    // The user's account data for the room, its tags among it.
    for change in state.store.account_data_changes(user, 0, upto).await? {
        if change.room_id.as_deref() == Some(room_id.as_str()) {
            let content: Value = serde_json::from_str(&change.content).map_err(Error::internal)?;
            response.account_data.push(raw(&json!({"type": change.data_type, "content": content}))?);
        }
    }
    Ok(response)
}

/// GET /_matrix/client/v3/initialSync
///
/// Every room the user is joined to or invited to, with `archived=true` the rooms they left
/// too (each as its departed member may read it), and their global account data.
async fn get_initial_sync(
    state: web::Data<AppState>,
    req: HttpRequest,
    Authenticated(user): Authenticated,
) -> Result<HttpResponse> {
    let query = LegacyQuery::parse(&req)?;
    let (limit, archived) = (query.limit()?, query.archived()?);
    let client_ip = crate::ruma_wrapper::client_ip(&req, state.config.listen.trust_x_forwarded_for);
    // Syncing is activity, as on `/sync`.
    super::ephemeral::note_syncing(&state, &user.user_id, "online").await?;
    let upto = state.readable().await?;
    let mut rooms = Vec::new();
    let mut receipts = Vec::new();
    // The user's own presence, and that of everyone in their joined rooms, once each.
    let mut presence = vec![super::ephemeral::legacy_presence(&state, &user.user_id)];
    let mut presence_of = std::collections::HashSet::from([user.user_id.to_string()]);
    for (room_id, membership, _) in state.store.user_rooms(&user.user_id).await? {
        let Ok(room_id) = OwnedRoomId::try_from(room_id) else { continue };
        match membership.as_str() {
            "invite" => rooms.push(json!({"room_id": room_id, "membership": "invite"})),
            "join" => {
                let room_receipts = room_receipts(&state, &user, &room_id, upto).await?;
                let room_presence = room_presence(&state, &room_id).await?;
                for event in &room_presence {
                    if presence_of.insert(event["content"]["user_id"].as_str().unwrap_or_default().to_owned())
                    {
                        presence.push(event.clone());
                    }
                }
                let room = room_initial_sync(&state, &user, client_ip, &room_id, limit, upto).await?;
                rooms.push(room_json(room, room_receipts.clone(), room_presence));
                receipts.extend(room_receipts);
            }
            "leave" | "ban" if archived => {
                // A room the user never read (an invite they rejected) has nothing to show.
                match room_initial_sync(&state, &user, client_ip, &room_id, limit, upto).await {
                    Ok(room) => rooms.push(room_json(room, Vec::new(), Vec::new())),
                    Err(Error::Matrix { status, .. }) if status == actix_web::http::StatusCode::FORBIDDEN => {
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {}
        }
    }
    let mut account_data = Vec::new();
    for (data_type, content) in state
        .store
        .account_data_changes(&user.user_id, 0, upto)
        .await?
        .into_iter()
        .filter_map(|change| change.room_id.is_none().then_some((change.data_type, change.content)))
    {
        let content: Value = serde_json::from_str(&content).map_err(Error::internal)?;
        account_data.push(json!({"type": data_type, "content": content}));
    }
    Ok(HttpResponse::Ok().json(json!({
        "end": token(upto),
        "rooms": rooms,
        "receipts": receipts,
        "presence": presence,
        "account_data": account_data,
    })))
}

/// A joined room's read receipts as `/sync` sends them (one `m.receipt` event), naming their
/// room. Departed members get none: receipts are not part of what they could see.
async fn room_receipts(
    state: &AppState,
    user: &AuthedUser,
    room_id: &RoomId,
    upto: i64,
) -> Result<Vec<Value>> {
    let mut receipts = Vec::new();
    for mut event in super::sync::ephemeral_events(state, &user.user_id, room_id, 0, upto).await? {
        if event["type"] == "m.receipt" {
            event["room_id"] = json!(room_id);
            receipts.push(event);
        }
    }
    Ok(receipts)
}

/// A room's initial sync as the answer of `/rooms/{roomId}/initialSync` and an entry of the
/// global one's `rooms`.
fn room_json(room: get_current_state::v3::Response, receipts: Vec<Value>, presence: Vec<Value>) -> Value {
    let mut entry = json!({
        "room_id": room.room_id,
        "state": legacy_format(&room.state),
        "account_data": room.account_data,
    });
    if let Some(membership) = room.membership {
        entry["membership"] = json!(membership.as_str());
    }
    if let Some(visibility) = room.visibility {
        entry["visibility"] = json!(visibility.as_str());
    }
    entry["presence"] = json!(presence);
    entry["receipts"] = json!(receipts);
    if let Some(messages) = room.messages {
        let chunk = legacy_format(&messages.chunk);
        entry["messages"] = json!({"chunk": chunk, "start": messages.start, "end": messages.end});
    }
    entry
}

/// Events as the legacy endpoints serve them (the spec's v1 format, as Synapse's): with the
/// sender also as `user_id`, which older clients read. Only the top level is touched: contents
/// stay as stored, however deep. An event that is not an object is served as it is.
fn legacy_format<T>(events: &[Raw<T>]) -> Vec<Box<serde_json::value::RawValue>> {
    events
        .iter()
        .map(|event| {
            let mut fields: std::collections::BTreeMap<String, Box<serde_json::value::RawValue>> =
                match serde_json::from_str(event.json().get()) {
                    Ok(fields) => fields,
                    Err(_) => return event.json().to_owned(),
                };
            if let Some(sender) = fields.get("sender").cloned() {
                fields.insert("user_id".to_owned(), sender);
            }
            serde_json::value::to_raw_value(&fields).unwrap_or_else(|_| event.json().to_owned())
        })
        .collect()
}

/// GET /_matrix/client/v3/events
///
/// Without `room_id`: the events of the user's rooms from `from` (a stream token; without one,
/// from now), oldest first, at most `limit`, waiting up to `timeout` ms for the first. With
/// `room_id`: the same for that one room, which the user need not be in if it is world readable
/// (a peek). Each room's history-visibility rules decide what the user sees, as for `/messages`.
async fn get_events(
    state: web::Data<AppState>,
    req: HttpRequest,
    Authenticated(user): Authenticated,
) -> Result<HttpResponse> {
    let query = LegacyQuery::parse(&req)?;
    let timeout = query.timeout()?;
    let limit = match &query.limit {
        None => DEFAULT_EVENTS,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| Error::invalid_param("limit must be a positive whole number"))?
            .min(MAX_EVENTS),
    };
    let from = query.from.as_deref().map(parse_token).transpose()?;
    let room = query
        .room_id
        .as_deref()
        .map(|room_id| {
            OwnedRoomId::try_from(room_id)
                .map_err(|e| Error::invalid_param(format!("room_id is not a room id: {e}")))
        })
        .transpose()?;
    if let Some(room) = &room {
        // M_FORBIDDEN at once for a room the user may not read.
        ReadRules::for_reader(&state, room, &user.user_id).await?;
    }
    // Listening to the event stream is activity, as syncing is.
    super::ephemeral::note_syncing(&state, &user.user_id, "online").await?;
    let upto = state.readable().await?;
    let from = from.unwrap_or(upto).min(upto);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut notifications = state.subscribe();
    let mut cursor = from;
    loop {
        let upto = state.readable().await?;
        let (found, scanned) = read_stream(&state, &user, room.as_deref(), cursor, upto, limit).await?;
        // What else changed in the same range: receipts and presence, and the user's account
        // data on the whole stream.
        let extras = stream_extras(&state, &user.user_id, room.as_deref(), cursor, scanned).await?;
        cursor = scanned;
        if !found.is_empty() || !extras.is_empty() || tokio::time::Instant::now() >= deadline {
            // Served events name their room, as the event stream's must.
            let served: Vec<Raw<Value>> = serve(&state, &found, reader_of(&user)).await?;
            let mut chunk = legacy_format(&served);
            for extra in &extras {
                chunk.push(serde_json::value::to_raw_value(extra).map_err(Error::internal)?);
            }
            return Ok(HttpResponse::Ok().json(json!({
                "chunk": chunk,
                "start": token(from),
                "end": token(cursor),
            })));
        }
        tokio::select! {
            woken = notifications.changed() => if woken.is_err() {
                tokio::time::sleep_until(deadline).await;
            },
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// What else changed in `(after, upto]`, as events of the legacy event stream: the read
/// receipts and typing of the user's joined rooms and the presence of the people in them (the
/// user's own included), and the user's account data (global, and per room naming the room: tags
/// among it). With `room`, a peek: that room's receipts and typing and its joined members'
/// presence only.
async fn stream_extras(
    state: &AppState,
    user: &ruma::UserId,
    room: Option<&RoomId>,
    after: i64,
    upto: i64,
) -> Result<Vec<Value>> {
    let mut extras = Vec::new();
    if after >= upto {
        return Ok(extras);
    }
    let rooms: Vec<OwnedRoomId> = match room {
        Some(room) => vec![room.to_owned()],
        None => {
            for change in state.store.account_data_changes(user, after, upto).await? {
                let content: Value = serde_json::from_str(&change.content).map_err(Error::internal)?;
                let mut event = json!({"type": change.data_type, "content": content});
                if let Some(room_id) = change.room_id {
                    event["room_id"] = room_id.into();
                }
                extras.push(event);
            }
            state
                .recent
                .user_rooms(&*state.store, user, upto)
                .await?
                .iter()
                .filter(|(_, membership, _)| membership == "join")
                .filter_map(|(room_id, _, _)| OwnedRoomId::try_from(room_id.as_str()).ok())
                .collect()
        }
    };
    let mut people = std::collections::BTreeSet::new();
    if room.is_none() {
        people.insert(user.to_owned());
    }
    for room_id in &rooms {
        // Receipts and typing, naming their room.
        for mut event in super::sync::ephemeral_events(state, user, room_id, after, upto).await? {
            event["room_id"] = json!(room_id);
            extras.push(event);
        }
        if state.ephemeral.any_presence_since(after, upto) {
            people.extend(joined_members(state, room_id).await?);
        }
    }
    for (member, _) in state.ephemeral.presence_changes(people.iter().map(|u| &**u), after, upto) {
        extras.push(super::ephemeral::legacy_presence(state, &member));
    }
    Ok(extras)
}

/// Events a page of the stream scan reads at a time.
const SCAN_PAGE: i64 = 200;
/// Pages one read scans before answering with what it found (the client goes on from `end`).
const MAX_SCAN_PAGES: usize = 10;

/// The events after `after` (up to `upto`) of the user's rooms, or of `room`, that the user may
/// see, at most `limit`; and how far the stream was read, where the next read starts.
async fn read_stream(
    state: &AppState,
    user: &AuthedUser,
    room: Option<&RoomId>,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<(Vec<crate::storage::StoredEvent>, i64)> {
    let rooms: std::collections::HashSet<String> = match room {
        Some(room) => std::iter::once(room.as_str().to_owned()).collect(),
        None => {
            state.store.user_rooms(&user.user_id).await?.into_iter().map(|(room_id, _, _)| room_id).collect()
        }
    };
    let mut rules: std::collections::HashMap<String, Option<ReadRules>> = Default::default();
    let mut found = Vec::new();
    let mut cursor = after;
    for _ in 0..MAX_SCAN_PAGES {
        let page = state.store.stream_events(cursor, upto, SCAN_PAGE).await?;
        let full = page.len() as i64 == SCAN_PAGE;
        for streamed in page {
            let event = streamed.event;
            cursor = event.stream_ordering;
            if !rooms.contains(&event.room_id) {
                continue;
            }
            if !rules.contains_key(&event.room_id) {
                let room_id = OwnedRoomId::try_from(event.room_id.as_str()).map_err(Error::internal)?;
                // A room the user may no longer read at all shows nothing.
                let loaded = ReadRules::for_reader(state, &room_id, &user.user_id).await.ok();
                rules.insert(event.room_id.clone(), loaded);
            }
            if let Some(Some(room_rules)) = rules.get(&event.room_id)
                && room_rules.may_see(&event)
            {
                found.extend(erase_for_reader(state, room_rules, vec![event]).await?);
                if found.len() as i64 == limit {
                    return Ok((found, cursor));
                }
            }
        }
        if !full {
            return Ok((found, upto.max(cursor)));
        }
    }
    Ok((found, cursor))
}
