-- The fleet agent whose run a session is (spec/journal.md, "Fleet runs in the views"): written only by the fleet as
-- it starts a run's session, never from a request, so no client can make its own session pass for a run and have
-- it folded out of the others' views (the fold read the session's metadata, which any client sets). NULL for every
-- other session, pd spawn runs' too (each is a task of its own).
ALTER TABLE sessions ADD COLUMN fleet_agent TEXT;
-- Sessions from before: those the old rule folded (metadata of a fleet run, the run as its agent) and the fleet's
-- own row of that run names as its session.
UPDATE sessions SET fleet_agent = (SELECT r.agent FROM fleet_runs r WHERE r.session_id = sessions.id
                                   AND r.kind = 'fleet' AND r.id = sessions.agent_id)
WHERE json_extract(metadata, '$.kind') = 'fleet' AND json_extract(metadata, '$.runId') = agent_id;
-- The views read each part in recency order and stop at their limit (core/sessions.py): active sessions come
-- from sessions_status, other ended sessions from sessions_ended, fleet agents' ended runs (a hundred an agent
-- kept, spec/fleet.md "Retention") from sessions_runs, grouped by fleet agent with the newest last.
CREATE INDEX sessions_ended ON sessions(updated_at) WHERE fleet_agent IS NULL AND status <> 'active';
CREATE INDEX sessions_runs ON sessions(worktree, fleet_agent, updated_at, status, created_at) WHERE fleet_agent IS NOT NULL
                                                                           AND status <> 'active';
