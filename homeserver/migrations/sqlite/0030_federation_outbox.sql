-- What this server has yet to send to each other server (see remote/outbox.rs): events (`pdu`,
-- with their stream position) and EDUs, in the order queued; removed once the destination took
-- the transaction that carried them.
CREATE TABLE federation_outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    destination  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    position     BIGINT,
    body         TEXT NOT NULL
);
CREATE INDEX federation_outbox_by_destination ON federation_outbox (destination, id);

-- Which worker sends a destination's queue, until when (one transaction in flight per
-- destination, whichever worker queued its items).
CREATE TABLE federation_senders (
    destination  TEXT PRIMARY KEY,
    worker       TEXT NOT NULL,
    until_ts     BIGINT NOT NULL
);
