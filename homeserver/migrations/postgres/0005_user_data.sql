-- What users keep about themselves: profiles, account data, filters; and read receipts.
-- Account data and receipts carry stream positions so /sync can send what changed.
CREATE TABLE profiles (
    user_id       TEXT PRIMARY KEY,
    displayname   TEXT,
    avatar_url    TEXT
);

CREATE TABLE account_data (
    user_id          TEXT NOT NULL,
    -- '' for global account data.
    room_id          TEXT NOT NULL,
    data_type        TEXT NOT NULL,
    content          TEXT NOT NULL,
    stream_ordering  BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_by_stream ON account_data (user_id, stream_ordering);

CREATE TABLE filters (
    user_id    TEXT NOT NULL,
    filter_id  BIGINT NOT NULL,
    filter     TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

CREATE TABLE receipts (
    room_id          TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    receipt_type     TEXT NOT NULL,
    -- '' for unthreaded receipts.
    thread_id        TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    ts               BIGINT NOT NULL,
    stream_ordering  BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_by_stream ON receipts (room_id, stream_ordering);
