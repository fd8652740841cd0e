-- How readers tell a dead stream writer (storage/stream.rs): the worker it belongs to across
-- restarts, and the database session tag of the run that wrote it (Postgres).
ALTER TABLE stream_writers ADD COLUMN instance TEXT;
ALTER TABLE stream_writers ADD COLUMN tag TEXT;
