#!/usr/bin/env bash
# Measures the tuned Postfix instance of scripts/mta/postfix.sh with Postfix's
# own test tools: smtp-source injects, smtp-sink plays the next hop.
#
#   bench.sh [--messages 20000] [--sessions 16] [--size 7000] [--persistent]
#            [--discard] [--in-flow-delay 1s] [--dir DIR] [--port 2536]
#            [--sink-port 2537] [--set NAME=VALUE]... [--keep]
#
# It starts a throwaway instance in DIR (default /dev/shm/blast-postfix-bench,
# removed at the end unless --keep), runs
#   smtp-source -s SESSIONS -m MESSAGES -l SIZE -f a@example.com -t b@example.com 127.0.0.1:PORT
# (with -d when --persistent: many messages per connection, as blast sends),
# waits until the queue is empty, and prints the injection rate, the
# end-to-end rate, the largest queue seen, what the sink counted, and the 250
# reply of one probe message. Needs root. See docs/postfix.md.
set -euo pipefail

export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C
prog=bench.sh
here=$(cd "$(dirname "$0")" && pwd)
pf=$here/postfix.sh

die() {
  echo "$prog: error: $*" >&2
  exit 1
}

messages=20000
sessions=16
size=7000
persistent=
discard=
in_flow_delay=1s
dir=/dev/shm/blast-postfix-bench
port=2536
sink_port=2537
keep=
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --messages) messages=${2:?}; shift 2 ;;
    --sessions) sessions=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --persistent) persistent=1; shift ;;
    --discard) discard=1; shift ;;
    --in-flow-delay) in_flow_delay=${2:?}; shift 2 ;;
    --dir) dir=${2:?}; shift 2 ;;
    --port) port=${2:?}; shift 2 ;;
    --sink-port) sink_port=${2:?}; shift 2 ;;
    --keep) keep=1; shift ;;
    --set) sets+=(--set "${2:?}"); shift 2 ;;
    -h | --help)
      sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown option '$1'" ;;
  esac
done
for n in "$messages" "$sessions" "$size" "$port" "$sink_port"; do
  [[ "$n" =~ ^[0-9]+$ ]] || die "not a number: '$n'"
done
[ "$(id -u)" -eq 0 ] || die "needs root (Postfix's master starts as root)"
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null; then
  die "smtp-source/smtp-sink not found: they come with Debian's postfix package (run postfix.sh start once)"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/blast-mta-bench.XXXXXX")
sink_pid=
sampler_pid=
cleanup() {
  [ -z "$sampler_pid" ] || kill "$sampler_pid" 2>/dev/null || true
  if [ -z "$keep" ]; then
    "$pf" stop --dir "$dir" --purge >/dev/null || true
  fi
  if [ -n "$sink_pid" ]; then
    kill "$sink_pid" 2>/dev/null || true
    wait "$sink_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }

# The last "mesg=N" smtp-sink -c printed (it rewrites one line with \r).
sink_count() {
  tr '\r' '\n' <"$work/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1
}

# One SMTP transaction, one command at a time; prints the reply to DATA's end.
probe() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    reply() {
      local line
      while IFS= read -r -t 10 line <&3; do
        line=${line%$'\r'}
        [[ "$line" =~ ^[0-9]{3}- ]] && continue
        echo "$line"
        return 0
      done
      return 1
    }
    reply >/dev/null
    for c in "EHLO probe.example.com" "MAIL FROM:<a@example.com>" "RCPT TO:<b@example.com>" "DATA"; do
      printf '%s\r\n' "$c" >&3
      reply >/dev/null
    done
    printf 'Subject: blast probe\r\n\r\nprobe\r\n.\r\n' >&3
    reply
    printf 'QUIT\r\n' >&3
    reply >/dev/null || true
  )
}

# A clean start: no queue or log left from an earlier run.
"$pf" stop --dir "$dir" --purge >/dev/null
if [ -n "$discard" ]; then
  mode="--discard"
else
  smtp-sink -c -u postfix "127.0.0.1:$sink_port" 1000 >"$work/sink.out" 2>&1 &
  sink_pid=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$sink_port") 2>/dev/null && break
    sleep 0.1
  done
  mode="--relay 127.0.0.1:$sink_port"
fi
# shellcheck disable=SC2086 # $mode is two words or one
"$pf" start --dir "$dir" --port "$port" $mode --in-flow-delay "$in_flow_delay" ${sets[@]+"${sets[@]}"}

# Largest queue seen, sampled every 0.2 s.
(
  peak=0
  while :; do
    n=$("$pf" queue-size --dir "$dir" 2>/dev/null) || n=0
    if [ "$n" -gt "$peak" ]; then
      peak=$n
      echo "$peak" >"$work/peak"
    fi
    sleep 0.2
  done
) &
sampler_pid=$!

src=(smtp-source -s "$sessions" -m "$messages" -l "$size" -f a@example.com -t b@example.com)
[ -z "$persistent" ] || src+=(-d)
src+=("127.0.0.1:$port")
echo "$prog: ${src[*]}"
t0=$(now)
"${src[@]}"
t1=$(now)
"$pf" flush-wait --dir "$dir" --timeout 600
t2=$(now)
if [ -z "$discard" ]; then
  # The sink counts a message at its final "."; give its counter a moment.
  for _ in $(seq 50); do
    [ "$(sink_count)" = "$messages" ] && break
    sleep 0.1
  done
fi
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=
peak=$(cat "$work/peak" 2>/dev/null || echo 0)
sent=$(grep -c 'status=sent' "$dir/maillog" || true)
log_lines=$(wc -l <"$dir/maillog")
got=
[ -n "$discard" ] || got=$(sink_count)
reply=$(probe) || reply="(probe failed)"

echo
echo "results: $messages messages of $size bytes, $sessions sessions$([ -n "$persistent" ] && echo ", persistent connections (-d)" || echo ", one message per connection"), $([ -n "$discard" ] && echo "discard transport" || echo "relay to smtp-sink"), in_flow_delay $in_flow_delay${sets[*]:+, ${sets[*]}}"
echo "  injection:      $(secs "$t0" "$t1") s, $(rate "$messages" "$t0" "$t1") msg/s"
echo "  queue drained:  $(secs "$t1" "$t2") s after injection ended"
echo "  end to end:     $(secs "$t0" "$t2") s, $(rate "$messages" "$t0" "$t2") msg/s"
echo "  largest queue:  $peak messages (sampled every 0.2 s)"
if [ -z "$discard" ]; then
  echo "  smtp-sink got:  $got messages (before the probe)"
fi
echo "  maillog:        $log_lines lines, $sent with status=sent"
echo "  probe reply:    $reply"

bad=
[ "$sent" = "$messages" ] || bad="$bad the log has $sent status=sent lines, not $messages;"
[ -n "$discard" ] || [ "$got" = "$messages" ] || bad="$bad smtp-sink counted $got messages, not $messages;"
[[ "$reply" == "250 "*"queued as "* ]] || bad="$bad the probe's reply has no 'queued as';"
[ -z "$bad" ] || die "${bad%;}"
echo "  checks:         all $messages delivered$([ -z "$discard" ] && echo " and counted by smtp-sink"), queue ID in the 250 reply"
