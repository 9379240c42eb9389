-- History stays bounded: sessions folded into a kept row instead of a row each, and retention
-- (by age: sessions_disconnected_at of 0001; by rows per device: sessions_device of 0001).

-- Further sessions of the device folded into this row: they began and ended within the same
-- bridge batch as this one, after it, with the same reason (bridge.coalesce_after).
ALTER TABLE sessions ADD COLUMN coalesced INTEGER NOT NULL DEFAULT 0;
