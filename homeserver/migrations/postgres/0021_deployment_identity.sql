-- What every worker of a deployment must share, recorded by the first worker to start: the
-- server's signing key (key id and public key) and a fingerprint of the token secret. A worker
-- that brings another refuses to start.
CREATE TABLE deployment_identity (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
