//! History visibility: which of a room's events a user may read.
//!
//! The spec's rules, decided for each event by the state in force at it:
//! - the room's `m.room.history_visibility` at the event is `world_readable`: anyone may;
//! - the user's membership at the event is `join`: they may;
//! - `shared`: members may read what was said before they joined, up to when they left;
//! - `invited`: also what was said while they were invited;
//! - `joined`: only what was said while they were joined.
//!
//! "At the event" means just after it, so a user sees their own join; an event that changes the
//! visibility is judged by the more permissive of the old and the new setting (as Synapse does),
//! and a user always sees the events that changed their own membership (an invite, a kick). A
//! room without a visibility event is `shared`, the spec's default.
//!
//! Both inputs change rarely, so [`ReadRules`] loads a user's membership events and the room's
//! visibility events once per request and judges any number of events from memory.
//!
//! Two more rules shape what a reader is served of the events they may read (Synapse's
//! `filter_events_for_client` applies the same):
//! - [`Ignored`]: the messages of users the reader ignores (`m.ignored_user_list`) are left out;
//!   their state events stay, so the room's state still makes sense.
//! - [`erase_for_reader`]: the events of an account deactivated with `erase: true` are served
//!   redacted to readers who were not joined when they were sent (those who were saw them then).

use std::{collections::HashSet, sync::Arc};

use ruma::{RoomId, RoomVersionId, UserId, events::ignored_user_list::IgnoredUserListEventContent};

use super::client_event::ClientEvent;
use crate::{
    error::{Error, Result},
    state::AppState,
    storage::StoredEvent,
};

/// The settings of `m.room.history_visibility`, least permissive first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Setting {
    Joined,
    Invited,
    Shared,
    WorldReadable,
}

impl Setting {
    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("world_readable") => Self::WorldReadable,
            Some("invited") => Self::Invited,
            Some("joined") => Self::Joined,
            // `shared` and anything unknown: the spec says to treat unknown values as `shared`.
            _ => Self::Shared,
        }
    }
}

/// What one user may read of one room.
#[derive(Debug, Clone)]
pub struct ReadRules {
    /// The user's membership events: (position, membership), oldest first.
    memberships: Vec<(i64, String)>,
    /// The room's visibility events: (position, setting), oldest first.
    settings: Vec<(i64, Setting)>,
}

impl ReadRules {
    /// Loads the rules for `user` in `room_id` (which must exist).
    pub async fn load(state: &AppState, room_id: &RoomId, user: &UserId) -> Result<Self> {
        let parse = |events: Vec<StoredEvent>, field: &str| -> Result<Vec<(i64, Option<String>)>> {
            events
                .iter()
                .map(|event| Ok((event.stream_ordering, ClientEvent::parse(event)?.content_str(field))))
                .collect()
        };
        let memberships =
            parse(state.store.state_history(room_id, "m.room.member", user.as_str()).await?, "membership")?
                .into_iter()
                .map(|(position, membership)| (position, membership.unwrap_or_default()))
                .collect::<Vec<_>>();
        let settings = parse(
            state.store.state_history(room_id, "m.room.history_visibility", "").await?,
            "history_visibility",
        )?
        .into_iter()
        .map(|(position, setting)| (position, Setting::parse(setting.as_deref())))
        .collect();
        Ok(Self { memberships, settings })
    }

    /// The rules for someone with no membership of the room: its world-readable history.
    async fn outsider(state: &AppState, room_id: &RoomId) -> Result<Self> {
        let outsider = ruma::user_id!("@nobody:invalid");
        Self::load(state, room_id, outsider).await
    }

    /// The rules for a user reading a room's history through the API: M_NOT_FOUND for a room
    /// that does not exist, M_FORBIDDEN for one the user was never in and that is not world
    /// readable.
    pub async fn for_reader(state: &AppState, room_id: &RoomId, user: &UserId) -> Result<Self> {
        super::room_version(state, room_id).await?;
        let rules = Self::load(state, room_id, user).await?;
        if rules.memberships.is_empty() && rules.setting(i64::MAX, true) != Setting::WorldReadable {
            return Err(Error::forbidden("you are not a member of this room"));
        }
        Ok(rules)
    }

    /// The room state a reader may see: the current state for a member or for anyone in a
    /// world-readable room, the state when they left for one who left (or was kicked or
    /// banned), M_FORBIDDEN for others.
    pub async fn readable_state(&self, state: &AppState, room_id: &RoomId) -> Result<Vec<StoredEvent>> {
        match self.memberships.last() {
            Some((_, membership)) if membership == "join" => Ok(state.store.current_state(room_id).await?),
            _ if self.setting(i64::MAX, true) == Setting::WorldReadable => {
                Ok(state.store.current_state(room_id).await?)
            }
            Some((left, membership))
                if matches!(membership.as_str(), "leave" | "ban") && self.was_joined() =>
            {
                Ok(state.store.state_at(room_id, *left).await?)
            }
            _ => Err(Error::forbidden("you are not a member of this room")),
        }
    }

    /// Whether the user was ever joined.
    fn was_joined(&self) -> bool {
        self.memberships.iter().any(|(_, m)| m == "join")
    }

    /// The setting in force just after (`inclusive`) or just before the event at `position`.
    ///
    /// Below zero are the events of a room joined through another server: its state at the join
    /// (outliers) and its history fetched since (backfill), whose positions do not follow the
    /// order of the state at each event. There, before any setting known here, the earliest
    /// known setting holds (the one the join brought): the past is read as strictly as the
    /// room is now, unless the history fetched showed otherwise.
    fn setting(&self, position: i64, inclusive: bool) -> Setting {
        let n = self.settings.partition_point(|(p, _)| *p < position || (inclusive && *p == position));
        match n.checked_sub(1).and_then(|i| self.settings.get(i)) {
            Some((_, setting)) => *setting,
            None if position < 0 => self.settings.first().map_or(Setting::Shared, |(_, s)| *s),
            None => Setting::Shared,
        }
    }

    /// The user's membership just after the event at `position`.
    fn membership(&self, position: i64) -> Option<&str> {
        let n = self.memberships.partition_point(|(p, _)| *p <= position);
        n.checked_sub(1).and_then(|i| self.memberships.get(i)).map(|(_, m)| m.as_str())
    }

    /// Whether the user may read the event at `position`.
    pub fn allows(&self, position: i64) -> bool {
        let mut setting = self.setting(position, true);
        if self.settings.binary_search_by_key(&position, |(p, _)| *p).is_ok() {
            setting = setting.max(self.setting(position, false));
        }
        if setting == Setting::WorldReadable {
            return true;
        }
        let membership = self.membership(position);
        if membership == Some("join") || self.memberships.binary_search_by_key(&position, |(p, _)| *p).is_ok()
        {
            return true;
        }
        match setting {
            // The spec: "the user joined the room at any point after the event was sent".
            Setting::Shared => self.memberships.iter().any(|(p, m)| *p > position && m == "join"),
            Setting::Invited => membership == Some("invite"),
            _ => false,
        }
    }

    /// Whether the user was joined just after the event at `position`.
    pub fn joined_at(&self, position: i64) -> bool {
        self.membership(position) == Some("join")
    }

    /// Whether the user was joined to the room just after the event at `position` and may read
    /// it: who push rules are evaluated for.
    pub fn notified_at(&self, position: i64) -> bool {
        self.joined_at(position) && self.allows(position)
    }

    pub fn may_see(&self, event: &StoredEvent) -> bool {
        self.allows(event.stream_ordering)
    }

    /// A position below which the user may read nothing: pagination need not look further back.
    /// (Visibility changes only at membership and visibility events, so the first of those at
    /// which something is readable bounds every readable event.)
    pub fn floor(&self) -> i64 {
        // From the lowest position there is (history fetched from other servers lies below 0).
        let mut points: Vec<i64> = [i64::MIN + 1, 0]
            .into_iter()
            .chain(self.memberships.iter().map(|(p, _)| *p))
            .chain(self.settings.iter().map(|(p, _)| *p))
            .collect();
        points.sort_unstable();
        points.into_iter().find(|p| self.allows(*p)).map_or(i64::MAX, |p| p - 1)
    }
}

/// What another server may read of a room: what any of its users may, and a world-readable
/// room's history whoever asks (Synapse judges servers the same way). Events it may not read
/// are served to it redacted, so its copy of the room's graph has no holes.
#[derive(Debug, Clone)]
pub struct ServerRules(Vec<ReadRules>);

impl ServerRules {
    pub async fn load(state: &AppState, room_id: &RoomId, server: &ruma::ServerName) -> Result<Self> {
        let mut rules = vec![ReadRules::outsider(state, room_id).await?];
        for (member, _) in state.store.members(room_id).await? {
            if let Ok(member) = <&UserId>::try_from(member.as_str())
                && member.server_name() == server
            {
                rules.push(ReadRules::load(state, room_id, member).await?);
            }
        }
        Ok(Self(rules))
    }

    pub fn may_see(&self, event: &StoredEvent) -> bool {
        self.0.iter().any(|rules| rules.may_see(event))
    }

    /// The PDU of `event` as the server may have it: whole, or redacted.
    pub fn serve(
        &self,
        version: &RoomVersionId,
        event: &StoredEvent,
    ) -> Result<Box<serde_json::value::RawValue>> {
        let json = match self.may_see(event) {
            true => event.json.clone(),
            false => super::pruned_json(version, &event.json)?,
        };
        serde_json::value::RawValue::from_string(json).map_err(Error::internal)
    }
}

/// The account data type that lists the users someone ignores.
pub const IGNORED_USER_LIST: &str = "m.ignored_user_list";

/// The users a reader ignores, whose messages they are not shown.
#[derive(Debug, Clone, Default)]
pub struct Ignored(Arc<HashSet<String>>);

impl Ignored {
    pub fn new(users: Arc<HashSet<String>>) -> Self {
        Self(users)
    }

    /// Reads `user`'s list from the database.
    pub async fn load(state: &AppState, user: &UserId) -> Result<Self> {
        let content = state.store.account_data(user, None, IGNORED_USER_LIST).await?;
        Ok(Self(Arc::new(content.as_deref().map(ignored_users).unwrap_or_default())))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.0.contains(user)
    }

    /// Whether `event` is left out for the reader: a message (not a state event) from someone
    /// they ignore.
    pub fn hides(&self, event: &StoredEvent) -> bool {
        !self.0.is_empty()
            && ClientEvent::parse(event)
                .is_ok_and(|e| e.state_key().is_none() && self.0.contains(&e.sender()))
    }
}

/// The users stored `m.ignored_user_list` content names (none if it cannot be read: what is
/// stored was checked by [`check_ignored_list`] when written).
pub fn ignored_users(content: &str) -> HashSet<String> {
    serde_json::from_str::<IgnoredUserListEventContent>(content)
        .map(|list| list.ignored_users.into_keys().map(|user| user.to_string()).collect())
        .unwrap_or_default()
}

/// Checks `m.ignored_user_list` content `owner` wants to store: `ignored_users` must map user
/// ids to objects (`M_BAD_JSON`), and may not name `owner` (`M_INVALID_PARAM`, as Synapse).
pub fn check_ignored_list(owner: &UserId, content: &str) -> Result<()> {
    let list: IgnoredUserListEventContent = serde_json::from_str(content).map_err(|e| {
        Error::bad_json(format!("{IGNORED_USER_LIST} must be {{\"ignored_users\": {{user id: {{}}}}}}: {e}"))
    })?;
    if list.ignored_users.contains_key(owner) {
        return Err(Error::invalid_param("you cannot ignore yourself"));
    }
    Ok(())
}

/// `events` (of one room) as the reader of `rules` is served them: those sent by an erased
/// account (deactivated with `erase: true`) while the reader was not joined are redacted, as the
/// redaction algorithm of the room's version strips them. Events the reader was joined for need
/// no look-up, so a member reading what they saw live costs nothing.
pub async fn erase_for_reader(
    state: &AppState,
    rules: &ReadRules,
    mut events: Vec<StoredEvent>,
) -> Result<Vec<StoredEvent>> {
    let mut candidates = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if event.redacted_by.is_none() && !rules.joined_at(event.stream_ordering) {
            candidates.push((index, ClientEvent::parse(event)?.sender()));
        }
    }
    if candidates.is_empty() {
        return Ok(events);
    }
    let mut senders: Vec<&str> = candidates.iter().map(|(_, sender)| sender.as_str()).collect();
    senders.sort_unstable();
    senders.dedup();
    let erased = state.store.erased_among(&senders).await?;
    if erased.is_empty() {
        return Ok(events);
    }
    let mut version: Option<RoomVersionId> = None;
    for (index, sender) in &candidates {
        if !erased.contains(sender) {
            continue;
        }
        let Some(event) = events.get_mut(*index) else { continue };
        let version = match &version {
            Some(version) => version.clone(),
            None => {
                let room_id = ruma::OwnedRoomId::try_from(event.room_id.as_str()).map_err(Error::internal)?;
                let read = super::room_version(state, &room_id).await?;
                version.insert(read).clone()
            }
        };
        let object: ruma::CanonicalJsonObject =
            crate::storage::parse_stored(&event.json).map_err(Error::internal)?;
        let pruned = federation::pdu::redacted(object, &version, None).map_err(Error::internal)?;
        event.json = ruma::CanonicalJsonValue::Object(pruned).to_string();
    }
    Ok(events)
}
