-- The fleet: fleets that are up (restored at boot), every run of a fleet agent or `pd spawn` (history, the
-- queue, and what a restart after SIGKILL must reconcile), and open circuit breakers. Owned by portdaddy/fleet.

CREATE TABLE fleets (
  project_dir  TEXT PRIMARY KEY,
  name         TEXT NOT NULL,
  config_path  TEXT NOT NULL,
  path_env     TEXT,              -- PATH of the `pd fleet up` caller: backends are resolved against it
  up_at        INTEGER NOT NULL
);

-- status: queued | running | completed | failed | timeout | killed | lost | cancelled
-- spec is the JSON of what to run (backend, prompt or command, model, tools, env, cwd, timeout), so a queued
-- run survives a restart; pid + pid_start (the kernel's start time) identify an orphan after a SIGKILL.
CREATE TABLE fleet_runs (
  id           TEXT PRIMARY KEY,
  kind         TEXT NOT NULL CHECK (kind IN ('fleet', 'spawn')),
  project_dir  TEXT,
  fleet        TEXT,
  agent        TEXT NOT NULL,
  identity     TEXT NOT NULL,
  backend      TEXT NOT NULL,
  spec         TEXT NOT NULL,
  trigger      TEXT,
  attempt      INTEGER NOT NULL DEFAULT 0,
  status       TEXT NOT NULL,
  pid          INTEGER,
  pid_start    INTEGER,
  exit_code    INTEGER,
  error        TEXT,
  log_path     TEXT,
  session_id   TEXT,
  created_at   INTEGER NOT NULL,
  started_at   INTEGER,
  ended_at     INTEGER
);
CREATE INDEX fleet_runs_status ON fleet_runs(status);
CREATE INDEX fleet_runs_agent ON fleet_runs(project_dir, agent, created_at);

CREATE TABLE fleet_circuits (
  project_dir  TEXT NOT NULL,
  agent        TEXT NOT NULL,
  opened_at    INTEGER NOT NULL,
  reason       TEXT NOT NULL,
  PRIMARY KEY (project_dir, agent)
);
