#!/usr/bin/env bash
# Retraining-loop figures: training + evaluation time of the built-in
# logistic regression on the occupancy data, queue overhead (enqueue → an
# idle agent starts the task), and trigger latency (a version finalized →
# the task it launched is running), with a long-running `dsv agent --triggers`.
#
#   benches/loop.sh [ROUNDS]      # default 10 rounds of each
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-10}"
TARGET="${CARGO_TARGET_DIR:-target}"
# DSV=path: measure another build (then nothing is built).
if [ -z "${DSV:-}" ]; then
  cargo build --release -q -p dsv-cli
  DSV="$(cd "$TARGET/release" && pwd)/dsv"
fi
DATA="$(cd "${DSV_OCCUPANCY:-../shared/data/occupancy}" && pwd)"
WORK="$(mktemp -d)"
trap 'kill $AGENT 2>/dev/null && wait $AGENT 2>/dev/null; rm -rf "$WORK"' EXIT
export DSV_REPO="$WORK/repo"
"$DSV" init "$WORK/repo" >/dev/null
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
for n in train eval; do mkdir -p "$WORK/$n"; done
cp "$DATA/datatraining.txt" "$WORK/train/"; cp "$DATA/datatest.txt" "$WORK/eval/"
"$DSV" -q dataset sync occ/train "$WORK/train" >/dev/null
"$DSV" -q dataset sync occ/eval "$WORK/eval" >/dev/null
BASE=$("$DSV" task create occ/model --trainer logistic --set General/dataset_id=occ/train \
  --set General/test_dataset_id=occ/eval --set General/label=Occupancy \
  --set General/features=Temperature,Humidity,Light,CO2,HumidityRatio)

echo "== training + evaluation (dsv task run, whole process), logistic regression"
for i in $(seq "$ROUNDS"); do
  T=$("$DSV" task clone "$BASE")
  s=$(date +%s%N); "$DSV" -q task run "$T" >/dev/null; e=$(date +%s%N)
  echo "$(( (e - s) / 1000000 ))"
done | sort -n | awk '{a[NR]=$1} END {printf "median %d ms, min %d ms, max %d ms over %d runs\n", a[int((NR+1)/2)], a[1], a[NR], NR}'

"$DSV" agent --triggers --queue q >/dev/null 2>&1 &
AGENT=$!
"$DSV" trigger add dataset retrain --project occ --dataset train --clone "$BASE" \
  --set 'General/dataset_id=${dataset.id}' --queue q >/dev/null

wait_done() { # task id → waits until it left queued/running
  while :; do
    st=$("$DSV" --json task show "$1" | j 'd["status"]')
    case $st in queued|running) ;; *) break ;; esac
  done
}
echo "== queue overhead: enqueue → started by an idle agent"
for i in $(seq "$ROUNDS"); do
  T=$("$DSV" task clone "$BASE")
  "$DSV" -q task enqueue "$T" --queue q >/dev/null
  wait_done "$T"
  "$DSV" --json task show "$T" | j 'd["started_ms"] - d["queued_ms"]'
done | sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms over %d runs\n", a[int((NR+1)/2)], a[NR], NR}'

echo "== trigger latency: version finalized → launched task running"
for i in $(seq "$ROUNDS"); do
  echo "$i" >> "$WORK/train/datatraining.txt"; sed -i '$ d' "$WORK/train/datatraining.txt"
  printf '"%d","2015-02-10 09:3%d:00",21,27,0,500,0.004,0\n' "$((9000 + i))" "$((i % 10))" >> "$WORK/train/datatraining.txt"
  V=$("$DSV" --json dataset sync occ/train "$WORK/train" | j 'd["id"]')
  C=$("$DSV" --json dataset show "$V" | j 'd["created_ms"]')
  while :; do
    T=$("$DSV" --json trigger history retrain | j '[f["task"] for f in d if f["subject"]=="'"$V"'"][0] if any(f["subject"]=="'"$V"'" for f in d) else ""')
    [ -n "$T" ] && break
  done
  wait_done "$T"
  S=$("$DSV" --json task show "$T" | j 'd["started_ms"]')
  echo $(( S - C ))
done | sort -n | awk '{a[NR]=$1} END {printf "median %d ms, max %d ms over %d runs\n", a[int((NR+1)/2)], a[NR], NR}'
