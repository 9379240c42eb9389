-- Transports and mutual TLS: the listener a connection came in on (tcp, tls, ws, wss) and the
-- identity of the client's verified TLS certificate (NULL without one). Rows from before this
-- migration were all TCP, without a certificate.
ALTER TABLE sessions ADD COLUMN listener TEXT NOT NULL DEFAULT 'tcp';
ALTER TABLE sessions ADD COLUMN identity TEXT;
-- The device mirrors its current (latest) session's, as it does the peer.
ALTER TABLE devices ADD COLUMN listener TEXT NOT NULL DEFAULT 'tcp';
ALTER TABLE devices ADD COLUMN identity TEXT;
