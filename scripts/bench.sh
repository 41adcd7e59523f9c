#!/usr/bin/env bash
# End-to-end benchmark: blast against Postfix's smtp-source, side by side, in
# one run, with the same number of messages, the same size and the same
# concurrency, into the same sink.
#
#   scripts/bench.sh                      # 1,000,000 recipients, SQLite, 16 connections, into blast's sink
#   scripts/bench.sh -n 200000 -c 8       # other size / concurrency
#   scripts/bench.sh --pg                 # audience and ledger in a throwaway PostgreSQL
#   scripts/bench.sh --postfix            # through the tuned Postfix (scripts/mta/postfix.sh) to the sink
#   scripts/bench.sh --sweep "1 2 4 8 16 32 64" -n 200000 [--postfix]
#   scripts/bench.sh --postfix --sweep "4 16 64 auto" -n 30000 [--in-flow-delay 0] [--probe]
#   scripts/bench.sh --tls -n 200000 -c 16  # blast in clear against blast over STARTTLS, into the sink
#   scripts/bench.sh --compare-db -n 200000 -c 16 [--pairs 3] [--resume-at 5000000]
#   scripts/bench.sh --compare-metrics -n 200000 -c 16 [--pairs 5] [--sink smtp-sink]
#   scripts/bench.sh --sink smtp-sink -n 200000 -c 16   # into Postfix's smtp-sink instead of blast's
#   scripts/bench.sh --postfix --chunking ...            # blast sends BDAT where offered (default: DATA)
#   scripts/bench.sh --postfix --no-verp ...             # one envelope sender for all, as smtp-source
#   scripts/bench.sh -n 3000 -c 4 --sink-latency 50      # blast's sink answers each message after 50 ms:
#                                         # the sender's CPU at a low rate (an MTA's pace, not its CPU)
#   scripts/bench.sh --props               # the property tests' long mode (100,000+ cases each)
#                                         # blast on SQLite against blast on a durable PostgreSQL
#
# "auto" in the sweep is blast's adaptive concurrency (smtp-source has no such
# mode, so only blast runs). With --postfix every run also reports the largest
# Postfix queue seen (sampled twice a second) and blast's final/peak limit;
# --in-flow-delay sets Postfix's in_flow_delay, --probe gives blast the queue
# probe (scripts/mta/postfix.sh queue-size) with its default target of 5000;
# --postfix-set NAME=VALUE (repeatable) passes --set NAME=VALUE to
# scripts/mta/postfix.sh, to measure a main.cf change against the script's
# tuning (for example --postfix-set local_header_rewrite_clients=permit_inet_interfaces).
# Each --postfix pair runs both senders into a fresh Postfix, blast first in
# odd pairs and smtp-source first in even ones; several pairs (a sweep such
# as "4 4 4 4 4 4") end with their median ratio.
# --tls compares blast in clear with blast over STARTTLS (certificate from a
# CA made with openssl for the run, checked through ca_file) into the sink;
# smtp-source speaks no TLS, so it does not run.
#
# --compare-metrics runs blast without and with --metrics (scraped once a
# second by a python3 loop, 15x Prometheus's default interval), in --pairs
# interleaved pairs, and prints each pair's rates and CPU per message and the
# medians: what metrics cost the send.
#
# --compare-db runs the same campaign from SQLite and from a throwaway
# PostgreSQL with production durability (fsync, synchronous_commit and
# full_page_writes on: BLAST_PG_DURABLE=1 for scripts/pg.sh), both into the
# sink, in --pairs interleaved pairs (the order alternates), and prints each
# pair and the medians. --resume-at N (any mode) gives the campaign N ledger
# rows of a fake earlier run first: the audience is N + n and each run sends
# the last n. BLAST_BIN=path runs that binary instead of building one.
#
# smtp-source runs with -d (many messages per connection, as blast does), -N
# (distinct recipients) and -F (one of blast's rendered messages as content).
# Prints, per run: messages/s for blast and for smtp-source and their ratio,
# blast's peak RSS, its time to the first message, the sink's peak RSS; with --postfix also the
# end-to-end rate (accepted by Postfix and delivered to the sink), each sender's CPU per
# message, and what the rest of the host (Postfix, the sink) spent per message in that run.
# Needs: python3, /usr/bin/time, and Postfix's smtp-source (apt-get install postfix).
set -euo pipefail
cd "$(dirname "$0")/.."

n=1000000
conc=16
sweep=""
use_pg=0
use_postfix=0
in_flow_delay=1s
postfix_sets=()
use_probe=0
use_tls=0
compare_db=0
compare_metrics=0
metrics_args=()
pairs=3
resume_at=0
sink_kind=blast
sink_latency=0
chunking=0
no_verp=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    -c) conc=$2; shift 2 ;;
    --sweep) sweep=$2; shift 2 ;;
    --pg) use_pg=1; shift ;;
    --postfix) use_postfix=1; shift ;;
    --in-flow-delay) in_flow_delay=$2; shift 2 ;;
    --postfix-set) postfix_sets+=(--set "$2"); shift 2 ;;
    --probe) use_probe=1; shift ;;
    --tls) use_tls=1; shift ;;
    --compare-db) compare_db=1; shift ;;
    --compare-metrics) compare_metrics=1; shift ;;
    --pairs) pairs=$2; shift 2 ;;
    --resume-at) resume_at=$2; shift 2 ;;
    --sink) sink_kind=$2; shift 2 ;;
    --sink-latency) sink_latency=$2; shift 2 ;;
    --chunking) chunking=1; shift ;;
    --no-verp) no_verp=1; shift ;;
    # The property tests (the parsers, the renderer, the address
    # canonicaliser, dot-stuffing) with 100,000 cases each: minutes.
    --props) PROPTEST_CASES=${PROPTEST_CASES:-100000} exec cargo test --release --lib ;;
    -h|--help) sed -n '2,57p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$sweep" ] || sweep=$conc
if [ "$sink_latency" != 0 ]; then
  [[ "$sink_latency" =~ ^[0-9]+$ ]] || { echo "bench.sh: --sink-latency takes milliseconds, got '$sink_latency'" >&2; exit 2; }
  [ "$sink_kind" = blast ] && [ $use_postfix -eq 0 ] || { echo "bench.sh: --sink-latency is for blast's sink without --postfix" >&2; exit 2; }
fi
command -v smtp-source >/dev/null || { echo "bench.sh: smtp-source missing: apt-get install postfix" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "bench.sh: /usr/bin/time missing: apt-get install time" >&2; exit 2; }

work=${BLAST_BENCH_DIR:-/tmp/blast-bench}
mkdir -p "$work"
if [ -n "${BLAST_BIN:-}" ]; then
  bin=$(realpath "$BLAST_BIN")   # a binary built elsewhere (e.g. before a change)
else
  cargo build --release --quiet
  bin=$PWD/target/release/blast
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

# --- the audience ------------------------------------------------------------
# With --resume-at N the audience holds N + n subscribers and the campaign
# ("bench-resume") already has N ledger rows, written by SQL as if an earlier
# run had sent to ids 1..N; each run sends the last n. Between runs only the
# rows past N are removed. The earlier run also left what a stopped pass
# leaves: the claims it completed with everyone final (one claim row for
# 1..N here), so the run resumes after them as a real one does.
total=$((resume_at + n))
schema="CREATE TABLE IF NOT EXISTS subscribers (id BIGINT PRIMARY KEY, email TEXT NOT NULL, attributes TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)"
fake_run="INSERT INTO blast_campaigns (name, state, max_recipient_id, created_at, updated_at) \
  VALUES ('bench-resume', 'stopped', $total, '2026-12-01T00:00:00.000Z', '2026-12-01T00:00:00.000Z'); \
  INSERT INTO blast_deliveries (campaign_id, recipient_id, email, status, smtp_code, enhanced_status, \
    reply, queue_id, relay, attempts, updated_at) \
  SELECT c.id, s.id, s.email, 'sent', 250, '2.0.0', 'Ok: queued as Q' || s.id, 'Q' || s.id, \
    'smtp://127.0.0.1:2525', 1, '2026-12-01T00:00:00.000Z' \
  FROM subscribers s, blast_campaigns c WHERE c.name = 'bench-resume' AND s.id <= $resume_at"
earlier_pass="DELETE FROM blast_claims; \
  UPDATE blast_campaigns SET state = 'stopped', final_to = NULL, claimed_to = $resume_at, fence = 1; \
  INSERT INTO blast_claims (campaign_id, first_id, last_id, worker, token, lease_until, done) \
  SELECT id, -9223372036854775807, $resume_at, 'earlier', 1, 0, 2 FROM blast_campaigns WHERE name = 'bench-resume'"
setup_pg() { # starts a throwaway cluster (durable with BLAST_PG_DURABLE=1); sets pg_url
  source scripts/pg.sh
  pg_url=$BLAST_TEST_PG_URL
  echo "bench: generating $total subscribers in PostgreSQL"
  psql -q "$pg_url" -c "${schema/attributes TEXT/attributes JSONB}" \
    -c "INSERT INTO subscribers SELECT i, 'user' || i || '@example.com', jsonb_build_object('first_name', 'Name' || i, 'last_name', 'Doe', 'city', 'Oslo', 'plan', 'pro'), '2026-01-01T00:00:00.000Z' FROM generate_series(1, $total) AS i" \
    -c "ANALYZE subscribers"
  "$bin" preview templates/newsletter/campaign.toml --database "$pg_url" --id 1 >/dev/null # migrates
  if [ "$resume_at" -gt 0 ]; then
    echo "bench: writing $resume_at ledger rows of an earlier run in PostgreSQL"
    psql -q "$pg_url" -c "$fake_run" -c "VACUUM ANALYZE blast_deliveries" -c "CHECKPOINT"
  fi
}
setup_sqlite() { # generates (once) and sets lite_url
  local db_file=$work/audience-$total$([ "$resume_at" -gt 0 ] && echo "-resume$resume_at").db
  lite_url=sqlite://$db_file
  [ -f "$db_file" ] && return
  echo "bench: generating $total subscribers in $db_file"
  python3 - "$db_file.tmp" "$total" "$schema" <<'PY'
import json, sqlite3, sys
path, n, schema = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = sqlite3.connect(path)
c.execute(schema)
rows = ((i, f"user{i}@example.com",
         json.dumps({"first_name": f"Name{i}", "last_name": "Doe", "city": "Oslo", "plan": "pro"}),
         "2026-01-01T00:00:00.000Z") for i in range(1, n + 1))
c.executemany("INSERT INTO subscribers VALUES (?,?,?,?)", rows)
c.commit()
PY
  if [ "$resume_at" -gt 0 ]; then
    "$bin" preview templates/newsletter/campaign.toml --database "sqlite://$db_file.tmp" --id 1 >/dev/null
    echo "bench: writing $resume_at ledger rows of an earlier run in $db_file"
    python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2] + "; ANALYZE;"); c.commit()' "$db_file.tmp" "$fake_run"
  fi
  mv "$db_file.tmp" "$db_file"
}
clear_ledger() { # this run's rows (all, or those past --resume-at) in $db_url
  local sql=("DELETE FROM blast_deliveries WHERE recipient_id > $resume_at")
  # Claims and workers too: SQLite reuses a deleted campaign's id, and its
  # old claims would say the new campaign is done.
  [ "$resume_at" -gt 0 ] || sql+=("DELETE FROM blast_campaigns" "DELETE FROM blast_claims" "DELETE FROM blast_workers")
  case "$db_url" in
    postgres*) for q in "${sql[@]}" "VACUUM blast_deliveries"; do psql -q "$db_url" -c "$q" 2>/dev/null || true; done ;;
    *) python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); [c.execute(q) for q in sys.argv[2:] if c.execute("SELECT 1 FROM sqlite_master WHERE name=?", (q.split()[2],)).fetchone()]; c.commit()' \
      "${db_url#sqlite://}" "${sql[@]}" ;;
  esac
  [ "$resume_at" -gt 0 ] || return 0
  case "$db_url" in
    postgres*) psql -q "$db_url" -c "$earlier_pass" ;;
    *) python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()' "${db_url#sqlite://}" "$earlier_pass" ;;
  esac
}
if [ $compare_db -eq 1 ]; then
  setup_sqlite
  export BLAST_PG_DURABLE=1
  setup_pg
  db_url=$lite_url
elif [ $use_pg -eq 1 ]; then
  setup_pg; db_url=$pg_url
else
  setup_sqlite; db_url=$lite_url
fi

campaign=$work/campaign.toml
cp templates/newsletter/newsletter.txt templates/newsletter/newsletter.html "$work/"
# smtp-source sends one of blast's own messages (-F), so both push the same
# bytes and the same MIME structure through the MTA; -N gives it distinct
# recipients, as blast has.
"$bin" preview templates/newsletter/campaign.toml --database "$db_url" --id 1 | tail -n +2 > "$work/message.eml"
size=$(wc -c < "$work/message.eml")
echo "bench: message size ${size} bytes (the example newsletter, personalized); audience $n$([ "$resume_at" -gt 0 ] && echo " after $resume_at already in the ledger"); $([ $compare_db -eq 1 ] && echo "SQLite and PostgreSQL (durable)" || { [ $use_pg -eq 1 ] && echo PostgreSQL || echo SQLite; })"

# --- the sink and (optionally) Postfix ---------------------------------------
sink_pid=""
sink_tls=()
start_sink() {
  sink_port=$(free_port)
  if [ "$sink_kind" = smtp-sink ]; then
    # Postfix's smtp-sink: no CHUNKING; -c counts messages (printed on
    # stdout), -u drops root; a backlog of 256 for 64 connections and more.
    local user=(); [ "$(id -u)" -eq 0 ] && user=(-u nobody)
    smtp-sink -c ${user[@]+"${user[@]}"} "127.0.0.1:$sink_port" 256 >"$work/sink.log" 2>&1 &
  else
    local latency=(); [ "$sink_latency" = 0 ] || latency=(--latency-ms "$sink_latency")
    "$bin" sink --listen "127.0.0.1:$sink_port" ${latency[@]+"${latency[@]}"} ${sink_tls[@]+"${sink_tls[@]}"} 2>"$work/sink.log" &
  fi
  sink_pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$sink_port") 2>/dev/null && return; sleep 0.05; done
  echo "bench: sink did not start" >&2; exit 1
}
stop_sink() {
  [ -n "$sink_pid" ] || return 0
  # The sink's peak RSS: it must not grow with the messages it took.
  sink_rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$sink_pid/status" 2>/dev/null || echo -)
  kill "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; sink_pid=""
  if [ "$sink_kind" = smtp-sink ]; then
    # -c prints "sess=N quit=N mesg=N" lines, carriage-return separated.
    sink_msgs=$(tr '\r' '\n' <"$work/sink.log" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
  else
    sink_msgs=$(sed -n 's/.*blast sink: [0-9]* connections, \([0-9]*\) messages.*/\1/p' "$work/sink.log" | tail -n 1)
  fi
}
# Postfix's queue on tmpfs, as docs/postfix.md deploys it (postfix.sh's own
# default). Under $work (/tmp, a disk here) each queue file's fsync was a
# journal commit on the VM's disk: both senders ran a fifth slower, blast
# more so (docs/tuning.md, "The queue was on disk").
mta_dir=${BLAST_BENCH_MTA_DIR:-/dev/shm/blast-bench-postfix}
start_postfix() {
  local fs
  mkdir -p "$(dirname "$mta_dir")"
  fs=$(stat -f -c %T "$(dirname "$mta_dir")")
  [ "$fs" = tmpfs ] || echo "bench.sh: warning: Postfix's queue $mta_dir is on $fs, not tmpfs: its fsyncs go to disk" >&2
  mta_port=$(free_port)
  scripts/mta/postfix.sh start --dir "$mta_dir" --port "$mta_port" --relay "127.0.0.1:$sink_port" \
    --in-flow-delay "$in_flow_delay" "${postfix_sets[@]}" >/dev/null
  # The largest queue seen, sampled twice a second until stop_postfix.
  echo 0 > "$work/queue-max"
  ( max=0
    while :; do
      q=$(scripts/mta/postfix.sh queue-size --dir "$mta_dir" 2>/dev/null || echo 0)
      [ "${q:-0}" -gt "$max" ] 2>/dev/null && { max=$q; echo "$max" > "$work/queue-max"; }
      sleep 0.5
    done ) &
  sampler_pid=$!
}
stop_postfix() {
  [ -n "${sampler_pid:-}" ] && { kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""; }
  scripts/mta/postfix.sh stop --purge --dir "$mta_dir" >/dev/null 2>&1 || true
}
# (Replaces pg.sh's EXIT trap, so it stops the cluster too.)
cleanup() { stop_sink; [ $use_postfix -eq 1 ] && stop_postfix; declare -F pg_stop >/dev/null && pg_stop; true; }
trap cleanup EXIT

# --- one measurement ---------------------------------------------------------
run_blast() { # $1 = concurrency, $2 = target port; sets b_rate b_rss b_first b_secs
  clear_ledger
  local name="bench-$1-$(date +%s%N)"
  [ "$resume_at" -gt 0 ] && name=bench-resume
  sed "s/^name = .*/name = \"$name\"/" templates/newsletter/campaign.toml > "$campaign"
  # One fixed envelope sender, as smtp-source has, instead of a VERP
  # address per recipient (each a new address for the MTA to resolve).
  [ $no_verp -eq 1 ] && sed -i "/^verp = /d" "$campaign"
  # BDAT where the relay offers CHUNKING (the default is pipelined DATA).
  [ $chunking -eq 1 ] && sed -i "s|^\\[delivery\\]|[delivery]\\nchunking = true|" "$campaign"
  if [ $use_probe -eq 1 ]; then
    sed -i "s|^\\[delivery\\]|[delivery]\\nqueue_probe = \"$PWD/scripts/mta/postfix.sh queue-size --dir $mta_dir\"|" "$campaign"
  fi
  local t0 relay=(--smtp "smtp://127.0.0.1:$2")
  if [ "${3:-}" = tls ]; then
    sed -i "s|^smtp = .*|smtp = [{ url = \"smtp://127.0.0.1:$2\", tls = \"starttls\", ca_file = \"$work/tls/ca.pem\" }]|" "$campaign"
    relay=()
  fi
  t0=$(now)
  /usr/bin/time -v -o "$work/time.log" "$bin" send "$campaign" --database "$db_url" \
    ${relay[@]+"${relay[@]}"} ${metrics_args[@]+"${metrics_args[@]}"} \
    --concurrency "$1" --progress none --json > "$work/summary.json"
  b_t1=$(now); b_t0=$t0
  # Through Postfix the figures wait until its queue has drained: the
  # python3 runs here would take CPU from Postfix inside blast's window.
  [ "${defer_figures:-0}" = 1 ] || blast_figures
}
blast_figures() { # sets b_rate b_rss b_first b_secs b_cpu b_limit from the last run_blast
  b_secs=$(python3 -c "print($b_t1 - $b_t0)")
  b_rate=$(python3 -c "import json; d=json.load(open('$work/summary.json')); print(round(d['sent']/$b_secs))")
  b_first=$(python3 -c "import json; print(json.load(open('$work/summary.json'))['first_message_ms'])")
  b_rss=$(awk '/Maximum resident/ {print int($6/1024)}' "$work/time.log")
  b_cpu=$(cpu_us "$work/time.log" "$(python3 -c "import json; print(json.load(open('$work/summary.json'))['sent'])")")
  b_limit=$(python3 -c "import json; r=json.load(open('$work/summary.json'))['relays'][0]; print(f\"{r['limit']}/{r['peak_limit']}\")")
}
cpu_us() { # $1 = /usr/bin/time -v log, $2 = messages: (user + system) µs per message
  awk -v n="$2" '/User time/ {u=$4} /System time/ {s=$4} END {if (n > 0) printf "%.0f", (u + s) * 1e6 / n; else print "-"}' "$1"
}
run_source() { # $1 = concurrency, $2 = target port; sets s_rate s_secs
  local t0
  t0=$(now)
  /usr/bin/time -v -o "$work/time-source.log" \
    smtp-source -d -N -s "$1" -m "$n" -F "$work/message.eml" -f bench@example.com -t rcpt@example.com "127.0.0.1:$2"
  s_t1=$(now); s_t0=$t0
  [ "${defer_figures:-0}" = 1 ] || source_figures
}
source_figures() { # sets s_secs s_rate s_cpu from the last run_source
  s_secs=$(python3 -c "print($s_t1 - $s_t0)")
  s_rate=$(python3 -c "print(round($n/$s_secs))")
  s_cpu=$(cpu_us "$work/time-source.log" "$n")
}
drain() { # waits for Postfix's queue to empty; prints nothing, sets d_secs since $1
  scripts/mta/postfix.sh flush-wait --dir "$mta_dir" --timeout 3600 >/dev/null
  d_secs=$(python3 -c "print($(now) - $1)")
}
stat_now() { # the host's CPU time so far, all cores, in ticks (/proc/stat): busy (not idle, iowait or steal), steal, total
  awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat
}
mta_cpu_us() { # $1 = stat_now at the start, $2 = the sender's -v log: the rest of the host's CPU per message
  local b0 b1 _
  read -r b0 _ <<< "$1"; read -r b1 _ <<< "$(stat_now)"
  python3 -c "
import re
t = open('$2').read()
own = (float(re.search(r'User time.*: ([0-9.]+)', t)[1]) + float(re.search(r'System time.*: ([0-9.]+)', t)[1])) * 1e6
print(round(($((b1 - b0)) * 1e6 / $(getconf CLK_TCK) - own) / $n))"
}
steal_pct() { # $1 = stat_now at the start: the share of the CPU the hypervisor took since, in %
  local s0 t0 s1 t1 _
  read -r _ s0 t0 <<< "$1"; read -r _ s1 t1 <<< "$(stat_now)"
  awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.1f", (t > 0 ? 100 * s / t : 0)}'
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }
median_f() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {printf "%.2f\n", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; } # of ratios, two decimals
if [ $compare_metrics -eq 1 ]; then
  echo "bench: sink: $sink_kind; metrics scraped every second"
  printf '%-6s %10s %10s %7s %8s %8s %10s\n' pair off/s on/s on/off off_us on_us scrapes
  off_rates=(); on_rates=(); ratios=(); off_cpus=(); on_cpus=()
  metrics_port=$(free_port)
  one() { # $1 = off|on; sets rate_<mode> cpu_<mode>
    metrics_args=(); local scraper=""
    if [ "$1" = on ]; then
      metrics_args=(--metrics "127.0.0.1:$metrics_port")
      python3 - "$metrics_port" "$work/scrapes" <<'PY' &
import sys, time, urllib.request
port, out, n = sys.argv[1], sys.argv[2], 0
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        n += 1
        open(out, "w").write(str(n))
    except OSError:
        pass
    time.sleep(1)
PY
      scraper=$!
      echo 0 > "$work/scrapes"
    fi
    start_sink; run_blast "$conc" "$sink_port"; stop_sink
    [ -n "$scraper" ] && { kill "$scraper"; wait "$scraper" 2>/dev/null || true; }
    [ "$sink_msgs" = "$n" ] || echo "bench: warning: sink counted $sink_msgs of $n ($1)" >&2
    printf -v "rate_$1" %s "$b_rate"; printf -v "cpu_$1" %s "$b_cpu"
  }
  for p in $(seq "$pairs"); do
    if [ $((p % 2)) -eq 1 ]; then one off; one on; else one on; one off; fi
    r=$(python3 -c "print(f'{$rate_on/$rate_off:.3f}')")
    off_rates+=("$rate_off"); on_rates+=("$rate_on"); ratios+=("$r"); off_cpus+=("$cpu_off"); on_cpus+=("$cpu_on")
    printf '%-6s %10s %10s %7s %8s %8s %10s\n' "$p" "$rate_off" "$rate_on" "$r" "$cpu_off" "$cpu_on" "$(cat "$work/scrapes")"
  done
  printf '%-6s %10s %10s %7s %8s %8s\n' median "$(median "${off_rates[@]}")" "$(median "${on_rates[@]}")" \
    "$(median_f "${ratios[@]}")" \
    "$(median "${off_cpus[@]}")" "$(median "${on_cpus[@]}")"
elif [ $compare_db -eq 1 ]; then
  printf '%-6s %10s %10s %7s %10s %10s\n' pair sqlite/s pg/s pg/lite lite_rss pg_rss
  lite_rates=(); pg_rates=(); ratios=()
  one() { # $1 = sqlite|pg; sets rate_<backend> rss_<backend>
    db_url=$([ "$1" = pg ] && echo "$pg_url" || echo "$lite_url")
    start_sink; run_blast "$conc" "$sink_port"; stop_sink
    [ "$sink_msgs" = "$n" ] || echo "bench: warning: sink counted $sink_msgs of $n ($1)" >&2
    printf -v "rate_$1" %s "$b_rate"; printf -v "rss_$1" %s "$b_rss"
  }
  for p in $(seq "$pairs"); do
    # Alternate which goes first, so neither always gets the warmer slot.
    if [ $((p % 2)) -eq 1 ]; then one sqlite; one pg; else one pg; one sqlite; fi
    r=$(python3 -c "print(f'{$rate_pg/$rate_sqlite:.2f}')")
    lite_rates+=("$rate_sqlite"); pg_rates+=("$rate_pg"); ratios+=("$r")
    printf '%-6s %10s %10s %7s %10s %10s\n' "$p" "$rate_sqlite" "$rate_pg" "$r" "$rss_sqlite" "$rss_pg"
  done
  printf '%-6s %10s %10s %7s\n' median "$(median "${lite_rates[@]}")" "$(median "${pg_rates[@]}")" \
    "$(median_f "${ratios[@]}")"
elif [ $use_tls -eq 1 ]; then
  # A CA and a certificate for 127.0.0.1 signed by it, for this run only.
  mkdir -p "$work/tls"
  ( cd "$work/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench CA" \
      -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout key.pem -out cert.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > ext.cnf
    openssl x509 -req -in cert.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile ext.cnf -out cert.pem 2>/dev/null )
  printf '%-5s %12s %12s %7s %9s %10s\n' conc clear/s starttls/s ratio rss_MB first_ms
  for c in $sweep; do
    sink_tls=(); start_sink; run_blast "$c" "$sink_port"; stop_sink; got_p=$sink_msgs; p_rate=$b_rate
    sink_tls=(--tls-cert "$work/tls/cert.pem" --tls-key "$work/tls/key.pem")
    start_sink; run_blast "$c" "$sink_port" tls; stop_sink; got_t=$sink_msgs
    [ "$got_p" = "$n" ] && [ "$got_t" = "$n" ] || echo "bench: warning: sink counted clear=$got_p starttls=$got_t of $n" >&2
    printf '%-5s %12s %12s %7s %9s %10s\n' "$c" "$p_rate" "$b_rate" \
      "$(python3 -c "print(f'{$b_rate/$p_rate:.2f}')")" "$b_rss" "$b_first"
  done
elif [ $use_postfix -eq 0 ]; then
  echo "bench: sink: $sink_kind"
  printf '%-5s %12s %12s %7s %9s %10s %9s %9s %9s\n' conc blast/s smtp-src/s ratio rss_MB first_ms sink_MB blast_us src_us
  for c in $sweep; do
    start_sink; run_blast "$c" "$sink_port"; stop_sink; got_b=$sink_msgs; b_sink_rss=$sink_rss
    start_sink; run_source "$c" "$sink_port"; stop_sink; got_s=$sink_msgs
    [ "$got_b" = "$n" ] && [ "$got_s" = "$n" ] || echo "bench: warning: sink counted blast=$got_b smtp-source=$got_s of $n" >&2
    printf '%-5s %12s %12s %7s %9s %10s %9s %9s %9s\n' "$c" "$b_rate" "$s_rate" \
      "$(python3 -c "print(f'{$b_rate/$s_rate:.2f}')")" "$b_rss" "$b_first" "$b_sink_rss" "$b_cpu" "$s_cpu"
  done
else
  echo "bench: Postfix in_flow_delay=$in_flow_delay; blast queue probe: $([ $use_probe -eq 1 ] && echo on || echo off)"
  echo "bench: blast_us/src_us = the sender's CPU per message; mta_us = the rest of the host's (Postfix, the sink) for that run"
  echo "bench: b_st%/s_st% = CPU time the hypervisor took (steal) in each run; adj = the e2e ratio of rate / (1 - steal)"
  printf '%-5s %12s %12s %7s %12s %12s %7s %9s %10s %10s %8s %8s %8s %8s %6s %6s %6s\n' conc blast_in/s src_in/s ratio blast_e2e/s src_e2e/s ratio rss_MB max_queue limit \
    blast_us src_us b_mta_us s_mta_us b_st% s_st% adj
  e2e_ratios=(); adj_ratios=()
  # Each sender into a fresh Postfix and sink. The order alternates from
  # one pair to the next, so that neither always gets the warmer slot.
  postfix_blast() { # $1 = concurrency
    start_sink; start_postfix
    st0=$(stat_now); t0=$(now); defer_figures=1 run_blast "$1" "$mta_port"; drain "$t0"
    b_steal=$(steal_pct "$st0")
    b_mta=$(mta_cpu_us "$st0" "$work/time.log"); blast_figures; b_e2e=$(python3 -c "print(round($n/$d_secs))")
    q_max=$(cat "$work/queue-max")
    stop_postfix; stop_sink; got_b=$sink_msgs
  }
  postfix_source() { # $1 = concurrency
    start_sink; start_postfix
    st0=$(stat_now); t0=$(now); defer_figures=1 run_source "$1" "$mta_port"; drain "$t0"
    s_steal=$(steal_pct "$st0")
    s_mta=$(mta_cpu_us "$st0" "$work/time-source.log"); source_figures; s_e2e=$(python3 -c "print(round($n/$d_secs))")
    stop_postfix; stop_sink; got_s=$sink_msgs
  }
  pair=0
  for c in $sweep; do
    if [ "$c" = auto ] || [[ "$c" == auto:* ]]; then
      postfix_blast "$c"
      [ "$got_b" = "$n" ] || echo "bench: warning: sink counted blast=$got_b of $n" >&2
      printf '%-5s %12s %12s %7s %12s %12s %7s %9s %10s %10s %8s %8s %8s %8s %6s %6s %6s\n' "$c" "$b_rate" - - "$b_e2e" - - "$b_rss" "$q_max" "$b_limit" \
        "$b_cpu" - "$b_mta" - "$b_steal" - -
      continue
    fi
    pair=$((pair + 1))
    if [ $((pair % 2)) -eq 1 ]; then postfix_blast "$c"; postfix_source "$c"; else postfix_source "$c"; postfix_blast "$c"; fi
    [ "$got_b" = "$n" ] && [ "$got_s" = "$n" ] || echo "bench: warning: sink counted blast=$got_b smtp-source=$got_s of $n" >&2
    e2e_ratio=$(python3 -c "print(f'{$b_e2e/$s_e2e:.2f}')")
    adj_ratio=$(python3 -c "print(f'{$b_e2e * (100 - $s_steal) / ($s_e2e * (100 - $b_steal)):.2f}')")
    e2e_ratios+=("$e2e_ratio"); adj_ratios+=("$adj_ratio")
    printf '%-5s %12s %12s %7s %12s %12s %7s %9s %10s %10s %8s %8s %8s %8s %6s %6s %6s\n' "$c" "$b_rate" "$s_rate" \
      "$(python3 -c "print(f'{$b_rate/$s_rate:.2f}')")" "$b_e2e" "$s_e2e" \
      "$e2e_ratio" "$b_rss" "$q_max" "$b_limit" "$b_cpu" "$s_cpu" "$b_mta" "$s_mta" "$b_steal" "$s_steal" "$adj_ratio"
  done
  if [ ${#e2e_ratios[@]} -gt 1 ]; then
    echo "bench: ${#e2e_ratios[@]} pairs: median e2e ratio $(median_f "${e2e_ratios[@]}"), steal-adjusted $(median_f "${adj_ratios[@]}")"
  fi
fi
