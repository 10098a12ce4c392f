-- Bytes of output cut from the middle of a run's log when it ended (a log keeps its start and its end).
ALTER TABLE fleet_runs ADD COLUMN log_dropped INTEGER NOT NULL DEFAULT 0;
