-- What an event's `unsigned` tells its readers besides its age: the state event it replaced
-- (`replaces_state`, and through it `prev_content` and `prev_sender`), and the device and
-- transaction id it was sent with (`transaction_id`, shown to that device only).
ALTER TABLE events ADD COLUMN replaces_state TEXT;
ALTER TABLE events ADD COLUMN txn_device TEXT;
ALTER TABLE events ADD COLUMN txn_id TEXT;
