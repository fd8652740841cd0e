-- Rooms and their events. Events are stored as the canonical JSON they were hashed and signed
-- over; `stream_ordering` is their position in the global stream (storage/stream.rs).
CREATE TABLE rooms (
    room_id           TEXT PRIMARY KEY,
    room_version      TEXT NOT NULL,
    creator           TEXT NOT NULL,
    is_public         SMALLINT NOT NULL DEFAULT 0,
    created_ts        BIGINT NOT NULL,
    -- The room's forward extremities (JSON list of event ids), the depth of the newest event, and
    -- the state snapshot after it. Updating this row is also how a writer locks the room.
    extremities       TEXT NOT NULL,
    depth             BIGINT NOT NULL,
    current_snapshot  BIGINT
);

CREATE TABLE events (
    stream_ordering   BIGINT PRIMARY KEY,
    event_id          TEXT NOT NULL UNIQUE,
    room_id           TEXT NOT NULL,
    sender            TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    state_key         TEXT,
    depth             BIGINT NOT NULL,
    origin_server_ts  BIGINT NOT NULL,
    json              TEXT NOT NULL,
    redacted_by       TEXT,
    -- The room state after this event (state_snapshots.snapshot_id).
    state_snapshot    BIGINT NOT NULL
);
CREATE INDEX events_by_room ON events (room_id, stream_ordering);

-- Full state maps, one per state event, as JSON [[type, state_key, event_id], ...]: the state at
-- every event, for /members?at=, /context and federation's state_ids.
CREATE TABLE state_snapshots (
    snapshot_id  BIGINT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    state        TEXT NOT NULL
);

CREATE TABLE current_state (
    room_id     TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    state_key   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);

CREATE TABLE memberships (
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    membership       TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    stream_ordering  BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id, membership);

-- Client transaction ids, so a retried send returns the same event.
CREATE TABLE event_txns (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    txn_id      TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    created_ts  BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);
