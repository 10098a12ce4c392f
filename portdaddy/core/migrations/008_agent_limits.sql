-- Per-agent quotas (reference §7 and §4): how many locks an agent may hold or wait for, and how many services it
-- may claim. NULL means the default (20 locks, 50 services).
ALTER TABLE agents ADD COLUMN max_locks INTEGER;
ALTER TABLE agents ADD COLUMN max_services INTEGER;
