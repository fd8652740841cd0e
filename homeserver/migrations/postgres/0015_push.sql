-- Push notifications (api/client/push.rs, push/).
--
-- `notifications`: one row for each event whose push rules told a user to be notified, written by
-- the evaluator in the same transaction that moves `push_progress` past the event, so no event is
-- evaluated twice or skipped. Read for /notifications, the unread counts of /sync and what the
-- pushers deliver.
CREATE TABLE notifications (
    user_id          TEXT NOT NULL,
    -- The event's position in the stream.
    stream_ordering  BIGINT NOT NULL,
    room_id          TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    -- The push rule's actions, as JSON.
    actions          TEXT NOT NULL,
    highlight        SMALLINT NOT NULL,
    ts               BIGINT NOT NULL,
    PRIMARY KEY (user_id, stream_ordering)
);
CREATE INDEX notifications_by_room ON notifications (user_id, room_id, stream_ordering);
CREATE INDEX notifications_by_ts ON notifications (ts);

-- How far the evaluator has read the stream, and which worker evaluates (a lease, stamped with
-- the database's clock).
CREATE TABLE push_progress (
    id           SMALLINT PRIMARY KEY,
    position     BIGINT NOT NULL,
    owner        TEXT,
    lease_until  BIGINT NOT NULL
);
INSERT INTO push_progress (id, position, owner, lease_until)
    SELECT 1, position, NULL, 0 FROM stream_counter WHERE id = 1;

-- Each pusher's place in its user's notifications (the last one delivered or given up on), its
-- retries, whether its badge needs an update (a read receipt moved), and which worker delivers
-- for it now (a lease).
ALTER TABLE pushers ADD COLUMN kind TEXT NOT NULL DEFAULT 'http';
ALTER TABLE pushers ADD COLUMN created_ts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pushers ADD COLUMN position BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pushers ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pushers ADD COLUMN retry_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE pushers ADD COLUMN badge SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE pushers ADD COLUMN owner TEXT;
ALTER TABLE pushers ADD COLUMN lease_until BIGINT NOT NULL DEFAULT 0;
UPDATE pushers SET kind = COALESCE(CAST(data AS json)->>'kind', 'http'),
    position = (SELECT position FROM stream_counter WHERE id = 1);
