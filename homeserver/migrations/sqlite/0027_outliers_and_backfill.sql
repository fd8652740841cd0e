-- Events of rooms joined through other servers that are in no timeline (the state and auth
-- chain a join brings) are outliers; events fetched from before the join (backfill) are in the
-- timeline, before everything this server saw live. Both have negative stream positions, taken
-- downwards from `backward_positions` (one row), so they never collide and live positions stay
-- the stream's.
ALTER TABLE events ADD COLUMN outlier SMALLINT NOT NULL DEFAULT 0;
CREATE TABLE backward_positions (
    id    SMALLINT PRIMARY KEY,
    next  BIGINT NOT NULL
);
INSERT INTO backward_positions (id, next) VALUES (1, -1);
