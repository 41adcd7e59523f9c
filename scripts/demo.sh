#!/usr/bin/env bash
# The end-to-end demo on the embedded defaults: builds blast, imports the
# shipped subscribers into a fresh SQLite file, starts the built-in SMTP sink on
# loopback, sends the example newsletter through it over real SMTP, and shows
# the ledger's status. Everything lands in ./demo-out/.
#
#   scripts/demo.sh            # 1,000 subscribers from templates/newsletter/subscribers.csv
#   BLAST_DEMO_PORT=2600 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

port=${BLAST_DEMO_PORT:-2525}
out=demo-out
cargo build --release --quiet
bin=target/release/blast

rm -rf "$out" && mkdir -p "$out"
db="sqlite://$PWD/$out/demo.db"

echo "== import (two rows of the sample are broken on purpose)"
"$bin" import templates/newsletter/subscribers.csv --database "$db" || true

echo "== sink on 127.0.0.1:$port, writing to $out/maildir"
"$bin" sink --listen "127.0.0.1:$port" --maildir "$out/maildir" 2>"$out/sink.log" &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null; wait $sink_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

echo "== send"
status=0
"$bin" send templates/newsletter/campaign.toml --database "$db" --smtp "smtp://127.0.0.1:$port" || status=$?

echo "== status"
"$bin" status templates/newsletter/campaign.toml --database "$db"
echo "== $(ls "$out/maildir/new" | wc -l) messages in $out/maildir/new; one of them:"
head -c 1500 "$(ls -d "$out"/maildir/new/* | head -n 1)"; echo
mallory=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select id from subscribers where attributes like ?", ("%Mallory%",)).fetchone()[0])' "$out/demo.db")
echo "== preview of recipient $mallory, whose first_name is \"Mallory\r\nBcc: everyone@example.com\" in the data:"
"$bin" preview templates/newsletter/campaign.toml --database "$db" --id "$mallory" | sed -n '1,6p'
exit $status
