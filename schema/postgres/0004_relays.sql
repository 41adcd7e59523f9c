-- blast schema v4: what each relay's adaptive concurrency limit was at the
-- end of the last run, so the next run starts there instead of at 1.
CREATE TABLE blast_relays (
    relay       TEXT PRIMARY KEY,
    last_limit  INTEGER NOT NULL,
    updated_at  TEXT NOT NULL
);
