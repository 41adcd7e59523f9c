"""A synthetic ledger for scripts/bench-report.sh: one campaign ("big") of N
rows (argv[2], default 10,000,000) in the blast database argv[1] (already
migrated): 2,000 destination domains (Zipf-like), 97% sent, 2% failed, 1%
deferred, two workers over six hours, a third of the rows reconciled, N/500
bounces. Seeded: the same N gives the same ledger."""
import random, sqlite3, sys
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000_000
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=OFF")
c.execute("INSERT INTO blast_campaigns (id, name, state, max_recipient_id, created_at, updated_at) VALUES (1, 'big', 'finished', ?, '2026-12-01T08:00:00.000Z', '2026-12-01T14:00:00.000Z')", (n,))
rnd = random.Random(7)
weights = [1 / (k + 1) for k in range(2000)]
domains = [f"d{k}.example" for k in range(2000)]
replies = [(550, "5.1.1", "5.1.1 user unknown"), (552, "5.2.2", "5.2.2 mailbox full"), (554, "5.7.1", "5.7.1 rejected: spam")]
def rows():
    doms = rnd.choices(domains, weights, k=n)
    for i in range(1, n + 1):
        sec = i * 21600 // n
        at = f"2026-12-01T{8 + sec // 3600:02d}:{sec // 60 % 60:02d}:{sec % 60:02d}.000Z"
        r = rnd.random()
        if r < 0.97:
            st, code, enh, rep = "sent", 250, "2.0.0", "2.0.0 Ok: queued"
        elif r < 0.99:
            st, (code, enh, rep) = "failed", rnd.choice(replies)
        else:
            st, code, enh, rep = "deferred", 451, "4.3.0", "4.3.0 try later"
        mta = "delivered" if i % 3 == 0 else None
        yield (1, i, f"user{i}@{doms[i - 1]}", st, code, enh, rep, f"Q{i:09X}", "smtp://127.0.0.1:25", at,
               mta, 2.5 if mta else None, "w1" if i % 2 else "w2")
c.executemany("INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, smtp_code, enhanced_status, reply, queue_id, relay, updated_at, mta_status, mta_delay_secs, worker) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())
c.executemany("INSERT INTO blast_bounces (campaign_id, recipient_id, address, kind, class, reason, source, message_hash, received_at) VALUES (1, ?, ?, 'bounce', 'hard', 'x', 'maildir', ?, '2026-12-02T10:00:00.000Z')",
              ((i, f"user{i}@x", f"h{i}") for i in range(1, n + 1, max(1, 500))))
c.commit()
print(c.execute("select count(*) from blast_deliveries").fetchone())
