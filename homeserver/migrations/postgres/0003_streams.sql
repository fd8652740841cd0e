-- Stream positions: the global order /sync tokens count in.
-- Positions are handed out in blocks from one counter. Each writer (a server process) publishes
-- the lowest position it may still commit; readers never go past the lowest of those, so a sync
-- never skips a position that commits late (see storage/stream.rs).
CREATE TABLE stream_counter (
    id        SMALLINT PRIMARY KEY,
    position  BIGINT NOT NULL
);
INSERT INTO stream_counter (id, position) VALUES (1, 0);

CREATE TABLE stream_writers (
    writer_id          TEXT PRIMARY KEY,
    -- NULL: nothing in flight.
    lowest_unfinished  BIGINT,
    heartbeat_ts       BIGINT NOT NULL
);
