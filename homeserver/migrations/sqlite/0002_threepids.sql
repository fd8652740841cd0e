-- Verified addresses (email, phone numbers) and the one-time-code sessions that verify them.
CREATE TABLE user_threepids (
    medium        TEXT NOT NULL,
    address       TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    validated_ts  BIGINT NOT NULL,
    added_ts      BIGINT NOT NULL,
    PRIMARY KEY (medium, address)
);
CREATE INDEX user_threepids_by_user ON user_threepids (user_id);

-- The client secret and the code are stored only as hashes; the code's is keyed with the
-- server's secret, since six digits alone would fall to a dictionary.
CREATE TABLE threepid_sessions (
    sid                 TEXT PRIMARY KEY,
    client_secret_hash  TEXT NOT NULL,
    medium              TEXT NOT NULL,
    address             TEXT NOT NULL,
    purpose             TEXT NOT NULL,
    code_hash           TEXT NOT NULL,
    send_attempt        BIGINT NOT NULL,
    failed_attempts     BIGINT NOT NULL DEFAULT 0,
    validated_ts        BIGINT,
    consumed            SMALLINT NOT NULL DEFAULT 0,
    created_ts          BIGINT NOT NULL,
    code_expires_ts     BIGINT NOT NULL
);
CREATE INDEX threepid_sessions_by_request ON threepid_sessions (client_secret_hash, medium, address, purpose);
CREATE INDEX threepid_sessions_by_expiry ON threepid_sessions (code_expires_ts);

-- UIA sessions remember which verified addresses their stages proved.
ALTER TABLE uia_sessions ADD COLUMN threepid_sids TEXT NOT NULL DEFAULT '[]';
