-- blast schema v8: which worker wrote each ledger row (its name, `--worker`,
-- default the host name), so `blast report` can show the rate over time per
-- worker when several sent a campaign. Set by every insert and update of the
-- send path's ledger writer; reconcile and the breaker's requeue leave it.
-- Rows written before v8 keep NULL (unknown): nothing records who wrote them.
ALTER TABLE blast_deliveries ADD COLUMN worker TEXT;
