-- Authentication: the user name a connection authenticated as (NULL without one, or when no
-- password was checked; never the password) and how it was authenticated (anonymous, password,
-- certificate). Rows from before this migration were all anonymous. A constant default adds the
-- column without rewriting the table.
ALTER TABLE sessions ADD COLUMN username TEXT;
ALTER TABLE sessions ADD COLUMN auth_method TEXT NOT NULL DEFAULT 'anonymous';
-- The device mirrors its current (latest) session's, as it does the peer and the listener.
ALTER TABLE devices ADD COLUMN username TEXT;
ALTER TABLE devices ADD COLUMN auth_method TEXT NOT NULL DEFAULT 'anonymous';
