#!/usr/bin/env bash
# The same benchmarks with two builds of dsv, one after the other in one run
# (no regression check of a change): the retraining loop (benches/loop.sh),
# no-op syncs of 25,000 and 100,000 files (benches/datasets.sh) and dsv's
# ingest rows of benches/compare.sh (no peers).
#
#   benches/before-after.sh OLD_DSV NEW_DSV [GEN] [WORKDIR]
#
# GEN: a dsv-gen binary (default: the release build's). The 10,000-version
# show/list/diff part of datasets.sh needs a repository each build can read
# and is left out (SKIP_MANY).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD="$(realpath "$1")"; NEW="$(realpath "$2")"
TARGET="${CARGO_TARGET_DIR:-target}"
GEN="$(realpath "${3:-$TARGET/release/dsv-gen}")"
WORK="${4:-/var/tmp/dsv-before-after}"
mkdir -p "$WORK"
for which in old new; do
  bin=$OLD; [ $which = new ] && bin=$NEW
  echo "## $which: $bin"
  DSV="$bin" benches/loop.sh "${LOOP_RUNS:-5}"
  DSV="$bin" GEN="$GEN" SKIP_MANY=1 SIZES="${SIZES:-25000 100000}" benches/datasets.sh "$WORK/datasets-$which"
  DSV="$bin" GEN="$GEN" PEERS="" SCENARIOS="${SCENARIOS:-binary csv small}" benches/compare.sh "$WORK/compare-$which"
done
