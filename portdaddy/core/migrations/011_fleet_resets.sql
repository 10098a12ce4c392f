-- When `pd fleet reset` last closed an agent's breaker: the failures the breaker counts are read back from
-- fleet_runs at start, and those before a reset no longer count.
CREATE TABLE fleet_resets (
  project_dir  TEXT NOT NULL,
  agent        TEXT NOT NULL,
  reset_at     INTEGER NOT NULL,
  PRIMARY KEY (project_dir, agent)
);
