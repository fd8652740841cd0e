//! Recent stream changes held in memory: the read side of `/sync`.
//!
//! One message wakes the long-poll of every member of its room. If each ran its own queries, the
//! database would answer the same questions once per member per message. Instead the first woken
//! sync reads what is new in the stream — events, receipts, whose account data changed — once
//! ([`Recent::catch_up`]), and every sync answers from memory. A range that is no longer (or not
//! yet) in memory, such as the token of a client that was away for long, falls back to the
//! database: every accessor works either way.
//!
//! Values derived from the database that only a stream change can alter (a user's rooms, a room's
//! joined members) are memoised with the position they were read at ([`Memo`]) and read again
//! once the window shows a change that concerns them.
//!
//! Everything here is loaded from the database, never written by the request that made the
//! change, so writes by other workers of a deployment are seen the same way as this process's.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use ruma::{OneTimeKeyAlgorithm, RoomId, UInt, UserId, push::Ruleset};

use crate::error::Result;

use crate::storage::{ReceiptRecord, SessionRecord, Storage, StoreResult, StoredEvent, StreamEvent};

/// Memoised entries kept per memo before it is cleared.
const MEMO_CAPACITY: usize = 100_000;

/// The longest a read waits for the writes in flight before it to finish.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Changes known only by who they concern and where they are in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// A user's account data (keyed by user).
    AccountData,
    /// A membership event about a user (keyed by user).
    Membership,
    /// A user's device list or keys (keyed by user).
    DeviceList,
    /// A device's one-time or fallback key counts (keyed by `user|device`).
    KeyCounts,
    /// A to-device message for a device (keyed by `user|device`).
    ToDevice,
    /// A revocation or refresh of some session of a user (keyed by user).
    Sessions,
    /// A change of keys only the user sees, their user-signing key (keyed by user).
    OwnKeys,
}

/// The key of a device in [`Mark::KeyCounts`] and [`Mark::ToDevice`].
pub fn device_key(user: &str, device: &str) -> String {
    format!("{user}|{device}")
}

#[derive(Debug, Clone)]
enum Change {
    Event(String),
    Receipt(String),
    Mark(Mark, String),
}

/// Everything that changed in `(start, upto]`.
#[derive(Debug, Default)]
struct Window {
    start: i64,
    upto: i64,
    /// Every change in position order, to trim the oldest.
    log: VecDeque<(i64, Change)>,
    events: HashMap<String, VecDeque<Arc<StreamEvent>>>,
    receipts: HashMap<String, VecDeque<ReceiptRecord>>,
    /// Positions of the other changes, by kind and whom they concern.
    marks: HashMap<(Mark, String), VecDeque<i64>>,
    /// The stream's highest position handed out, as last read: every write that had answered
    /// before that read is at or below it.
    allocated: i64,
    /// Users with a session revoked or refreshed beyond `upto`, as last read: their sessions are
    /// read again until the window covers the change.
    sessions_ahead: std::collections::HashSet<String>,
}

/// The part of a position-ordered deque that lies in `(after, upto]`.
fn range<T>(items: &VecDeque<T>, position: impl Fn(&T) -> i64, after: i64, upto: i64) -> (usize, usize) {
    (items.partition_point(|i| position(i) <= after), items.partition_point(|i| position(i) <= upto))
}

fn pop_front<K: std::hash::Hash + Eq, T>(map: &mut HashMap<K, VecDeque<T>>, key: &K) {
    if let Some(items) = map.get_mut(key) {
        items.pop_front();
        if items.is_empty() {
            map.remove(key);
        }
    }
}

impl Window {
    fn covers(&self, after: i64, upto: i64) -> bool {
        after >= self.start && upto <= self.upto
    }

    fn restart_at(&mut self, position: i64) {
        let (allocated, sessions_ahead) = (self.allocated, std::mem::take(&mut self.sessions_ahead));
        *self = Window { start: position, upto: position, allocated, sessions_ahead, ..Window::default() };
    }

    /// Takes in what a read of the stream's positions said beyond the loaded range.
    fn note(&mut self, positions: crate::storage::stream::Positions) {
        self.allocated = self.allocated.max(positions.allocated);
        self.sessions_ahead = positions.session_changes.into_iter().collect();
    }

    fn push(&mut self, position: i64, change: Change) {
        self.log.push_back((position, change));
    }

    fn trim(&mut self, capacity: usize) {
        while self.log.len() > capacity {
            let Some((position, change)) = self.log.pop_front() else { break };
            self.start = self.start.max(position);
            match change {
                Change::Event(room) => pop_front(&mut self.events, &room),
                Change::Receipt(room) => pop_front(&mut self.receipts, &room),
                Change::Mark(mark, key) => pop_front(&mut self.marks, &(mark, key)),
            }
        }
    }

    /// Whether a change of kind `mark` concerning `key` lies in `(after, upto]`.
    fn marked(&self, mark: Mark, key: &str, after: i64, upto: i64) -> bool {
        self.marks.get(&(mark, key.to_owned())).is_some_and(|positions| {
            let (from, to) = range(positions, |p| *p, after, upto);
            from < to
        })
    }
}

/// What changed in the stream lately, and values memoised against it.
pub struct Recent {
    /// Changes kept in memory; a gap wider than eight times this is not loaded at all (the
    /// window restarts after it).
    capacity: usize,
    /// When the latest refresh started; held while refreshing so that concurrent syncs share one.
    refreshed: tokio::sync::Mutex<Instant>,
    window: RwLock<Window>,
    /// Each user's rooms: (room, membership, position of the membership).
    user_rooms: Memo<Arc<Vec<(String, String, i64)>>>,
    /// Each room's joined member count.
    joined: Memo<usize>,
    /// What push-rule evaluation needs about a user: their rules and display name.
    push: Memo<Arc<(Ruleset, String)>>,
    /// What push-rule evaluation needs about a room: its member count and power levels.
    room_push: Memo<Arc<crate::push::RoomPush>>,
    /// Each device's key counts.
    key_counts: Memo<Arc<KeyCounts>>,
    /// Sessions that access tokens name, by session id (`None`: no such session).
    sessions: Memo<Option<Arc<SessionRecord>>>,
    /// Each user's device ids.
    devices: Memo<Arc<Vec<String>>>,
    /// The users each user ignores (`m.ignored_user_list`).
    ignored: Memo<Arc<std::collections::HashSet<String>>>,
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            refreshed: tokio::sync::Mutex::new(Instant::now()),
            window: RwLock::default(),
            user_rooms: Memo::default(),
            joined: Memo::default(),
            push: Memo::default(),
            room_push: Memo::default(),
            key_counts: Memo::default(),
            sessions: Memo::default(),
            devices: Memo::default(),
            ignored: Memo::default(),
        }
    }
}

impl Recent {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Window> {
        self.window.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream's safe position ([`crate::storage::stream`]), with everything up to it loaded.
    /// Callers that arrive while a refresh runs wait for the next one, which starts after they
    /// asked and so sees their writes; a burst of woken syncs costs one round of queries.
    pub async fn catch_up(&self, store: &dyn Storage) -> StoreResult<i64> {
        let asked = Instant::now();
        let mut refreshed = self.refreshed.lock().await;
        if *refreshed >= asked {
            return Ok(self.read().upto);
        }
        *refreshed = Instant::now();
        let from = self.read().upto;
        let mut positions = store.positions(from).await?;
        let upto = positions.upto;
        let write = || self.window.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if upto <= from {
            write().note(positions);
            return Ok(from);
        }
        if upto - from > 8 * self.capacity as i64 {
            let mut window = write();
            window.restart_at(upto);
            window.note(positions);
            return Ok(upto);
        }
        let events = store.stream_events(from, upto, self.capacity as i64 + 1).await?;
        if events.len() > self.capacity {
            let mut window = write();
            window.restart_at(upto);
            window.note(positions);
            return Ok(upto);
        }
        let receipts = store.stream_receipts(from, upto).await?;
        let account_data = store.stream_account_data(from, upto).await?;
        let marks = store.stream_marks(from, upto).await?;
        // A redaction rewrites an older event in place: take the new text of the ones held here.
        let mut redacted = Vec::new();
        for event in events.iter().filter(|e| e.event_type == "m.room.redaction") {
            if let Some(target) = redacts(&event.event.json)
                && let Some(fresh) = store.get_event(&target).await?
            {
                redacted.push(fresh);
            }
        }

        let mut changes: Vec<(i64, Change)> = Vec::with_capacity(events.len() + receipts.len());
        let mut window = write();
        window.note(std::mem::take(&mut positions));
        if window.upto != from {
            // Restarted meanwhile (cannot happen under the refresh lock, but stay consistent).
            return Ok(window.upto);
        }
        for fresh in redacted {
            if let Some(held) = window.events.get_mut(&fresh.room_id)
                && let Some(slot) = held.iter_mut().find(|e| e.event.event_id == fresh.event_id)
            {
                let mut updated = (**slot).clone();
                updated.event = fresh;
                *slot = Arc::new(updated);
            }
        }
        for event in events {
            let position = event.event.stream_ordering;
            let room = event.event.room_id.clone();
            if event.event_type == "m.room.member"
                && let Some(user) = &event.state_key
            {
                changes.push((position, Change::Mark(Mark::Membership, user.clone())));
            }
            window.events.entry(room.clone()).or_default().push_back(Arc::new(event));
            changes.push((position, Change::Event(room)));
        }
        for receipt in receipts {
            let (position, room) = (receipt.stream_ordering, receipt.room_id.clone());
            window.receipts.entry(room.clone()).or_default().push_back(receipt);
            changes.push((position, Change::Receipt(room)));
        }
        for (user, position) in account_data {
            changes.push((position, Change::Mark(Mark::AccountData, user)));
        }
        for (kind, user, device, position) in marks {
            let change = match kind.as_str() {
                "d" => Change::Mark(Mark::DeviceList, user),
                "k" => Change::Mark(Mark::KeyCounts, device_key(&user, &device)),
                "s" => Change::Mark(Mark::Sessions, user),
                "o" => Change::Mark(Mark::OwnKeys, user),
                _ => Change::Mark(Mark::ToDevice, device_key(&user, &device)),
            };
            changes.push((position, change));
        }
        changes.sort_by_key(|(position, _)| *position);
        for (position, change) in changes {
            if let Change::Mark(mark, key) = &change {
                window.marks.entry((*mark, key.clone())).or_default().push_back(position);
            }
            window.push(position, change);
        }
        window.upto = upto;
        window.trim(self.capacity);
        Ok(upto)
    }

    /// Whether a room had events or receipts in `(after, upto]`; `None` if not in memory.
    pub fn room_changed(&self, room_id: &str, after: i64, upto: i64) -> Option<bool> {
        let window = self.read();
        if !window.covers(after, upto) {
            return None;
        }
        let events = window.events.get(room_id).is_some_and(|events| {
            let (from, to) = range(events, |e| e.event.stream_ordering, after, upto);
            from < to
        });
        let receipts = window.receipts.get(room_id).is_some_and(|receipts| {
            let (from, to) = range(receipts, |r| r.stream_ordering, after, upto);
            from < to
        });
        Some(events || receipts)
    }

    /// Whether a change of kind `mark` concerning `key` lies in `(after, upto]`; `None` if that
    /// range is not in memory.
    pub fn marked(&self, mark: Mark, key: &str, after: i64, upto: i64) -> Option<bool> {
        let window = self.read();
        window.covers(after, upto).then(|| window.marked(mark, key, after, upto))
    }

    /// Every key with a change of kind `mark` in `(after, upto]`; `None` if not in memory.
    pub fn all_marked(&self, mark: Mark, after: i64, upto: i64) -> Option<Vec<String>> {
        let window = self.read();
        if !window.covers(after, upto) {
            return None;
        }
        Some(
            window
                .marks
                .iter()
                .filter(|((kind, _), positions)| {
                    let (from, to) = range(positions, |p| *p, after, upto);
                    *kind == mark && from < to
                })
                .map(|((_, key), _)| key.clone())
                .collect(),
        )
    }

    /// Whether the user's account data changed in `(after, upto]`; `None` if not in memory.
    pub fn account_data_changed(&self, user: &UserId, after: i64, upto: i64) -> Option<bool> {
        self.marked(Mark::AccountData, user.as_str(), after, upto)
    }

    /// A room's events in `(after, upto]`: the oldest `limit`, or with `newest` the newest
    /// `limit`, either way in stream order.
    pub async fn room_events(
        &self,
        store: &dyn Storage,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        limit: i64,
        newest: bool,
    ) -> StoreResult<Vec<StoredEvent>> {
        {
            let window = self.read();
            if window.covers(after, upto) {
                let Some(events) = window.events.get(room_id.as_str()) else { return Ok(Vec::new()) };
                let (from, to) = range(events, |e| e.event.stream_ordering, after, upto);
                let limit = usize::try_from(limit).unwrap_or(0);
                let (from, to) = if newest {
                    (from.max(to.saturating_sub(limit)), to)
                } else {
                    (from, to.min(from.saturating_add(limit)))
                };
                return Ok(events.range(from..to).map(|e| e.event.clone()).collect());
            }
        }
        store.room_events(room_id, after, upto, limit, newest).await
    }

    /// Receipts in a room that changed in `(after, upto]`, each receipt once, as it is now.
    pub async fn receipts(
        &self,
        store: &dyn Storage,
        room_id: &RoomId,
        after: i64,
        upto: i64,
    ) -> StoreResult<Vec<ReceiptRecord>> {
        {
            let window = self.read();
            if window.covers(after, upto) {
                let Some(receipts) = window.receipts.get(room_id.as_str()) else { return Ok(Vec::new()) };
                let (from, to) = range(receipts, |r| r.stream_ordering, after, upto);
                // A receipt that moved twice is held twice; only its latest place counts.
                let mut latest: HashMap<(&str, &str, Option<&str>), &ReceiptRecord> = HashMap::new();
                for receipt in receipts.range(from..to) {
                    let key = (
                        receipt.user_id.as_str(),
                        receipt.receipt_type.as_str(),
                        receipt.thread_id.as_deref(),
                    );
                    latest.insert(key, receipt);
                }
                let mut list: Vec<ReceiptRecord> = latest.into_values().cloned().collect();
                list.sort_by_key(|r| r.stream_ordering);
                return Ok(list);
            }
        }
        store.receipt_changes(room_id.as_str(), after, upto).await
    }

    /// Whether the user's own receipts in a room moved in `(after, upto]`; `None` if not in
    /// memory.
    pub fn own_receipt_moved(&self, room_id: &RoomId, user: &UserId, after: i64, upto: i64) -> Option<bool> {
        let window = self.read();
        if !window.covers(after, upto) {
            return None;
        }
        Some(window.receipts.get(room_id.as_str()).is_some_and(|receipts| {
            let (from, to) = range(receipts, |r| r.stream_ordering, after, upto);
            receipts.range(from..to).any(|r| r.user_id == user.as_str())
        }))
    }

    /// Whether the user's membership of any room changed in `(after, upto]`; `None` if not in
    /// memory.
    pub fn membership_changed(&self, user: &UserId, after: i64, upto: i64) -> Option<bool> {
        self.marked(Mark::Membership, user.as_str(), after, upto)
    }

    /// Whether any state event of a room lies in `(after, upto]`; `None` if not in memory.
    fn state_changed(&self, room_id: &RoomId, after: i64, upto: i64) -> Option<bool> {
        let window = self.read();
        if !window.covers(after, upto) {
            return None;
        }
        Some(window.events.get(room_id.as_str()).is_some_and(|events| {
            let (from, to) = range(events, |e| e.event.stream_ordering, after, upto);
            events.range(from..to).any(|e| e.state_key.is_some())
        }))
    }

    fn members_changed(&self, room_id: &RoomId, after: i64, upto: i64) -> Option<bool> {
        let window = self.read();
        if !window.covers(after, upto) {
            return None;
        }
        Some(window.events.get(room_id.as_str()).is_some_and(|events| {
            let (from, to) = range(events, |e| e.event.stream_ordering, after, upto);
            events.range(from..to).any(|e| e.event_type == "m.room.member")
        }))
    }

    /// The user's rooms, as of `upto` or later.
    pub async fn user_rooms(
        &self,
        store: &dyn Storage,
        user: &UserId,
        upto: i64,
    ) -> StoreResult<Arc<Vec<(String, String, i64)>>> {
        let valid = |at| self.membership_changed(user, at, upto) == Some(false);
        self.user_rooms
            .get_or_load(user.as_str(), upto, valid, || async { Ok(Arc::new(store.user_rooms(user).await?)) })
            .await
    }

    /// A session of `user`, as of `upto` or later: read once, then kept until the window shows
    /// a revocation or refresh of one of the user's sessions. `None` if there is no such session.
    pub async fn session(
        &self,
        store: &dyn Storage,
        session_id: &str,
        user: &str,
        upto: i64,
    ) -> StoreResult<Option<Arc<SessionRecord>>> {
        // The window as it is now, which may be past `upto`: a revocation is either in it or
        // among the changes read beyond it, by the same refresh.
        let (ahead, upto) = {
            let window = self.read();
            (window.sessions_ahead.contains(user), upto.max(window.upto))
        };
        let load = || async { Ok(store.get_session(session_id).await?.map(Arc::new)) };
        if ahead {
            let session = load().await?;
            self.sessions.put(session_id, upto, session.clone());
            return Ok(session);
        }
        let valid = |at| self.marked(Mark::Sessions, user, at, upto) == Some(false);
        self.sessions.get_or_load(session_id, upto, valid, load).await
    }

    /// The position everything in memory is complete up to: every change committed before the
    /// latest refresh began, up to the stream's safe position then. Writes still in flight may
    /// hold that below a write that has already answered; [`Recent::catch_up_past_writes`] waits
    /// for them.
    pub fn upto(&self) -> i64 {
        self.read().upto
    }

    /// Like [`Recent::catch_up`], and then further, until the window covers every write that
    /// had answered when this was called, on any worker (a client reads its own writes): such a
    /// write holds a position at or below the counter read by the refresh, and the safe position
    /// passes it once the writes in flight then have finished. `waker` says when to look again
    /// (announced writes), besides a short poll. Gives up after [`READ_WAIT`] (a writer gone
    /// silent is passed by readers within its lease, shorter than that) with what it has.
    pub async fn catch_up_past_writes(
        &self,
        store: &dyn Storage,
        waker: &mut tokio::sync::watch::Receiver<i64>,
    ) -> StoreResult<i64> {
        let mut upto = self.catch_up(store).await?;
        let target = self.read().allocated;
        let started = Instant::now();
        while upto < target {
            if started.elapsed() > READ_WAIT {
                tracing::warn!(upto, target, "reads went on before every write in flight had finished");
                break;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(5), waker.changed()).await;
            upto = self.catch_up(store).await?;
        }
        Ok(upto)
    }

    /// A user's device ids, as of `upto` or later (devices coming and going mark the user's
    /// device list).
    pub async fn user_devices(
        &self,
        store: &dyn Storage,
        user: &UserId,
        upto: i64,
    ) -> StoreResult<Arc<Vec<String>>> {
        let valid = |at| self.marked(Mark::DeviceList, user.as_str(), at, upto) == Some(false);
        let load = || async {
            Ok(Arc::new(
                store.list_devices(user).await?.into_iter().map(|d| d.device_id.to_string()).collect(),
            ))
        };
        self.devices.get_or_load(user.as_str(), upto, valid, load).await
    }

    /// How many members a room has joined, as of `upto` or later.
    pub async fn joined_members(
        &self,
        store: &dyn Storage,
        room_id: &RoomId,
        upto: i64,
    ) -> StoreResult<usize> {
        let valid = |at| self.members_changed(room_id, at, upto) == Some(false);
        let load = || async { Ok(store.members(room_id).await?.iter().filter(|(_, m)| m == "join").count()) };
        self.joined.get_or_load(room_id.as_str(), upto, valid, load).await
    }
}

/// A device's one-time key counts and unused fallback key algorithms.
pub type KeyCounts = (BTreeMap<OneTimeKeyAlgorithm, UInt>, Vec<OneTimeKeyAlgorithm>);

impl Recent {
    /// The user's push rules and display name, as of `upto` or later; `load` reads them.
    pub async fn push_context<F, Fut>(
        &self,
        user: &UserId,
        upto: i64,
        load: F,
    ) -> Result<Arc<(Ruleset, String)>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Ruleset, String)>>,
    {
        // Rules are account data; the display name changes with member events.
        let valid = |at| {
            self.account_data_changed(user, at, upto) == Some(false)
                && self.membership_changed(user, at, upto) == Some(false)
        };
        self.push.get_or_load(user.as_str(), upto, valid, || async { Ok(Arc::new(load().await?)) }).await
    }

    /// A room's member count and power levels for push rules, as of `upto` or later; `load`
    /// reads them. Only state events change them.
    pub async fn room_push<F, Fut>(
        &self,
        room_id: &RoomId,
        upto: i64,
        load: F,
    ) -> Result<Arc<crate::push::RoomPush>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<crate::push::RoomPush>>,
    {
        let valid = |at| self.state_changed(room_id, at, upto) == Some(false);
        self.room_push
            .get_or_load(room_id.as_str(), upto, valid, || async { Ok(Arc::new(load().await?)) })
            .await
    }

    /// A device's key counts (`key` from [`device_key`]), as of `upto` or later; `load` reads
    /// them. Uploads and claims mark [`Mark::KeyCounts`], wherever they happen.
    pub async fn key_counts<F, Fut>(&self, key: &str, upto: i64, load: F) -> Result<Arc<KeyCounts>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<KeyCounts>>,
    {
        let valid = |at| self.marked(Mark::KeyCounts, key, at, upto) == Some(false);
        self.key_counts.get_or_load(key, upto, valid, || async { Ok(Arc::new(load().await?)) }).await
    }
}

impl Recent {
    /// The users `user` ignores, as of `upto` or later: read once, then kept until the user's
    /// account data changes.
    pub async fn ignored_users(
        &self,
        store: &dyn Storage,
        user: &UserId,
        upto: i64,
    ) -> StoreResult<Arc<std::collections::HashSet<String>>> {
        let valid = |at| self.account_data_changed(user, at, upto) == Some(false);
        let load = || async {
            let content = store.account_data(user, None, crate::rooms::visibility::IGNORED_USER_LIST).await?;
            Ok(Arc::new(content.as_deref().map(crate::rooms::visibility::ignored_users).unwrap_or_default()))
        };
        self.ignored.get_or_load(user.as_str(), upto, valid, load).await
    }
}

/// Values keyed by a user or room, each with the stream position it was read at.
pub struct Memo<V> {
    entries: Mutex<HashMap<String, (i64, V)>>,
}

impl<V> Default for Memo<V> {
    fn default() -> Self {
        Self { entries: Mutex::new(HashMap::new()) }
    }
}

impl<V: Clone> Memo<V> {
    /// The value for `key` if still valid (see [`Memo::get`]), or what `load` reads, remembered
    /// as read at `upto`.
    pub async fn get_or_load<E, F, Fut>(
        &self,
        key: &str,
        upto: i64,
        still_valid: impl FnOnce(i64) -> bool,
        load: F,
    ) -> std::result::Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<V, E>>,
    {
        if let Some(value) = self.get(key, upto, still_valid) {
            return Ok(value);
        }
        let value = load().await?;
        self.put(key, upto, value.clone());
        Ok(value)
    }

    /// The value for `key` if it was read at or after `upto`, or `still_valid(at)` says nothing
    /// changed it since it was read at `at`.
    fn get(&self, key: &str, upto: i64, still_valid: impl FnOnce(i64) -> bool) -> Option<V> {
        let (at, value) =
            self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()?;
        (at >= upto || still_valid(at)).then_some(value)
    }

    /// Remembers `value`, read at `at` (a position taken before the read, so that any change
    /// after it is noticed).
    fn put(&self, key: &str, at: i64, value: V) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= MEMO_CAPACITY {
            entries.clear();
        }
        entries.insert(key.to_owned(), (at, value));
    }
}

/// The event a redaction removes (top level before room v11, in the content from v11).
fn redacts(json: &str) -> Option<String> {
    let event: serde_json::Value = serde_json::from_str(json).ok()?;
    event.get("redacts").or_else(|| event["content"].get("redacts"))?.as_str().map(str::to_owned)
}
