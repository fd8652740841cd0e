//! Rooms, their events and state.
//!
//! Appending an event happens in one transaction that first locks the room (an UPDATE of its
//! row: a row lock on Postgres, the write lock on SQLite), reads the room's head (extremities,
//! depth, current state), lets the caller build, sign and authorise the event against that head,
//! and writes everything the event changes. Its stream position is held from before the
//! transaction to its end, so readers never skip it (see `stream.rs`); a refused event leaves a
//! gap, which readers do not mind.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use ruma::{OwnedEventId, RoomId, UserId};
use sqlx::{Row, any::AnyRow};

use super::{
    Backend, IN_CHUNK, ImmutableCache, SqlStore, StoreError, StoreResult, now_ms, placeholders,
    state::{self, Snapshot},
    stream::StreamWriter,
};

/// `(event_type, state_key)` → event id.
pub type StateMap = BTreeMap<(String, String), String>;

/// A room directory: the server's own, or an application service's for one network.
#[derive(Debug, Clone, Copy)]
pub enum Directory<'a> {
    /// Rooms listed with `PUT /directory/list/room/{roomId}`.
    Matrix,
    /// Rooms an application service listed for a network of its own.
    Network { appservice_id: &'a str, network_id: &'a str },
    /// Both: every room any directory lists.
    All,
}

/// A room as a writer sees it, under its lock.
#[derive(Debug, Clone)]
pub struct RoomHead {
    pub room_version: String,
    pub extremities: Vec<OwnedEventId>,
    pub depth: i64,
    /// The current state the new event's auth rules need (the keys the caller asked for), with
    /// each event's canonical JSON.
    pub state: BTreeMap<(String, String), (String, String)>,
    /// The canonical JSON of each extremity, when the caller asked for it (room versions 1 and 2
    /// name the events they follow with their hashes).
    pub extremity_json: BTreeMap<OwnedEventId, String>,
}

/// A built and authorised event, ready to store.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: OwnedEventId,
    pub json: String,
    pub sender: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub depth: i64,
    pub origin_server_ts: i64,
    /// For `m.room.member` events: the membership it sets for `state_key`.
    pub membership: Option<String>,
    /// For redactions: the event redacted, and its redacted JSON to store in its place.
    pub redaction: Option<(String, String)>,
    /// The client transaction it answers: (user, device, txn id).
    pub txn: Option<(String, String, String)>,
    /// For state events: the event it replaces at its type and state key, if any.
    pub replaces_state: Option<String>,
    /// When its content is to be emptied (a self-destructing message, MSC2228), in ms.
    pub expires_ts: Option<i64>,
    /// The events it follows: the room's extremities among them stop being extremities. A local
    /// event follows them all; another server's may follow fewer (it had not seen the newest).
    pub prev_events: Vec<OwnedEventId>,
    /// For an event of a fork (it does not follow all of the room's extremities): the state after
    /// it and the room's state resolved across the fork, instead of the current state with the
    /// event applied.
    pub resolved: Option<Arc<Resolved>>,
}

impl NewEvent {
    /// The event as stored at `position` in `room_id`.
    fn stored(position: i64, room_id: &RoomId, event: NewEvent) -> StoredEvent {
        StoredEvent {
            stream_ordering: position,
            event_id: event.event_id.to_string(),
            room_id: room_id.to_string(),
            json: event.json,
            redacted_by: None,
            replaces_state: event.replaces_state,
            txn: event.txn.map(|(_, device, txn)| (device, txn)),
            outlier: false,
        }
    }
}

/// The states a forked event brings (see [`NewEvent::resolved`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The state after the event: the state it was checked against, with it applied.
    pub after_event: StateMap,
    /// The room's state resolved across its extremities once the event is one of them.
    pub current: StateMap,
    /// The membership each member event of `current` sets, by event id.
    pub memberships: BTreeMap<String, String>,
}

/// An event to keep in no timeline (see [`RoomStore::store_outliers`]).
#[derive(Debug, Clone)]
pub struct Outlier {
    pub event: NewEvent,
    /// The state after it, when known.
    pub state_after: Option<StateMap>,
    /// Why the auth rules reject it, if they do.
    pub rejected: Option<String>,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub stream_ordering: i64,
    pub event_id: String,
    pub room_id: String,
    pub json: String,
    pub redacted_by: Option<String>,
    /// The state event this one replaced (same type and state key), if any.
    pub replaces_state: Option<String>,
    /// The device that sent the event and the transaction id it used, when a client sent it.
    pub txn: Option<(String, String)>,
    /// In no timeline: of the state or auth chain a join brought (see migration 0027).
    pub outlier: bool,
}

/// Why an append did not happen (the room's own rules, not the database).
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("no such room")]
    NoRoom,
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    /// The client transaction already produced an event (a retry raced the first send).
    #[error("transaction already used")]
    DuplicateTxn,
    /// The room's head is not the one the event was worked out for (see `rooms::remote`).
    #[error("the room moved meanwhile")]
    HeadMoved,
    /// Allowed by the state it was made at, not by the room's current state (see `rooms::remote`).
    #[error("{0}")]
    SoftFailed(String),
}

#[async_trait]
pub trait RoomStore: Send + Sync {
    /// Creates an empty room (its create event is appended next).
    async fn create_room(&self, room_id: &RoomId, version: &str, creator: &UserId) -> StoreResult<bool>;
    async fn room_version(&self, room_id: &RoomId) -> StoreResult<Option<String>>;
    async fn set_room_public(&self, room_id: &RoomId, public: bool) -> StoreResult<()>;
    /// Appends one event; `build` makes it from the room's head (with the state under
    /// `auth_keys`), or refuses.
    async fn append_event(
        &self,
        room_id: &RoomId,
        writer: &Arc<StreamWriter>,
        auth_keys: &[(String, String)],
        with_extremity_json: bool,
        build: &(dyn for<'h> Fn(&'h RoomHead) -> Result<NewEvent, AppendError> + Send + Sync),
    ) -> StoreResult<Result<StoredEvent, AppendError>>;
    /// The room's head as [`RoomStore::append_event`] gives it to its builder, read without
    /// taking the room's lock (for an event another server will fill in and sign); `None` if
    /// there is no such room.
    async fn room_head(
        &self,
        room_id: &RoomId,
        auth_keys: &[(String, String)],
        with_extremity_json: bool,
    ) -> StoreResult<Option<RoomHead>>;
    /// Stores a room this server joins through another (`send_join`), as one unit: `outliers`
    /// (the state before the join and its auth chain; in no timeline), then `join` as the newest
    /// event of the room's timeline, with `state` (type, state key, event id) and the join as the
    /// room's state. A room this server did not have is created.
    #[allow(clippy::too_many_arguments)]
    async fn join_remote_room(
        &self,
        room_id: &RoomId,
        version: &str,
        creator: &str,
        writer: &Arc<StreamWriter>,
        outliers: &[NewEvent],
        state: &[(String, String, String)],
        join: NewEvent,
    ) -> StoreResult<StoredEvent>;
    /// Stores a membership event of a room this server is not in (an invite from another
    /// server, or the rejection of one): the event as the newest of the room (created here if
    /// need be) and the member's membership, with for an invite the stripped state (a JSON list)
    /// the invitee is shown until they join.
    async fn store_outsider_membership(
        &self,
        room_id: &RoomId,
        version: &str,
        writer: &Arc<StreamWriter>,
        invite: NewEvent,
        stripped_state: Option<&str>,
    ) -> StoreResult<StoredEvent>;
    /// The stripped state sent with `user`'s invite to a room of another server (a JSON list).
    async fn invite_state(&self, room_id: &RoomId, user: &UserId) -> StoreResult<Option<String>>;
    /// The room's earliest event in its timeline (outliers left out).
    async fn earliest_event(&self, room_id: &RoomId) -> StoreResult<Option<StoredEvent>>;
    /// How many of `event_ids` are in a timeline (outliers left out).
    async fn timeline_has(&self, event_ids: &[&str]) -> StoreResult<usize>;
    /// Stores events fetched from before the room's earliest (`backfill`), newest first, below
    /// everything in its timeline: an outlier among them moves into the timeline, events already
    /// in it are skipped. Returns how many joined the timeline.
    async fn store_backfilled(&self, room_id: &RoomId, events: &[NewEvent]) -> StoreResult<usize>;
    /// Keeps events of another server that are in no timeline (outliers): those fetched to fill
    /// a gap or an auth chain, those the auth rules reject (see migration 0028) and those that
    /// fail against the room's current state only (soft-failed). One given the state after it
    /// keeps that state, so that events following it can be checked; the others get the room's
    /// current state. An event here already is left as it is, but that an outlier without a
    /// state of its own gets the one given.
    async fn store_outliers(&self, room_id: &RoomId, outliers: &[Outlier]) -> StoreResult<()>;
    /// Those of `event_ids` kept as rejected, each with its room.
    async fn rejected_events(&self, event_ids: &[&str]) -> StoreResult<Vec<(String, String)>>;
    /// The room state after an event (`(type, state key) → event id`), if the event is here
    /// with a state of its own: in a timeline, rejected, or an outlier given one.
    async fn state_after(&self, event_id: &str) -> StoreResult<Option<StateMap>>;
    async fn event_by_txn(
        &self,
        user_id: &UserId,
        device_id: &str,
        txn_id: &str,
    ) -> StoreResult<Option<String>>;
    async fn get_event(&self, event_id: &str) -> StoreResult<Option<StoredEvent>>;
    /// The events with these ids that exist, in no particular order.
    async fn events_by_id(&self, event_ids: &[&str]) -> StoreResult<Vec<StoredEvent>>;
    /// A room's events with positions in `(after, upto]`, oldest first (`limit` newest of them
    /// when `newest` is set).
    async fn room_events(
        &self,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        limit: i64,
        newest: bool,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// The room state just after position `at` (the current state if `at` is the newest).
    async fn state_at(&self, room_id: &RoomId, at: i64) -> StoreResult<Vec<StoredEvent>>;
    async fn current_state(&self, room_id: &RoomId) -> StoreResult<Vec<StoredEvent>>;
    /// The event in a room's current state at `(event_type, state_key)`.
    async fn current_state_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> StoreResult<Option<StoredEvent>>;
    /// Every event that set the state at `(event_type, state_key)` in a room, oldest first.
    async fn state_history(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// The user's rooms: (room id, membership, position of that membership).
    async fn user_rooms(&self, user_id: &UserId) -> StoreResult<Vec<(String, String, i64)>>;
    async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<Option<String>>;
    /// Members of a room: (user id, membership).
    async fn members(&self, room_id: &RoomId) -> StoreResult<Vec<(String, String)>>;
    /// The first members of a room other than `user` by user id (as Synapse and the compliance
    /// suite order them), joined or invited ones, or if there are none those who left: what a
    /// client names a room without a name after (the room summary's `m.heroes`).
    async fn heroes(&self, room_id: &RoomId, user: &UserId, limit: i64) -> StoreResult<Vec<String>>;
    /// The rooms listed in a directory (room ids), oldest first.
    async fn public_rooms(&self, directory: Directory<'_>) -> StoreResult<Vec<String>>;
    /// Lists a room in, or takes it out of, an application service's directory for one of its
    /// networks.
    async fn set_appservice_room_listed(
        &self,
        appservice_id: &str,
        network_id: &str,
        room_id: &RoomId,
        listed: bool,
    ) -> StoreResult<()>;
    /// Creates an alias; `false` if it exists.
    async fn create_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId) -> StoreResult<bool>;
    /// (room id, creator) of an alias.
    async fn resolve_alias(&self, alias: &str) -> StoreResult<Option<(String, String)>>;
    async fn delete_alias(&self, alias: &str) -> StoreResult<bool>;
    async fn room_aliases(&self, room_id: &RoomId) -> StoreResult<Vec<String>>;
    /// Points every alias of room `from` at room `to` (a room upgrade), returning them.
    async fn move_aliases(&self, from: &RoomId, to: &RoomId) -> StoreResult<Vec<String>>;
    async fn room_is_public(&self, room_id: &RoomId) -> StoreResult<bool>;
    /// Active users whose id or display name contains `term` (lower-cased), at most `limit`.
    /// With `visible_to`, only those joined to a room that user is joined to or to a public room
    /// (join rule `public`); without it, every active user.
    async fn search_users(
        &self,
        term: &str,
        visible_to: Option<&UserId>,
        limit: i64,
    ) -> StoreResult<Vec<(String, Option<String>, Option<String>)>>;
    /// Rooms with new events or receipts in `(after, upto]`, so `/sync` can skip the others.
    async fn rooms_changed(&self, after: i64, upto: i64) -> StoreResult<std::collections::HashSet<String>>;

    /// Every room's events in `(after, upto]`, oldest first, at most `limit`: what the in-memory
    /// stream cache ([`crate::rooms::recent`]) loads.
    async fn stream_events(&self, after: i64, upto: i64, limit: i64) -> StoreResult<Vec<StreamEvent>>;

    /// Self-destructing messages due at `now` (ms), soonest first, at most `limit`: (event id,
    /// room id).
    async fn due_expiries(&self, now: i64, limit: i64) -> StoreResult<Vec<(String, String)>>;
    /// Stores an expired message's pruned JSON in its place (`None`: the event is gone) and
    /// forgets its expiry.
    async fn expire_event(&self, event_id: &str, pruned_json: Option<&str>) -> StoreResult<()>;
}

/// An event with the columns the stream cache indexes it by.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub event: StoredEvent,
    pub event_type: String,
    pub state_key: Option<String>,
}

pub(super) const EVENT_COLUMNS: &str =
    "stream_ordering, event_id, room_id, json, redacted_by, replaces_state, txn_device, txn_id, outlier";

pub(super) fn event_from_row(row: &AnyRow) -> StoreResult<StoredEvent> {
    let device: Option<String> = row.try_get("txn_device")?;
    let txn_id: Option<String> = row.try_get("txn_id")?;
    Ok(StoredEvent {
        stream_ordering: row.try_get("stream_ordering")?,
        event_id: row.try_get("event_id")?,
        room_id: row.try_get("room_id")?,
        json: row.try_get("json")?,
        redacted_by: row.try_get("redacted_by")?,
        replaces_state: row.try_get("replaces_state")?,
        txn: device.zip(txn_id),
        outlier: row.try_get::<i16, _>("outlier")? != 0,
    })
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A value bound into a statement built for many rows.
#[derive(Debug, Clone, Copy)]
enum Bound<'a> {
    Text(Option<&'a str>),
    Int(i64),
    Small(i16),
}

/// The most parameters one statement of [`insert_many`] binds: under every backend's limit
/// (SQLite's is 32,766, Postgres's 65,535).
const MAX_PARAMETERS: usize = 10_000;

/// `INSERT INTO {into} VALUES (…), (…) {tail}` for every row, in as few statements as the
/// backends' limits on parameters allow: a send_join answer brings thousands of rows.
async fn insert_many(
    conn: &mut sqlx::AnyConnection,
    into: &str,
    tail: &str,
    rows: &[Vec<Bound<'_>>],
) -> StoreResult<()> {
    let Some(width) = rows.first().map(Vec::len) else { return Ok(()) };
    for chunk in rows.chunks((MAX_PARAMETERS / width.max(1)).max(1)) {
        let values: Vec<String> =
            (0..chunk.len()).map(|row| format!("({})", placeholders(row * width + 1, width))).collect();
        let sql = sqlx::AssertSqlSafe(format!("INSERT INTO {into} VALUES {} {tail}", values.join(", ")));
        let mut query = sqlx::query(sql);
        for value in chunk.iter().flatten() {
            query = match *value {
                Bound::Text(text) => query.bind(text),
                Bound::Int(n) => query.bind(n),
                Bound::Small(n) => query.bind(n),
            };
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Sets the room's current state at each `(event_type, state_key, event_id)`; each key at most
/// once (one statement cannot update a row twice).
async fn set_current_state(
    conn: &mut sqlx::AnyConnection,
    room_id: &RoomId,
    entries: &[(&str, &str, &str)],
) -> StoreResult<()> {
    let rows: Vec<Vec<Bound>> = entries
        .iter()
        .map(|(kind, key, id)| {
            [room_id.as_str(), kind, key, id].into_iter().map(|text| Bound::Text(Some(text))).collect()
        })
        .collect();
    insert_many(
        conn,
        "current_state (room_id, event_type, state_key, event_id)",
        "ON CONFLICT (room_id, event_type, state_key) DO UPDATE SET event_id = excluded.event_id",
        &rows,
    )
    .await
}

/// How an event is written: live (in the timeline, its membership applied), as an outlier (in
/// no timeline), or backfilled (in the timeline before what was seen live; the room's current
/// memberships are not its to change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Live,
    Outlier,
    Backfilled,
}

/// Creates the row of a room another server hosts if this server has none, and locks it as an
/// append does; its version must be `version`. Returns the row (version, depth, snapshot).
async fn lock_room_of_another_server(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    room_id: &RoomId,
    version: &str,
    creator: &str,
) -> StoreResult<AnyRow> {
    sqlx::query(
        "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts, extremities, depth)
         VALUES ($1, $2, $3, 0, $4, '[]', 0) ON CONFLICT (room_id) DO NOTHING",
    )
    .bind(room_id.as_str())
    .bind(version)
    .bind(creator)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    let row = sqlx::query(
        "UPDATE rooms SET depth = depth WHERE room_id = $1 RETURNING room_version, depth, current_snapshot",
    )
    .bind(room_id.as_str())
    .fetch_one(&mut **tx)
    .await?;
    if row.try_get::<String, _>("room_version")? != version {
        return Err(corrupt(format!("room {room_id} is here with another version than {version}")));
    }
    Ok(row)
}

/// For a redaction: the event it removes, replaced by its pruned JSON.
async fn apply_redaction(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    room_id: &RoomId,
    event: &NewEvent,
) -> StoreResult<()> {
    if let Some((redacted, redacted_json)) = &event.redaction {
        sqlx::query("UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND room_id = $4")
            .bind(redacted)
            .bind(redacted_json)
            .bind(event.event_id.as_str())
            .bind(room_id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Takes `n` positions below every outlier and backfilled event so far; returns the highest.
async fn allocate_backward(tx: &mut sqlx::Transaction<'_, sqlx::Any>, n: i64) -> StoreResult<i64> {
    let row = sqlx::query("UPDATE backward_positions SET next = next - $1 WHERE id = 1 RETURNING next")
        .bind(n)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get::<i64, _>("next")? + n)
}

/// An event to write at `position` with the state after it (see [`Written`]).
struct EventRow<'a> {
    position: i64,
    event: &'a NewEvent,
    snapshot_id: i64,
    written: Written,
}

/// Writes the rows of events, and the memberships of those written live.
async fn insert_events(
    conn: &mut sqlx::AnyConnection,
    room_id: &RoomId,
    events: &[EventRow<'_>],
) -> StoreResult<()> {
    let rows: Vec<Vec<Bound>> = events
        .iter()
        .map(|EventRow { position, event, snapshot_id, written }| {
            let txn = event.txn.as_ref();
            vec![
                Bound::Int(*position),
                Bound::Text(Some(event.event_id.as_str())),
                Bound::Text(Some(room_id.as_str())),
                Bound::Text(Some(&event.sender)),
                Bound::Text(Some(&event.event_type)),
                Bound::Text(event.state_key.as_deref()),
                Bound::Int(event.depth),
                Bound::Int(event.origin_server_ts),
                Bound::Text(Some(&event.json)),
                Bound::Int(*snapshot_id),
                Bound::Text(event.replaces_state.as_deref()),
                Bound::Text(txn.map(|(_, device, _)| device.as_str())),
                Bound::Text(txn.map(|(_, _, txn)| txn.as_str())),
                Bound::Small(i16::from(*written == Written::Outlier)),
            ]
        })
        .collect();
    insert_many(
        &mut *conn,
        "events (stream_ordering, event_id, room_id, sender, event_type, state_key, depth, origin_server_ts,
             json, state_snapshot, replaces_state, txn_device, txn_id, outlier)",
        "",
        &rows,
    )
    .await?;
    let memberships: Vec<Membership> = events
        .iter()
        .filter(|row| row.written == Written::Live)
        .filter_map(|EventRow { position, event, .. }| match (&event.membership, &event.state_key) {
            (Some(membership), Some(user)) => {
                Some(Membership { user, membership, event_id: event.event_id.as_str(), position: *position })
            }
            _ => None,
        })
        .collect();
    set_memberships(conn, room_id, &memberships).await
}

/// Writes one event (see [`insert_events`]).
async fn insert_event(
    conn: &mut sqlx::AnyConnection,
    room_id: &RoomId,
    position: i64,
    event: &NewEvent,
    snapshot_id: i64,
    written: Written,
) -> StoreResult<()> {
    insert_events(conn, room_id, &[EventRow { position, event, snapshot_id, written }]).await
}

/// A user's membership of a room, set by the event at `event_id`.
struct Membership<'a> {
    user: &'a str,
    membership: &'a str,
    event_id: &'a str,
    position: i64,
}

/// Sets memberships, each user at most once; the state an invite came with goes once the user
/// is no longer invited.
async fn set_memberships(
    conn: &mut sqlx::AnyConnection,
    room_id: &RoomId,
    memberships: &[Membership<'_>],
) -> StoreResult<()> {
    let rows: Vec<Vec<Bound>> = memberships
        .iter()
        .map(|m| {
            vec![
                Bound::Text(Some(room_id.as_str())),
                Bound::Text(Some(m.user)),
                Bound::Text(Some(m.membership)),
                Bound::Text(Some(m.event_id)),
                Bound::Int(m.position),
            ]
        })
        .collect();
    insert_many(
        &mut *conn,
        "memberships (room_id, user_id, membership, event_id, stream_ordering)",
        "ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership,
             event_id = excluded.event_id, stream_ordering = excluded.stream_ordering",
        &rows,
    )
    .await?;
    let not_invited: Vec<&str> =
        memberships.iter().filter(|m| m.membership != "invite").map(|m| m.user).collect();
    for users in not_invited.chunks(MAX_PARAMETERS) {
        let sql = sqlx::AssertSqlSafe(format!(
            "DELETE FROM invite_states WHERE room_id = $1 AND user_id IN ({})",
            placeholders(2, users.len())
        ));
        let mut query = sqlx::query(sql).bind(room_id.as_str());
        for user in users {
            query = query.bind(*user);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// `columns` of the events with these ids that pass `filter`, in batches that keep each
/// statement within every backend's limit on parameters.
async fn rows_by_ids(
    conn: &mut sqlx::AnyConnection,
    columns: &str,
    filter: &str,
    event_ids: &[&str],
) -> StoreResult<Vec<AnyRow>> {
    let mut rows = Vec::with_capacity(event_ids.len());
    for batch in event_ids.chunks(IN_CHUNK) {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {columns} FROM events WHERE event_id IN ({}) AND {filter}",
            placeholders(1, batch.len())
        ));
        let mut query = sqlx::query(sql);
        for id in batch {
            query = query.bind(*id);
        }
        rows.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// Locks a cache, shrugging off poisoning (a cache holds no invariant a panic could break).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqlStore {
    /// A state snapshot of a room, from memory when it is the one last read or written here.
    async fn snapshot(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        room_id: &RoomId,
        snapshot_id: i64,
    ) -> StoreResult<Snapshot> {
        if let Some(cached) = lock(&self.immutable.snapshots).get(room_id.as_str())
            && cached.id == snapshot_id
        {
            return Ok(cached.clone());
        }
        let snapshot = state::read(tx, snapshot_id).await?;
        self.remember_snapshot(room_id, snapshot.clone());
        Ok(snapshot)
    }

    fn forget_snapshot(&self, room_id: &RoomId) {
        lock(&self.immutable.snapshots).remove(room_id.as_str());
    }

    fn remember_snapshot(&self, room_id: &RoomId, snapshot: Snapshot) {
        let mut snapshots = lock(&self.immutable.snapshots);
        if snapshots.len() >= ImmutableCache::CAPACITY {
            snapshots.clear();
        }
        snapshots.insert(room_id.to_string(), snapshot);
    }

    /// Snapshot `id`, read outside any transaction.
    async fn read_snapshot(&self, id: i64) -> StoreResult<Snapshot> {
        let mut conn = self.pool.acquire().await?;
        state::read(&mut conn, id).await
    }

    /// The head of a room whose `rooms` row (version, extremities, depth, snapshot) is `row`:
    /// the state under `auth_keys` with its JSON, and the current state snapshot (none before the
    /// room's first event).
    async fn head_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        room_id: &RoomId,
        row: &AnyRow,
        auth_keys: &[(String, String)],
        with_extremity_json: bool,
    ) -> StoreResult<(RoomHead, Option<Snapshot>)> {
        let room_version: String = row.try_get("room_version")?;
        let extremities: Vec<OwnedEventId> =
            serde_json::from_str(&row.try_get::<String, _>("extremities")?).map_err(corrupt)?;
        let depth: i64 = row.try_get("depth")?;
        let snapshot: Option<i64> = row.try_get("current_snapshot")?;

        let snapshot = match snapshot {
            Some(snapshot) => Some(self.snapshot(tx, room_id, snapshot).await?),
            None => None,
        };
        let empty = StateMap::new();
        let state_map = snapshot.as_ref().map_or(&empty, |snapshot| &*snapshot.state);
        // Only the state the auth rules will look at (and the extremities if asked), in one query.
        let wanted: Vec<(&(String, String), &String)> =
            auth_keys.iter().filter_map(|key| state_map.get_key_value(key)).collect();
        let mut ids: Vec<&str> = wanted.iter().map(|(_, id)| id.as_str()).collect();
        if with_extremity_json {
            ids.extend(extremities.iter().map(|id| id.as_str()));
        }
        let mut json: BTreeMap<String, String> = BTreeMap::new();
        if !ids.is_empty() {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT event_id, json FROM events WHERE event_id IN ({})",
                placeholders(1, ids.len())
            ));
            let mut query = sqlx::query(sql);
            for event_id in &ids {
                query = query.bind(*event_id);
            }
            for row in query.fetch_all(&mut **tx).await? {
                json.insert(row.try_get("event_id")?, row.try_get("json")?);
            }
        }
        let mut state = BTreeMap::new();
        for (key, event_id) in wanted {
            let text = json
                .get(event_id.as_str())
                .ok_or_else(|| corrupt(format!("state event {event_id} missing")))?;
            state.insert(key.clone(), (event_id.clone(), text.clone()));
        }
        let mut extremity_json = BTreeMap::new();
        if with_extremity_json {
            for id in &extremities {
                let text = json.get(id.as_str()).ok_or_else(|| corrupt(format!("extremity {id} missing")))?;
                extremity_json.insert(id.clone(), text.clone());
            }
        }
        Ok((RoomHead { room_version, extremities, depth, state, extremity_json }, snapshot))
    }

    /// Writes an event of a fork (see [`NewEvent::resolved`]): the state after it as its own
    /// snapshot, the resolved state as the room's current state (a snapshot of its own when it
    /// differs, under the negated position), and the memberships the resolution changed.
    #[allow(clippy::too_many_arguments)]
    async fn append_resolved(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        room_id: &RoomId,
        position: super::stream::PositionGuard,
        head: &RoomHead,
        old: Option<&Snapshot>,
        event: NewEvent,
        resolved: &Resolved,
    ) -> StoreResult<StoredEvent> {
        let p = position.position;
        let empty = StateMap::new();
        let old_state = old.map_or(&empty, |old| &*old.state);
        let conn = &mut *tx;
        let after_event = Arc::new(resolved.after_event.clone());
        let delta = state::delta_between(old_state, &after_event);
        let after_event =
            state::write(conn, room_id, p, old.map(|old| (old.id, old.chain)), after_event, delta).await?;
        let current = match resolved.current == resolved.after_event {
            true => after_event,
            false => {
                let delta = state::delta_between(&after_event.state, &resolved.current);
                let base = Some((after_event.id, after_event.chain));
                state::write(conn, room_id, -p, base, Arc::new(resolved.current.clone()), delta).await?
            }
        };
        insert_event(&mut tx, room_id, p, &event, p, Written::Backfilled).await?;
        apply_redaction(&mut tx, room_id, &event).await?;
        sqlx::query("DELETE FROM current_state WHERE room_id = $1")
            .bind(room_id.as_str())
            .execute(&mut *tx)
            .await?;
        let entries: Vec<(&str, &str, &str)> = resolved
            .current
            .iter()
            .map(|((kind, key), id)| (kind.as_str(), key.as_str(), id.as_str()))
            .collect();
        set_current_state(&mut tx, room_id, &entries).await?;
        let changed: Vec<Membership> = resolved
            .current
            .iter()
            .filter(|((kind, key), id)| {
                kind == "m.room.member" && old_state.get(&(kind.clone(), key.clone())) != Some(*id)
            })
            .filter_map(|((_, user), id)| {
                let membership = resolved.memberships.get(id)?;
                Some(Membership { user, membership, event_id: id, position: p })
            })
            .collect();
        set_memberships(&mut tx, room_id, &changed).await?;
        let mut extremities: Vec<&str> = head
            .extremities
            .iter()
            .filter(|id| !event.prev_events.contains(id))
            .map(|id| id.as_str())
            .collect();
        extremities.push(event.event_id.as_str());
        sqlx::query(
            "UPDATE rooms SET extremities = $2, depth = $3, current_snapshot = $4 WHERE room_id = $1",
        )
        .bind(room_id.as_str())
        .bind(serde_json::to_string(&extremities).map_err(corrupt)?)
        .bind(event.depth.max(head.depth))
        .bind(current.id)
        .execute(&mut *tx)
        .await?;
        position.still_leased()?;
        tx.commit().await?;
        self.remember_snapshot(room_id, current);
        let stored = NewEvent::stored(p, room_id, event);
        drop(position);
        Ok(stored)
    }

    /// `columns` of the events with these ids that pass `filter` (see [`rows_by_ids`]).
    async fn event_rows(&self, columns: &str, filter: &str, event_ids: &[&str]) -> StoreResult<Vec<AnyRow>> {
        let mut conn = self.pool.acquire().await?;
        rows_by_ids(&mut conn, columns, filter, event_ids).await
    }
}

#[async_trait]
impl RoomStore for SqlStore {
    async fn create_room(&self, room_id: &RoomId, version: &str, creator: &UserId) -> StoreResult<bool> {
        let row = sqlx::query(
            "INSERT INTO rooms (room_id, room_version, creator, is_public, created_ts, extremities, depth)
             VALUES ($1, $2, $3, 0, $4, '[]', 0) ON CONFLICT (room_id) DO NOTHING RETURNING room_id",
        )
        .bind(room_id.as_str())
        .bind(version)
        .bind(creator.as_str())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn room_version(&self, room_id: &RoomId) -> StoreResult<Option<String>> {
        let cache = &self.immutable.room_versions;
        if let Some(version) = lock(cache).get(room_id.as_str()) {
            return Ok(Some(version.clone()));
        }
        let row = sqlx::query("SELECT room_version FROM rooms WHERE room_id = $1")
            .bind(room_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        let version: Option<String> = row.map(|r| r.try_get("room_version")).transpose()?;
        if let Some(version) = &version {
            let mut versions = lock(cache);
            if versions.len() >= ImmutableCache::CAPACITY {
                versions.clear();
            }
            versions.insert(room_id.to_string(), version.clone());
        }
        Ok(version)
    }

    async fn set_room_public(&self, room_id: &RoomId, public: bool) -> StoreResult<()> {
        sqlx::query("UPDATE rooms SET is_public = $2 WHERE room_id = $1")
            .bind(room_id.as_str())
            .bind(i16::from(public))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn append_event(
        &self,
        room_id: &RoomId,
        writer: &Arc<StreamWriter>,
        auth_keys: &[(String, String)],
        with_extremity_json: bool,
        build: &(dyn for<'h> Fn(&'h RoomHead) -> Result<NewEvent, AppendError> + Send + Sync),
    ) -> StoreResult<Result<StoredEvent, AppendError>> {
        let mut tx = self.begin().await?;
        // Lock the room first: the write comes before any read, so two writers cannot both read
        // the same head (and SQLite takes its write lock up front instead of deadlocking).
        let row = sqlx::query(
            "UPDATE rooms SET depth = depth WHERE room_id = $1
             RETURNING room_version, extremities, depth, current_snapshot",
        )
        .bind(room_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(Err(AppendError::NoRoom)) };
        // Taken while the room is locked, so the room's events get positions in the order of its
        // graph, whichever worker writes them (see `stream.rs`).
        let position = writer.allocate_in(&mut tx).await?;
        let (head, snapshot) = self.head_in(&mut tx, room_id, &row, auth_keys, with_extremity_json).await?;
        let event = match build(&head) {
            Ok(event) => event,
            Err(refused) => return Ok(Err(refused)),
        };

        if let Some(resolved) = event.resolved.clone() {
            let stored = self
                .append_resolved(tx, room_id, position, &head, snapshot.as_ref(), event, &resolved)
                .await?;
            return Ok(Ok(stored));
        }
        let mut new_snapshot = None;
        let snapshot_id = match &event.state_key {
            Some(key) => {
                // The room is locked, so the cached map can be taken and changed in place: a
                // copy of it would cost as much as the room has members.
                self.forget_snapshot(room_id);
                let (base, mut state_map) = match snapshot {
                    Some(Snapshot { id, chain, state }) => (Some((id, chain)), state),
                    None => (None, Arc::default()),
                };
                let (event_type, event_id) = (event.event_type.clone(), event.event_id.to_string());
                Arc::make_mut(&mut state_map).insert((event_type.clone(), key.clone()), event_id.clone());
                let delta = vec![(event_type, key.clone(), Some(event_id))];
                let written =
                    state::write(&mut tx, room_id, position.position, base, state_map, delta).await?;
                new_snapshot = Some(written);
                set_current_state(&mut tx, room_id, &[(&event.event_type, key, event.event_id.as_str())])
                    .await?;
                position.position
            }
            None => snapshot
                .map(|snapshot| snapshot.id)
                .ok_or_else(|| corrupt("a non-state event in a room without state"))?,
        };
        insert_event(&mut tx, room_id, position.position, &event, snapshot_id, Written::Live).await?;
        if let Some(expires_ts) = event.expires_ts {
            sqlx::query("INSERT INTO event_expiry (event_id, room_id, expires_ts) VALUES ($1, $2, $3)")
                .bind(event.event_id.as_str())
                .bind(room_id.as_str())
                .bind(expires_ts)
                .execute(&mut *tx)
                .await?;
        }
        apply_redaction(&mut tx, room_id, &event).await?;
        let mut new_extremities: Vec<&str> = head
            .extremities
            .iter()
            .filter(|id| !event.prev_events.contains(id))
            .map(|id| id.as_str())
            .collect();
        new_extremities.push(event.event_id.as_str());
        let extremities = serde_json::to_string(&new_extremities).map_err(corrupt)?;
        sqlx::query(
            "UPDATE rooms SET extremities = $2, depth = $3, current_snapshot = $4 WHERE room_id = $1",
        )
        .bind(room_id.as_str())
        .bind(extremities)
        .bind(event.depth.max(head.depth))
        .bind(snapshot_id)
        .execute(&mut *tx)
        .await?;
        if let Some((user, device, txn)) = &event.txn {
            // The key on the transaction id is what makes sends idempotent: a second use finds
            // the first's row (waiting for it to commit if need be) and this event is dropped.
            let inserted = sqlx::query(
                "INSERT INTO event_txns (user_id, device_id, txn_id, event_id, created_ts) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, device_id, txn_id) DO NOTHING RETURNING event_id",
            )
            .bind(user)
            .bind(device)
            .bind(txn)
            .bind(event.event_id.as_str())
            .bind(now_ms())
            .fetch_optional(&mut *tx)
            .await?;
            if inserted.is_none() {
                return Ok(Err(AppendError::DuplicateTxn));
            }
        }
        position.still_leased()?;
        tx.commit().await?;
        if let Some(snapshot) = new_snapshot {
            self.remember_snapshot(room_id, snapshot);
        }
        let stored = NewEvent::stored(position.position, room_id, event);
        drop(position);
        Ok(Ok(stored))
    }

    async fn room_head(
        &self,
        room_id: &RoomId,
        auth_keys: &[(String, String)],
        with_extremity_json: bool,
    ) -> StoreResult<Option<RoomHead>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "SELECT room_version, extremities, depth, current_snapshot FROM rooms WHERE room_id = $1",
        )
        .bind(room_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (head, _) = self.head_in(&mut tx, room_id, &row, auth_keys, with_extremity_json).await?;
        tx.commit().await?;
        Ok(Some(head))
    }

    async fn join_remote_room(
        &self,
        room_id: &RoomId,
        version: &str,
        creator: &str,
        writer: &Arc<StreamWriter>,
        outliers: &[NewEvent],
        state: &[(String, String, String)],
        join: NewEvent,
    ) -> StoreResult<StoredEvent> {
        if let Some(stored) = self.get_event(join.event_id.as_str()).await? {
            return Ok(stored);
        }
        let mut tx = self.begin().await?;
        let row = lock_room_of_another_server(&mut tx, room_id, version, creator).await?;
        let depth: i64 = row.try_get("depth")?;
        let position = writer.allocate_in(&mut tx).await?;
        let p = position.position;

        // The events of the answer this server does not have yet, written as outliers in one go.
        let ids: Vec<&str> = outliers.iter().map(|event| event.event_id.as_str()).collect();
        let mut stored_at = std::collections::HashMap::new();
        for row in rows_by_ids(&mut tx, "event_id, stream_ordering", "1 = 1", &ids).await? {
            stored_at
                .insert(row.try_get::<String, _>("event_id")?, row.try_get::<i64, _>("stream_ordering")?);
        }
        let new: Vec<&NewEvent> =
            outliers.iter().filter(|event| !stored_at.contains_key(event.event_id.as_str())).collect();
        let mut next = allocate_backward(&mut tx, i64::try_from(new.len()).map_err(corrupt)?).await?;
        let mut rows = Vec::with_capacity(new.len());
        for event in new {
            if stored_at.insert(event.event_id.to_string(), next).is_none() {
                rows.push(EventRow { position: next, event, snapshot_id: p, written: Written::Outlier });
                next -= 1;
            }
        }
        insert_events(&mut tx, room_id, &rows).await?;

        // The room's state: the answer's, and the join.
        let mut state_map: StateMap =
            state.iter().map(|(kind, key, id)| ((kind.clone(), key.clone()), id.clone())).collect();
        let memberships_of: std::collections::HashMap<&str, &str> = outliers
            .iter()
            .filter_map(|event| Some((event.event_id.as_str(), event.membership.as_deref()?)))
            .collect();
        let members: Vec<Membership> = state_map
            .iter()
            .filter(|((kind, _), _)| kind == "m.room.member")
            .filter_map(|((_, user), id)| {
                let (membership, position) = (memberships_of.get(id.as_str())?, stored_at.get(id)?);
                Some(Membership { user, membership, event_id: id, position: *position })
            })
            .collect();
        set_memberships(&mut tx, room_id, &members).await?;
        let key = join.state_key.clone().unwrap_or_default();
        state_map.insert((join.event_type.clone(), key), join.event_id.to_string());
        sqlx::query("DELETE FROM current_state WHERE room_id = $1")
            .bind(room_id.as_str())
            .execute(&mut *tx)
            .await?;
        let entries: Vec<(&str, &str, &str)> =
            state_map.iter().map(|((kind, key), id)| (kind.as_str(), key.as_str(), id.as_str())).collect();
        set_current_state(&mut tx, room_id, &entries).await?;
        let snapshot = state::write(&mut tx, room_id, p, None, Arc::new(state_map), Vec::new()).await?;
        insert_event(&mut tx, room_id, p, &join, p, Written::Live).await?;
        let extremities = serde_json::to_string(&[join.event_id.as_str()]).map_err(corrupt)?;
        sqlx::query(
            "UPDATE rooms SET extremities = $2, depth = $3, current_snapshot = $4 WHERE room_id = $1",
        )
        .bind(room_id.as_str())
        .bind(extremities)
        .bind(join.depth.max(depth))
        .bind(p)
        .execute(&mut *tx)
        .await?;
        position.still_leased()?;
        tx.commit().await?;
        self.remember_snapshot(room_id, snapshot);
        let stored = NewEvent::stored(p, room_id, join);
        drop(position);
        Ok(stored)
    }

    async fn store_outsider_membership(
        &self,
        room_id: &RoomId,
        version: &str,
        writer: &Arc<StreamWriter>,
        invite: NewEvent,
        stripped_state: Option<&str>,
    ) -> StoreResult<StoredEvent> {
        if let Some(stored) = self.get_event(invite.event_id.as_str()).await? {
            return Ok(stored);
        }
        let invitee = invite.state_key.clone().ok_or_else(|| corrupt("a membership without a state key"))?;
        let mut tx = self.begin().await?;
        let row = lock_room_of_another_server(&mut tx, room_id, version, &invite.sender).await?;
        let position = writer.allocate_in(&mut tx).await?;
        let p = position.position;
        let (base, mut state_map) = match row.try_get::<Option<i64>, _>("current_snapshot")? {
            Some(snapshot) => {
                let Snapshot { id, chain, state } = self.snapshot(&mut tx, room_id, snapshot).await?;
                (Some((id, chain)), state)
            }
            None => (None, Arc::default()),
        };
        let key = ("m.room.member".to_owned(), invitee.clone());
        Arc::make_mut(&mut state_map).insert(key.clone(), invite.event_id.to_string());
        let delta = vec![(key.0, key.1, Some(invite.event_id.to_string()))];
        let snapshot = state::write(&mut tx, room_id, p, base, state_map, delta).await?;
        set_current_state(&mut tx, room_id, &[("m.room.member", &invitee, invite.event_id.as_str())]).await?;
        insert_event(&mut tx, room_id, p, &invite, p, Written::Live).await?;
        if let Some(stripped_state) = stripped_state {
            sqlx::query(
                "INSERT INTO invite_states (room_id, user_id, state) VALUES ($1, $2, $3)
                 ON CONFLICT (room_id, user_id) DO UPDATE SET state = excluded.state",
            )
            .bind(room_id.as_str())
            .bind(&invitee)
            .bind(stripped_state)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("UPDATE rooms SET current_snapshot = $2 WHERE room_id = $1")
            .bind(room_id.as_str())
            .bind(p)
            .execute(&mut *tx)
            .await?;
        position.still_leased()?;
        tx.commit().await?;
        self.remember_snapshot(room_id, snapshot);
        let stored = NewEvent::stored(p, room_id, invite);
        drop(position);
        Ok(stored)
    }

    async fn invite_state(&self, room_id: &RoomId, user: &UserId) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT state FROM invite_states WHERE room_id = $1 AND user_id = $2")
            .bind(room_id.as_str())
            .bind(user.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|row| row.try_get("state")).transpose()?)
    }

    async fn earliest_event(&self, room_id: &RoomId) -> StoreResult<Option<StoredEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = $1 AND outlier = 0 ORDER BY stream_ordering LIMIT 1"
        ));
        sqlx::query(sql)
            .bind(room_id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(event_from_row)
            .transpose()
    }

    async fn timeline_has(&self, event_ids: &[&str]) -> StoreResult<usize> {
        let mut found = 0;
        for id in event_ids {
            let row = sqlx::query("SELECT 1 AS found FROM events WHERE event_id = $1 AND outlier = 0")
                .bind(*id)
                .fetch_optional(&self.pool)
                .await?;
            found += usize::from(row.is_some());
        }
        Ok(found)
    }

    async fn store_backfilled(&self, room_id: &RoomId, events: &[NewEvent]) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let earliest = sqlx::query(
            "SELECT state_snapshot FROM events WHERE room_id = $1 AND outlier = 0 ORDER BY stream_ordering LIMIT 1",
        )
        .bind(room_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(earliest) = earliest else { return Ok(0) };
        // The state recorded at a backfilled event is the earliest state known here; the state
        // at each event of the past is not kept yet.
        let snapshot: i64 = earliest.try_get("state_snapshot")?;
        // (event, whether it is here as an outlier)
        let mut new = Vec::new();
        for event in events {
            // A rejected event is skipped: it stays out of every timeline.
            let known = sqlx::query("SELECT outlier, rejected FROM events WHERE event_id = $1")
                .bind(event.event_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            match known {
                None => new.push((event, false)),
                Some(row)
                    if row.try_get::<i16, _>("outlier")? == 1
                        && row.try_get::<Option<String>, _>("rejected")?.is_none() =>
                {
                    new.push((event, true))
                }
                Some(_) => {}
            }
        }
        if new.is_empty() {
            return Ok(0);
        }
        let mut at = allocate_backward(&mut tx, i64::try_from(new.len()).map_err(corrupt)?).await?;
        for (event, outlier) in &new {
            if *outlier {
                // An event of the state a join brought takes its place in the history.
                for sql in [
                    "UPDATE events SET stream_ordering = $2, outlier = 0 WHERE event_id = $1",
                    "UPDATE memberships SET stream_ordering = $2 WHERE event_id = $1",
                ] {
                    sqlx::query(sql).bind(event.event_id.as_str()).bind(at).execute(&mut *tx).await?;
                }
            } else {
                insert_event(&mut tx, room_id, at, event, snapshot, Written::Backfilled).await?;
            }
            at -= 1;
        }
        tx.commit().await?;
        Ok(new.len())
    }

    async fn store_outliers(&self, room_id: &RoomId, outliers: &[Outlier]) -> StoreResult<()> {
        if outliers.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Written first, so that SQLite takes its write lock before any read (a read first
        // would fail as busy if another writer committed meanwhile).
        let mut next = allocate_backward(&mut tx, i64::try_from(outliers.len()).map_err(corrupt)?).await?;
        let snapshot = sqlx::query("SELECT current_snapshot FROM rooms WHERE room_id = $1")
            .bind(room_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(snapshot) = snapshot else { return Ok(()) };
        let current: i64 = snapshot
            .try_get::<Option<i64>, _>("current_snapshot")?
            .ok_or_else(|| corrupt("a room without state"))?;
        let ids: Vec<&str> = outliers.iter().map(|outlier| outlier.event.event_id.as_str()).collect();
        // Those here: their position, and whether they are outliers without a state of their own.
        let mut here = std::collections::HashMap::new();
        let columns = "event_id, stream_ordering, state_snapshot, outlier, rejected";
        for row in rows_by_ids(&mut tx, columns, "1 = 1", &ids).await? {
            let position: i64 = row.try_get("stream_ordering")?;
            let stateless = row.try_get::<i16, _>("outlier")? == 1
                && row.try_get::<Option<String>, _>("rejected")?.is_none()
                && row.try_get::<i64, _>("state_snapshot")? != position;
            here.insert(row.try_get::<String, _>("event_id")?, (position, stateless));
        }
        let mut rows = Vec::new();
        let mut rejected = Vec::new();
        for outlier in outliers {
            let id = outlier.event.event_id.as_str();
            let (position, new) = match here.get(id) {
                Some((position, true)) if outlier.state_after.is_some() => (*position, false),
                Some(_) => continue,
                None => {
                    next -= 1;
                    (next + 1, true)
                }
            };
            here.insert(id.to_owned(), (position, false));
            // A state of its own is a snapshot numbered as the event's position, which no other
            // snapshot has: those of the timeline are positive, outliers' negative.
            let snapshot_id = match &outlier.state_after {
                Some(state_after) => {
                    let state_after = Arc::new(state_after.clone());
                    state::write(&mut tx, room_id, position, None, state_after, Vec::new()).await?;
                    position
                }
                None => current,
            };
            if new {
                rows.push(EventRow {
                    position,
                    event: &outlier.event,
                    snapshot_id,
                    written: Written::Outlier,
                });
                if let Some(reason) = &outlier.rejected {
                    rejected.push((id, reason));
                }
            } else {
                sqlx::query("UPDATE events SET state_snapshot = $2 WHERE event_id = $1")
                    .bind(id)
                    .bind(snapshot_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        insert_events(&mut tx, room_id, &rows).await?;
        for (id, reason) in rejected {
            sqlx::query("UPDATE events SET rejected = $2 WHERE event_id = $1")
                .bind(id)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn rejected_events(&self, event_ids: &[&str]) -> StoreResult<Vec<(String, String)>> {
        let rows = self.event_rows("event_id, room_id", "rejected IS NOT NULL", event_ids).await?;
        rows.iter().map(|row| Ok((row.try_get("event_id")?, row.try_get("room_id")?))).collect()
    }

    async fn state_after(&self, event_id: &str) -> StoreResult<Option<StateMap>> {
        let row = sqlx::query(
            "SELECT state_snapshot, stream_ordering, outlier, rejected FROM events WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let snapshot: i64 = row.try_get("state_snapshot")?;
        // An outlier of a join's state or of an auth chain carries the room's state at the time
        // it was stored, not its own.
        if row.try_get::<i16, _>("outlier")? == 1
            && row.try_get::<Option<String>, _>("rejected")?.is_none()
            && snapshot != row.try_get::<i64, _>("stream_ordering")?
        {
            return Ok(None);
        }
        let snapshot = self.read_snapshot(snapshot).await?;
        Ok(Some(Arc::unwrap_or_clone(snapshot.state)))
    }

    async fn event_by_txn(
        &self,
        user_id: &UserId,
        device_id: &str,
        txn_id: &str,
    ) -> StoreResult<Option<String>> {
        let row = sqlx::query(
            "SELECT event_id FROM event_txns WHERE user_id = $1 AND device_id = $2 AND txn_id = $3",
        )
        .bind(user_id.as_str())
        .bind(device_id)
        .bind(txn_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get("event_id").map_err(Into::into)).transpose()
    }

    async fn get_event(&self, event_id: &str) -> StoreResult<Option<StoredEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE event_id = $1 AND rejected IS NULL"
        ));
        sqlx::query(sql)
            .bind(event_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(event_from_row)
            .transpose()
    }

    async fn events_by_id(&self, event_ids: &[&str]) -> StoreResult<Vec<StoredEvent>> {
        let rows = self.event_rows(EVENT_COLUMNS, "rejected IS NULL", event_ids).await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn room_events(
        &self,
        room_id: &RoomId,
        after: i64,
        upto: i64,
        limit: i64,
        newest: bool,
    ) -> StoreResult<Vec<StoredEvent>> {
        let order = if newest { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE room_id = $1 AND stream_ordering > $2 AND stream_ordering <= $3 AND outlier = 0
             ORDER BY stream_ordering {order} LIMIT $4"
        ));
        let mut events: Vec<StoredEvent> = sqlx::query(sql)
            .bind(room_id.as_str())
            .bind(after)
            .bind(upto)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect::<StoreResult<_>>()?;
        if newest {
            events.reverse();
        }
        Ok(events)
    }

    async fn state_at(&self, room_id: &RoomId, at: i64) -> StoreResult<Vec<StoredEvent>> {
        let row = sqlx::query(
            "SELECT state_snapshot FROM events
             WHERE room_id = $1 AND stream_ordering <= $2 ORDER BY stream_ordering DESC LIMIT 1",
        )
        .bind(room_id.as_str())
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(Vec::new()) };
        let snapshot = self.read_snapshot(row.try_get("state_snapshot")?).await?;
        // In the map's (type, state key) order, as readers have always had them.
        let order: std::collections::HashMap<&str, usize> =
            snapshot.state.values().enumerate().map(|(n, id)| (id.as_str(), n)).collect();
        let ids: Vec<&str> = order.keys().copied().collect();
        let mut events = self.events_by_id(&ids).await?;
        events.sort_by_key(|event| order.get(event.event_id.as_str()).copied());
        Ok(events)
    }

    async fn current_state(&self, room_id: &RoomId) -> StoreResult<Vec<StoredEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM events e JOIN current_state c ON c.event_id = e.event_id WHERE c.room_id = $1
             ORDER BY e.stream_ordering",
            EVENT_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ")
        ));
        sqlx::query(sql)
            .bind(room_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    async fn current_state_event(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> StoreResult<Option<StoredEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM events e JOIN current_state c ON c.event_id = e.event_id
             WHERE c.room_id = $1 AND c.event_type = $2 AND c.state_key = $3",
            EVENT_COLUMNS.split(", ").map(|c| format!("e.{c}")).collect::<Vec<_>>().join(", ")
        ));
        sqlx::query(sql)
            .bind(room_id.as_str())
            .bind(event_type)
            .bind(state_key)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(event_from_row)
            .transpose()
    }

    async fn state_history(
        &self,
        room_id: &RoomId,
        event_type: &str,
        state_key: &str,
    ) -> StoreResult<Vec<StoredEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = $1 AND event_type = $2 AND state_key = $3
             AND rejected IS NULL ORDER BY stream_ordering"
        ));
        sqlx::query(sql)
            .bind(room_id.as_str())
            .bind(event_type)
            .bind(state_key)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    async fn user_rooms(&self, user_id: &UserId) -> StoreResult<Vec<(String, String, i64)>> {
        sqlx::query("SELECT room_id, membership, stream_ordering FROM memberships WHERE user_id = $1")
            .bind(user_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("room_id")?, r.try_get("membership")?, r.try_get("stream_ordering")?)))
            .collect()
    }

    async fn membership(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT membership FROM memberships WHERE room_id = $1 AND user_id = $2")
            .bind(room_id.as_str())
            .bind(user_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("membership").map_err(Into::into)).transpose()
    }

    async fn members(&self, room_id: &RoomId) -> StoreResult<Vec<(String, String)>> {
        sqlx::query("SELECT user_id, membership FROM memberships WHERE room_id = $1 ORDER BY user_id")
            .bind(room_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("user_id")?, r.try_get("membership")?)))
            .collect()
    }

    async fn heroes(&self, room_id: &RoomId, user: &UserId, limit: i64) -> StoreResult<Vec<String>> {
        for memberships in ["'join', 'invite'", "'leave', 'ban'"] {
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT user_id FROM memberships WHERE room_id = $1 AND user_id <> $2
                 AND membership IN ({memberships}) ORDER BY user_id LIMIT $3"
            ));
            let heroes = sqlx::query(sql)
                .bind(room_id.as_str())
                .bind(user.as_str())
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.try_get("user_id").map_err(Into::into))
                .collect::<StoreResult<Vec<String>>>()?;
            if !heroes.is_empty() {
                return Ok(heroes);
            }
        }
        Ok(Vec::new())
    }

    async fn public_rooms(&self, directory: Directory<'_>) -> StoreResult<Vec<String>> {
        let query = match directory {
            Directory::Matrix => {
                sqlx::query("SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY created_ts")
            }
            Directory::Network { appservice_id, network_id } => sqlx::query(
                "SELECT r.room_id FROM appservice_room_lists l JOIN rooms r ON r.room_id = l.room_id \
                 WHERE l.appservice_id = $1 AND l.network_id = $2 ORDER BY r.created_ts",
            )
            .bind(appservice_id)
            .bind(network_id),
            Directory::All => sqlx::query(
                "SELECT room_id FROM rooms WHERE is_public = 1 \
                 OR room_id IN (SELECT room_id FROM appservice_room_lists) ORDER BY created_ts",
            ),
        };
        query.fetch_all(&self.pool).await?.iter().map(|r| r.try_get("room_id").map_err(Into::into)).collect()
    }

    async fn set_appservice_room_listed(
        &self,
        appservice_id: &str,
        network_id: &str,
        room_id: &RoomId,
        listed: bool,
    ) -> StoreResult<()> {
        let sql = if listed {
            "INSERT INTO appservice_room_lists (appservice_id, network_id, room_id) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM appservice_room_lists WHERE appservice_id = $1 AND network_id = $2 AND room_id = $3"
        };
        sqlx::query(sql)
            .bind(appservice_id)
            .bind(network_id)
            .bind(room_id.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stream_events(&self, after: i64, upto: i64, limit: i64) -> StoreResult<Vec<StreamEvent>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS}, event_type, state_key FROM events
             WHERE stream_ordering > $1 AND stream_ordering <= $2 ORDER BY stream_ordering LIMIT $3"
        ));
        sqlx::query(sql)
            .bind(after)
            .bind(upto)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(StreamEvent {
                    event: event_from_row(row)?,
                    event_type: row.try_get("event_type")?,
                    state_key: row.try_get("state_key")?,
                })
            })
            .collect()
    }

    async fn due_expiries(&self, now: i64, limit: i64) -> StoreResult<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT event_id, room_id FROM event_expiry WHERE expires_ts <= $1 ORDER BY expires_ts LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok((row.try_get("event_id")?, row.try_get("room_id")?))).collect()
    }

    async fn expire_event(&self, event_id: &str, pruned_json: Option<&str>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(json) = pruned_json {
            sqlx::query("UPDATE events SET json = $2 WHERE event_id = $1")
                .bind(event_id)
                .bind(json)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM event_expiry WHERE event_id = $1").bind(event_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rooms_changed(&self, after: i64, upto: i64) -> StoreResult<std::collections::HashSet<String>> {
        let rows = sqlx::query(
            "SELECT room_id FROM events WHERE stream_ordering > $1 AND stream_ordering <= $2
             UNION SELECT room_id FROM receipts WHERE stream_ordering > $1 AND stream_ordering <= $2",
        )
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| r.try_get("room_id").map_err(Into::into)).collect()
    }

    async fn create_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId) -> StoreResult<bool> {
        let row = sqlx::query(
            "INSERT INTO room_aliases (alias, room_id, creator, created_ts) VALUES ($1, $2, $3, $4)
             ON CONFLICT (alias) DO NOTHING RETURNING alias",
        )
        .bind(alias)
        .bind(room_id.as_str())
        .bind(creator.as_str())
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn resolve_alias(&self, alias: &str) -> StoreResult<Option<(String, String)>> {
        let row = sqlx::query("SELECT room_id, creator FROM room_aliases WHERE alias = $1")
            .bind(alias)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("room_id")?, r.try_get("creator")?))).transpose()
    }

    async fn delete_alias(&self, alias: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("DELETE FROM room_aliases WHERE alias = $1").bind(alias).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    async fn room_aliases(&self, room_id: &RoomId) -> StoreResult<Vec<String>> {
        sqlx::query("SELECT alias FROM room_aliases WHERE room_id = $1 ORDER BY alias")
            .bind(room_id.as_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get("alias").map_err(Into::into))
            .collect()
    }

    async fn move_aliases(&self, from: &RoomId, to: &RoomId) -> StoreResult<Vec<String>> {
        let rows = sqlx::query("UPDATE room_aliases SET room_id = $2 WHERE room_id = $1 RETURNING alias")
            .bind(from.as_str())
            .bind(to.as_str())
            .fetch_all(&self.pool)
            .await?;
        let mut aliases = rows.iter().map(|row| row.try_get("alias")).collect::<Result<Vec<String>, _>>()?;
        aliases.sort();
        Ok(aliases)
    }

    async fn room_is_public(&self, room_id: &RoomId) -> StoreResult<bool> {
        let row = sqlx::query("SELECT is_public FROM rooms WHERE room_id = $1")
            .bind(room_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<i16, _>("is_public")).transpose()?.unwrap_or(0) != 0)
    }

    async fn search_users(
        &self,
        term: &str,
        visible_to: Option<&UserId>,
        limit: i64,
    ) -> StoreResult<Vec<(String, Option<String>, Option<String>)>> {
        // LIKE wildcards in the term are escaped so they match literally.
        let escaped = term.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
        let pattern = format!("%{escaped}%");
        // The join rule is read from the current `m.room.join_rules` event's JSON (as `json`, not
        // `jsonb`, which refuses the `\u0000` escapes older events may hold).
        let content = |key: &str| match self.backend {
            Backend::Postgres => format!("(e.json::json -> 'content' ->> '{key}')"),
            Backend::Sqlite => format!("json_extract(e.json, '$.content.{key}')"),
        };
        let public = format!(
            "(cs.event_type = 'm.room.join_rules' AND {} = 'public')
             OR (cs.event_type = 'm.room.history_visibility' AND {} = 'world_readable')",
            content("join_rule"),
            content("history_visibility")
        );
        // `$3` empty: every active user. Otherwise a user is visible when joined to a room the
        // searcher is joined to (the searcher themself only through a public room, as Synapse),
        // or to a public or world-readable room; left, invited and banned members are not.
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT u.user_id, p.displayname, p.avatar_url FROM users u LEFT JOIN profiles p ON p.user_id = u.user_id
             WHERE u.deactivated = 0
               AND (LOWER(u.user_id) LIKE $1 ESCAPE '\\' OR LOWER(COALESCE(p.displayname, '')) LIKE $1 ESCAPE '\\')
               AND ($3 = '' OR EXISTS (
                 SELECT 1 FROM memberships m WHERE m.user_id = u.user_id AND m.membership = 'join'
                   AND ((u.user_id <> $3
                         AND m.room_id IN (SELECT room_id FROM memberships WHERE user_id = $3 AND membership = 'join'))
                     OR m.room_id IN (SELECT cs.room_id FROM current_state cs JOIN events e ON e.event_id = cs.event_id
                                      WHERE cs.state_key = '' AND ({public})))))
             ORDER BY u.user_id LIMIT $2"
        ));
        sqlx::query(sql)
            .bind(pattern)
            .bind(limit)
            .bind(visible_to.map_or("", |u| u.as_str()))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("user_id")?, r.try_get("displayname")?, r.try_get("avatar_url")?)))
            .collect()
    }
}
