-- blast schema v7: the final delivery, read back from the MTA's log
-- (`blast reconcile`). The injection's own status (`status`, the local
-- MTA's answer) never changes; the next hop's outcome goes beside it:
--   mta_status      delivered | bounced | expired | deferred (still queued)
--   mta_dsn         the DSN status (2.0.0, 5.1.1, 4.4.1...)
--   mta_reply       the remote reply or the last reason
--   mta_relay       the next hop (relay=...)
--   mta_delay_secs  Postfix's delay= (seconds from arrival to this outcome)
--   mta_at          when the MTA logged it (ISO 8601, UTC)
-- Reconcile looks recipients up by the queue id the MTA gave at injection.
ALTER TABLE blast_deliveries ADD COLUMN mta_status TEXT;
ALTER TABLE blast_deliveries ADD COLUMN mta_dsn TEXT;
ALTER TABLE blast_deliveries ADD COLUMN mta_reply TEXT;
ALTER TABLE blast_deliveries ADD COLUMN mta_relay TEXT;
ALTER TABLE blast_deliveries ADD COLUMN mta_delay_secs REAL;
ALTER TABLE blast_deliveries ADD COLUMN mta_at TEXT;
CREATE INDEX blast_deliveries_queue_id ON blast_deliveries (queue_id);
