#!/usr/bin/env bash
# Sets up, starts and stops a Postfix instance tuned for bulk injection by
# blast, separate from the system's default Postfix instance. Everything
# (configuration, queue, data, log) lives under one directory, on tmpfs by
# default. See docs/postfix.md.
#
#   postfix.sh start  [--dir DIR] [--port 2526] [--relay HOST:PORT | --discard]
#                     [--in-flow-delay 1s] [--log FILE] [--set NAME=VALUE]...
#                     [--bounce-domain DOMAIN... --database URL --quarantine DIR
#                      [--blast BIN] [--pipe-user USER]]
#                     [--tls-cert FILE --tls-key FILE] [--sasl-user USER]
#   postfix.sh stop   [--dir DIR] [--purge]
#   postfix.sh status [--dir DIR]
#   postfix.sh flush-wait [--dir DIR] [--timeout 600]
#   postfix.sh queue-size [--dir DIR]
#
# Environment (the command line wins): BLAST_MTA_DIR, BLAST_MTA_PORT,
# BLAST_MTA_RELAY (HOST:PORT, or "discard"), BLAST_MTA_IN_FLOW_DELAY,
# BLAST_MTA_LOG, BLAST_DATABASE (for --database, which then stays off the
# command line).
#
# Safe to run as root on a shared host: it never follows a symbolic link
# when it creates or changes a directory, refuses an instance directory
# that it did not create (one another user owns, or that others can write),
# and keeps the database URL out of world-readable files and command lines.
#
# Needs root (Postfix's master must start as root) and Debian's postfix
# package, which it installs when missing. It never reads or writes
# /etc/postfix/main.cf and does not need the default instance.
set -euo pipefail

export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"
export LC_ALL=C
prog=postfix.sh

# The queue directories that hold messages (one file per message).
queue_dirs=(maildrop incoming active deferred hold)
# Written into main.cf; stop --purge only removes a directory that has it.
marker="# Written by blast scripts/mta/postfix.sh"
# smtpd answers 452 (try again later) to new mail when less than this is free
# on the queue's file system; start refuses to run with less than twice this.
queue_minfree=268435456

usage() {
  cat <<'EOF'
Usage: postfix.sh COMMAND [OPTIONS]

Commands:
  start       write the configuration, start the instance, wait for its 220 greeting
  stop        stop the instance (clean "postfix stop"), wait for every process to exit
  status      print whether master runs and the number of queued messages
  flush-wait  wait until the queue is empty and print how long that took
  queue-size  print the number of queued messages (a bare number)

Options:
  --dir DIR            instance directory (default /dev/shm/blast-postfix; env BLAST_MTA_DIR)
  --port PORT          smtpd port on 127.0.0.1 (default 2526; env BLAST_MTA_PORT)
  --relay HOST:PORT    next hop for all mail over SMTP (default 127.0.0.1:2527; env BLAST_MTA_RELAY)
  --discard            discard all mail after queueing it (env BLAST_MTA_RELAY=discard)
  --in-flow-delay T    Postfix in_flow_delay, 0 to 10 seconds (default 1s; env BLAST_MTA_IN_FLOW_DELAY)
  --timeout SECONDS    flush-wait: give up after this long (default 600)
  --set NAME=VALUE     start: set a main.cf parameter, replacing the script's value
                       if it has one (repeatable; checked with postconf like the rest)
  --log FILE           start: the log file (default DIR/maillog; env BLAST_MTA_LOG).
                       Put it on a disk to keep it through a crash (docs/postfix.md)
  --bounce-domain D    start: accept mail for domain D and pipe it into
                       "blast bounce ingest --stdin" instead of relaying it
                       (repeatable: the VERP domain, the unsubscribe mailto domain)
  --database URL       with --bounce-domain: blast's database (required; a SQLite
                       URL needs an absolute path; env BLAST_DATABASE). Written to
                       DIR/etc/blast-database.url, readable by --pipe-user only
  --quarantine DIR     with --bounce-domain: Maildir for mail blast cannot use (required)
  --blast BIN          with --bounce-domain: the blast program (default /usr/local/bin/blast)
  --pipe-user USER     with --bounce-domain: run blast as USER, who must be able to
                       write the database, its directory and DIR (default nobody;
                       not root or postfix)
  --tls-cert FILE      start: offer STARTTLS with this PEM certificate chain
                       (absolute path; needs --tls-key), for blast relays with
                       tls = "starttls" (docs/postfix.md)
  --tls-key FILE       start: the PEM private key of --tls-cert
  --sasl-user USER     start: offer AUTH (Cyrus SASL, sasldb in DIR) for USER, with
                       the password in BLAST_MTA_SASL_PASSWORD; needs saslpasswd2
                       (apt-get install sasl2-bin)
  --sasl-mechs "M ..." start: with --sasl-user, the mechanisms offered (default "PLAIN LOGIN")
  --purge              stop: remove DIR afterwards (queued mail is lost; a --log
                       outside DIR is kept)

start on a running instance with the same configuration does nothing; with a
changed configuration it rewrites main.cf/master.cf and reloads Postfix.
status exits 0 when master runs and 3 when it does not.
EOF
}

die() {
  echo "$prog: error: $*" >&2
  exit 1
}
say() { echo "$prog: $*"; }
warn() { echo "$prog: warning: $*" >&2; }

# ---------------------------------------------------------------- options --

command=${1:-}
case "$command" in
  start | stop | status | flush-wait | queue-size) shift ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  "")
    usage >&2
    exit 2
    ;;
  *)
    echo "$prog: error: unknown command '$command'" >&2
    usage >&2
    exit 2
    ;;
esac

dir=${BLAST_MTA_DIR:-/dev/shm/blast-postfix}
port=${BLAST_MTA_PORT:-2526}
relay=${BLAST_MTA_RELAY:-127.0.0.1:2527}
in_flow_delay=${BLAST_MTA_IN_FLOW_DELAY:-1s}
maillog=${BLAST_MTA_LOG:-}
timeout=600
purge=
overrides=()
# --bounce-domain and its companions; empty unless given.
bounce_domains=()
bounce_database=${BLAST_DATABASE:-}
# BLAST_DATABASE alone does not ask for the bounce pipe.
database_from_env=${BLAST_DATABASE:+1}
bounce_quarantine=
blast_bin=
pipe_user=
tls_cert=
tls_key=
sasl_user=
sasl_mechs="PLAIN LOGIN"
# The realm users are stored under; Postfix appends it to the login name.
sasl_realm=blast.invalid

need_arg() {
  [ "$2" -ge 2 ] || die "option $1 needs a value"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) need_arg "$1" $#; dir=$2; shift 2 ;;
    --dir=*) dir=${1#*=}; shift ;;
    --port) need_arg "$1" $#; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --relay) need_arg "$1" $#; relay=$2; shift 2 ;;
    --relay=*) relay=${1#*=}; shift ;;
    --discard) relay=discard; shift ;;
    --in-flow-delay) need_arg "$1" $#; in_flow_delay=$2; shift 2 ;;
    --in-flow-delay=*) in_flow_delay=${1#*=}; shift ;;
    --timeout) need_arg "$1" $#; timeout=$2; shift 2 ;;
    --timeout=*) timeout=${1#*=}; shift ;;
    --log) need_arg "$1" $#; maillog=$2; shift 2 ;;
    --log=*) maillog=${1#*=}; shift ;;
    --purge) purge=1; shift ;;
    --set) need_arg "$1" $#; overrides+=("$2"); shift 2 ;;
    --set=*) overrides+=("${1#*=}"); shift ;;
    --bounce-domain) need_arg "$1" $#; bounce_domains+=("$2"); shift 2 ;;
    --bounce-domain=*) bounce_domains+=("${1#*=}"); shift ;;
    --database) need_arg "$1" $#; bounce_database=$2; database_from_env=; shift 2 ;;
    --database=*) bounce_database=${1#*=}; database_from_env=; shift ;;
    --quarantine) need_arg "$1" $#; bounce_quarantine=$2; shift 2 ;;
    --quarantine=*) bounce_quarantine=${1#*=}; shift ;;
    --blast) need_arg "$1" $#; blast_bin=$2; shift 2 ;;
    --blast=*) blast_bin=${1#*=}; shift ;;
    --pipe-user) need_arg "$1" $#; pipe_user=$2; shift 2 ;;
    --pipe-user=*) pipe_user=${1#*=}; shift ;;
    --tls-cert) need_arg "$1" $#; tls_cert=$2; shift 2 ;;
    --tls-cert=*) tls_cert=${1#*=}; shift ;;
    --tls-key) need_arg "$1" $#; tls_key=$2; shift 2 ;;
    --tls-key=*) tls_key=${1#*=}; shift ;;
    --sasl-user) need_arg "$1" $#; sasl_user=$2; shift 2 ;;
    --sasl-user=*) sasl_user=${1#*=}; shift ;;
    --sasl-mechs) need_arg "$1" $#; sasl_mechs=$2; shift 2 ;;
    --sasl-mechs=*) sasl_mechs=${1#*=}; shift ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1' (see $prog --help)" ;;
  esac
done

for o in ${overrides[@]+"${overrides[@]}"}; do
  [[ "$o" =~ ^[a-z0-9_]+\ *=\ *[^[:cntrl:]]*$ ]] || die "--set takes NAME=VALUE (one main.cf line), got '$o'"
done

# The directory ends up in main.cf, whose syntax has no quoting: keep it to
# characters that need none.
[[ "$dir" == /* ]] || die "--dir must be an absolute path, got '$dir'"
[[ "$dir" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--dir may only contain letters, digits and . _ / -, got '$dir'"
while [[ "$dir" == */ && "$dir" != / ]]; do dir=${dir%/}; done
case "$dir" in
  / | /etc | /etc/* | /usr | /usr/* | /var/spool/postfix | /var/lib/postfix | /bin | /sbin | /lib | /boot | /root | /home | /tmp | /dev | /dev/shm | /var | /proc | /sys | /run)
    die "refusing to use '$dir' as the instance directory: give a directory of its own, such as /dev/shm/blast-postfix"
    ;;
esac
etc=$dir/etc
spool=$dir/spool
data=$dir/data
if [ -z "$maillog" ]; then
  maillog=$dir/maillog
else
  [[ "$maillog" == /* && "$maillog" != */ ]] || die "--log must be an absolute file name, got '$maillog'"
  [[ "$maillog" =~ ^[A-Za-z0-9._/-]+$ ]] || die "--log may only contain letters, digits and . _ / -, got '$maillog'"
fi
# postlogd only writes below these prefixes.
log_prefixes=$dir
[[ "$maillog" == "$dir"/* ]] || log_prefixes="$dir, $(dirname "$maillog")"

valid_port() { [[ "$1" =~ ^[0-9]{1,5}$ ]] && [ "$((10#$1))" -ge 1 ] && [ "$((10#$1))" -le 65535 ]; }
valid_port "$port" || die "--port must be a TCP port number, got '$port'"
port=$((10#$port))
[ "$port" -ne 25 ] || die "--port 25 is the system MTA's port; pick another (default 2526)"
[[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, got '$timeout'"

[[ "$in_flow_delay" =~ ^([0-9]+)s?$ ]] || die "--in-flow-delay must be whole seconds such as 1s or 0, got '$in_flow_delay'"
[ "${BASH_REMATCH[1]}" -le 10 ] || die "--in-flow-delay must be between 0 and 10 seconds (Postfix's range), got '$in_flow_delay'"
in_flow_delay="$((10#${BASH_REMATCH[1]}))s"

# relayhost is "[host]:port": the brackets turn off MX lookups; the host is an
# IPv4 address or a name from /etc/hosts (DNS is off, see main.cf).
relayhost=
if [ "$relay" != discard ]; then
  r=$relay
  [[ "$r" == *:* ]] || r="$r:25"
  rhost=${r%:*}
  rport=${r##*:}
  rhost=${rhost#[}
  rhost=${rhost%]}
  [[ "$rhost" =~ ^[A-Za-z0-9._-]+$ ]] || die "--relay must be HOST:PORT with an IPv4 address or a host name (IPv6 is not set up), got '$relay'"
  valid_port "$rport" || die "--relay port must be a TCP port number, got '$relay'"
  rport=$((10#$rport))
  if [[ "$rhost" == 127.* || "$rhost" == localhost ]] && [ "$rport" -eq "$port" ]; then
    die "--relay $relay is this instance's own smtpd port: mail would loop"
  fi
  relayhost="[$rhost]:$rport"
fi

# --tls-cert/--tls-key go into main.cf as they are: absolute, no spaces.
if [ -n "$tls_cert$tls_key" ]; then
  [ -n "$tls_cert" ] && [ -n "$tls_key" ] || die "--tls-cert and --tls-key go together"
  for f in "$tls_cert" "$tls_key"; do
    [[ "$f" =~ ^/[A-Za-z0-9._/-]+$ ]] || die "--tls-cert/--tls-key need an absolute path of letters, digits and . _ / -, got '$f'"
    [ -r "$f" ] || die "cannot read $f"
  done
fi

# --sasl-user: the user goes into the sasldb, the mechanisms into smtpd.conf.
if [ -n "$sasl_user" ]; then
  [[ "$sasl_user" =~ ^[A-Za-z0-9._-]+$ ]] || die "--sasl-user takes letters, digits and . _ -, got '$sasl_user'"
  [ -n "${BLAST_MTA_SASL_PASSWORD:-}" ] || die "--sasl-user needs the password in BLAST_MTA_SASL_PASSWORD"
  mechs_re='^[A-Z0-9 -]+$'
  [[ "$sasl_mechs" =~ $mechs_re ]] || die "--sasl-mechs takes mechanism names such as \"PLAIN LOGIN\", got '$sasl_mechs'"
fi

# --bounce-domain: every value but the database URL ends up in main.cf or in
# the pipe's argv in master.cf, which has no quoting ("$" starts a macro, "{" groups words), so
# each is held to characters that need none.
if [ ${#bounce_domains[@]} -eq 0 ]; then
  [ -z "$database_from_env" ] || bounce_database=
  for o in database:"$bounce_database" quarantine:"$bounce_quarantine" blast:"$blast_bin" pipe-user:"$pipe_user"; do
    [ -z "${o#*:}" ] || die "--${o%%:*} only goes with --bounce-domain"
  done
else
  for i in "${!bounce_domains[@]}"; do
    d=${bounce_domains[$i],,}
    [[ "$d" =~ ^([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] ||
      die "--bounce-domain must be a domain name such as bounce.example.com, got '${bounce_domains[$i]}'"
    bounce_domains[i]=$d
  done
  [ -n "$bounce_database" ] || die "--bounce-domain needs --database URL (blast's database)"
  # The URL goes into a file of its own (its first line), not into master.cf.
  [[ "$bounce_database" != *[[:cntrl:]]* ]] || die "--database must be one line"
  # The pipe runs blast in Postfix's queue directory: a relative SQLite path
  # would land there.
  bounce_sqlite=
  if [[ "$bounce_database" == sqlite:* ]]; then
    bounce_sqlite=${bounce_database#sqlite:}
    bounce_sqlite=${bounce_sqlite#//}
    bounce_sqlite=${bounce_sqlite%%\?*}
    [[ "$bounce_sqlite" == /?* ]] || die "--database: a SQLite URL needs an absolute path (sqlite:///var/lib/blast/blast.db), got '$bounce_database'"
  fi
  [ -n "$bounce_quarantine" ] || die "--bounce-domain needs --quarantine DIR (a Maildir for mail blast cannot use)"
  for o in quarantine:"$bounce_quarantine" blast:"${blast_bin:=/usr/local/bin/blast}"; do
    [[ "${o#*:}" == /?* && "${o#*:}" =~ ^[A-Za-z0-9._/+-]+$ ]] ||
      die "--${o%%:*} must be an absolute path of letters, digits and . _ / + -, got '${o#*:}'"
  done
  : "${pipe_user:=nobody}"
  [[ "$pipe_user" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--pipe-user must be a user name, got '$pipe_user'"
fi

# ---------------------------------------------------------------- helpers --

require_root() {
  [ "$(id -u)" -eq 0 ] || die "'$command' needs root: Postfix's master daemon must be started and stopped as root, and only root (or postfix) can read its queue and processes"
}

# Dies unless every directory from / down to PATH is owned by root and
# writable by nobody else (a sticky directory such as /dev/shm is allowed
# with STICKY=sticky): otherwise another user could rename or replace what
# this script creates below it. Symbolic links on the way are checked
# themselves (lstat) and then their target's own chain.
check_chain() {
  local path=$1 sticky=${2:-} p st mode
  p=$path
  while :; do
    st=$(stat -c '%u %a %F' -- "$p" 2>/dev/null) || die "cannot stat $p"
    read -r -a st <<<"$st"
    mode=$((8#${st[1]}))
    [ "${st[0]}" -eq 0 ] || die "$p is owned by uid ${st[0]}, not root: refusing to create files below it as root"
    if [ "${st[2]}" = directory ] && ((mode & 8#022)); then
      ((mode & 8#1000)) && [ "$sticky" = sticky ] ||
        die "$p is writable by other users: refusing to create files below it as root"
    fi
    [ "$p" != / ] || break
    p=$(dirname -- "$p")
  done
  local real
  real=$(realpath -e -- "$path") || die "cannot resolve $path"
  [ "$real" = "$path" ] || check_chain "$real" "$sticky"
}

# Creates directory D owned by OWNER (a user; its group too) with MODE, or
# checks that an existing D is a directory (not a symbolic link) that OWNER
# owns and nobody else can write, and sets MODE. Never follows a link, so a
# planted link cannot make root chown or chmod what it points at.
safe_dir() {
  local d=$1 owner=$2 mode=$3 uid st
  uid=$(id -u "$owner") || die "there is no user '$owner'"
  [ ! -L "$d" ] || die "$d is a symbolic link: refusing to use it (remove it, or give another --dir)"
  if [ ! -e "$d" ]; then
    mkdir -m "$mode" -- "$d" || die "cannot create $d"
    chown -h "$owner:$(id -gn "$owner")" -- "$d"
    return 0
  fi
  [ -d "$d" ] || die "$d exists and is not a directory"
  st=$(stat -c '%u %a' -- "$d")
  [ "${st% *}" -eq "$uid" ] || die "$d is owned by uid ${st% *}, not $owner: refusing a directory this script did not create"
  ((8#${st#* } & 8#022)) && die "$d is writable by group or others: refusing it"
  chmod "$mode" -- "$d"
}

# Checks the instance directory before anything reads or writes in it: it
# is created only below directories root controls, and an existing one must
# be root's own, with no symbolic link for etc, spool or data.
check_instance_dir() {
  check_chain "$(dirname -- "$dir")" sticky
  [ -e "$dir" ] || [ -L "$dir" ] || return 0
  [ ! -L "$dir" ] || die "$dir is a symbolic link: refusing to use it"
  [ -d "$dir" ] || die "$dir exists and is not a directory"
  local st
  st=$(stat -c '%u %a' -- "$dir")
  [ "${st% *}" -eq 0 ] || die "$dir is owned by uid ${st% *}, not root: refusing a directory this script did not create"
  ((8#${st#* } & 8#022)) && die "$dir is writable by group or others: refusing it"
  local d
  for d in "$etc" "$spool" "$data"; do
    [ ! -L "$d" ] || die "$d is a symbolic link: refusing to use it"
  done
  return 0
}

# Debian's postfix package brings the programs, the postfix user and the
# postdrop group. Installed with "No configuration" it writes no
# /etc/postfix/main.cf and starts no default instance.
ensure_postfix() {
  if command -v postfix >/dev/null && command -v postconf >/dev/null &&
    [ -x "$(postconf -dh daemon_directory 2>/dev/null)/master" ]; then
    :
  else
    require_root
    command -v apt-get >/dev/null || die "Postfix is not installed and there is no apt-get: install Postfix (3.4 or later) first"
    say "Postfix is not installed; installing Debian's postfix package (No configuration)"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null ||
      die "apt-get install postfix failed"
  fi
  getent passwd postfix >/dev/null || die "there is no 'postfix' user (Debian's postfix package creates it)"
  getent group postdrop >/dev/null || die "there is no 'postdrop' group (Debian's postfix package creates it)"
}

# True when DIR holds a configuration written by this script.
ours() {
  [ -f "$etc/main.cf" ] && head -n 1 "$etc/main.cf" | grep -qxF "$marker"
}

# True when the process exists and is not a zombie.
alive() {
  local state
  state=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Every process of this instance: Postfix passes the configuration directory
# to all its daemons in the environment (MAIL_CONFIG), not on the command line.
instance_pids() {
  local p env
  for p in /proc/[0-9]*; do
    env=$(tr '\0' '\n' 2>/dev/null <"$p/environ") || continue
    if grep -qxF "MAIL_CONFIG=$etc" <<<"$env"; then
      alive "${p#/proc/}" && echo "${p#/proc/}"
    fi
  done
  return 0
}

# Prints the pid of this instance's master when it runs.
master_pid() {
  local pid
  pid=$(awk 'NR == 1 { print $1 }' "$spool/pid/master.pid" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = master ] || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "MAIL_CONFIG=$etc" || return 1
  echo "$pid"
}

# Reads the SMTP greeting from 127.0.0.1:PORT; fails when nothing listens.
smtp_greeting() {
  local port=$1
  (
    exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
    line=
    IFS= read -r -t 3 line <&3 || true
    printf 'QUIT\r\n' >&3 || true
    printf '%s\n' "${line%$'\r'}"
  ) 2>/dev/null
}

# True when HOST:PORT accepts a TCP connection (within 3 s).
port_open() {
  # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Prints "total maildrop incoming active deferred hold".
queue_counts() {
  local q n total=0 out=
  for q in "${queue_dirs[@]}"; do
    n=0
    if [ -d "$spool/$q" ]; then
      n=$(find "$spool/$q" -type f 2>/dev/null | wc -l) || n=0
    fi
    total=$((total + n))
    out="$out $n"
  done
  echo "$total$out"
}

describe_counts() {
  local -a c
  read -r -a c <<<"$1"
  echo "${c[0]} messages (maildrop ${c[1]}, incoming ${c[2]}, active ${c[3]}, deferred ${c[4]}, hold ${c[5]})"
}

# The postfix command reports a bad main.cf to syslog (there is none here) or
# to a terminal, not to a pipe: rerun its check under script(1), which gives
# it a terminal, so that the reason reaches the user.
explain_failure() {
  local out cf=${1:-$etc} what=${2:-check}
  if command -v script >/dev/null; then
    out=$(script -qec "postfix -c '$cf' $what" /dev/null </dev/null 2>&1 | tr -d '\r') || true
    [ -z "$out" ] || printf '%s\n' "$out" >&2
  fi
  [ "$cf" != "$etc" ] || show_log_tail
}

show_log_tail() {
  if [ -s "$maillog" ]; then
    echo "--- last lines of $maillog:" >&2
    tail -n 15 "$maillog" >&2
  fi
}

# ------------------------------------------------------------ configuration --

# The main.cf part written for --bounce-domain (see docs/postfix.md, "Bounces
# and unsubscribe mail into blast").
bounce_main_cf() {
  local d domains='' table=''
  for d in "${bounce_domains[@]}"; do
    domains="$domains${domains:+, }$d"
    table="$table${table:+, }$d=blast:"
  done
  cat <<EOF

# ---- Bounces and unsubscribe mail into blast (--bounce-domain) ----
# These domains are relay domains: smtpd accepts mail for them from any client
# (permit_auth_destination above), with any local part (relay_recipient_maps
# is empty: blast decides what an address means). transport_maps sends them
# to the blast pipe service in master.cf instead of the next hop.
relay_domains = $domains
transport_maps = inline:{ $table }
# bounces+1-42-SIG@ and unsubscribe+TOKEN@ are user+extension addresses: with
# the delimiter, pipe's \${user} and \${extension} and a transport_maps key
# user@domain see them as such. blast reads the whole address either way.
recipient_delimiter = +
# One recipient per blast run, so that --recipient \${original_recipient} is
# exactly one address (pipe(8) requires 1 for the O flag too). Default: 50.
blast_destination_recipient_limit = 1
# With a recipient limit of 1 this is per address: two mails to the same
# address are never ingested at the same time. Different addresses run in
# parallel up to the maxproc of the blast service in master.cf. Default: 20.
blast_destination_concurrency_limit = 1
EOF
}

# True when the next hop is not on this host.
relay_is_remote() {
  [ -n "$relayhost" ] && [[ "$rhost" != 127.* && "$rhost" != localhost ]]
}

write_main_cf() {
  local transport_block tls_block sasl_block="" relay_restrictions="permit_mynetworks, reject"
  local smtp_tls="# The next hop is on loopback: no TLS.
smtp_tls_security_level = none"
  if [ -n "$sasl_user" ]; then
    sasl_block="# --sasl-user: AUTH through Cyrus SASL. Debian's Postfix reads the SASL
# settings from \$config_directory/sasl/smtpd.conf (cyrus_sasl_config_path
# is not used); the users are in a sasldb in the data directory, under the
# realm below, which Postfix appends to the login name. Mechanisms offered:
# $sasl_mechs (a change here makes start reload the instance).
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
smtpd_sasl_local_domain = $sasl_realm"
  fi
  if [ -n "$tls_cert" ]; then
    tls_block="# --tls-cert: STARTTLS offered (not required) to blast's injectors; the
# Received header and the log (loglevel 1) say which protocol and cipher.
smtpd_tls_security_level = may
smtpd_tls_cert_file = $tls_cert
smtpd_tls_key_file = $tls_key
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1"
  else
    tls_block="# No TLS on loopback (and no tlsmgr service in master.cf).
smtpd_tls_security_level = none"
  fi
  # With --sasl-user, relaying needs AUTH even from loopback: the instance
  # may then listen on more than loopback (--set inet_interfaces=...).
  [ -z "$sasl_user" ] || relay_restrictions="permit_sasl_authenticated, reject"
  [ ${#bounce_domains[@]} -eq 0 ] || relay_restrictions="${relay_restrictions%, reject}, permit_auth_destination, reject"
  if relay_is_remote; then
    smtp_tls="# The next hop is another host: STARTTLS whenever it offers it (mail and
# any credentials are not sent in clear where it can be avoided). Raise it to
# secure or verify with --set where the next hop is known.
smtp_tls_security_level = may
smtp_tls_loglevel = 1"
  fi
  if [ -n "$relayhost" ]; then
    transport_block="# All mail, for any domain, goes over SMTP to this next hop. The brackets
# turn off MX lookups.
relayhost = $relayhost
default_transport = smtp
# Keep the connections to the next hop in the connection cache even when there
# is no backlog (default: empty, i.e. only on demand, see below).
smtp_connection_cache_destinations = \$relayhost"
  else
    transport_block="# --discard: every message is accepted, queued and then thrown away by the
# discard transport, which logs it as sent. For measuring the injection side.
relayhost =
default_transport = discard"
  fi
  cat <<EOF
$marker
# from its options; rewritten on every start, so do not edit it here: change
# the script (see docs/postfix.md). Each tuned parameter gives its Postfix 3.7
# default.

compatibility_level = 3.6

# ---- This instance's own files; nothing is shared with /etc/postfix's. ----
# The configuration directory itself is given by "postfix -c $etc".
queue_directory = $spool
data_directory = $data
# There is no syslogd: postlogd (the postlog service in master.cf) writes the
# log to this file. maillog_file_prefixes (default: /var, /dev/stdout) must
# allow the path.
maillog_file = $maillog
maillog_file_prefixes = $log_prefixes
# A name of its own in the log, distinct from the default instance's "postfix".
syslog_name = postfix-blast

# ---- Network: loopback only, no local delivery, relay for loopback. ----
# smtpd listens on 127.0.0.1:$port only (see master.cf); never on port 25.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# No local delivery: no domain is local, so no passwd or alias lookups.
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
# Loopback clients may relay to any domain (with --sasl-user: clients that
# authenticated, and no others); everything else is refused (with
# --bounce-domain: except mail for the bounce domains, see the end).
mynetworks = 127.0.0.0/8 [::1]/128
smtpd_relay_restrictions = $relay_restrictions
$tls_block
$smtp_tls
$sasl_block

$transport_block

# No DNS anywhere: the smtp client resolves the next hop with the system
# resolver (/etc/hosts), so an example.com recipient never causes a lookup.
# smtp_dns_support_level default: empty (DNS on); disable_dns_lookups is its
# deprecated predecessor. smtp_host_lookup default: dns.
smtp_dns_support_level = disabled
smtp_host_lookup = native
# smtpd does no reverse lookup of the client (127.0.0.1). Default: yes.
smtpd_peername_lookup = no

# ---- Tuning for bulk injection ----

# Upper bound on processes per service (smtpd, smtp, cleanup, ...): with 100,
# more than 100 injector connections wait in the listen backlog and the smtp
# client cannot go beyond 100 deliveries at once. Default: 100.
default_process_limit = 200

# Per-client limits kept by anvil. Loopback is exempt from them by default
# (smtpd_client_event_limit_exceptions defaults to \$mynetworks), but they are
# set to 0 (off) so that a changed mynetworks cannot bring back the default of
# 50 simultaneous connections per client. With every limit 0, smtpd does not
# talk to anvil at all.
# Default: 50.
smtpd_client_connection_count_limit = 0
# Default: 0 (off).
smtpd_client_connection_rate_limit = 0
# Default: 0 (off).
smtpd_client_message_rate_limit = 0
# Default: 0 (off).
smtpd_client_recipient_rate_limit = 0
# Default: \${smtpd_client_connection_limit_exceptions:\$mynetworks}.
smtpd_client_event_limit_exceptions = \$mynetworks

# A daemon process exits after serving this many requests, and master forks a
# new one. A request is a client connection for smtpd, one message for
# cleanup, one delivery for smtp. With 100, cleanup and smtp processes are
# replaced every 100 messages each. Default: 100.
max_use = 10000

# Reuse SMTP connections to the next hop: on demand (when a destination has a
# backlog) is the default; smtp_connection_cache_destinations above makes it
# unconditional for the relay. Default: yes.
smtp_connection_cache_on_demand = yes
# How many times a cached connection may be reused; 0 is no limit (the
# connection is still closed after smtp_connection_reuse_time_limit, 300s).
# Default: 0.
smtp_connection_reuse_count_limit = 0

# Parallel deliveries to one destination. With a relayhost every message has
# the same destination, so this is the number of SMTP connections to the next
# hop (smtp_destination_concurrency_limit and discard_... inherit it).
# Default: 20.
default_destination_concurrency_limit = 50
# Recipients per delivery transaction. blast sends one recipient per message,
# so the default does not limit anything; kept as is. Default: 50.
default_destination_recipient_limit = 50

# Messages qmgr holds in memory (the active queue). Beyond this, new mail waits
# in the incoming queue on disk; delivery speed does not improve with more.
# Default: 20000.
qmgr_message_active_limit = 20000

# When mail arrives faster than qmgr moves it out, each new message is delayed
# up to this long before smtpd/cleanup accept it: back pressure on the
# injectors. With 0, 32 injectors once filled the tmpfs queue with 70-80
# thousand messages (~400 MB) and delivery got slower for the same end-to-end
# rate. Default: 1s.
in_flow_delay = $in_flow_delay

# Do not rewrite the addresses in the message headers (From:, To:, Reply-To:,
# ...) of mail from loopback clients: blast writes complete addresses, and each
# header address is one more request to trivial-rewrite, whose client-side
# cache holds one address (a To: that differs in every message always misses
# it). Envelope addresses are still rewritten and resolved. Mail from other
# clients is not header-rewritten either way (remote_header_rewrite_domain is
# empty). Default: permit_inet_interfaces.
local_header_rewrite_clients =

# cleanup does not parse the MIME structure of each message it receives. That
# parse serves header_checks on the headers of nested MIME parts (there are
# none here) and finds 8-bit bytes in a body that was not declared with
# BODY=8BITMIME (blast declares its 8bit messages). cleanup does not change
# the content either way, and the smtp client still converts 8bit parts to
# quoted-printable for a next hop without 8BITMIME (tests/mta.rs checks it).
# Default: no.
disable_mime_input_processing = yes

# Drop an idle or stuck client after this long instead of keeping an smtpd
# process busy. Injectors on loopback answer in microseconds. Default: 300s.
smtpd_timeout = 60s

# Largest accepted message, headers included. Default: 10240000 (10 MB);
# raised to 25 MiB, the usual limit of large mailbox providers.
message_size_limit = 26214400

# smtpd refuses new mail with 452 (try again) when less than this is free on
# the queue's file system, so a full tmpfs queue pushes back on blast instead
# of failing messages. Postfix also always keeps 1.5 x message_size_limit.
# Default: 0 (only the 1.5 x message_size_limit rule).
queue_minfree = $queue_minfree

# Client, HELO and sender restrictions are evaluated at RCPT time by default;
# there are none here, so this costs nothing either way. Default: yes (kept).
smtpd_delay_reject = yes

# No "new mail" notifications to local users. Default: yes.
biff = no

# Do not wait for the next hop's reply to QUIT at the end of a session.
# Default: yes (smtp), no (lmtp).
smtp_skip_quit_response = yes
lmtp_skip_quit_response = yes

# Queue IDs that are unique over time (the default short IDs derive from the
# inode number, which tmpfs reuses). blast records the ID from the 250 reply in
# its ledger; a unique ID finds the message in the log. Default: no.
enable_long_queue_ids = yes

# The next hop is local: when it was briefly down, retry deferred mail after
# seconds rather than minutes. Defaults: 300s, 300s, 4000s.
queue_run_delay = 30s
minimal_backoff_time = 30s
maximal_backoff_time = 300s
EOF
  [ ${#bounce_domains[@]} -eq 0 ] || bounce_main_cf
}

# Applies the --set NAME=VALUE lines to main.cf on stdin: a parameter that is
# already there gets its value replaced in place (postconf warns about a
# parameter set twice), any other is appended.
apply_overrides() {
  if [ ${#overrides[@]} -eq 0 ]; then
    cat
    return
  fi
  awk '
    FNR == NR {
      name = $0; sub(/[ ]*=.*/, "", name)
      value = $0; sub(/^[^=]*=[ ]*/, "", value)
      if (!(name in set)) order[++n] = name
      set[name] = value
      next
    }
    {
      name = $0; sub(/[ ]*=.*/, "", name)
      if ($0 ~ /^[a-z0-9_]+ *=/ && (name in set)) {
        print "# --set replaced: " $0
        print name " = " set[name]
        done[name] = 1
        next
      }
      print
    }
    END {
      header = 0
      for (i = 1; i <= n; i++) {
        if (order[i] in done) continue
        if (!header) { print ""; print "# ---- Added with --set ----"; header = 1 }
        print order[i] " = " set[order[i]]
      }
    }' <(printf '%s\n' "${overrides[@]}") -
}

write_master_cf() {
  cat <<EOF
$marker; rewritten on every start.
# Only the services this instance needs. No daemon runs chrooted (chroot
# column n), so nothing has to be copied into the queue directory.
# ==========================================================================
# service type  private unpriv  chroot  wakeup  maxproc command + args
# ==========================================================================
127.0.0.1:$port inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
  [ -z "$tls_cert" ] && ! relay_is_remote || cat <<EOF
# TLS (--tls-cert, or a next hop on another host): the TLS session cache and
# entropy come from tlsmgr.
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
EOF
  [ ${#bounce_domains[@]} -eq 0 ] || cat <<EOF
# --bounce-domain: mail for the bounce domains goes to blast bounce ingest.
# unpriv n: pipe starts as root to switch to user=. At most 4 blast processes
# at once (maxproc). Flags: O adds X-Original-To: (the address as received),
# R adds Return-Path: (the envelope sender), X reports final delivery, q
# quotes an odd local part on the command line. null_sender= (empty) keeps a
# bounce's Return-Path: <> (default: <MAILER-DAEMON>). Exit 75 defers. The
# database URL is in a file only $pipe_user can read: master.cf is readable
# by everyone, and a command line by ps.
blast     unix  -       n       n       -       4       pipe
  flags=ORXq user=$pipe_user null_sender= argv=$blast_bin bounce ingest --stdin
  --quarantine $bounce_quarantine --database-file $etc/blast-database.url
  --recipient \${original_recipient}
EOF
}

# Warns when --pipe-user cannot reach the blast program, the SQLite database
# or the quarantine: the pipe would then fail, blast exit 75, and every
# bounce wait in the deferred queue.
check_bounce_setup() {
  [ ${#bounce_domains[@]} -gt 0 ] || return 0
  local uid p
  uid=$(id -u "$pipe_user" 2>/dev/null) || die "--pipe-user: there is no user '$pipe_user'"
  [ "$uid" -ne 0 ] || die "--pipe-user must not be root: pipe(8) refuses to run commands as root"
  [ "$pipe_user" != "$(postconf -dh mail_owner)" ] || die "--pipe-user must not be the mail system owner: pipe(8) refuses it"
  pipe_user_can -x "$blast_bin" -a -f "$blast_bin" || warn "$pipe_user cannot execute $blast_bin"
  # blast creates what is missing, so the nearest existing directory counts.
  p=$(nearest_existing "$bounce_quarantine")
  pipe_user_can -w "$p" -a -x "$p" || warn "$pipe_user cannot write $p (for --quarantine $bounce_quarantine)"
  if [ -n "$bounce_sqlite" ]; then
    p=$(nearest_existing "$(dirname "$bounce_sqlite")")
    pipe_user_can -w "$p" -a -x "$p" || warn "$pipe_user cannot write $p (the database's directory: SQLite creates -wal and -shm files there)"
    [ ! -e "$bounce_sqlite" ] || pipe_user_can -w "$bounce_sqlite" || warn "$pipe_user cannot write $bounce_sqlite"
  fi
}

# test(1) with ARGS, run as --pipe-user.
pipe_user_can() { runuser -u "$pipe_user" -- test "$@" 2>/dev/null; }

# Prints PATH, or its nearest ancestor that exists.
nearest_existing() {
  local p=$1
  while [ ! -e "$p" ]; do p=$(dirname "$p"); done
  echo "$p"
}

# Writes main.cf and master.cf into DIR (a temporary directory), and checks
# them with postconf: any warning (an unknown or unused parameter, a bad
# value) is an error.
generate_config() {
  local out=$1 warnings
  write_main_cf | apply_overrides >"$out/main.cf"
  write_master_cf >"$out/master.cf"
  # Postfix re-reads a configuration file until its mtime is at least a
  # second older than the start of the read ("pausing to let ... settle"):
  # a file written just now costs every program that reads it up to 2 s.
  touch -m -d "@$((EPOCHSECONDS - 10))" "$out/main.cf" "$out/master.cf"
  warnings=$(postconf -c "$out" -n 2>&1 >/dev/null) || die "postconf rejects the generated main.cf: $warnings"
  [ -z "$warnings" ] || die "postconf warns about the generated main.cf: $warnings"
  warnings=$(postconf -c "$out" -M 2>&1 >/dev/null) || die "postconf rejects the generated master.cf: $warnings"
  [ -z "$warnings" ] || die "postconf warns about the generated master.cf: $warnings"
}

print_summary() {
  local pid=$1 greeting=$2 fs
  fs=$(df --output=fstype "$spool" 2>/dev/null | awk 'NR == 2') || fs=$(stat -f -c %T "$spool" 2>/dev/null) || fs=unknown
  echo "  smtpd:         127.0.0.1:$port ($greeting)"
  if [ -n "$relayhost" ]; then
    echo "  relay:         all mail to $relayhost over SMTP"
  else
    echo "  relay:         none: all mail is discarded (--discard)"
  fi
  echo "  queue:         $spool ($fs)"
  echo "  config:        $etc"
  echo "  log:           $maillog"
  echo "  in_flow_delay: $in_flow_delay"
  if [ ${#bounce_domains[@]} -gt 0 ]; then
    echo "  bounces:       ${bounce_domains[*]} piped to $blast_bin bounce ingest as $pipe_user"
  fi
  echo "  master pid:    $pid"
}

wait_greeting() {
  local deadline=$((SECONDS + 10)) greeting
  while :; do
    greeting=$(smtp_greeting "$port") || greeting=
    if [[ "$greeting" == 220\ * ]]; then
      echo "$greeting"
      return 0
    fi
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# --sasl-user: DIR/etc/sasl/smtpd.conf and the user's sasldb, readable by
# smtpd (which runs as postfix). Rewritten on every start.
setup_sasl() {
  [ -n "$sasl_user" ] || return 0
  # saslpasswd2, the PLAIN/LOGIN plugins and the sasldb plugin.
  if ! command -v saslpasswd2 >/dev/null ||
    ! dpkg -s libsasl2-modules libsasl2-modules-db >/dev/null 2>&1; then
    command -v apt-get >/dev/null || die "--sasl-user needs Cyrus SASL (saslpasswd2, the PLAIN/LOGIN and sasldb plugins)"
    say "installing Cyrus SASL (sasl2-bin libsasl2-modules libsasl2-modules-db)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      sasl2-bin libsasl2-modules libsasl2-modules-db >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends sasl2-bin libsasl2-modules libsasl2-modules-db >/dev/null; } ||
      die "apt-get install sasl2-bin failed"
  fi
  # In root's directory, not postfix's data directory: nobody else can put
  # a link where root writes it.
  safe_dir "$etc/sasl" root 0755
  cat >"$etc/sasl/smtpd.conf" <<EOF
pwcheck_method: auxprop
auxprop_plugin: sasldb
mech_list: $sasl_mechs
sasldb_path: $etc/sasl/sasldb2
EOF
  rm -f "$etc/sasl/sasldb2" "$data/sasldb2"
  printf '%s' "$BLAST_MTA_SASL_PASSWORD" |
    saslpasswd2 -p -c -f "$etc/sasl/sasldb2" -u "$sasl_realm" "$sasl_user" ||
    die "saslpasswd2 could not create $etc/sasl/sasldb2"
  chown -h root:postfix "$etc/sasl/sasldb2"
  chmod 0640 "$etc/sasl/sasldb2"
}

# --bounce-domain: the database URL in DIR/etc/blast-database.url, owned by
# --pipe-user and readable by it alone (the pipe runs blast with
# --database-file). Rewritten on every start: the pipe reads it each time.
install_database_file() {
  [ ${#bounce_domains[@]} -gt 0 ] || return 0
  local f=$etc/blast-database.url tmp
  tmp=$(mktemp "$etc/.blast-database.XXXXXX")
  printf '%s\n' "$bounce_database" >"$tmp"
  chown -h "$pipe_user:root" -- "$tmp"
  chmod 0400 -- "$tmp"
  mv -f -- "$tmp" "$f"
}

# ---------------------------------------------------------------- commands --

cmd_start() {
  require_root
  check_instance_dir
  ensure_postfix
  check_bounce_setup
  local tmp pid greeting avail
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/blast-postfix-cf.XXXXXX")
  # shellcheck disable=SC2064 # expand $tmp now
  trap "rm -rf '$tmp'" EXIT
  generate_config "$tmp"

  if pid=$(master_pid); then
    if cmp -s "$tmp/main.cf" "$etc/main.cf" && cmp -s "$tmp/master.cf" "$etc/master.cf"; then
      install_database_file
      say "already running (master pid $pid) with this configuration; nothing to do"
      return 0
    fi
    local old_listen
    old_listen=$(awk '$2 == "inet" { print $1; exit }' "$etc/master.cf" 2>/dev/null) || old_listen=
    if [ "$old_listen" != "127.0.0.1:$port" ] && port_open 127.0.0.1 "$port"; then
      die "127.0.0.1:$port already accepts connections: stop whatever listens there (ss -ltnp 'sport = :$port') or use another --port"
    fi
    # Let the postfix command parse every parameter of the new main.cf before
    # it replaces the running one: "status" exits 0 only if it could, and
    # the master it finds still runs.
    if ! postfix -c "$tmp" status >/dev/null 2>&1; then
      explain_failure "$tmp" status
      die "the new configuration is not valid; the running instance keeps its old one"
    fi
    say "already running (master pid $pid) with another configuration: rewriting it and reloading"
    setup_sasl
    install_database_file
    install -p -m 0644 "$tmp/main.cf" "$etc/main.cf"
    install -p -m 0644 "$tmp/master.cf" "$etc/master.cf"
    postfix -c "$etc" reload || {
      explain_failure
      die "postfix reload failed"
    }
    greeting=$(wait_greeting) || {
      show_log_tail
      die "reloaded, but no 220 greeting on 127.0.0.1:$port within 10 s"
    }
    say "reloaded Postfix $(postconf -c "$etc" -dh mail_version 2>/dev/null) instance"
    print_summary "$pid" "$greeting"
    return 0
  fi

  if port_open 127.0.0.1 "$port"; then
    die "127.0.0.1:$port already accepts connections, and not from this instance ($dir): stop whatever listens there (ss -ltnp 'sport = :$port') or use --port"
  fi

  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && ! ours; then
    die "$dir exists and was not set up by this script (no $etc/main.cf written by it): give an empty or new --dir"
  fi

  # Directories: root owns the instance, config and queue directories (Postfix
  # checks that); postfix owns the data directory. "postfix start" creates the
  # queue's subdirectories itself (post-install create-missing). Each is
  # created here or checked (safe_dir), never reached through a link.
  safe_dir "$dir" root 0755
  safe_dir "$etc" root 0755
  safe_dir "$spool" root 0755
  safe_dir "$data" postfix 0700
  if [[ "$maillog" != "$dir"/* ]]; then
    local logdir
    logdir=$(dirname -- "$maillog")
    check_chain "$(nearest_existing "$logdir")"
    mkdir -p -- "$logdir"
  fi
  setup_sasl
  install_database_file

  avail=$(($(df -Pk "$spool" | awk 'NR == 2 { print $4 }') * 1024))
  if [ "$avail" -lt $((2 * queue_minfree)) ]; then
    die "only $((avail / 1048576)) MiB free on the file system of $spool; this instance refuses mail below $((queue_minfree / 1048576)) MiB free (queue_minfree): use --dir on a larger file system"
  fi

  install -p -m 0644 "$tmp/main.cf" "$etc/main.cf"
  install -p -m 0644 "$tmp/master.cf" "$etc/master.cf"

  # A master.pid left by a master that died is harmless: "postfix start"
  # checks with master -t, which locks the file.
  if ! postfix -c "$etc" start; then
    explain_failure
    die "postfix -c $etc start failed"
  fi
  if ! greeting=$(wait_greeting); then
    show_log_tail
    die "Postfix started, but 127.0.0.1:$port gave no 220 greeting within 10 s"
  fi
  pid=$(master_pid) || die "Postfix answered on port $port, but its master process is gone"
  if [ ! -s "$maillog" ]; then
    warn "the log $maillog is still empty"
  fi
  if [ -n "$relayhost" ] && ! port_open "$rhost" "$rport"; then
    warn "nothing accepts connections on $rhost:$rport yet: mail will be deferred and retried every 30-300 s"
  fi
  say "started Postfix $(postconf -c "$etc" -dh mail_version 2>/dev/null) instance"
  print_summary "$pid" "$greeting"
}

cmd_stop() {
  require_root
  local pid left deadline counts
  if pid=$(master_pid); then
    say "stopping master pid $pid"
    # "postfix stop" sends SIGTERM to master, which stops its children, and
    # waits up to 5 s before killing the process group.
    postfix -c "$etc" stop || warn "postfix -c $etc stop reported an error"
    deadline=$((SECONDS + 15))
    while alive "$pid"; do
      if [ "$SECONDS" -ge "$deadline" ]; then
        warn "master pid $pid still runs after 15 s: killing its process group"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
        break
      fi
      sleep 0.1
    done
    # The exited master is a zombie until its parent (init) reaps it; wait a
    # little so that ps/pgrep right after stop show nothing.
    deadline=$((SECONDS + 3))
    while [ -e "/proc/$pid" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  else
    say "not running ($dir)"
  fi

  # Children normally exit with master; wait briefly, then kill stragglers.
  deadline=$((SECONDS + 5))
  while left=$(instance_pids) && [ -n "$left" ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      warn "killing leftover processes of $dir: $(echo "$left" | tr '\n' ' ')"
      # shellcheck disable=SC2086 # one pid per word
      kill -KILL $left 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  left=$(instance_pids)
  [ -z "$left" ] || die "processes of $dir survive: $(echo "$left" | tr '\n' ' ')"
  [ -z "${pid:-}" ] || say "stopped"

  if [ -n "$purge" ]; then
    if [ -d "$dir" ]; then
      check_instance_dir
      if ! ours; then
        die "not purging $dir: it has no main.cf written by this script"
      fi
      rm -rf -- "$dir"
      say "removed $dir"
    fi
  elif [ -d "$spool" ]; then
    counts=$(queue_counts)
    if [ "${counts%% *}" -gt 0 ]; then
      say "the queue still holds $(describe_counts "$counts"); they go out on the next start (stop --purge deletes them)"
    fi
  fi
}

cmd_status() {
  require_root
  local pid n counts rc=0
  if pid=$(master_pid); then
    n=$(instance_pids | wc -l)
    echo "master: running (pid $pid, $n processes)"
  else
    echo "master: not running"
    rc=3
  fi
  if [ -f "$etc/main.cf" ]; then
    local listen transport relayh
    listen=$(awk '$2 == "inet" { print $1; exit }' "$etc/master.cf" 2>/dev/null) || listen=
    transport=$(postconf -c "$etc" -h default_transport 2>/dev/null) || transport=
    relayh=$(postconf -c "$etc" -h relayhost 2>/dev/null) || relayh=
    echo "smtpd: ${listen:-?}; transport: ${transport:-?}${relayh:+ to $relayh}"
  fi
  if [ -d "$spool" ]; then
    counts=$(queue_counts)
    echo "queue: $(describe_counts "$counts") in $spool"
  else
    echo "queue: none ($spool does not exist)"
  fi
  return "$rc"
}

cmd_queue_size() {
  require_root
  local counts
  [ -d "$spool" ] || die "no queue at $spool"
  counts=$(queue_counts)
  echo "${counts%% *}"
}

cmd_flush_wait() {
  require_root
  [ -d "$spool" ] || die "no queue at $spool"
  local start now elapsed counts total peak=0 next_report=5
  start=$EPOCHREALTIME
  while :; do
    counts=$(queue_counts)
    total=${counts%% *}
    [ "$total" -le "$peak" ] || peak=$total
    now=$EPOCHREALTIME
    elapsed=$(awk -v a="$start" -v b="$now" 'BEGIN { printf "%.1f", b - a }')
    if [ "$total" -eq 0 ]; then
      say "queue empty after $elapsed s (largest queue seen: $peak messages)"
      return 0
    fi
    if ! master_pid >/dev/null; then
      die "master is not running: $(describe_counts "$counts") will not drain"
    fi
    if [ "${elapsed%.*}" -ge "$timeout" ]; then
      echo "$prog: timeout after $elapsed s: $(describe_counts "$counts") still queued" >&2
      return 1
    fi
    if [ "${elapsed%.*}" -ge "$next_report" ]; then
      echo "$prog: $elapsed s: $(describe_counts "$counts")" >&2
      next_report=$((next_report + 5))
    fi
    sleep 0.2
  done
}

case "$command" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  flush-wait) cmd_flush_wait ;;
  queue-size) cmd_queue_size ;;
esac
