# Sourced by scripts/team-demo and benches/team.sh: starts a throwaway
# PostgreSQL cluster (as nobody when run by root: PostgreSQL refuses root)
# and moto's S3-compatible server, both on free loopback ports, under
# $WORK; `stop_services` stops both. Sets METADATA (a postgres:// URL
# without password), PGPASSWORD, ENDPOINT, AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY, and creates the database `team` and the bucket
# `team`. Needs: WORK (a folder every user can traverse).
PGBIN="$(pg_config --bindir)"
SERVICE_PIDS=()
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ "$(id -u)" = 0 ]; then
  as_pg() { setpriv --reuid=65534 --regid=65534 --clear-groups -- env HOME="$WORK" "$@"; }
else
  as_pg() { "$@"; }
fi
start_services() {
  PGPORT=$(free_port)
  export PGPASSWORD="dsv-$RANDOM$RANDOM"
  mkdir -p "$WORK/pg/data" "$WORK/pg/s"; printf '%s' "$PGPASSWORD" > "$WORK/pg/pw"; chmod 644 "$WORK/pg/pw"
  if [ "$(id -u)" = 0 ]; then chown 65534 "$WORK/pg/data" "$WORK/pg/s"; fi
  chmod 700 "$WORK/pg/data"
  as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U dsv --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$WORK/pg/pw" --locale=C.UTF-8 --no-sync >/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/s/log" -w \
    -o "-p $PGPORT -k $WORK/pg/s -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  pg_sql postgres "CREATE DATABASE team"
  METADATA="postgres://dsv@127.0.0.1:$PGPORT/team"
  S3PORT=$(free_port)
  moto_server -H 127.0.0.1 -p "$S3PORT" >"$WORK/moto.log" 2>&1 &
  SERVICE_PIDS+=($!)
  for _ in $(seq 200); do curl -s "http://127.0.0.1:$S3PORT/" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -s -X PUT "http://127.0.0.1:$S3PORT/team" >/dev/null
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
  ENDPOINT="http://127.0.0.1:$S3PORT"
}
# Runs SQL in database $1 as the superuser (local socket).
pg_sql() { as_pg "$PGBIN/psql" -h "$WORK/pg/s" -p "$PGPORT" -U dsv -d "$1" -qAtc "$2" >/dev/null; }
stop_services() {
  for p in "${SERVICE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ -f "$WORK/pg/data/postmaster.pid" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}
