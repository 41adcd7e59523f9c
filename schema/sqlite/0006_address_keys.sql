-- blast schema v6: one address, one identity. `email_key` is the address's
-- canonical form (trimmed; local part lower-cased; domain in lower-case
-- ASCII, punycode for IDN domains), computed by blast in Rust
-- (src/address.rs), because SQL's lower() differs by backend and knows no
-- IDNA. Import finds duplicates by it. Rows written before this version are
-- filled in by blast right after this migration (src/db.rs); a row whose
-- address is not valid, or duplicates an earlier row's, keeps NULL.
-- Suppressions (`blast_suppressions.address`) are rewritten to the same
-- form at the same time.
ALTER TABLE subscribers ADD COLUMN email_key TEXT;
DROP INDEX IF EXISTS subscribers_email_key;
CREATE UNIQUE INDEX subscribers_by_key ON subscribers (email_key);
