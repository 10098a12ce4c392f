-- A webhook's deliveries by webhook: `pd webhook deliveries` and deleting a webhook (ON DELETE CASCADE)
-- scanned every delivery of every hook.
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, created_at);
