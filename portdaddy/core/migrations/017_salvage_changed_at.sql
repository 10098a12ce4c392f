-- Salvage retention: an entry is kept a month after it last changed (its agent died, it was claimed, given
-- back, completed or dismissed), so when that was is needed. Entries from before count from their latest time.
ALTER TABLE salvage ADD COLUMN changed_at INTEGER;
UPDATE salvage SET changed_at = max(detected_at, coalesce(claimed_at, 0), coalesce(completed_at, 0));
CREATE INDEX salvage_changed ON salvage(changed_at);
