-- Swarm memory: harbors, the tuple space, pheromone trails, file-claim history for the heat map, and the
-- arbiter's violations. Owned by core/harbors.py, core/tuples.py, core/pheromones.py and core/arbiter.py.

CREATE TABLE harbors (
  name            TEXT PRIMARY KEY,
  capabilities    TEXT NOT NULL DEFAULT '[]',
  channels        TEXT NOT NULL DEFAULT '[]',
  agent_patterns  TEXT NOT NULL DEFAULT '[]',
  created_at      INTEGER NOT NULL,
  expires_at      INTEGER,
  metadata        TEXT
);

CREATE TABLE harbor_members (
  harbor_name   TEXT NOT NULL REFERENCES harbors(name) ON DELETE CASCADE,
  agent_id      TEXT NOT NULL,
  identity      TEXT,
  capabilities  TEXT NOT NULL DEFAULT '[]',
  joined_at     INTEGER NOT NULL,
  PRIMARY KEY (harbor_name, agent_id)
);
CREATE INDEX harbor_members_agent ON harbor_members(agent_id);

-- A tuple lives here until taken or expired; AUTOINCREMENT so an id is never reused, even after a take.
-- harbor NULL is the global space.
CREATE TABLE tuples (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  harbor      TEXT,
  fields      TEXT NOT NULL,
  written_by  TEXT,
  created_at  INTEGER NOT NULL,
  expires_at  INTEGER
);
CREATE INDEX tuples_expires ON tuples(expires_at) WHERE expires_at IS NOT NULL;

-- The last spray of each (harbor, table, entity, key); decay is computed at read from sprayed_at.
CREATE TABLE pheromones (
  harbor      TEXT NOT NULL DEFAULT '',
  tbl         TEXT NOT NULL,
  entity_id   TEXT NOT NULL,
  key         TEXT NOT NULL,
  strength    REAL NOT NULL,
  sprayed_at  INTEGER NOT NULL,
  PRIMARY KEY (harbor, tbl, entity_id, key)
);

-- File-claim history, built from file.claim / file.release / session.end events (the heat map's input).
CREATE TABLE pheromone_claims (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id  TEXT NOT NULL,
  agent_id    TEXT,
  path        TEXT NOT NULL,
  claimed_at  INTEGER NOT NULL,
  released_at INTEGER,
  conflicted  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX pheromone_claims_session ON pheromone_claims(session_id) WHERE released_at IS NULL;
CREATE INDEX pheromone_claims_claimed ON pheromone_claims(claimed_at);

CREATE TABLE arbiter_violations (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  at          INTEGER NOT NULL,
  rule        TEXT NOT NULL,
  severity    TEXT NOT NULL,
  agent_id    TEXT,
  details     TEXT NOT NULL,
  event_kind  TEXT
);
CREATE INDEX arbiter_violations_at ON arbiter_violations(at);
