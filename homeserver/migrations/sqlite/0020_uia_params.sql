-- UIA sessions remember the parameters of the request that started them (a client may send
-- only `auth` in later steps) and what the completed operation produced (the registered user,
-- so that a completed registration replayed gives the same account, as Synapse does).
ALTER TABLE uia_sessions ADD COLUMN params TEXT;
ALTER TABLE uia_sessions ADD COLUMN result TEXT;
-- Pushers remember the device that set them: deleting a device (logout, password change with
-- logout_devices, device deletion) deletes its pushers, as Synapse does with the access token's.
ALTER TABLE pushers ADD COLUMN device_id TEXT;
