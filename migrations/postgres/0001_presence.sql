-- Presence: broker node boots, one row per session (history), current state per device.

-- One row per start of a broker node. Crash recovery closes the sessions of a node's earlier
-- boots at their last heartbeat.
CREATE TABLE nodes (
    boot_id      UUID PRIMARY KEY,
    node_id      TEXT NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    -- Set once this boot's orphaned sessions have been closed by a later boot.
    recovered    BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX nodes_node_id ON nodes (node_id, recovered);

-- One row per MQTT connection (session id = UUIDv7: time-sortable). Idempotent on session_id.
CREATE TABLE sessions (
    session_id      UUID PRIMARY KEY,
    device_id       TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    boot_id         UUID NOT NULL,
    seq             BIGINT NOT NULL,
    connected_at    TIMESTAMPTZ NOT NULL,
    disconnected_at TIMESTAMPTZ,
    reason          TEXT,
    peer            TEXT NOT NULL,
    keep_alive      INTEGER NOT NULL,
    clean_session   BOOLEAN NOT NULL
);
CREATE INDEX sessions_device ON sessions (device_id, session_id DESC);
CREATE INDEX sessions_open_by_boot ON sessions (boot_id) WHERE disconnected_at IS NULL;
CREATE INDEX sessions_connected_at ON sessions (connected_at);
CREATE INDEX sessions_disconnected_at ON sessions (disconnected_at);

-- Current state per device. `session_id` fences updates: an event of an older session never
-- overwrites a newer one.
CREATE TABLE devices (
    device_id       TEXT PRIMARY KEY,
    online          BOOLEAN NOT NULL,
    session_id      UUID NOT NULL,
    node_id         TEXT NOT NULL,
    connected_at    TIMESTAMPTZ NOT NULL,
    disconnected_at TIMESTAMPTZ,
    last_reason     TEXT,
    peer            TEXT NOT NULL,
    keep_alive      INTEGER NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX devices_online ON devices (online, device_id);
