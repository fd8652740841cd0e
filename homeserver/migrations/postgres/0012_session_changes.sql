-- The latest stream position at which any session of a user was revoked or refreshed: workers
-- keep verified sessions in memory and drop a user's when this moves.
CREATE TABLE session_changes (
    user_id         TEXT NOT NULL PRIMARY KEY,
    stream_ordering BIGINT NOT NULL
);
CREATE INDEX session_changes_by_position ON session_changes (stream_ordering);
