-- blast schema v2 (SQLite): leases, pause/cancel reasons, scheduling, retry
-- schedule, attempt history, suppression list.

-- Who is sending a campaign, until when (a heartbeat extends it). A crashed
-- holder's lease simply expires.
ALTER TABLE blast_campaigns ADD COLUMN lease_owner TEXT;
ALTER TABLE blast_campaigns ADD COLUMN lease_until TEXT;
-- Why the campaign is paused, held or cancelled.
ALTER TABLE blast_campaigns ADD COLUMN reason TEXT;
-- Scheduled campaigns: when to send, and the frozen campaign (JSON: the
-- campaign file and its templates) so later edits do not change the send.
ALTER TABLE blast_campaigns ADD COLUMN send_at TEXT;
ALTER TABLE blast_campaigns ADD COLUMN spec TEXT;

-- Deferred recipients: first deferral and when to try again.
ALTER TABLE blast_deliveries ADD COLUMN first_attempt_at TEXT;
ALTER TABLE blast_deliveries ADD COLUMN next_attempt_at TEXT;

-- Every answer, one row per attempt (blast_deliveries keeps the latest).
CREATE TABLE blast_attempts (
    campaign_id      BIGINT NOT NULL,
    recipient_id     BIGINT NOT NULL,
    status           TEXT NOT NULL,
    smtp_code        INTEGER,
    enhanced_status  TEXT,
    reply            TEXT,
    queue_id         TEXT,
    relay            TEXT,
    at               TEXT NOT NULL
);
CREATE INDEX blast_attempts_recipient ON blast_attempts (campaign_id, recipient_id);

-- Addresses that get nothing more: hard bounces, complaints, unsubscribes.
-- `address` is lower-cased.
CREATE TABLE blast_suppressions (
    address     TEXT PRIMARY KEY,
    reason      TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
