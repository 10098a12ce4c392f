-- Service registry: one row per claimed identity; the port is unique across identities.
CREATE TABLE services (
  id          TEXT PRIMARY KEY,
  port        INTEGER NOT NULL UNIQUE,
  pid         INTEGER,
  cmd         TEXT,
  cwd         TEXT,
  status      TEXT NOT NULL DEFAULT 'assigned',
  agent_id    TEXT,
  created_at  INTEGER NOT NULL,
  last_seen   INTEGER NOT NULL,
  expires_at  INTEGER,
  metadata    TEXT
);
CREATE INDEX services_expires ON services(expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE endpoints (
  service_id  TEXT NOT NULL REFERENCES services(id) ON DELETE CASCADE,
  env         TEXT NOT NULL,
  url         TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  updated_at  INTEGER NOT NULL,
  PRIMARY KEY (service_id, env)
);
