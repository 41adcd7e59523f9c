-- blast schema v3 (PostgreSQL): the inbound paths. Signing key for VERP
-- addresses and unsubscribe tokens, bounce events, and who/what suppressed an
-- address.

-- Installation-wide settings. `hmac_key` (hex, 32 random bytes) signs VERP
-- addresses, X-Blast-Sig headers and unsubscribe tokens; it is created on first
-- use, so every worker sharing this database shares the key.
CREATE TABLE blast_settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- The patterns a campaign sent with, so `blast bounce ingest` can decode the
-- addresses bounces and unsubscribe mails arrive at without the campaign file.
ALTER TABLE blast_campaigns ADD COLUMN verp TEXT;
ALTER TABLE blast_campaigns ADD COLUMN unsubscribe_mailto TEXT;

-- Every bounce, complaint and auto-reply ingested, matched to a campaign and
-- recipient where VERP, the signed header or the DSN names one.
CREATE TABLE blast_bounces (
    id            BIGSERIAL PRIMARY KEY,
    campaign_id   BIGINT,
    recipient_id  BIGINT,
    address       TEXT NOT NULL,
    kind          TEXT NOT NULL,
    class         TEXT NOT NULL,
    reason        TEXT NOT NULL,
    status        TEXT,
    diagnostic    TEXT,
    source        TEXT NOT NULL,
    message_hash  TEXT NOT NULL,
    received_at   TEXT NOT NULL
);
-- The same mail ingested twice (a crash before the mailbox was updated)
-- records nothing new: (message_hash, address, kind) is unique.
CREATE UNIQUE INDEX blast_bounces_once ON blast_bounces (message_hash, address, kind);
CREATE INDEX blast_bounces_address ON blast_bounces (address, received_at);
CREATE INDEX blast_bounces_campaign ON blast_bounces (campaign_id, recipient_id);

-- Suppressions by time, for senders that watch for new ones mid-campaign.
CREATE INDEX blast_suppressions_created ON blast_suppressions (created_at);
