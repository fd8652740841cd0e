//! `/sync`: initial and incremental, with long-polling woken by the notifier.
//!
//! Tokens are stream positions (`s<n>`). A response covers `(since, upto]` where `upto` is the
//! stream's safe position ([`crate::storage::stream`]), so no event is skipped or repeated
//! however writes commit. A response that carries to-device messages adds the last one's place
//! in the device's queue (`s<n>_t<cursor>`, [`crate::queue`]); the next sync acknowledges it.

use std::{collections::BTreeMap, time::Duration};

use actix_web::web;
use ruma::{
    DeviceId, OwnedRoomId, RoomId, UInt, UserId,
    api::client::{
        filter::{FilterDefinition, RoomEventFilter},
        sync::sync_events::{
            self,
            v3::{
                Filter, InviteState, InvitedRoom, JoinedRoom, LeftRoom, RoomSummary, State, StateEvents,
                Timeline,
            },
        },
    },
    push::Action,
    serde::Raw,
};
use serde_json::{Value, json};

use super::{
    room::{parse_token, token},
    sync_wire::SyncResponse,
};
use crate::rooms::invite::INVITE_STATE;
use crate::rooms::recent::{Mark, device_key};
use crate::{
    error::{Error, Result},
    push::evaluate,
    queue::News,
    rooms::{
        client_event::{ClientEvent, Reader, matches_filter, raw, serve, type_allowed},
        ephemeral::UnreadCounts,
        visibility::{Ignored, ReadRules, erase_for_reader},
    },
    ruma_wrapper::{Router, Ruma},
    state::AppState,
    storage::StoredEvent,
};

/// Timeline events per room when the filter does not say.
const DEFAULT_TIMELINE_LIMIT: i64 = 10;
/// Most timeline events per room a filter may ask for.
const MAX_TIMELINE_LIMIT: i64 = 100;
/// Longest long-poll honoured.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a woken long-poll waits for more writes before answering.
const COALESCE: Duration = Duration::from_millis(5);
/// How long to wait for a position this process wrote to become safe to read.
const PUBLISH_WAIT: Duration = Duration::from_millis(250);

pub(super) fn routes(router: &mut Router) {
    router.add_responding(|state, request| async move { sync(state, request).await.map(SyncResponse) });
}

/// Events examined at a time when a timeline filter leaves some out.
const FILTER_BATCH: i64 = 50;
/// Batches examined before a filtered timeline gives up looking further back (and says it is
/// limited, so the client can page on with the same filter).
const MAX_FILTER_BATCHES: usize = 10;

/// What a sync's filter asks for.
#[derive(Debug, Clone, Default)]
struct Options {
    limit: i64,
    /// Send only the member events of the timeline's senders (and the user's own).
    lazy_members: bool,
    /// With lazy-loaded members, send them even if the device was sent them before.
    redundant_members: bool,
    /// Which timeline events to send, when the filter narrows them by type or sender.
    timeline: Option<RoomEventFilter>,
    /// Which state events to send (type and sender rules).
    state: RoomEventFilter,
    /// Which ephemeral and room account data events to send (type rules).
    ephemeral: RoomEventFilter,
    room_account_data: RoomEventFilter,
    /// Which global account data and presence events to send.
    account_data: ruma::api::client::filter::Filter,
    presence: ruma::api::client::filter::Filter,
    /// Send the rooms the user has left in an initial sync too.
    include_leave: bool,
    /// Rooms to include (all if `None`) and to leave out.
    rooms: Option<Vec<OwnedRoomId>>,
    not_rooms: Vec<OwnedRoomId>,
    /// Events as stored, in the federation format (`event_format: federation`).
    federation_format: bool,
}

impl Options {
    fn wants_room(&self, room_id: &RoomId) -> bool {
        self.rooms.as_ref().is_none_or(|rooms| rooms.iter().any(|r| r == room_id))
            && !self.not_rooms.iter().any(|r| r == room_id)
    }
}

/// Reads the filter (given inline or by id).
async fn options(state: &AppState, user: &UserId, filter: Option<&Filter>) -> Result<Options> {
    let stored;
    let definition = match filter {
        Some(Filter::FilterDefinition(definition)) => Some(definition),
        // ruma takes a definition it cannot parse for an id: say what is wrong with it instead
        // of answering that no filter has that id.
        Some(Filter::FilterId(id)) if id.trim_start().starts_with('{') => {
            stored = serde_json::from_str::<FilterDefinition>(id)
                .map_err(|e| Error::bad_json(format!("filter is not a valid filter definition: {e}")))?;
            Some(&stored)
        }
        Some(Filter::FilterId(id)) => {
            stored = super::user_data::load_filter(state, user, id).await?;
            Some(&stored)
        }
        _ => None,
    };
    let limit = definition
        .and_then(|d| d.room.timeline.limit)
        .map_or(DEFAULT_TIMELINE_LIMIT, |l| i64::try_from(u64::from(l)).unwrap_or(MAX_TIMELINE_LIMIT));
    let lazy_members = definition.is_some_and(|d| !d.room.state.lazy_load_options.is_disabled());
    let redundant_members = definition.is_some_and(|d| {
        matches!(
            d.room.state.lazy_load_options,
            ruma::api::client::filter::LazyLoadOptions::Enabled { include_redundant_members: true }
        )
    });
    let timeline = definition.map(|d| &d.room.timeline).filter(|t| {
        t.types.is_some() || t.senders.is_some() || !t.not_types.is_empty() || !t.not_senders.is_empty()
    });
    let room = definition.map(|d| d.room.clone()).unwrap_or_default();
    Ok(Options {
        // A limit of 0 asks for no timeline events, only whether there are any (`limited`).
        limit: limit.clamp(0, MAX_TIMELINE_LIMIT),
        lazy_members,
        redundant_members,
        timeline: timeline.cloned(),
        state: room.state,
        ephemeral: room.ephemeral,
        room_account_data: room.account_data,
        account_data: definition.map(|d| d.account_data.clone()).unwrap_or_default(),
        presence: definition.map(|d| d.presence.clone()).unwrap_or_default(),
        include_leave: room.include_leave,
        rooms: room.rooms,
        not_rooms: room.not_rooms,
        federation_format: definition
            .is_some_and(|d| d.event_format == ruma::api::client::filter::EventFormat::Federation),
    })
}

/// GET /_matrix/client/v3/sync
async fn sync(
    state: web::Data<AppState>,
    request: Ruma<sync_events::v3::Request>,
) -> Result<sync_events::v3::Response> {
    let body = &request.body;
    let user = &request.sender.user_id;
    let device = &request.sender.device_id;
    let since = body.since.as_deref().map(parse_sync_token).transpose()?;
    let (since, received) = since.unzip();
    // A cursor is taken only from the device it was sealed for (see `queue::CursorSeal`), before
    // the request has any effect.
    let received = received
        .flatten()
        .map(|sealed| state.cursors.open(user, device, &sealed).map(str::to_owned))
        .transpose()?;
    super::ephemeral::check_presence(&body.set_presence)?;
    super::ephemeral::note_syncing(&state, user, body.set_presence.as_str()).await?;
    let options = options(&state, user, body.filter.as_ref()).await?;
    // The token says the device has its to-device messages up to `received`: they go, with the
    // first read of the queue when that read is certain (in one round trip), or now.
    let mut acknowledge = received.clone();
    if state.queue.news() == News::InStream
        && let Some(cursor) = acknowledge.take()
    {
        state.queue.acknowledge(user, device, &cursor).await?;
    }
    let query = Query { user, device, since, received, full_state: body.full_state, options };
    let timeout = body.timeout.unwrap_or_default().min(MAX_TIMEOUT);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut notifications = state.subscribe();
    // Listening before the first read of the queue, so that nothing queued after it goes unheard.
    let mut bell = match state.queue.news() {
        News::Bell => Some(state.bells.listen(&device_key(user.as_str(), device.as_str()))),
        News::InStream => None,
    };
    let mut read_queue = true;
    // The response is built in boxed futures: a long-poll spends its life waiting, and should
    // hold only the small state of the wait, not room for the whole build.
    // Past every write that had answered when the request came, on any worker: the sender of
    // a message finds it in their next sync (later writes wake the wait below).
    let mut upto = state.readable().await?;
    loop {
        let response = Box::pin(build(&state, &query, upto, read_queue, acknowledge.take())).await?;
        read_queue = false;
        let has_news = !response.rooms.is_empty()
            || !response.to_device.is_empty()
            || !response.device_lists.is_empty()
            || !response.account_data.is_empty()
            || !response.presence.is_empty();
        if has_news || since.is_none() || body.full_state || tokio::time::Instant::now() >= deadline {
            return Ok(response);
        }
        // Sleep until something new is written or queued for the device, then until it is safe
        // to read.
        let rung = async {
            match bell.as_mut() {
                Some(bell) => bell.changed().await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            woken = notifications.changed() => if woken.is_ok() { Wake::Stream } else { Wake::Timeout },
            rung = rung => if rung.is_ok() { Wake::Bell } else { Wake::Timeout },
            () = tokio::time::sleep_until(deadline) => Wake::Timeout,
        };
        match wake {
            Wake::Bell => {
                // Only the device's queue has news: the stream need not be read.
                tokio::time::sleep(COALESCE).await;
                if let Some(bell) = bell.as_mut() {
                    bell.borrow_and_update();
                }
                read_queue = true;
            }
            Wake::Stream => {
                // Let a burst of writes land together: one response for many events is far
                // cheaper than one per event, and costs the client a few milliseconds.
                tokio::time::sleep(COALESCE).await;
                let target = *notifications.borrow_and_update();
                let waited = tokio::time::Instant::now();
                upto = state.recent.catch_up(&*state.store).await?;
                while upto < target && waited.elapsed() < PUBLISH_WAIT {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    upto = state.recent.catch_up(&*state.store).await?;
                }
            }
            Wake::Timeout => {
                let upto = state.recent.catch_up(&*state.store).await?;
                return Box::pin(build(&state, &query, upto, read_queue, None)).await;
            }
        }
    }
}

/// What ended a long-poll's wait.
enum Wake {
    /// A write to the stream.
    Stream,
    /// The device's bell: envelopes were queued for it.
    Bell,
    Timeout,
}

/// What one `/sync` request asks for.
struct Query<'a> {
    user: &'a UserId,
    device: &'a DeviceId,
    /// The token's stream position.
    since: Option<i64>,
    /// The device has received its to-device messages up to this cursor ([`crate::queue`]).
    received: Option<String>,
    full_state: bool,
    options: Options,
}

impl Query<'_> {
    fn reader(&self) -> Reader<'_> {
        Reader { user: self.user, device: self.device, federation_format: self.options.federation_format }
    }
}

/// Parses a sync token: `s<position>`, or `s<position>_t<cursor>` when the response that issued
/// it sent to-device messages up to `cursor` (which the next sync acknowledges; the queue checks
/// it).
fn parse_sync_token(token: &str) -> Result<(i64, Option<String>)> {
    let position = parse_token(token)?;
    let received = match token.split_once('_') {
        Some((_, received)) => Some(
            received
                .strip_prefix('t')
                .filter(|cursor| !cursor.is_empty())
                .ok_or_else(|| Error::invalid_param(format!("`{token}` is not a token this server issued")))?
                .to_owned(),
        ),
        None => None,
    };
    Ok((position, received))
}

/// The response for `query` up to `upto`; `read_queue` when the device's queue may have news
/// that the stream does not show ([`News::Bell`]), `acknowledge` the cursor to acknowledge with
/// that read.
async fn build(
    state: &AppState,
    query: &Query<'_>,
    upto: i64,
    read_queue: bool,
    acknowledge: Option<String>,
) -> Result<sync_events::v3::Response> {
    let Query { user, since, full_state, ref options, .. } = *query;
    let mut response = sync_events::v3::Response::new(token(upto));
    e2ee(state, query, upto, read_queue, acknowledge.as_deref(), &mut response).await?;
    let mut room_account_data: BTreeMap<String, Vec<Box<serde_json::value::RawValue>>> = BTreeMap::new();
    let account_data_changed =
        since.and_then(|since| state.recent.account_data_changed(user, since, upto)).unwrap_or(true);
    let account_data = match account_data_changed {
        true => state.store.account_data_changes(user, since.unwrap_or(0), upto).await?,
        false => Vec::new(),
    };
    for mut change in account_data {
        let filter = match change.room_id {
            Some(_) => (&options.room_account_data.types, &options.room_account_data.not_types),
            None => (&options.account_data.types, &options.account_data.not_types),
        };
        if !type_allowed(filter.0, filter.1, &change.data_type) {
            continue;
        }
        if change.room_id.is_none() && change.data_type == "m.push_rules" {
            // The rules the server applies: the stored ones brought up to date with the server's
            // defaults, so that clients evaluate what the server does.
            change.content = json!({ "global": crate::push::ruleset(state, user).await? }).to_string();
        }
        // The content is served as stored, never re-parsed.
        let event = format!(
            r#"{{"type":{},"content":{}}}"#,
            serde_json::to_string(&change.data_type).map_err(Error::internal)?,
            change.content
        );
        let event = serde_json::value::RawValue::from_string(event).map_err(Error::internal)?;
        match change.room_id {
            Some(room) => room_account_data.entry(room).or_default().push(event),
            None => response.account_data.events.push(Raw::from_json(event)),
        }
    }
    // An incremental sync reads only the rooms that changed.
    let mut changed = RoomsChanged::default();
    if since.is_none()
        && type_allowed(&options.account_data.types, &options.account_data.not_types, "m.push_rules")
        && state.store.account_data(user, None, "m.push_rules").await?.is_none()
    {
        // Clients read their push rules from account data; until a user changes them, that is
        // the server's defaults.
        let rules = json!({"type": "m.push_rules", "content": {"global": crate::push::server_default(user)}});
        response.account_data.events.push(raw(&rules)?);
    }
    let user_rooms = state.recent.user_rooms(&*state.store, user, upto).await?;
    // Read from memory until the user's account data changes, so a new list counts from the
    // next sync on.
    let ignored = Ignored::new(state.recent.ignored_users(&*state.store, user, upto).await?);
    let presence = &options.presence;
    let presence_wanted = |member: &UserId| {
        type_allowed(&presence.types, &presence.not_types, "m.presence")
            && presence.senders.as_ref().is_none_or(|senders| senders.iter().any(|s| s == member))
            && !presence.not_senders.iter().any(|s| s == member)
    };
    let mut presence_sent = std::collections::BTreeSet::new();
    if type_allowed(&presence.types, &presence.not_types, "m.presence")
        && state.ephemeral.any_presence_since(since.unwrap_or(0), upto)
    {
        // Presence of everyone the user shares a joined room with, and their own.
        let mut others = std::collections::BTreeSet::from([user.to_owned()]);
        for (room, membership, _) in user_rooms.iter() {
            if membership != "join" {
                continue;
            }
            let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else { continue };
            for (member, membership) in state.store.members(&room_id).await? {
                if membership == "join"
                    && let Ok(member) = ruma::OwnedUserId::try_from(member)
                {
                    others.insert(member);
                }
            }
        }
        others.retain(|member| presence_wanted(member));
        for (member, presence) in
            state.ephemeral.presence_changes(others.iter().map(|u| &**u), since.unwrap_or(0), upto)
        {
            response.presence.events.push(presence_event(&member, &presence)?);
            presence_sent.insert(member);
        }
    }
    let mut newly_met = std::collections::BTreeSet::new();
    for (room, membership, at) in user_rooms.iter() {
        let Ok(room_id) = OwnedRoomId::try_from(room.as_str()) else { continue };
        let at = *at;
        if !options.wants_room(&room_id) {
            continue;
        }
        if let Some(since) = since
            && !full_state
            && at <= since
            && !room_account_data.contains_key(room_id.as_str())
            && state.ephemeral.typing_since(&room_id, since, upto).is_none()
            && !changed.contains(state, room, since, upto).await?
        {
            continue;
        }
        if at > upto {
            continue;
        }
        let changed_since = since.is_none_or(|since| at > since);
        match membership.as_str() {
            "join" => {
                // New to the sync when the user joined since the token, or left and joined again
                // (what happened while they were away is theirs to read only as history
                // visibility allows); a member event that only changed their profile leaves the
                // room as it was.
                let joined_since = match since {
                    Some(since) if changed_since => !joined_throughout(state, &room_id, user, since).await?,
                    _ => changed_since,
                };
                let fresh = joined_since || full_state;
                let after = if fresh { 0 } else { since.unwrap_or(0) };
                // A room new to the sync is read from its start, as far as history visibility
                // allows; otherwise only events since the token, all after the user's join.
                let rules = match fresh {
                    true => Some(ReadRules::load(state, &room_id, user).await?),
                    false => None,
                };
                let mut joined = joined_room(
                    state,
                    query.reader(),
                    &room_id,
                    after,
                    upto,
                    options,
                    rules.as_ref(),
                    &ignored,
                )
                .await?;
                let account_data = room_account_data.remove(room_id.as_str()).unwrap_or_default();
                let mut ephemeral = ephemeral_events(state, user, &room_id, after, upto).await?;
                let wanted = &options.ephemeral;
                ephemeral.retain(|e| {
                    e["type"]
                        .as_str()
                        .is_some_and(|kind| type_allowed(&wanted.types, &wanted.not_types, kind))
                });
                // A room joined since the token is `limited`, as Synapse marks it: the client
                // has none of its history, which may go back before what the timeline holds.
                if let Some(joined) = joined.as_mut()
                    && since.is_some()
                    && joined_since
                {
                    joined.timeline.limited = true;
                }
                if joined.is_none() && (!account_data.is_empty() || !ephemeral.is_empty()) {
                    let mut empty = JoinedRoom::new();
                    empty.timeline.prev_batch = Some(token(upto));
                    joined = Some(empty);
                }
                if let Some(joined) = &joined
                    && since.is_some()
                {
                    // People the user meets in this response: everyone in a room they joined,
                    // and whoever joined a room they are in.
                    match joined_since {
                        true => newly_met.extend(
                            state
                                .store
                                .members(&room_id)
                                .await?
                                .into_iter()
                                .filter(|(_, membership)| membership == "join")
                                .filter_map(|(member, _)| ruma::OwnedUserId::try_from(member).ok()),
                        ),
                        false => newly_met.extend(joins_in(&joined.timeline.events)),
                    }
                }
                if let Some(mut joined) = joined {
                    let (notifications, highlights) =
                        unread_counts(state, user, &room_id, at, upto, &ignored).await?;
                    joined.unread_notifications.notification_count = Some(notifications);
                    joined.unread_notifications.highlight_count = Some(highlights);
                    joined.account_data.events = account_data.into_iter().map(Raw::from_json).collect();
                    joined.ephemeral.events = ephemeral.iter().map(raw).collect::<Result<_>>()?;
                    response.rooms.join.insert(room_id, joined);
                }
            }
            "invite" if changed_since || full_state => {
                let mut events = Vec::new();
                let mut from_ignored = false;
                for event in state.store.current_state(&room_id).await? {
                    let client = ClientEvent::parse(&event)?;
                    let is_invite = client.is_state("m.room.member", user.as_str());
                    // An invite from someone the user ignores is not shown at all.
                    from_ignored |= is_invite && ignored.contains(&client.sender());
                    if is_invite || INVITE_STATE.contains(&client.kind().as_str()) {
                        events.push(client.stripped()?);
                    }
                }
                if from_ignored {
                    continue;
                }
                // Invited to a room of another server: what that server said of the room.
                if let Some(stripped) = state.store.invite_state(&room_id, user).await? {
                    let stripped: Vec<Raw<_>> = serde_json::from_str(&stripped).map_err(Error::internal)?;
                    events.extend(stripped);
                }
                let mut invite_state = InviteState::new();
                invite_state.events = events;
                response.rooms.invite.insert(room_id, InvitedRoom::from(invite_state));
            }
            // Rooms left since the token; in an initial sync, every room left if the filter
            // asks for them.
            "leave" | "ban"
                if (since.is_some() && changed_since) || (since.is_none() && options.include_leave) =>
            {
                let after = since.unwrap_or(0);
                let rules = ReadRules::load(state, &room_id, user).await?;
                let (events, limited) =
                    window(state, &room_id, after, at, options, Some(&rules), &ignored).await?;
                let events = erase_for_reader(state, &rules, events).await?;
                let start = events.first().map_or(at, |e| e.stream_ordering - 1);
                let mut left = LeftRoom::new();
                left.timeline = timeline(state, query.reader(), &events, limited, at).await?;
                // What changed before the timeline, as seen up to the leave: all of it if the user
                // joined after the token too.
                let known_since = match since {
                    Some(since) if joined_at(state, &room_id, user, since).await? => Some(since),
                    _ => None,
                };
                let mut before = state_before(
                    state,
                    query.reader(),
                    &room_id,
                    start,
                    known_since,
                    true,
                    options,
                    &events,
                    &[],
                )
                .await?;
                before.retain(|event| rules.may_see(event));
                left.state = State::Before(StateEvents::from(serve(state, &before, query.reader()).await?));
                response.rooms.leave.insert(room_id, left);
            }
            _ => {}
        }
    }
    // The presence of people the user meets, though it did not change since the token (as
    // Synapse: `offline` for those who never set one).
    for member in newly_met {
        if member != *user && !presence_sent.contains(&member) && presence_wanted(&member) {
            let event = match state.ephemeral.presence(&member) {
                Some(presence) => presence_event(&member, &presence)?,
                None => {
                    raw(&json!({"type": "m.presence", "sender": member, "content": {"presence": "offline"}}))?
                }
            };
            response.presence.events.push(event);
        }
    }
    Ok(response)
}

/// A user's presence as an `m.presence` event.
fn presence_event<T>(member: &UserId, presence: &crate::rooms::ephemeral::Presence) -> Result<Raw<T>> {
    let mut content = json!({
        "presence": presence.state,
        "last_active_ago": presence.last_active.elapsed().as_millis() as u64,
        "currently_active": presence.state == "online",
    });
    if let Some(status) = &presence.status_msg {
        content["status_msg"] = status.as_str().into();
    }
    raw(&json!({"type": "m.presence", "sender": member, "content": content}))
}

/// The users who joined in a timeline (member events that set `join`).
fn joins_in(events: &[Raw<ruma::events::AnySyncTimelineEvent>]) -> Vec<ruma::OwnedUserId> {
    #[derive(serde::Deserialize)]
    struct Member {
        #[serde(rename = "type")]
        kind: String,
        state_key: Option<ruma::OwnedUserId>,
        content: Option<Box<serde_json::value::RawValue>>,
    }
    #[derive(serde::Deserialize)]
    struct Membership {
        membership: Option<String>,
    }
    events
        .iter()
        .filter_map(|event| event.deserialize_as_unchecked::<Member>().ok())
        .filter(|event| event.kind == "m.room.member")
        .filter(|event| {
            event
                .content
                .as_ref()
                .and_then(|c| serde_json::from_str::<Membership>(c.get()).ok())
                .and_then(|m| m.membership)
                == Some("join".to_owned())
        })
        .filter_map(|event| event.state_key)
        .collect()
}

/// Most unread events examined for notification counts.
const MAX_UNREAD: i64 = 100;

/// Most to-device messages one response carries; the rest come with the next.
const MAX_TO_DEVICE: usize = 100;

/// The device's to-device messages, device list changes and key counts.
async fn e2ee(
    state: &AppState,
    query: &Query<'_>,
    upto: i64,
    read_queue: bool,
    acknowledge: Option<&str>,
    response: &mut sync_events::v3::Response,
) -> Result<()> {
    let (user, device) = (query.user, query.device);
    let received = query.received.as_deref();
    let queue = &state.queue;
    let news = match queue.news() {
        News::Bell => read_queue,
        News::InStream => {
            // Envelopes newer than the token's are marked in the window; without a cursor, the
            // previous response had nothing waiting up to its position.
            let after = received.and_then(|cursor| cursor.parse().ok()).or(query.since).unwrap_or(0);
            let key = device_key(user.as_str(), device.as_str());
            state.recent.marked(Mark::ToDevice, &key, after, upto) != Some(false)
        }
    };
    if news {
        let messages = match queue.pending(user, device, acknowledge, upto, MAX_TO_DEVICE).await {
            Ok(messages) => messages,
            Err(error) if queue.news() == News::Bell => {
                // Redis is out of reach: everything else in the sync can still be served. The
                // token keeps the cursor it came with, so what was delivered is acknowledged,
                // and what waits is delivered, by a later sync.
                tracing::debug!(%error, "to-device messages left for a later sync");
                if let Some(cursor) = received {
                    let sealed = state.cursors.seal(user, device, cursor);
                    response.next_batch = format!("{}_t{sealed}", token(upto));
                }
                Vec::new()
            }
            Err(error) => return Err(error),
        };
        if let Some(last) = messages.last() {
            // Until the device acknowledges them with this token, they stay queued.
            let sealed = state.cursors.seal(user, device, &last.cursor);
            response.next_batch = format!("{}_t{sealed}", token(upto));
        }
        response.to_device.events = messages
            .iter()
            .map(|m| serde_json::value::RawValue::from_string(m.json.clone()).map(Raw::from_json))
            .collect::<std::result::Result<_, _>>()
            .map_err(Error::internal)?;
    }
    if let Some(since) = query.since {
        let (changed, left) = super::keys::device_list_updates(state, user, since, upto).await?;
        response.device_lists.changed = changed;
        response.device_lists.left = left;
    }
    let counts = super::keys::key_counts(state, user, device, upto).await?;
    response.device_one_time_keys_count = counts.0.clone();
    response.device_unused_fallback_key_types = Some(counts.1.clone());
    Ok(())
}

/// Which rooms changed since the sync's token: from memory, or from the database (once per
/// response) when the token is older than what memory holds.
#[derive(Default)]
struct RoomsChanged {
    from_database: Option<std::collections::HashSet<String>>,
}

impl RoomsChanged {
    async fn contains(&mut self, state: &AppState, room: &str, since: i64, upto: i64) -> Result<bool> {
        if let Some(changed) = state.recent.room_changed(room, since, upto) {
            return Ok(changed);
        }
        if self.from_database.is_none() {
            self.from_database = Some(state.store.rooms_changed(since, upto).await?);
        }
        Ok(self.from_database.as_ref().is_some_and(|rooms| rooms.contains(room)))
    }
}

/// Notifying and highlighting events since the user's read receipt (`m.read` or
/// `m.read.private`): what the push-rule evaluator stored ([`crate::push::evaluate`]), and for
/// the events it has not reached yet, the user's rules applied here the same way, so a response
/// counts every event it carries (those of users they ignore do not count). Counts are kept per process and extended with the events each
/// sync has not seen yet; `joined_at` is the position of the user's join.
async fn unread_counts(
    state: &AppState,
    user: &UserId,
    room_id: &RoomId,
    joined_at: i64,
    upto: i64,
    ignored: &Ignored,
) -> Result<(UInt, UInt)> {
    let known = state.ephemeral.unread(user, room_id).filter(|counts| counts.counted_upto <= upto);
    // The read position is read again only when the user's receipts moved.
    let read = match known {
        Some(counts)
            if state.recent.own_receipt_moved(room_id, user, counts.read_checked, upto) == Some(false) =>
        {
            counts.read
        }
        _ => state.store.read_up_to(room_id.as_str(), user).await?.unwrap_or(0),
    };
    let mut counts = match known {
        Some(counts) if counts.read == read => UnreadCounts { read_checked: upto, ..counts },
        _ => {
            // As Synapse: without a receipt, what came after the user's membership event (their
            // join), so that an invite's notification is not an unread message.
            let after = if read > 0 { read } else { joined_at };
            let stored = state.store.unread_counts(user, room_id, after, upto).await?;
            UnreadCounts {
                read,
                read_checked: upto,
                counted_upto: stored.through.max(after),
                notify: stored.notify,
                highlight: stored.highlight,
            }
        }
    };
    if counts.counted_upto < upto {
        let events = state
            .recent
            .room_events(&*state.store, room_id, counts.counted_upto, upto, MAX_UNREAD, false)
            .await?;
        let mut others = Vec::new();
        for event in &events {
            let client = ClientEvent::parse(event)?;
            // As the evaluator: events the user did not send, from after they joined, and not
            // from someone they ignore.
            if client.sender() != user.as_str() && event.stream_ordering > joined_at && !ignored.hides(event)
            {
                others.push((event, client));
            }
        }
        if !others.is_empty() {
            let room =
                state.recent.room_push(room_id, upto, || evaluate::load_room_push(state, room_id)).await?;
            let context = evaluate::user_push(state, user, upto).await?;
            let (rules, name) = &*context;
            for (event, client) in &others {
                let Some(flat) = evaluate::flatten(client, &event.json)? else { continue };
                if let Some(actions) =
                    evaluate::notify_actions(rules, &flat, user, name, room_id, &room).await
                {
                    counts.notify += 1;
                    counts.highlight += u64::from(actions.iter().any(Action::is_highlight));
                }
            }
        }
        // A backlog longer than one batch is counted over the following syncs.
        counts.counted_upto = if events.len() as i64 == MAX_UNREAD {
            events.last().map_or(upto, |e| e.stream_ordering)
        } else {
            upto
        };
    }
    state.ephemeral.set_unread(user, room_id, counts);
    Ok((
        UInt::try_from(counts.notify).unwrap_or_default(),
        UInt::try_from(counts.highlight).unwrap_or_default(),
    ))
}

/// Typing and receipts that changed in `(after, upto]`, as ephemeral events.
pub(super) async fn ephemeral_events(
    state: &AppState,
    user: &UserId,
    room_id: &RoomId,
    after: i64,
    upto: i64,
) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    if let Some(typing) = state.ephemeral.typing_since(room_id, after, upto) {
        events.push(json!({"type": "m.typing", "content": {"user_ids": typing}}));
    }
    let mut receipts: BTreeMap<String, BTreeMap<String, BTreeMap<String, Value>>> = BTreeMap::new();
    for receipt in state.recent.receipts(&*state.store, room_id, after, upto).await? {
        // Private receipts are only ever shown to their owner.
        if receipt.receipt_type == "m.read.private" && receipt.user_id != user.as_str() {
            continue;
        }
        let mut data = json!({"ts": receipt.ts});
        if let Some(thread) = &receipt.thread_id {
            data["thread_id"] = thread.as_str().into();
        }
        receipts
            .entry(receipt.event_id)
            .or_default()
            .entry(receipt.receipt_type)
            .or_default()
            .insert(receipt.user_id, data);
    }
    if !receipts.is_empty() {
        events.push(json!({"type": "m.receipt", "content": receipts}));
    }
    Ok(events)
}

/// The newest events of a room in `(after, upto]` that the timeline filter, the
/// history-visibility rules (when given) and the user's ignore list let through, at most the
/// filter's limit, and whether older ones were left out.
async fn window(
    state: &AppState,
    room_id: &RoomId,
    after: i64,
    upto: i64,
    options: &Options,
    rules: Option<&ReadRules>,
    ignored: &Ignored,
) -> Result<(Vec<StoredEvent>, bool)> {
    let limit = options.limit;
    let after = rules.map_or(after, |rules| after.max(rules.floor()));
    let keep = |event: &StoredEvent| {
        !ignored.hides(event)
            && options.timeline.as_ref().is_none_or(|filter| {
                ClientEvent::parse(event).is_ok_and(|client| matches_filter(filter, &client))
            })
    };
    // Events of the room's current state pass whatever the history rules say of them, as in
    // Synapse: the reader is sent that state anyway, and sees in the timeline how it came about
    // (someone who joined while the reader was away). Read once, at the first hidden event.
    let mut current_state: Option<std::collections::HashSet<String>> = None;
    if options.timeline.is_none() && rules.is_none() && ignored.is_empty() {
        // One more than the limit tells whether the timeline is complete.
        let mut events =
            state.recent.room_events(&*state.store, room_id, after, upto, limit + 1, true).await?;
        let limited = events.len() as i64 > limit;
        if limited {
            events.remove(0);
        }
        return Ok((events, limited));
    }
    let mut kept = Vec::new();
    let mut ceiling = upto;
    for _ in 0..MAX_FILTER_BATCHES {
        let batch =
            state.recent.room_events(&*state.store, room_id, after, ceiling, FILTER_BATCH, true).await?;
        let exhausted = (batch.len() as i64) < FILTER_BATCH;
        ceiling = batch.first().map_or(after, |e| e.stream_ordering - 1);
        for event in batch.into_iter().rev() {
            let readable = match rules {
                Some(rules) if !rules.may_see(&event) => {
                    if current_state.is_none() {
                        let ids = state.store.current_state(room_id).await?.into_iter().map(|e| e.event_id);
                        current_state = Some(ids.collect());
                    }
                    current_state.as_ref().is_some_and(|ids| ids.contains(&event.event_id))
                }
                _ => true,
            };
            if readable && keep(&event) {
                if kept.len() as i64 == limit {
                    kept.reverse();
                    return Ok((kept, true));
                }
                kept.push(event);
            }
        }
        if exhausted {
            kept.reverse();
            return Ok((kept, false));
        }
    }
    kept.reverse();
    Ok((kept, true))
}

/// A timeline of `events`; `prev_batch` points just before the first (or at `upto` if none).
async fn timeline(
    state: &AppState,
    reader: Reader<'_>,
    events: &[StoredEvent],
    limited: bool,
    upto: i64,
) -> Result<Timeline> {
    let mut timeline = Timeline::new();
    timeline.limited = limited;
    timeline.prev_batch = Some(token(events.first().map_or(upto, |e| e.stream_ordering - 1)));
    timeline.events = serve(state, events, reader).await?;
    Ok(timeline)
}

/// A joined room's part of the response; `None` when nothing changed in it. `fresh` (the user's
/// read rules) for a room new to this sync, which is sent whole.
#[allow(clippy::too_many_arguments)]
async fn joined_room(
    state: &AppState,
    reader: Reader<'_>,
    room_id: &RoomId,
    after: i64,
    upto: i64,
    options: &Options,
    fresh: Option<&ReadRules>,
    ignored: &Ignored,
) -> Result<Option<JoinedRoom>> {
    let user = reader.user;
    let rules = fresh;
    let fresh = fresh.is_some();
    let (events, limited) = window(state, room_id, after, upto, options, rules, ignored).await?;
    if events.is_empty() && !fresh {
        return Ok(None);
    }
    // A room read since the token holds only events after the user's join, which they saw
    // live; one new to the sync may show older ones.
    let events = match rules {
        Some(rules) => erase_for_reader(state, rules, events).await?,
        None => events,
    };
    let start = events.first().map_or(upto, |e| e.stream_ordering - 1);
    let mut room = JoinedRoom::new();
    room.timeline = timeline(state, reader, &events, limited, upto).await?;
    let membership_changed = events
        .iter()
        .any(|e| ClientEvent::parse(e).is_ok_and(|c| c.kind() == "m.room.member" && c.state_key().is_some()));
    let mut heroes = Vec::new();
    if fresh || membership_changed {
        room.summary = summary(state, room_id, user).await?;
        heroes = room.summary.heroes.iter().map(|u| u.to_string()).collect();
    }
    // The state before the timeline: complete for a room new to this sync, what changed since
    // the token for a gapped one; with lazy-loaded members, also the members of the timeline's
    // senders the device was not sent yet.
    if fresh || limited || options.lazy_members {
        let since = (!fresh).then_some(after);
        let before =
            state_before(state, reader, room_id, start, since, limited, options, &events, &heroes).await?;
        room.state = State::Before(StateEvents::from(serve(state, &before, reader).await?));
    }
    Ok(Some(room))
}

/// The state before a timeline that starts after `start`, as the filter asks for it: with no
/// `since` (a room new to the sync) every event; with `since`, when `gapped`, those set after
/// it. With lazy-loaded members, member events only for the senders of `timeline`, the reader
/// and the `heroes` — and, unless the filter asks for redundant ones, only those the device was
/// not sent already (remembered per process, as Synapse does).
#[allow(clippy::too_many_arguments)]
async fn state_before(
    state: &AppState,
    reader: Reader<'_>,
    room_id: &RoomId,
    start: i64,
    since: Option<i64>,
    gapped: bool,
    options: &Options,
    timeline: &[StoredEvent],
    heroes: &[String],
) -> Result<Vec<StoredEvent>> {
    let mut before = state.store.state_at(room_id, start).await?;
    let wanted: std::collections::BTreeSet<String> = timeline
        .iter()
        .filter_map(|e| ClientEvent::parse(e).ok())
        .map(|e| e.sender())
        .chain([reader.user.to_string()])
        .chain(heroes.iter().cloned())
        .collect();
    let key = (reader.user.as_str(), reader.device.as_str(), room_id.as_str());
    let sent = match options.lazy_members {
        true => state.ephemeral.lazy_members_sent(key, since.is_none()),
        false => Default::default(),
    };
    before.retain(|event| {
        let Ok(client) = ClientEvent::parse(event) else { return false };
        let changed = match since {
            None => true,
            Some(since) => gapped && event.stream_ordering > since,
        };
        if !matches_filter(&options.state, &client) {
            return false;
        }
        match (options.lazy_members, client.kind() == "m.room.member", client.state_key()) {
            (true, true, Some(member)) => {
                // Redundant ones are the other members' (the reader knows their own).
                let redundant = options.redundant_members && member != reader.user.as_str();
                let unsent = redundant || sent.get(&member) != Some(&event.event_id);
                // A room new to the sync sends only the wanted members; a gapped one also the
                // membership changes in the gap.
                (wanted.contains(&member) && unsent) || (since.is_some() && changed)
            }
            _ => changed,
        }
    });
    if options.lazy_members {
        let members = before.iter().filter_map(|event| {
            let client = ClientEvent::parse(event).ok()?;
            (client.kind() == "m.room.member").then(|| Some((client.state_key()?, event.event_id.clone())))?
        });
        state.ephemeral.remember_lazy_members(key, members);
    }
    Ok(before)
}

/// Whether the user was joined to the room at stream position `at`.
async fn joined_at(state: &AppState, room_id: &RoomId, user: &UserId, at: i64) -> Result<bool> {
    Ok(membership_around(state, room_id, user, at).await?.0)
}

/// Whether the user was joined to the room at stream position `since` and has been ever since
/// (every later member event of theirs a join: a profile change).
async fn joined_throughout(state: &AppState, room_id: &RoomId, user: &UserId, since: i64) -> Result<bool> {
    let (joined, stayed) = membership_around(state, room_id, user, since).await?;
    Ok(joined && stayed)
}

/// Whether the user was joined at `at`, and whether every member event of theirs after it is a
/// join.
async fn membership_around(
    state: &AppState,
    room_id: &RoomId,
    user: &UserId,
    at: i64,
) -> Result<(bool, bool)> {
    let history = state.store.state_history(room_id, "m.room.member", user.as_str()).await?;
    let (mut joined, mut stayed) = (false, true);
    for event in &history {
        let join = ClientEvent::parse(event)?.content_str("membership").as_deref() == Some("join");
        if event.stream_ordering <= at {
            joined = join;
        } else {
            stayed &= join;
        }
    }
    Ok((joined, stayed))
}

/// Most heroes a room summary names (the spec's five).
const MAX_HEROES: i64 = 5;

/// A joined room's summary: joined and invited member counts and, when the room has neither a
/// name nor a canonical alias, the members a client names it after.
async fn summary(state: &AppState, room_id: &RoomId, user: &UserId) -> Result<RoomSummary> {
    let members = state.store.members(room_id).await?;
    let count =
        |wanted: &str| UInt::try_from(members.iter().filter(|(_, m)| m == wanted).count() as u64).ok();
    let mut summary = RoomSummary::new();
    summary.joined_member_count = count("join");
    summary.invited_member_count = count("invite");
    let mut named = false;
    for event in state.store.current_state(room_id).await? {
        let client = ClientEvent::parse(&event)?;
        named |= (client.is_state("m.room.name", "")
            && client.content_str("name").is_some_and(|n| !n.is_empty()))
            || (client.is_state("m.room.canonical_alias", "") && client.content_str("alias").is_some());
    }
    if !named {
        summary.heroes = state
            .store
            .heroes(room_id, user, MAX_HEROES)
            .await?
            .into_iter()
            .filter_map(|id| ruma::OwnedUserId::try_from(id).ok())
            .collect();
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::json::arbitrary::config;

    /// Strings near a token: `s`, signs, digits, `_`, `t`, dots and hex, or anything.
    fn near_token() -> impl Strategy<Value = String> {
        prop_oneof!["s[-+0-9]{0,21}(_t?[0-9a-f.]{0,8})?", "s?[0-9]{0,3}_{0,2}t?.{0,6}", any::<String>(),]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn a_position_token_round_trips(position in 0..=i64::MAX) {
            prop_assert_eq!(parse_token(&token(position)).ok(), Some(position));
            prop_assert_eq!(parse_sync_token(&token(position)).ok(), Some((position, None)));
        }

        #[test]
        fn a_sync_token_with_a_cursor_round_trips(position in 0..=i64::MAX, cursor in "(?s).{1,40}") {
            let text = format!("{}_t{cursor}", token(position));
            prop_assert_eq!(parse_sync_token(&text).ok(), Some((position, Some(cursor))));
            prop_assert_eq!(parse_token(&text).ok(), Some(position), "pagination takes a sync token too");
        }

        #[test]
        fn token_parsers_never_panic_and_accept_only_what_the_server_writes(text in near_token()) {
            if let Ok(position) = parse_token(&text) {
                let written = token(position);
                prop_assert!(text == written || text.starts_with(&format!("{written}_")), "{} read as {}", text, position);
            }
            if let Ok((position, cursor)) = parse_sync_token(&text) {
                let written = match &cursor {
                    Some(cursor) => format!("{}_t{cursor}", token(position)),
                    None => token(position),
                };
                prop_assert_eq!(&text, &written);
            }
        }
    }
}
