-- The fleet forgets old runs whole (spec/fleet.md, "Retention"): a run's ended sessions go with their notes and
-- file claims. Notes stay append-only while their session exists; a note may be deleted only once its session is
-- gone (in the same transaction, with foreign keys deferred to the commit), so no note of a kept session can go.
DROP TRIGGER notes_append_only_delete;
CREATE TRIGGER notes_append_only_delete BEFORE DELETE ON notes
WHEN EXISTS (SELECT 1 FROM sessions WHERE id = old.session_id)
BEGIN SELECT RAISE(ABORT, 'notes are append-only'); END;
-- A session's claims, released ones too (file_claims_held holds only those still held): for that delete.
CREATE INDEX file_claims_session ON file_claims(session_id);
