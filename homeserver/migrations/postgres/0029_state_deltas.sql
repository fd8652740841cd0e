-- A state snapshot may be stored as the entries that differ from an earlier one (see
-- storage/state.rs): `prev_snapshot` names it, and `state` then lists [type, state_key, event id
-- or null where the key is gone]. Rows without it hold the whole map, as every row before did.
ALTER TABLE state_snapshots ADD COLUMN prev_snapshot BIGINT;
