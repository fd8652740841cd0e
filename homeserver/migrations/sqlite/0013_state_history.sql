-- The changes of one piece of state over time (a user's memberships, the room's history
-- visibility), which decide who may read which events (rooms/visibility.rs).
CREATE INDEX events_by_state ON events (room_id, event_type, state_key, stream_ordering);
