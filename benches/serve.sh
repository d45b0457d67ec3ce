#!/usr/bin/env bash
# dsv serve under load on loopback (wrk; bounded in time):
#   1. single-row predict of the occupancy logistic model, 64 connections:
#      requests/s and latency percentiles;
#   2. the same load while the production tag moves between two models
#      three times: non-2xx responses (must be 0) and the time until the
#      new model answers;
#   3. resident memory of the server serving three model lines.
#
#   benches/serve.sh [SECONDS]      # default 10 per run
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
command -v wrk >/dev/null || { apt-get install -y -qq wrk >/dev/null 2>&1 || sudo apt-get install -y -qq wrk >/dev/null; }
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p dsv-cli
DSV="$(cd "$TARGET/release" && pwd)/dsv"
DATA="$(cd "${DSV_OCCUPANCY:-../shared/data/occupancy}" && pwd)"
WORK="$(mktemp -d /tmp/dsv-serve-bench.XXXXXX)"
SERVE=""
trap '[ -n "$SERVE" ] && kill $SERVE 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
export DSV_REPO="$WORK/repo"
"$DSV" init "$WORK/repo" >/dev/null
mkdir -p "$WORK/train" "$WORK/eval"
cp "$DATA/datatraining.txt" "$WORK/train/"; cp "$DATA/datatest.txt" "$WORK/eval/"
"$DSV" -q dataset sync occ/train "$WORK/train" >/dev/null
"$DSV" -q dataset sync occ/eval "$WORK/eval" >/dev/null
model() { # NAME TRAINER FEATURES → model id
  local t
  t=$("$DSV" task create "occ/$1" --trainer "$2" --set General/dataset_id=occ/train \
    --set General/test_dataset_id=occ/eval --set General/label=Occupancy --set "General/features=$3")
  "$DSV" -q task run "$t" >/dev/null
  "$DSV" --json task show "$t" | python3 -c 'import json,sys; print(json.load(sys.stdin)["models"][0])'
}
ALL=Temperature,Humidity,Light,CO2,HumidityRatio
A=$(model model logistic "$ALL"); B=$(model model logistic Temperature,Light,CO2)
C=$(model tree tree "$ALL"); D=$(model forest forest "$ALL")
for m in "$A" "$C" "$D"; do "$DSV" -q model tag "$m" --add production >/dev/null; done
"$DSV" --json serve --bind 127.0.0.1:0 > "$WORK/serve.out" 2> "$WORK/serve.log" &
SERVE=$!
until [ -s "$WORK/serve.out" ]; do kill -0 $SERVE; sleep 0.05; done
URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listening"])' "$WORK/serve.out")
cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"Temperature": 21.76, "Humidity": 31.13, "Light": 437.33, "CO2": 1029.67, "HumidityRatio": 0.00502}'
LUA
P="$URL/v1/models/occ/model/predict"
curl -sf "$P" -H 'Content-Type: application/json' -d '{"Temperature": 21.76, "Humidity": 31.13, "Light": 437.33, "CO2": 1029.67, "HumidityRatio": 0.00502}' >/dev/null
RSS0=$(grep VmRSS /proc/$SERVE/status | tr -s ' ' | cut -d' ' -f2-)
echo "== 1. single-row predict, 64 connections, ${SECS} s (wrk, 2 threads)"
wrk -t2 -c64 -d"${SECS}s" --latency -s "$WORK/post.lua" "$P" | grep -E "Requests/sec|50%|90%|99%|Non-2xx|Socket errors"
echo "== 2. the same load while production moves A → B → A → B"
wrk -t2 -c64 -d"${SECS}s" -s "$WORK/post.lua" "$P" > "$WORK/wrk2.txt" &
W=$!
for m in "$B" "$A" "$B"; do
  sleep 1
  s=$(date +%s%N)
  "$DSV" -q model tag "$m" --add production >/dev/null
  other=$([ "$m" = "$A" ] && echo "$B" || echo "$A")
  "$DSV" -q model tag "$other" --remove production >/dev/null
  until curl -sf "$P" -H 'Content-Type: application/json' -d '{"Temperature": 21.76, "Humidity": 31.13, "Light": 437.33, "CO2": 1029.67, "HumidityRatio": 0.00502}' | grep -q "\"model\":\"$m\""; do :; done
  echo "   production → ${m:0:12}: answering after $(( ($(date +%s%N) - s) / 1000000 )) ms (tag commands included)"
done
wait $W
grep -E "requests in|Non-2xx|Socket errors" "$WORK/wrk2.txt" || true
grep -q "Non-2xx" "$WORK/wrk2.txt" && echo "   FAILED requests during the swaps" || echo "   no failed request during the swaps"
echo "== 3. memory: three model lines served (logistic, tree, forest)"
echo "   resident: $RSS0 with the three lines loaded, before any request; $(grep VmRSS /proc/$SERVE/status | tr -s ' ' | cut -d' ' -f2-) after the runs above"
