-- The coordination journal: agents and their liveness, the salvage queue, sessions, sealed notes, file claims
-- and the activity log. Owned by core/agents.py, core/sessions.py and core/activity.py.

-- liveness: active | stale | dead. A dead agent stays here until its salvage entry is claimed or dismissed.
CREATE TABLE agents (
  id              TEXT PRIMARY KEY,
  name            TEXT,
  type            TEXT NOT NULL DEFAULT 'cli',
  pid             INTEGER,
  identity        TEXT,
  purpose         TEXT,
  status          TEXT NOT NULL DEFAULT 'ready',
  liveness        TEXT NOT NULL DEFAULT 'active',
  capabilities    TEXT,
  worktree        TEXT,
  metadata        TEXT,
  registered_at   INTEGER NOT NULL,
  last_heartbeat  INTEGER NOT NULL,
  dead_at         INTEGER
);

-- One entry per dead agent (its id is the agent's). status: pending | claimed | completed | dismissed. Rows are
-- kept after completion: claimed_by / completed_by are the lineage of the work.
CREATE TABLE salvage (
  agent_id        TEXT PRIMARY KEY,
  identity        TEXT,
  purpose         TEXT,
  session_ids     TEXT NOT NULL DEFAULT '[]',
  last_heartbeat  INTEGER,
  detected_at     INTEGER NOT NULL,
  reason          TEXT,
  status          TEXT NOT NULL DEFAULT 'pending',
  claimed_by      TEXT,
  claimed_at      INTEGER,
  completed_by    TEXT,
  completed_at    INTEGER
);
CREATE INDEX salvage_status ON salvage(status);

-- status: active | completed | abandoned. wrapped_key: the session's note key sealed by master.key.
-- note_count / head_hash: the head of the note chain, so a removed last note is detected too.
CREATE TABLE sessions (
  id              TEXT PRIMARY KEY,
  purpose         TEXT NOT NULL,
  status          TEXT NOT NULL DEFAULT 'active',
  agent_id        TEXT,
  worktree        TEXT,
  identity_project TEXT,
  created_at      INTEGER NOT NULL,
  updated_at      INTEGER NOT NULL,
  completed_at    INTEGER,
  metadata        TEXT,
  wrapped_key     BLOB NOT NULL,
  note_count      INTEGER NOT NULL DEFAULT 0,
  head_hash       TEXT NOT NULL
);
CREATE INDEX sessions_agent ON sessions(agent_id, status);
CREATE INDEX sessions_status ON sessions(status, updated_at);

-- Append-only: body is sealed (PyNaCl SecretBox under the session key); hash chains each note to the previous.
CREATE TABLE notes (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id  TEXT NOT NULL REFERENCES sessions(id),
  seq         INTEGER NOT NULL,
  agent_id    TEXT,
  type        TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  body        BLOB NOT NULL,
  prev_hash   TEXT NOT NULL,
  hash        TEXT NOT NULL,
  UNIQUE (session_id, seq)
);
CREATE INDEX notes_created ON notes(created_at);
CREATE TRIGGER notes_append_only_update BEFORE UPDATE ON notes
BEGIN SELECT RAISE(ABORT, 'notes are append-only'); END;
CREATE TRIGGER notes_append_only_delete BEFORE DELETE ON notes
BEGIN SELECT RAISE(ABORT, 'notes are append-only'); END;

-- Advisory claims: a normalised repo-relative path or glob (core/globs.py). released_at NULL = held.
CREATE TABLE file_claims (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  session_id  TEXT NOT NULL REFERENCES sessions(id),
  path        TEXT NOT NULL,
  claimed_at  INTEGER NOT NULL,
  released_at INTEGER,
  forced      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX file_claims_held ON file_claims(session_id) WHERE released_at IS NULL;

CREATE TABLE activity (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  timestamp   INTEGER NOT NULL,
  type        TEXT NOT NULL,
  agent_id    TEXT,
  target_id   TEXT,
  details     TEXT,
  metadata    TEXT
);
CREATE INDEX activity_timestamp ON activity(timestamp);
CREATE INDEX activity_type ON activity(type, timestamp);
