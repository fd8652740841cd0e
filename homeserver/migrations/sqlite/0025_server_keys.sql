-- Other servers' signing keys, as fetched from them and checked (`remote::keys`): one row per
-- key, with the key document it came from (signed by that server), which the notary endpoint
-- (`/_matrix/key/v2/query`) serves again. `expired_ts` is set for keys the server listed as
-- old; `valid_until_ts` is the document's.
CREATE TABLE server_keys (
    server_name    TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts     BIGINT,
    document       TEXT NOT NULL,
    fetched_ts     BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
