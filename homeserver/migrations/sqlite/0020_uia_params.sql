-- UIA sessions remember the parameters of the request that started them (a client may send
-- only `auth` in later steps) and what the completed operation produced (the registered user,
-- so that a completed registration replayed gives the same account, as Synapse does).
ALTER TABLE uia_sessions ADD COLUMN params TEXT;
ALTER TABLE uia_sessions ADD COLUMN result TEXT;
