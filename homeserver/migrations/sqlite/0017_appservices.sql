-- Each application service's queue of transactions (appservice/sender.rs). Events up to
-- `last_pos` (a stream position) were delivered; `pending_*` is the transaction being delivered,
-- kept exactly as first built so a retry sends the same events under the same id; `lease_*` is
-- which worker may send it, until when (milliseconds, by the database's clock on Postgres).
CREATE TABLE appservice_queues (
    appservice_id  TEXT PRIMARY KEY,
    last_pos       BIGINT NOT NULL,
    next_txn       BIGINT NOT NULL DEFAULT 1,
    pending_txn    TEXT,
    pending_body   TEXT,
    pending_upto   BIGINT,
    lease_owner    TEXT,
    lease_until    BIGINT NOT NULL DEFAULT 0
);
