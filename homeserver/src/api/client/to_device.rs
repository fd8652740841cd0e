//! `sendToDevice`: messages from one device to others, mostly Olm-encrypted key shares.
//!
//! Each message waits in its device's queue ([`crate::queue`]) until the device syncs past it
//! (`/sync` `to_device`). Messages to users or devices that do not exist are
//! dropped, as the spec allows: the sender cannot tell them from devices that were deleted a
//! moment ago. Messages to users on other servers wait for federation.

use std::collections::BTreeSet;

use actix_web::{http::StatusCode, web};
use ruma::{api::client::to_device::send_event_to_device, to_device::DeviceIdOrAllDevices};
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
async fn send_to_device(
    state: web::Data<AppState>,
    request: Ruma<send_event_to_device::v3::Request>,
) -> Result<send_event_to_device::v3::Response> {
    let sender = &request.sender;
    let body = &request.body;
    // The envelope's type and sender, as JSON strings.
    let head = (
        Value::from(body.event_type.to_string()).to_string(),
        Value::from(sender.user_id.as_str()).to_string(),
    );
    let mut envelopes = Vec::new();
    for (user, devices) in &body.messages {
        if user.server_name() != state.server_name {
            tracing::debug!(server = %user.server_name(), "to-device message for another server dropped");
            continue;
        }
        let upto = state.recent.upto();
        let known: BTreeSet<String> =
            state.recent.user_devices(&*state.store, user, upto).await?.iter().cloned().collect();
        for (target, content) in devices {
            let content = content.json().get();
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
    let queue = &state.queue;
    let txn = body.txn_id.as_str();
    // Queued (durably) before the answer: an acknowledged message is never lost.
    match queue.news() {
        News::InStream => {
            rooms::at_new_position(&state, |position| async move {
                queue.push(&sender.user_id, &sender.device_id, txn, &envelopes, Some(position)).await
            })
            .await?;
        }
        News::Bell => {
            if queue.push(&sender.user_id, &sender.device_id, txn, &envelopes, None).await? {
                // The push told the other workers; the syncs waiting here hear it now.
                let devices: Vec<String> =
                    envelopes.iter().map(|(user, device, _)| device_key(user, device)).collect();
                state.bells.ring(&devices);
            }
        }
    }
    Ok(send_event_to_device::v3::Response::new())
}
