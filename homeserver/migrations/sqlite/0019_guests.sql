-- Guest accounts (`POST /register?kind=guest`): no password, limited to the endpoints the spec
-- lists for guests. Their access tokens say so too, so the gate costs no read per request.
ALTER TABLE users ADD COLUMN is_guest SMALLINT NOT NULL DEFAULT 0;
