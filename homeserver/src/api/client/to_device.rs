//! `sendToDevice`: messages from one device to others, mostly Olm-encrypted key shares.
//!
//! Each message waits in its device's queue ([`crate::queue`]) until the device syncs past it
//! (`/sync` `to_device`). Messages to users or devices that do not exist are
//! dropped, as the spec allows: the sender cannot tell them from devices that were deleted a
//! moment ago. Messages to users on other servers go to their servers ([`crate::remote::edu`]),
//! which queue them the same way.

use std::collections::{BTreeMap, BTreeSet};

use actix_web::{http::StatusCode, web};
use ruma::{
    DeviceId, OwnedServerName, UserId,
    api::{
        client::to_device::send_event_to_device,
        federation::transactions::edu::{DirectDeviceContent, Edu},
    },
    to_device::DeviceIdOrAllDevices,
};
use serde_json::Value;

use crate::{
    error::{Error, ErrorKind, Result},
    queue::News,
    rooms::{self, recent::device_key},
    ruma_wrapper::{Router, Ruma},
    state::AppState,
};

/// Largest content of one to-device message, in bytes (the spec's limit for an event).
const MAX_MESSAGE_BYTES: usize = 65_536;
/// Most devices one request may reach.
const MAX_RECIPIENTS: usize = 10_000;

pub(super) fn routes(router: &mut Router) {
    router.add(send_to_device);
}

/// PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}
///
/// Messages to other servers' users go to their servers in one `m.direct_to_device` EDU each,
/// whose message id is the sender's device and transaction id, so that a retry is taken there
/// once.
async fn send_to_device(
    state: web::Data<AppState>,
    request: Ruma<send_event_to_device::v3::Request>,
) -> Result<send_event_to_device::v3::Response> {
    let sender = &request.sender;
    let body = &request.body;
    let mut local = Messages::new();
    let mut remote: BTreeMap<OwnedServerName, Messages> = BTreeMap::new();
    for (user, devices) in &body.messages {
        // Local messages are checked as their envelopes are made.
        if user.server_name() != state.server_name {
            for content in devices.values() {
                check_content(content.json().get())?;
            }
        }
        match user.server_name() == state.server_name {
            true => local.insert(user.clone(), devices.clone()),
            false => {
                remote.entry(user.server_name().to_owned()).or_default().insert(user.clone(), devices.clone())
            }
        };
    }
    let event_type = body.event_type.to_string();
    let envelopes = envelopes(&state, &sender.user_id, &event_type, &local).await?;
    deliver(&state, &sender.user_id, &sender.device_id, body.txn_id.as_str(), &envelopes).await?;
    let message_id = format!("{}/{}", sender.device_id, body.txn_id);
    for (server, messages) in remote {
        let mut content = DirectDeviceContent::new(
            sender.user_id.clone(),
            body.event_type.clone(),
            message_id.as_str().into(),
        );
        content.messages = messages;
        crate::remote::edu::send_to_server(&state, server, &Edu::DirectToDevice(content)).await?;
    }
    Ok(send_event_to_device::v3::Response::new())
}

/// To-device messages by user and device (or all devices).
pub(crate) type Messages = ruma::api::federation::transactions::edu::DirectDeviceMessages;

/// Refuses a message content that is too large or not an object.
fn check_content(content: &str) -> Result<()> {
    if content.len() > MAX_MESSAGE_BYTES {
        return Err(Error::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooLarge,
            format!("a to-device message may be at most {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    // Already parsed as JSON by the request's type: kept as sent, not parsed again.
    if !content.trim_start().starts_with('{') {
        return Err(Error::bad_json("message content must be an object"));
    }
    Ok(())
}

/// The envelopes `(user, device, json)` of `messages` from `sender` to this server's users:
/// one per existing device named, or per device of the user for `*`.
pub(crate) async fn envelopes(
    state: &AppState,
    sender: &UserId,
    event_type: &str,
    messages: &Messages,
) -> Result<Vec<(String, String, String)>> {
    // The envelope's type and sender, as JSON strings.
    let head = (Value::from(event_type).to_string(), Value::from(sender.as_str()).to_string());
    let mut envelopes = Vec::new();
    for (user, devices) in messages {
        let upto = state.recent.upto();
        let known: BTreeSet<String> =
            state.recent.user_devices(&*state.store, user, upto).await?.iter().cloned().collect();
        for (target, content) in devices {
            let content = content.json().get();
            check_content(content)?;
            let envelope = format!(r#"{{"type":{},"sender":{},"content":{content}}}"#, head.0, head.1);
            let targets: Vec<&String> = match target {
                DeviceIdOrAllDevices::AllDevices => known.iter().collect(),
                DeviceIdOrAllDevices::DeviceId(device) => known.get(device.as_str()).into_iter().collect(),
            };
            for device in targets {
                envelopes.push((user.to_string(), device.clone(), envelope.clone()));
            }
            if envelopes.len() > MAX_RECIPIENTS {
                return Err(Error::invalid_param(format!("at most {MAX_RECIPIENTS} devices per request")));
            }
        }
    }
    Ok(envelopes)
}

/// Queues `envelopes`, once per sender device and transaction id, and wakes their devices'
/// syncs. Queued (durably) before the caller answers: an acknowledged message is never lost.
pub(crate) async fn deliver(
    state: &AppState,
    sender: &UserId,
    sender_device: &DeviceId,
    txn: &str,
    envelopes: &[(String, String, String)],
) -> Result<()> {
    if envelopes.is_empty() {
        return Ok(());
    }
    let queue = &state.queue;
    match queue.news() {
        News::InStream => {
            rooms::at_new_position(state, |position| async move {
                queue.push(sender, sender_device, txn, envelopes, Some(position)).await
            })
            .await?;
        }
        News::Bell => {
            if queue.push(sender, sender_device, txn, envelopes, None).await? {
                // The push told the other workers; the syncs waiting here hear it now.
                let devices: Vec<String> =
                    envelopes.iter().map(|(user, device, _)| device_key(user, device)).collect();
                state.bells.ring(&devices);
            }
        }
    }
    Ok(())
}
