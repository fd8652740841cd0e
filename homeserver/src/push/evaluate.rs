//! Which events notify whom: each local member's push rules, applied to every new room event.
//!
//! The evaluator runs beside the request path, so that a send never waits for the rules of every
//! member of a big room. One worker of a deployment at a time holds its lease
//! ([`crate::storage::PushStore::claim_push_progress`]); it reads the stream after its durable
//! position up to the safe position (no event can still commit below it) and writes the
//! notifications it finds together with its new position in one transaction. So every event
//! that was acknowledged to its sender is evaluated exactly once, even across crashes and
//! restarts; the lease makes a worker that lost it commit nothing.
//!
//! A user may be notified of an event when they are a local member joined to the room at that
//! event (which also means history visibility lets them read it, see
//! [`crate::rooms::visibility`]), did not send it, and the first of their rules that matches says
//! `notify`; an invite also reaches the local user it invites. The room's member count and power
//! levels are taken as of the evaluation (a few milliseconds after the event).

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use ruma::{
    OwnedRoomId, OwnedUserId, RoomId, UInt, UserId,
    events::{
        AnySyncTimelineEvent,
        room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource},
    },
    push::{Action, FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
    serde::Raw,
};

use crate::{
    error::{Error, Result},
    rooms::{client_event::ClientEvent, visibility::ReadRules},
    state::AppState,
    storage::{NewNotification, StreamEvent, now_ms, parse_stored},
};

/// Events evaluated per transaction.
const BATCH: i64 = 200;
/// How long the evaluator's lease lasts; renewed with every batch and every wake.
pub const LEASE_MS: i64 = 20_000;
/// How often an idle evaluator checks the stream and renews (or tries to take) the lease.
const TICK: Duration = Duration::from_secs(2);
/// A held lease is renewed once it is this old.
const RENEW_AFTER: Duration = Duration::from_millis(LEASE_MS as u64 / 4);
/// How often old notifications are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

/// The server's default rules: the spec's (ruma's), and, as Synapse still has them, the legacy
/// mention rules the spec deprecated in 1.7 and ruma no longer ships: a message naming the
/// user's display name or localpart, or saying `@room` (from someone with the power to), still
/// highlights when it carries no `m.mentions`. Clients that send `m.mentions` are unaffected
/// (ruma turns these rules off for such events).
#[allow(deprecated)]
pub fn server_default(user: &UserId) -> Ruleset {
    use ruma::{
        power_levels::NotificationPowerLevelsKey,
        push::{
            ConditionalPushRuleInit, EventMatchConditionData, HighlightTweakValue, PatternedPushRuleInit,
            PredefinedContentRuleId, PredefinedOverrideRuleId, PushCondition,
            SenderNotificationPermissionConditionData, SoundTweakValue, Tweak,
        },
    };
    let mut rules = Ruleset::server_default(user);
    let sound = || Action::SetTweak(Tweak::Sound(SoundTweakValue::Default));
    let highlight = || Action::SetTweak(Tweak::Highlight(HighlightTweakValue::Yes));
    let display_name = ConditionalPushRuleInit {
        actions: vec![Action::Notify, sound(), highlight()],
        default: true,
        enabled: true,
        rule_id: PredefinedOverrideRuleId::ContainsDisplayName.to_string(),
        conditions: vec![PushCondition::ContainsDisplayName],
    };
    let room = ConditionalPushRuleInit {
        actions: vec![Action::Notify, highlight()],
        default: true,
        enabled: true,
        rule_id: PredefinedOverrideRuleId::RoomNotif.to_string(),
        conditions: vec![
            PushCondition::EventMatch(EventMatchConditionData::new("content.body".into(), "@room".into())),
            PushCondition::SenderNotificationPermission(SenderNotificationPermissionConditionData::new(
                NotificationPowerLevelsKey::Room,
            )),
        ],
    };
    // Synapse's order: each right after the rule that replaced it.
    let mut overrides: Vec<_> = rules.override_.into_iter().collect();
    for (after, rule) in [
        (PredefinedOverrideRuleId::IsUserMention, display_name),
        (PredefinedOverrideRuleId::IsRoomMention, room),
    ] {
        let at =
            overrides.iter().position(|r| r.rule_id == after.as_str()).map_or(overrides.len(), |i| i + 1);
        overrides.insert(at, rule.into());
    }
    rules.override_ = overrides.into_iter().collect();
    rules.content.insert(
        PatternedPushRuleInit {
            actions: vec![Action::Notify, sound(), highlight()],
            default: true,
            enabled: true,
            rule_id: PredefinedContentRuleId::ContainsUserName.to_string(),
            pattern: user.localpart().to_owned(),
        }
        .into(),
    );
    rules
}

/// A user's rules: what they stored, or the server's defaults. Stored rules are brought up to
/// date with the server's defaults (new default rules appear, with the user's `enabled` and
/// `actions` kept for the ones they changed).
///
/// Room and sender rules whose ids are no room or user id (Synapse takes any id there, such as
/// an alias; see [`stored_rules`]) are left out: they can match no event, and ruma's ruleset,
/// which clients also parse from `/sync`, cannot hold them.
pub async fn ruleset(state: &AppState, user: &UserId) -> Result<Ruleset> {
    let defaults = server_default(user);
    match stored_rules(state, user).await? {
        Some(mut global) => {
            for (kind, valid) in [
                ("room", (|id: &str| ruma::RoomId::parse(id).is_ok()) as fn(&str) -> bool),
                ("sender", |id: &str| UserId::parse(id).is_ok()),
            ] {
                if let Some(list) = global.get_mut(kind).and_then(|l| l.as_array_mut()) {
                    list.retain(|rule| rule["rule_id"].as_str().is_some_and(valid));
                }
            }
            let mut rules: Ruleset = serde_json::from_value(global).map_err(Error::internal)?;
            rules.update_with_server_default(defaults);
            Ok(rules)
        }
        None => Ok(defaults),
    }
}

/// The `global` object of a user's stored `m.push_rules`, as stored (room and sender rules of
/// any id included), if they stored any.
pub async fn stored_rules(state: &AppState, user: &UserId) -> Result<Option<serde_json::Value>> {
    match state.store.account_data(user, None, "m.push_rules").await? {
        Some(stored) => {
            let mut value: serde_json::Value = parse_stored(&stored).map_err(Error::internal)?;
            Ok(Some(value["global"].take()))
        }
        None => Ok(None),
    }
}

/// What push rules need to know about a room, beside the event.
#[derive(Debug, Clone)]
pub struct RoomPush {
    pub member_count: UInt,
    pub power_levels: Option<PushConditionPowerLevelsCtx>,
}

/// Reads [`RoomPush`] for a room, as it is now.
pub async fn load_room_push(state: &AppState, room_id: &RoomId) -> Result<RoomPush> {
    let joined = state.store.members(room_id).await?.iter().filter(|(_, m)| m == "join").count();
    let member_count = UInt::try_from(joined as u64).unwrap_or_default();
    let Some(version) = state.store.room_version(room_id).await? else {
        return Ok(RoomPush { member_count, power_levels: None });
    };
    let rules = ruma::RoomVersionId::try_from(version.as_str()).ok().and_then(|v| v.rules());
    let mut creators = Vec::new();
    if let Some(create) = state.store.current_state_event(room_id, "m.room.create", "").await? {
        let create = ClientEvent::parse(&create)?;
        creators.extend(OwnedUserId::try_from(create.sender()).ok());
        if let Ok(content) = create.content_value()
            && let Some(more) = content["additional_creators"].as_array()
        {
            creators
                .extend(more.iter().filter_map(|u| u.as_str()).filter_map(|u| OwnedUserId::try_from(u).ok()));
        }
    }
    let source = match state.store.current_state_event(room_id, "m.room.power_levels", "").await? {
        Some(event) => {
            let event = ClientEvent::parse(&event)?;
            match serde_json::from_str::<RoomPowerLevelsEventContent>(event.content().get()) {
                Ok(content) => RoomPowerLevelsSource::Original(content),
                // Content ruma cannot read: the rules that need power levels do not match.
                Err(_) => return Ok(RoomPush { member_count, power_levels: None }),
            }
        }
        None => RoomPowerLevelsSource::None,
    };
    let power_levels = rules.map(|rules| RoomPowerLevels::new(source, &rules.authorization, creators).into());
    Ok(RoomPush { member_count, power_levels })
}

/// An event as push rules read it; `None` for events ruma's rules cannot read (nested deeper
/// than serde_json's recursion limit, which only older versions stored: ruma would panic).
pub fn flatten(event: &ClientEvent<'_>, json: &str) -> Result<Option<FlattenedJson>> {
    if !crate::json::parses_with_serde(json.as_bytes()) {
        return Ok(None);
    }
    let raw: Raw<AnySyncTimelineEvent> = event.to_raw()?;
    Ok(Some(FlattenedJson::from_raw(&raw)))
}

/// The actions of the user's first matching rule, if they notify.
pub async fn notify_actions(
    rules: &Ruleset,
    event: &FlattenedJson,
    user: &UserId,
    display_name: &str,
    room_id: &RoomId,
    room: &RoomPush,
) -> Option<Vec<Action>> {
    let mut context = PushConditionRoomCtx::new(
        room_id.to_owned(),
        room.member_count,
        user.to_owned(),
        display_name.to_owned(),
    );
    if let Some(power_levels) = &room.power_levels {
        context = context.with_power_levels(power_levels.clone());
    }
    for rule in rules.iter() {
        if rule.applies(event, &context).await {
            let actions = rule.actions();
            return actions.iter().any(Action::should_notify).then(|| actions.to_vec());
        }
    }
    None
}

/// A user's rules and the name their mentions are matched against, as of `upto` or later.
pub async fn user_push(state: &AppState, user: &UserId, upto: i64) -> Result<Arc<(Ruleset, String)>> {
    state
        .recent
        .push_context(user, upto, || async {
            let rules = ruleset(state, user).await?;
            let name = state.store.profile(user).await?.0.unwrap_or_else(|| user.localpart().to_owned());
            Ok((rules, name))
        })
        .await
}

/// A room's members as one batch of the evaluator sees them.
struct Members {
    /// Local users with a membership: (user, membership, position of that membership).
    local: Vec<(OwnedUserId, String, i64)>,
}

/// The evaluator of one worker.
pub struct Evaluator {
    /// Names this worker's lease.
    owner: String,
    /// The lease, while this worker holds it.
    held: Option<Held>,
    last_prune: Option<Instant>,
}

/// What the worker holding the lease knows.
struct Held {
    /// Where evaluation goes on from. Ahead of the stored position when the stream moved without
    /// events (receipts, typing...): nothing to write, so nothing is written until the next
    /// batch or renewal, and whoever reads the stored position reads an empty range again.
    position: i64,
    renewed: Instant,
}

impl Evaluator {
    pub fn new() -> Self {
        Self {
            owner: format!("evaluator-{}", crate::auth::tokens::random_token(9)),
            held: None,
            last_prune: None,
        }
    }

    /// Runs until the server's state is gone: the worker holding the lease wakes on every
    /// announced stream position, the others try to take it every [`TICK`].
    pub async fn run(mut self, state: Weak<AppState>) {
        let Some(mut news) = state.upgrade().map(|state| state.subscribe()) else { return };
        loop {
            let Some(strong) = state.upgrade() else { return };
            let more = match self.round(&strong).await {
                Ok(more) => more,
                Err(error) => {
                    tracing::warn!(%error, "evaluating push rules failed; trying again shortly");
                    false
                }
            };
            drop(strong);
            if more {
                continue;
            }
            if self.held.is_some() {
                tokio::select! {
                    changed = news.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(TICK) => {}
                }
            } else {
                tokio::time::sleep(TICK).await;
                news.borrow_and_update();
            }
        }
    }

    /// Gives the lease up, so another worker takes over at once (a graceful stop).
    pub async fn release(state: &AppState, owner: &str) {
        let _ = state.store.release_push_progress(owner).await;
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Evaluates one batch, if this worker holds (or can take) the lease; whether more waits.
    async fn round(&mut self, state: &AppState) -> Result<bool> {
        let from = match &self.held {
            Some(held) if held.renewed.elapsed() < RENEW_AFTER => held.position,
            _ => match state.store.claim_push_progress(&self.owner, LEASE_MS).await? {
                Some(stored) => {
                    // Positions this worker passed without writing had no events, and none can
                    // appear there later (they are below the safe position): going on from the
                    // higher one skips nothing.
                    let position = stored.max(self.held.as_ref().map_or(stored, |held| held.position));
                    self.held = Some(Held { position, renewed: Instant::now() });
                    position
                }
                None => {
                    self.held = None;
                    return Ok(false);
                }
            },
        };
        if self.last_prune.is_none_or(|at| at.elapsed() > PRUNE_EVERY) {
            self.last_prune = Some(Instant::now());
            let retention = i64::try_from(state.config.push.retention_days).unwrap_or(i64::MAX / 2);
            let pruned =
                state.store.prune_notifications(now_ms() - retention.saturating_mul(86_400_000)).await?;
            if pruned > 0 {
                tracing::info!(pruned, "old notifications pruned");
            }
        }
        let upto = state.recent.catch_up(&*state.store).await?;
        if upto <= from {
            return Ok(false);
        }
        let events = state.store.stream_events(from, upto, BATCH).await?;
        let through = match events.last() {
            Some(last) if events.len() as i64 == BATCH => last.event.stream_ordering,
            _ => upto,
        };
        if events.is_empty() {
            if let Some(held) = &mut self.held {
                held.position = through;
            }
            return Ok(false);
        }
        let mut found = Vec::new();
        let mut members: HashMap<String, Members> = HashMap::new();
        for event in &events {
            found.extend(evaluate(state, &mut members, event, through).await?);
        }
        if !state.store.record_notifications(&self.owner, LEASE_MS, through, &found).await? {
            // Another worker took the lease over: it evaluates from the position it read.
            self.held = None;
            return Ok(false);
        }
        self.held = Some(Held { position: through, renewed: Instant::now() });
        if !found.is_empty() {
            state.push.wake();
        }
        Ok(through < upto)
    }
}

impl Default for Evaluator {
    fn default() -> Self {
        Self::new()
    }
}

/// The notifications one event brings.
async fn evaluate(
    state: &AppState,
    members: &mut HashMap<String, Members>,
    stream_event: &StreamEvent,
    upto: i64,
) -> Result<Vec<NewNotification>> {
    let stored = &stream_event.event;
    let position = stored.stream_ordering;
    let Ok(event) = ClientEvent::parse(stored) else { return Ok(Vec::new()) };
    let Some(flat) = flatten(&event, &stored.json)? else { return Ok(Vec::new()) };
    let Ok(room_id) = OwnedRoomId::try_from(stored.room_id.as_str()) else { return Ok(Vec::new()) };
    let sender = event.sender();
    if !members.contains_key(stored.room_id.as_str()) {
        let local = state
            .store
            .members_with_positions(&room_id)
            .await?
            .into_iter()
            .filter_map(|(user, membership, at)| {
                let user = OwnedUserId::try_from(user).ok()?;
                (user.server_name() == state.server_name).then_some((user, membership, at))
            })
            .collect();
        members.insert(stored.room_id.clone(), Members { local });
    }
    let mut targets = Vec::new();
    let invitee = (stream_event.event_type == "m.room.member"
        && event.content_str("membership").as_deref() == Some("invite"))
    .then(|| stream_event.state_key.clone())
    .flatten();
    if let Some(room_members) = members.get(stored.room_id.as_str()) {
        for (user, membership, at) in &room_members.local {
            if user.as_str() == sender {
                continue;
            }
            if invitee.as_deref() == Some(user.as_str()) {
                targets.push(user.clone());
            } else if *at < position {
                // Their membership has not changed since before the event.
                if membership == "join" {
                    targets.push(user.clone());
                }
            } else if ReadRules::load(state, &room_id, user).await?.notified_at(position) {
                // It changed since: judged by their membership at the event.
                targets.push(user.clone());
            }
        }
    }
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let room = state.recent.room_push(&room_id, upto, || load_room_push(state, &room_id)).await?;
    let mut found = Vec::new();
    for user in targets {
        // Nothing notifies of someone the user ignores (their state events are not hidden
        // either way, but a message or an invite from them is).
        let ignored = state.recent.ignored_users(&*state.store, &user, upto).await?;
        if ignored.contains(&sender) && crate::rooms::visibility::Ignored::new(ignored).hides(stored) {
            continue;
        }
        let context = user_push(state, &user, upto).await?;
        let (rules, name) = &*context;
        if let Some(actions) = notify_actions(rules, &flat, &user, name, &room_id, &room).await {
            found.push(NewNotification {
                user_id: user.to_string(),
                stream_ordering: position,
                room_id: room_id.to_string(),
                event_id: stored.event_id.clone(),
                event_type: stream_event.event_type.clone(),
                actions: serde_json::to_string(&actions).map_err(Error::internal)?,
                highlight: actions.iter().any(Action::is_highlight),
                ts: now_ms(),
            });
        }
    }
    Ok(found)
}
