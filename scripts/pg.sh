#!/usr/bin/env bash
# Runs PostgreSQL 16 + pgvector from the PyPI wheel pgserver==0.1.4 (fetched by assets.py) on a
# free loopback port, as a non-root user (Postgres refuses to run as root).
#
#   scripts/pg.sh start [DIR]   initialise DIR if needed, start, print the database URL
#   scripts/pg.sh stop  [DIR]   stop (fast shutdown); data stays in DIR
#   scripts/pg.sh url   [DIR]   print the URL of a running server
#   scripts/pg.sh destroy [DIR] stop and delete DIR
#
# DIR defaults to $OMEGA_PG_DIR or /tmp/omega-pg; OMEGA_PG_SHARED_BUFFERS (default 256MB) sizes
# the buffer cache for benchmarks with large indexes. The database `omega` has the `vector`
# extension; the role `omega` is a superuser (tests create and drop their own databases).
# As root the server runs as the `postgres` user, created if missing.
set -euo pipefail

cmd=${1:-}
dir=${2:-${OMEGA_PG_DIR:-/tmp/omega-pg}}
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "pg.sh: $*" >&2; exit 1; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

ensure_user() {
  [ "$(id -u)" = 0 ] || return 0
  id postgres >/dev/null 2>&1 && return 0
  echo "pg.sh: creating system user postgres" >&2
  useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres 2>/dev/null ||
    adduser --system --group --home /var/lib/postgresql postgres >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pgbin() {
  local root
  root=$(python3 "$here/assets.py" path postgres) || die "could not fetch the postgres asset"
  echo "$root/bin"
}

start() {
  local bin port
  bin=$(pgbin)
  ensure_user
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  chmod 700 "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$dir/data" -U omega --auth=trust --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; die "initdb failed"; }
  fi
  if [ -f "$dir/port" ] && as_owner "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    url; return
  fi
  # Restarting an existing DIR keeps its port while it is free, so clients configured with
  # the old URL (a server under a fault test) reconnect without being told a new one.
  if [ -f "$dir/port" ] && python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$(cat "$dir/port")" 2>/dev/null; then
    port=$(cat "$dir/port")
  else
    port=$(free_port)
  fi
  echo "$port" >"$dir/port"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/port"
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=300 -c shared_buffers=${OMEGA_PG_SHARED_BUFFERS:-256MB} -c maintenance_work_mem=512MB" \
    start >/dev/null || { tail -n 30 "$dir/server.log" >&2; die "postgres did not start"; }
  if ! "$bin/psql" -h 127.0.0.1 -p "$port" -U omega -d postgres -tAc "select 1 from pg_database where datname='omega'" | grep -q 1; then
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U omega omega
  fi
  PGOPTIONS="-c client_min_messages=warning" "$bin/psql" -h 127.0.0.1 -p "$port" -U omega -d omega -qc "create extension if not exists vector" >/dev/null
  url
}

url() {
  [ -f "$dir/port" ] || die "no server in $dir (run: scripts/pg.sh start $dir)"
  echo "postgres://omega@127.0.0.1:$(cat "$dir/port")/omega"
}

stop() {
  local bin
  bin=$(pgbin)
  [ -d "$dir/data" ] || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  destroy) stop; rm -rf "$dir" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
