# Source this file: starts a throwaway PostgreSQL cluster for the tests from the
# installed binaries (installing Debian's postgresql package if none), exports
# BLAST_TEST_PG_URL, and stops and removes the cluster when the shell exits.
# Works as root (the cluster runs as the `postgres` user) or as a normal user.
# The cluster is fast and fragile by default (fsync, synchronous_commit and
# full_page_writes off), which is what tests want; BLAST_PG_DURABLE=1 starts it
# with production durability (all three on) for benchmarks.

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  echo "pg.sh: no PostgreSQL server binaries; installing Debian's postgresql" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "pg.sh: need root to apt-get install postgresql (or install it yourself)" >&2
    return 1 2>/dev/null || exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

pg_dir=$(mktemp -d /tmp/blast-pg.XXXXXX)
pg_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$(id -u)" -eq 0 ]; then
  chown postgres "$pg_dir"
  pg_as() { su postgres -s /bin/sh -c "$*"; }
else
  pg_as() { sh -c "$*"; }
fi
pg_user=$([ "$(id -u)" -eq 0 ] && echo postgres || id -un)
pg_as "'$pg_bin/initdb' -A trust -U '$pg_user' -D '$pg_dir/data'" >/dev/null
if [ "${BLAST_PG_DURABLE:-0}" = 1 ]; then
  pg_durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
else
  pg_durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
pg_opts="-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 $pg_durability -c max_connections=200"
pg_as "'$pg_bin/pg_ctl' -D '$pg_dir/data' -l '$pg_dir/log' -w -o \"$pg_opts\" start" >/dev/null

pg_stop() {
  pg_as "'$pg_bin/pg_ctl' -D '$pg_dir/data' -m immediate stop" >/dev/null 2>&1
  rm -rf "$pg_dir"
}
trap pg_stop EXIT

export BLAST_TEST_PG_URL="postgres://$pg_user@127.0.0.1:$pg_port/postgres"
# What tests/restart.rs needs to restart this cluster mid-campaign (it runs
# as its own test binary, alone: cargo runs test binaries one at a time).
export BLAST_TEST_PG_CTL="$pg_bin/pg_ctl" BLAST_TEST_PG_DATA="$pg_dir/data" BLAST_TEST_PG_LOG="$pg_dir/log" BLAST_TEST_PG_OPTS="$pg_opts"
export BLAST_TEST_PG_OWNER=$([ "$(id -u)" -eq 0 ] && echo postgres || echo "")
echo "pg.sh: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on port $pg_port ($([ "${BLAST_PG_DURABLE:-0}" = 1 ] && echo durable || echo fsync off))" >&2
