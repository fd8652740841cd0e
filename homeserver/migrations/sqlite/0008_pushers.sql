-- Pushers (where a user's notifications are sent), as the JSON clients gave.
CREATE TABLE pushers (
    user_id  TEXT NOT NULL,
    app_id   TEXT NOT NULL,
    pushkey  TEXT NOT NULL,
    data     TEXT NOT NULL,
    PRIMARY KEY (app_id, pushkey, user_id)
);
CREATE INDEX pushers_by_user ON pushers (user_id);
