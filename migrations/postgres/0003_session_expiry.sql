-- Persistent sessions expire (mqtt.persistent_session_expiry): the history row of the last
-- connection that used one records when its subscriptions and queued messages were discarded.
ALTER TABLE sessions ADD COLUMN expired_at TIMESTAMPTZ;
