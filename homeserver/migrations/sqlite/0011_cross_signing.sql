-- Cross-signing: each user's master, self-signing and user-signing keys, as signed JSON.
CREATE TABLE cross_signing_keys (
    user_id     TEXT NOT NULL,
    -- "master", "self_signing" or "user_signing".
    usage       TEXT NOT NULL,
    json        TEXT NOT NULL,
    PRIMARY KEY (user_id, usage)
);

-- Signatures by a user's user-signing key on other users' master keys, shown only to the signer.
CREATE TABLE cross_signing_signatures (
    signer_id   TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    -- "ed25519:<public key>" of the signer's user-signing key.
    key_id      TEXT NOT NULL,
    signature   TEXT NOT NULL,
    PRIMARY KEY (signer_id, target_id, key_id)
);
