#!/usr/bin/env bash
# Repeated `dataset get` time of each dsv binary given (e.g. an old and a new build):
# benches/get-repeat.sh OLD/dsv NEW/dsv — 40 x 2 MB files and 25,000 small files, 9 runs each.
set -euo pipefail
W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT; mkdir -p $W/big $W/small
for i in $(seq 1 40); do head -c 2000000 /dev/urandom > $W/big/f$i.bin; done
for d in $(seq 1 50); do mkdir -p $W/small/d$d; for i in $(seq 1 500); do echo "row $d $i $RANDOM" > $W/small/d$d/f$i.csv; done; done
n=0
for bin in "$@"; do
  n=$((n+1))
  for set in big small; do
    R=$W/repo-$n-$set; $bin init $R >/dev/null
    $bin --repo $R -q dataset sync p/$set $W/$set >/dev/null
    $bin --repo $R dataset get p/$set >/dev/null
    ts=()
    for k in $(seq 1 9); do
      s=$(date +%s%N); $bin --repo $R dataset get p/$set >/dev/null; e=$(date +%s%N)
      ts+=($(( (e-s)/1000000 )))
    done
    sorted=$(printf '%s\n' "${ts[@]}" | sort -n | tr '\n' ' ')
    echo "$bin $set: repeated get ms (9 runs, sorted): $sorted"
  done
done
