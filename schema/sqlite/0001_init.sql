-- blast schema v1 (SQLite). Timestamps are RFC 3339 UTC text with millisecond
-- precision ("2026-11-29T18:00:00.000Z"), which sorts and compares as text.

-- The built-in audience table filled by `blast import`. Extra CSV columns live in
-- `attributes` (a JSON object) and reach templates by name.
CREATE TABLE IF NOT EXISTS subscribers (
    id          INTEGER PRIMARY KEY,
    email       TEXT NOT NULL,
    attributes  TEXT NOT NULL DEFAULT '{}',
    created_at  TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS subscribers_email_key ON subscribers (lower(email));

-- One row per campaign name; `max_recipient_id` is fixed on the first run so a
-- resumed campaign targets the audience it started with.
CREATE TABLE blast_campaigns (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    state             TEXT NOT NULL,
    max_recipient_id  BIGINT NOT NULL,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);

-- The ledger: at most one row per (campaign, recipient), written only after the
-- MTA answered. `status` is one of queued | sending | sent | deferred | failed.
CREATE TABLE blast_deliveries (
    campaign_id      BIGINT NOT NULL REFERENCES blast_campaigns (id),
    recipient_id     BIGINT NOT NULL,
    email            TEXT NOT NULL,
    status           TEXT NOT NULL,
    smtp_code        INTEGER,
    enhanced_status  TEXT,
    reply            TEXT,
    queue_id         TEXT,
    relay            TEXT,
    attempts         INTEGER NOT NULL DEFAULT 1,
    updated_at       TEXT NOT NULL,
    PRIMARY KEY (campaign_id, recipient_id)
);
CREATE INDEX blast_deliveries_status ON blast_deliveries (campaign_id, status);
