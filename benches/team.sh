#!/usr/bin/env bash
# Team-repository figures on this machine (throwaway PostgreSQL and moto on
# loopback, started by scripts/team-services.sh):
#
# 1. dequeue: 16 agents (threads with their own connections) on one queue,
#    5,000 no-op tasks — tasks started per second, each exactly once;
# 2. trigger latency across machines: machine 1 finalizes a version,
#    machine 2's `dsv agent --triggers` launches a clone, machine 3's agent
#    starts it — version created → task started, p50 / p99 / max;
# 3. scale: VERSIONS versions and EVENTS events in the database, then
#    `dataset list -n 20`, `dataset show`, `events --last` (each command as
#    a user runs it: process start, connect, query), median of 5 runs.
#
#   benches/team.sh [ROUNDS] [VERSIONS] [EVENTS]   # default 30 100000 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-30}"
VERSIONS="${2:-100000}"
EVENTS="${3:-1000000}"
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p dsv-cli -p dsv-benches
DSV="$(cd "$TARGET/release" && pwd)/dsv"
BENCH="$(cd "$TARGET/release" && pwd)/team-bench"
DATA="$(cd "${DSV_OCCUPANCY:-../shared/data/occupancy}" && pwd)"
WORK="$(mktemp -d /tmp/dsv-team-bench.XXXXXX)"; chmod 755 "$WORK"
# shellcheck source=../scripts/team-services.sh
. scripts/team-services.sh
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; stop_services; rm -rf "$WORK"' EXIT
start_services
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
stats() { sort -n | awk '{a[NR]=$1} END {p99=int(NR*0.99+0.999); if (p99<1) p99=1; printf "p50 %d ms, p99 %d ms, max %d ms over %d runs\n", a[int((NR+1)/2)], a[p99], a[NR], NR}'; }

echo "== 1. dequeue: 16 agents, 5,000 no-op tasks"
pg_sql postgres "CREATE DATABASE dequeue"
"$BENCH" dequeue "postgres://dsv@127.0.0.1:$PGPORT/dequeue" 16 5000

echo "== 2. trigger latency across machines: version created → launched task started"
on() { local m=$1; shift; (cd "$WORK/$m" && DSV_REPO="$WORK/$m/repo" HOME="$WORK/$m" "$DSV" "$@"); }
mkdir -p "$WORK/m1/train" "$WORK/m1/eval" "$WORK/m2" "$WORK/m3"
"$DSV" init "$WORK/m1/repo" --metadata "$METADATA" --objects s3://team/bench --endpoint "$ENDPOINT" >/dev/null
on m2 connect --metadata "$METADATA" "$WORK/m2/repo" >/dev/null
on m3 connect --metadata "$METADATA" "$WORK/m3/repo" >/dev/null
cp "$DATA/datatraining.txt" "$WORK/m1/train/"; cp "$DATA/datatest.txt" "$WORK/m1/eval/"
on m1 -q dataset sync occ/train "$WORK/m1/train" >/dev/null
on m1 -q dataset sync occ/eval "$WORK/m1/eval" >/dev/null
BASE=$(on m1 task create occ/model --trainer logistic --set General/dataset_id=occ/train \
  --set General/test_dataset_id=occ/eval --set General/label=Occupancy \
  --set General/features=Temperature,Humidity,Light,CO2,HumidityRatio)
on m1 trigger add dataset retrain --project occ --dataset train --clone "$BASE" \
  --set 'General/dataset_id=${dataset.id}' --queue q >/dev/null
(cd "$WORK/m2" && DSV_REPO="$WORK/m2/repo" exec "$DSV" agent --triggers --queue none >"$WORK/m2/agent.log" 2>&1) &
PIDS+=($!)
(cd "$WORK/m3" && DSV_REPO="$WORK/m3/repo" exec "$DSV" agent --queue q >"$WORK/m3/agent.log" 2>&1) &
PIDS+=($!)
for i in $(seq "$ROUNDS"); do
  printf '"%d","2015-02-10 09:3%d:00",21,27,0,500,0.004,0\n' "$((9000 + i))" "$((i % 10))" >> "$WORK/m1/train/datatraining.txt"
  V=$(on m1 --json dataset sync occ/train "$WORK/m1/train" | j 'd["id"]')
  C=$(on m1 --json dataset show "$V" | j 'd["created_ms"]')
  while :; do
    T=$(on m1 --json trigger history retrain | j '[f["task"] for f in d if f["subject"]=="'"$V"'"][0] if any(f["subject"]=="'"$V"'" for f in d) else ""')
    [ -n "$T" ] && break
  done
  while :; do
    S=$(on m1 --json task show "$T" | j 'd["started_ms"] or ""')
    [ -n "$S" ] && break
  done
  echo $(( S - C ))
done | stats

echo "== 3. scale: $VERSIONS versions, $EVENTS events"
pg_sql postgres "CREATE DATABASE scale"
mkdir -p "$WORK/scale"
"$DSV" init "$WORK/scale/repo" --metadata "postgres://dsv@127.0.0.1:$PGPORT/scale" \
  --objects s3://team/scale --endpoint "$ENDPOINT" >/dev/null
s=$(date +%s)
"$BENCH" fill "$WORK/scale/repo" "$VERSIONS" "$EVENTS"
echo "   (filled in $(( $(date +%s) - s )) s)"
pg_sql scale "VACUUM ANALYZE dsv_kv"
export DSV_REPO="$WORK/scale/repo"
timed() {
  for _ in 1 2 3 4 5; do
    s=$(date +%s%N); "$DSV" "$@" >/dev/null; e=$(date +%s%N)
    echo $(( (e - s) / 1000000 ))
  done | sort -n | awk -v what="$*" '{a[NR]=$1} END {printf "%-28s median %d ms, min %d, max %d (5 runs)\n", what, a[3], a[1], a[5]}'
}
timed dataset list bench/many -n 20
timed dataset show bench/many
timed dataset show bench/many@1.0.77
timed events --last
timed --json events --last
