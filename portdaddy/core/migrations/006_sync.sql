-- Synchronisation: locks with fencing tokens, channel messages (durable capped history), inboxes, webhooks.
-- Owned by core/locks.py, core/broker.py, core/inbox.py and core/webhooks.py.

CREATE TABLE locks (
  name         TEXT PRIMARY KEY,
  owner        TEXT NOT NULL,
  token        INTEGER NOT NULL,
  pid          INTEGER,
  acquired_at  INTEGER NOT NULL,
  expires_at   INTEGER NOT NULL,
  conn_bound   INTEGER NOT NULL DEFAULT 0,  -- released when its IPC connection closes (or the daemon restarts)
  metadata     TEXT
);

-- The last fencing token granted, for every lock: one row, so a token is never reused, even after a restart.
CREATE TABLE lock_fence (
  id          INTEGER PRIMARY KEY CHECK (id = 1),
  last_token  INTEGER NOT NULL
);
INSERT INTO lock_fence (id, last_token) VALUES (1, 0);

-- AUTOINCREMENT: ids are global and never reused, even after trimming, so they work as resume cursors.
CREATE TABLE messages (
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  channel       TEXT NOT NULL,
  payload       TEXT NOT NULL,             -- JSON text of the value
  content_type  TEXT NOT NULL,             -- json | text
  sender        TEXT,
  created_at    INTEGER NOT NULL
);
CREATE INDEX messages_channel ON messages(channel, id);

CREATE TABLE inbox (
  id            INTEGER PRIMARY KEY AUTOINCREMENT,
  agent_id      TEXT NOT NULL,
  sender        TEXT,
  content       TEXT NOT NULL,             -- JSON text of the value
  content_type  TEXT NOT NULL,             -- json | text
  type          TEXT NOT NULL DEFAULT 'message',
  read          INTEGER NOT NULL DEFAULT 0,
  created_at    INTEGER NOT NULL
);
CREATE INDEX inbox_agent ON inbox(agent_id, id);

CREATE TABLE webhooks (
  id               TEXT PRIMARY KEY,
  url              TEXT NOT NULL,
  secret           TEXT,
  events           TEXT NOT NULL,          -- JSON array of event kinds, or ["*"]
  filter_pattern   TEXT,
  active           INTEGER NOT NULL DEFAULT 1,
  created_at       INTEGER NOT NULL,
  last_triggered   INTEGER,
  success_count    INTEGER NOT NULL DEFAULT 0,
  failure_count    INTEGER NOT NULL DEFAULT 0,
  metadata         TEXT
);

-- A delivery is written before its first attempt; pending/retrying ones are picked up again after a restart.
CREATE TABLE webhook_deliveries (
  id               TEXT PRIMARY KEY,
  webhook_id       TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
  event            TEXT NOT NULL,
  body             TEXT NOT NULL,          -- the exact bytes sent (and signed)
  status           TEXT NOT NULL,          -- pending | retrying | delivered | failed
  attempts         INTEGER NOT NULL DEFAULT 0,
  next_attempt_at  INTEGER NOT NULL,
  last_attempt     INTEGER,
  response_status  INTEGER,
  response_body    TEXT,
  created_at       INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at);
