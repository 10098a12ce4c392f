-- A respawn waits out its delay as a queued run that may not start before not_before (ms since the epoch), so
-- a daemon restart keeps it like any queued run. NULL: it may start at once.
ALTER TABLE fleet_runs ADD COLUMN not_before INTEGER;
