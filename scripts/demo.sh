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

# Waits (up to 5 s) until something listens on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
}

rm -rf "$out" && mkdir -p "$out"
db="sqlite://$PWD/$out/demo.db"

echo "== import (two rows of the sample are broken on purpose)"
"$bin" import templates/newsletter/subscribers.csv --database "$db" || true

echo "== sink on 127.0.0.1:$port, writing to $out/maildir"
"$bin" sink --listen "127.0.0.1:$port" --maildir "$out/maildir" 2>"$out/sink.log" &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null; wait $sink_pid 2>/dev/null || true' EXIT
wait_port "$port"

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

echo "== the inbound side: a one-click unsubscribe through blast serve, and a bounce through blast bounce ingest"
serve_port=$((port + 1))
"$bin" serve --listen "127.0.0.1:$serve_port" --database "$db" 2>"$out/serve.log" &
serve_pid=$!
trap 'kill $sink_pid $serve_pid 2>/dev/null; wait $sink_pid $serve_pid 2>/dev/null || true' EXIT
wait_port "$serve_port"
files=("$out"/maildir/new/*)
# The first message's List-Unsubscribe URL, pointed at the local blast serve.
token=$(grep -o 'https://[^>]*/unsubscribe/[0-9a-f-]*' "${files[0]}" | head -n 1 | sed 's|.*/||')
echo "POST /unsubscribe/$token (what Gmail's unsubscribe button sends):"
curl -s -o /dev/null -w '  HTTP %{http_code}\n' -X POST -d 'List-Unsubscribe=One-Click' "http://127.0.0.1:$serve_port/unsubscribe/$token"
echo "the same token with one character changed:"
curl -s -o /dev/null -w '  HTTP %{http_code}\n' -X POST -d 'List-Unsubscribe=One-Click' "http://127.0.0.1:$serve_port/unsubscribe/${token%?}x"
# A Postfix-style bounce for the second message, sent back to its VERP address.
verp=$(sed -n 's/^Return-Path: <\(.*\)>.*/\1/p' "${files[1]}" | head -n 1 | tr -d '\r')
rcpt=$(sed -n 's/^To: .*<\(.*\)>.*/\1/p' "${files[1]}" | head -n 1 | tr -d '\r')
mkdir -p "$out/bounces/new" "$out/bounces/cur" "$out/bounces/tmp"
{
  printf 'Delivered-To: %s\nFrom: MAILER-DAEMON@mx.example.net\nTo: %s\nSubject: Undelivered Mail Returned to Sender\n' "$verp" "$verp"
  printf 'MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
  printf -- '--B\nContent-Type: text/plain\n\n<%s>: host mx.example.net said: 550 5.1.1 User unknown\n\n' "$rcpt"
  printf -- '--B\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example.net\n\n'
  printf 'Final-Recipient: rfc822; %s\nAction: failed\nStatus: 5.1.1\nDiagnostic-Code: smtp; 550 5.1.1 User unknown\n\n--B--\n' "$rcpt"
} > "$out/bounces/new/1.bounce"
"$bin" bounce ingest --maildir "$out/bounces" --database "$db"
echo "== suppression list"
"$bin" suppress list --database "$db"
echo "== what blast serve shows Prometheus (GET /metrics), in part:"
curl -s "http://127.0.0.1:$serve_port/metrics" | grep -E '^blast_(unsubscribe_requests|bounces|suppressed_addresses)' || true
echo "== report"
"$bin" status templates/newsletter/campaign.toml --database "$db" --by-domain
page=$("$bin" report templates/newsletter/campaign.toml --database "$db" --html "$out/report.html")
echo "the campaign's report: $page (open it in a browser)"
exit $status
