-- A webhook whose endpoint is gone failed every delivery forever. The current run of failed deliveries (how
-- many, since when) is kept so that it survives a restart; a long enough run disables the hook (active=0) with
-- the time and the reason, so `pd webhook ls` says why. Enabling it, or giving it a new url, clears them.
ALTER TABLE webhooks ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhooks ADD COLUMN failing_since INTEGER;
ALTER TABLE webhooks ADD COLUMN disabled_at INTEGER;
ALTER TABLE webhooks ADD COLUMN disabled_reason TEXT;
