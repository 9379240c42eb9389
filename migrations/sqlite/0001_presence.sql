-- Presence: broker node boots, one row per session (history), current state per device.
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC); UUIDs are lowercase
-- hyphenated TEXT, whose text order is their time order.

CREATE TABLE nodes (
    boot_id      TEXT PRIMARY KEY,
    node_id      TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    recovered    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX nodes_node_id ON nodes (node_id, recovered);

CREATE TABLE sessions (
    session_id      TEXT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    boot_id         TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    connected_at    INTEGER NOT NULL,
    disconnected_at INTEGER,
    reason          TEXT,
    peer            TEXT NOT NULL,
    keep_alive      INTEGER NOT NULL,
    clean_session   INTEGER NOT NULL
);
CREATE INDEX sessions_device ON sessions (device_id, session_id DESC);
CREATE INDEX sessions_open_by_boot ON sessions (boot_id) WHERE disconnected_at IS NULL;

CREATE TABLE devices (
    device_id       TEXT PRIMARY KEY,
    online          INTEGER NOT NULL,
    session_id      TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    connected_at    INTEGER NOT NULL,
    disconnected_at INTEGER,
    last_reason     TEXT,
    peer            TEXT NOT NULL,
    keep_alive      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX devices_online ON devices (online, device_id);
