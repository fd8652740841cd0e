-- Accounts, devices, access-token sessions, User-Interactive Auth sessions, registration tokens.
CREATE TABLE users (
    user_id        TEXT PRIMARY KEY,
    password_hash  TEXT,
    is_admin       SMALLINT NOT NULL DEFAULT 0,
    deactivated    SMALLINT NOT NULL DEFAULT 0,
    created_ts     BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id        TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    display_name   TEXT,
    last_seen_ip   TEXT,
    last_seen_ts   BIGINT,
    created_ts     BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One row per logged-in session; an access token names its session and generation, so deleting
-- the row (logout) or bumping the generation (refresh) revokes tokens at once.
CREATE TABLE sessions (
    session_id          TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    generation          BIGINT NOT NULL,
    refresh_token_hash  TEXT UNIQUE,
    created_ts          BIGINT NOT NULL
);
CREATE INDEX sessions_by_device ON sessions (user_id, device_id);

CREATE TABLE uia_sessions (
    session_id  TEXT PRIMARY KEY,
    operation   TEXT NOT NULL,
    user_id     TEXT,
    completed   TEXT NOT NULL,
    created_ts  BIGINT NOT NULL
);

CREATE TABLE registration_tokens (
    token_hash    TEXT PRIMARY KEY,
    uses_allowed  BIGINT,
    completed     BIGINT NOT NULL DEFAULT 0,
    expiry_ts     BIGINT,
    created_ts    BIGINT NOT NULL
);
