-- Key changes only one user is told of: their own user-signing key, and their signatures of
-- others' master keys (made with it). `user_id`'s devices find `changed_user` in
-- `device_lists.changed`; the people they share rooms with are not told (as
-- `device_list_changes` would tell them). The latest position per pair.
CREATE TABLE own_key_changes (
    user_id         TEXT NOT NULL,
    changed_user    TEXT NOT NULL,
    stream_ordering BIGINT NOT NULL,
    PRIMARY KEY (user_id, changed_user)
);
CREATE INDEX own_key_changes_by_position ON own_key_changes (stream_ordering);
