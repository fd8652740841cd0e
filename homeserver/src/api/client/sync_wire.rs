//! `/sync` responses as clients read them.
//!
//! ruma's response type leaves empty sections out. Clients and the compliance suite read some of
//! them unconditionally, as Synapse always sends them: every joined room has `timeline` (with
//! `events`, `limited` and `prev_batch`), `state`, `account_data`, `ephemeral`,
//! `unread_notifications` and `summary`; every left room `timeline`, `state` and
//! `account_data`; `rooms` has `join`, `invite` and `leave`. This writes ruma's response in that
//! shape, borrowing everything (events stay raw JSON, never re-parsed).

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, Responder, body::BoxBody};
use ruma::{
    OwnedRoomId, RoomId,
    api::client::sync::sync_events::{
        DeviceLists, UnreadNotificationsCount,
        v3::{
            GlobalAccountData, InvitedRoom, JoinedRoom, KnockedRoom, LeftRoom, Presence, Response,
            RoomSummary, State, Timeline, ToDevice,
        },
    },
    serde::Raw,
};
use serde::Serialize;

use crate::error::Error;

/// A `/sync` response, written as clients expect it.
pub struct SyncResponse(pub Response);

impl Responder for SyncResponse {
    type Body = BoxBody;

    fn respond_to(self, _req: &HttpRequest) -> HttpResponse {
        match serde_json::to_vec(&Wire::of(&self.0)) {
            Ok(body) => HttpResponse::Ok().content_type("application/json").body(body),
            Err(e) => actix_web::ResponseError::error_response(&Error::internal(e)),
        }
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    next_batch: &'a str,
    rooms: Rooms<'a>,
    #[serde(skip_serializing_if = "no_presence")]
    presence: &'a Presence,
    #[serde(skip_serializing_if = "no_account_data")]
    account_data: &'a GlobalAccountData,
    #[serde(skip_serializing_if = "no_to_device")]
    to_device: &'a ToDevice,
    #[serde(skip_serializing_if = "no_device_lists")]
    device_lists: &'a DeviceLists,
    device_one_time_keys_count: &'a BTreeMap<ruma::OneTimeKeyAlgorithm, ruma::UInt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_unused_fallback_key_types: &'a Option<Vec<ruma::OneTimeKeyAlgorithm>>,
}

fn no_presence(p: &&Presence) -> bool {
    p.is_empty()
}
fn no_account_data(a: &&GlobalAccountData) -> bool {
    a.is_empty()
}
fn no_to_device(t: &&ToDevice) -> bool {
    t.is_empty()
}
fn no_device_lists(d: &&DeviceLists) -> bool {
    d.is_empty()
}
fn no_knocks(k: &&BTreeMap<OwnedRoomId, KnockedRoom>) -> bool {
    k.is_empty()
}
fn no_threads<T>(t: &&BTreeMap<ruma::OwnedEventId, T>) -> bool {
    t.is_empty()
}

#[derive(Serialize)]
struct Rooms<'a> {
    join: BTreeMap<&'a RoomId, Joined<'a>>,
    invite: &'a BTreeMap<OwnedRoomId, InvitedRoom>,
    leave: BTreeMap<&'a RoomId, Left<'a>>,
    #[serde(skip_serializing_if = "no_knocks")]
    knock: &'a BTreeMap<OwnedRoomId, KnockedRoom>,
}

#[derive(Serialize)]
struct Joined<'a> {
    summary: &'a RoomSummary,
    timeline: TimelineWire<'a>,
    state: Events<'a, ruma::events::AnySyncStateEvent>,
    account_data: Events<'a, ruma::events::AnyRoomAccountDataEvent>,
    ephemeral: Events<'a, ruma::events::AnySyncEphemeralRoomEvent>,
    unread_notifications: &'a UnreadNotificationsCount,
    #[serde(skip_serializing_if = "no_threads")]
    unread_thread_notifications: &'a BTreeMap<ruma::OwnedEventId, UnreadNotificationsCount>,
}

#[derive(Serialize)]
struct Left<'a> {
    timeline: TimelineWire<'a>,
    state: Events<'a, ruma::events::AnySyncStateEvent>,
    account_data: Events<'a, ruma::events::AnyRoomAccountDataEvent>,
}

#[derive(Serialize)]
struct TimelineWire<'a> {
    events: &'a [Raw<ruma::events::AnySyncTimelineEvent>],
    limited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_batch: &'a Option<String>,
}

#[derive(Serialize)]
#[serde(bound = "")]
struct Events<'a, T> {
    events: &'a [Raw<T>],
}

impl<'a> Wire<'a> {
    fn of(response: &'a Response) -> Self {
        let rooms = &response.rooms;
        Self {
            next_batch: &response.next_batch,
            rooms: Rooms {
                join: rooms.join.iter().map(|(id, room)| (&**id, Joined::of(room))).collect(),
                invite: &rooms.invite,
                leave: rooms.leave.iter().map(|(id, room)| (&**id, Left::of(room))).collect(),
                knock: &rooms.knock,
            },
            presence: &response.presence,
            account_data: &response.account_data,
            to_device: &response.to_device,
            device_lists: &response.device_lists,
            device_one_time_keys_count: &response.device_one_time_keys_count,
            device_unused_fallback_key_types: &response.device_unused_fallback_key_types,
        }
    }
}

fn timeline(timeline: &Timeline) -> TimelineWire<'_> {
    TimelineWire { events: &timeline.events, limited: timeline.limited, prev_batch: &timeline.prev_batch }
}

fn state(state: &State) -> Events<'_, ruma::events::AnySyncStateEvent> {
    // Hearth sends the state before the timeline (`use_state_after` is not implemented).
    match state {
        State::Before(events) | State::After(events) => Events { events: &events.events },
        _ => Events { events: &[] },
    }
}

impl<'a> Joined<'a> {
    fn of(room: &'a JoinedRoom) -> Self {
        Self {
            summary: &room.summary,
            timeline: timeline(&room.timeline),
            state: state(&room.state),
            account_data: Events { events: &room.account_data.events },
            ephemeral: Events { events: &room.ephemeral.events },
            unread_notifications: &room.unread_notifications,
            unread_thread_notifications: &room.unread_thread_notifications,
        }
    }
}

impl<'a> Left<'a> {
    fn of(room: &'a LeftRoom) -> Self {
        Self {
            timeline: timeline(&room.timeline),
            state: state(&room.state),
            account_data: Events { events: &room.account_data.events },
        }
    }
}
