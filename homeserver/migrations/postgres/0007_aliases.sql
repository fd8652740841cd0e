-- Room aliases (#name:server → room).
CREATE TABLE room_aliases (
    alias       TEXT PRIMARY KEY,
    room_id     TEXT NOT NULL,
    creator     TEXT NOT NULL,
    created_ts  BIGINT NOT NULL
);
CREATE INDEX room_aliases_by_room ON room_aliases (room_id);
