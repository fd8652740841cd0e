//! Typing notifications and presence: state that lives in memory and is never stored.
//!
//! Each change takes a stream position, so `/sync` sends it exactly when it is news. With
//! several workers this state moves to Redis (pub/sub) with the queue work; for now it is per
//! process.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

/// Longest a client may say it is typing for without saying it again.
pub const MAX_TYPING: Duration = Duration::from_secs(30);
/// Rooms or users kept before a sweep drops the stale ones, so the maps shrink again.
const SWEEP_AT: usize = 10_000;
/// Presence not refreshed for this long is forgotten in a sweep (as if the user were offline).
const PRESENCE_KEPT: Duration = Duration::from_secs(24 * 3600);
/// Unread counts are a cache of what the database says: past this many entries it starts over.
const UNREAD_CAPACITY: usize = 100_000;

#[derive(Debug)]
struct RoomTyping {
    users: BTreeMap<OwnedUserId, Instant>,
    position: i64,
    changed: Instant,
}

impl Default for RoomTyping {
    fn default() -> Self {
        Self { users: BTreeMap::new(), position: 0, changed: Instant::now() }
    }
}

/// Once a map has grown past [`SWEEP_AT`], keeps only the entries `keep` wants.
fn sweep<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, keep: impl FnMut(&K, &mut V) -> bool) {
    if map.len() >= SWEEP_AT {
        map.retain(keep);
    }
}

/// Drops rooms where no one has typed for longer than any client shows typing.
fn sweep_typing(typing: &mut HashMap<OwnedRoomId, RoomTyping>, now: Instant) {
    sweep(typing, |_, room| {
        room.users.values().any(|until| *until > now) || now.duration_since(room.changed) < MAX_TYPING * 2
    });
}

/// Drops users whose presence has not been refreshed for a day.
fn sweep_presence(presence: &mut HashMap<OwnedUserId, Presence>, now: Instant) {
    sweep(presence, |_, p| now.duration_since(p.last_active) < PRESENCE_KEPT);
}

#[derive(Debug, Clone)]
pub struct Presence {
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active: Instant,
    pub position: i64,
}

/// Notification counts already worked out for a user in a room: derived from the database, kept
/// so that each sync evaluates push rules only for events it has not seen.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnreadCounts {
    /// The read receipt's position the counts start from.
    pub read: i64,
    /// The stream position `read` was last checked at.
    pub read_checked: i64,
    /// Events up to this position are counted.
    pub counted_upto: i64,
    pub notify: u64,
    pub highlight: u64,
}

#[derive(Debug, Default)]
pub struct Ephemeral {
    typing: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
    presence: Mutex<HashMap<OwnedUserId, Presence>>,
    unread: Mutex<HashMap<(OwnedUserId, OwnedRoomId), UnreadCounts>>,
    /// The member events each device was sent of each room, with lazy-loaded members: what it
    /// need not be sent again (Synapse keeps the same per process).
    lazy_members: Mutex<HashMap<LazyKey, HashMap<String, String>>>,
}

/// A device's view of a room: (user, device, room).
type LazyKey = (String, String, String);

/// Devices' rooms whose lazy-loaded members are remembered; past it, the memory starts over
/// (the cost: some member events are sent again).
const LAZY_CAPACITY: usize = 100_000;

impl Ephemeral {
    /// Records that `user` started (with a timeout) or stopped typing, at `position`.
    pub fn set_typing(&self, room_id: &RoomId, user: &UserId, timeout: Option<Duration>, position: i64) {
        let mut typing = self.typing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = typing.entry(room_id.to_owned()).or_default();
        match timeout {
            Some(timeout) => {
                room.users.insert(user.to_owned(), Instant::now() + timeout.min(MAX_TYPING));
            }
            None => {
                room.users.remove(user);
            }
        }
        room.position = position;
        room.changed = Instant::now();
        let now = Instant::now();
        room.users.retain(|_, until| *until > now);
        sweep_typing(&mut typing, now);
    }

    /// Who is typing in a room, if that changed in `(after, upto]`.
    pub fn typing_since(&self, room_id: &RoomId, after: i64, upto: i64) -> Option<Vec<OwnedUserId>> {
        let typing = self.typing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let room = typing.get(room_id)?;
        if room.position <= after || room.position > upto {
            return None;
        }
        let now = Instant::now();
        Some(room.users.iter().filter(|(_, until)| **until > now).map(|(user, _)| user.clone()).collect())
    }

    pub fn set_presence(&self, user: &UserId, state: &str, status_msg: Option<String>, position: i64) {
        let mut presence = self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        presence.insert(
            user.to_owned(),
            Presence { state: state.to_owned(), status_msg, last_active: Instant::now(), position },
        );
        sweep_presence(&mut presence, Instant::now());
    }

    pub fn presence(&self, user: &UserId) -> Option<Presence> {
        self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(user).cloned()
    }

    /// Users among `users` whose presence changed in `(after, upto]`.
    pub fn presence_changes<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
        after: i64,
        upto: i64,
    ) -> Vec<(OwnedUserId, Presence)> {
        let presence = self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        users
            .into_iter()
            .filter_map(|user| {
                let p = presence.get(user)?;
                (p.position > after && p.position <= upto).then(|| (user.to_owned(), p.clone()))
            })
            .collect()
    }

    /// Whether anyone's presence changed in `(after, upto]` (a cheap first check).
    pub fn any_presence_since(&self, after: i64, upto: i64) -> bool {
        let presence = self.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        presence.values().any(|p| p.position > after && p.position <= upto)
    }

    pub fn unread(&self, user: &UserId, room_id: &RoomId) -> Option<UnreadCounts> {
        let unread = self.unread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        unread.get(&(user.to_owned(), room_id.to_owned())).copied()
    }

    /// Member events (member → event id) the device was sent of the room; `reset` forgets what
    /// it was sent before (a response that sends the room anew).
    pub fn lazy_members_sent(&self, key: (&str, &str, &str), reset: bool) -> HashMap<String, String> {
        let mut sent = self.lazy_members.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
        if reset {
            sent.remove(&key);
            return HashMap::new();
        }
        sent.get(&key).cloned().unwrap_or_default()
    }

    /// Remembers member events as sent to the device.
    pub fn remember_lazy_members(
        &self,
        key: (&str, &str, &str),
        members: impl IntoIterator<Item = (String, String)>,
    ) {
        let mut sent = self.lazy_members.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if sent.len() >= LAZY_CAPACITY {
            sent.clear();
        }
        sent.entry((key.0.to_owned(), key.1.to_owned(), key.2.to_owned())).or_default().extend(members);
    }

    pub fn set_unread(&self, user: &UserId, room_id: &RoomId, counts: UnreadCounts) {
        let mut unread = self.unread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if unread.len() >= UNREAD_CAPACITY {
            unread.clear();
        }
        unread.insert((user.to_owned(), room_id.to_owned()), counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(n: usize) -> OwnedUserId {
        OwnedUserId::try_from(format!("@u{n}:example.org")).unwrap_or_else(|_| unreachable!())
    }

    fn room(n: usize) -> OwnedRoomId {
        OwnedRoomId::try_from(format!("!r{n}:example.org")).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn in_memory_maps_shrink_once_their_entries_are_stale() {
        let ephemeral = Ephemeral::default();
        for n in 0..SWEEP_AT {
            ephemeral.set_typing(&room(n), &user(n), Some(Duration::from_secs(5)), n as i64);
            ephemeral.set_presence(&user(n), "online", None, n as i64);
        }
        let later = Instant::now() + PRESENCE_KEPT + MAX_TYPING * 3;
        let mut typing = ephemeral.typing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sweep_typing(&mut typing, later);
        assert!(typing.is_empty(), "rooms where typing ended long ago are forgotten");
        drop(typing);
        let mut presence = ephemeral.presence.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sweep_presence(&mut presence, later);
        assert!(presence.is_empty(), "presence a day old is forgotten");
        drop(presence);
        for n in 0..UNREAD_CAPACITY + 10 {
            ephemeral.set_unread(&user(n % 1000), &room(n), UnreadCounts::default());
        }
        let unread = ephemeral.unread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        assert!(unread <= UNREAD_CAPACITY, "the unread cache stays bounded ({unread})");
    }
}
