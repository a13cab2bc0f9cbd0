#!/usr/bin/env bash
# A PostgreSQL server for the scale-out test (tests/nas/test_postgres.py); prints its URL.
#  - installs Debian's `postgresql` if missing
#  - its own cluster "slimformer" (not the system's "main"), listening on 127.0.0.1 only, port
#    $SLIMFORMER_PG_PORT (default 5439), started if down; role and database "slimformer"
#    (password "slimformer", CREATEDB: each test run creates and drops its own database)
# Idempotent: when the server already answers it only prints the URL. Log lines go to stderr.
set -euo pipefail
cd /  # the postgres user may not be able to enter the caller's folder
log() { echo "postgres.sh: $*" >&2; }
NAME=slimformer
PORT="${SLIMFORMER_PG_PORT:-5439}"
url() { echo "postgresql://slimformer:slimformer@127.0.0.1:$PORT/slimformer"; }
ready() {
  command -v psql >/dev/null &&
    PGCONNECT_TIMEOUT=3 psql "$(url)" -Atqc 'select 1' >/dev/null 2>&1
}
if ready; then url; exit 0; fi

SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v pg_createcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
then
  log "installing Debian postgresql"
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >&2
fi
VER="$(ls /usr/lib/postgresql | sort -V | tail -1)"
have="$(pg_lsclusters -h | awk -v v="$VER" -v n="$NAME" '$1 == v && $2 == n {print $3}')"
if [ -z "$have" ]; then
  log "creating cluster $VER/$NAME on 127.0.0.1:$PORT"
  $SUDO pg_createcluster -q "$VER" "$NAME" -p "$PORT" --start-conf=manual >&2
else
  PORT="$have"
fi
CONF="/etc/postgresql/$VER/$NAME"
$SUDO sed -i '/^listen_addresses/d' "$CONF/postgresql.conf"  # set in conf.d: loopback only
echo "listen_addresses = '127.0.0.1'" | $SUDO tee "$CONF/conf.d/slimformer.conf" >/dev/null
$SUDO install -d -o postgres -g postgres -m 2775 /var/run/postgresql
if ! pg_lsclusters -h | awk -v v="$VER" -v n="$NAME" '$1 == v && $2 == n {print $4}' |
    grep -q online; then
  log "starting cluster $VER/$NAME"
  $SUDO pg_ctlcluster "$VER" "$NAME" start >&2
fi
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}
sql() { as_pg psql -p "$PORT" -v ON_ERROR_STOP=1 -Atq "$@"; }
if [ "$(sql -c "select 1 from pg_roles where rolname = 'slimformer'")" != 1 ]; then
  sql -c "create role slimformer login createdb password 'slimformer'"
fi
if [ "$(sql -c "select 1 from pg_database where datname = 'slimformer'")" != 1 ]; then
  sql -c "create database slimformer owner slimformer"
fi
ready || { log "the server does not answer at $(url)"; exit 1; }
url
