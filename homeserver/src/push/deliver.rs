//! Delivering notifications to push gateways, through the pushers users set.
//!
//! Every worker runs a deliverer. It claims pushers that have something to send and are not
//! backing off ([`crate::storage::PushStore::claim_pushers`], a lease per pusher, so one worker
//! at a time delivers a given pusher's notifications), and sends them in order, one request per
//! notification. A pusher's position moves past a notification only once its gateway took it (or
//! it was given up on), and is stored: a restarted server resumes there, so in normal operation
//! each notification is delivered once (a crash between the gateway's answer and the write of
//! the position sends that one again; the spec's `event_id` lets gateways drop the repeat).
//!
//! Failures that may pass (the gateway unreachable, 5xx, 429) are retried with exponential
//! backoff (`push.initial_backoff_ms`, doubling, at most `push.max_backoff_secs`), stored with
//! the pusher so that a restart keeps it; after `push.max_attempts` the notification is given up
//! on. A gateway that refuses a request (another 4xx) will refuse it again: it is given up on at
//! once. A pushkey the gateway lists as `rejected` removes its pusher, as the spec asks.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use ruma::{
    OwnedEventId, OwnedRoomAliasId, OwnedRoomId, OwnedUserId, SecondsSinceUnixEpoch, UInt,
    api::{
        client::push::{Pusher, PusherKind},
        push_gateway::send_event_notification::v1::{
            Device, Notification, NotificationCounts, NotificationPriority, PusherData,
        },
    },
    events::TimelineEventType,
    push::{Action, HttpPusherData, PushFormat, Tweak},
};
use tokio::sync::{Notify, Semaphore};

use super::gateway::Outcome;
use crate::{
    error::{Error, Result},
    rooms::client_event::ClientEvent,
    state::AppState,
    storage::{NotificationRecord, PusherRecord},
};

/// Pushers one worker delivers to at once.
const CONCURRENCY: usize = 32;
/// How often the deliverer looks for work when nothing wakes it (another worker's evaluator
/// found notifications, a backoff ended elsewhere).
const POLL: Duration = Duration::from_secs(1);

/// How long a claim on a pusher lasts: renewed before every request, so it must outlast one.
fn lease_ms(state: &AppState) -> i64 {
    let timeout = i64::try_from(state.config.push.request_timeout_secs).unwrap_or(60).saturating_mul(1000);
    30_000 + 2 * timeout
}

/// The wait before attempt `failures + 1`.
pub fn backoff(state: &AppState, failures: i64) -> Duration {
    let config = &state.config.push;
    let doublings = u32::try_from(failures.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let initial = Duration::from_millis(config.initial_backoff_ms);
    initial.saturating_mul(2u32.saturating_pow(doublings)).min(Duration::from_secs(config.max_backoff_secs))
}

/// One worker's deliverer.
pub struct Deliverer {
    owner: String,
    slots: Arc<Semaphore>,
}

impl Deliverer {
    pub fn new() -> Self {
        Self {
            owner: format!("deliverer-{}", crate::auth::tokens::random_token(9)),
            slots: Arc::new(Semaphore::new(CONCURRENCY)),
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Runs until the server's state is gone.
    pub async fn run(self, state: Weak<AppState>, wake: Arc<Notify>) {
        loop {
            let Some(strong) = state.upgrade() else { return };
            let free = self.slots.available_permits();
            if free > 0 {
                match strong.store.claim_pushers(&self.owner, lease_ms(&strong), free as i64).await {
                    Ok(claimed) => {
                        for pusher in claimed {
                            let Ok(slot) = self.slots.clone().acquire_owned().await else { return };
                            let (state, owner) = (state.clone(), self.owner.clone());
                            tokio::spawn(async move {
                                deliver(state, &owner, pusher).await;
                                drop(slot);
                            });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "could not claim pushers"),
                }
            }
            drop(strong);
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

impl Default for Deliverer {
    fn default() -> Self {
        Self::new()
    }
}

/// Delivers what a claimed pusher has waiting, then lets it go.
async fn deliver(state: Weak<AppState>, owner: &str, pusher: PusherRecord) {
    let Some(strong) = state.upgrade() else { return };
    let key = pusher.key.clone();
    if let Err(error) = deliver_claimed(&strong, owner, pusher).await {
        tracing::warn!(%error, user = %key.user_id, app_id = %key.app_id, "push delivery stopped; trying again later");
        let _ = strong.store.release_pusher(&key, owner).await;
    }
}

async fn deliver_claimed(state: &AppState, owner: &str, mut record: PusherRecord) -> Result<()> {
    let key = record.key.clone();
    let (pusher, http) = match serde_json::from_str::<Pusher>(&record.data) {
        Ok(pusher @ Pusher { kind: PusherKind::Http(_), .. }) => {
            let PusherKind::Http(http) = pusher.kind.clone() else { return Ok(()) };
            (pusher, http)
        }
        _ => {
            // Only HTTP pushers are claimed, and their data was checked when they were set.
            tracing::warn!(user = %key.user_id, app_id = %key.app_id, "a pusher's stored data is unreadable; removed");
            state.store.delete_pusher(&key).await?;
            return Ok(());
        }
    };
    let user = OwnedUserId::try_from(key.user_id.as_str()).map_err(Error::internal)?;
    let max_attempts = i64::from(state.config.push.max_attempts);
    loop {
        if !state.store.renew_pusher(&key, owner, lease_ms(state)).await? {
            return Ok(());
        }
        let next = state.store.next_notification(&key.user_id, record.position).await?;
        // Every push carries the user's counts as they are now, so a pending badge update is
        // folded into it.
        let badge = state.store.take_badge(&key, owner).await?;
        let (outcome, position) = match &next {
            Some(notification) => {
                let body = notification_for(state, &user, &pusher, &http, &record, notification).await?;
                (state.push.gateway.notify(&http.url, body).await, Some(notification.stream_ordering))
            }
            None if badge => {
                let body = badge_for(state, &user, &pusher, &http, &record).await?;
                (state.push.gateway.badge(&http.url, body).await, None)
            }
            None => {
                state.store.release_pusher(&key, owner).await?;
                return Ok(());
            }
        };
        match outcome {
            Outcome::Delivered { rejected } => {
                if rejected.contains(&key.pushkey) {
                    tracing::info!(user = %key.user_id, app_id = %key.app_id, "the push gateway rejected the pushkey; pusher removed");
                    state.store.delete_pusher(&key).await?;
                    return Ok(());
                }
                if let Some(position) = position {
                    if !state.store.pusher_advanced(&key, owner, position).await? {
                        return Ok(());
                    }
                    record.position = position;
                }
                record.failures = 0;
            }
            Outcome::Retry(why) if record.failures + 1 < max_attempts => {
                if badge {
                    state.store.restore_badge(&key).await?;
                }
                record.failures += 1;
                let delay = backoff(state, record.failures);
                tracing::debug!(user = %key.user_id, %why, failures = record.failures, ?delay, "push failed; retrying later");
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                state.store.pusher_backoff(&key, owner, record.failures, delay_ms).await?;
                // This worker looks again when the wait is over; another may get there first.
                let wake = state.push.waker();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    wake.notify_one();
                });
                return Ok(());
            }
            Outcome::Retry(why) | Outcome::GiveUp(why) => {
                tracing::warn!(user = %key.user_id, app_id = %key.app_id, %why, "push notification given up on");
                if let Some(position) = position {
                    if !state.store.pusher_advanced(&key, owner, position).await? {
                        return Ok(());
                    }
                    record.position = position;
                }
                record.failures = 0;
            }
        }
    }
}

/// The device part of a request: the pusher's ids, its data without `url`, and the tweaks.
fn device(pusher: &Pusher, http: &HttpPusherData, record: &PusherRecord, tweaks: Vec<Tweak>) -> Device {
    let mut device = Device::new(pusher.ids.app_id.clone(), pusher.ids.pushkey.clone());
    let seconds = u64::try_from(record.created_ts / 1000).unwrap_or_default();
    device.pushkey_ts = Some(SecondsSinceUnixEpoch(UInt::try_from(seconds).unwrap_or_default()));
    device.data = PusherData::from(http.clone());
    device.tweaks = tweaks;
    device
}

/// The user's badge counts.
async fn counts(state: &AppState, user: &OwnedUserId) -> Result<NotificationCounts> {
    let (unread, calls) = state.store.badge_counts(user).await?;
    Ok(NotificationCounts::new(
        UInt::try_from(unread).unwrap_or(UInt::MAX),
        UInt::try_from(calls).unwrap_or(UInt::MAX),
    ))
}

/// A string field of a current state event's content.
async fn state_field(
    state: &AppState,
    room_id: &OwnedRoomId,
    event_type: &str,
    state_key: &str,
    field: &str,
) -> Result<Option<String>> {
    let Some(event) = state.store.current_state_event(room_id, event_type, state_key).await? else {
        return Ok(None);
    };
    Ok(ClientEvent::parse(&event)?.content_str(field))
}

/// The request for one notification.
async fn notification_for(
    state: &AppState,
    user: &OwnedUserId,
    pusher: &Pusher,
    http: &HttpPusherData,
    record: &PusherRecord,
    stored: &NotificationRecord,
) -> Result<Notification> {
    let actions: Vec<Action> = serde_json::from_str(&stored.actions).unwrap_or_default();
    let tweaks: Vec<Tweak> = actions
        .iter()
        .filter_map(|action| match action {
            Action::SetTweak(tweak) => Some(tweak.clone()),
            _ => None,
        })
        .collect();
    let event = ClientEvent::parse(&stored.event)?;
    // As Synapse: high priority for what makes a sound or highlights, and for encrypted events,
    // which may do either once the device decrypts them.
    let loud = stored.highlight
        || stored.event_type == "m.room.encrypted"
        || tweaks.iter().any(|tweak| matches!(tweak, Tweak::Sound(_)));
    let room_id = OwnedRoomId::try_from(stored.room_id.as_str()).map_err(Error::internal)?;
    let mut notification = Notification::new(vec![device(pusher, http, record, tweaks)]);
    notification.event_id = OwnedEventId::try_from(stored.event.event_id.as_str()).ok();
    notification.room_id = Some(room_id.clone());
    notification.counts = counts(state, user).await?;
    notification.prio = if loud { NotificationPriority::High } else { NotificationPriority::Low };
    if matches!(http.format, Some(PushFormat::EventIdOnly)) {
        return Ok(notification);
    }
    let sender = event.sender();
    notification.event_type = Some(TimelineEventType::from(stored.event_type.as_str()));
    notification.sender = OwnedUserId::try_from(sender.as_str()).ok();
    // The name in the room, or (member events made here do not all carry one) the profile's.
    notification.sender_display_name =
        match state_field(state, &room_id, "m.room.member", &sender, "displayname").await? {
            Some(name) => Some(name),
            None => match &notification.sender {
                Some(sender) if sender.server_name() == state.server_name => {
                    state.store.profile(sender).await?.0
                }
                _ => None,
            },
        };
    let alias = state_field(state, &room_id, "m.room.canonical_alias", "", "alias").await?;
    // The room's name as people read it: its name, or else its alias (as Synapse names it).
    notification.room_name = match state_field(state, &room_id, "m.room.name", "", "name").await? {
        Some(name) if !name.is_empty() => Some(name),
        _ => alias.clone(),
    };
    notification.room_alias = alias.and_then(|alias| OwnedRoomAliasId::try_from(alias).ok());
    notification.user_is_target =
        stored.event_type == "m.room.member" && event.state_key().as_deref() == Some(user.as_str());
    notification.content = Some(event.content().to_owned());
    Ok(notification)
}

/// A request with the user's counts only: a read receipt moved them.
async fn badge_for(
    state: &AppState,
    user: &OwnedUserId,
    pusher: &Pusher,
    http: &HttpPusherData,
    record: &PusherRecord,
) -> Result<Notification> {
    let mut notification = Notification::new(vec![device(pusher, http, record, Vec::new())]);
    notification.counts = counts(state, user).await?;
    Ok(notification)
}
