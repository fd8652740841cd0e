-- What a user invited to a room of another server is shown of it before joining: the stripped
-- state the inviting server sent with the invite (`/_matrix/federation/v2/invite`), as a JSON
-- list of stripped state events. Gone once the user joins, leaves or is invited again.
CREATE TABLE invite_states (
    room_id  TEXT NOT NULL,
    user_id  TEXT NOT NULL,
    state    TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
