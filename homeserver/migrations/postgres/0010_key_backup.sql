-- Server-side key backup: Megolm session keys, encrypted by the client for a key the server
-- never sees, kept per backup version.
CREATE TABLE backup_versions (
    user_id     TEXT NOT NULL,
    version     BIGINT NOT NULL,
    -- {"algorithm": ..., "auth_data": {...}} as the client gave it.
    algorithm   TEXT NOT NULL,
    -- Changes whenever the version's keys change, so clients can tell their copy is current.
    etag        BIGINT NOT NULL DEFAULT 0,
    deleted     SMALLINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE backup_keys (
    user_id             TEXT NOT NULL,
    version             BIGINT NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count     BIGINT NOT NULL,
    is_verified         SMALLINT NOT NULL,
    session_data        TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
