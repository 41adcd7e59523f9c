#!/usr/bin/env bash
# Scale-out benchmark: one campaign on PostgreSQL sent by 1, then by K
# workers (blast processes), each feeding its own sink whose capacity is
# capped (`blast sink --capacity`), so the MTA is the bottleneck as it is in
# production and CPU on this small machine is not. Prints one row per
# worker count: messages, seconds, msg/s and the speed-up over one worker.
#
#   scripts/bench-workers.sh                     # 1 and 3 workers, 1,500 msg/s per sink, 60,000 recipients
#   scripts/bench-workers.sh -n 90000 -k "1 2 3 4" --capacity 1500 --runs 2
#
# Each run is a new campaign over the same audience; the wall time counts
# from the first worker's start to the last worker's exit.
# Needs: python3, PostgreSQL server binaries (scripts/pg.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

n=60000
counts="1 3"
capacity=1500
runs=1
concurrency=8
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    -k) counts=$2; shift 2 ;;
    --capacity) capacity=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -c) concurrency=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "bench-workers.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d /tmp/blast-bench-workers.XXXXXX)
cargo build --release --quiet
bin=$PWD/target/release/blast
source scripts/pg.sh
db_url=$BLAST_TEST_PG_URL
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

sink_pids=()
worker_pids=()
cleanup() {
  for p in ${worker_pids[@]+"${worker_pids[@]}"} ${sink_pids[@]+"${sink_pids[@]}"}; do
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
  pg_stop
}
trap cleanup EXIT
trap "exit 130" INT TERM

echo "bench-workers: generating $n subscribers in PostgreSQL" >&2
psql -q "$db_url" \
  -c "CREATE TABLE IF NOT EXISTS subscribers (id BIGINT PRIMARY KEY, email TEXT NOT NULL, attributes JSONB NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)" \
  -c "INSERT INTO subscribers SELECT i, 'user' || i || '@example.com', jsonb_build_object('first_name', 'Name' || i, 'last_name', 'Doe', 'city', 'Oslo', 'plan', 'pro'), '2026-01-01T00:00:00.000Z' FROM generate_series(1, $n) AS i" \
  -c "ANALYZE subscribers"
cp templates/newsletter/newsletter.txt templates/newsletter/newsletter.html "$work/"

max_k=0
for k in $counts; do [ "$k" -gt "$max_k" ] && max_k=$k; done
ports=()
for i in $(seq "$max_k"); do
  port=$(free_port)
  "$bin" sink --listen "127.0.0.1:$port" --capacity "$capacity" 2>"$work/sink$i.log" &
  sink_pids+=($!)
  ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
done

campaign() { # name -> campaign file
  sed -e "s|^name = .*|name = \"$1\"|" \
      -e "s|^database = .*|database = \"$db_url\"|" \
      templates/newsletter/campaign.toml > "$work/$1.toml"
  echo "$work/$1.toml"
}

printf "%-8s %9s %9s %9s %8s\n" workers messages seconds msg/s speedup
base=""
for run in $(seq "$runs"); do
  for k in $counts; do
    file=$(campaign "scale-$k-$run")
    start=$(date +%s.%N)
    worker_pids=()
    for i in $(seq "$k"); do
      "$bin" send "$file" --worker "w$i" --smtp "smtp://127.0.0.1:${ports[$((i-1))]}" \
        --concurrency "$concurrency" --progress none 2>"$work/w$i.log" &
      worker_pids+=($!)
    done
    for p in "${worker_pids[@]}"; do wait "$p" || { echo "worker failed:"; cat "$work"/w*.log; exit 1; }; done
    worker_pids=()
    end=$(date +%s.%N)
    sent=$(psql -qtA "$db_url" -c "SELECT COUNT(*) FROM blast_deliveries d JOIN blast_campaigns c ON c.id = d.campaign_id WHERE c.name = 'scale-$k-$run' AND d.status = 'sent'")
    python3 - "$k" "$sent" "$start" "$end" "${base:-0}" <<'PY'
import sys
k, sent, start, end, base = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
secs = end - start
rate = sent / secs
print(f"{k:<8} {sent:>9} {secs:>9.1f} {rate:>9.0f} {rate / base if base else 1.0:>7.2f}x")
PY
    [ "$k" = "1" ] && base=$(python3 -c "print($sent / ($end - $start))")
  done
done
