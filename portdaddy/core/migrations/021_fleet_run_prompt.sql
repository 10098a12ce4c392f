-- The prompt a run was sent (spec/fleet.md, "What a run was asked"): the task's prompt with the Trigger context block
-- the supervisor appends, written as the run starts, so pd fleet show says what the agent was asked even after the
-- code that builds that block changes. NULL: the run has not started, or started before this migration. A prompt
-- longer than the cap keeps its start and its end around a marked cut; prompt_dropped counts the characters cut.
ALTER TABLE fleet_runs ADD COLUMN prompt TEXT;
ALTER TABLE fleet_runs ADD COLUMN prompt_dropped INTEGER NOT NULL DEFAULT 0;
