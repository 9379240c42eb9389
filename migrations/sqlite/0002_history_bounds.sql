-- History stays bounded: sessions folded into a kept row instead of a row each, and retention
-- by age and by rows per device (the latter uses sessions_device of 0001).

-- Further sessions of the device folded into this row: they began and ended within the same
-- bridge batch as this one, after it, with the same reason (bridge.coalesce_after).
ALTER TABLE sessions ADD COLUMN coalesced INTEGER NOT NULL DEFAULT 0;

-- Retention by age deletes closed sessions oldest first.
CREATE INDEX sessions_disconnected_at ON sessions (disconnected_at)
    WHERE disconnected_at IS NOT NULL;
