//! Ephemeral data between servers (the server-server API's EDUs), both ways: typing
//! notifications, read receipts, presence, to-device messages and device-list updates.
//!
//! Out: sent as they happen, in the next transaction to each server ([`super::outbox`]), to the
//! servers with a member joined to the room (typing, receipts; not those the room's ACL denies),
//! sharing a room with the user (presence, device-list updates), or of the recipients
//! (to-device). Private read receipts never leave the server.
//!
//! In (from `/send` transactions): an EDU has no answer, so one that may not be taken is ignored
//! (and logged), as the spec says: it must be about a user of the sending server, who for typing
//! and receipts is joined to a room here whose ACL lets that server in, and for presence and
//! device lists shares a room with this server's users. A receipt names an event of that room
//! that is here. To-device messages go to this server's users' devices, queued as local ones
//! are, once per sender and message id. A device-list or cross-signing key update makes the
//! users sharing a room with its user query that user's keys again (asked of their server:
//! remote device lists are not cached here, so `prev_id` needs no tracking).

use std::{collections::BTreeMap, collections::BTreeSet, time::Duration};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName, RoomId, ServerName, UInt, UserId,
    api::federation::transactions::edu::{
        DeviceListUpdateContent, DirectDeviceContent, Edu, PresenceContent, PresenceUpdate, ReceiptContent,
        ReceiptData, ReceiptMap, SigningKeyUpdateContent, TypingContent,
    },
    events::receipt::{Receipt, ReceiptThread},
    presence::PresenceState,
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    notifier::Update,
    rooms::{self, remote},
    state::AppState,
};

/// How long another server's user is shown typing unless that server says so again (servers
/// repeat the EDU while their user types, as clients repeat theirs).
const REMOTE_TYPING: Duration = Duration::from_secs(30);
/// The longest status message taken (as for this server's users).
const MAX_STATUS_BYTES: usize = 1024;

/// Tells the other servers in `room_id` that `user` (of this server) started or stopped typing.
pub async fn send_typing(state: &AppState, room_id: &RoomId, user: &UserId, typing: bool) -> Result<()> {
    let edu = Edu::Typing(TypingContent::new(room_id.to_owned(), user.to_owned(), typing));
    to_room(state, room_id, &edu).await
}

/// Tells the other servers in `room_id` that `user` (of this server) read up to `event_id`.
pub async fn send_receipt(
    state: &AppState,
    room_id: &RoomId,
    user: &UserId,
    event_id: &ruma::EventId,
    thread: Option<&str>,
) -> Result<()> {
    let mut receipt = Receipt::new(MilliSecondsSinceUnixEpoch::now());
    receipt.thread = match thread {
        None => ReceiptThread::Unthreaded,
        Some("main") => ReceiptThread::Main,
        Some(root) => ReceiptThread::Thread(root.try_into().map_err(Error::internal)?),
    };
    let read = BTreeMap::from([(user.to_owned(), ReceiptData::new(receipt, vec![event_id.to_owned()]))]);
    let receipts = BTreeMap::from([(room_id.to_owned(), ReceiptMap::new(read))]);
    to_room(state, room_id, &Edu::Receipt(ReceiptContent::new(receipts))).await
}

/// Tells the servers sharing a room with `user` (of this server) their presence.
pub async fn send_presence(
    state: &AppState,
    user: &UserId,
    presence: &str,
    status_msg: Option<String>,
) -> Result<()> {
    if state.outbox().is_none() {
        return Ok(());
    }
    let servers = servers_sharing_a_room(state, user).await?;
    let mut update = PresenceUpdate::new(user.to_owned(), PresenceState::from(presence), UInt::MIN);
    update.status_msg = status_msg;
    update.currently_active = presence == "online";
    send(state, servers, &Edu::Presence(PresenceContent::new(vec![update]))).await
}

/// Sends `edu` to the servers in `room_id` that its ACL lets in.
async fn to_room(state: &AppState, room_id: &RoomId, edu: &Edu) -> Result<()> {
    if state.outbox().is_none() {
        return Ok(());
    }
    let mut servers = BTreeSet::new();
    for server in remote::servers_in_room(state, room_id).await? {
        if server != state.server_name && remote::acl_allows(state, room_id, &server).await? {
            servers.insert(server);
        }
    }
    send(state, servers, edu).await
}

/// Sends `edu` to `server`.
pub async fn send_to_server(state: &AppState, server: OwnedServerName, edu: &Edu) -> Result<()> {
    send(state, BTreeSet::from([server]), edu).await
}

/// Tells the servers sharing a room with `user` (of this server) that `device` was added or
/// changed, or with `deleted`, removed.
pub async fn send_device_list_update(
    state: &AppState,
    user: &UserId,
    device: &ruma::DeviceId,
    deleted: bool,
) -> Result<()> {
    if state.outbox().is_none() {
        return Ok(());
    }
    let servers = servers_sharing_a_room(state, user).await?;
    let stream_id = UInt::try_from(state.recent.upto().max(0)).unwrap_or(UInt::MIN);
    let mut update = DeviceListUpdateContent::new(user.to_owned(), device.to_owned(), stream_id);
    update.deleted = deleted.then_some(true);
    send(state, servers, &Edu::DeviceListUpdate(update)).await
}

/// Tells the servers sharing a room with `user` (of this server) their new master and
/// self-signing keys (JSON; either may be absent).
pub async fn send_signing_key_update(
    state: &AppState,
    user: &UserId,
    master: Option<&str>,
    self_signing: Option<&str>,
) -> Result<()> {
    if state.outbox().is_none() || (master.is_none() && self_signing.is_none()) {
        return Ok(());
    }
    let key = |json: &str| {
        serde_json::value::RawValue::from_string(json.to_owned()).map(Raw::from_json).map_err(Error::internal)
    };
    let mut update = SigningKeyUpdateContent::new(user.to_owned());
    update.master_key = master.map(key).transpose()?;
    update.self_signing_key = self_signing.map(key).transpose()?;
    let servers = servers_sharing_a_room(state, user).await?;
    send(state, servers, &Edu::SigningKeyUpdate(update)).await
}

/// The servers with a member joined to a room `user` is joined to.
async fn servers_sharing_a_room(state: &AppState, user: &UserId) -> Result<BTreeSet<OwnedServerName>> {
    let mut servers = BTreeSet::new();
    for (room, membership, _) in state.store.user_rooms(user).await? {
        let Ok(room) = <&RoomId>::try_from(room.as_str()) else { continue };
        if membership == "join" {
            servers.extend(remote::servers_in_room(state, room).await?);
        }
    }
    Ok(servers)
}

async fn send(state: &AppState, mut servers: BTreeSet<OwnedServerName>, edu: &Edu) -> Result<()> {
    servers.remove(&state.server_name);
    let Some(outbox) = state.outbox() else { return Ok(()) };
    if !servers.is_empty() {
        outbox.send_edu(state, servers, &serde_json::to_string(edu).map_err(Error::internal)?).await?;
    }
    Ok(())
}

/// Takes the EDUs of a transaction from `origin` (see the module's comment).
pub async fn receive(state: &AppState, origin: &ServerName, edus: &[Raw<Edu>]) {
    for raw in edus {
        let edu = match raw.deserialize() {
            Ok(edu) => edu,
            Err(error) => {
                tracing::info!(%origin, %error, "an EDU that is not one was ignored");
                continue;
            }
        };
        let taken = match edu {
            Edu::Typing(typing) => take_typing(state, origin, typing).await,
            Edu::Receipt(receipts) => take_receipts(state, origin, receipts).await,
            Edu::Presence(presence) => take_presence(state, origin, presence).await,
            Edu::DirectToDevice(messages) => take_to_device(state, origin, messages).await,
            Edu::DeviceListUpdate(update) => keys_changed(state, origin, &update.user_id).await,
            Edu::SigningKeyUpdate(update) => keys_changed(state, origin, &update.user_id).await,
            _ => Err(Ignored("of a kind not taken yet".to_owned()).into()),
        };
        if let Err(error) = taken {
            tracing::info!(%origin, %error, "an EDU was ignored");
        }
    }
}

/// Why an EDU was not taken.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Ignored(String);

impl From<Ignored> for Error {
    fn from(ignored: Ignored) -> Self {
        Error::forbidden(ignored.0)
    }
}

/// Whether `user`, of `origin`, is joined to `room_id` here and its ACL lets `origin` in.
async fn member_from(state: &AppState, origin: &ServerName, room_id: &RoomId, user: &UserId) -> Result<()> {
    if user.server_name() != origin {
        return Err(Ignored(format!("{user} is not a user of {origin}")).into());
    }
    if state.store.membership(room_id, user).await?.as_deref() != Some("join") {
        return Err(Ignored(format!("{user} is not joined to {room_id} here")).into());
    }
    if !remote::acl_allows(state, room_id, origin).await? {
        return Err(Ignored(format!("the ACL of {room_id} denies {origin}")).into());
    }
    Ok(())
}

async fn take_typing(state: &AppState, origin: &ServerName, typing: TypingContent) -> Result<()> {
    member_from(state, origin, &typing.room_id, &typing.user_id).await?;
    let timeout_ms = typing.typing.then(|| u64::try_from(REMOTE_TYPING.as_millis()).unwrap_or(u64::MAX));
    rooms::at_new_position(state, |position| async move {
        state.share(Update::Typing {
            room_id: typing.room_id,
            user_id: typing.user_id,
            timeout_ms,
            position,
        });
        Ok(())
    })
    .await
}

async fn take_receipts(state: &AppState, origin: &ServerName, receipts: ReceiptContent) -> Result<()> {
    for (room_id, map) in receipts.receipts {
        for (user, data) in map.read {
            if let Err(error) = member_from(state, origin, &room_id, &user).await {
                tracing::info!(%origin, %error, "a receipt was ignored");
                continue;
            }
            let thread = match &data.data.thread {
                ReceiptThread::Unthreaded => None,
                ReceiptThread::Main => Some("main".to_owned()),
                ReceiptThread::Thread(root) => Some(root.to_string()),
                _ => continue,
            };
            // The event read up to: the last named (servers name one).
            let Some(event_id) = data.event_ids.last() else { continue };
            if let Err(error) = rooms::receipts::put(state, &room_id, &user, "m.read", event_id, thread).await
            {
                tracing::info!(%origin, %error, %event_id, "a receipt was ignored");
            }
        }
    }
    Ok(())
}

async fn take_presence(state: &AppState, origin: &ServerName, presence: PresenceContent) -> Result<()> {
    for update in presence.push {
        let user = &update.user_id;
        let kind = update.presence.to_string();
        let why = if user.server_name() != origin {
            Some(format!("{user} is not a user of {origin}"))
        } else if !matches!(kind.as_str(), "online" | "offline" | "unavailable") {
            Some(format!("presence `{kind}` is not one of online, offline, unavailable"))
        } else if update.status_msg.as_ref().is_some_and(|status| status.len() > MAX_STATUS_BYTES) {
            Some(format!("a status message longer than {MAX_STATUS_BYTES} bytes"))
        } else if !shares_a_room(state, user).await? {
            Some(format!("{user} shares no room with this server"))
        } else {
            None
        };
        if let Some(why) = why {
            tracing::info!(%origin, %why, "a presence update was ignored");
            continue;
        }
        rooms::at_new_position(state, |position| async move {
            let update = Update::Presence {
                user_id: update.user_id.clone(),
                state: kind,
                status_msg: update.status_msg.clone(),
                position,
            };
            state.share(update);
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Whether `user` is joined to a room here.
async fn shares_a_room(state: &AppState, user: &UserId) -> Result<bool> {
    Ok(state.store.user_rooms(user).await?.iter().any(|(_, membership, _)| membership == "join"))
}

async fn take_to_device(state: &AppState, origin: &ServerName, messages: DirectDeviceContent) -> Result<()> {
    use crate::api::client::to_device;
    let sender = &messages.sender;
    if sender.server_name() != origin {
        return Err(Ignored(format!("{sender} is not a user of {origin}")).into());
    }
    let ours: to_device::Messages =
        messages.messages.into_iter().filter(|(user, _)| user.server_name() == state.server_name).collect();
    let event_type = messages.ev_type.to_string();
    let envelopes = to_device::envelopes(state, sender, &event_type, &ours).await?;
    // The sending server's messages are told apart by their id: a device id that no device of
    // this server can have stands for it.
    let from = <&ruma::DeviceId>::from("~federation");
    to_device::deliver(state, sender, from, messages.message_id.as_str(), &envelopes).await
}

/// A device-list or cross-signing key update about `user`, of `origin`.
async fn keys_changed(state: &AppState, origin: &ServerName, user: &UserId) -> Result<()> {
    if user.server_name() != origin {
        return Err(Ignored(format!("{user} is not a user of {origin}")).into());
    }
    if !shares_a_room(state, user).await? {
        return Err(Ignored(format!("{user} shares no room with this server")).into());
    }
    crate::api::client::keys::mark_device_list_changed(state, user).await
}
