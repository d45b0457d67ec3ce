#!/usr/bin/env bash
# Dataset-level targets, timed with hyperfine on release builds:
#   - `dsv dataset sync` of an unchanged folder of 25,000 and 100,000 files;
#   - `dsv dataset show / list / diff` on a repository with 10,000 versions.
#
#   benches/datasets.sh [WORKDIR]      # default: /var/tmp/dsv-datasets
#   VERSIONS=10000 SIZES="25000 100000" benches/datasets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/var/tmp/dsv-datasets}"
VERSIONS="${VERSIONS:-10000}"
SIZES="${SIZES:-25000 100000}"
TARGET="${CARGO_TARGET_DIR:-target}"
[ -n "${DSV:-}" ] && [ -n "${GEN:-}" ] || cargo build --release -q -p dsv-cli -p dsv-benches
DSV="${DSV:-$TARGET/release/dsv}"  # DSV=path: measure another build
GEN="${GEN:-$TARGET/release/dsv-gen}"
SCALE="${SCALE:-$TARGET/release/dataset-scale}"  # SCALE=path: the builder of that build
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 1; }
mkdir -p "$WORK"

for n in $SIZES; do
  d="$WORK/small-$n"
  [ -d "$d/data" ] || { mkdir -p "$d/data"; "$GEN" small "$d/data" "$n"; }
  rm -rf "$d/.dsv"
  "$DSV" init "$d" >/dev/null
  /usr/bin/time -f "first sync of $n files: %e s, max RSS %M KB" "$DSV" --repo "$d" -q dataset sync bench/small "$d/data" >/dev/null
  # Leave the stat cache's racy-timestamp window behind, then warm it.
  "$DSV" --repo "$d" -q dataset sync bench/small "$d/data" >/dev/null
  hyperfine -N --warmup 2 --runs 10 --export-markdown "$WORK/sync-$n.md" \
    "$DSV --repo $d -q dataset sync bench/small $d/data"
done

m="$WORK/many"
if [ -n "${SKIP_MANY:-}" ]; then cat "$WORK"/sync-*.md; exit 0; fi
if ! "$DSV" --repo "$m" -q dataset show bench/many >/dev/null 2>&1; then
  rm -rf "$m"
  /usr/bin/time -f "built $VERSIONS versions in %e s" "$SCALE" "$m" "$VERSIONS"
fi
hyperfine -N --warmup 3 --runs 20 --export-markdown "$WORK/many.md" \
  "$DSV --repo $m dataset show bench/many" \
  "$DSV --repo $m --json dataset list bench/many" \
  "$DSV --repo $m dataset diff bench/many@1.0.0 bench/many"
cat "$WORK"/sync-*.md "$WORK/many.md"
