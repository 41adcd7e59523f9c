#!/usr/bin/env bash
# `blast report` over a large synthetic ledger: one campaign of N rows
# (2,000 destination domains, Zipf-like; 97% sent, 2% failed, 1% deferred;
# two workers over six hours; a third reconciled; N/500 bounces), written by
# scripts/bench/ledger.py into SQLite, and with --pg copied into a throwaway
# PostgreSQL. Prints the report's time and peak memory (two runs each) and
# whether both backends gave the same JSON.
#
#   scripts/bench-report.sh [-n 10000000] [--pg]
#
# The SQLite file is kept in $BLAST_BENCH_DIR (default /tmp/blast-bench) for
# the next run. BLAST_BIN=path runs that binary instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
n=10000000
use_pg=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    --pg) use_pg=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench-report.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
dir=${BLAST_BENCH_DIR:-/tmp/blast-bench}
mkdir -p "$dir"
bin=${BLAST_BIN:-}
if [ -z "$bin" ]; then cargo build --release --quiet; bin=target/release/blast; fi
db="$dir/ledger-$n.db"
if [ ! -f "$db" ]; then
  "$bin" list --database "sqlite://$db" >/dev/null
  echo "bench-report: writing $n ledger rows into $db"
  python3 scripts/bench/ledger.py "$db" "$n" >/dev/null
fi
run() { # $1 = database URL, $2 = label
  for i in 1 2; do
    /usr/bin/time -f "$2: report in %e s, peak RSS %M KB" "$bin" report big --database "$1" --json \
      > "$dir/report-$2.json" 2> "$dir/report-$2.err" || { cat "$dir/report-$2.err" >&2; exit 1; }
    tail -n 1 "$dir/report-$2.err"
  done
}
run "sqlite://$db" sqlite
if [ $use_pg -eq 1 ]; then
  source scripts/pg.sh
  url="${BLAST_TEST_PG_URL%/*}/ledger"
  psql "$BLAST_TEST_PG_URL" -qc "CREATE DATABASE ledger"
  "$bin" list --database "$url" >/dev/null
  cols="campaign_id, recipient_id, email, status, smtp_code, enhanced_status, reply, queue_id, relay, updated_at, mta_status, mta_delay_secs, worker"
  copy() { # $1 = table, $2 = columns
    python3 - "$db" "$1" "$2" <<'PY' | psql "$url" -qc "COPY $1 ($2) FROM STDIN WITH (FORMAT csv)"
import csv, sqlite3, sys
# Strings quoted, NULL as an unquoted empty field: COPY tells them apart.
w = csv.writer(sys.stdout, quoting=csv.QUOTE_NONNUMERIC)
for r in sqlite3.connect(sys.argv[1]).execute(f"SELECT {sys.argv[3]} FROM {sys.argv[2]}"):
    w.writerow(r)
PY
  }
  copy blast_campaigns "id, name, state, max_recipient_id, created_at, updated_at"
  copy blast_deliveries "$cols"
  copy blast_bounces "campaign_id, recipient_id, address, kind, class, reason, source, message_hash, received_at"
  psql "$url" -qc "VACUUM ANALYZE"
  run "$url" postgres
  python3 -c "import json,sys; print('same JSON on both backends:', json.load(open(sys.argv[1])) == json.load(open(sys.argv[2])))" \
    "$dir/report-sqlite.json" "$dir/report-postgres.json"
fi
