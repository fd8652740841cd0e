-- Accounts deactivated with `erase: true`: their events are served redacted to readers who were
-- not joined when they were sent (rooms/visibility.rs).
ALTER TABLE users ADD COLUMN erased SMALLINT NOT NULL DEFAULT 0;

-- Reports of events and rooms (`POST /rooms/{roomId}/report[/{eventId}]`), for the server's
-- admins. `event_id` is NULL for a report of a whole room.
CREATE TABLE reports (
    report_id    TEXT PRIMARY KEY,
    room_id      TEXT NOT NULL,
    event_id     TEXT,
    reporter     TEXT NOT NULL,
    reason       TEXT,
    score        BIGINT,
    received_ts  BIGINT NOT NULL
);
CREATE INDEX reports_by_time ON reports (received_ts);

-- OpenID tokens (`/user/{userId}/openid/request_token`), as SHA-256 of the token: they prove who
-- a user is to a third party (a widget's server) until they expire.
CREATE TABLE openid_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    expires_ts  BIGINT NOT NULL
);
CREATE INDEX openid_tokens_by_user ON openid_tokens (user_id, expires_ts);
CREATE INDEX openid_tokens_by_expiry ON openid_tokens (expires_ts);
