-- MQTT 5 in presence. Each connection's protocol level ('3.1.1' or '5'; rows from before this
-- migration were all 3.1.1: a constant default adds the column without rewriting the table).
-- The MQTT 5 reason code of the DISCONNECT that ended it (the client's, else the one the broker
-- sent; NULL for 3.1.1 and without one) and the reason string of the client's DISCONNECT. Until
-- when the persistent session was held after it (NULL when the session ended with it, or went
-- on with a newer connection).
ALTER TABLE sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT '3.1.1';
ALTER TABLE sessions ADD COLUMN reason_code INTEGER;
ALTER TABLE sessions ADD COLUMN reason_string TEXT;
ALTER TABLE sessions ADD COLUMN session_expires_at TIMESTAMPTZ;
-- The device mirrors its current (latest) session's protocol level, as it does the peer and the
-- listener, and holds until when its persistent session is kept while it is offline: cleared
-- when the session expires or the device connects again.
ALTER TABLE devices ADD COLUMN protocol TEXT NOT NULL DEFAULT '3.1.1';
ALTER TABLE devices ADD COLUMN session_expires_at TIMESTAMPTZ;
-- A node's start drops the held sessions of its earlier boots (sessions live in memory): found
-- through this small partial index.
CREATE INDEX devices_held_sessions ON devices (node_id) WHERE session_expires_at IS NOT NULL;
