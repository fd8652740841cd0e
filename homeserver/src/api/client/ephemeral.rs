//! Receipts, read markers, typing and presence.

use std::time::Duration;

use actix_web::web;
use ruma::{
    api::client::{
        presence::{get_presence, set_presence},
        read_marker::set_read_marker,
        receipt::create_receipt::{self, v3::ReceiptType},
        typing::create_typing_event::{self, v3::Typing},
    },
    events::receipt::ReceiptThread,
    presence::PresenceState,
};

use crate::{
    auth::ratelimit::Action,
    error::{Error, Result},
    notifier::Update,
    rooms,
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

pub(super) fn routes(router: &mut Router) {
    router.add(receipt).add(read_markers).add(typing).add(set_presence).add(get_presence);
}

/// POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}
///
/// Only the spec's receipt types; `thread_id` is `main` or a thread root's event id, and never
/// with `m.fully_read` (a read marker, which has no threads): `M_INVALID_PARAM`, as Synapse.
async fn receipt(
    state: web::Data<AppState>,
    request: Ruma<create_receipt::v3::Request>,
) -> Result<create_receipt::v3::Response> {
    let body = &request.body;
    let user = &request.sender.user_id;
    let thread = match &body.thread {
        ReceiptThread::Unthreaded => None,
        ReceiptThread::Main => Some("main".to_owned()),
        ReceiptThread::Thread(id) => Some(id.to_string()),
        _ => {
            return Err(Error::invalid_param("thread_id must be `main` or the event id of a thread's root"));
        }
    };
    match body.receipt_type {
        ReceiptType::FullyRead if thread.is_some() => {
            return Err(Error::invalid_param("m.fully_read is a read marker and takes no thread_id"));
        }
        ReceiptType::FullyRead => {
            let content = serde_json::json!({"event_id": body.event_id});
            let content = content.to_string();
            rooms::require_joined(&state, &body.room_id, user).await?;
            rooms::at_new_position(&state, |position| {
                let state = &state;
                async move {
                    state
                        .store
                        .put_account_data(
                            user,
                            Some(body.room_id.as_str()),
                            "m.fully_read",
                            &content,
                            position,
                        )
                        .await
                        .map_err(Into::into)
                }
            })
            .await?;
        }
        ReceiptType::Read | ReceiptType::ReadPrivate => {
            let kind = body.receipt_type.as_str();
            rooms::receipts::put(&state, &body.room_id, user, kind, &body.event_id, thread).await?;
        }
        ref other => {
            return Err(Error::invalid_param(format!(
                "receipt type `{other}` is not one of m.read, m.read.private, m.fully_read"
            )));
        }
    }
    Ok(create_receipt::v3::Response::new())
}

/// POST /_matrix/client/v3/rooms/{roomId}/read_markers
async fn read_markers(
    state: web::Data<AppState>,
    request: Ruma<set_read_marker::v3::Request>,
) -> Result<set_read_marker::v3::Response> {
    let body = &request.body;
    let user = &request.sender.user_id;
    if let Some(event_id) = &body.fully_read {
        rooms::require_joined(&state, &body.room_id, user).await?;
        let content = serde_json::json!({"event_id": event_id}).to_string();
        rooms::at_new_position(&state, |position| {
            let (state, content) = (&state, &content);
            async move {
                state
                    .store
                    .put_account_data(user, Some(body.room_id.as_str()), "m.fully_read", content, position)
                    .await
                    .map_err(Into::into)
            }
        })
        .await?;
    }
    if let Some(event_id) = &body.read_receipt {
        rooms::receipts::put(&state, &body.room_id, user, "m.read", event_id, None).await?;
    }
    if let Some(event_id) = &body.private_read_receipt {
        rooms::receipts::put(&state, &body.room_id, user, "m.read.private", event_id, None).await?;
    }
    Ok(set_read_marker::v3::Response::new())
}

/// PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}
async fn typing(
    state: web::Data<AppState>,
    request: Ruma<create_typing_event::v3::Request>,
) -> Result<create_typing_event::v3::Response> {
    let body = &request.body;
    let user = &request.sender.user_id;
    if *user != body.user_id {
        return Err(Error::forbidden("you can only say that you are typing"));
    }
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    rooms::require_joined(&state, &body.room_id, user).await?;
    let timeout = match body.state {
        Typing::Yes(ref typing) => Some(typing.timeout),
        _ => None,
    };
    let shared = &state;
    rooms::at_new_position(&state, |position| async move {
        shared.share(Update::Typing {
            room_id: body.room_id.clone(),
            user_id: user.clone(),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            position,
        });
        Ok(())
    })
    .await?;
    crate::remote::edu::send_typing(&state, &body.room_id, user, timeout.is_some()).await?;
    Ok(create_typing_event::v3::Response::new())
}

/// Refuses a presence the spec does not define: ruma parses any string (a custom state), and
/// other clients would be shown what they cannot understand.
pub(super) fn check_presence(presence: &PresenceState) -> Result<()> {
    match presence {
        PresenceState::Online | PresenceState::Offline | PresenceState::Unavailable => Ok(()),
        other => Err(Error::invalid_param(format!(
            "presence `{other}` is not one of online, offline, unavailable"
        ))),
    }
}

/// A client syncing says its user is `wanted` (`/sync`'s `set_presence`; the legacy initial syncs
/// say `online`): their presence is updated, keeping the status message, but only when it changes
/// and never to `offline` (a sync that wrote every time would wake every other sync in turn).
pub(super) async fn note_syncing(state: &AppState, user: &ruma::UserId, wanted: &str) -> Result<()> {
    if wanted == "offline" || state.ephemeral.presence(user).is_some_and(|p| p.state == wanted) {
        return Ok(());
    }
    let status_msg = state.ephemeral.presence(user).and_then(|p| p.status_msg);
    let sent = status_msg.clone();
    rooms::at_new_position(state, |position| async move {
        let update =
            Update::Presence { user_id: user.to_owned(), state: wanted.to_owned(), status_msg, position };
        state.share(update);
        Ok(())
    })
    .await?;
    crate::remote::edu::send_presence(state, user, wanted, sent).await
}

/// A user's presence as the legacy endpoints (`/initialSync`, `/events`) send it: an
/// `m.presence` event whose content names the user and always has `status_msg` (null if none);
/// `offline` for someone never seen.
pub(super) fn legacy_presence(state: &AppState, user: &ruma::UserId) -> serde_json::Value {
    let mut content = serde_json::json!({"user_id": user, "presence": "offline", "status_msg": null});
    if let Some(presence) = state.ephemeral.presence(user) {
        content["presence"] = presence.state.as_str().into();
        content["last_active_ago"] = (presence.last_active.elapsed().as_millis() as u64).into();
        content["currently_active"] = (presence.state == "online").into();
        if let Some(status) = &presence.status_msg {
            content["status_msg"] = status.as_str().into();
        }
    }
    serde_json::json!({"type": "m.presence", "content": content})
}

/// PUT /_matrix/client/v3/presence/{userId}/status
async fn set_presence(
    state: web::Data<AppState>,
    request: Ruma<set_presence::v3::Request>,
) -> Result<set_presence::v3::Response> {
    let body = &request.body;
    if request.sender.user_id != body.user_id {
        return Err(Error::forbidden("you can only set your own presence"));
    }
    check_presence(&body.presence)?;
    state.limiter.check_user(Action::RoomEvent, &request.sender).await?;
    if body.status_msg.as_ref().is_some_and(|m| m.len() > 1024) {
        return Err(Error::invalid_param("status_msg longer than 1024 bytes"));
    }
    let shared = &state;
    rooms::at_new_position(&state, |position| async move {
        shared.share(Update::Presence {
            user_id: body.user_id.clone(),
            state: body.presence.to_string(),
            status_msg: body.status_msg.clone(),
            position,
        });
        Ok(())
    })
    .await?;
    crate::remote::edu::send_presence(&state, &body.user_id, body.presence.as_str(), body.status_msg.clone())
        .await?;
    Ok(set_presence::v3::Response::new())
}

/// GET /_matrix/client/v3/presence/{userId}/status
async fn get_presence(
    state: web::Data<AppState>,
    request: Ruma<get_presence::v3::Request>,
) -> Result<get_presence::v3::Response> {
    let user = &request.body.user_id;
    // Another server's user is known here while they share a room with this server.
    let known = match user.server_name() == state.server_name {
        true => state.store.get_user(user).await?.is_some(),
        false => state.store.user_rooms(user).await?.iter().any(|(_, membership, _)| membership == "join"),
    };
    if !known {
        return Err(Error::not_found("no such user"));
    }
    let Some(presence) = state.ephemeral.presence(user) else {
        return Ok(get_presence::v3::Response::new(PresenceState::Offline));
    };
    let mut response = get_presence::v3::Response::new(PresenceState::from(presence.state.as_str()));
    response.status_msg = presence.status_msg;
    response.last_active_ago = Some(presence.last_active.elapsed().max(Duration::ZERO));
    response.currently_active = Some(presence.state == "online");
    Ok(response)
}
