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

#[derive(Debug, Default)]
struct RoomTyping {
    users: BTreeMap<OwnedUserId, Instant>,
    position: i64,
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
}

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

    pub fn set_unread(&self, user: &UserId, room_id: &RoomId, counts: UnreadCounts) {
        let mut unread = self.unread.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        unread.insert((user.to_owned(), room_id.to_owned()), counts);
    }
}
