-- Database credentials (auth.database): one row per device user name, managed through the REST
-- API. The password is kept as an argon2id PHC string only; `publish` and `subscribe` are JSON
-- arrays of the topic filters the credential grants (NULL: none listed). A revoked row never
-- authenticates; creating the user name again replaces it. Timestamps are INTEGER
-- microseconds since the Unix epoch (UTC).
CREATE TABLE credentials (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    publish       TEXT,
    subscribe     TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);
