-- Events of other servers that the auth rules reject, against their own auth events or against
-- the room's state when they arrive (soft failure), are kept as outliers with the reason: later
-- events may follow them, and they are not fetched or checked again, but they are never served,
-- shown or part of any state.
ALTER TABLE events ADD COLUMN rejected TEXT;
