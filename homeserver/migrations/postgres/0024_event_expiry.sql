-- Messages their senders asked to self-destruct (MSC2228, `rooms.self_destructing_messages`):
-- when each is due to be emptied. A row goes once its event's content has been pruned.
CREATE TABLE event_expiry (
    event_id   TEXT PRIMARY KEY,
    room_id    TEXT NOT NULL,
    expires_ts BIGINT NOT NULL
);
CREATE INDEX event_expiry_by_time ON event_expiry (expires_ts);
