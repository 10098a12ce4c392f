-- A fleet agent that fails run after run keeps one pending salvage entry, its newest failed run's (spec/fleet.md,
-- "Repeated failures"): the entries it replaced become 'superseded', and it counts the failed runs it stands for
-- and since when. Entries from before stand for their own death alone.
ALTER TABLE salvage ADD COLUMN failures INTEGER NOT NULL DEFAULT 1;
ALTER TABLE salvage ADD COLUMN failing_since INTEGER;
UPDATE salvage SET failing_since = detected_at;
