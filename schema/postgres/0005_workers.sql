-- blast schema v5: many workers on one campaign. Every time here is the
-- database's clock in milliseconds since the epoch, never a worker's.

-- Who sends a campaign: one row per worker name. A row whose lease_until has
-- passed is a dead worker; a live one with the same name makes a second
-- process exit at once (cron overlap).
CREATE TABLE blast_workers (
    campaign_id   BIGINT NOT NULL REFERENCES blast_campaigns (id),
    name          TEXT NOT NULL,
    process       TEXT NOT NULL,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    lease_until   BIGINT NOT NULL,
    sent          BIGINT NOT NULL DEFAULT 0,
    rate          DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, name)
);

-- Ranges of recipient ids handed to workers, a chunk of the keyset each.
-- `token` is the fencing token: every grant takes a new, larger one from
-- blast_campaigns.fence, and a worker's ledger writes for the range count
-- only while its token is the range's current one.
CREATE TABLE blast_claims (
    campaign_id  BIGINT NOT NULL REFERENCES blast_campaigns (id),
    first_id     BIGINT NOT NULL,
    last_id      BIGINT NOT NULL,
    worker       TEXT,
    token        BIGINT NOT NULL,
    lease_until  BIGINT NOT NULL,
    done         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, first_id)
);
CREATE INDEX blast_claims_open ON blast_claims (campaign_id, done, lease_until);

-- The keyset cursor: ids up to claimed_to are covered by claims of this pass.
ALTER TABLE blast_campaigns ADD COLUMN claimed_to BIGINT;
-- Every recipient with an id up to final_to has a final outcome (sent,
-- failed, suppressed): a new pass starts its claims after it, so a resume
-- of a 10M campaign does not step over the millions already done. Set
-- from the claims a pass completed with nothing left to retry; cleared
-- when the breaker turns refusals back into deferrals.
ALTER TABLE blast_campaigns ADD COLUMN final_to BIGINT;
-- The last fencing token handed out; only grows.
ALTER TABLE blast_campaigns ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
