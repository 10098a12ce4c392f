-- Locks held by name are written to the lock journal (core/lockjournal.py) and folded in here within a second:
-- which journal file belongs to this store (its header names this id), and the last of its records folded in.
ALTER TABLE lock_fence ADD COLUMN journal_id TEXT NOT NULL DEFAULT '';
ALTER TABLE lock_fence ADD COLUMN journal_seq INTEGER NOT NULL DEFAULT 0;
UPDATE lock_fence SET journal_id = lower(hex(randomblob(16)));
