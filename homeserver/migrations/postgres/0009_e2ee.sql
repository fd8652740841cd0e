-- End-to-end encryption: what the server keeps so that clients can set up Olm and Megolm
-- sessions with each other's devices. The server never sees plaintext; these are public keys
-- and ciphertext envelopes.

-- Each device's identity keys, as the signed JSON object the device uploaded.
CREATE TABLE device_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- One-time keys, each claimed (and deleted) at most once.
CREATE TABLE one_time_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

-- One fallback key per device and algorithm, handed out when the one-time keys run out.
CREATE TABLE fallback_keys (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    algorithm   TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    json        TEXT NOT NULL,
    used        SMALLINT NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- The latest stream position at which a user's devices or keys changed (what others must
-- query again), and at which a device's key counts changed (what the device itself is told).
CREATE TABLE device_list_changes (
    user_id         TEXT NOT NULL PRIMARY KEY,
    stream_ordering BIGINT NOT NULL
);
CREATE INDEX device_list_changes_by_position ON device_list_changes (stream_ordering);
CREATE TABLE key_count_changes (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
CREATE INDEX key_count_changes_by_position ON key_count_changes (stream_ordering);

-- The embedded envelope queue: to-device messages waiting for their device, each at its
-- stream position. A message leaves once its device syncs with a token past it.
CREATE TABLE to_device (
    user_id         TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    json            TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, stream_ordering)
);
CREATE INDEX to_device_by_position ON to_device (stream_ordering);

-- Transaction ids of sendToDevice, so a retried request is not delivered twice.
CREATE TABLE to_device_txns (
    user_id     TEXT NOT NULL,
    device_id   TEXT NOT NULL,
    txn_id      TEXT NOT NULL,
    created_ts  BIGINT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
);
